"""The JSON-lines progress stream: written line by line, read back tolerantly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ENSAMTrainingLib.core.progress import ProgressStream, parse_event, read_events


def test_events_round_trip_with_a_truncated_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    stream = ProgressStream(path)
    stream.emit("start", run_dir=tmp_path, epochs=2, total_steps=10)
    stream.emit("step", epoch=0, step=1, loss=np.float32(0.5), eta_s=float("nan"), dsc=(1, 2))
    stream.close()
    with open(path, "a") as f:
        f.write('{"event": "step", "epoch": 0, "st')  # a killed writer's last line
    events = read_events(path)
    assert [e["event"] for e in events] == ["start", "step"]
    assert events[0]["run_dir"] == str(tmp_path) and isinstance(events[0]["time"], float)
    assert events[1]["loss"] == 0.5 and events[1]["eta_s"] is None and events[1]["dsc"] == [1, 2]


def test_stdout_stream_and_bad_lines(capsys):
    ProgressStream("-").emit("done", status="finished", model=None)
    line = capsys.readouterr().out
    assert line.endswith("\n") and json.loads(line)["status"] == "finished"
    assert ProgressStream(None).emit("error", message="x")["message"] == "x"  # off: nothing written
    assert capsys.readouterr().out == ""
    for bad in ["", "tqdm 50%|###", "[1, 2]", '{"no_event": 1}', "{broken"]:
        assert parse_event(bad) is None
    with pytest.raises(ValueError, match="unknown progress event"):
        ProgressStream(None).emit("nonsense")


def test_loss_smoothing_leaves_out_a_skipped_steps_nan():
    """A skipped (non-finite) step's loss must not blank the smoothed curve from there on."""
    from ENSAMTrainingLib.core.plots import smooth

    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    np.testing.assert_allclose(smooth(values, 2), [1.0, 2.0, 3.0, 5.0, 6.0])
    np.testing.assert_allclose(smooth(np.array([1.0, 2.0, 3.0]), 5), [1.0, 1.5, 2.0])
