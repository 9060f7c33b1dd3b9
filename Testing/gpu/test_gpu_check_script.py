""".ci/gpu-check, tested on the CPU for everything but the device (ENSAM_GPU_DEVICE=cpu): the torch
check, installing a missing module offline from a wheel folder into a folder of its own, the
GPU-marked tests (skipped here), the benchmark, and the JSON it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = "ensam_gpu_check_probe"


def make_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel holding one module, as pip builds them."""
    folder.mkdir()
    info = f"{PROBE}-1.0.dist-info"
    files = {f"{PROBE}.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    path = folder / f"{PROBE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_gpu_check_runs_on_the_cpu_and_writes_its_json(tmp_path):
    make_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "ENSAM_GPU_DEVICE": "cpu", "ENSAM_GPU_SHAPE": "24,32,32",
           "ENSAM_GPU_REPEATS": "1", "ENSAM_GPU_BENCH_ARGS": "--no-growcut --no-agreement --warmup 0",
           "ENSAM_GPU_WHEELS": str(tmp_path / "wheels"), "ENSAM_GPU_SITE": str(tmp_path / "site"),
           "ENSAM_GPU_REQUIRES": f"numpy {PROBE}"}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"installing from {tmp_path / 'wheels'} into {tmp_path / 'site'}: {PROBE}" in done.stdout
    assert (tmp_path / "site" / f"{PROBE}.py").is_file()  # into its own folder, not into that Python
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["ok"] is True and summary["torch"] and summary["gpu"] is None
    cases = summary["tests"]["cases"]
    assert cases and all(c["outcome"] == "skipped" for c in cases)  # no GPU here: skipped cleanly
    assert summary["tests"]["counts"]["skipped"] == len(cases) >= 5
    report = summary["bench"]["report"]
    assert report["device"] == "cpu" and report["shape"] == [24, 32, 32] and report["click_s_median"] > 0
    assert "samples" in json.loads((out / "bench.json").read_text())  # all of it stays in bench.json


def test_gpu_check_refuses_a_missing_module_without_wheels(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "ENSAM_GPU_DEVICE": "cpu", "ENSAM_GPU_WHEELS": str(tmp_path),
           "ENSAM_GPU_SITE": str(tmp_path / "site"), "ENSAM_GPU_REQUIRES": "numpy ensam_no_such_module"}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "run .ci/gpu-wheels" in done.stdout
