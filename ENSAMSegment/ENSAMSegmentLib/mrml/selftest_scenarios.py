"""MRML-logic scenarios: plain functions of an MRML scene, run by two runners.

* pytest (Testing/mrml/test_scenarios.py) on a headless scene from the slicer-core wheel;
* the module's self-test inside Slicer (``ENSAMSegmentTest``) on ``slicer.mrmlScene``:

    from ENSAMSegmentLib.mrml.selftest_scenarios import SCENARIOS
    for name, scenario in SCENARIOS.items():
        slicer.mrmlScene.Clear()
        scenario(slicer.mrmlScene)

Each scenario adds its own nodes, checks with `expect` (raises `ScenarioFailure`, an
AssertionError that survives ``python -O``) and uses tiny volumes so that all run in seconds.
"""

from __future__ import annotations

import numpy as np

from ENSAMSegmentLib.core.geometry import OutsideVolumeError, VolumeGeometry, rotation_matrix
from . import prompts, segments, volumes


class ScenarioFailure(AssertionError):
    """A scenario's expectation did not hold."""


def expect(condition, message: str) -> None:
    if not condition:
        raise ScenarioFailure(message)


def expect_raises(error_type, function, *args, **kwargs) -> None:
    try:
        function(*args, **kwargs)
    except error_type:
        return
    raise ScenarioFailure(f"{getattr(function, '__name__', function)} did not raise {error_type.__name__}")


# ------------------------------------------------------------------------------- fixtures

SHAPE = (5, 6, 7)  # (z, y, x): small, and every axis a different size


def geometries() -> dict[str, VolumeGeometry]:
    """The grids every scenario must get right (shape SHAPE)."""
    oblique = rotation_matrix([1, 2, 3], 25)
    return {
        "ras_axial": VolumeGeometry.from_ras_matrix(np.diag([1.0, 1.0, 1.0, 1.0]), SHAPE),
        "lps_identity": VolumeGeometry.from_lps((1.0, 1.0, 1.0), (10, -20, 30), np.eye(3), SHAPE),
        "anisotropic": VolumeGeometry.from_lps((0.6, 0.9, 3.0), (-5, 7, 2), np.eye(3), SHAPE),
        "oblique": VolumeGeometry.from_lps((1.0, 1.2, 1.5), (3, 4, 5), oblique, SHAPE),
        "left_handed": VolumeGeometry.from_lps(
            (0.8, 1.1, 2.5), (-1, 2, -3), oblique @ np.diag([1, 1, -1]), SHAPE
        ),
        "flipped_ras": VolumeGeometry.from_ras_matrix(
            np.array([[0, 0, -1.5, 4], [-0.7, 0, 0, 2], [0, 2.0, 0, -6], [0, 0, 0, 1]]), SHAPE
        ),
    }


def _rigid(axis, angle, translation) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = rotation_matrix(axis, angle)
    t[:3, 3] = translation
    return t


def transforms() -> dict[str, np.ndarray | None]:
    """World transforms a node may sit under (None: no transform node)."""
    scaled = _rigid([0, 1, 1], -40, [-2, 5, 1])
    scaled[:3, :3] *= 1.3
    return {"none": None, "rigid": _rigid([1, 0, 1], 30, [12, -3, 7]), "scaled": scaled}


def _under(scene, matrix, name="T"):
    """A transform node whose world matrix is ``matrix``, nested under a second one to test chains
    (None: no transform node)."""
    if matrix is None:
        return None
    outer_matrix = _rigid([0, 0, 1], 15, [1, 2, 3])
    outer = volumes.add_linear_transform(scene, outer_matrix, f"{name} outer")
    return volumes.add_linear_transform(
        scene, np.linalg.inv(outer_matrix) @ matrix, f"{name} inner", parent=outer
    )


def _volume(scene, geometry, transform=None, seed=0, name="volume"):
    array = np.random.default_rng(seed).integers(0, 1000, geometry.shape).astype(np.int16)
    return array, volumes.add_volume(scene, array, geometry, name, transform=_under(scene, transform, name))


