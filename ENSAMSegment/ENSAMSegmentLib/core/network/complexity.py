"""Parameter and multiply-accumulate (MAC) counts of ENSAM, analytic and measured.

`count_macs` counts, from the config alone, every multiply-accumulate of the convolutions, linear
layers and attention/rotation matrix products of encode + decode (what torch's FlopCounterMode sees;
it counts FLOPs = 2 x MACs). Normalisation, activations, softmax, trilinear upsampling and the
input-size independent matrix exponential of the LieRE bases are not counted, as usual.
`measure_macs` runs the real model under FlopCounterMode, to check the analytic count.

The paper's "368 G FLOPs" at the 4,194,304-voxel patch matches the MAC count of this architecture
(about 340 G MACs = 680 G FLOPs for the default config), so the paper's FLOPs are MACs.
"""

from __future__ import annotations

import torch
from torch import nn

from .ensam import ENSAMConfig

MAX_PATCH = (128, 128, 256)  # 4,194,304 voxels, the largest training patch


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encoder_macs(cfg: ENSAMConfig, shape) -> int:
    v = shape[0] * shape[1] * shape[2]
    c = cfg.init_filters
    macs = 27 * cfg.in_channels * c * v  # init conv
    for i, n_blocks in enumerate(cfg.blocks_down):
        ci, vi = c * 2**i, v // 8**i
        if i > 0:
            macs += 27 * (ci // 2) * ci * vi  # stride-2 conv
        macs += n_blocks * 2 * 27 * ci * ci * vi
    return macs


def decoder_macs(cfg: ENSAMConfig, shape) -> int:
    v = shape[0] * shape[1] * shape[2]
    macs = 0
    for level in range(len(cfg.blocks_down) - 1):
        c, vl = cfg.init_filters * 2**level, v // 8**level
        macs += 2 * c * c * (vl // 8)  # 1x1 reduce at the coarser level
        macs += (27 * 2 * c * c + 27 * c * c + 2 * c * c) * vl  # ResBlock 2C -> C with 1x1 skip
    return macs + cfg.init_filters * v  # final 1x1 conv


def attention_macs(cfg: ENSAMConfig, lq: int, lk: int) -> int:
    """One normalized attention from lq queries to lk keys (per object)."""
    c, d = cfg.dim, cfg.dim // cfg.heads
    macs = (2 * lq + 2 * lk) * c * c + 2 * lq * lk * c  # q, out; k, v; scores, weights @ v
    if cfg.position_encoding == "liere":
        macs += (lq + lk) * c * d  # Q^T q, Q^T k (per head d x d)
    return macs


def interaction_macs(cfg: ENSAMConfig, grid_cells: int, n_tokens: int, n_objects: int = 1) -> int:
    """`n_objects` objects of `n_tokens` prompt tokens each, against `grid_cells` bottleneck cells.
    Position terms of the image grid are computed once for all objects."""
    t, cells, c = n_tokens, grid_cells, cfg.dim
    per_layer = (attention_macs(cfg, t, t) + attention_macs(cfg, t, cells)
                 + 2 * t * c * cfg.mlp_hidden + attention_macs(cfg, cells, t))
    macs = n_objects * cfg.interaction_layers * per_layer
    if cfg.position_encoding == "liere":  # rotation angles theta . p, per attention: q and k positions
        token_positions, image_positions = n_objects * t * 4, cells * 2  # per layer
        macs += cfg.interaction_layers * (token_positions + image_positions) * 3 * c // 2
    else:  # sinusoidal features (3 axes x 8 frequencies x sin/cos = 48) -> width, once on entry
        macs += (n_objects * t + cells) * 48 * c
    return macs


def prev_logit_macs(cfg: ENSAMConfig, shape) -> int:
    v = shape[0] * shape[1] * shape[2]
    c1, c2 = cfg.prev_channels
    return 8 * c1 * v // 8 + 8 * c1 * c2 * v // 64 + 8 * c2 * cfg.dim * v // 512


def count_macs(cfg: ENSAMConfig, shape=MAX_PATCH, n_objects: int = 1, n_tokens: int = 2,
               with_prev_logits: bool = False) -> int:
    """MACs of encode + decode of `n_objects` objects with `n_tokens` prompt tokens each (2 = a box)
    at input `shape` (sides multiples of 8), with or without previous logits."""
    cells = shape[0] * shape[1] * shape[2] // 512
    per_object = decoder_macs(cfg, shape) + (prev_logit_macs(cfg, shape) if with_prev_logits else 0)
    return (encoder_macs(cfg, shape) + n_objects * per_object
            + interaction_macs(cfg, cells, n_tokens, n_objects))


def measure_macs(model, image: torch.Tensor, prompts, prev_logits=None) -> int:
    """MACs of model(image, prompts, prev_logits) as FlopCounterMode counts them (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(image, prompts, prev_logits)
    return counter.get_total_flops() // 2


def summary(cfg: ENSAMConfig, model: nn.Module | None = None) -> dict:
    """Parameters, and MACs/FLOPs at the largest training patch (one object, a box, encode + decode)."""
    if model is None:
        with torch.device("meta"):
            from .ensam import ENSAM

            model = ENSAM(cfg)
    macs = count_macs(cfg, MAX_PATCH)
    return {"parameters": count_parameters(model), "max_patch": list(MAX_PATCH),
            "max_patch_voxels": MAX_PATCH[0] * MAX_PATCH[1] * MAX_PATCH[2],
            "gmacs_max_patch": macs / 1e9, "gflops_max_patch": 2 * macs / 1e9}
