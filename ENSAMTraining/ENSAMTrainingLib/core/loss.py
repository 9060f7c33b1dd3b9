"""The training loss (paper eq. 4): generalized Dice loss + 2 x binary cross-entropy, per object.

Each object is a binary problem (sigmoid of its logits). The generalized Dice loss (Sudre et
al. 2017) is taken over the two classes of that problem, foreground p and background 1 - p,
each weighted by 1 / (its ground-truth volume)^2, so a small object weighs as much as the
background around it; with a single class it would reduce to the plain Dice loss.
Computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BCE_WEIGHT = 2.0


def generalized_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Mean over objects of the 2-class generalized Dice loss. logits, target: [N, 1, D, H, W]."""
    p = torch.sigmoid(logits.float()).flatten(1)  # [N, V]
    g = target.float().flatten(1)
    probs = torch.stack([p, 1 - p], dim=1)  # [N, 2, V]
    truth = torch.stack([g, 1 - g], dim=1)
    volume = truth.sum(-1)  # [N, 2]
    weight = 1.0 / volume.clamp(min=1.0) ** 2
    # a class absent from the ground truth gets the largest weight present (MONAI's rule for inf)
    weight = torch.where(volume > 0, weight, weight.masked_fill(volume == 0, 0).amax(1, keepdim=True))
    intersection = (weight * (probs * truth).sum(-1)).sum(1)
    denominator = (weight * (probs + truth).sum(-1)).sum(1)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Generalized Dice + 2 x BCE for one interaction step. logits, target: [N, 1, D, H, W]."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return generalized_dice_loss(logits, target) + BCE_WEIGHT * bce
