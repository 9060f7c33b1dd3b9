"""How an image reaches the worker process (core/worker.py, worker_wire.py): not through the calling
thread. A helper thread writes the voxels to a file in a private folder and the message naming it goes
once the file is whole; the worker reads it and deletes it. Real child processes throughout: the real
worker with a small model, or the real worker_main with an echo session in place of InferenceSession
(a sitecustomize.py on the child's PYTHONPATH; no torch), which returns what arrived (dtype, shape,
digest of the bytes). Nothing here is timed: the checks are structural (what was sent from the calling
thread, in which order, which files exist when)."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import queue
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from ENSAMSegmentLib.core import worker_wire as wire
from ENSAMSegmentLib.core.interpreter import child_environment
from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
from ENSAMSegmentLib.core.network import ENSAMConfig
from ENSAMSegmentLib.core.session_types import NoImageError, SessionError, WorkerCrashedError
from ENSAMSegmentLib.core.worker import WorkerSession
from process_checks import gone

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)

ECHO = '''
"""Test stand-in (test_worker_image.py): the worker's session echoes the image it got; ECHO_READ says what
happens to an image file before the worker reads it (hold: wait forever; truncate: one byte less);
ECHO_ENCODE=fail-once: the first image fails to encode, as an out-of-memory error would."""
import concurrent.futures, hashlib, os, sys, time, types

import numpy as np


class EchoSession:
    device_name, voxel_budget, global_voxel_budget, object_ids = "echo", 4096, 4096, ()
    model_info = types.SimpleNamespace(path=None, training_data="echo", parameters=1, created="", untrained=True)

    def __init__(self, **options):
        self.last, self.failed = None, False

    def submit_image(self, array, spacing, modality, ct_window, identity=None):
        self.last = None
        if os.environ.get("ECHO_ENCODE") == "fail-once" and not self.failed:
            self.failed = True
            return self._failed(RuntimeError("out of memory (echo)"))
        data = np.ascontiguousarray(array)
        self.last = types.SimpleNamespace(
            mode="whole", encoded=True, seconds=0.0, timings={}, dtype=array.dtype.str, shape=array.shape,
            writeable=array.flags.writeable, digest=hashlib.blake2b(data.view(np.uint8)).hexdigest())
        return self._done(self.last)

    def submit_same_image(self):
        if self.last is None:  # as the real session: NoImageError after a failed encode
            return self._failed(RuntimeError("no image: the last image failed to encode"))
        return self._done(self.last)

    @staticmethod
    def _failed(error):
        future = concurrent.futures.Future()
        future.set_exception(error)
        return future

    def create_object(self):
        return 1

    @staticmethod
    def _done(result):
        future = concurrent.futures.Future()
        future.set_result(result)
        return future


session = types.ModuleType("ENSAMSegmentLib.core.session")
session.InferenceSession = EchoSession
devices = types.ModuleType("ENSAMSegmentLib.core.devices")
devices.keep_freed_memory = lambda: False
sys.modules.update({session.__name__: session, devices.__name__: devices})

from ENSAMSegmentLib.core import worker_wire  # noqa: E402

_read = worker_wire.read_image


def read_image(path, shape, dtype, folders):
    how = os.environ.get("ECHO_READ")
    if how == "hold":
        time.sleep(600)
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) - 1)
    return _read(path, shape, dtype, folders)


worker_wire.read_image = read_image
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return create_untrained_model_file(tmp_path_factory.mktemp("model") / "small.pt", seed=0, config=ENSAMConfig(**SMALL))


@pytest.fixture(scope="module")
def echo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("echo")
    (folder / "sitecustomize.py").write_text(ECHO)
    return folder


def echo_env(echo_dir, read: str = "", encode: str = "") -> dict:
    """The worker's environment: the echo's sitecustomize on PYTHONPATH (WorkerSession puts the package
    folders before it)."""
    env = child_environment(folders=[str(echo_dir)])
    env["ECHO_READ"], env["ECHO_ENCODE"] = read, encode
    return env


def echo_session(echo_dir, read: str = "", encode: str = "", **options) -> WorkerSession:
    session = WorkerSession(None, "cpu", env=echo_env(echo_dir, read, encode), **options)
    while not session.ready:
        session.poll(0.05)
        assert not session.closed, session.failure
    return session


def digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


def files_in(session) -> list:
    return sorted(p.name for f in session.image_folders if f.exists() for p in f.iterdir())


@pytest.fixture
def held_writes(monkeypatch):
    """The helper thread's write waits for `release` (after `writing` says it started); `written` files."""
    state = type("Held", (), {})()
    state.writing, state.release, state.written = threading.Event(), threading.Event(), []
    write = wire.write_image

    def held(path, array):
        state.writing.set()
        assert state.release.wait(60)
        write(path, array)
        state.written.append(path)

    monkeypatch.setattr(wire, "write_image", held)
    return state


