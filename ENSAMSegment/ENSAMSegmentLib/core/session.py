"""The interactive inference session: one image, cached embeddings, objects with undo, merged labels.

    with InferenceSession(model_path=None, device="auto") as session:   # default model file
        session.set_image(array_zyx, spacing_zyx=(1.0, 1.0, 1.0))       # encoder runs once here
        oid = session.create_object()
        update = session.add_box((z0, y0, x0), (z1, y1, x1))            # inclusive voxel corners
        update = session.add_click((z, y, x), foreground=False)
        labelmap[update.changed] = update.mask[update.changed]           # rewrite only what changed
        session.undo(); labels = session.merged_labels()

Working grid (what the encoder sees; mirrors training, where the model saw crops around the object
with a 1-64 voxel margin, max-pooled by integer factors above a 4,194,304-voxel budget, padded to 8):

* "whole" mode: the image fits `voxel_budget` (default 8,388,608 = 128x256x256) at native resolution.
  It is encoded whole, once. An object with a box is decoded only over the bounding box of its box
  and clicks plus `decode_margin` (default 16) voxels, aligned to 8 (`ENSAM.decode(region=...)`;
  the decoder also sees 2 more bottleneck cells of context); an object with clicks only, or a region
  covering >= `full_decode_fraction` of the grid, is decoded whole. A click outside the decoded region
  grows the region (no re-encode). Voxels outside the decoded region are background.
* "large" mode (e.g. a 512x512x300 CT): a global view, max-pooled to `global_voxel_budget` (default
  4,194,304, the training maximum), is encoded at `set_image` and serves objects without a box.
  A box makes the session encode a box-centred crop (box and clicks + `context_margin`, default 32
  voxels, the mean training margin) at native resolution, max-pooled only if it is still above
  `voxel_budget`; the last `max_cached_regions` (default 2) crop embeddings are cached. A click
  outside the object's crop grows the crop: a new crop is encoded (the cost of one encoder pass).
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
import hashlib
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import devices
from .network import Prompts
from .intensity import CT_WINDOWS, MODALITIES, IntensityError, to_uint8
from .session_region import (
    Grid, MaskCrop, Placed, Slices, box_grid, changed_region, decode_region, grid_input, image_logits,
    intersect, pool_factors, resample, shift, union, whole_grid,
)
from .session_window import block_region, click_window, grow_window, patched_block

TRAINING_VOXEL_BUDGET = 4_194_304
DEFAULT_CLICK_WINDOW = 32  # voxels either side of a click (session_window.py)


# --------------------------------------------------------------------------------- errors


class SessionError(Exception):
    """Base class of every error the session raises on purpose."""


class InvalidImageError(SessionError, ValueError):
    """Not a usable image: not 3-D, empty, non-numeric, NaN/Inf, bad spacing or intensity options."""


class InvalidPromptError(SessionError, ValueError):
    """A box or click that is malformed, outside the image, or an inverted box."""


class UnknownObjectError(SessionError, LookupError):
    """No object with that id (or no object selected)."""


class ImageTooLargeError(SessionError, ValueError):
    """An image too large to hold, or needing more than `max_pool_factor` downsampling."""


class NoImageError(SessionError, RuntimeError):
    """An operation that needs an image before `set_image`."""


class StaleRequest(SessionError):
    """The request's object was removed, or its image replaced, while the request ran."""


class SessionClosedError(SessionError, RuntimeError):
    """The session was closed."""


class ModelLoadError(SessionError):
    """The model file could not be loaded (the message says why)."""


# --------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SegmentationUpdate:
    """Result of one interaction on one object.

    mask: the object's new boolean mask, full image (z, y, x). changed: 3 slices bounding every voxel
    whose mask value changed (None: nothing changed). logits_region: the image slices where this step
    computed logits (None for undo/reset). seconds: worker time of the request; timings: its parts.
    step: the object's number of steps after the update (0 = empty). decoding: "whole" grid, box
    "region" or click "window" (see the module docstring).
    """

    object_id: int
    mask: np.ndarray
    changed: Slices | None
    logits_region: Slices | None
    seconds: float
    timings: dict = field(default_factory=dict)
    step: int = 0
    decoding: str = ""  # how logits were computed: "whole", "region", "window" ("" for undo/reset)
    window_growth: int = 0  # times a click's window grew (session_window.py)


