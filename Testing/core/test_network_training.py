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
