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


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="segment the bundled sample volume (the main job, end to end)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    parser.add_argument("--checkpoint", type=Path, help="model file (default: the embedded default model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.set_defaults(func=run)


def run(args) -> int:
    from ENSAMSegmentLib.cli.cmd_segment import segment_array
    from ENSAMSegmentLib.core.imageio import read_image, write_labelmap
    from ENSAMSegmentLib.core.metrics import dice
    from ENSAMSegmentLib.core.phantom import read_sample_info, sample_data_path

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

    args.out.mkdir(parents=True, exist_ok=True)
    labelmap_path = args.out / "ensam-sample-ct-segmentation.nrrd"
    write_labelmap(labelmap_path, labels, geometry)
    png_path = args.out / "ensam-sample-ct-overlay.png"
    truth = reference == target["label"]
    score = dice(truth, labels > 0)
    write_overlay_png(png_path, array, labels > 0, truth, box, clicks, title=f"{target['name']}: Dice {score:.3f}")
    report.update(outputs=[str(labelmap_path), str(png_path)], dice_vs_reference=score, structure=target["name"])
    (args.out / "report.json").write_text(json.dumps(report, indent=2))

    model = report["model"]
    print(f"ENSAM demo: {target['name']} in the bundled sample CT {tuple(array.shape)} (z,y,x)")
    print(f"  model: {model['path']}")
    print(f"  trained on: {model['training_data']}")
    if model["untrained"]:
        print("  NOTE: this model is UNTRAINED (random weights): the segmentation below is not meaningful.")
    print(f"  encoder {report['timing_s']['encode']:.2f} s, prompts " +
          ", ".join(f"{s:.2f} s" for s in report["timing_s"]["steps"]) + f" on {report['device']}")
    print(f"  Dice against the sample's reference label: {score:.3f}")
    print(f"  labelmap: {labelmap_path.resolve()}")
    print(f"  overlay:  {png_path.resolve()}")
    print(f"  report:   {(args.out / 'report.json').resolve()}")
    return 0


def write_overlay_png(path, image, mask, truth, box, clicks, title="") -> None:
    """The axial slice through the first click: image, reference contour, ENSAM mask, box and clicks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(clicks[0][0][0]) if clicks else (box[0][0] + box[1][0]) // 2
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(np.clip(image[z], -160, 240), cmap="gray")
    ax.imshow(np.ma.masked_where(~mask[z], mask[z]), cmap="autumn", alpha=0.45)
    if truth[z].any():
        ax.contour(truth[z], levels=[0.5], colors="cyan", linewidths=1)
    (z0, y0, x0), (z1, y1, x1) = box
    ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, color="yellow"))
    for (_, cy, cx), foreground in clicks:
        ax.plot(cx, cy, "o", color="lime" if foreground else "red", markersize=7, markeredgecolor="white")
    ax.set_title(f"{title}\nslice z={z}: ENSAM (orange), reference (cyan), box (yellow)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
