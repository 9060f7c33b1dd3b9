"""Local decoding of a click: the window around it, when the window grows, how its logits are kept.

A click usually corrects the mask near where it lands, so the session decodes only a window around
it (`click_window`: the click +- `half` image voxels per axis, in grid voxels, clipped to the grid)
and keeps the object's previous logits elsewhere. The decoder reuses the GroupNorm statistics of the
object's last box (or whole) decode, which makes windowed decoding exact: inside the window the
logits are what decoding the whole grid with those statistics would give (ENSAM.decode_window).

When the change a click makes runs on beyond the window, the window grows: the changed voxels
(previous vs new mask) connected (26-neighbourhood) to the clicks' change are found, and every face
of the window they reach (with at least MIN_FACE_VOXELS voxels) moves out by `half`; the window is
then decoded again, a bounded number of times (nnInteractive's "zoom out when the prediction reaches
the patch border" in spirit). Faces at the grid's border never grow. Changes not connected to the
click (a boundary shifting by a voxel elsewhere) do not make the window grow. An untrained model's
masks flip 6-10 % of the window's voxels in thousands of specks, and what touches its clicks reaches
a face about every other click (measured); a trained model's corrections are meant to stay local.

Everything here is array bookkeeping on grid voxels: no model, no threads (see session.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .session_region import Grid, Placed, Slices, union


def click_window(grid: Grid, points, half: int) -> Slices:
    """Grid-voxel slices covering every image voxel in `points` +- `half` image voxels, in the grid."""
    lo = [min(p[a] for p in points) for a in range(3)]
    hi = [max(p[a] for p in points) for a in range(3)]
    glo, ghi = grid.to_grid(lo), grid.to_grid(hi)
    return tuple(slice(max(0, a - math.ceil(half / f)), min(n, b + 1 + math.ceil(half / f)))
                 for a, b, f, n in zip(glo, ghi, grid.factor, grid.padded))


MIN_FACE_VOXELS = 8


def grow_window(window: Slices, old_inside: torch.Tensor, new_inside: torch.Tensor, shape, half_cells,
                seeds) -> Slices | None:
    """The window with every face pushed out by `half_cells` (per axis) that the clicks' change reaches
    (at least MIN_FACE_VOXELS of its outer layer), clipped to `shape`; None if no face grew.

    old_inside, new_inside: bool [*window sizes], the previous and the new mask over the window.
    seeds: the clicks in grid voxels; the change that counts is what is connected to a changed voxel
    within 2 voxels of a seed.
    """
    from scipy import ndimage

    changed = (old_inside != new_inside).numpy()
    labels, _ = ndimage.label(changed, structure=np.ones((3, 3, 3), bool))
    ids = set()
    for seed in seeds:
        near = tuple(slice(max(0, p - w.start - 2), max(0, p - w.start + 3)) for p, w in zip(seed, window))
        ids.update(np.unique(labels[near]).tolist())
    ids.discard(0)
    if not ids:
        return None
    change = np.isin(labels, sorted(ids))
    out, grown = [], False
    for axis, (s, n, step) in enumerate(zip(window, shape, half_cells)):
        start, stop = s.start, s.stop
        if start > 0 and int(change.take(0, axis=axis).sum()) >= MIN_FACE_VOXELS:
            start, grown = max(0, start - step), True
        if stop < n and int(change.take(-1, axis=axis).sum()) >= MIN_FACE_VOXELS:
            stop, grown = min(n, stop + step), True
        out.append(slice(start, stop))
    return tuple(out) if grown else None


def block_region(grid: Grid, placed: Placed) -> Slices:
    """The grid voxels a block of logits on `grid` covers (it was decoded on that grid)."""
    starts = [(o - g) // f for o, g, f in zip(placed.origin, grid.origin, grid.factor)]
    return tuple(slice(a, a + n) for a, n in zip(starts, placed.shape))


def patched_block(previous_region: Slices, prev: torch.Tensor, window: Slices,
                  values: torch.Tensor) -> tuple[Slices, torch.Tensor]:
    """Previous logits with `values` (decoded over `window`) written in: (grid region, [1, 1, *sizes]).

    prev: the previous logits on the whole grid as fed back to the network ([1, 1, *grid], the
    previous step's stand-in value beyond its block). The region is the union of the previous block
    and the window, so a window reaching beyond the block keeps that stand-in around its values.
    """
    region = union(previous_region, window)
    block = prev[(..., *region)].to("cpu", values.dtype, copy=True)
    block[(..., *(slice(w.start - r.start, w.stop - r.start) for w, r in zip(window, region)))] = values
    return region, block
