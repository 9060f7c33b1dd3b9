"""`WorkerSession`: the InferenceSession contract with the model in a child process. What Slicer uses.

Why a process: PythonQt in Slicer is built without thread support, so Slicer's main thread keeps the
GIL while it idles in the Qt event loop, and a Python thread in Slicer runs only when the main thread
happens to let go (in the ENSAM module: at its poll ticks). Measured with the real InferenceSession in a
simulation of that (a 96x160x160 image): box 9.8 s -> 14.9 s, second click 1.7 s -> 9.0 s. A child
process has its own interpreter: the model, the image and its embeddings live there (worker_main.py),
the prompts go in and only the changed block of each object's mask comes back (worker_wire.py).

    session = WorkerSession(model_path, device="auto")    # starts `python-real -m ...worker_main`, returns at once
    future = session.submit_image(array, spacing_zyx)     # validated here, exactly as in-process
    oid = session.create_object()
    future = session.submit_box(lo, hi, object_id=oid)
    session.poll()                                        # the GUI's timer: replies -> futures (never blocks long)
    update = future.result()                              # .changed, .block, .mask, .prompts as in-process
    session.close()                                       # never waits for a running request

The image does not pass through the calling thread (Slicer's GUI thread): `submit_image` validates it,
starts a helper thread that writes the voxels in their own dtype to a file in a private folder (in RAM
on Linux; worker_wire.py), and returns; the message naming the file is sent at the first poll after the
file is complete, and the requests submitted meanwhile wait behind it. Over the socket, a 512x512x300 CT
kept the calling thread 0.4 s (int16) to 0.6 s (float32) in `sendall`. The helper thread holds the GIL
only to start and to finish: the copy is one `write` call (in Slicer the GIL is free only at the poll
ticks). A newer image cancels one still being handed over, and the requests queued behind it; a file that
cannot be written (no room) fails the image with the reason, the requests behind it with NoImageError,
and leaves the worker's session as it was. The image folders are removed at close(), when the worker is
found dead, and by the worker whenever it exits (so also when Slicer dies with a file in them).
`image_transport="socket"` sends the array through the socket from the calling thread instead (the way
before; `ensam bench --worker` measures both).

The contract (session_contract.py) is InferenceSession's: the same validation and errors at submission
(this class runs the same checks of session_types.py), the same object ids and selection rules, the
same futures (a request the worker's session cancels arrives cancelled here), the same results. What
differs is where results come from: `poll()` reads them from the socket, and the synchronous methods
call it while they wait. Object masks are kept here as crops, patched with each reply's block.

When the worker dies (killed, out of memory, a crash in torch) every request in flight fails with
`WorkerCrashedError`, whose message names the exit (signal or code) and the last line of the worker's
log, and the session is closed: the front-end starts a new one (the image is encoded again) and writes
nothing (promptcontroller.py). A model or device that cannot be used fails every request with the
worker's `ModelLoadError` / `SessionError` instead, and so does a worker that ends before it is ready
(an interpreter without torch, say): `failure` says which. The worker ends with its parent: its reader exits the
process when the connection closes; `close()` kills it when it does not exit at once.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import worker_wire as wire
from .interpreter import child_environment, describe_exit, new_group_options, python_interpreter
from .session_masks import MaskCrop
from .session_types import (
    ImageReport, MAX_IMAGE_VOXELS, MAX_POOL_FACTOR, ModelLoadError, NoImageError, ObjectPrompts,
    SegmentationUpdate, SessionClosedError, SessionError, UnknownObjectError, VOXEL_BUDGET,
    WorkerCrashedError, check_box, check_image_request, check_voxel, default_global_budget,
)

WORKER_MODULE = "ENSAMSegmentLib.core.worker_main"
CLOSE_GRACE_S = 0.2  # close(): how long an idle worker may take to exit before it is killed
IMAGE_TRANSPORTS = ("file", "socket")  # submit_image: a private file written by a helper thread | the socket
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every open WorkerSession (killed at interpreter exit)


@dataclass(eq=False)
class _ObjectState:
    """The client's copy of one object: its prompts and mask after its last completed step."""

    prompts: ObjectPrompts = ObjectPrompts()
    crop: MaskCrop = MaskCrop()
    step: int = 0


