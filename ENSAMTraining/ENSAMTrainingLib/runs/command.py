"""Command lines of `ensam train` and `ensam coreset` run by Slicer's Python, and the checks before.

Inside Slicer the child runs ``python-real -m ENSAMSegmentLib.cli.main ...``: Slicer's real interpreter
(where torch and MONAI are installed), not the PythonSlicer launcher, whose child would be out of reach
of Stop (ENSAMSegmentLib/core/interpreter.py); elsewhere ``sys.executable``. The extension's Lib packages
are not on that interpreter's path by default (Slicer adds its module folders to sys.path of the
application only), so the child's PYTHONPATH starts with the folders that hold ENSAMSegmentLib and
ENSAMTrainingLib.

A training run writes its progress events to RUN_DIR/progress.jsonl (``--progress-json``) and its
stdout and stderr to RUN_DIR/train.log: files, so that reading them never blocks, a pipe never
fills up, and a resumed run appends to the same history.

Checks made here before anything starts, each raising `SetupError` with a message for the user:
`check_data_folder` (missing, unreadable, empty, nothing labelled), `check_device` (a device name
`ensam train` does not know), `coreset_problem` (a coreset that leaves a dataset without a case).
None of them imports torch (Start in Slicer's GUI process would freeze it for seconds while torch
loads): whether the machine has the device, the run itself says at once (core/runsetup.pick_device).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ENSAMSegmentLib.core.interpreter import child_environment as interpreter_child_environment
from ENSAMSegmentLib.core.interpreter import package_folders as interpreter_package_folders
from ENSAMSegmentLib.core.interpreter import python_interpreter

DEFAULT_VOXEL_BUDGET = 4_194_304  # = ENSAMTrainingLib.core.data.DEFAULT_VOXEL_BUDGET (that module imports torch)
DEFAULT_EPOCHS = 15  # = TrainConfig.epochs
DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # the names core/runsetup.pick_device takes
CLI_MODULE = "ENSAMSegmentLib.cli.main"
PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "train.log"


class SetupError(Exception):
    """Input that cannot start a run; the message says what to change."""


# ---------------------------------------------------------------------------- interpreter


def python_executable() -> str:
    """The interpreter the children run on: python-real inside Slicer (core/interpreter.py), else sys.executable."""
    return python_interpreter()


def package_folders() -> list[str]:
    """The folders holding ENSAMSegmentLib and ENSAMTrainingLib (their parents), without duplicates."""
    return interpreter_package_folders(("ENSAMSegmentLib", "ENSAMTrainingLib"))


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with PYTHONPATH starting with `package_folders` and unbuffered output."""
    return interpreter_child_environment(base, package_folders())


def _flags(options: dict[str, object]) -> list[str]:
    """{"workers": 0, "no-augment": True, "model-config": {...}} -> ["--workers", "0", "--no-augment", ...].

    True: the flag alone; False or None: left out; dicts and lists: JSON.
    """
    out: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        out.append(f"--{name}")
        if value is True:
            continue
        out.append(json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value))
    return out