@dataclass(frozen=True)
class ImageReport:
    """What `set_image` did: mode "whole" or "large", the main grid, whether the encoder ran."""

    shape: tuple
    spacing_zyx: tuple
    mode: str
    grid_shape: tuple
    grid_factor: tuple
    encoded: bool
    seconds: float
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectPrompts:
    """An object's prompts in image voxel indices (z, y, x); box corners inclusive."""

    box: tuple | None = None
    fg: tuple = ()
    bg: tuple = ()

    def points(self) -> list:
        return ([] if self.box is None else list(self.box)) + list(self.fg) + list(self.bg)

    def bounds(self) -> tuple[tuple, tuple]:
        p = np.array(self.points())
        return tuple(p.min(0).tolist()), tuple(p.max(0).tolist())

    def apply(self, prompt: tuple) -> ObjectPrompts:
        """("box", lo, hi) starts over with that box; ("click", point, foreground) adds a click."""
        if prompt[0] == "box":
            return ObjectPrompts(box=(prompt[1], prompt[2]))
        _, point, foreground = prompt
        return replace(self, fg=self.fg + (point,)) if foreground else replace(self, bg=self.bg + (point,))


@dataclass(frozen=True)
class _Step:
    """One entry of an object's history: prompts, their logits (None: empty object) and mask."""

    prompts: ObjectPrompts = ObjectPrompts()
    logits: Placed | None = None
    grid: Grid | None = None
    fill: float = 0.0  # stand-in logit beyond `logits` when fed back to a larger grid
    mask: MaskCrop = MaskCrop()
    norms: dict | None = field(default=None, compare=False)  # decoder statistics clicks reuse (windows)


_EMPTY = _Step()


@dataclass(eq=False)
class _Object:
    id: int
    history: list = field(default_factory=lambda: [_EMPTY])

    @property
    def current(self) -> _Step:
        return self.history[-1]


@dataclass(frozen=True)
class _Image:
    fingerprint: tuple
    shape: tuple
    spacing: tuple
    volume: np.ndarray  # uint8 (z, y, x), the normalised image
    mode: str
    main: Grid


@dataclass(eq=False)
class _Request:
    kind: str  # image | prompts | undo | reset | labels
    future: concurrent.futures.Future
    obj: _Object | None = None
    prompts: tuple = ()
    args: tuple = ()
    generation: int = 0
    submitted: float = field(default_factory=time.perf_counter)


# --------------------------------------------------------------------------------- validation


