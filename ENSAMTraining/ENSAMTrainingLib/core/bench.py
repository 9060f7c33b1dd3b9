"""Training benchmarks (not tests): the paper's ablation at small scale, and training throughput.

``ensam train-bench ablation --out DIR [--data DIR] [--steps 60] [--voxel-budget N] [--device D]``
    Trains three variants with the same seed, data, samples and steps: absolute positions +
    AdamW, LieRE + AdamW, LieRE + Muon (paper, Fig. 4). Writes DIR/<variant>/ (ordinary run
    folders), DIR/ablation.csv (step, then one training-loss column per variant) and
    DIR/ablation.png. Without --data, a synthetic phantom set is generated in DIR/data.
    Function: ``run_ablation``.

``ensam train-bench throughput [--shapes 64,64,64 128,128,128 ...] [--steps 3] [--device D]``
    Samples per second and peak memory of the whole training step (encoder, box + 5 click
    steps, backward, Muon + AdamW step, renormalisation) at each patch shape, on a phantom.
    Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the process's peak
    resident set size (a high-water mark over the whole process, so only increases).
    Function: ``measure_throughput``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .cases import find_cases
from .data import Sample, samples_per_rank
from .logs import read_csv
from .plots import plot_curves

ABLATION_VARIANTS = {
    # name: (positional encoding, optimizer)
    "absolute+adamw": ("absolute", "adamw"),
    "liere+adamw": ("liere", "adamw"),
    "liere+muon": ("liere", "muon"),
}


def run_ablation(
    out: str | Path,
    data: str | Path | None = None,
    steps: int = 60,
    voxel_budget: int = 32_768,
    device: str = "auto",
    model_config: dict | None = None,
    n_cases: int = 8,
    seed: int = 0,
    progress_bar: bool = True,
) -> dict[str, list[float]]:
    """Train the three ablation variants for ``steps`` optimizer steps each; returns loss per variant."""
    from .trainer import TrainConfig, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        from ENSAMSegmentLib.core.phantom import write_challenge_dataset

        data = out / "data"
        if not any(data.glob("*.npz")):
            write_challenge_dataset(data, n_cases, shape=(48, 64, 64), seed=seed)
    n_train = len(find_cases(data))
    accumulation = 4
    epochs = math.ceil(steps / math.ceil(samples_per_rank(n_train, 1) / accumulation))
    losses: dict[str, list[float]] = {}
    for name, (encoding, optimizer) in ABLATION_VARIANTS.items():
        run_dir = out / name
        config = TrainConfig(
            data=str(data),
            out=str(run_dir),
            epochs=epochs,
            voxel_budget=voxel_budget,
            device=device,
            val_fraction=0.0,
            optimizer=optimizer,
            model_config={**(model_config or {}), "position_encoding": encoding},
            seed=seed,
            accumulation=accumulation,
            stop_after=steps,
            progress_bar=progress_bar,
            checkpoint_minutes=1e9,
        )
        if not (run_dir / "checkpoint.pt").exists():
            print(f"ablation: training {name}", file=sys.stderr)
            train(config)
        losses[name] = [row["loss"] for row in read_csv(run_dir / "metrics.csv")][:steps]
    n = min(len(v) for v in losses.values())
    with open(out / "ablation.csv", "w") as f:
        f.write("step," + ",".join(losses) + "\n")
        for i in range(n):
            f.write(f"{i + 1}," + ",".join(f"{losses[k][i]:.6g}" for k in losses) + "\n")
    curves = {k: (np.arange(1, n + 1), np.array(v[:n])) for k, v in losses.items()}
    plot_curves(curves, out / "ablation.png", title=f"ablation: training loss, {n} steps, budget {voxel_budget} voxels")
    return losses


TOY_SHAPE = (16, 32, 32)
TOY_MODEL = dict(init_filters=8, mlp_hidden=256)


def two_spheres(rng: np.random.Generator, shape=TOY_SHAPE):
    """(image [1,1,D,H,W], target [1,1,D,H,W], box of the target, the other sphere [D,H,W] bool): two
    identical bright spheres of radius 4.5, apart in y/x; the target is one of them at random."""
    z, y, x = np.indices(shape)
    while True:
        centres = [(rng.integers(6, shape[0] - 6), rng.integers(6, shape[1] - 6), rng.integers(6, shape[2] - 6))
                   for _ in range(2)]
        if max(abs(centres[0][1] - centres[1][1]), abs(centres[0][2] - centres[1][2])) > 12:
            break
    balls = [(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < 4.5**2 for c in centres]
    image = 0.2 + 0.6 * (balls[0] | balls[1]) + 0.05 * rng.standard_normal(shape)
    k = int(rng.integers(2))
    idx = np.argwhere(balls[k])
    box = (tuple(int(v) for v in idx.min(0)), tuple(int(v) for v in idx.max(0)))
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    return as_tensor(image), as_tensor(balls[k]), box, balls[1 - k]


def prompt_use(model, cases) -> tuple[float, float]:
    """(mean DSC with the right box, mean share of the other sphere segmented) over `cases`."""
    from ENSAMSegmentLib.core.metrics import dice
    from ENSAMSegmentLib.core.network import Prompts

    right, wrong = [], []
    with torch.no_grad():
        for image, target, box, other in cases:
            seg = (model(image, Prompts.from_objects([{"box": box}]))[0, 0] > 0).numpy()
            right.append(dice(target[0, 0].numpy() > 0, seg))
            wrong.append((seg & other).sum() / other.sum())
    return float(np.mean(right)), float(np.mean(wrong))


def prompt_sensitivity(image_alpha: float, seed: int = 0) -> dict:
    """How much the prompts move the output of an untrained paper-size model (image alpha `image_alpha`)
    on a 48x64x64 blob: % of voxels flipped by moving the box to a far corner, % flipped by a
    foreground click (same fed-back logits), cosine of the image tokens before/after the interaction."""
    from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts

    torch.manual_seed(seed)
    model = ENSAM(ENSAMConfig(image_alpha_init=image_alpha)).eval()
    z, y, x = np.indices((48, 64, 64))
    blob = (z - 24) ** 2 / 100 + (y - 32) ** 2 / 200 + (x - 32) ** 2 / 200 < 1
    noise = 0.05 * np.random.default_rng(seed).standard_normal(blob.shape)
    image = torch.tensor(0.3 + 0.4 * blob + noise, dtype=torch.float32)[None, None]
    box, far = ((14, 18, 18), (34, 46, 46)), ((0, 0, 0), (20, 28, 28))
    flipped = lambda a, b: 100 * float(((a > 0) != (b > 0)).float().mean())  # noqa: E731
    with torch.no_grad():
        emb = model.encode(image)
        boxed = model.decode(emb, Prompts.from_objects([{"box": box}]))
        moved = model.decode(emb, Prompts.from_objects([{"box": far}]))
        same = model.decode(emb, Prompts.from_objects([{"box": box}]), prev_logits=boxed)
        clicked = model.decode(emb, Prompts.from_objects([{"box": box, "fg": [(24, 32, 32)]}]), prev_logits=boxed)
        tokens = model.interact(emb, Prompts.from_objects([{"box": box}])).image
        before = emb.bottleneck.flatten(2).transpose(1, 2)
        cosine = float((tokens * before / before.norm(dim=-1, keepdim=True)).sum(-1).mean())
    return dict(box_moved_flips_pct=flipped(boxed, moved), click_flips_pct=flipped(same, clicked),
                image_token_cosine=cosine)


def run_prompt_use(image_alpha: float, scale_lr_factor: float, steps: int = 200, seed: int = 0,
                   every: int = 25) -> list[dict]:
    """Train TOY_MODEL on `two_spheres` (one sample per Muon + AdamW step); rows of prompt_use every `every` steps."""
    from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts, renormalize_weights

    from .loss import segmentation_loss
    from .optim import make_optimizers

    torch.manual_seed(seed)
    model = ENSAM(ENSAMConfig(**TOY_MODEL, image_alpha_init=image_alpha))
    optimizers = make_optimizers(model, scale_lr_factor=scale_lr_factor)
    rng = np.random.default_rng(seed)
    held_out = [two_spheres(np.random.default_rng([seed, 1000, i])) for i in range(8)]
    rows = []
    for step in range(1, steps + 1):
        image, target, box, _ = two_spheres(rng)
        segmentation_loss(model(image, Prompts.from_objects([{"box": box}])), target).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        renormalize_weights(model)
        if step % every == 0 or step == steps:
            model.eval()
            dsc, wrong = prompt_use(model, held_out)
            model.train()
            rows.append(dict(step=step, dsc=dsc, other_sphere=wrong))
    return rows


def phantom_sample(shape: tuple[int, int, int], seed: int = 0) -> Sample:
    """A training sample of exactly ``shape`` (multiples of 8): phantom CT, its liver, a box."""
    from ENSAMSegmentLib.core.intensity import to_uint8
    from ENSAMSegmentLib.core.phantom import make_phantom
    from ENSAMSegmentLib.core.simulation import random_box_3d

    image, labels = make_phantom(shape, seed, n_objects=3)
    mask = labels == 1
    box = random_box_3d(mask, np.random.default_rng(seed))
    return Sample(
        image=torch.from_numpy(to_uint8(image, "ct").astype(np.float32) / 255.0)[None, None],
        target=torch.from_numpy(mask.astype(np.float32))[None, None],
        box=tuple(tuple(int(v) for v in c) for c in box),
        spacing=(2.0, 1.0, 1.0),
        shape=tuple(shape),
        case="phantom",
        label=1,
        click_seed=seed,
    )


def measure_throughput(
    shapes: list[tuple[int, int, int]],
    device: str = "auto",
    steps: int = 3,
    model_config: dict | None = None,
    amp: bool = True,
    grad_clicks: int | None = None,
    tune_malloc: bool = True,
    processes: int = 1,
) -> list[dict]:
    """Per shape: samples/s of the full training step (after one warm-up) and peak memory in MiB.
    amp: bf16 autocast where training uses it (step.autocast_for); grad_clicks: see InteractiveStep;
    tune_malloc: keep freed memory (devices.keep_freed_memory) on the CPU, as the trainer does.
    processes > 1 (CPU): that many data-parallel processes, as `torchrun --nproc_per_node N ensam
    train` runs them (gloo, DistributedDataParallel, the cores shared out), all on the same sample so
    that they keep step; samples/s counts all of them."""
    if processes > 1:
        return _parallel_throughput(shapes, device, steps, model_config, amp, grad_clicks, tune_malloc, processes)
    results = []
    for shape, timed in _timed_samples(shapes, device, steps, model_config, amp, grad_clicks, tune_malloc):
        results.append(_row(shape, timed, 1.0 / float(np.mean(timed["times"]))))
        print(_format_row(results[-1]), file=sys.stderr)
    return results


def _timed_samples(shapes, device, steps, model_config, amp, grad_clicks, tune_malloc, ddp_rank=None):
    """Yield (shape, timings) per shape: `steps` full training samples after one warm-up. ddp_rank:
    inside a process group, the step runs under DistributedDataParallel (as the trainer's does)."""
    from .optim import make_optimizers
    from .step import InteractiveStep
    from .runsetup import TrainConfig, build_model, pick_device, renormalize

    torch_device = pick_device(device)
    malloc = "default"
    if torch_device.type == "cpu" and tune_malloc:  # as the trainer does
        from ENSAMSegmentLib.core.devices import keep_freed_memory

        malloc = "freed memory kept" if keep_freed_memory() else malloc
    config = TrainConfig(data="", out="", model_config=model_config)
    model = build_model(config, torch_device)
    optimizers = make_optimizers(model)
    # every interaction step runs (no early end when a click changes nothing): the cost of a full sample
    step = InteractiveStep(model, amp=amp, grad_clicks=grad_clicks, stop_when_stuck=False)
    if ddp_rank is not None:
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch_device.index] if torch_device.type == "cuda" else None
        step = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)
    for shape in shapes:
        sample = phantom_sample(shape)  # the same sample on every rank: they keep step
        if torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(torch_device)
        times, cpu_times = [], []
        for i in range(steps + 1):
            _sync(torch_device)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss, last_losses = step(sample)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            renormalize(model)
            _sync(torch_device)
            if i > 0:  # the first run warms up (allocations, kernel choice)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        if torch_device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(torch_device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        yield shape, dict(device=str(torch_device), amp=amp, grad_clicks=grad_clicks, malloc=malloc,
                          threads=torch.get_num_threads(), steps_run=len(last_losses), times=times, cpu_times=cpu_times, peak=peak,
                          peak_kind="cuda allocated" if torch_device.type == "cuda" else "process max RSS")


