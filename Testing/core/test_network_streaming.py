"""Streamed blocks (blocks.py): CPU inference on large tensors runs slab by slab along depth, and must
give what the whole-tensor pass gives, up to rounding: encoder outputs, decoder logits, the recorded
GroupNorm statistics, windows decoded with them, several objects at once, bf16 autocast. Here every
tensor streams (STREAM_BYTES 0) in slabs of a few rows (SLAB_BYTES 1), so that every slab boundary,
halo and face of the real thing is exercised on a small model."""

from __future__ import annotations

import pytest
import torch

from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts, blocks

SMALL = dict(init_filters=8, blocks_down=(1, 2, 1, 1), heads=2, mlp_hidden=32)
CL = torch.channels_last_3d

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ENSAM(ENSAMConfig(**SMALL)).eval().to(memory_format=CL)


def stream_everything(monkeypatch):
    monkeypatch.setattr(blocks, "STREAM_BYTES", 0)
    monkeypatch.setattr(blocks, "SLAB_BYTES", 1)
    monkeypatch.setattr(blocks, "ONEDNN_MIN_NCDH", 0)


@pytest.fixture
def streamed(monkeypatch):
    stream_everything(monkeypatch)


def image(shape=(40, 24, 32), seed=1):
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed)).to(memory_format=CL)


PROMPTS = Prompts.from_objects([{"box": ((8, 4, 6), (30, 20, 28))}, {"fg": [(10, 12, 16)], "bg": [(30, 5, 5)]}])


def run(model, x, prompts=PROMPTS, region=None):
    with torch.inference_mode():
        emb = model.encode(x)
        norms = {}
        logits = model.decode(emb, prompts, None, region, norms)
        again = model.decode(emb, prompts, None, region, norms)  # the recorded statistics reused
    return emb, logits, again, norms


def rows(slabs) -> list[int]:
    assert slabs[0][0] == 0 and all(b == c for (_, b), (c, _) in zip(slabs, slabs[1:]))
    return [b - a for a, b in slabs]


def test_slabs_cover_the_depth_in_equal_pieces_of_the_budget_or_what_onednn_needs(monkeypatch):
    x = torch.zeros(1, 16, 100, 256, 256)  # 4 MB per row and 16 channels
    sizes = rows(blocks.slabs_of(x, 16, 16))
    assert sum(sizes) == 100 and max(sizes) - min(sizes) <= 1
    assert min(sizes) == 6 and max(sizes) == 7  # 24 MB: 6 rows (a 7th when the depth does not divide)
    sizes = rows(blocks.slabs_of(torch.zeros(1, 16, 100, 64, 64), 16, 16))  # 256 kB rows: 96 fit the budget
    assert sizes == [100]
    sizes = rows(blocks.slabs_of(torch.zeros(1, 8, 400, 16, 4000), 8, 8))  # shallow and wide: oneDNN's minimum
    assert min(sizes) * 8 * 16 >= blocks.ONEDNN_MIN_NCDH and sum(sizes) == 400
    monkeypatch.setattr(blocks, "SLAB_BYTES", 1)
    monkeypatch.setattr(blocks, "ONEDNN_MIN_NCDH", 0)
    assert rows(blocks.slabs_of(torch.zeros(1, 8, 5, 16, 16), 8, 8)) == [1] * 5


def test_streamed_inference_equals_the_whole_tensor_pass(model, monkeypatch):
    x = image()
    whole = run(model, x)
    stream_everything(monkeypatch)
    assert len(blocks.slabs_of(x, 8, 8)) == 40  # one row a slab: every face and halo
    streamed = run(model, x)
    for a, b in zip(whole[0].skips + [whole[0].bottleneck], streamed[0].skips + [streamed[0].bottleneck]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed[1], whole[1], rtol=1e-4, atol=2e-4)  # the interaction amplifies rounding
    torch.testing.assert_close(streamed[2], streamed[1], rtol=0, atol=1e-5)
    assert whole[3].keys() == streamed[3].keys() and len(whole[3]) == 7
    for norm, (mean, rstd) in whole[3].items():
        torch.testing.assert_close(streamed[3][norm][0], mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(streamed[3][norm][1], rstd, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("streamed")
def test_streamed_decoder_alone_matches_with_the_same_inputs(model, monkeypatch):
    """The decoder on one fixed embedding: streamed and whole agree to fp32 rounding, region crops too."""
    with torch.inference_mode():
        emb = model.encode(image())
        x, skips = model.decoder_inputs(emb, PROMPTS, None)
        streamed_norms = {}
        streamed = model.decoder(x, skips, streamed_norms)
        monkeypatch.setattr(blocks, "STREAM_BYTES", 1 << 50)
        whole_norms = {}
        whole = model.decoder(x, skips, whole_norms)
        torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)
        reused = model.decoder(x, skips, streamed_norms)  # whole pass, statistics of the streamed one
        torch.testing.assert_close(reused, streamed, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("streamed")
def test_windows_equal_the_streamed_whole_decode_with_its_statistics(model):
    with torch.inference_mode():
        emb = model.encode(image())
        norms = {}
        model.decode(emb, PROMPTS, None, None, norms)
        full = model.decode(emb, PROMPTS, None, None, norms)
        for window in [(slice(0, 40), slice(0, 24), slice(0, 32)), (slice(3, 17), slice(5, 24), slice(0, 9))]:
            part = model.decode_window(emb, PROMPTS, None, window, norms)
            torch.testing.assert_close(part, full[(..., *window)], rtol=0, atol=1e-5)


@pytest.mark.usefixtures("streamed")
def test_region_decoding_streams_too(model, monkeypatch):
    region = (slice(8, 32), slice(0, 16), slice(8, 32))
    prompts = Prompts.from_objects([{"box": ((8, 2, 10), (30, 14, 30))}])
    streamed = run(model, image(), prompts, region)[1]
    monkeypatch.setattr(blocks, "STREAM_BYTES", 1 << 50)
    whole = run(model, image(), prompts, region)[1]
    assert streamed.shape == (1, 1, 24, 16, 24)
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=2e-4)


@pytest.mark.usefixtures("streamed")
def test_only_fp32_inference_streams():
    x = torch.zeros(1, 8, 4, 4, 4)
    with torch.no_grad():
        assert blocks.streams(x) and not blocks.streams(x.bfloat16())
    assert not blocks.streams(x)  # autograd on


@pytest.mark.usefixtures("streamed")
def test_mixed_parts_stream_in_their_promoted_dtype(model):
    """A bf16 skip beside an fp32 upsampled part (autocast's decoder) still streams correctly."""
    with torch.inference_mode():
        x, skip = torch.randn(1, 8, 12, 10, 9), torch.randn(1, 8, 12, 10, 9)
        block = model.decoder.ups[-1].block
        whole = block(torch.cat([x, skip.bfloat16().float()], dim=1))
        streamed = blocks.stream_block(block, [x, skip.bfloat16()], None)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("streamed")
def test_training_never_streams(model):
    """With autograd the plain pass runs (in-place ReLU and residual additions stay autograd-safe)."""
    x = image(seed=2)
    with torch.no_grad():
        reference = model.encode(x).bottleneck
    model.train()
    try:
        out = model.encode(x.requires_grad_()).bottleneck
        out.square().sum().backward()
    finally:
        model.eval()
    assert not blocks.streams(out) and x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-5)
