"""Fixtures of the ENSAMTraining module tests: real MRML scenes (slicer-core), tiny data and models."""

from __future__ import annotations

import pytest


@pytest.fixture
def scene():
    """The vtkMRMLScene of a fresh headless scene (application, colour, segmentations, volumes logics)."""
    pytest.importorskip("slicer", reason="the MRML tests need the slicer-core wheel")
    from ENSAMSegmentLib.mrml.scene import new_scene

    headless = new_scene()
    yield headless.scene
    headless.clear()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A complete model file of the tiny architecture (untrained)."""
    from ENSAMTrainingLib.mrml.scenarios import tiny_model_file

    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """2 flat challenge .npz phantoms."""
    from ENSAMTrainingLib.mrml.scenarios import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("data"), 2)
