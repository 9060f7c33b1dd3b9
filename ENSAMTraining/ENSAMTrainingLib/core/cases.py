"""Training cases: finding them (files, label maps, procedural scenes), case lists, and loading.

Sources (``find_cases(root)``), searched recursively under ``root``:

- Challenge .npz files (``imgs`` uint8 [D,H,W], ``gts`` labels 0..N, ``spacing``). Dataset and
  modality come from the path: ``<Modality>/<Dataset>/<case>.npz`` (the challenge's training
  tree; deeper trees use the last two folders); ``<Dataset>/<case>.npz`` (modality = the
  dataset name's prefix before "_", else "unknown"); a flat ``<case>.npz`` named
  ``<Modality>_<Dataset>_<rest>.npz`` (the challenge's file names) gives modality and
  "<Modality>_<Dataset>"; any other flat name belongs to a dataset named after ``root``.
- Image/label pairs (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage .mha/.mhd). Pairing rule:
  1. nnU-Net layout: a folder ``images*`` (imagesTr, imagesTs, images) beside ``labels*`` with
     the same ending; image ``<case>_0000.<ext>`` (or ``<case>.<ext>``) pairs with label
     ``<case>.<ext'>`` (any supported extension). Other channels (``_0001`` ...) are ignored.
     Dataset = the parent folder's name; modality = channel "0" of its ``dataset.json``
     (``channel_names`` or ``modality``) when present.
  2. Any other folder: a label is a file whose name ends with ``_seg``, ``_label``,
     ``_labels``, ``_mask`` or ``_gt`` before the extension; it pairs with the image
     ``<case>.<ext>`` or ``<case>_0000.<ext>`` in the same folder. Dataset and modality
     come from the folder path as for .npz files.
  An image with no label is still listed (``label=None``): loading it raises ``CaseError``
  ("missing labels"), so it is reported, not silently dropped.
  Pair intensities go through the organisers' preprocessing (CT windowing or percentile
  clipping to uint8) with the modality above.
- Label maps alone (``find_label_maps(root)``, kind "labels"): the image of every sample is
  synthesised from the labels of its crop (synth.py, SynthSeg-style); ``procedural_cases(n)``
  (kind "procedural") need no file: synth.procedural_scene draws the label map. A real case
  whose ``synth`` is above 0 (``with_synthesis``) has its image replaced by a synthesised one
  with that probability (``crop_arrays``, called by ``make_sample``).

Bad cases: loading raises ``CaseError`` with a reason; data.TrainingDataset skips them.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")
CHANNEL_SUFFIX = "_0000"


class DataError(Exception):
    """Training data that cannot be used; the message says what and where."""


class NoCasesError(DataError):
    """No usable case at all (empty or missing folder, empty list, every case bad)."""


class CaseError(DataError):
    """One case cannot be used. ``reason`` is a short category, ``str(error)`` the full message."""

    def __init__(self, case: str, reason: str, detail: str = ""):
        self.case, self.reason, self.detail = case, reason, detail
        super().__init__(f"{case}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class CaseRef:
    """Where one case lives. kind "npz": labels inside ``image``; "pair": labels in ``label``;
    "labels": a label map only (``label``, or ``image``'s gts); "procedural": no file (module docstring)."""

    image: Path
    label: Path | None
    dataset: str
    modality: str
    kind: str  # "npz" | "pair" | "labels" | "procedural"
    synth: float = 0.0  # probability that a sample's image is synthesised from its labels (synth.py)

    @property
    def name(self) -> str:
        return strip_extension(self.image.name)


@dataclass
class Case:
    """A loaded case: uint8 intensities and integer labels on the same grid (z, y, x)."""

    ref: CaseRef
    image: np.ndarray | None  # [D, H, W] uint8 (0-255) or float (rescaled later); None: synthesised per sample
    labels: np.ndarray  # [D, H, W] integer, 0 = background
    spacing: tuple[float, float, float]  # mm, (z, y, x)



# ---------------------------------------------------------------------------- discovery


def strip_extension(name: str) -> str:
    for ext in IMAGE_EXTENSIONS + (".npz",):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS)


