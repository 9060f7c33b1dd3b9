"""Segmentations of a scene, with their reference volumes, as challenge-format training cases.

For every (segmentation node, volume node) pair (by default each segmentation with the volume
its geometry was set from, the Segment Editor's source volume) `export_scene` writes

    <folder>/<Modality>/<dataset>/<case>.npz   imgs uint8, gts labels, spacing (`ensam train --data <folder>`)
    <folder>/export.json                       what was written and what was skipped, and why

- imgs: the volume's voxels through the organisers' preprocessing (intensity.to_uint8: a CT
  window, else percentile clipping; the modality is guessed from the intensities unless given).
- Geometry: the volume's voxel grid is kept as it is, nothing is resampled: ``imgs[k, j, i]`` is
  voxel (i, j, k), the array order the challenge files keep. ``gts`` holds each segment exported
  by Slicer onto that grid (ExportSegmentsToLabelmapNode with the volume as reference), so an
  oblique, left-handed or transformed volume keeps every voxel where it was. ``spacing`` is
  the grid's spacing in the project's npz order (geometry.zyx_to_npz_spacing); the whole world
  geometry (IJK->RAS, parent transforms applied), which an npz cannot hold, is in export.json.
- Labels: the non-empty segments in the segmentation's order get 1, 2, ...; export.json maps each
  value to the segment's name, ID and colour. A voxel in two segments takes the later one's
  value (as Slicer's own labelmap export does); such voxels are counted ("overlap_voxels").
- Nothing half-written: the cases go to a hidden folder beside ``folder``, renamed at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ENSAMSegmentLib.core.geometry import zyx_to_npz_spacing
from ENSAMSegmentLib.core.imageio import ChallengeCase, write_challenge_npz
from ENSAMSegmentLib.core.intensity import IntensityError, guess_modality, to_uint8
from ENSAMSegmentLib.mrml import volumes

MODALITY_FOLDERS = {"ct": "CT", "mr": "MR", "pet": "PET", "us": "US", "xray": "XRay",
                    "microscopy": "Microscopy", "other": "Other"}
MANIFEST = "export.json"
MAX_LABELS = 255  # gts is uint8 (imageio.as_labels)


class SceneExportError(Exception):
    """Nothing in the scene can be exported, or the folder cannot be written; the message says why."""


@dataclass
class ExportedCase:
    file: Path  # relative to the export folder
    volume: str
    segmentation: str
    modality: str
    labels: list[dict]  # {"value", "name", "segment_id", "color", "voxels"}
    overlap_voxels: int
    ijk_to_ras: list[list[float]]
    spacing_zyx: list[float]
    skipped_segments: list[dict] = field(default_factory=list)  # {"name", "reason"}

    def to_dict(self) -> dict:
        return {"file": self.file.as_posix(), "volume": self.volume, "segmentation": self.segmentation,
                "modality": self.modality, "labels": self.labels, "overlap_voxels": self.overlap_voxels,
                "ijk_to_ras": self.ijk_to_ras, "spacing_zyx": self.spacing_zyx,
                "skipped_segments": self.skipped_segments}


@dataclass
class SceneExport:
    folder: Path
    cases: list[ExportedCase]
    skipped: list[dict]  # {"segmentation", "volume", "reason"}

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    def describe(self) -> str:
        text = f"{len(self.cases)} case(s) exported to {self.folder}"
        return text + "".join(f"; skipped {s['segmentation']}: {s['reason']}" for s in self.skipped)


# ---------------------------------------------------------------------------- pairs


def reference_volume(segmentation_node):
    """The scalar volume a segmentation's geometry was set from (None when there is none)."""
    import slicer

    node = segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return None
    return node


def segmentation_pairs(scene) -> list[tuple]:
    """(segmentation node, its reference volume or None) for every segmentation in the scene."""
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    nodes.UnRegister(scene)
    return [(nodes.GetItemAsObject(i), reference_volume(nodes.GetItemAsObject(i)))
            for i in range(nodes.GetNumberOfItems())]


