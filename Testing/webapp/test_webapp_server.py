"""The browser app's server side without a browser: a real ENSAMWebApp (trame-slicer scene and views,
a real small model, the shared PromptController), its poll loop on an asyncio loop, the page state,
the page actions and the .seg.nrrd it saves; `ensam web` argument errors."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest

BOX = ((8, 20, 16), (22, 44, 40))  # inclusive (z, y, x) voxel box inside the (32, 64, 64) phantom
_server_names = itertools.count()


@pytest.fixture
def web_app(small_image, small_model, tmp_path, monkeypatch):
    """A fresh ENSAMWebApp on its own trame server (not started: no port, no browser)."""
    monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # headless rendering
    from ENSAMSegmentLib.webapp.app import ENSAMWebApp

    app = ENSAMWebApp(small_image[0], model_path=small_model, device="cpu", out_dir=tmp_path / "out",
                      server=f"ensam-webapp-test-{next(_server_names)}")
    yield app
    app.close()


async def _until(condition, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _run(app, scenario):
    """Run ``scenario(app)`` on an asyncio loop beside the app's poll loop (as the server would)."""
    async def main():
        poller = asyncio.ensure_future(app._poll_loop())
        try:
            await scenario(app)
        finally:
            poller.cancel()

    asyncio.run(main())


def _place_box(app, box=BOX):
    """What Slicer's ROI widget does for two clicks in a slice view: the ROI is set while placing."""
    from ENSAMSegmentLib.mrml import prompts
    from ENSAMSegmentLib.mrml.promptcontroller import roi_for_box

    app.run_action("box")
    assert app.state.ensam_tool == "box"
    roi = app.controller.prompt_nodes()[2]
    prompts.set_roi(roi, *roi_for_box(app.controller.geometry, *box))
    app.run_action("box")  # placement ends (the widget leaves place mode): the box is sent
    assert app.state.ensam_tool is None


def test_page_state_follows_box_click_undo_next_and_save(web_app):
    from ENSAMSegmentLib.core.imageio import read_segmentation_nrrd
    from ENSAMSegmentLib.webapp.app import UNTRAINED_NOTE

    state, controller = web_app.state, web_app.controller
    assert state.ensam_note == UNTRAINED_NOTE and state.ensam_model == "Model: small.pt"
    # nothing is loaded or encoded before the server runs: the page shows it as it happens
    assert state.ensam_status.startswith("Starting") and controller.session is None and not state.ensam_ready
    statuses = []
    state.change("ensam_status")(lambda ensam_status, **_: statuses.append(ensam_status))
    state.ready()  # as the server does when it starts: flushes now call the listener

    async def scenario(app):
        await _until(lambda: state.ensam_ready and not state.ensam_busy, "the image to be encoded")
        assert state.ensam_status.startswith("Ready") and "encoded in" in state.ensam_timing
        assert statuses == [statuses[0], "Loading the model...", "Encoding 'phantom'...", state.ensam_status]
        assert state.ensam_segments == 0 and state.ensam_voxels == 0

        _place_box(app)
        await _until(lambda: state.ensam_timing.startswith("Box:") and not state.ensam_busy, "the box result")
        assert state.ensam_status == "Object 1: step 1." and state.ensam_segment == "ENSAM 1"
        after_box = controller.writer.read(controller.segment_id)
        assert state.ensam_voxels == int(after_box.sum()) > 0, "the untrained model segmented nothing"
        spacing = np.prod(controller.geometry.spacing_zyx)
        assert state.ensam_volume_ml == round(state.ensam_voxels * spacing / 1000, 2)

        app.run_action("foreground")
        foreground = controller.prompt_nodes()[0]
        foreground.AddControlPointWorld(*controller.geometry.kji_to_ras((15, 32, 28)).tolist())
        await _until(lambda: state.ensam_timing.startswith("Click:") and not state.ensam_busy, "the click")
        assert state.ensam_status == "Object 1: step 2." and state.ensam_tool == "foreground"
        after_click = controller.writer.read(controller.segment_id)
        assert state.ensam_voxels == int(after_click.sum())

        app.run_action("undo")
        await _until(lambda: state.ensam_status == "Object 1: step 1." and not state.ensam_busy, "undo")
        np.testing.assert_array_equal(controller.writer.read(controller.segment_id), after_box)
        assert state.ensam_voxels == int(after_box.sum())

        data = app.save()
        saved = app.out_dir / "phantom-ensam.seg.nrrd"
        assert saved.read_bytes() == data and state.ensam_saved == f"Saved {saved}"
        labels, geometry, segments = read_segmentation_nrrd(saved)
        assert [s.name for s in segments] == ["ENSAM 1"]
        assert geometry.allclose(controller.geometry, atol=1e-5)
        np.testing.assert_array_equal(labels == segments[0].label, after_box)

        first = controller.segment_id
        app.run_action("next")
        assert state.ensam_segments == 2 and state.ensam_segment == "ENSAM 2" and state.ensam_voxels == 0
        assert state.ensam_status == "Next object: ENSAM 2. Draw a box, or click on the structure."
        assert controller.segment_id != first
        np.testing.assert_array_equal(controller.writer.read(first), after_box)  # kept as it was

    _run(web_app, scenario)


