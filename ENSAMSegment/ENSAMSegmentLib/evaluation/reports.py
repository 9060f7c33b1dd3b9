"""Reports of a protocol run (evaluation.py): per-step CSV, summary JSON, and a plot of the scores per step.

- ``steps.csv``: one row per case, method and step: case, method, step, DSC, NSD, seconds (as scored:
  a case over the time limit has DSC = NSD = 0; its seconds are as measured).
- ``summary.json``: per method the challenge's ``DSC_AUC``, ``NSD_AUC``, ``DSC_Final``, ``NSD_Final``
  per case and their mean over the cases, mean DSC/NSD/seconds per step; the skipped cases with the
  reason; failures and cases over the time limit with notes.
- ``steps.png``: mean DSC and mean NSD against the interaction step, one line per method.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ENSAMSegmentLib.core.metrics import NSD_TOLERANCE_MM

SUMMARY_KEYS = ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final")
CSV_COLUMNS = ("case", "method", "step", "DSC", "NSD", "seconds")


def write_steps_csv(path, runs) -> Path:
    """One row per (case, method, step)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for run in runs:
            for step, (d, n, s) in enumerate(zip(run.dsc, run.nsd, run.seconds), start=1):
                writer.writerow([run.case, run.method, step, f"{d:.6f}", f"{n:.6f}", f"{s:.4f}"])
    return path


def _case_entry(run) -> dict:
    entry = {**run.summary(), "DSC": run.dsc, "NSD": run.nsd, "seconds": run.seconds,
             "total_seconds": float(sum(run.seconds)), "n_classes": run.n_classes}
    if run.over_time_limit:
        entry["over_time_limit"] = True
        entry["measured_DSC"], entry["measured_NSD"] = run.measured_dsc, run.measured_nsd
    if run.failure:
        entry["failure"] = run.failure
    if run.notes:
        entry["notes"] = run.notes
    return entry


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def method_summary(runs) -> dict:
    """Per-case entries and the means over cases of one method's runs."""
    cases = {run.case: _case_entry(run) for run in runs}
    mean = {key: _mean([c[key] for c in cases.values()]) for key in SUMMARY_KEYS}
    per_step = {key: [float(v) for v in np.mean([c[key] for c in cases.values()], axis=0)] if cases else []
                for key in ("DSC", "NSD", "seconds")}
    return {
        "n_cases": len(cases),
        "mean": mean,
        "mean_per_step": per_step,
        "over_time_limit": [r.case for r in runs if r.over_time_limit],
        "failed": [{"case": r.case, "reason": r.failure} for r in runs if r.failure],
        "cases": cases,
    }


def build_summary(runs, skipped, methods: dict, protocol: dict | None = None) -> dict:
    """The whole summary: protocol facts, per method (in the order of `methods`), skipped cases."""
    return {
        "protocol": {"steps": "1 box + 5 clicks", "nsd_tolerance_mm": NSD_TOLERANCE_MM,
                     "auc": "trapezoid over steps 2..6 (max 4.0)", **(protocol or {})},
        "methods": {name: {"info": info, **method_summary([r for r in runs if r.method == name])}
                    for name, info in methods.items()},
        "skipped": list(skipped),
    }


def write_summary_json(path, summary: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2, allow_nan=True))
    return path


def plot_steps(path, summary: dict, title: str = "") -> Path:
    """PNG: mean DSC and mean NSD (y) against the interaction step 1..6 (x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    for name, entry in summary["methods"].items():
        steps = entry["mean_per_step"]
        if not steps["DSC"]:
            continue
        x = np.arange(1, len(steps["DSC"]) + 1)
        mean = entry["mean"]
        untrained = " [untrained model]" if entry.get("info", {}).get("model", {}).get("untrained") else ""
        for ax, key in zip(axes, ("DSC", "NSD")):
            ax.plot(x, steps[key], marker="o",
                    label=f"{name}{untrained} (AUC {mean[key + '_AUC']:.2f}, n={entry['n_cases']})")
    for ax, key in zip(axes, ("DSC", "NSD")):
        ax.set_xticks(range(1, 7), ["1\nbox", "2", "3", "4", "5", "6"])
        ax.set_xlabel("interaction step (clicks after the box)")
        ax.set_ylabel(f"mean {key}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{key} per step" + (f" at {NSD_TOLERANCE_MM:g} mm" if key == "NSD" else ""))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
