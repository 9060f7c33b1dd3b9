"""Shared fixtures of the training tests: tiny challenge-style data sets and a tiny model config."""

from __future__ import annotations

import numpy as np
import pytest

from ENSAMSegmentLib.core.geometry import VolumeGeometry
from ENSAMSegmentLib.core.imageio import write_image, write_labelmap
from ENSAMSegmentLib.core.phantom import make_phantom, write_challenge_dataset

SHAPE = (24, 40, 40)


@pytest.fixture(scope="session")
def npz_dataset(tmp_path_factory):
    """4 flat challenge .npz phantoms (CT_Phantom_0000 ... MR_Phantom_0003)."""
    folder = tmp_path_factory.mktemp("npz")
    write_challenge_dataset(folder, 4, shape=SHAPE, seed=0)
    return folder


def write_case(path, image, labels, spacing=(2.0, 1.0, 1.0)):
    """A challenge-layout npz straight from arrays, checks bypassed (labels None: no 'gts')."""
    arrays = {"imgs": image, "spacing": np.array(spacing)}
    if labels is not None:
        arrays["gts"] = labels
    np.savez_compressed(path, **arrays)
    return path


def write_pair(image_path, label_path, seed=0, shape=SHAPE):
    """A NIfTI/NRRD image (CT-like HU, float) and its label map from a phantom."""
    image, labels = make_phantom(shape, seed, n_objects=2)
    geometry = VolumeGeometry.from_npz_spacing((2.0, 1.0, 1.0), shape)
    write_image(image_path, image.astype(np.int16), geometry)
    if label_path is not None:
        write_labelmap(label_path, labels, geometry)
    return labels


# A small ENSAM (about 0.5 M parameters) that trains a step on a 16^3 patch in well under a second.
TINY_MODEL = dict(
    init_filters=8, norm_groups=4, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32,
    interaction_layers=1, prev_channels=(4, 8),
)
TINY_BUDGET = 4096


@pytest.fixture(scope="session")
def four_cases(tmp_path_factory):
    """4 challenge .npz phantoms for training runs."""
    folder = tmp_path_factory.mktemp("four")
    write_challenge_dataset(folder, 4, shape=SHAPE, seed=11)
    return folder
