"""Real MRML scenes from the slicer-core wheel (no fake slicer module); skipped without the wheel."""

import pytest

pytest.importorskip("slicer", reason="the MRML tests need the slicer-core wheel")


@pytest.fixture
def headless():
    """A fresh HeadlessScene (scene + application, colour, segmentations, markups, volumes logics)."""
    from ENSAMSegmentLib.mrml.scene import new_scene

    h = new_scene()
    yield h
    h.clear()


@pytest.fixture
def scene(headless):
    """The vtkMRMLScene of a fresh headless scene."""
    return headless.scene
