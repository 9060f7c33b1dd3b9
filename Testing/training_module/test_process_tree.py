"""Stop ends the whole process tree of a training run, and one run folder holds one run: real `ensam train`
runs with DataLoader worker processes, a launcher that forwards no signal (what PythonSlicer is), and
the run folder's lock (ENSAMTrainingLib/core/runlock.py) held by real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ENSAMTrainingLib.core.runlock import LOCK_FILE, RunLock, RunLockedError, holder
from ENSAMTrainingLib.runs.command import SetupError, TrainCommand, child_environment
from ENSAMTrainingLib.mrml.controller import TrainingController
from ENSAMTrainingLib.runs.process import TrainingProcess, wait_until
from ENSAMTrainingLib.runs.progressparser import FAILED, INTERRUPTED
from ENSAMTrainingLib.mrml.scenarios import FAST, settings

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and SIGINT are POSIX here (Windows: taskkill)")
psutil = pytest.importorskip("psutil")


def _tree(pid: int) -> list[int]:
    """pid and every descendant still running (zombies excluded)."""
    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _all_gone(pids, timeout=15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _start_long_run(scene, tiny_data, tmp_path, workers=2):
    """A real run with DataLoader worker processes, long enough to be stopped after its first step."""
    controller = TrainingController(scene, models_folder=tmp_path / "models")
    run = controller.start_training(settings(tiny_data, tmp_path, epochs=200, options={**FAST, "workers": workers}))
    assert wait_until(lambda: run.progress.step >= 1 or not controller.training_running, 300, poll=controller.poll), \
        run.message
    assert controller.training_running, run.message
    return controller, run


def test_stop_ends_the_whole_process_tree(scene, tiny_data, tmp_path):
    controller, run = _start_long_run(scene, tiny_data, tmp_path)
    tree = _tree(run.pid)
    assert len(tree) >= 3, f"expected the trainer and its 2 DataLoader workers, found {tree}"
    assert os.getpgid(run.pid) == run.pid != os.getpgid(0)  # a process group of its own
    controller.request_stop()
    assert wait_until(lambda: not controller.training_running, 300, poll=controller.poll), run.message
    assert run.state == INTERRUPTED and run.returncode == 3, run.message
    assert _all_gone(tree), f"left running after Stop: {[p for p in tree if psutil.pid_exists(p)]}"
    assert holder(run.command.run_dir) is None  # the lock went with the process


def test_stop_now_kills_the_whole_tree_at_once(scene, tiny_data, tmp_path):
    controller, run = _start_long_run(scene, tiny_data, tmp_path)
    tree = _tree(run.pid)
    controller.request_stop()
    controller.request_stop()  # "Stop now": SIGKILL to the group
    assert wait_until(lambda: not controller.training_running, 30, poll=controller.poll), run.message
    assert run.returncode == -signal.SIGKILL and run.state in (INTERRUPTED, FAILED), run.message
    assert _all_gone(tree, 5), f"left running after Stop now: {[p for p in tree if psutil.pid_exists(p)]}"


def test_stop_reaches_the_interpreter_behind_a_launcher_that_forwards_nothing(tmp_path):
    """PythonSlicer starts python-real and forwards no signal: a signal to the launcher alone leaves the run
    going. Stop signals the group, so the real interpreter checkpoints even behind such a launcher."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent("""
        import signal, subprocess, sys
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # like ctkAppLauncher: nothing is forwarded
        sys.exit(subprocess.call(sys.argv[1:]))
    """))
    child = textwrap.dedent(f"""
        import json, signal, sys, time
        RUN = {str(tmp_path)!r}
        def stop(*_):
            open(RUN + '/checkpoint.pt', 'wb').close()
            with open(RUN + '/progress.jsonl', 'a') as f:
                f.write(json.dumps({{"event": "done", "status": "interrupted", "model": None, "step": 1}}) + "\\n")
            sys.exit(3)
        signal.signal(signal.SIGINT, stop)
        with open(RUN + '/progress.jsonl', 'a') as f:
            f.write(json.dumps({{"event": "start", "epochs": 1, "total_steps": 4}}) + "\\n")
            f.write(json.dumps({{"event": "step", "epoch": 0, "step": 1, "loss": 0.5}}) + "\\n")
        time.sleep(120)
    """)
    process = TrainingProcess(TrainCommand([sys.executable, str(launcher), sys.executable, "-c", child],
                                           dict(os.environ), tmp_path))
    process.start()
    assert wait_until(lambda: process.progress.step == 1, 60, poll=process.poll)
    tree = _tree(process.pid)
    assert len(tree) == 2  # the launcher and the interpreter it started
    process.request_stop()
    assert wait_until(lambda: process.decided, 60, poll=process.poll), process.message
    assert (tmp_path / "checkpoint.pt").exists() and process.returncode == 3 and process.state == INTERRUPTED
    assert _all_gone(tree)


def test_a_second_run_in_the_same_folder_is_refused(scene, tiny_data, tmp_path):
    controller, run = _start_long_run(scene, tiny_data, tmp_path, workers=0)
    run_dir = run.command.run_dir
    info = holder(run_dir)
    assert info is not None and info.pid == run.pid, info  # the trainer itself holds the folder

    other = TrainingController(scene)  # e.g. Slicer restarted while the run went on
    with pytest.raises(SetupError, match=rf"in use by a training process that is still running \(PID {run.pid}"):
        other.resume(run_dir, device="cpu")
    with pytest.raises(SetupError, match="in use by a training process"):
        other.start_training(settings(tiny_data, tmp_path, run_dir=run_dir))
    # and from a terminal: `ensam train` itself refuses
    result = subprocess.run([sys.executable, "-m", "ENSAMSegmentLib.cli.main", "train", "--out", str(run_dir),
                             "--resume", "--no-progress-bar"], capture_output=True, text=True, env=child_environment(),
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"in use by another training process (PID {run.pid}" in result.stderr
    assert run.running  # the first run was not disturbed

    controller.request_stop()
    assert wait_until(lambda: not controller.training_running, 300, poll=controller.poll), run.message
    assert holder(run_dir) is None and not (run_dir / LOCK_FILE).exists()


def _holder_process(run_dir: Path) -> subprocess.Popen:
    code = f"from ENSAMTrainingLib.core.runlock import RunLock\nimport time\nRunLock({str(run_dir)!r}).acquire()\n" \
           "print('locked', flush=True)\ntime.sleep(120)\n"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=child_environment())
    assert process.stdout.readline().strip() == "locked"
    return process


def test_the_lock_follows_the_life_of_its_process(tmp_path):
    run_dir = tmp_path / "run"
    assert holder(run_dir) is None
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text('{"pid": 999999}')  # left by a run that died: not a holder
    assert holder(run_dir) is None
    process = _holder_process(run_dir)
    try:
        info = holder(run_dir)
        assert info is not None and info.pid == process.pid and info.started
        with pytest.raises(RunLockedError, match=rf"PID {process.pid}"):
            RunLock(run_dir).acquire()
        process.kill()  # SIGKILL: no clean-up at all, and still the lock is free
        process.wait()
        assert holder(run_dir) is None
        with RunLock(run_dir) as lock:
            assert holder(run_dir).pid == os.getpid()
            with pytest.raises(RunLockedError):  # a second lock in the same process is refused too
                RunLock(run_dir).acquire()
            assert lock.path.exists()
        assert not (run_dir / LOCK_FILE).exists()
    finally:
        process.kill()
