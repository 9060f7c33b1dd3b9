"""Images from label maps (SynthSeg: Billot et al., Medical Image Analysis 2023) and procedural scenes.

``synthesize_crop(labels, label, rng)`` turns the label crop of one training sample into an image
and a target mask, in this order (every step random per sample):

1. ``add_object``: sometimes draws a procedural object (tube, vessel tree, lesions, sheet, blob)
   into the crop and makes it the target (shapes the atlases lack).
2. ``deform_labels``: random affine (rotation, scaling) + smooth elastic field, nearest neighbour.
3. ``make_target``: the target label, sometimes merged with touching labels or split by a plane
   (new "structures").
4. ``background_tissues``: unlabelled voxels become 1-4 smooth pseudo-tissues (no flat background).
5. ``gmm_image``: one Gaussian per label, random means and spreads; CT-like (Hounsfield classes,
   then a random CT window) or MR-like (any contrast); some labels share a mean.
6. ``blur`` (random sigma per axis), ``thick_slices`` (blur + downsample + upsample along one
   axis), ``bias_field`` (smooth log-normal field, mostly MR), ``add_noise`` (Gaussian for CT,
   Rician for MR), intensity normalisation to [0, 1] and ``random_gamma``.

Large crops are synthesised on a strided grid of at most ``SynthConfig.max_voxels`` and upsampled
back (image trilinear, target nearest). MONAI's transforms were measured and not used here:
RandGaussianSmooth (136 ms on 96x128x128, one core) is 4x slower than scipy's separable filter,
Rand3DElastic smooths a full-resolution field (slower still), and RandBiasField's polynomial
field reaches 40x gains at the crop corners. The fields here are coarse grids upsampled
trilinearly (SynthSeg's way). MONAI's intensity augmentation still runs after this
(data.augment_intensity) for every sample.

``procedural_scene(shape, rng)`` makes a whole label map from nothing (kind "procedural" cases).

Speed (CPU time on one core of the 2-core Xeon, ``python -m ENSAMTrainingLib.core.synth`` on a
procedural label map; crops of the TotalSegmentator and MNI label maps alike): 0.07-0.10 s per
64x96x96 crop, 0.11-0.15 s per 96x128x128 crop; a procedural scene of PROCEDURAL_SHAPE 0.05 s.
Arrays are (z, y, x); every function is deterministic in its ``rng`` (np.random.Generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# CT tissue classes: (mean HU range, noise-free spread HU range)
CT_CLASSES = {
    "air": ((-1000, -950), (2, 10)), "lung": ((-900, -700), (10, 40)), "fat": ((-130, -70), (5, 20)),
    "fluid": ((-5, 25), (3, 10)), "soft": ((20, 80), (3, 20)), "enhanced": ((90, 260), (5, 30)),
    "bone": ((250, 1200), (20, 150)),
}
CT_CLASS_WEIGHTS = {"air": 0.03, "lung": 0.05, "fat": 0.12, "fluid": 0.1, "soft": 0.4, "enhanced": 0.15, "bone": 0.15}
CT_WINDOWS = ((400, 40), (1500, -160), (80, 40), (1800, 400), (350, 50))  # (width, level) HU


@dataclass(frozen=True)
class SynthConfig:
    """Probabilities and ranges of the generator (defaults: SynthSeg-like, tuned for speed)."""

    object_probability: float = 0.1  # draw a procedural object into a real crop and target it
    deform_probability: float = 0.8
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_voxels: float = 3.0  # std of the coarse elastic displacement, voxels
    elastic_nodes: int = 5  # coarse grid nodes per axis
    merge_probability: float = 0.12
    split_probability: float = 0.08
    shared_mean_probability: float = 0.2  # each non-target label takes another label's mean
    ct_probability: float = 0.5  # CT-like, else MR-like
    blur_sigma: tuple[float, float] = (0.0, 1.2)  # voxels, per axis
    thick_slice_probability: float = 0.3
    thick_factor: tuple[int, int] = (2, 6)
    bias_probability_mr: float = 0.8
    bias_probability_ct: float = 0.1
    bias_strength: float = 0.3  # largest std of the log bias field
    noise_ct_hu: tuple[float, float] = (0.0, 25.0)
    noise_mr: tuple[float, float] = (0.0, 0.05)
    gamma_log_std: float = 0.25
    max_voxels: int = 1_000_000  # synthesise on a strided grid no larger than this


DEFAULT = SynthConfig()
PROCEDURAL_SHAPE = (64, 96, 96)  # voxels (z, y, x) of a procedural scene (data.py kind "procedural")


# ---------------------------------------------------------------------------- smooth random fields


def smooth_field(shape, rng: np.random.Generator, nodes: int = 4, channels: int = 1) -> torch.Tensor:
    """[channels, D, H, W] float32 smooth noise: N(0, 1) on a coarse grid, upsampled trilinearly."""
    coarse = torch.from_numpy(rng.standard_normal((1, channels, nodes, nodes, nodes), dtype=np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


# ---------------------------------------------------------------------------- spatial


def _affine_theta(shape, rng: np.random.Generator, config: SynthConfig) -> torch.Tensor:
    """[3, 4] affine_grid matrix (normalised x, y, z) of a rotation + scaling about the centre, in voxels."""
    from scipy.spatial.transform import Rotation

    angles = rng.uniform(-config.rotation_deg, config.rotation_deg, 3)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    linear = rotation @ np.diag(rng.uniform(*config.scale_range, 3))
    half = np.asarray(shape[::-1], dtype=np.float64) / 2  # x, y, z half sizes
    theta = np.zeros((3, 4), np.float32)
    theta[:, :3] = np.diag(1 / half) @ linear @ np.diag(half)  # isotropic in voxels, not in [-1, 1]
    return torch.from_numpy(theta)


def deform_labels(labels: np.ndarray, rng: np.random.Generator, config: SynthConfig = DEFAULT) -> np.ndarray:
    """[D, H, W] int -> [D, H, W] int: random affine + smooth elastic field, nearest neighbour."""
    shape = labels.shape
    theta = _affine_theta(shape, rng, config)
    grid = F.affine_grid(theta[None], (1, 1, *shape), align_corners=False)  # [1, D, H, W, 3] (x, y, z)
    displacement = smooth_field(shape, rng, config.elastic_nodes, 3) * config.elastic_voxels  # voxels
    scale = torch.tensor([2.0 / s for s in shape[::-1]]).view(3, 1, 1, 1)  # voxels -> normalised
    grid = grid + (displacement * scale).permute(1, 2, 3, 0)[None]
    source = torch.from_numpy(labels.astype(np.float32))[None, None]
    out = F.grid_sample(source, grid, mode="nearest", padding_mode="border", align_corners=False)
    return out[0, 0].numpy().astype(labels.dtype)


# ---------------------------------------------------------------------------- targets


def touching_labels(labels: np.ndarray, mask: np.ndarray) -> list[int]:
    """Labels (> 0, not in ``mask``) that share a face with ``mask``."""
    found = set()
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        found.update(np.unique(labels[hi][mask[lo]]).tolist())
        found.update(np.unique(labels[lo][mask[hi]]).tolist())
    inside = set(np.unique(labels[mask]).tolist())
    return sorted(v for v in found if v > 0 and v not in inside)


def split_by_plane(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part of ``mask`` on one side of a random plane through its centroid (mask if a side is empty)."""
    coords = np.argwhere(mask)
    normal = rng.standard_normal(3)
    side = (coords - coords.mean(0)) @ normal > 0
    if side.all() or not side.any():
        return mask
    keep = coords[side] if rng.random() < 0.5 else coords[~side]
    out = np.zeros_like(mask)
    out[tuple(keep.T)] = True
    return out