@pytest.fixture
def sent(monkeypatch):
    """(op, bytes on the wire) of every message the client sends (all from the calling thread)."""
    log = []
    send = wire.send

    def spy(conn, message):
        buffers = []
        header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
        log.append((message.get("op"), len(header) + sum(b.raw().nbytes for b in buffers), threading.get_ident()))
        send(conn, message)

    monkeypatch.setattr(wire, "send", spy)
    return log


def test_submit_image_returns_before_the_voxels_leave_and_sends_only_their_name(model_file, held_writes, sent):
    """The real worker: submit_image returns while the helper thread has not even written the file; a box
    submitted meanwhile waits behind the image; what the calling thread sends for the image is its name."""
    session = WorkerSession(model_file, "cpu", torch_threads=1, voxel_budget=32768)
    try:
        while not session.ready:
            session.poll(0.05)
        image = np.random.default_rng(0).integers(-1000, 2000, (64, 96, 96), dtype=np.int16)
        before = len(sent)
        future = session.submit_image(image, (2.0, 1.0, 1.0), identity=("volume", 1))
        assert held_writes.writing.wait(10)  # the helper thread has the voxels; submit_image has returned
        oid = session.create_object()
        box = session.submit_box((10, 20, 20), (40, 70, 70), oid)
        for _ in range(5):
            session.poll(0.02)
        assert not future.done() and not box.done() and sent[before:] == []  # nothing overtakes the image
        assert files_in(session) == []
        held_writes.release.set()
        report = session.wait(future, timeout=60)
        assert report.encoded and report.shape == image.shape
        assert session.wait(box, timeout=60).step == 1
        ops = [op for op, _, _ in sent[before:]]
        assert ops == ["image", "create", "box"]
        image_bytes = next(n for op, n, _ in sent[before:] if op == "image")
        assert image_bytes < 2048 < image.nbytes  # the name of the file, not the voxels
        assert {t for _, _, t in sent} == {threading.get_ident()}  # the helper thread sent nothing
        assert files_in(session) == []  # the worker deleted the file once read
        folders = session.image_folders
        assert folders and all(f.is_dir() for f in folders)
        if os.name == "posix":
            assert all(stat.S_IMODE(f.stat().st_mode) == 0o700 for f in folders)
            assert all(f.stat().st_uid == os.getuid() for f in folders)
    finally:
        session.close()
    assert not any(f.exists() for f in folders)


@pytest.mark.parametrize("transport", ["file", "socket"])
def test_images_arrive_bit_exact_in_their_own_dtype(echo_dir, transport):
    rng = np.random.default_rng(1)
    images = [rng.integers(-32768, 32767, (7, 9, 11), dtype=np.int16),  # CT as Slicer gives it
              rng.integers(0, 255, (5, 6, 7), dtype=np.uint8),
              rng.normal(0, 1000, (6, 7, 8)).astype(np.float32),
              rng.normal(0, 1, (3, 4, 5)),  # float64
              rng.integers(-500, 500, (4, 5, 6)).astype(">i2"),  # big-endian (a raw file read as is)
              rng.normal(0, 1, (8, 6, 4)).astype(np.float32).transpose(2, 1, 0)]  # not contiguous
    with echo_session(echo_dir, image_transport=transport) as session:
        for i, image in enumerate(images):
            got = session.wait(session.submit_image(image, identity=("image", i)), timeout=30)
            assert (got.dtype, got.shape, got.digest) == (image.dtype.str, image.shape, digest(image))
            assert got.writeable  # in the worker's own memory, as the socket's bytearray was
            assert files_in(session) == []


