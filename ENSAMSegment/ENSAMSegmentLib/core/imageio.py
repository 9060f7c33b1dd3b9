"""Reading and writing volumes, label maps, Slicer .seg.nrrd files and challenge .npz cases.

Volumes come back as (array (z, y, x), VolumeGeometry); see geometry.py for the conventions.
Medical formats go through SimpleITK (.nii, .nii.gz, .nrrd, .mha, .mhd); challenge cases are
.npz files with ``imgs`` (D, H, W) uint8, ``spacing`` and optional ``gts``, ``boxes``,
``clicks``, ``clicks_order``, ``prev_pred`` (technical notes, section 3).

Trust: the challenge stores ``boxes``, ``clicks`` and ``clicks_order`` as pickled object
arrays, and the challenge itself reads them with ``np.load(..., allow_pickle=True)``.
Unpickling runs code chosen by whoever wrote the file, so ``read_challenge_npz`` unpickles
only those three keys, and only with ``allow_pickle=True`` (the default, for files from the
challenge or from this project); pass ``allow_pickle=False`` for files of unknown origin.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .geometry import NPZ_SPACING_ORDER, VolumeGeometry

SITK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
PICKLED_KEYS = ("boxes", "clicks", "clicks_order")
CASE_ARRAY_KEYS = ("imgs", "gts", "spacing", "prev_pred")

# Segment colours (0..1) used when none are given; the first ones follow Slicer's
# GenericAnatomyColors look (tissue, bone, vessel, ...): any distinct colours would do.
DEFAULT_COLORS = (
    (0.502, 0.682, 0.502), (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565), (0.753, 0.408, 0.698),
    (0.863, 0.961, 0.078), (0.306, 0.247, 0.000), (1.000, 0.980, 0.863), (0.902, 0.863, 0.275),
)


class ImageReadError(OSError):
    """A file that is missing, unreadable, corrupt, or not a scalar 3-D volume."""


class ImageWriteError(ValueError):
    """Data that cannot be written as asked (wrong dtype, shape, format)."""


# ---------------------------------------------------------------------------------------------
# Volumes and label maps (SimpleITK)


def _suffix(path, allowed: Sequence[str]) -> str | None:
    name = str(path).lower()
    return next((s for s in allowed if name.endswith(s)), None)


def read_image(path, npz_spacing_order: str = NPZ_SPACING_ORDER) -> tuple[np.ndarray, VolumeGeometry]:
    """A scalar 3-D volume -> (array (z, y, x) as stored, geometry).

    .nii/.nii.gz/.nrrd/.mha/.mhd via SimpleITK, or a challenge .npz (its ``imgs``, with a
    geometry from its ``spacing``: identity direction, zero origin).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"no such file: {path}")
    if str(path).lower().endswith(".npz"):
        case = read_challenge_npz(path)
        return case.imgs, VolumeGeometry.from_npz_spacing(case.spacing, case.imgs.shape, npz_spacing_order)
    if _suffix(path, SITK_SUFFIXES) is None:
        raise ImageReadError(f"unsupported file type: {path.name} (use one of {', '.join(SITK_SUFFIXES)}, .npz)")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ImageReadError(f"cannot read {path}: {_first_line(error)}") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        hint = " (a multi-layer Slicer segmentation: use read_segmentation_nrrd)" if path.name.endswith(".seg.nrrd") else ""
        raise ImageReadError(
            f"{path.name} is a vector image ({image.GetNumberOfComponentsPerPixel()} components per voxel); "
            f"need a scalar 3-D volume{hint}"
        )
    if image.GetDimension() != 3:
        raise ImageReadError(f"{path.name} is {image.GetDimension()}-D (size {image.GetSize()}); need a 3-D volume")
    return sitk.GetArrayFromImage(image), VolumeGeometry.from_sitk(image)


def _first_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def _to_sitk(array: np.ndarray, geometry: VolumeGeometry) -> sitk.Image:
    if array.ndim != 3 or tuple(array.shape) != geometry.shape:
        raise ImageWriteError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    return geometry.apply_to_sitk(sitk.GetImageFromArray(np.ascontiguousarray(array)))


