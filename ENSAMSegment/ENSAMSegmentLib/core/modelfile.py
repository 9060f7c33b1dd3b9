"""ENSAM model files: one torch.save'd plain dict with the weights, the architecture and metadata.

    {"format": "ensam-model", "format_version": 1,
     "config": ENSAMConfig.to_dict(), "weights": state_dict,
     "created": ISO date, "ensam_version": str, "training_data": str, "metrics": dict, "notes": str}

Files are written atomically (a temporary file in the same folder, then os.replace) and read with
torch.load(weights_only=True), so loading never runs code from the file. Every way a file can be
wrong raises a `ModelFileError` subclass naming the file and the problem. A file listed in the model
registry of its folder (registry.py: models.json) must match the sha256 registered there.

Weights may be stored as float16 (shipped models: `save_model(..., dtype=torch.float16)` halves the
file); loading casts them to the model's float32 parameters.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ENSAMSegmentLib import __version__
from ENSAMSegmentLib.core import registry
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig

FORMAT = "ensam-model"
FORMAT_VERSION = 1
UNTRAINED = "untrained (random initialisation)"


class ModelFileError(Exception):
    """A model file that cannot be used; the message names the file and what is wrong."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    pass


class NotAModelFileError(ModelFileError):
    pass


class ModelFileVersionError(ModelFileError):
    pass


class ArchitectureMismatchError(ModelFileError):
    pass


class CorruptModelFileError(ModelFileError):
    """Truncated or damaged (e.g. an interrupted copy or download)."""


class ModelChecksumError(ModelFileError):
    """A registered file whose sha256 differs from its registry entry."""


class ModelRegistryError(ModelFileError):
    """The registry beside a model file cannot be read."""


@dataclass
class ModelInfo:
    """A model file's metadata (read without building the model)."""

    path: Path | None
    config: ENSAMConfig
    format_version: int = FORMAT_VERSION
    created: str = ""
    ensam_version: str = ""
    training_data: str = ""
    metrics: dict = field(default_factory=dict)
    notes: str = ""
    parameters: int = 0
    weights_dtype: str = ""  # float32, or float16 for shipped files
    voxel_budget: int | None = None  # the patch budget it was trained at: the session's default grid budget

    @property
    def untrained(self) -> bool:
        return self.training_data.startswith("untrained")

    def metadata(self) -> dict:
        return {"path": str(self.path) if self.path else None, "format_version": self.format_version,
                "created": self.created, "ensam_version": self.ensam_version,
                "training_data": self.training_data, "untrained": self.untrained,
                "metrics": self.metrics, "notes": self.notes, "parameters": self.parameters,
                "weights_dtype": self.weights_dtype, "voxel_budget": self.voxel_budget}


def default_model_path() -> Path:
    """The default model file: the shipped registry's default (ENSAMSegment/Resources/Models/models.json),
    else ENSAMSegment/Resources/Models/ensam-default.pt."""
    return registry.default_model_path()


def save_model(path, model: ENSAM, *, training_data: str = "", metrics: dict | None = None,
               notes: str = "", dtype: torch.dtype | None = None, created: str | None = None,
               voxel_budget: int | None = None) -> Path:
    """Write `model` (weights + config + metadata) to `path` atomically; returns the path.
    dtype: store floating-point weights in this type (torch.float16 for shipped files).
    voxel_budget: the largest patch it was trained on (voxels); the inference session then works on grids
    of that size by default, so that objects appear at the scale the model learnt them."""
    path = Path(path)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "weights": weights,
        "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ensam_version": __version__,
        "training_data": str(training_data),
        "metrics": _plain(dict(metrics or {}), "metrics"),
        "notes": str(notes),
    }
    if voxel_budget is not None:
        payload["voxel_budget"] = int(voxel_budget)
    return atomic_torch_save(payload, path)


