"""What the commands share: checks run before any work, help texts, the untrained-model note.

A bad argument ends the command with one line that names it and says what to do (a UserError),
before a model is loaded or an image is read: nothing is computed for nothing, nothing is written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ENSAMSegmentLib.cli.main import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "compute device: auto (default: cuda when available, else mps, else cpu), cpu, cuda, mps"
# = ENSAMSegmentLib.core.intensity.MODALITIES (tested), listed here so that --help needs no numpy
MODALITIES = ("ct", "mr", "pet", "us", "xray", "microscopy", "other")
MODALITY_HELP = ("intensity preprocessing: auto (default: ct when the values reach below -500 and above 300, "
                 "as Hounsfield units do, else other), " + ", ".join(MODALITIES) + " (ct: a soft-tissue window; all others: "
                 "the 0.5-99.5 percentiles)")
UNTRAINED_NOTE = ("NOTE: this model is UNTRAINED (random weights): its segmentations are not meaningful "
                  "(README 'Model card').")
TORCH_INSTALL_PAGE = "https://pytorch.org/get-started/locally/"


def add_device_argument(parser, choices=DEVICES) -> None:
    parser.add_argument("--device", default="auto", choices=choices, help=DEVICE_HELP)


def add_modality_argument(parser) -> None:
    parser.add_argument("--modality", default="auto", choices=("auto", *MODALITIES), help=MODALITY_HELP)


def check_output_file(path: Path, suffixes, option: str) -> None:
    """`path` can be written as a file of one of `suffixes` (its folder is created now when missing)."""
    if not str(path).lower().endswith(tuple(suffixes)):
        raise UserError(f"{option} {path}: unsupported file type; use one of {', '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    _make_writable_folder(path.parent, f"{option} {path}")


def check_output_folder(path: Path, option: str) -> None:
    """`path` is a folder this user can write into (created now when missing)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder")
    _make_writable_folder(path, f"{option} {path}")


def _make_writable_folder(folder: Path, what: str) -> None:
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # Path(".") always exists
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # no permission, a read-only file system, ...
        raise UserError(f"{what}: cannot create the folder {folder} ({error.strerror or error})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write into {folder} (permission denied)")


def check_device(device: str) -> None:
    """A device this machine has, or what to install / use instead."""
    if device not in ("cuda", "mps"):
        return
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pip = f"{sys.executable} -m pip"
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is a CPU-only build"
        else:
            why = (f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA GPU "
                   "(does `nvidia-smi` list one? the driver may be missing or too old)")
        raise UserError(
            f"--device cuda: {why}. To get a CUDA build of torch: {pip} uninstall -y torch && {pip} install torch "
            f"--index-url https://download.pytorch.org/whl/cu126 (the page {TORCH_INSTALL_PAGE} gives the cuXXX "
            "that matches your driver; README 'Troubleshooting'). Or use --device cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's Metal backend is not available here (it needs macOS on Apple "
                        "silicon and a torch built with MPS). Use --device cpu.")


def check_model(checkpoint: Path | None) -> None:
    """The model file exists (the default one when `checkpoint` is None); its content is checked on loading."""
    from ENSAMSegmentLib.core.modelfile import default_model_path, missing_model_message

    if checkpoint is None:
        if not default_model_path().is_file():
            raise UserError(missing_model_message(default_model_path()))
    elif not checkpoint.is_file():
        raise UserError(f"--checkpoint {checkpoint}: " + ("a folder, not a model file" if checkpoint.is_dir()
                                                           else "no such file"))


def read_volume(path: Path):
    """(array (z, y, x), geometry) of an image file ENSAM can segment, or a UserError saying why not."""
    from ENSAMSegmentLib.core.geometry import GeometryError, check_volume_shape
    from ENSAMSegmentLib.core.imageio import ImageReadError, read_image

    if Path(path).is_dir():
        raise UserError(f"{path} is a folder; give an image file (.nii.gz, .nrrd, .mha, .npz, ...)")
    try:
        array, geometry = read_image(path)
        check_volume_shape(array.shape, Path(path).name)
    except (ImageReadError, GeometryError) as error:
        raise UserError(str(error)) from None
    return array, geometry