def _write_sitk(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(path), True)  # compressed
    except RuntimeError as error:
        raise ImageWriteError(f"cannot write {path}: {_first_line(error)}") from error


def write_image(path, array, geometry: VolumeGeometry) -> Path:
    """Write a scalar volume (z, y, x), any numeric dtype, compressed (.nii.gz, .nrrd, .mha, ...)."""
    path = Path(path)
    if _suffix(path, SITK_SUFFIXES) is None:
        raise ImageWriteError(f"unsupported output type: {path.name} (use one of {', '.join(SITK_SUFFIXES)})")
    array = np.asarray(array)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ImageWriteError(f"cannot write an image of dtype {array.dtype}")
    _write_sitk(_to_sitk(array, geometry), path)
    return path


def as_labels(labels) -> np.ndarray:
    """Integer/bool array with values 0..255 -> uint8 (clear error otherwise)."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ImageWriteError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ImageWriteError(f"label values must lie in 0..255, got {labels.min()}..{labels.max()}")
    return labels.astype(np.uint8, copy=False)


def write_labelmap(path, labels, geometry: VolumeGeometry, names=None, colors=None) -> Path:
    """Write a uint8 label map (z, y, x), compressed: .nii.gz, .nii, .nrrd, .mha, or .seg.nrrd.

    A ``.seg.nrrd`` path writes a Slicer segmentation (see write_segmentation_nrrd, which
    takes ``names``/``colors``); other formats ignore them.
    """
    path = Path(path)
    suffix = _suffix(path, LABELMAP_SUFFIXES)
    if suffix is None:
        raise ImageWriteError(f"unsupported label map type: {path.name} (use one of {', '.join(LABELMAP_SUFFIXES)})")
    if suffix == ".seg.nrrd":
        return write_segmentation_nrrd(path, labels, geometry, names=names, colors=colors)
    _write_sitk(_to_sitk(as_labels(labels), geometry), path)
    return path


# ---------------------------------------------------------------------------------------------
# Slicer segmentation (.seg.nrrd)


def _segment_labels(labels: np.ndarray, names) -> list[int]:
    """Label values written as segments: those present, plus every label that has a name."""
    present = {int(v) for v in np.unique(labels) if v != 0}
    if isinstance(names, Mapping):
        named = {int(k) for k in names}
    else:
        named = set(range(1, len(names) + 1)) if names is not None else set()
    if 0 in named:
        raise ImageWriteError("label 0 is the background and cannot be a segment")
    return sorted(present | named)


def _lookup(values, label: int, default):
    """names/colors given as {label: value} or as a list where item i is label i + 1."""
    if values is None:
        return default
    if isinstance(values, Mapping):
        return values.get(label, default)
    return values[label - 1] if 0 < label <= len(values) else default


def _extent_ijk(mask: np.ndarray) -> str:
    """Slicer's Segment{i}_Extent: 'i_min i_max j_min j_max k_min k_max' ('0 -1 ...' when empty)."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    ranges = []
    for axis in (2, 1, 0):  # i (x), j (y), k (z)
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        ranges += [int(hit[0]), int(hit[-1])]
    return " ".join(map(str, ranges))


def write_segmentation_nrrd(path, labels, geometry: VolumeGeometry, names=None, colors=None) -> Path:
    """Write a Slicer segmentation file (.seg.nrrd): one label map layer, one segment per label.

    ``names``/``colors`` are {label: value} or lists whose item i belongs to label i + 1;
    colours are (r, g, b) in 0..1. Segments: every non-zero label present, plus every named
    label (an empty segment keeps its name in Slicer). Header fields are those Slicer's
    vtkMRMLSegmentationStorageNode writes for a single-layer ("shared") binary labelmap.
    """
    path = Path(path)
    if not str(path).lower().endswith(".seg.nrrd"):
        raise ImageWriteError(f"a Slicer segmentation file must end in .seg.nrrd: {path.name}")
    labels = as_labels(labels)
    image = _to_sitk(labels, geometry)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_SourceRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for index, label in enumerate(_segment_labels(labels, names)):
        color = np.asarray(_lookup(colors, label, DEFAULT_COLORS[(label - 1) % len(DEFAULT_COLORS)]), float)
        if color.shape != (3,) or np.any(color < 0) or np.any(color > 1):
            raise ImageWriteError(f"colour of label {label} must be (r, g, b) in 0..1, got {color.tolist()}")
        name = str(_lookup(names, label, f"Segment_{label}"))
        if "\n" in name or "|" in name:
            raise ImageWriteError(f"segment name may not contain a newline or '|': {name!r}")
        fields = {
            "ID": f"Segment_{label}",
            "Name": name,
            "NameAutoGenerated": "0" if _lookup(names, label, None) is not None else "1",
            "Color": " ".join(f"{c:.6g}" for c in color),
            "ColorAutoGenerated": "0" if _lookup(colors, label, None) is not None else "1",
            "LabelValue": str(label),
            "Layer": "0",
            "Extent": _extent_ijk(labels == label),
            "Tags": "Segmentation.Status:inprogress|",
        }
        for key, value in fields.items():
            image.SetMetaData(f"Segment{index}_{key}", value)
    _write_sitk(image, path)
    return path


