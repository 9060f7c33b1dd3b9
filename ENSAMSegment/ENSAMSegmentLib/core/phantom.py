"""Procedural phantoms: abdomen-like volumes with known labels, and the bundled sample CT.

Used by tests, the demo, benchmarks and synthetic evaluation/training sets. A phantom is a
body (elliptic cylinder along z with a fat rim and an unlabelled spine) holding labelled
structures, in this order (label n = STRUCTURES[n - 1]):

    liver   large smooth blob (ellipsoid deformed by low-frequency noise), patient right
    vessel  aorta-like tube running along z with a smooth wander, in front of the spine
    lesion  small hypodense sphere inside the liver
    kidney, spleen, then further blobs ("blob_6", ...)

Array axes are (z, y, x) with LPS-like anatomy: y grows posterior, x grows to the patient's
left, z grows superior. Sizes are set in mm from ``spacing`` (z, y, x), so a phantom looks
alike at any resolution. CT intensities are Hounsfield-like with Gaussian noise; MR ones are
T1-like with a smooth bias field and Rician noise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from .geometry import VolumeGeometry, rotation_matrix, zyx_to_npz_spacing
from .imageio import ChallengeCase, read_image, write_challenge_npz, write_image, write_labelmap
from .intensity import to_uint8
from .simulation import challenge_boxes  # the official box rule lives there

STRUCTURES = ("liver", "vessel", "lesion", "kidney", "spleen")
# (centre, radii) as fractions of the volume extent (z, y, x) for the blob structures
BLOBS = {
    "liver": ((0.50, 0.45, 0.32), (0.30, 0.22, 0.20)),
    "kidney": ((0.45, 0.64, 0.70), (0.14, 0.09, 0.07)),
    "spleen": ((0.58, 0.40, 0.75), (0.14, 0.10, 0.08)),
}
CT_HU = {"air": -1000, "fat": -100, "muscle": 50, "bone": 700,  # portal-venous-phase-like
         "liver": 105, "vessel": 170, "lesion": 45, "kidney": 180, "spleen": 120, "blob": 30}
MR_T1 = {"air": 0, "fat": 900, "muscle": 350, "bone": 250,
         "liver": 550, "vessel": 120, "lesion": 250, "kidney": 450, "spleen": 420, "blob": 650}
CT_NOISE_HU = 12.0
MR_NOISE = 25.0

SAMPLE_DATA_DIR = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
SAMPLE_FILES = {"image": "ensam-sample-ct.nrrd", "labels": "ensam-sample-ct-label.nrrd", "info": "ensam-sample-ct.json"}
SAMPLE_SHAPE = (96, 160, 160)
SAMPLE_SPACING_XYZ = (1.25, 1.25, 2.5)
SAMPLE_SEED = 2025
SAMPLE_N_OBJECTS = 5


class PhantomError(ValueError):
    """Phantom parameters that cannot give every structure (shape too small, bad modality)."""


def structure_names(n_objects: int) -> list[str]:
    """Names of labels 1..n_objects."""
    return [STRUCTURES[n] if n < len(STRUCTURES) else f"blob_{n + 1}" for n in range(n_objects)]


# ---------------------------------------------------------------------------------------------
# Shapes (all in mm, evaluated on open grids over a bounding box)


def _grid(shape, spacing, lo, hi):
    """Open mm grids (z, y, x) over voxel box [lo, hi) and the matching slices."""
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    axes = [np.arange(s.start, s.stop)[tuple(slice(None) if a == d else None for d in range(3))] * spacing[a]
            for a, s in enumerate(sl)]
    return axes, sl


def _box_around(centre, reach, shape, spacing):
    """Voxel box [lo, hi) covering centre +- reach mm, clipped to the volume."""
    c, r, s = np.asarray(centre), np.asarray(reach), np.asarray(spacing)
    lo = np.clip(np.floor((c - r) / s), 0, shape)
    hi = np.clip(np.ceil((c + r) / s) + 1, 0, shape)
    return lo.astype(int), hi.astype(int)


def _low_freq_noise(rng, coords, scale, n_modes=4):
    """Smooth noise in about [-1, 1]: a sum of random plane waves with wavelength ~ ``scale`` mm."""
    out = 0.0
    for _ in range(n_modes):
        w = rng.normal(size=3)
        w *= rng.uniform(0.6, 1.4) / (np.linalg.norm(w) * np.asarray(scale))
        phase = rng.uniform(0, 2 * np.pi)
        out = out + np.sin(2 * np.pi * sum(w[a] * coords[a] for a in range(3)) + phase)
    return out / np.sqrt(n_modes / 2)


def _blob(rng, shape, spacing, centre, radii, deform=0.2):
    """Mask and slices of a rotated ellipsoid deformed by smooth noise. centre/radii in mm (z, y, x)."""
    rot = rotation_matrix(rng.normal(size=3), rng.uniform(-25, 25))
    reach = np.max(radii) * (1 + 2 * deform)
    lo, hi = _box_around(centre, reach, shape, spacing)
    (z, y, x), sl = _grid(shape, spacing, lo, hi)
    d = [z - centre[0], y - centre[1], x - centre[2]]
    q = [sum(rot[r, c] * d[c] for c in range(3)) / radii[r] for r in range(3)]  # rotated, unit sphere
    noise = _low_freq_noise(rng, q, 2.5)  # wavelength ~2.5 radii: gentle bulges
    return (q[0] ** 2 + q[1] ** 2 + q[2] ** 2) < (1 + deform * noise) ** 2, sl


def _tube(rng, shape, spacing, radius):
    """Vessel mask (full volume): a disc per z slice whose centre wanders smoothly with z."""
    extent = np.asarray(shape) * spacing
    z = np.arange(shape[0]) * spacing[0]
    phase = rng.uniform(0, 2 * np.pi, 2)
    cy = extent[1] * (0.62 + 0.03 * np.sin(2 * np.pi * z / extent[0] + phase[0]))
    cx = extent[2] * (0.50 + 0.05 * np.sin(2 * np.pi * z / (0.7 * extent[0]) + phase[1]))
    y = (np.arange(shape[1]) * spacing[1])[None, :, None]
    x = (np.arange(shape[2]) * spacing[2])[None, None, :]
    return (y - cy[:, None, None]) ** 2 + (x - cx[:, None, None]) ** 2 < radius**2


def _body(shape, spacing):
    """Body ellipse (True inside), inner part (inside the fat rim) and spine masks, (1, y, x)."""
    extent = np.asarray(shape) * spacing
    y = ((np.arange(shape[1]) + 0.5) * spacing[1] / extent[1] - 0.5)[:, None]
    x = ((np.arange(shape[2]) + 0.5) * spacing[2] / extent[2] - 0.5)[None, :]
    r2 = (y / 0.44) ** 2 + (x / 0.47) ** 2
    spine = ((y - 0.30) * extent[1]) ** 2 + (x * extent[2]) ** 2 < (0.07 * min(extent[1:])) ** 2
    return (r2 < 1)[None], (r2 < 0.80)[None], spine[None]


# ---------------------------------------------------------------------------------------------
# Phantom


def _paint_labels(rng, shape, spacing, n_objects):
    """Label volume (uint8) and the per-structure texture noise masks, structures in STRUCTURES order."""
    extent = np.asarray(shape) * spacing
    min_r = 1.6 * np.asarray(spacing)  # every structure spans at least ~3 voxels per axis
    labels = np.zeros(shape, np.uint8)
    names = structure_names(n_objects)
    liver_centre = liver_radii = None
    for label, name in enumerate(names, start=1):
        if name in ("vessel", "lesion"):
            continue
        if name in BLOBS:
            c, r = BLOBS[name]
        else:  # extra blobs somewhere in the body's inner part
            c, r = (rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.65)), (0.08, 0.07, 0.07)
        centre = (np.asarray(c) + rng.uniform(-0.03, 0.03, 3)) * extent
        radii = np.maximum(np.asarray(r) * rng.uniform(0.85, 1.15, 3) * extent, min_r)
        mask, sl = _blob(rng, shape, spacing, centre, radii)
        labels[sl][mask] = label
        if name == "liver":
            liver_centre, liver_radii = centre, radii
    if "vessel" in names:
        radius = max(0.035 * min(extent[1:]), 1.6 * max(spacing[1:]))
        labels[_tube(rng, shape, spacing, radius)] = names.index("vessel") + 1
    if "lesion" in names:
        radius = max(0.3 * liver_radii.min(), 1.6 * max(spacing))
        centre = liver_centre + rng.uniform(-0.25, 0.25, 3) * liver_radii
        lo, hi = _box_around(centre, radius, shape, spacing)
        (z, y, x), sl = _grid(shape, spacing, lo, hi)
        sphere = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2
        labels[sl][sphere] = names.index("lesion") + 1
    return labels, names


def _intensities(rng, labels, names, shape, spacing, modality):
    table = CT_HU if modality == "ct" else MR_T1
    body, inner, spine = _body(shape, spacing)
    image = np.full(shape, float(table["air"]), np.float32)
    image[np.broadcast_to(body, shape)] = table["fat"]
    image[np.broadcast_to(inner, shape)] = table["muscle"]
    image[np.broadcast_to(spine & inner, shape)] = table["bone"]
    for label, name in enumerate(names, start=1):
        image[labels == label] = table.get(name, table["blob"])
    image = ndimage.gaussian_filter(image, sigma=0.7 / np.asarray(spacing) * min(spacing), mode="nearest")
    coarse = [np.arange(n)[tuple(slice(None) if a == d else None for d in range(3))] * spacing[a]
              for a, n in enumerate(shape)]
    if modality == "ct":
        image += 6.0 * _low_freq_noise(rng, coarse, 40.0).astype(np.float32)  # organ texture
        image += rng.normal(0, CT_NOISE_HU, shape).astype(np.float32)
        return np.round(image).astype(np.float32)
    bias = 1.0 + 0.15 * _low_freq_noise(rng, coarse, 2.0 * np.asarray(shape) * spacing, n_modes=3)
    image *= bias.astype(np.float32)
    real = image + rng.normal(0, MR_NOISE, shape).astype(np.float32)
    imag = rng.normal(0, MR_NOISE, shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def make_phantom(shape_zyx=(64, 96, 96), seed: int = 0, spacing=(2.0, 1.0, 1.0), n_objects: int = 3,
                 modality: str = "ct") -> tuple[np.ndarray, np.ndarray]:
    """A procedural phantom: (image float32 (z, y, x), labels uint8 0..n_objects).

    ``spacing`` (z, y, x) mm sets the physical size; ``modality`` "ct" (HU-like) or "mr"
    (T1-like, non-negative). Label n is ``structure_names(n_objects)[n - 1]``; each label is
    present. The same arguments give the same phantom.
    """
    shape = tuple(int(v) for v in shape_zyx)
    spacing = np.asarray(spacing, dtype=np.float64)
    if len(shape) != 3 or min(shape) < 8:
        raise PhantomError(f"phantom shape must be 3 sizes >= 8 (z, y, x), got {shape}")
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise PhantomError(f"spacing must be 3 positive values (z, y, x), got {spacing.tolist()}")
    if not 1 <= n_objects <= 255:
        raise PhantomError(f"n_objects must be in 1..255, got {n_objects}")
    modality = str(modality).lower()
    if modality not in ("ct", "mr"):
        raise PhantomError(f"phantom modality must be 'ct' or 'mr', got {modality!r}")
    rng = np.random.default_rng(seed)
    labels, names = _paint_labels(rng, shape, spacing, n_objects)
    missing = sorted(set(range(1, n_objects + 1)) - set(np.unique(labels).tolist()))
    if missing:
        raise PhantomError(f"shape {shape} is too small for structures {[names[m - 1] for m in missing]}")
    return _intensities(rng, labels, names, shape, spacing, modality), labels


# ---------------------------------------------------------------------------------------------
# Challenge-style data sets


def write_challenge_dataset(folder, n_cases: int, shape=(64, 96, 96), seed: int = 0, modalities=("ct", "mr"),
                            n_objects: int = 3, with_boxes: bool = True) -> list[Path]:
    """Write ``n_cases`` challenge-style .npz files (imgs uint8, gts, spacing, boxes) to ``folder``.

    Case i uses modality ``modalities[i % len]``, a random anisotropic spacing and the
    challenge's box rule (simulation.challenge_boxes, with its random margin). Spacing is
    stored in the project's npz order (geometry.NPZ_SPACING_ORDER). Returns the paths.
    """
    folder = Path(folder)
    paths = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        modality = modalities[i % len(modalities)]
        in_plane = float(np.round(rng.uniform(0.6, 1.2), 2))
        spacing = (float(rng.choice([1.0, 2.0, 2.5, 3.0, 5.0])), in_plane, in_plane)
        image, labels = make_phantom(shape, int(rng.integers(2**31)), spacing, n_objects, modality)
        case = ChallengeCase(
            imgs=to_uint8(image, modality),
            spacing=zyx_to_npz_spacing(spacing),
            gts=labels,
            boxes=challenge_boxes(labels, rng) if with_boxes else None,
            name=f"{modality.upper()}_Phantom_{i:04d}",
        )
        paths.append(write_challenge_npz(folder / f"{case.name}.npz", case))
    return paths


# ---------------------------------------------------------------------------------------------
# The bundled sample volume


def sample_geometry() -> VolumeGeometry:
    """The sample's oblique, anisotropic geometry, centred on the LPS origin."""
    direction = rotation_matrix((1.0, 0.4, 0.2), 18.0)
    origin = -(direction * SAMPLE_SPACING_XYZ) @ ((np.asarray(SAMPLE_SHAPE[::-1]) - 1) / 2)
    return VolumeGeometry.from_lps(SAMPLE_SPACING_XYZ, origin, direction, SAMPLE_SHAPE)


