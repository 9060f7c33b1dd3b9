"""Child processes polled without blocking, and the verdict on a training process.

The real `ensam train` runs are in the shared scenarios (test_scenarios.py); here, besides one real
run with a device that is not there, small Python children play the endings a real run reaches only
by accident: a model file cut short after "done", an exit without "done", a crash, a child that
ignores SIGINT.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from ENSAMTrainingLib.runs import command
from ENSAMTrainingLib.runs.command import TrainCommand
from ENSAMTrainingLib.runs.process import (
    STOPPING,
    BackgroundCommand,
    FileTail,
    TrainingProcess,
    describe_exit,
    wait_until,
)
from ENSAMTrainingLib.runs.progressparser import FAILED, FINISHED, INTERRUPTED
from ENSAMTrainingLib.mrml.scenarios import settings


def python_child(run_dir: Path, code: str) -> TrainingProcess:
    """A TrainingProcess whose child is ``code`` (RUN = its run folder, STREAM = its progress file)."""
    prelude = f"import json, sys, time\nRUN = {str(run_dir)!r}\nSTREAM = RUN + '/progress.jsonl'\n"
    return TrainingProcess(TrainCommand([sys.executable, "-c", prelude + textwrap.dedent(code)], dict(os.environ), run_dir))


def run_to_end(process, timeout=120) -> None:
    process.start()
    assert wait_until(lambda: process.decided, timeout, poll=process.poll), process.message


def test_file_tail_reads_appended_text_and_waits_for_cut_characters(tmp_path):
    path = tmp_path / "log.txt"
    tail = FileTail(path)
    assert tail.read() == ""  # not there yet
    data = "naïve → ok\n".encode()
    cut = data.index("→".encode()) + 1  # inside the 3-byte arrow
    path.write_bytes(data[:cut])
    assert tail.read() == "naïve "
    with open(path, "ab") as f:
        f.write(data[cut:])
    assert tail.read() == "→ ok\n" and tail.read() == ""


def test_background_command_streams_its_log(tmp_path):
    code = "import time\nprint('first', flush=True)\ntime.sleep(0.5)\nprint('second')\nprint('no newline', end='')"
    job = BackgroundCommand([sys.executable, "-c", code], tmp_path / "job.log")
    job.start()
    assert wait_until(lambda: "first" in job.log_lines, 60, poll=job.poll)
    assert job.running and "second" not in job.log_lines  # read while it runs
    assert job.wait(60) and job.returncode == 0
    assert list(job.log_lines) == ["first", "second", "no newline"] and job.last_log_line() == "no newline"
    with pytest.raises(RuntimeError, match="started already"):
        job.start()


def test_describe_exit():
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "was killed (signal 9, SIGKILL)"


def test_device_that_is_not_there_reported_by_the_child(tmp_path, tiny_data):
    """`ensam train` itself refuses: its error event becomes the message (exit code 2, no model)."""
    cmd = command.train_command(settings(tiny_data, tmp_path, device="cuda:99"))
    process = TrainingProcess(cmd)
    run_to_end(process, 300)
    assert process.returncode == 2 and process.state == FAILED and process.model is None
    assert process.message == "Training failed: device 'cuda:99' asked for, but this torch has no CUDA device" or (
        "cuda:99" in process.message and "only" in process.message)  # on a machine with CUDA devices
    assert process.progress.error_type == "TrainingError"
    assert any("error:" in line for line in process.log_lines)


def test_a_cut_model_file_is_not_presented_as_a_model(tmp_path, tiny_model):
    """The stream says finished, but model.pt is half a file: failed, no model."""
    half = tiny_model.read_bytes()[: tiny_model.stat().st_size // 2]
    (tmp_path / "half.bin").write_bytes(half)
    process = python_child(tmp_path, f"""
        open(RUN + '/model.pt', 'wb').write(open({str(tmp_path / 'half.bin')!r}, 'rb').read())
        with open(STREAM, 'a') as f:
            f.write(json.dumps({{"event": "start", "epochs": 1, "total_steps": 1}}) + "\\n")
            f.write(json.dumps({{"event": "done", "status": "finished", "model": RUN + '/model.pt'}}) + "\\n")
    """)
    run_to_end(process)
    assert process.returncode == 0 and process.state == FAILED and process.model is None
    assert process.message.startswith("Training ended, but its model cannot be used:") and "truncated" in process.message


def test_a_complete_model_is_accepted(tmp_path, tiny_model):
    process = python_child(tmp_path, f"""
        import shutil
        shutil.copy({str(tiny_model)!r}, RUN + '/model.pt')
        with open(STREAM, 'a') as f:
            f.write(json.dumps({{"event": "start", "epochs": 1, "total_steps": 1}}) + "\\n")
            f.write(json.dumps({{"event": "step", "epoch": 0, "step": 1, "loss": 0.5}}) + "\\n")
            f.write(json.dumps({{"event": "done", "status": "finished", "model": RUN + '/model.pt', "step": 1}}) + "\\n")
    """)
    run_to_end(process)
    assert process.state == FINISHED and process.model == tmp_path / "model.pt"
    assert process.message == f"Finished: 1 steps in 1 epoch(s); model {tmp_path / 'model.pt'}"


def test_exit_without_done_and_crash(tmp_path):
    quiet = python_child(tmp_path / "a", """
        with open(STREAM, 'a') as f:
            f.write(json.dumps({"event": "start", "epochs": 1, "total_steps": 2}) + "\\n")
    """)
    run_to_end(quiet)
    assert quiet.state == FAILED and quiet.message == "The training process ended without finishing (no 'done' event)."
    crash = python_child(tmp_path / "b", """
        with open(STREAM, 'a') as f:
            f.write(json.dumps({"event": "start", "epochs": 1, "total_steps": 2}) + "\\n")
            f.write(json.dumps({"event": "step", "epoch": 0, "step": 1, "loss": 0.5}) + "\\n")
        open(RUN + '/checkpoint.pt', 'wb').close()
        raise MemoryError("CUDA out of memory while allocating 2 GiB")
    """)
    run_to_end(crash)
    assert crash.state == FAILED and crash.returncode == 1
    assert crash.message == ("The training process exited with code 1 at step 1: MemoryError: CUDA out of memory "
                             "while allocating 2 GiB. Resume continues from the last checkpoint.")


@pytest.mark.skipif(os.name == "nt", reason="SIGINT cannot be sent to a child on Windows (Stop terminates it)")
def test_stop_waits_then_kills_a_child_that_does_not_stop(tmp_path):
    process = python_child(tmp_path, """
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with open(STREAM, 'a') as f:
            f.write(json.dumps({"event": "start", "epochs": 1, "total_steps": 9}) + "\\n")
        time.sleep(120)
    """)
    process.start()
    assert wait_until(lambda: process.progress.starts == 1, 60, poll=process.poll)
    process.request_stop()
    process.poll()
    assert process.state == STOPPING and process.message.startswith("Stopping")
    assert process.stop(timeout=1.0) is False  # ignored SIGINT: killed after the timeout
    assert process.decided and process.state == FAILED and process.returncode < 0
    assert process.message == "Stopped at once at step 0, without a new checkpoint."


@pytest.mark.skipif(os.name == "nt", reason="SIGINT cannot be sent to a child on Windows (Stop terminates it)")
def test_stop_sends_sigint_and_the_child_checkpoints(tmp_path):
    """What `ensam train` does on SIGINT, in miniature: checkpoint, "done" interrupted, exit 3."""
    process = python_child(tmp_path, """
        import signal
        def stop(*_):
            open(RUN + '/checkpoint.pt', 'wb').close()
            with open(STREAM, 'a') as f:
                f.write(json.dumps({"event": "done", "status": "interrupted", "model": None, "step": 1}) + "\\n")
            sys.exit(3)
        signal.signal(signal.SIGINT, stop)
        with open(STREAM, 'a') as f:
            f.write(json.dumps({"event": "start", "epochs": 1, "total_steps": 4}) + "\\n")
            f.write(json.dumps({"event": "step", "epoch": 0, "step": 1, "loss": 0.5}) + "\\n")
        time.sleep(120)
    """)
    process.start()
    assert wait_until(lambda: process.progress.step == 1, 60, poll=process.poll)
    assert process.stop(timeout=60) is True
    assert process.state == INTERRUPTED and process.returncode == 3
    assert process.message == "Stopped at step 1 of 4 with a checkpoint; Resume continues."
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert events[-1]["status"] == "interrupted"
