"""Simulated interaction: the challenge's boxes and click rule, pinned on hand-built cases."""

import itertools

import numpy as np
import pytest

from ENSAMSegmentLib.core.simulation import (
    SimulationError,
    box_dict_to_3d,
    challenge_boxes,
    component_distance,
    next_click,
    next_clicks_for_case,
    random_box_3d,
)


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _brute_force_edt(mask):
    """Distance of every voxel of `mask` to the nearest voxel outside it (outside the array counts)."""
    padded = np.pad(mask, 1)
    zeros = np.argwhere(~padded)
    dist = np.zeros(padded.shape)
    for p in np.argwhere(padded):
        dist[tuple(p)] = np.sqrt(((zeros - p) ** 2).sum(axis=1).min())
    return dist[1:-1, 1:-1, 1:-1]


# ----------------------------------------------------------------------------- clicks


def test_missed_cube_gets_a_foreground_click_at_its_centre():
    gt = _cube((20, 20, 20), (5, 6, 7), (12, 13, 14))  # 7^3, unique centre (8, 9, 10)
    assert next_click(gt, np.zeros_like(gt)) == ((8, 9, 10), "fg")


def test_over_segmentation_gets_a_background_click():
    gt = _cube((20, 20, 30), (2, 2, 2), (5, 5, 5))
    seg = gt | _cube(gt.shape, (9, 9, 15), (18, 18, 24))  # big false-positive block, centre (13, 13, 19)
    assert next_click(gt, seg) == ((13, 13, 19), "bg")


def test_no_error_gives_no_click():
    gt = _cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    assert next_click(gt, gt.copy()) is None


def test_largest_component_wins_and_size_ties_go_to_the_first_in_c_order():
    gt = np.zeros((12, 12, 30), dtype=bool)
    gt |= _cube(gt.shape, (1, 1, 20), (4, 4, 23))  # 27 voxels, first in C order (z = 1)
    gt |= _cube(gt.shape, (6, 6, 2), (9, 9, 5))  # 27 voxels, later in C order
    assert next_click(gt, np.zeros_like(gt)) == ((2, 2, 21), "fg")
    gt |= _cube(gt.shape, (6, 6, 10), (10, 10, 14))  # 64 voxels: now the largest
    zyx, kind = next_click(gt, np.zeros_like(gt))
    assert kind == "fg" and all(a <= v < b for v, a, b in zip(zyx, (7, 7, 11), (9, 9, 13)))


def test_diagonal_voxels_are_one_component():
    """26-connectivity: a diagonal chain of 5 voxels outweighs a separate 4-voxel block."""
    gt = np.zeros((10, 10, 10), dtype=bool)
    for i in range(5):
        gt[i, i, i] = True
    gt[8, 8, 6:10] = True
    zyx, _ = next_click(gt, np.zeros_like(gt))
    assert zyx[0] == zyx[1] == zyx[2] and zyx[0] < 5


def test_ties_in_distance_are_broken_as_the_challenge_does():
    """Many voxels share the maximal distance: the pick is argwhere(max)[seed(42); choice(n)]."""
    gt = _cube((6, 12, 14), (2, 2, 3), (4, 10, 11))  # 2-voxel thick slab: every voxel has distance 1
    dist = _brute_force_edt(gt)
    candidates = np.argwhere(dist == dist.max())
    state = np.random.get_state()
    np.random.seed(42)
    expected = tuple(int(v) for v in candidates[np.random.choice(len(candidates))])
    np.random.set_state(state)
    assert len(candidates) == gt.sum() > 1
    assert next_click(gt, np.zeros_like(gt)) == (expected, "fg")


def test_tie_break_leaves_the_global_rng_alone():
    gt = _cube((6, 12, 14), (2, 2, 3), (4, 10, 11))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    next_click(gt, np.zeros_like(gt))
    assert np.array_equal(np.random.get_state()[1], before)


def test_a_training_rng_varies_the_tie_break():
    gt = _cube((6, 12, 14), (2, 2, 3), (4, 10, 11))
    seg = np.zeros_like(gt)
    picks = {next_click(gt, seg, rng=np.random.default_rng(s))[0] for s in range(20)}
    assert len(picks) > 5 and all(gt[p] for p in picks)


def test_distances_match_brute_force_on_a_blob():
    rng = np.random.default_rng(3)
    comp = rng.random((7, 8, 9)) < 0.7
    assert np.allclose(component_distance(comp), _brute_force_edt(comp) * comp)


def test_large_components_are_max_pooled_first_as_the_challenge_does():
    """11^3 cube, pad 2, padded 15 -> pooled 8: the coarse maximum covers local 4..7 on each axis."""
    comp = np.ones((11, 11, 11), dtype=bool)
    assert np.argwhere(component_distance(comp) == component_distance(comp).max()).tolist() == [[5, 5, 5]]
    pooled = component_distance(comp, max_voxels=1)
    candidates = np.argwhere(pooled == pooled.max())
    assert sorted(map(tuple, candidates.tolist())) == list(itertools.product(range(4, 8), repeat=3))
    gt = np.zeros((20, 20, 20), dtype=bool)
    gt[3:14, 4:15, 5:16] = True
    chosen = candidates[np.random.RandomState(42).choice(len(candidates))] + (3, 4, 5)
    assert next_click(gt, np.zeros_like(gt), max_voxels=1) == (tuple(int(v) for v in chosen), "fg")


