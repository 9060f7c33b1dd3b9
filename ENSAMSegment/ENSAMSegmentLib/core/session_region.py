"""Working grids of the inference session: what the encoder sees, and how prompts and logits map.

A `Grid` is one encoder input: the image crop [origin, origin + size) max-pooled by integer factors
per axis (ceil mode, as in training) and zero-padded at the far end to multiples of 8. Grid voxel g
covers image voxels [origin + g f, origin + (g + 1) f); its centre is origin + (g + 1/2) f - 1/2.

Logits are kept as `Placed` tensors: a block of values plus where it lies in the image (the image
coordinate of its first voxel's lower corner and the voxel step = pooling factor), so that moving
logits between grids (previous logits fed to a new grid, logits to the image for a mask) is one
function, `resample`: exact slicing between aligned grids of equal step, separable linear
interpolation (PyTorch's trilinear, align_corners=False, edge-clamped) otherwise.

Everything here is array bookkeeping: no model, no threads (see session.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Mask bookkeeping (numpy only) lives in session_masks.py; re-exported for the session modules.
from .session_masks import (  # noqa: F401
    MULTIPLE, MaskCrop, Slices, bounding_slices, changed_region, intersect, pool_factors, round_up, shift, union,
)


@dataclass(frozen=True)
class Grid:
    """One encoder input: image crop [origin, origin + size), pooled by `factor`, padded to 8."""

    origin: tuple[int, int, int]
    size: tuple[int, int, int]
    factor: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Pooled shape before padding."""
        return tuple(math.ceil(s / f) for s, f in zip(self.size, self.factor))

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(round_up(s) for s in self.shape)

    @property
    def voxels(self) -> int:
        return math.prod(self.padded)

    @property
    def crop(self) -> Slices:
        return tuple(slice(o, o + s) for o, s in zip(self.origin, self.size))

    @property
    def is_native(self) -> bool:
        return self.factor == (1, 1, 1)

    def to_grid(self, kji) -> tuple[int, int, int]:
        """Image voxel index -> grid voxel index (the grid voxel that holds it)."""
        return tuple((int(p) - o) // f for p, o, f in zip(kji, self.origin, self.factor))

    def contains(self, kji) -> bool:
        return all(o <= p < o + s for p, o, s in zip(kji, self.origin, self.size))

    def placed(self, values: torch.Tensor, region: Slices | None = None) -> Placed:
        """Values [1, 1, *region sizes] decoded over `region` (grid voxels; None = whole padded grid).
        Their real content ends at the crop: the padding voxels beyond it saw zeros, not the image."""
        starts = [0, 0, 0] if region is None else [s.start for s in region]
        origin = tuple(o + a * f for o, a, f in zip(self.origin, starts, self.factor))
        return Placed(values, origin, self.factor, self.crop)


def whole_grid(image_shape, budget: int) -> Grid:
    """The whole image, pooled to fit `budget` (factor 1 when it fits)."""
    shape = tuple(int(s) for s in image_shape)
    return Grid((0, 0, 0), shape, pool_factors(shape, budget))


def training_margin(lo, hi, smallest: int = 8, largest: int = 64) -> int:
    """The widest context margin training draws around an object the size of prompts lo..hi (inclusive)
    (ENSAMTrainingLib's `margin_range`: 1 to the object's geometric-mean extent clipped to [8, 64] voxels
    per side): 8 voxels around a small lesion, 64 around a liver."""
    size = float(np.prod(np.asarray(hi) - np.asarray(lo) + 1)) ** (1 / 3)
    return int(np.clip(round(size), smallest, largest))


def context_margin(image_shape, lo, hi, budget: int) -> int:
    """The default margin of a box's crop: the widest training margin (`training_margin`), narrowed while
    that crop would be pooled more than a crop with half of it (the mean margin training draws): context
    where it is free, resolution where it is not. Measured (MODEL_CARD.md, "Context around the box"): the
    widest margin beat the mean one on small objects (validation phantoms' box step 0.90 -> 0.93; dev set
    level) and 1.5x the widest; on the demo's liver, a crop pooled more for it lost 0.02-0.03 Dice."""
    widest = training_margin(lo, hi)
    least_pooling = pool_factors(crop_size(image_shape, lo, hi, (widest + 1) // 2), budget)
    for margin in range(widest, (widest + 1) // 2, -1):
        if pool_factors(crop_size(image_shape, lo, hi, margin), budget) == least_pooling:
            return margin
    return (widest + 1) // 2


def crop_size(image_shape, lo, hi, margin: int) -> tuple[int, int, int]:
    """Size of the crop [lo - margin, hi + 1 + margin) clipped to the image."""
    return tuple(min(int(n), int(b) + 1 + margin) - max(0, int(a) - margin) for a, b, n in zip(lo, hi, image_shape))


def box_grid(image_shape, lo, hi, margin: int | None, budget: int) -> Grid:
    """Crop [lo - margin, hi + 1 + margin) clipped to the image (lo, hi inclusive), pooled to fit;
    margin None: `context_margin`."""
    margin = context_margin(image_shape, lo, hi, budget) if margin is None else margin
    start = tuple(max(0, int(a) - margin) for a in lo)
    size = crop_size(image_shape, lo, hi, margin)
    return Grid(start, size, pool_factors(size, budget))


def decode_region(grid: Grid, lo, hi, margin: int, full_fraction: float) -> Slices | None:
    """Grid region (starts/stops multiples of 8) around image voxels lo..hi (inclusive) plus `margin`
    image voxels; None (decode everything) when that region would cover >= full_fraction of the grid."""
    glo, ghi = grid.to_grid(lo), grid.to_grid(hi)
    region = []
    for a, b, f, n in zip(glo, ghi, grid.factor, grid.padded):
        m = math.ceil(margin / f)
        start = max(0, (a - m) // MULTIPLE * MULTIPLE)
        stop = min(n, round_up(b + 1 + m))
        region.append(slice(start, stop))
    covered = math.prod(s.stop - s.start for s in region)
    return None if covered >= full_fraction * grid.voxels else tuple(region)


# --------------------------------------------------------------------------------- encoder input


def grid_input(volume: np.ndarray, grid: Grid, slab: int = 32) -> torch.Tensor:
    """uint8 volume (z, y, x) -> encoder input float32 [1, 1, *grid.padded] in [0, 1].

    Crop, /255, max-pool by grid.factor (ceil mode), zero-pad at the far end. Pooling runs on slabs
    of `slab` pooled slices so that a large volume is never converted to float32 as a whole.
    """
    out = torch.zeros((1, 1, *grid.padded), dtype=torch.float32)
    crop = volume[grid.crop]
    fz = grid.factor[0]
    for z in range(0, grid.shape[0], slab):
        part = crop[z * fz:(z + slab) * fz]
        x = torch.from_numpy(np.ascontiguousarray(part)).to(torch.float32)[None, None] / 255.0
        if not grid.is_native:
            x = F.max_pool3d(x, grid.factor, grid.factor, ceil_mode=True)
        out[0, 0, z:z + x.shape[2], :x.shape[3], :x.shape[4]] = x[0, 0]
    return out


# --------------------------------------------------------------------------------- placed logits


@dataclass(frozen=True)
class Placed:
    """values [1, 1, d, h, w] whose voxel (0, 0, 0) starts at image coordinate `origin` (lower corner),
    with `step` image voxels per value along each axis; `bounds` (image slices, optional) limits where
    they describe the image (a grid's crop: its padding is not image)."""

    values: torch.Tensor
    origin: tuple[int, int, int]
    step: tuple[int, int, int]
    bounds: Slices | None = None

    def coverage(self, clip: bool = True) -> list[tuple[int, int]]:
        """Per axis, the image interval [lo, hi) these values describe (within `bounds` if clip)."""
        out = []
        for axis, (o, n, t) in enumerate(zip(self.origin, self.shape, self.step)):
            lo, hi = o, o + n * t
            if clip and self.bounds is not None:
                lo, hi = max(lo, self.bounds[axis].start), min(hi, self.bounds[axis].stop)
            out.append((lo, hi))
        return out

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape[-3:])

    def image_extent(self, image_shape) -> Slices:
        """Image voxels these values describe, clipped to the image."""
        return tuple(slice(max(0, lo), min(n, hi)) for (lo, hi), n in zip(self.coverage(), image_shape))

    def border_median(self) -> float:
        """Median of the values on the six faces (a stand-in for logits beyond the block)."""
        v = self.values[0, 0]
        faces = [v[0], v[-1], v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]]
        return float(torch.cat([f.reshape(-1) for f in faces]).float().median())


def _axis_linear(x: torch.Tensor, axis: int, src_origin: int, src_step: int, valid: tuple[int, int],
                 dst_origin: int, dst_step: int, n_dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis; returns (values, inside [n_dst] bool: centre within `valid`)."""
    n_src = x.shape[axis]
    centre = dst_origin + (torch.arange(n_dst, dtype=torch.float64) + 0.5) * dst_step - 0.5
    inside = (centre >= valid[0] - 0.5) & (centre < valid[1] - 0.5)
    s = ((centre - src_origin + 0.5) / src_step - 0.5).clamp(0, n_src - 1)
    i0 = s.floor().long()
    i1 = (i0 + 1).clamp(max=n_src - 1)
    w = (s - i0).to(x.dtype)
    shape = [1] * x.dim()
    shape[axis] = n_dst
    w = w.view(shape)
    return x.index_select(axis, i0) * (1 - w) + x.index_select(axis, i1) * w, inside


def resample(src: Placed, origin, step, shape, fill: float, clip: bool = True) -> torch.Tensor:
    """src's values on the grid (origin, step, shape) -> [1, 1, *shape]; `fill` where src has none
    (beyond its block, and with `clip` beyond its bounds).

    Exact copy when the steps are equal and the grids aligned; otherwise separable linear
    interpolation between voxel centres (= F.interpolate trilinear, align_corners=False).
    """
    origin, step, shape = tuple(map(int, origin)), tuple(map(int, step)), tuple(map(int, shape))
    values, valid = src.values, src.coverage(clip)
    out = torch.full((1, 1, *shape), float(fill), dtype=values.dtype, device=values.device)
    offsets = [o - so for o, so in zip(origin, src.origin)]
    if step == src.step and all(d % t == 0 for d, t in zip(offsets, step)):
        dst, srcs = [], []
        for d, t, n, (lo, hi), so in zip(offsets, step, shape, valid, src.origin):
            a = d // t  # dst voxel 0 is src voxel a
            first, last = -(-(lo - so) // t), (hi - so) // t  # src voxels fully inside [lo, hi)
            start, stop = max(0, first - a), min(n, last - a)
            if stop <= start:
                return out
            dst.append(slice(start, stop))
            srcs.append(slice(start + a, stop + a))
        out[(..., *dst)] = values[(..., *srcs)]
        return out
    x, inside = values, []
    for axis in range(3):
        x, mask = _axis_linear(x, axis + 2, src.origin[axis], src.step[axis], valid[axis], origin[axis],
                               step[axis], shape[axis])
        inside.append(mask.to(values.device))
    keep = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return torch.where(keep, x, out)


def image_logits(src: Placed, image_shape) -> tuple[Slices, np.ndarray]:
    """src on the image grid over its image extent -> (extent, float32 array of the extent's shape)."""
    extent = src.image_extent(image_shape)
    values = resample(src, [s.start for s in extent], (1, 1, 1), [s.stop - s.start for s in extent], 0.0)
    return extent, values[0, 0].float().cpu().numpy()
