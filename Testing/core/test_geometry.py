"""geometry.py: voxel <-> RAS/LPS conversions checked against SimpleITK and by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from ENSAMSegmentLib.core.geometry import (
    LPS_TO_RAS,
    GeometryError,
    OutsideVolumeError,
    VolumeGeometry,
    npz_spacing_to_zyx,
    ras_to_lps,
    ras_to_lps_transform,
    rotation_matrix,
    transform_points,
    zyx_to_npz_spacing,
)

SHAPE = (12, 17, 23)  # z, y, x
SPACING_XYZ = (0.7, 0.9, 3.0)
ORIGIN_LPS = (-12.5, 40.0, 101.25)
OBLIQUE = rotation_matrix((1.0, 2.0, 0.5), 27.0)
LEFT = OBLIQUE @ np.diag([1.0, 1.0, -1.0])  # det < 0

GEOMETRIES = {
    "lps_identity": np.eye(3),
    "oblique": OBLIQUE,
    "left_handed": LEFT,
    "permuted": np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
}


def make(name: str) -> VolumeGeometry:
    return VolumeGeometry.from_lps(SPACING_XYZ, ORIGIN_LPS, GEOMETRIES[name], SHAPE)


def sitk_image(direction) -> sitk.Image:
    image = sitk.Image(SHAPE[2], SHAPE[1], SHAPE[0], sitk.sitkUInt8)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_LPS)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    return image


def random_kji(rng, n=50):
    return rng.uniform(-0.49, np.asarray(SHAPE) - 0.51, size=(n, 3))


def test_identity_lps_is_ras_with_x_y_flipped():
    g = make("lps_identity")
    assert np.allclose(g.ijk_to_ras[:3, :3], np.diag([-0.7, -0.9, 3.0]))
    assert np.allclose(g.ijk_to_ras[:3, 3], [12.5, -40.0, 101.25])
    # voxel (z=2, y=3, x=4) by hand: LPS = origin + (4*0.7, 3*0.9, 2*3.0)
    lps = np.array(ORIGIN_LPS) + [2.8, 2.7, 6.0]
    assert np.allclose(g.kji_to_lps([2, 3, 4]), lps)
    assert np.allclose(g.kji_to_ras([2, 3, 4]), lps * [-1, -1, 1])
    assert g.spacing_zyx == pytest.approx((3.0, 0.9, 0.7))
    assert g.spacing_xyz == pytest.approx(SPACING_XYZ)
    assert not g.is_left_handed


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_agrees_with_simpleitk(name):
    g, image = make(name), sitk_image(GEOMETRIES[name])
    rng = np.random.default_rng(0)
    kji = random_kji(rng)
    for p in kji:
        lps = image.TransformContinuousIndexToPhysicalPoint(tuple(p[::-1]))  # ITK index is (x, y, z)
        assert np.allclose(g.kji_to_lps(p), lps, atol=1e-9)
        assert np.allclose(g.lps_to_kji(lps), p, atol=1e-9)
        assert np.allclose(g.ras_to_kji(np.multiply(lps, [-1, -1, 1])), p, atol=1e-9)
        nearest = image.TransformPhysicalPointToIndex(lps)
        assert tuple(g.lps_to_kji_index(lps)[::-1]) == nearest
    assert g.is_left_handed == (np.linalg.det(GEOMETRIES[name]) < 0)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_round_trips(name):
    g = make(name)
    kji = random_kji(np.random.default_rng(1)).reshape(5, 10, 3)  # any leading shape
    assert g.ras_to_kji(g.kji_to_ras(kji)).shape == (5, 10, 3)
    assert np.allclose(g.ras_to_kji(g.kji_to_ras(kji)), kji, atol=1e-9)
    assert np.allclose(g.lps_to_kji(g.kji_to_lps(kji)), kji, atol=1e-9)
    index = np.floor(kji + 0.5).astype(int)
    assert np.array_equal(g.ras_to_kji_index(g.kji_to_ras(index)), index)
    # constructors agree with each other
    assert VolumeGeometry.from_ras_matrix(g.ijk_to_ras, SHAPE) == g
    assert VolumeGeometry.from_sitk(sitk_image(GEOMETRIES[name])).allclose(g, atol=1e-12)
    again = VolumeGeometry.from_lps(g.spacing_xyz, g.origin_lps, g.direction_lps, g.shape)
    assert again.allclose(g, atol=1e-12)
    assert np.allclose(g.ras_to_ijk @ g.ijk_to_ras, np.eye(4))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_apply_to_sitk(name):
    g = make(name)
    image = g.apply_to_sitk(sitk.Image(SHAPE[2], SHAPE[1], SHAPE[0], sitk.sitkInt16))
    assert image.GetSpacing() == pytest.approx(SPACING_XYZ)
    assert image.GetOrigin() == pytest.approx(ORIGIN_LPS)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), GEOMETRIES[name], atol=1e-12)
    with pytest.raises(GeometryError, match="does not match"):
        g.apply_to_sitk(sitk.Image(SHAPE[0], SHAPE[1], SHAPE[2], sitk.sitkInt16))  # x, z swapped


def test_left_handed_same_in_ras_and_lps():
    g = make("left_handed")
    assert g.is_left_handed
    assert np.linalg.det(g.direction_ras) < 0 and np.linalg.det(g.direction_lps) < 0
    assert np.allclose(g.direction_lps, LEFT)


def test_box_from_rotated_corners_covers_exactly_the_box():
    rng = np.random.default_rng(2)
    for name in sorted(GEOMETRIES):
        g = make(name)
        lo, hi = np.array([2, 3, 5]), np.array([7, 11, 6])
        for corners in (
            g.kji_box_to_ras_corners(lo, hi),  # outer voxel faces
            g.kji_to_ras(np.array(list(itertools.product(*zip(lo, hi))))),  # voxel centres
        ):
            got_lo, got_hi = g.box_from_ras_corners(corners[rng.permutation(8)])
            assert got_lo.tolist() == lo.tolist() and got_hi.tolist() == hi.tolist(), name
            assert got_lo.dtype == np.int64


def test_box_from_ras_min_max_on_a_90_degree_rotation():
    # LPS direction: i -> -P (= +A), j -> +L, k -> S. So x index grows anterior, y grows left.
    g = VolumeGeometry.from_lps((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), GEOMETRIES["permuted"], SHAPE)
    assert np.allclose(g.kji_to_ras([0, 0, 1]), [0, 1, 0])  # one x step = 1 mm anterior
    assert np.allclose(g.kji_to_ras([0, 1, 0]), [-2, 0, 0])  # one y step = 2 mm to the left (R -)
    # RAS box: R in [-9, -3.1] (left of origin), A in [2.2, 6.9], S in [-1, 7.4]
    lo, hi = g.box_from_ras_corners([[-3.1, 6.9, 7.4], [-9.0, 2.2, -1.0]])  # min/max in any order
    # y = -R/2 in [1.55, 4.5] -> 2..4; x = A in [2.2, 6.9] -> 3..6; z = S/3 in [-0.33, 2.47] -> 0..2
    assert lo.tolist() == [0, 2, 3] and hi.tolist() == [2, 4, 6]


def test_box_covers_all_voxel_centres_inside_an_oblique_ras_box():
    g = make("oblique")
    centre = g.kji_to_ras(np.asarray(SHAPE) / 2)
    box = np.array([centre - [6, 4, 9], centre + [5, 7, 8]])
    lo, hi = g.box_from_ras_corners(box)
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    ras = g.kji_to_ras(np.stack([k, j, i], -1))
    inside = np.all((ras >= box[0]) & (ras <= box[1]), axis=-1)
    idx = np.argwhere(inside)
    assert len(idx) > 20
    assert np.all(idx.min(0) >= lo) and np.all(idx.max(0) <= hi)
    # tight: every face of the result is within one voxel of a converted corner
    kji = g.ras_to_kji(list(itertools.product(*box.T)))
    top = np.asarray(SHAPE) - 1
    assert np.all(np.abs(lo - np.clip(kji.min(0), 0, top)) < 1)
    assert np.all(np.abs(hi - np.clip(kji.max(0), 0, top)) < 1)


def test_box_clipping_thin_and_outside():
    g = make("lps_identity")
    corners = g.kji_box_to_ras_corners([-5, 2, 20], [3, 4, 40])  # sticks out at z < 0 and x > 22
    lo, hi = g.box_from_ras_corners(corners)
    assert lo.tolist() == [0, 2, 20] and hi.tolist() == [3, 4, 22]
    thin = g.kji_to_ras([[4.1, 3, 3], [4.2, 8, 9]])  # thinner than a voxel along z
    lo, hi = g.box_from_ras_corners(thin)
    assert lo.tolist() == [4, 3, 3] and hi.tolist() == [4, 8, 9]
    with pytest.raises(OutsideVolumeError, match="outside the volume"):
        g.box_from_ras_corners(g.kji_box_to_ras_corners([20, 2, 2], [30, 5, 5]))
    with pytest.raises(GeometryError, match=r"\(8, 3\) or \(2, 3\)"):
        g.box_from_ras_corners(np.zeros((4, 3)))


def test_points_outside_the_volume():
    g = make("oblique")
    inside, outside = g.kji_to_ras([1, 1, 1]), g.kji_to_ras([1, -0.6, 1])
    edge = g.kji_to_ras([SHAPE[0] - 0.51, 0, 0])  # still in the last voxel
    assert g.ras_to_kji_index(edge).tolist() == [SHAPE[0] - 1, 0, 0]
    with pytest.raises(OutsideVolumeError, match="1 point"):
        g.ras_to_kji_index([inside, outside])
    index = g.ras_to_kji_index([inside, outside], strict=False)
    assert index.tolist() == [[1, 1, 1], [1, -1, 1]]
    assert g.contains_index(index).tolist() == [True, False]
    assert g.contains_kji([[1, -0.6, 1], [1, -0.4, 1]]).tolist() == [False, True]


def test_npz_spacing_order():
    assert npz_spacing_to_zyx([3.0, 0.8, 0.7]) == (3.0, 0.8, 0.7)  # project default: stored z, y, x
    assert npz_spacing_to_zyx(np.array([0.7, 0.8, 3.0]), order="xyz") == (3.0, 0.8, 0.7)
    assert zyx_to_npz_spacing((3.0, 0.8, 0.7)).tolist() == [3.0, 0.8, 0.7]
    assert zyx_to_npz_spacing((3.0, 0.8, 0.7), order="xyz").tolist() == [0.7, 0.8, 3.0]
    g = VolumeGeometry.from_npz_spacing([3.0, 0.8, 0.7], (4, 5, 6))
    assert g.spacing_zyx == pytest.approx((3.0, 0.8, 0.7)) and g.origin_lps == (0.0, 0.0, 0.0)
    assert np.allclose(g.direction_lps, np.eye(3))
    with pytest.raises(GeometryError, match="3 values"):
        npz_spacing_to_zyx([1.0, 2.0])
    with pytest.raises(GeometryError, match="order"):
        npz_spacing_to_zyx([1.0, 2.0, 3.0], order="yxz")
    with pytest.raises(GeometryError, match="> 0"):
        npz_spacing_to_zyx([1.0, 0.0, 3.0])


def test_ras_lps_helpers():
    pts = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    assert np.allclose(ras_to_lps(pts), [[-1, -2, 3], [4, -5, -6]])
    assert np.allclose(transform_points(LPS_TO_RAS, pts), ras_to_lps(pts))
    shift_ras = np.eye(4)
    shift_ras[:3, :3] = rotation_matrix((0, 0, 1), 30)
    shift_ras[:3, 3] = [10, 20, 30]
    shift_lps = ras_to_lps_transform(shift_ras)
    assert np.allclose(ras_to_lps(transform_points(shift_ras, pts)), transform_points(shift_lps, ras_to_lps(pts)))


def test_invalid_geometries():
    with pytest.raises(GeometryError, match="orthonormal"):
        VolumeGeometry.from_lps((1, 1, 1), (0, 0, 0), np.diag([1.0, 2.0, 1.0]), (2, 2, 2))
    with pytest.raises(GeometryError, match="> 0"):
        VolumeGeometry.from_lps((1, 0, 1), (0, 0, 0), np.eye(3), (2, 2, 2))
    with pytest.raises(GeometryError, match="shape"):
        VolumeGeometry.from_lps((1, 1, 1), (0, 0, 0), np.eye(3), (2, 2))
    with pytest.raises(GeometryError, match="singular"):
        VolumeGeometry((2, 2, 2), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(GeometryError, match=r"\(\.\.\., 3\)"):
        make("oblique").ras_to_kji([1.0, 2.0])
    with pytest.raises(GeometryError, match="3-D"):
        VolumeGeometry.from_sitk(sitk.Image(4, 4, sitk.sitkUInt8))
    g = make("oblique")
    with pytest.raises(AttributeError):
        g.shape = (1, 1, 1)
    with pytest.raises(ValueError):
        g.ijk_to_ras[0, 0] = 5.0  # read-only
