"""The training step: one sample, a box, then clicks simulated from the model's own prediction.

For one object of one image (``Sample``):

1. ``model.encode(image)`` once, with the skips' share of the decoder (``with_skip_terms``); the
   embedding is shared by every step below.
2. Step 0: the box (with its random offset) -> logits. A sample without a box (the challenge
   allows cases without one) starts with a click instead, simulated on an empty prediction.
3. Steps 1..5: ``simulation.next_click(gt, logits > 0)`` at the centre of the largest error
   region (fg for under-, bg for over-segmentation) is added to the prompts; the decoder
   runs again with the previous step's logits as ``prev_logits``. The sample ends early when
   no error is left, when a click left the mask unchanged, or when the next click would repeat
   an earlier one (the steps after it would train the same step again).
4. loss = mean over the steps of generalized Dice + 2 x BCE (loss.py); with ``grad_clicks``
   only the first step and that many random click steps keep gradients (the others still run,
   without a graph, to produce the next click).

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
    model: nn.Module, embedding, gt: np.ndarray, box, clicks: int = CLICKS, rng=None,
    stop_when_stuck: bool = False, grad_for=None,
) -> Iterator[torch.Tensor]:
    """Yield the logits [1, 1, D, H, W] of each interaction step (the box step, then each click).

    gt: [D, H, W] bool, the object's mask on the model's grid. rng: tie-breaks of next_click
    (None = the challenge evaluator's). Stops early when the prediction has no error left.
    stop_when_stuck (training): also stop after a click step that left the mask unchanged, and
    before a click that repeats an earlier one: the next clicks would land on the same voxel and
    train the same step again (at init they did for clicks 2-5, 73 % of a sample's time).
    grad_for(step) -> bool: whether step `step` keeps its autograd graph (default: all); the other
    steps run under no_grad, only to produce the next click (their logits are fed back detached
    anyway, so the forward is the same).
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
            clicked = fg if kind == "fg" else bg
            if stop_when_stuck and tuple(zyx) in clicked:
                return
            clicked.append(tuple(zyx))
        with nullcontext() if grad_for is None or grad_for(step) else torch.no_grad():
            logits = model.decode(embedding, prompts_for(box, fg, bg, device), prev_logits=prev)
        yield logits
        prev = logits.detach()
        previous_seg, seg = seg, (prev[0, 0] > 0).cpu().numpy()
        if stop_when_stuck and step > 0 and np.array_equal(seg, previous_seg):
            return


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA and on CPUs that compute bf16 natively (AVX512-BF16/AMX: the same rule as
    inference, devices.autocast_dtype); float32 elsewhere."""
    from ENSAMSegmentLib.core import devices

    dtype = devices.autocast_dtype(device) if enabled else None
    if dtype is None or device.type not in ("cuda", "cpu"):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class InteractiveStep(nn.Module):
    """forward(sample) -> (mean loss over the steps with gradients, per-step losses [steps]) for one sample.

    grad_clicks: how many click steps (at random, after the box step, which always has gradients)
    keep their autograd graph; None = every step (the paper). The others run without gradients,
    only to produce the next click. Fewer graphs: less backward work and memory per sample; the
    loss stays an unbiased estimate of the mean over steps up to the box step's weight.
    stop_when_stuck: end the interaction when a click changed nothing or would repeat (`interact`).
    """

    def __init__(self, model: nn.Module, clicks: int = CLICKS, amp: bool = True, grad_clicks: int | None = None,
                 stop_when_stuck: bool = True):
        super().__init__()
        self.model, self.clicks, self.amp, self.grad_clicks = model, clicks, amp, grad_clicks
        self.stop_when_stuck = stop_when_stuck

    def forward(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        image = sample.image.to(device, non_blocking=True)
        target = sample.target.to(device, non_blocking=True)
        gt = sample.target[0, 0].numpy() > 0.5
        rng = np.random.default_rng(sample.click_seed)
        graded = self._graded_steps(rng, sample.box is not None)
        losses, all_losses = [], []
        with autocast_for(device, self.amp):
            embedding = self.model.with_skip_terms(self.model.encode(image))  # shared by every step
            steps = interact(self.model, embedding, gt, sample.box, self.clicks, rng, self.stop_when_stuck,
                             grad_for=None if graded is None else graded.__contains__)
            for logits in steps:  # step 0 always keeps its graph, so `losses` is never empty
                loss = segmentation_loss(logits, target)
                all_losses.append(loss.detach())
                if logits.requires_grad:
                    losses.append(loss)
        return torch.stack(losses).mean(), torch.stack(all_losses)

    def _graded_steps(self, rng: np.random.Generator, has_box: bool) -> set[int] | None:
        """Steps that keep gradients: the first step and `grad_clicks` click steps drawn at random."""
        if self.grad_clicks is None or self.grad_clicks >= self.clicks:
            return None
        first = 1 if has_box else 0
        clicks = rng.permutation(np.arange(first, first + self.clicks))[: self.grad_clicks]
        return {0, *(int(c) for c in clicks)}