def _dataset_from_folder(rel_parts: tuple[str, ...], root: Path, stem: str = "") -> tuple[str, str]:
    """(dataset, modality) from the folders between root and a file (see the module docstring)."""
    if len(rel_parts) >= 2:
        return rel_parts[-1], rel_parts[-2]
    if len(rel_parts) == 1:
        name = rel_parts[0]
        return name, name.split("_")[0] if "_" in name else "unknown"
    tokens = stem.split("_")
    if len(tokens) >= 3:
        return "_".join(tokens[:2]), tokens[0]
    return root.resolve().name, "unknown"


def _npz_case(path: Path, root: Path) -> CaseRef:
    rel = path.relative_to(root)
    dataset, modality = _dataset_from_folder(rel.parent.parts, root, strip_extension(path.name))
    return CaseRef(path, None, dataset, modality, "npz")


def _dataset_json_modality(folder: Path) -> str:
    try:
        info = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    channels = info.get("channel_names") or info.get("modality") or {}
    return str(channels.get("0", "unknown")) if isinstance(channels, dict) else "unknown"


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {strip_extension(p.name): p for p in sorted(folder.iterdir()) if is_image_file(p)}


def _nnunet_pairs(images_dir: Path, labels_dir: Path) -> list[CaseRef]:
    labels = _files_by_stem(labels_dir) if labels_dir.is_dir() else {}
    dataset = images_dir.parent.name
    modality = _dataset_json_modality(images_dir.parent)
    cases = []
    for stem, image in _files_by_stem(images_dir).items():
        if stem.endswith(CHANNEL_SUFFIX):
            stem = stem[: -len(CHANNEL_SUFFIX)]
        elif stem[-5:-4] == "_" and stem[-4:].isdigit():
            continue  # another channel of a multi-channel case
        cases.append(CaseRef(image, labels.get(stem), dataset, modality, "pair"))
    return cases


def _folder_pairs(folder: Path, root: Path) -> list[CaseRef]:
    files = _files_by_stem(folder)
    label_of: dict[str, Path] = {}
    for stem, path in files.items():
        for suffix in LABEL_SUFFIXES:
            if stem.endswith(suffix):
                label_of[stem[: -len(suffix)]] = path
    labels = set(label_of.values())
    dataset, modality = _dataset_from_folder(folder.relative_to(root).parts, root)
    cases = []
    for stem, image in files.items():
        if image in labels:
            continue
        key = stem[: -len(CHANNEL_SUFFIX)] if stem.endswith(CHANNEL_SUFFIX) else stem
        cases.append(CaseRef(image, label_of.get(key), dataset, modality, "pair"))
    return cases


