"""Does training make the prompts matter? (issue 11): the box decides, stuck interactions end, labels
pool without inflating, boxes come in the challenge's shape too, validation reports the controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_BUDGET, TINY_MODEL

from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
from ENSAMSegmentLib.core.simulation import box_dict_to_3d, challenge_boxes
from ENSAMTrainingLib.core.bench import prompt_sensitivity, run_prompt_use
from ENSAMTrainingLib.core.cases import CaseRef, find_cases
from ENSAMTrainingLib.core.data import majority_pool, max_pool, training_box
from ENSAMTrainingLib.core.step import InteractiveStep, interact
from ENSAMTrainingLib.core.validation import shifted_box, validate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_box_decides_which_of_two_identical_spheres_is_segmented():
    # a small model, one toy sample per step: by step 75 the box (not "the bright thing") decides
    rows = run_prompt_use(image_alpha=0.3, scale_lr_factor=10.0, steps=75, every=75)
    assert rows[-1]["dsc"] > 0.85, rows  # the boxed sphere is segmented ...
    assert rows[-1]["other_sphere"] < 0.1, rows  # ... and the identical other one is not


def test_at_init_the_box_and_clicks_move_the_output_with_the_larger_image_alpha():
    ngpt, ours = prompt_sensitivity(0.05), prompt_sensitivity(0.3)
    assert ngpt["box_moved_flips_pct"] < 1 and ngpt["image_token_cosine"] > 0.99  # nGPT's 0.05: a near no-op
    assert ours["box_moved_flips_pct"] > 5 * ngpt["box_moved_flips_pct"]
    assert ours["click_flips_pct"] > 5 * ngpt["click_flips_pct"] and ours["image_token_cosine"] < 0.9


def test_nGPT_image_alpha_starts_where_the_config_says():
    model = ENSAM(ENSAMConfig(**TINY_MODEL, image_alpha_init=0.3, alpha_init=0.05))
    layer = model.interaction.layers[0]
    torch.testing.assert_close(layer.alphas[3]().mean(), torch.tensor(0.3))
    torch.testing.assert_close(layer.alphas[0]().mean(), torch.tensor(0.05))


class Frozen(ENSAM):
    """The real network whose decode returns the same logits whatever the prompts (a model stuck at init)."""

    def decode(self, emb, prompts, prev_logits=None, region=None):
        self.calls = getattr(self, "calls", 0) + 1
        out = super().decode(emb, prompts, None, region)
        return out * 0 + torch.where(torch.arange(out.shape[-1]) < 4, 5.0, -5.0).to(out)


def test_an_interaction_that_changes_nothing_ends_after_that_click():
    model = Frozen(ENSAMConfig(**TINY_MODEL))
    gt = np.zeros((16, 16, 16), dtype=bool)
    gt[4:12, 4:12, 4:12] = True
    image = torch.rand(1, 1, 16, 16, 16)
    box = ((4, 4, 4), (11, 11, 11))
    with torch.no_grad():
        emb = model.encode(image)
        stuck = list(interact(model, emb, gt, box, clicks=5, rng=np.random.default_rng(0), stop_when_stuck=True))
        full = list(interact(model, emb, gt, box, clicks=5, rng=np.random.default_rng(0)))
    assert len(stuck) == 2  # the box step, and the first click, which changed nothing
    assert len(full) == 6  # the evaluator's protocol (validation) still runs every click


def test_grad_clicks_keeps_graphs_for_the_box_step_and_that_many_clicks(four_cases):
    from ENSAMTrainingLib.core.cases import load_case
    from ENSAMTrainingLib.core.data import make_sample

    torch.manual_seed(0)
    model = ENSAM(ENSAMConfig(**TINY_MODEL))
    sample = make_sample(load_case(find_cases(four_cases)[0]), np.random.default_rng(0), TINY_BUDGET, augment=False,
                         no_box_probability=0.0)
    graded = []
    original = model.decode

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        graded.append(out.requires_grad)
        return out

    model.decode = recording
    loss, per_step = InteractiveStep(model, grad_clicks=2, stop_when_stuck=False)(sample)
    assert len(per_step) == 6 and graded[0] and sum(graded) == 3
    loss.backward()
    assert model.encoder.init_conv.weight.grad is not None


@pytest.mark.parametrize("factors", [(2, 2, 2), (2, 3, 3), (3, 1, 2)])
def test_majority_pooling_keeps_the_object_volume_within_5_percent(factors):
    z, y, x = np.indices((60, 90, 90))
    ball = (z - 30) ** 2 / 20**2 + (y - 45) ** 2 / 30**2 + (x - 44) ** 2 / 25**2 < 1
    volume = ball.sum()
    pooled = majority_pool(ball, factors).sum() * np.prod(factors)
    inflated = (max_pool(ball.astype(np.float32), factors) > 0).sum() * np.prod(factors)
    assert abs(pooled / volume - 1) < 0.05
    assert inflated / volume > 1.05  # what max pooling did


def test_majority_pooling_keeps_a_thin_object_rather_than_losing_it():
    tube = np.zeros((32, 32, 32), dtype=bool)
    tube[16, 10:20, 16] = True  # one voxel thick: no pooled cell is half full
    assert majority_pool(tube, (2, 2, 2)).sum() > 0


def test_training_boxes_come_in_both_shapes():
    mask = np.zeros((20, 30, 30), dtype=bool)
    z, y, x = np.indices(mask.shape)
    mask |= (y - 10) ** 2 + (x - 8 - z) ** 2 < 9  # a tube that drifts in x along z: mid-slice box misses most
    rng = np.random.default_rng(0)
    challenge = training_box(mask, rng, offset=False, challenge_probability=1.0)
    assert challenge == box_dict_to_3d(challenge_boxes(mask.astype(np.uint8))[0])
    tight = training_box(mask, rng, offset=False, challenge_probability=0.0)
    idx = np.argwhere(mask)
    assert tight == (tuple(idx.min(0)), tuple(idx.max(0)))
    kinds = {training_box(mask, np.random.default_rng(i), offset=False) == challenge for i in range(40)}
    assert kinds == {True, False}


def test_shifted_box_moves_off_the_object_or_gives_up():
    assert shifted_box(((2, 2, 2), (5, 5, 5)), (8, 20, 8)) == ((2, 6, 2), (5, 9, 5))
    assert shifted_box(((0, 0, 0), (7, 7, 7)), (8, 8, 8)) is None


def test_wrong_box_is_another_objects_box_or_none(tmp_path):
    """The wrong-box control uses another object's box only; a crop without one gives None (the box moved
    off the object is the separate empty-box control)."""
    from ENSAMTrainingLib.core.cases import load_case
    from ENSAMTrainingLib.core.data import make_sample
    from ENSAMTrainingLib.core.validation import wrong_box

    labels = np.zeros((24, 40, 40), np.uint8)
    labels[8:16, 6:16, 6:16] = 1
    labels[8:16, 20:30, 6:16] = 2
    (tmp_path / "two").mkdir(), (tmp_path / "one").mkdir()
    np.savez(tmp_path / "two" / "two.npz", imgs=(labels * 80 + 20).astype(np.uint8), gts=labels, spacing=np.ones(3))
    np.savez(tmp_path / "one" / "one.npz", imgs=((labels == 1) * 80 + 20).astype(np.uint8), gts=(labels == 1).astype(np.uint8),
             spacing=np.ones(3))
    two, one = (load_case(find_cases(tmp_path / name)[0]) for name in ("two", "one"))
    found = 0
    for seed in range(10):
        sample = make_sample(two, np.random.default_rng(seed), voxel_budget=10**9, augment=False, no_box_probability=0.0)
        box = wrong_box(two, sample)
        if box is not None:
            found += 1
            (z0, y0, x0), (z1, y1, x1) = box
            held = two.labels[sample.crop][z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1]
            assert np.count_nonzero(held == 3 - sample.label) == np.count_nonzero(held)  # the other object only
        sample = make_sample(one, np.random.default_rng(seed), voxel_budget=10**9, augment=False, no_box_probability=0.0)
        assert wrong_box(one, sample) is None
    assert found >= 3


def test_validation_reports_the_prompt_controls(npz_dataset):
    torch.manual_seed(0)
    model = ENSAM(ENSAMConfig(**TINY_MODEL))
    cases = find_cases(npz_dataset)
    val = validate(model, cases + [CaseRef(npz_dataset / "missing.npz", None, "x", "CT", "npz")],
                   voxel_budget=TINY_BUDGET * 4)
    assert val["cases"] == len(cases) and val["skipped"] == 1
    assert 0 < val["filled_box_dsc"] < 1
    assert val["wrong_box_dsc"] is not None and 0 <= val["wrong_box_dsc"] <= 1
    assert val["empty_box_dsc"] is not None and 0 <= val["empty_box_dsc"] <= 1
    assert 0 <= val["click_change_fraction"] <= 1
    assert val["dsc_gain_per_click"] == pytest.approx((val["dsc"][-1] - val["dsc"][0]) / 5)


def test_train_bench_throughput_runs_the_whole_step_with_the_cheaper_options():
    from ENSAMTrainingLib.core.bench import measure_throughput

    # tune_malloc=False: mallopt would apply to the whole test process (devices' own test runs it apart)
    (row,) = measure_throughput([(16, 24, 24)], "cpu", steps=1, model_config=TINY_MODEL, grad_clicks=1,
                                tune_malloc=False)
    assert row["steps_run"] == 6 and row["grad_clicks"] == 1 and row["samples_per_s"] > 0
    assert row["malloc"] == "default"
    assert row["cpu_seconds_per_sample"] > 0 and row["amp"] is True


def test_train_bench_throughput_with_data_parallel_processes():
    from ENSAMTrainingLib.core.bench import measure_throughput

    (row,) = measure_throughput([(16, 24, 24)], "cpu", steps=1, model_config=TINY_MODEL, grad_clicks=1,
                                tune_malloc=False, processes=2)
    assert row["processes"] == 2 and row["threads_per_process"] >= 1
    assert row["steps_run"] == 6 and row["samples_per_s"] > 0 and row["peak_memory_mib"] > 0
    assert "2 processes" in row["peak_memory_kind"]
    with pytest.raises(ValueError, match="CPU"):
        measure_throughput([(16, 24, 24)], "cuda", steps=1, processes=2)


def test_crop_margins_follow_the_object_size():
    from ENSAMTrainingLib.core.data import margin_range, random_crop

    assert margin_range((0, 0, 0), (4, 4, 4)) == (1, 8)  # a lesion: at most 8 voxels around it
    assert margin_range((0, 0, 0), (48, 3, 3)) == (1, 8)  # a thin vessel (geometric mean 7.6)
    assert margin_range((0, 0, 0), (20, 20, 20)) == (1, 20)
    assert margin_range((0, 0, 0), (100, 120, 90)) == (1, 64)  # an organ: the paper's 1-64
    rng = np.random.default_rng(0)
    for _ in range(20):  # a 4^3 object keeps at least (4/20)^3 = 0.8 % of its crop
        crop = random_crop((30, 30, 30), (34, 34, 34), (100, 100, 100), rng)
        assert all(s.stop - s.start <= 4 + 16 for s in crop)


def test_train_bench_throughput_command_takes_its_options(tmp_path, capsys):
    import json

    from ENSAMSegmentLib.cli.main import main

    out = tmp_path / "t.json"
    assert main(["train-bench", "throughput", "--shapes", "16,24,24", "--steps", "1", "--device", "cpu",
                 "--model-config", json.dumps(TINY_MODEL), "--grad-clicks", "2", "--system-malloc", "--no-amp",
                 "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["grad_clicks"], row["malloc"], row["amp"], row["shape"]) == (2, "default", False, "16x24x24")
