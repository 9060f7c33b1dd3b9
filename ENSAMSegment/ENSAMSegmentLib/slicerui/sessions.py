"""The application's ENSAM sessions: one worker process per (volume, model, device), shared by the
ENSAM Segment module and every Segment Editor's ENSAM effect (core/session_pool.py, core/worker.py).

Inside Slicer the model runs in a child process started with Slicer's real interpreter (python-real,
core/interpreter.py), never in a Python thread of Slicer itself (PythonQt holds the GIL while Slicer
idles: a thread would crawl). The pool ends every worker when the application quits (aboutToQuit), and
each worker also ends by itself when Slicer's process is gone (its connection closes): nothing outlives
Slicer even where an effect's cleanup() is never called.
"""

from __future__ import annotations

_POOL = None


def shared_pool():
    """The application's SessionPool of worker processes (made on first use)."""
    global _POOL
    if _POOL is None:
        from ENSAMSegmentLib.core.session_pool import SessionPool, worker_factory

        _POOL = SessionPool(worker_factory())
        try:
            import slicer

            slicer.app.connect("aboutToQuit()", _POOL.close_all)
        except (ImportError, AttributeError):  # not inside the application (scripts, tests)
            pass
    return _POOL
