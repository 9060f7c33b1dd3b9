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
image's transfer (the wait for set_image's result minus the worker's own time: writing and reading the
image file, the messages). Each image is submitted with an identity, as the prompt controller does (no
hashing of every voxel). Also reported: how long `submit_image` kept the calling thread, which in Slicer
is the GUI thread: the measured images go as the module sends them (a private file written by a helper
thread, worker.py); the warm-up images go through the socket from the calling thread, the way before, so
that both figures come from the same run (none for the socket without warm-up). A GUI adds its poll
interval on top (slicerui/promptpanel.py POLL_MS, 10 ms: 5 ms on average); that is the GUI's latency, not
the process boundary's, and is said beside the figure.
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
                   click_window, progress=print, voxel_budget: int | None = None) -> dict:
    """Clicks through a worker process (see the module docstring); returns the figures and raw samples."""
    from ENSAMSegmentLib.core.worker import WorkerSession

    from .benchmark import _tag, stats, variant

    samples = {"click": [], "inside": [], "boundary": [], "image_transfer": [], "submit_image": [],
               "submit_image_socket": []}
    with tempfile.TemporaryDirectory(prefix="ensam-bench-") as folder:
        path = _worker_model_file(model, model_info, Path(folder))
        options = {"precision": precision, "voxel_budget": voxel_budget}
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
                image = variant(scenario.image, i)
                worker.image_transport = "socket" if i < warmup else "file"
                start = time.perf_counter()
                future = worker.submit_image(image, scenario.spacing, identity=("ensam bench", i))
                calling = time.perf_counter() - start
                report = worker.wait(future)
                transfer = time.perf_counter() - start - report.seconds - report.timings.get("queue", 0.0)
                (samples["submit_image_socket"] if i < warmup else samples["submit_image"]).append(calling)
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
            "submit_image_s_median": s["submit_image"]["median"], "submit_image_s_max": max(samples["submit_image"]),
            "submit_image_socket_s_median": s["submit_image_socket"]["median"],
            "image_mb": scenario.image.nbytes / 2**20, "image_dtype": str(scenario.image.dtype),
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
        f"    submit_image kept the calling (GUI) thread {1000 * b['submit_image_s_median']:.1f} ms (max "
        f"{1000 * b['submit_image_s_max']:.1f} ms) for the {b['image_mb']:.0f} MB {b['image_dtype']} image, written "
        f"to a private file by a helper thread; " + (
            f"{1000 * b['submit_image_socket_s_median']:.1f} ms through the socket as before (warm-up images)"
            if b.get("submit_image_socket_s_median") is not None else "through the socket: not measured (no warm-up)"),
    ]
