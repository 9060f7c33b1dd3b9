"""Masks as bounding-box crops, slice arithmetic and pooling factors of the session: numpy only.

The inference session keeps every object's mask as a `MaskCrop` (its tight bounding box and the
crop inside it) and reports each step's change as `changed` (the slices bounding every voxel that
changed) with the new mask over them (`block`). A front-end that receives only these blocks (the
worker-process client, core/worker.py) rebuilds the object's mask with `MaskCrop.patched`, without
torch: this module is what the Slicer process needs of the session's arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Slices = tuple[slice, slice, slice]
MULTIPLE = 8  # the network downsamples 3 times: grid sides must be multiples of 8


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-int(n) // multiple) * multiple


def pool_factors(shape, budget: int) -> tuple[int, int, int]:
    """Integer max-pool factors so that the pooled, padded shape fits in `budget` voxels.

    Same rule as training (ENSAMTrainingLib.core.data.pool_factors): raise the factor of the axis whose
    pooled size is largest (first axis on ties) until the padded volume fits.
    """
    if budget < MULTIPLE**3:
        raise ValueError(f"voxel budget {budget} is below one {MULTIPLE}^3 block")
    factors = [1, 1, 1]

    def pooled(a):
        return math.ceil(shape[a] / factors[a])

    while math.prod(round_up(pooled(a)) for a in range(3)) > budget:
        axis = max(range(3), key=lambda a: (pooled(a), -a))
        factors[axis] += 1
    return tuple(factors)


@dataclass(frozen=True)
class MaskCrop:
    """A boolean image mask stored as its tight bounding box and the crop inside it (box None: empty)."""

    box: Slices | None = None
    crop: np.ndarray | None = None

    @classmethod
    def from_region(cls, extent: Slices, values: np.ndarray) -> MaskCrop:
        tight = bounding_slices(values)
        if tight is None:
            return cls()
        box = tuple(slice(e.start + t.start, e.start + t.stop) for e, t in zip(extent, tight))
        return cls(box, np.ascontiguousarray(values[tight]))

    @property
    def voxels(self) -> int:
        return 0 if self.box is None else int(np.count_nonzero(self.crop))

    def full(self, image_shape) -> np.ndarray:
        mask = np.zeros(image_shape, dtype=bool)
        if self.box is not None:
            mask[self.box] = self.crop
        return mask

    def within(self, region: Slices) -> np.ndarray:
        """The mask over `region` (image slices): bool array of the region's shape."""
        out = np.zeros([s.stop - s.start for s in region], dtype=bool)
        if self.box is None:
            return out
        inter = intersect(self.box, region)
        if inter is not None:
            out[shift(inter, region)] = self.crop[shift(inter, self.box)]
        return out

    def patched(self, region: Slices | None, block: np.ndarray | None) -> MaskCrop:
        """This mask with `block` (bool, the region's shape) written over `region` (None: unchanged)."""
        if region is None:
            return self
        area = union(self.box, region)
        values = self.within(area)
        values[shift(region, area)] = np.asarray(block, dtype=bool)
        return MaskCrop.from_region(area, values)


def bounding_slices(mask: np.ndarray) -> Slices | None:
    """Tight bounding box of the True voxels of a 3-D bool array, or None if there are none."""
    out = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None
        out.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(out)


def union(a: Slices | None, b: Slices | None) -> Slices | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def intersect(a: Slices, b: Slices) -> Slices | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.stop <= s.start for s in out) else out


def shift(inner: Slices, outer: Slices) -> Slices:
    """`inner` (image slices) relative to the start of `outer`."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def changed_region(old: MaskCrop, new: MaskCrop) -> Slices | None:
    """Tight bounding box (image slices) of the voxels where two masks differ; None if identical."""
    area = union(old.box, new.box)
    if area is None:
        return None
    diff = bounding_slices(old.within(area) != new.within(area))
    return None if diff is None else tuple(slice(a.start + d.start, a.start + d.stop)
                                           for a, d in zip(area, diff))
