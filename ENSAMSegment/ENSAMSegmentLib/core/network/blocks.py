"""Convolutional parts of ENSAM: the SegResNet-style encoder, the mirrored decoder, padding helpers.

Conventions follow MONAI's SegResNet: 3x3x3 convolutions without bias, GroupNorm (8 groups) and
ReLU in pre-activation residual blocks, a stride-2 3x3x3 convolution (C/2 -> C) opening every level
after the first. Three stride-2 levels put the bottleneck at 1/8 of the input, so every input side
must be a multiple of 8 (see `pad_to_multiple`).

Frozen normalisation and windowed decoding (interactive clicks): a decoder pass given an empty
`norms` dict records every GroupNorm's statistics in it; a pass given the filled dict reuses them, so
that the decoder becomes a local function of its inputs. `Decoder.forward_window` then computes the
decoder's output over any window exactly as the whole pass with the same `norms` would (every level
over its window plus the halo its convolutions and upsampling need), at the cost of the window.
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


Norms = dict  # nn.GroupNorm -> (mean, rstd) [N, groups] float32: one decoder pass's statistics


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, norms: Norms | None) -> torch.Tensor:
    """norm(x); with `norms`: this layer's statistics taken from `norms`, or computed and stored there
    when absent. Statistics are per (sample, group) over channels and space, as nn.GroupNorm's."""
    if norms is None:
        return norm(x)
    n, c, g = x.shape[0], x.shape[1], norm.num_groups
    if norm not in norms:
        if x.device.type == "cpu" or x.dtype == torch.float32:  # mixed bf16/fp32 works on the CPU
            out, mean, rstd = torch.native_group_norm(x, norm.weight, norm.bias, n, c, x[0, 0].numel(), g, norm.eps)
            norms[norm] = (mean.float(), rstd.float())
            return out
        var, mean = x.float().reshape(n, g, -1).var_mean(-1, unbiased=False)
        norms[norm] = (mean, (var + norm.eps).rsqrt())
    mean, rstd = (t.to(x.device).repeat_interleave(c // g, dim=1) for t in norms[norm])  # [N, C]
    scale = rstd * norm.weight.float()
    shift = norm.bias.float() - mean * scale
    return torch.addcmul(shift.view(n, c, 1, 1, 1).to(x.dtype), x, scale.view(n, c, 1, 1, 1).to(x.dtype))


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

    def forward(self, x: torch.Tensor, norms: Norms | None = None) -> torch.Tensor:
        h = self.conv1(F.relu(group_norm(self.norm1, x, norms)))
        h = self.conv2(F.relu(group_norm(self.norm2, h, norms)))
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

    def forward(self, x: torch.Tensor, skip: torch.Tensor, norms: Norms | None = None) -> torch.Tensor:
        return self.block(torch.cat([self.upsample(x), skip], dim=1), norms)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 2C, d, h, w] -> [N, C, 2d, 2h, 2w]."""
        return F.interpolate(self.reduce(x), scale_factor=2, mode="trilinear", align_corners=False)


class Decoder(nn.Module):
    """Mirror of the encoder with one ResBlock per level, then GN, ReLU and a 1x1 conv to one logit."""

    def __init__(self, init_filters: int, n_levels: int, groups: int = 8):
        super().__init__()
        channels = [init_filters * 2**i for i in range(n_levels - 1)]  # skip widths, fine to coarse
        self.ups = nn.ModuleList(UpLevel(c, groups) for c in reversed(channels))
        self.final_norm = nn.GroupNorm(groups, init_filters)
        self.final_conv = conv1(init_filters, 1, bias=True)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], norms: Norms | None = None) -> torch.Tensor:
        # x: [N, 8C, d, h, w]; skips fine to coarse: [N, C, D, H, W], [N, 2C, ...], [N, 4C, ...]
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip, norms)
        return self.head(x, norms)  # [N, 1, D, H, W]

    def head(self, x: torch.Tensor, norms: Norms | None = None) -> torch.Tensor:
        return self.final_conv(F.relu(group_norm(self.final_norm, x, norms)))

    def forward_window(self, x: torch.Tensor, skips: list[torch.Tensor], window, norms: Norms) -> torch.Tensor:
        """forward(x, skips, norms)[..., window] at the cost of the window: logits [N, 1, *window sizes].

        window: 3 slices of full-resolution voxels. Working back from the output, every level is
        computed over its window plus a halo: 2 voxels for a ResBlock's two 3x3x3 convolutions, and
        for the x2 trilinear upsampling the coarse voxels either side of the fine ones. Halos are
        clipped at the image border, where the whole pass zero-pads and edge-clamps the same way, so
        the result is exact up to floating-point rounding. `norms` must hold the statistics of a whole
        pass (see `group_norm`): recomputing them over a window would change the result.
        """
        out_shapes = [tuple(s.shape[-3:]) for s in reversed(skips)]  # each level's output, coarse to fine
        in_shapes = [tuple(x.shape[-3:])] + out_shapes[:-1]  # each level's coarse input
        windows, inputs = [tuple(window)], []  # output windows, built fine to coarse; input windows
        for level in reversed(range(len(self.ups))):
            inputs.insert(0, _grow(windows[0], 2, out_shapes[level]))
            windows.insert(0, tuple(slice(max(0, s.start // 2 - 1), min(n, (s.stop + 1) // 2 + 1))
                                    for s, n in zip(inputs[0], in_shapes[level])))
        h = x[(..., *windows[0])]  # windows: x's, then every level's output, the last = `window`
        for up, skip, inp, coarse, out in zip(self.ups, reversed(skips), inputs, windows, windows[1:]):
            u = up.upsample(h)[(..., *_within(inp, coarse, 2))]  # upsampled coarse window covers inp
            h = up.block(torch.cat([u, skip[(..., *inp)]], dim=1), norms)[(..., *_within(out, inp, 1))]
        return self.head(h, norms)


def _grow(window, halo: int, shape) -> tuple:
    return tuple(slice(max(0, s.start - halo), min(n, s.stop + halo)) for s, n in zip(window, shape))


def _within(inner, outer, factor: int) -> tuple:
    """`inner` relative to the start of `outer`, whose voxels are `factor` times coarser."""
    return tuple(slice(i.start - o.start * factor, i.stop - o.start * factor) for i, o in zip(inner, outer))


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