def _voxels(shape, rng, n=6) -> np.ndarray:
    """The two extreme corners and ``n`` random voxels, (n + 2, 3) (z, y, x)."""
    corners = np.array([[0, 0, 0], np.asarray(shape) - 1])
    return np.concatenate([corners, rng.integers(0, shape, size=(n, 3))])


# ------------------------------------------------------------------------------- volumes


def volume_round_trip(scene) -> None:
    """Array and world geometry survive node -> array -> node for every grid, under transforms."""
    for gname, geometry in geometries().items():
        for tname, transform in transforms().items():
            array, node = _volume(scene, geometry, transform)
            back, got = volumes.volume_to_array(node)
            expect(np.array_equal(back, array), f"{gname}/{tname}: voxels changed")
            expect(got.allclose(geometry, atol=1e-6), f"{gname}/{tname}: world geometry {got} != {geometry}")
            local = volumes.matrix_to_numpy(_ijk_to_ras(node))
            expected_local = np.linalg.inv(volumes.node_to_world(node)) @ geometry.ijk_to_ras
            expect(np.allclose(local, expected_local, atol=1e-6), f"{gname}/{tname}: local IJKToRAS wrong")
            volumes.array_to_volume(node, array[::-1].copy())
            expect(np.array_equal(volumes.volume_to_array(node)[0], array[::-1]), "rewrite lost voxels")
    expect_raises(
        volumes.MRMLError, volumes.volume_geometry, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    )


def _ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


# ------------------------------------------------------------------------------- clicks


def clicks_land_on_voxels(scene) -> None:
    """A control point anywhere inside a voxel (world RAS, any transforms) gives that voxel's (z, y, x)."""
    rng = np.random.default_rng(1)
    fg, bg = prompts.add_click_nodes(scene)
    expect(prompts.click_role(fg) == "foreground" and prompts.click_role(bg) == "background", "roles")
    for gname, geometry in geometries().items():
        for tname, transform in transforms().items():
            _, node = _volume(scene, geometry, transform)
            world = volumes.volume_geometry(node)
            for markups_tname, markups_transform in transforms().items():
                for n in (fg, bg):
                    n.RemoveAllControlPoints()
                    parent = _under(scene, markups_transform, "markups")
                    n.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
                voxels = _voxels(geometry.shape, rng)
                jitter = rng.uniform(-0.45, 0.45, voxels.shape)
                for n, targets in ((fg, voxels[::2]), (bg, voxels[1::2])):
                    for ras in world.kji_to_ras(targets + jitter[: len(targets)]):
                        local = np.linalg.inv(volumes.node_to_world(n)) @ np.append(ras, 1.0)
                        n.AddControlPoint(*local[:3])
                got_fg, got_bg = prompts.clicks_from_nodes(fg, bg, world)
                case = f"{gname}/volume {tname}/markups {markups_tname}"
                expect(
                    np.array_equal(got_fg, voxels[::2]),
                    f"{case}: fg {got_fg.tolist()} != {voxels[::2].tolist()}",
                )
                expect(
                    np.array_equal(got_bg, voxels[1::2]),
                    f"{case}: bg {got_bg.tolist()} != {voxels[1::2].tolist()}",
                )


def clicks_outside_and_unplaced(scene) -> None:
    """Points outside the volume raise (or are skipped on request); unplaced points are ignored."""
    geometry = geometries()["oblique"]
    _, node = _volume(scene, geometry)
    fg, _ = prompts.add_click_nodes(scene)
    fg.AddControlPoint(*geometry.kji_to_ras([1, 2, 3]))
    fg.AddControlPoint(*geometry.kji_to_ras([-3, 2, 3]))
    expect_raises(OutsideVolumeError, prompts.click_indices, fg, geometry)
    kept = prompts.click_indices(fg, geometry, skip_outside=True)
    expect(kept.tolist() == [[1, 2, 3]], f"skip_outside kept {kept.tolist()}")
    fg.SetNthControlPointPositionMissing(1)
    expect(prompts.click_indices(fg, geometry).tolist() == [[1, 2, 3]], "a missing point was counted")
    expect(prompts.click_indices(None, geometry).shape == (0, 3), "no node: no clicks")


# ------------------------------------------------------------------------------- box