def atomic_torch_save(payload, path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a reader
    never sees a half-written file, and a failed save leaves the previous file and no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # not mkstemp's 0600: model files are shared (shipped, user folder)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value, where: str):
    """Metrics as plain Python data (numpy/torch scalars become numbers), so weights_only can read them."""
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays, tensors
        return value.tolist()
    for kind in (bool, int, float, str):  # subclasses (np.float64 is a float)
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a model file (plain data only)")


def missing_model_message(path) -> str:
    """Why `path` cannot be loaded when it does not exist, with the next step for the default model."""
    path = Path(path)
    if path.resolve() != default_model_path().resolve():
        return f"model file {path}: no such file"
    try:
        shipped = registry.registered_entry(path) is not None  # a trained default ships in tree and extension
    except registry.RegistryError:
        shipped = False
    if shipped:
        where = "In a source tree restore it with `git checkout -- " + str(path) + "`"
    else:
        where = "In a source tree `make setup` writes it (an untrained placeholder until a trained model ships)"
    return (f"the default model file {path} is missing. {where}; in Slicer, choose a model in the Model panel "
            "(one trained with ENSAM Training) or reinstall the extension; on the command line, pass "
            "--checkpoint FILE (README 'Model card')")


def _read(path, mmap: bool) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(missing_model_message(path))
    check_registered(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise NotAModelFileError(f"model file {path}: not an ENSAM model file (not a torch.save archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        if "pickle" in type(error).__name__.lower() or "weights_only" in str(error):
            raise NotAModelFileError(f"model file {path}: not an ENSAM model file (it holds Python objects "
                                     f"other than tensors and plain data)") from error
        reason = str(error).split(". ")[0]
        raise CorruptModelFileError(f"model file {path}: damaged or truncated ({reason})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NotAModelFileError(f"model file {path}: not an ENSAM model file (no format {FORMAT!r} marker; "
                                 f"it holds a {type(payload).__name__})")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileVersionError(f"model file {path}: format version {version!r}, this ENSAM "
                                    f"({__version__}) reads version {FORMAT_VERSION}")
    for key in ("config", "weights"):
        if not isinstance(payload.get(key), dict):
            raise NotAModelFileError(f"model file {path}: the {key!r} entry is missing or not a dict")
    return payload


def check_registered(path) -> registry.ModelEntry | None:
    """When the registry in `path`'s folder lists the file: its entry, after checking the sha256
    (ModelChecksumError when it differs). None for an unregistered file."""
    try:
        found = registry.registered_entry(path)
    except registry.RegistryError as error:
        raise ModelRegistryError(f"model file {path}: {error}") from None
    if found is None:
        return None
    reg, entry = found
    actual = registry.file_sha256(path)
    if actual != entry.sha256:
        raise ModelChecksumError(registry.mismatch_message(path, reg, entry, actual))
    return entry


def _info(path, payload: dict) -> ModelInfo:
    try:
        config = ENSAMConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as error:
        raise ArchitectureMismatchError(f"model file {path}: invalid architecture config: {error}") from error
    weights = payload["weights"]
    return ModelInfo(
        path=Path(path), config=config, format_version=payload["format_version"],
        created=str(payload.get("created", "")), ensam_version=str(payload.get("ensam_version", "")),
        training_data=str(payload.get("training_data", "")), metrics=dict(payload.get("metrics") or {}),
        notes=str(payload.get("notes", "")),
        parameters=sum(v.numel() for v in weights.values() if isinstance(v, torch.Tensor)),
        weights_dtype=_weights_dtype(weights), voxel_budget=_optional_int(payload.get("voxel_budget")))


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _weights_dtype(weights: dict) -> str:
    """The floating-point type of most weights ('float32', 'float16', ...)."""
    counts: dict = {}
    for v in weights.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else ""


def read_model_info(path) -> ModelInfo:
    """Metadata and config of a model file, without building the model."""
    return _info(path, _read(path, mmap=True))


def load_model(path, device="cpu") -> tuple[ENSAM, ModelInfo]:
    """Build the model a file describes and load its weights; returns (model in eval mode, info)."""
    payload = _read(path, mmap=False)
    info = _info(path, payload)
    model = ENSAM(info.config)
    expected = model.state_dict()
    _check_weights(path, expected, payload["weights"])
    # float16 files: cast to the model's own types (float32) explicitly, not through load_state_dict
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in payload["weights"].items()})
    return model.to(device).eval(), info


def _check_weights(path, expected: dict, weights: dict) -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in weights and (not isinstance(weights[k], torch.Tensor) or weights[k].shape != v.shape)]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{len(items)} {what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
    if problems:
        raise ArchitectureMismatchError(f"model file {path}: weights do not match its architecture config "
                                        f"({'; '.join(problems)})")


def create_untrained_model_file(path, seed: int = 0, config: ENSAMConfig | None = None) -> Path:
    """Write a deterministic randomly initialised model (clearly marked untrained), e.g. so the demo
    runs before trained weights exist."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ENSAM(config or ENSAMConfig())
    return save_model(path, model, training_data=UNTRAINED,
                      notes=f"Random initialisation (seed {seed}); segmentations from it are meaningless.")


def ensure_default_model(folder: Path | None = None) -> str:
    """`make setup`: until a default model is registered in the shipped registry, write the untrained
    placeholder (seed 0) where the default model goes; once one is registered, never write there.
    Returns what was done; ModelFileError when the registered default file is missing."""
    folder = Path(folder) if folder is not None else registry.SHIPPED_DIR
    try:
        reg = registry.Registry.load(folder)
    except registry.RegistryError as error:
        raise ModelRegistryError(str(error)) from None
    entry = reg.get(reg.default) if reg.default else None
    if entry is not None:
        if not reg.file_of(entry).is_file():
            raise ModelFileNotFoundError(
                f"the registered default model {reg.file_of(entry)} ({entry.name!r} in {reg.path}) is missing: "
                "restore it (git checkout -- that file)")
        return f"default model: {reg.file_of(entry)} ({entry.name}, registered)"
    path = registry.default_model_path(folder)
    if path.is_file():
        return f"default model: {path} (unregistered)"
    create_untrained_model_file(path, seed=0)
    return f"wrote the untrained placeholder default model {path} (no trained model is registered yet)"


if __name__ == "__main__":  # `make setup`
    import sys

    try:
        print(ensure_default_model())
    except ModelFileError as error:
        sys.exit(f"make setup: {error}")
