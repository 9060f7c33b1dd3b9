"""`ensam bench --worker`: the same clicks through the inference worker process (as in Slicer), and what
the process boundary costs per click (evaluation/boundary.py). A real worker process; not a timed test:
it checks that the figures are there and add up, not how large they are."""

from __future__ import annotations

import json
import math

import pytest

from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
from ENSAMSegmentLib.core.network import ENSAMConfig

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return create_untrained_model_file(tmp_path_factory.mktemp("model") / "small.pt", seed=0, config=ENSAMConfig(**SMALL))


def _bench(capsys, *args):
    code = main(["bench", "--device", "cpu", "--shape", "32,48,48", "--repeats", "2", "--warmup", "1", "--no-growcut",
                 "--no-agreement", "--system-malloc", "--worker", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def test_the_boundary_is_measured_per_click_and_adds_up(small_model, capsys):
    captured = _bench(capsys, "--json", "--checkpoint", str(small_model))
    b = json.loads(captured.out)["process_boundary"]
    samples = b["samples"]
    assert len(samples["click"]) == len(samples["inside"]) == len(samples["boundary"]) == 2 * 3  # 3 clicks a repeat
    for wall, inside, boundary in zip(samples["click"], samples["inside"], samples["boundary"]):
        assert inside > 0 and boundary > 0 and wall == pytest.approx(inside + boundary)
    for key in ("click_s_median", "inside_s_median", "boundary_s_median", "boundary_s_p95", "image_transfer_s_median"):
        assert math.isfinite(b[key]) and b[key] > 0, key
    assert b["boundary_fraction"] == pytest.approx(b["boundary_s_median"] / b["click_s_median"])
    assert b["target_met"] == (b["boundary_fraction"] < 0.05) and b["target_fraction"] == 0.05
    assert "worker process (PID" in captured.err and "boundary" in captured.err
    # submit_image's time on the calling thread: measured images through the file, the warm-up one the socket
    assert len(samples["submit_image"]) == 2 and len(samples["submit_image_socket"]) == 1
    assert b["submit_image_s_median"] > 0 and b["submit_image_socket_s_median"] > 0


def test_the_table_says_it(small_model, capsys):
    out = _bench(capsys, "--checkpoint", str(small_model)).out
    assert "worker process (as in Slicer): click" in out and "% of a click (target < 5 %" in out
    assert "submit_image kept the calling (GUI) thread" in out and "through the socket as before" in out
