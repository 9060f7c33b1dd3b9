"""`ensam models`: the model files ENSAM can use, where they are, and whether they are intact.

  ensam models list [--json]                 shipped and user models, metrics, verification status
  ensam models verify [NAME|FILE] [--json]   sha256 against the registry, and the model loads (exit 1 if not)
  ensam models import FILE [--name N]        copy a model file into the user model folder and register it
  ensam models register FILE --name N ...    maintainers: ship a model (float16) in the shipped registry

Shipped models sit in ENSAMSegment/Resources/Models with their registry models.json; user models in
~/.ensam/models (or $ENSAM_USER_MODELS_DIR), which the ENSAM Segment module lists in its Model panel.
A registered file whose sha256 differs from its entry is refused by every command that loads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ENSAMSegmentLib.cli.main import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list, verify, import and register model files",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="shipped and user models with metrics and verification status")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=run_list)

    verify = actions.add_parser("verify", help="check sha256 and load each model (exit code 1 when one fails)")
    verify.add_argument("model", nargs="?", metavar="NAME|FILE", help="a model name or file (default: every shipped and user model)")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=run_verify)

    imp = actions.add_parser("import", help="copy a model file into the user model folder and register it")
    imp.add_argument("file", type=Path, metavar="FILE", help="an ENSAM model file (e.g. a training run's model.pt)")
    imp.add_argument("--name", help="the model's name (default: the file name, or the run folder of a model.pt)")
    imp.add_argument("--replace", action="store_true", help="overwrite a user model of the same name")
    imp.set_defaults(func=run_import)

    reg = actions.add_parser("register", help="maintainers: write a trained model into the shipped registry",
                             description="Write FILE as <folder>/NAME.pt with float16 weights (at most 12 MB in "
                             "the shipped folder) and the given metadata, register its sha256, and say what is left to commit.")
    reg.add_argument("file", type=Path, metavar="FILE", help="the trained model file")
    reg.add_argument("--name", required=True, help="the model's name and file stem (e.g. ensam-default)")
    reg.add_argument("--training-data", metavar="TEXT", help="what it was trained on (default: the file's own record)")
    reg.add_argument("--metrics", metavar="JSON", help="dev-set metrics: a JSON object, or a JSON file (default: the file's)")
    reg.add_argument("--notes", metavar="TEXT", help="notes (default: the file's own)")
    reg.add_argument("--default", action="store_true", help="make it the default model (the first one is)")
    reg.add_argument("--fp32", action="store_true", help="store float32 weights instead of float16")
    reg.add_argument("--replace", action="store_true", help="overwrite a registered model of the same name")
    reg.add_argument("--folder", type=Path, metavar="DIR", help="registry folder (default: the shipped models folder)")
    reg.set_defaults(func=run_register)


def _errors():
    from ENSAMSegmentLib.core.modelfile import ModelFileError
    from ENSAMSegmentLib.core.modelstore import ModelStoreError
    from ENSAMSegmentLib.core.registry import RegistryError

    return ModelFileError, ModelStoreError, RegistryError


def _status(check) -> str:
    return {"ok": "ok (sha256 verified)", "unregistered": "unregistered (no sha256 to check)"}.get(
        check.status, check.status.upper())


def _metrics(metrics: dict) -> str:
    numbers = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    more = len(metrics) - len(numbers)
    return ", ".join(numbers) + (f" (+{more} more: --json)" if more else "") if metrics else "none recorded"


def _print_check(check, verbose: bool = True) -> None:
    info, entry = check.info, check.entry
    print(f"  {check.name}{' (default)' if check.default else ''}: {_status(check)}")
    print(f"      file: {check.path}")
    if check.problem:
        print(f"      problem: {check.problem}")
    if info:
        size = check.path.stat().st_size / 2**20
        print(f"      {info.parameters / 1e6:.2f} M parameters, {info.weights_dtype} weights, {size:.1f} MB")
        print(f"      trained on: {info.training_data or 'unknown'}" + ("  (UNTRAINED: segmentations "
                                                                          "mean nothing)" if info.untrained else ""))
        if verbose:
            print(f"      metrics: {_metrics(info.metrics)}")
    elif entry and verbose:
        print(f"      registered: trained on {entry.training_data or 'unknown'}; metrics: {_metrics(entry.metrics)}")


def run_list(args) -> int:
    from ENSAMSegmentLib.core import modelstore, registry

    try:
        checks = modelstore.all_checks()
    except _errors() as error:
        raise UserError(str(error)) from None
    if args.json:
        print(json.dumps({"shipped_folder": str(registry.SHIPPED_DIR), "user_folder": str(registry.user_models_dir()),
                          "models": [c.to_dict() for c in checks]}, indent=2))
        return 0
    for where, folder in (("shipped", registry.SHIPPED_DIR), ("user", registry.user_models_dir())):
        print(f"{where.capitalize()} models in {folder}:")
        found = [c for c in checks if c.where == where]
        for check in found:
            _print_check(check)
        if not found:
            print("  (none)" + ("; `ensam models import FILE` adds one" if where == "user" else ""))
    return 0


def run_verify(args) -> int:
    from ENSAMSegmentLib.core import modelstore

    try:
        checks = modelstore.find(args.model) if args.model else modelstore.all_checks(full=True)
    except _errors() as error:
        raise UserError(str(error)) from None
    failed = [c for c in checks if c.status not in ("ok", "unregistered")]
    if args.json:
        print(json.dumps({"ok": not failed, "models": [c.to_dict() for c in checks]}, indent=2))
    else:
        for check in checks:
            _print_check(check, verbose=False)
        print(f"{len(checks) - len(failed)} of {len(checks)} model files usable" if checks else "no model files")
    return 1 if failed else 0


def run_import(args) -> int:
    from ENSAMSegmentLib.core import modelstore, registry

    try:
        entry = modelstore.import_model(args.file, args.name, replace=args.replace)
    except _errors() as error:
        raise UserError(str(error)) from None
    folder = registry.user_models_dir()
    print(f"imported {args.file} as {entry.name!r}: {folder / entry.file}")
    print(f"  sha256 {entry.sha256}, registered in {folder / registry.REGISTRY_NAME}")
    print(f"  trained on: {entry.training_data or 'unknown'}; metrics: {_metrics(entry.metrics)}")
    print("  ENSAM Segment (Slicer) lists it in its Model panel; elsewhere: --checkpoint " + str(folder / entry.file))
    return 0


def _read_metrics(text: str | None) -> dict | None:
    if text is None:
        return None
    try:  # text that opens with "{" is the object itself (a long one is no file name: is_file would raise)
        value = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--metrics: neither a JSON object nor a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"--metrics: a JSON object is needed, got a {type(value).__name__}")
    return value


def run_register(args) -> int:
    import torch

    from ENSAMSegmentLib.core import modelstore, registry

    metrics = _read_metrics(args.metrics)
    try:
        entry, probe = modelstore.register_model(
            args.file, args.name, args.folder, training_data=args.training_data, metrics=metrics, notes=args.notes,
            dtype=None if args.fp32 else torch.float16, default=args.default, replace=args.replace)
    except _errors() as error:
        raise UserError(str(error)) from None
    folder = args.folder or registry.SHIPPED_DIR
    reg = registry.Registry.load(folder)
    print(f"registered {entry.name!r}{' (the default model)' if reg.default == entry.name else ''}: "
          f"{folder / entry.file}, {entry.bytes / 2**20:.1f} MB, {entry.weights_dtype} weights")
    print(f"  sha256 {entry.sha256} in {reg.path}")
    print(f"  outputs against {args.file} on a probe image: max |logit difference| "
          f"{probe['max_abs_logit_difference']:.2e}, decisions differing {probe['decision_flips']:.2%}")
    if folder.resolve() == registry.SHIPPED_DIR.resolve():
        for step in ship_steps(entry.file):
            print(f"  next: {step}")
    return 0


def ship_steps(filename: str) -> list[str]:
    """What is left to commit a shipped model file in a source tree."""
    from ENSAMSegmentLib.core import registry

    module = registry.SHIPPED_DIR.parents[1]  # ENSAMSegment/
    relative = f"ENSAMSegment/Resources/Models/{filename}"
    steps = []
    cmake = module / "CMakeLists.txt"
    if cmake.is_file() and f"Resources/Models/{filename}" not in cmake.read_text():
        steps.append(f"list Resources/Models/{filename} in ENSAMSegment/CMakeLists.txt (MODULE_PYTHON_RESOURCES)")
    gitignore = module.parent / ".gitignore"
    if gitignore.is_file() and relative in gitignore.read_text().splitlines():
        steps.append(f"remove the line {relative} from .gitignore")
    return steps + [f"git add {relative} ENSAMSegment/Resources/Models/models.json (and the files above), "
                    "then commit"]
