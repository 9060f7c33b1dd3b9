"""Listing, verifying, importing and registering model files: what `ensam models` does.

Registries (registry.py) live in two folders: the shipped one (ENSAMSegment/Resources/Models, where
`register` writes the maintainer's models as float16 files) and the user's (`import` copies there).
Every write is atomic (a temporary file in the target folder, then a rename) and nothing is
overwritten without `replace`, except, by `register`, the untrained placeholder that `make setup` writes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ENSAMSegmentLib.core import registry
from ENSAMSegmentLib.core.modelfile import (ModelFileError, ModelInfo, ModelRegistryError, load_model,
                                           read_model_info, save_model)
from ENSAMSegmentLib.core.registry import ModelEntry, Registry, RegistryError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ModelStoreError(Exception):
    """A name, folder or request `import` / `register` refuses; the message says what to do."""


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or "") or name.lower().endswith(".pt"):
        raise ModelStoreError(f"model name {name!r}: use letters, digits, '.', '-', '_' (no '.pt'), "
                              "starting with a letter or digit")
    return name


def load_registry(folder) -> Registry:
    try:
        return Registry.load(folder)
    except RegistryError as error:
        raise ModelRegistryError(str(error)) from None


@dataclass
class Check:
    """One model file's state: status is ok, modified (sha256 differs), missing, unusable or unregistered."""

    path: Path
    where: str  # shipped | user | file
    status: str
    name: str = ""
    default: bool = False
    problem: str = ""
    entry: ModelEntry | None = None
    info: ModelInfo | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "where": self.where, "status": self.status,
                "default": self.default, "problem": self.problem,
                "entry": vars(self.entry) if self.entry else None,
                "metadata": self.info.metadata() if self.info else None}


def check_file(path, where: str = "file", full: bool = False, default: bool = False) -> Check:
    """Check one file: its sha256 against the registry of its folder, then read its metadata
    (full: build the model and load every weight)."""
    path = Path(path)
    found = registry.registered_entry(path) if path.parent.is_dir() else None
    entry = found[1] if found else None
    check = Check(path, where, "ok" if entry else "unregistered", entry.name if entry else path.stem, default,
                  entry=entry)
    if not path.is_file():
        check.status, check.problem = "missing", f"model file {path}: no such file"
        return check
    try:
        check.info = load_model(path)[1] if full else read_model_info(path)
    except ModelFileError as error:
        check.status = "modified" if entry and registry.file_sha256(path) != entry.sha256 else "unusable"
        check.problem = str(error)
        return check
    if entry and entry.architecture and entry.architecture != check.info.config.to_dict():
        check.status, check.problem = "unusable", (f"model file {path}: its architecture differs from its "
                                                   f"entry in {found[0].path}")
    return check


def folder_checks(folder, where: str, full: bool = False) -> list[Check]:
    """The registered models of `folder` (in registry order), then its unregistered *.pt files."""
    folder = Path(folder)
    reg = load_registry(folder)
    checks = [check_file(reg.file_of(e), where, full, default=e.name == reg.default) for e in reg.models]
    listed = {e.file for e in reg.models}
    if folder.is_dir():
        checks += [check_file(p, where, full, default=p == registry.default_model_path(folder) and where == "shipped")
                   for p in sorted(folder.glob("*.pt")) if p.name not in listed]
    return checks


def all_checks(full: bool = False) -> list[Check]:
    return (folder_checks(registry.SHIPPED_DIR, "shipped", full)
            + folder_checks(registry.user_models_dir(), "user", full))


def find(name_or_file: str, full: bool = True) -> list[Check]:
    """A file path, or a model name in the shipped and the user registries."""
    path = Path(name_or_file)
    if path.suffix == ".pt" or path.exists():
        if path.is_dir():
            raise ModelStoreError(f"{path} is a folder; give a model file or a model name")
        return [check_file(path, full=full)]
    found = [c for c in all_checks(full=False) if c.name == name_or_file]
    if not found:
        raise ModelStoreError(f"no model named {name_or_file!r} (and no such file); `ensam models list` "
                              "shows the names")
    return [check_file(c.path, c.where, full, c.default) for c in found]


def entry_for(path: Path, name: str, info: ModelInfo) -> ModelEntry:
    return ModelEntry(name=name, file=path.name, sha256=registry.file_sha256(path), bytes=path.stat().st_size,
                      weights_dtype=info.weights_dtype, parameters=info.parameters,
                      architecture=info.config.to_dict(), training_data=info.training_data,
                      metrics=info.metrics, created=info.created, ensam_version=info.ensam_version,
                      notes=info.notes)


def _refuse_overwrite(reg: Registry, target: Path, name: str, replace: bool, placeholder_ok: bool = False) -> None:
    if replace:
        return
    if reg.get(name):
        raise ModelStoreError(f"a model named {name!r} is already registered in {reg.path}; choose another "
                              "--name, or pass --replace to overwrite it")
    if target.exists() and not (placeholder_ok and _is_placeholder(target)):
        raise ModelStoreError(f"{target} already exists; choose another --name, or pass --replace to "
                              "overwrite it")


