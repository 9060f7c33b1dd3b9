"""Writing ENSAM object masks into segments, the way the Segment Editor would, with undo.

One segment per object; every segment on the volume's voxel grid (the segmentation's reference
geometry is the volume, parent transforms accounted for by Slicer); binary labelmap as the
source representation; segments may share labelmap layers (Slicer's default).

How a write honours the Segment Editor
--------------------------------------
`SegmentWriter.write` sets a segment's voxels *inside the changed region only* to the new mask:
it removes ``region & ~mask`` and adds ``mask`` through Slicer's own
``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`` (Slicer >= 5.10, present in slicer-core),
which is what the Paint/Erase effects use. So every rule of the Segment Editor applies exactly as
there: the editable area (everywhere, inside/outside all or visible segments, inside one
segment), the source-volume intensity range, and the overwrite mode (overwrite all, overwrite
visible, allow overlap). Another segment's voxels are never erased unless overwriting is on;
with "allow overlap" Slicer moves the written segment to its own layer where needed.

The settings are read, at every write, from ``editor_node`` (a ``vtkMRMLSegmentEditorNode``,
e.g. the Segment Editor's own) and copied into a private, hidden editor node that points at this
writer's segmentation, volume and segment, so the user's node (its selected segment) is never
touched. Without ``editor_node``: editable everywhere, no intensity mask, **allow overlap**
(nothing of another segment is ever erased).

Undo
----
Before every change the writer calls ``before_change()`` (the Segment Editor effect passes
``scriptedEffect.saveStateForUndo``) and pushes an undo record: the region and, for every
segment of the segmentation, its membership inside the region (bit-packed). `undo` restores all
of them exactly (segment content; the layer layout may differ), bypassing masking. Segments
removed since are skipped; edits made by others inside the region after the write are undone
with it (the region returns to its recorded state). ``max_undo`` levels are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ENSAMSegmentLib.core.geometry import VolumeGeometry
from .volumes import MRMLError, matrix_to_numpy, node_to_world, volume_geometry

Region = tuple[slice, slice, slice]  # (z, y, x), step 1

# vtkMRMLSegmentationNode edit-mask modes and vtkMRMLSegmentEditorNode overwrite modes, by name
MASK_MODES = {
    "everywhere": 0,  # EditAllowedEverywhere
    "inside_all": 1,  # EditAllowedInsideAllSegments
    "inside_visible": 2,  # EditAllowedInsideVisibleSegments
    "outside_all": 3,  # EditAllowedOutsideAllSegments
    "outside_visible": 4,  # EditAllowedOutsideVisibleSegments
    "inside_one": 5,  # EditAllowedInsideSingleSegment (mask segment id needed)
}
OVERWRITE_MODES = {"all": 0, "visible": 1, "none": 2}  # "none" = allow overlap


class SegmentWriteError(MRMLError):
    """A mask, region or segment that cannot be written, or a segmentation on another grid."""


@dataclass
class UndoRecord:
    """The state before one change: region and each segment's packed membership there (None: empty)."""

    region: Region
    before: dict[str, np.ndarray | None] = field(default_factory=dict)


# ------------------------------------------------------------------------------- helpers


def normalize_region(region, shape) -> Region:
    """(z, y, x) slices with step 1 inside ``shape``; None = the whole volume. Empty: error."""
    if region is None:
        return tuple(slice(0, s) for s in shape)
    if (
        not isinstance(region, (tuple, list))
        or len(region) != 3
        or not all(isinstance(r, slice) for r in region)
    ):
        raise SegmentWriteError(f"region must be 3 slices (z, y, x), got {region!r}")
    out = []
    for r, s in zip(region, shape):
        start, stop, step = r.indices(s)
        if step != 1 or stop <= start:
            raise SegmentWriteError(f"region {region!r} is empty or strided for shape {tuple(shape)}")
        out.append(slice(start, stop))
    return tuple(out)


def _region_extent(region: Region) -> list[int]:
    """VTK extent [i0, i1, j0, j1, k0, k1] (inclusive) of a (z, y, x) region."""
    z, y, x = region
    return [x.start, x.stop - 1, y.start, y.stop - 1, z.start, z.stop - 1]


