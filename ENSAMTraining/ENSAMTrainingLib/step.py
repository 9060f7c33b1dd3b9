"""The training step: one sample, a box, then clicks simulated from the model's own prediction.

For one object of one image (``Sample``):

1. ``model.encode(image)`` once; the embedding is shared by every step below.
2. Step 0: the box (with its random offset) -> logits. A sample without a box (the challenge
   allows cases without one) starts with a click instead, simulated on an empty prediction.
3. Steps 1..5: ``simulation.next_click(gt, logits > 0)`` at the centre of the largest error
   region (fg for under-, bg for over-segmentation) is added to the prompts; the decoder
   runs again with the previous step's logits as ``prev_logits``. When no error is left,
   the sample ends early.
4. loss = mean over the steps of generalized Dice + 2 x BCE (loss.py).

Gradients and the fed-back logits: the previous logits enter the next step DETACHED, as in
SAM-style iterative training (SAM, SAM-Med3D, nnInteractive). The clicks are a non-
differentiable function of the prediction anyway; detaching makes each step learn "given
this mask and these prompts, produce the target" and keeps the backward pass to one encoder
plus independent decoder graphs, instead of a chain through six decoders. The encoder still
receives the gradients of all steps through the shared embedding.

One ``backward()`` per sample (the graph of all steps together) keeps the step a single
forward of ``InteractiveStep``, which is what DistributedDataParallel needs. The price is
memory: the encoder's activations plus those of every decoder step stay alive until the
backward. Measured for the default model (tensors saved for backward, float32, 32x64x64
patch): encoder 82 MiB, each decoder step 89 MiB, i.e. about 650 + 6 x 710 bytes per voxel;
at the 4,194,304-voxel budget about 20 GiB in float32, roughly half under bf16 autocast,
which fits the paper's 32 GB GPU. (Backward per decoder step into a detached embedding would
keep one decoder graph at a time, but cannot run under DDP's single-backward contract.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from .data import Sample
from .loss import segmentation_loss

CLICKS = 5


def prompts_for(box, fg: list, bg: list, device: torch.device):
    """The network's Prompts for one object with a box (or None) and click lists of (z, y, x)."""
    from ENSAMSegmentLib.core.network import Prompts

    return Prompts.from_objects([{"box": box, "fg": list(fg), "bg": list(bg)}]).to(device)


def interact(
    model: nn.Module, embedding, gt: np.ndarray, box, clicks: int = CLICKS, rng=None
) -> Iterator[torch.Tensor]:
    """Yield the logits [1, 1, D, H, W] of each interaction step (the box step, then each click).

    gt: [D, H, W] bool, the object's mask on the model's grid. rng: tie-breaks of next_click
    (None = the challenge evaluator's). Stops early when the prediction has no error left.
    """
    from ENSAMSegmentLib.core.simulation import next_click

    device = next(model.parameters()).device
    fg, bg = [], []
    prev = None
    seg = np.zeros(gt.shape, dtype=bool)
    steps = clicks + (1 if box is not None else 0)
    for step in range(steps):
        if step > 0 or box is None:
            click = next_click(gt, seg, rng)
            if click is None:
                return
            zyx, kind = click
            (fg if kind == "fg" else bg).append(zyx)
        logits = model.decode(embedding, prompts_for(box, fg, bg, device), prev_logits=prev)
        yield logits
        prev = logits.detach()
        seg = (prev[0, 0] > 0).cpu().numpy()


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; nothing elsewhere (CPU training stays in float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class InteractiveStep(nn.Module):
    """forward(sample) -> (mean loss over the steps, per-step losses [steps]) for one sample."""

    def __init__(self, model: nn.Module, clicks: int = CLICKS, amp: bool = True):
        super().__init__()
        self.model, self.clicks, self.amp = model, clicks, amp

    def forward(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        image = sample.image.to(device, non_blocking=True)
        target = sample.target.to(device, non_blocking=True)
        gt = sample.target[0, 0].numpy() > 0.5
        rng = np.random.default_rng(sample.click_seed)
        with autocast_for(device, self.amp):
            embedding = self.model.encode(image)
            losses = [
                segmentation_loss(logits, target)
                for logits in interact(self.model, embedding, gt, sample.box, self.clicks, rng)
            ]
        step_losses = torch.stack(losses)
        return step_losses.mean(), step_losses.detach()
