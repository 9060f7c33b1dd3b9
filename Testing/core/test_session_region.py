"""Working grids of the session (pooling, encoder input, resampling, masks) and the large-volume policy:
global view, box-centred crops, growing crops, region decoding vs full decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ENSAMSegmentLib.core.metrics import dice
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
from ENSAMSegmentLib.core.phantom import make_phantom
from ENSAMSegmentLib.core.session import InferenceSession
from ENSAMSegmentLib.core.session_region import (
    Grid, MaskCrop, Placed, box_grid, changed_region, decode_region, grid_input, pool_factors, resample,
    context_margin, crop_size, training_margin, whole_grid,
)
from ENSAMTrainingLib.core.data import pool_factors as training_pool_factors

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
SHAPE = (32, 48, 48)


pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/core/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ENSAM(ENSAMConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, seed=2, n_objects=2)


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize("shape,budget", [((300, 512, 512), 4_194_304), ((300, 512, 512), 8_388_608),
                                          ((128, 256, 256), 8_388_608), ((7, 500, 33), 4096), ((32, 48, 48), 512)])
def test_pool_factors_follow_the_training_rule(shape, budget):
    factors = pool_factors(shape, budget)
    assert factors == training_pool_factors(shape, budget)
    grid = Grid((0, 0, 0), shape, factors)
    assert grid.voxels <= budget and all(p % 8 == 0 for p in grid.padded)


def test_a_128x256x256_volume_is_encoded_whole_at_native_resolution():
    assert whole_grid((128, 256, 256), 8_388_608).factor == (1, 1, 1)
    assert whole_grid((300, 512, 512), 4_194_304).factor == (2, 4, 3)  # 150x128x171: 3.4 M voxels padded


def test_grid_input_is_the_max_pooled_padded_crop():
    volume = np.random.default_rng(0).integers(0, 256, (21, 30, 17), dtype=np.uint8)
    grid = Grid((2, 3, 1), (17, 25, 15), (2, 3, 1))
    x = grid_input(volume, grid, slab=3)  # several slabs
    crop = torch.from_numpy(volume[2:19, 3:28, 1:16].astype(np.float32))[None, None] / 255
    pooled = F.max_pool3d(crop, (2, 3, 1), (2, 3, 1), ceil_mode=True)
    assert x.shape == (1, 1, *grid.padded) == (1, 1, 16, 16, 16)
    assert torch.equal(x[..., :9, :9, :15], pooled) and x[..., 9:, :, :].abs().sum() == 0


def test_box_grid_and_decode_region():
    grid = box_grid((100, 200, 200), (10, 50, 190), (20, 80, 199), margin=32, budget=2**20)
    assert grid.origin == (0, 18, 158) and grid.size == (53, 95, 42) and grid.factor == (1, 1, 1)
    assert grid.to_grid((10, 50, 190)) == (10, 32, 32)
    region = decode_region(whole_grid((64, 96, 96), 2**20), (20, 30, 40), (30, 40, 50), margin=4,
                           full_fraction=0.5)
    assert region == (slice(16, 40), slice(24, 48), slice(32, 56))
    assert decode_region(whole_grid((64, 96, 96), 2**20), (0, 0, 0), (60, 90, 90), 4, 0.5) is None


# ----------------------------------------------------------------------------- resampling and masks


def test_resample_copies_exactly_between_aligned_grids_and_fills_elsewhere():
    values = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    src = Placed(values, (4, 6, 8), (2, 2, 2))
    out = resample(src, (2, 6, 10), (2, 2, 2), (4, 4, 4), fill=-7.0)
    assert torch.equal(out[0, 0, 1:3, 0:3, 0:3], values[0, 0, :, :, 1:4])
    assert (out[0, 0, 0] == -7).all() and (out[0, 0, :, 3] == -7).all() and (out[0, 0, :, :, 3] == -7).all()


def test_resample_keeps_to_the_bounds_unless_told_otherwise():
    values = torch.ones(1, 1, 2, 2, 8)
    src = Placed(values, (0, 0, 0), (1, 1, 1), bounds=(slice(0, 2), slice(0, 2), slice(0, 5)))  # 3 padding voxels
    clipped = resample(src, (0, 0, 0), (1, 1, 1), (2, 2, 8), fill=-1.0)
    assert (clipped[..., :5] == 1).all() and (clipped[..., 5:] == -1).all()
    assert (resample(src, (0, 0, 0), (1, 1, 1), (2, 2, 8), fill=-1.0, clip=False) == 1).all()
    assert src.image_extent((10, 10, 10)) == (slice(0, 2), slice(0, 2), slice(0, 5))
    halved = resample(src, (0, 0, 0), (1, 1, 2), (2, 2, 4), fill=-1.0)  # linear path, centres 0.5 .. 6.5
    assert halved[0, 0, 0, 0].tolist() == [1, 1, -1, -1]


def test_resample_upsamples_like_trilinear_interpolation():
    values = torch.randn(1, 1, 3, 4, 5)
    src = Placed(values, (0, 0, 0), (2, 3, 1))
    out = resample(src, (0, 0, 0), (1, 1, 1), (6, 12, 5), fill=0.0)
    expected = F.interpolate(values, size=(6, 12, 5), mode="trilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
    part = resample(src, (1, 2, 0), (1, 1, 1), (3, 3, 3), fill=0.0)  # a window of the same image grid
    assert torch.allclose(part, expected[..., 1:4, 2:5, 0:3], atol=1e-5)


def test_mask_crop_and_changed_region_match_brute_force():
    rng = np.random.default_rng(3)
    shape = (12, 14, 16)
    for _ in range(20):
        masks = []
        for _ in range(2):
            m = np.zeros(shape, bool)
            box = tuple(slice(a, a + rng.integers(1, 6)) for a in rng.integers(0, 8, 3))
            m[box] = rng.random(m[box].shape) > 0.5
            masks.append(m if rng.random() > 0.2 else np.zeros(shape, bool))
        crops = [MaskCrop.from_region(tuple(slice(0, n) for n in shape), m) for m in masks]
        assert all(np.array_equal(c.full(shape), m) for c, m in zip(crops, masks))
        diff = masks[0] != masks[1]
        changed = changed_region(*crops)
        if not diff.any():
            assert changed is None
            continue
        idx = np.argwhere(diff)
        assert changed == tuple(slice(int(a), int(b) + 1) for a, b in zip(idx.min(0), idx.max(0)))


# ----------------------------------------------------------------------------- large volumes


def large_session(model, **options):
    # 32x48x48 = 73,728 voxels > voxel_budget: "large" mode with a 4,096-voxel global view
    return InferenceSession(model=model, device="cpu", voxel_budget=16_384, global_voxel_budget=4096,
                            context_margin=4, **options)


def test_large_volume_global_view_then_box_crop_then_growing_crop(model, phantom):
    image, _ = phantom
    with large_session(model) as session:
        report = session.set_image(image)
        assert report.mode == "large" and report.grid_factor == pool_factors(SHAPE, 4096)
        session.create_object()
        click_only = session.add_click((16, 24, 24))  # no box: the global view, decoded whole
        assert click_only.logits_region == tuple(slice(0, n) for n in SHAPE) and session.encoder_runs == 1

        box = session.add_box((8, 12, 12), (15, 23, 23))  # crop (4..20, 8..28, 8..28): native, encoded
        assert session.encoder_runs == 2
        assert box.logits_region == (slice(4, 20), slice(8, 28), slice(8, 28))
        assert box.mask[box.logits_region].sum() == box.mask.sum()  # nothing outside the crop

        inside = session.add_click((12, 20, 20))  # inside the crop: the cached embedding serves
        assert session.encoder_runs == 2 and inside.logits_region == box.logits_region

        outside = session.add_click((26, 40, 40), foreground=False)  # outside: the crop grows, re-encode
        assert session.encoder_runs == 3
        grown = outside.logits_region
        assert all(s.start <= p < s.stop for s, p in zip(grown, (26, 40, 40)))
        assert all(g.start <= b.start and g.stop >= b.stop for g, b in zip(grown, box.logits_region))
        outside_mask = np.ones(SHAPE, bool)
        outside_mask[outside.changed] = False
        assert np.array_equal(outside.mask[outside_mask], inside.mask[outside_mask])

        assert np.array_equal(session.undo().mask, inside.mask)  # undo across grids: exact
        session.add_click((13, 21, 21))  # back in the first crop: still cached (2 crops kept)
        assert session.encoder_runs == 3
        mask = session.object_mask()
        assert mask.any() and np.array_equal(session.merged_labels() == 1, mask)  # one object: its mask


def test_crop_cache_keeps_only_the_last_crops(model, phantom):
    image, _ = phantom
    with large_session(model, max_cached_regions=1) as session:
        session.set_image(image)
        a, b = session.create_object(), session.create_object()
        session.add_box((2, 2, 2), (8, 10, 10), object_id=a)
        session.add_box((20, 30, 30), (28, 44, 44), object_id=b)
        assert session.encoder_runs == 3
        session.add_click((5, 6, 6), object_id=a)  # a's crop was evicted: encoded again
        assert session.encoder_runs == 4


def test_too_large_for_native_crop_is_pooled(model, phantom):
    image, _ = phantom
    with large_session(model) as session:
        session.set_image(image)
        session.create_object()
        update = session.add_box((2, 2, 2), (29, 45, 45))  # crop 32x48x48 > 16,384: pooled by (2, 2, 2)
        assert session.encoder_runs == 2 and update.logits_region == tuple(slice(0, n) for n in SHAPE)


def test_whole_mode_box_is_decoded_on_its_crop_with_the_widest_training_margin(model, phantom):
    """An image within the budget is encoded whole at set_image; a box is still decoded on a crop around
    it (box + training_margin per side, as training shows objects), unless that crop is the whole image."""
    image, _ = phantom
    lo, hi = (12, 18, 18), (19, 27, 27)  # 8x10x10: geometric-mean extent 9 -> margin 9
    assert training_margin(lo, hi) == 9
    with InferenceSession(model=model, device="cpu") as session:
        assert session.set_image(image).mode == "whole" and session.encoder_runs == 1
        session.create_object()
        update = session.add_click((16, 24, 24))  # no box: the whole image's embedding
        assert session.encoder_runs == 1 and update.logits_region == tuple(slice(0, n) for n in SHAPE)
        box = session.add_box(lo, hi)  # crop (3..29, 9..37, 9..37): encoded
        assert session.encoder_runs == 2
        assert all(r.start >= a and r.stop <= b for r, a, b in zip(box.logits_region, (3, 9, 9), (29, 37, 37)))
        inside = session.add_click((15, 22, 22))  # inside the crop: its cached embedding
        assert session.encoder_runs == 2 and inside.decoding == "window"
        other = session.create_object()
        session.add_box((2, 2, 2), (8, 10, 10), object_id=other)  # another object, another crop
        assert session.encoder_runs == 3
        grown = session.add_click((30, 45, 45), object_id=other)
        # outside its crop: box and click + their margin (38) reach every border, so the crop is the image
        # itself, whose embedding is cached since set_image: no encoder pass
        assert session.encoder_runs == 3
        assert all(e.start <= p < e.stop for e, p in zip(grown.logits_region, (30, 45, 45)))


def test_whole_mode_box_crop_of_most_of_the_image_uses_the_cached_embedding(model, phantom):
    """A crop holding at least WHOLE_IMAGE_SHARE of the image is not encoded again: the image's serves."""
    with InferenceSession(model=model, device="cpu", context_margin=2) as session:
        session.set_image(phantom[0])
        session.create_object()
        session.add_box((4, 6, 6), (27, 41, 41))  # crop 28x40x40 = 61 % of 32x48x48
        assert session.encoder_runs == 1
        session.add_box((8, 12, 12), (23, 35, 35))  # crop 20x28x28 = 21 %: encoded
        assert session.encoder_runs == 2


