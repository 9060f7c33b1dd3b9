"""Intensity normalisation: the challenge organisers' (MedSAM) preprocessing to 0..255.

* CT: clip to a window (level +- width / 2), then min-max rescale the clipped values to
  0..255 (MedSAM rescales by the clipped array's own min and max, which equal the window
  bounds whenever the scan spans the window).
* Other modalities: clip to the 0.5 and 99.5 percentiles of the voxels > 0, min-max rescale
  to 0..255, and set voxels that were exactly 0 back to 0.
* The float result is truncated to uint8, as ``np.uint8(x)`` does in the organisers' script.
* An integer array already within 0..255 (e.g. a challenge ``imgs``) is left as it is,
  whatever the modality: it has been preprocessed already.

``normalize_intensities`` returns that uint8 result / 255 as float32 in [0, 1], so the model
sees exactly the values it was trained on (challenge files are uint8).
"""

from __future__ import annotations

import numpy as np

CT_WINDOWS = {  # name: (width, level) in HU
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -160.0),
    "brain": (80.0, 40.0),
    "bone": (1800.0, 400.0),
}
MODALITIES = ("ct", "mr", "pet", "us", "xray", "microscopy", "other")  # all but "ct" use percentiles
PERCENTILES = (0.5, 99.5)
CT_GUESS_MIN, CT_GUESS_MAX = -500.0, 300.0


class IntensityError(ValueError):
    """An image that cannot be normalised (NaN/Inf, non-numeric dtype, unknown option)."""


def _checked(array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise IntensityError(f"image must be a real numeric array, got dtype {array.dtype}")
    if array.size == 0:
        raise IntensityError("image is empty")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise IntensityError("image contains NaN or Inf values")
    return array


def is_uint8_range(array) -> bool:
    """Integer dtype with all values in 0..255 (already preprocessed)."""
    array = np.asarray(array)
    return bool(
        np.issubdtype(array.dtype, np.integer) and array.size and array.min() >= 0 and array.max() <= 255
    )


def guess_modality(array) -> str:
    """'ct' when the range looks like Hounsfield units (min < -500 and max > 300), else 'other'.

    Air in a CT is about -1000 HU and bone or contrast above 300 HU; MR, PET and other
    modalities are (nearly) never below -500. A CT cropped to soft tissue only is missed.
    """
    array = _checked(array)
    return "ct" if float(array.min()) < CT_GUESS_MIN and float(array.max()) > CT_GUESS_MAX else "other"


def _window_bounds(ct_window) -> tuple[float, float]:
    if isinstance(ct_window, str):
        if ct_window not in CT_WINDOWS:
            raise IntensityError(f"unknown CT window {ct_window!r}; use one of {sorted(CT_WINDOWS)} or (width, level)")
        width, level = CT_WINDOWS[ct_window]
    else:
        width, level = (float(v) for v in ct_window)
        if not width > 0:
            raise IntensityError(f"CT window width must be > 0, got {width}")
    return level - width / 2, level + width / 2


def _rescale_to_255(clipped: np.ndarray) -> np.ndarray:
    """Min-max rescale to 0..255 (float64); a constant array gives zeros."""
    lo, hi = float(clipped.min()), float(clipped.max())
    if hi <= lo:
        return np.zeros(clipped.shape, np.float64)
    return (clipped - lo) / (hi - lo) * 255.0


def to_uint8(array, modality: str = "auto", ct_window="soft_tissue") -> np.ndarray:
    """Image -> uint8 0..255, the challenge way (module docstring). Same shape as ``array``.

    ``modality``: "auto" (guess_modality), "ct", or any of MODALITIES (non-CT: percentiles);
    case does not matter.
    ``ct_window``: a CT_WINDOWS name or (width, level) in HU.
    """
    array = _checked(array)
    modality = str(modality).lower()
    if modality != "auto" and modality not in MODALITIES:
        raise IntensityError(f"unknown modality {modality!r}; use 'auto' or one of {MODALITIES}")
    lower, upper = _window_bounds(ct_window)  # validated even when unused
    if is_uint8_range(array):
        return array.astype(np.uint8, copy=False)
    if modality == "auto":
        modality = guess_modality(array)
    data = array.astype(np.float64)
    if modality == "ct":
        out = _rescale_to_255(np.clip(data, lower, upper))
    else:
        positive = data[data > 0]
        reference = positive if positive.size else data  # an all-non-positive image: use all voxels
        lower, upper = np.percentile(reference, PERCENTILES)
        out = _rescale_to_255(np.clip(data, lower, upper))
        out[data == 0] = 0
    return out.astype(np.uint8)  # truncation, as np.uint8(float array) in the organisers' code


def normalize_intensities(array, modality: str = "auto", ct_window="soft_tissue") -> np.ndarray:
    """Image -> float32 in [0, 1]: ``to_uint8(...) / 255`` (module docstring)."""
    return to_uint8(array, modality, ct_window).astype(np.float32) / np.float32(255.0)
