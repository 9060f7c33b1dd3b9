"""The models ENSAMSegment offers, and installing a trained model among them ("Use in ENSAMSegment").

ENSAMSegment offers the shipped default model and every ``*.pt`` in USER_MODELS_DIR
(~/.ensam/models), through ``promptcontroller.model_choices``; this file uses that same folder
and function, so a model installed here is one ENSAMSegment offers.

`install_model` refuses anything that is not a complete model file (modelfile.load_model must
build the network and load every weight) and installs through core/modelstore.import_model:
atomically (a temporary file, checked against the source's sha256, then renamed: an interrupted
copy never shows up as a model) and registered in the folder's models.json.
"""

from __future__ import annotations

import re
from pathlib import Path

from ENSAMSegmentLib.mrml.promptcontroller import USER_MODELS_DIR, model_choices


class ModelInstallError(Exception):
    """A model file that cannot be installed (unreadable, incomplete, or the copy failed)."""


def offered_models(folder: Path | None = None) -> list[tuple[str, Path]]:
    """(label, path) of the models ENSAMSegment offers: the default first, then ``folder``'s *.pt."""
    return model_choices(Path(folder) if folder is not None else USER_MODELS_DIR)


def check_model_file(path) -> None:
    """Load the whole model on the CPU; ModelInstallError with the reason when that fails."""
    from ENSAMSegmentLib.core.modelfile import ModelFileError, load_model

    path = Path(path)
    if not path.is_file():
        raise ModelInstallError(f"no model file at {path}")
    try:
        load_model(path, "cpu")
    except ModelFileError as error:
        raise ModelInstallError(str(error)) from None


def describe_model(path) -> str:
    """One line about a model file, or why it cannot be used."""
    from ENSAMSegmentLib.core.modelfile import ModelFileError, read_model_info

    try:
        info = read_model_info(path)
    except ModelFileError as error:
        return f"cannot be used: {error}"
    text = f"{info.parameters / 1e6:.2f} M parameters, trained on: {info.training_data or 'unknown'}"
    dsc = (info.metrics or {}).get("final_dsc")
    return text + (f", validation DSC {dsc:.3f}" if isinstance(dsc, (int, float)) else "")


def model_name(text: str) -> str:
    """A file stem from free text: letters, digits, '-', '_', '.' (others become '-')."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    if stem.lower().endswith(".pt"):
        stem = stem[:-3]
    return stem or "ensam-model"


def _free_path(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.pt", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.pt"
    return path


def install_model(source, name: str | None = None, folder: Path | None = None, overwrite: bool = False) -> Path:
    """Import the model file ``source`` into ``folder`` (default USER_MODELS_DIR) as ``<name>.pt`` and
    register it there (modelstore.import_model, as `ensam models import`: complete file, atomic copy,
    sha256 recorded, so ENSAMSegment verifies it on load).

    ``name`` defaults to the source's run folder name when the file is called model.pt. An
    existing model of that name is kept (the new one gets -2, -3, ...) unless ``overwrite``.
    Returns the installed path.
    """
    from ENSAMSegmentLib.core.modelfile import ModelFileError
    from ENSAMSegmentLib.core.modelstore import ModelStoreError, import_model

    source = Path(source)
    check_model_file(source)
    folder = Path(folder) if folder is not None else USER_MODELS_DIR
    stem = model_name(name or (source.parent.name if source.name == "model.pt" else source.stem))
    target = folder / f"{stem}.pt" if overwrite else _free_path(folder, stem)
    try:
        entry = import_model(source, target.stem, folder, replace=overwrite)
    except (ModelStoreError, ModelFileError, OSError) as error:
        raise ModelInstallError(f"cannot install {source} into {folder}: {error}") from None
    return folder / entry.file


__all__ = ["USER_MODELS_DIR", "ModelInstallError", "check_model_file", "describe_model", "install_model",
           "model_name", "offered_models"]
