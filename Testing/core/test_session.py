"""InferenceSession with a real (small, untrained) ENSAM: encoding once, objects, undo, merge, bad input,
threads and stale-request cancellation."""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest
import torch

from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
from ENSAMSegmentLib.core.phantom import make_phantom
from ENSAMSegmentLib.core.session import (
    ImageTooLargeError, InferenceSession, InvalidImageError, InvalidPromptError, ModelLoadError, NoImageError,
    SessionClosedError, SessionError, StaleRequest, UnknownObjectError, boost_empty, merge_into,
)

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
SHAPE = (32, 48, 48)
BOX = ((6, 10, 12), (22, 34, 36))


pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/core/conftest.py


def small_model(seed=0) -> ENSAM:
    torch.manual_seed(seed)
    return ENSAM(ENSAMConfig(**SMALL)).eval()


class Recorder:
    """Wraps model.encode/decode: counts calls, records threads, decode inputs/outputs; can block."""

    def __init__(self, model: ENSAM):
        self.model, self.encode, self.decode = model, model.encode, model.decode
        self.encodes, self.decodes, self.threads = 0, [], set()
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        model.encode, model.decode = self._encode, self._decode

    def _encode(self, image):
        self.encodes += 1
        self.threads.add(threading.get_ident())
        return self.encode(image)

    def _decode(self, emb, prompts, prev_logits=None, region=None, norms=None):
        self.threads.add(threading.get_ident())
        self.entered.set()
        self.gate.wait(30)
        out = self.decode(emb, prompts, prev_logits, region, norms)
        self.decodes.append({"prompts": prompts, "prev": None if prev_logits is None else prev_logits.clone(),
                             "region": region, "out": out.clone()})
        return out


@pytest.fixture(scope="module")
def image():
    return make_phantom(SHAPE, seed=1, n_objects=2)[0]


@pytest.fixture
def recorded():
    recorder = Recorder(small_model())
    # decode_margin 0: the box's decode region is a third of the image, so region decoding is exercised;
    # click_window 0: clicks are decoded like boxes, every step through model.decode (windowed clicks:
    # test_session_window.py)
    with InferenceSession(model=recorder.model, device="cpu", decode_margin=0, click_window=0) as session:
        yield session, recorder


# ----------------------------------------------------------------------------- image and encoder


def test_encoder_runs_once_and_not_again_for_the_same_image(recorded, image):
    session, rec = recorded
    report = session.set_image(image, spacing_zyx=(2.0, 1.0, 1.0), modality="ct")
    assert report.encoded and report.mode == "whole" and report.grid_factor == (1, 1, 1)
    oid = session.create_object()
    session.add_box(*BOX)
    session.add_click((14, 22, 24), foreground=True)
    session.add_click((7, 11, 13), foreground=False)
    session.undo()
    assert rec.encodes == 1 and session.encoder_runs == 1
    again = session.set_image(image.copy(), spacing_zyx=(2.0, 1.0, 1.0), modality="ct")
    assert not again.encoded and rec.encodes == 1
    assert session.object_ids == (oid,) and session.object_prompts(oid).fg == ((14, 22, 24),)
    changed = image.copy()
    changed[0, 0, 0] += 1.0  # one voxel differs: a different image
    session.set_image(changed, spacing_zyx=(2.0, 1.0, 1.0), modality="ct")
    assert rec.encodes == 2 and session.object_ids == ()
    assert session.create_object() == 1  # ids restart with a new image
    session.set_image(changed, spacing_zyx=(1.0, 1.0, 1.0), modality="ct")  # other spacing: new image
    assert rec.encodes == 3


def test_all_model_calls_run_on_one_worker_thread(recorded, image):
    session, rec = recorded
    session.set_image(image)
    ids = [session.create_object() for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda oid: session.add_click((16, 24, 10 + 10 * oid), object_id=oid), ids))
    assert sorted(r.object_id for r in results) == ids
    assert len(rec.threads) == 1 and threading.get_ident() not in rec.threads


# ----------------------------------------------------------------------------- steps and undo


