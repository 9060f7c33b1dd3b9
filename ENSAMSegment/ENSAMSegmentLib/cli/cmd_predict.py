"""`ensam predict`: the CVPR 2025 challenge container contract.

Reads every case file INPUT/*.npz (``imgs``, ``spacing``, ``boxes``; at later steps also ``clicks``,
``clicks_order`` and ``prev_pred``) and writes OUTPUT/<case>.npz with ``segs`` (uint8, label i for
the i-th class). A case with boxes and no clicks is step 1 (one box per class); with clicks, every
prompt given so far is replayed in protocol order (the box, then the click rounds of clicks_order),
so the result equals the interactive loop of `ensam evaluate`. ``prev_pred`` is checked against the
replay's previous step. A failing case is reported and the others go on (exit code 1 at the end).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ENSAMSegmentLib.cli.cmd_segment import add_session_arguments, session_options
from ENSAMSegmentLib.cli.common import add_device_argument, check_device, check_model, check_output_folder
from ENSAMSegmentLib.cli.main import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="challenge predictor: INPUT/*.npz cases -> OUTPUT/*.npz segs",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="folder of case .npz files")
    parser.add_argument("--output", type=Path, required=True, help="folder for the <case>.npz predictions")
    parser.add_argument("--checkpoint", type=Path, help="ENSAM model file (default: the default model)")
    add_device_argument(parser)
    add_session_arguments(parser)
    parser.add_argument("--method", default="ensam", choices=["ensam", "growcut", "box"],
                        help="predictor (default ensam; growcut and box are the baselines)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ENSAMSegmentLib.evaluation.predictor import MethodError, make_method, predict_folder

    if not args.input.is_dir():
        raise UserError(f"--input {args.input} is not a folder")
    if not any(args.input.glob("*.npz")):
        raise UserError(f"--input {args.input} holds no .npz case files")
    check_output_folder(args.output, "--output")
    check_device(args.device)
    if args.method == "ensam":
        check_model(args.checkpoint)
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        method = make_method(args.method, args.checkpoint, args.device, **session_options(args))
    except MethodError as error:
        raise UserError(f"cannot set up the {args.method} predictor: {error}") from None
    try:
        failures = predict_folder(args.input, args.output, method,
                                  log=lambda line: print(f"ensam predict: {line}", flush=True))
    finally:
        method.close()
    for failure in failures:
        print(f"ensam predict: no output for {failure['case']}: {failure['reason']}", file=sys.stderr)
    return 1 if failures else 0

