"""`ensam evaluate`: the CVPR 2025 challenge's 6-step interactive protocol on a folder of cases.

Step 1: one box per class (a case without boxes scores 0 there); steps 2-6: one click per class
from the challenge's click rule on the previous merged prediction. Every step is scored (DSC, NSD at
2 mm) and timed; a case over 90 s per class scores 0. Writes OUT/steps.csv (case, method, step, DSC,
NSD, seconds), OUT/summary.json (DSC_AUC, NSD_AUC, DSC_Final, NSD_Final per case and mean per method;
skipped cases with the reason; each method's setup under "info": device, model, ENSAM's click window)
and OUT/steps.png (mean DSC and NSD per step, one line per method).
Without --method, ENSAM is run with both baselines (growcut, box).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ENSAMSegmentLib.cli.cmd_segment import add_session_arguments, session_options
from ENSAMSegmentLib.cli.common import add_device_argument, check_device, check_model, check_output_folder
from ENSAMSegmentLib.cli.main import UserError

ALL_METHODS = ("ensam", "growcut", "box")


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="run the challenge's 6-step protocol (box + 5 clicks) on cases",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of challenge .npz cases with 'gts'")
    parser.add_argument("--method", action="append", choices=ALL_METHODS, dest="methods",
                        help="method to run (repeatable; default: ensam, growcut and box)")
    parser.add_argument("--checkpoint", type=Path, help="ENSAM model file (default: the default model)")
    add_device_argument(parser)
    add_session_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder for steps.csv, summary.json, steps.png")
    parser.add_argument("--max-cases", type=int, help="only the first N case files (sorted by name)")
    parser.add_argument("--time-limit-per-class", type=float, default=90.0,
                        help="seconds per class for the 6 steps of a case; over it the case scores 0 (default 90)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ENSAMSegmentLib.evaluation.protocol import MethodStepper, evaluate, list_cases
    from ENSAMSegmentLib.evaluation.predictor import MethodError, make_method
    from ENSAMSegmentLib.evaluation.reports import build_summary, plot_steps, write_steps_csv, write_summary_json

    if not args.data.is_dir():
        raise UserError(f"--data {args.data} is not a folder")
    if args.max_cases is not None and args.max_cases < 1:
        raise UserError("--max-cases must be at least 1")
    paths = list_cases(args.data, args.max_cases)
    if not paths:
        raise UserError(f"--data {args.data} holds no .npz case files")
    names = list(dict.fromkeys(args.methods or ALL_METHODS))
    check_output_folder(args.out, "--out")
    check_device(args.device)
    if "ensam" in names:
        check_model(args.checkpoint)
    steppers, infos = [], {}
    for name in names:
        started = time.perf_counter()
        try:
            method = make_method(name, args.checkpoint, args.device, **session_options(args))
        except MethodError as error:
            raise UserError(f"cannot set up the {name} method: {error}") from None
        infos[name] = {**method.describe(), "setup_seconds": round(time.perf_counter() - started, 3)}
        steppers.append(MethodStepper(method))

    try:
        runs, skipped = evaluate(paths, steppers, args.time_limit_per_class,
                                 log=lambda line: print(f"ensam evaluate: {line}", flush=True))
    finally:
        for stepper in steppers:
            stepper.method.close()
    protocol = {"time_limit_per_class_s": args.time_limit_per_class, "data": str(args.data),
                "cases_listed": len(paths),
                "timing": "seconds per step are the method's own calls; model loading (setup_seconds) is once per run"}
    summary = build_summary(runs, skipped, infos, protocol)
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = [write_steps_csv(args.out / "steps.csv", runs), write_summary_json(args.out / "summary.json", summary),
               plot_steps(args.out / "steps.png", summary, title=f"{args.data.name}: {len(paths) - len(skipped)} cases")]
    for name, entry in summary["methods"].items():
        mean = entry["mean"]
        if entry["n_cases"]:
            setup = ", ".join(f"{label} {entry['info'][key]}" for key, label in
                              (("click_window", "click window"), ("voxel_budget", "voxel budget"))
                              if entry["info"].get(key) is not None)
            print(f"{name:8s} n={entry['n_cases']}  " + "  ".join(f"{k} {mean[k]:.3f}" for k in mean)
                  + (f"  ({setup})" if setup else ""))
    if infos.get("ensam", {}).get("model", {}).get("untrained"):
        print("NOTE: the ENSAM model file is UNTRAINED (random weights): its scores are not meaningful.")
    for item in skipped:
        print(f"skipped {item['case']}: {item['reason']}")
    for path in outputs:
        print(f"wrote {path}")
    return 0