def test_click_feeds_back_the_previous_logits_and_undo_restores_them_exactly(recorded, image):
    session, rec = recorded
    session.set_image(image)
    session.create_object()
    box = session.add_box(*BOX)
    assert rec.decodes[-1]["prev"] is None  # the box step starts the interaction
    box_out, box_region = rec.decodes[-1]["out"], rec.decodes[-1]["region"]
    first = session.add_click((14, 22, 24))
    prev = rec.decodes[-1]["prev"]
    assert prev.shape == (1, 1, 32, 48, 48)
    assert box_region == (slice(0, 24), slice(8, 40), slice(8, 40))
    assert torch.equal(prev[(..., *box_region)], box_out)  # exactly the box step's logits
    outside = prev.clone()
    outside[(..., *box_region)] = 0
    fill = float(outside[0, 0, -1, -1, -1])
    assert fill <= 0 and torch.all((outside == fill) | (outside == 0))  # elsewhere: one stand-in value
    undone = session.undo()
    assert np.array_equal(undone.mask, box.mask)
    again = session.add_click((14, 22, 24))
    assert torch.equal(rec.decodes[-1]["prev"], prev)
    assert np.array_equal(again.mask, first.mask) and again.step == 2


def test_undo_returns_every_previous_mask_bit_identically_back_to_empty(recorded, image):
    session, _ = recorded
    session.set_image(image)
    session.create_object()
    masks = [np.zeros(SHAPE, bool)]
    for update in (session.add_box(*BOX), session.add_click((14, 22, 24)), session.add_click((20, 30, 30), False),
                   session.add_click((10, 16, 16))):
        masks.append(update.mask)
    assert any(m.any() for m in masks[1:])
    for expected in reversed(masks[:-1]):
        update = session.undo()
        assert update.mask.dtype == bool and np.array_equal(update.mask, expected)
        assert np.array_equal(session.object_mask(), expected)
    assert session.object_prompts().box is None
    nothing = session.undo()  # already empty: no change
    assert nothing.changed is None and nothing.step == 0 and not nothing.mask.any()


def test_changed_slices_bound_every_changed_voxel(recorded, image):
    session, _ = recorded
    session.set_image(image)
    session.create_object()
    previous = np.zeros(SHAPE, bool)
    for call in (lambda: session.add_box(*BOX), lambda: session.add_click((14, 22, 24)),
                 lambda: session.add_click((3, 40, 44), False), lambda: session.undo(), lambda: session.reset()):
        update = call()
        outside = np.ones(SHAPE, bool)
        if update.changed is not None:
            outside[update.changed] = False
            assert not np.array_equal(update.mask[update.changed], previous[update.changed])
            for axis in range(3):  # tight: the first and last plane of the box hold a change
                diff = np.moveaxis(update.mask[update.changed] != previous[update.changed], axis, 0)
                assert diff[0].any() and diff[-1].any()
        else:
            assert np.array_equal(update.mask, previous)
        assert np.array_equal(update.mask[outside], previous[outside])
        previous = update.mask


def test_reset_clears_the_object_and_is_undoable(recorded, image):
    session, _ = recorded
    session.set_image(image)
    session.create_object()
    session.add_box(*BOX)
    clicked = session.add_click((14, 22, 24))
    cleared = session.reset()
    assert not cleared.mask.any() and session.object_prompts().box is None and session.object_logits() is None
    assert session.reset().changed is None  # resetting an empty object changes nothing
    restored = session.undo()
    assert np.array_equal(restored.mask, clicked.mask) and session.object_prompts().fg == ((14, 22, 24),)


def test_a_new_box_starts_the_object_over(recorded, image):
    session, rec = recorded
    session.set_image(image)
    session.create_object()
    session.add_box(*BOX)
    session.add_click((14, 22, 24))
    session.add_box((2, 2, 2), (12, 20, 20))
    assert rec.decodes[-1]["prev"] is None
    assert session.object_prompts().fg == () and session.object_prompts().box == ((2, 2, 2), (12, 20, 20))


def test_objects_are_independent(recorded, image):
    session, _ = recorded
    session.set_image(image)
    a = session.create_object()
    mask_a = session.add_box(*BOX).mask
    b = session.create_object()
    assert session.selected_object == b
    session.add_box((2, 4, 4), (14, 20, 20))
    session.add_click((8, 12, 12), object_id=b)
    session.undo(object_id=b)
    session.reset(object_id=b)
    assert np.array_equal(session.object_mask(a), mask_a) and session.object_prompts(a).box == BOX
    session.select_object(a)
    session.undo()
    assert not session.object_mask(a).any() and session.object_prompts(b).box is None
    session.remove_object(a)
    assert session.object_ids == (b,) and session.selected_object == b


# ----------------------------------------------------------------------------- merge


