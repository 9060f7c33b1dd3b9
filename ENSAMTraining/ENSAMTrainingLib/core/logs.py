"""Run logs: CSV files (always) and TensorBoard events (only when tensorboard is importable).

RUN_DIR/metrics.csv     one row per optimizer step: epoch, step, samples, loss, lr, samples_per_s, time_s
RUN_DIR/validation.csv  one row per epoch: epoch, step, dsc_auc, nsd_auc, final_dsc, final_nsd,
                        dsc_1..dsc_6, nsd_1..nsd_6, the controls of validation.py, cases
RUN_DIR/tensorboard/    the same scalars, when the tensorboard package is installed

On resume the CSV rows beyond the checkpoint's step are dropped, so the logs describe one
continuous run.
"""

from __future__ import annotations

import csv
from pathlib import Path

TRAIN_FIELDS = ("epoch", "step", "samples", "loss", "lr", "samples_per_s", "time_s")
STEP_METRICS = 6
# validation.py's controls: does the model use its prompts?
CONTROL_FIELDS = ("filled_box_dsc", "wrong_box_dsc", "empty_box_dsc", "click_change_fraction", "dsc_gain_per_click")
VAL_FIELDS = (
    ("epoch", "step", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd")
    + tuple(f"dsc_{i + 1}" for i in range(STEP_METRICS))
    + tuple(f"nsd_{i + 1}" for i in range(STEP_METRICS))
    + CONTROL_FIELDS
    + ("cases",)
)


class CsvLog:
    """Append-only CSV with a fixed header; ``keep_until_step`` trims rows of a resumed run."""

    def __init__(self, path: str | Path, fields: tuple[str, ...], keep_until_step: int | None = None):
        self.path, self.fields = Path(path), fields
        rows = []
        if keep_until_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= keep_until_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: _fmt(v) for k, v in row.items()}
            )


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a log CSV with numbers as floats (empty cells as None)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def val_row(epoch: int, step: int, val: dict) -> dict:
    """The validation.csv row of a validation result (see validation.validate)."""
    row = {k: val.get(k) for k in ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "cases", *CONTROL_FIELDS)}
    row.update(epoch=epoch, step=step)
    for i in range(STEP_METRICS):
        row[f"dsc_{i + 1}"] = val["dsc"][i] if i < len(val["dsc"]) else None
        row[f"nsd_{i + 1}"] = val["nsd"][i] if i < len(val["nsd"]) else None
    return row


class TensorBoard:
    """SummaryWriter when tensorboard is installed, else nothing (``enabled`` says which)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.writer = None
        else:
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
