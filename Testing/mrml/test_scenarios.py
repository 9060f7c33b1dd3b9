"""The shared MRML scenarios (also run inside Slicer by ENSAMSegmentTest), one pytest case each."""

import pytest

from ENSAMSegmentLib.mrml.selftest_scenarios import SCENARIOS


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name, scene):
    SCENARIOS[name](scene)