def _is_placeholder(path: Path) -> bool:
    try:
        return read_model_info(path).untrained
    except ModelFileError:
        return False


def _commit(tmp: Path, target: Path, reg: Registry, entry: ModelEntry) -> None:
    """Rename the checked temporary file over `target`, then write the registry entry (a new file
    is removed again when the registry cannot be written)."""
    existed = target.exists()
    os.replace(tmp, target)
    reg.put(entry)
    try:
        reg.save()
    except BaseException:
        if not existed:
            target.unlink(missing_ok=True)
        raise


def import_model(source, name: str | None = None, folder=None, replace: bool = False) -> ModelEntry:
    """Copy the model file `source` into `folder` (default: the user model folder) as <name>.pt and
    register it there. The file must load completely; the copy is checked against the source's sha256."""
    source = Path(source)
    folder = Path(folder) if folder is not None else registry.user_models_dir()
    name = check_name(name or (source.parent.name if source.name == "model.pt" else source.stem))
    if source.is_dir():
        raise ModelStoreError(f"{source} is a folder; give a model file")
    _model, info = load_model(source)  # refuses missing, unknown, damaged and mismatched files
    reg = load_registry(folder)
    target = folder / f"{name}.pt"
    if target.exists() and target.resolve() == source.resolve():  # already there: register it in place
        reg.put(entry_for(target, name, info))
        reg.save()
        return reg.get(name)
    _refuse_overwrite(reg, target, name, replace)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelStoreError(f"cannot create the model folder {folder}: {error.strerror or error}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        if registry.file_sha256(tmp) != registry.file_sha256(source):
            raise ModelStoreError(f"the copy of {source} in {folder} differs from the source (changed while "
                                  "copying?); nothing was imported")
        entry = entry_for(tmp, name, info)
        entry.file = target.name
        _commit(tmp, target, reg, entry)
    finally:
        tmp.unlink(missing_ok=True)
    return entry


def register_model(source, name: str, folder=None, *, training_data: str | None = None,
                   metrics: dict | None = None, notes: str | None = None, dtype=torch.float16,
                   default: bool = False, replace: bool = False, max_bytes: int | None = None):
    """The maintainer's step: write `source` as <folder>/<name>.pt (floating weights as `dtype`, metadata
    updated with the given training data, metrics and notes) and register it in `folder`'s registry
    (default: the shipped one, where files are limited to registry.SHIPPED_MAX_BYTES). `default`: make
    it the default model (the first model registered in a folder is the default).
    Returns (entry, probe): probe compares the written model's outputs with the source's."""
    folder = Path(folder) if folder is not None else registry.SHIPPED_DIR
    if max_bytes is None and folder.resolve() == registry.SHIPPED_DIR.resolve():
        max_bytes = registry.SHIPPED_MAX_BYTES
    check_name(name)
    model, info = load_model(source)
    if info.untrained:
        raise ModelStoreError(f"{source} is an untrained model ({info.training_data}); only trained models "
                              "are registered (the untrained one is a test fixture)")
    reg = load_registry(folder)
    target = folder / f"{name}.pt"
    same = target.exists() and target.resolve() == Path(source).resolve()
    if not same:
        _refuse_overwrite(reg, target, name, replace, placeholder_ok=True)  # make setup's untrained one
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.pt.register.tmp"
    try:
        save_model(tmp, model, dtype=dtype, created=info.created or None,
                   training_data=info.training_data if training_data is None else training_data,
                   metrics=info.metrics if metrics is None else metrics,
                   notes=info.notes if notes is None else notes, voxel_budget=info.voxel_budget)
        size = tmp.stat().st_size
        if max_bytes and size > max_bytes:
            raise ModelStoreError(f"{name}.pt would be {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB "
                                  "limit for shipped model files (store float16 weights: leave out --fp32)")
        written, new_info = load_model(tmp)
        probe = compare_outputs(model, written)
        entry = entry_for(tmp, name, new_info)
        entry.file = target.name
        if default or reg.default is None or reg.get(reg.default) is None:
            reg.default = name
        _commit(tmp, target, reg, entry)
    finally:
        tmp.unlink(missing_ok=True)
    return entry, probe


def compare_outputs(reference, model, size: int = 32) -> dict:
    """Both models' logits on one seeded probe (a random image, a box and a click): the largest
    difference and the fraction of voxels whose foreground/background decision differs."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, size, size, size, generator=generator)
    from ENSAMSegmentLib.core.network import Prompts

    prompts = Prompts.from_objects([{"box": ((8, 8, 8), (23, 23, 23)), "fg": [(16, 16, 16)]}])
    with torch.no_grad():
        a, b = reference.eval()(image, prompts), model.eval()(image, prompts)
    return {"max_abs_logit_difference": float((a - b).abs().max()),
            "decision_flips": float(((a > 0) != (b > 0)).float().mean())}
