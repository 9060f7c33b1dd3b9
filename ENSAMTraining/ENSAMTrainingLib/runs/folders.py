"""Run folders of the module: one new folder per training run, inside the chosen output folder.

    <output folder>/run-20250101-120000/     a run (`ensam train --out`; core/trainer.py lists its files)
    <output folder>/coreset-20250101-115500/ a coreset selection (cases.txt, cases.report.json, cases.log)
    <output folder>/scene-20250101-121500/   a scene export ("Train on this scene"; mrml/sceneexport.py)

A run is *finished* when it holds model.pt, *resumable* when it holds checkpoint.pt without
model.pt (stopped, interrupted, or killed after its last checkpoint), else *empty*.
"""

from __future__ import annotations

import time
from pathlib import Path

FINISHED, RESUMABLE, EMPTY = "finished", "resumable", "empty"


def new_folder(output: Path, kind: str = "run", now: float | None = None) -> Path:
    """``output/<kind>-YYYYmmdd-HHMMSS`` (with -2, -3, ... when taken); not created."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = Path(output) / f"{kind}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run_status(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    if (run_dir / "model.pt").is_file():
        return FINISHED
    if (run_dir / "checkpoint.pt").is_file():
        return RESUMABLE
    return EMPTY


def latest_resumable(output: Path) -> Path | None:
    """The most recently changed resumable run folder under ``output``, or None."""
    output = Path(output)
    if not output.is_dir():
        return None
    runs = [p for p in output.iterdir() if p.is_dir() and run_status(p) == RESUMABLE]
    return max(runs, key=lambda p: (p / "checkpoint.pt").stat().st_mtime, default=None)


__all__ = ["EMPTY", "FINISHED", "RESUMABLE", "latest_resumable", "new_folder", "run_status"]