def test_merged_labels_take_the_highest_logit_above_zero(recorded, image):
    session, _ = recorded
    session.set_image(image)
    ids = [session.create_object() for _ in range(3)]
    session.add_box(*BOX, object_id=ids[0])
    session.add_box((10, 16, 16), (28, 44, 44), object_id=ids[1])
    session.add_click((16, 24, 24), object_id=ids[1])  # object 3 stays empty (no prompt): not merged
    labels = session.merged_labels()
    best = np.zeros(SHAPE, np.float32)
    expected = np.zeros(SHAPE, np.uint8)
    for oid in ids[:2]:
        extent, values = session.object_logits(oid)
        full = np.full(SHAPE, -np.inf, np.float32)
        full[extent] = values
        win = full > best
        best[win], expected[win] = full[win], oid
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected)
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_merged_labels_switch_to_uint16_above_255_objects(recorded, image):
    session, _ = recorded
    session.set_image(image)
    ids = [session.create_object() for _ in range(256)]
    session.add_click((16, 24, 24), object_id=ids[-1])
    labels = session.merged_labels()
    assert labels.dtype == np.uint16 and set(np.unique(labels)) <= {0, 256}
    assert np.array_equal(labels == 256, session.object_mask(256))


def test_an_object_left_empty_gets_a_voxel_inside_its_box(image):
    model = small_model()
    with torch.no_grad():
        model.decoder.final_conv.bias.fill_(-100.0)  # every logit negative: every object empty
    boxes = [((4, 4, 4), (12, 14, 16)), ((18, 26, 28), (28, 40, 44))]
    with InferenceSession(model=model, device="cpu") as session:
        session.set_image(image)
        for box in boxes:
            oid = session.create_object()
            assert not session.add_box(*box).mask.any()
        labels = session.merged_labels()
    for oid, (lo, hi) in zip((1, 2), boxes):
        inside = np.zeros(SHAPE, bool)
        inside[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] = True
        assert (labels == oid).any() and not (labels[~inside] == oid).any()


def test_merge_functions_on_hand_made_logits():
    area = (slice(0, 4), slice(0, 1), slice(0, 1))
    a = ((slice(0, 3), slice(0, 1), slice(0, 1)), np.array([2.0, 1.0, -1.0], np.float32).reshape(3, 1, 1))
    b = ((slice(1, 4), slice(0, 1), slice(0, 1)), np.array([3.0, -0.5, -2.0], np.float32).reshape(3, 1, 1))
    labels = np.zeros((4, 1, 1), np.uint8)
    best = merge_into(labels, area, {1: a, 2: b})
    assert labels.ravel().tolist() == [1, 2, 0, 0]  # voxel 2: a = -1, b = -0.5, both below 0
    assert best.ravel().tolist() == [2.0, 3.0, 0.0, 0.0]
    # boosting b inside the box voxels 2..3: smallest gap to the winners there is 0 - (-0.5), plus 1.0
    boosted = boost_empty(b, (slice(2, 4), slice(0, 1), slice(0, 1)), best, area, margin=1.0)
    assert boosted[1].ravel().tolist() == [3.0, 1.0, -0.5]  # outside the box (voxel 1) unchanged
    merge_into(labels, area, {1: a, 2: boosted})
    assert labels.ravel().tolist() == [1, 2, 2, 0]


# ----------------------------------------------------------------------------- bad input keeps the state


def snapshot(session):
    ids = session.object_ids
    masks = {oid: session.object_mask(oid) for oid in ids} if session.image_shape else {}
    return (ids, session.selected_object, session.image_shape, session.encoder_runs,
            {oid: session.object_prompts(oid) for oid in ids}, masks,
            session.merged_labels() if session.image_shape else None)


def same(a, b) -> bool:
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else
               (x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)) if isinstance(x, dict)
               else x == y for x, y in zip(a, b))


