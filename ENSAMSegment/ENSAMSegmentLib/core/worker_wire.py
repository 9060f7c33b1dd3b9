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
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
from multiprocessing.connection import Connection

KEY_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0


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