def test_training_margin_is_the_widest_margin_training_draws():
    """session_region.training_margin = the top of data.margin_range for an object of that extent."""
    from ENSAMTrainingLib.core.data import margin_range

    for extent in [(3, 4, 5), (10, 12, 9), (30, 40, 20), (90, 120, 100)]:
        lo, hi_exclusive = np.array([5, 6, 7]), np.array([5, 6, 7]) + np.array(extent)
        assert training_margin(lo, hi_exclusive - 1) == margin_range(lo, hi_exclusive)[1]
    assert training_margin((0, 0, 0), (2, 2, 2)) == 8 and training_margin((0, 0, 0), (199, 199, 199)) == 64


def test_context_margin_widest_unless_it_costs_resolution():
    """The crop's default margin: the widest training margin while its crop is pooled no more than with half
    of it (the mean margin); narrowed to the widest such margin when it would be."""
    budget = 48 * 64 * 64
    small = ((40, 100, 100), (49, 109, 109))  # 10 voxels a side in a large image: margin 10, native crop
    assert context_margin((200, 300, 300), *small, budget) == 10
    assert box_grid((200, 300, 300), *small, None, budget) == Grid((30, 90, 90), (30, 30, 30), (1, 1, 1))
    liver = ((12, 25, 31), (77, 124, 85))  # the demo's liver box in its 96x160x160 image: widest 70 -> 64
    margin = context_margin((96, 160, 160), *liver, budget)
    half = pool_factors(crop_size((96, 160, 160), *liver, 32), budget)
    assert 32 < margin < 64 and pool_factors(crop_size((96, 160, 160), *liver, margin), budget) == half
    assert pool_factors(crop_size((96, 160, 160), *liver, margin + 1), budget) != half
    assert pool_factors(crop_size((96, 160, 160), *liver, 64), budget) != half


