"""Interactive-speed benchmark: ENSAM's session against Slicer's "Grow from seeds", same volume, same run.

    report = run_benchmark(shape=(128, 256, 256), device="cpu", repeats=5, warmup=1)
    print(format_report(report))          # or json.dumps(report)

The scenario (`make_scenario`): a CT phantom (phantom.py, spacing 2 x 1 x 1 mm) with a box of half the
image size per axis (1/8 of the volume, clipped to the image) centred on the liver, and 3 clicks inside
the box: foreground (liver), background (box, not liver), foreground. Every repeat, after `warmup`
discarded ones, measures wall-clock time of what a user waits for:

ENSAM (one `InferenceSession`, the model loaded once, on the grids a user's session gets: at most the
voxel budget the model file records, the patch size it was trained at, as in `ensam segment`, the web
app and Slicer; a model without one, and an untrained model, at the session's VOXEL_BUDGET,
128x256x256 at native resolution; `voxel_budget` sets another):
* `set_image` on an image differing from the previous one by one voxel, so that the fingerprint cache
  cannot skip the encoder (checked: the encoder runs once per repeat). `encoder` is the session's
  "encode" timing, `set_image` adds hashing and intensity normalisation.
* the first box of a new object (no previous logits), then each click (embedding cached, the object's
  previous logits fed back), then `merged_labels`.
Grow from seeds (growcut.py, driven as the Segment Editor effect drives it), same prompts as seeds (the
box as a background shell just outside it, clicks as radius-1 balls):
* "first": a new filter's first computation from the box and the first foreground click (GrowCut needs
  a foreground seed; ENSAM's box step has none);
* "update": each further click, the same filter object reused (Slicer's incremental update).

Statistics are the median and the 95th percentile (linear interpolation) of the measured repeats.
On CUDA every step ends with torch.cuda.synchronize(). Peak memory: the process's peak resident set
size (a high-water mark, so it includes building the phantom), read after the ENSAM session (before
the untimed agreement pass) and again after Grow from seeds; on CUDA also torch.cuda.max_memory_allocated.
CPU time: user and system (kernel) seconds and minor page faults of the process over the ENSAM part
(getrusage, every thread), and the CPU's instruction set as PyTorch and oneDNN use it, with the
environment variables that limit it (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 emulate an AVX2
CPU on a newer one). Unless `tune_malloc` is False, the process first lets malloc keep freed memory
(devices.keep_freed_memory), as the inference worker does.
Without a model file, an untrained model of the default architecture is used, and the report says so.
The encoder, box and merge timings do not depend on the weights; a click's does, a little: it is
decoded over a window around it (session_window.py), which grows when the mask changes on the window's
faces, and an untrained model's noisy masks make it grow where a trained model's would not. The
report lists how every measured click was decoded (`click_decoding`: "window", "window+grown",
"region" or "whole"; `click_decode_regions`);
`--click-window 0` measures clicks decoded over the whole box region instead.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch  # imported where used: `ensam bench` refuses bad settings before torch loads (~2 s)

DEFAULT_SHAPE = (128, 256, 256)
SPACING_ZYX = (2.0, 1.0, 1.0)
CLICK_KINDS = (True, False, True)  # foreground, background, foreground
# Issue 14's targets for a 2-core CPU at 128x256x256 (fp32 on AVX2; the same or better with native bf16)
TARGETS = {"click_s_median": 1.0, "click_s_p95": 2.0, "encoder_s": 10.0, "system_vs_user": 0.10,
           "peak_rss_mb": 2500.0}
CPU_ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MALLOC_ARENA_MAX", "LD_PRELOAD")


class BenchmarkError(ValueError):
    """Benchmark settings that cannot work (bad shape, repeats, missing model file)."""


# --------------------------------------------------------------------------------- settings


def parse_shape(text: str) -> tuple[int, int, int]:
    """'D,H,W' (or 'DxHxW') -> (D, H, W), each an integer >= 16."""
    parts = str(text).replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BenchmarkError(f"shape must be three integers D,H,W (e.g. 128,256,256), got {text!r}") from None
    if len(shape) != 3 or min(shape) < 16:
        raise BenchmarkError(f"shape must be three integers D,H,W, each >= 16, got {text!r}")
    return shape


def check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0:
        raise BenchmarkError(f"need repeats >= 1 and warmup >= 0, got repeats {repeats}, warmup {warmup}")


# --------------------------------------------------------------------------------- scenario


@dataclass(frozen=True)
class Scenario:
    """The benchmark volume and its prompts (voxel indices z, y, x; box corners inclusive)."""

    image: np.ndarray  # float32 (D, H, W), HU-like
    spacing: tuple
    box: tuple  # (lo, hi)
    clicks: tuple  # ((point, foreground), ...)

    @property
    def box_fraction(self) -> float:
        lo, hi = self.box
        return math.prod(b - a + 1 for a, b in zip(lo, hi)) / self.image.size


def make_scenario(shape=DEFAULT_SHAPE, seed: int = 0) -> Scenario:
    """Phantom, a 1/8-volume box centred on the liver (label 1), and clicks inside the box."""
    from ENSAMSegmentLib.core.phantom import PhantomError, make_phantom

    try:
        image, labels = make_phantom(shape, seed=seed, spacing=SPACING_ZYX, n_objects=1)
    except PhantomError as error:
        raise BenchmarkError(f"cannot build the benchmark phantom: {error}") from None
    centre = np.rint(np.argwhere(labels == 1).mean(0)).astype(int)
    size = np.array([(n + 1) // 2 for n in shape])
    lo = np.clip(centre - size // 2, 0, np.array(shape) - size)
    box = (tuple(lo.tolist()), tuple((lo + size - 1).tolist()))
    rng = np.random.default_rng(seed)
    crop = tuple(slice(a, b + 1) for a, b in zip(*box))
    inside = labels[crop] == 1
    clicks = tuple((_pick(rng, inside if fg else ~inside, lo), fg) for fg in CLICK_KINDS)
    return Scenario(image, SPACING_ZYX, box, clicks)


def _pick(rng, where: np.ndarray, offset) -> tuple[int, int, int]:
    """A random voxel of `where` (preferring voxels at least 2 voxels from its border) + offset."""
    from scipy import ndimage

    interior = ndimage.binary_erosion(where, iterations=2)
    candidates = np.argwhere(interior if interior.any() else where)
    if len(candidates) == 0:
        candidates = np.argwhere(np.ones_like(where))
    return tuple(int(v) for v in candidates[rng.integers(len(candidates))] + offset)


def variant(image: np.ndarray, i: int) -> np.ndarray:
    """The image with one corner voxel changed by i + 1: a new fingerprint, the same content."""
    out = image.copy()
    out[0, 0, 0] += i + 1
    return out


# --------------------------------------------------------------------------------- measuring


def stats(samples) -> dict:
    """{'median', 'p95', 'n'} of a list of seconds (None values when empty)."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        return {"median": None, "p95": None, "n": 0}
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "n": int(values.size)}


