"""The SynthSeg-style generator (ENSAMTrainingLib/core/synth.py): each step does what it says, deterministically."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from ENSAMTrainingLib.core import synth
from ENSAMTrainingLib.core.synth import SynthConfig

SHAPE = (32, 48, 48)


def two_balls(shape=SHAPE) -> np.ndarray:
    """Label 1: a ball; label 2: a ball touching it; label 3: a slab elsewhere."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.int32)
    labels[(z - 16) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 64] = 1
    labels[((z - 16) ** 2 + (y - 20) ** 2 + (x - 33) ** 2 < 36) & (labels == 0)] = 2
    labels[2:6, 35:45, 5:40] = 3
    return labels


def components(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]


def test_synthesize_crop_is_deterministic_per_seed_and_varies_across_seeds():
    labels = two_balls()
    a_img, a_mask = synth.synthesize_crop(labels, 1, np.random.default_rng([0, 1, 2]))
    b_img, b_mask = synth.synthesize_crop(labels, 1, np.random.default_rng([0, 1, 2]))
    c_img, _ = synth.synthesize_crop(labels, 1, np.random.default_rng([0, 1, 3]))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.allclose(a_img, c_img)
    assert a_img.dtype == np.float32 and a_img.shape == labels.shape and a_mask.shape == labels.shape
    assert 0.0 <= a_img.min() and a_img.max() <= 1.0 and a_mask.any()


def test_gmm_intensities_per_label_differ_between_seeds_and_labels():
    labels = two_balls()
    means = []
    for seed in (1, 2):
        image = synth.gmm_image(labels, np.random.default_rng(seed), "mr", SynthConfig(shared_mean_probability=0))
        means.append([float(image[labels == v].mean()) for v in (0, 1, 2, 3)])
    assert abs(means[0][1] - means[1][1]) > 0.01  # the same label, another image: another contrast
    assert len({round(m, 3) for m in means[0]}) == 4  # labels differ within one image
    ct = synth.gmm_image(labels, np.random.default_rng(1), "ct")
    assert -1000 <= ct.mean() <= 1200  # Hounsfield-like before the window


def test_deformation_identity_and_topology():
    labels = two_balls()
    still = SynthConfig(rotation_deg=0, scale_range=(1, 1), elastic_voxels=0)
    assert np.array_equal(synth.deform_labels(labels, np.random.default_rng(0), still), labels)
    for seed in range(3):
        moved = synth.deform_labels(labels, np.random.default_rng(seed))
        assert not np.array_equal(moved, labels)
        ball = moved == 1
        assert components(ball) == 1  # still one piece
        assert 0.6 < ball.sum() / (labels == 1).sum() < 1.6  # volume roughly kept (scale 0.85-1.15 per axis)
        centre_shift = np.linalg.norm(np.argwhere(ball).mean(0) - np.argwhere(labels == 1).mean(0))
        assert centre_shift < 6


def test_targets_merge_touching_labels_and_split_by_a_plane():
    labels = two_balls()
    assert synth.touching_labels(labels, labels == 1) == [2]
    merged = synth.make_target(labels, 1, np.random.default_rng(0), SynthConfig(merge_probability=1.0))
    assert np.array_equal(merged, (labels == 1) | (labels == 2))
    split = synth.make_target(labels, 1, np.random.default_rng(0), SynthConfig(merge_probability=0, split_probability=1))
    assert split.any() and not split[labels != 1].any() and split.sum() < (labels == 1).sum()


def test_background_becomes_pseudo_tissues_and_labels_stay():
    labels = two_balls()
    out = synth.background_tissues(labels, np.random.default_rng(3))  # seed 3 draws several tissues
    assert np.array_equal(out[labels > 0], labels[labels > 0])
    assert (out == 0).sum() == 0 and len(np.unique(out[labels == 0])) >= 2


def test_thick_slices_smooth_only_their_axis():
    noise = np.random.default_rng(0).standard_normal((40, 40, 40)).astype(np.float32)
    out = synth.thick_slices(noise, 0, 4, np.random.default_rng(0))

    def neighbour_corr(a, axis):
        first, second = np.moveaxis(a, axis, 0)[:-1].ravel(), np.moveaxis(a, axis, 0)[1:].ravel()
        return np.corrcoef(first, second)[0, 1]

    assert neighbour_corr(out, 0) > 0.8 and abs(neighbour_corr(out, 2)) < 0.2