def _structure_info(labels, names, spacing_zyx):
    """Per structure: label, voxel count, tight box and an interior click (voxel z, y, x)."""
    out = []
    for label, name in enumerate(names, start=1):
        mask = labels == label
        idx = np.argwhere(mask)
        depth = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
        click = np.unravel_index(int(np.argmax(depth)), mask.shape)
        out.append({
            "name": name, "label": label, "voxels": int(mask.sum()),
            "box_zyx": {"min": idx.min(0).tolist(), "max": idx.max(0).tolist()},
            "click_zyx": [int(v) for v in click],
        })
    return out


def write_sample_data(folder=None) -> dict[str, Path]:
    """Generate the bundled sample: CT, label map and the JSON describing them. Returns the paths."""
    folder = Path(folder) if folder is not None else SAMPLE_DATA_DIR
    geometry = sample_geometry()
    image, labels = make_phantom(SAMPLE_SHAPE, SAMPLE_SEED, geometry.spacing_zyx, SAMPLE_N_OBJECTS, "ct")
    names = structure_names(SAMPLE_N_OBJECTS)
    paths = {kind: folder / name for kind, name in SAMPLE_FILES.items()}
    ct = np.clip(image, -1024, 3071).astype(np.int16)
    ct[ct < -900] = -1000  # noise-free air: keeps the file about 1 MB smaller
    write_image(paths["image"], ct, geometry)
    write_labelmap(paths["labels"], labels, geometry)
    structures = _structure_info(labels, names, geometry.spacing_zyx)
    main = structures[0]
    info = {
        "description": "Procedural abdomen-like CT phantom (not patient data), made by "
                       "ENSAMSegmentLib.core.phantom.write_sample_data.",
        "image": SAMPLE_FILES["image"], "labels": SAMPLE_FILES["labels"],
        "modality": "ct", "seed": SAMPLE_SEED,
        "shape_zyx": list(SAMPLE_SHAPE),
        "spacing_zyx": [round(v, 6) for v in geometry.spacing_zyx],
        "origin_lps": [round(v, 6) for v in geometry.origin_lps],
        "direction_lps": np.round(geometry.direction_lps, 9).tolist(),
        "ijk_to_ras": np.round(geometry.ijk_to_ras, 9).tolist(),
        "structures": structures,
        "main_structure": main["name"],
        "suggested_box_zyx": main["box_zyx"],
        "suggested_click_zyx": main["click_zyx"],
        "notes": "Voxel indices are (z, y, x) = numpy order of the arrays read with SimpleITK; boxes are "
                 "inclusive. Clicks are the structure's innermost voxel. Air is exactly -1000 HU "
                 "(noise-free, to keep the file small). direction_lps columns are the i, j, k (x, y, z) axes; "
                 "ijk_to_ras is Slicer's IJKToRAS matrix.",
    }
    text = json.dumps(info, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    paths["info"].write_text(text + "\n")  # number lists on one line each
    return paths


def sample_data_path(kind: str = "image") -> Path:
    """Path of the bundled sample file: kind "image" (CT .nrrd), "labels" (.nrrd) or "info" (.json)."""
    if kind not in SAMPLE_FILES:
        raise ValueError(f"kind must be one of {sorted(SAMPLE_FILES)}, got {kind!r}")
    path = SAMPLE_DATA_DIR / SAMPLE_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"sample file {path} is missing (it ships with the source tree and the Slicer extension; "
            "regenerate it with ENSAMSegmentLib.core.phantom.write_sample_data())"
        )
    return path


def read_sample_info() -> dict:
    """The sample's JSON description (shape, spacing, structures, suggested box and click)."""
    return json.loads(sample_data_path("info").read_text())


def load_sample() -> tuple[np.ndarray, np.ndarray, VolumeGeometry, dict]:
    """(CT int16 (z, y, x), labels uint8, geometry, info) of the bundled sample."""
    image, geometry = read_image(sample_data_path("image"))
    labels, _ = read_image(sample_data_path("labels"))
    return image, labels, geometry, read_sample_info()