def peak_rss_mb() -> float | None:
    """The process's peak resident set size so far, in MB (None when the platform cannot say)."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20
        except (ImportError, AttributeError):
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def cpu_usage() -> dict | None:
    """User and system CPU seconds and minor page faults of this process so far (every thread)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "system_s": r.ru_stime, "minor_faults": r.ru_minflt}


def usage_between(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    used = {k: after[k] - before[k] for k in before}
    used["system_vs_user"] = used["system_s"] / used["user_s"] if used["user_s"] else None
    return used


def cpu_description() -> dict:
    """What the CPU computes with: PyTorch's kernel level, native bf16, the ISA-limiting environment."""
    import torch

    from ENSAMSegmentLib.core import devices

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"aten_capability": capability, "native_bf16": devices.cpu_native_bf16(), "onednn_bf16": devices.onednn_bf16(),
            "environment": {k: os.environ[k] for k in CPU_ENVIRONMENT if k in os.environ}}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class Clock:
    """Wall-clock timer that first waits for the GPU (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def time(self, fn, *args, **kwargs):
        """(result, seconds) of fn(*args, **kwargs), GPU work included."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.sync()
        return result, time.perf_counter() - start


# --------------------------------------------------------------------------------- the model


def bench_model(checkpoint=None) -> tuple[torch.nn.Module, dict]:
    """(model, description). checkpoint None: the default model file, or, when it does not exist, an
    untrained model of the default architecture (seed 0). A given checkpoint must exist."""
    from ENSAMSegmentLib.core.modelfile import ModelFileError, default_model_path, load_model
    from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
    from ENSAMSegmentLib.core.network.complexity import count_parameters
    import torch

    path = Path(checkpoint) if checkpoint is not None else default_model_path()
    if checkpoint is None and not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = ENSAM(ENSAMConfig()).eval()
        note = (f"no model file at {path}: an untrained model of the default architecture is used "
                "(timings do not depend on the weights)")
        return model, {"path": None, "untrained": True, "parameters": count_parameters(model), "note": note,
                       "voxel_budget": None}
    try:
        model, info = load_model(path)
    except ModelFileError as error:
        raise BenchmarkError(str(error)) from None
    note = "the model file is untrained (random weights)" if info.untrained else ""
    return model, {"path": str(path), "untrained": info.untrained, "parameters": count_parameters(model),
                   "note": note, "voxel_budget": info.voxel_budget}