def find_cases(root: str | Path) -> list[CaseRef]:
    """Every case under ``root`` (sorted by path). Raises NoCasesError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise NoCasesError(f"data folder {root} does not exist or is not a folder")
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))
    cases = [_npz_case(p, root) for p in sorted(root.rglob("*.npz")) if not p.name.startswith(".")]
    for folder in folders:
        lower = folder.name.lower()
        if lower.startswith("labels"):
            continue
        if lower.startswith("images"):
            cases += _nnunet_pairs(folder, folder.parent / ("labels" + folder.name[len("images") :]))
        else:
            cases += _folder_pairs(folder, root)
    if not cases:
        raise NoCasesError(
            f"no training cases in {root}: expected challenge .npz files (also nested as "
            "<Modality>/<Dataset>/<case>.npz) or image/label pairs (imagesTr/ + labelsTr/, or "
            "<case>.nii.gz beside <case>_seg.nii.gz)"
        )
    return sorted(cases, key=lambda c: str(c.image))


def find_label_maps(root: str | Path) -> list[CaseRef]:
    """Every label map under ``root`` as a kind "labels" case: the label of each image/label pair, the
    gts of each .npz, and every other image file (taken as a label map). Raises NoCasesError when none."""
    labels = []
    for ref in find_cases(root):
        path = ref.label if ref.label is not None else ref.image
        labels.append(CaseRef(ref.image, path, ref.dataset, ref.modality, "labels"))
    return labels


PROCEDURAL_SEED = 31_337


def procedural_cases(n: int) -> list[CaseRef]:
    """``n`` kind "procedural" cases: scene i is synth.procedural_scene with seed (PROCEDURAL_SEED, i)."""
    return [CaseRef(Path(f"procedural-{i:05d}"), None, "procedural", "synthetic", "procedural") for i in range(n)]


def with_synthesis(cases: list[CaseRef], probability: float) -> list[CaseRef]:
    """The cases with ``synth = probability`` (image synthesised from labels that often), kinds npz/pair only."""
    if not 0.0 <= probability <= 1.0:
        raise DataError(f"synthesis probability must lie in [0, 1], got {probability}")
    return [replace(c, synth=probability) if c.kind in ("npz", "pair") else c for c in cases]


def mix_cases(train: list[CaseRef], val: list[CaseRef], label_maps: list[CaseRef] = (),
              synth_probability: float = 0.0, procedural: int = 0, repeat: int = 1) -> list[CaseRef]:
    """The training list: ``train`` (images synthesised with ``synth_probability``) and the label maps
    whose file is not a validation case's, all ``repeat`` times, then ``procedural`` procedural scenes."""
    if repeat < 1 or procedural < 0:
        raise DataError(f"repeat must be >= 1 and procedural >= 0, got {repeat} and {procedural}")
    held = {c.image for c in val}
    files = with_synthesis(train, synth_probability) + [m for m in label_maps if m.image not in held]
    return files * repeat + procedural_cases(procedural)