# ---------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """What the module asks of one training run (the main flags of `ensam train`).

    ``options``: further flags by name without the dashes, e.g. {"workers": 0, "no-augment": True}.
    """

    data: Path
    run_dir: Path
    cases: Path | None = None  # case list (a coreset); None: every case under data
    epochs: int = DEFAULT_EPOCHS
    voxel_budget: int = DEFAULT_VOXEL_BUDGET
    device: str = "auto"
    init_model: Path | None = None  # fine-tune this model file instead of training a new model
    options: dict[str, object] = field(default_factory=dict)


@dataclass
class TrainCommand:
    """A training command line and where its run writes."""

    argv: list[str]
    env: dict[str, str]
    run_dir: Path
    resume: bool = False

    @property
    def progress_path(self) -> Path:
        return self.run_dir / PROGRESS_FILE

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE


def _train_argv(python: str | None, run_dir: Path) -> list[str]:
    return [python or python_executable(), "-m", CLI_MODULE, "train", "--out", str(run_dir),
            "--progress-json", str(run_dir / PROGRESS_FILE), "--no-progress-bar"]


def train_command(settings: TrainSettings, python: str | None = None) -> TrainCommand:
    """The command line of a new run (absolute paths: the child may start elsewhere)."""
    if int(settings.epochs) < 1:
        raise SetupError(f"epochs must be at least 1, got {settings.epochs}")
    if int(settings.voxel_budget) < 512:
        raise SetupError(f"the voxel budget must be at least 512 voxels (8 x 8 x 8), got {settings.voxel_budget}")
    run_dir = Path(settings.run_dir).resolve()
    argv = _train_argv(python, run_dir) + [
        "--data", str(Path(settings.data).resolve()),
        "--epochs", str(int(settings.epochs)),
        "--voxel-budget", str(int(settings.voxel_budget)),
        "--device", settings.device or "auto",
    ]
    if settings.cases is not None:
        argv += ["--cases", str(Path(settings.cases).resolve())]
    if settings.init_model is not None:
        argv += ["--init-model", str(Path(settings.init_model).resolve())]
    return TrainCommand(argv + _flags(settings.options), child_environment(), run_dir)


def resume_command(run_dir: Path, python: str | None = None, device: str | None = None,
                   options: dict[str, object] | None = None) -> TrainCommand:
    """The command line continuing ``run_dir`` from its checkpoint (its own settings are kept;
    ``device`` and ``options`` such as "epochs" or "workers" may change, see RESUME_OVERRIDES)."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "checkpoint.pt").is_file():
        raise SetupError(f"nothing to resume in {run_dir}: it has no checkpoint.pt")
    argv = _train_argv(python, run_dir) + ["--resume"]
    if device:
        argv += ["--device", device]
    return TrainCommand(argv + _flags(options or {}), child_environment(), run_dir, resume=True)


# ---------------------------------------------------------------------------- coreset


@dataclass
class CoresetCommand:
    argv: list[str]
    env: dict[str, str]
    list_path: Path

    @property
    def report_path(self) -> Path:
        """Where `ensam coreset` writes its JSON report by default (coreset.write_coreset)."""
        return self.list_path.with_name(self.list_path.stem + ".report.json")

    @property
    def log_path(self) -> Path:
        return self.list_path.with_name(self.list_path.stem + ".log")


def parse_exclude(text: str) -> list[str]:
    """'CT_Abdomen, MR/*' -> ['CT_Abdomen', 'MR/*'] (commas or spaces separate names)."""
    return [name for name in text.replace(",", " ").split() if name]


def coreset_command(data: Path, list_path: Path, fraction: float = 0.1, max_cases: int | None = None,
                    exclude: list[str] | tuple[str, ...] = (), seed: int = 0,
                    python: str | None = None) -> CoresetCommand:
    """The `ensam coreset` command line writing ``list_path`` and its report beside it."""
    if not 0 < float(fraction) <= 1:
        raise SetupError(f"the coreset fraction must be above 0 and at most 1, got {fraction}")
    if max_cases is not None and int(max_cases) < 1:
        raise SetupError(f"the maximum number of cases must be at least 1, got {max_cases}")
    list_path = Path(list_path).resolve()
    argv = [python or python_executable(), "-m", CLI_MODULE, "coreset", "--data", str(Path(data).resolve()),
            "--fraction", repr(float(fraction)), "--seed", str(int(seed)), "-o", str(list_path)]
    if max_cases is not None:
        argv += ["--max", str(int(max_cases))]
    if exclude:
        argv += ["--exclude", *exclude]
    return CoresetCommand(argv, child_environment(), list_path)


def coreset_problem(report: dict) -> str:
    """Why a coreset report cannot be trained on as it is ("" when it can).

    A coreset smaller than one case per dataset leaves datasets out: the challenge's coreset
    takes every dataset (exclude one on purpose instead).
    """
    rows = [r for r in report.get("datasets", []) if not r.get("excluded")]
    if not rows or report.get("selected", 0) < 1:
        return "the coreset is empty: no usable case was selected"
    left_out = [r["dataset"] for r in rows if r.get("selected", 0) == 0 and r.get("found", 0) > 0]
    if left_out and report.get("target", 0) < len(rows):
        return (f"the coreset ({report.get('target')} cases) is smaller than one case per dataset "
                f"({len(rows)} datasets; none from {', '.join(left_out[:5])}"
                f"{', ...' if len(left_out) > 5 else ''}): raise the fraction or the maximum, "
                "or exclude datasets")
    return ""


