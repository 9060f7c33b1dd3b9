"""`ensam segment`: segment one structure in an image file from a box and clicks.

Prompts are applied in the order given: the box first (when given), then every --fg/--bg click in
command-line order, each step feeding the previous logits back, as in interactive use.
Coordinates are voxel indices z,y,x by default; with --ras they are physical RAS millimetres
(Slicer's convention; the files themselves store LPS), converted by ENSAMSegmentLib.core.geometry.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ENSAMSegmentLib.cli.main import UserError


def _numbers(text: str, count: int, form: str) -> tuple[float, ...]:
    """`count` comma-separated numbers, or an argparse error naming the expected form."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return values


def _triple(text: str) -> tuple[float, float, float]:
    return _numbers(text, 3, "three comma-separated numbers")


def _box(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    values = _numbers(text, 6, "six comma-separated numbers z0,y0,x0,z1,y1,x1")
    return values[:3], values[3:]


class _AppendClick(argparse.Action):
    """--fg/--bg append to one ordered list, so that clicks run in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        clicks = list(getattr(namespace, "clicks", None) or [])
        clicks.append((self.const, values))
        namespace.clicks = clicks


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--box", type=_box, metavar="Z0,Y0,X0,Z1,Y1,X1",
                        help="3D box corners (inclusive voxel indices, or RAS mm with --ras)")
    parser.add_argument("--fg", type=_triple, action=_AppendClick, const=True, dest="clicks", metavar="Z,Y,X",
                        help="foreground click (repeatable)")
    parser.add_argument("--bg", type=_triple, action=_AppendClick, const=False, dest="clicks", metavar="Z,Y,X",
                        help="background click (repeatable)")
    parser.add_argument("--ras", action="store_true",
                        help="coordinates are physical RAS millimetres (x,y,z order: R,A,S) instead of voxel z,y,x")


def _window_size(text: str) -> int:
    """A click window half-size: an integer >= 0 (0: clicks decode the whole box region)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_click_window_argument(parser: argparse.ArgumentParser) -> None:
    """--click-window for the commands that build an InferenceSession (segment, predict, evaluate, bench).
    None (not given) keeps the session's default, so that the default lives in one place."""
    parser.add_argument("--click-window", type=_window_size, default=None, metavar="N",
                        help="half-size in voxels of the window decoded around each click "
                             "(default: the session's, 32; 0: decode the whole box region)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="ENSAM model file (default: the embedded default model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--modality", default="auto",
                        help="intensity preprocessing: auto, ct, mr, pet, us, microscopy (default: auto)")
    add_click_window_argument(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a structure in an image from a box and clicks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, help="image file: .nii/.nii.gz/.nrrd/.mha/.mhd or challenge .npz")
    add_prompt_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output labelmap (.nii.gz, .nrrd, .mha; .npz writes `segs`), in the input's geometry")
    parser.add_argument("--seg-nrrd", type=Path, help="also write a Slicer .seg.nrrd segmentation")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON report (prompts and how each was decoded, timings, outputs)")
    parser.set_defaults(func=run, clicks=[])


def resolve_prompts(args, geometry) -> tuple[tuple | None, list[tuple[tuple[int, int, int], bool]]]:
    """The box and clicks as voxel indices (z,y,x) in the image, whatever the input convention."""
    from ENSAMSegmentLib.core.geometry import GeometryError

    try:
        box = None
        if args.box is not None:
            lo, hi = args.box
            if args.ras:
                corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
                kmin, kmax = geometry.box_from_ras_corners(corners)
            else:
                kmin, kmax = _voxel_index(lo, geometry), _voxel_index(hi, geometry)
            box = (tuple(int(v) for v in kmin), tuple(int(v) for v in kmax))
        clicks = []
        for foreground, point in args.clicks:
            if args.ras:
                index = geometry.ras_to_kji_index(np.asarray(point, dtype=float))
            else:
                index = _voxel_index(point, geometry)
            clicks.append((tuple(int(v) for v in np.ravel(index)), foreground))
    except GeometryError as error:
        raise UserError(str(error)) from None
    if box is None and not clicks:
        raise UserError("give a --box and/or at least one --fg click")
    return box, clicks


def _voxel_index(point, geometry) -> np.ndarray:
    index = np.asarray(point, dtype=float)
    if not np.allclose(index, np.round(index)):
        raise UserError(f"voxel indices must be integers, got {point} (use --ras for millimetres)")
    index = np.round(index).astype(int)
    if np.any(index < 0) or np.any(index >= np.asarray(geometry.shape)):
        raise UserError(f"voxel index {tuple(index)} (z,y,x) is outside the image of shape {geometry.shape}")
    return index


def run(args) -> int:
    from ENSAMSegmentLib.core.imageio import ImageReadError, read_image

    try:
        array, geometry = read_image(args.image)
    except (ImageReadError, FileNotFoundError) as error:
        raise UserError(str(error)) from None
    box, clicks = resolve_prompts(args, geometry)
    report = segment_array(array, geometry, box, clicks, args)
    write_outputs(args, report.pop("labels"), geometry, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"segmented {report['foreground_voxels']} voxels in {report['timing_s']['total']:.2f} s")
        for path in report["outputs"]:
            print(f"wrote {path}")
    return 0


def segment_array(array, geometry, box, clicks, args) -> dict:
    """Run the prompts through an InferenceSession; returns the labels and a JSON-ready report.
    Each step in prompts_ijk says how its logits were decoded ("whole", box "region", click "window");
    a click also says how often its window grew (window_growth)."""
    from ENSAMSegmentLib.core.session import InferenceSession, SessionError

    started = time.perf_counter()
    try:
        # `ensam demo` builds its own options, without --click-window
        with InferenceSession(model_path=args.checkpoint, device=args.device,
                              click_window=getattr(args, "click_window", None)) as session:
            t0 = time.perf_counter()
            session.set_image(array, spacing_zyx=geometry.spacing_zyx, modality=args.modality)
            timing = {"load_model": t0 - started, "encode": time.perf_counter() - t0, "steps": []}
            session.create_object()
            steps = []
            if box is not None:
                update = session.add_box(box[0], box[1])
                steps.append({"prompt": "box", "ijk_min": list(box[0]), "ijk_max": list(box[1]),
                              "decoding": update.decoding})
                timing["steps"].append(update.seconds)
            for index, foreground in clicks:
                update = session.add_click(index, foreground=foreground)
                steps.append({"prompt": "fg" if foreground else "bg", "ijk": list(index), "decoding": update.decoding,
                              "window_growth": update.window_growth})
                timing["steps"].append(update.seconds)
            labels = session.merged_labels().astype(np.uint8)
            model_info, click_window = session.model_info, session.click_window
    except SessionError as error:
        raise UserError(str(error)) from None
    timing["total"] = time.perf_counter() - started
    return {
        "labels": labels,
        "image": str(args.image),
        "shape": list(array.shape),
        "spacing_zyx": list(geometry.spacing_zyx),
        "prompts_ijk": steps,
        "foreground_voxels": int(labels.sum()),
        "device": session.device_name,
        "click_window": click_window,
        "model": {"path": str(model_info.path), "training_data": model_info.training_data,
                  "untrained": model_info.untrained},
        "timing_s": timing,
    }


def write_outputs(args, labels, geometry, report) -> None:
    from ENSAMSegmentLib.core.imageio import write_labelmap, write_segmentation_nrrd, write_segs_npz

    outputs = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix == ".npz":
        write_segs_npz(args.output, labels)
    else:
        write_labelmap(args.output, labels, geometry)
    outputs.append(str(args.output))
    if args.seg_nrrd:
        write_segmentation_nrrd(args.seg_nrrd, labels, geometry, names=["ENSAM"])
        outputs.append(str(args.seg_nrrd))
    report["outputs"] = outputs