def test_a_newer_image_cancels_one_still_being_written_and_what_waits_behind_it(echo_dir, held_writes):
    with echo_session(echo_dir) as session:
        first_image, second_image = np.zeros((4, 5, 6), np.int16), np.ones((4, 5, 6), np.int16)
        first = session.submit_image(first_image, identity=("image", 1))
        box = session.submit_box((0, 0, 0), (1, 1, 1), session.create_object())
        assert held_writes.writing.wait(10)
        second = session.submit_image(second_image, identity=("image", 2))
        assert first.cancelled() and box.cancelled() and session.object_ids == ()
        held_writes.release.set()
        assert session.wait(second, timeout=30).digest == digest(second_image)
        for thread in [t for t in threading.enumerate() if t.name == "ENSAM-image-handoff"]:
            thread.join(10)
        assert len(held_writes.written) == 2 and files_in(session) == []  # the cancelled one's file went too


def test_a_file_that_cannot_be_written_fails_the_image_clearly_and_the_session_goes_on(echo_dir, monkeypatch):
    write = wire.write_image
    queued = threading.Event()  # the write fails only once the box waits behind the image

    def full(path, array):
        queued.wait(30)
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with echo_session(echo_dir) as session:
        kept = session.wait(session.submit_image(np.zeros((4, 5, 6), np.int16), identity=("image", 1)), 30)
        monkeypatch.setattr(wire, "write_image", full)
        future = session.submit_image(np.ones((4, 5, 6), np.int16), identity=("image", 2))
        oid = session.create_object()
        box = session.submit_box((0, 0, 0), (1, 1, 1), oid)
        queued.set()
        with pytest.raises(SessionError, match="could not be passed to the ENSAM worker process.*No space left"):
            session.wait(future, timeout=30)
        with pytest.raises(NoImageError, match="No space left"):
            box.result(0)
        assert not session.closed and session.image_shape is None and files_in(session) == []
        with pytest.raises(NoImageError):
            session.submit_box((0, 0, 0), (1, 1, 1), oid)  # nothing reaches the worker's previous image
        monkeypatch.setattr(wire, "write_image", write)
        again = session.wait(session.submit_image(np.ones((4, 5, 6), np.int16), identity=("image", 2)), 30)
        assert again.digest == digest(np.ones((4, 5, 6), np.int16)) != kept.digest  # sent again, not "the same"


def test_no_room_for_the_image_is_said_at_submission_and_changes_nothing(echo_dir, monkeypatch):
    with echo_session(echo_dir) as session:
        session.wait(session.submit_image(np.zeros((4, 5, 6), np.int16), identity=("image", 1)), 30)
        oid = session.create_object()
        monkeypatch.setattr(wire, "folder_for", lambda folders, nbytes: None)
        with pytest.raises(SessionError, match="no room for the image"):
            session.submit_image(np.ones((4, 5, 6), np.int16), identity=("image", 2))
        assert session.object_ids == (oid,) and session.image_shape == (4, 5, 6) and not session.busy


def test_room_is_looked_for_folder_by_folder(tmp_path):
    assert wire.folder_for([tmp_path / "missing", tmp_path], 1000) == tmp_path
    assert wire.folder_for([tmp_path], 1 << 62) is None


def test_the_worker_reads_only_its_own_folders(tmp_path):
    outside = tmp_path / "image.raw"
    wire.write_image(outside, np.arange(6, dtype=np.int16).reshape(1, 2, 3))
    with pytest.raises(ValueError, match="not in the session's image folders"):
        wire.read_image(outside, (1, 2, 3), "<i2", [tmp_path / "images"])
    assert outside.exists()  # nothing read, nothing deleted
    with pytest.raises(FileExistsError):  # never written over (or through a link)
        wire.write_image(outside, np.zeros(3))
    np.testing.assert_array_equal(wire.read_image(outside, (1, 2, 3), "<i2", [tmp_path]),
                                  np.arange(6, dtype=np.int16).reshape(1, 2, 3))
    assert not outside.exists()


