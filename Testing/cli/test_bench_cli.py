"""`ensam bench` on a tiny volume: every key present with positive finite numbers, Grow from seeds
measured, the scenario as documented, bad settings as clear errors (exit 2). Not a timed test."""

from __future__ import annotations

import json
import math

import pytest

from ENSAMSegmentLib.evaluation.benchmark import BenchmarkError, make_scenario, parse_shape, stats, targets
from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.core.modelfile import create_untrained_model_file, default_model_path, save_model
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig

TINY = "32,48,48"
POSITIVE = ("encoder_s", "encoder_s_p95", "set_image_s_median", "box_s_median", "box_s_p95", "click_s_median",
            "click_s_p95", "click_decode_s_median", "merge_s_median", "growcut_first_s", "growcut_first_s_p95",
            "growcut_update_s", "growcut_update_s_p95", "peak_rss_mb", "peak_rss_mb_with_growcut",
            "click_vs_growcut_update", "box_vs_growcut_first", "encoder_plus_box_vs_growcut_first", "parameters",
            "torch_threads")


@pytest.fixture(scope="module")
def report():
    """One JSON run with the default model (an untrained one when the default file is missing)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bench", "--json", "--device", "cpu", "--shape", TINY, "--repeats", "2", "--warmup", "1",
                     "--system-malloc"])  # keep_freed_memory would change malloc for the rest of the tests
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue()), err.getvalue()


def test_json_has_every_key_with_positive_finite_numbers(report):
    r, _ = report
    for key in POSITIVE:
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["shape"] == [32, 48, 48] and r["device"] == "cpu" and r["cpu"] and r["date"]
    assert r["cuda_max_memory_allocated_mb"] is None and r["gpu"] is None
    assert r["click_vs_growcut_update"] == pytest.approx(r["click_s_median"] / r["growcut_update_s"])
    assert r["encoder_plus_box_vs_growcut_first"] == pytest.approx(
        (r["encoder_s"] + r["box_s_median"]) / r["growcut_first_s"])
    assert r["encoder_s"] <= r["set_image_s_median"] and r["click_s_median"] <= r["click_s_p95"]
    cpu = r["ensam_cpu"]  # the ENSAM part's CPU time: every thread of the process
    assert cpu["user_s"] > 0 and cpu["system_s"] >= 0 and cpu["minor_faults"] > 0
    assert cpu["system_vs_user"] == pytest.approx(cpu["system_s"] / cpu["user_s"])
    assert r["cpu_isa"]["aten_capability"] and isinstance(r["cpu_isa"]["native_bf16"], bool)
    assert r["malloc"] == "default"


def test_repeats_exclude_warmup_and_growcut_is_incremental(report):
    r, progress = report
    samples = r["samples"]
    assert len(samples["ensam_encoder"]) == len(samples["ensam_box"]) == len(samples["growcut_first"]) == 2
    assert len(samples["ensam_click"]) == 2 * len(r["clicks"]) == 6
    assert len(samples["growcut_update"]) == 2 * (len(r["clicks"]) - 1)
    assert r["growcut_update_incremental"] is True
    assert "warm-up 1/1" in progress and "repeat 2" in progress


def test_model_and_targets_are_reported(report):
    r, _ = report
    if not default_model_path().is_file():
        assert r["model"]["untrained"] and r["model"]["path"] is None and "untrained" in r["model"]["note"]
    assert r["parameters"] > 1_000_000
    assert r["targets"]["applies"] is False and r["targets"]["click_median_le_1s"] is None  # not the target shape
    assert r["mode"] == "whole" and r["grid_shape"] == [32, 48, 48]


def test_click_decoding_is_reported_per_measured_click(report):
    r, _ = report
    assert r["click_window"] == 32 and len(r["click_decoding"]) == len(r["click_decode_regions"]) == 6
    # every click follows a decoded step on the same grid; its window may have grown once
    assert set(r["click_decoding"]) <= {"window", "window+grown"}
    assert all(all(0 < n <= s for n, s in zip(size, r["shape"])) for size in r["click_decode_regions"])
    agreement = r["window_vs_region_dice"]  # the first repeat's clicks, decoded again over the box region
    assert len(agreement) == 3 and all(0.0 <= d <= 1.0 for d in agreement)


def test_click_window_0_and_fp32_options(tmp_path, capsys):
    config = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
    path = create_untrained_model_file(tmp_path / "tiny.pt", config=config)
    assert main(["bench", "--json", "--shape", "24x32x32", "--repeats", "1", "--warmup", "0", "--checkpoint", str(path),
                 "--no-growcut", "--click-window", "0", "--precision", "fp32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["click_window"] == 0 and "fp32" in r["device_name"] and r["window_vs_region_dice"] is None
    assert r["click_decoding"] and "window" not in r["click_decoding"]  # the box region (here: whole image)
    with pytest.raises(SystemExit) as exit_info:  # refused by the shared --click-window option, before any work
        main(["bench", "--shape", "24x32x32", "--checkpoint", str(path), "--click-window", "-1"])
    assert exit_info.value.code == 2 and "integer >= 0" in capsys.readouterr().err


def test_the_session_works_at_the_model_files_voxel_budget_unless_told(tmp_path, capsys):
    """As every front-end: a model trained at 4,096-voxel patches sees a 24x32x32 image pooled (large
    mode, grids of at most 4,096 voxels); --voxel-budget overrides it (whole mode at native size)."""
    model = ENSAM(ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32))
    path = save_model(tmp_path / "small-patches.pt", model, training_data="test", voxel_budget=4096)
    args = ["bench", "--json", "--shape", "24x32x32", "--repeats", "1", "--warmup", "0", "--checkpoint", str(path),
            "--no-growcut", "--no-agreement"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["voxel_budget"] == r["model"]["voxel_budget"] == 4096
    assert r["mode"] == "large" and math.prod(r["grid_shape"]) <= 4096
    assert main([*args, "--voxel-budget", "100000"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["voxel_budget"] == 100000 and r["mode"] == "whole" and r["grid_shape"] == [24, 32, 32]
    with pytest.raises(SystemExit) as exit_info:  # refused by argparse, before any work
        main(["bench", "--shape", "24x32x32", "--checkpoint", str(path), "--voxel-budget", "12"])
    assert exit_info.value.code == 2 and "expected a number of voxels >= 512" in capsys.readouterr().err


def test_scenario_box_is_an_eighth_around_the_liver_with_clicks_inside():
    s = make_scenario((32, 48, 48))
    lo, hi = s.box
    assert s.box_fraction == pytest.approx(1 / 8)
    assert all(0 <= a <= b < n for a, b, n in zip(lo, hi, s.image.shape))
    assert [fg for _, fg in s.clicks] == [True, False, True]
    for point, _ in s.clicks:
        assert all(a <= p <= b for p, a, b in zip(point, lo, hi))


def test_text_table_with_a_model_file_and_no_growcut(tmp_path, capsys):
    config = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
    path = create_untrained_model_file(tmp_path / "tiny.pt", config=config)
    assert main(["bench", "--shape", "24x32x32", "--repeats", "1", "--warmup", "0", "--checkpoint", str(path),
                 "--no-growcut"]) == 0
    text = capsys.readouterr().out
    assert "ENSAM click (embedding cached)" in text and "24x32x32" in text and str(path) in text
    assert "Grow from seeds" not in text and "model file is untrained" in text


@pytest.mark.parametrize("shape", ["128,256", "a,b,c", "8,64,64", "0,10,10", "128,256,256,1"])
def test_bad_shape_is_a_clear_error(shape, capsys):
    assert main(["bench", "--shape", shape]) == 2
    err = capsys.readouterr().err
    assert "ensam bench: error: shape must be three integers D,H,W" in err and shape in err


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "--shape", TINY, "--repeats", "0"]) == 2
    assert "repeats >= 1" in capsys.readouterr().err
    missing = tmp_path / "none.pt"
    assert main(["bench", "--shape", TINY, "--checkpoint", str(missing)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_helpers():
    assert parse_shape("16, 24 ,32") == (16, 24, 32)
    with pytest.raises(BenchmarkError):
        parse_shape("16,24")
    assert stats([3.0, 1.0, 2.0]) == {"median": 2.0, "p95": pytest.approx(2.9), "n": 3}
    assert stats([])["median"] is None
    met = targets({"device": "cpu", "shape": [128, 256, 256], "click_s_median": 1.2, "click_s_p95": 1.9,
                   "encoder_s": 8.0, "box_vs_growcut_first": 0.9, "peak_rss_mb": 2600.0,
                   "ensam_cpu": {"system_vs_user": 0.05}})
    assert met == {"click_median_le_1s": False, "click_p95_le_2s": True, "box_le_growcut_first": True,
                   "encoder_le_10s": True, "kernel_lt_10pct_of_user": True, "peak_rss_le_2500mb": False,
                   "applies": True, "defined_for": "CPU, shape 128x256x256"}
    assert targets({"device": "cpu", "shape": [128, 256, 256], "click_s_median": 0.5, "click_s_p95": 1.0,
                    "encoder_s": 8.0, "box_vs_growcut_first": None, "peak_rss_mb": None, "ensam_cpu": None}
                   )["box_le_growcut_first"] is None  # not measured: neither met nor missed
