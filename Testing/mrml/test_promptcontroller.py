"""The prompt controller on real MRML scenes (slicer-core) with a real, small, untrained model, once with
in-process sessions (the CLI's and web app's) and once with worker processes (Slicer's): the scenarios
are the same because both follow one contract (core/session_contract.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

BOX = ((6, 8, 10), (17, 23, 29))  # inclusive (z, y, x)


@pytest.fixture
def loop(small_model_file, pool, one_thread):
    """(headless scene, volume node, geometry, controller) with the image already encoded."""
    from ENSAMSegmentLib.core.geometry import VolumeGeometry
    from ENSAMSegmentLib.mrml import volumes
    from ENSAMSegmentLib.mrml.scene import new_scene
    from ENSAMSegmentLib.mrml.promptcontroller import PromptController

    headless = new_scene()
    rng = np.random.default_rng(0)
    image = rng.normal(0, 20, (24, 32, 40)).astype(np.float32)
    image[6:18, 8:24, 10:30] += 200
    geometry = VolumeGeometry.from_lps((2.0, 1.2, 1.0), (5.0, -3.0, 7.0), np.diag([1.0, -1.0, 1.0]), image.shape)
    volume = volumes.add_volume(headless.scene, image, geometry, "phantom")
    events = {"wake": 0, "change": 0, "before": 0}

    def count(name):
        def bump():
            events[name] += 1
        return bump

    controller = PromptController(headless.scene, headless.app_logic, wake=count("wake"),
                                  on_change=count("change"), before_change=count("before"), pool=pool)
    controller.set_model(small_model_file, "cpu")
    controller.set_volume(volume)
    assert controller.encoding and controller.busy and "Encoding" in controller.status
    controller.wait()
    assert not controller.busy and controller.status.startswith("Ready")
    assert "encoded in" in controller.timing
    yield headless, volume, geometry, controller, events
    controller.cleanup()
    headless.clear()


def _place_box(controller, geometry, box=BOX):
    from ENSAMSegmentLib.mrml import prompts
    from ENSAMSegmentLib.mrml.promptcontroller import roi_for_box

    roi = controller.prompt_nodes()[2]
    prompts.set_roi(roi, *roi_for_box(geometry, *box))
    return roi


def _click(node, geometry, kji):
    return node.AddControlPointWorld(*geometry.kji_to_ras(kji).tolist())


def test_roi_for_box_gives_back_the_box_on_every_grid():
    """The ROI drawn after undo covers exactly the object's box, for every grid the MRML layer tests."""
    from ENSAMSegmentLib.mrml import prompts
    from ENSAMSegmentLib.mrml.scene import new_scene
    from ENSAMSegmentLib.mrml.selftest_scenarios import SHAPE, geometries
    from ENSAMSegmentLib.mrml.promptcontroller import roi_for_box

    headless = new_scene()
    roi = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    for name, geometry in geometries().items():
        for lo, hi in (((0, 0, 0), np.subtract(SHAPE, 1)), ((1, 2, 3), (3, 3, 5)), ((2, 2, 2), (2, 2, 2))):
            prompts.set_roi(roi, *roi_for_box(geometry, lo, hi))
            got = prompts.box_from_roi(roi, geometry)
            assert [g.tolist() for g in got] == [list(lo), list(np.asarray(hi).tolist())], name
    headless.clear()