def test_tools_toggle_and_unknown_actions_are_refused(web_app):
    interaction = web_app.slicer.app_logic.GetInteractionNode()
    web_app.run_action("background")
    assert web_app.state.ensam_tool == "background" and interaction.GetPlaceModePersistence() == 1
    web_app.run_action("foreground")
    assert web_app.state.ensam_tool == "foreground"
    web_app.run_action("foreground")  # the active tool's button again: back to view mode
    assert web_app.state.ensam_tool is None and interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    with pytest.raises(ValueError, match="unknown action"):
        web_app.run_action("lasso")
    with pytest.raises(ValueError, match="unknown tool"):
        web_app.toggle_tool("undo")


def test_save_before_any_segment_says_so(web_app):
    assert web_app.save() == b""
    assert web_app.state.ensam_saved == "Not saved: nothing to save: there is no segment yet."
    assert not (web_app.out_dir / "phantom-ensam.seg.nrrd").exists()


def test_views_show_the_volume_and_page_has_every_action(web_app):
    from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS

    views = web_app.slicer.view_manager.get_slice_views()
    assert sorted(v.get_orientation() for v in views) == ["Axial", "Coronal", "Sagittal"]
    assert all(v.get_background_volume_id() == web_app.volume_node.GetID() for v in views)
    html = web_app.page.html
    for action, (label, key) in ACTIONS.items():
        assert f'id="ensam-{action}"' in html and f"{label} [{key}]" in html
    for element in ("ensam-save", "ensam-status", "ensam-timing", "ensam-note", "ensam-segment"):
        assert f'id="{element}"' in html


def test_views_show_name_position_and_orientation_letters_as_slicer(capfd, web_app):  # capfd first: it sees the app start
    from ENSAMSegmentLib.webapp.layout import view_annotations, view_state_key

    views = {view.get_singleton_tag(): view for view in web_app.slicer.view_manager.get_slice_views()}
    shown = {web_app.state[view_state_key(label)]["name"]: web_app.state[view_state_key(label)] for label in views}
    assert sorted(shown) == ["Axial", "Coronal", "Sagittal"]  # the phantom is not oblique
    assert [shown["Axial"]["letters"][e] for e in ("top", "right", "bottom", "left")] == ["A", "L", "P", "R"]
    assert [shown["Coronal"]["letters"][e] for e in ("top", "right", "bottom", "left")] == ["S", "L", "I", "R"]
    assert [shown["Sagittal"]["letters"][e] for e in ("top", "bottom")] == ["S", "I"]
    assert {shown[n]["color"] for n in shown} == {"#f34a33", "#6dad4a", "#efd64d"}  # Slicer's red, green, yellow
    for label, view in views.items():  # the position is the plane's RAS coordinate (a normal may point to -R)
        axis = {"Sagittal": 0, "Coronal": 1, "Axial": 2}[view.get_orientation()]
        view.set_slice_value(view.get_slice_value() + 2.0)  # scrolling updates the page
        plane = view.get_view_node().GetSliceToRAS().GetElement(axis, 3)
        assert web_app.state[view_state_key(label)]["position"] == f"{'RAS'[axis]}: {plane:.1f} mm"
    oblique = views["Red"].get_view_node()
    oblique.GetSliceToRAS().DeepCopy([0.9, -0.3, 0.3, 0, 0.3, 0.95, 0, 0, -0.28, 0.1, 0.95, 0, 0, 0, 0, 1])
    oblique.UpdateMatrices()
    assert oblique.GetOrientation() == "Reformat" and view_annotations(oblique, 0.0)["name"] == "Axial (oblique)"
    assert "WindowResizeEvent" not in capfd.readouterr().err  # VTK's warnings about trame-slicer's views