def make_target(labels: np.ndarray, label: int, rng: np.random.Generator, config: SynthConfig = DEFAULT) -> np.ndarray:
    """[D, H, W] bool target: ``labels == label``, sometimes merged with touching labels or split."""
    mask = labels == label
    draw = rng.random()
    if draw < config.merge_probability:
        neighbours = touching_labels(labels, mask)
        if neighbours:
            chosen = rng.choice(neighbours, size=min(len(neighbours), int(rng.integers(1, 3))), replace=False)
            mask = mask | np.isin(labels, chosen)
    elif draw < config.merge_probability + config.split_probability and mask.sum() > 50:
        mask = split_by_plane(mask, rng)
    return mask


# ---------------------------------------------------------------------------- intensities


def background_tissues(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels where 0 becomes 1-4 smooth pseudo-tissues (values above every label)."""
    n = int(rng.integers(1, 5))
    if n == 1 or labels.all():
        return labels
    field = smooth_field(labels.shape, rng, nodes=int(rng.integers(2, 6)))[0].numpy()
    edges = np.quantile(field[::4, ::4, ::4], np.linspace(0, 1, n + 1)[1:-1])
    tissue = np.digitize(field, edges) + int(labels.max()) + 1
    return np.where(labels == 0, tissue, labels)


def _label_stats(values: np.ndarray, rng: np.random.Generator, style: str, config: SynthConfig, protect=()):
    """(mean, spread) per label value: CT in HU from CT_CLASSES, MR in [0, 1]. Labels in ``protect``
    (the target's) neither take nor give a shared mean."""
    n = len(values)
    if style == "ct":
        names = list(CT_CLASSES)
        weights = np.array([CT_CLASS_WEIGHTS[c] for c in names])
        classes = rng.choice(len(names), size=n, p=weights / weights.sum())
        means = np.array([rng.uniform(*CT_CLASSES[names[c]][0]) for c in classes])
        spreads = np.array([rng.uniform(*CT_CLASSES[names[c]][1]) for c in classes])
    else:
        means, spreads = rng.uniform(0, 1, n), rng.uniform(0, 0.08, n)
    free = ~np.isin(values, list(protect))
    shared = (rng.random(n) < config.shared_mean_probability) & free
    donors = np.flatnonzero(free)
    means[shared] = means[donors[rng.integers(0, len(donors), size=int(shared.sum()))]]
    return means, spreads


def gmm_image(labels: np.ndarray, rng: np.random.Generator, style: str, config: SynthConfig = DEFAULT,
              protect=()) -> np.ndarray:
    """[D, H, W] float32: a Gaussian draw per voxel with its label's random mean and spread (``protect``:
    label values that keep a mean of their own, e.g. the target's)."""
    values = np.unique(labels)
    means, spreads = _label_stats(values, rng, style, config, protect)
    mean_of, spread_of = np.zeros((2, int(values[-1]) + 1), np.float32)  # lookup tables by label value
    mean_of[values], spread_of[values] = means, spreads
    noise = rng.standard_normal(labels.shape, dtype=np.float32)
    return mean_of[labels] + spread_of[labels] * noise


def blur(image: np.ndarray, sigmas) -> np.ndarray:
    """Separable Gaussian blur, sigma per axis in voxels (0 = none)."""
    for axis, sigma in enumerate(sigmas):
        if sigma > 0.2:
            image = ndimage.gaussian_filter1d(image, sigma, axis=axis, truncate=2.0, mode="nearest")
    return image


def thick_slices(image: np.ndarray, axis: int, factor: int, rng: np.random.Generator) -> np.ndarray:
    """Thick-slice look along ``axis``: slab blur, keep every ``factor``-th slice, linear upsampling back."""
    if image.shape[axis] < 2 * factor:
        return image
    image = ndimage.gaussian_filter1d(image, factor / 2.355, axis=axis, truncate=2.0, mode="nearest")
    index = [slice(None)] * 3
    index[axis] = slice(int(rng.integers(factor)), None, factor)
    sparse = torch.from_numpy(np.ascontiguousarray(image[tuple(index)]))[None, None]
    return F.interpolate(sparse, size=image.shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def bias_field(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """image x exp(smooth field): a log-field N(0, s) on a 2-3 node grid across the crop (bias varies over
    the body, not within an organ), s uniform in [0, strength] (SynthSeg)."""
    log_field = smooth_field(image.shape, rng, nodes=int(rng.integers(2, 4)))[0].numpy()
    return image * np.exp(log_field * np.float32(rng.uniform(0, strength)))


def add_noise(image: np.ndarray, rng: np.random.Generator, std: float, rician: bool) -> np.ndarray:
    """Gaussian noise, or Rician (magnitude of a complex signal with Gaussian noise) for MR."""
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
    if not rician:
        return image + noise
    imaginary = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
    return np.sqrt((image + noise) ** 2 + imaginary**2)


def to_unit(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((image - np.float32(low)) / np.float32(max(high - low, 1e-6)), 0.0, 1.0)


def ct_window(rng: np.random.Generator) -> tuple[float, float]:
    """(low, high) HU of a common CT window, width and level jittered."""
    width, level = CT_WINDOWS[int(rng.integers(len(CT_WINDOWS)))]
    width *= rng.uniform(0.8, 1.25)
    level += rng.uniform(-0.1, 0.1) * width
    return level - width / 2, level + width / 2


def random_gamma(image: np.ndarray, rng: np.random.Generator, log_std: float) -> np.ndarray:
    """image ** exp(N(0, log_std)) on [0, 1]."""
    return np.power(image, np.float32(np.exp(rng.normal(0.0, log_std)))).astype(np.float32)


def _synth_grid(shape, max_voxels: int) -> tuple[int, int, int]:
    """Integer strides so that the strided grid holds at most ``max_voxels``."""
    strides = [1, 1, 1]
    while np.prod([-(-s // f) for s, f in zip(shape, strides)]) > max_voxels:
        axis = int(np.argmax([s / f for s, f in zip(shape, strides)]))
        strides[axis] += 1
    return tuple(strides)


def render(labels: np.ndarray, rng: np.random.Generator, style: str, config: SynthConfig = DEFAULT,
           protect=()) -> np.ndarray:
    """[D, H, W] labels -> [D, H, W] float32 image in [0, 1] (steps 4-6 of the module docstring)."""
    image = gmm_image(background_tissues(labels, rng), rng, style, config, protect)
    image = blur(image, rng.uniform(*config.blur_sigma, 3))
    if rng.random() < config.thick_slice_probability:
        image = thick_slices(image, int(rng.integers(3)), int(rng.integers(*config.thick_factor, endpoint=True)), rng)
    if rng.random() < (config.bias_probability_ct if style == "ct" else config.bias_probability_mr):
        offset = np.float32(1024.0 if style == "ct" else 0.0)  # the bias multiplies non-negative values
        image = bias_field(image + offset, rng, config.bias_strength) - offset
    if style == "ct":
        image = add_noise(image, rng, rng.uniform(*config.noise_ct_hu), rician=False)
        image = to_unit(image, *ct_window(rng))
    else:
        image = add_noise(image, rng, rng.uniform(*config.noise_mr), rician=True)
        image = to_unit(image, 0.0, float(np.quantile(image[::3, ::3, ::3], 0.995)))
    return random_gamma(image, rng, config.gamma_log_std)


def _upsample(array: np.ndarray, shape, mode: str) -> np.ndarray:
    """[d, h, w] -> ``shape`` by trilinear or nearest interpolation."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=tuple(shape), mode=mode, **({"align_corners": False} if mode != "nearest" else {}))
    return out[0, 0].numpy()


def synthesize_crop(labels: np.ndarray, label: int, rng: np.random.Generator,
                    config: SynthConfig = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """(image [D, H, W] float32 in [0, 1], target [D, H, W] bool) from a label crop and its target label.

    A crop above ``config.max_voxels`` is synthesised on a strided grid, then the image is upsampled
    trilinearly and the target by nearest neighbour (make_sample pools it afterwards anyway).
    """
    labels = np.asarray(labels).astype(np.int32, copy=False)
    if labels.ndim != 3 or labels.min() < 0:
        raise ValueError(f"need a 3-D label map with values >= 0, got shape {labels.shape}, min {labels.min()}")
    strides = _synth_grid(labels.shape, config.max_voxels)
    if strides != (1, 1, 1):
        small = labels[:: strides[0], :: strides[1], :: strides[2]]
        if (small == label).any():
            image, target = synthesize_crop(small, label, rng, config)
            return _upsample(image, labels.shape, "trilinear"), _upsample(target, labels.shape, "nearest") > 0.5
    if rng.random() < config.object_probability:
        labels, label = add_object(labels, rng)
    if rng.random() < config.deform_probability:
        deformed = deform_labels(labels, rng, config)
        if (deformed == label).any():
            labels = deformed
    target = make_target(labels, label, rng, config)
    style = "ct" if rng.random() < config.ct_probability else "mr"
    protect = np.unique(labels[target])  # the target never shares another label's mean
    return render(labels, rng, style, config, protect), target


# ---------------------------------------------------------------------------- procedural shapes


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each point [N, 3] to the segment a-b."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def draw_tube(labels: np.ndarray, value: int, path: np.ndarray, radius: float) -> None:
    """Paint voxels within ``radius`` of the polyline ``path`` [K, 3] (z, y, x voxels) with ``value``."""
    shape = np.asarray(labels.shape)
    for a, b in zip(path[:-1], path[1:]):
        lo = np.maximum(np.floor(np.minimum(a, b) - radius), 0).astype(int)
        hi = np.minimum(np.ceil(np.maximum(a, b) + radius) + 1, shape).astype(int)
        if np.any(hi <= lo):
            continue
        grid = np.stack(np.meshgrid(*[np.arange(start, stop) for start, stop in zip(lo, hi)], indexing="ij"), -1)
        near = _segment_distance(grid.reshape(-1, 3).astype(np.float64), a, b) <= radius
        box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        box[near.reshape(box.shape)] = value


def random_path(start, rng: np.random.Generator, steps: int, step: float = 3.0, wiggle: float = 0.3) -> np.ndarray:
    """[steps + 1, 3] points of a smooth random walk (persistent direction) from ``start``."""
    direction = rng.standard_normal(3)
    points = [np.asarray(start, dtype=np.float64)]
    for _ in range(steps):
        direction = direction / np.linalg.norm(direction) + rng.normal(0, wiggle, 3)
        points.append(points[-1] + step * direction / np.linalg.norm(direction))
    return np.array(points)


def _random_point(shape, rng: np.random.Generator, inset: float = 0.15) -> np.ndarray:
    shape = np.asarray(shape, dtype=np.float64)
    return rng.uniform(inset * shape, (1 - inset) * shape)


def draw_vessel_tree(labels, value, rng: np.random.Generator, depth: int = 2) -> None:
    """A trunk with branches (and sub-branches), radii shrinking, all connected, one label."""
    radius = rng.uniform(1.5, 3.5)
    trunk = random_path(_random_point(labels.shape, rng), rng, int(rng.integers(12, 30)))
    draw_tube(labels, value, trunk, radius)
    stack = [(trunk, radius, depth)]
    while stack:
        path, radius, left = stack.pop()
        for _ in range(int(rng.integers(1, 4)) if left else 0):
            origin = path[int(rng.integers(1, len(path)))]
            branch = random_path(origin, rng, int(rng.integers(5, 15)), wiggle=0.4)
            r = max(0.8, radius * rng.uniform(0.5, 0.8))
            draw_tube(labels, value, branch, r)
            stack.append((branch, r, left - 1))


def draw_ellipsoid(labels, value, centre, radii, rng: np.random.Generator, wobble: float = 0.2) -> None:
    """A rotated ellipsoid deformed by smooth noise (radii in voxels), clipped to the volume."""
    from scipy.spatial.transform import Rotation

    reach = float(np.max(radii)) * (1 + wobble) + 1
    lo = np.maximum(np.floor(centre - reach), 0).astype(int)
    hi = np.minimum(np.ceil(centre + reach) + 1, labels.shape).astype(int)
    if np.any(hi <= lo):
        return
    grid = np.stack(np.meshgrid(*[np.arange(start, stop) for start, stop in zip(lo, hi)], indexing="ij"), -1) - centre
    local = grid @ Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
    r2 = np.sum((local / np.asarray(radii)) ** 2, axis=-1)
    noise = smooth_field(r2.shape, rng, nodes=3)[0].numpy() * wobble if min(r2.shape) > 1 else 0.0
    box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    box[r2 < (1 + noise) ** 2] = value


def draw_lesions(labels, value, rng: np.random.Generator) -> None:
    """1-5 small blobs (radius 1.5-6 voxels) with the same label: several components."""
    for _ in range(int(rng.integers(1, 6))):
        radius = rng.uniform(1.5, 6.0)
        draw_ellipsoid(labels, value, _random_point(labels.shape, rng), radius * rng.uniform(0.7, 1.3, 3), rng)


def draw_sheet(labels, value, rng: np.random.Generator) -> None:
    """A thin curved sheet (1.5-4 voxels thick) across part of the volume."""
    shape = labels.shape
    centre = _random_point(shape, rng)
    normal = rng.standard_normal(3)
    normal /= np.linalg.norm(normal)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    height = (z - centre[0]) * normal[0] + (y - centre[1]) * normal[1] + (x - centre[2]) * normal[2]
    bend = smooth_field(shape, rng, nodes=3)[0].numpy() * rng.uniform(0, 6)
    extent = rng.uniform(0.25, 0.5) * np.asarray(shape)
    inside = ((z - centre[0]) / extent[0]) ** 2 + ((y - centre[1]) / extent[1]) ** 2 + ((x - centre[2]) / extent[2]) ** 2 < 1
    labels[(np.abs(height + bend) < rng.uniform(0.75, 2.0)) & inside] = value


def draw_border_blob(labels, value, rng: np.random.Generator) -> None:
    """A blob centred on a face of the volume: the object runs out of the crop."""
    shape = np.asarray(labels.shape, dtype=np.float64)
    centre = _random_point(shape, rng)
    axis = int(rng.integers(3))
    centre[axis] = 0.0 if rng.random() < 0.5 else shape[axis] - 1
    draw_ellipsoid(labels, value, centre, rng.uniform(0.1, 0.3, 3) * shape, rng)


def draw_blob(labels, value, rng: np.random.Generator) -> None:
    shape = np.asarray(labels.shape, dtype=np.float64)
    draw_ellipsoid(labels, value, _random_point(shape, rng, 0.25), rng.uniform(0.05, 0.25, 3) * shape, rng)


def draw_thin_tube(labels, value, rng: np.random.Generator) -> None:
    path = random_path(_random_point(labels.shape, rng), rng, int(rng.integers(10, 40)), wiggle=0.25)
    draw_tube(labels, value, path, rng.uniform(0.7, 2.0))


SHAPES = {"tube": draw_thin_tube, "vessel_tree": draw_vessel_tree, "lesions": draw_lesions, "sheet": draw_sheet,
          "border_blob": draw_border_blob, "blob": draw_blob}


def add_object(labels: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, int]:
    """(labels with one procedural object painted over as a new label, that label)."""
    labels = labels.copy()
    value = int(labels.max()) + 1
    for _ in range(5):  # a shape may miss the volume: try again
        SHAPES[kind or str(rng.choice(list(SHAPES)))](labels, value, rng)
        if (labels == value).any():
            return labels, value
    labels[tuple(s // 2 for s in labels.shape)] = value
    return labels, value


def procedural_scene(shape, rng: np.random.Generator, n_objects: tuple[int, int] = (4, 9)) -> np.ndarray:
    """[D, H, W] int32 label map: 2-4 smooth tissue regions, then objects of every SHAPES kind over them."""
    labels = background_tissues(np.zeros(shape, np.int32), rng)
    labels = np.where(rng.random(labels.max() + 1)[labels] < 0.5, labels, 0).astype(np.int32)  # some stay 0
    kinds = list(SHAPES)
    for n in range(int(rng.integers(*n_objects, endpoint=True))):
        labels, _ = add_object(labels, rng, kinds[n % len(kinds)] if n < len(kinds) else None)
    return labels


def benchmark(shape=(96, 128, 128), n: int = 8) -> dict:
    """CPU seconds (median) of synthesize_crop on a procedural label map of ``shape``, and of the scene."""
    import time

    torch.set_num_threads(1)
    times = {"synthesize_crop": [], "procedural_scene": []}
    for seed in range(n + 1):
        rng = np.random.default_rng(seed)
        start = time.process_time()
        labels = procedural_scene(shape, rng)
        times["procedural_scene"].append(time.process_time() - start)
        start = time.process_time()
        synthesize_crop(labels, int(rng.choice(np.unique(labels)[1:])), rng)
        times["synthesize_crop"].append(time.process_time() - start)
    return {k: float(np.median(v[1:])) for k, v in times.items()}  # the first call imports and warms up


if __name__ == "__main__":
    for size in ((64, 96, 96), (96, 128, 128)):
        print(size, {k: round(v, 3) for k, v in benchmark(size).items()}, "CPU s per sample, one thread")
