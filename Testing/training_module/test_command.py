"""Command lines for Slicer's Python, the checks before a run starts, run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ENSAMTrainingLib.runs import command, folders
from ENSAMTrainingLib.runs.command import SetupError, TrainSettings


def test_constants_agree_with_the_training_code():
    from ENSAMTrainingLib.core import trainer
    from ENSAMTrainingLib.core.data import DEFAULT_VOXEL_BUDGET
    from ENSAMTrainingLib.runs import process

    assert command.DEFAULT_VOXEL_BUDGET == DEFAULT_VOXEL_BUDGET
    assert command.DEFAULT_EPOCHS == trainer.TrainConfig.epochs
    assert process.EXIT_INTERRUPTED == trainer.EXIT_INTERRUPTED


def test_train_command_parses_as_ensam_train(tmp_path):
    """The argv is one `ensam train` accepts, with absolute paths and the module's fixed flags."""
    from ENSAMSegmentLib.cli.main import build_parser

    settings = TrainSettings(data=Path("data"), run_dir=tmp_path / "run", cases=Path("cases.txt"), epochs=3,
                             voxel_budget=65536, device="cpu", init_model=Path("start.pt"),
                             options={"workers": 0, "no-augment": True, "model-config": {"heads": 2}, "seed": None})
    cmd = command.train_command(settings, python="PY")
    assert cmd.argv[:4] == ["PY", "-m", "ENSAMSegmentLib.cli.main", "train"]
    args = build_parser().parse_args(cmd.argv[3:])
    assert args.out == str(tmp_path / "run") and args.data == str(Path("data").resolve())
    assert args.cases == str(Path("cases.txt").resolve()) and args.init_model == str(Path("start.pt").resolve())
    assert (args.epochs, args.voxel_budget, args.device, args.workers) == (3, 65536, "cpu", 0)
    assert args.augment is False and args.progress_bar is False and args.model_config == {"heads": 2}
    assert args.seed is None and not args.resume
    assert args.progress_json == str(cmd.progress_path) and cmd.progress_path == tmp_path / "run" / "progress.jsonl"
    assert cmd.log_path == tmp_path / "run" / "train.log" and not cmd.resume


def test_resume_command(tmp_path):
    from ENSAMSegmentLib.cli.main import build_parser

    with pytest.raises(SetupError, match="no checkpoint.pt"):
        command.resume_command(tmp_path, python="PY")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    cmd = command.resume_command(tmp_path, python="PY", device="cuda", options={"epochs": 20})
    args = build_parser().parse_args(cmd.argv[3:])
    assert args.resume and args.out == str(tmp_path) and args.device == "cuda" and args.epochs == 20
    assert cmd.resume and args.progress_json == str(tmp_path / "progress.jsonl")


def test_bad_numbers_are_refused(tmp_path):
    with pytest.raises(SetupError, match="epochs"):
        command.train_command(TrainSettings(Path("d"), tmp_path, epochs=0))
    with pytest.raises(SetupError, match="voxel budget"):
        command.train_command(TrainSettings(Path("d"), tmp_path, voxel_budget=100))
    with pytest.raises(SetupError, match="fraction"):
        command.coreset_command(Path("d"), tmp_path / "c.txt", fraction=0)
    with pytest.raises(SetupError, match="maximum"):
        command.coreset_command(Path("d"), tmp_path / "c.txt", max_cases=0)


def test_coreset_command(tmp_path):
    from ENSAMSegmentLib.cli.main import build_parser

    cmd = command.coreset_command(Path("d"), tmp_path / "sel" / "cases.txt", 0.25, 40, ["CT_*", "MR/Brain"], python="PY")
    args = build_parser().parse_args(cmd.argv[3:])
    assert (args.fraction, args.max_cases, args.exclude, args.output) == (0.25, 40, ["CT_*", "MR/Brain"], str(cmd.list_path))
    assert cmd.report_path == tmp_path / "sel" / "cases.report.json" and cmd.log_path == tmp_path / "sel" / "cases.log"
    assert command.parse_exclude(" CT_Liver, MR/*  US,, ") == ["CT_Liver", "MR/*", "US"]