def check_image(array) -> np.ndarray:
    """A real-valued, finite, non-empty 3-D array, else InvalidImageError."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InvalidImageError(f"image must be 3-D (z, y, x), got {array.ndim}-D shape {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidImageError(f"image must be a real numeric array, got dtype {array.dtype}")
    if array.size == 0:
        raise InvalidImageError(f"image is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InvalidImageError("image contains NaN or Inf values")
    return array


def check_spacing(spacing) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InvalidImageError(f"spacing must be 3 numbers (z, y, x), got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InvalidImageError(f"spacing must be 3 positive finite numbers (z, y, x), got {spacing!r}")
    return values


def check_intensity_options(modality, ct_window):
    """Validate before anything changes (intensity.py would raise later, on the worker)."""
    modality = str(modality).lower()
    if modality != "auto" and modality not in MODALITIES:
        raise InvalidImageError(f"unknown modality {modality!r}; use 'auto' or one of {MODALITIES}")
    if ct_window is None:
        return modality, "soft_tissue"
    if isinstance(ct_window, str):
        if ct_window not in CT_WINDOWS:
            raise InvalidImageError(f"unknown CT window {ct_window!r}; use one of {sorted(CT_WINDOWS)} "
                                    "or (width, level) in HU")
        return modality, ct_window
    try:
        width, level = (float(v) for v in ct_window)
    except (TypeError, ValueError):
        raise InvalidImageError(f"CT window must be a name or (width, level), got {ct_window!r}") from None
    if not (width > 0 and math.isfinite(width) and math.isfinite(level)):
        raise InvalidImageError(f"CT window width must be > 0 and finite, got {ct_window!r}")
    return modality, (width, level)


def check_voxel(point, shape, what: str) -> tuple[int, int, int]:
    """A voxel index (z, y, x) inside `shape` (rounded to the nearest voxel), else InvalidPromptError."""
    try:
        p = np.asarray(point, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidPromptError(f"{what} must be 3 numbers (z, y, x), got {point!r}") from None
    if p.shape != (3,) or not np.isfinite(p).all():
        raise InvalidPromptError(f"{what} must be 3 finite numbers (z, y, x), got {point!r}")
    index = tuple(int(v) for v in np.rint(p))
    if any(i < 0 or i >= n for i, n in zip(index, shape)):
        raise InvalidPromptError(f"{what} {index} (z, y, x) is outside the image of shape {tuple(shape)}")
    return index


def image_fingerprint(array: np.ndarray, spacing, modality, ct_window) -> tuple:
    """(shape, dtype, spacing, options, blake2b of every byte): 2 ms/MB, exact."""
    data = np.ascontiguousarray(array)
    digest = hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()
    return data.shape, data.dtype.str, tuple(spacing), modality, str(ct_window), digest


# --------------------------------------------------------------------------------- the session


class InferenceSession:
    """Interactive ENSAM segmentation of one image (see the module docstring)."""

    def __init__(self, model=None, model_path=None, device="auto", *, precision: str = "auto",
                 voxel_budget: int = 8_388_608, global_voxel_budget: int = TRAINING_VOXEL_BUDGET,
                 decode_margin: int = 16, context_margin: int = 32, full_decode_fraction: float = 0.5,
                 max_pool_factor: int = 8, max_image_voxels: int = 2**30, max_undo: int | None = 32,
                 max_cached_regions: int = 2, empty_object_margin: float = 1.0, click_window: int | None = None,
                 click_window_growth: int = 1):
        if max_undo is not None and max_undo < 1:
            raise ValueError(f"max_undo must be >= 1 or None (unlimited), got {max_undo}")
        if not 512 <= global_voxel_budget <= voxel_budget:
            raise ValueError(f"need 512 <= global_voxel_budget ({global_voxel_budget}) <= voxel_budget "
                             f"({voxel_budget})")
        try:
            self.device = devices.resolve_device(device)
            self.amp_dtype = devices.autocast_dtype(self.device, precision)
        except ValueError as error:
            raise SessionError(str(error)) from None
        self.model, self.model_info = self._load(model, model_path)
        self.voxel_budget, self.global_voxel_budget = int(voxel_budget), int(global_voxel_budget)
        self.decode_margin, self.context_margin = int(decode_margin), int(context_margin)
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
                  ct_window=None) -> ImageReport:
        """Validate, normalise (intensity.py) and encode an image; returns an ImageReport."""
        return self._wait(self.submit_image(array_zyx, spacing_zyx, modality, ct_window))

    def submit_image(self, array_zyx, spacing_zyx=(1.0, 1.0, 1.0), modality: str = "auto",
                     ct_window=None) -> concurrent.futures.Future:
        """Asynchronous set_image. Validation errors raise here; do not modify the array until done."""
        self._check_open()
        array = check_image(array_zyx)
        spacing = check_spacing(spacing_zyx)
        modality, ct_window = check_intensity_options(modality, ct_window)
        self._check_size(array.shape)
        fingerprint = image_fingerprint(array, spacing, modality, ct_window)
        with self._lock:
            self._check_open()
            if self._submitted is not None and self._submitted[0] == fingerprint:
                return self._enqueue(_Request("same_image", concurrent.futures.Future()))
            self._cancel(lambda r: True)  # everything queued concerns the previous image
            self._objects.clear()
            self._next_id, self._selected = 1, None
            self._generation += 1
            self._submitted = (fingerprint, tuple(array.shape))
            request = _Request("image", concurrent.futures.Future(), args=(array, spacing, modality, ct_window,
                                                                           fingerprint))
            request.generation = self._generation
            return self._enqueue(request)

    def _check_size(self, shape) -> None:
        voxels = math.prod(shape)
        if voxels > self.max_image_voxels:
            raise ImageTooLargeError(f"image of shape {tuple(shape)} has {voxels:,} voxels, more than the "
                                     f"session's limit of {self.max_image_voxels:,}")
        factors = pool_factors(shape, self.global_voxel_budget)
        if max(factors) > self.max_pool_factor:
            raise ImageTooLargeError(
                f"image of shape {tuple(shape)} would need downsampling by {factors} (z, y, x) to fit the "
                f"global view of {self.global_voxel_budget:,} voxels; the limit is {self.max_pool_factor} "
                "per axis: crop the image first")

    # ----------------------------------------------------------------------------- prompts

    def add_box(self, kji_min, kji_max, object_id: int | None = None) -> SegmentationUpdate:
        """Box with inclusive corners (z, y, x); restarts the object's interaction with this box."""
        return self._wait(self.submit_box(kji_min, kji_max, object_id))

    def add_click(self, kji, foreground: bool = True, object_id: int | None = None) -> SegmentationUpdate:
        """Foreground (or background) click at voxel (z, y, x)."""
        return self._wait(self.submit_click(kji, foreground, object_id))

    def submit_box(self, kji_min, kji_max, object_id: int | None = None) -> concurrent.futures.Future:
        with self._lock:
            shape = self._submitted_shape()
            lo = check_voxel(kji_min, shape, "box corner kji_min")
            hi = check_voxel(kji_max, shape, "box corner kji_max")
            if any(a > b for a, b in zip(lo, hi)):
                raise InvalidPromptError(f"inverted (empty) box: kji_min {lo} > kji_max {hi} on some axis; "
                                         "corners are inclusive, the smallest box is one voxel")
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

    def close(self) -> None:
        """Cancel queued requests, finish the running one, stop the worker thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cancel(lambda r: True)
            self._queue.put(None)
        if threading.current_thread() is not self._worker:
            self._worker.join()
        self._cache.clear()

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

    # ----------------------------------------------------------------------------- worker: image

    def _run_image(self, request: _Request) -> ImageReport:
        array, spacing, modality, ct_window, fingerprint = request.args
        start = time.perf_counter()
        try:
            try:
                volume = to_uint8(array, modality, ct_window)
            except IntensityError as error:
                raise InvalidImageError(str(error)) from None
            normalised = time.perf_counter()
            mode = "whole" if pool_factors(volume.shape, self.voxel_budget) == (1, 1, 1) else "large"
            main = whole_grid(volume.shape, self.voxel_budget if mode == "whole" else self.global_voxel_budget)
            self._cache.clear()  # free the previous image's embeddings before encoding this one
            self._embedding(volume, main, main)
            image = _Image(fingerprint, tuple(volume.shape), spacing, volume, mode, main)
        except BaseException:
            with self._lock:
                self._image = None
                self._cache.clear()
                if self._generation == request.generation:
                    self._submitted = None
            raise
        with self._lock:
            self._image = image
        end = time.perf_counter()
        timings = {"queue": start - request.submitted, "normalize": normalised - start,
                   "encode": end - normalised, "total": end - start}
        return ImageReport(image.shape, spacing, mode, main.shape, main.factor, True, end - start, timings)

    def _run_same_image(self, request: _Request) -> ImageReport:
        image = self._require_image()
        return ImageReport(image.shape, image.spacing, image.mode, image.main.shape, image.main.factor,
                           False, 0.0, {"queue": time.perf_counter() - request.submitted})

    def _require_image(self) -> _Image:
        if self._image is None:
            raise NoImageError("no image: call set_image() first (or the last image failed to encode)")
        return self._image

    def _embedding(self, volume: np.ndarray, grid: Grid, main: Grid):
        """The cached embedding of `grid`, else encode it (worker thread only). The main grid's
        embedding stays; of the other (crop) grids, the `max_cached_regions` last used are kept."""
        if grid in self._cache:
            self._cache[grid] = self._cache.pop(grid)  # most recently used last
            return self._cache[grid]
        x = devices.prepare_input(grid_input(volume, grid), self.device, self.amp_dtype)
        with torch.inference_mode(), devices.autocast(self.device, self.amp_dtype):
            embedding = self.model.encode(x)
        del x
        self.encoder_runs += 1
        if grid != main:
            crops = [g for g in self._cache if g != main]
            while crops and len(crops) >= self.max_cached_regions:
                del self._cache[crops.pop(0)]
        self._cache[grid] = embedding
        return embedding

    # ----------------------------------------------------------------------------- worker: prompts

    def _run_prompts(self, request: _Request) -> SegmentationUpdate:
        start = time.perf_counter()
        image, current = self._checked_state(request)
        prompts = current.prompts
        for prompt in request.prompts:
            prompts = prompts.apply(prompt)
        restart = any(p[0] == "box" for p in request.prompts)
        previous = None if restart or current.logits is None else current

        grid = self._choose_grid(image, prompts, previous)
        t0 = time.perf_counter()
        embedding = self._embedding(image.volume, grid, image.main)
        t1 = time.perf_counter()
        clicks = [p[1] for p in request.prompts if p[0] == "click"]
        growth = 0
        if self._decodes_locally(grid, previous, clicks):
            region, logits, growth = self._decode_window(embedding, grid, prompts, previous, clicks)
            norms, decoding = previous.norms, "window"
        else:
            region, norms = None, {}
            if prompts.box is not None:
                region = decode_region(grid, *prompts.bounds(), self.decode_margin, self.full_decode_fraction)
            logits = self._decode(embedding, grid, prompts, previous, region, norms)
            decoding = "whole" if region is None else "region"
        t2 = time.perf_counter()

        placed = grid.placed(logits, region)
        extent, values = image_logits(placed, image.shape)
        mask = MaskCrop.from_region(extent, values > 0)
        step = _Step(prompts, placed, grid, min(0.0, placed.border_median()), mask, norms)
        changed = changed_region(current.mask, mask)
        obj = self._commit(request, image, lambda history: history.append(step))
        end = time.perf_counter()
        timings = {"queue": start - request.submitted, "encode": t1 - t0, "decode": t2 - t1,
                   "postprocess": end - t2, "total": end - start}
        return SegmentationUpdate(obj.id, mask.full(image.shape), changed, extent, end - start, timings,
                                  len(obj.history) - 1, decoding, growth)

    def _checked_state(self, request: _Request) -> tuple[_Image, _Step]:
        with self._lock:
            image = self._require_image()
            if request.generation != self._generation or self._objects.get(request.obj.id) is not request.obj:
                raise StaleRequest(f"object {request.obj.id} was removed or its image replaced")
            return image, request.obj.current

    def _commit(self, request: _Request, image: _Image, change) -> _Object:
        obj = request.obj
        with self._lock:
            if self._image is not image or self._objects.get(obj.id) is not obj:
                raise StaleRequest(f"object {obj.id} was removed or its image replaced while it was computed")
            change(obj.history)
            if self.max_undo is not None and len(obj.history) - 1 > self.max_undo:
                del obj.history[1]  # history[0] stays the empty state
        return obj

    def _choose_grid(self, image: _Image, prompts: ObjectPrompts, previous: _Step | None) -> Grid:
        """The main grid, or in large mode with a box: the object's crop if it still holds every prompt,
        else a new crop around the box and clicks."""
        if image.mode == "whole" or prompts.box is None:
            return image.main
        if (previous is not None and previous.grid != image.main
                and all(previous.grid.contains(p) for p in prompts.points())):
            return previous.grid
        return box_grid(image.shape, *prompts.bounds(), self.context_margin, self.voxel_budget)

    def _decode(self, embedding, grid: Grid, prompts: ObjectPrompts, previous: _Step | None,
                region, norms: dict) -> torch.Tensor:
        """One decoder call for one object -> float32 CPU logits [1, 1, *region or grid.padded];
        the decoder's GroupNorm statistics go into `norms` (for later windowed clicks)."""
        with torch.inference_mode(), devices.autocast(self.device, self.amp_dtype):
            logits = self.model.decode(embedding, self._prompts(grid, prompts), self._prev_logits(grid, previous),
                                       region, norms)
        return logits.float().cpu()

    def _decodes_locally(self, grid: Grid, previous: _Step | None, clicks: list) -> bool:
        """Clicks added to an object decoded before on this grid: decode a window (session_window.py)."""
        return bool(self.click_window and clicks and previous is not None and previous.grid == grid
                    and previous.norms)

    def _decode_window(self, embedding, grid: Grid, prompts: ObjectPrompts, previous: _Step,
                       clicks: list) -> tuple[Slices, torch.Tensor, int]:
        """Decode a window around the new clicks, growing it while the change reaches its faces ->
        (grid region, float32 CPU logits over it: the previous logits with the window written in,
        times the window grew)."""
        window = click_window(grid, clicks, self.click_window)
        half_cells = [math.ceil(self.click_window / f) for f in grid.factor]
        prev = self._prev_logits(grid, previous)  # [1, 1, *grid.padded]: what the window's logits replace
        with torch.inference_mode(), devices.autocast(self.device, self.amp_dtype):
            x, skips = self.model.decoder_inputs(embedding, self._prompts(grid, prompts), prev)
            for rounds in range(self.click_window_growth + 1):
                values = self.model.decoder.forward_window(x, skips, window, previous.norms).float().cpu()
                if rounds == self.click_window_growth:
                    break
                grown = grow_window(window, prev[(0, 0, *window)].cpu() > 0, values[0, 0] > 0, grid.padded,
                                    half_cells, [grid.to_grid(p) for p in clicks])
                if grown is None:
                    break
                window = grown
        return *patched_block(block_region(grid, previous.logits), prev, window, values), rounds

    def _prompts(self, grid: Grid, prompts: ObjectPrompts) -> Prompts:
        objects = {"fg": [grid.to_grid(p) for p in prompts.fg], "bg": [grid.to_grid(p) for p in prompts.bg]}
        if prompts.box is not None:
            objects["box"] = tuple(grid.to_grid(p) for p in prompts.box)
        return Prompts.from_objects([objects]).to(self.device)

    def _prev_logits(self, grid: Grid, previous: _Step | None) -> torch.Tensor | None:
        """The previous step's logits on the whole padded grid (fed back to the network), or None.
        Same grid: every value, padding included (as in training); another grid: image content only."""
        if previous is None:
            return None
        return resample(previous.logits, grid.origin, grid.factor, grid.padded, previous.fill,
                        clip=previous.grid != grid).to(self.device)

    # ----------------------------------------------------------------------------- worker: undo, reset

    def _run_undo(self, request: _Request) -> SegmentationUpdate:
        return self._history_op(request, lambda history: history.pop() if len(history) > 1 else None)

    def _run_reset(self, request: _Request) -> SegmentationUpdate:
        return self._history_op(request, lambda history: history.append(_EMPTY) if history[-1] is not _EMPTY
                                else None)

    def _history_op(self, request: _Request, change) -> SegmentationUpdate:
        start = time.perf_counter()
        image, before = self._checked_state(request)
        obj = self._commit(request, image, change)
        after = obj.current
        end = time.perf_counter()
        return SegmentationUpdate(obj.id, after.mask.full(image.shape), changed_region(before.mask, after.mask),
                                  None, end - start, {"queue": start - request.submitted, "total": end - start},
                                  len(obj.history) - 1)

    # ----------------------------------------------------------------------------- worker: merge

    def _run_labels(self, request: _Request) -> np.ndarray:
        with self._lock:
            image = self._require_image()
            steps = {oid: obj.current for oid, obj in sorted(self._objects.items()) if obj.current.logits is not None}
        ids = list(steps) or [0]
        if max(ids) > np.iinfo(np.uint16).max:
            raise SessionError(f"object id {max(ids)} does not fit a uint16 labelmap")
        labels = np.zeros(image.shape, np.uint8 if max(ids) <= 255 else np.uint16)
        if not steps:
            return labels
        logits = {oid: image_logits(step.logits, image.shape) for oid, step in steps.items()}
        area = None
        for extent, _ in logits.values():
            area = union(area, extent)
        best = merge_into(labels[area], area, logits)
        empty = [oid for oid in steps if not np.any(labels[area] == oid)]
        if empty:
            for oid in empty:
                logits[oid] = boost_empty(logits[oid], boost_box(steps[oid].prompts), best, area,
                                          self.empty_object_margin)
            merge_into(labels[area], area, logits)
        return labels


