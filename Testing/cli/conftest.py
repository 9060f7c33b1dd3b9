"""Shared fixtures of the `ensam` tool tests: a small real model file."""

from __future__ import annotations

import pytest

from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
from ENSAMSegmentLib.core.network import ENSAMConfig

SMALL = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), mlp_hidden=64)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """An untrained (random, seed 0) ENSAM model file of a small configuration."""
    return create_untrained_model_file(tmp_path_factory.mktemp("model") / "small.pt", seed=0, config=SMALL)
