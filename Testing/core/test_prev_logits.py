"""The fed-back logits path (PrevLogitEncoder): it sees the mask, locally (issue 11, finding 1)."""

from __future__ import annotations

import pytest
import torch

from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
from ENSAMSegmentLib.core.network.prompts import PREV_LOGIT_BOUND

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 1, 32, 32, 32)  # 4 x 4 x 4 bottleneck cells of 8^3 voxels


@pytest.fixture(scope="module")
def prev():
    torch.manual_seed(0)
    return ENSAM(ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)).prompt_encoder.prev


def changed_cells(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool [4, 4, 4]: bottleneck cells whose features differ."""
    return (a - b).abs().amax(dim=1)[0] > 1e-6


def cells_of(voxels: torch.Tensor) -> torch.Tensor:
    """bool [4, 4, 4]: cells holding at least one True voxel of [32, 32, 32]."""
    return voxels.reshape(4, 8, 4, 8, 4, 8).any(dim=(1, 3, 5))


def test_different_masks_give_different_features_exactly_where_they_differ(prev):
    background = torch.full(SHAPE, -8.0)
    small, large = background.clone(), background.clone()
    small[..., 8:16, 8:16, 8:16] = 8.0  # one cell of foreground
    large[..., 8:24, 0:32, 0:16] = 8.0  # 6 % of the volume ... 25 %
    with torch.no_grad():
        f_bg, f_small, f_large, f_all = (prev(x) for x in (background, small, large, -background))
    assert torch.equal(changed_cells(f_small, f_bg), cells_of(small[0, 0] > 0))
    assert torch.equal(changed_cells(f_large, f_bg), cells_of(large[0, 0] > 0))
    assert changed_cells(f_all, f_small).sum() == 63  # all but the one cell that is foreground in both
    # the features of a cell do not depend on what the rest of the grid holds (no statistics over it)
    assert torch.equal(f_small[..., 0, 0, 0], f_bg[..., 0, 0, 0])


def test_a_shifted_logit_map_changes_features_only_where_the_sign_changes(prev):
    logits = torch.full(SHAPE, -6.0)
    logits[..., :16, :, :] = 6.0
    logits[..., 16:24, 8:16, 8:16] = 1.0  # an uncertain block that a shift of -2.5 turns to background
    shifted = logits - 2.5
    flipped = (logits > 0) != (shifted > 0)
    assert flipped.any()
    with torch.no_grad():
        before, after = prev(logits), prev(shifted)
    assert torch.equal(changed_cells(before, after), cells_of(flipped[0, 0]))
    # confident voxels look alike whatever their logit: rescaling a saturated map changes nothing
    saturated = torch.where(logits > PREV_LOGIT_BOUND, 6.0, -6.0)
    with torch.no_grad():
        assert torch.equal(prev(saturated), prev(3 * saturated))
