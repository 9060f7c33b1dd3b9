"""Markups -> ENSAM prompts in voxel indices (z, y, x) of a volume.

Clicks: two point-list nodes (the decision)
-------------------------------------------
Foreground and background clicks live in two separate ``vtkMRMLMarkupsFiducialNode`` nodes, one
green, one red, each tagged with the node attribute ``ENSAM.ClickRole`` = ``foreground`` /
``background`` (`add_click_nodes`). Two nodes rather than one node with a per-point flag because
Slicer colours a whole node, its place widget places into one node, and deleting or moving a
point then never changes a click's role. Only control points whose position is *defined* count
(a point being placed, still following the mouse, is skipped).

Positions are read in world RAS (``GetNthControlPointPositionWorld``: parent transforms
included, non-linear ones too) and converted with the volume's *world* geometry
(`volumes.volume_geometry`), so a click lands on the voxel the user sees under it.

Box: an ROI node
----------------
A ``vtkMRMLMarkupsROINode`` of any orientation, under any transform: its 8 corners are taken in
ROI coordinates (centre +- size/2), mapped to the node and then to world RAS, and
`VolumeGeometry.box_from_ras_corners` converts all 8, sorts min/max per voxel axis *after* the
conversion (flipped, LPS, left-handed and oblique grids handled) and clips to the volume. The
result covers the voxels whose centres lie inside the ROI's voxel-axis-aligned bounds (a rotated
ROI gives its voxel-aligned bounding box: ENSAM's box prompt is axis-aligned in voxel space).
"""

from __future__ import annotations

import numpy as np

from ENSAMSegmentLib.core.geometry import OutsideVolumeError, VolumeGeometry
from .volumes import MRMLError, matrix_to_numpy

ROLE_ATTRIBUTE = "ENSAM.ClickRole"
FOREGROUND, BACKGROUND = "foreground", "background"
ROLE_COLORS = {FOREGROUND: (0.1, 0.85, 0.1), BACKGROUND: (0.95, 0.15, 0.1)}


# ------------------------------------------------------------------------------- clicks


def add_click_nodes(scene, name: str = "ENSAM"):
    """Two new point-list nodes (foreground, background), coloured and tagged with their role."""
    nodes = []
    for role in (FOREGROUND, BACKGROUND):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} {role}")
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*ROLE_COLORS[role])
            display.SetColor(*ROLE_COLORS[role])
        nodes.append(node)
    return tuple(nodes)


def click_role(node) -> str | None:
    """``foreground``, ``background`` or None (node not made by `add_click_nodes`)."""
    return node.GetAttribute(ROLE_ATTRIBUTE) if node is not None else None


def control_points_world(node) -> np.ndarray:
    """(N, 3) world RAS positions of the node's *defined* control points (transforms applied)."""
    if node is None or not node.IsA("vtkMRMLMarkupsNode"):
        raise MRMLError(f"need a markups node, got {None if node is None else node.GetClassName()}")
    points = []
    for n in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
            continue
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n, p)
        points.append(p)
    return np.asarray(points, dtype=np.float64).reshape(-1, 3)


def click_indices(node, geometry: VolumeGeometry, skip_outside: bool = False) -> np.ndarray:
    """(N, 3) int64 voxel indices (z, y, x) of a point-list node's defined points.

    A point outside the volume raises `OutsideVolumeError`, or is dropped with ``skip_outside``.
    ``node`` may be None (no clicks of that kind yet): an empty (0, 3) array.
    """
    if node is None:
        return np.zeros((0, 3), dtype=np.int64)
    index = geometry.ras_to_kji_index(control_points_world(node), strict=not skip_outside)
    return index[geometry.contains_index(index)] if skip_outside else index


def clicks_from_nodes(foreground_node, background_node, geometry: VolumeGeometry, skip_outside=False):
    """(foreground (N, 3), background (M, 3)) int64 (z, y, x) indices from the two click nodes."""
    return (
        click_indices(foreground_node, geometry, skip_outside),
        click_indices(background_node, geometry, skip_outside),
    )


# ------------------------------------------------------------------------------- box


def add_roi(scene, center_ras, size, rotation=None, name: str = "ENSAM box", transform=None, world=False):
    """A new ROI node placed by `set_roi`, optionally under a transform node."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.CreateDefaultDisplayNodes()
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    set_roi(node, center_ras, size, rotation, world=world)
    return node


def set_roi(node, center_ras, size, rotation=None, world: bool = False) -> None:
    """Place an ROI node: centre (RAS), size (mm, along the ROI's axes), 3x3 rotation (columns = the
    ROI's axes) or None. Given in the node's coordinates, or with ``world=True`` in world RAS (the
    node's parent transforms are undone; they must be linear and keep right angles)."""
    from .volumes import node_to_world, numpy_to_matrix

    center = np.asarray(center_ras, dtype=np.float64).reshape(3)
    size = np.asarray(size, dtype=np.float64).reshape(3)
    axes = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    if world:
        to_node = np.linalg.inv(node_to_world(node))
        center = to_node[:3, :3] @ center + to_node[:3, 3]
        axes = to_node[:3, :3] @ axes
        scale = np.linalg.norm(axes, axis=0)  # a scaling transform changes the size in node units
        axes, size = axes / scale, size * scale
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes
    object_to_node[:3, 3] = center
    node.GetObjectToNodeMatrix().DeepCopy(numpy_to_matrix(object_to_node))
    node.SetSize(*[float(v) for v in size])
    node.SetCenter(*[float(v) for v in center])


def roi_corners_world(node) -> np.ndarray:
    """(8, 3) world RAS corners of an ROI node (its rotation and parent transforms applied)."""
    if node is None or not node.IsA("vtkMRMLMarkupsROINode"):
        raise MRMLError(f"need an ROI node, got {None if node is None else node.GetClassName()}")
    if node.GetNumberOfDefinedControlPoints() == 0:
        raise MRMLError(f"ROI '{node.GetName()}' is not placed yet")
    half = np.asarray(node.GetSize(), dtype=np.float64) / 2.0
    signs = np.array([[(n >> a) & 1 for a in range(3)] for n in range(8)]) * 2.0 - 1.0
    corners_object = signs * half  # (8, 3) in ROI coordinates, centred on the ROI
    object_to_node = matrix_to_numpy(node.GetObjectToNodeMatrix())
    corners_node = corners_object @ object_to_node[:3, :3].T + object_to_node[:3, 3]
    world = []
    for p in corners_node:
        out = [0.0, 0.0, 0.0]
        node.TransformPointToWorld(p.tolist(), out)  # exact for non-linear transforms too
        world.append(out)
    return np.asarray(world, dtype=np.float64)


def box_from_roi(node, geometry: VolumeGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(kji_min, kji_max) inclusive int64 (z, y, x) voxel box of an ROI node, clipped to the
    volume; `OutsideVolumeError` when the ROI misses the volume entirely."""
    try:
        return geometry.box_from_ras_corners(roi_corners_world(node))
    except OutsideVolumeError as error:
        raise OutsideVolumeError(f"ROI '{node.GetName()}': {error}") from None