# --------------------------------------------------------------------------------- the two methods


def bench_ensam(session, scenario: Scenario, repeats: int, warmup: int, clock: Clock, progress=print) -> dict:
    """Samples (seconds) of set_image, encoder, first box, clicks and merge, plus what the session did."""
    samples = {k: [] for k in ("set_image", "encoder", "box", "click", "click_decode", "merge")}
    info, decodings, regions, first_masks = {}, [], [], None
    for i in range(warmup + repeats):
        image, runs = variant(scenario.image, i), session.encoder_runs
        start = time.perf_counter()
        report = session.set_image(image, scenario.spacing)
        returned = time.perf_counter()
        clock.sync()  # on CUDA the encoder's kernels may still run
        t_image = time.perf_counter() - start
        if session.encoder_runs != runs + 1 or not report.encoded:
            raise RuntimeError("the encoder did not run for a new image: the benchmark would measure nothing")
        encoder = report.timings["encode"] + (t_image - (returned - start))
        session.create_object()
        box, t_box = clock.time(session.add_box, *scenario.box)
        clicks = [clock.time(session.add_click, p, fg) for p, fg in scenario.clicks]
        labels, t_merge = clock.time(session.merged_labels)
        if i == 0:
            first_masks = [u.mask for u, _ in clicks]  # image variant 0: compared in window_agreement
        if i >= warmup:
            for key, value in (("set_image", t_image), ("encoder", encoder), ("box", t_box), ("merge", t_merge)):
                samples[key].append(value)
            samples["click"] += [t for _, t in clicks]
            samples["click_decode"] += [u.timings["decode"] for u, _ in clicks]
            decodings += [u.decoding + ("+grown" * u.window_growth) for u, _ in clicks]
            regions += [_sizes(u.logits_region) for u, _ in clicks]
        info = {"mode": report.mode, "grid_shape": list(report.grid_shape),
                "box_decode_region": _sizes(box.logits_region), "click_decode_region": _sizes(clicks[-1][0].logits_region),
                "click_decoding": decodings, "click_decode_regions": regions, "first_click_masks": first_masks,
                "labelled_voxels": int(np.count_nonzero(labels))}
        progress(f"ENSAM {_tag(i, warmup)}: encoder {encoder:.2f} s, box {t_box:.2f} s, clicks "
                 f"{', '.join(f'{t:.2f}' for _, t in clicks)} s, merge {t_merge:.2f} s")
    return {"samples": samples, **info}