def _relative(path: Path, root: str | Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # outside the data folder: keep it absolute
        return path.resolve().as_posix()


def case_key(ref: CaseRef, root: str | Path) -> str:
    """The line of a case list: the image path relative to root (tab, label path for pairs)."""
    if ref.kind == "procedural":
        return ref.name
    image = _relative(ref.image, root)
    if ref.kind in ("pair", "labels") and ref.label is not None:
        return f"{image}\t{_relative(ref.label, root)}"
    return image


def write_case_list(path: str | Path, cases: list[CaseRef], root: str | Path) -> None:
    Path(path).write_text("".join(case_key(c, root) + "\n" for c in cases), encoding="utf-8")


def read_case_list(path: str | Path, root: str | Path) -> list[CaseRef]:
    """The cases named in a list file (from ``ensam coreset``), resolved against ``root``.

    Lines are paths relative to root (absolute paths are allowed); "#" starts a comment.
    Dataset and modality are those ``find_cases`` would give. Raises NoCasesError when a
    listed file does not exist or the list is empty.
    """
    root = Path(root)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise NoCasesError(f"cannot read the case list {path}: {error.strerror or error}") from None
    entries = [line.split("#", 1)[0].strip() for line in lines]
    entries = [e for e in entries if e]
    if not entries:
        raise NoCasesError(f"the case list {path} names no case")
    known = {c.image.resolve(): c for c in find_cases(root)} if root.is_dir() else {}
    cases, missing = [], []
    for entry in entries:
        image, _, label = entry.partition("\t")
        image_path = (root / image).resolve()
        if image_path in known:
            cases.append(known[image_path])
        elif image_path.is_file():
            label_path = (root / label).resolve() if label else None
            kind = "npz" if image_path.suffix == ".npz" else "pair"
            cases.append(CaseRef(image_path, label_path, "unknown", "unknown", kind))
        else:
            missing.append(image)
    if missing:
        raise NoCasesError(f"{len(missing)} case(s) of {path} not found under {root}, e.g. {missing[0]}")
    return cases


# ---------------------------------------------------------------------------- loading


def _npz_spacing(data) -> tuple[float, float, float]:
    """(z, y, x) mm from a challenge npz (geometry.py decides the stored order); 1 mm when absent."""
    from ENSAMSegmentLib.core.geometry import GeometryError, npz_spacing_to_zyx

    try:
        return npz_spacing_to_zyx(data["spacing"])
    except (KeyError, GeometryError):
        return (1.0, 1.0, 1.0)  # only the validation's surface Dice uses spacing


def _load_npz(ref: CaseRef) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    try:
        with np.load(ref.image, allow_pickle=False) as data:
            if "imgs" not in data.files:
                raise CaseError(ref.name, "unreadable", f"no 'imgs' array in {ref.image.name}")
            image = data["imgs"]
            labels = data["gts"] if "gts" in data.files else None
            spacing = _npz_spacing(data)
    except CaseError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as error:
        raise CaseError(ref.name, "unreadable", str(error)) from None
    return image, labels, spacing


def intensity_modality(modality: str) -> str:
    """A dataset's modality name -> the ``modality`` argument of intensity.to_uint8 ("auto" if unknown)."""
    from ENSAMSegmentLib.core.intensity import MODALITIES

    name = modality.lower()
    name = {"mri": "mr", "t1": "mr", "t2": "mr", "flair": "mr", "ultrasound": "us", "pet-ct": "pet"}.get(name, name)
    return name if name in MODALITIES else "auto"


def _load_pair(ref: CaseRef) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    from ENSAMSegmentLib.core.imageio import ImageReadError, read_image
    from ENSAMSegmentLib.core.intensity import IntensityError, to_uint8

    try:
        image, geometry = read_image(ref.image)
        labels = read_image(ref.label)[0] if ref.label is not None else None
    except ImageReadError as error:
        raise CaseError(ref.name, "unreadable", str(error)) from None
    try:
        image = to_uint8(image, intensity_modality(ref.modality))
    except IntensityError as error:
        raise CaseError(ref.name, "broken normalisation", str(error)) from None
    return image, labels, geometry.spacing_zyx


def check_arrays(name: str, image: np.ndarray, labels: np.ndarray | None) -> None:
    """Raise CaseError when image/labels cannot train: missing, not 3-D, shapes differ, no label."""
    if labels is None:
        raise CaseError(name, "missing labels", "no 'gts' in the file or no label file found")
    if image.ndim != 3:
        raise CaseError(name, "not a 3-D volume", f"image shape {image.shape}")
    if labels.shape != image.shape:
        raise CaseError(name, "mismatched shapes", f"image {image.shape}, labels {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
        if not np.array_equal(labels, np.round(labels)):
            raise CaseError(name, "labels are not integers", f"dtype {labels.dtype}")
    if not labels.any():
        raise CaseError(name, "labels all background", "no voxel has a label > 0")


def load_arrays(ref: CaseRef) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """(image, labels or None, spacing_zyx) of a case, unchecked. Raises CaseError("unreadable")."""
    return _load_npz(ref) if ref.kind == "npz" else _load_pair(ref)


def _load_label_map(ref: CaseRef) -> Case:
    """A kind "labels" or "procedural" case: labels only (``Case.image`` None)."""
    if ref.kind == "procedural":
        from .synth import PROCEDURAL_SHAPE, procedural_scene

        rng = np.random.default_rng([PROCEDURAL_SEED, int(ref.name.rsplit("-", 1)[-1])])
        return Case(ref, None, procedural_scene(PROCEDURAL_SHAPE, rng), (1.0, 1.0, 1.0))
    path = ref.label if ref.label is not None else ref.image
    if path.name.lower().endswith(".npz"):
        _, labels, spacing = _load_npz(CaseRef(path, None, ref.dataset, ref.modality, "npz"))
    else:
        from ENSAMSegmentLib.core.imageio import ImageReadError, read_image

        try:
            labels, geometry = read_image(path)
        except ImageReadError as error:
            raise CaseError(ref.name, "unreadable", str(error)) from None
        spacing = geometry.spacing_zyx
    check_arrays(ref.name, labels, labels)  # labels stand in for the image: 3-D, integer, not empty
    return Case(ref, None, labels.astype(np.int32, copy=False), spacing)


def load_case(ref: CaseRef) -> Case:
    """Load and check one case. Raises CaseError (with a reason) when it cannot be used."""
    if ref.kind in ("labels", "procedural"):
        return _load_label_map(ref)
    image, labels, spacing = load_arrays(ref)
    check_arrays(ref.name, image, labels)
    return Case(ref, image, labels.astype(np.int32, copy=False), spacing)
