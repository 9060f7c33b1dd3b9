"""The wire between the Slicer process and the inference worker: one local socket, framed messages.

Why a socket: the worker is an ordinary child process (`python-real -m ENSAMSegmentLib.core.worker_main`,
interpreter.py), not a multiprocessing child, so that nothing depends on how Slicer embeds Python; a
loopback TCP socket is the one transport that the GUI side can accept without blocking (a non-blocking
listening socket, polled from a Qt timer), that works the same on Linux, macOS and Windows, and whose
descriptor a QSocketNotifier can watch.

Handshake: the parent listens on 127.0.0.1 (a port of the system's choice), starts the child and writes a
random 32-byte key to the child's stdin; the child connects; the parent sends a random nonce and accepts
the connection only if the child answers HMAC-SHA256(key, nonce). Only then is anything unpickled.

Messages: any picklable object, sent as a header frame (pickle protocol 5 with out-of-band buffers: the
sizes of the buffers and the pickle) and one frame per buffer, so that a large image or mask goes out as
its own memory and arrives in a writable bytearray of the right size (no copy in pickle, read-only arrays
never reach numpy code that writes). Frames are multiprocessing.connection's (length-prefixed).

Images do not go through the socket (worker.py `submit_image`): sending a 512x512x300 CT (300 MB as
float32) that way kept the calling thread, Slicer's GUI thread, in `sendall` for 0.6 s, as long as the
worker took to read it. Instead a helper thread of the client writes the voxels, in their own dtype, to a
file in a private folder (`image_folders`: mode 0700, made with mkdtemp; on Linux in /dev/shm, so in RAM)
with one `write` call that releases the GIL for the whole copy, and only the message naming the file
(path, shape, dtype) goes over the socket. The worker reads the file into its own memory and deletes it
(`read_image`: only files in the folders it was given, of exactly the announced size). Another local user
can neither read the folder nor put a file in it; what the worker reads is named by a message on the
authenticated connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import shutil
import socket
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

KEY_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0
SHARED_MEMORY_ROOT = "/dev/shm"  # Linux: a tmpfs (RAM) every process may make a private folder in
IMAGE_SPARE_BYTES = 16 << 20  # a folder is used for an image only with this much room left beside it
_OPEN_FLAGS = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _answer(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, nonce, hashlib.sha256).digest()


def listen() -> socket.socket:
    """A non-blocking listening socket on 127.0.0.1 (port chosen by the system)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=1)
    server.setblocking(False)
    return server


def accept(server: socket.socket, key: bytes) -> Connection | None:
    """The authenticated connection of a waiting child, or None when none is waiting yet (never blocks
    longer than the handshake). A peer that fails the handshake is dropped."""
    try:
        sock, _ = server.accept()
    except (BlockingIOError, InterruptedError):
        return None
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        nonce = os.urandom(KEY_BYTES)
        sock.sendall(nonce)
        answer = _recv_exactly(sock, 32)
        if not hmac.compare_digest(answer, _answer(key, nonce)):
            raise ConnectionError("worker handshake failed")
        sock.setblocking(True)
        return Connection(sock.detach())
    except OSError:
        sock.close()
        return None


def connect(port: int, key: bytes, host: str = "127.0.0.1") -> Connection:
    """The child's side of the handshake."""
    sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
    nonce = _recv_exactly(sock, KEY_BYTES)
    sock.sendall(_answer(key, nonce))
    sock.setblocking(True)
    return Connection(sock.detach())


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed during the handshake")
        data += chunk
    return data


