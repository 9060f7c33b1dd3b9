"""The interactive inference session: one image, cached embeddings, objects with undo, merged labels.

    with InferenceSession(model_path=None, device="auto") as session:   # default model file
        session.set_image(array_zyx, spacing_zyx=(1.0, 1.0, 1.0))       # encodes the image (or a global view)
        oid = session.create_object()
        update = session.add_box((z0, y0, x0), (z1, y1, x1))            # inclusive corners; encodes its crop
        update = session.add_click((z, y, x), foreground=False)
        labelmap[update.changed] = update.mask[update.changed]           # rewrite only what changed
        session.undo(); labels = session.merged_labels()

Working grid (what the encoder sees; mirrors training, where the model saw crops around the object
with a margin of 1 to its size (at most 64 voxels), max-pooled by integer factors above a 4,194,304-voxel budget, padded to 8):

* A box, in either mode, makes the session encode a box-centred crop (box and clicks +
  `context_margin`; default: the widest margin training gives an object of that size, 8 to 64 voxels,
  `session_region.training_margin`) at native resolution, max-pooled only if it is still above
  `voxel_budget`; the last `max_cached_regions` (default 2) crop embeddings are cached. An object is
  thus seen as training showed it, filling a share of its crop rather than a corner of a wide image
  (validation phantoms, box step: 0.72 decoded on the whole image, 0.93 on the crop; MODEL_CARD.md).
  The object is decoded only over the bounding box of its box and clicks plus `decode_margin`
  (default 16) voxels, aligned to 8 (`ENSAM.decode(region=...)`; the decoder also sees 2 more
  bottleneck cells of context), or over the whole crop when that region covers >=
  `full_decode_fraction` of it. A click outside the object's crop grows the crop: a new crop is
  encoded (the cost of one encoder pass).
* "whole" mode: the image fits `voxel_budget` (the model's training budget, else 8,388,608 =
  128x256x256) at native resolution. It is encoded whole, once, at `set_image`; that embedding serves
  objects with clicks only, and a box whose crop would hold half the image or more (`WHOLE_IMAGE_SHARE`:
  encoding such a crop again costs a whole encoder pass and changes little).
* "large" mode (e.g. a 512x512x300 CT): a global view, max-pooled to `global_voxel_budget` (default
  4,194,304, the training maximum), is encoded at `set_image` and serves objects without a box.
  Previous logits move between grids by trilinear resampling; logits of pooled grids reach the
  image by trilinear upsampling. Measured (python Testing/core/test_session_region.py, default-size
  model, CPU, a 512x512x300 int16 CT): global view 150x128x171 (pooling 2, 4, 3), peak RSS 4.1 GB
  through set_image, a box (crop encode + decode), a click and merged_labels: within a 6 GB budget.

Clicks (`click_window`, default 32; session_window.py): a click on an object already decoded on the
same grid decodes only a window of the click +- `click_window` voxels; the object's other logits stay.
The decoder reuses the GroupNorm statistics of the object's last box (or whole) decode, which makes it
a local function of its inputs, so inside the window the logits are exactly those of decoding the
whole grid with those statistics (ENSAM.decode_window). When the change connected to the click reaches
a face of the window, that face moves out by `click_window` and the window is decoded again,
`click_window_growth` times at most (default 1; `SegmentationUpdate.window_growth` says how many).
On the 2-core CPU at 128x256x256 this is about 0.5 s a click instead of 3.4 s for the box region (README "Performance",
`ensam bench`, which also reports how far the masks differ from decoding the box region).
`click_window=0` decodes every click over the box region as before.

Precision: bf16 autocast on GPUs and on CPUs with native bf16 (devices.py), else fp32.

Region decoding approximates full decoding (GroupNorm statistics come from the crop). Untrained
default-size model, 64x96x96 phantom CT, 3 structures x 2 seeds: inside the decoded region the masks
agree at Dice 0.97-1.00 (box step) and 0.96-0.99 (next click); over the whole image the agreement is
lower (0.39-0.86) only because the untrained model marks ~90 % of the image and voxels outside the
region are background by design. Test: Testing/core/test_session_region.py.

Objects: `create_object()` returns ids 1, 2, 3, ... (and selects the new object); prompts without
`object_id` go to the selected object. A box starts the object's interaction over (its clicks are
dropped and no previous logits are fed, as in training's box step); clicks add to the object's
prompts and feed the object's previous logits back (prev_logits; beyond the previous step's decoded
region, which the network still needs at full grid size, a stand-in value is fed: the median of that
region's border logits, at most 0). Each step keeps its logits, so
`undo()` restores exactly the previous mask and logits (`max_undo` levels, default 32, then the
oldest steps are forgotten and undo goes back to empty); `reset()` clears an object and is undoable.
A different image removes every object (ids restart at 1); the same image again (fingerprint: shape,
dtype, spacing, modality, window and a blake2b of all bytes, 0.34 s for a 512x512x300 int16 CT,
2 ms/MB) keeps everything and does not rerun the encoder.

This file holds the public half (validation, objects, the request queue and its thread);
session_engine.py what the thread computes; session_types.py the errors and results; session_merge.py
the merge; session_contract.py the contract this class shares with the worker-process client
(worker.py, what the Slicer modules use: inside Slicer a Python thread barely runs, see there).

Threads: every model call runs on ONE worker thread owned by the session (cuDNN plans are per
thread). The public API may be called from any thread: `submit_*` return concurrent.futures.Future;
the synchronous methods wait for theirs. A prompt request that has not started when a newer prompt
for the same object arrives is cancelled (its future reports cancelled) and its prompts travel with
the newer request, so nothing is lost; setting a different image cancels every queued request.
A request whose object was removed while it ran fails with `StaleRequest`.

Bad input raises a `SessionError` subclass before anything changes: the session keeps its previous
state exactly. Only a failure inside the encoder itself (e.g. out of memory) leaves it with no image.
"""


