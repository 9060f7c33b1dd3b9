"""What every ENSAM session front takes and gives back: errors, results, prompts, input checks.

No torch here: the worker-process client (worker.py) runs in Slicer's GUI process, which never imports
torch for segmentation, and validates and reports exactly as the in-process session (session.py) does.
The contract both follow is written down in session_contract.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from .intensity import CT_WINDOWS, MODALITIES
from .session_masks import MaskCrop, Slices, pool_factors

TRAINING_VOXEL_BUDGET = 4_194_304
VOXEL_BUDGET = 8_388_608  # 128 x 256 x 256: encoded whole at native resolution up to this
MAX_IMAGE_VOXELS = 2**30
MAX_POOL_FACTOR = 8
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


class WorkerCrashedError(SessionError, RuntimeError):
    """The worker process that held the model ended unexpectedly (worker.py); its requests are lost, the
    session is closed, and a new session has to encode the image again."""


# --------------------------------------------------------------------------------- results


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
class SegmentationUpdate:
    """Result of one interaction on one object.

    changed: 3 slices bounding every voxel whose mask value changed (None: nothing changed); block: the
    object's new boolean mask over `changed` (None when nothing changed): what a front-end writes, and
    all that crosses a process boundary. mask: the object's whole new mask (z, y, x), made on first use.
    logits_region: the image slices where this step computed logits (None for undo/reset). seconds: time
    the session spent on the request (where the model runs); timings: its parts. step: the object's number
    of steps after the update (0 = empty). decoding: "whole" grid, box "region" or click "window" (session.py).
    prompts: the object's prompts after the update.
    """

    object_id: int
    changed: Slices | None
    block: np.ndarray | None
    logits_region: Slices | None
    seconds: float
    timings: dict = field(default_factory=dict)
    step: int = 0
    decoding: str = ""  # how logits were computed: "whole", "region", "window" ("" for undo/reset)
    window_growth: int = 0  # times a click's window grew (session_window.py)
    prompts: ObjectPrompts = ObjectPrompts()
    image_shape: tuple = ()
    crop: MaskCrop = field(default=MaskCrop(), repr=False, compare=False)  # the new mask, cropped

    @cached_property
    def mask(self) -> np.ndarray:
        """The object's new mask over the whole image (bool)."""
        return self.crop.full(self.image_shape)


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
    # a finite sum means every value is finite (NaN and Inf propagate, overflow gives Inf): one pass without a
    # temporary, 0.03 s for a 512x512x300 float32 CT on the GUI thread where isfinite().all() took 0.06 s;
    # only a sum that overflows (or NaN / Inf) asks every value
    if np.issubdtype(array.dtype, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(array.sum()) or np.isfinite(array).all()
        if not finite:
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
    """Validate before anything changes (intensity.py would raise later, where the model runs)."""
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


def check_box(kji_min, kji_max, shape) -> tuple[tuple, tuple]:
    """Inclusive box corners inside `shape`, not inverted, else InvalidPromptError."""
    lo = check_voxel(kji_min, shape, "box corner kji_min")
    hi = check_voxel(kji_max, shape, "box corner kji_max")
    if any(a > b for a, b in zip(lo, hi)):
        raise InvalidPromptError(f"inverted (empty) box: kji_min {lo} > kji_max {hi} on some axis; "
                                 "corners are inclusive, the smallest box is one voxel")
    return lo, hi


def default_global_budget(voxel_budget: int, global_voxel_budget: int | None = None) -> int:
    """The large-mode global view's budget: as given, else the training budget, at most `voxel_budget`."""
    if global_voxel_budget is not None:
        return int(global_voxel_budget)
    return min(TRAINING_VOXEL_BUDGET, int(voxel_budget))


def check_budgets(voxel_budget: int, global_voxel_budget: int | None = None) -> tuple[int, int]:
    """(voxel_budget, global view budget), or ValueError unless 512 <= global <= voxel_budget."""
    global_voxel_budget = default_global_budget(voxel_budget, global_voxel_budget)
    if not 512 <= global_voxel_budget <= voxel_budget:
        raise ValueError(f"need 512 <= global_voxel_budget ({global_voxel_budget}) <= voxel_budget "
                         f"({voxel_budget})")
    return int(voxel_budget), int(global_voxel_budget)


def check_size(shape, max_image_voxels: int, global_voxel_budget: int, max_pool_factor: int) -> None:
    """ImageTooLargeError for an image above `max_image_voxels`, or whose global view would need more
    than `max_pool_factor` downsampling along an axis."""
    voxels = math.prod(shape)
    if voxels > max_image_voxels:
        raise ImageTooLargeError(f"image of shape {tuple(shape)} has {voxels:,} voxels, more than the "
                                 f"session's limit of {max_image_voxels:,}")
    factors = pool_factors(shape, global_voxel_budget)
    if max(factors) > max_pool_factor:
        raise ImageTooLargeError(
            f"image of shape {tuple(shape)} would need downsampling by {factors} (z, y, x) to fit the "
            f"global view of {global_voxel_budget:,} voxels; the limit is {max_pool_factor} "
            "per axis: crop the image first")


def image_fingerprint(array: np.ndarray, spacing, modality, ct_window, identity=None) -> tuple:
    """(shape, dtype, spacing, options, blake2b of every byte): 2 ms/MB, exact. A caller that knows the image's
    identity (the prompt controller: the volume node and its image's modification time) passes it instead
    of hashing every byte on its GUI thread (0.3-0.7 s for a 512x512x300 CT)."""
    data = np.asarray(array)
    if identity is None:
        data = np.ascontiguousarray(data)
        digest = hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()
    else:
        digest = ("identity", repr(identity))
    return data.shape, data.dtype.str, tuple(spacing), modality, str(ct_window), digest


def check_image_request(session, array_zyx, spacing_zyx, modality, ct_window, identity):
    """What both session kinds check when an image is submitted, before anything changes: the array, the
    spacing, the intensity options and the size against `session`'s limits (max_image_voxels,
    global_voxel_budget, max_pool_factor). -> (array, spacing, modality, ct_window, fingerprint)."""
    array = check_image(array_zyx)
    spacing = check_spacing(spacing_zyx)
    modality, ct_window = check_intensity_options(modality, ct_window)
    check_size(array.shape, session.max_image_voxels, session.global_voxel_budget, session.max_pool_factor)
    return array, spacing, modality, ct_window, image_fingerprint(array, spacing, modality, ct_window, identity)