def window_agreement(model, scenario: Scenario, device, precision: str, window_masks: list, progress=print,
                     voxel_budget: int | None = None) -> list:
    """Dice between each click's mask decoded over its window (`window_masks`, from the timed run) and
    the same click decoded over the whole box region (click_window 0), untimed: what windowed
    decoding changes in the result. With trained weights this says how much accuracy the speed costs;
    with untrained ones, how far its noisy masks differ beyond the window."""
    from ENSAMSegmentLib.core.metrics import dice
    from ENSAMSegmentLib.core.session import InferenceSession

    progress("agreement: the same clicks decoded over the whole box region (untimed) ...")
    with InferenceSession(model=model, device=device, precision=precision, click_window=0,
                          voxel_budget=voxel_budget) as session:
        session.set_image(variant(scenario.image, 0), scenario.spacing)
        session.create_object()
        session.add_box(*scenario.box)
        region_masks = [session.add_click(p, fg).mask for p, fg in scenario.clicks]
    return [float(dice(a, b)) for a, b in zip(region_masks, window_masks)]


def bench_growcut(scenario: Scenario, repeats: int, warmup: int, progress=print) -> dict:
    """Samples (seconds) of Grow from seeds' first computation and of its incremental updates."""
    from .growcut import GrowCutSegmenter, seeds_from_prompts

    samples = {"first": [], "update": []}
    incremental = True
    for i in range(warmup + repeats):
        segmenter = GrowCutSegmenter(scenario.image, scenario.spacing)
        times = []
        for n in range(1, len(scenario.clicks) + 1):
            fg = [p for p, f in scenario.clicks[:n] if f]
            bg = [p for p, f in scenario.clicks[:n] if not f]
            seeds = seeds_from_prompts(scenario.image.shape, scenario.box, fg, bg)
            start = time.perf_counter()
            segmenter.segment(seeds)
            times.append(time.perf_counter() - start)
            if n > 1:
                incremental &= segmenter.incremental
        if i >= warmup:
            samples["first"].append(times[0])
            samples["update"] += times[1:]
        progress(f"Grow from seeds {_tag(i, warmup)}: first {times[0]:.2f} s, updates "
                 f"{', '.join(f'{t:.2f}' for t in times[1:])} s")
    return {"samples": samples, "incremental": incremental}


def _sizes(region) -> list | None:
    return None if region is None else [s.stop - s.start for s in region]


def _tag(i: int, warmup: int) -> str:
    return f"warm-up {i + 1}/{warmup}" if i < warmup else f"repeat {i - warmup + 1}"


# --------------------------------------------------------------------------------- the whole run


