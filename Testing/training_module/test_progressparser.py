"""The progress-stream parser on a recorded stream of a real run (data/record_progress_stream.py made it):
a stop, a truncated line followed by the resumed run's first event, validation epochs, an error event."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ENSAMTrainingLib.runs.progressparser import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    WAITING,
    ProgressParser,
    TrainingProgress,
    format_duration,
    parse_stream,
)

RECORDED = Path(__file__).parent / "data" / "progress_recorded.jsonl"


@pytest.fixture(scope="module")
def recorded() -> str:
    return RECORDED.read_text(encoding="utf-8")


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def test_whole_recorded_stream(recorded):
    parser = parse_stream(recorded)
    p = parser.progress
    assert parser.recovered_lines == 1 and parser.bad_lines == 0  # the resumed start after the cut line
    assert p.state == FAILED and p.error == "device 'cuda:99' asked for, but this torch has no CUDA device"
    assert p.error_type == "TrainingError" and p.model is None
    assert p.starts == 2 and (p.total_steps, p.epochs_total, p.train_cases, p.val_cases) == (4, 2, 2, 1)
    assert [s.step for s in p.steps] == [1, 2, 3, 4] and [s.epoch for s in p.steps] == [0, 0, 1, 1]
    assert p.steps[0].loss == pytest.approx(1.941991925239563) and p.steps[-1].samples_per_s > 0
    assert [r.epoch for r in p.epochs] == [0, 1] and p.epochs[1].train_loss == pytest.approx(1.7137122750282288)
    assert p.epochs[0].metric("final_dsc") == 0.0 and p.epochs[0].metric("dsc_auc") is None  # null in the stream
    assert p.epochs[0].val["cases"] == 1
    assert p.checkpoint == "/tmp/recorded/run/checkpoint.pt" and p.checkpoint_reason == "epoch"


def test_states_line_by_line(recorded):
    """The state after each line: waiting, running, interrupted, running again, finished, failed."""
    parser, states = ProgressParser(), []
    for line in lines_of(recorded):
        parser.feed(line + "\n")
        states.append(parser.progress.state)
    assert states[0] == RUNNING and INTERRUPTED in states
    stop = states.index(INTERRUPTED)
    assert RUNNING in states[stop:] and states[-2] == FINISHED and states[-1] == FAILED
    assert ProgressParser().progress.state == WAITING


def test_finished_model_before_the_error_event(recorded):
    text = "\n".join(line for line in lines_of(recorded) if '"event": "error"' not in line)
    p = parse_stream(text).progress
    assert p.state == FINISHED and p.model == "/tmp/recorded/run/model.pt" and p.fraction == 1.0
    assert p.eta_s == 0.0 and p.summary() == f"Epoch 2/2, step 4/4, {p.samples_per_s:.2g} samples/s"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_chunking_gives_the_same_progress(recorded, seed):
    """Reads of a growing file end anywhere, even inside a line: the result does not depend on it."""
    rng = random.Random(seed)
    parser, position = ProgressParser(), 0
    while position < len(recorded):
        size = rng.randint(1, 80)
        parser.feed(recorded[position:position + size])
        position += size
    parser.finish()
    assert parser.progress == parse_stream(recorded).progress
    assert (parser.recovered_lines, parser.bad_lines) == (1, 0)


def test_truncated_last_line_is_skipped(recorded):
    """A killed process: its last line is cut; finish() counts it as bad, the rest stands."""
    lines = lines_of(recorded)
    cut = next(i for i, line in enumerate(lines) if '"event": "step"' in line and '"step": 3' in line)
    text = "\n".join(lines[:cut]) + "\n" + lines[cut][:40]
    parser = ProgressParser()
    parser.feed(text)
    assert parser.bad_lines == 0  # the unfinished line waits for its newline
    parser.finish()
    assert parser.bad_lines == 1 and [s.step for s in parser.progress.steps] == [1, 2]
    assert parser.progress.state == RUNNING


def test_unknown_events_fields_and_garbage_are_ignored():
    text = "\n".join([
        json.dumps({"event": "start", "time": 1, "epochs": 1, "total_steps": 2, "new_field": [1, 2]}),
        "Traceback (most recent call last):",
        json.dumps({"event": "future_event", "time": 2, "x": 1}),
        json.dumps({"event": "step", "time": 3, "epoch": 0, "step": 1, "total": 2, "loss": None, "eta_s": 125}),
        json.dumps([1, 2, 3]),
        "",
    ])
    parser = parse_stream(text)
    p = parser.progress
    assert parser.bad_lines == 2 and p.state == RUNNING and p.steps[0].loss is None
    assert p.summary() == "Epoch 1/1, step 1/2, 2 min 05 s left"


def test_resumed_start_drops_the_steps_done_again():
    """Killed after step 3 with the checkpoint at step 2: the resumed run redoes step 3."""
    events = [{"event": "start", "epochs": 2, "total_steps": 4, "epoch": 0, "step": 0}]
    events += [{"event": "step", "epoch": s // 3, "step": s, "loss": 1.0} for s in (1, 2, 3)]
    events += [{"event": "epoch", "epoch": 0, "step": 2, "train_loss": 1.0, "val": None}]
    events += [{"event": "start", "resumed": True, "epochs": 2, "total_steps": 4, "epoch": 1, "step": 2},
               {"event": "step", "epoch": 1, "step": 3, "loss": 0.5}]
    p = parse_stream("\n".join(map(json.dumps, events)) + "\n").progress
    assert [(s.step, s.loss) for s in p.steps] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    assert [r.epoch for r in p.epochs] == [0] and p.epochs[0].val is None and p.starts == 2


def test_format_duration_and_empty_progress():
    assert [format_duration(s) for s in (0, 45, 125, 3720, -3)] == ["0 s", "45 s", "2 min 05 s", "1 h 02 min", "0 s"]
    assert TrainingProgress().fraction == 0.0
    assert TrainingProgress().summary().startswith("Starting")
