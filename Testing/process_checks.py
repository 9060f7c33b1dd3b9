"""Waiting for processes to end, for the tests that start real ones (workers, training runs)."""

from __future__ import annotations

import time

import psutil


def gone(*pids: int, timeout: float = 10.0) -> bool:
    """True once none of `pids` runs any more (ended, or a zombie waiting to be reaped); False after
    `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