def test_key_table_is_the_shared_shortcuts():
    from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS
    from ENSAMSegmentLib.webapp.layout import key_table

    keys = key_table()
    assert len(keys) == len(ACTIONS) and set(keys.values()) == set(ACTIONS)
    assert all(keys[key.lower()] == action for action, (_label, key) in ACTIONS.items())


@pytest.mark.parametrize("name, expected", [("ct.nii.gz", "ct"), ("ct.NII.GZ", "ct"), ("a.b.nrrd", "a.b"),
                                            ("seg.seg.nrrd", "seg"), ("case.npz", "case")])
def test_image_name(name, expected):
    from pathlib import Path

    from ENSAMSegmentLib.webapp.app import image_name

    assert image_name(Path("/data") / name) == expected


def test_model_summary_trained_and_untrained(small_model, tmp_path):
    from ENSAMSegmentLib.core.modelfile import ModelFileNotFoundError, load_model, save_model
    from ENSAMSegmentLib.webapp.app import UNTRAINED_NOTE, model_summary

    assert model_summary(small_model) == ("Model: small.pt", UNTRAINED_NOTE)
    model, _ = load_model(small_model)
    trained = save_model(tmp_path / "trained.pt", model, training_data="CVPR25 coreset")
    assert model_summary(trained) == ("Model: trained.pt (trained on CVPR25 coreset)", "")
    long = save_model(tmp_path / "long.pt", model, training_data="TotalSegmentator example CT and MR, MNI152 "
                      "and ICBM 2009a atlases, 16 procedural phantoms; 30% synthetic images")
    assert model_summary(long) == ("Model: long.pt (trained on TotalSegmentator example CT and MR, MNI152 and "
                                   "ICBM 2009a ...)", "")
    opened = save_model(tmp_path / "open.pt", model, training_data="TotalSegmentator example CT and MR (all but 7 "
                        "held-out structures), atlases and phantoms")
    assert model_summary(opened)[0] == "Model: open.pt (trained on TotalSegmentator example CT and MR ...)"
    with pytest.raises(ModelFileNotFoundError):
        model_summary(tmp_path / "missing.pt")


def test_write_seg_nrrd_refuses_other_names_and_empty_segmentations(tmp_path):
    from ENSAMSegmentLib.mrml.scene import new_scene
    from ENSAMSegmentLib.webapp.export import ExportError, write_seg_nrrd

    headless = new_scene()
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ExportError, match="must end in .seg.nrrd"):
        write_seg_nrrd(node, tmp_path / "out.nrrd")
    with pytest.raises(ExportError, match="no segment yet"):
        write_seg_nrrd(node, tmp_path / "out.seg.nrrd")
    with pytest.raises(ExportError, match="no segment yet"):
        write_seg_nrrd(None, tmp_path / "out.seg.nrrd")
    headless.clear()


# -- `ensam web` errors before anything is served --------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch):
    """`ensam web` sets these process-wide; keep them from leaking into other tests."""
    monkeypatch.setenv("TRAME_ARGS", "")
    monkeypatch.setenv("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def test_cli_missing_image(cli_env, small_model, tmp_path, capsys):
    from ENSAMSegmentLib.cli.main import main

    assert main(["web", "--image", str(tmp_path / "none.nrrd"), "--port", "0", "--checkpoint", str(small_model)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_bad_checkpoint_names_the_file(cli_env, small_image, tmp_path, capsys):
    from ENSAMSegmentLib.cli.main import main

    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"not a model")
    assert main(["web", "--image", str(small_image[0]), "--checkpoint", str(not_a_model)]) == 2
    assert capsys.readouterr().err.startswith(f"ensam web: error: model file {not_a_model}: not an ENSAM model file")
    assert main(["web", "--image", str(small_image[0]), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert capsys.readouterr().err == f"ensam web: error: --checkpoint {tmp_path / 'none.pt'}: no such file\n"


def test_cli_refuses_a_single_slice_and_an_out_dir_that_is_a_file(cli_env, small_model, tmp_path, capsys):
    import SimpleITK as sitk

    from ENSAMSegmentLib.cli.main import main

    image = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 1, 8), np.int16)), str(image))
    assert main(["web", "--image", str(image), "--checkpoint", str(small_model)]) == 2
    assert "slice.nrrd is a single slice along y" in capsys.readouterr().err
    assert main(["web", "--out-dir", str(image), "--checkpoint", str(small_model)]) == 2
    assert capsys.readouterr().err == f"ensam web: error: --out-dir {image} is a file, not a folder\n"


def test_cli_bad_port(cli_env, capsys):
    from ENSAMSegmentLib.cli.main import main

    assert main(["web", "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
