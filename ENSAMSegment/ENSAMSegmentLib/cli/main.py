"""The `ensam` command-line tool: one entry point, one module per subcommand.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed arguments, returning an exit code). Training commands
live in ENSAMTrainingLib (the segmentation library does not depend on it); they are
added when that package is installed.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# Order is the order shown by `ensam --help`.
COMMAND_MODULES = [
    "ENSAMSegmentLib.cli.cmd_demo",
    "ENSAMSegmentLib.cli.cmd_segment",
    "ENSAMSegmentLib.cli.cmd_info",
    "ENSAMSegmentLib.cli.cmd_models",
    "ENSAMSegmentLib.cli.cmd_predict",
    "ENSAMSegmentLib.cli.cmd_evaluate",
    "ENSAMSegmentLib.cli.cmd_bench",
    "ENSAMSegmentLib.cli.cmd_web",
]
OPTIONAL_COMMAND_MODULES = [
    # (module, reason it may be absent)
    ("ENSAMTrainingLib.cli.commands", "ENSAMTrainingLib is not installed"),
]


# Options whose value may start with '-' (RAS millimetres often do): argparse would take
# `--box -13.5,2,40,...` for an option, so such a value is passed on as `--box=-13.5,2,40,...`.
NUMBER_LIST_OPTIONS = ("--box", "--fg", "--bg")
_NEGATIVE_NUMBERS = re.compile(r"-\.?\d[\d.,eE+-]*")


def join_negative_values(argv: list[str]) -> list[str]:
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] in NUMBER_LIST_OPTIONS and _NEGATIVE_NUMBERS.fullmatch(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


class UserError(Exception):
    """An error caused by the user's input: printed as one clear line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from ENSAMSegmentLib import __version__

    parser = argparse.ArgumentParser(
        prog="ensam",
        description="ENSAM: promptable 3D medical image segmentation (box + clicks).",
    )
    parser.add_argument("--version", action="version", version=f"ensam {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for name, _reason in OPTIONAL_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and name.startswith(error.name):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"ensam {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that cannot be read or written after the checks (disk full, ...)
        print(f"ensam {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ensam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the package module so that commands raise the same UserError class.
    from ENSAMSegmentLib.cli.main import main as package_main

    sys.exit(package_main())
