"""Start-up of the `ensam` tool: building its parser (every command, training ones included) imports
neither torch nor the network, so that `ensam --help` and argument errors answer at once (~0.3 s
instead of ~3 s; README "Performance"). Structural, not timed."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "monai", "SimpleITK", "scipy", "slicer", "vtk")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_building_the_parser_imports_nothing_heavy():
    code = ("import sys\nfrom ENSAMSegmentLib.cli.main import build_parser\nparser = build_parser()\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
            "print(sorted(parser._subparsers._group_actions[0].choices))")
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    heavy, commands = out.stdout.splitlines()
    assert heavy == "[]"
    assert all(name in commands for name in ("'segment'", "'predict'", "'bench'", "'train'", "'train-bench'"))


def test_argument_errors_and_help_import_nothing_heavy():
    code = ("import sys\nfrom ENSAMSegmentLib.cli.main import main\n"
            "for argv in (['--help'], ['predict'], ['bench', '--shape', 'x'], ['train-bench', 'throughput', "
            "'--shapes', '7']):\n"
            "    try:\n        code = main(argv)\n    except SystemExit as e:\n        code = e.code\n"
            f"    print(code, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
    out = run_python(code)
    lines = [line for line in out.stderr.splitlines() if line[:1].isdigit()]
    assert lines == ["0 []", "2 []", "2 []", "2 []"], out.stderr


def test_a_training_command_still_finds_its_code():
    from ENSAMSegmentLib.cli.main import build_parser

    args = build_parser().parse_args(["train-bench", "throughput", "--shapes", "8,8,8", "--steps", "1"])
    assert callable(args.func) and args.shapes == [(8, 8, 8)]
    from ENSAMTrainingLib.core import bench

    assert callable(bench._run_throughput_cmd)  # what args.func imports and calls
