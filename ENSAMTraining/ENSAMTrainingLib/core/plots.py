"""Loss-curve pictures (matplotlib, Agg backend: no display needed), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .logs import read_csv


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what exists). Values that are not
    finite (a skipped step's loss) are left out of the averages, so one does not blank the rest."""
    if window <= 1 or len(values) == 0:
        return values
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    sums = np.cumsum(np.insert(np.where(finite, values, 0.0), 0, 0.0))
    seen = np.cumsum(np.insert(finite.astype(float), 0, 0.0))
    start = np.arange(1, len(values) + 1) - np.minimum(np.arange(1, len(values) + 1), window)
    counts = seen[1:] - seen[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (sums[1:] - sums[start]) / np.maximum(counts, 1), np.nan)


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """RUN_DIR/loss.png: training loss per step (raw and smoothed) and, per validation, the final and
    box-step DSC, final NSD, and the controls: the filled box's DSC and the box step's with a wrong box."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    rows = read_csv(metrics) if metrics.is_file() else []
    if not rows:
        return None
    plt = _pyplot()
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, loss, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(steps, smooth(loss, max(1, len(loss) // 20)), color="C0", label="smoothed")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (generalized Dice + 2 BCE)")
    val_path = run_dir / "validation.csv"
    val = read_csv(val_path) if val_path.is_file() else []
    if val:
        right = ax.twinx()
        at = [r["step"] for r in val]
        right.plot(at, [r["final_dsc"] for r in val], "o-", color="C1", label="val final DSC")
        right.plot(at, [r["final_nsd"] for r in val], "s-", color="C2", label="val final NSD")
        right.plot(at, [r.get("dsc_1") for r in val], "^-", color="C3", label="val box-step DSC")
        if any(r.get("wrong_box_dsc") is not None for r in val):  # controls: prompts used?
            right.plot(at, [r.get("wrong_box_dsc") for r in val], "v:", color="C4", label="wrong-box DSC")
        if any(r.get("empty_box_dsc") is not None for r in val):
            right.plot(at, [r.get("empty_box_dsc") for r in val], "x:", color="C5", label="empty-box DSC")
        if any(r.get("filled_box_dsc") is not None for r in val):
            right.plot(at, [r.get("filled_box_dsc") for r in val], "--", color="0.5", label="filled box DSC")
        right.set_ylim(0, 1)
        right.set_ylabel("validation")
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = _save(fig, Path(path) if path else run_dir / "loss.png")
    plt.close(fig)
    return out


def plot_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """Several (steps, loss) curves on one chart (the ablation), smoothed, raw in light colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, (name, (steps, loss)) in enumerate(curves.items()):
        loss = np.asarray(loss, dtype=float)
        ax.plot(steps, loss, color=f"C{n}", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(loss, max(1, len(loss) // 10)), color=f"C{n}", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
