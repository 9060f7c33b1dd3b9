"""Child processes polled from the GUI thread without ever blocking it.

`BackgroundCommand` runs a command with stdout and stderr going to a log file (never a pipe: a
pipe nobody drains fills up and stalls the child) and `poll()` reads what was added to that
file since the last call. `TrainingProcess` adds the progress stream (RUN_DIR/progress.jsonl,
parsed by progressparser), Stop and the final verdict:

    start() -> poll() ... poll() -> state in FINISHED / INTERRUPTED / STOPPED / FAILED, message

Every child starts in a process group of its own (a new session on POSIX) and runs on the real
interpreter (python-real inside Slicer, not the PythonSlicer launcher, which forwards no signal:
ENSAMSegmentLib/core/interpreter.py). Stop (`request_stop`) sends SIGINT to that whole group:
`ensam train` finishes the current accumulation group, writes a checkpoint and exits with code 3
(state INTERRUPTED; `resume_command` continues); its DataLoader workers ignore SIGINT
(core/trainer._ignore_stop_signals). A second request (or `kill`) sends SIGKILL to the whole group; the
last checkpoint stays. When the main process has ended, whatever is left of its group is killed: Stop
ends the whole process tree. On Windows a console process cannot be sent SIGINT by another process;
there Stop terminates the child and `kill` ends the tree (taskkill /T); the run continues from its last
periodic or epoch checkpoint. The run folder's lock (ENSAMTrainingLib/core/runlock.py, taken by `ensam train`)
refuses a second run in the same folder while any process of the first lives.

The verdict trusts nothing half-written: a run counts as FINISHED only when the process exited
with 0, its stream ended with "done"/"finished", and the model file it names reads as a
complete model file; anything else is FAILED (or INTERRUPTED) with a message that says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path

from ENSAMSegmentLib.core.interpreter import describe_exit, new_group_options

from .command import TrainCommand
from .progressparser import FAILED, FINISHED, INTERRUPTED, STOPPED, WAITING, ProgressParser

STOPPING = "stopping"
EXIT_INTERRUPTED = 3  # = ENSAMTrainingLib.core.trainer.EXIT_INTERRUPTED (that module imports torch)
LOG_LINES_KEPT = 2000


class FileTail:
    """Reads what was appended to a text file since the last read (the file may not exist yet)."""

    def __init__(self, path: Path, offset: int = 0):
        self.path = Path(path)
        self.offset = offset

    def read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self.offset += len(data)
        # a UTF-8 character cut at the end of the data is completed by the next read
        cut = _incomplete_utf8_tail(data)
        if cut:
            self.offset -= cut
            data = data[:-cut]
        return data.decode("utf-8", errors="replace")


def _incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character that is not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0


class BackgroundCommand:
    """A command in its own process; its output goes to ``log_path`` and is read by `poll`."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv, self.env, self.cwd = list(argv), env, cwd
        self.log_path = Path(log_path)
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES_KEPT)
        self.process: subprocess.Popen | None = None
        self._log = FileTail(self.log_path)
        self._partial_log = ""

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("this command was started already")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log.offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:  # a group of its own: signals reach the whole tree, Ctrl-C spares it
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.cwd, **new_group_options())

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def read_log(self) -> list[str]:
        """Complete log lines added since the last call (the last unfinished one waits, unless the process ended)."""
        ended = self.process is not None and self.process.poll() is not None  # before reading: all is written
        lines = (self._partial_log + self._log.read()).split("\n")
        self._partial_log = lines.pop()
        if self._partial_log and ended:
            lines.append(self._partial_log)
            self._partial_log = ""
        lines = [line.rstrip("\r") for line in lines]
        self.log_lines.extend(lines)
        return lines

    def poll(self) -> list[str]:
        """New log lines; never blocks. ``running`` says whether the process is still there."""
        return self.read_log()

    def last_log_line(self) -> str:
        """The last non-empty log line (usually the error of a failed command)."""
        for line in reversed(self.log_lines):
            if line.strip():
                return line.strip()
        return ""

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the process to end (True) or ``timeout`` seconds (False); reads the log."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        finally:
            self.poll()
        return True

    def kill(self) -> None:
        """End the process and every process of its group at once (no checkpoint), and reap it."""
        if self.process is None:
            return
        if os.name == "nt":
            if self.running:  # the whole tree: the DataLoader workers too
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
                if self.running:
                    self.process.kill()
        else:
            self.signal_group(signal.SIGKILL)
        self.process.wait()

    def signal_group(self, signum) -> bool:
        """Send `signum` to the child's process group (POSIX); False when the group is gone."""
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def end_leftovers(self) -> None:
        """The main process has ended: kill what remains of its group (POSIX; DataLoader workers, a child
        python-real of a launcher). Called once, right after the main process was reaped."""
        if os.name != "nt" and self.process is not None and self.process.poll() is not None:
            self.signal_group(signal.SIGKILL)


