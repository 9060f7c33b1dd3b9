"""`ensam segment`: segment one structure in an image file from a box and clicks.

Prompts are applied in the order given: the box first (when given), then every --fg/--bg click in
command-line order, each step feeding the previous logits back, as in interactive use.
Coordinates are voxel indices z,y,x by default; with --ras they are physical RAS millimetres
(Slicer's convention; the files themselves store LPS), converted by ENSAMSegmentLib.core.geometry.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from ENSAMSegmentLib.cli.common import (UNTRAINED_NOTE, add_device_argument, add_modality_argument,
                                        check_device, check_model, check_output_file, read_volume)
from ENSAMSegmentLib.cli.main import UserError


class Numbers(tuple):
    """Numbers from the command line that remember how they were written (messages quote them)."""

    text = ""


def _numbers(text: str, count: int, form: str) -> Numbers:
    """`count` comma-separated numbers, or an argparse error naming the expected form."""
    try:
        values = Numbers(float(v) for v in text.split(","))
    except ValueError:
        values = Numbers()
    if len(values) != count or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    values.text = text
    return values


def _triple(text: str) -> Numbers:
    return _numbers(text, 3, "three comma-separated numbers")


def _box(text: str) -> Numbers:
    return _numbers(text, 6, "six comma-separated numbers: two opposite corners")


class _AppendClick(argparse.Action):
    """--fg/--bg append to one ordered list, so that clicks run in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        clicks = list(getattr(namespace, "clicks", None) or [])
        clicks.append((self.const, values))
        namespace.clicks = clicks


PROMPT_NOTE = ("Coordinates may be negative (RAS millimetres often are): --box -13.5,2,40,... works, "
               "as does --box=-13.5,2,40,...")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--box", type=_box, metavar="Z0,Y0,X0,Z1,Y1,X1",
                        help="3D box: two opposite corners, inclusive voxel indices z,y,x "
                             "(with --ras: R0,A0,S0,R1,A1,S1 in mm)")
    parser.add_argument("--fg", type=_triple, action=_AppendClick, const=True, dest="clicks", metavar="Z,Y,X",
                        help="foreground click, a voxel index z,y,x (with --ras: R,A,S in mm); repeatable")
    parser.add_argument("--bg", type=_triple, action=_AppendClick, const=False, dest="clicks", metavar="Z,Y,X",
                        help="background click, as --fg; repeatable")
    parser.add_argument("--ras", action="store_true",
                        help="coordinates are physical RAS millimetres in the order R,A,S (Slicer's world "
                             "coordinates) instead of voxel indices z,y,x")


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


def voxel_count(text: str) -> int:
    """argparse type of a voxel budget: an integer >= 512 (underscores allowed)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 512:
        raise argparse.ArgumentTypeError(f"expected a number of voxels >= 512, got {text!r}")
    return value


SESSION_OPTIONS = ("click_window", "voxel_budget")  # the InferenceSession options these commands pass on


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """The InferenceSession options of segment, predict and evaluate; not given = the session's default."""
    add_click_window_argument(parser)
    parser.add_argument("--voxel-budget", type=voxel_count, default=None, metavar="N",
                        help="largest grid the model sees at once, in voxels (default: the budget the model was "
                             "trained at, recorded in its file; else 8388608 = 128x256x256): a box region above it "
                             "is max-pooled to fit")


def session_options(args) -> dict:
    """The session options given on the command line (SESSION_OPTIONS), as InferenceSession keywords."""
    return {name: getattr(args, name) for name in SESSION_OPTIONS if getattr(args, name, None) is not None}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="ENSAM model file (default: the embedded default model)")
    add_device_argument(parser)
    add_modality_argument(parser)
    add_session_arguments(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a structure in an image from a box and clicks",
        description=__doc__,
        epilog=PROMPT_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, help="image file: .nii/.nii.gz/.nrrd/.mha/.mhd or challenge .npz")
    add_prompt_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output labelmap (.nii.gz, .nii, .nrrd, .mha, .seg.nrrd; .npz writes `segs`), "
                             "in the input's geometry")
    parser.add_argument("--seg-nrrd", type=Path, help="also write a Slicer .seg.nrrd segmentation")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON report (prompts and how each was decoded, timings, outputs)")
    parser.set_defaults(func=run, clicks=[])


def output_suffixes() -> tuple[str, ...]:
    from ENSAMSegmentLib.core.imageio import LABELMAP_SUFFIXES

    return (*LABELMAP_SUFFIXES, ".npz")


def resolve_prompts(args, geometry) -> tuple[tuple | None, list[tuple[tuple[int, int, int], bool]]]:
    """The box and clicks as voxel indices (z,y,x) in the image, whatever the input convention.
    A prompt outside the image is refused with its name, its coordinates as given, and the image's
    extent in the same units."""
    if args.box is None and not args.clicks:
        raise UserError("give a --box and/or at least one --fg click")
    box = None
    if args.box is not None:
        box = _ras_box(args.box, geometry) if args.ras else _voxel_box(args.box, geometry)
    clicks, counts = [], {True: 0, False: 0}
    for foreground, point in args.clicks:
        counts[foreground] += 1
        what = f"{'foreground' if foreground else 'background'} click {counts[foreground]} " \
               f"(--{'fg' if foreground else 'bg'} {point.text}{' --ras' if args.ras else ''})"
        index = _ras_index(point, geometry, what) if args.ras else _voxel_index(point, geometry, what)
        clicks.append((index, foreground))
    return box, clicks


def _voxel_extent(geometry) -> str:
    return "voxel indices z,y,x run " + ", ".join(f"0..{n - 1}" for n in geometry.shape)


