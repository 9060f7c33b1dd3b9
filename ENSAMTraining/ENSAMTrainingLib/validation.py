"""Validation during training: the challenge's box + 5 clicks protocol on held-out cases, small.

Each held-out case gives one object (chosen with a fixed seed, so every epoch sees the same
objects), cropped and pooled exactly as training samples are but without augmentation and
with the tight ground-truth box. The model then runs the interaction of step.py with the
challenge evaluator's click rule (rng None) and each step is scored with the challenge's
metrics (metrics.case_metrics: DSC, NSD at 2 mm with the crop's spacing) on the crop before
padding. Cases that cannot be loaded are left out and counted.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import DEFAULT_VOXEL_BUDGET, CaseError, CaseRef, load_case, make_sample
from .step import CLICKS, autocast_for, interact

VAL_SEED_OFFSET = 99_991


def case_steps(model: nn.Module, sample, clicks: int = CLICKS, amp: bool = True) -> tuple[list[float], list[float]]:
    """Per-step (DSC, NSD) lists of one sample; a run that ends early (no error left) repeats its last values."""
    from ENSAMSegmentLib.core.metrics import case_metrics

    device = next(model.parameters()).device
    gt = sample.target[0, 0].numpy() > 0.5
    crop = tuple(slice(0, s) for s in sample.shape)
    gts = gt[crop].astype(np.uint8)
    dscs, nsds = [], []
    with torch.no_grad(), autocast_for(device, amp):
        embedding = model.encode(sample.image.to(device))
        for logits in interact(model, embedding, gt, sample.box, clicks, rng=None):
            seg = (logits[0, 0] > 0).cpu().numpy()[crop].astype(np.uint8)
            dsc, nsd = case_metrics(gts, seg, sample.spacing)
            dscs.append(dsc)
            nsds.append(nsd)
    steps = clicks + 1
    dscs += dscs[-1:] * (steps - len(dscs))
    nsds += nsds[-1:] * (steps - len(nsds))
    return dscs, nsds


def validate(
    model: nn.Module,
    cases: list[CaseRef],
    seed: int = 0,
    voxel_budget: int = DEFAULT_VOXEL_BUDGET,
    clicks: int = CLICKS,
    amp: bool = True,
) -> dict | None:
    """Mean challenge metrics over ``cases``: dsc_auc, nsd_auc, final_dsc, final_nsd, dsc, nsd, cases, skipped.

    AUCs follow the challenge (steps 2..6, so at most 4.0) and are None unless clicks == 5.
    Returns None when no case could be used.
    """
    from ENSAMSegmentLib.core.metrics import auc_over_steps

    was_training = model.training
    model.eval()
    per_case, skipped = [], 0
    try:
        for index, ref in enumerate(cases):
            try:
                case = load_case(ref)
            except CaseError:
                skipped += 1
                continue
            rng = np.random.default_rng([seed, VAL_SEED_OFFSET, index])
            sample = make_sample(case, rng, voxel_budget, augment=False, no_box_probability=0.0, box_offset=False)
            per_case.append(case_steps(model, sample, clicks, amp))
    finally:
        model.train(was_training)
    if not per_case:
        return None
    dsc = np.mean([d for d, _ in per_case], axis=0)
    nsd = np.mean([n for _, n in per_case], axis=0)
    with_auc = clicks == 5
    return dict(
        dsc_auc=auc_over_steps(dsc) if with_auc else None,
        nsd_auc=auc_over_steps(nsd) if with_auc else None,
        final_dsc=float(dsc[-1]),
        final_nsd=float(nsd[-1]),
        dsc=[float(v) for v in dsc],
        nsd=[float(v) for v in nsd],
        cases=len(per_case),
        skipped=skipped,
    )