def test_box_click_undo_reset_next(loop):
    import slicer

    from ENSAMSegmentLib.mrml import prompts

    headless, volume, geometry, controller, events = loop
    session = controller.session

    # box: placing it makes the segmentation, the segment and the object
    _place_box(controller, geometry)
    assert controller.busy and events["wake"] > 0
    controller.wait()
    assert controller.timing.startswith("Box:") and "ms" in controller.timing
    segmentation, segment_id = controller.segmentation_node, controller.segment_id
    assert segmentation is not None and segmentation.GetSegmentation().GetSegment(segment_id) is not None
    object_id = controller.object_for_segment(segment_id)
    assert session.object_prompts(object_id).box == BOX
    after_box = controller.writer.read(segment_id)
    assert after_box.any()
    np.testing.assert_array_equal(after_box, session.object_mask(object_id))
    assert events["before"] == 1  # saveStateForUndo before the one write

    # a foreground click: locked, sent once, written
    foreground, background, roi = controller.prompt_nodes()
    n = _click(foreground, geometry, (12, 16, 20))
    controller.wait()
    assert foreground.GetNthControlPointLocked(n)
    assert session.object_prompts(object_id).fg == ((12, 16, 20),)
    np.testing.assert_array_equal(controller.writer.read(segment_id), session.object_mask(object_id))
    controller._on_prompt_event()  # a repeated event sends nothing new
    controller.wait()
    assert session.object_prompts(object_id).fg == ((12, 16, 20),)

    # a background click outside the volume is refused, not sent
    background.AddControlPointWorld(*geometry.kji_to_ras((12, 16, 80)).tolist())
    controller.wait()
    assert "outside the volume" in controller.status
    assert session.object_prompts(object_id).bg == ()

    # undo: the segment after the box, exactly; the markups show the remaining prompts
    writes_before_undo = events["before"]
    controller.undo()
    controller.wait()
    np.testing.assert_array_equal(controller.writer.read(segment_id), after_box)
    assert foreground.GetNumberOfControlPoints() == 0
    assert events["before"] == writes_before_undo + 1
    assert [b.tolist() for b in prompts.box_from_roi(roi, geometry)] == [list(BOX[0]), list(BOX[1])]

    # reset: empty segment, no markups; itself undoable
    controller.reset_object()
    controller.wait()
    assert not controller.writer.read(segment_id).any() and roi.GetNumberOfControlPoints() == 0
    controller.undo()
    controller.wait()
    np.testing.assert_array_equal(controller.writer.read(segment_id), after_box)
    assert roi.GetNumberOfControlPoints() > 0

    # next object: a new empty segment; the first segment keeps its voxels
    new_id = controller.next_object()
    assert new_id != segment_id and controller.segment_id == new_id
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert roi.GetNumberOfControlPoints() == 0 and foreground.GetNumberOfControlPoints() == 0
    _place_box(controller, geometry, ((2, 2, 2), (8, 10, 12)))
    controller.wait()
    assert controller.object_for_segment(new_id) not in (None, object_id)
    assert controller.writer.read(new_id).any()
    np.testing.assert_array_equal(controller.writer.read(segment_id), after_box)
    assert isinstance(segmentation, slicer.vtkMRMLSegmentationNode)


def test_place_mode_and_box_completion(loop):
    headless, volume, geometry, controller, events = loop
    interaction = headless.app_logic.GetInteractionNode()
    controller.start_tool("foreground")
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert interaction.GetPlaceModePersistence() == 1
    assert controller.active_tool() == "foreground"
    controller.start_tool("box")
    assert controller.active_tool() == "box" and interaction.GetPlaceModePersistence() == 0
    selection = headless.app_logic.GetSelectionNode()
    assert selection.GetActivePlaceNodeID() == controller.roi_node.GetID()
    # an ROI that changes while Slicer still places it is not sent ...
    _place_box(controller, geometry)
    controller.wait()
    assert controller.session.object_ids == ()
    # ... until placement ends
    controller.stop_tool()
    assert controller.active_tool() is None and interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    controller.wait()
    assert controller.session.object_prompts(controller.object_for_segment(controller.segment_id)).box == BOX
    with pytest.raises(ValueError, match="unknown tool"):
        controller.start_tool("lasso")


