"""Frozen GroupNorm statistics and windowed decoding (blocks.group_norm, Decoder.forward_window,
ENSAM.decode_window): recording then reusing statistics changes nothing, a window of a decode with
frozen statistics equals the same voxels of the whole decode, and bf16 statistics match fp32's."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts
from ENSAMSegmentLib.core.network.blocks import group_norm

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
SHAPE = (24, 32, 40)  # distinct sides: an axis mix-up cannot pass
ATOL = 1e-5  # fp32: windowed and whole decoding differ only by summation order

pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/core/conftest.py


def small_model(seed=0) -> ENSAM:
    torch.manual_seed(seed)
    return ENSAM(ENSAMConfig(**SMALL)).eval()


def two_objects() -> Prompts:
    return Prompts.from_objects([
        {"box": ((2, 3, 4), (12, 20, 25)), "fg": [(7, 11, 14)], "bg": [(3, 4, 5)]},
        {"fg": [(10, 5, 20)], "bg": [(20, 30, 38)]},
    ])


@pytest.fixture(scope="module")
def encoded():
    """(model, embedding, prompts [2 objects], prev logits [2, 1, *SHAPE]) in fp32."""
    model = small_model()
    torch.manual_seed(1)
    image, prev = torch.rand(1, 1, *SHAPE), torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        return model, model.encode(image), two_objects(), prev


def whole_with_norms(encoded, region=None) -> tuple[torch.Tensor, dict]:
    """A decode that records its statistics (over `region` when given) -> (logits, norms)."""
    model, emb, prompts, prev = encoded
    norms = {}
    with torch.no_grad():
        logits = model.decode(emb, prompts, prev, region=region, norms=norms)
    return logits, norms


def windows(shape, seed=0) -> list[tuple]:
    """Random windows, 1-voxel windows, windows touching each border, odd starts, the whole image."""
    rng = random.Random(seed)
    out = []
    for _ in range(10):
        starts = [rng.randrange(n) for n in shape]
        out.append(tuple(slice(a, rng.randrange(a + 1, n + 1)) for a, n in zip(starts, shape)))
    out += [tuple(slice(p, p + 1) for p in point)
            for point in ((0, 0, 0), (shape[0] - 1, shape[1] - 1, shape[2] - 1), (11, 17, 23))]
    for axis, n in enumerate(shape):
        middle = [slice(5, 14), slice(7, 20), slice(9, 30)]
        for side in (slice(0, 6), slice(n - 7, n)):
            out.append(tuple(side if a == axis else middle[a] for a in range(3)))
    out += [(slice(3, 10), slice(5, 6), slice(13, 40)), (slice(1, 24), slice(9, 32), slice(7, 8)),
            (slice(None),) * 3]
    return out


# ----------------------------------------------------------------------------- recording and reusing


def test_recorded_then_reused_norms_give_the_plain_decode(encoded):
    model, emb, prompts, prev = encoded
    with torch.no_grad():
        plain = model.decode(emb, prompts, prev)
        recorded, norms = whole_with_norms(encoded)
        reused = model.decode(emb, prompts, prev, norms=norms)
    torch.testing.assert_close(recorded, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(reused, plain, atol=ATOL, rtol=0)
    group_norms = [m for m in model.decoder.modules() if isinstance(m, nn.GroupNorm)]
    assert set(norms) == set(group_norms)  # every decoder GroupNorm, nothing else
    for norm, (mean, rstd) in norms.items():
        assert mean.shape == rstd.shape == (2, norm.num_groups) and mean.dtype == rstd.dtype == torch.float32
        assert (rstd > 0).all()


def test_reused_norms_are_really_used(encoded):
    """Statistics of another pass change the logits: reuse is not a no-op."""
    model, emb, prompts, prev = encoded
    _, norms = whole_with_norms(encoded)
    with torch.no_grad():
        plain = model.decode(emb, prompts, torch.zeros_like(prev))
        foreign = model.decode(emb, prompts, torch.zeros_like(prev), norms=norms)
    assert (plain - foreign).abs().max() > 1e-3


# ----------------------------------------------------------------------------- windows


def test_decode_window_equals_the_whole_decode_with_the_same_norms(encoded):
    model, emb, prompts, prev = encoded
    whole, norms = whole_with_norms(encoded)
    frozen = dict(norms)
    with torch.no_grad():
        for window in windows(SHAPE):
            part = model.decode_window(emb, prompts, prev, window, norms)
            expected = whole[(..., *window)]
            assert part.shape == expected.shape, window
            torch.testing.assert_close(part, expected, atol=ATOL, rtol=0, msg=lambda m, w=window: f"{w}: {m}")
    assert norms.keys() == frozen.keys() and all(norms[k] is frozen[k] for k in norms)  # read, not rewritten


def test_decode_window_accepts_python_slice_forms(encoded):
    """Negative and open slices mean what they mean in numpy."""
    model, emb, prompts, prev = encoded
    _, norms = whole_with_norms(encoded)
    with torch.no_grad():
        negative = model.decode_window(emb, prompts, prev, (slice(-5, None), slice(None, 4), slice(-9, -2)), norms)
        explicit = model.decode_window(emb, prompts, prev, (slice(19, 24), slice(0, 4), slice(31, 38)), norms)
    torch.testing.assert_close(negative, explicit, atol=0, rtol=0)


def test_windows_of_a_region_decoded_pass(encoded):
    """Statistics recorded over a region: windows anywhere (inside, across and outside the region)
    equal the whole decode with those statistics; with a decoder crop that is the whole image, a
    window over the region equals the region decode itself."""
    model, emb, prompts, prev = encoded
    region = (slice(8, 24), slice(0, 16), slice(16, 40))
    part, norms = whole_with_norms(encoded, region)
    with torch.no_grad():
        assert torch.equal(model.decode(emb, prompts, prev, region=region, norms=norms), part)  # reuse: same
        whole = model.decode(emb, prompts, prev, norms=norms)
        for window in (region, (slice(10, 20), slice(2, 9), slice(20, 35)), (slice(0, 12), slice(12, 24),
                       slice(10, 22)), (slice(0, 8), slice(20, 32), slice(0, 12)), (slice(None),) * 3):
            torch.testing.assert_close(model.decode_window(emb, prompts, prev, window, norms),
                                       whole[(..., *window)], atol=ATOL, rtol=0)
        inner = (slice(8, 16), slice(8, 24), slice(8, 32))  # + 2 cells of margin = the whole image
        inner_part, inner_norms = whole_with_norms(encoded, inner)
        torch.testing.assert_close(model.decode_window(emb, prompts, prev, inner, inner_norms), inner_part,
                                   atol=ATOL, rtol=0)


def test_decode_window_without_previous_logits():
    model = small_model(seed=2)
    torch.manual_seed(3)
    prompts = Prompts.from_objects([{"fg": [(4, 9, 30)]}])
    with torch.no_grad():
        emb = model.encode(torch.rand(1, 1, *SHAPE))
        norms = {}
        whole = model.decode(emb, prompts, None, norms=norms)
        window = (slice(2, 13), slice(20, 32), slice(25, 39))
        torch.testing.assert_close(model.decode_window(emb, prompts, None, window, norms), whole[(..., *window)],
                                   atol=ATOL, rtol=0)


def test_decode_window_errors(encoded):
    model, emb, prompts, prev = encoded
    _, norms = whole_with_norms(encoded)
    every = (slice(None),) * 3
    with torch.no_grad():
        for missing in ({}, None):
            with pytest.raises(ValueError, match="GroupNorm statistics"):
                model.decode_window(emb, prompts, prev, every, missing)
        for empty in ((slice(4, 4), slice(None), slice(None)), (slice(None), slice(9, 3), slice(None)),
                      (slice(None), slice(None), slice(50, 60))):  # the last: beyond the image
            with pytest.raises(ValueError, match="empty window"):
                model.decode_window(emb, prompts, prev, empty, norms)


# ----------------------------------------------------------------------------- bf16 statistics


def test_group_norm_statistics_in_cpu_bf16_channels_last_match_fp32():
    """The oneDNN path the session takes on bf16 CPUs: channels-last bf16 features, autocast. Rounding
    the features to bf16 (relative error <= 2^-9) moves a group's mean by at most 2^-9 of its mean |x|
    and its rstd by about as much relatively; the bounds below are twice that."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 8, 12, 10) * 3 + 1  # [N, C, D, H, W], mean far from 0
    reference = {}
    with torch.no_grad():
        expected = group_norm(norm, x, reference)
        low = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        recorded = {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = group_norm(norm, low, recorded)
            reused = group_norm(norm, low, recorded)
    (mean, rstd), (mean32, rstd32) = recorded[norm], reference[norm]
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 4)
    abs_mean = x.abs().reshape(2, 4, -1).mean(-1)
    assert ((mean - mean32).abs() <= 2 * 2**-9 * abs_mean).all(), (mean - mean32)
    torch.testing.assert_close(rstd, rstd32, rtol=2 * 2**-8, atol=0)
    scale = expected.abs().max()  # outputs: bf16 rounding of inputs and results, a few 2^-8 of the scale
    assert out.shape == x.shape and (out.float() - expected).abs().max() < 4 * 2**-8 * scale
    assert (reused.float() - expected).abs().max() < 4 * 2**-8 * scale