def test_bias_field_is_smooth_and_multiplicative():
    flat = np.ones((24, 32, 32), np.float32)
    biased = synth.bias_field(flat, np.random.default_rng(1), 0.4)
    assert biased.min() > 0 and biased.std() > 0.01
    assert np.abs(np.diff(biased, axis=2)).max() < 0.1  # smooth: small steps between neighbours
    assert 0.3 < biased.min() and biased.max() < 3.0  # gains stay plausible


def test_ct_and_mr_renders_lie_in_unit_range():
    labels = two_balls()
    for style in ("ct", "mr"):
        image = synth.render(labels, np.random.default_rng(5), style)
        assert image.dtype == np.float32 and image.shape == labels.shape
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.01


def test_tubes_are_thin_and_connected():
    labels = np.zeros((48, 64, 64), np.int32)
    path = synth.random_path((24, 32, 32), np.random.default_rng(0), 15)
    synth.draw_tube(labels, 1, path, 1.2)
    tube = labels == 1
    assert components(tube) == 1
    assert ndimage.distance_transform_edt(tube).max() <= 2.0  # thin: no voxel deeper than 2 voxels
    extent = np.ptp(np.argwhere(tube), axis=0).max()
    assert extent >= 15  # long
    tree = np.zeros((48, 64, 64), np.int32)
    synth.draw_vessel_tree(tree, 1, np.random.default_rng(4))
    assert components(tree == 1) == 1


def test_lesions_sheets_and_border_objects():
    counts = []
    for seed in range(6):
        labels = np.zeros((40, 48, 48), np.int32)
        synth.draw_lesions(labels, 1, np.random.default_rng(seed))
        counts.append(components(labels == 1))
    assert min(counts) >= 1 and max(counts) >= 2  # several components happen
    sheet = np.zeros((40, 48, 48), np.int32)
    synth.draw_sheet(sheet, 1, np.random.default_rng(2))
    assert sheet.sum() > 100 and ndimage.distance_transform_edt(sheet == 1).max() <= 2.5
    border = np.zeros((40, 48, 48), np.int32)
    synth.draw_border_blob(border, 1, np.random.default_rng(1))
    mask = border == 1
    assert mask.any() and any(mask.take(i, axis=a).any() for a in range(3) for i in (0, -1))


def test_procedural_scene_deterministic_with_many_objects():
    a = synth.procedural_scene((40, 56, 56), np.random.default_rng(9))
    b = synth.procedural_scene((40, 56, 56), np.random.default_rng(9))
    assert np.array_equal(a, b) and a.dtype == np.int32
    assert len(np.unique(a)) - 1 >= 4  # objects (and some tissues) to choose from


def test_large_crops_are_synthesised_on_a_coarser_grid():
    labels = np.repeat(two_balls(), 2, axis=0)  # 64 x 48 x 48
    config = replace(synth.DEFAULT, max_voxels=40_000, deform_probability=0, object_probability=0,
                     merge_probability=0, split_probability=0)
    image, mask = synth.synthesize_crop(labels, 1, np.random.default_rng(0), config)
    assert image.shape == labels.shape and mask.shape == labels.shape
    assert abs(int(mask.sum()) - int((labels == 1).sum())) < 0.3 * (labels == 1).sum()


@pytest.mark.usefixtures("one_thread")
def test_synthesis_cost_per_sample():
    """Budget: ~0.3 s per 64x96x96-96x128x128 crop on one core; asserted loosely (shared CI cores)."""
    labels = np.zeros((64, 96, 96), np.int32)
    labels[:32, :48, :48] = np.repeat(two_balls(), 1, axis=0)
    synth.synthesize_crop(labels, 1, np.random.default_rng(0))  # imports, first-call set-up
    times = []
    for seed in range(3):
        start = time.perf_counter()
        synth.synthesize_crop(labels, 1, np.random.default_rng(seed))
        times.append(time.perf_counter() - start)
    assert np.median(times) < 1.5


def test_the_target_never_shares_a_mean():
    values = np.array([0, 1, 2, 3])
    for seed in range(5):
        own, _ = synth._label_stats(values, np.random.default_rng(seed), "mr", SynthConfig(shared_mean_probability=0))
        shared, _ = synth._label_stats(values, np.random.default_rng(seed), "mr", SynthConfig(shared_mean_probability=1),
                                       protect=[1])
        assert shared[1] == own[1] and shared[1] not in shared[[0, 2, 3]]  # the target keeps its own mean
        assert set(shared[[0, 2, 3]]) <= set(own[[0, 2, 3]])  # the others took one of theirs
