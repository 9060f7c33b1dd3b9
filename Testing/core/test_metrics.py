"""Challenge metrics: hand-computed Dice/NSD cases, agreement with MONAI, the DSC > 0.2 rule, AUC."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_surface_dice

from ENSAMSegmentLib.core.metrics import (
    MetricError,
    auc_over_steps,
    case_metrics,
    dice,
    normalized_surface_dice,
    summarize_steps,
)


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _blob(rng, shape):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = rng.uniform(0.35, 0.65, 3) * shape
    r = rng.uniform(0.15, 0.3, 3) * shape
    m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
    return m ^ (rng.random(shape) < 0.01)


# ----------------------------------------------------------------------------- Dice


def test_dice_of_cubes_offset_by_one_voxel():
    gt = _cube((10, 10, 10), (2, 2, 2), (6, 6, 6))  # 64 voxels
    seg = _cube((10, 10, 10), (2, 2, 3), (6, 6, 7))  # shares 4 * 4 * 3 = 48
    assert dice(gt, seg) == pytest.approx(2 * 48 / 128)


def test_dice_single_voxel_and_empty_sets():
    one = _cube((3, 3, 3), (1, 1, 1), (2, 2, 2))
    empty = np.zeros((3, 3, 3), dtype=bool)
    assert dice(one, one) == 1.0
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    assert math.isnan(dice(empty, empty))  # the challenge's compute_dice_coefficient returns NaN
    with pytest.raises(MetricError, match="shapes differ"):
        dice(one, np.zeros((3, 3, 4)))


# ----------------------------------------------------------------------------- NSD


def test_nsd_identical_masks_and_single_voxel():
    cube = _cube((8, 8, 8), (2, 2, 2), (6, 6, 6))
    assert normalized_surface_dice(cube, cube, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    one = _cube((3, 3, 3), (1, 1, 1), (2, 2, 2))
    assert normalized_surface_dice(one, one, (2.5, 0.7, 0.7)) == pytest.approx(1.0)


def test_nsd_one_voxel_shift_is_within_tolerance_unless_the_voxel_is_wide():
    gt = _cube((12, 12, 12), (3, 3, 3), (8, 8, 8))
    seg = _cube((12, 12, 12), (3, 3, 4), (8, 8, 9))  # shifted one voxel along x
    assert normalized_surface_dice(gt, seg, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    # 3 mm along x: the two x-facing faces are 3 mm apart, everything else within 2 mm
    wide = normalized_surface_dice(gt, seg, (1.0, 1.0, 3.0))
    assert 0.5 < wide < 1.0
    assert normalized_surface_dice(gt, seg, (1.0, 1.0, 3.0), tolerance_mm=3.0) == pytest.approx(1.0)


def test_nsd_far_apart_empty_and_bad_spacing():
    gt = _cube((20, 20, 20), (1, 1, 1), (5, 5, 5))
    far = _cube((20, 20, 20), (12, 12, 12), (16, 16, 16))
    empty = np.zeros_like(gt)
    assert normalized_surface_dice(gt, far, (1.0, 1.0, 1.0)) == 0.0
    assert normalized_surface_dice(gt, empty, (1.0, 1.0, 1.0)) == 0.0
    assert math.isnan(normalized_surface_dice(empty, empty, (1.0, 1.0, 1.0)))
    with pytest.raises(MetricError, match="spacing"):
        normalized_surface_dice(gt, gt, (1.0, 0.0, 1.0))


def test_nsd_agrees_with_monai_subvoxel_surface_dice():
    rng = np.random.default_rng(0)
    values = []
    for spacing in [(3.0, 0.8, 0.8), (1.0, 1.0, 1.0), (0.5, 2.2, 1.3), (5.0, 0.6, 1.0)]:
        shape = (18, 24, 28)
        gt = _blob(rng, shape)
        seg = np.roll(gt, tuple(int(v) for v in rng.integers(-2, 3, 3)), axis=(0, 1, 2))
        ours = normalized_surface_dice(gt, seg, spacing)
        ref = compute_surface_dice(
            torch.as_tensor(seg)[None, None].float(), torch.as_tensor(gt)[None, None].float(),
            class_thresholds=[2.0], include_background=True, spacing=spacing, use_subvoxels=True,
        )
        assert ours == pytest.approx(float(ref), abs=1e-6)  # MONAI keeps its area table in float32
        values.append(ours)
    assert min(values) < 0.95  # the cases are not all trivially perfect


# ----------------------------------------------------------------------------- per-case rule


def test_case_metrics_average_over_present_classes():
    gts = np.zeros((16, 16, 16), dtype=np.uint8)
    gts[1:5, 1:5, 1:5] = 1
    gts[8:14, 8:14, 8:14] = 2
    segs = gts.copy()
    segs[8:14, 8:14, 8:14] = 0  # class 2 missed: mean DSC 0.5 > 0.2
    dsc, nsd = case_metrics(gts, segs, (1.0, 1.0, 1.0))
    assert dsc == pytest.approx(0.5)
    assert nsd == pytest.approx(0.5)  # NSD of both classes, the empty one counting 0


def test_nsd_is_zero_unless_the_mean_dice_exceeds_0_2():
    gts = np.zeros((20, 20, 20), dtype=np.uint8)
    gts[2:12, 2:12, 2:12] = 1  # 1000 voxels
    segs = np.zeros_like(gts)
    segs[2:12, 2:12, 2:3] = 1  # 100 voxels inside: Dice 200 / 1100 = 0.18
    dsc, nsd = case_metrics(gts, segs, (1.0, 1.0, 1.0))
    assert dsc == pytest.approx(200 / 1100) and nsd == 0.0
    segs[2:12, 2:12, 2:4] = 1  # 200 voxels: Dice 400 / 1200 = 0.33
    dsc, nsd = case_metrics(gts, segs, (1.0, 1.0, 1.0))
    assert dsc == pytest.approx(400 / 1200)
    assert nsd == pytest.approx(normalized_surface_dice(gts == 1, segs == 1, (1.0, 1.0, 1.0))) and nsd > 0


def test_case_metrics_refuses_what_the_challenge_never_scores():
    gts = np.zeros((6, 6, 6), dtype=np.uint8)
    with pytest.raises(MetricError, match="no foreground"):
        case_metrics(gts, gts, (1, 1, 1))
    gts[1:3, 1:3, 1:3] = 1
    with pytest.raises(MetricError, match="not in the ground truth"):
        case_metrics(gts, gts, (1, 1, 1), class_ids=[1, 2])


# ----------------------------------------------------------------------------- AUC


def test_auc_over_click_steps():
    assert auc_over_steps([1.0] * 6) == pytest.approx(4.0)
    assert auc_over_steps([0.0, 1, 1, 1, 1, 1]) == pytest.approx(4.0)  # the box step does not count
    assert auc_over_steps([0.9, 0.0, 0.25, 0.5, 0.75, 1.0]) == pytest.approx(2.0)
    assert auc_over_steps([0, 0.2, 0.4, 0.4, 0.6, 0.8]) == pytest.approx(0.3 + 0.4 + 0.5 + 0.7)
    with pytest.raises(MetricError, match="6 per-step"):
        auc_over_steps([1.0] * 5)


def test_summary_has_the_challenge_columns():
    s = summarize_steps([0.5, 0.6, 0.7, 0.8, 0.9, 0.95], [0, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert s == pytest.approx({"DSC_AUC": 0.65 + 0.75 + 0.85 + 0.925, "NSD_AUC": 2.0, "DSC_Final": 0.95, "NSD_Final": 0.5})
