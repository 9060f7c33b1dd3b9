""".ci/gpu-train, tested on the CPU for everything but the device (ENSAM_GPU_DEVICE=cpu): it continues a
model on a data folder with its case lists, stops at its time limit with a checkpoint, and writes the
model file, the logs and gpu-train.json that come back from a lent machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ENSAMSegmentLib.core.modelfile import create_untrained_model_file, load_model
from ENSAMSegmentLib.core.phantom import write_challenge_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(init_filters=8, norm_groups=4, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32, interaction_layers=1,
            prev_channels=(4, 8))


def run_script(tmp_path, minutes: str, train_args: str):
    from ENSAMSegmentLib.core.network import ENSAMConfig

    data = tmp_path / "data"
    paths = write_challenge_dataset(data, 3, shape=(16, 24, 24), seed=1)
    (data / "cases.txt").write_text("".join(p.name + "\n" for p in paths[:2]))
    (data / "val_cases.txt").write_text(paths[2].name + "\n")
    model = create_untrained_model_file(tmp_path / "start.pt", seed=0, config=ENSAMConfig(**TINY))
    env = {**os.environ, "PYTHON": sys.executable, "ENSAM_GPU_DEVICE": "cpu", "ENSAM_GPU_MINUTES": minutes,
           "ENSAM_GPU_BUDGET": "4096", "ENSAM_GPU_WORKERS": "0", "ENSAM_GPU_TRAIN_ARGS": train_args,
           "ENSAM_GPU_REQUIRES": "numpy", "TMPDIR": str(tmp_path)}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-train"), str(model), str(data), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    return done, out


def test_gpu_train_continues_a_model_and_writes_what_comes_back(tmp_path):
    done, out = run_script(tmp_path, "5", "--epochs 2 --accumulation 1")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "gpu-train.json").read_text())
    assert summary["device"] == "cpu" and summary["voxel_budget"] == 4096
    assert summary["samples"] == 4 and summary["samples_per_s"] > 0  # 2 cases x 2 epochs
    assert len(summary["validation"]) == 2  # one validation per epoch, on val_cases.txt
    model, info = load_model(out / "model.pt")
    start, _ = load_model(tmp_path / "start.pt")
    assert not torch.equal(model.state_dict()["encoder.init_conv.weight"], start.state_dict()["encoder.init_conv.weight"])
    assert "4 samples" in info.notes and not info.untrained
    for name in ("metrics.csv", "validation.csv", "progress.jsonl", "train.log"):
        assert (out / name).is_file(), name


def test_gpu_train_stops_at_its_time_limit_with_a_usable_model(tmp_path):
    done, out = run_script(tmp_path, "0.4", "--epochs 1000 --accumulation 1")  # 24 s, then SIGTERM
    assert done.returncode == 0, done.stdout + done.stderr
    assert "interrupted" in (out / "train.log").read_text()
    summary = json.loads((out / "gpu-train.json").read_text())
    assert summary["samples"] > 0 and 20 <= summary["seconds"] < 200
    load_model(out / "model.pt")


def test_gpu_train_needs_its_arguments(tmp_path):
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-train")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: .ci/gpu-train MODEL DATA_DIR" in done.stdout
