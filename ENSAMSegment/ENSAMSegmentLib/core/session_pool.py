"""Sessions shared by the front-ends of one application: one per (image, model file, device).

In Slicer the ENSAM Segment module and the Segment Editor effect each have a prompt controller; when
both segment the same volume with the same model they share one session, so the volume is encoded
once and one worker process holds it (slicerui/sessions.py keeps the application's pool). A controller
`acquire`s the session of its volume, `release`s it when it moves to another volume or closes; the last
release closes the session (never waiting for it). A session that died (its worker crashed, its model
could not load) is replaced by a fresh one at the next `acquire` of its key.

    pool = SessionPool(worker_factory())            # or inprocess_factory() for the CLI, web app, tests
    session = pool.acquire(("scene-1", "vtkMRMLScalarVolumeNode1"), model_path, "auto")
    ...
    pool.release(session)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def inprocess_factory(**options) -> Callable:
    """(model_path, device) -> InferenceSession in this process (imports torch when first called)."""

    def make(model_path, device):
        from .session import InferenceSession

        return InferenceSession(model_path=model_path, device=device, **options)

    return make


def worker_factory(**options) -> Callable:
    """(model_path, device) -> WorkerSession: the model in a child process (worker.py)."""

    def make(model_path, device):
        from .worker import WorkerSession

        return WorkerSession(model_path, device, **options)

    return make


@dataclass(eq=False)
class _Entry:
    session: object
    users: int = 0


def _usable(session) -> bool:
    return getattr(session, "failure", None) is None and not session.closed


class SessionPool:
    """factory(model_path, device) -> session (see the module docstring)."""

    def __init__(self, factory: Callable | None = None):
        self.factory = factory or inprocess_factory()
        self._entries: dict[tuple, _Entry] = {}

    def acquire(self, key, model_path, device: str):
        """The session of (key, model, device), made by the factory when there is none (or it died).
        The factory's errors (a model or device it refuses at once) propagate."""
        full = (key, None if model_path is None else str(model_path), device)
        entry = self._entries.get(full)
        if entry is None or not _usable(entry.session):
            if entry is not None:
                entry.session.close(wait=False)
            entry = self._entries[full] = _Entry(self.factory(model_path, device))
        entry.users += 1
        return entry.session

    def release(self, session) -> None:
        """One user less; the last one closes it. Unknown (already replaced) sessions are just closed."""
        for full, entry in list(self._entries.items()):
            if entry.session is session:
                entry.users -= 1
                if entry.users <= 0:
                    del self._entries[full]
                    session.close(wait=False)
                return
        session.close(wait=False)

    def discard(self, session) -> None:
        """Close a session now, whoever else uses it (a cancelled encoding); the next acquire makes a new one."""
        for full, entry in list(self._entries.items()):
            if entry.session is session:
                del self._entries[full]
        session.close(wait=False)

    def users(self, session) -> int:
        return next((e.users for e in self._entries.values() if e.session is session), 0)

    @property
    def sessions(self) -> list:
        return [entry.session for entry in self._entries.values()]

    def close_all(self) -> None:
        """Close every session (the application quits or the pool is dropped)."""
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            entry.session.close(wait=False)
