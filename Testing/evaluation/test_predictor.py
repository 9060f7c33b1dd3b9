"""Challenge predictor: a case file's prompts, their replay, the baselines, and `ensam predict` on a folder."""

import numpy as np
import pytest

from ENSAMSegmentLib.core.imageio import ChallengeCase, read_challenge_npz, write_challenge_npz
from ENSAMSegmentLib.evaluation.predictor import (
    BoxMethod,
    CaseError,
    GrowCutMethod,
    Method,
    case_prompts,
    paint_masks,
    predict_case,
    predict_folder,
)
from ENSAMSegmentLib.core.simulation import challenge_boxes

SHAPE = (10, 12, 14)


def _box(z0, z1, y0, y1, x0, x1, z_mid=None):
    return {"z_min": z0, "z_max": z1, "z_mid": (z0 + z1) // 2 if z_mid is None else z_mid,
            "z_mid_x_min": x0, "z_mid_y_min": y0, "z_mid_x_max": x1, "z_mid_y_max": y1}


def _case(**kw):
    return ChallengeCase(imgs=np.zeros(SHAPE, np.uint8), spacing=np.ones(3), name="c", **kw)


class Recorder(Method):
    """A method that records the calls it gets and returns a label map that encodes the step count."""

    name = "recorder"

    def begin(self, imgs, spacing_zyx, n_objects):
        self.calls = [("begin", imgs.shape, tuple(spacing_zyx), n_objects)]

    def box_step(self, boxes):
        self.calls.append(("box", boxes))
        return np.full(SHAPE, len(self.calls), np.uint8)

    def click_step(self, clicks):
        self.calls.append(("click", clicks))
        return np.full(SHAPE, len(self.calls), np.uint8)

    def end(self):
        self.calls.append(("end",))


# ----------------------------------------------------------------------------- prompts of a case


def test_clicks_are_replayed_round_by_round_in_clicks_order():
    clicks = [{"fg": [[1, 2, 3], [4, 5, 6]], "bg": [[7, 8, 9]]}, {"fg": [[0, 0, 0]], "bg": []}]
    order = [["fg", "bg", "fg"], ["fg", None, None]]
    prompts = case_prompts(_case(boxes=[_box(1, 8, 2, 9, 3, 10), _box(0, 9, 0, 11, 0, 13)],
                                 clicks=clicks, clicks_order=order))
    assert prompts.n_objects == 2
    assert prompts.boxes == [((1, 2, 3), (8, 9, 10)), ((0, 0, 0), (9, 11, 13))]
    assert prompts.rounds == [
        [((1, 2, 3), True), ((0, 0, 0), True)],
        [((7, 8, 9), False), None],
        [((4, 5, 6), True), None],
    ]


def test_an_older_clicks_order_without_none_entries_still_replays_per_class():
    prompts = case_prompts(_case(clicks=[{"fg": [[1, 1, 1]], "bg": [[2, 2, 2]]}, {"fg": [[3, 3, 3]], "bg": []}],
                                 clicks_order=[["fg", "bg"], ["fg"]]))
    assert prompts.boxes is None and prompts.n_objects == 2
    assert prompts.rounds == [[((1, 1, 1), True), ((3, 3, 3), True)], [((2, 2, 2), False), None]]


@pytest.mark.parametrize("kw, message", [
    ({"clicks": [{"fg": [[1, 1, 1]], "bg": []}]}, "must come together"),
    ({"clicks": [{"fg": [], "bg": []}], "clicks_order": [["fg"]]}, "only 0 are given"),
    ({"clicks": [{"fg": [[1, 1, 1]], "bg": []}], "clicks_order": [["up"]]}, "expected 'fg', 'bg' or None"),
    ({"clicks": [{"fg": [[10, 0, 0]], "bg": []}], "clicks_order": [["fg"]]}, "inside the image"),
    ({"clicks": [{"fg": [], "bg": []}] * 2, "clicks_order": [[]]}, "2 click lists but 1 click orders"),
    ({"boxes": [_box(0, 3, 0, 3, 0, 3)], "clicks": [{"fg": [], "bg": []}] * 2, "clicks_order": [[], []]},
     "1 boxes but clicks for 2 classes"),
    ({"boxes": [_box(0, 10, 0, 3, 0, 3)]}, "outside the image"),
    ({"boxes": [{"z_min": 0}]}, "lacks"),
])
def test_inconsistent_prompts_are_refused_with_the_reason(kw, message):
    with pytest.raises(CaseError, match=message):
        case_prompts(_case(**kw))


def test_predict_case_replays_box_then_rounds_and_checks_prev_pred():
    method = Recorder()
    case = _case(boxes=[_box(1, 8, 2, 9, 3, 10)], clicks=[{"fg": [[1, 2, 3]], "bg": [[4, 4, 4]]}],
                 clicks_order=[["fg", "bg"]], prev_pred=np.full(SHAPE, 3, np.uint8))
    result = predict_case(method, case)
    assert [c[0] for c in method.calls] == ["begin", "box", "click", "click", "end"]
    assert method.calls[0] == ("begin", SHAPE, (1.0, 1.0, 1.0), 1)
    assert method.calls[3] == ("click", [((4, 4, 4), False)])
    assert result.steps == 3 and (result.segs == 4).all()
    assert result.prev_pred_mismatch == 0  # the second-to-last replayed step returned 3 everywhere
    case.prev_pred[0, 0, 0] = 0
    assert predict_case(Recorder(), case).prev_pred_mismatch == 1


