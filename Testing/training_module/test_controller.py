"""TrainingController paths the scenarios do not take: a child that cannot start, a coreset run that
leaves no readable report. Neither may leave the controller busy."""

from __future__ import annotations

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
