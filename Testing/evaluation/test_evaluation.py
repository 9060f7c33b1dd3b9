"""The 6-step protocol loop: bad cases, the no-box rule, the time limit, failures, files vs in-process, reports."""

import csv
import json

import numpy as np
import pytest

from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.evaluation.protocol import (
    FileStepper,
    MethodStepper,
    evaluate,
    list_cases,
    load_eval_case,
    run_protocol,
)
from ENSAMSegmentLib.core.imageio import ChallengeCase, read_challenge_npz, write_challenge_npz
from ENSAMSegmentLib.core.metrics import auc_over_steps, dice
from ENSAMSegmentLib.core.phantom import write_challenge_dataset
from ENSAMSegmentLib.evaluation.predictor import BoxMethod, GrowCutMethod, Method, predict_case, predict_folder
from ENSAMSegmentLib.core.simulation import box_dict_to_3d, next_click

SHAPE = (24, 40, 40)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two 2-class phantom cases (CT_Phantom_0000, MR_Phantom_0001) with challenge boxes."""
    folder = tmp_path_factory.mktemp("cases")
    write_challenge_dataset(folder, 2, shape=SHAPE, seed=3, n_objects=2)
    return folder


class ClickLog(Method):
    """Records the clicks it gets; predicts a 5x5x5 cube around each foreground click of its class."""

    name = "clicklog"

    def begin(self, imgs, spacing_zyx, n_objects):
        self.labels, self.clicks = np.zeros(imgs.shape, np.uint8), []

    def box_step(self, boxes):
        raise AssertionError("a case without boxes has no box step")

    def click_step(self, clicks):
        self.clicks.append(clicks)
        for i, click in enumerate(clicks):
            if click is not None and click[1]:
                z, y, x = click[0]
                self.labels[max(z - 2, 0) : z + 3, max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3] = i + 1
        return self.labels.copy()


class FailsAtStep3(BoxMethod):
    name = "fails"

    def begin(self, imgs, spacing_zyx, n_objects):
        super().begin(imgs, spacing_zyx, n_objects)
        self.n_clicks = 0

    def click_step(self, clicks):
        self.n_clicks += 1
        if self.n_clicks == 2:
            raise RuntimeError("out of memory (simulated)")
        return super().click_step(clicks)


# ----------------------------------------------------------------------------- cases


def _write_bad_cases(folder, good_case):
    imgs, gts = good_case.imgs, good_case.gts
    (folder / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez_compressed(folder / "mismatch.npz", imgs=imgs, gts=gts[:-1], spacing=np.ones(3))
    np.savez_compressed(folder / "nolabels.npz", imgs=imgs, gts=np.zeros_like(gts), spacing=np.ones(3))
    np.savez_compressed(folder / "nogts.npz", imgs=imgs, spacing=np.ones(3))
    write_challenge_npz(folder / "onebox.npz", ChallengeCase(imgs=imgs, spacing=np.ones(3), gts=gts,
                                                             boxes=good_case.boxes[:1]))


def test_bad_cases_are_skipped_with_the_reason_and_the_others_run(dataset, tmp_path):
    good = read_challenge_npz(dataset / "CT_Phantom_0000.npz")
    write_challenge_npz(tmp_path / "good.npz", good)
    _write_bad_cases(tmp_path, good)
    lines = []
    runs, skipped = evaluate(list_cases(tmp_path), [MethodStepper(BoxMethod())], log=lines.append)
    assert [r.case for r in runs] == ["good"]
    reasons = {s["case"]: s["reason"] for s in skipped}
    assert set(reasons) == {"corrupt.npz", "mismatch.npz", "nolabels.npz", "nogts.npz", "onebox.npz"}
    assert "cannot read" in reasons["corrupt.npz"]
    assert "gts shape" in reasons["mismatch.npz"] and "differs from imgs shape" in reasons["mismatch.npz"]
    assert "no labels" in reasons["nolabels.npz"]
    assert "no 'gts'" in reasons["nogts.npz"]
    assert "1 boxes for 2 labelled classes" in reasons["onebox.npz"]
    assert sum("skipped" in line for line in lines) == 5


def test_box_method_step_scores_match_a_hand_computed_dice(dataset):
    ec = load_eval_case(dataset / "CT_Phantom_0000.npz")
    run = run_protocol(ec, MethodStepper(BoxMethod()))
    expected = []
    for box in ec.case.boxes:
        (z0, y0, x0), (z1, y1, x1) = box_dict_to_3d(box)
        filled = np.zeros(SHAPE, bool)
        filled[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = True
        expected.append(filled)
    labels = np.zeros(SHAPE, np.uint8)
    for i, mask in enumerate(expected):
        labels[mask] = i + 1
    hand = np.mean([dice(ec.gts == c, labels == c) for c in ec.class_ids])
    assert run.dsc == pytest.approx([hand] * 6)  # clicks do not change a box
    assert run.failure is None and not run.over_time_limit and len(run.seconds) == 6


def test_without_boxes_step_1_scores_0_and_clicks_start_from_an_empty_prediction(dataset, tmp_path):
    case = read_challenge_npz(dataset / "MR_Phantom_0001.npz")
    case.boxes = None
    write_challenge_npz(tmp_path / "nobox.npz", case)
    ec = load_eval_case(tmp_path / "nobox.npz")
    assert any("no 'boxes'" in note for note in ec.notes)
    stepper = MethodStepper(ClickLog())
    run = run_protocol(ec, stepper)
    assert (run.dsc[0], run.nsd[0], run.seconds[0]) == (0.0, 0.0, 0.0)
    clicks = stepper.method.clicks
    assert len(clicks) == 5
    assert clicks[0] == [(next_click(case.gts == c, np.zeros(SHAPE))[0], True) for c in (1, 2)]
    assert run.dsc[1] > 0  # the cubes around the first clicks overlap the structures


def test_labels_other_than_1_to_n_are_scored_as_the_challenge_would_and_noted(dataset, tmp_path):
    case = read_challenge_npz(dataset / "CT_Phantom_0000.npz")
    case.gts = np.where(case.gts == 2, 5, case.gts).astype(np.uint8)  # classes 1 and 5
    write_challenge_npz(tmp_path / "gap.npz", case)
    ec = load_eval_case(tmp_path / "gap.npz")
    assert ec.class_ids == [1, 5] and any("not 1..2" in note for note in ec.notes)
    run = run_protocol(ec, MethodStepper(BoxMethod()))
    # the box method writes label 2 for the second class, which the ground truth calls 5: Dice 0 there
    first = dice(ec.gts == 1, run_labels_of_box(ec) == 1)
    assert run.dsc[0] == pytest.approx((first + 0.0) / 2)


def run_labels_of_box(ec):
    method = BoxMethod()
    method.begin(ec.case.imgs, ec.spacing_zyx, len(ec.class_ids))
    return method.box_step([box_dict_to_3d(b) for b in ec.case.boxes])


def test_over_the_time_limit_a_case_scores_0_and_keeps_its_measured_scores(dataset):
    ec = load_eval_case(dataset / "CT_Phantom_0000.npz")
    run = run_protocol(ec, MethodStepper(BoxMethod()), time_limit_per_class=0.0)
    assert run.over_time_limit and run.dsc == [0.0] * 6 and run.nsd == [0.0] * 6
    assert min(run.measured_dsc) > 0.2 and sum(run.seconds) > 0
    assert "over the limit" in run.notes[-1]


def test_a_method_error_scores_its_step_and_the_rest_0_and_is_reported(dataset):
    ec = load_eval_case(dataset / "CT_Phantom_0000.npz")
    run = run_protocol(ec, MethodStepper(FailsAtStep3()))
    assert run.failure.startswith("step 3: RuntimeError: out of memory")
    assert min(run.dsc[:2]) > 0 and run.dsc[2:] == [0.0] * 4


# ----------------------------------------------------------------------------- files vs in-process


def test_growcut_through_case_files_equals_the_in_process_loop(dataset, tmp_path):
    pytest.importorskip("slicer")
    seen = []

    def predict(inputs, outputs):
        (path,) = inputs.glob("*.npz")
        case = read_challenge_npz(path)
        assert case.gts is None  # the predictor never sees the ground truth
        seen.append((case.clicks_order, predict_case(GrowCutMethod(), case).prev_pred_mismatch))
        assert predict_folder(inputs, outputs, GrowCutMethod(), log=lambda line: None) == []

    paths = list_cases(dataset)
    in_process, _ = evaluate(paths, [MethodStepper(GrowCutMethod())], log=lambda line: None)
    via_files, _ = evaluate(paths, [FileStepper("growcut", predict, tmp_path)], log=lambda line: None)
    assert [(r.case, r.dsc, r.nsd) for r in in_process] == [(r.case, r.dsc, r.nsd) for r in via_files]
    assert max(in_process[0].dsc) > 0.3
    assert len(seen) == 12 and seen[0] == (None, None)  # step 1: boxes only
    assert [len(order[0]) for order, _ in seen[1:6]] == [1, 2, 3, 4, 5]
    assert all(mismatch == 0 for _, mismatch in seen if mismatch is not None)  # prev_pred = the replay's


# ----------------------------------------------------------------------------- command and reports


def test_evaluate_command_writes_csv_json_and_plot(dataset, tmp_path, capsys):
    pytest.importorskip("slicer")
    (tmp_path / "data").mkdir()
    for path in list_cases(dataset):
        (tmp_path / "data" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "data" / "zz_corrupt.npz").write_bytes(b"garbage")
    out = tmp_path / "out"
    code = main(["evaluate", "--data", str(tmp_path / "data"), "--method", "growcut", "--method", "box",
                 "--out", str(out)])
    assert code == 0
    assert "skipped zz_corrupt.npz" in capsys.readouterr().out
    with open(out / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 6 and set(rows[0]) == {"case", "method", "step", "DSC", "NSD", "seconds"}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["growcut", "box"]
    assert summary["skipped"][0]["case"] == "zz_corrupt.npz"
    for name, entry in summary["methods"].items():
        assert entry["n_cases"] == 2
        for case, values in entry["cases"].items():
            dsc = [float(r["DSC"]) for r in rows if r["case"] == case and r["method"] == name]
            assert values["DSC_AUC"] == pytest.approx(auc_over_steps(dsc), abs=1e-5)
            assert values["DSC_Final"] == pytest.approx(dsc[-1], abs=1e-5)
        for key in ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final"):
            assert entry["mean"][key] == pytest.approx(np.mean([c[key] for c in entry["cases"].values()]))
    import matplotlib.image

    image = matplotlib.image.imread(out / "steps.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 600


def test_evaluate_command_refuses_an_empty_folder(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path), "--method", "box", "--out", str(tmp_path / "o")]) == 2
    assert "holds no .npz case files" in capsys.readouterr().err