@dataclass
class SegmentInfo:
    """One segment of a .seg.nrrd file."""

    id: str
    name: str
    label: int  # value in the label map returned by read_segmentation_nrrd
    color: tuple[float, float, float]
    layer: int = 0
    extent: tuple[int, ...] = ()


def read_segmentation_nrrd(path) -> tuple[np.ndarray, VolumeGeometry, list[SegmentInfo]]:
    """A Slicer .seg.nrrd -> (labels (z, y, x) uint8, geometry, segments).

    A single-layer file keeps its label values. A multi-layer file (overlapping segments,
    stored as a 4-D NRRD) is flattened: segment n gets label n + 1, later segments win.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"no such file: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ImageReadError(f"cannot read {path}: {_first_line(error)}") from error
    meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    segments = []
    while f"Segment{len(segments)}_ID" in meta:
        p = f"Segment{len(segments)}_"
        extent = tuple(int(v) for v in meta.get(p + "Extent", "").split())
        color = tuple(float(v) for v in meta.get(p + "Color", "0.5 0.5 0.5").split())
        segments.append(
            SegmentInfo(
                id=meta[p + "ID"],
                name=meta.get(p + "Name", meta[p + "ID"]),
                label=int(meta.get(p + "LabelValue", len(segments) + 1)),
                color=color,
                layer=int(meta.get(p + "Layer", 0)),
                extent=extent,
            )
        )
    if not segments:
        raise ImageReadError(f"{path.name} has no Segment0_ID field: not a Slicer segmentation file")
    if image.GetDimension() != 3:
        raise ImageReadError(f"{path.name} is {image.GetDimension()}-D; need a 3-D segmentation")
    array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, layers)
    if image.GetNumberOfComponentsPerPixel() == 1:
        labels = as_labels(array)
    else:
        labels = np.zeros(array.shape[:3], np.uint8)
        for n, seg in enumerate(segments):
            labels[array[..., seg.layer] == seg.label] = n + 1
            seg.label, seg.layer = n + 1, 0
    return labels, VolumeGeometry.from_sitk(image), segments


# ---------------------------------------------------------------------------------------------
# Challenge .npz cases


@dataclass
class ChallengeCase:
    """One challenge case; arrays are (D, H, W) = (z, y, x). ``spacing`` is as stored (geometry.py)."""

    imgs: np.ndarray
    spacing: np.ndarray
    gts: np.ndarray | None = None
    boxes: list[dict] | None = None  # per class: z_min, z_max, z_mid, z_mid_x_min, ...
    clicks: list[dict] | None = None  # per class: {"fg": [[z, y, x], ...], "bg": [...]}
    clicks_order: list[list] | None = None  # per class: "fg" / "bg" in click order
    prev_pred: np.ndarray | None = None
    name: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # any other arrays, kept as read

    def __post_init__(self):
        self.imgs = np.asarray(self.imgs)
        self.spacing = np.asarray(self.spacing, dtype=np.float64)
        if self.imgs.ndim != 3:
            raise ValueError(f"imgs must be 3-D (D, H, W), got shape {self.imgs.shape}")
        if self.spacing.shape != (3,):
            raise ValueError(f"spacing must hold 3 values, got shape {self.spacing.shape}")
        for key in ("gts", "prev_pred"):
            value = getattr(self, key)
            if value is not None and np.shape(value) != self.imgs.shape:
                raise ValueError(f"{key} shape {np.shape(value)} differs from imgs shape {self.imgs.shape}")


def _int_lists(points) -> list[list[int]]:
    return [[int(v) for v in np.asarray(p).ravel()] for p in points]


def _unpickled(key: str, value: np.ndarray):
    """Object arrays of the challenge -> plain Python lists of dicts/lists with ints."""
    items = value.tolist()
    if key == "boxes":
        return [{k: int(v) for k, v in dict(b).items()} for b in items]
    if key == "clicks":
        return [{k: _int_lists(v) for k, v in dict(c).items()} for c in items]
    return [list(order) for order in items]  # clicks_order


def read_challenge_npz(path, allow_pickle: bool = True) -> ChallengeCase:
    """Read a challenge case; see the module docstring for ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"no such file: {path}")
    data: dict = {}
    pickled = []
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    data[key] = npz[key]
                except ValueError as error:
                    if key not in PICKLED_KEYS or "allow_pickle" not in str(error):
                        raise
                    pickled.append(key)
        if pickled and not allow_pickle:
            raise ImageReadError(
                f"{path.name}: {pickled} hold pickled objects; read the file with "
                "allow_pickle=True only if you trust it"
            )
        if pickled:
            with np.load(path, allow_pickle=True) as npz:
                data.update({key: npz[key] for key in pickled})
    except ImageReadError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as error:
        raise ImageReadError(f"cannot read {path} as an .npz file: {error}") from error
    for key in PICKLED_KEYS:  # object arrays, or plain ones (e.g. equal-length clicks_order)
        if key in data:
            try:
                data[key] = _unpickled(key, data[key])
            except (TypeError, ValueError, AttributeError) as error:
                raise ImageReadError(f"{path.name}: malformed '{key}': {error}") from error
    if "imgs" not in data:
        raise ImageReadError(f"{path.name} has no 'imgs' array (keys: {sorted(data)})")
    if "spacing" not in data:
        raise ImageReadError(f"{path.name} has no 'spacing' array")
    known = set(CASE_ARRAY_KEYS) | set(PICKLED_KEYS)
    try:
        return ChallengeCase(
            **{k: data[k] for k in known if k in data},
            name=path.name[: -len(".npz")] if path.name.endswith(".npz") else path.stem,
            extra={k: v for k, v in data.items() if k not in known},
        )
    except ValueError as error:
        raise ImageReadError(f"{path.name}: {error}") from error