def test_bad_inputs_are_refused():
    with pytest.raises(SimulationError, match="one shape"):
        next_click(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(SimulationError, match="3D"):
        next_click(np.zeros((4, 4)), np.zeros((4, 4)))


def test_case_round_builds_the_evaluators_lists():
    gts = np.zeros((16, 16, 16), dtype=np.uint8)
    gts[2:7, 2:7, 2:7] = 1
    gts[9:14, 9:14, 9:14] = 3
    segs = gts.copy()
    segs[9:14, 9:14, 9:14] = 0  # class 3 missed, class 1 perfect
    clicks, order = next_clicks_for_case(gts, segs)
    assert clicks == [{"fg": [], "bg": []}, {"fg": [[11, 11, 11]], "bg": []}]
    assert order == [[None], ["fg"]]
    segs[9:14, 9:14, 9:14] = 3
    segs[3:6, 3:6, 10:13] = 1  # now class 1 over-segments (centre (4, 4, 11))
    clicks2, order2 = next_clicks_for_case(gts, segs, clicks=clicks, clicks_order=order)
    assert clicks2 == [{"fg": [], "bg": [[4, 4, 11]]}, {"fg": [[11, 11, 11]], "bg": []}]
    assert order2 == [[None, "bg"], ["fg", None]]
    assert order == [[None], ["fg"]]  # the previous round's lists are left as they were


# ----------------------------------------------------------------------------- boxes


def test_challenge_box_uses_the_middle_occupied_slice():
    gts = np.zeros((20, 30, 40), dtype=np.uint8)
    gts[2, 5:8, 5:9] = 1  # occupied slices 2, 10, 11 -> the middle one is 10
    gts[10, 12:20, 20:31] = 1
    gts[11, 1:29, 1:39] = 1
    gts[15:17, 3:4, 6:8] = 2
    boxes = challenge_boxes(gts)
    assert boxes[0] == {"z_min": 2, "z_max": 11, "z_mid": 10, "z_mid_x_min": 20, "z_mid_y_min": 12,
                        "z_mid_x_max": 30, "z_mid_y_max": 19}
    assert boxes[1]["z_mid"] == 16 and (boxes[1]["z_min"], boxes[1]["z_max"]) == (15, 16)
    assert box_dict_to_3d(boxes[0]) == ((2, 12, 20), (11, 19, 30))


def test_challenge_box_shift_is_drawn_and_scaled_as_the_organisers_did():
    gts = np.zeros((6, 128, 256), dtype=np.uint8)  # H = 128, W = 256
    gts[1:5, 40:60, 100:150] = 1
    shift = np.random.RandomState(7).randint(0, 6, 1)[0]  # get_boxes.py's draw
    box = challenge_boxes(gts, rng=np.random.RandomState(7))[0]
    assert shift > 0
    assert (box["z_mid_x_min"], box["z_mid_x_max"]) == (100 - shift, 149 + shift)
    assert (box["z_mid_y_min"], box["z_mid_y_max"]) == (40 - shift // 2, 59 + shift // 2)
    edge = np.zeros((4, 8, 8), dtype=np.uint8)
    edge[:, :, :] = 1  # touching every border: clipped
    assert box_dict_to_3d(challenge_boxes(edge, rng=np.random.RandomState(7))[0]) == ((0, 0, 0), (3, 7, 7))


def test_box_dict_errors_are_clear():
    with pytest.raises(SimulationError, match="lacks"):
        box_dict_to_3d({"z_min": 0})
    with pytest.raises(SimulationError, match="integer"):
        challenge_boxes(np.zeros((4, 4, 4), dtype=float))


def test_random_box_contains_the_object_within_the_offsets():
    mask = _cube((30, 30, 30), (10, 11, 12), (15, 16, 17))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        lo, hi = random_box_3d(mask, rng, max_offset=3)
        assert all(7 <= a - d <= 10 for a, d in zip(lo, (0, 1, 2)))
        assert all(14 <= b - d <= 17 for b, d in zip(hi, (0, 1, 2)))
        seen.add((lo, hi))
    assert len(seen) > 10
    lo, hi = random_box_3d(_cube((10, 10, 10), (0, 0, 0), (10, 10, 10)), rng, max_offset=4)
    assert (lo, hi) == ((0, 0, 0), (9, 9, 9))
    assert random_box_3d(mask, rng, max_offset=0) == ((10, 11, 12), (14, 15, 16))
    with pytest.raises(SimulationError, match="non-empty"):
        random_box_3d(np.zeros((5, 5, 5)), rng)