def test_masking_settings_of_the_editor_node_are_followed(loop, small_model_file, pool):
    """Without an editor node another segment keeps its voxels; with 'overwrite all' it loses them."""
    headless, volume, geometry, controller, events = loop
    from ENSAMSegmentLib.mrml.segments import OVERWRITE_MODES

    segmentation = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    other = segmentation.GetSegmentation().AddEmptySegment("", "other")
    controller.set_target(segmentation, None)
    _place_box(controller, geometry)
    controller.wait()
    ensam_mask = controller.writer.read(controller.segment_id)
    assert ensam_mask.any()
    controller.writer.write(other, ensam_mask)  # 'other' now covers the ENSAM object
    controller.reset_object()
    controller.wait()
    controller.undo()  # restored through the writer's record: 'other' untouched either way
    controller.wait()
    assert controller.writer.read(other).sum() == ensam_mask.sum()

    editor = headless.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetOverwriteMode(OVERWRITE_MODES["all"])
    controller.cleanup()
    from ENSAMSegmentLib.mrml.promptcontroller import PromptController

    overwriting = PromptController(headless.scene, headless.app_logic, editor_node=editor, pool=pool)
    overwriting.set_model(small_model_file, "cpu")
    overwriting.set_volume(volume)
    overwriting.wait()
    overwriting.set_target(segmentation, None)
    _place_box(overwriting, geometry)
    overwriting.wait()
    new_mask = overwriting.writer.read(overwriting.segment_id)
    assert new_mask.any()
    assert not (overwriting.writer.read(other) & new_mask).any(), "overwrite 'all' erases the overlap"
    overwriting.cleanup()


def test_bad_model_and_device_are_reported_not_raised(loop, tmp_path):
    headless, volume, geometry, controller, events = loop
    with pytest.raises(ValueError, match="unknown device"):
        controller.set_model(None, "tpu")
    for empty in (None, "", Path(), Path("")):  # an empty path field: the default model
        controller.set_model(empty, "cpu")
        assert controller.model_path is None
    controller.set_model(tmp_path / "missing.pt", "cpu")
    assert controller.session is None and "Cannot start ENSAM" in controller.status
    assert "missing.pt" in controller.status
    _place_box(controller, geometry)
    assert controller.poll() is False  # nothing to send to: no crash, no job


def test_moving_the_box_starts_the_object_over_and_undo_brings_clicks_back(loop):
    from ENSAMSegmentLib.mrml import prompts

    headless, volume, geometry, controller, events = loop
    roi = _place_box(controller, geometry)
    controller.wait()
    foreground = controller.prompt_nodes()[0]
    _click(foreground, geometry, (12, 16, 20))
    controller.wait()
    object_id = controller.object_for_segment(controller.segment_id)
    assert controller.session.object_prompts(object_id).fg == ((12, 16, 20),)

    moved = ((5, 7, 9), (18, 24, 30))
    _place_box(controller, geometry, moved)  # what dragging a handle ends with
    roi.InvokeEvent(roi.PointEndInteractionEvent)
    controller.wait()
    assert controller.session.object_prompts(object_id) == type(controller.session.object_prompts(object_id))(
        box=moved)
    assert foreground.GetNumberOfControlPoints() == 0, "the session dropped the click: so does the view"

    controller.undo()
    controller.wait()
    assert controller.session.object_prompts(object_id).fg == ((12, 16, 20),)
    assert foreground.GetNumberOfControlPoints() == 1
    ras = [0.0, 0.0, 0.0]
    foreground.GetNthControlPointPositionWorld(0, ras)
    assert geometry.ras_to_kji_index(ras).tolist() == [12, 16, 20]
    assert [b.tolist() for b in prompts.box_from_roi(roi, geometry)] == [list(BOX[0]), list(BOX[1])]
    controller.wait()  # the redraw sends nothing
    assert controller.session.object_prompts(object_id).fg == ((12, 16, 20),)


def test_a_box_placed_while_encoding_waits_for_the_encoder(loop):
    from ENSAMSegmentLib.mrml import volumes

    headless, volume, geometry, controller, events = loop
    image = np.random.default_rng(5).normal(0, 20, geometry.shape).astype(np.float32)
    other = volumes.add_volume(headless.scene, image, geometry, "second")
    controller.set_volume(other)
    assert controller.encoding
    _place_box(controller, geometry)
    controller.wait()
    assert controller.volume_node is other and not controller.encoding
    object_id = controller.object_for_segment(controller.segment_id)
    assert controller.session.object_prompts(object_id).box == BOX
    assert controller.writer.read(controller.segment_id).any()
    controller.set_volume(other)  # the same, unmodified volume: nothing to do
    assert not controller.busy
