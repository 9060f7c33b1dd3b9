"""The CVPR 2025 challenge's metrics: Dice, normalized surface Dice (NSD), and their AUC over clicks.

Reproduces CVPR25_iter_eval.py with its SurfaceDice.py (DeepMind's surface-distance, as the CVPR 2024
challenge shipped it). Arrays are (z, y, x); spacing is given in the same axis order. The evaluator
passes the case file's ``spacing`` unchanged, so it treats that array as (z, y, x) spacing.

- Dice per class: 2|G∩S| / (|G|+|S|); NaN when both are empty (the challenge's convention; it only
  scores classes present in the ground truth, so it never meets that case).
- NSD per class at 2.0 mm: surfels from the 2x2x2 neighbourhood codes of each mask, their areas from
  the marching-cubes normals table (taken from MONAI, which ships DeepMind's table), distances from
  each surface to the other by a Euclidean distance transform with the spacing. A class predicted
  empty scores 0.
- Per step of a case: mean Dice over the ground-truth classes; mean NSD over them only when that mean
  Dice is > 0.2, else 0 (the rule looks at the case's mean Dice, not at each class).
- AUC: ``scipy.integrate.cumulative_trapezoid(values[-5:], x=0..4)[-1]`` over the 6 steps (box + 5
  clicks): the box step is left out, so the best possible is 4.0. Final value = step 6.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import integrate, ndimage

NSD_TOLERANCE_MM = 2.0
NSD_MIN_DICE = 0.2  # NSD is computed only when the case's mean Dice exceeds this
N_CLICKS = 5  # steps 2..6 of the challenge
# neighbourhood code weights of the 2x2x2 corners (dz, dy, dx), as DeepMind's kernel [[[128,64],[32,16]],[[8,4],[2,1]]]
_CODE_WEIGHTS = {(0, 0, 0): 128, (0, 0, 1): 64, (0, 1, 0): 32, (0, 1, 1): 16,
                 (1, 0, 0): 8, (1, 0, 1): 4, (1, 1, 0): 2, (1, 1, 1): 1}


class MetricError(ValueError):
    """Inputs a metric cannot be computed from (shape mismatch, bad spacing, no class)."""


def _as_masks(gt, seg) -> tuple[np.ndarray, np.ndarray]:
    gt, seg = np.asarray(gt).astype(bool, copy=False), np.asarray(seg).astype(bool, copy=False)
    if gt.shape != seg.shape:
        raise MetricError(f"gt and seg shapes differ: {gt.shape} vs {seg.shape}")
    return gt, seg


def dice(gt: np.ndarray, seg: np.ndarray) -> float:
    """Dice of two masks (non-zero = inside); NaN when both are empty (the challenge's convention)."""
    gt, seg = _as_masks(gt, seg)
    total = int(gt.sum()) + int(seg.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(gt, seg).sum()) / total


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """(256,) float64 surface area in mm^2 of each 2x2x2 neighbourhood code for this spacing."""
    from monai.metrics.utils import create_table_neighbour_code_to_surface_area

    table, _ = create_table_neighbour_code_to_surface_area(spacing_zyx)
    return table.detach().cpu().numpy().astype(np.float64)


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Codes 0..255 of every 2x2x2 cube of a mask zero-padded by one voxel. (d,h,w) -> (d+1,h+1,w+1)."""
    p = np.pad(mask.astype(np.uint8), 1)
    d, h, w = mask.shape
    code = np.zeros((d + 1, h + 1, w + 1), dtype=np.uint8)
    for (a, b, c), weight in _CODE_WEIGHTS.items():
        code += p[a : a + d + 1, b : b + h + 1, c : c + w + 1] * np.uint8(weight)
    return code


def _surface(mask: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surfel positions (bool on the code grid) and their areas (1D, in the order of the positions)."""
    code = _neighbour_codes(mask)
    border = (code != 0) & (code != 255)
    return border, table[code[border]]


def _distance_to(border: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance (mm) of every code-grid point to the nearest surfel of `border`; inf if there is none."""
    if not border.any():
        return np.full(border.shape, np.inf)
    return ndimage.distance_transform_edt(~border, sampling=spacing_zyx)


def _check_spacing(spacing_zyx) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in np.asarray(spacing_zyx, dtype=float).ravel())
    if len(spacing) != 3 or not all(s > 0 and np.isfinite(s) for s in spacing):
        raise MetricError(f"spacing must be 3 positive numbers (z, y, x), got {spacing_zyx!r}")
    return spacing


def normalized_surface_dice(gt: np.ndarray, seg: np.ndarray, spacing_zyx, tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """NSD of two masks (D,H,W) at `tolerance_mm`, as the challenge's SurfaceDice computes it.

    The part of each surface (by area) within the tolerance of the other, over the total area.
    0 when one mask is empty and the other is not; NaN when both are empty.
    """
    gt, seg = _as_masks(gt, seg)
    spacing = _check_spacing(spacing_zyx)
    box = ndimage.find_objects((gt | seg).astype(np.uint8))
    if not box:
        return float("nan")
    gt, seg = gt[box[0]], seg[box[0]]  # the union's bounding box holds both surfaces
    table = _surfel_area_table(spacing)
    border_gt, area_gt = _surface(gt, table)
    border_seg, area_seg = _surface(seg, table)
    gt_to_seg = _distance_to(border_seg, spacing)[border_gt]
    seg_to_gt = _distance_to(border_gt, spacing)[border_seg]
    overlap = area_gt[gt_to_seg <= tolerance_mm].sum() + area_seg[seg_to_gt <= tolerance_mm].sum()
    return float(overlap / (area_gt.sum() + area_seg.sum()))


def case_metrics(gts: np.ndarray, segs: np.ndarray, spacing_zyx, class_ids=None) -> tuple[float, float]:
    """(DSC, NSD) of one step of a case, as the challenge scores it.

    gts, segs: (D,H,W) label volumes. class_ids: labels to score (default: the non-zero labels of
    `gts`, the challenge's choice; each must be present in `gts`). DSC = mean Dice over the classes;
    NSD = mean NSD over them when DSC > 0.2, else 0.
    """
    gts, segs = np.asarray(gts), np.asarray(segs)
    if gts.shape != segs.shape:
        raise MetricError(f"gts and segs shapes differ: {gts.shape} vs {segs.shape}")
    present = np.unique(gts)
    present = present[present != 0]
    classes = present if class_ids is None else np.asarray(list(class_ids))
    if classes.size == 0:
        raise MetricError("the ground truth has no foreground class to score")
    absent = np.setdiff1d(classes, present)
    if absent.size:
        raise MetricError(f"classes {absent.tolist()} are not in the ground truth; the challenge scores only present ones")
    dsc = float(np.mean([dice(gts == c, segs == c) for c in classes]))
    if not dsc > NSD_MIN_DICE:
        return dsc, 0.0
    nsd = float(np.mean([normalized_surface_dice(gts == c, segs == c, spacing_zyx) for c in classes]))
    return dsc, nsd


def auc_over_steps(values) -> float:
    """Challenge AUC of a metric over the 6 steps (box, then 5 clicks): trapezoid over steps 2..6, x = 0..4."""
    values = np.asarray(values, dtype=float)
    if values.shape != (N_CLICKS + 1,):
        raise MetricError(f"expected {N_CLICKS + 1} per-step values (box + {N_CLICKS} clicks), got shape {values.shape}")
    return float(integrate.cumulative_trapezoid(values[-N_CLICKS:], np.arange(N_CLICKS))[-1])


def summarize_steps(dscs, nsds) -> dict[str, float]:
    """The challenge's per-case summary from 6 per-step DSC and NSD values (a step without a box: 0)."""
    return {
        "DSC_AUC": auc_over_steps(dscs),
        "NSD_AUC": auc_over_steps(nsds),
        "DSC_Final": float(np.asarray(dscs, dtype=float)[-1]),
        "NSD_Final": float(np.asarray(nsds, dtype=float)[-1]),
    }