def _object_array(items: list) -> np.ndarray:
    """A 1-D object array holding ``items`` as they are (ragged lists stay lists)."""
    out = np.empty(len(items), dtype=object)
    for n, item in enumerate(items):
        out[n] = item
    return out


def _atomic_savez(path, arrays: dict) -> Path:
    """np.savez_compressed to a temporary file beside ``path``, then os.replace."""
    path = Path(path)
    if not path.name.endswith(".npz"):
        raise ImageWriteError(f"an .npz file name must end in .npz: {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_challenge_npz(path, case: ChallengeCase) -> Path:
    """Write a case in the challenge layout (atomically). None fields are left out."""
    arrays = {"imgs": case.imgs, "spacing": case.spacing, **case.extra}
    for key in ("gts", "prev_pred"):
        if getattr(case, key) is not None:
            arrays[key] = as_labels(getattr(case, key))
    if case.boxes is not None:
        arrays["boxes"] = _object_array([dict(b) for b in case.boxes])
    if case.clicks is not None:
        arrays["clicks"] = _object_array([dict(c) for c in case.clicks])
    if case.clicks_order is not None:
        arrays["clicks_order"] = _object_array([list(o) for o in case.clicks_order])
    return _atomic_savez(path, arrays)


def write_segs_npz(path, segs) -> Path:
    """Write a prediction the way the challenge expects it: ``segs`` uint8 (D, H, W), atomically."""
    segs = as_labels(segs)
    if segs.ndim != 3:
        raise ImageWriteError(f"segs must be 3-D (D, H, W), got shape {segs.shape}")
    return _atomic_savez(path, {"segs": segs})
