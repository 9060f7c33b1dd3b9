"""The prompt controller when things go wrong or get shared, on real scenes with real sessions: a result that
cannot be written, a worker killed mid-request, a cancelled encoding, another model or device, one session
shared by two front-ends, and the depth of a box drawn in one slice."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from process_checks import gone

BOX = ((6, 8, 10), (17, 23, 29))  # inclusive (z, y, x)
SLOW_SHAPE = (96, 160, 160)  # about 1.6 s to encode on one thread: long enough to act while it runs


def _volume(scene, shape=(24, 32, 40), seed=0, name="phantom"):
    from ENSAMSegmentLib.core.geometry import VolumeGeometry
    from ENSAMSegmentLib.mrml import volumes

    image = np.random.default_rng(seed).normal(0, 20, shape).astype(np.float32)
    image[shape[0] // 4: 3 * shape[0] // 4, 8:24, 10:30] += 200
    geometry = VolumeGeometry.from_lps((2.0, 1.2, 1.0), (5.0, -3.0, 7.0), np.diag([1.0, -1.0, 1.0]), shape)
    return volumes.add_volume(scene, image, geometry, name), geometry


def _controller(headless, pool, model, volume=None, wait=True, **kwargs):
    from ENSAMSegmentLib.mrml.promptcontroller import PromptController

    controller = PromptController(headless.scene, headless.app_logic, pool=pool, **kwargs)
    controller.set_model(model, "cpu")
    if volume is not None:
        controller.set_volume(volume)
        if wait:
            controller.wait()
            assert controller.status.startswith("Ready"), controller.status
    return controller


def _place_box(controller, geometry, box=BOX):
    from ENSAMSegmentLib.mrml import prompts
    from ENSAMSegmentLib.mrml.promptcontroller import roi_for_box

    roi = controller.prompt_nodes()[2]
    prompts.set_roi(roi, *roi_for_box(geometry, *box))
    return roi


def _read(segmentation, segment_id, volume):
    from ENSAMSegmentLib.mrml.segments import SegmentWriter

    writer = SegmentWriter(segmentation, volume)
    try:
        return writer.read(segment_id)
    finally:
        writer.close()


@pytest.fixture
def worker_pool():
    from ENSAMSegmentLib.core.session_pool import SessionPool, worker_factory

    pool = SessionPool(worker_factory(torch_threads=1))
    yield pool
    pool.close_all()


def test_a_result_that_cannot_be_written_leaves_the_segment_and_says_why(headless, pool, small_model_file, one_thread):
    """The volume moves away from its segmentation between a box and a click: the click's result cannot be
    written (SegmentWriteError). The segment keeps the box's voxels, the status says why, the object's prompts
    are gone from the session and the view; with the volume back, a new box works."""
    volume, geometry = _volume(headless.scene)
    controller = _controller(headless, pool, small_model_file, volume)
    _place_box(controller, geometry)
    controller.wait()
    segmentation, segment_id = controller.segmentation_node, controller.segment_id
    after_box = controller.writer.read(segment_id)
    object_id = controller.object_for_segment(segment_id)
    assert after_box.any() and object_id is not None

    moved = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = moved.GetMatrixTransformToParent()
    matrix.SetElement(0, 3, 25.0)
    moved.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(moved.GetID())
    foreground = controller.prompt_nodes()[0]
    foreground.AddControlPointWorld(*controller.geometry.kji_to_ras((12, 16, 20)).tolist())
    controller.wait()
    assert "not written" in controller.status and "voxel grid" in controller.status, controller.status
    assert "segment is unchanged" in controller.status
    assert controller.object_for_segment(segment_id) is None and object_id not in controller.session.object_ids
    assert foreground.GetNumberOfControlPoints() == 0 and controller.roi_node.GetNumberOfControlPoints() == 0

    volume.SetAndObserveTransformNodeID(None)
    np.testing.assert_array_equal(_read(segmentation, segment_id, volume), after_box)
    _place_box(controller, geometry)
    controller.wait()
    assert controller.status.startswith("Object"), controller.status
    assert controller.object_for_segment(segment_id) not in (None, object_id)
    controller.cleanup()


def test_a_worker_killed_mid_request_is_replaced_and_the_segmentation_untouched(headless, worker_pool,
                                                                                small_model_file):
    volume, geometry = _volume(headless.scene)
    controller = _controller(headless, worker_pool, small_model_file, volume)
    _place_box(controller, geometry)
    controller.wait()
    segmentation, segment_id = controller.segmentation_node, controller.segment_id
    after_box = controller.writer.read(segment_id)

    slow, slow_geometry = _volume(headless.scene, SLOW_SHAPE, seed=3, name="large")
    controller.set_volume(slow)
    controller.set_target(None, None)  # the large volume gets a segmentation of its own
    first = controller.session
    while not first.ready:
        controller.poll()
    _place_box(controller, slow_geometry)  # queued behind the encoding
    controller.poll()
    assert controller.encoding and first.busy
    os.kill(first.pid, signal.SIGKILL)
    controller.wait(120)
    assert "worker stopped" in controller.status or controller.status.startswith("Ready"), controller.status
    assert controller.session is not first and controller.session.pid != first.pid and first.closed
    assert controller.status.startswith("Ready")
    assert controller.segmentation_node is not segmentation
    large_segment = controller.segment_id
    assert large_segment is None or not controller.writer.read(large_segment).any()  # nothing was written
    _place_box(controller, slow_geometry)
    controller.wait(120)
    assert controller.status.startswith("Object"), controller.status
    assert controller.writer.read(controller.segment_id).any()
    controller.cleanup()
    np.testing.assert_array_equal(_read(segmentation, segment_id, volume), after_box)  # untouched


def test_the_crash_message_reaches_the_status_line(headless, worker_pool, small_model_file, caplog):
    volume, geometry = _volume(headless.scene, SLOW_SHAPE, seed=4)
    controller = _controller(headless, worker_pool, small_model_file, volume, wait=False)
    first = controller.session
    while not first.ready:
        controller.poll()
    os.kill(first.pid, signal.SIGKILL)
    while controller.session is first:
        controller.poll()
    assert "The ENSAM worker stopped" in controller.status and "SIGKILL" in controller.status
    assert "Restarted: encoding the image again" in controller.status
    assert any("SIGKILL" in r.getMessage() for r in caplog.records)  # and the log
    controller.wait(120)
    assert controller.status.startswith("Ready")
    controller.cleanup()


def test_cancel_stops_the_encoding_and_a_tool_starts_it_again(headless, pool, small_model_file):
    volume, geometry = _volume(headless.scene, SLOW_SHAPE, seed=5)
    controller = _controller(headless, pool, small_model_file, volume, wait=False)
    session = controller.session
    assert controller.encoding
    controller.cancel()
    assert not controller.busy and controller.session is None and "cancelled" in controller.status
    assert session.closed
    if hasattr(session, "pid"):
        assert gone(session.pid), "the worker was not stopped"
    controller.start_tool("box")
    assert controller.encoding and controller.session is not session
    controller.stop_tool()
    controller.wait(120)
    assert controller.status.startswith("Ready")
    _place_box(controller, geometry)
    controller.wait(120)
    assert controller.writer.read(controller.segment_id).any()
    controller.cleanup()


def test_another_model_or_device_gets_its_own_session(headless, worker_pool, small_model_file, tmp_path):
    import torch

    from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
    from ENSAMSegmentLib.core.network import ENSAMConfig

    volume, geometry = _volume(headless.scene)
    controller = _controller(headless, worker_pool, small_model_file, volume)
    first = controller.session
    other = create_untrained_model_file(tmp_path / "other.pt", seed=1, config=ENSAMConfig(
        init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32))
    controller.set_model(other, "cpu")  # model reload: a new worker; the old one ends
    assert controller.session is not first and first.closed and gone(first.pid)
    controller.wait()
    assert controller.status.startswith("Ready") and controller.session.model_info["path"] == str(other)
    if not torch.cuda.is_available():  # a device this machine lacks: said, not raised; then back to the CPU
        controller.set_model(other, "cuda")
        controller.wait()
        assert controller.status.startswith("Cannot start ENSAM") and "cuda" in controller.status.lower()
        assert controller.session is None
        _place_box(controller, geometry)
        assert controller.poll() is False and controller.status.startswith("Cannot start ENSAM")
    controller.set_model(other, "cpu")
    controller.wait()
    assert controller.status.startswith("Ready") and controller.session.device_name.startswith("cpu")
    controller.cleanup()


def test_module_and_effect_share_one_session_and_keep_their_own_prompts(headless, pool, small_model_file):
    from ENSAMSegmentLib.mrml.actions import PROMPT_NAMES

    volume, geometry = _volume(headless.scene)
    module = _controller(headless, pool, small_model_file, volume, prompt_name=PROMPT_NAMES["module"])
    effect = _controller(headless, pool, small_model_file, volume, prompt_name=PROMPT_NAMES["effect"])
    assert module.session is effect.session and pool.users(module.session) == 2
    assert "encoded in" in module.timing and "already encoded" in effect.timing  # the encoder ran once
    names = {node.GetName() for c in (module, effect) for node in c.prompt_nodes()}
    assert names == {"ENSAM box", "ENSAM foreground", "ENSAM background", "ENSAM editor box",
                     "ENSAM editor foreground", "ENSAM editor background"}

    _place_box(module, geometry)
    _place_box(effect, geometry, ((2, 2, 2), (8, 10, 12)))
    module.wait()
    effect.wait()
    a, b = module.object_for_segment(module.segment_id), effect.object_for_segment(effect.segment_id)
    assert a != b and module.session.object_prompts(a).box == BOX
    assert module.session.object_prompts(b).box == ((2, 2, 2), (8, 10, 12))  # the effect's box, not the module's
    session = module.session
    effect.cleanup()
    assert not session.closed and pool.users(session) == 1
    module.undo()
    module.wait()
    assert module.status.startswith("Object") and not module.writer.read(module.segment_id).any()
    module.cleanup()
    assert session.closed


def test_a_box_drawn_in_one_slice_gets_the_stated_depth(headless, pool, small_model_file):
    """Two corners placed in one axial slice (as the ROI widget places them): Slicer pads the box's depth to
    its shorter side; ENSAM makes it the mean of width and height, centred on the slice, and says so."""
    from ENSAMSegmentLib.mrml import boxdepth, prompts

    volume, geometry = _volume(headless.scene, (80, 48, 64))
    controller = _controller(headless, pool, small_model_file, volume)
    controller.start_tool("box")
    roi = controller.roi_node
    first, second = geometry.kji_to_ras((40, 10, 8)), geometry.kji_to_ras((40, 30, 40))  # one slice: k = 40
    roi.AddControlPointWorld(*first.tolist())
    roi.AddControlPointWorld(*second.tolist())
    width, height = abs(second[0] - first[0]), abs(second[1] - first[1])  # mm in R and A
    assert roi.GetSize()[2] == pytest.approx(min(width, height))  # what Slicer made of it
    controller.stop_tool()
    controller.wait()
    assert roi.GetSize()[2] == pytest.approx((width + height) / 2)
    assert f"depth {(width + height) / 2:.0f} mm ({boxdepth.RULE})" in controller.status, controller.status
    lo, hi = prompts.box_from_roi(roi, geometry)
    sent = controller.session.object_prompts(controller.object_for_segment(controller.segment_id)).box
    assert sent == (tuple(lo.tolist()), tuple(hi.tolist()))
    depth_voxels, spacing_k = hi[0] - lo[0] + 1, geometry.spacing_zyx[0]
    assert abs(depth_voxels * spacing_k - (width + height) / 2) <= 2 * spacing_k  # voxel centres inside the ROI
    assert (lo[0] + hi[0]) / 2 == pytest.approx(40, abs=1)  # centred on the slice drawn in

    # a box placed with depth (its corners in different slices) is left as it is
    controller.start_tool("box")
    assert controller.roi_node is not roi and roi.GetScene() is None  # a new box: a fresh ROI node
    roi = controller.roi_node
    roi.AddControlPointWorld(*geometry.kji_to_ras((30, 10, 8)).tolist())
    roi.AddControlPointWorld(*geometry.kji_to_ras((50, 30, 40)).tolist())
    size = roi.GetSize()
    controller.stop_tool()
    controller.wait()
    assert roi.GetSize() == size and "depth" not in controller.status
    controller.cleanup()


def test_a_worker_that_cannot_start_is_said_once_not_restarted_forever(headless, small_model_file, tmp_path):
    """An interpreter that dies at once (here /bin/false; in Slicer e.g. python-real without torch): the status
    says the worker could not start, and nothing loops."""
    from ENSAMSegmentLib.core.session_pool import SessionPool, worker_factory

    if not os.path.exists("/bin/false"):
        pytest.skip("needs /bin/false")
    pool = SessionPool(worker_factory(python="/bin/false"))
    volume, geometry = _volume(headless.scene)
    controller = _controller(headless, pool, small_model_file, volume, wait=False)
    controller.wait()
    assert controller.status.startswith("Cannot start ENSAM: the ENSAM worker process could not start"), \
        controller.status
    assert "exited with code 1" in controller.status and controller.session is None
    started = len(pool.sessions)
    _place_box(controller, geometry)
    assert controller.poll() is False and len(pool.sessions) == started  # no new worker until another choice
    controller.cleanup()
    pool.close_all()


def test_a_worker_found_dead_while_idle_is_replaced_at_the_next_prompt(headless, worker_pool, small_model_file):
    volume, geometry = _volume(headless.scene)
    controller = _controller(headless, worker_pool, small_model_file, volume)
    first = controller.session
    os.kill(first.pid, signal.SIGKILL)  # nothing polls meanwhile: the controller is idle
    first.process.wait(10)
    _place_box(controller, geometry)
    controller.wait(120)
    assert controller.session is not first and controller.status.startswith("Ready"), controller.status
    _place_box(controller, geometry, ((5, 7, 9), (18, 24, 30)))
    controller.wait(120)
    assert controller.status.startswith("Object") and controller.writer.read(controller.segment_id).any()
    controller.cleanup()


def test_a_worker_that_keeps_dying_is_restarted_once(headless, worker_pool, small_model_file):
    volume, geometry = _volume(headless.scene, SLOW_SHAPE, seed=6)
    controller = _controller(headless, worker_pool, small_model_file, volume, wait=False)
    for _ in range(2):  # killed while encoding, twice: restarted once, then left for the user
        session = controller.session
        while not session.ready:
            controller.poll()
        os.kill(session.pid, signal.SIGKILL)
        while controller.session is session:
            controller.poll()
    assert controller.session is None and "stopped again" in controller.status and "not restarted" in controller.status
    controller.start_tool("box")  # the user asks: one more try
    controller.stop_tool()
    controller.wait(120)
    assert controller.status.startswith("Ready"), controller.status
    controller.cleanup()