# ----------------------------------------------------------------------------- region vs full decoding


def test_region_decoding_agrees_with_full_decoding(model, phantom):
    """Box step, untrained small model: the masks inside the decoded region agree (Dice measured 0.90-1.0
    over seeds and boxes); a region whose decoder crop reaches the whole image gives identical logits.
    (context_margin=64: the box's crop is the whole image, so all three decode the same embedding.)"""
    image, labels = phantom
    idx = np.argwhere(labels == 2)
    lo, hi = tuple(idx.min(0)), tuple(idx.max(0))
    results = {}
    for name, fraction, margin in (("full", 0.0, 0), ("region", 2.0, 0), ("wide", 2.0, 16)):
        with InferenceSession(model=model, device="cpu", full_decode_fraction=fraction, decode_margin=margin,
                              context_margin=64) as s:
            s.set_image(image)
            s.create_object()
            update = s.add_box(lo, hi)
            results[name] = (update, s.object_logits())
    full_mask, (_, full_logits) = results["full"][0].mask, results["full"][1]
    region = results["region"][0].logits_region
    assert region != tuple(slice(0, n) for n in SHAPE)
    score = dice(results["region"][0].mask[region], full_mask[region])
    print(f"region vs full decoding, Dice inside the region {region}: {score:.4f}")
    assert score > 0.8
    extent, wide = results["wide"][1]  # decoder crop = region + 2 cells = the whole image here
    assert np.allclose(wide, full_logits[extent], atol=1e-5)


