"""A small ENSAM learns: it overfits one synthetic volume, and gradients reach every prompt path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts, renormalize_weights

SHAPE = (16, 24, 24)
SMALL = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/core/conftest.py


def sphere_in_noise(seed=0):
    """An ellipsoid (radii 5, 6, 6 voxels) brighter than its noisy background, and its mask."""
    g = torch.Generator().manual_seed(seed)
    zz, yy, xx = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij")
    inside = ((zz - 8) ** 2 / 25 + (yy - 11) ** 2 / 36 + (xx - 13) ** 2 / 36) <= 1
    image = 0.3 + 0.4 * inside.float() + 0.1 * torch.randn(SHAPE, generator=g)
    return image[None, None], inside[None, None].float()


PROMPTS = Prompts.from_objects([{"box": ((3, 5, 7), (13, 17, 19)), "fg": [(8, 11, 13)]}])


def dice_bce(logits, target):
    """Soft Dice + 2 x binary cross-entropy (the paper's loss, one object)."""
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return dice + 2 * F.binary_cross_entropy_with_logits(logits, target)


def test_gradients_reach_prompt_tokens_previous_logits_and_positions():
    torch.manual_seed(0)
    model = ENSAM(SMALL)
    image, target = sphere_in_noise()
    first = model(image, PROMPTS)
    refined = model(image, PROMPTS, prev_logits=first.detach())  # a click step after the box step
    (dice_bce(first, target) + dice_bce(refined, target)).backward()
    embedding_grad = model.prompt_encoder.embedding.weight.grad
    # the rows this prompt uses (box-min, box-max, fg click) get gradient; padding and bg do not
    assert embedding_grad[1:4].abs().sum(dim=1).min() > 0
    assert embedding_grad[0].abs().sum() == 0 and embedding_grad[4].abs().sum() == 0
    prev = model.prompt_encoder.prev
    for p in (prev.conv1.weight, prev.conv3.weight):
        assert p.grad.abs().sum() > 0
    layer = model.interaction.layers[0]
    for p in (layer.token_to_image.liere.theta, layer.image_to_token.s_qk.param, layer.alphas[3].param,
              model.s_out.param, model.encoder.init_conv.weight):
        assert p.grad.abs().sum() > 0


def test_small_model_overfits_one_volume():
    torch.manual_seed(0)
    model = ENSAM(SMALL)
    image, target = sphere_in_noise()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = dice_bce(model(image, PROMPTS), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        renormalize_weights(model)
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses
    with torch.no_grad():
        mask = model(image, PROMPTS) > 0
    dice = 2 * (mask & (target > 0)).sum() / (mask.sum() + (target > 0).sum())
    assert dice > 0.8, float(dice)


def _dirty_the_heap(value: float = 1e4) -> None:
    """Leave freed memory holding `value`, so that a kernel reading uninitialised memory reads it."""
    junk = [torch.full((1 << 14,), value) for _ in range(256)]
    del junk


@pytest.mark.parametrize("channels", [16, 64])
def test_bf16_training_gives_the_fp32_gradients_for_an_input_2_deep(channels):
    """oneDNN's bf16 backward of a stride-1 3x3x3 convolution of an input 2 voxels deep read uninitialised
    memory (CPUs with native bf16: relative error ~10^3, NaN skipped steps in training); blocks.Conv3d
    computes that case in fp32. On CPUs without native bf16 this passes either way."""
    from ENSAMSegmentLib.core.network.blocks import conv3

    torch.manual_seed(0)
    conv = conv3(channels, channels)
    x = torch.randn(1, channels, 2, 6, 6, requires_grad=True)
    weights = torch.randn(1, channels, 2, 6, 6)
    (conv(x) * weights).sum().backward()
    expected = conv.weight.grad.clone(), x.grad.clone()
    for _ in range(3):
        conv.weight.grad, x.grad = None, None
        _dirty_the_heap()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        (y.float() * weights).sum().backward()
        for got, want in zip((conv.weight.grad, x.grad), expected):
            assert torch.isfinite(got).all()
            assert float((got - want).abs().max() / want.abs().max()) < 0.02
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference keeps bf16 (its forward is exact)
        assert conv(x).dtype == torch.bfloat16


@pytest.mark.parametrize("n_objects", [1, 2])
def test_skip_terms_give_the_same_logits_and_gradients(n_objects):
    """Training's decodes from precomputed skip terms are the plain decoder, rewritten (fp32: exact to
    rounding), with the skips' gradients reaching the encoder."""
    torch.manual_seed(0)
    model = ENSAM(SMALL)
    for p in model.parameters():  # GroupNorm affine away from 1/0, so a half's weights matter
        if p.dim() == 1:
            p.data += 0.2 * torch.randn_like(p)
    image, target = sphere_in_noise()
    prompts = Prompts.from_objects([{"box": ((3, 5, 7), (13, 17, 19)), "fg": [(8, 11, 13)]}] * n_objects)

    calls = []
    forward_with_terms = model.decoder.forward_with_terms
    model.decoder.forward_with_terms = lambda *args: calls.append(1) or forward_with_terms(*args)

    def run(with_terms: bool):
        model.zero_grad(set_to_none=True)
        emb = model.encode(image)
        if with_terms:
            emb = model.with_skip_terms(emb)
            assert len(emb.skip_terms) == 3 and emb.skip_terms[-1][0].shape == (1, 8, *SHAPE)
        first = model.decode(emb, prompts)
        refined = model.decode(emb, prompts, prev_logits=first.detach())
        (dice_bce(first, target.expand_as(first)) + dice_bce(refined, target.expand_as(refined))).backward()
        return refined.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run(False)
    assert not calls
    terms, terms_grads = run(True)
    assert len(calls) == 2  # both decodes took the skip terms
    torch.testing.assert_close(terms, plain, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == terms_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(terms_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert terms_grads["encoder.init_conv.weight"].abs().sum() > 0


def test_skip_terms_leave_region_and_frozen_statistics_decodes_alone():
    torch.manual_seed(0)
    model = ENSAM(SMALL).eval()
    image, _ = sphere_in_noise()
    with torch.no_grad():
        emb = model.encode(image)
        with_terms = model.with_skip_terms(emb)
        region = (slice(0, 8), slice(8, 24), slice(0, 16))
        torch.testing.assert_close(model.decode(with_terms, PROMPTS, region=region),
                                   model.decode(emb, PROMPTS, region=region))
        norms = {}
        torch.testing.assert_close(model.decode(with_terms, PROMPTS, norms=norms), model.decode(emb, PROMPTS))
        assert norms  # the statistics were recorded: the plain path ran
        moved = with_terms.to(dtype=torch.float64)
        assert moved.skip_terms[0][0].dtype == torch.float64


@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 4, 2), (6, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upsample2x_is_trilinear_interpolation(shape, dtype):
    from ENSAMSegmentLib.core.network.blocks import upsample2x

    x = torch.randn(2, 3, *shape, dtype=dtype, requires_grad=True)
    ours = upsample2x(x)
    reference = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
    torch.testing.assert_close(ours, reference)
    g = torch.randn_like(ours)
    (grad,) = torch.autograd.grad(ours, x, g)
    (reference_grad,) = torch.autograd.grad(reference, x, g)
    torch.testing.assert_close(grad, reference_grad)
