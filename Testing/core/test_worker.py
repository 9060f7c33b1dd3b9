"""The worker-process session (core/worker.py) against the in-process one, with real child processes: the
same contract and results, a worker killed mid-request, close while busy, a model or device that cannot be
used, the worker ending with its parent, the handshake, and the interpreter Slicer's children run on."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ENSAMSegmentLib.core import worker_wire as wire
from ENSAMSegmentLib.core.interpreter import child_environment, python_interpreter
from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
from ENSAMSegmentLib.core.network import ENSAMConfig
from ENSAMSegmentLib.core.phantom import make_phantom
from ENSAMSegmentLib.core.session import InferenceSession
from ENSAMSegmentLib.core.session_contract import CONTRACT
from ENSAMSegmentLib.core.session_types import (
    ImageTooLargeError, InvalidImageError, InvalidPromptError, ModelLoadError, NoImageError, SessionClosedError,
    SessionError, UnknownObjectError, WorkerCrashedError,
)
from ENSAMSegmentLib.core.worker import WorkerSession
from process_checks import gone

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
SHAPE = (32, 48, 48)
BOX = ((6, 10, 12), (22, 34, 36))
SLOW_SHAPE = (96, 160, 160)  # about 1.6 s to encode on one thread: long enough to act while it runs


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return create_untrained_model_file(tmp_path_factory.mktemp("model") / "small.pt", seed=0, config=ENSAMConfig(**SMALL))


@pytest.fixture(scope="module")
def image():
    return make_phantom(SHAPE, seed=1, n_objects=2)[0]


@pytest.fixture
def worker(model_file):
    session = WorkerSession(model_file, "cpu", torch_threads=1)
    yield session
    session.close()


def test_both_sessions_have_the_whole_contract():
    for cls in (InferenceSession, WorkerSession):
        missing = [name for name in CONTRACT if not hasattr(cls, name)]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_the_worker_gives_what_the_in_process_session_gives(worker, model_file, image, one_thread):
    """The same prompts give the same masks, changed blocks, prompts, steps and labels on both sides."""
    def run(session):
        out = [session.set_image(image, (2.0, 1.0, 1.0))]
        a, b = session.create_object(), session.create_object()
        out += [session.add_box(*BOX, object_id=a), session.add_click((14, 22, 24), True, object_id=a),
                session.add_click((10, 12, 14), False, object_id=a), session.add_box((2, 2, 2), (12, 20, 20), b),
                session.undo(a), session.reset(b), session.undo(b)]
        out.append(session.merged_labels())
        out.append((session.object_prompts(a), session.object_mask(a), session.object_ids, session.selected_object))
        again = session.set_image(image, (2.0, 1.0, 1.0))  # the same image: kept, not encoded
        out.append((again.encoded, session.object_ids))
        return out

    with InferenceSession(model_path=model_file, device="cpu") as local:
        expected = run(local)
    got = run(worker)
    assert got[0].encoded and got[0].shape == SHAPE and got[0].mode == "whole"
    for e, g in zip(expected[1:8], got[1:8]):
        assert (g.object_id, g.changed, g.step, g.prompts, g.decoding) == (e.object_id, e.changed, e.step, e.prompts,
                                                                           e.decoding)
        np.testing.assert_array_equal(g.mask, e.mask)
        if e.changed is not None:
            np.testing.assert_array_equal(g.block, g.mask[g.changed])
    np.testing.assert_array_equal(got[8], expected[8])
    assert got[9][0] == expected[9][0] and got[9][2:] == expected[9][2:]
    np.testing.assert_array_equal(got[9][1], expected[9][1])
    assert got[10] == expected[10] == (False, (1, 2))
    assert worker.device_name.startswith("cpu") and worker.model_info["parameters"] > 0
    assert worker.malloc_tuned == sys.platform.startswith("linux")  # glibc: the worker keeps freed memory


@pytest.mark.parametrize("call, error", [
    (lambda s: s.submit_box((0, 0, 0), (1, 1, 1)), NoImageError),
    (lambda s: s.submit_image(np.zeros((4, 4)), (1, 1, 1)), InvalidImageError),
    (lambda s: s.submit_image(np.full((4, 4, 4), np.nan), (1, 1, 1)), InvalidImageError),
    (lambda s: s.submit_image(np.zeros((4, 4, 4)), (1, 0, 1)), InvalidImageError),
    (lambda s: s.submit_image(np.zeros((4, 4, 4)), (1, 1, 1), modality="nonsense"), InvalidImageError),
])
def test_bad_input_is_refused_at_submission_alike(worker, model_file, call, error):
    with InferenceSession(model_path=model_file, device="cpu") as local:
        with pytest.raises(error) as expected:
            call(local)
    with pytest.raises(error) as got:
        call(worker)
    assert str(got.value) == str(expected.value)


def test_bad_prompts_and_objects_are_refused_alike(worker, image):
    worker.submit_image(image)
    with pytest.raises(UnknownObjectError):
        worker.submit_box(*BOX)  # no object yet
    oid = worker.create_object()
    with pytest.raises(InvalidPromptError, match="inverted"):
        worker.submit_box(BOX[1], BOX[0], oid)
    with pytest.raises(InvalidPromptError, match="outside"):
        worker.submit_click((0, 0, 99), True, oid)
    with pytest.raises(UnknownObjectError):
        worker.submit_undo(oid + 1)
    small = WorkerSession.__new__(WorkerSession)  # the size limit is checked here, before anything is sent
    small.max_image_voxels, small.global_voxel_budget, small.max_pool_factor, small._closed = 100, 512, 8, False
    with pytest.raises(ImageTooLargeError):
        WorkerSession.submit_image(small, np.zeros((8, 8, 8)))
    assert worker.add_box(*BOX, object_id=oid).step == 1  # nothing refused changed anything


def test_a_stale_click_is_cancelled_and_its_prompt_travels_with_the_next(worker, image):
    worker.set_image(image)
    oid = worker.create_object()
    box = worker.submit_box(*BOX, object_id=oid)
    first = worker.submit_click((14, 22, 24), True, oid)
    second = worker.submit_click((10, 12, 14), False, oid)
    result = worker.wait(second)  # what the in-process session does: earlier queued prompts ride along
    # which earlier requests were cancelled depends on timing; those that ran are steps 1, 2, ... in order
    ran = [future.result().step for future in (box, first, second) if not future.cancelled()]
    assert ran == list(range(1, len(ran) + 1)) and ran[-1] == result.step
    assert result.prompts.box == BOX and result.prompts.fg == ((14, 22, 24),) and result.prompts.bg == ((10, 12, 14),)
    assert worker.object_prompts(oid) == result.prompts


def test_a_worker_killed_mid_request_fails_it_clearly_and_closes(model_file):
    session = WorkerSession(model_file, "cpu", torch_threads=1)
    try:
        while not session.ready:
            session.poll(0.05)
        future = session.submit_image(np.random.default_rng(0).normal(0, 1, SLOW_SHAPE).astype(np.float32))
        time.sleep(0.3)  # the worker is encoding now
        assert not future.done()
        os.kill(session.pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match=r"PID \d+\) was killed \(signal 9, SIGKILL\)"):
            session.wait(future, timeout=10)
        assert session.closed and isinstance(session.failure, WorkerCrashedError)
        with pytest.raises(SessionClosedError, match="SIGKILL"):
            session.create_object()
    finally:
        session.close()


def test_close_ends_a_busy_worker_at_once_and_an_idle_one_cleanly(model_file):
    busy = WorkerSession(model_file, "cpu", torch_threads=1)
    future = busy.submit_image(np.zeros(SLOW_SHAPE, np.float32) + np.arange(SLOW_SHAPE[2]))
    while not busy.ready:
        busy.poll(0.05)
    start = time.monotonic()
    busy.close()
    assert time.monotonic() - start < 1.0 and future.cancelled()
    assert busy.process.returncode is not None and gone(busy.pid)

    idle = WorkerSession(model_file, "cpu", torch_threads=1)
    while not idle.ready:
        idle.poll(0.05)
    idle.close()
    assert idle.process.returncode == 0  # it left by itself when asked


def test_a_model_that_cannot_load_fails_every_request_with_the_reason(tmp_path, image):
    with pytest.raises(ModelLoadError, match="no such file"):
        WorkerSession(tmp_path / "missing.pt", "cpu")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    session = WorkerSession(broken, "cpu")
    try:
        future = session.submit_image(image)
        with pytest.raises(ModelLoadError, match="broken.pt"):
            session.wait(future, timeout=60)
        assert session.closed and session.process.wait(10) == 2
    finally:
        session.close()


def test_an_unavailable_device_is_said_then_another_works(model_file, image):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the 'unavailable device' case cannot be made here")
    cuda = WorkerSession(model_file, "cuda")
    try:
        with pytest.raises(SessionError, match="(?i)cuda"):
            cuda.wait(cuda.submit_image(image), timeout=60)
    finally:
        cuda.close()
    with WorkerSession(model_file, "cpu", torch_threads=1) as cpu:
        assert cpu.set_image(image).encoded and cpu.device_name.startswith("cpu")


def test_the_worker_ends_with_its_parent(model_file, tmp_path):
    """Slicer killed (or crashed): the worker's connection closes and it exits by itself."""
    script = textwrap.dedent(f"""
        import sys, time
        from ENSAMSegmentLib.core.worker import WorkerSession
        session = WorkerSession({str(model_file)!r}, "cpu", torch_threads=1)
        while not session.ready:
            session.poll(0.05)
        print(session.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=child_environment())
    try:
        worker_pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert gone(worker_pid), "the worker outlived its parent"
    finally:
        parent.kill()


def test_the_handshake_refuses_a_wrong_key():
    import socket

    server, key = wire.listen(), wire.new_key()
    port = server.getsockname()[1]
    results = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        attempt = pool.submit(lambda: wire.connect(port, wire.new_key()))
        end = time.monotonic() + 5
        while time.monotonic() < end and not results:
            conn = wire.accept(server, key)
            if conn is not None:
                results.append(conn)
            time.sleep(0.01)
            if attempt.done():
                break
        try:
            attempt.result(5).close()
        except OSError:
            pass
    assert results == []  # the peer with the wrong key was dropped
    with socket.create_connection(("127.0.0.1", port)):
        pass
    server.close()


def test_messages_carry_large_arrays_writable():
    """Out-of-band buffers: what arrives is the same array, in writable memory."""
    from multiprocessing import Pipe

    a, b = Pipe()
    array = np.arange(2_000_000, dtype=np.int16).reshape(100, 100, 200)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a pipe holds 64 kB: someone must read meanwhile
        sent = pool.submit(wire.send, a, {"op": "image", "array": array, "empty": np.zeros((0, 3))})
        message = wire.recv(b)
        sent.result(10)
    np.testing.assert_array_equal(message["array"], array)
    assert message["array"].flags.writeable and message["empty"].shape == (0, 3)


def test_children_run_on_python_real_beside_the_pythonslicer_launcher(tmp_path):
    """Inside Slicer sys.executable is the launcher PythonSlicer (qSlicerCoreApplication.cxx): the real
    interpreter beside it is used; anything else stays as it is."""
    bin_dir = tmp_path / "Slicer-5.10.0-linux-amd64" / "bin"
    bin_dir.mkdir(parents=True)
    launcher, real = bin_dir / "PythonSlicer", bin_dir / "python-real"
    launcher.write_text("")
    assert python_interpreter(str(launcher)) == str(launcher)  # no python-real there: the launcher is all there is
    real.write_text("")
    assert python_interpreter(str(launcher)) == str(real)
    win = tmp_path / "win"
    win.mkdir()
    (win / "PythonSlicer.exe").write_text("")
    (win / "python-real.exe").write_text("")
    assert python_interpreter(str(win / "PythonSlicer.exe")) == str(win / "python-real.exe")
    assert python_interpreter("/usr/bin/python3") == "/usr/bin/python3"
    assert python_interpreter() == sys.executable  # not in Slicer here


def test_the_client_side_never_imports_torch(model_file):
    """Slicer's process holds only the client: prompts, masks and replies without torch (or MONAI)."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from ENSAMSegmentLib.core.worker import WorkerSession
        with WorkerSession({str(model_file)!r}, "cpu", torch_threads=1) as session:
            session.set_image(np.random.default_rng(0).normal(0, 1, (16, 24, 24)).astype(np.float32))
            update = session.add_box((2, 2, 2), (12, 20, 20), session.create_object())
            assert update.mask.shape == (16, 24, 24) and session.merged_labels().shape == (16, 24, 24)
        loaded = {{"torch", "monai"}} & set(sys.modules)
        assert not loaded, loaded
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_environment(),
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("kind", ["inprocess", "worker"])
def test_a_known_identity_stands_in_for_hashing_the_image(kind, model_file, image):
    """The prompt controller names the image (volume node, modification time): the same name again is the
    same image (not encoded, objects kept) without hashing every byte; another name is a new image."""
    session = (InferenceSession(model_path=model_file, device="cpu") if kind == "inprocess"
               else WorkerSession(model_file, "cpu", torch_threads=1))
    try:
        first = session.set_image(image, identity=("volume1", 100))
        oid = session.create_object()
        again = session.set_image(image, identity=("volume1", 100))
        assert first.encoded and not again.encoded and session.object_ids == (oid,)
        changed = session.set_image(image, identity=("volume1", 101))  # modified since: encoded again
        assert changed.encoded and session.object_ids == ()
    finally:
        session.close()


def test_a_missing_default_model_says_where_to_get_one(tmp_path, monkeypatch):
    missing = tmp_path / "Models" / "ensam-default.pt"
    monkeypatch.setattr("ENSAMSegmentLib.core.modelfile.default_model_path", lambda: missing)
    with pytest.raises(ModelLoadError) as error:
        WorkerSession(model_path=missing, device="cpu")
    assert f"the default model file {missing} is missing" in str(error.value)
    assert "Model panel" in str(error.value) and "`make setup`" in str(error.value)
    with pytest.raises(ModelLoadError, match="mine.pt: no such file"):
        WorkerSession(model_path=tmp_path / "mine.pt", device="cpu")


def test_the_worker_reports_the_model_s_own_grid_budget(tmp_path):
    from ENSAMSegmentLib.core.modelfile import save_model
    from ENSAMSegmentLib.core.network import ENSAM

    path = save_model(tmp_path / "m.pt", ENSAM(ENSAMConfig(**SMALL)), training_data="test", voxel_budget=4096)
    session = WorkerSession(path, "cpu", torch_threads=1)
    try:
        assert session.voxel_budget == 8_388_608  # until the worker has read the model
        while not session.ready:
            session.poll(0.05)
        assert (session.voxel_budget, session.global_voxel_budget) == (4096, 4096)
    finally:
        session.close()
