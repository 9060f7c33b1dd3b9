"""The machine-readable progress stream of `ensam train` (JSON lines), for the Slicer module.

`ensam train --progress-json -` writes the stream to stdout (everything else, the tqdm bar
included, goes to stderr); `--progress-json PATH` appends it to a file. One JSON object per
line, flushed at once; every object has ``"event"`` (a name below) and ``"time"`` (seconds
since the epoch, float). Under torchrun only rank 0 writes. Readers should ignore unknown
events and unknown keys (fields may be added), and skip a line that does not parse (the last
line of a killed process may be truncated): ``parse_event`` does both.

Events, in the order they occur, and their fields:

``start``       run_dir, epochs, total_steps (optimizer steps over all epochs), steps_per_epoch,
                train_cases, val_cases, device, world_size, resumed (bool), epoch, step
                (where the run starts: 0/0, or the checkpoint's position when resumed),
                parameters (model parameter count)
``step``        epoch (0-based), step (optimizer steps done, over all epochs), total (total_steps),
                samples (samples trained so far, all ranks, resumed runs included), loss (mean of this
                step's accumulated samples), lr (Muon lr, or AdamW lr when only AdamW),
                samples_per_s, eta_s (seconds left, estimated)
``warning``     message, case (optional): e.g. a case skipped because it cannot be used
``epoch``       epoch (the one just finished, 0-based), step, train_loss (epoch mean),
                val (dict of validation metrics or null when there is no validation set:
                dsc_auc, nsd_auc, final_dsc, final_nsd, dsc (list, per step), nsd (list), cases,
                skipped (held-out cases that could not be read))
``checkpoint``  path, epoch, step, reason ("time", "epoch", "signal", "stop")
``done``        status: "finished" (model = path of model.pt), "interrupted" (SIGINT/SIGTERM) or
                "stopped" (--stop-after), both with model null; checkpoint (path), epoch, step
``error``       message, type (exception class name)

Example::

    {"event": "step", "time": 1733850000.1, "epoch": 0, "step": 12, "total": 300, "samples": 48,
     "loss": 0.83, "lr": 0.02, "samples_per_s": 3.1, "eta_s": 370.2}
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Any

EVENTS = ("start", "step", "warning", "epoch", "checkpoint", "done", "error")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class ProgressStream:
    """Writes events as JSON lines to a stream (``"-"`` = stdout, a path = append to file, None = off)."""

    def __init__(self, target: str | Path | None):
        self._own = False
        self._stream: IO[str] | None = None
        if target is None:
            return
        if str(target) == "-":
            self._stream = sys.stdout
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(target, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._own = True

    def emit(self, event: str, **fields: Any) -> dict:
        """Write one event line and return it (the dict, also when the stream is off)."""
        if event not in EVENTS:
            raise ValueError(f"unknown progress event {event!r}")
        record = {"event": event, "time": time.time(), **_clean(fields)}
        if self._stream is not None:
            self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()
        return record

    def close(self) -> None:
        if self._own and self._stream is not None:
            self._stream.close()
        self._stream = None


def parse_event(line: str) -> dict | None:
    """The event of one stream line, or None for a blank, truncated or non-event line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None
    return record


def read_events(path: str | Path) -> list[dict]:
    """All parseable events of a progress file (skipping bad lines)."""
    with open(path, encoding="utf-8") as f:
        return [e for e in map(parse_event, f) if e is not None]
