"""`ensam info`: the model's architecture, size and compute, and a model file's metadata.

Compute is counted analytically for one object with a box prompt, encode + decode, at the largest
training patch (128 x 128 x 256 = 4,194,304 voxels): multiply-accumulates (MACs) and FLOPs = 2 x MACs.
The paper's "368 G FLOPs" corresponds to this MAC count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ENSAMSegmentLib.cli.main import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show the model's architecture, size, compute and metadata",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="ENSAM model file (default: describe the default "
                                                        "architecture, no file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def describe(checkpoint: Path | None) -> dict:
    from ENSAMSegmentLib.core.modelfile import ModelFileError, read_model_info
    from ENSAMSegmentLib.core.network import ENSAMConfig
    from ENSAMSegmentLib.core.network.complexity import summary

    info = None
    if checkpoint is not None:
        try:
            info = read_model_info(checkpoint)
        except ModelFileError as error:
            raise UserError(str(error)) from None
    config = info.config if info else ENSAMConfig()
    report = summary(config)
    if info:
        report["parameters"] = info.parameters
    report.update(checkpoint=str(checkpoint) if checkpoint else None, config=config.to_dict(),
                  metadata=info.metadata() if info else None)
    return report


def run(args) -> int:
    report = describe(args.checkpoint)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = report["metadata"]
    print("ENSAM model")
    print(f"  model file: {report['checkpoint']}" if meta else
          "  model file: none given (describing the default architecture; use --checkpoint FILE)")
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
        for key in ("created", "ensam_version", "training_data", "metrics", "notes"):
            print(f"    {key}: {meta[key]}")
        if meta["untrained"]:
            print("  NOTE: this model is UNTRAINED (random weights): its segmentations are not meaningful.")
    return 0