BAD_CALLS = {
    "2-D image": (lambda s: s.set_image(np.zeros((32, 32))), InvalidImageError),
    "empty image": (lambda s: s.set_image(np.zeros((0, 8, 8))), InvalidImageError),
    "NaN": (lambda s: s.set_image(np.full((8, 8, 8), np.nan, np.float32)), InvalidImageError),
    "Inf": (lambda s: s.set_image(np.where(np.eye(8)[None] > 0, np.inf, 0.0) * np.ones((8, 1, 1))), InvalidImageError),
    "strings": (lambda s: s.set_image(np.full((8, 8, 8), "a")), InvalidImageError),
    "complex": (lambda s: s.set_image(np.zeros((8, 8, 8), np.complex64)), InvalidImageError),
    "bool": (lambda s: s.set_image(np.zeros((8, 8, 8), bool)), InvalidImageError),
    "bad spacing": (lambda s: s.set_image(np.zeros((8, 8, 8)), spacing_zyx=(1, 0, 1)), InvalidImageError),
    "bad modality": (lambda s: s.set_image(np.zeros((8, 8, 8)), modality="xyz"), InvalidImageError),
    "bad window": (lambda s: s.set_image(np.zeros((8, 8, 8)), ct_window=(-5, 40)), InvalidImageError),
    "too large": (lambda s: s.set_image(np.zeros((8, 8, 8000), np.uint8)), ImageTooLargeError),
    "click outside": (lambda s: s.add_click((32, 0, 0)), InvalidPromptError),
    "negative click": (lambda s: s.add_click((-1, 5, 5)), InvalidPromptError),
    "2-number click": (lambda s: s.add_click((1, 2)), InvalidPromptError),
    "NaN click": (lambda s: s.add_click((1, np.nan, 2)), InvalidPromptError),
    "box outside": (lambda s: s.add_box((0, 0, 0), (5, 5, 48)), InvalidPromptError),
    "inverted box": (lambda s: s.add_box((10, 10, 10), (12, 9, 12)), InvalidPromptError),
    "unknown object": (lambda s: s.add_click((1, 1, 1), object_id=99), UnknownObjectError),
    "unknown undo": (lambda s: s.undo(object_id=99), UnknownObjectError),
    "unknown select": (lambda s: s.select_object(99), UnknownObjectError),
    "unknown remove": (lambda s: s.remove_object(99), UnknownObjectError),
}


@pytest.fixture(scope="module")
def busy_session(image):
    """A session with two objects and some steps, shared by the bad-input tests."""
    with InferenceSession(model=small_model(), device="cpu", global_voxel_budget=4096, max_pool_factor=8,
                          voxel_budget=2**16) as session:
        session.set_image(image)
        session.create_object()
        session.add_box(*BOX)
        session.add_click((14, 22, 24))
        session.create_object()
        session.add_click((20, 30, 30))
        yield session


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_a_clear_error_and_keeps_the_state(busy_session, name):
    call, error = BAD_CALLS[name]
    before = snapshot(busy_session)
    with pytest.raises(error) as info:
        call(busy_session)
    assert isinstance(info.value, SessionError) and str(info.value)
    assert same(snapshot(busy_session), before)


def test_prompts_before_an_image_raise_no_image_error():
    with InferenceSession(model=small_model(), device="cpu") as session:
        session.create_object()
        for call in (lambda: session.add_click((1, 1, 1)), lambda: session.add_box((0, 0, 0), (1, 1, 1)),
                     lambda: session.undo(), lambda: session.merged_labels(), lambda: session.object_mask()):
            with pytest.raises(NoImageError):
                call()
        with pytest.raises(UnknownObjectError):
            session.select_object(2)
        assert session.image_shape is None and session.encoder_runs == 0


# ----------------------------------------------------------------------------- threads and cancellation


def test_a_stale_click_is_cancelled_and_its_prompt_travels_with_the_newer_one(recorded, image):
    session, rec = recorded
    session.set_image(image)
    a = session.create_object()
    b = session.create_object()
    rec.gate.clear()
    rec.entered.clear()
    box = session.submit_box(*BOX, object_id=a)
    assert rec.entered.wait(30)  # the worker is inside the box's decode, blocked
    first = session.submit_click((14, 22, 24), object_id=a)
    other = session.submit_click((20, 30, 30), object_id=b)
    second = session.submit_click((10, 16, 16), foreground=False, object_id=a)
    assert first.cancelled() and not other.cancelled() and not second.cancelled()
    rec.gate.set()
    with pytest.raises(concurrent.futures.CancelledError):
        first.result(30)
    assert box.result(30).step == 1 and other.result(30).step == 1
    update = second.result(30)
    assert update.step == 2  # one step holding both clicks
    prompts = session.object_prompts(a)
    assert prompts.fg == ((14, 22, 24),) and prompts.bg == ((10, 16, 16),) and prompts.box == BOX
    assert np.array_equal(session.undo(a).mask, box.result().mask)


