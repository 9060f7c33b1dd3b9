"""TrainingController: the ENSAMTraining module's workflow, without Qt (the widget calls it and polls).

    start_coreset(...)  -> `ensam coreset` in a child process; when done: report, tables, problem
    start_training(...) -> `ensam train` in a child process (checked first: data, device name, model, coreset;
                           torch is imported only to check a model to fine-tune: a device the
                           machine lacks fails the run itself, at once)
    train_on_scene(...) -> export the scene's segmentations (sceneexport), then fine-tune on them
    request_stop()      -> the run checkpoints and exits; resume() continues it (never waits; poll() says when)
    poll()              -> reads the children's output, updates the table and plot nodes; never blocks
    install_model(...)  -> the finished model into the folder ENSAMSegment lists

Everything that cannot start raises `SetupError` (or SceneExportError / ModelInstallError) with a
message for the user and starts nothing; a child that fails leaves its state and ``message``.
One job at a time: a coreset selection or a training run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ENSAMTrainingLib.runs import folders
from ENSAMTrainingLib.runs.command import (
    SetupError,
    TrainSettings,
    check_data_folder,
    check_device,
    coreset_command,
    coreset_problem,
    resume_command,
    train_command,
)
from ENSAMTrainingLib.runs.process import BackgroundCommand, TrainingProcess, describe_exit
from ENSAMTrainingLib.runs.progressparser import FINISHED

from .models import ModelInstallError, check_model_file, install_model
from .mrmlviews import ProgressViews, coreset_tables
from .sceneexport import SceneExportError

# What a refused action raises: its message is for the user (the widget shows it, nothing started).
USER_ERRORS = (SetupError, SceneExportError, ModelInstallError)


class CoresetSelection:
    """One `ensam coreset` run and, once it is done, its case list and report."""

    def __init__(self, data: Path, folder: Path, job: BackgroundCommand, list_path: Path, report_path: Path):
        self.data, self.folder, self.job = Path(data), Path(folder), job
        self.list_path, self.report_path = list_path, report_path
        self.report: dict | None = None
        self.problem = ""  # why it cannot be trained on ("" when it can)
        self.error = ""  # why the selection failed

    @property
    def usable(self) -> bool:
        return self.report is not None and not self.problem


class TrainingController:
    """See the module docstring. ``models_folder``: where install_model puts models (default ~/.ensam/models)."""

    def __init__(self, scene, models_folder: Path | None = None, python: str | None = None):
        self.scene = scene
        self.models_folder = models_folder
        self.python = python
        self.views = ProgressViews(scene)
        self.coreset: CoresetSelection | None = None
        self.training: TrainingProcess | None = None
        self.scene_export = None  # the last SceneExport of train_on_scene
        self.message = ""
        self._events_shown = -1

    # -- state ----------------------------------------------------------------------------------

    @property
    def coreset_running(self) -> bool:
        return self.coreset is not None and self.coreset.report is None and not self.coreset.error

    @property
    def training_running(self) -> bool:
        """True from start until the child has ended and its verdict is made."""
        return self.training is not None and not self.training.decided

    @property
    def busy(self) -> bool:
        return self.coreset_running or self.training_running

    @property
    def finished_model(self) -> Path | None:
        """The model of the last run, when it finished with a complete model file."""
        t = self.training
        return t.model if t is not None and t.state == FINISHED else None

    def _check_idle(self) -> None:
        if self.training_running:
            raise SetupError("a training run is in progress: stop it first")
        if self.coreset_running:
            raise SetupError("a coreset selection is in progress: wait for it to finish")

    # -- coreset --------------------------------------------------------------------------------

    def start_coreset(self, data, output, fraction: float = 0.1, max_cases: int | None = None,
                      exclude: list[str] | tuple[str, ...] = (), seed: int = 0) -> CoresetSelection:
        """Select a coreset of ``data`` into a new folder under ``output`` (in a child process)."""
        self._check_idle()
        summary = check_data_folder(data)
        folder = folders.new_folder(_output(output), "coreset")
        command = coreset_command(summary.folder, folder / "cases.txt", fraction, max_cases, list(exclude), seed,
                                  python=self.python)
        job = BackgroundCommand(command.argv, command.log_path, command.env)
        _start_child(job)
        self.coreset = CoresetSelection(summary.folder, folder, job, command.list_path, command.report_path)
        self.message = f"Selecting a coreset of {summary.describe()}..."
        return self.coreset

    def _finish_coreset(self) -> None:
        selection, job = self.coreset, self.coreset.job
        report = None
        if job.returncode == 0:
            try:
                report = json.loads(selection.report_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                job.log_lines.append(f"error: cannot read the coreset report {selection.report_path}: {error}")
        if report is not None:
            selection.report = report
            selection.problem = coreset_problem(selection.report)
            coreset_tables(self.scene, selection.report)
            r = selection.report
            self.message = (f"Coreset: {r['selected']} of {r['found']} cases, {len(r['skipped'])} skipped"
                            + (f". Cannot train on it: {selection.problem}" if selection.problem else "."))
        else:
            last = job.last_log_line()
            selection.error = last.split("error: ", 1)[-1] if "error: " in last else (
                f"the coreset selection {describe_exit(job.returncode)}" + (f": {last}" if last else ""))
            self.message = f"Coreset selection failed: {selection.error}"

    def clear_coreset(self) -> None:
        """Train on every case again (forget the selected coreset)."""
        if self.coreset_running:
            self.coreset.job.kill()
        self.coreset = None

    # -- training -------------------------------------------------------------------------------

    def start_training(self, settings: TrainSettings) -> TrainingProcess:
        """Check the settings, then start `ensam train` (a new run folder: settings.run_dir)."""
        self._check_idle()
        check_data_folder(settings.data)
        check_device(settings.device)
        if settings.init_model is not None:
            _check_start_model(settings.init_model)
        if settings.cases is not None and self.coreset is not None and settings.cases == self.coreset.list_path:
            if not self.coreset.usable:
                raise SetupError(f"cannot train on this coreset: {self.coreset.problem or self.coreset.error}")
        _check_not_in_use(settings.run_dir)
        if folders.run_status(settings.run_dir) != folders.EMPTY:
            raise SetupError(f"{settings.run_dir} already holds a run: resume it, or start a new one")
        return self._start(train_command(settings, python=self.python))

    def resume(self, run_dir=None, device: str | None = None, options: dict | None = None) -> TrainingProcess:
        """Continue ``run_dir`` (default: the last run) from its checkpoint."""
        self._check_idle()
        if run_dir is None:
            if self.training is None:
                raise SetupError("no run to resume: choose its folder")
            run_dir = self.training.command.run_dir
        _check_not_in_use(run_dir)
        if folders.run_status(run_dir) == folders.FINISHED:
            raise SetupError(f"the run in {run_dir} has finished already")
        if device:
            check_device(device)
        return self._start(resume_command(Path(run_dir), python=self.python, device=device, options=options))

    def _start(self, command) -> TrainingProcess:
        process = TrainingProcess(command)
        _start_child(process)
        self.training = process
        self.views.clear()
        self._events_shown = -1
        self.message = process.message
        return self.training

    def train_on_scene(self, output, init_model, epochs: int = 3, device: str = "auto",
                       voxel_budget: int | None = None, options: dict | None = None, dataset: str = "Scene",
                       modality: str = "auto", pairs=None) -> TrainingProcess:
        """Export the scene's segmentations to a new folder under ``output`` and fine-tune ``init_model`` on them."""
        from ENSAMTrainingLib.runs.command import DEFAULT_VOXEL_BUDGET

        from .sceneexport import export_scene

        self._check_idle()
        if init_model is None:
            raise SetupError("choose the model to fine-tune")
        _check_start_model(init_model)
        check_device(device)
        output = _output(output)
        self.scene_export = export_scene(self.scene, folders.new_folder(output, "scene"), dataset, modality, pairs=pairs)
        settings = TrainSettings(self.scene_export.folder, folders.new_folder(output, "run"), epochs=epochs,
                                 voxel_budget=voxel_budget or DEFAULT_VOXEL_BUDGET, device=device,
                                 init_model=Path(init_model), options=dict(options or {}))
        return self.start_training(settings)

    def request_stop(self) -> None:
        """Ask the run to checkpoint and stop (a second call stops it at once)."""
        if self.training_running:
            self.training.request_stop()
            self.message = self.training.message

    def stop_and_wait(self, timeout: float = 120.0) -> bool:
        """Stop the run (checkpoint) and wait for it; for closing Slicer. True when nothing is left running."""
        if self.coreset_running:
            self.coreset.job.kill()
            self.poll()
        if self.training_running:
            self.training.stop(timeout)
            self.poll()
        return not self.busy

    # -- polling --------------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """New log lines of the running child; updates state, message and the MRML views. Never blocks."""
        lines: list[str] = []
        if self.coreset_running:
            ended = not self.coreset.job.running
            lines += self.coreset.job.poll()
            if ended:
                self._finish_coreset()
        if self.training is not None and (self.training_running or self._events_shown != self.training.events):
            lines += self.training.poll()
            if self.training.events != self._events_shown:
                self.views.update(self.training.progress)
                self._events_shown = self.training.events
            self.message = self.training.message
        return lines

    # -- the model ------------------------------------------------------------------------------

    def install_model(self, name: str | None = None) -> Path:
        """Install the finished run's model where ENSAMSegment lists models; returns its path."""
        if self.finished_model is None:
            raise SetupError("no finished training run with a model to install")
        path = install_model(self.finished_model, name, self.models_folder)
        self.message = f"Installed {path.name}: ENSAM Segment offers it as '{path.stem}'."
        return path


def _check_not_in_use(run_dir) -> None:
    """SetupError while a training process (of this Slicer, an earlier one, or a terminal) holds the folder."""
    from ENSAMTrainingLib.core.runlock import holder

    info = holder(run_dir)
    if info is not None:
        raise SetupError(f"{run_dir} is in use by a training process that is still running ({info.describe()}): "
                         "wait until it has stopped (Stop asks it to), then Resume")


def _check_start_model(path) -> None:
    try:
        check_model_file(path)
    except ModelInstallError as error:
        raise SetupError(f"cannot fine-tune this model: {error}") from None


def _start_child(job: BackgroundCommand) -> None:
    try:
        job.start()
    except OSError as error:  # no interpreter, or the output folder cannot be written
        raise SetupError(f"cannot start {' '.join(job.argv[:4])}: {error}") from None


def _output(output) -> Path:
    if output is None or not str(output).strip() or str(output) == ".":
        raise SetupError("choose an output folder for the runs first")
    return Path(output).expanduser()


__all__ = ["USER_ERRORS", "CoresetSelection", "TrainingController"]