def _ras_extent(geometry) -> str:
    """The RAS bounds of the image (its outer voxel faces), in mm."""
    corners = geometry.kji_box_to_ras_corners((0, 0, 0), np.asarray(geometry.shape) - 1)
    bounds = ", ".join(f"{axis} {lo:.1f}..{hi:.1f}" for axis, lo, hi in zip("RAS", corners.min(0), corners.max(0)))
    oblique = np.abs(geometry.direction_ras).max(axis=0).min() < 1 - 1e-6  # a voxel axis off the RAS axes
    return f"the image spans {bounds} mm" + (" (it is oblique: not all of that range is inside it)" if oblique else "")


def _voxel_index(point, geometry, what: str) -> tuple[int, int, int]:
    index = np.asarray(point, dtype=float)
    if not np.allclose(index, np.round(index)):
        raise UserError(f"{what}: voxel indices are whole numbers (for millimetres add --ras)")
    index = np.round(index).astype(int)
    if not geometry.contains_index(index):
        raise UserError(f"{what} is outside the image: {_voxel_extent(geometry)}")
    return tuple(int(v) for v in index)


def _voxel_box(box, geometry):
    what = f"box (--box {box.text})"
    corners = [_voxel_index(box[:3], geometry, f"{what}, corner 1"), _voxel_index(box[3:], geometry, f"{what}, corner 2")]
    return tuple(map(min, *corners)), tuple(map(max, *corners))  # any two opposite corners


def _ras_index(point, geometry, what: str) -> tuple[int, int, int]:
    from ENSAMSegmentLib.core.geometry import OutsideVolumeError

    try:
        index = geometry.ras_to_kji_index(np.asarray(point, dtype=float))
    except OutsideVolumeError:
        raise UserError(f"{what} is outside the image: {_ras_extent(geometry)}") from None
    return tuple(int(v) for v in np.ravel(index))


def _ras_box(box, geometry):
    from ENSAMSegmentLib.core.geometry import OutsideVolumeError

    (r0, a0, s0, r1, a1, s1) = box
    corners = np.array([[r, a, s] for r in (r0, r1) for a in (a0, a1) for s in (s0, s1)])
    try:
        lo, hi = geometry.box_from_ras_corners(corners)
    except OutsideVolumeError:
        raise UserError(f"box (--box {box.text} --ras) lies outside the image: {_ras_extent(geometry)}") from None
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def run(args) -> int:
    check_output_file(args.output, output_suffixes(), "-o")
    if args.seg_nrrd:
        check_output_file(args.seg_nrrd, (".seg.nrrd",), "--seg-nrrd")
    check_device(args.device)
    check_model(args.checkpoint)
    array, geometry = read_volume(args.image)
    box, clicks = resolve_prompts(args, geometry)
    report = segment_array(array, geometry, box, clicks, args)
    write_outputs(args, report.pop("labels"), geometry, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    model = report["model"]
    print(f"segmented {report['foreground_voxels']:,} voxels in {report['timing_s']['total']:.2f} s "
          f"on {report['device']}")
    print(f"model: {model['path']} (trained on: {model['training_data']})")
    if model["untrained"]:
        print(UNTRAINED_NOTE)
    for path in report["outputs"]:
        print(f"wrote {path}")
    return 0


def segment_array(array, geometry, box, clicks, args) -> dict:
    """Run the prompts through an InferenceSession; returns the labels and a JSON-ready report.
    Each step in prompts_zyx says how its logits were decoded ("whole", box "region", click "window");
    a click also says how often its window grew (window_growth)."""
    from ENSAMSegmentLib.core.session import InferenceSession, SessionError

    started = time.perf_counter()
    try:
        # `ensam demo` builds its own options, without the session options
        with InferenceSession(model_path=args.checkpoint, device=args.device, **session_options(args)) as session:
            t0 = time.perf_counter()
            session.set_image(array, spacing_zyx=geometry.spacing_zyx, modality=args.modality)
            timing = {"load_model": t0 - started, "encode": time.perf_counter() - t0, "steps": []}
            session.create_object()
            steps = []
            if box is not None:
                update = session.add_box(box[0], box[1])
                steps.append({"prompt": "box", "min_zyx": list(box[0]), "max_zyx": list(box[1]),
                              "decoding": update.decoding})
                timing["steps"].append(update.seconds)
            for index, foreground in clicks:
                update = session.add_click(index, foreground=foreground)
                steps.append({"prompt": "fg" if foreground else "bg", "zyx": list(index), "decoding": update.decoding,
                              "window_growth": update.window_growth})
                timing["steps"].append(update.seconds)
            labels = session.merged_labels().astype(np.uint8)
            model_info, click_window = session.model_info, session.click_window
    except SessionError as error:
        raise UserError(str(error)) from None
    timing["total"] = time.perf_counter() - started
    return {
        "labels": labels,
        "image": str(Path(args.image).resolve()),
        "shape": list(array.shape),
        "spacing_zyx": list(geometry.spacing_zyx),
        "prompts_zyx": steps,
        "foreground_voxels": int(labels.sum()),
        "device": session.device_name,
        "click_window": click_window,
        "model": {"path": str(Path(model_info.path).resolve()), "training_data": model_info.training_data,
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
    outputs.append(str(args.output.resolve()))
    if args.seg_nrrd:
        write_segmentation_nrrd(args.seg_nrrd, labels, geometry, names=["ENSAM"])
        outputs.append(str(args.seg_nrrd.resolve()))
    report["outputs"] = outputs