def test_a_file_the_worker_cannot_read_fails_the_image_and_ends_the_worker_clearly(echo_dir):
    session = echo_session(echo_dir, read="truncate")
    try:
        future = session.submit_image(np.zeros((4, 5, 6), np.int16))
        with pytest.raises(SessionError, match="did not reach the ENSAM worker process: .*holds 239 bytes, not the 240"):
            session.wait(future, timeout=30)
        while not session.closed:
            session.poll(0.05)
        assert isinstance(session.failure, WorkerCrashedError)
        assert "exited with code 3" in str(session.failure) and "did not reach" in str(session.failure)
        assert not any(f.exists() for f in session.image_folders)
    finally:
        session.close()


def test_an_image_that_failed_to_encode_is_sent_again_not_taken_as_the_same_image(echo_dir):
    """The worker's encode fails (out of memory, say): the same image submitted again is sent and encoded
    (before the fix it went as "the same image" and failed with "no image"); prompts in between are refused."""
    session = echo_session(echo_dir, encode="fail-once")
    try:
        image = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
        with pytest.raises(Exception, match="out of memory"):
            session.set_image(image)
        assert session.image_shape is None
        with pytest.raises(NoImageError):
            session.submit_box((0, 0, 0), (1, 1, 1))
        report = session.set_image(image)
        assert report.encoded and report.digest == digest(image)
        assert session.set_image(image).digest == report.digest  # now truly the same image: a note only
    finally:
        session.close()


def test_no_image_file_outlives_a_worker_killed_mid_transfer(echo_dir, held_writes):
    # killed while the file was being written here: the write ends into a removed folder
    session = echo_session(echo_dir)
    try:
        future = session.submit_image(np.zeros((16, 16, 16), np.float32))
        assert held_writes.writing.wait(10)
        os.kill(session.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            session.wait(future, timeout=30)
        held_writes.release.set()
        for thread in [t for t in threading.enumerate() if t.name == "ENSAM-image-handoff"]:
            thread.join(10)
        assert not any(f.exists() for f in session.image_folders)
    finally:
        session.close()

    # killed while it was reading the file (its message sent, the file there)
    session = echo_session(echo_dir, read="hold")
    try:
        future = session.submit_image(np.zeros((16, 16, 16), np.float32))
        while session._outbox:
            session.poll(0.01)
        assert len(files_in(session)) == 1 and not future.done()
        os.kill(session.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            session.wait(future, timeout=30)
        assert not any(f.exists() for f in session.image_folders)
    finally:
        session.close()


def test_the_worker_removes_the_image_folders_when_its_parent_dies(echo_dir):
    """Slicer killed with an image file written but not yet sent: the worker, ending with its parent,
    removes the folders."""
    script = textwrap.dedent(f"""
        import sys, threading
        import numpy as np
        from ENSAMSegmentLib.core import worker_wire as wire
        from ENSAMSegmentLib.core.interpreter import child_environment
        from ENSAMSegmentLib.core.worker import WorkerSession

        write = wire.write_image

        def write_and_stay(path, array):
            write(path, array)
            print(path, flush=True)
            threading.Event().wait()  # the message naming it never goes

        wire.write_image = write_and_stay
        session = WorkerSession(None, "cpu", env=child_environment(folders=[{str(echo_dir)!r}]))
        while not session.ready:
            session.poll(0.05)
        print(session.pid, flush=True)
        session.submit_image(np.zeros((8, 8, 8), np.int16))
        threading.Event().wait()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=child_environment())
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in parent.stdout], daemon=True).start()
    try:
        worker_pid = int(lines.get(timeout=60))
        path = lines.get(timeout=30).strip()
        assert os.path.isfile(path)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert gone(worker_pid)
        end = time.monotonic() + 10
        while os.path.exists(os.path.dirname(path)) and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.exists(os.path.dirname(path)), "the image folder outlived both processes"
    finally:
        parent.kill()
