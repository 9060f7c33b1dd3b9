"""`ensam train`, `ensam coreset` and `ensam train-bench`: the training commands of the `ensam` tool.

ENSAMSegmentLib/cli/main.py imports this module when ENSAMTrainingLib is installed and calls
``register(subparsers)``, which adds these three and `ensam data` (data_commands.py). The work is done
by ENSAMTrainingLib/core/, imported only when a command runs.

Exit codes of `ensam train`: 0 finished (or stopped by --stop-after), 2 bad input (one line
on stderr, and an "error" event on the progress stream), 3 interrupted by SIGINT/SIGTERM
after writing a checkpoint (continue with --resume), 1 an unexpected error (traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from ENSAMTrainingLib.runs.command import DEFAULT_VOXEL_BUDGET  # torch-free: the tool's help needs no torch

# core/ (the trainer, the data, the benchmarks) imports torch: imported where a command runs, so that
# `ensam --help` and argument errors answer at once.

TRAIN_HELP = """\
Train ENSAM (or fine-tune a model file with --init-model) on challenge .npz files or image/label
pairs under --data. Writes RUN_DIR/checkpoint.pt (every --checkpoint-minutes, each epoch, on
SIGINT/SIGTERM), metrics.csv, validation.csv, loss.png and, at the end, RUN_DIR/model.pt.
--resume continues RUN_DIR exactly. Under `torchrun --nproc_per_node N` it trains with
DistributedDataParallel, also on a CPU (gloo; torchrun gives each process one thread: on 2 cores
2 processes train faster than 1 of 2 threads, `ensam train-bench throughput --processes 2`);
--accumulation counts samples per process, and both may change when resuming from a checkpoint
taken at an epoch's end. --progress-json - writes JSON-lines events to stdout
(ENSAMTrainingLib.core.progress documents them)."""


def _user_error(message: str) -> Exception:
    from ENSAMSegmentLib.cli.main import UserError

    return UserError(message)


def _json_arg(text: str) -> dict:
    """A JSON object given inline or as a path to a .json file."""
    try:
        value = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"not a JSON object or JSON file: {text} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------- ensam train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train or fine-tune ENSAM", description=TRAIN_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of .npz cases (also <Modality>/<Dataset>/<case>.npz) or image/label pairs")
    p.add_argument("--cases", help="case list (e.g. from `ensam coreset`), paths relative to --data")
    p.add_argument("--synthetic", metavar="DIR", help="label maps (files, pairs' labels, .npz gts): each sample's "
                   "image is synthesised from them (SynthSeg-style, ENSAMTrainingLib.core.synth); alone, or with --data")
    p.add_argument("--synth-probability", type=float, metavar="P",
                   help="chance that a sample of a real --data case gets a synthesised image instead (0)")
    p.add_argument("--procedural", type=int, metavar="N", help="procedural scenes (tubes, vessel trees, lesions, "
                   "sheets, blobs) added to every epoch (0)")
    p.add_argument("--repeat", type=_positive_int, metavar="K",
                   help="visit every --data case and --synthetic label map K times an epoch (1)")
    p.add_argument("--out", "-o", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--export", metavar="MODEL", help="write the latest checkpoint of the run in --out as a model "
                   "file MODEL (also of a run stopped early) and exit")
    p.add_argument("--fp16", action="store_true", help="with --export: half-precision weights (half the size)")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default 15)")
    p.add_argument("--voxel-budget", type=_positive_int, help=f"largest patch in voxels (default {DEFAULT_VOXEL_BUDGET})")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--init-model", help="model file to fine-tune instead of training from scratch")
    p.add_argument("--val-cases", help="case list of held-out validation cases")
    p.add_argument("--val-fraction", type=float, help="fraction held out for validation when no --val-cases (0.05)")
    p.add_argument("--val-max", type=int, help="at most this many validation cases (20)")
    p.add_argument("--checkpoint-minutes", type=float, help="minutes between checkpoints (30)")
    p.add_argument("--progress-json", metavar="PATH|-", help="JSON-lines progress events to a file, or - for stdout")
    p.add_argument("--optimizer", choices=("muon", "adamw"), help="muon: Muon + AdamW (default); adamw: AdamW only")
    p.add_argument("--muon-lr", type=float, help="initial Muon learning rate (0.02)")
    p.add_argument("--adamw-lr", type=float, help="initial AdamW learning rate (3e-4)")
    p.add_argument("--accumulation", type=_positive_int, help="samples per optimizer step (4)")
    p.add_argument("--clicks", type=int, help="simulated clicks after the box (5)")
    p.add_argument("--grad-clicks", type=int, help="click steps per sample that keep gradients, at random "
                   "(default: all; fewer = cheaper samples, the other clicks still run without gradients)")
    p.add_argument("--challenge-box-probability", type=float,
                   help="share of boxes drawn the challenge's way: z range x the middle slice's extent (0.5)")
    p.add_argument("--other-object-probability", type=float,
                   help="share of samples whose target is another object near the one the crop is drawn around, "
                        "so that the box, not the crop's centre, says which object is meant (0.25)")
    p.add_argument("--scale-lr-factor", type=float, help="learning rate of the nGPT scales = AdamW's x this (10)")
    p.add_argument("--workers", type=int, help="data loader processes (default: min(8, CPUs - 1))")
    p.add_argument("--seed", type=int, help="seed of data order, crops, augmentation, clicks, initial weights (0)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="no intensity augmentation")
    p.add_argument("--model-config", type=_json_arg, help="ENSAMConfig fields of a new model, as JSON or a .json file")
    p.add_argument("--position-encoding", choices=("liere", "absolute"), help="positional encoding of a new model")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None,
                   help="train in float32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    p.add_argument("--stop-after", type=_positive_int, help="stop with a checkpoint after this many optimizer steps")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=None)
    p.set_defaults(func=run_train)
    return p


def _export(args) -> int:
    import torch

    from ENSAMTrainingLib.core.checkpoint import CheckpointError
    from ENSAMTrainingLib.core.trainer import export_model

    try:
        path = export_model(args.out, args.export, torch.float16 if args.fp16 else None)
    except (CheckpointError, OSError) as error:
        raise _user_error(f"cannot export {args.out}: {error}") from None
    print(f"wrote {path}")
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_train(args) -> int:
    from ENSAMTrainingLib.core.progress import ProgressStream
    from ENSAMTrainingLib.core.trainer import EXIT_INTERRUPTED, RESUME_OVERRIDES, TrainConfig, TrainingError, resume, train

    if args.export:
        return _export(args)
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("func", "command", "resume", "export", "fp16")}
    if args.position_encoding:
        model_config = dict(given.pop("model_config", {}) or {})
        model_config["position_encoding"] = given.pop("position_encoding")
        given["model_config"] = model_config
    if given.get("init_model") and given.get("model_config"):
        print("ensam train: the architecture comes from --init-model; ignoring --model-config/--position-encoding",
              file=sys.stderr)
    from ENSAMTrainingLib.core.cases import DataError
    from ENSAMTrainingLib.core.runlock import RunLock, RunLockedError

    progress = ProgressStream(args.progress_json if _rank() == 0 else None)
    lock = RunLock(args.out) if _rank() == 0 else None  # one training process per run folder (core/runlock.py)
    try:
        if lock is not None:
            lock.acquire()
        if args.resume:
            ignored = sorted(k for k in given if k not in RESUME_OVERRIDES and k != "out")
            if ignored:
                print(f"ensam train: --resume keeps the run's settings; ignoring {', '.join(ignored)}", file=sys.stderr)
            result = resume(args.out, progress, **{k: v for k, v in given.items() if k in RESUME_OVERRIDES})
        else:
            if not args.data and not args.synthetic:
                raise TrainingError("--data or --synthetic is required (unless --resume)")
            result = train(TrainConfig(**{"data": "", **given}), progress)
    except (TrainingError, DataError, RunLockedError) as error:
        progress.emit("error", message=str(error), type=type(error).__name__)
        raise _user_error(str(error)) from None
    finally:
        progress.close()
        if lock is not None:
            lock.release()
    if result.status == "interrupted":
        print(f"ensam train: interrupted; continue with: ensam train --out {args.out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.model is not None:
        print(f"ensam train: model written to {result.model}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- ensam coreset


def add_coreset_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "coreset",
        help="select a training coreset: equal counts per dataset, bad cases skipped",
        description="Select --fraction of the cases under --data (at most --max), the same number from every "
        "dataset, skipping unreadable cases, uint8 label overflow and broken normalisation "
        "(ENSAMTrainingLib.core.coreset documents the criteria). Writes the case list and LIST-stem.report.json.",
    )
    p.add_argument("--data", required=True, help="folder of cases (as for `ensam train`)")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of all cases (default 0.1)")
    p.add_argument("--max", dest="max_cases", type=_positive_int, help="at most this many cases")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                   help="datasets to leave out: dataset or modality names, Modality/Dataset, wildcards allowed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes checking cases in parallel")
    p.add_argument("-o", "--output", required=True, help="case list to write (one case per line)")
    p.add_argument("--report", help="JSON report path (default: beside the list, <stem>.report.json)")
    p.set_defaults(func=run_coreset)
    return p


def run_coreset(args) -> int:
    from ENSAMTrainingLib.core.cases import DataError
    from ENSAMTrainingLib.core.coreset import select_coreset, write_coreset

    try:
        result = select_coreset(args.data, args.fraction, args.max_cases, args.exclude, args.seed, args.workers)
    except DataError as error:
        raise _user_error(str(error)) from None
    report = write_coreset(result, args.output, args.report)
    print(result.format())
    print(f"\nwrote {args.output} and {report}")
    return 0


# ---------------------------------------------------------------------------- registration


def register(subparsers) -> None:
    """Add `train`, `coreset` and `train-bench` to the `ensam` tool."""
    add_train_parser(subparsers)
    add_coreset_parser(subparsers)
    from .data_commands import add_data_parser

    add_data_parser(subparsers)
    add_bench_parser(subparsers)


# ---------------------------------------------------------------------------- ensam train-bench


def _later(module: str, name: str):
    """The command function `name` of ENSAMTrainingLib.core.`module`, imported only when the command runs."""
    def run(args) -> int:
        return getattr(importlib.import_module(f"ENSAMTrainingLib.core.{module}"), name)(args)

    return run


def _shape(text: str) -> tuple[int, int, int]:
    """'D,H,W' as `ensam bench --shape` takes it (the older 'DxHxW' too)."""
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64,64,64 (D,H,W = z,y,x), got {text}") from None
    if len(shape) != 3 or any(s < 8 or s % 8 for s in shape):
        raise argparse.ArgumentTypeError(f"shape must be 3 multiples of 8, got {text}")
    return shape


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """`ensam train-bench`; its commands live in core/bench.py, which imports torch: loaded when one runs."""
    p = subparsers.add_parser("train-bench", help="training benchmarks: the paper's ablation, throughput")
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    a = sub.add_parser("ablation", help="absolute+AdamW vs LieRE+AdamW vs LieRE+Muon: loss curves")
    a.add_argument("--out", "-o", required=True)
    a.add_argument("--data", help="training data (default: phantoms generated in OUT/data)")
    a.add_argument("--steps", type=int, default=60)
    a.add_argument("--voxel-budget", type=int, default=32_768)
    a.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    a.add_argument("--model-config", type=json.loads, help="ENSAMConfig fields as JSON")
    a.set_defaults(func=_later("bench", "_run_ablation_cmd"))
    u = sub.add_parser("prompts", help="does the box decide? two identical spheres, a box on one, per setting")
    u.add_argument("--steps", type=int, default=200)
    u.add_argument("--image-alpha", type=float, nargs="+", default=[0.05, 0.3, 0.5])
    u.add_argument("--scale-lr-factor", type=float, nargs="+", default=[1.0, 10.0])
    u.add_argument("--out", help="write the results as JSON here")
    u.set_defaults(func=_later("bench", "_run_prompts_cmd"))
    t = sub.add_parser("throughput", help="samples/s and peak memory of the training step per patch shape")
    t.add_argument("--shapes", type=_shape, nargs="+", default=[(64, 64, 64), (64, 128, 128)], metavar="D,H,W",
                   help="patch shapes z,y,x, each a multiple of 8 (default: 64,64,64 64,128,128)")
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    t.add_argument("--model-config", type=json.loads, help="ENSAMConfig fields as JSON")
    t.add_argument("--no-amp", dest="amp", action="store_false", help="float32 (default: bf16 where training uses it)")
    t.add_argument("--grad-clicks", type=int, help="click steps with gradients per sample (default: all)")
    t.add_argument("--system-malloc", dest="tune_malloc", action="store_false",
                   help="leave glibc's malloc as it is (default: freed memory kept, as the trainer does)")
    t.add_argument("--processes", type=int, default=1,
                   help="CPU data-parallel processes sharing the cores, as `torchrun --nproc_per_node N ensam "
                        "train` runs them (default 1)")
    t.add_argument("--out", help="write the results as JSON here")
    t.set_defaults(func=_later("bench", "_run_throughput_cmd"))
    return p