# ---------------------------------------------------------------------------- one case


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment on the volume's voxel grid, (z, y, x) bool, through Slicer's labelmap export."""
    import slicer

    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ENSAM export__")
    labelmap.SetHideFromEditors(True)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, [segment_id], labelmap, volume_node)
        if not ok:
            raise SceneExportError(f"Slicer could not export segment {segment_id!r} onto '{volume_node.GetName()}'")
        return np.asarray(slicer.util.arrayFromVolume(labelmap)) > 0
    finally:
        scene.RemoveNode(labelmap)


def case_arrays(segmentation_node, volume_node, modality: str = "auto", ct_window="soft_tissue"):
    """(imgs uint8, gts, geometry, modality, labels, overlap voxels, skipped segments) of one pair."""
    image, geometry = volumes.volume_to_array(volume_node)
    modality = guess_modality(image) if modality == "auto" else modality.lower()
    imgs = to_uint8(image, modality, ct_window)
    segmentation = segmentation_node.GetSegmentation()
    gts = np.zeros(image.shape, np.uint8)
    labels, skipped, overlap = [], [], 0
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(segment_id)
        mask = segment_mask(segmentation_node, segment_id, volume_node)
        if not mask.any():
            skipped.append({"name": segment.GetName(), "reason": "empty on this volume"})
            continue
        if len(labels) == MAX_LABELS:
            skipped.append({"name": segment.GetName(), "reason": f"more than {MAX_LABELS} segments"})
            continue
        value = len(labels) + 1
        overlap += int(np.count_nonzero(gts[mask]))
        gts[mask] = value
        labels.append({"value": value, "name": segment.GetName(), "segment_id": segment_id,
                       "color": [round(float(c), 4) for c in segment.GetColor()], "voxels": int(mask.sum())})
    for label in labels:  # what is left of each segment after the later ones took their overlap
        label["voxels"] = int(np.count_nonzero(gts == label["value"]))
    return imgs, gts, geometry, modality, labels, overlap, skipped


def case_name(text: str, taken: set[str]) -> str:
    """A file-safe case name from a node name, unique among ``taken`` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "case"
    name, n = base, 1
    while name.lower() in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name.lower())
    return name


# ---------------------------------------------------------------------------- the export


def export_scene(scene, folder, dataset: str = "Scene", modality: str = "auto", ct_window="soft_tissue",
                 pairs: list[tuple] | None = None) -> SceneExport:
    """Write the scene's segmentations as training cases under the new folder ``folder`` (module docstring).

    ``pairs``: (segmentation node, volume node) to export instead of each segmentation with its
    reference volume. Raises SceneExportError when no case can be written or ``folder`` exists.
    """
    folder = Path(folder)
    if folder.exists():
        raise SceneExportError(f"{folder} exists already: export into a new folder")
    if modality != "auto" and modality.lower() not in MODALITY_FOLDERS:
        raise SceneExportError(f"unknown modality {modality!r}; use auto or one of {', '.join(MODALITY_FOLDERS)}")
    dataset_folder = case_name(dataset, set())
    pairs = segmentation_pairs(scene) if pairs is None else pairs
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    except OSError as error:
        raise SceneExportError(f"cannot write into {folder.parent}: {error}") from None
    try:
        cases, skipped, taken = [], [], set()
        multiple = _volumes_with_several(pairs)
        for segmentation_node, volume_node in pairs:
            where = {"segmentation": segmentation_node.GetName(),
                     "volume": volume_node.GetName() if volume_node is not None else None}
            if volume_node is None:
                skipped.append({**where, "reason": "no reference volume (choose its source volume in the Segment Editor)"})
                continue
            try:
                imgs, gts, geometry, kind, labels, overlap, skipped_segments = case_arrays(
                    segmentation_node, volume_node, modality, ct_window)
            except (volumes.MRMLError, IntensityError, SceneExportError) as error:
                skipped.append({**where, "reason": str(error)})
                continue
            if not labels:
                skipped.append({**where, "reason": "no segment has a voxel on this volume"})
                continue
            name = volume_node.GetName()
            if volume_node.GetID() in multiple:
                name += "_" + segmentation_node.GetName()
            relative = Path(MODALITY_FOLDERS[kind]) / dataset_folder / f"{case_name(name, taken)}.npz"
            case = ChallengeCase(imgs=imgs, gts=gts, spacing=zyx_to_npz_spacing(geometry.spacing_zyx))
            write_challenge_npz(work / relative, case)
            cases.append(ExportedCase(relative, volume_node.GetName(), segmentation_node.GetName(), kind, labels,
                                      overlap, geometry.ijk_to_ras.tolist(), list(geometry.spacing_zyx),
                                      skipped_segments))
        if not cases:
            reasons = "; ".join(f"{s['segmentation']}: {s['reason']}" for s in skipped) or "the scene has no segmentation"
            raise SceneExportError(f"nothing to export: {reasons}")
        _write_manifest(work / MANIFEST, dataset, cases, skipped)
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return SceneExport(folder, cases, skipped)


def _volumes_with_several(pairs) -> set[str]:
    ids = [v.GetID() for _, v in pairs if v is not None]
    return {i for i in ids if ids.count(i) > 1}


def _write_manifest(path: Path, dataset: str, cases: list[ExportedCase], skipped: list[dict]) -> None:
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset,
        "note": "imgs[k, j, i] is voxel (i, j, k) of the volume; ijk_to_ras is its world geometry (RAS, "
                "parent transforms applied); spacing in the npz is (z, y, x) (ENSAMSegmentLib.core.geometry)",
        "cases": [c.to_dict() for c in cases],
        "skipped": skipped,
    }
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_manifest(folder) -> dict:
    """export.json of an exported folder."""
    return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))


__all__ = ["MANIFEST", "MODALITY_FOLDERS", "ExportedCase", "SceneExport", "SceneExportError", "case_arrays",
           "case_name", "export_scene", "read_manifest", "reference_volume", "segment_mask", "segmentation_pairs"]
