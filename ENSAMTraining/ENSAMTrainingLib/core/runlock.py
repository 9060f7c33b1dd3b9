"""One training process per run folder: RUN_DIR/run.lock, held by `ensam train` while it lives.

    with RunLock(run_dir):      # RunLockedError when another live process holds it
        train(...)
    holder(run_dir)             # LockInfo(pid, host, started, command) of the live holder, or None

The file holds the holder's PID, host, start time and command line (JSON, for people and messages); what
decides is an operating-system lock on the file (POSIX flock, Windows msvcrt.locking), which the system
drops when the process ends however it ends (SIGKILL included), so a file left by a dead run never blocks
the next one, and a reused PID never fakes a live one. DataLoader workers forked from the trainer share
the lock: the folder stays locked until every process of the run is gone.

Both sides use it: `ensam train` takes the lock (ENSAMTrainingLib/cli/commands.py), so even a second run
started from a terminal is refused; the ENSAM Training module checks `holder()` before it starts or
resumes a run (mrml/controller.py), so the user hears it at once.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "run.lock"
_WINDOWS_LOCK_OFFSET = 1 << 20  # Windows locks are mandatory: lock a byte past the text so it stays readable


class RunLockedError(RuntimeError):
    """The run folder is in use by another live training process (the message says which)."""


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str = ""
    started: str = ""
    command: str = ""

    def describe(self) -> str:
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"PID {self.pid}{where}, started {self.started[:19].replace('T', ' ')}"


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _read(path: Path) -> LockInfo:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return LockInfo(int(data.get("pid", 0)), str(data.get("host", "")), str(data.get("started", "")),
                        str(data.get("command", "")))
    except (OSError, ValueError):
        return LockInfo(0)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def holder(run_dir) -> LockInfo | None:
    """The live process that holds `run_dir`'s lock, or None (no lock file, or one nobody holds)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        return _read(path)
    finally:
        os.close(fd)


class RunLock:
    """The run folder's lock for this process (see the module docstring)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                info = _read(self.path)
                raise RunLockedError(f"{self.run_dir} is in use by another training process ({info.describe()}): "
                                     "wait for it to stop, or stop it first")
            if os.name == "nt" or _same_file(fd, self.path):
                break
            _unlock(fd)  # the holder removed the file as we locked it: lock the new one
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode("utf-8"))
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the file and unlock it (a crash leaves the file, unlocked: harmless). On POSIX the file goes
        while still locked, so no one can lock it in between and be left holding a removed file."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.name != "nt":
                _unlink(self.path)
            _unlock(fd)
        finally:
            os.close(fd)
        if os.name == "nt":  # an open file cannot be removed there
            _unlink(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
