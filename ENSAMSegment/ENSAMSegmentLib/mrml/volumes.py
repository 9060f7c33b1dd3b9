"""Scalar volume nodes <-> (array (z, y, x), VolumeGeometry in world RAS).

World RAS, transforms included
------------------------------
A volume may sit under a chain of linear transform nodes. Everything here speaks *world* RAS:
the `VolumeGeometry` returned for a node is ``T_world @ IJKToRAS`` (its parent transforms
applied to the node's own IJKToRAS), so a point placed in any view, converted with it, lands
on the voxel shown under it. Writing does the inverse: the node's local IJKToRAS becomes
``inv(T_world) @ geometry.ijk_to_ras``. A non-linear (warping) transform above a volume has no
voxel grid in world space: `NonLinearTransformError` (harden or remove the transform first).

All coordinate maths goes through `ENSAMSegmentLib.core.geometry`; this file only moves matrices and
arrays between MRML nodes and numpy.
"""

from __future__ import annotations

import numpy as np

from ENSAMSegmentLib.core.geometry import GeometryError, VolumeGeometry


class MRMLError(RuntimeError):
    """A node is missing, of the wrong kind, or cannot be used as asked."""


class NonLinearTransformError(MRMLError):
    """A node sits under a non-linear transform: there is no voxel grid in world space."""


# ------------------------------------------------------------------------------- matrices


def matrix_to_numpy(vtk_matrix) -> np.ndarray:
    """vtkMatrix4x4 -> (4, 4) float64."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array):
    """(4, 4) array -> new vtkMatrix4x4."""
    import vtk

    a = np.asarray(array, dtype=np.float64)
    if a.shape != (4, 4):
        raise GeometryError(f"need a 4x4 matrix, got {a.shape}")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def node_to_world(node) -> np.ndarray:
    """(4, 4) node coordinates -> world RAS: the product of all parent transforms (identity if none)."""
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise NonLinearTransformError(
            f"node '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
            "harden or remove it first"
        )
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return matrix_to_numpy(m)


def add_linear_transform(scene, matrix, name: str = "Transform", parent=None):
    """A new vtkMRMLLinearTransformNode holding ``matrix`` (4x4, to parent), optionally under ``parent``."""
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(numpy_to_matrix(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


# ------------------------------------------------------------------------------- volumes


def _check_volume(node):
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "None" if node is None else node.GetClassName()
        raise MRMLError(f"need a scalar volume node, got {kind}")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise MRMLError(f"volume '{node.GetName()}' has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise MRMLError(
            f"volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components, need 1"
        )
    return image


def volume_geometry(node) -> VolumeGeometry:
    """World geometry of a scalar volume node: ``T_world @ IJKToRAS``, shape (z, y, x)."""
    import vtk

    image = _check_volume(node)
    local = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(local)
    shape_zyx = tuple(int(v) for v in image.GetDimensions()[::-1])
    return VolumeGeometry.from_ras_matrix(node_to_world(node) @ matrix_to_numpy(local), shape_zyx)


def volume_to_array(node) -> tuple[np.ndarray, VolumeGeometry]:
    """(array (z, y, x), world geometry) of a scalar volume node. The array is a copy."""
    import slicer.util

    geometry = volume_geometry(node)
    return np.array(slicer.util.arrayFromVolume(node), copy=True), geometry


def set_volume_geometry(node, geometry: VolumeGeometry) -> None:
    """Give ``node`` the world geometry ``geometry``, accounting for its parent transforms.

    Only the IJKToRAS matrix changes; the image must already have ``geometry.shape``.
    """
    image = _check_volume(node)
    shape = tuple(int(v) for v in image.GetDimensions()[::-1])
    if shape != geometry.shape:
        raise GeometryError(f"volume shape {shape} (z, y, x) does not match geometry {geometry.shape}")
    local = np.linalg.inv(node_to_world(node)) @ geometry.ijk_to_ras
    node.SetIJKToRASMatrix(numpy_to_matrix(local))


def array_to_volume(node, array, geometry: VolumeGeometry | None = None) -> None:
    """Write ``array`` (z, y, x) into a scalar volume node; with ``geometry``, also place it there
    in world RAS (parent transforms accounted for). Without it the node keeps its IJKToRAS."""
    import slicer.util

    a = np.asarray(array)
    if a.ndim != 3:
        raise GeometryError(f"need a 3-D (z, y, x) array, got shape {a.shape}")
    if geometry is not None and tuple(a.shape) != geometry.shape:
        raise GeometryError(f"array shape {a.shape} does not match geometry {geometry.shape}")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(a))
    if geometry is not None:
        set_volume_geometry(node, geometry)


def add_volume(scene, array, geometry: VolumeGeometry, name: str = "Volume", transform=None):
    """A new vtkMRMLScalarVolumeNode (with display node) holding ``array`` at world ``geometry``.

    ``transform``: an optional transform node to put the volume under; the world geometry is still
    ``geometry`` (the local IJKToRAS absorbs the transform).
    """
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.CreateDefaultDisplayNodes()
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    array_to_volume(node, array, geometry)
    return node