def test_a_case_without_prompts_predicts_nothing():
    result = predict_case(Recorder(), _case())
    assert result.steps == 0 and not result.segs.any() and result.segs.dtype == np.uint8


# ----------------------------------------------------------------------------- baselines


def test_box_method_fills_each_box_with_its_label_later_classes_win():
    method = BoxMethod()
    method.begin(np.zeros(SHAPE), (1, 1, 1), 2)
    labels = method.box_step([((0, 0, 0), (4, 5, 6)), ((3, 3, 3), (9, 11, 13))])
    expected = np.zeros(SHAPE, np.uint8)
    expected[0:5, 0:6, 0:7] = 1
    expected[3:, 3:, 3:] = 2
    assert np.array_equal(labels, expected)
    assert np.array_equal(method.click_step([((0, 0, 0), False), None]), expected)  # clicks change nothing


def test_paint_masks_skips_missing_masks():
    a = np.zeros(SHAPE, bool)
    a[0] = True
    assert np.array_equal(paint_masks(SHAPE, [None, a]), a.astype(np.uint8) * 2)


def _sphere_case(shape=(20, 28, 28), centre=(10, 14, 14), radius=6):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gt = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2).astype(np.uint8)
    rng = np.random.default_rng(1)
    imgs = np.clip(60 + 120 * gt + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    return imgs, gt


def test_growcut_needs_a_foreground_seed_then_segments_the_sphere():
    pytest.importorskip("slicer")
    imgs, gt = _sphere_case()
    method = GrowCutMethod()
    method.begin(imgs, (1.0, 1.0, 1.0), 1)
    box = ((3, 7, 7), (17, 21, 21))
    assert not method.box_step([box]).any()  # a box alone gives no foreground seed
    labels = method.click_step([((10, 14, 14), True)])
    overlap = 2 * np.sum((labels == 1) & (gt == 1)) / (np.sum(labels == 1) + np.sum(gt == 1))
    assert overlap > 0.9
    assert not labels[:3].any()  # nothing outside the box


def test_growcut_without_background_seeds_stays_empty():
    pytest.importorskip("slicer")
    imgs, _ = _sphere_case()
    method = GrowCutMethod()
    method.begin(imgs, (1.0, 1.0, 1.0), 1)
    assert not method.click_step([((10, 14, 14), True)]).any()  # no box, no background click
    assert method.click_step([((1, 1, 1), False)]).any()  # a background click lets it run


# ----------------------------------------------------------------------------- folders


def test_predict_folder_writes_segs_and_goes_on_after_a_bad_case(tmp_path):
    imgs, gt = _sphere_case()
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_challenge_npz(inputs / "good.npz", ChallengeCase(imgs=imgs, spacing=np.ones(3), boxes=challenge_boxes(gt)))
    (inputs / "corrupt.npz").write_bytes(b"not a zip file")
    write_challenge_npz(inputs / "bad_click.npz", ChallengeCase(
        imgs=imgs, spacing=np.ones(3), clicks=[{"fg": [[99, 0, 0]], "bg": []}], clicks_order=[["fg"]]))
    lines = []
    failures = predict_folder(inputs, outputs, BoxMethod(), log=lines.append)
    assert sorted(f["case"] for f in failures) == ["bad_click.npz", "corrupt.npz"]
    assert "inside the image" in next(f["reason"] for f in failures if f["case"] == "bad_click.npz")
    assert sorted(p.name for p in outputs.iterdir()) == ["good.npz"]
    with np.load(outputs / "good.npz") as npz:
        assert npz["segs"].dtype == np.uint8 and npz["segs"].shape == gt.shape
        assert set(np.unique(npz["segs"])) == {0, 1} and (npz["segs"][gt == 1] == 1).all()
    assert any("good.npz: 1 step(s)" in line for line in lines)
    assert read_challenge_npz(inputs / "good.npz").boxes  # inputs are left as they were


def test_predict_command_exits_1_when_a_case_failed_and_2_on_a_bad_folder(tmp_path, capsys):
    from ENSAMSegmentLib.cli.main import main

    imgs, gt = _sphere_case()
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_challenge_npz(inputs / "good.npz", ChallengeCase(imgs=imgs, spacing=np.ones(3), boxes=challenge_boxes(gt)))
    (inputs / "broken.npz").write_bytes(b"")
    assert main(["predict", "--method", "box", "--input", str(inputs), "--output", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "no output for broken.npz" in captured.err and "good.npz: 1 step(s)" in captured.out
    assert (tmp_path / "out" / "good.npz").is_file()
    assert main(["predict", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
