"""The depth of a box drawn with two clicks in one slice: a rule, not an accident.

Two clicks in a slice view give an ROI with no extent along the view's normal; Slicer then pads that
side to the ROI's shortest other side (vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints,
Libs/MRML/Core/vtkMRMLMarkupsROINode.cxx, v5.10.0 lines 841-870), so the depth of such a box depends
on which of its sides happens to be shorter. ENSAM replaces it by a stated rule:

    depth = the mean of the two sides drawn (width and height, in mm), centred on the slice drawn in.

A structure is usually about as deep as it is wide, and the mean keeps a long thin box from being
either a sliver or a slab. The box stays an ordinary ROI: its handles in the other views change the
depth, and every change updates the segment. The status line says which depth was set.

How a one-slice box is recognised: the controller records the first corner when it is placed; when
placement ends, that corner lies on the ROI's mid-plane along the flat axis (both corners shared that
coordinate) and on the ROI's faces along the two others. A box drawn in a 3-D view or across slices
is left as Slicer made it.
"""

from __future__ import annotations

import numpy as np

from .volumes import matrix_to_numpy

RULE = "the mean of its width and height"


def first_corner(roi) -> np.ndarray | None:
    """World RAS of the ROI's only defined control point while it is being placed (size still zero), else None."""
    if roi.GetNumberOfDefinedControlPoints() != 1 or any(s != 0 for s in roi.GetSize()):
        return None
    for n in range(roi.GetNumberOfControlPoints()):
        if roi.GetNthControlPointPositionStatus(n) == roi.PositionDefined:
            world = [0.0, 0.0, 0.0]
            roi.GetNthControlPointPositionWorld(n, world)
            return np.asarray(world, dtype=np.float64)
    return None


def flat_axis(roi, corner_world, tolerance: float = 1e-3) -> int | None:
    """The ROI axis (0, 1, 2: its own x, y, z) along which the box was drawn flat, judged from the first
    corner (see the module docstring), or None."""
    node = [0.0, 0.0, 0.0]
    roi.TransformPointFromWorld([float(v) for v in corner_world], node)
    object_to_node = matrix_to_numpy(roi.GetObjectToNodeMatrix())
    corner = np.linalg.solve(object_to_node, np.append(node, 1.0))[:3]  # ROI coordinates: centre at 0
    half = np.asarray(roi.GetSize(), dtype=np.float64) / 2
    scale = tolerance * max(float(half.max()), 1.0)
    on_mid_plane = np.abs(corner) <= scale
    on_face = np.abs(np.abs(corner) - half) <= scale
    flat = [a for a in range(3) if on_mid_plane[a] and all(on_face[b] for b in range(3) if b != a)]
    return flat[0] if len(flat) == 1 else None


def apply_depth_rule(roi, corner_world) -> float | None:
    """Give a one-slice box its rule depth (mm, returned); None when the box was not drawn flat."""
    axis = flat_axis(roi, corner_world)
    if axis is None:
        return None
    size = list(roi.GetSize())
    drawn = [size[a] for a in range(3) if a != axis]
    size[axis] = float(np.mean(drawn))
    roi.SetSize(*size)
    return size[axis]
