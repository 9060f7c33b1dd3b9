"""The "Grow from seeds" baseline: Slicer's fast GrowCut (``vtkImageGrowCutSegment``) driven as
Slicer's Segment Editor effect drives it, from the same prompts ENSAM gets.

This is a comparison baseline, optional at run time: it needs slicer-core (``import slicer`` gives
``slicer.vtkImageGrowCutSegment``, plain VTK, no MRML and no Qt). ``import slicer`` happens only when
a `GrowCutSegmenter` is made, so the rest of the core library never needs it.

How the effect (SegmentEditorGrowFromSeedsEffect + AbstractScriptedSegmentEditorAutoCompleteEffect)
uses the filter, and what is mirrored here:

- Seeds: one labelmap, 0 = unknown, n = n-th segment (here 1 = foreground, 2 = background).
- Region: the bounding box of all seeds grown by ``max(3, 0.2 * (extent size - 1))`` voxels per side
  (20% with no editable-area mask), clipped to the image; the filter sees only that crop, and
  voxels outside it stay unlabelled (here: not foreground).
- One filter object per region: ``SetIntensityVolume`` once, then per update ``SetDistancePenalty``
  (the "seed locality", default 0), ``SetSeedLabelVolume``, ``Update()``. While the region stays the
  same the filter only propagates the new seeds (Slicer's incremental update); the region, and with
  it a new filter, is remade when the seeds come within 3 voxels of its border (unless it already
  reaches the image border there).
- Seeds are only ever added between updates, as a user adds strokes; to start over, call `reset`.

Prompts become seeds as a user would paint them (`seeds_from_prompts`): a box as a 1-voxel-thick
background shell just outside it, each click as a ball of radius 1 voxel (7 voxels).
"""

from __future__ import annotations

import numpy as np

UNKNOWN, FOREGROUND, BACKGROUND = 0, 1, 2
EXTENT_GROWTH_RATIO = 0.20  # effect, no editable-area mask
MIN_EXTENT_MARGIN = 3  # effect: minimumExtentMargin, also the minimum growth
_BALL_1 = np.array([(0, 0, 0), (-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)])


class GrowCutError(RuntimeError):
    """Grow from seeds cannot run: slicer-core missing, bad seeds, or the filter failed."""


# ----------------------------------------------------------------------------- prompts -> seeds


def _check_point(p, shape) -> tuple[int, int, int]:
    p = tuple(int(round(float(v))) for v in p)
    if len(p) != 3 or not all(0 <= v < s for v, s in zip(p, shape)):
        raise GrowCutError(f"click {p} is not a (z, y, x) index inside the image of shape {tuple(shape)}")
    return p


def _paint_ball(seeds: np.ndarray, center, label: int) -> None:
    pts = _BALL_1 + np.asarray(center)
    keep = np.all((pts >= 0) & (pts < np.asarray(seeds.shape)), axis=1)
    seeds[tuple(pts[keep].T)] = label


def seeds_from_prompts(shape, box=None, fg=(), bg=()) -> np.ndarray:
    """Seed labelmap (D,H,W) uint8 from ENSAM-style prompts: 0 unknown, 1 foreground, 2 background.

    box: (kji_min, kji_max), inclusive, or None; its outside becomes background as a 1-voxel shell
    just outside the box (clipped to the image; sides on the image border get none).
    fg, bg: (z, y, x) clicks, each painted as a radius-1 ball; foreground is painted last and wins.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise GrowCutError(f"shape must be 3 positive sizes (z, y, x), got {shape}")
    seeds = np.zeros(shape, dtype=np.uint8)
    if box is not None:
        lo, hi = (np.asarray(c, dtype=int) for c in box)
        if lo.shape != (3,) or hi.shape != (3,) or (lo > hi).any() or (lo < 0).any() or (hi >= shape).any():
            raise GrowCutError(f"box {box} is not an inclusive (kji_min, kji_max) inside shape {shape}")
        outer = tuple(slice(max(a - 1, 0), min(b + 2, s)) for a, b, s in zip(lo, hi, shape))
        seeds[outer] = BACKGROUND
        seeds[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] = UNKNOWN
    for p in bg:
        _paint_ball(seeds, _check_point(p, shape), BACKGROUND)
    for p in fg:
        _paint_ball(seeds, _check_point(p, shape), FOREGROUND)
    return seeds


# ----------------------------------------------------------------------------- region (the effect's extent)


def _seed_extent(seeds: np.ndarray) -> np.ndarray:
    """(3, 2) inclusive [lo, hi] per axis (z, y, x) of the non-zero seeds."""
    ext = []
    for axis in range(3):
        idx = np.flatnonzero(seeds.any(axis=tuple(a for a in range(3) if a != axis)))
        ext.append((idx[0], idx[-1]))
    return np.array(ext)


def grown_extent(seed_extent: np.ndarray, shape) -> np.ndarray:
    """The effect's region: seed extent grown by max(3, 0.2 * (hi - lo)) per side, clipped. (3, 2)."""
    margin = np.maximum(MIN_EXTENT_MARGIN, EXTENT_GROWTH_RATIO * (seed_extent[:, 1] - seed_extent[:, 0])).astype(int)
    lo = np.maximum(seed_extent[:, 0] - margin, 0)
    hi = np.minimum(seed_extent[:, 1] + margin, np.asarray(shape) - 1)
    return np.stack([lo, hi], axis=1)


