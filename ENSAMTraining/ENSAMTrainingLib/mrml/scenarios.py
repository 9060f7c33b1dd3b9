"""Scenarios of the ENSAMTraining logic: plain functions of (scene, work folder), run by two runners.

* pytest (Testing/training_module/test_training_scenarios.py) on a headless scene from the slicer-core wheel;
* the module's self-test inside Slicer (``ENSAMTrainingTest``) on ``slicer.mrmlScene``:

    from ENSAMTrainingLib.mrml.scenarios import SCENARIOS
    for name, scenario in SCENARIOS.items():
        slicer.mrmlScene.Clear()
        scenario(slicer.mrmlScene, Path(tempfile.mkdtemp()))

They drive `TrainingController` the way the module's buttons do, with real child processes
(`ensam coreset`, `ensam train`) on tiny generated data sets and a tiny model (a few seconds per
run after the child's start-up), and check with `expect` (ScenarioFailure survives ``python -O``).
The trained models go to a models folder inside the work folder, never to the user's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ENSAMSegmentLib.mrml.selftest_scenarios import ScenarioFailure, expect
from ENSAMSegmentLib.core.phantom import make_phantom, write_challenge_dataset

from ENSAMTrainingLib.runs import folders
from ENSAMTrainingLib.runs.command import SetupError, TrainSettings
from ENSAMTrainingLib.runs.process import wait_until
from ENSAMTrainingLib.runs.progressparser import FAILED, FINISHED, INTERRUPTED

from .controller import TrainingController

# A small ENSAM (about 0.5 M parameters; = Testing/training/conftest.py's TINY_MODEL).
TINY_MODEL = dict(init_filters=8, norm_groups=4, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32,
                  interaction_layers=1, prev_channels=(4, 8))
TINY_BUDGET = 4096
TINY_SHAPE = (16, 24, 24)
# Fast flags: no loader processes, one sample per step, one simulated click, no validation.
FAST = {"workers": 0, "accumulation": 1, "clicks": 1, "no-augment": True, "val-fraction": 0,
        "model-config": TINY_MODEL, "seed": 0}
RUN_TIMEOUT_S = 300.0


def expect_setup_error(text: str, function, *args, **kwargs) -> None:
    """``function`` must refuse with a SetupError whose message contains ``text``."""
    try:
        function(*args, **kwargs)
    except SetupError as error:
        expect(text in str(error), f"{getattr(function, '__name__', function)}: message {str(error)!r} lacks {text!r}")
        return
    raise ScenarioFailure(f"{getattr(function, '__name__', function)} accepted what it should refuse ({text})")


def tiny_dataset(folder: Path, n_cases: int = 2, seed: int = 11) -> Path:
    """``n_cases`` flat challenge .npz phantoms (CT_Phantom_0000, MR_Phantom_0001, ...)."""
    write_challenge_dataset(folder, n_cases, shape=TINY_SHAPE, seed=seed)
    return folder


def tiny_model_file(path: Path) -> Path:
    """An untrained model file of the tiny architecture (to fine-tune)."""
    from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
    from ENSAMSegmentLib.core.network import ENSAMConfig

    return create_untrained_model_file(path, seed=0, config=ENSAMConfig(**TINY_MODEL))


def settings(data: Path, work: Path, **changes) -> TrainSettings:
    values = dict(data=data, run_dir=folders.new_folder(work / "runs"), epochs=2, voxel_budget=TINY_BUDGET,
                  device="cpu", options=dict(FAST))
    values.update(changes)
    return TrainSettings(**values)


def run_until(controller: TrainingController, condition, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
    ok = wait_until(condition, timeout, poll=controller.poll)
    expect(ok, f"timed out waiting for {what}; state {getattr(controller.training, 'state', None)}, "
               f"message {controller.message!r}, log: {_log_tail(controller)}")


def _log_tail(controller) -> str:
    job = controller.training or (controller.coreset.job if controller.coreset else None)
    return " | ".join(list(job.log_lines)[-5:]) if job is not None else ""


def _table_column(node, name: str) -> list[str]:
    table = node.GetTable()
    column = table.GetColumnByName(name)
    expect(column is not None, f"table {node.GetName()} has no column {name!r}")
    return [column.GetValue(r) for r in range(table.GetNumberOfRows())]


# ---------------------------------------------------------------------------- scenarios


def bad_input_is_refused(scene, work: Path) -> None:
    """Empty, missing, unreadable or unlabelled data, an unknown device name, a model file that is not
    one, no output folder: each refused with a clear message, nothing started."""
    controller = TrainingController(scene, models_folder=work / "models")
    data = tiny_dataset(work / "data")
    (work / "empty").mkdir()
    expect_setup_error("no training cases", controller.start_training, settings(work / "empty", work))
    expect_setup_error("does not exist", controller.start_training, settings(work / "missing", work))
    expect_setup_error("is a file", controller.start_training, settings(data / "CT_Phantom_0000.npz", work))
    expect_setup_error("choose the folder", controller.start_coreset, "", work / "out")
    unlabelled = work / "unlabelled"
    unlabelled.mkdir()
    from ENSAMSegmentLib.core.geometry import VolumeGeometry
    from ENSAMSegmentLib.core.imageio import write_image

    image, _ = make_phantom(TINY_SHAPE, 1, n_objects=1)
    write_image(unlabelled / "scan.nii.gz", image.astype(np.int16), VolumeGeometry.from_npz_spacing((2, 1, 1), TINY_SHAPE))
    expect_setup_error("no labelled cases", controller.start_training, settings(unlabelled, work))
    if os.name != "nt" and hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anything
        locked = work / "locked"
        locked.mkdir(mode=0o000)
        try:
            expect_setup_error("cannot read", controller.start_training, settings(locked, work))
        finally:
            locked.chmod(0o755)
    expect_setup_error("unknown device 'tpu'", controller.start_training, settings(data, work, device="tpu"))
    not_a_model = work / "not-a-model.pt"
    not_a_model.write_bytes(b"PK\x03\x04 half a file")
    expect_setup_error("cannot fine-tune", controller.start_training, settings(data, work, init_model=not_a_model))
    expect_setup_error("output folder", controller.start_coreset, data, "")
    expect_setup_error("fraction", controller.start_coreset, data, work / "out", fraction=1.5)
    expect(controller.training is None and controller.coreset is None, "something was started")
    expect_setup_error("no finished training run", controller.install_model)


def coreset_report_and_tables(scene, work: Path) -> None:
    """`ensam coreset` through the controller: counts per dataset and modality, skipped cases with the
    reason, in table nodes; a coreset smaller than one case per dataset cannot be trained on."""
    data = work / "data"
    for dataset, seed in (("CT_Liver", 1), ("MR_Brain", 2)):
        tiny_dataset(data / dataset.split("_")[0] / dataset, 2, seed)
    broken = data / "MR" / "MR_Brain" / "broken.npz"
    broken.write_bytes(b"not an npz file")
    controller = TrainingController(scene, models_folder=work / "models")
    selection = controller.start_coreset(data, work / "out", fraction=1.0)
    run_until(controller, lambda: not controller.busy, "the coreset selection")
    expect(selection.report is not None, f"no report: {controller.message}")
    expect(selection.usable and selection.problem == "", f"coreset problem: {selection.problem}")
    expect(selection.report["selected"] == 4, f"selected {selection.report['selected']} of 5")
    lines = selection.list_path.read_text().split()
    expect(len(lines) == 4 and "MR/MR_Brain/broken.npz" not in lines, f"case list {lines}")
    from .mrmlviews import find_node

    datasets = find_node(scene, "vtkMRMLTableNode", "coreset datasets")
    expect(datasets is not None and _table_column(datasets, "dataset") == ["CT_Liver", "MR_Brain"], "datasets table")
    expect(_table_column(datasets, "selected") == [2, 2], f"selected {_table_column(datasets, 'selected')}")
    expect(_table_column(datasets, "skipped") == ["", "unreadable: 1"], f"skipped {_table_column(datasets, 'skipped')}")
    modalities = find_node(scene, "vtkMRMLTableNode", "coreset modalities")
    expect(_table_column(modalities, "modality") == ["CT", "MR"], "modalities table")
    expect(_table_column(modalities, "found") == [2, 3], f"found {_table_column(modalities, 'found')}")
    skipped = find_node(scene, "vtkMRMLTableNode", "coreset skipped")
    expect(_table_column(skipped, "case") == ["MR/MR_Brain/broken.npz"], "skipped table")
    expect(_table_column(skipped, "reason") == ["unreadable"], "skipped reason")

    small = controller.start_coreset(data, work / "out", fraction=0.2)  # 1 case for 2 datasets
    run_until(controller, lambda: not controller.busy, "the small coreset selection")
    expect("smaller than one case per dataset" in small.problem, f"problem {small.problem!r}")
    expect_setup_error("cannot train on this coreset", controller.start_training,
                       settings(data, work, cases=small.list_path))
    failed = controller.start_coreset(data, work / "out", fraction=0.1, exclude=["*"])
    run_until(controller, lambda: not controller.busy, "a coreset that excludes everything")
    expect(failed.report is None and failed.error, f"excluding every dataset should fail: {controller.message}")


def scene_export_keeps_geometry(scene, work: Path) -> None:
    """Segmentations of an oblique, left-handed volume under a transform -> challenge .npz cases: the
    voxel grid kept, uint8 images by the organisers' preprocessing, labels in segment order with
    their names, spacing in npz order; nothing written when nothing can be exported."""
    from ENSAMSegmentLib.core.geometry import VolumeGeometry, npz_spacing_to_zyx, rotation_matrix
    from ENSAMSegmentLib.core.imageio import read_challenge_npz
    from ENSAMSegmentLib.core.intensity import to_uint8
    from ENSAMSegmentLib.mrml import segments, volumes

    from .sceneexport import SceneExportError, export_scene, read_manifest

    expect_raises_export = _raises(SceneExportError)
    expect_raises_export(export_scene, scene, work / "nothing")  # an empty scene
    expect(not (work / "nothing").exists(), "a failed export left a folder")

    image, labels = make_phantom(TINY_SHAPE, 3, n_objects=2)
    direction = rotation_matrix([1, 2, 3], 25) @ np.diag([1.0, 1.0, -1.0])  # oblique and left-handed
    geometry = VolumeGeometry.from_lps((0.8, 1.1, 2.5), (-4, 7, 12), direction, TINY_SHAPE)
    transform = volumes.add_linear_transform(scene, np.array(
        [[0.0, -1, 0, 5], [1, 0, 0, -3], [0, 0, 1, 2], [0, 0, 0, 1]]), "rotation")
    volume = volumes.add_volume(scene, image.astype(np.int16), geometry, "abdomen CT", transform=transform)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    writer = segments.SegmentWriter(segmentation, volume)
    names = ["liver", "empty", "lesion"]
    masks = [labels == 1, np.zeros(TINY_SHAPE, bool), labels == 2]
    masks[2][labels.shape[0] // 2, :, :] |= labels[labels.shape[0] // 2] == 1  # lesion overlaps liver on a slice
    for name, mask in zip(names, masks):
        writer.write(writer.add_segment(name), mask)
    writer.close()
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no volume")
    orphan.CreateDefaultDisplayNodes()

    export = export_scene(scene, work / "export", dataset="My cases", modality="auto")
    expect(len(export.cases) == 1, f"{len(export.cases)} cases exported")
    case = export.cases[0]
    expect(case.file.as_posix() == "CT/My_cases/abdomen_CT.npz", f"case file {case.file}")
    expect([s["segmentation"] for s in export.skipped] == ["no volume"], f"skipped {export.skipped}")
    npz = read_challenge_npz(export.folder / case.file)
    world = volumes.volume_geometry(volume)
    expect(np.array_equal(npz.imgs, to_uint8(image.astype(np.int16), "ct")), "imgs differ from the preprocessing")
    expect(npz.imgs.dtype == np.uint8 and npz.gts.shape == TINY_SHAPE, "dtype or shape")
    expected = np.zeros(TINY_SHAPE, np.uint8)
    expected[masks[0]] = 1
    expected[masks[2]] = 2
    expect(np.array_equal(npz.gts, expected), "labels differ from the segments")
    expect(np.allclose(npz_spacing_to_zyx(npz.spacing), world.spacing_zyx), f"spacing {npz.spacing}")
    expect(np.allclose(case.ijk_to_ras, world.ijk_to_ras), "world geometry not recorded")
    manifest = read_manifest(export.folder)
    recorded = [(label["value"], label["name"]) for label in manifest["cases"][0]["labels"]]
    expect(recorded == [(1, "liver"), (2, "lesion")], f"labels {recorded}")
    expect(manifest["cases"][0]["skipped_segments"] == [{"name": "empty", "reason": "empty on this volume"}],
           "empty segment not reported")
    expect(case.overlap_voxels == int((masks[0] & masks[2]).sum()) > 0, f"overlap {case.overlap_voxels}")
    expect_raises_export(export_scene, scene, work / "export")  # exists: never overwritten
    from ENSAMTrainingLib.core.cases import find_cases

    found = find_cases(export.folder)
    expect([(c.dataset, c.modality) for c in found] == [("My_cases", "CT")], f"ensam train sees {found}")


def _raises(error_type):
    def check(function, *args, **kwargs):
        try:
            function(*args, **kwargs)
        except error_type:
            return
        raise ScenarioFailure(f"{function.__name__} did not raise {error_type.__name__}")
    return check


def train_stop_resume_install(scene, work: Path) -> None:
    """A real run: Stop after the first step (checkpoint, exit 3), Resume to the end, the tables and
    charts follow every step and the validation of every epoch, the model installs for ENSAMSegment."""
    from .models import offered_models
    from .mrmlviews import find_node

    data = tiny_dataset(work / "data", 3)
    controller = TrainingController(scene, models_folder=work / "models")
    run = controller.start_training(settings(data, work, options={**FAST, "val-fraction": 0.34}))
    run_until(controller, lambda: run.progress.step >= 1 or not controller.training_running, "the first step")
    controller.request_stop()
    run_until(controller, lambda: not controller.training_running, "the run to stop")
    expect(run.state == INTERRUPTED, f"state {run.state}: {run.message}")
    expect(run.returncode == 3 and "Resume" in run.message, f"exit {run.returncode}: {run.message}")
    expect(controller.finished_model is None and not (run.command.run_dir / "model.pt").exists(), "a model after Stop")
    expect(folders.latest_resumable(work / "runs") == run.command.run_dir, "the stopped run is not resumable")
    stopped_at = run.progress.step

    resumed = controller.resume()
    run_until(controller, lambda: not controller.training_running, "the resumed run", )
    p = resumed.progress
    expect(resumed.state == FINISHED, f"state {resumed.state}: {resumed.message}")
    expect(p.starts == 2 and p.total_steps == 4 and [s.step for s in p.steps] == [1, 2, 3, 4],
           f"steps {[s.step for s in p.steps]} of {p.total_steps} over {p.starts} starts (stopped at {stopped_at})")
    expect(p.val_cases == 1 and [r.epoch for r in p.epochs] == [0, 1], f"epochs {p.epochs}")
    expect(all(r.metric("final_dsc") is not None for r in p.epochs), "no validation metrics")
    loss = find_node(scene, "vtkMRMLTableNode", "loss")
    expect(_table_column(loss, "step") == [1.0, 2.0, 3.0, 4.0], f"loss table {_table_column(loss, 'step')}")
    losses = _table_column(loss, "loss")
    expect(np.allclose(losses, [s.loss for s in p.steps]), "loss table values")
    epochs = find_node(scene, "vtkMRMLTableNode", "epochs")
    expect(np.allclose(_table_column(epochs, "final_dsc"), [r.metric("final_dsc") for r in p.epochs]), "metrics table")
    chart = find_node(scene, "vtkMRMLPlotChartNode", "loss chart")
    expect(chart is not None and chart.GetNumberOfPlotSeriesNodes() == 2, "loss chart")
    series = chart.GetNthPlotSeriesNode(0)
    expect(series.GetTableNodeID() == loss.GetID() and series.GetYColumnName() == "loss", "loss series")

    installed = controller.install_model("tiny test model")
    expect(installed == work / "models" / "tiny-test-model.pt", f"installed as {installed}")
    expect(("tiny-test-model", installed) in offered_models(work / "models"), "ENSAMSegment does not offer it")
    expect_setup_error("already holds a run", controller.start_training,
                       settings(data, work, run_dir=run.command.run_dir))
    expect_setup_error("finished already", controller.resume)


def absent_device_fails_the_run(scene, work: Path) -> None:
    """A device this machine lacks (cuda:99): Start checks only its name (asking torch would freeze
    Slicer while torch loads); the run itself ends at once, failed, with the reason, and trains nothing."""
    data = tiny_dataset(work / "data")
    controller = TrainingController(scene, models_folder=work / "models")
    run = controller.start_training(settings(data, work, device="cuda:99"))
    run_until(controller, lambda: not controller.training_running, "the run on cuda:99 to end")
    expect(run.state == FAILED and "cuda:99" in run.message and "Training failed" in run.message,
           f"state {run.state}: {run.message}")
    expect(run.progress.steps == [] and not (run.command.run_dir / "checkpoint.pt").exists(), "it trained")
    expect(controller.finished_model is None and not controller.busy, "a model, or still busy")


def dead_process_is_reported(scene, work: Path) -> None:
    """A run killed mid-way (SIGKILL: no checkpoint, no "done"): failed, with a clear message and no
    model; the truncated stream line a kill mid-write leaves is skipped; Resume continues from the
    epoch checkpoint and finishes."""
    data = tiny_dataset(work / "data", 2)
    controller = TrainingController(scene, models_folder=work / "models")
    run = controller.start_training(settings(data, work, epochs=2))
    run_until(controller, lambda: run.progress.step >= 3 or not controller.training_running, "step 3")
    expect(run.running, f"the run ended before it could be killed: {run.message}")
    run.process.kill()  # SIGKILL (TerminateProcess on Windows): no checkpoint, no "done" event
    run_until(controller, lambda: not controller.training_running, "the verdict on the killed run")
    expect(run.state == FAILED and "Resume continues" in run.message, f"state {run.state}: {run.message}")
    expect(os.name == "nt" or "killed (signal 9, SIGKILL)" in run.message, f"message {run.message!r}")
    expect(controller.finished_model is None and not (run.command.run_dir / "model.pt").exists(), "a model")
    with open(run.command.progress_path, "a", encoding="utf-8") as f:  # what a kill mid-write leaves
        f.write('{"event": "step", "time": 1.0, "epoch": 1, "st')

    resumed = controller.resume()
    run_until(controller, lambda: not controller.training_running, "the resumed run")
    p = resumed.progress
    expect(resumed.state == FINISHED and resumed.model is not None, f"{resumed.state}: {resumed.message}")
    expect([s.step for s in p.steps] == [1, 2, 3, 4] and p.starts == 2, f"steps {[s.step for s in p.steps]}")
    expect(resumed.parser.recovered_lines == 1, f"recovered {resumed.parser.recovered_lines} lines")


def train_on_scene_fine_tunes(scene, work: Path) -> None:
    """"Train on this scene": the scene's segmentation is exported and a model is fine-tuned on it."""
    from ENSAMSegmentLib.core.geometry import VolumeGeometry
    from ENSAMSegmentLib.core.modelfile import read_model_info
    from ENSAMSegmentLib.mrml import segments, volumes

    image, labels = make_phantom(TINY_SHAPE, 5, n_objects=2)
    geometry = VolumeGeometry.from_lps((1.0, 1.0, 2.0), (0, 0, 0), np.eye(3), TINY_SHAPE)
    volume = volumes.add_volume(scene, image.astype(np.int16), geometry, "my scan")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segments")
    segmentation.CreateDefaultDisplayNodes()
    writer = segments.SegmentWriter(segmentation, volume)
    for value in (1, 2):
        writer.write(writer.add_segment(f"structure {value}"), labels == value)
    writer.close()
    start_model = tiny_model_file(work / "start.pt")
    controller = TrainingController(scene, models_folder=work / "models")
    expect_setup_error("choose the model", controller.train_on_scene, work / "out", None)
    options = {k: v for k, v in FAST.items() if k != "model-config"}  # the model file fixes the architecture
    run = controller.train_on_scene(work / "out", start_model, epochs=2, device="cpu", voxel_budget=TINY_BUDGET,
                                    options=options)
    expect(len(controller.scene_export.cases) == 1, "scene export")
    expect(run.command.argv[run.command.argv.index("--init-model") + 1] == str(start_model.resolve()), "init model")
    run_until(controller, lambda: not controller.training_running, "the fine-tuning run")
    expect(run.state == FINISHED, f"{run.state}: {run.message}")
    expect(run.progress.train_cases == 1 and run.progress.total_steps == 2, f"cases {run.progress.train_cases}")
    info = read_model_info(run.model)
    expect(info.config.init_filters == TINY_MODEL["init_filters"] and "1 cases" in info.training_data,
           f"fine-tuned model: {info.training_data}")


SCENARIOS = {
    f.__name__: f
    for f in (
        bad_input_is_refused,
        absent_device_fails_the_run,
        coreset_report_and_tables,
        scene_export_keeps_geometry,
        train_stop_resume_install,
        dead_process_is_reported,
        train_on_scene_fine_tunes,
    )
}