# ----------------------------------------------------------------------------- measurements (not tests)


def measure(shape=(300, 512, 512), box=((100, 180, 200), (160, 300, 320)), clicks=((130, 240, 260),)) -> dict:
    """Peak memory (ru_maxrss) and timings of a session on a synthetic int16 CT with the default-size
    (untrained) model on CPU: set_image, a box, clicks. Run: python Testing/core/test_session_region.py"""
    import resource
    import time

    import psutil

    rss = psutil.Process().memory_info().rss
    rng = np.random.default_rng(0)
    image = rng.normal(40, 300, shape).clip(-1024, 3000).astype(np.int16)
    model = ENSAM(ENSAMConfig()).eval()
    out = {"shape": shape, "rss_before_gb": rss / 1e9}
    with InferenceSession(model=model, device="cpu") as session:
        t = time.perf_counter()
        report = session.set_image(image, modality="ct")
        out.update(set_image_s=time.perf_counter() - t, mode=report.mode, grid=report.grid_shape,
                   factor=report.grid_factor, encode_s=report.timings["encode"])
        session.create_object()
        update = session.add_box(*box)
        out["box_s"], out["box_timings"] = update.seconds, update.timings
        out["clicks_s"] = [session.add_click(c).seconds for c in clicks]
        out["merged_labels_voxels"] = int((session.merged_labels() > 0).sum())
        out["encoder_runs"] = session.encoder_runs
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


if __name__ == "__main__":
    import sys

    if "--small" in sys.argv:  # the click-speed benchmark volume
        print(measure((128, 256, 256), ((40, 90, 100), (80, 150, 160)),
                      ((60, 120, 130), (60, 120, 130), (70, 110, 140), (50, 130, 120))))
    else:
        print(measure())