def test_child_environment_finds_the_packages_without_site_packages():
    """PythonSlicer does not see the extension's module folders: PYTHONPATH must carry them."""
    env = command.child_environment({"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == "/elsewhere" and env["PYTHONUNBUFFERED"] == "1"
    code = ("import ENSAMTrainingLib.runs.progressparser as p, ENSAMSegmentLib as s; "
            "print(p.__file__); print(s.__file__)")
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True)  # -S: no .pth
    assert result.returncode == 0, result.stderr
    files = result.stdout.split()
    assert files[0].endswith(str(Path("ENSAMTraining/ENSAMTrainingLib/runs/progressparser.py")))
    assert files[1].endswith(str(Path("ENSAMSegment/ENSAMSegmentLib/__init__.py")))
    assert command.python_executable() == sys.executable  # outside Slicer (no slicer.app)


def test_coreset_problem():
    def report(selected, target, excluded=()):
        return {"selected": sum(selected.values()), "target": target,
                "datasets": [{"dataset": d, "found": 3, "selected": n, "excluded": d in excluded} for d, n in selected.items()]}

    assert command.coreset_problem(report({"A": 1, "B": 1}, 2)) == ""
    problem = command.coreset_problem(report({"A": 1, "B": 0, "C": 0}, 1))
    assert "smaller than one case per dataset (3 datasets; none from B, C)" in problem
    assert command.coreset_problem(report({"A": 1, "B": 0}, 1, excluded={"B"})) == ""  # left out on purpose
    assert "empty" in command.coreset_problem(report({"A": 0}, 1))
    assert command.coreset_problem(report({"A": 2, "B": 0}, 4)) == ""  # B had no usable case: not a size problem


def test_check_data_folder(tmp_path, tiny_data):
    summary = command.check_data_folder(tiny_data)
    assert summary.cases == 2 and summary.unlabelled == 0 and summary.describe() == "2 cases in 2 dataset(s)"
    assert summary.datasets == {"CT_Phantom": 1, "MR_Phantom": 1}
    for bad, message in [(None, "choose the folder"), ("", "choose the folder"), (Path("."), "choose the folder"),
                         (tmp_path / "missing", "does not exist"), (tiny_data / "CT_Phantom_0000.npz", "is a file")]:
        with pytest.raises(SetupError, match=message):
            command.check_data_folder(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match="no training cases"):
        command.check_data_folder(tmp_path / "empty")


def test_check_device_checks_only_the_name():
    """Start checks the device's name without torch (importing it froze Slicer's GUI for seconds); whether
    the machine has the device, the run says (scenario absent_device_fails_the_run)."""
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:99", "mps"):
        assert command.check_device(name) == name
    assert command.check_device("") == "auto" and command.check_device(" cpu ") == "cpu"
    for bad in ("tpu", "gpu", "cuda:", "cuda:x", "CPU", "cpu cuda"):
        with pytest.raises(SetupError, match="unknown device"):
            command.check_device(bad)


def test_device_names_agree_with_the_trainer():
    """Every name check_device passes is one pick_device knows (it may lack the device, not the name);
    every name it refuses, pick_device refuses too."""
    from ENSAMTrainingLib.core.runsetup import TrainingError, pick_device

    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:99", "mps"):
        try:
            pick_device(name)
        except TrainingError as error:
            assert "unknown device" not in str(error) and name in str(error), error
    for name in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(TrainingError, match="unknown device"):
            pick_device(name)


def test_run_folders(tmp_path):
    first = folders.new_folder(tmp_path, "run", now=0)
    assert first.parent == tmp_path and first.name == "run-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(0))
    first.mkdir()
    second = folders.new_folder(tmp_path, "run", now=0)
    assert second.name == first.name + "-2" and not second.exists()
    assert folders.run_status(first) == folders.EMPTY and folders.latest_resumable(tmp_path) is None
    second.mkdir()
    (first / "checkpoint.pt").write_bytes(b"")
    (second / "checkpoint.pt").write_bytes(b"")
    os.utime(first / "checkpoint.pt", (1, 1))
    assert folders.run_status(second) == folders.RESUMABLE and folders.latest_resumable(tmp_path) == second
    (second / "model.pt").write_bytes(b"")
    assert folders.run_status(second) == folders.FINISHED and folders.latest_resumable(tmp_path) == first
    assert folders.latest_resumable(tmp_path / "missing") is None


def test_flags_are_json_for_structures():
    assert command._flags({"a": 1, "b": True, "c": False, "d": None, "e": [1, 2], "f": {"x": 1}}) == [
        "--a", "1", "--b", "--e", json.dumps([1, 2]), "--f", json.dumps({"x": 1})]


def test_describing_a_huge_tree_does_not_walk_it(tmp_path, monkeypatch):
    folder = tmp_path / "tree"
    for i in range(30):
        (folder / f"d{i}").mkdir(parents=True)
        (folder / f"d{i}" / "x.txt").write_text("")
    monkeypatch.setattr(command, "QUICK_LOOK_ENTRIES", 40)
    text = command.describe_data_folder(folder)
    assert text.startswith("more than 40 files and folders under") and "counted at Start" in text
    monkeypatch.setattr(command, "QUICK_LOOK_ENTRIES", 1000)
    assert command.describe_data_folder(folder).startswith("no training cases in")  # small: walked
    assert "does not exist" in command.describe_data_folder(tmp_path / "missing")