def _image_array(image) -> np.ndarray:
    """Writable (z, y, x) numpy view of a vtkImageData's scalars."""
    from vtk.util import numpy_support

    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _labelmap_name() -> str:
    import slicer

    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


# ------------------------------------------------------------------------------- writer


class SegmentWriter:
    """Writes masks (z, y, x) on ``volume_node``'s grid into segments of ``segmentation_node``."""

    def __init__(
        self,
        segmentation_node,
        volume_node,
        editor_node=None,
        before_change: Callable[[], object] | None = None,
        max_undo: int = 20,
    ):
        import slicer

        if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
            raise MRMLError("writing segments needs Slicer 5.10 or later (vtkSlicerSegmentEditorLogic)")
        if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise MRMLError("need a segmentation node")
        self.segmentation_node = segmentation_node
        self.volume_node = volume_node
        self.editor_node = editor_node
        self.before_change = before_change
        self.max_undo = int(max_undo)
        self.geometry: VolumeGeometry = volume_geometry(volume_node)  # world RAS
        self._undo: list[UndoRecord] = []
        scene = segmentation_node.GetScene()
        if scene is None:
            raise MRMLError("the segmentation node is not in a scene")
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
        self._private = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "ENSAM private editor")
        self._private.SetHideFromEditors(True)
        self._private.SetSaveWithScene(False)
        self._private.SetAndObserveSegmentationNode(segmentation_node)
        self._private.SetAndObserveSourceVolumeNode(volume_node)
        self._logic = slicer.vtkSlicerSegmentEditorLogic()
        self._logic.SetMRMLScene(scene)
        self._logic.SetSegmentEditorNode(self._private)
        try:
            self._prepare_segmentation()
        except Exception:
            self.close()  # leave the scene as it was
            raise

    # -- set-up ----------------------------------------------------------------------------

    @property
    def segmentation(self):
        return self.segmentation_node.GetSegmentation()

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    def _grid_matrix(self) -> np.ndarray:
        """The volume's IJK -> segmentation-node coordinates (what the segment labelmaps use)."""
        return np.linalg.inv(node_to_world(self.segmentation_node)) @ self.geometry.ijk_to_ras

    def _prepare_segmentation(self) -> None:
        """Binary labelmap source representation; reference geometry = the volume; layers on its grid."""
        seg = self.segmentation
        if not self._reference_matches():
            self.segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume_node)
            if not self._reference_matches():
                raise SegmentWriteError("cannot set the segmentation's geometry from the volume")
        if seg.GetSourceRepresentationName() != _labelmap_name():
            if seg.GetNumberOfSegments() == 0:
                seg.SetSourceRepresentationName(_labelmap_name())
            elif not self._logic.SetSourceRepresentationToBinaryLabelMap():
                raise SegmentWriteError(
                    "cannot make binary labelmap the segmentation's source representation"
                )
        grid = self._grid_matrix()
        for n in range(seg.GetNumberOfLayers()):
            layer = seg.GetLayerDataObject(n)
            e = layer.GetExtent()
            if e[0] > e[1] or e[2] > e[3] or e[4] > e[5]:
                continue  # empty layer: takes the modifier's geometry when written
            if not np.allclose(self._image_to_node(layer), grid, atol=1e-4):
                ids = list(seg.GetSegmentIDsForLayer(n))
                raise SegmentWriteError(
                    f"segments {ids} of '{self.segmentation_node.GetName()}' lie on another voxel grid "
                    f"than volume '{self.volume_node.GetName()}'; use a new segmentation, or resample "
                    "them onto the volume (Segment Editor: Specify geometry)"
                )

    @staticmethod
    def _image_to_node(image) -> np.ndarray:
        import vtk

        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        return matrix_to_numpy(m)

    def _reference_image(self):
        """The segmentation's reference geometry as an (unallocated) vtkOrientedImageData, or None."""
        import slicer

        text = self.segmentation.GetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        )
        if not text:
            return None
        image = slicer.vtkOrientedImageData()
        if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False):
            return None
        return image

    def _reference_matches(self) -> bool:
        image = self._reference_image()
        if image is None:
            return False
        full = [0, self.shape[2] - 1, 0, self.shape[1] - 1, 0, self.shape[0] - 1]
        return list(image.GetExtent()) == full and np.allclose(
            self._image_to_node(image), self._grid_matrix(), atol=1e-4
        )

    # -- segments --------------------------------------------------------------------------

    def add_segment(self, name: str, color: Sequence[float] | None = None) -> str:
        """A new empty segment (one per ENSAM object); returns its id."""
        if color is None:
            return self.segmentation.AddEmptySegment("", name)
        return self.segmentation.AddEmptySegment("", name, [float(c) for c in color])

    def _segment(self, segment_id: str):
        segment = self.segmentation.GetSegment(segment_id)
        if segment is None:
            raise SegmentWriteError(f"no segment '{segment_id}' in '{self.segmentation_node.GetName()}'")
        return segment

    def read(self, segment_id: str, region=None) -> np.ndarray:
        """A segment's voxels (bool, z, y, x) inside ``region`` (None: the whole volume)."""
        region = normalize_region(region, self.shape)
        segment = self._segment(segment_id)
        out = np.zeros(tuple(r.stop - r.start for r in region), dtype=bool)
        layer = segment.GetRepresentation(_labelmap_name())
        if layer is None:
            return out
        e = layer.GetExtent()
        lo = [max(a, b.start) for a, b in zip((e[4], e[2], e[0]), region)]
        hi = [min(a + 1, b.stop) for a, b in zip((e[5], e[3], e[1]), region)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            return out
        if not np.allclose(self._image_to_node(layer), self._grid_matrix(), atol=1e-4):
            raise SegmentWriteError(f"segment '{segment_id}' lies on another voxel grid than the volume")
        values = _image_array(layer)[
            lo[0] - e[4] : hi[0] - e[4], lo[1] - e[2] : hi[1] - e[2], lo[2] - e[0] : hi[2] - e[0]
        ]
        out[tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region))] = (
            values == segment.GetLabelValue()
        )
        return out

    # -- writing ---------------------------------------------------------------------------

    def _modifier(self, crop: np.ndarray, region: Region, on: int = 1):
        """vtkOrientedImageData (uchar: ``on`` where ``crop``, else 0) at ``region`` of the volume grid."""
        import slicer
        import vtk

        from .volumes import numpy_to_matrix

        image = slicer.vtkOrientedImageData()
        image.SetImageToWorldMatrix(numpy_to_matrix(self._grid_matrix()))
        image.SetExtent(*_region_extent(region))
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        _image_array(image)[...] = np.where(crop, np.uint8(on), np.uint8(0))
        return image

    def _sync_settings(self, segment_id: str) -> None:
        """Copy the user's masking settings into the private editor node; select ``segment_id``."""
        p, user = self._private, self.editor_node
        if user is None:
            p.SetMaskMode(MASK_MODES["everywhere"])
            p.SetMaskSegmentID(None)
            p.SetOverwriteMode(OVERWRITE_MODES["none"])
            p.SetSourceVolumeIntensityMask(False)
        else:
            p.SetMaskMode(user.GetMaskMode())
            p.SetMaskSegmentID(user.GetMaskSegmentID())
            p.SetOverwriteMode(user.GetOverwriteMode())
            p.SetSourceVolumeIntensityMask(user.GetSourceVolumeIntensityMask())
            p.SetSourceVolumeIntensityMaskRange(*user.GetSourceVolumeIntensityMaskRange())
        p.SetSelectedSegmentID(segment_id)

    def _crop(self, mask, region: Region) -> np.ndarray:
        m = np.asarray(mask)
        region_shape = tuple(r.stop - r.start for r in region)
        if m.shape == self.shape:
            m = m[region]
        elif m.shape != region_shape:
            raise SegmentWriteError(
                f"mask shape {m.shape} is neither the volume's {self.shape} nor the region's {region_shape}"
            )
        if m.dtype != bool and not np.issubdtype(m.dtype, np.number):
            raise SegmentWriteError(f"mask must be boolean or numeric, got {m.dtype}")
        return m.astype(bool) if m.dtype != bool else m

    def write(self, segment_id: str, mask, region=None) -> Region:
        """Make ``segment_id`` equal ``mask`` inside ``region``, honouring the editor's settings.

        mask: bool/0-1 array of the volume's shape (z, y, x), or of the region's shape.
        region: (z, y, x) slices of the changed part (what the session reports), None = all.
        Returns the normalised region. Nothing outside it changes.
        """
        region = normalize_region(region, self.shape)
        crop = self._crop(mask, region)
        self._segment(segment_id)
        self._check_not_moved()
        self._checkpoint(region)
        self._sync_settings(segment_id)
        extent = _region_extent(region)
        current = self.read(segment_id, region)
        logic = self._logic
        if np.any(current & ~crop):
            remove = self._modifier(~crop, region)
            logic.ModifySegmentByLabelmap(
                self.segmentation_node, segment_id, remove, logic.ModificationModeRemove, extent, True, False
            )
        if np.any(crop):
            add = self._modifier(crop, region)
            logic.ModifySegmentByLabelmap(
                self.segmentation_node, segment_id, add, logic.ModificationModeAdd, extent, True, False
            )
        return region

    def clear(self, segment_id: str) -> Region | None:
        """Empty a segment (the editor's masking applies, as for any write); None if already empty."""
        inside = self.read(segment_id)
        if not inside.any():
            return None
        nz = np.nonzero(inside)
        region = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
        return self.write(segment_id, np.zeros(inside.shape, bool), region)

    def _check_not_moved(self) -> None:
        """Follow the volume when it moved together with the segmentation (same voxel grid in the
        segmentation's coordinates); raise when they moved apart."""
        old, self.geometry = self.geometry, volume_geometry(self.volume_node)
        if self.geometry.shape != old.shape or not self._reference_matches():
            self.geometry = old
            raise SegmentWriteError(
                "the volume and the segmentation no longer share a voxel grid (a transform or the "
                "volume changed since this writer was made): make a new SegmentWriter"
            )

    # -- undo ------------------------------------------------------------------------------

    def _checkpoint(self, region: Region) -> None:
        """``before_change()``, then push the region's content of every segment."""
        if self.before_change is not None:
            self.before_change()
        record = UndoRecord(region)
        for segment_id in self.segmentation.GetSegmentIDs():
            inside = self.read(segment_id, region)
            record.before[segment_id] = np.packbits(inside) if inside.any() else None
        self._undo.append(record)
        del self._undo[: max(0, len(self._undo) - self.max_undo)]

    @property
    def undo_depth(self) -> int:
        return len(self._undo)

    def clear_undo(self) -> None:
        self._undo.clear()

    def undo(self) -> bool:
        """Restore the segments as they were before the last write; False if nothing to undo."""
        import slicer

        if not self._undo:
            return False
        self._check_not_moved()
        if self.before_change is not None:
            self.before_change()
        record = self._undo.pop()
        region = record.region
        size = int(np.prod([r.stop - r.start for r in region]))
        shape = tuple(r.stop - r.start for r in region)
        extent = _region_extent(region)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        targets = {}
        for segment_id, packed in record.before.items():
            if self.segmentation.GetSegment(segment_id) is None:
                continue  # removed by the user since
            old = (
                np.zeros(shape, bool)
                if packed is None
                else np.unpackbits(packed, count=size).reshape(shape).astype(bool)
            )
            targets[segment_id] = old
        for segment_id, old in targets.items():  # first take away, so that adding meets no one
            if np.any(self.read(segment_id, region) & ~old):
                keep = self._modifier(old, region, on=255)  # MERGE_MIN: 255 keeps, 0 erases
                logic.SetBinaryLabelmapToSegment(
                    keep, self.segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent, False, []
                )
        for segment_id, old in targets.items():
            if np.any(old & ~self.read(segment_id, region)):
                add = self._modifier(old, region)
                logic.SetBinaryLabelmapToSegment(
                    add, self.segmentation_node, segment_id, logic.MODE_MERGE_MASK, extent, False, []
                )
        return True

    def close(self) -> None:
        """Remove the private editor node from the scene (the writer is unusable afterwards)."""
        if self._private is not None and self._private.GetScene() is not None:
            self._logic.SetSegmentEditorNode(None)
            self._private.GetScene().RemoveNode(self._private)
        self._private = None
