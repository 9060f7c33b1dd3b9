"""`ensam info`: what a model file holds: what it was trained on, its architecture, size and compute.

Without --checkpoint: the default model file, the one the other commands use without --checkpoint.

Compute is counted analytically for one object with a box prompt, encode + decode, at the largest
training patch (128 x 128 x 256 = 4,194,304 voxels): multiply-accumulates (MACs) and FLOPs = 2 x MACs.
The paper's "368 G FLOPs" corresponds to this MAC count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ENSAMSegmentLib.cli.common import UNTRAINED_NOTE, check_model
from ENSAMSegmentLib.cli.main import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show a model file's training data, architecture, size and compute",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path,
                        help="ENSAM model file (default: the default model file that the other commands use)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def describe(checkpoint: Path | None) -> dict:
    """The model file's report; without `checkpoint`, the default model file's, or, when that file
    is missing, the default architecture's with `missing` saying what to do."""
    from ENSAMSegmentLib.core.modelfile import (
        ModelFileError, default_model_path, missing_model_message, read_model_info,
    )
    from ENSAMSegmentLib.core.network import ENSAMConfig
    from ENSAMSegmentLib.core.network.complexity import summary

    path, missing = checkpoint or default_model_path(), None
    info = None
    if checkpoint is None and not path.is_file():
        missing = missing_model_message(path)
    else:
        check_model(checkpoint)
        try:
            info = read_model_info(path)
        except ModelFileError as error:
            raise UserError(str(error)) from None
    config = info.config if info else ENSAMConfig()
    report = summary(config)
    if info:
        report["parameters"] = info.parameters
    report.update(checkpoint=str(Path(path).resolve()), default=checkpoint is None, missing=missing,
                  config=config.to_dict(), metadata=info.metadata() if info else None)
    return report


def run(args) -> int:
    report = describe(args.checkpoint)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = report["metadata"]
    print("ENSAM model")
    print(f"  model file: {report['checkpoint']}" + (" (the default model)" if report["default"] else ""))
    if report["missing"]:
        print(f"  MISSING: {report['missing']}.")
        print("  Below: the default architecture, without weights.")
    else:
        print(f"  trained on: {meta['training_data']}")
        if meta["untrained"]:
            print(f"  {UNTRAINED_NOTE}")
    print(f"  parameters: {report['parameters']:,} ({report['parameters'] / 1e6:.2f} M)")
    d, h, w = report["max_patch"]
    print(f"  compute, one object with a box, encode + decode, at {d}x{h}x{w} "
          f"({report['max_patch_voxels']:,} voxels):")
    print(f"    {report['gmacs_max_patch']:.1f} G MACs = {report['gflops_max_patch']:.1f} G FLOPs "
          "(the paper's '368 G FLOPs' corresponds to MACs)")
    print("  architecture:")
    for key, value in report["config"].items():
        print(f"    {key}: {value}")
    if meta:
        print("  metadata:")
        for key in ("created", "ensam_version", "metrics", "notes"):
            print(f"    {key}: {meta[key]}")
    return 0
