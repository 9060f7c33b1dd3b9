"""Merging objects into one labelmap: the highest logit above 0 wins; an object left empty gets a voxel.

`InferenceSession.merged_labels` (session_engine.py) calls these on each object's logits over the image;
they are plain numpy (tested on hand-made logits in Testing/core/test_session.py).
"""

from __future__ import annotations

import numpy as np

from .session_masks import Slices, intersect, shift
from .session_types import ObjectPrompts


def merge_into(labels: np.ndarray, area: Slices, logits: dict) -> np.ndarray:
    """Write object ids into `labels` (the image over `area`): highest logit > 0 wins, ties to the lower
    id. logits: {id: (extent, float32 values)}. Returns the winning logit per voxel (0 = background)."""
    best = np.zeros(labels.shape, np.float32)
    labels[...] = 0
    for oid, (extent, values) in sorted(logits.items()):
        where = shift(extent, area)
        b, lab = best[where], labels[where]
        win = values > b
        b[win] = values[win]
        lab[win] = oid
    return best


def boost_box(prompts: ObjectPrompts) -> Slices | None:
    """Where an empty object's logits are raised: its box, else its foreground clicks' bounding box."""
    points = list(prompts.box) if prompts.box is not None else list(prompts.fg)
    if not points:
        return None
    p = np.array(points)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(p.min(0), p.max(0)))


def boost_empty(object_logits, box: Slices | None, best: np.ndarray, area: Slices, margin: float):
    """Add to the object's logits inside `box` the smallest constant that makes it win one voxel over
    `best` (the other objects' winning logits, 0 = threshold), plus `margin`."""
    extent, values = object_logits
    inside = None if box is None else intersect(box, extent)
    if inside is None:
        return object_logits
    gap = best[shift(inside, area)] - values[shift(inside, extent)]
    boosted = values.copy()
    boosted[shift(inside, extent)] += float(gap.min()) + margin
    return extent, boosted
