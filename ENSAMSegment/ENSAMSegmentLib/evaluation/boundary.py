"""What the process boundary costs per click: `ensam bench --worker`.

In Slicer the model runs in a worker process (core/worker.py): each click goes over a socket and the
changed block of the mask comes back. This runs the benchmark's scenario (same image variants, box and
clicks) through a `WorkerSession` and, for every click, splits the time the caller waits (submit to
result, in this process) into

* inside: what the worker's session spent on the request (its queue wait and its work: `timings["queue"]`
  + `seconds`, measured in the worker), the same work an in-process session does;
* boundary: everything else: validating and pickling the request, the socket both ways, the worker's
  reader and dispatcher, pickling the reply block, patching the object's mask crop here.

Reported: medians and p95 of both, boundary / click (issue 13's target: under 5 % of a click), and the
image's transfer (set_image's wait minus the worker's own time: fingerprint, pickling and sending the
volume). A GUI adds its poll interval on top (slicerui/promptpanel.py POLL_MS, 10 ms: 5 ms on average);
that is the GUI's latency, not the process boundary's, and is said beside the figure.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

TARGET_FRACTION = 0.05


def _worker_model_file(model, model_info: dict, folder: Path) -> str:
    """The model as a file the worker can load: its own file, or the in-memory model saved (same weights)."""
    if model_info.get("path"):
        return model_info["path"]
    from ENSAMSegmentLib.core.modelfile import save_model

    return str(save_model(folder / "bench-model.pt", model, training_data="untrained (ensam bench)"))


def bench_boundary(model, model_info: dict, scenario, repeats: int, warmup: int, device, precision: str,
                   click_window, progress=print) -> dict:
    """Clicks through a worker process (see the module docstring); returns the figures and raw samples."""
    from ENSAMSegmentLib.core.worker import WorkerSession

    from .benchmark import _tag, stats, variant

    samples = {"click": [], "inside": [], "boundary": [], "image_transfer": []}
    with tempfile.TemporaryDirectory(prefix="ensam-bench-") as folder:
        path = _worker_model_file(model, model_info, Path(folder))
        options = {"precision": precision}
        if click_window is not None:
            options["click_window"] = int(click_window)
        with WorkerSession(path, str(device), **options) as worker:
            started = time.perf_counter()
            while not worker.ready and not worker.closed:
                worker.poll(0.05)
            if worker.closed:
                raise RuntimeError(f"the worker process could not start: {worker.failure}")
            progress(f"worker process (PID {worker.pid}) ready in {time.perf_counter() - started:.1f} s, "
                     f"model on {worker.device_name}")
            for i in range(warmup + repeats):
                start = time.perf_counter()
                report = worker.set_image(variant(scenario.image, i), scenario.spacing)
                transfer = time.perf_counter() - start - report.seconds - report.timings.get("queue", 0.0)
                worker.create_object()
                worker.add_box(*scenario.box)
                clicks = []
                for point, foreground in scenario.clicks:
                    start = time.perf_counter()
                    update = worker.add_click(point, foreground)
                    wall = time.perf_counter() - start
                    inside = update.seconds + update.timings.get("queue", 0.0)
                    clicks.append((wall, inside))
                if i >= warmup:
                    samples["image_transfer"].append(transfer)
                    samples["click"] += [w for w, _ in clicks]
                    samples["inside"] += [n for _, n in clicks]
                    samples["boundary"] += [w - n for w, n in clicks]
                progress(f"worker {_tag(i, warmup)}: clicks " + ", ".join(
                    f"{w:.3f} s (boundary {1000 * (w - n):.1f} ms)" for w, n in clicks))
    s = {k: stats(v) for k, v in samples.items()}
    fraction = s["boundary"]["median"] / s["click"]["median"] if s["click"]["median"] else None
    return {"click_s_median": s["click"]["median"], "click_s_p95": s["click"]["p95"],
            "inside_s_median": s["inside"]["median"], "boundary_s_median": s["boundary"]["median"],
            "boundary_s_p95": s["boundary"]["p95"], "boundary_fraction": fraction,
            "target_fraction": TARGET_FRACTION, "target_met": None if fraction is None else fraction < TARGET_FRACTION,
            "image_transfer_s_median": s["image_transfer"]["median"], "gui_poll_ms": 10,
            "samples": samples}


def format_boundary(b: dict) -> list[str]:
    """Lines for the benchmark's table."""
    met = {True: "met", False: "MISSED", None: "n/a"}[b["target_met"]]
    return [
        f"  worker process (as in Slicer): click {b['click_s_median']:.3f} s median, of which the process boundary "
        f"{1000 * b['boundary_s_median']:.1f} ms (p95 {1000 * b['boundary_s_p95']:.1f} ms) = "
        f"{100 * b['boundary_fraction']:.1f} % of a click (target < {100 * b['target_fraction']:.0f} %: {met});",
        f"    image sent to the worker in {b['image_transfer_s_median']:.3f} s; a GUI's poll adds up to "
        f"{b['gui_poll_ms']} ms (slicerui/promptpanel.py)",
    ]