@dataclass(eq=False)
class _Pending:
    kind: str
    future: concurrent.futures.Future
    state: _ObjectState | None = None
    object_id: int | None = None
    sent: float = field(default_factory=time.perf_counter)


class WorkerSession:
    """InferenceSession's contract, the model in a child process (see the module docstring).

    model_path: a model file (None: the default model). device: auto | cpu | cuda | mps. python: the
    interpreter (default: interpreter.python_interpreter(), python-real inside Slicer). image_transport:
    "file" (default) or "socket" (IMAGE_TRANSPORTS; an attribute, may be changed between images). options:
    the InferenceSession keyword options (voxel_budget, click_window, ...; JSON values), plus torch_threads.
    """

    def __init__(self, model_path=None, device: str = "auto", *, python: str | None = None,
                 env: dict | None = None, image_transport: str = "file", **options):
        self.model_path = None if model_path is None or str(model_path) in ("", ".") else str(model_path)
        if self.model_path is not None and not Path(self.model_path).is_file():  # said now, not in a few seconds
            from .modelfile import missing_model_message

            raise ModelLoadError(missing_model_message(self.model_path))
        if image_transport not in IMAGE_TRANSPORTS:
            raise ValueError(f"image_transport must be one of {IMAGE_TRANSPORTS}, got {image_transport!r}")
        self.image_transport = image_transport
        self.device = device
        self.options = dict(options)
        self.max_image_voxels = int(options.get("max_image_voxels", MAX_IMAGE_VOXELS))
        # until the worker is ready (it reports the model's own budget): the given budget, else the default
        self.voxel_budget = int(options.get("voxel_budget") or VOXEL_BUDGET)
        self.global_voxel_budget = default_global_budget(self.voxel_budget, options.get("global_voxel_budget"))
        self.max_pool_factor = int(options.get("max_pool_factor", MAX_POOL_FACTOR))
        self.device_name = ""  # known once the worker is ready
        self.model_info: dict | None = None
        self.malloc_tuned = False  # known once the worker is ready
        self.ready = False
        self.failure: Exception | None = None  # why the session ended (crash, model or device error)
        self.mode: str | None = None

        self._lock = threading.RLock()
        self._conn = None
        # messages not sent yet: the worker is not connected, or they wait behind a wire.ImageHandoff
        self._outbox: list = []
        self._pending: dict[int, _Pending] = {}
        self._next_request = 1
        self._objects: dict[int, _ObjectState] = {}
        self._next_id, self._selected = 1, None
        self._submitted: tuple | None = None  # (fingerprint, shape) of the newest image
        self._image_request: int | None = None  # the id of the newest image (or same-image) request
        self._closed = False

        self._key = wire.new_key()
        self._server = wire.listen()
        self._log_dir = Path(tempfile.mkdtemp(prefix="ensam-worker-"))
        self.log_path = self._log_dir / "worker.log"
        self.image_folders = wire.image_folders(self._log_dir)  # private (0700); removed at close and by the worker
        worker_options = {"model_path": self.model_path, "device": device, **self.options}
        argv = [python or python_interpreter(), "-m", WORKER_MODULE, "--port", str(self._server.getsockname()[1]),
                "--options", json.dumps(worker_options),
                "--image-folders", json.dumps([str(f) for f in self.image_folders])]
        try:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                                env=child_environment(env), **new_group_options())
        except OSError as error:  # no such interpreter
            self._server.close()
            wire.remove_folders(self.image_folders)
            shutil.rmtree(self._log_dir, ignore_errors=True)
            raise SessionError(f"cannot start the ENSAM worker process ({argv[0]}): {error}") from None
        for step in (lambda: self.process.stdin.write(self._key.hex().encode() + b"\n"), self.process.stdin.close):
            try:
                step()
            except OSError:  # it died at once: poll() reports how (exit code, last log line)
                pass
        _LIVE.add(self)

    # -- state ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._closed and self.process.poll() is None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy(self) -> bool:
        """Requests in flight."""
        return bool(self._pending)

    @property
    def object_ids(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._objects)

    @property
    def selected_object(self) -> int | None:
        return self._selected

    @property
    def image_shape(self) -> tuple | None:
        with self._lock:
            return None if self._submitted is None else self._submitted[1]

    def fileno(self) -> int | None:
        """The socket's descriptor once the worker is connected (for a socket notifier), else None."""
        return None if self._conn is None else self._conn.fileno()

    # -- objects (kept here exactly as InferenceSession keeps them) ------------------------------

    def create_object(self) -> int:
        with self._lock:
            self._check_open()
            oid, self._next_id = self._next_id, self._next_id + 1
            self._objects[oid] = _ObjectState()
            self._selected = oid
            self._send({"op": "create", "object": oid})
            return oid

    def select_object(self, object_id: int) -> None:
        with self._lock:
            self._selected = self._object_id(object_id)

    def remove_object(self, object_id: int) -> None:
        with self._lock:
            oid = self._object_id(object_id)
            del self._objects[oid]
            if self._selected == oid:
                self._selected = max(self._objects, default=None)
            self._send({"op": "remove", "object": oid})

    def object_prompts(self, object_id: int | None = None) -> ObjectPrompts:
        with self._lock:
            return self._objects[self._object_id(object_id)].prompts

    def object_mask(self, object_id: int | None = None) -> np.ndarray:
        with self._lock:
            if self._submitted is None:
                raise NoImageError("no image: call set_image() first")
            return self._objects[self._object_id(object_id)].crop.full(self._submitted[1])

    def _object_id(self, object_id) -> int:
        if object_id is None:
            if self._selected is None:
                raise UnknownObjectError("no object selected: call create_object() first")
            object_id = self._selected
        if not isinstance(object_id, (int, np.integer)) or int(object_id) not in self._objects:
            raise UnknownObjectError(f"no object with id {object_id!r} (objects: {list(self._objects)})")
        return int(object_id)

    # -- requests -------------------------------------------------------------------------------

    def submit_image(self, array_zyx, spacing_zyx=(1.0, 1.0, 1.0), modality: str = "auto",
                     ct_window=None, identity=None) -> concurrent.futures.Future:
        """As InferenceSession.submit_image (do not modify the array until the future is done); a different
        image goes to the worker (handed over by a helper thread: the module docstring), the same image again
        only as a note (no transfer, no encoding, objects kept). SessionError, before anything changes, when
        no image folder has room for it."""
        self._check_open()
        array, spacing, modality, ct_window, fingerprint = check_image_request(
            self, array_zyx, spacing_zyx, modality, ct_window, identity)
        with self._lock:
            self._check_open()
            if self._submitted is not None and self._submitted[0] == fingerprint:
                return self._request("same_image", {})
            folder = None
            if self.image_transport == "file":
                folder = wire.folder_for(self.image_folders, array.nbytes)
                if folder is None:
                    raise SessionError(f"no room for the image ({array.nbytes / 2**20:,.0f} MB) in "
                                       f"{' or '.join(map(str, self.image_folders))} to pass it to the worker process")
            self._cancel_handoff()
            self._objects.clear()
            self._next_id, self._selected = 1, None
            self._submitted = (fingerprint, tuple(array.shape))
            fields = {"spacing": spacing, "modality": modality, "ct_window": ct_window, "identity": identity}
            if folder is None:
                return self._request("image", {"array": np.ascontiguousarray(array), **fields})
            return self._request("image", {"shape": tuple(array.shape), "dtype": array.dtype.str, **fields},
                                 image=(array, folder))

    def submit_box(self, kji_min, kji_max, object_id: int | None = None) -> concurrent.futures.Future:
        with self._lock:
            lo, hi = check_box(kji_min, kji_max, self._submitted_shape())
            oid = self._object_id(object_id)
            return self._request("box", {"lo": lo, "hi": hi}, oid)

    def submit_click(self, kji, foreground: bool = True, object_id: int | None = None) -> concurrent.futures.Future:
        with self._lock:
            point = check_voxel(kji, self._submitted_shape(), "click")
            oid = self._object_id(object_id)
            return self._request("click", {"point": point, "foreground": bool(foreground)}, oid)

    def submit_undo(self, object_id: int | None = None) -> concurrent.futures.Future:
        with self._lock:
            self._submitted_shape()
            return self._request("undo", {}, self._object_id(object_id))

    def submit_reset(self, object_id: int | None = None) -> concurrent.futures.Future:
        with self._lock:
            self._submitted_shape()
            return self._request("reset", {}, self._object_id(object_id))

    def submit_merged_labels(self) -> concurrent.futures.Future:
        with self._lock:
            self._submitted_shape()
            return self._request("labels", {})

    # the synchronous forms (scripts, tests, the benchmark): poll until the reply is there

    def set_image(self, array_zyx, spacing_zyx=(1.0, 1.0, 1.0), modality: str = "auto", ct_window=None,
                  identity=None) -> ImageReport:
        return self.wait(self.submit_image(array_zyx, spacing_zyx, modality, ct_window, identity))

    def add_box(self, kji_min, kji_max, object_id: int | None = None) -> SegmentationUpdate:
        return self.wait(self.submit_box(kji_min, kji_max, object_id))

    def add_click(self, kji, foreground: bool = True, object_id: int | None = None) -> SegmentationUpdate:
        return self.wait(self.submit_click(kji, foreground, object_id))

    def undo(self, object_id: int | None = None) -> SegmentationUpdate:
        return self.wait(self.submit_undo(object_id))

    def reset(self, object_id: int | None = None) -> SegmentationUpdate:
        return self.wait(self.submit_reset(object_id))

    def merged_labels(self) -> np.ndarray:
        return self.wait(self.submit_merged_labels())

    def wait(self, future: concurrent.futures.Future, timeout: float | None = None):
        """Poll until `future` is done; its result (or exception). TimeoutError after `timeout` s."""
        end = None if timeout is None else time.monotonic() + timeout
        while not future.done():
            self.poll(0.05)
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"no reply from the ENSAM worker after {timeout} s")
        return future.result()

    def _submitted_shape(self) -> tuple:
        self._check_open()
        if self._submitted is None:
            raise NoImageError("no image: call set_image() first")
        return self._submitted[1]

    def _request(self, kind: str, fields: dict, object_id: int | None = None,
                 image: tuple | None = None) -> concurrent.futures.Future:
        """image: (array, folder): the message waits in the outbox while a helper thread writes the file."""
        request_id, self._next_request = self._next_request, self._next_request + 1
        pending = _Pending(kind, concurrent.futures.Future(),
                           None if object_id is None else self._objects[object_id], object_id)
        self._pending[request_id] = pending
        if kind in ("image", "same_image"):
            self._image_request = request_id
        message = {"op": kind, "id": request_id, **fields}
        if object_id is not None:
            message["object"] = object_id
        if image is None:
            self._send(message)
        else:
            array, folder = image
            path = str(Path(folder) / f"image-{request_id}.raw")
            self._outbox.append(wire.ImageHandoff({**message, "file": path}, array))
        return pending.future

    # -- images on their way (wire.ImageHandoff) ---------------------------------------------------------

    def _handoff(self) -> wire.ImageHandoff | None:
        """The image being handed over (at most one: a newer image cancels it), if any."""
        return next((item for item in self._outbox if isinstance(item, wire.ImageHandoff)), None)

    def _cancel_handoff(self) -> None:
        """A newer image: the one still on its way is cancelled with everything queued behind it, which all
        concerns it (what the worker's session does with the requests queued before a new image)."""
        handoff = self._handoff()
        if handoff is not None:
            self._drop_from(self._outbox.index(handoff), lambda pending: pending.future.cancel())

    def _check_handoff(self) -> None:
        """An image whose file could not be written fails with the reason; what was queued behind it fails
        with NoImageError (object creations behind it are dropped: the next image clears them on both sides).
        The worker never heard of it and keeps its previous image; no prompt reaches it until the next one."""
        handoff = self._handoff()
        if handoff is None or not handoff.done.is_set() or handoff.error is None:
            return
        error = SessionError(f"the image could not be passed to the ENSAM worker process: {handoff.error}")
        behind = NoImageError(f"no image: {error}")
        self._submitted = None  # the newest image (an older one would have been cancelled): none now
        self._drop_from(self._outbox.index(handoff),
                        lambda pending: pending.future.set_exception(error if pending.kind == "image" else behind))

    def _drop_from(self, index: int, finish) -> None:
        """Take the outbox's items from `index` on out, unsent; finish(pending) for each of their requests."""
        dropped, self._outbox[index:] = self._outbox[index:], []
        for item in dropped:
            message = item
            if isinstance(item, wire.ImageHandoff):
                item.abandon()
                message = item.message
            pending = self._pending.pop(message.get("id"), None)
            if pending is not None and not pending.future.done():
                finish(pending)

    def _drop_images(self) -> None:
        """The session ends: no image goes any more, none stays behind."""
        for item in self._outbox:
            if isinstance(item, wire.ImageHandoff):
                item.abandon(final=True)
        self._outbox.clear()
        wire.remove_folders(self.image_folders)

    # -- the wire -------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> None:
        """Deliver the replies that arrived (waiting up to `timeout` s for the first); detect a dead worker.
        The GUI calls this from a timer while requests are in flight."""
        with self._lock:
            if self._closed:
                return
            handoff = self._handoff()
            if handoff is not None and timeout and not handoff.done.is_set():
                handoff.done.wait(timeout)  # a waiting caller: the file first, then the replies (next call)
                timeout = 0.0
            self._check_handoff()
            if self._conn is None and not self._connect():
                if self.process.poll() is not None:
                    self._ended()
                elif timeout:
                    time.sleep(min(timeout, 0.01))
                return
            self._flush()
            try:
                while self._conn is not None and self._conn.poll(timeout):
                    self._handle(wire.recv(self._conn))
                    timeout = 0.0
            except (EOFError, OSError):
                self._ended()

    def _connect(self) -> bool:
        conn = wire.accept(self._server, self._key)
        if conn is None:
            return False
        self._conn = conn
        self._server.close()
        self._flush()
        return self._conn is not None

    def _send(self, message) -> None:
        self._outbox.append(message)
        self._flush()

    def _flush(self) -> None:
        """Send what waits in the outbox, in order, up to an image whose file is not complete yet."""
        while self._outbox and self._conn is not None:
            item = self._outbox[0]
            if isinstance(item, wire.ImageHandoff):
                if not item.done.is_set():
                    return
                if item.error is not None:
                    self._check_handoff()
                    continue
                item = item.message
            del self._outbox[0]
            try:
                wire.send(self._conn, item)
            except OSError:
                self._ended()
                return

    def _handle(self, message: dict) -> None:
        op = message["op"]
        if op == "ready":
            self.ready, self.device_name, self.model_info = True, message["device_name"], message["model"]
            self.malloc_tuned = bool(message.get("malloc_tuned"))  # devices.keep_freed_memory in the worker
            # the worker's session knows the model's own budget (InferenceSession: voxel_budget None)
            self.voxel_budget = int(message.get("voxel_budget") or self.voxel_budget)
            self.global_voxel_budget = int(message.get("global_voxel_budget") or self.global_voxel_budget)
            return
        if op == "fatal":
            self.failure = wire.decode_error(message["error"])
            return
        pending = self._pending.pop(message["id"], None)
        if pending is None or pending.future.done():
            return
        if op == "cancelled":
            pending.future.cancel()
        elif op == "error":
            if message["id"] == self._image_request:
                # the newest image failed to encode (or the worker has lost it): it is not the worker's image,
                # so the same image again must be sent and encoded, not taken for the one already there
                self._submitted = None
            pending.future.set_exception(wire.decode_error(message["error"]))
        else:
            pending.future.set_result(self._result(pending, message["result"]))

    def _result(self, pending: _Pending, result):
        if pending.kind in ("image", "same_image"):
            self.mode = result.mode
            return result
        if pending.kind == "labels":
            return result
        state = pending.state
        crop = state.crop.patched(result["changed"], result["block"])
        if self._objects.get(pending.object_id) is state:  # not removed, not from a previous image
            state.crop, state.prompts, state.step = crop, result["prompts"], result["step"]
        return SegmentationUpdate(pending.object_id, result["changed"], result["block"], result["logits_region"],
                                  result["seconds"], result["timings"], result["step"], result["decoding"],
                                  result["window_growth"], result["prompts"], self._submitted[1], crop)

    def _ended(self) -> None:
        """The worker is gone (or unusable): fail what is in flight, close everything."""
        if self._closed:
            return
        returncode = self.process.poll()
        if returncode is None:  # the connection broke but the process lives: end it
            self._kill()
            returncode = self.process.poll()
        if self.failure is None and not self.ready:  # it never got as far as loading the model: not a crash
            self.failure = SessionError(f"the ENSAM worker process could not start: {self._describe_crash(returncode)}")
        elif self.failure is None:
            self.failure = WorkerCrashedError(self._describe_crash(returncode))
        self._close_wire()
        self._drop_images()
        self._closed = True
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(self.failure)
        self._pending.clear()
        _LIVE.discard(self)

    def _describe_crash(self, returncode) -> str:
        text = f"the ENSAM worker process (PID {self.process.pid}) {describe_exit(returncode)}"
        last = last_line(self.log_path)
        return text + (f"; its last words: {last}" if last else "") + f" (log: {self.log_path})"

    # -- the end --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            if self.failure is not None:
                raise SessionClosedError(f"the session ended: {self.failure}")
            raise SessionClosedError("the session is closed")

    def close(self, wait: bool = True) -> None:
        """Cancel what is in flight and end the worker: an idle one may exit by itself within
        CLOSE_GRACE_S, a busy one is killed at once. Never waits for a running request. Idempotent."""
        with self._lock:
            if self._closed:
                return
            busy = bool(self._pending)
            for pending in self._pending.values():
                pending.future.cancel()
            self._pending.clear()
            if self._conn is not None and not busy:
                try:
                    wire.send(self._conn, {"op": "close"})
                except OSError:
                    pass
            self._close_wire()
            self._drop_images()
            self._closed = True
            _LIVE.discard(self)
        try:
            self.process.wait(0 if busy or not wait else CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        self._kill()
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def _close_wire(self) -> None:
        for closable in (self._conn, self._server):
            if closable is not None:
                try:
                    closable.close()
                except OSError:
                    pass
        self._conn = None

    def _kill(self) -> None:
        """Kill the worker and everything in its process group (it has its own), then reap it."""
        if self.process.poll() is None:
            try:
                if os.name == "nt":
                    self.process.kill()
                else:
                    os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> WorkerSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def last_line(path: Path) -> str:
    """The last non-empty line of a log file ("" when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def close_all() -> None:
    """Close every open WorkerSession of this process (the application quits)."""
    for session in list(_LIVE):
        session.close(wait=False)


atexit.register(close_all)
