"""The CVPR 2025 challenge's 6-step interactive protocol, run in one process (technical notes, section 3).

Per case: step 1 gives one box per class (a case without ``boxes`` skips it and scores 0 there, as
the challenge does); steps 2-6 each give one click per class, from the challenge's click rule
(simulation.next_clicks_for_case) on the previous step's merged prediction. Every step is scored
with the challenge's DSC and NSD (metrics.case_metrics) and timed. When the 6 steps together take
longer than 90 s per class, the case scores 0 (the final test's rule); the measured scores are kept
in the summary beside it.

A *stepper* makes the predictions. `MethodStepper` drives a predictor.Method in this process;
`FileStepper` does what the organisers' evaluator does to a container: it writes the case file with
every prompt so far plus ``prev_pred``, runs a predict command on the folder, and reads ``segs`` back.
Both see exactly the same prompts, so for a deterministic method their numbers agree.

Timing: `MethodStepper` times the method calls only (its model is loaded once per run, and there is
no container start); the image's encoder pass falls in the first step that runs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ENSAMSegmentLib.core.geometry import GeometryError, npz_spacing_to_zyx
from ENSAMSegmentLib.core.imageio import ChallengeCase, ImageReadError, read_challenge_npz, write_challenge_npz
from ENSAMSegmentLib.core.metrics import N_CLICKS, case_metrics, summarize_steps
from .predictor import CaseError, Method, case_prompts
from ENSAMSegmentLib.core.simulation import box_dict_to_3d, next_clicks_for_case

N_STEPS = N_CLICKS + 1  # box, then 5 clicks
TIME_LIMIT_PER_CLASS_S = 90.0


class SkipCase(Exception):
    """A case the protocol cannot run on; the message says why (it goes into the summary)."""


# ----------------------------------------------------------------------------- cases


@dataclass
class EvalCase:
    """A checked case: the file without its ground truth, the ground truth, classes, spacing (z, y, x)."""

    name: str
    case: ChallengeCase  # imgs, spacing, boxes (or None); gts removed, as the organisers' inputs
    gts: np.ndarray
    class_ids: list[int]
    spacing_zyx: tuple[float, float, float]
    notes: list[str] = field(default_factory=list)


def load_eval_case(path) -> EvalCase:
    """Read and check one case file; raises SkipCase with the reason when it cannot be evaluated."""
    path = Path(path)
    try:
        case = read_challenge_npz(path)
    except ImageReadError as error:
        raise SkipCase(str(error)) from None
    if case.gts is None:
        raise SkipCase(f"{path.name} has no 'gts' (ground truth) array to score against")
    gts = np.asarray(case.gts)
    if not np.issubdtype(gts.dtype, np.integer):
        raise SkipCase(f"'gts' must hold integer labels, got {gts.dtype}")
    class_ids = [int(c) for c in np.unique(gts) if c != 0]
    if not class_ids:
        raise SkipCase("'gts' has no labels (every voxel is 0): nothing to segment or score")
    try:
        spacing = npz_spacing_to_zyx(case.spacing)
    except GeometryError as error:
        raise SkipCase(f"bad 'spacing': {error}") from None
    notes = []
    if case.boxes is None:
        notes.append("no 'boxes': step 1 skipped and scored 0, as in the challenge; clicks start from an empty prediction")
    elif len(case.boxes) != len(class_ids):
        raise SkipCase(f"{len(case.boxes)} boxes for {len(class_ids)} labelled classes {class_ids}")
    if class_ids != list(range(1, len(class_ids) + 1)):
        notes.append(f"labels {class_ids} are not 1..{len(class_ids)}: predictions use label i for the i-th class, "
                     "as challenge submissions do, so the scores suffer as they would in the challenge")
    inputs = ChallengeCase(imgs=case.imgs, spacing=case.spacing, boxes=case.boxes, name=case.name)
    try:
        case_prompts(inputs)
    except CaseError as error:
        raise SkipCase(str(error)) from None
    return EvalCase(case.name, inputs, gts, class_ids, spacing, notes)


# ----------------------------------------------------------------------------- steppers


class MethodStepper:
    """A predictor.Method driven in this process, in the order predict_case replays a case file."""

    def __init__(self, method: Method):
        self.method = method
        self.name = method.name

    def start(self, case: ChallengeCase, n_objects: int) -> None:
        self.case, self.n_objects, self.begun = case, n_objects, False

    def step(self, boxes, clicks, clicks_order, prev_pred) -> np.ndarray:
        if not self.begun:
            self.method.begin(self.case.imgs, npz_spacing_to_zyx(self.case.spacing), self.n_objects)
            self.begun = True
        if clicks is None:
            return self.method.box_step([box_dict_to_3d(b) for b in boxes])
        this_round = [None if not order or order[-1] is None else (tuple(c[order[-1]][-1]), order[-1] == "fg")
                      for c, order in zip(clicks, clicks_order)]
        return self.method.click_step(this_round)

    def finish(self) -> None:
        if self.begun:
            self.method.end()

    def describe(self) -> dict:
        return self.method.describe()


class FileStepper:
    """The organisers' way: case file with all prompts so far + prev_pred -> predict(inputs, outputs) -> segs."""

    def __init__(self, name: str, predict: Callable[[Path, Path], None], workdir):
        self.name, self.predict, self.workdir = name, predict, Path(workdir)

    def start(self, case: ChallengeCase, n_objects: int) -> None:
        self.case = case
        self.inputs, self.outputs = self.workdir / "inputs", self.workdir / "outputs"
        for folder in (self.inputs, self.outputs):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)

    def step(self, boxes, clicks, clicks_order, prev_pred) -> np.ndarray:
        name = f"{self.case.name}.npz"
        write_challenge_npz(self.inputs / name, ChallengeCase(
            imgs=self.case.imgs, spacing=self.case.spacing, boxes=boxes,
            clicks=clicks, clicks_order=clicks_order, prev_pred=prev_pred, name=self.case.name))
        (self.outputs / name).unlink(missing_ok=True)
        self.predict(self.inputs, self.outputs)
        if not (self.outputs / name).is_file():
            raise RuntimeError(f"the predict command wrote no {self.outputs / name}")
        with np.load(self.outputs / name) as npz:
            return npz["segs"]

    def finish(self) -> None:
        pass

    def describe(self) -> dict:
        return {"method": self.name, "via": "case files"}