def _voxel_roi(scene, world: VolumeGeometry, kji_min, kji_max, transform=None):
    """An ROI whose faces are the outer faces of the voxel box, axes along the voxel axes."""
    corners = world.kji_box_to_ras_corners(kji_min, kji_max)  # (8, 3), corner n: bit a = axis i, j, k
    axes = world.ijk_to_ras[:3, :3]
    size = np.linalg.norm(axes, axis=0) * (np.asarray(kji_max)[::-1] - np.asarray(kji_min)[::-1] + 1)
    rotation = axes / np.linalg.norm(axes, axis=0)
    if np.linalg.det(rotation) < 0:
        rotation[:, 2] *= -1  # a symmetric box: same corners with a proper rotation
    parent = _under(scene, transform, "roi")
    return prompts.add_roi(scene, corners.mean(axis=0), size, rotation, transform=parent, world=True)


def box_covers_roi_voxels(scene) -> None:
    """An ROI drawn on a voxel box gives exactly that box, for every grid and transform."""
    rng = np.random.default_rng(2)
    for gname, geometry in geometries().items():
        for tname, transform in transforms().items():
            _, node = _volume(scene, geometry, transform)
            world = volumes.volume_geometry(node)
            for roi_tname, roi_transform in transforms().items():
                lo = rng.integers(0, np.asarray(SHAPE) - 1)
                hi = lo + rng.integers(0, np.asarray(SHAPE) - lo)
                roi = _voxel_roi(scene, world, lo, hi, roi_transform)
                got = prompts.box_from_roi(roi, world)
                case = f"{gname}/volume {tname}/roi {roi_tname}"
                expect(
                    np.array_equal(got[0], lo) and np.array_equal(got[1], hi), f"{case}: {got} != {lo}, {hi}"
                )


def box_corners_match_slicer(scene) -> None:
    """The 8 world corners of a rotated, transformed ROI are the corners Slicer itself draws."""
    from vtk.util import numpy_support

    for tname, transform in transforms().items():
        parent = _under(scene, transform, "roi")
        roi = prompts.add_roi(scene, [1, -2, 3], [4, 6, 9], rotation_matrix([1, 1, 0], 35), transform=parent)
        drawn = numpy_support.vtk_to_numpy(roi.CreateROIBoxPolyDataWorld().GetPoints().GetData())
        corners = prompts.roi_corners_world(roi)
        d = np.linalg.norm(corners[:, None] - drawn[None], axis=-1)
        expect(
            d.min(axis=1).max() < 1e-4 and d.min(axis=0).max() < 1e-4,
            f"{tname}: corners differ from Slicer's box",
        )


def rotated_box_is_voxel_bounds(scene) -> None:
    """A rotated ROI gives the voxel-aligned bounds of its corners, clipped; outside raises."""
    geometry = geometries()["left_handed"]
    _, node = _volume(scene, geometry)
    centre = geometry.kji_to_ras([2, 3, 3])
    roi = prompts.add_roi(scene, centre, [3, 4, 5], rotation_matrix([2, -1, 1], 40))
    corners_kji = geometry.ras_to_kji(prompts.roi_corners_world(roi))
    lo, hi = prompts.box_from_roi(roi, geometry)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    inside = np.all((grid >= corners_kji.min(0) - 1e-6) & (grid <= corners_kji.max(0) + 1e-6), axis=1)
    expect(np.array_equal(lo, grid[inside].min(0)) and np.array_equal(hi, grid[inside].max(0)), "rotated box")
    big = prompts.add_roi(scene, centre, [100, 100, 100], rotation_matrix([0, 0, 1], 30))
    got = prompts.box_from_roi(big, geometry)
    expect(np.array_equal(got[0], [0, 0, 0]) and np.array_equal(got[1], np.asarray(SHAPE) - 1), "not clipped")
    far = prompts.add_roi(scene, centre + 500, [2, 2, 2])
    expect_raises(OutsideVolumeError, prompts.box_from_roi, far, geometry)
    expect_raises(
        volumes.MRMLError, prompts.box_from_roi, scene.AddNewNodeByClass("vtkMRMLMarkupsROINode"), geometry
    )


# ------------------------------------------------------------------------------- segments


