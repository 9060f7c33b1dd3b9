"""`ensam train` end to end on tiny phantoms: the loss falls, resume is exact, signals, DDP, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHAPE, TINY_BUDGET, TINY_MODEL, write_case

from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.core.modelfile import load_model, read_model_info
from ENSAMSegmentLib.core.phantom import make_phantom, write_challenge_dataset
from ENSAMTrainingLib.core.logs import read_csv
from ENSAMTrainingLib.core.progress import ProgressStream, read_events
from ENSAMTrainingLib.core.trainer import TrainConfig, TrainingError, resume, train

VENV_BIN = Path(sys.executable).parent
def tiny_config(data, out, **changes) -> TrainConfig:
    values = dict(
        data=str(data), out=str(out), epochs=2, voxel_budget=TINY_BUDGET, val_fraction=0.0, workers=0,
        accumulation=2, augment=False, model_config=TINY_MODEL, progress_bar=False,
    )
    values.update(changes)
    return TrainConfig(**values)


def cli_args(data, out, *extra) -> list[str]:
    return [
        "train", "--data", str(data), "--out", str(out), "--epochs", "2", "--voxel-budget", str(TINY_BUDGET),
        "--val-fraction", "0", "--workers", "0", "--accumulation", "2", "--no-augment", "--no-progress-bar",
        "--model-config", json.dumps(TINY_MODEL), *extra,
    ]


def parameters(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference_run(four_cases, tmp_path_factory):
    """A run that is never interrupted: 4 cases, 2 epochs, 2 samples per step = 4 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(tiny_config(four_cases, out, workers=1))
    assert result.status == "finished" and result.step == 4
    return out


def test_two_cases_loss_falls_and_run_folder(tmp_path):
    data = tmp_path / "data"
    write_challenge_dataset(data, 3, shape=SHAPE, seed=5)
    (tmp_path / "train.txt").write_text("CT_Phantom_0000.npz\nMR_Phantom_0001.npz\n")
    (tmp_path / "val.txt").write_text("CT_Phantom_0002.npz\n")
    out, progress = tmp_path / "run", tmp_path / "progress.jsonl"
    code = main(cli_args(data, out, "--cases", str(tmp_path / "train.txt"), "--val-cases", str(tmp_path / "val.txt"),
                         "--epochs", "7", "--accumulation", "1", "--progress-json", str(progress)))
    assert code == 0
    losses = [row["loss"] for row in read_csv(out / "metrics.csv")]
    assert len(losses) == 14  # 2 cases x 7 epochs, one sample per step
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses

    events = read_events(progress)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 14 and kinds.count("epoch") == 7
    start, done = events[0], events[-1]
    assert (start["train_cases"], start["val_cases"], start["total_steps"]) == (2, 1, 14)
    assert done["status"] == "finished" and Path(done["model"]) == out / "model.pt"
    val = [e["val"] for e in events if e["event"] == "epoch"][-1]
    assert val["cases"] == 1 and len(val["dsc"]) == 6 and 0 <= val["dsc_auc"] <= 4 and 0 <= val["final_dsc"] <= 1
    steps = [e for e in events if e["event"] == "step"]
    assert steps[-1]["step"] == 14 and steps[-1]["eta_s"] == 0 and steps[0]["samples_per_s"] > 0

    assert len(read_csv(out / "validation.csv")) == 7
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "cases_train.txt").read_text().splitlines() == ["CT_Phantom_0000.npz", "MR_Phantom_0001.npz"]
    info = read_model_info(out / "model.pt")
    assert info.config.to_dict() == torch.load(out / "checkpoint.pt", weights_only=True)["model_config"]
    assert "2 cases" in info.training_data and info.metrics["final_dsc"] == val["final_dsc"]
    assert main(["info", "--checkpoint", str(out / "model.pt")]) == 0

    # fine-tuning starts from the model file's weights and architecture
    tuned = tmp_path / "tuned"
    assert main(cli_args(data, tuned, "--cases", str(tmp_path / "train.txt"), "--epochs", "1",
                         "--init-model", str(out / "model.pt"))) == 0
    start_model, _ = load_model(out / "model.pt")
    tuned_model, tuned_info = load_model(tuned / "model.pt")
    assert tuned_info.config == info.config
    moved = [not torch.equal(a, b) for a, b in zip(start_model.parameters(), tuned_model.parameters())]
    assert any(moved)


