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
