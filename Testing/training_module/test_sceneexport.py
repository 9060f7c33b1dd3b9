"""Scene export details on real MRML scenes (the oblique, transformed case is the shared scenario)."""

from __future__ import annotations

import numpy as np
import pytest

from ENSAMSegmentLib.core.geometry import VolumeGeometry, npz_spacing_to_zyx
from ENSAMSegmentLib.core.imageio import read_challenge_npz
from ENSAMSegmentLib.core.intensity import to_uint8
from ENSAMSegmentLib.mrml import segments, volumes
from ENSAMSegmentLib.core.phantom import make_phantom
from ENSAMTrainingLib.mrml.sceneexport import (
    SceneExportError,
    case_name,
    export_scene,
    read_manifest,
    segmentation_pairs,
)

SHAPE = (10, 14, 12)


def mr_volume(scene, name="knee MR", seed=0):
    image, labels = make_phantom(SHAPE, seed, n_objects=2, modality="mr")
    geometry = VolumeGeometry.from_lps((0.7, 0.7, 3.0), (1, 2, 3), np.eye(3), SHAPE)
    return image, labels, volumes.add_volume(scene, image.astype(np.float32), geometry, name)


def segmentation(scene, volume, masks, name="segments"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    writer = segments.SegmentWriter(node, volume)
    for segment_name, mask in masks.items():
        writer.write(writer.add_segment(segment_name), mask)
    writer.close()
    return node


def test_explicit_modality_and_two_segmentations_of_one_volume(scene, tmp_path):
    image, labels, volume = mr_volume(scene)
    segmentation(scene, volume, {"femur": labels == 1}, "bones")
    segmentation(scene, volume, {"cartilage": labels == 2}, "cartilage")
    export = export_scene(scene, tmp_path / "out", dataset="Knee", modality="MR")
    files = sorted(c.file.as_posix() for c in export.cases)
    assert files == ["MR/Knee/knee_MR_bones.npz", "MR/Knee/knee_MR_cartilage.npz"]
    case = read_challenge_npz(tmp_path / "out" / files[0])
    assert np.array_equal(case.imgs, to_uint8(image.astype(np.float32), "mr"))  # percentiles, not a CT window
    assert np.array_equal(case.gts, (labels == 1).astype(np.uint8))
    assert np.allclose(npz_spacing_to_zyx(case.spacing), (3.0, 0.7, 0.7))
    manifest = read_manifest(tmp_path / "out")
    assert manifest["dataset"] == "Knee" and [c["segmentation"] for c in manifest["cases"]] == ["bones", "cartilage"]
    assert manifest["cases"][1]["labels"][0]["name"] == "cartilage"
    assert manifest["cases"][1]["labels"][0]["voxels"] == int((labels == 2).sum())


def test_segments_on_another_grid_land_on_the_volume_grid(scene, tmp_path):
    """A segmentation drawn on a coarser volume is exported onto the reference volume's voxels."""
    _, labels, volume = mr_volume(scene)
    coarse_geometry = VolumeGeometry.from_lps((1.4, 1.4, 6.0), (1.35, 2.35, 4.5), np.eye(3), (5, 7, 6))
    coarse = volumes.add_volume(scene, np.zeros((5, 7, 6), np.int16), coarse_geometry, "coarse")
    mask = np.zeros((5, 7, 6), bool)
    mask[1:3, 2:5, 1:4] = True
    node = segmentation(scene, coarse, {"block": mask})
    export = export_scene(scene, tmp_path / "out", pairs=[(node, volume)], modality="mr")
    gts = read_challenge_npz(export.folder / export.cases[0].file).gts
    assert gts.shape == SHAPE and gts.sum() == mask.sum() * 2 * 2 * 2  # each coarse voxel = 2 x 2 x 2 fine ones
    k, j, i = np.nonzero(gts)
    assert (k.min(), k.max(), j.min(), j.max(), i.min(), i.max()) == (2, 5, 4, 9, 2, 7)


def test_pairs_without_volume_or_voxels_are_skipped_with_reasons(scene, tmp_path):
    _, labels, volume = mr_volume(scene)
    segmentation(scene, volume, {"nothing": np.zeros(SHAPE, bool)}, "all empty")
    no_image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no image")
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "orphan")
    pairs = segmentation_pairs(scene) + [(orphan, no_image)]
    assert [(s.GetName(), v.GetName() if v else None) for s, v in pairs[:2]] == [("all empty", "knee MR"), ("orphan", None)]
    with pytest.raises(SceneExportError) as error:
        export_scene(scene, tmp_path / "out", pairs=pairs)
    message = str(error.value)
    assert "all empty: no segment has a voxel" in message and "orphan: no reference volume" in message
    assert "orphan: need a scalar volume node" in message or "no image data" in message
    assert list(tmp_path.iterdir()) == []  # not even the hidden work folder is left


def test_unknown_modality_and_names(tmp_path, scene):
    with pytest.raises(SceneExportError, match="unknown modality"):
        export_scene(scene, tmp_path / "out", modality="ultrasound-ish")
    taken: set[str] = set()
    assert [case_name(n, taken) for n in ("CT 1", "ct_1", "ä/ö", "")] == ["CT_1", "ct_1_2", "case", "case_2"]