def test_stopped_and_resumed_run_equals_uninterrupted(reference_run, four_cases, tmp_path):
    out, progress = tmp_path / "run", tmp_path / "progress.jsonl"
    # checkpoint_minutes=0: a timed checkpoint after every step, which must not change anything
    first = train(tiny_config(four_cases, out, stop_after=3, checkpoint_minutes=0), ProgressStream(progress))
    assert (first.status, first.step, first.model) == ("stopped", 3, None)
    reasons = [(e["step"], e["reason"]) for e in read_events(progress) if e["event"] == "checkpoint"]
    assert reasons == [(1, "time"), (2, "epoch"), (3, "stop")]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["position"]) == (1, 2)
    second = resume(out, stop_after=None, workers=2)  # other worker counts: same samples
    assert (second.status, second.step) == ("finished", 4)
    expected, got = parameters(reference_run), parameters(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    reference_losses = [r["loss"] for r in read_csv(reference_run / "metrics.csv")]
    assert [r["loss"] for r in read_csv(out / "metrics.csv")] == reference_losses


def test_sigterm_checkpoints_and_resume_matches(reference_run, four_cases, tmp_path):
    out, progress = tmp_path / "run", tmp_path / "progress.jsonl"
    command = [str(VENV_BIN / "ensam"), *cli_args(four_cases, out, "--workers", "1", "--progress-json", str(progress))]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.exists() and any(e["event"] == "step" for e in read_events(progress)):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    events = read_events(progress)
    assert events[-2]["event"] == "checkpoint" and events[-2]["reason"] == "signal"
    assert events[-1]["event"] == "done" and events[-1]["status"] == "interrupted" and events[-1]["model"] is None
    assert not (out / "model.pt").exists()

    assert main(["train", "--out", str(out), "--resume", "--progress-json", str(progress)]) == 0
    assert read_events(progress)[-1]["status"] == "finished"
    expected, got = parameters(reference_run), parameters(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_accumulation_changes_on_resume_from_an_epoch_end_only(four_cases, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_config(four_cases, out, stop_after=3)).step == 3  # mid-epoch 1 (2 steps an epoch)
    with pytest.raises(TrainingError, match="mid-epoch with 2 samples per step"):
        resume(out, accumulation=1)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3  # the refusal changed nothing
    epoch_end = tmp_path / "epoch_end"
    assert train(tiny_config(four_cases, epoch_end, stop_after=2)).step == 2
    state = torch.load(epoch_end / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["position"]) == (0, 4)  # stopped after epoch 0's last step
    result = resume(epoch_end, stop_after=None, accumulation=1)  # 4 samples: 4 steps in epoch 1
    assert (result.status, result.step) == ("finished", 6)
    assert [r["samples"] for r in read_csv(epoch_end / "metrics.csv")] == [2, 4, 5, 6, 7, 8]
    assert json.loads((epoch_end / "config.json").read_text())["accumulation"] == 1


def test_ddp_two_gloo_processes_match_one_process(four_cases, tmp_path):
    # 2 ranks x 1 sample per step == 1 process x 2 samples per step: the same 2 samples, averaged
    # (in float32: bf16 rounding would differ with the order of the gradient sums)
    out = tmp_path / "ddp"
    args = cli_args(four_cases, out, "--epochs", "1", "--accumulation", "1", "--no-amp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ENSAMSegmentLib.cli.main", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_csv(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2] and [r["samples"] for r in rows] == [2, 4]
    single = train(tiny_config(four_cases, tmp_path / "single", epochs=1, accumulation=2, amp=False))
    assert single.step == 2
    expected, got = parameters(tmp_path / "single"), parameters(out)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert (out / "model.pt").is_file()


def test_bad_input(tmp_path, four_cases, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(cli_args(empty, tmp_path / "r1")) == 2
    assert "no training cases in" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "cannot resume: no checkpoint" in capsys.readouterr().err
    assert main(cli_args(four_cases, tmp_path / "r2", "--device", "cuda:7")) == 2
    assert "cuda" in capsys.readouterr().err.lower()

    # bad cases are skipped with a warning; training goes on with the good ones
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    image, labels = make_phantom(SHAPE, 3, n_objects=2)
    image = (image.clip(-160, 240) + 160).astype("uint8")
    write_case(mixed / "a_background.npz", image, labels * 0)
    write_case(mixed / "b_mismatch.npz", image, labels[:-1])
    write_case(mixed / "c_nolabels.npz", image, None)
    write_case(mixed / "d_good.npz", image, labels)
    progress = tmp_path / "mixed.jsonl"
    assert main(cli_args(mixed, tmp_path / "r3", "--epochs", "1", "--progress-json", str(progress))) == 0
    warnings = {e["case"]: e["message"] for e in read_events(progress) if e["event"] == "warning"}
    assert set(warnings) == {"a_background", "b_mismatch", "c_nolabels"}
    assert "labels all background" in warnings["a_background"] and "mismatched shapes" in warnings["b_mismatch"]
    assert "missing labels" in warnings["c_nolabels"]
    assert main(cli_args(mixed, tmp_path / "r3", "--epochs", "1")) == 2  # the run folder is taken
    assert "already holds a run" in capsys.readouterr().err

    # nothing usable at all: stop with the reasons (found by a worker process: its traceback is not
    # shown, and the workers are shut down so that the process ends)
    (mixed / "d_good.npz").unlink()
    progress = tmp_path / "bad.jsonl"
    command = [str(VENV_BIN / "ensam"), *cli_args(mixed, tmp_path / "r4", "--workers", "1", "--progress-json", str(progress))]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: none of the 3 training cases can be used: " in run.stderr
    assert "a_background: labels all background" in run.stderr and "b_mismatch: mismatched shapes" in run.stderr
    assert read_events(progress)[-1]["event"] == "error"


def test_export_a_stopped_run_as_a_model_file(four_cases, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(four_cases, out, stop_after=2))
    assert not (out / "model.pt").exists()  # stopped early: only the checkpoint
    assert main(["train", "--out", str(out), "--export", str(tmp_path / "m16.pt"), "--fp16"]) == 0
    assert main(["train", "--out", str(out), "--export", str(tmp_path / "m32.pt")]) == 0
    (m16, info), (m32, _) = load_model(tmp_path / "m16.pt"), load_model(tmp_path / "m32.pt")
    assert (tmp_path / "m16.pt").stat().st_size < 0.6 * (tmp_path / "m32.pt").stat().st_size
    expected = parameters(out)  # the checkpoint's weights
    for key, value in m32.state_dict().items():
        assert torch.equal(value, expected[key]), key
        torch.testing.assert_close(m16.state_dict()[key], value, rtol=1e-3, atol=1e-3)
    assert "2 steps, 4 samples" in info.notes and str(four_cases) in info.training_data
    assert info.voxel_budget == TINY_BUDGET  # the session works at the scale it was trained at
    assert main(["train", "--out", str(tmp_path / "none"), "--export", str(tmp_path / "x.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def _poison_samples(monkeypatch, which):
    """Make the loss of the samples whose 0-based index (in the run) is in `which` NaN."""
    from ENSAMTrainingLib.core.step import InteractiveStep

    forward, seen = InteractiveStep.forward, [0]

    def poisoned(self, sample):
        loss, logits = forward(self, sample)
        index, seen[0] = seen[0], seen[0] + 1
        return (loss * float("nan"), logits) if index in which else (loss, logits)

    monkeypatch.setattr(InteractiveStep, "forward", poisoned)


def test_a_step_with_a_nan_loss_is_skipped_and_the_run_goes_on(four_cases, tmp_path, monkeypatch):
    """One bad sample (here: its loss made NaN) must not make the weights NaN: its step updates nothing,
    is reported, and later steps train on (without the guard, every later loss and checkpoint is NaN)."""
    _poison_samples(monkeypatch, {2})  # the second step's first sample
    out, progress = tmp_path / "run", tmp_path / "progress.jsonl"
    result = train(tiny_config(four_cases, out, progress_json=str(progress)))
    assert result.status == "finished" and result.step == 4
    skipped = [e for e in read_events(progress) if e["event"] == "warning" and "skipped_step" in e]
    assert [(e["skipped_step"], e["in_a_row"]) for e in skipped] == [(2, 1)] and "not finite" in skipped[0]["message"]
    assert all(torch.isfinite(t).all() for t in parameters(out).values() if t.is_floating_point())
    losses = [row["loss"] for row in read_csv(out / "metrics.csv")]
    assert len(losses) == 4 and not math.isfinite(float(losses[1])) and all(math.isfinite(float(x)) for x in
                                                                           losses[:1] + losses[2:])


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(four_cases, tmp_path, monkeypatch):
    import ENSAMTrainingLib.core.trainer as trainer_module
    from ENSAMTrainingLib.core.runsetup import TrainingError

    out = tmp_path / "run"
    assert train(tiny_config(four_cases, out, epochs=1)).status == "finished"  # a good checkpoint
    good = parameters(out)
    monkeypatch.setattr(trainer_module, "MAX_NONFINITE_IN_A_ROW", 2)
    _poison_samples(monkeypatch, set(range(100)))
    with pytest.raises(TrainingError, match="2 optimizer steps in a row .* not finite; stopped"):
        resume(out, epochs=3)
    after = parameters(out)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_weights_that_are_not_finite_are_never_checkpointed(four_cases, tmp_path):
    from ENSAMTrainingLib.core.runsetup import TrainingError
    from ENSAMTrainingLib.core.trainer import Trainer

    out = tmp_path / "run"
    assert train(tiny_config(four_cases, out, epochs=1)).status == "finished"
    before = (out / "checkpoint.pt").read_bytes()
    trainer = Trainer(tiny_config(four_cases, tmp_path / "other"))
    trainer.checkpoint_path = out / "checkpoint.pt"
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="not finite: no checkpoint written"):
        trainer._save_checkpoint("time")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_run_stopped_at_an_epoch_end_goes_on_under_torchrun_with_half_the_accumulation(four_cases, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_config(four_cases, out, stop_after=2)).step == 2  # epoch 0: 2 steps of 2 samples
    args = ["train", "--out", str(out), "--resume", "--accumulation", "1", "--stop-after", "99", "--no-progress-bar"]
    run = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ENSAMSegmentLib.cli.main", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_csv(out / "metrics.csv")  # epoch 1: 2 processes x 1 sample = 2 samples per step, as before
    assert [(r["epoch"], r["step"], r["samples"]) for r in rows] == [(0, 1, 2), (0, 2, 4), (1, 3, 6), (1, 4, 8)]
    assert (out / "model.pt").is_file()