from __future__ import annotations

import concurrent.futures
import queue
import threading

import numpy as np

from . import devices
from .session_engine import SessionEngine, _Image, _Object, _Request
from .session_merge import boost_box, boost_empty, merge_into  # noqa: F401 (part of this module's API)
from .session_region import Grid, Slices, image_logits
from .session_types import (  # noqa: F401 (re-exported: the session's public names live here too)
    DEFAULT_CLICK_WINDOW, MAX_IMAGE_VOXELS, MAX_POOL_FACTOR, VOXEL_BUDGET, ImageReport, ImageTooLargeError,
    InvalidImageError, InvalidPromptError, ModelLoadError, NoImageError, ObjectPrompts, SegmentationUpdate,
    SessionClosedError, SessionError, StaleRequest, UnknownObjectError, WorkerCrashedError, check_box, check_image,
    check_budgets, check_image_request, check_intensity_options, check_size, check_spacing, check_voxel, default_global_budget,
    image_fingerprint,
)


# --------------------------------------------------------------------------------- the session


class InferenceSession(SessionEngine):
    """Interactive ENSAM segmentation of one image (see the module docstring)."""

    def __init__(self, model=None, model_path=None, device="auto", *, precision: str = "auto",
                 voxel_budget: int | None = None, global_voxel_budget: int | None = None,
                 decode_margin: int = 16, context_margin: int | None = None, full_decode_fraction: float = 0.5,
                 max_pool_factor: int = MAX_POOL_FACTOR, max_image_voxels: int = MAX_IMAGE_VOXELS, max_undo: int | None = 32,
                 max_cached_regions: int = 2, empty_object_margin: float = 1.0, click_window: int | None = None,
                 click_window_growth: int = 1):
        if max_undo is not None and max_undo < 1:
            raise ValueError(f"max_undo must be >= 1 or None (unlimited), got {max_undo}")
        check_budgets(voxel_budget or VOXEL_BUDGET, global_voxel_budget)  # before the model loads
        try:
            self.device = devices.resolve_device(device)
            self.amp_dtype = devices.autocast_dtype(self.device, precision)
        except ValueError as error:
            raise SessionError(str(error)) from None
        self.model, self.model_info = self._load(model, model_path)
        # None: the budget the model was trained at (objects at the scale it learnt), else VOXEL_BUDGET
        voxel_budget = voxel_budget or getattr(self.model_info, "voxel_budget", None) or VOXEL_BUDGET
        self.voxel_budget, self.global_voxel_budget = check_budgets(voxel_budget, global_voxel_budget)
        self.decode_margin = int(decode_margin)
        self.context_margin = None if context_margin is None else int(context_margin)  # None: training_margin
        self.full_decode_fraction, self.max_pool_factor = float(full_decode_fraction), int(max_pool_factor)
        self.max_image_voxels, self.max_undo = int(max_image_voxels), max_undo
        self.max_cached_regions, self.empty_object_margin = int(max_cached_regions), float(empty_object_margin)
        click_window = DEFAULT_CLICK_WINDOW if click_window is None else click_window  # None: the default
        if click_window < 0 or click_window_growth < 0:
            raise ValueError(f"need click_window >= 0 (0: no local decoding) and click_window_growth >= 0, got "
                             f"{click_window} and {click_window_growth}")
        self.click_window, self.click_window_growth = int(click_window), int(click_window_growth)
        self.encoder_runs = 0  # number of encoder passes so far (diagnostics and tests)

        self._lock = threading.RLock()
        self._objects: dict[int, _Object] = {}
        self._next_id, self._selected = 1, None
        self._image: _Image | None = None  # the image the worker has encoded (worker writes)
        self._cache: dict[Grid, object] = {}  # Grid -> ImageEmbedding, insertion order = LRU
        self._submitted: tuple | None = None  # (fingerprint, shape) of the newest submitted image
        self._generation = 0
        self._pending: list[_Request] = []  # queued, not started
        self._closed = False
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="ENSAM-session-worker", daemon=True)
        self._worker.start()

    def _load(self, model, model_path):
        from .modelfile import ModelFileError, ModelInfo, default_model_path, load_model

        if model is not None:  # an in-memory model (moved to the session's device)
            info = ModelInfo(path=None, config=model.config, training_data="in-memory model (no file)",
                             parameters=sum(p.numel() for p in model.parameters()))
            return devices.prepare_model(model, self.device, self.amp_dtype), info

        try:
            model, info = load_model(model_path or default_model_path(), self.device)
        except ModelFileError as error:
            raise ModelLoadError(str(error)) from None
        return devices.prepare_model(model, self.device, self.amp_dtype), info

    # ----------------------------------------------------------------------------- properties

    @property
    def device_name(self) -> str:
        return devices.describe(self.device, self.amp_dtype)

    @property
    def object_ids(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._objects)

    @property
    def selected_object(self) -> int | None:
        with self._lock:
            return self._selected

    @property
    def image_shape(self) -> tuple | None:
        """Shape of the newest image given to set_image/submit_image (None before)."""
        with self._lock:
            return None if self._submitted is None else self._submitted[1]

    @property
    def mode(self) -> str | None:
        """'whole' or 'large' for the encoded image (module docstring), None before."""
        with self._lock:
            return None if self._image is None else self._image.mode

    # ----------------------------------------------------------------------------- objects

    def create_object(self) -> int:
        """A new empty object; it becomes the selected object. Returns its id."""
        with self._lock:
            self._check_open()
            oid, self._next_id = self._next_id, self._next_id + 1
            self._objects[oid] = _Object(oid)
            self._selected = oid
            return oid

    def select_object(self, object_id: int) -> None:
        with self._lock:
            self._selected = self._object(object_id).id

    def remove_object(self, object_id: int) -> None:
        """Forget an object; its queued requests are cancelled."""
        with self._lock:
            obj = self._object(object_id)
            del self._objects[obj.id]
            self._cancel(lambda r: r.obj is obj)
            if self._selected == obj.id:
                self._selected = max(self._objects, default=None)

    def object_prompts(self, object_id: int | None = None) -> ObjectPrompts:
        """The object's prompts after its last completed step."""
        with self._lock:
            return self._object(object_id).current.prompts

    def object_mask(self, object_id: int | None = None) -> np.ndarray:
        """The object's mask after its last completed step (full image, bool)."""
        with self._lock:
            image = self._require_image()
            return self._object(object_id).current.mask.full(image.shape)

    def object_logits(self, object_id: int | None = None) -> tuple[Slices, np.ndarray] | None:
        """(image slices, float32 logits over them) after the object's last completed step, None when
        the object is empty. Voxels outside the slices count as background."""
        with self._lock:
            image = self._require_image()
            step = self._object(object_id).current
        return None if step.logits is None else image_logits(step.logits, image.shape)

    def _object(self, object_id) -> _Object:
        if object_id is None:
            if self._selected is None:
                raise UnknownObjectError("no object selected: call create_object() first")
            object_id = self._selected
        obj = self._objects.get(object_id) if isinstance(object_id, (int, np.integer)) else None
        if obj is None:
            raise UnknownObjectError(f"no object with id {object_id!r} (objects: {list(self._objects)})")
        return obj

    # ----------------------------------------------------------------------------- image

    def set_image(self, array_zyx, spacing_zyx=(1.0, 1.0, 1.0), modality: str = "auto",
                  ct_window=None, identity=None) -> ImageReport:
        """Validate, normalise (intensity.py) and encode an image; returns an ImageReport."""
        return self._wait(self.submit_image(array_zyx, spacing_zyx, modality, ct_window, identity))

    def submit_image(self, array_zyx, spacing_zyx=(1.0, 1.0, 1.0), modality: str = "auto",
                     ct_window=None, identity=None) -> concurrent.futures.Future:
        """Asynchronous set_image. Validation errors raise here; do not modify the array until done.
        identity: what makes this image the same as an earlier one, when the caller knows it (else every
        byte is hashed: image_fingerprint)."""
        self._check_open()
        array, spacing, modality, ct_window, fingerprint = check_image_request(
            self, array_zyx, spacing_zyx, modality, ct_window, identity)
        with self._lock:
            self._check_open()
            if self._submitted is not None and self._submitted[0] == fingerprint:
                return self.submit_same_image()
            self._cancel(lambda r: True)  # everything queued concerns the previous image
            self._objects.clear()
            self._next_id, self._selected = 1, None
            self._generation += 1
            self._submitted = (fingerprint, tuple(array.shape))
            request = _Request("image", concurrent.futures.Future(), args=(array, spacing, modality, ct_window,
                                                                           fingerprint))
            request.generation = self._generation
            return self._enqueue(request)

    def submit_same_image(self) -> concurrent.futures.Future:
        """The image given last, again: nothing is encoded and every object stays (an ImageReport with
        encoded False; NoImageError if its encoding failed). What submit_image does for an identical image."""
        with self._lock:
            self._submitted_shape()
            return self._enqueue(_Request("same_image", concurrent.futures.Future()))

    # ----------------------------------------------------------------------------- prompts

    def add_box(self, kji_min, kji_max, object_id: int | None = None) -> SegmentationUpdate:
        """Box with inclusive corners (z, y, x); restarts the object's interaction with this box."""
        return self._wait(self.submit_box(kji_min, kji_max, object_id))

    def add_click(self, kji, foreground: bool = True, object_id: int | None = None) -> SegmentationUpdate:
        """Foreground (or background) click at voxel (z, y, x)."""
        return self._wait(self.submit_click(kji, foreground, object_id))

    def submit_box(self, kji_min, kji_max, object_id: int | None = None) -> concurrent.futures.Future:
        with self._lock:
            lo, hi = check_box(kji_min, kji_max, self._submitted_shape())
            return self._submit_prompt(object_id, ("box", lo, hi))

    def submit_click(self, kji, foreground: bool = True, object_id: int | None = None) -> concurrent.futures.Future:
        with self._lock:
            point = check_voxel(kji, self._submitted_shape(), "click")
            return self._submit_prompt(object_id, ("click", point, bool(foreground)))

    def _submitted_shape(self) -> tuple:
        self._check_open()
        if self._submitted is None:
            raise NoImageError("no image: call set_image() first")
        return self._submitted[1]

    def _submit_prompt(self, object_id, prompt) -> concurrent.futures.Future:
        obj = self._object(object_id)
        carried = []
        for request in reversed(self._pending):  # newest first, back to the last non-prompt request
            if request.obj is not obj:
                continue
            if request.kind != "prompts":
                break
            if not request.future.cancelled() and request.future.cancel():
                carried = list(request.prompts) + carried
        self._pending = [r for r in self._pending if not r.future.cancelled()]
        request = _Request("prompts", concurrent.futures.Future(), obj, tuple(carried) + (prompt,))
        request.generation = self._generation
        return self._enqueue(request)

    # ----------------------------------------------------------------------------- undo, reset, merge

    def undo(self, object_id: int | None = None) -> SegmentationUpdate:
        """Back to the object's previous step (exact mask and logits); no change when already empty."""
        return self._wait(self.submit_undo(object_id))

    def reset(self, object_id: int | None = None) -> SegmentationUpdate:
        """Clear the object's prompts and mask (undoable)."""
        return self._wait(self.submit_reset(object_id))

    def submit_undo(self, object_id: int | None = None) -> concurrent.futures.Future:
        return self._submit_object_op("undo", object_id)

    def submit_reset(self, object_id: int | None = None) -> concurrent.futures.Future:
        return self._submit_object_op("reset", object_id)

    def _submit_object_op(self, kind: str, object_id) -> concurrent.futures.Future:
        with self._lock:
            self._submitted_shape()
            request = _Request(kind, concurrent.futures.Future(), self._object(object_id))
            request.generation = self._generation
            return self._enqueue(request)

    def merged_labels(self) -> np.ndarray:
        """Labelmap (z, y, x): each voxel gets the id of the object with the highest logit if > 0, else 0.
        An object left with no voxel first gets a constant added to its logits inside its box (or its
        foreground clicks' bounding box): the smallest that wins a voxel, plus `empty_object_margin`.
        uint8 when every id is <= 255, else uint16."""
        return self._wait(self.submit_merged_labels())

    def submit_merged_labels(self) -> concurrent.futures.Future:
        with self._lock:
            self._submitted_shape()
            return self._enqueue(_Request("labels", concurrent.futures.Future()))

    # ----------------------------------------------------------------------------- lifecycle

    def close(self, wait: bool = True) -> None:
        """Cancel queued requests and stop the worker thread after the running one. Idempotent.
        wait=False returns at once (the running request finishes unseen, then the thread ends)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cancel(lambda r: True)
            self._queue.put(None)
        if wait and threading.current_thread() is not self._worker:
            self._worker.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def poll(self) -> None:
        """Nothing to do: results reach the futures from the worker thread (session_contract.py)."""

    def fileno(self) -> None:
        """No connection to watch (a WorkerSession returns its socket's)."""
        return None

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("the session is closed")

    # ----------------------------------------------------------------------------- queue plumbing

    def _enqueue(self, request: _Request) -> concurrent.futures.Future:
        self._pending.append(request)
        self._queue.put(request)
        return request.future

    def _cancel(self, predicate) -> None:
        for request in self._pending:
            if predicate(request):
                request.future.cancel()
        self._pending = [r for r in self._pending if not r.future.cancelled()]

    def _wait(self, future: concurrent.futures.Future):
        if threading.current_thread() is self._worker:
            raise SessionError("synchronous session call from the session's own worker thread (e.g. in a "
                               "future callback): use the submit_* methods there")
        return future.result()

    def _work(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                self._cache.clear()  # the embeddings go with the thread (also after close(wait=False))
                return
            with self._lock:
                if request in self._pending:
                    self._pending.remove(request)
            if request.future.set_running_or_notify_cancel():
                self._execute(request)

    def _execute(self, request: _Request) -> None:
        handlers = {"image": self._run_image, "same_image": self._run_same_image, "prompts": self._run_prompts,
                    "undo": self._run_undo, "reset": self._run_reset, "labels": self._run_labels}
        try:
            result = handlers[request.kind](request)
        except BaseException as error:  # delivered to the caller through the future
            request.future.set_exception(error)
        else:
            request.future.set_result(result)