def send(conn: Connection, message) -> None:
    """Send one message (the caller serialises concurrent senders)."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    conn.send_bytes(pickle.dumps(([r.nbytes for r in raws], header), protocol=5))
    for raw in raws:
        conn.send_bytes(raw)


def recv(conn: Connection):
    """Receive one message (blocks until it is complete). EOFError / OSError: the peer is gone."""
    sizes, header = pickle.loads(conn.recv_bytes())
    buffers = []
    for size in sizes:
        buffer = bytearray(size)
        if size:
            conn.recv_bytes_into(buffer)
        else:
            conn.recv_bytes()
        buffers.append(buffer)
    return pickle.loads(header, buffers=buffers)


# -- images: a file in a private folder, not the socket (the module docstring) ------------------------

def image_folders(private_dir) -> list[Path]:
    """The folders an image may be handed over in, best first: a private folder (mode 0700) made in shared
    memory (/dev/shm, where there is one) and `private_dir`/images (`private_dir`: a private folder of the
    session's, e.g. from mkdtemp). The caller removes them (`remove_folders`)."""
    folders = []
    if os.path.isdir(SHARED_MEMORY_ROOT):
        try:
            folders.append(Path(tempfile.mkdtemp(prefix="ensam-image-", dir=SHARED_MEMORY_ROOT)))
        except OSError:  # not writable here (a read-only or full /dev/shm): the other folder
            pass
    fallback = Path(private_dir) / "images"
    fallback.mkdir(mode=0o700, exist_ok=True)
    folders.append(fallback)
    return folders


def folder_for(folders, nbytes: int) -> Path | None:
    """The first of `folders` with room for `nbytes` (and IMAGE_SPARE_BYTES beside), else None. A container's
    /dev/shm often holds 64 MB only: the next folder then."""
    for folder in folders:
        try:
            if shutil.disk_usage(folder).free >= nbytes + IMAGE_SPARE_BYTES:
                return Path(folder)
        except OSError:
            continue
    return None


def remove_folders(folders) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def remove_file(path) -> None:
    try:
        os.remove(path)
    except OSError:  # gone already (the worker read it, its folder was removed)
        pass


def write_image(path, array: np.ndarray) -> None:
    """Write `array`'s bytes (C order, its own dtype) to a new file `path` (mode 0600; an existing file or a
    link there is an error). One `os.write` call for a C-contiguous array: the GIL is released for the whole
    copy (a non-contiguous array is made contiguous first, also without the GIL)."""
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def read_image(path, shape, dtype, folders) -> np.ndarray:
    """The array `write_image` wrote to `path` (a writable array of `shape` and `dtype`), and the file
    deleted, whether it could be read or not. ValueError for a file outside `folders` (nothing is read or
    deleted then) or not of exactly the announced size; OSError when it cannot be read."""
    path = Path(path)
    if path.parent not in {Path(f) for f in folders}:
        raise ValueError(f"{path} is not in the session's image folders")
    try:
        array = np.empty(tuple(int(n) for n in shape), np.dtype(dtype))
        with open(os.open(path, os.O_RDONLY | _OPEN_FLAGS), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != array.nbytes:
                raise ValueError(f"{path.name} holds {size:,} bytes, not the {array.nbytes:,} of a {dtype} "
                                 f"array of shape {tuple(shape)}")
            view, got = memoryview(array.reshape(-1).view(np.uint8)), 0
            while got < array.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path.name} ended after {got:,} of {array.nbytes:,} bytes")
                got += n
        return array
    finally:
        remove_file(path)


class ImageHandoff:
    """An image on its way to the worker (worker.py submit_image; the module docstring): a helper thread
    writes its voxels to message["file"]; the message goes once `done` is set without `error`. `abandon` (a
    newer image, close, the worker gone): the file is removed as soon as it is written, or at once if it is."""

    def __init__(self, message: dict, array: np.ndarray):
        self.message, self.path = message, message["file"]
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = self._final = False
        self.thread = threading.Thread(target=self._write, args=(array,), name="ENSAM-image-handoff", daemon=True)
        self.thread.start()

    def _write(self, array: np.ndarray) -> None:
        try:
            write_image(self.path, array)
        except BaseException as error:  # no room after all, no memory for a contiguous copy, folder removed
            self.error = error.with_traceback(None)
        del array
        with self._lock:
            self.done.set()
            abandoned, final = self._abandoned, self._final
        if abandoned or self.error is not None:
            self._remove(final)

    def abandon(self, final: bool = False) -> None:
        """final: the session is closing: the file's folder goes too (if empty)."""
        with self._lock:
            self._abandoned, self._final = True, self._final or final
            written = self.done.is_set()
        if written:
            self._remove(final)

    def _remove(self, final: bool) -> None:
        remove_file(self.path)
        if final:
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError:  # removed already, or a file of another image still in it
                pass


def encode_error(error: BaseException) -> tuple[str, str]:
    """(class name, message) of an exception, for the other side to rebuild (`decode_error`)."""
    return type(error).__name__, str(error)


def decode_error(encoded: tuple[str, str]) -> Exception:
    """The session's own error classes come back as themselves; anything else as a SessionError naming it."""
    from . import session_types

    name, message = encoded
    cls = getattr(session_types, name, None)
    if isinstance(cls, type) and issubclass(cls, session_types.SessionError):
        return cls(message)
    return session_types.SessionError(f"{name}: {message}" if message else name)
