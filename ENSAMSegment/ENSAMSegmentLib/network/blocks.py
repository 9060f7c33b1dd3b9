"""Convolutional parts of ENSAM: the SegResNet-style encoder, the mirrored decoder, padding helpers.

Conventions follow MONAI's SegResNet: 3x3x3 convolutions without bias, GroupNorm (8 groups) and
ReLU in pre-activation residual blocks, a stride-2 3x3x3 convolution (C/2 -> C) opening every level
after the first. Three stride-2 levels put the bottleneck at 1/8 of the input, so every input side
must be a multiple of 8 (see `pad_to_multiple`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def conv3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1(c_in: int, c_out: int, bias: bool = False) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, kernel_size=1, bias=bias)


class ResBlock(nn.Module):
    """x -> skip(x) + conv(relu(GN(conv(relu(GN(x)))))); skip is a 1x1 conv when c_in != c_out."""

    def __init__(self, c_in: int, c_out: int | None = None, groups: int = 8):
        super().__init__()
        c_out = c_out or c_in
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = conv3(c_in, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = conv3(c_out, c_out)
        self.skip = nn.Identity() if c_in == c_out else conv1(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """SegResNet encoder. Returns the output of every level: [C, 2C, 4C, 8C] channels at 1, 1/2, 1/4, 1/8."""

    def __init__(self, in_channels: int, init_filters: int, blocks_down, groups: int = 8):
        super().__init__()
        self.init_conv = conv3(in_channels, init_filters)
        self.levels = nn.ModuleList()
        for i, n_blocks in enumerate(blocks_down):
            c = init_filters * 2**i
            down = conv3(c // 2, c, stride=2) if i > 0 else nn.Identity()
            self.levels.append(nn.Sequential(down, *[ResBlock(c, groups=groups) for _ in range(n_blocks)]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.init_conv(x)  # [B, C, D, H, W]
        outputs = []
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return outputs


class UpLevel(nn.Module):
    """One decoder level: 1x1 conv (2C -> C) and trilinear x2 upsampling (MONAI's "nontrainable"
    UpSample), concatenation of the skip (C + C channels), one ResBlock (2C -> C)."""

    def __init__(self, c: int, groups: int = 8):
        super().__init__()
        self.reduce = conv1(2 * c, c)
        self.block = ResBlock(2 * c, c, groups=groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2, mode="trilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class Decoder(nn.Module):
    """Mirror of the encoder with one ResBlock per level, then GN, ReLU and a 1x1 conv to one logit."""

    def __init__(self, init_filters: int, n_levels: int, groups: int = 8):
        super().__init__()
        channels = [init_filters * 2**i for i in range(n_levels - 1)]  # skip widths, fine to coarse
        self.ups = nn.ModuleList(UpLevel(c, groups) for c in reversed(channels))
        self.final_norm = nn.GroupNorm(groups, init_filters)
        self.final_conv = conv1(init_filters, 1, bias=True)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        # x: [N, 8C, d, h, w]; skips fine to coarse: [N, C, D, H, W], [N, 2C, ...], [N, 4C, ...]
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.final_conv(F.relu(self.final_norm(x)))  # [N, 1, D, H, W]


class PadInfo(NamedTuple):
    """What `pad_to_multiple` did: the spatial shape before and after (zeros appended at the far end)."""

    original_shape: tuple[int, ...]
    padded_shape: tuple[int, ...]


def pad_to_multiple(x: torch.Tensor, multiple: int = 8, value: float = 0.0) -> tuple[torch.Tensor, PadInfo]:
    """Pad the last three (spatial) axes of x at their far end up to multiples of `multiple`.

    Padding only at the far end keeps voxel coordinates (prompts) valid in the padded grid.
    """
    shape = tuple(x.shape[-3:])
    padded = tuple(-(-s // multiple) * multiple for s in shape)
    pad = []
    for s, p in zip(reversed(shape), reversed(padded)):
        pad += [0, p - s]
    return F.pad(x, pad, value=value), PadInfo(shape, padded)


def crop_to_shape(x: torch.Tensor, shape) -> torch.Tensor:
    """Keep the first shape[i] voxels of each of the last three axes (undoes `pad_to_multiple`)."""
    if isinstance(shape, PadInfo):
        shape = shape.original_shape
    d, h, w = shape
    return x[..., :d, :h, :w]


unpad = crop_to_shape
