"""Windowed click decoding in the InferenceSession (session_window.py, session._decode_window) with a real
small ENSAM in fp32: a click decodes only a window, exactly as ENSAM.decode_window with the box step's
GroupNorm statistics would; the rest of the logits stay; growth, undo, far clicks, clicks-only objects,
large mode; and the window arithmetic itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ENSAMSegmentLib.core.intensity import to_uint8
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts
from ENSAMSegmentLib.core.phantom import make_phantom
from ENSAMSegmentLib.core.session import InferenceSession
from ENSAMSegmentLib.core.session_region import Grid, union
from ENSAMSegmentLib.core.session_window import MIN_FACE_VOXELS, click_window, grow_window

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
SHAPE = (32, 48, 48)
WHOLE = tuple(slice(0, n) for n in SHAPE)
HALF = 8  # click_window: a click decodes itself +- 8 voxels
ATOL = 1e-5  # fp32, the same computation in another order

pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/core/conftest.py


@pytest.fixture(scope="module")
def model() -> ENSAM:
    torch.manual_seed(0)
    return ENSAM(ENSAMConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def phantom():
    """(image, labels): 2 labelled objects; label 1 spans (4, 11, 5)..(27, 35, 26)."""
    return make_phantom(SHAPE, seed=1, n_objects=2)


@pytest.fixture(scope="module")
def box(phantom):
    """Label 1's bounding box (inclusive corners): with decode_margin 0 the session decodes it over the
    region (0:32, 8:40, 0:32), 44 % of the grid."""
    idx = np.argwhere(phantom[1] == 1)
    return tuple(int(v) for v in idx.min(0)), tuple(int(v) for v in idx.max(0))


def session(model, **options) -> InferenceSession:
    """fp32 (bf16 CPUs would otherwise pick bf16), box regions without margin, clicks +- HALF voxels, and a
    box's crop that is the whole image (context_margin 64: these tests compare windows with decoding the
    whole image's embedding; crops of their own are tested in test_session_region.py)."""
    options = {"precision": "fp32", "decode_margin": 0, "click_window": HALF, "context_margin": 64, **options}
    return InferenceSession(model=model, device="cpu", **options)


def window_around(point, half=HALF, shape=SHAPE) -> tuple:
    return tuple(slice(max(0, p - half), min(n, p + half + 1)) for p, n in zip(point, shape))