class TrainingProcess(BackgroundCommand):
    """`ensam train` in a child process: progress, Stop, and the verdict (module docstring)."""

    def __init__(self, command: TrainCommand, cwd: Path | None = None):
        super().__init__(command.argv, command.log_path, command.env, cwd)
        self.command = command
        self.parser = ProgressParser()
        self._stream = FileTail(command.progress_path)
        self.stop_requests = 0
        self.state = WAITING
        self.message = ""
        self.model: Path | None = None  # set only when the run finished with a readable model file
        self.events = 0  # events applied so far (a change tells the views to redraw)
        self._finished = False

    @property
    def progress(self):
        return self.parser.progress

    def start(self) -> None:
        """Start the child. A resumed run's stream is read from its beginning, so the history is whole."""
        self.command.run_dir.mkdir(parents=True, exist_ok=True)
        super().start()
        self.state = WAITING
        self.message = "Resuming..." if self.command.resume else "Starting..."

    def poll(self) -> list[str]:
        """Read new log lines and events; decide the state when the process has ended. Never blocks."""
        ended = self.process is not None and self.process.poll() is not None
        lines = super().poll()
        self.events += len(self.parser.feed(self._stream.read()))
        if ended and not self._finished:
            self.end_leftovers()
            self.events += len(self.parser.finish())
            self._finished = True
            self._decide(self.process.returncode)
        elif not self._finished:
            self.state = STOPPING if self.stop_requests else self.progress.state
            if self.state not in (WAITING, STOPPING):
                self.message = self.progress.summary()
        return lines

    @property
    def decided(self) -> bool:
        """The process has ended and ``state`` / ``message`` / ``model`` hold the verdict."""
        return self._finished

    def request_stop(self) -> None:
        """Ask the run to checkpoint and exit (SIGINT); a second request ends it at once."""
        if not self.running:
            return
        self.stop_requests += 1
        if self.stop_requests > 1:
            self.kill()
        elif os.name == "nt":
            self.process.terminate()
        else:
            self.signal_group(signal.SIGINT)
        self.state = STOPPING
        self.message = "Stopping: finishing the current step and writing a checkpoint..."

    def stop(self, timeout: float = 120.0) -> bool:
        """request_stop (unless asked already), then wait up to ``timeout`` s; kills it after that.
        True when it stopped by itself."""
        if not self.stop_requests:
            self.request_stop()
        stopped = self.wait(timeout)
        if not stopped:
            self.kill()
            self.poll()
        return stopped

    def wait(self, timeout: float | None = None) -> bool:
        done = super().wait(timeout)
        self.poll()
        return done

    # -- verdict ------------------------------------------------------------------------------

    def _decide(self, returncode: int) -> None:
        p = self.progress
        resume_hint = " Resume continues from the last checkpoint." if self._has_checkpoint() else ""
        if returncode == 0 and p.state == FINISHED:
            self._accept_model(p.model)
        elif returncode == 0 and p.state == STOPPED:
            self.state, self.message = STOPPED, f"Stopped after step {p.step} with a checkpoint; Resume continues."
        elif returncode == EXIT_INTERRUPTED or p.state == INTERRUPTED:
            self.state = INTERRUPTED
            self.message = f"Stopped at step {p.step} of {p.total_steps} with a checkpoint; Resume continues."
        elif self.stop_requests:  # forced: a second Stop, or terminate on Windows
            self.state = INTERRUPTED if self._has_checkpoint() else FAILED
            self.message = f"Stopped at once at step {p.step}, without a new checkpoint." + resume_hint
        elif p.error:
            self.state, self.message = FAILED, f"Training failed: {p.error}"
        else:
            self.state = FAILED
            where = self.last_log_line() if returncode > 0 else ""
            how = describe_exit(returncode) if returncode else "ended without finishing (no 'done' event)"
            message = f"The training process {how}" + (f" at step {p.step}" if p.steps else "")
            message += f": {where}" if where else ""
            self.message = message + ("" if message.endswith(".") else ".") + resume_hint

    def _has_checkpoint(self) -> bool:
        return (self.command.run_dir / "checkpoint.pt").is_file()

    def _accept_model(self, model: str | None) -> None:
        """FINISHED only when the model file builds the network and loads every weight (on the CPU;
        mrml/models.check_model_file makes the same test before installing it)."""
        from ENSAMSegmentLib.core.modelfile import ModelFileError, load_model

        path = Path(model) if model else self.command.run_dir / "model.pt"
        if not path.is_absolute():
            path = self.command.run_dir / path.name
        try:
            load_model(path, "cpu")
        except ModelFileError as error:
            self.state, self.model = FAILED, None
            self.message = f"Training ended, but its model cannot be used: {error}"
            return
        self.state, self.model = FINISHED, path
        p = self.progress
        self.message = f"Finished: {p.step} steps in {p.epochs_total} epoch(s); model {path}"


def wait_until(condition, timeout: float, poll=None, interval: float = 0.05) -> bool:
    """Call ``poll`` until ``condition()`` holds (True) or ``timeout`` seconds pass (False); for tests
    and scripts (the module polls from a timer instead)."""
    end = time.monotonic() + timeout
    while True:
        if poll is not None:
            poll()
        if condition():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


__all__ = ["STOPPING", "BackgroundCommand", "FileTail", "TrainingProcess", "describe_exit", "wait_until"]
