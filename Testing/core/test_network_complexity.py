"""ENSAM's size: parameters and MACs of the default config against the paper, analytic count checked."""

from __future__ import annotations

import pytest
import torch

from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts
from ENSAMSegmentLib.core.network.complexity import MAX_PATCH, count_macs, count_parameters, measure_macs, summary


def test_default_config_matches_the_paper_size():
    cfg = ENSAMConfig()
    parameters = count_parameters(ENSAM(cfg))
    assert 4.95e6 <= parameters <= 6.05e6, parameters  # 5.5 M +- 10 %
    macs = count_macs(cfg, MAX_PATCH, n_objects=1, n_tokens=2)
    assert MAX_PATCH[0] * MAX_PATCH[1] * MAX_PATCH[2] == 4_194_304
    assert 368e9 * 0.85 <= macs <= 368e9 * 1.15, macs / 1e9  # the paper's "368 G FLOPs" are MACs
    assert not 368e9 * 0.85 <= 2 * macs <= 368e9 * 1.15  # FLOPs (2 x MACs) would not match
    info = summary(cfg)
    assert info["parameters"] == parameters and info["gflops_max_patch"] == pytest.approx(2 * macs / 1e9)


@pytest.mark.parametrize("position", ["liere", "absolute"])
@pytest.mark.parametrize("with_prev", [False, True])
def test_analytic_macs_equal_flop_counter(position, with_prev):
    torch.manual_seed(0)
    cfg = ENSAMConfig(init_filters=8, blocks_down=(1, 2, 1, 2), heads=2, mlp_hidden=48,
                      position_encoding=position)
    model = ENSAM(cfg)
    shape = (16, 24, 32)
    prompts = Prompts.from_objects([{"box": ((2, 3, 4), (10, 20, 30)), "fg": [(5, 6, 7)]},
                                    {"bg": [(1, 2, 3)], "fg": [(4, 4, 4)]}])  # 2 objects, padded to 3 tokens
    prev = torch.randn(2, 1, *shape) if with_prev else None
    measured = measure_macs(model, torch.rand(1, 1, *shape), prompts, prev)
    assert measured == count_macs(cfg, shape, n_objects=2, n_tokens=3, with_prev_logits=with_prev)
