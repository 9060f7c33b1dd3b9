"""The ENSAMTraining logic scenarios (the module's self-test runs the same functions inside Slicer):
bad input, a device the machine lacks, `ensam coreset` tables, scene export of an oblique volume, real
short training runs with Stop / Resume / install, a killed run, and "Train on this scene"."""

from __future__ import annotations

import pytest

from ENSAMTrainingLib.mrml.scenarios import SCENARIOS


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name, scene, tmp_path):
    SCENARIOS[name](scene, tmp_path)
