"""`ensam bench`: interactive speed of ENSAM against Slicer's "Grow from seeds", same volume, same run.

On a synthetic CT phantom (default 128 x 256 x 256) with a box of 1/8 of the volume around the liver
and 3 clicks inside it: median and p95, after warm-up, of the encoder pass (a new image each repeat),
the first box, a click with the embedding cached, the merge; peak memory; and Grow from seeds
(vtkImageGrowCutSegment from slicer-core) from the same prompts, timed as the Segment Editor runs it:
its first computation, then an update after one more seed with the same filter reused; the CPU time
(user, kernel, page faults) of the ENSAM part and the CPU's instruction set (ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 emulate an AVX2-only CPU on a newer one).
Without a model file an untrained model of the default architecture is used (a click's time depends
a little on the weights: its decoding window grows when the mask changes at the window's faces).
Details: ENSAMSegmentLib/evaluation/benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ENSAMSegmentLib.cli.cmd_segment import add_click_window_argument, voxel_count
from ENSAMSegmentLib.cli.common import check_device
from ENSAMSegmentLib.cli.main import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time ENSAM's encoder, box, click and merge against Grow from seeds",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="compute device (default: auto = cuda when available)")
    parser.add_argument("--shape", default="128,256,256", help="volume shape D,H,W (default 128,256,256)")
    parser.add_argument("--repeats", type=int, default=5, help="measured repeats (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded warm-up repeats (default 1)")
    parser.add_argument("--checkpoint", type=Path,
                        help="ENSAM model file (default: the default model, else an untrained one)")
    parser.add_argument("--no-growcut", action="store_true", help="skip Grow from seeds")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto (default): bf16 on GPUs and on CPUs with native bf16, else fp32")
    add_click_window_argument(parser)
    parser.add_argument("--voxel-budget", type=voxel_count, default=None, metavar="N",
                        help="largest grid the session works on, in voxels (default: the budget the model file "
                             "records, as every front-end uses it; else 8388608 = 128x256x256 at native resolution)")
    parser.add_argument("--no-agreement", action="store_true",
                        help="skip the untimed pass comparing windowed clicks with clicks decoded over the box region")
    parser.add_argument("--worker", action="store_true",
                        help="also run the clicks through the inference worker process the Slicer module uses and "
                             "report what the process boundary costs per click (evaluation/boundary.py)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave malloc as it is (default: keep freed memory for reuse, as the inference worker does)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ENSAMSegmentLib.evaluation.benchmark import BenchmarkError, format_report, parse_shape, run_benchmark

    try:  # settings first: refused before torch loads
        shape = parse_shape(args.shape)
    except BenchmarkError as error:
        raise UserError(str(error)) from None
    check_device(args.device)
    from ENSAMSegmentLib.core.session import SessionError
    from ENSAMSegmentLib.evaluation.growcut import GrowCutError

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        report = run_benchmark(shape, args.device, args.repeats, args.warmup,
                               args.checkpoint, growcut=not args.no_growcut, progress=progress,
                               precision=args.precision, click_window=args.click_window,
                               agreement=not args.no_agreement, tune_malloc=not args.system_malloc,
                               worker=args.worker, voxel_budget=args.voxel_budget)
    except (BenchmarkError, SessionError, GrowCutError) as error:
        raise UserError(str(error)) from None
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