def test_undo_between_clicks_is_not_skipped(recorded, image):
    session, rec = recorded
    session.set_image(image)
    session.create_object()
    session.add_box(*BOX)
    rec.gate.clear()
    rec.entered.clear()
    blocker = session.submit_click((14, 22, 24))
    assert rec.entered.wait(30)
    click = session.submit_click((16, 24, 24))
    undo = session.submit_undo()
    last = session.submit_click((18, 26, 26))
    rec.gate.set()
    assert not click.cancelled() and blocker.result(30).step == 2 and click.result(30).step == 3
    assert undo.result(30).step == 2 and last.result(30).step == 3
    assert session.object_prompts().fg == ((14, 22, 24), (18, 26, 26))


def test_a_new_image_cancels_queued_requests_and_orphans_the_running_one(recorded, image):
    session, rec = recorded
    session.set_image(image)
    session.create_object()
    rec.gate.clear()
    rec.entered.clear()
    running = session.submit_box(*BOX)
    assert rec.entered.wait(30)
    queued = [session.submit_click((14, 22, 24)), session.submit_undo(), session.submit_merged_labels()]
    superseded = session.submit_image(image[:, :40])
    newest = session.submit_image(image[:, :, :40])
    assert all(f.cancelled() for f in queued + [superseded]) and session.object_ids == ()
    rec.gate.set()
    with pytest.raises(StaleRequest):
        running.result(30)
    assert newest.result(30).shape == (32, 48, 40) and rec.encodes == 2  # the superseded image never ran
    assert session.image_shape == (32, 48, 40) and not session.merged_labels().any()


def test_close_stops_the_worker_and_later_calls_raise(image):
    session = InferenceSession(model=small_model(), device="cpu")
    session.set_image(image)
    session.close()
    session.close()  # idempotent
    assert not session._worker.is_alive()
    with pytest.raises(SessionClosedError):
        session.create_object()
    with pytest.raises(SessionClosedError):
        session.set_image(image)


# ----------------------------------------------------------------------------- model and device


def test_model_file_and_device_options(tmp_path, image):
    path = create_untrained_model_file(tmp_path / "small.pt", seed=0, config=ENSAMConfig(**SMALL))
    with InferenceSession(model_path=path, device="auto") as session:
        assert session.device.type in ("cpu", "cuda", "mps") and session.model_info.path == path
        assert session.model_info.untrained and session.device_name
    with InferenceSession(model=small_model(), device="cpu") as session:
        assert session.model_info.path is None and session.model_info.config == ENSAMConfig(**SMALL)
    with pytest.raises(ModelLoadError, match="no such file"):
        InferenceSession(model_path=tmp_path / "missing.pt", device="cpu")
    with pytest.raises(SessionError, match="unknown device"):
        InferenceSession(model=small_model(), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SessionError, match="cuda"):
            InferenceSession(model=small_model(), device="cuda")
        with pytest.raises(SessionError, match="precision"):
            InferenceSession(model=small_model(), device="cpu", precision="fp16")


def test_the_grid_budget_defaults_to_the_one_the_model_was_trained_at(tmp_path, image):
    """A model file records its training patch budget; the session's grids follow it (objects then appear
    at the scale the model learnt them: the demo's liver scored Dice 0.37 at 8,388,608 voxels and 0.74 at
    the 196,608 the model was trained at); an explicit voxel_budget wins; files without it: VOXEL_BUDGET."""
    from ENSAMSegmentLib.core.modelfile import read_model_info, save_model
    from ENSAMSegmentLib.core.session_types import VOXEL_BUDGET

    path = save_model(tmp_path / "m.pt", small_model(), training_data="test", voxel_budget=4096)
    assert read_model_info(path).voxel_budget == 4096 and read_model_info(path).metadata()["voxel_budget"] == 4096
    with InferenceSession(model_path=path, device="cpu") as session:
        assert (session.voxel_budget, session.global_voxel_budget) == (4096, 4096)
        report = session.set_image(image)  # 32x48x48 = 73,728 voxels > 4096: pooled ("large")
        assert report.mode == "large" and max(report.grid_factor) > 1
    with InferenceSession(model_path=path, device="cpu", voxel_budget=VOXEL_BUDGET) as session:
        assert session.voxel_budget == VOXEL_BUDGET
    plain = create_untrained_model_file(tmp_path / "plain.pt", seed=0, config=ENSAMConfig(**SMALL))
    assert read_model_info(plain).voxel_budget is None
    with InferenceSession(model_path=plain, device="cpu") as session:
        assert session.voxel_budget == VOXEL_BUDGET
