"""Validation during training: the challenge's box + 5 clicks protocol on held-out cases, small,
plus the controls that show whether the prompts are used at all.

Each held-out case gives one object (chosen with a fixed seed, so every epoch sees the same
objects), cropped and pooled exactly as training samples are but without augmentation and with
the challenge's tight box (z range x the middle slice's extent). The model then runs the
interaction of step.py with the challenge evaluator's click rule (rng None) and each step is
scored with the challenge's metrics (metrics.case_metrics: DSC, NSD at 2 mm with the crop's
spacing) on the crop before padding. Cases that cannot be loaded are left out and counted.

Controls (a model that segments "the object in the middle of the crop" and ignores its prompts
scores well on the protocol alone, since crops are centred on the object):

- ``filled_box_dsc``: the DSC of the box itself, filled. The box step must beat it.
- ``wrong_box_dsc``: the box step given another object's box in the same crop, scored against the
  true object: it must collapse when the box is used (cases whose crop holds no other object
  with at most 10 % of the true one inside its box are left out).
- ``empty_box_dsc``: the same with the true box moved off the object, onto what lies beside it
  (no object of its own, as a rule): what the model does with a box around nothing. Training never
  shows such a box, so a model that segments the object next to it is not wrong by training's
  rules; it is reported apart so that it does not hide what ``wrong_box_dsc`` measures.
- ``click_change_fraction``: the share of click steps that changed the mask at all.
- ``dsc_gain_per_click``: (DSC after the last click - DSC of the box step) / clicks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .cases import CaseError, CaseRef, load_case
from .data import DEFAULT_VOXEL_BUDGET, bounding_box, majority_pool, make_sample
from .step import CLICKS, autocast_for, interact, prompts_for

VAL_SEED_OFFSET = 99_991
WRONG_BOX_MAX_OVERLAP = 0.1  # a wrong box may hold at most this share of the true object


def case_steps(model: nn.Module, sample, clicks: int = CLICKS, amp: bool = True) -> dict:
    """Per-step DSC and NSD lists of one sample (a run that ends early, no error left, repeats its last
    values) and how many click steps changed the mask."""
    from ENSAMSegmentLib.core.metrics import case_metrics

    device = next(model.parameters()).device
    gt = sample.target[0, 0].numpy() > 0.5
    crop = tuple(slice(0, s) for s in sample.shape)
    gts = gt[crop].astype(np.uint8)
    dscs, nsds, changed, previous = [], [], [], None
    with torch.no_grad(), autocast_for(device, amp):
        embedding = model.with_skip_terms(model.encode(sample.image.to(device)))  # 6 decodes of one image
        for logits in interact(model, embedding, gt, sample.box, clicks, rng=None):
            seg = (logits[0, 0] > 0).cpu().numpy()[crop].astype(np.uint8)
            dsc, nsd = case_metrics(gts, seg, sample.spacing)
            dscs.append(dsc)
            nsds.append(nsd)
            if previous is not None:
                changed.append(bool((seg != previous).any()))
            previous = seg
    steps = clicks + 1
    dscs += dscs[-1:] * (steps - len(dscs))
    nsds += nsds[-1:] * (steps - len(nsds))
    return dict(dsc=dscs, nsd=nsds, changed=changed)


def box_dsc(model: nn.Module, sample, box, amp: bool = True) -> float:
    """DSC of the box step alone with `box` (inclusive corners on the sample's grid)."""
    from ENSAMSegmentLib.core.metrics import dice

    device = next(model.parameters()).device
    crop = tuple(slice(0, s) for s in sample.shape)
    with torch.no_grad(), autocast_for(device, amp):
        logits = model(sample.image.to(device), prompts_for(box, [], [], device))
    seg = (logits[0, 0] > 0).cpu().numpy()[crop]
    return float(dice(sample.target[0, 0].numpy()[crop] > 0.5, seg))


def filled_box(shape, box) -> np.ndarray:
    (z0, y0, x0), (z1, y1, x1) = box
    mask = np.zeros(shape, dtype=bool)
    mask[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def wrong_box(case, sample):
    """Another object's tight box in the sample's crop (the largest one holding at most 10 % of the true
    object); None when there is none."""
    gt = sample.target[0, 0].numpy()[tuple(slice(0, s) for s in sample.shape)] > 0.5
    labels = case.labels[sample.crop]
    best, best_size = None, 0
    for value in np.unique(labels):
        if value in (0, sample.label):
            continue
        mask = majority_pool(labels == value, sample.factors)[: gt.shape[0], : gt.shape[1], : gt.shape[2]]
        if mask.sum() <= best_size:
            continue
        lo, hi = bounding_box(mask)
        box = tuple(int(v) for v in lo), tuple(int(v) - 1 for v in hi)
        if (filled_box(gt.shape, box) & gt).sum() <= WRONG_BOX_MAX_OVERLAP * gt.sum():
            best, best_size = box, int(mask.sum())
    return best


def shifted_box(box, shape):
    """`box` moved past its own extent along the axis (and direction) with the most free room; None if
    it fits nowhere."""
    lo, hi = np.array(box[0]), np.array(box[1])
    size = hi - lo + 1
    room = [(lo[a], a, -1) for a in range(3)] + [(shape[a] - 1 - hi[a], a, 1) for a in range(3)]
    free, axis, direction = max(room)
    if free < size[axis]:
        return None
    lo, hi = lo.copy(), hi.copy()
    lo[axis] += direction * size[axis]
    hi[axis] += direction * size[axis]
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def validate(
    model: nn.Module,
    cases: list[CaseRef],
    seed: int = 0,
    voxel_budget: int = DEFAULT_VOXEL_BUDGET,
    clicks: int = CLICKS,
    amp: bool = True,
) -> dict | None:
    """Mean challenge metrics over ``cases``: dsc_auc, nsd_auc, final_dsc, final_nsd, dsc, nsd, cases,
    skipped, and the controls (module docstring): filled_box_dsc, wrong_box_dsc and empty_box_dsc (None
    when no case has such a box), click_change_fraction, dsc_gain_per_click.

    AUCs follow the challenge (steps 2..6, so at most 4.0) and are None unless clicks == 5.
    Returns None when no case could be used.
    """
    from ENSAMSegmentLib.core.metrics import dice

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
            sample = make_sample(case, rng, voxel_budget, augment=False, no_box_probability=0.0, box_offset=False,
                                 challenge_box_probability=1.0)
            result = case_steps(model, sample, clicks, amp)
            gt = sample.target[0, 0].numpy()[tuple(slice(0, s) for s in sample.shape)] > 0.5
            result["filled_box"] = float(dice(gt, filled_box(gt.shape, sample.box)))
            other, empty = wrong_box(case, sample), shifted_box(sample.box, gt.shape)
            result["wrong_box"] = None if other is None else box_dsc(model, sample, other, amp)
            result["empty_box"] = None if empty is None else box_dsc(model, sample, empty, amp)
            per_case.append(result)
    finally:
        model.train(was_training)
    if not per_case:
        return None
    return summarize(per_case, clicks, skipped)


def summarize(per_case: list[dict], clicks: int, skipped: int = 0) -> dict:
    """The mean metrics of `validate` from per-case results of `case_steps` + filled_box + wrong_box."""
    from ENSAMSegmentLib.core.metrics import auc_over_steps

    dsc = np.mean([r["dsc"] for r in per_case], axis=0)
    nsd = np.mean([r["nsd"] for r in per_case], axis=0)
    changed = [c for r in per_case for c in r["changed"]]
    wrong = [r["wrong_box"] for r in per_case if r["wrong_box"] is not None]
    empty = [r["empty_box"] for r in per_case if r.get("empty_box") is not None]
    with_auc = clicks == 5
    return dict(
        dsc_auc=auc_over_steps(dsc) if with_auc else None,
        nsd_auc=auc_over_steps(nsd) if with_auc else None,
        final_dsc=float(dsc[-1]),
        final_nsd=float(nsd[-1]),
        dsc=[float(v) for v in dsc],
        nsd=[float(v) for v in nsd],
        filled_box_dsc=float(np.mean([r["filled_box"] for r in per_case])),
        wrong_box_dsc=float(np.mean(wrong)) if wrong else None,
        empty_box_dsc=float(np.mean(empty)) if empty else None,
        click_change_fraction=float(np.mean(changed)) if changed else None,
        dsc_gain_per_click=float((dsc[-1] - dsc[0]) / clicks) if clicks else None,
        cases=len(per_case),
        skipped=skipped,
    )
