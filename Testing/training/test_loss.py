"""The training loss agrees with MONAI's generalized Dice loss and behaves at the extremes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss

from ENSAMTrainingLib.core.loss import generalized_dice_loss, segmentation_loss


def two_class(logits, target):
    p = torch.sigmoid(logits)
    return torch.cat([p, 1 - p], 1), torch.cat([target, 1 - target], 1)


def test_generalized_dice_matches_monai():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 6, 7, 8)
    target = (torch.rand(3, 1, 6, 7, 8) > 0.8).float()
    target[2] = 0  # an empty object: MONAI's rule for the infinite weight
    probs, truth = two_class(logits, target)
    reference = GeneralizedDiceLoss(include_background=True)(probs, truth)
    torch.testing.assert_close(generalized_dice_loss(logits, target), reference, rtol=1e-5, atol=1e-6)


def test_loss_is_dice_plus_twice_bce_and_small_when_right():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:5, 2:6, 3:7] = 1
    right = (target * 2 - 1) * 20
    wrong = -right
    assert segmentation_loss(right, target) < 1e-3
    assert segmentation_loss(wrong, target) > 30
    logits = torch.randn(1, 1, 8, 8, 8)
    expected = generalized_dice_loss(logits, target) + 2 * F.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(segmentation_loss(logits, target), expected)


def test_loss_in_float32_from_bf16_logits():
    logits = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    target = (torch.rand(1, 1, 4, 4, 4) > 0.5).float()
    loss = segmentation_loss(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