def inside(inner, outer) -> tuple:
    """`inner` (image slices) relative to `outer`'s start."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def fed_back(extent, values) -> tuple[torch.Tensor, float]:
    """The previous logits as the session feeds them to the network on the whole (native, unpadded)
    grid: the block, and beyond it the median of its six faces (torch's lower median), at most 0."""
    block = torch.from_numpy(values)
    faces = [block[0], block[-1], block[:, 0], block[:, -1], block[:, :, 0], block[:, :, -1]]
    fill = min(0.0, float(torch.cat([f.reshape(-1) for f in faces]).median()))
    prev = torch.full((1, 1, *SHAPE), fill)
    prev[(0, 0, *extent)] = block
    return prev, fill


class Direct:
    """The session's computation done directly with the model: encode the normalised image once, decode
    the box step recording its GroupNorm statistics, then windows with those statistics."""

    def __init__(self, model, image):
        self.model = model
        volume = to_uint8(image)  # the session's defaults: modality "auto", soft-tissue CT window
        with torch.inference_mode():
            self.emb = model.encode(torch.from_numpy(volume).float()[None, None] / 255.0)
        self.norms = {}

    def box(self, box, region) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.decode(self.emb, prompts(box), None, region, self.norms)[0, 0]

    def window(self, box, fg, bg, prev, window) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.decode_window(self.emb, prompts(box, fg, bg), prev, window, self.norms)[0, 0]


def prompts(box, fg=(), bg=()) -> Prompts:
    return Prompts.from_objects([{"fg": list(fg), "bg": list(bg), "box": box}])


# ----------------------------------------------------------------------------- the window is exact


def test_window_click_equals_decode_window_with_the_box_norms_and_keeps_the_rest(model, phantom, box):
    image, labels = phantom
    direct = Direct(model, image)
    centre = tuple(int(v) for v in np.argwhere(labels == 1)[len(np.argwhere(labels == 1)) // 2])
    near_edge = (16, 37, 20)  # the window (y 29..46) reaches beyond the box region (y 8..40)
    with session(model, click_window_growth=0) as s:
        s.set_image(image)
        s.create_object()
        first = s.add_box(*box)
        region, box_values = s.object_logits()
        assert first.decoding == "region" and region == first.logits_region == (slice(0, 32), slice(8, 40),
                                                                                   slice(0, 32))
        torch.testing.assert_close(torch.from_numpy(box_values), direct.box(box, region), atol=ATOL, rtol=0)

        fg, bg, extent, values = [], [], region, box_values
        for point, foreground in ((centre, True), (near_edge, False)):
            prev, fill = fed_back(extent, values)
            (fg if foreground else bg).append(point)
            update = s.add_click(point, foreground=foreground)
            window = window_around(point)
            assert update.decoding == "window" and update.window_growth == 0
            assert update.logits_region == union(extent, window)
            new_extent, new_values = s.object_logits()
            assert new_extent == update.logits_region
            expected = direct.window(box, fg, bg, prev, window)
            torch.testing.assert_close(torch.from_numpy(new_values[inside(window, new_extent)]), expected,
                                       atol=ATOL, rtol=0)
            kept = np.ones(new_values.shape, bool)
            kept[inside(window, new_extent)] = False
            before = prev[(0, 0, *new_extent)].numpy()  # previous logits, the stand-in beyond their block
            assert np.array_equal(new_values[kept], before[kept])  # outside the window: exactly the same
            assert np.array_equal(update.mask, s.object_mask()) and np.array_equal(
                update.mask[new_extent], new_values > 0)
            neither = kept.copy()
            neither[inside(extent, new_extent)] = False
            assert np.all(new_values[neither] == np.float32(fill))  # the stand-in beyond block and window
            extent, values = new_extent, new_values
        assert extent != region and neither.any()  # the second window reached beyond the box region


def test_click_window_zero_decodes_clicks_over_the_box_region(model, phantom, box):
    with session(model, click_window=0) as s:
        s.set_image(phantom[0])
        s.create_object()
        first = s.add_box(*box)
        click = s.add_click((16, 23, 15))
        far = s.add_click((30, 45, 45), foreground=False)  # the region grows to hold it: 83 % of the grid
    assert first.decoding == click.decoding == "region" and click.logits_region == first.logits_region
    assert far.decoding == "whole" and far.logits_region == WHOLE  # >= full_decode_fraction: whole


# ----------------------------------------------------------------------------- growth


def click_steps(model, image, box, clicks, **options) -> list:
    """Box then clicks -> [(update, (extent, logits))] per step."""
    out = []
    with session(model, **options) as s:
        s.set_image(image)
        s.create_object()
        out.append((s.add_box(*box), s.object_logits()))
        for point in clicks:
            out.append((s.add_click(point), s.object_logits()))
    return out


def changed_box(before, after) -> tuple | None:
    """Bounding box (image slices) of the voxels whose logits changed between two steps, within the
    earlier step's extent."""
    (e0, v0), (e1, v1) = before, after
    area = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(e0, e1))
    idx = np.argwhere(v0[inside(area, e0)] != v1[inside(area, e1)])
    if idx.size == 0:
        return None
    return tuple(slice(int(a) + e.start, int(b) + e.start + 1) for a, b, e in zip(idx.min(0), idx.max(0), area))


def test_growth_pushes_the_faces_the_clicks_change_reaches(model, phantom, box):
    """The untrained model's click changes the mask up to the window's faces: with growth 1 the window
    grows once (by HALF on those faces) and is decoded again; what it decodes in the first window is
    the same (decoding is exact per voxel), the change and the decoded block reach further."""
    image = phantom[0]
    click = (16, 24, 28)  # window x 20..37 reaches beyond the box region (x 0..32)
    fixed = click_steps(model, image, box, [click], click_window_growth=0)
    grown = click_steps(model, image, box, [click], click_window_growth=1)
    (f_update, (f_extent, f_values)), (g_update, (g_extent, g_values)) = fixed[1], grown[1]
    assert f_update.decoding == g_update.decoding == "window"
    assert f_update.window_growth == 0 and g_update.window_growth == 1
    window = window_around(click)
    fixed_change, grown_change = changed_box(fixed[0][1], fixed[1][1]), changed_box(grown[0][1], grown[1][1])
    assert all(w.start <= c.start and c.stop <= w.stop for c, w in zip(fixed_change, window))
    assert any(c.start < w.start or c.stop > w.stop for c, w in zip(grown_change, window))  # it grew
    assert all(g.start <= f.start and f.stop <= g.stop for f, g in zip(f_extent, g_extent)) and f_extent != g_extent
    assert f_extent == f_update.logits_region and g_extent == g_update.logits_region
    assert g_extent[2].stop == 45  # x 20..37, its far face pushed out by 8
    np.testing.assert_allclose(g_values[inside(window, g_extent)], f_values[inside(window, f_extent)], atol=ATOL,
                               rtol=0)


def test_a_window_covering_the_grid_never_grows(model, phantom, box):
    """click_window 32 covers the whole 32x48x48 grid from its centre: every face is on the grid's
    border, so no growth however many rounds are allowed."""
    steps = click_steps(model, phantom[0], box, [(16, 24, 24)], click_window=32, click_window_growth=3)
    update = steps[1][0]
    assert update.decoding == "window" and update.window_growth == 0 and update.logits_region == WHOLE


def test_growth_stops_at_the_grid(model):
    """An image whose padded grid exceeds it (30x44x46 -> 32x48x48), many growth rounds: the logits
    never reach beyond the image, the mask has the image's shape."""
    image, labels = make_phantom((30, 44, 46), seed=2, n_objects=2)
    idx = np.argwhere(labels == 1)
    lo, hi = tuple(int(v) for v in idx.min(0)), tuple(int(v) for v in idx.max(0))
    with session(model, click_window=4, click_window_growth=12) as s:
        s.set_image(image)
        s.create_object()
        s.add_box(lo, hi)
        growth = 0
        for point in ((1, 1, 1), (29, 43, 45), (15, 22, 23)):
            update = s.add_click(point, foreground=False)
            growth += update.window_growth
            assert update.decoding == "window" and update.mask.shape == image.shape
            extent, values = s.object_logits()
            assert all(0 <= e.start < e.stop <= n for e, n in zip(extent, image.shape)) and values.shape == tuple(
                e.stop - e.start for e in extent)
            assert update.logits_region == extent
    assert growth > 0  # the windows did grow, up to the grid's border


# ----------------------------------------------------------------------------- history and placement


def test_undo_after_a_window_click_restores_the_box_step_exactly(model, phantom, box):
    with session(model) as s:
        s.set_image(phantom[0])
        s.create_object()
        first = s.add_box(*box)
        box_logits = s.object_logits()
        click = s.add_click((20, 30, 10), foreground=False)
        click_logits = s.object_logits()
        assert click.decoding == "window" and not np.array_equal(click.mask, first.mask)
        undone = s.undo()
        assert np.array_equal(undone.mask, first.mask) and np.array_equal(s.object_mask(), first.mask)
        extent, values = s.object_logits()
        assert extent == box_logits[0] and np.array_equal(values, box_logits[1])
        again = s.add_click((20, 30, 10), foreground=False)  # the same click again: the same result
        assert again.decoding == "window" and np.array_equal(again.mask, click.mask)
        assert s.object_logits()[0] == click_logits[0] and np.array_equal(s.object_logits()[1], click_logits[1])


def test_click_far_outside_the_decoded_block(model, phantom):
    """Box in one corner, click in the opposite one: the window is decoded there (exactly), the block
    becomes the union of both, the box's logits stay and the rest of the union holds the stand-in."""
    image = phantom[0]
    corner_box = ((2, 2, 2), (10, 12, 12))  # decoded over (0:16, 0:16, 0:16)
    click = (29, 44, 43)
    direct = Direct(model, image)
    with session(model, click_window_growth=0) as s:
        s.set_image(image)
        s.create_object()
        first = s.add_box(*corner_box)
        region, box_values = s.object_logits()
        assert first.decoding == "region" and region == (slice(0, 16),) * 3
        direct.box(corner_box, region)  # records the norms the click reuses
        prev, fill = fed_back(region, box_values)
        update = s.add_click(click)
        extent, values = s.object_logits()
    window = window_around(click)
    assert update.decoding == "window" and extent == update.logits_region == union(region, window) == WHOLE
    torch.testing.assert_close(torch.from_numpy(values[window]), direct.window(corner_box, [click], [], prev, window),
                               atol=ATOL, rtol=0)
    assert np.array_equal(values[region], box_values)
    neither = np.ones(SHAPE, bool)
    neither[region] = neither[window] = False
    assert fill <= 0 and np.all(values[neither] == np.float32(fill))
    assert not update.mask[neither].any()


def test_clicks_only_object_decodes_whole_then_windows(model, phantom):
    image, labels = phantom
    idx = np.argwhere(labels == 2)
    point = tuple(int(v) for v in idx[len(idx) // 2])
    with session(model, click_window_growth=0) as s:
        s.set_image(image)
        s.create_object()
        first = s.add_click(point)
        whole = s.object_logits()
        second = s.add_click((point[0], point[1], max(0, point[2] - 6)), foreground=False)
        extent, values = s.object_logits()
    assert first.decoding == "whole" and first.logits_region == WHOLE
    assert second.decoding == "window" and second.logits_region == WHOLE and extent == WHOLE
    outside = np.ones(SHAPE, bool)
    outside[window_around((point[0], point[1], max(0, point[2] - 6)))] = False
    assert np.array_equal(values[outside], whole[1][outside]) and not np.array_equal(values, whole[1])


# ----------------------------------------------------------------------------- large mode


def large_session(model, **options) -> InferenceSession:
    # 32x48x48 = 73,728 voxels > voxel_budget: "large" mode, a pooled 4,096-voxel global view, box crops
    return session(model, voxel_budget=16_384, global_voxel_budget=4096, context_margin=4, **options)


def test_large_mode_clicks_inside_the_crop_are_windows_outside_re_encode(model, phantom):
    with large_session(model) as s:
        assert s.set_image(phantom[0]).mode == "large"
        s.create_object()
        first = s.add_box((8, 12, 12), (15, 23, 23))  # crop (4..20, 8..28, 8..28), native, encoded
        assert s.encoder_runs == 2 and first.decoding in ("region", "whole")
        inside_crop = s.add_click((12, 20, 20))
        assert inside_crop.decoding == "window" and s.encoder_runs == 2
        crop = (slice(4, 20), slice(8, 28), slice(8, 28))
        assert all(c.start <= r.start <= f.start and f.stop <= r.stop <= c.stop  # within the crop
                   for c, r, f in zip(crop, inside_crop.logits_region, first.logits_region))
        outside = s.add_click((26, 40, 40), foreground=False)  # a new crop around box and clicks
        assert outside.decoding != "window" and s.encoder_runs == 3
        assert all(e.start <= p < e.stop for e, p in zip(outside.logits_region, (26, 40, 40)))
        again = s.add_click((20, 30, 30))  # inside the new crop: windows again
        assert again.decoding == "window" and s.encoder_runs == 3

        pooled = s.create_object()  # a box too large for a native crop: its grid is pooled by 2
        big = s.add_box((2, 2, 2), (29, 45, 45), object_id=pooled)
        click = s.add_click((16, 24, 24), object_id=pooled)
        assert click.decoding == "window" and s.encoder_runs == 4 and click.logits_region == big.logits_region


def test_large_mode_clicks_only_object_windows_on_the_pooled_global_view(model, phantom):
    with large_session(model, click_window_growth=0) as s:
        report = s.set_image(phantom[0])
        s.create_object()
        first = s.add_click((16, 24, 24))
        second = s.add_click((20, 30, 30), foreground=False)
    assert first.decoding == "whole" and second.decoding == "window" and s.encoder_runs == 1
    assert second.logits_region == first.logits_region == WHOLE
    grid = Grid((0, 0, 0), SHAPE, report.grid_factor)
    assert not grid.is_native
    window = click_window(grid, [(20, 30, 30)], HALF)  # grid voxels; the trilinear upsampling to the
    # image spreads a grid voxel's value over the image voxels within one grid voxel of it
    covered = tuple(slice((w.start - 1) * f, (w.stop + 1) * f) for w, f in zip(window, grid.factor))
    assert second.changed is None or all(w.start <= c.start and c.stop <= w.stop
                                         for c, w in zip(second.changed, covered))


# ----------------------------------------------------------------------------- window arithmetic


def test_click_window_in_grid_voxels():
    native = Grid((0, 0, 0), SHAPE, (1, 1, 1))
    assert click_window(native, [(10, 20, 30)], 4) == (slice(6, 15), slice(16, 25), slice(26, 35))
    assert click_window(native, [(10, 20, 30)], 0) == (slice(10, 11), slice(20, 21), slice(30, 31))
    assert click_window(native, [(0, 47, 1)], 4) == (slice(0, 5), slice(43, 48), slice(0, 6))  # clipped
    assert click_window(native, [(5, 5, 5), (10, 20, 30)], 2) == (slice(3, 13), slice(3, 23), slice(3, 33))
    pooled = Grid((0, 0, 0), SHAPE, (2, 3, 1))  # padded (16, 16, 48)
    # (10, 20, 30) is grid voxel (5, 6, 30); 4 image voxels are ceil(4 / f) = 2, 2, 4 grid voxels
    assert click_window(pooled, [(10, 20, 30)], 4) == (slice(3, 8), slice(4, 9), slice(26, 35))
    assert click_window(pooled, [(31, 47, 47)], 9) == (slice(10, 16), slice(12, 16), slice(38, 48))
    crop = Grid((4, 8, 8), (16, 20, 20), (1, 1, 1))  # padded (16, 24, 24), origin moved
    assert click_window(crop, [(12, 20, 20)], 8) == (slice(0, 16), slice(4, 21), slice(4, 21))


def grown(flips, seeds=((8, 8, 8),), window=(slice(4, 12),) * 3, shape=(16, 16, 16), half=(2, 3, 4)):
    """grow_window on a window whose previous mask is empty and whose new mask has `flips` set
    (window-relative index expressions); seeds in grid voxels. Faces are 8x8 = 64 voxels."""
    old = torch.zeros([w.stop - w.start for w in window], dtype=torch.bool)
    new = old.clone()
    for flip in flips:
        new[flip] = True
    return grow_window(window, old, new, shape, half, list(seeds))


def test_grow_window_grows_the_faces_the_clicks_change_reaches():
    column = (slice(0, 5), slice(3, 5), slice(3, 7))  # from the seed (4, 4, 4 in the window) to z = 0
    assert grown([]) is None  # nothing changed
    assert grown([(slice(2, 7),) * 3]) is None  # the change stays inside: no face reached
    assert MIN_FACE_VOXELS == 8
    assert grown([column]) == (slice(2, 12), slice(4, 12), slice(4, 12))  # 8 voxels on the z-start face
    assert grown([(slice(0, 5), slice(3, 4), slice(0, 7))]) is None  # 7 voxels on each face it reaches
    assert grown([(slice(3, 6), slice(3, 6), slice(3, 8))]) == (slice(4, 12), slice(4, 12), slice(4, 16))  # x stop
    assert grown([(slice(3, 6), slice(3, 8), slice(3, 6))]) == (slice(4, 12), slice(4, 15), slice(4, 12))  # y stop
    assert grown([(slice(0, 5), slice(0, 5), slice(3, 5))]) == (slice(2, 12), slice(1, 12), slice(4, 12))  # 2 faces
    everything = [(slice(None),) * 3]
    assert grown(everything) == (slice(2, 14), slice(1, 15), slice(0, 16))  # every face, clipped to the shape


def test_grow_window_counts_only_the_change_connected_to_a_click():
    far = (slice(0, 2), slice(None), slice(None))  # a whole face layer changed, not touching the click
    assert grown([far]) is None  # 3 voxels from the click (8, 8, 8) = (4, 4, 4) in the window
    assert grown([far, (4, 4, 4)]) is None  # the click's own change does not reach it
    assert grown([far], seeds=[(7, 8, 8)]) == (slice(2, 12), slice(1, 15), slice(0, 16))  # 2 voxels away: counts
    # connected through corners only (26-neighbourhood): seed change (2, 2, 2) - (1, 1, 1) - face (0, 2..5, 2..5)
    diagonal = [(2, 2, 2), (1, 1, 1), (0, slice(2, 6), slice(2, 6))]
    assert grown(diagonal) == (slice(2, 12), slice(4, 12), slice(4, 12))
    # two clicks: either one's change counts
    corner = (slice(5, 8), slice(5, 8), slice(5, 8))  # 9 voxels on each of the 3 far faces
    assert grown([corner], seeds=[(6, 6, 6), (10, 10, 10)]) == (slice(4, 14), slice(4, 15), slice(4, 16))
    assert grown([corner], seeds=[(6, 6, 6)]) is None


def test_grow_window_never_grows_faces_on_the_grid_border():
    at_border = (slice(0, 8), slice(4, 12), slice(8, 16))  # z starts and x stops at the grid's border
    z_start = [(0, slice(2, 6), slice(2, 6)), (slice(0, 5), 4, 4)]  # 16 voxels of that face only
    x_stop = [(slice(2, 6), slice(2, 6), -1), (4, 4, slice(3, 8))]
    assert grown(z_start, seeds=[(8, 8, 12)], window=(slice(4, 12), slice(4, 12), slice(8, 16))) == (
        slice(2, 12), slice(4, 12), slice(8, 16))  # the same change away from the border: grows
    assert grown(z_start, seeds=[(4, 8, 12)], window=at_border) is None
    assert grown(x_stop, seeds=[(4, 8, 12)], window=at_border) is None
    assert grown([(slice(None),) * 3], seeds=[(4, 8, 12)], window=at_border) == (
        slice(0, 10), slice(1, 15), slice(4, 16))
    whole = (slice(0, 16),) * 3
    assert grown([(slice(None),) * 3], window=whole) is None


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("options", [dict(click_window=-1), dict(click_window_growth=-1)])
def test_invalid_click_window_options(model, options):
    with pytest.raises(ValueError, match="click_window"):
        InferenceSession(model=model, device="cpu", precision="fp32", **options)


def test_click_window_option_bounds_are_valid(model):
    with InferenceSession(model=model, device="cpu", precision="fp32", click_window=0, click_window_growth=0) as s:
        assert s.click_window == s.click_window_growth == 0