def merge_into(labels: np.ndarray, area: Slices, logits: dict) -> np.ndarray:
    """Write object ids into `labels` (the image over `area`): highest logit > 0 wins, ties to the lower
    id. logits: {id: (extent, float32 values)}. Returns the winning logit per voxel (0 = background)."""
    best = np.zeros(labels.shape, np.float32)
    labels[...] = 0
    for oid, (extent, values) in sorted(logits.items()):
        where = shift(extent, area)
        b, lab = best[where], labels[where]
        win = values > b
        b[win] = values[win]
        lab[win] = oid
    return best


def boost_box(prompts: ObjectPrompts) -> Slices | None:
    """Where an empty object's logits are raised: its box, else its foreground clicks' bounding box."""
    points = list(prompts.box) if prompts.box is not None else list(prompts.fg)
    if not points:
        return None
    p = np.array(points)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(p.min(0), p.max(0)))


def boost_empty(object_logits, box: Slices | None, best: np.ndarray, area: Slices, margin: float):
    """Add to the object's logits inside `box` the smallest constant that makes it win one voxel over
    `best` (the other objects' winning logits, 0 = threshold), plus `margin`."""
    extent, values = object_logits
    inside = None if box is None else intersect(box, extent)
    if inside is None:
        return object_logits
    gap = best[shift(inside, area)] - values[shift(inside, extent)]
    boosted = values.copy()
    boosted[shift(inside, extent)] += float(gap.min()) + margin
    return extent, boosted
