"""A segmentation node -> a Slicer .seg.nrrd file, written by Slicer's own storage node.

An adapter the browser app needs and the MRML layer (ENSAMSegmentLib/mrml/segments.py) does not
have yet: it writes what the scene holds (every segment, overlapping ones on their own layers,
names and colours) exactly as Slicer's "Save" would, so the file opens in Slicer unchanged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class ExportError(RuntimeError):
    """The segmentation could not be written (no segments, or the writer failed)."""


def write_seg_nrrd(segmentation_node, path) -> Path:
    """Write ``segmentation_node`` (binary labelmaps) to ``path`` (.seg.nrrd, gzip); returns the path."""
    import slicer

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ExportError(f"a Slicer segmentation file must end in .seg.nrrd: {path.name}")
    if segmentation_node is None or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise ExportError("nothing to save: there is no segment yet")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(segmentation_node):
        raise ExportError(f"Slicer could not write {path}")
    return path


def seg_nrrd_bytes(segmentation_node) -> bytes:
    """The .seg.nrrd file of ``segmentation_node`` as bytes (for a browser download)."""
    with tempfile.TemporaryDirectory(prefix="ensam-web-") as folder:
        return write_seg_nrrd(segmentation_node, Path(folder) / "segmentation.seg.nrrd").read_bytes()
