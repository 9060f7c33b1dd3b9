"""`ensam demo`: the main job on a fresh machine, end to end.

Segments the bundled sample volume with the embedded default model from the sample's suggested
box and click (through the same code as `ensam segment`), writes the labelmap and a PNG overlay
of the central slice, and prints where they are, with the Dice against the sample's reference
label and a plain statement of what the model was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ENSAMSegmentLib.cli.common import (UNTRAINED_NOTE, add_device_argument, check_device, check_model,
                                        check_output_folder)


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="segment the bundled sample volume (the main job, end to end)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    parser.add_argument("--checkpoint", type=Path, help="model file (default: the embedded default model)")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ENSAMSegmentLib.cli.cmd_segment import segment_array
    from ENSAMSegmentLib.core.imageio import read_image, write_labelmap
    from ENSAMSegmentLib.core.metrics import dice
    from ENSAMSegmentLib.core.phantom import read_sample_info, sample_data_path

    check_output_folder(args.out, "--out")
    check_device(args.device)
    check_model(args.checkpoint)
    image_path = sample_data_path("image")
    info = read_sample_info()
    array, geometry = read_image(image_path)
    reference, _ = read_image(sample_data_path("labels"))
    target = info["structures"][0]  # the main structure (the liver-like organ)
    box = (tuple(target["box_zyx"]["min"]), tuple(target["box_zyx"]["max"]))
    clicks = [(tuple(target["click_zyx"]), True)]
    options = argparse.Namespace(checkpoint=args.checkpoint, device=args.device, modality="ct", image=image_path)
    report = segment_array(array, geometry, box, clicks, options)
    labels = report.pop("labels")
    model = report["model"]

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    labelmap_path = out / "ensam-sample-ct-segmentation.nrrd"
    write_labelmap(labelmap_path, labels, geometry)
    png_path = out / "ensam-sample-ct-overlay.png"
    truth = reference == target["label"]
    score = dice(truth, labels > 0)
    title = f"ENSAM on the sample CT ({target['name']}): Dice {score:.3f} against the reference"
    write_overlay_png(png_path, array, labels > 0, truth, box, clicks, title=title,
                      warning=PNG_UNTRAINED if model["untrained"] else "")
    report_path = out / "report.json"
    report.update(outputs=[str(labelmap_path), str(png_path), str(report_path)], dice_vs_reference=score,
                  structure=target["name"])
    report_path.write_text(json.dumps(report, indent=2))

    print(f"ENSAM demo: {target['name']} in the bundled sample CT {tuple(array.shape)} (z,y,x)")
    print(f"  model: {model['path']}")
    print(f"  trained on: {model['training_data']}")
    if model["untrained"]:
        print(f"  {UNTRAINED_NOTE}")
    print(f"  encoder {report['timing_s']['encode']:.2f} s, prompts " +
          ", ".join(f"{s:.2f} s" for s in report["timing_s"]["steps"]) + f" on {report['device']}")
    print(f"  Dice against the sample's reference label: {score:.3f}"
          + (" (meaningless for an untrained model)" if model["untrained"] else ""))
    print(f"  labelmap: {labelmap_path}")
    print(f"  overlay:  {png_path}")
    print(f"  report:   {report_path}")
    return 0


PNG_UNTRAINED = "UNTRAINED MODEL (random weights)\nthis segmentation is not meaningful"
MASK_COLOR, REFERENCE_COLOR, BOX_COLOR = "#ff8c00", "cyan", "yellow"  # orange fill, cyan contour, yellow box
CLICK_COLORS = {True: "lime", False: "red"}


def write_overlay_png(path, image, mask, truth, box, clicks, title="", warning="") -> None:
    """The axial slice through the first click: image, ENSAM mask, reference contour, box and clicks,
    a legend of each, and `warning` in red over the image when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    z = int(clicks[0][0][0]) if clicks else (box[0][0] + box[1][0]) // 2
    fig, ax = plt.subplots(figsize=(6, 6.4), dpi=100, layout="constrained")
    ax.imshow(np.clip(image[z], -160, 240), cmap="gray")
    ax.imshow(np.ma.masked_where(~mask[z], mask[z]), cmap=ListedColormap([MASK_COLOR]), alpha=0.45,
              interpolation="nearest")
    if truth[z].any():
        ax.contour(truth[z], levels=[0.5], colors=REFERENCE_COLOR, linewidths=1)
    (z0, y0, x0), (z1, y1, x1) = box
    ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, color=BOX_COLOR))
    for (_, cy, cx), foreground in clicks:
        ax.plot(cx, cy, "o", color=CLICK_COLORS[foreground], markersize=7, markeredgecolor="white")
    legend = [Patch(facecolor=MASK_COLOR, alpha=0.45, label="ENSAM segmentation"),
              Line2D([], [], color=REFERENCE_COLOR, label="reference"),
              Patch(fill=False, edgecolor=BOX_COLOR, label="box")]
    for foreground in dict.fromkeys(f for _, f in clicks):
        legend.append(Line2D([], [], marker="o", linestyle="", color=CLICK_COLORS[foreground],
                             markeredgecolor="white", label=f"{'foreground' if foreground else 'background'} click"))
    fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8, frameon=False)
    ax.set_title(f"{title}\naxial slice z={z}", fontsize=9)
    if warning:
        ax.text(0.5, 0.97, warning, transform=ax.transAxes, ha="center", va="top", fontsize=10,
                fontweight="bold", color="white", bbox=dict(facecolor="#c62828", edgecolor="none", alpha=0.9))
    ax.axis("off")
    fig.savefig(path)
    plt.close(fig)
