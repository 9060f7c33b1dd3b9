"""Shared fixtures of the browser-app tests: a small real model file and a small real image file."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the browser app needs the 'web' extra (trame-slicer)")
pytest.importorskip("slicer", reason="the browser app needs slicer-core (installed with trame-slicer)")

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), mlp_hidden=64)
IMAGE_SHAPE = (32, 64, 64)  # (z, y, x)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """An untrained (random, seed 0) ENSAM model file of a small configuration."""
    from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
    from ENSAMSegmentLib.core.network import ENSAMConfig

    return create_untrained_model_file(tmp_path_factory.mktemp("model") / "small.pt", seed=0,
                                       config=ENSAMConfig(**SMALL))


@pytest.fixture(scope="session")
def small_image(tmp_path_factory):
    """(path, array, geometry): a CT-like phantom (32, 64, 64) written as NRRD, anisotropic spacing."""
    from ENSAMSegmentLib.core.geometry import VolumeGeometry
    from ENSAMSegmentLib.core.imageio import write_image
    from ENSAMSegmentLib.core.phantom import make_phantom

    image, _labels = make_phantom(shape_zyx=IMAGE_SHAPE, seed=1, n_objects=2, spacing=(2.0, 1.5, 1.5))
    geometry = VolumeGeometry.from_lps((1.5, 1.5, 2.0), (10.0, -20.0, 5.0), np.eye(3), image.shape)
    path = tmp_path_factory.mktemp("image") / "phantom.nrrd"
    write_image(path, image, geometry)
    return path, image, geometry
