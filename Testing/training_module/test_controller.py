"""TrainingController paths the scenarios do not take: a child that cannot start, a coreset run that
leaves no readable report (neither may leave the controller busy); Start imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ENSAMTrainingLib.runs.command import SetupError
from ENSAMTrainingLib.mrml.controller import TrainingController
from ENSAMTrainingLib.runs.process import wait_until
from ENSAMTrainingLib.mrml.scenarios import settings


def test_a_child_that_cannot_start_is_a_message_not_a_busy_controller(scene, tmp_path, tiny_data):
    controller = TrainingController(scene, python=str(tmp_path / "no-such-python"))
    with pytest.raises(SetupError, match="cannot start"):
        controller.start_coreset(tiny_data, tmp_path / "out")
    with pytest.raises(SetupError, match="cannot start"):
        controller.start_training(settings(tiny_data, tmp_path))
    assert not controller.busy and controller.coreset is None and controller.training is None


def test_a_coreset_run_without_a_readable_report_fails_clearly(scene, tmp_path, tiny_data):
    """A child that exits 0 but leaves a broken report (a script standing in for `ensam coreset`)."""
    from ENSAMTrainingLib.mrml.controller import CoresetSelection
    from ENSAMTrainingLib.runs.process import BackgroundCommand

    list_path = tmp_path / "sel" / "cases.txt"
    report = list_path.with_name("cases.report.json")
    code = f"import pathlib; pathlib.Path({str(report)!r}).write_text('{{not json')"
    job = BackgroundCommand([sys.executable, "-c", code], tmp_path / "sel" / "cases.log")
    job.start()
    controller = TrainingController(scene)
    controller.coreset = CoresetSelection(tiny_data, tmp_path / "sel", job, list_path, report)
    assert wait_until(lambda: not controller.busy, 60, poll=controller.poll)
    assert controller.coreset.report is None and "cannot read the coreset report" in controller.coreset.error
    assert controller.message.startswith("Coreset selection failed: cannot read the coreset report")
    assert not controller.coreset.usable


def test_start_imports_no_torch(tmp_path, tiny_data):
    """Start in the module (TrainingController.start_training: the checks, the command line, the child
    process, the first poll) imports neither torch nor MONAI in Slicer's process: importing torch on the
    GUI thread froze Slicer for seconds at the first Start. The child imports it."""
    code = f"""
import sys
from pathlib import Path
from ENSAMSegmentLib.mrml.scene import new_scene
from ENSAMTrainingLib.mrml.controller import TrainingController
from ENSAMTrainingLib.runs.command import TrainSettings

controller = TrainingController(new_scene().scene, models_folder=Path({str(tmp_path / "models")!r}))
settings = TrainSettings(Path({str(tiny_data)!r}), Path({str(tmp_path / "run")!r}), epochs=1, voxel_budget=4096,
                         device="auto", options={{"workers": 0}})
run = controller.start_training(settings)
controller.poll()
loaded = sorted({{"torch", "monai"}} & set(sys.modules))
started = run.pid is not None
run.kill()
print(loaded, started)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "[] True", result.stdout + result.stderr