# ---------------------------------------------------------------------------- checks


@dataclass
class DataSummary:
    """What a data folder holds: cases per dataset, and how many lack labels (image/label pairs)."""

    folder: Path
    datasets: dict[str, int]
    unlabelled: int

    @property
    def cases(self) -> int:
        return sum(self.datasets.values())

    def describe(self) -> str:
        text = f"{self.cases} cases in {len(self.datasets)} dataset(s)"
        return text + (f", {self.unlabelled} without a label file" if self.unlabelled else "")


QUICK_LOOK_ENTRIES = 20_000  # describe_data_folder looks at most at this many files and folders


def too_many_entries(folder: Path, limit: int) -> bool:
    """True when the tree under `folder` holds more than `limit` files and folders (stops counting there)."""
    seen = 0
    for _root, dirs, files in os.walk(folder):
        seen += len(dirs) + len(files)
        if seen > limit:
            return True
    return False


def describe_data_folder(folder) -> str:
    """One line for the data-folder field while the user types: what it holds (check_data_folder), or
    why it cannot be trained on; a tree too large to walk at once (a typed "/", a whole disk) is not
    walked (the cases are counted when training starts, in its own process)."""
    try:
        if folder and Path(folder).expanduser().is_dir() and too_many_entries(Path(folder).expanduser(), QUICK_LOOK_ENTRIES):
            return f"more than {QUICK_LOOK_ENTRIES:,} files and folders under {folder}: its cases are counted at Start"
        return check_data_folder(folder).describe()
    except SetupError as error:
        return str(error)


def check_data_folder(folder) -> DataSummary:
    """Cases under ``folder`` (core/cases.find_cases); SetupError when there is nothing to train on."""
    from ENSAMTrainingLib.core.cases import DataError, find_cases

    if folder is None or not str(folder).strip() or str(folder) == ".":
        raise SetupError("choose the folder with the training data first")
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise SetupError(f"the data folder {folder} does not exist")
    if not folder.is_dir():
        raise SetupError(f"{folder} is a file, not a folder")
    try:
        next(folder.iterdir(), None)
    except OSError as error:
        raise SetupError(f"cannot read the data folder {folder}: {error.strerror or error}") from None
    try:
        cases = find_cases(folder)
    except DataError as error:
        raise SetupError(str(error)) from None
    except OSError as error:
        raise SetupError(f"cannot read the data folder {folder}: {error}") from None
    if not cases:
        raise SetupError(f"no training cases in {folder}: expected challenge .npz files "
                         "(<Modality>/<Dataset>/<case>.npz) or image/label pairs")
    unlabelled = sum(1 for c in cases if c.kind == "pair" and c.label is None)
    if unlabelled == len(cases):
        raise SetupError(f"no labelled cases in {folder}: {len(cases)} images but no label files "
                         "(name them <case>_seg.nii.gz, or use imagesTr/labelsTr folders)")
    datasets: dict[str, int] = {}
    for case in cases:
        datasets[case.dataset] = datasets.get(case.dataset, 0) + 1
    return DataSummary(folder, datasets, unlabelled)


def check_device(name: str) -> str:
    """``name`` ("auto" when empty) when `ensam train` knows the device name; SetupError otherwise.

    Only the name: whether this machine has that device is decided by the training process
    (core/runsetup.pick_device), which ends at once, failed, with the reason ("device 'cuda:1' asked
    for, but ..."). Asking torch here would import it in Slicer's GUI process.
    """
    name = (name or "auto").strip()
    if not DEVICE_NAME.fullmatch(name):
        raise SetupError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return name


__all__ = [
    "CoresetCommand",
    "DataSummary",
    "SetupError",
    "TrainCommand",
    "TrainSettings",
    "check_data_folder",
    "describe_data_folder",
    "check_device",
    "child_environment",
    "coreset_command",
    "coreset_problem",
    "parse_exclude",
    "python_executable",
    "resume_command",
    "train_command",
]
