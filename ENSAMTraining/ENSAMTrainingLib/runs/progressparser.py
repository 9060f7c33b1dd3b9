"""`ensam train`'s progress stream (JSON lines, ENSAMTrainingLib.core.progress) -> `TrainingProgress`.

    text chunks --ProgressParser.feed--> complete lines --parse--> events --apply--> TrainingProgress

The parser is incremental: ``feed`` takes whatever was read (any chunk boundaries) and keeps an
unfinished last line until its newline arrives; ``finish`` ends the stream. Robustness:

- a line that does not parse is skipped and counted (``bad_lines``); a killed process can leave
  its last line truncated, and a resumed run then appends its first event to that same line:
  the event is recovered from the line's last ``{"event"`` (``recovered_lines``);
- unknown events and unknown fields are ignored (the stream may grow);
- a resumed run ("start" with resumed true) continues the history: steps after the checkpoint it
  resumes from (done again now) and epochs from that epoch on are dropped first;
- an "error" event makes the state "failed" with its message.

TrainingProgress is the data model the views draw: ``steps`` (loss per optimizer step) for the
loss chart, ``epochs`` (train loss and validation metrics per epoch) for the metrics table,
and the numbers of the progress bar (step / total_steps, epoch, eta_s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ENSAMTrainingLib.core.progress import parse_event

# States of a run as the stream tells them (the process adds "stopping" and exit codes).
WAITING, RUNNING, FINISHED, INTERRUPTED, STOPPED, FAILED = (
    "waiting", "running", "finished", "interrupted", "stopped", "failed")
VAL_METRICS = ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd")
EVENT_MARK = '{"event"'


@dataclass
class StepPoint:
    """One optimizer step: ``step`` counts steps over all epochs (1 = the first)."""

    step: int
    epoch: int  # 0-based
    loss: float | None
    lr: float | None = None
    samples_per_s: float | None = None


@dataclass
class EpochRow:
    """One finished epoch: its mean training loss and, with a validation set, its metrics."""

    epoch: int  # 0-based
    step: int
    train_loss: float | None
    val: dict | None = None  # dsc_auc, nsd_auc, final_dsc, final_nsd, dsc [...], nsd [...], cases

    def metric(self, name: str) -> float | None:
        value = (self.val or {}).get(name)
        return float(value) if isinstance(value, (int, float)) else None


@dataclass
class TrainingProgress:
    """Everything the stream said so far about one run (all runs of it, when resumed)."""

    state: str = WAITING
    run_dir: str = ""
    device: str = ""
    epochs_total: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    train_cases: int = 0
    val_cases: int = 0
    parameters: int = 0
    epoch: int = 0  # current epoch, 0-based
    step: int = 0  # optimizer steps done
    eta_s: float | None = None
    samples_per_s: float | None = None
    starts: int = 0  # "start" events seen (1 + resumes)
    steps: list[StepPoint] = field(default_factory=list)
    epochs: list[EpochRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    checkpoint_reason: str = ""
    model: str | None = None  # the "done" event's model (None unless it finished)
    error: str = ""
    error_type: str = ""

    @property
    def fraction(self) -> float:
        """Share of the run's optimizer steps done, 0..1."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def summary(self) -> str:
        """'Epoch 2/15, step 120/3000, 1.3 samples/s, 1 h 02 min left' (or where it stands)."""
        if self.state == WAITING:
            return "Starting (loading the data and the model)..."
        parts = [f"Epoch {min(self.epoch + 1, self.epochs_total or self.epoch + 1)}/{self.epochs_total}",
                 f"step {self.step}/{self.total_steps}"]
        if self.samples_per_s:
            parts.append(f"{self.samples_per_s:.2g} samples/s")
        if self.state == RUNNING and self.eta_s is not None:
            parts.append(f"{format_duration(self.eta_s)} left")
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    """45 -> '45 s', 125 -> '2 min 05 s', 3720 -> '1 h 02 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------------- applying events


def _start(p: TrainingProgress, e: dict) -> None:
    p.state = RUNNING
    p.starts += 1
    p.run_dir = str(e.get("run_dir", p.run_dir))
    p.device = str(e.get("device", p.device))
    p.epochs_total = int(e.get("epochs", p.epochs_total) or 0)
    p.steps_per_epoch = int(e.get("steps_per_epoch", p.steps_per_epoch) or 0)
    p.total_steps = int(e.get("total_steps", p.total_steps) or 0)
    p.train_cases = int(e.get("train_cases", p.train_cases) or 0)
    p.val_cases = int(e.get("val_cases", p.val_cases) or 0)
    p.parameters = int(e.get("parameters", p.parameters) or 0)
    p.epoch, p.step = int(e.get("epoch", 0) or 0), int(e.get("step", 0) or 0)
    p.eta_s, p.model, p.error, p.error_type = None, None, "", ""
    if e.get("resumed"):  # steps past the checkpoint are done again: keep only those before it
        p.steps = [s for s in p.steps if s.step <= p.step]
        p.epochs = [r for r in p.epochs if r.epoch < p.epoch]


def _step(p: TrainingProgress, e: dict) -> None:
    p.state = RUNNING
    point = StepPoint(int(e.get("step", p.step + 1)), int(e.get("epoch", p.epoch)), _number(e.get("loss")),
                      _number(e.get("lr")), _number(e.get("samples_per_s")))
    p.steps = [s for s in p.steps if s.step < point.step] + [point]
    p.step, p.epoch = point.step, point.epoch
    p.total_steps = int(e.get("total", p.total_steps) or p.total_steps)
    p.eta_s, p.samples_per_s = _number(e.get("eta_s")), point.samples_per_s


def _epoch(p: TrainingProgress, e: dict) -> None:
    val = e.get("val") if isinstance(e.get("val"), dict) else None
    row = EpochRow(int(e.get("epoch", p.epoch)), int(e.get("step", p.step)), _number(e.get("train_loss")), val)
    p.epochs = [r for r in p.epochs if r.epoch != row.epoch] + [row]
    p.epochs.sort(key=lambda r: r.epoch)


def _warning(p: TrainingProgress, e: dict) -> None:
    message = str(e.get("message", ""))
    p.warnings.append(f"{e['case']}: {message}" if e.get("case") and str(e["case"]) not in message else message)


def _checkpoint(p: TrainingProgress, e: dict) -> None:
    p.checkpoint = e.get("path") or p.checkpoint
    p.checkpoint_reason = str(e.get("reason", ""))


def _done(p: TrainingProgress, e: dict) -> None:
    status = str(e.get("status", ""))
    p.state = {"finished": FINISHED, "interrupted": INTERRUPTED, "stopped": STOPPED}.get(status, p.state)
    p.model = e.get("model") if p.state == FINISHED else None
    p.checkpoint = e.get("checkpoint") or p.checkpoint
    p.epoch, p.step = int(e.get("epoch", p.epoch) or 0), int(e.get("step", p.step) or 0)
    if p.state == FINISHED:
        p.eta_s = 0.0


def _error(p: TrainingProgress, e: dict) -> None:
    p.state = FAILED
    p.error = str(e.get("message", "")) or "training failed"
    p.error_type = str(e.get("type", ""))
    p.model = None


HANDLERS = {"start": _start, "step": _step, "epoch": _epoch, "warning": _warning,
            "checkpoint": _checkpoint, "done": _done, "error": _error}


def apply_event(progress: TrainingProgress, event: dict) -> bool:
    """Update ``progress`` with one event; False for an event this module does not know."""
    handler = HANDLERS.get(event.get("event"))
    if handler is None:
        return False
    handler(progress, event)
    return True


# ---------------------------------------------------------------------------- the parser


class ProgressParser:
    """Incremental parser of the stream (module docstring): feed chunks, read ``progress``."""

    def __init__(self):
        self.progress = TrainingProgress()
        self.bad_lines = 0  # lines skipped: truncated or not an event
        self.recovered_lines = 0  # events recovered from a line that began with a truncated one
        self._partial = ""

    def parse_line(self, line: str) -> dict | None:
        event = parse_event(line)
        if event is not None or not line.strip():
            return event
        start = line.rfind(EVENT_MARK)
        if start > 0:
            event = parse_event(line[start:])
            if event is not None:
                self.recovered_lines += 1
                return event
        self.bad_lines += 1
        return None

    def _apply_lines(self, lines: list[str]) -> list[dict]:
        events = []
        for line in lines:
            event = self.parse_line(line)
            if event is not None and apply_event(self.progress, event):
                events.append(event)
        return events

    def feed(self, text: str) -> list[dict]:
        """Add a chunk of the stream; returns the events it completed (those applied)."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return self._apply_lines(lines)

    def finish(self) -> list[dict]:
        """The stream has ended: an unfinished last line is parsed if it is whole, else counted as bad."""
        rest, self._partial = self._partial, ""
        return self._apply_lines([rest]) if rest.strip() else []


def parse_stream(text: str) -> ProgressParser:
    """A parser that has read the whole ``text``."""
    parser = ProgressParser()
    parser.feed(text)
    parser.finish()
    return parser


__all__ = [
    "FAILED", "FINISHED", "INTERRUPTED", "RUNNING", "STOPPED", "VAL_METRICS", "WAITING",
    "EpochRow", "ProgressParser", "StepPoint", "TrainingProgress", "apply_event", "format_duration",
    "parse_stream",
]