def _row(shape, timed: dict, samples_per_s: float, processes: int = 1) -> dict:
    return dict(
        shape="x".join(map(str, shape)),
        voxels=int(np.prod(shape)),
        device=timed["device"],
        amp=timed["amp"],
        grad_clicks=timed["grad_clicks"],
        malloc=timed["malloc"],
        processes=processes,
        threads_per_process=timed["threads"],
        steps_run=timed["steps_run"],
        samples_per_s=samples_per_s,
        seconds_per_sample=1.0 / samples_per_s,
        cpu_seconds_per_sample=float(np.mean(timed["cpu_times"])),  # all threads; robust to a busy machine
        peak_memory_mib=timed["peak"],
        peak_memory_kind=timed["peak_kind"],
    )


def _parallel_throughput(shapes, device, steps, model_config, amp, grad_clicks, tune_malloc, processes) -> list[dict]:
    """measure_throughput with `processes` CPU processes in a gloo group, torch's threads shared out."""
    import socket

    import torch.multiprocessing as mp

    if device not in ("auto", "cpu"):
        raise ValueError("--processes measures CPU data parallelism; on GPUs time torchrun's own runs")
    threads = max(1, torch.get_num_threads() // processes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    args = (processes, port, threads, (shapes, "cpu", steps, model_config, amp, grad_clicks, tune_malloc), queue)
    mp.start_processes(_throughput_rank, args=args, nprocs=processes, start_method="spawn")
    by_rank = dict(queue.get() for _ in range(processes))
    results = []
    for i, shape in enumerate(shapes):
        ranks = [by_rank[r][i] for r in range(processes)]
        # every sample ends in the gradients' all-reduce, so the ranks keep step; the slowest sets the pace
        seconds = max(float(np.mean(t["times"])) for t in ranks)
        timed = dict(ranks[0], cpu_times=[c for t in ranks for c in t["cpu_times"]],
                     peak=sum(t["peak"] for t in ranks), peak_kind=f"max RSS of the {processes} processes, summed")
        results.append(_row(shape, timed, processes / seconds, processes))
        print(_format_row(results[-1]), file=sys.stderr)
    return results


def _throughput_rank(rank: int, world: int, port: int, threads: int, measure_args: tuple, queue) -> None:
    """One process of _parallel_throughput: joins the group as torchrun would set it up, measures."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    try:
        queue.put((rank, [timed for _, timed in _timed_samples(*measure_args, ddp_rank=rank)]))
    finally:
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _format_row(r: dict) -> str:
    return (
        f"{r['shape']:>14} {r['voxels']:>10} voxels  {r['samples_per_s']:8.3f} samples/s  "
        f"{r['cpu_seconds_per_sample']:7.1f} CPU s/sample  "
        f"({r['steps_run']} interaction steps, amp {r['amp']}, grad clicks {r['grad_clicks']}, malloc {r['malloc']}, "
        f"{r['processes']} process(es) x {r['threads_per_process']} thread(s))  "
        f"{r['peak_memory_mib']:9.0f} MiB ({r['peak_memory_kind']})"
    )


def _run_ablation_cmd(args) -> int:
    losses = run_ablation(args.out, args.data, args.steps, args.voxel_budget, args.device, args.model_config)
    for name, values in losses.items():
        tail = values[-max(1, len(values) // 5):]
        print(f"{name:>16}: first loss {values[0]:.4f}, mean of the last 20% {np.mean(tail):.4f}")
    print(f"wrote {Path(args.out) / 'ablation.csv'} and {Path(args.out) / 'ablation.png'}")
    return 0


def _run_prompts_cmd(args) -> int:
    results = []
    for alpha in args.image_alpha:
        at_init = prompt_sensitivity(alpha)
        print(f"image alpha {alpha:<5} at init (paper-size model): moving the box flips "
              f"{at_init['box_moved_flips_pct']:.2f} % of the voxels, a click {at_init['click_flips_pct']:.2f} %, "
              f"image tokens before/after the interaction: cosine {at_init['image_token_cosine']:.3f}")
        results.append(dict(image_alpha_init=alpha, at_init=at_init))
        for factor in args.scale_lr_factor:
            rows = run_prompt_use(alpha, factor, args.steps)
            decided = next((r["step"] for r in rows if r["dsc"] > 0.85 and r["other_sphere"] < 0.1), None)
            results.append(dict(image_alpha_init=alpha, scale_lr_factor=factor, decided_at_step=decided, rows=rows))
            last = rows[-1]
            print(f"image alpha {alpha:<5} scale lr x{factor:<4}: box decides (DSC > 0.85, other sphere < 10 %) "
                  f"at step {decided}; after {last['step']}: DSC {last['dsc']:.3f}, other sphere {last['other_sphere']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _run_throughput_cmd(args) -> int:
    results = measure_throughput(args.shapes, args.device, args.steps, args.model_config, args.amp,
                                 args.grad_clicks, args.tune_malloc, args.processes)
    for r in results:
        print(_format_row(r))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0