# ----------------------------------------------------------------------------- the protocol


@dataclass
class CaseRun:
    """One case under one method. dsc/nsd: as scored (0 over the time limit); measured_*: as computed."""

    case: str
    method: str
    dsc: list[float]
    nsd: list[float]
    seconds: list[float]
    measured_dsc: list[float]
    measured_nsd: list[float]
    n_classes: int
    over_time_limit: bool = False
    failure: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return summarize_steps(self.dsc, self.nsd)


def _checked_segs(segs, shape) -> np.ndarray:
    segs = np.asarray(segs)
    if segs.shape != tuple(shape):
        raise ValueError(f"prediction has shape {segs.shape}, the image {tuple(shape)}")
    return segs.astype(np.uint8, copy=False)


def run_protocol(ec: EvalCase, stepper, time_limit_per_class: float = TIME_LIMIT_PER_CLASS_S) -> CaseRun:
    """Run the 6 steps of one case through `stepper`; a stepper error scores that step and the rest 0."""
    shape, n_cls = ec.gts.shape, len(ec.class_ids)
    segs = np.zeros(shape, dtype=np.uint8)
    clicks = order = failure = None
    rows = []  # (dsc, nsd, seconds) per step
    stepper.start(ec.case, n_cls)
    try:
        for step in range(1, N_STEPS + 1):
            if (step == 1 and ec.case.boxes is None) or failure is not None:
                rows.append((0.0, 0.0, 0.0))
                continue
            if step > 1:
                clicks, order = next_clicks_for_case(ec.gts, segs, ec.class_ids, clicks, order)
            started = time.perf_counter()
            try:
                segs = _checked_segs(stepper.step(ec.case.boxes, clicks, order, None if step == 1 else segs), shape)
            except Exception as error:  # noqa: BLE001 - recorded; the run goes on with the next case
                failure = f"step {step}: {type(error).__name__}: {error}"
                rows.append((0.0, 0.0, time.perf_counter() - started))
                continue
            seconds = time.perf_counter() - started
            rows.append((*case_metrics(ec.gts, segs, ec.spacing_zyx, ec.class_ids), seconds))
    finally:
        stepper.finish()
    dscs, nsds, seconds = ([r[k] for r in rows] for k in range(3))
    run = CaseRun(ec.name, stepper.name, dscs, nsds, seconds, list(dscs), list(nsds), n_cls,
                  failure=failure, notes=list(ec.notes))
    limit = time_limit_per_class * n_cls
    if sum(seconds) > limit:
        run.over_time_limit = True
        run.dsc, run.nsd = [0.0] * N_STEPS, [0.0] * N_STEPS
        run.notes.append(f"took {sum(seconds):.1f} s, over the limit of {limit:.0f} s "
                         f"({time_limit_per_class:g} s x {n_cls} classes): scored 0, as in the challenge")
    return run


def list_cases(data_dir, max_cases: int | None = None) -> list[Path]:
    """The case files (*.npz) of a folder, sorted by name; the first `max_cases` when given."""
    paths = sorted(p for p in Path(data_dir).glob("*.npz") if not p.name.startswith("."))
    return paths if max_cases is None else paths[:max_cases]


def evaluate(paths, steppers, time_limit_per_class: float = TIME_LIMIT_PER_CLASS_S,
             log: Callable[[str], None] = print) -> tuple[list[CaseRun], list[dict]]:
    """Every case under every stepper. Returns the runs and the skipped cases ({'case', 'reason'})."""
    runs, skipped = [], []
    for path in paths:
        try:
            ec = load_eval_case(path)
        except SkipCase as error:
            skipped.append({"case": Path(path).name, "reason": str(error)})
            log(f"{Path(path).name}: skipped: {error}")
            continue
        for stepper in steppers:
            run = run_protocol(ec, stepper, time_limit_per_class)
            runs.append(run)
            result = run.summary()
            log(f"{ec.name} [{run.method}] DSC {' '.join(f'{v:.3f}' for v in run.dsc)} | "
                f"DSC_AUC {result['DSC_AUC']:.3f} NSD_AUC {result['NSD_AUC']:.3f} | {sum(run.seconds):.2f} s"
                + (f" | FAILED {run.failure}" if run.failure else "")
                + (" | OVER TIME LIMIT: scored 0" if run.over_time_limit else ""))
    return runs, skipped
