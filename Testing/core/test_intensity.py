"""intensity.py: the organisers' preprocessing, checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ENSAMSegmentLib.core.intensity import (
    CT_WINDOWS,
    IntensityError,
    guess_modality,
    normalize_intensities,
    to_uint8,
)


def test_ct_soft_tissue_window():
    # window W400/L40 = [-160, 240]; (x + 160) / 400 * 255, truncated
    hu = np.array([-1000, -160, 40, 100, 240, 3000], np.int16).reshape(1, 2, 3)
    out = to_uint8(hu, "ct")
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert out.ravel().tolist() == [0, 0, 127, 165, 255, 255]  # 260/400*255 = 165.75


@pytest.mark.parametrize(
    "window, hu, expected",
    [
        ("lung", [-1000, -910, -160, 590, 900], [0, 0, 127, 255, 255]),  # [-910, 590]
        ("brain", [-1000, 0, 20, 40, 80, 1000], [0, 0, 63, 127, 255, 255]),  # [0, 80]
        ("bone", [-1000, -500, 400, 1300, 2000], [0, 0, 127, 255, 255]),  # [-500, 1300]
        # (width, level) = [0, 100]; nothing clips, so min-max over 0..99: 25 -> 64.4, 50 -> 128.8
        ((100, 50), [0, 25, 50, 99], [0, 64, 128, 255]),
    ],
)
def test_ct_windows(window, hu, expected):
    assert to_uint8(np.array(hu, np.float32), "ct", window).tolist() == expected


def test_ct_rescales_by_the_clipped_range_like_medsam():
    # values inside the window only: min-max of the clipped values, not of the window
    assert to_uint8(np.array([-100.0, 0.0, 100.0]), "CT").tolist() == [0, 127, 255]


def test_auto_detects_ct_and_windows_it():
    hu = np.array([-1024, -160, 40, 240, 1500], np.int16)
    assert guess_modality(hu) == "ct"
    assert to_uint8(hu).tolist() == to_uint8(hu, "ct").tolist() == [0, 0, 127, 255, 255]


def test_other_modalities_use_percentiles_of_positive_voxels():
    mr = np.concatenate([np.zeros(500), np.arange(1, 1001)]).astype(np.float32)
    # numpy's linear percentiles of 1..1000: 0.5% -> 5.995, 99.5% -> 995.005
    lo, hi = 5.995, 995.005
    out = to_uint8(mr, "mr")
    assert out[:500].max() == 0  # zeros stay zero
    assert out[500] == 0 and out[-1] == 255
    assert out[500 + 499] == int((500 - lo) / (hi - lo) * 255)  # value 500 -> 127
    assert out[500 + 499] == 127
    assert guess_modality(mr) == "other"
    assert np.array_equal(to_uint8(mr), out)  # auto -> percentiles
    assert np.array_equal(to_uint8(mr, "pet"), out)


def test_negative_values_outside_ct():
    # some MR reconstructions have small negative values: they clip to the low percentile -> 0
    mr = np.array([-5.0, 0.0, 10.0, 20.0, 30.0])
    out = to_uint8(mr, "mr")
    assert out[0] == 0 and out[1] == 0 and out[-1] == 255
    assert out[3] == int((20 - np.percentile([10, 20, 30], 0.5)) / np.ptp(np.percentile([10, 20, 30], [0.5, 99.5])) * 255)


def test_uint8_range_is_left_alone():
    u8 = np.array([[0, 17, 255]], np.uint8)
    assert to_uint8(u8, "ct").tolist() == [[0, 17, 255]]  # not windowed although "ct"
    small = np.array([3, 9, 200], np.int16)  # integer, already 0..255
    assert to_uint8(small).tolist() == [3, 9, 200] and to_uint8(small).dtype == np.uint8
    assert np.allclose(normalize_intensities(small), np.array([3, 9, 200]) / 255)
    wider = np.array([3, 9, 300], np.int16)  # not in 0..255: rescaled
    assert to_uint8(wider, "mr").tolist() != [3, 9, 300]
    floats = np.array([0.0, 0.5, 1.0])  # floats are never "already uint8": rescaled
    assert to_uint8(floats, "ct").tolist() == [0, 127, 255]


def test_constant_images():
    assert to_uint8(np.full((2, 3, 4), -1000.0), "ct").max() == 0
    assert to_uint8(np.full((2, 3, 4), 7.5), "mr").max() == 0
    assert to_uint8(np.zeros((2, 3, 4), np.float32), "mr").max() == 0
    assert to_uint8(np.full((2, 2, 2), 1000, np.int32)).max() == 0
    assert to_uint8(np.full((2, 2, 2), -3.0), "mr").max() == 0  # no positive voxel at all


def test_normalize_is_uint8_over_255():
    hu = np.random.default_rng(0).normal(0, 400, (4, 5, 6)).astype(np.float32)
    out = normalize_intensities(hu, "ct", "lung")
    assert out.dtype == np.float32 and out.shape == hu.shape
    assert np.array_equal(out, to_uint8(hu, "ct", "lung").astype(np.float32) / 255)
    assert out.min() >= 0 and out.max() == 1.0


def test_guess_modality():
    assert guess_modality(np.array([-1024, 400])) == "ct"
    assert guess_modality(np.array([-600, 200])) == "other"  # max too low
    assert guess_modality(np.array([-400, 3000])) == "other"  # min too high
    assert guess_modality(np.array([0, 4000], np.uint16)) == "other"


def test_errors():
    with pytest.raises(IntensityError, match="NaN or Inf"):
        to_uint8(np.array([1.0, np.nan]))
    with pytest.raises(IntensityError, match="NaN or Inf"):
        normalize_intensities(np.array([1.0, np.inf]))
    for bad in (np.array([1 + 2j]), np.array([True, False]), np.array(["a"]), np.array([{}], dtype=object)):
        with pytest.raises(IntensityError, match="numeric"):
            to_uint8(bad)
    with pytest.raises(IntensityError, match="empty"):
        to_uint8(np.zeros((0, 3)))
    with pytest.raises(IntensityError, match="unknown modality"):
        to_uint8(np.zeros(3), "xyz")
    with pytest.raises(IntensityError, match="unknown CT window"):
        to_uint8(np.zeros(3), "ct", "liver")
    with pytest.raises(IntensityError, match="width"):
        to_uint8(np.zeros(3), "ct", (0, 40))
    assert set(CT_WINDOWS) == {"soft_tissue", "lung", "brain", "bone"}
