"""Grow from seeds baseline: prompts to seeds, and Slicer's vtkImageGrowCutSegment driven like the effect."""

import importlib.util
import sys

import numpy as np
import pytest

from ENSAMSegmentLib.evaluation.growcut import (
    BACKGROUND,
    FOREGROUND,
    GrowCutError,
    GrowCutSegmenter,
    extent_needs_regrowth,
    grown_extent,
    seeds_from_prompts,
)
from ENSAMSegmentLib.core.metrics import dice

SHAPE = (24, 40, 40)
CENTRE = (12, 20, 21)
BOX = ((4, 10, 11), (20, 30, 31))


@pytest.fixture(scope="module")
def sphere_image():
    """A bright sphere (radius 7) in a dark noisy image; returns (image, ground truth)."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    gt = (zz - CENTRE[0]) ** 2 + (yy - CENTRE[1]) ** 2 + (xx - CENTRE[2]) ** 2 <= 7**2
    image = (gt * 100.0 + rng.normal(0, 12, SHAPE)).astype(np.float32)
    return image, gt


# ----------------------------------------------------------------------------- seeds


def test_box_becomes_a_background_shell_just_outside_it():
    seeds = seeds_from_prompts((10, 12, 14), box=((2, 3, 4), (6, 7, 8)))
    shell = np.zeros((10, 12, 14), dtype=bool)
    shell[1:8, 2:9, 3:10] = True
    shell[2:7, 3:8, 4:9] = False
    assert np.array_equal(seeds == BACKGROUND, shell)
    assert not (seeds == FOREGROUND).any()


def test_box_on_the_image_border_has_no_shell_there():
    seeds = seeds_from_prompts((6, 6, 6), box=((0, 0, 1), (5, 4, 4)))
    assert (seeds[:, 5, 1:5] == BACKGROUND).all() and (seeds[:, :, 0] == BACKGROUND).all()
    assert (seeds[:, :5, 1:5] == 0).all()  # inside the box nothing is painted


def test_clicks_are_radius_one_balls_and_foreground_wins():
    seeds = seeds_from_prompts((9, 9, 9), fg=[(4, 4, 4)], bg=[(4, 4, 5), (0, 0, 0)])
    assert (seeds == FOREGROUND).sum() == 7
    assert seeds[4, 4, 5] == FOREGROUND and seeds[4, 4, 6] == BACKGROUND
    assert (seeds == BACKGROUND).sum() == 4 + 5  # corner ball clipped to 4, the other keeps 5 of 7
    with pytest.raises(GrowCutError, match="inside the image"):
        seeds_from_prompts((9, 9, 9), fg=[(9, 0, 0)])
    with pytest.raises(GrowCutError, match="inclusive"):
        seeds_from_prompts((9, 9, 9), box=((5, 5, 5), (4, 8, 8)))


def test_region_grows_like_the_effect():
    ext = np.array([[10, 20], [0, 99], [50, 52]])
    assert grown_extent(ext, (30, 100, 60)).tolist() == [[7, 23], [0, 99], [47, 55]]
    region = grown_extent(ext, (30, 100, 60))
    assert not extent_needs_regrowth(region, ext, (30, 100, 60))
    assert extent_needs_regrowth(region, np.array([[10, 21], [0, 99], [50, 52]]), (30, 100, 60))
    assert not extent_needs_regrowth(region, np.array([[10, 20], [0, 99], [50, 52]]), (30, 100, 60))


# ----------------------------------------------------------------------------- the filter

needs_slicer = pytest.mark.skipif(importlib.util.find_spec("slicer") is None, reason="needs slicer-core")


@needs_slicer
def test_sphere_is_segmented_from_a_box_and_a_click(sphere_image):
    image, gt = sphere_image
    segmenter = GrowCutSegmenter(image, (2.0, 0.8, 0.8))
    mask = segmenter.segment(seeds_from_prompts(SHAPE, box=BOX, fg=[CENTRE]))
    assert mask.dtype == bool and mask.shape == SHAPE
    assert dice(gt, mask) > 0.9
    assert not segmenter.incremental


@needs_slicer
def test_one_more_seed_reuses_the_filter(sphere_image):
    image, gt = sphere_image
    segmenter = GrowCutSegmenter(image)
    segmenter.segment(seeds_from_prompts(SHAPE, box=BOX, fg=[CENTRE]))
    more = seeds_from_prompts(SHAPE, box=BOX, fg=[CENTRE, (12, 20, 26)], bg=[(6, 12, 13)])
    updated = segmenter.segment(more)
    assert segmenter.incremental
    assert dice(gt, updated) > 0.9
    fresh = GrowCutSegmenter(image).segment(more)
    assert dice(fresh, updated) > 0.99  # Slicer's incremental update matches a full computation


@needs_slicer
def test_seeds_beyond_the_region_start_over(sphere_image):
    image, _ = sphere_image
    segmenter = GrowCutSegmenter(image)
    segmenter.segment(seeds_from_prompts(SHAPE, fg=[CENTRE], bg=[(12, 20, 14)]))
    segmenter.segment(seeds_from_prompts(SHAPE, fg=[CENTRE], bg=[(12, 20, 14), (12, 2, 38)]))
    assert not segmenter.incremental


@needs_slicer
def test_seed_rules(sphere_image):
    image, _ = sphere_image
    segmenter = GrowCutSegmenter(image)
    empty = segmenter.segment(seeds_from_prompts(SHAPE, box=BOX))
    assert not empty.any()  # only background: nothing grows into the object
    with pytest.raises(GrowCutError, match="background seeds"):
        segmenter.segment(seeds_from_prompts(SHAPE, fg=[CENTRE]))
    with pytest.raises(GrowCutError, match="only 0"):
        segmenter.segment(np.full(SHAPE, 3, dtype=np.uint8))
    with pytest.raises(GrowCutError, match="shape"):
        segmenter.segment(np.zeros((3, 3, 3), dtype=np.uint8))


def test_missing_slicer_core_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer", None)  # makes `import slicer` fail
    with pytest.raises(GrowCutError, match="slicer-core"):
        GrowCutSegmenter(np.zeros((4, 4, 4)))
