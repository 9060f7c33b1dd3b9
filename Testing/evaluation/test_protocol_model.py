"""The protocol with the real ENSAM model: `ensam predict` through case files equals the in-process loop,
Resources/Challenge/predict.sh runs the predictor as the organisers do, and `ensam evaluate` runs all
three methods.

The model is a small untrained configuration (about 0.6 M parameters, so each test takes seconds)
whose output bias is shifted so that its logits straddle 0 inside the first box: its masks then
depend on every prompt, and any difference between the two paths would show in the scores.
"""

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.evaluation.protocol import FileStepper, MethodStepper, evaluate, list_cases
from ENSAMSegmentLib.core.imageio import ChallengeCase, read_challenge_npz, write_challenge_npz
from ENSAMSegmentLib.core.modelfile import load_model, save_model
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts
from ENSAMSegmentLib.core.phantom import write_challenge_dataset
from ENSAMSegmentLib.evaluation.predictor import EnsamMethod, predict_case
from ENSAMSegmentLib.core.simulation import box_dict_to_3d

ROOT = Path(__file__).resolve().parents[2]
PREDICT_SH = ROOT / "Resources" / "Challenge" / "predict.sh"
DOCKERFILE = ROOT / "Resources" / "Challenge" / "Dockerfile"
SHAPE = (24, 40, 40)
SMALL = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), mlp_hidden=64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    write_challenge_dataset(folder, 2, shape=SHAPE, seed=3, n_objects=2)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset):
    """Small untrained model whose logits straddle 0 inside the first case's first box."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ENSAM(SMALL).eval()
    case = read_challenge_npz(list_cases(dataset)[0])
    lo, hi = box_dict_to_3d(case.boxes[0])
    with torch.inference_mode():
        x = torch.from_numpy(case.imgs).float()[None, None] / 255.0
        logits = model.decode(model.encode(x), Prompts.from_objects([{"box": (lo, hi)}]))[0, 0]
        inside = logits[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        model.decoder.final_conv.bias -= inside.median()
    path = save_model(tmp_path_factory.mktemp("model") / "small.pt", model, training_data="untrained (test)")
    load_model(path)  # a valid model file
    return path


def _quiet(line):
    pass


class PredictCommand:
    """The container's side of the organisers' loop: `ensam predict` on the inputs folder, once per step
    (a fresh model and session every time). Keeps every step's case file and prediction, and the log."""

    def __init__(self, checkpoint, keep):
        self.checkpoint, self.keep, self.step, self.lines = checkpoint, Path(keep), {}, []

    def __call__(self, inputs, outputs):
        (path,) = inputs.glob("*.npz")
        step = self.step[path.name] = self.step.get(path.name, 0) + 1
        (self.keep / f"step{step}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, self.keep / f"step{step}" / path.name)
        assert main(["predict", "--input", str(inputs), "--output", str(outputs),
                     "--checkpoint", str(self.checkpoint), "--device", "cpu"]) == 0
        shutil.copy(outputs / path.name, self.keep / f"step{step}" / f"segs_{path.name}")


@pytest.fixture(scope="module")
def via_files(dataset, checkpoint, tmp_path_factory):
    """Both cases through the 6 steps, the organisers' way; returns (runs, the PredictCommand, its stdout)."""
    command = PredictCommand(checkpoint, tmp_path_factory.mktemp("steps"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        runs, _ = evaluate(list_cases(dataset), [FileStepper("ensam", command, tmp_path_factory.mktemp("work"))],
                           log=_quiet)
    return runs, command, stdout.getvalue().splitlines()


def test_predict_through_case_files_equals_the_in_process_loop(dataset, checkpoint, via_files):
    via_file_runs, _, lines = via_files
    method = EnsamMethod(checkpoint, "cpu")  # one session for both cases, as `ensam evaluate` runs it
    in_process, _ = evaluate(list_cases(dataset), [MethodStepper(method)], log=_quiet)
    method.close()
    assert [r.failure for r in in_process + via_file_runs] == [None] * 4
    assert [(r.case, r.dsc, r.nsd) for r in in_process] == [(r.case, r.dsc, r.nsd) for r in via_file_runs]
    for run in in_process:  # the masks depend on the prompts: the comparison is not between constants
        assert len(set(run.dsc[1:])) > 1 and max(run.dsc) > 0.05
    # every later step's prev_pred is exactly the replayed previous step
    assert sum("prev_pred matches the replay" in line for line in lines) == 2 * 5
    assert not any("WARNING" in line for line in lines)


def test_predict_sh_runs_the_predictor_on_a_later_step_as_the_organisers_do(checkpoint, via_files, tmp_path):
    """The step-3 case files of both cases (boxes, 2 click rounds, prev_pred) through `sh predict.sh`."""
    _, command, _ = via_files
    inputs, outputs = tmp_path / "in put", tmp_path / "out"  # a space in the path, on purpose
    shutil.copytree(command.keep / "step3", inputs, ignore=shutil.ignore_patterns("segs_*"))
    env = {**os.environ, "ENSAM_INPUT_DIR": str(inputs), "ENSAM_OUTPUT_DIR": str(outputs),
           "ENSAM_COMMAND": f"{sys.executable} -m ENSAMSegmentLib.cli.main",
           "ENSAM_CHECKPOINT": str(checkpoint), "ENSAM_DEVICE": "cpu"}
    result = subprocess.run(["sh", str(PREDICT_SH)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("3 step(s) replayed") == 2 and result.stdout.count("prev_pred matches") == 2
    names = sorted(p.name for p in inputs.glob("*.npz"))
    assert len(names) == 2 and sorted(p.name for p in outputs.iterdir()) == names
    for name in names:
        case = read_challenge_npz(inputs / name)
        assert case.gts is None and case.prev_pred is not None and [len(o) for o in case.clicks_order] == [2, 2]
        with np.load(outputs / name) as got, np.load(command.keep / "step3" / f"segs_{name}") as want:
            assert got["segs"].dtype == np.uint8 and np.array_equal(got["segs"], want["segs"])


def test_predict_click_window_reaches_the_session(checkpoint, via_files, tmp_path):
    """`ensam predict --click-window N` equals the in-process method with that click window; the step-3
    files (2 click rounds) come out differently with N = 0 (box region) and the default (windows)."""
    _, command, _ = via_files
    inputs = tmp_path / "in"
    shutil.copytree(command.keep / "step3", inputs, ignore=shutil.ignore_patterns("segs_*"))
    segs = {}
    for window in ("0", "32"):
        assert main(["predict", "--input", str(inputs), "--output", str(tmp_path / window),
                     "--checkpoint", str(checkpoint), "--device", "cpu", "--click-window", window]) == 0
        method = EnsamMethod(checkpoint, "cpu", click_window=int(window))
        assert method.describe()["click_window"] == int(window)
        for path in sorted(inputs.glob("*.npz")):
            with np.load(tmp_path / window / path.name) as npz:
                segs[window, path.name] = npz["segs"]
            assert np.array_equal(segs[window, path.name], predict_case(method, read_challenge_npz(path)).segs)
        method.close()
    assert any(not np.array_equal(segs["0", p.name], segs["32", p.name]) for p in inputs.glob("*.npz"))


def test_evaluate_records_the_session_options(dataset, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "--data", str(dataset), "--method", "ensam", "--checkpoint", str(checkpoint),
                 "--device", "cpu", "--click-window", "8", "--voxel-budget", "4096", "--max-cases", "1",
                 "--out", str(out)]) == 0
    info = json.loads((out / "summary.json").read_text())["methods"]["ensam"]["info"]
    assert info["click_window"] == 8 and info["voxel_budget"] == 4096 and info["device"].startswith("cpu")
    assert "click window 8, voxel budget 4096" in capsys.readouterr().out
    # a smaller budget pools the case (the model sees fewer voxels): the scores differ
    assert main(["evaluate", "--data", str(dataset), "--method", "ensam", "--checkpoint", str(checkpoint),
                 "--device", "cpu", "--max-cases", "1", "--out", str(tmp_path / "full")]) == 0
    pooled, full = (json.loads((folder / "summary.json").read_text())["methods"]["ensam"]["mean"]
                    for folder in (out, tmp_path / "full"))
    assert pooled != full
    with pytest.raises(SystemExit) as refused:  # argparse, before any work
        main(["evaluate", "--data", str(dataset), "--voxel-budget", "100", "--out", str(out)])
    assert refused.value.code == 2
    assert "--voxel-budget: expected a number of voxels >= 512" in capsys.readouterr().err


def test_predict_sh_reports_a_missing_model_file(tmp_path):
    (tmp_path / "in").mkdir()
    write_challenge_npz(tmp_path / "in" / "a.npz", ChallengeCase(imgs=np.zeros((8, 8, 8), np.uint8), spacing=np.ones(3)))
    env = {**os.environ, "ENSAM_INPUT_DIR": str(tmp_path / "in"), "ENSAM_OUTPUT_DIR": str(tmp_path / "out"),
           "ENSAM_COMMAND": f"{sys.executable} -m ENSAMSegmentLib.cli.main",
           "ENSAM_CHECKPOINT": str(tmp_path / "missing.pt")}
    result = subprocess.run(["sh", str(PREDICT_SH)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "missing.pt" in result.stderr


def test_dockerfile_copies_files_that_exist_and_runs_predict_sh():
    text = DOCKERFILE.read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert sources
    for source in sources:
        if "[" in source:  # optional files (a glob that may match nothing)
            continue
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    assert re.search(r"torch==[\d.]+ --index-url https://download.pytorch.org/whl/cpu", text)
    assert 'CMD ["sh", "predict.sh"]' in text and "WORKDIR /workspace" in text


def test_evaluate_command_runs_ensam_and_both_baselines(dataset, checkpoint, tmp_path, capsys):
    pytest.importorskip("slicer")
    out = tmp_path / "out"
    assert main(["evaluate", "--data", str(dataset), "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["ensam", "growcut", "box"]
    ensam = summary["methods"]["ensam"]
    assert ensam["info"]["model"]["training_data"] == "untrained (test)" and ensam["n_cases"] == 2
    assert ensam["info"]["click_window"] == 32  # the session's default; the baselines have none
    assert "click_window" not in summary["methods"]["box"]["info"]
    assert all(0 <= ensam["mean"][k] <= 4 for k in ("DSC_AUC", "NSD_AUC"))
    with open(out / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"ensam", "growcut", "box"} and len(rows) == 3 * 2 * 6
    assert (out / "steps.png").stat().st_size > 10_000
    assert "ensam    n=2" in printed and "wrote" in printed


def test_evaluate_command_refuses_an_unusable_model_file(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    code = main(["evaluate", "--data", str(dataset), "--method", "ensam", "--checkpoint", str(bad),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "cannot set up the ensam method" in capsys.readouterr().err