def _segmentation(scene, volume_node, editor=None, transform=None, **kwargs):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    node.CreateDefaultDisplayNodes()
    parent = _under(scene, transform, "segmentation")
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node, segments.SegmentWriter(node, volume_node, editor_node=editor, **kwargs)


def _blob(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def _export(scene, segmentation_node, segment_id, volume_node) -> np.ndarray:
    """Slicer's own read-back: the segment exported to a labelmap on the volume's grid."""
    import slicer

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    expect(
        logic.ExportSegmentsToLabelmapNode(segmentation_node, [segment_id], labelmap, volume_node),
        "export failed",
    )
    array, geometry = volumes.volume_to_array(labelmap)
    expect(geometry.allclose(volumes.volume_geometry(volume_node), atol=1e-4), "exported grid != volume grid")
    scene.RemoveNode(labelmap)
    return array > 0


def segment_geometry_matches_volume(scene) -> None:
    """Segments lie on the volume's voxel grid in world space, for every grid and transform pair."""
    import slicer

    rng = np.random.default_rng(3)
    for gname, geometry in geometries().items():
        for tname, transform in transforms().items():
            for sname, seg_transform in (("none", None), ("rigid", transforms()["rigid"])):
                _, volume = _volume(scene, geometry, transform)
                node, writer = _segmentation(scene, volume, transform=seg_transform)
                sid = writer.add_segment("object 1")
                mask = rng.random(SHAPE) > 0.5
                writer.write(sid, mask)
                case = f"{gname}/volume {tname}/segmentation {sname}"
                expect(np.array_equal(writer.read(sid), mask), f"{case}: read back differs")
                layer = node.GetSegmentation().GetSegment(sid).GetRepresentation("Binary labelmap")
                layer_world = volumes.node_to_world(node) @ writer._image_to_node(layer)
                expect(
                    np.allclose(layer_world, volumes.volume_geometry(volume).ijk_to_ras, atol=1e-5),
                    f"{case}: grid",
                )
                if transform is not None or seg_transform is not None:
                    # Between differently transformed nodes Slicer's export resamples through an
                    # intermediate grid (not voxel-exact): compare with both transforms hardened.
                    slicer.vtkSlicerTransformLogic.hardenTransform(volume)
                    slicer.vtkSlicerTransformLogic.hardenTransform(node)
                expect(
                    np.array_equal(_export(scene, node, sid, volume), mask),
                    f"{case}: Slicer's export differs",
                )
                writer.close()


def write_only_changed_region(scene) -> None:
    """Only the region changes; the rest of the segment keeps its voxels whatever the mask says."""
    _, volume = _volume(scene, geometries()["oblique"])
    node, writer = _segmentation(scene, volume)
    sid = writer.add_segment("object")
    first = _blob(SHAPE, (0, 0, 0), (5, 6, 7))
    writer.write(sid, first)
    region = (slice(1, 3), slice(2, 5), slice(3, 6))
    writer.write(sid, np.zeros(SHAPE, bool), region)  # a full-size mask, only the region counts
    expected = first.copy()
    expected[region] = False
    expect(np.array_equal(writer.read(sid), expected), "voxels outside the region changed")
    writer.write(sid, np.ones((2, 3, 3), bool), region)  # a region-sized mask
    expect(np.array_equal(writer.read(sid), first), "region-sized mask not written")
    expect(np.array_equal(_export(scene, node, sid, volume), first), "Slicer's export differs")
    expect_raises(segments.SegmentWriteError, writer.write, sid, np.ones((2, 2, 2), bool), region)
    expect_raises(
        segments.SegmentWriteError, writer.write, sid, first, (slice(2, 2), slice(0, 1), slice(0, 1))
    )
    expect_raises(segments.SegmentWriteError, writer.write, "no such segment", first)


def _two_segments(scene, editor=None, **kwargs):
    """Volume, segmentation, writer and a finished segment 'other' (blob B) plus an ENSAM segment."""
    _, volume = _volume(scene, geometries()["anisotropic"])
    node, writer = _segmentation(scene, volume, editor, **kwargs)
    other = writer.add_segment("other")
    ensam = writer.add_segment("ensam")
    blob = _blob(SHAPE, (1, 1, 1), (4, 4, 4))
    writer.write(other, blob)
    return node, writer, other, ensam, blob


def overlap_rules(scene) -> None:
    """Another segment is erased only with overwriting on; allow-overlap keeps both."""
    new = _blob(SHAPE, (2, 2, 2), (5, 6, 7))
    # no editor node: allow overlap
    node, writer, other, ensam, blob = _two_segments(scene)
    writer.write(ensam, new)
    expect(np.array_equal(writer.read(other), blob), "default erased another segment")
    expect(np.array_equal(writer.read(ensam), new), "default: ENSAM segment wrong")
    for mode, other_after in (("none", blob), ("all", blob & ~new)):
        editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.SetOverwriteMode(segments.OVERWRITE_MODES[mode])
        node, writer, other, ensam, blob = _two_segments(scene, editor)
        writer.write(ensam, new)
        expect(np.array_equal(writer.read(other), other_after), f"overwrite {mode}: other segment wrong")
        expect(np.array_equal(writer.read(ensam), new), f"overwrite {mode}: ENSAM segment wrong")
        expect(np.array_equal(_export(scene, node, other, writer.volume_node), other_after), "export differs")
    # overwrite visible: a hidden segment survives, a visible one does not
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetOverwriteMode(segments.OVERWRITE_MODES["visible"])
    node, writer, other, ensam, blob = _two_segments(scene, editor)
    hidden, hidden_blob = writer.add_segment("hidden"), _blob(SHAPE, (3, 4, 4), (5, 6, 7))
    writer.write(hidden, hidden_blob)  # disjoint from 'other', overlapping the new mask
    node.GetDisplayNode().SetSegmentVisibility(hidden, False)
    writer.write(ensam, new)
    expect(np.array_equal(writer.read(hidden), hidden_blob), "overwrite visible erased a hidden segment")
    expect(np.array_equal(writer.read(other), blob & ~new), "overwrite visible kept a visible segment")


def shared_layers(scene) -> None:
    """Segments sharing one labelmap layer (Slicer's default) are written and read correctly."""
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetOverwriteMode(segments.OVERWRITE_MODES["all"])
    _, volume = _volume(scene, geometries()["left_handed"])
    node, writer = _segmentation(scene, volume, editor)
    ids = [writer.add_segment(f"object {n}") for n in range(3)]
    blobs = [
        _blob(SHAPE, (0, 0, 0), (2, 6, 7)),
        _blob(SHAPE, (2, 0, 0), (4, 6, 7)),
        _blob(SHAPE, (4, 0, 0), (5, 6, 7)),
    ]
    for sid, blob in zip(ids, blobs):
        writer.write(sid, blob)
    expect(node.GetSegmentation().GetNumberOfLayers() == 1, "disjoint segments should share one layer")
    grow = _blob(SHAPE, (1, 0, 0), (3, 6, 7))
    writer.write(ids[1], grow)
    expect(np.array_equal(writer.read(ids[0]), blobs[0] & ~grow), "overwrite on a shared layer: segment 0")
    expect(np.array_equal(writer.read(ids[1]), grow), "overwrite on a shared layer: segment 1")
    expect(np.array_equal(writer.read(ids[2]), blobs[2]), "segment 2 changed")
    editor.SetOverwriteMode(segments.OVERWRITE_MODES["none"])
    writer.write(ids[2], _blob(SHAPE, (2, 0, 0), (5, 6, 7)))
    expect(np.array_equal(writer.read(ids[1]), grow), "allow overlap on a shared layer erased segment 1")
    expect(np.array_equal(writer.read(ids[2]), _blob(SHAPE, (2, 0, 0), (5, 6, 7))), "overlapping write lost")


def masking_modes(scene) -> None:
    """Editable area and intensity range of the Segment Editor restrict the write exactly."""
    import slicer

    names = ("Everywhere", "InsideAllSegments", "InsideVisibleSegments", "OutsideAllSegments",
             "OutsideVisibleSegments", "InsideSingleSegment")  # fmt: skip
    slicer_modes = [getattr(slicer.vtkMRMLSegmentationNode, "EditAllowed" + n) for n in names]
    expect(list(segments.MASK_MODES.values()) == slicer_modes, "MASK_MODES differ from Slicer's")
    E = slicer.vtkMRMLSegmentEditorNode
    slicer_overwrite = [E.OverwriteAllSegments, E.OverwriteVisibleSegments, E.OverwriteNone]
    expect(
        list(segments.OVERWRITE_MODES.values()) == slicer_overwrite, "OVERWRITE_MODES differ from Slicer's"
    )
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetOverwriteMode(segments.OVERWRITE_MODES["none"])
    array, volume = _volume(scene, geometries()["oblique"])
    node, writer = _segmentation(scene, volume, editor)
    ensam = writer.add_segment("ensam")
    b, c = writer.add_segment("B"), writer.add_segment("C")
    mb, mc = _blob(SHAPE, (0, 0, 0), (3, 3, 3)), _blob(SHAPE, (2, 3, 3), (5, 6, 7))
    writer.write(b, mb)
    writer.write(c, mc)
    node.GetDisplayNode().SetSegmentVisibility(c, False)
    everything = np.ones(SHAPE, bool)
    cases = {
        "everywhere": everything,
        "inside_all": mb | mc,
        "inside_visible": mb,
        "outside_all": ~(mb | mc),
        "outside_visible": ~mb,
        "inside_one": mc,
    }
    for mode, editable in cases.items():
        editor.SetMaskMode(segments.MASK_MODES[mode])
        editor.SetMaskSegmentID(c if mode == "inside_one" else None)
        writer.write(ensam, everything)
        expect(np.array_equal(writer.read(ensam), editable), f"mask mode {mode}: wrong voxels written")
        expect(
            np.array_equal(writer.read(b), mb) and np.array_equal(writer.read(c), mc),
            f"{mode}: others changed",
        )
        writer.undo()
        expect(not writer.read(ensam).any(), f"mask mode {mode}: undo left voxels")
    editor.SetMaskMode(segments.MASK_MODES["everywhere"])
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(200, 600)
    writer.write(ensam, everything)
    in_range = (array >= 200) & (array <= 600)
    expect(np.array_equal(writer.read(ensam), in_range), "intensity range mask not honoured")
    writer.write(ensam, np.zeros(SHAPE, bool))  # erasing is masked too: out-of-range voxels stay unset
    expect(not writer.read(ensam).any(), "erase inside the intensity range failed")


def undo_restores_exactly(scene) -> None:
    """Several undo levels restore every segment exactly, overwritten ones included, in every
    overwrite mode; ``before_change`` runs before each write and each undo."""
    rng = np.random.default_rng(4)
    for mode in ("all", "visible", "none"):
        calls = []
        editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.SetOverwriteMode(segments.OVERWRITE_MODES[mode])
        node, writer, other, ensam, _ = _two_segments(
            scene, editor, before_change=lambda c=calls: c.append(1)
        )
        ids = (other, ensam)
        history = [[writer.read(sid) for sid in ids]]
        for step in range(6):
            lo = rng.integers(0, np.asarray(SHAPE) - 1)
            region = tuple(slice(a, b) for a, b in zip(lo, lo + rng.integers(1, np.asarray(SHAPE) - lo + 1)))
            writer.write(ids[step % 2 == 0], rng.random(SHAPE) > 0.4, region)
            history.append([writer.read(sid) for sid in ids])
        expect(len(calls) == 7, f"{mode}: before_change called {len(calls)} times for 7 writes")
        for step in range(6, 0, -1):
            expect(writer.undo(), "undo refused")
            for sid, expected in zip(ids, history[step - 1]):
                expect(
                    np.array_equal(writer.read(sid), expected),
                    f"{mode}: undo to step {step - 1}: {sid} differs",
                )
                exported = _export(scene, node, sid, writer.volume_node)
                expect(np.array_equal(exported, expected), f"{mode}: export differs after undo")
        expect(len(calls) == 13, f"{mode}: before_change not called before each undo")
        writer.undo()
        expect(
            not writer.read(other).any() and writer.undo_depth == 0 and not writer.undo(), "undo stack end"
        )
    small = segments.SegmentWriter(node, writer.volume_node, max_undo=2)
    for _ in range(4):
        small.write(ensam, rng.random(SHAPE) > 0.5)
    expect(small.undo_depth == 2, f"max_undo=2 kept {small.undo_depth} levels")


def segmentation_on_another_grid(scene) -> None:
    """A segmentation whose content lies on another grid is refused with a clear error."""
    _, volume = _volume(scene, geometries()["ras_axial"])
    _, other_volume = _volume(scene, geometries()["oblique"], name="other")
    node, writer = _segmentation(scene, other_volume)
    writer.write(writer.add_segment("made on another volume"), np.ones(SHAPE, bool))
    editors = scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode")
    expect_raises(segments.SegmentWriteError, segments.SegmentWriter, node, volume)
    expect(
        scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == editors, "a refused writer left a node"
    )


def editor_node_untouched(scene) -> None:
    """The user's editor node keeps its selection; the private node is hidden, unsaved, removable."""
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node, writer, other, ensam, _ = _two_segments(scene, editor)
    editor.SetAndObserveSegmentationNode(node)
    editor.SetSelectedSegmentID(other)
    writer.write(ensam, np.ones(SHAPE, bool))
    expect(editor.GetSelectedSegmentID() == other, "the user's selected segment changed")
    private = writer._private
    expect(private.GetHideFromEditors() and not private.GetSaveWithScene(), "private node visible or saved")
    writer.close()
    expect(private.GetScene() is None, "close() left the private editor node in the scene")


def follows_moves(scene) -> None:
    """Moving volume and segmentation together is followed; moving them apart is refused."""
    _, volume = _volume(scene, geometries()["oblique"])
    node, writer = _segmentation(scene, volume)
    sid = writer.add_segment("object")
    writer.write(sid, _blob(SHAPE, (1, 1, 1), (3, 3, 3)))
    both = volumes.add_linear_transform(scene, transforms()["rigid"], "both")
    for n in (volume, node):
        n.SetAndObserveTransformNodeID(both.GetID())
    writer.write(sid, _blob(SHAPE, (0, 0, 0), (2, 2, 2)))
    expect(np.array_equal(writer.read(sid), _blob(SHAPE, (0, 0, 0), (2, 2, 2))), "write after a joint move")
    expect(writer.geometry.allclose(volumes.volume_geometry(volume)), "writer geometry not updated")
    node.SetAndObserveTransformNodeID(None)
    expect_raises(segments.SegmentWriteError, writer.write, sid, np.zeros(SHAPE, bool))
    node.SetAndObserveTransformNodeID(both.GetID())
    expect(
        np.array_equal(writer.read(sid), _blob(SHAPE, (0, 0, 0), (2, 2, 2))), "a refused write changed voxels"
    )


def clear_and_closed_surface(scene) -> None:
    """clear() empties a segment; a closed-surface segmentation is converted to labelmaps first."""
    import slicer
    import vtk

    geometry = geometries()["ras_axial"]
    _, volume = _volume(scene, geometry)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    )
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*geometry.kji_to_ras([2, 2.5, 3]))
    sphere.SetRadius(1.6)
    sphere.SetThetaResolution(32)
    sphere.SetPhiResolution(32)
    sphere.Update()
    sid = node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "sphere")
    writer = segments.SegmentWriter(node, volume)
    expect(node.GetSegmentation().GetSourceRepresentationName() == "Binary labelmap", "not converted")
    inside = writer.read(sid)
    expect(
        inside[2, 2:4, 3].all() and 10 <= inside.sum() <= 30, f"converted sphere has {inside.sum()} voxels"
    )
    expect(writer.clear(sid) is not None and not writer.read(sid).any(), "clear() left voxels")
    expect(writer.clear(sid) is None, "clearing an empty segment changed something")
    writer.undo()
    expect(np.array_equal(writer.read(sid), inside), "undo of clear()")


SCENARIOS = {
    f.__name__: f
    for f in (
        volume_round_trip,
        clicks_land_on_voxels,
        clicks_outside_and_unplaced,
        box_covers_roi_voxels,
        box_corners_match_slicer,
        rotated_box_is_voxel_bounds,
        segment_geometry_matches_volume,
        write_only_changed_region,
        overlap_rules,
        shared_layers,
        masking_modes,
        undo_restores_exactly,
        segmentation_on_another_grid,
        editor_node_untouched,
        follows_moves,
        clear_and_closed_surface,
    )
}