def extent_needs_regrowth(region: np.ndarray, seed_extent: np.ndarray, shape) -> bool:
    """The effect's effectiveExtentChanged: seeds within 3 voxels of a region side not on the image border."""
    last = np.asarray(shape) - 1
    low = (region[:, 0] != 0) & (region[:, 0] > seed_extent[:, 0] - MIN_EXTENT_MARGIN)
    high = (region[:, 1] != last) & (region[:, 1] < seed_extent[:, 1] + MIN_EXTENT_MARGIN)
    return bool((low | high).any())


# ----------------------------------------------------------------------------- the filter


def _vtk_image(array_zyx: np.ndarray, spacing_zyx) -> object:
    """vtkImageData (dimensions x, y, z) holding a deep copy of a (z, y, x) array."""
    import vtk
    from vtkmodules.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(*array_zyx.shape[::-1])
    image.SetSpacing(*[float(s) for s in spacing_zyx[::-1]])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array_zyx).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def _growcut_filter():
    try:
        import slicer  # slicer-core: only this baseline needs it
    except ImportError as exc:
        raise GrowCutError("Grow from seeds needs slicer-core (pip install 'slicer-core>=5.11,<5.12')") from exc
    return slicer.vtkImageGrowCutSegment()


class GrowCutSegmenter:
    """Grow from seeds on one image, updated as seeds are added (one filter per seed region).

    image_zyx: (D,H,W) intensities (float32 is used). spacing_zyx: voxel size in mm; it only matters
    when `seed_locality` > 0 (the effect's "Seed locality", a distance penalty per mm).
    After each `segment` call, `incremental` tells whether the filter was reused.
    """

    def __init__(self, image_zyx: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), seed_locality: float = 0.0):
        image = np.asarray(image_zyx, dtype=np.float32)
        if image.ndim != 3 or min(image.shape) < 3:
            raise GrowCutError(f"image must be 3D with every size >= 3, got shape {image.shape}")
        if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
            raise GrowCutError(f"spacing must be 3 positive numbers (z, y, x), got {spacing_zyx!r}")
        _growcut_filter()  # fail now, not at the first click, when slicer-core is missing
        self.image = image
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        self.seed_locality = float(seed_locality)
        self.incremental = False
        self.reset()

    def reset(self) -> None:
        """Forget the filter and its region: the next `segment` call computes from scratch."""
        self._filter = None
        self._region = None  # (3, 2) inclusive z/y/x extent the filter works on

    def _crop(self, region: np.ndarray) -> tuple[slice, ...]:
        return tuple(slice(lo, hi + 1) for lo, hi in region)

    def segment(self, seeds: np.ndarray) -> np.ndarray:
        """Foreground mask (D,H,W) bool from seeds (0 unknown, 1 foreground, 2 background).

        No foreground seed gives an empty mask; foreground without background is refused, as the
        effect refuses a single segment.
        """
        seeds = np.asarray(seeds)
        if seeds.shape != self.image.shape:
            raise GrowCutError(f"seeds shape {seeds.shape} differs from the image shape {self.image.shape}")
        if not np.isin(seeds, (UNKNOWN, FOREGROUND, BACKGROUND)).all():
            raise GrowCutError("seeds may hold only 0 (unknown), 1 (foreground) and 2 (background)")
        seeds = seeds.astype(np.uint8)
        has_fg, has_bg = bool((seeds == FOREGROUND).any()), bool((seeds == BACKGROUND).any())
        if not has_fg:
            self.incremental = False
            return np.zeros(seeds.shape, dtype=bool)
        if not has_bg:
            raise GrowCutError("Grow from seeds needs background seeds too (a box or a background click)")

        seed_extent = _seed_extent(seeds)
        self.incremental = self._filter is not None and not extent_needs_regrowth(self._region, seed_extent, seeds.shape)
        if not self.incremental:
            self._region = grown_extent(seed_extent, seeds.shape)
            self._filter = _growcut_filter()
            self._filter.SetIntensityVolume(_vtk_image(self.image[self._crop(self._region)], self.spacing_zyx))
        crop = self._crop(self._region)
        self._filter.SetDistancePenalty(self.seed_locality)
        self._filter.SetSeedLabelVolume(_vtk_image(seeds[crop], self.spacing_zyx))
        self._filter.Update()
        labels = self._result(seeds[crop].shape)
        mask = np.zeros(seeds.shape, dtype=bool)
        mask[crop] = labels == FOREGROUND
        return mask

    def _result(self, crop_shape) -> np.ndarray:
        """The filter's label output as a (z, y, x) copy (the filter reuses its buffer)."""
        from vtkmodules.util import numpy_support

        out = self._filter.GetOutput()
        scalars = out.GetPointData().GetScalars() if out is not None else None
        if scalars is None or out.GetNumberOfPoints() != int(np.prod(crop_shape)):
            raise GrowCutError("vtkImageGrowCutSegment produced no result (see VTK warnings)")
        return numpy_support.vtk_to_numpy(scalars).reshape(crop_shape).copy()