def run_benchmark(shape=DEFAULT_SHAPE, device: str = "auto", repeats: int = 5, warmup: int = 1,
                  checkpoint=None, growcut: bool = True, progress=print, precision: str = "auto",
                  click_window: int | None = None, agreement: bool = True, tune_malloc: bool = True,
                  worker: bool = False, voxel_budget: int | None = None) -> dict:
    """Run both methods on one scenario; returns the report (plain data, JSON-ready; module docstring).
    voxel_budget None: the model file's (the session's grids as a user gets them), else VOXEL_BUDGET."""
    import torch

    from ENSAMSegmentLib import __version__
    from ENSAMSegmentLib.core import devices
    from ENSAMSegmentLib.core.session import InferenceSession

    check_counts(repeats, warmup)
    try:
        torch_device = devices.resolve_device(device)
    except ValueError as error:
        raise BenchmarkError(str(error)) from None
    malloc = "glibc, freed memory kept (M_MMAP_MAX 0)" if tune_malloc and devices.keep_freed_memory() else "default"
    model, model_info = bench_model(checkpoint)
    voxel_budget = voxel_budget or model_info["voxel_budget"]  # an in-memory model carries no budget: pass it on
    progress(f"building the {'x'.join(map(str, shape))} phantom ...")
    scenario = make_scenario(shape)
    clock = Clock(torch_device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(torch_device)
    try:
        session = InferenceSession(model=model, device=torch_device, precision=precision, click_window=click_window,
                                   voxel_budget=voxel_budget)
    except ValueError as error:  # SessionError included
        raise BenchmarkError(str(error)) from None
    with session:
        before = cpu_usage()
        ensam = bench_ensam(session, scenario, repeats, warmup, clock, progress)
        ensam_cpu = usage_between(before, cpu_usage())
        device_name, click_window, voxel_budget = session.device_name, session.click_window, session.voxel_budget
    peak_ensam = peak_rss_mb()  # the interactive session's, before the untimed agreement pass
    cuda_peak = torch.cuda.max_memory_allocated(torch_device) / 2**20 if clock.cuda else None
    del session  # and its embeddings, before the agreement pass encodes the image again
    agreement = (window_agreement(model, scenario, torch_device, precision, ensam["first_click_masks"], progress,
                                  voxel_budget) if click_window and agreement else None)
    boundary = None
    if worker:  # the same clicks through the worker process the Slicer module uses (boundary.py)
        from .boundary import bench_boundary

        boundary = bench_boundary(model, model_info, scenario, repeats, warmup, torch_device, precision,
                                  click_window, progress, voxel_budget)
    grow = bench_growcut(scenario, repeats, warmup, progress) if growcut else None

    s = {k: stats(v) for k, v in ensam["samples"].items()}
    g = {k: stats(v) for k, v in grow["samples"].items()} if grow else {"first": stats([]), "update": stats([])}
    report = {
        "shape": list(shape), "device": str(torch_device), "device_name": device_name, "spacing": list(SPACING_ZYX),
        "box": [list(c) for c in scenario.box], "box_fraction": scenario.box_fraction,
        "clicks": [{"point": list(p), "foreground": fg} for p, fg in scenario.clicks],
        "repeats": repeats, "warmup": warmup, "voxel_budget": voxel_budget, "mode": ensam["mode"],
        "grid_shape": ensam["grid_shape"],
        "box_decode_region": ensam["box_decode_region"], "click_decode_region": ensam["click_decode_region"],
        "click_window": click_window, "click_decoding": ensam["click_decoding"],
        "click_decode_regions": ensam["click_decode_regions"], "window_vs_region_dice": agreement,
        "encoder_s": s["encoder"]["median"], "encoder_s_p95": s["encoder"]["p95"],
        "set_image_s_median": s["set_image"]["median"], "set_image_s_p95": s["set_image"]["p95"],
        "box_s_median": s["box"]["median"], "box_s_p95": s["box"]["p95"],
        "click_s_median": s["click"]["median"], "click_s_p95": s["click"]["p95"],
        "click_decode_s_median": s["click_decode"]["median"],
        "merge_s_median": s["merge"]["median"], "merge_s_p95": s["merge"]["p95"],
        "growcut_first_s": g["first"]["median"], "growcut_first_s_p95": g["first"]["p95"],
        "growcut_update_s": g["update"]["median"], "growcut_update_s_p95": g["update"]["p95"],
        "growcut_update_incremental": grow["incremental"] if grow else None,
        "peak_rss_mb": peak_ensam, "peak_rss_mb_with_growcut": peak_rss_mb() if grow else None,
        "cuda_max_memory_allocated_mb": cuda_peak,
        "model": model_info, "parameters": model_info["parameters"], "torch_threads": torch.get_num_threads(),
        "ensam_cpu": ensam_cpu, "malloc": malloc, "cpu_isa": cpu_description(),
        "cpu": cpu_name(), "cpu_count": _cpu_count(), "gpu": torch.cuda.get_device_name(torch_device) if clock.cuda else None,
        "torch_version": torch.__version__, "ensam_version": __version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "samples": {**{f"ensam_{k}": v for k, v in ensam["samples"].items()},
                    **({f"growcut_{k}": v for k, v in grow["samples"].items()} if grow else {})},
    }
    report.update(ratios(report))
    report["process_boundary"] = boundary
    report["targets"] = targets(report)
    return report


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def ratios(report: dict) -> dict:
    """ENSAM against Grow from seeds (< 1: ENSAM faster); None without Grow from seeds numbers."""
    click, update, first = report["click_s_median"], report["growcut_update_s"], report["growcut_first_s"]
    return {"click_vs_growcut_update": click / update if update else None,
            "box_vs_growcut_first": report["box_s_median"] / first if first else None,
            "encoder_plus_box_vs_growcut_first": ((report["encoder_s"] + report["box_s_median"]) / first
                                                  if first else None)}


def targets(report: dict) -> dict:
    """Issue 14's CPU targets (TARGETS): True met, False missed, None not applicable or not measured
    (they are defined for the CPU at 128x256x256 only; `applies` says whether this run is one)."""
    applies = report["device"] == "cpu" and tuple(report["shape"]) == DEFAULT_SHAPE
    box, kernel, rss = report["box_vs_growcut_first"], report.get("ensam_cpu"), report["peak_rss_mb"]
    kernel = kernel and kernel["system_vs_user"]
    met = {"click_median_le_1s": report["click_s_median"] <= TARGETS["click_s_median"],
           "click_p95_le_2s": report["click_s_p95"] <= TARGETS["click_s_p95"],
           "box_le_growcut_first": None if box is None else box <= 1.0,
           "encoder_le_10s": report["encoder_s"] <= TARGETS["encoder_s"],
           "kernel_lt_10pct_of_user": None if kernel is None else kernel < TARGETS["system_vs_user"],
           "peak_rss_le_2500mb": None if rss is None else rss <= TARGETS["peak_rss_mb"]}
    return {**{k: v if applies else None for k, v in met.items()}, "applies": applies,
            "defined_for": "CPU, shape 128x256x256"}


# --------------------------------------------------------------------------------- text


def format_report(r: dict) -> str:
    """The report as a human-readable table."""
    d, h, w = r["shape"]
    box = [b - a + 1 for a, b in zip(*r["box"])]
    lines = [
        f"ENSAM interactive benchmark, {r['date']}",
        f"  volume {d}x{h}x{w} phantom ({r['mode']} mode, encoder grid {'x'.join(map(str, r['grid_shape']))}), "
        f"box {'x'.join(map(str, box))} = {100 * r['box_fraction']:.1f}% of the volume",
        f"  grids of at most {r['voxel_budget']:,} voxels"
        + (" (the model's training budget)" if r["voxel_budget"] == r["model"].get("voxel_budget") else ""),
        f"  device {r['device_name']}; CPU {r['cpu']} ({r['cpu_count']} cores); torch {r['torch_version']}, "
        f"{r['torch_threads']} threads" + (f"; GPU {r['gpu']}" if r["gpu"] else ""),
        f"  CPU kernels {r['cpu_isa']['aten_capability']}, native bf16 {r['cpu_isa']['native_bf16']}"
        + "".join(f", {k}={v}" for k, v in r["cpu_isa"]["environment"].items()) + f"; malloc {r['malloc']}",
        f"  model: {r['model']['path'] or 'default architecture'}, {r['parameters'] / 1e6:.2f} M parameters",
    ]
    if r["model"]["note"]:
        lines.append(f"  NOTE: {r['model']['note']}")
    lines += [f"  {r['repeats']} repeats after {r['warmup']} warm-up; clicks: {len(r['clicks'])} per repeat", "",
              f"  {'step':<46}{'median':>10}{'p95':>10}{'n':>5}"]
    rows = [("ENSAM encoder (new image)", "encoder_s", "encoder_s_p95", "ensam_encoder"),
            ("ENSAM set_image (hash + normalise + encode)", "set_image_s_median", "set_image_s_p95", "ensam_set_image"),
            ("ENSAM first box", "box_s_median", "box_s_p95", "ensam_box"),
            ("ENSAM click (embedding cached)", "click_s_median", "click_s_p95", "ensam_click"),
            ("ENSAM merge (merged_labels)", "merge_s_median", "merge_s_p95", "ensam_merge"),
            ("Grow from seeds, first computation", "growcut_first_s", "growcut_first_s_p95", "growcut_first"),
            ("Grow from seeds, update (one more seed)", "growcut_update_s", "growcut_update_s_p95", "growcut_update")]
    for label, median, p95, key in rows:
        if r[median] is not None:
            lines.append(f"  {label:<46}{r[median]:>9.3f}s{r[p95]:>9.3f}s{len(r['samples'][key]):>5}")
    lines.append("")
    if r["click_decode_regions"]:
        kinds = {k: r["click_decoding"].count(k) for k in dict.fromkeys(r["click_decoding"])}
        sizes = sorted(r["click_decode_regions"], key=math.prod)
        lines.append(f"  clicks decoded: {', '.join(f'{n} by {k}' for k, n in kinds.items())} (click_window "
                     f"{r['click_window']}); decoded {'x'.join(map(str, sizes[0]))} to "
                     f"{'x'.join(map(str, sizes[-1]))} voxels (decoder {r['click_decode_s_median']:.3f} s median)")
    if r["window_vs_region_dice"]:
        lines.append("  masks of windowed clicks vs the same clicks decoded over the box region: Dice "
                     + ", ".join(f"{d:.4f}" for d in r["window_vs_region_dice"]))
    if r["click_vs_growcut_update"] is not None:
        lines += [f"  click / Grow-from-seeds update:                {r['click_vs_growcut_update']:.2f}x",
                  f"  first box / Grow-from-seeds first:             {r['box_vs_growcut_first']:.2f}x",
                  f"  (encoder + first box) / Grow-from-seeds first: {r['encoder_plus_box_vs_growcut_first']:.2f}x"]
    cpu = r["ensam_cpu"]
    if cpu is not None:
        kernel = "n/a" if cpu["system_vs_user"] is None else f"{100 * cpu['system_vs_user']:.0f} %"
        lines.append(f"  ENSAM's CPU time: user {cpu['user_s']:.1f} s, kernel {cpu['system_s']:.1f} s ({kernel} of user), "
                     f"{cpu['minor_faults'] / 1e6:.2f} M minor page faults")
    rss = "unknown" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} MB"
    lines.append(f"  peak memory: RSS {rss} (process high-water mark after ENSAM)"
                 + (f", CUDA max allocated {r['cuda_max_memory_allocated_mb']:.0f} MB"
                    if r["cuda_max_memory_allocated_mb"] is not None else ""))
    if r.get("process_boundary"):
        from .boundary import format_boundary

        lines += format_boundary(r["process_boundary"])
    t = r["targets"]
    yes = {True: "met", False: "MISSED", None: "n/a"}
    if t["applies"]:
        lines.append(f"  targets ({t['defined_for']}): click median <= 1 s {yes[t['click_median_le_1s']]}, "
                     f"p95 <= 2 s {yes[t['click_p95_le_2s']]}; first box <= Grow from seeds first "
                     f"{yes[t['box_le_growcut_first']]}; encoder <= 10 s {yes[t['encoder_le_10s']]}; kernel < 10 % "
                     f"of user {yes[t['kernel_lt_10pct_of_user']]}; peak RSS <= 2.5 GB {yes[t['peak_rss_le_2500mb']]}")
    else:
        lines.append(f"  targets: defined for {t['defined_for']}, not checked for this run")
    return "\n".join(lines)
