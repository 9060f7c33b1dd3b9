"""Local decoding of a click: the window around it, when the window grows, how its logits are kept.

A click usually corrects the mask near where it lands, so the session decodes only a window around
it (`click_window`: the click +- `half` image voxels per axis, in grid voxels, clipped to the grid)
and keeps the object's previous logits elsewhere. The decoder reuses the GroupNorm statistics of the
object's last box (or whole) decode, which makes windowed decoding exact: inside the window the
logits are what decoding the whole grid with those statistics would give (ENSAM.decode_window).

When the new mask differs from the previous one on a face of the window (at least `min_fraction`
of that face's voxels, and at least 8, flipped), the change runs on beyond it: `grow_window` pushes
that face out by `half` and the window is decoded again, a bounded number of times (nnInteractive's
"zoom out when the prediction reaches the patch border" in spirit). Faces at the grid's border never
grow. A trained model's mask is stable away from a click, so growth is the exception; an untrained
model flips 4-13 % of every face (measured), so with it nearly every click grows.

Everything here is array bookkeeping on grid voxels: no model, no threads (see session.py).
"""

from __future__ import annotations

import math

import torch

from .session_region import Grid, Placed, Slices, resample, union


def click_window(grid: Grid, points, half: int) -> Slices:
    """Grid-voxel slices covering every image voxel in `points` +- `half` image voxels, in the grid."""
    lo = [min(p[a] for p in points) for a in range(3)]
    hi = [max(p[a] for p in points) for a in range(3)]
    glo, ghi = grid.to_grid(lo), grid.to_grid(hi)
    return tuple(slice(max(0, a - math.ceil(half / f)), min(n, b + 1 + math.ceil(half / f)))
                 for a, b, f, n in zip(glo, ghi, grid.factor, grid.padded))


MIN_FACE_VOXELS = 8


def grow_window(window: Slices, old_inside: torch.Tensor, new_inside: torch.Tensor, shape, half_cells,
                min_fraction: float) -> Slices | None:
    """The window with every face pushed out by `half_cells` (per axis) where the mask changed on it
    (at least `min_fraction` of the face's outer layer and MIN_FACE_VOXELS voxels), clipped to
    `shape`; None if no face grew.

    old_inside, new_inside: bool [*window sizes], the previous and the new mask over the window.
    """
    changed = old_inside != new_inside
    out, grown = [], False
    for axis, (s, n, step) in enumerate(zip(window, shape, half_cells)):
        start, stop = s.start, s.stop
        face = changed.select(axis, 0)
        threshold = max(MIN_FACE_VOXELS, min_fraction * face.numel())
        if start > 0 and int(face.sum()) >= threshold:
            start, grown = max(0, start - step), True
        if stop < n and int(changed.select(axis, -1).sum()) >= threshold:
            stop, grown = min(n, stop + step), True
        out.append(slice(start, stop))
    return tuple(out) if grown else None


def block_region(grid: Grid, placed: Placed) -> Slices:
    """The grid voxels a block of logits on `grid` covers (it was decoded on that grid)."""
    starts = [(o - g) // f for o, g, f in zip(placed.origin, grid.origin, grid.factor)]
    return tuple(slice(a, a + n) for a, n in zip(starts, placed.shape))


def patched_block(grid: Grid, previous: Placed, fill: float, window: Slices,
                  values: torch.Tensor) -> tuple[Slices, torch.Tensor]:
    """Previous logits with `values` (decoded over `window`) written in: (grid region, [1, 1, *sizes]).

    The region is the union of the previous block and the window; where neither has values (a
    window reaching beyond the previous block), the previous step's stand-in `fill` is used, as when
    previous logits are fed back to the network.
    """
    region = union(block_region(grid, previous), window)
    origin = [g + s.start * f for g, s, f in zip(grid.origin, region, grid.factor)]
    block = resample(previous, origin, grid.factor, [s.stop - s.start for s in region], fill, clip=False)
    block = block.to(values.dtype)
    block[(..., *(slice(w.start - r.start, w.stop - r.start) for w, r in zip(window, region)))] = values
    return region, block
