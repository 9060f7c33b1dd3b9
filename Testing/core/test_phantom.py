"""phantom.py: procedural phantoms, challenge-style data sets and the bundled sample CT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from ENSAMSegmentLib.core.imageio import read_challenge_npz, read_image
from ENSAMSegmentLib.core.phantom import (
    SAMPLE_FILES,
    PhantomError,
    load_sample,
    make_phantom,
    read_sample_info,
    sample_data_path,
    structure_names,
    write_challenge_dataset,
    write_sample_data,
)


def test_phantom_shapes_labels_and_determinism():
    image, labels = make_phantom((32, 48, 40), seed=3, spacing=(2.0, 1.5, 1.5), n_objects=5)
    assert image.shape == labels.shape == (32, 48, 40)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert np.unique(labels).tolist() == [0, 1, 2, 3, 4, 5]
    again = make_phantom((32, 48, 40), seed=3, spacing=(2.0, 1.5, 1.5), n_objects=5)
    assert np.array_equal(again[0], image) and np.array_equal(again[1], labels)
    other = make_phantom((32, 48, 40), seed=4, spacing=(2.0, 1.5, 1.5), n_objects=5)
    assert not np.array_equal(other[1], labels)


@pytest.mark.parametrize(
    "shape, n_objects",
    [((12, 16, 16), 1), ((12, 16, 16), 3), ((12, 20, 16), 5), ((16, 24, 24), 7), ((64, 96, 96), 7)],
)
def test_every_structure_is_present(shape, n_objects):
    for seed in range(4):
        _, labels = make_phantom(shape, seed, n_objects=n_objects)
        assert np.unique(labels).tolist() == list(range(n_objects + 1))


def test_too_small_for_all_structures():
    with pytest.raises(PhantomError, match=r"too small for structures \['blob_7'\]"):
        make_phantom((8, 8, 8), 0, n_objects=7)


def test_ct_intensities_look_like_hounsfield_units():
    image, labels = make_phantom((48, 96, 96), seed=0, spacing=(2.5, 1.0, 1.0), n_objects=3)
    names = structure_names(3)
    mean = {name: float(image[labels == n + 1].mean()) for n, name in enumerate(names)}
    assert names == ["liver", "vessel", "lesion"]
    assert 85 < mean["liver"] < 125
    assert mean["lesion"] < mean["liver"] - 30  # hypodense lesion
    assert mean["vessel"] > mean["liver"] + 30  # contrast-filled vessel
    assert np.median(image[:, :3, :3]) < -950  # corner of the volume: air
    noise = image[labels == 1] - ndimage.uniform_filter(image, 3)[labels == 1]
    assert 5 < noise.std() < 25


def test_mr_intensities():
    image, labels = make_phantom((32, 64, 64), seed=1, modality="MR")
    assert image.min() >= 0
    assert image[labels == 1].mean() > image[labels == 3].mean() + 100  # liver bright, lesion dark


def test_lesion_sits_in_the_liver():
    for seed in range(4):
        _, labels = make_phantom((40, 64, 64), seed, spacing=(2.0, 1.2, 1.2))
        lesion = labels == 3
        shell = ndimage.binary_dilation(lesion) & ~lesion
        assert np.mean(labels[shell] == 1) > 0.5


def test_sizes_are_physical():
    """Twice the voxels at half the spacing: the same structures in mm^3 (within 15 %)."""
    coarse = make_phantom((32, 48, 48), 5, spacing=(4.0, 2.0, 2.0), n_objects=5)[1]
    fine = make_phantom((64, 96, 96), 5, spacing=(2.0, 1.0, 1.0), n_objects=5)[1]
    for label in (1, 2, 4, 5):  # not the lesion: its minimum size is in voxels
        mm3_coarse = (coarse == label).sum() * 16.0
        mm3_fine = (fine == label).sum() * 2.0
        assert mm3_fine == pytest.approx(mm3_coarse, rel=0.15), label


def test_phantom_errors():
    with pytest.raises(PhantomError, match=">= 8"):
        make_phantom((4, 32, 32), 0)
    with pytest.raises(PhantomError, match="modality"):
        make_phantom((16, 16, 16), 0, modality="pet")
    with pytest.raises(PhantomError, match="n_objects"):
        make_phantom((16, 16, 16), 0, n_objects=0)
    with pytest.raises(PhantomError, match="spacing"):
        make_phantom((16, 16, 16), 0, spacing=(1.0, 0.0, 1.0))
    assert structure_names(7)[3:] == ["kidney", "spleen", "blob_6", "blob_7"]


def test_challenge_dataset(tmp_path):
    paths = write_challenge_dataset(tmp_path / "cases", n_cases=3, shape=(20, 32, 32), seed=1)
    assert [p.name for p in paths] == ["CT_Phantom_0000.npz", "MR_Phantom_0001.npz", "CT_Phantom_0002.npz"]
    for path in paths:
        case = read_challenge_npz(path)
        assert case.imgs.dtype == np.uint8 and case.imgs.shape == (20, 32, 32)
        assert np.unique(case.gts).tolist() == [0, 1, 2, 3]
        assert case.spacing[1] == case.spacing[2] and case.spacing[0] in (1.0, 2.0, 2.5, 3.0, 5.0)  # z, y, x
        assert len(case.boxes) == 3
        for label, box in enumerate(case.boxes, start=1):
            z = np.flatnonzero((case.gts == label).any(axis=(1, 2)))
            assert (box["z_min"], box["z_max"]) == (z[0], z[-1])
            assert box["z_min"] <= box["z_mid"] <= box["z_max"]
            ys, xs = np.nonzero(case.gts[box["z_mid"]] == label)
            assert box["z_mid_y_min"] <= ys.min() and ys.max() <= box["z_mid_y_max"]
            assert box["z_mid_x_min"] <= xs.min() and xs.max() <= box["z_mid_x_max"]
    ct, mr = read_challenge_npz(paths[0]), read_challenge_npz(paths[1])
    assert ct.imgs.max() == 255 and mr.imgs.max() == 255
    again = write_challenge_dataset(tmp_path / "again", n_cases=1, shape=(20, 32, 32), seed=1, with_boxes=False)
    first = read_challenge_npz(again[0])
    assert first.boxes is None and np.array_equal(first.imgs, ct.imgs)


def test_bundled_sample_matches_its_json():
    image, labels, geometry, info = load_sample()
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    assert list(image.shape) == info["shape_zyx"] and labels.shape == image.shape
    assert 80 <= image.shape[0] <= 112 and 140 <= image.shape[1] <= 180
    assert geometry.spacing_zyx == pytest.approx(info["spacing_zyx"])
    assert np.allclose(geometry.ijk_to_ras, info["ijk_to_ras"], atol=1e-6)
    assert read_image(sample_data_path("labels"))[1].allclose(geometry)
    # oblique (no axis-aligned direction column) and anisotropic
    assert np.all(np.abs(geometry.direction_lps).max(axis=0) < 0.999)
    assert max(geometry.spacing_zyx) > 1.5 * min(geometry.spacing_zyx)
    for kind in SAMPLE_FILES:
        assert sample_data_path(kind).stat().st_size < 3_000_000
    assert [s["label"] for s in info["structures"]] == np.unique(labels)[1:].tolist()
    main = next(s for s in info["structures"] if s["name"] == info["main_structure"])
    mask = labels == main["label"]
    idx = np.argwhere(mask)
    assert info["suggested_box_zyx"] == {"min": idx.min(0).tolist(), "max": idx.max(0).tolist()}
    assert mask[tuple(info["suggested_click_zyx"])]
    assert ndimage.binary_erosion(mask, iterations=2)[tuple(info["suggested_click_zyx"])]  # well inside
    assert read_sample_info() == info
    assert 80 < np.median(image[mask]) < 130


def test_bundled_sample_is_what_write_sample_data_makes(tmp_path):
    paths = write_sample_data(tmp_path)
    image, labels, _, info = load_sample()
    new_image, _ = read_image(paths["image"])
    new_labels, _ = read_image(paths["labels"])
    assert np.mean(new_labels != labels) < 1e-4  # allows a rare float tie on another platform
    assert np.mean(np.abs(new_image.astype(int) - image) > 1) < 1e-4
    assert json.loads(paths["info"].read_text())["structures"][0]["box_zyx"] == info["structures"][0]["box_zyx"]


def test_sample_path_errors():
    with pytest.raises(ValueError, match="kind"):
        sample_data_path("mesh")
