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

CPU inference on large tensors streams (see "streaming" below): each block runs slab by slab along
depth with whole-tensor GroupNorm statistics, the same result up to rounding with a fraction of the
temporaries. Without autograd, ReLUs and residual additions also run in place on fresh tensors.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and state dict) that trains correctly under CPU bf16 autocast.

    oneDNN's bf16 backward of a stride-1 3x3x3 convolution whose input is 2 voxels deep reads
    uninitialised memory: its weight and input gradients come out wrong by orders of magnitude, NaN
    when that memory held NaN (torch 2.13.0+cpu on a CPU with AVX512-BF16, measured over every depth,
    height and width of 1-6 and 8-128 channels: depth 2 only, from 32 channels with 2 threads and
    from 16 with 1; forward, fp32 and stride 2 are exact), so the guard does not look at channels. In training such a layer is the bottleneck of a crop 9-16 voxels
    deep or the 1/4 level of one 8 deep: about 7 % of samples. Those calls run in fp32 instead.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias=None, stride=1, padding=1) -> torch.Tensor:
    """F.conv3d, in fp32 for a stride-1 convolution of an input 2 voxels deep under CPU autocast with
    autograd (see Conv3d). For convolutions with part of a layer's weight (UpLevel.skip_terms)."""
    stride1 = stride == 1 or tuple(stride) == (1, 1, 1)
    if (stride1 and x.shape[2] == 2 and weight.shape[2] > 1 and x.device.type == "cpu"
            and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            return F.conv3d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding)
    return F.conv3d(x, weight, bias, stride, padding)


def conv3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv3d:
    return Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


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
    scale, shift = scale_shift(norm, norms[norm], x)
    return torch.addcmul(shift, x, scale)


def scale_shift(norm: nn.GroupNorm, stats, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm with statistics `stats` = (mean, rstd) [N, groups] as x * scale + shift: both
    [N, C, 1, 1, 1], on the device and in the dtype of `like`."""
    n, c = stats[0].shape[0], norm.num_channels
    mean, rstd = (t.to(like.device).repeat_interleave(c // norm.num_groups, dim=1) for t in stats)  # [N, C]
    scale = rstd * norm.weight.float()
    shift = norm.bias.float() - mean * scale
    return scale.view(n, c, 1, 1, 1).to(like.dtype), shift.view(n, c, 1, 1, 1).to(like.dtype)


def norm_relu(norm: nn.GroupNorm, x: torch.Tensor, norms: Norms | None) -> torch.Tensor:
    """relu(group_norm(...)), the ReLU in place on the fresh normalised tensor (autograd-safe: GroupNorm's
    backward needs its input, not its output). One full-size temporary fewer per call."""
    return F.relu(group_norm(norm, x, norms), inplace=True)


def add_into(h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """h + other, written into h (a convolution's fresh output, which no backward needs) when the
    dtypes agree; out of place otherwise, so that type promotion stays that of `h + other`."""
    return h.add_(other) if h.dtype == other.dtype and h.shape == other.shape else h + other


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
        if streams(x):
            return stream_block(self, [x], norms)
        h = self.conv1(norm_relu(self.norm1, x, norms))
        h = self.conv2(norm_relu(self.norm2, h, norms))
        return add_into(h, self.skip(x))


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
        if streams(skip):
            return stream_block(self.block, [self.upsample(x), skip], norms)
        return self.block(torch.cat([self.upsample(x), skip], dim=1), norms)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 2C, d, h, w] -> [N, C, 2d, 2h, 2w]."""
        return upsample2x(self.reduce(x))

    def skip_terms(self, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the skip alone contributes to this level's block, the same for every decode of an image.

        The block's input is cat([u, skip]) (u = the upsampled decoder path, C + C channels). Its
        GroupNorm's groups fall wholly in one half, so normalising the skip's half does not depend on u,
        and a convolution of a concatenation is the sum of its halves' convolutions. Returns the
        skip's share of the first 3x3x3 convolution, conv1_skip(relu(GN_skip(skip))), and of the
        1x1 residual, skip_skip(skip): [N, C, D, H, W] each (`forward_with_terms` adds the rest).
        """
        c = skip.shape[1]
        if self.block.norm1.num_groups % 2:
            raise ValueError("skip terms need an even number of GroupNorm groups")
        return self._half_terms(skip, slice(c, 2 * c))

    def forward_with_terms(self, x: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """forward(x, skip) from the skip's `skip_terms`: the same function (up to rounding) with one
        3x3x3 convolution of C channels fewer per decode. Autograd: the terms' backward runs once for
        all the decodes that used them."""
        u = self.upsample(x)
        conv_u, residual_u = self._half_terms(u, slice(0, u.shape[1]))
        h = self.block.conv2(norm_relu(self.block.norm2, conv_u + terms[0], None))
        return h + residual_u + terms[1]

    def _half_terms(self, t: torch.Tensor, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """One half of the block's input (channels `part` of the concatenation) -> its share of
        conv1(relu(GN(input))) and of the 1x1 residual (its own GroupNorm groups and weights)."""
        block, norm = self.block, self.block.norm1
        a = F.relu(F.group_norm(t, norm.num_groups // 2, norm.weight[part], norm.bias[part], norm.eps))
        return conv3d(a, block.conv1.weight[:, part]), F.conv3d(t, block.skip.weight[:, part])


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

    def skip_terms(self, skips: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every level's `UpLevel.skip_terms`, coarse to fine (the order of `ups`)."""
        return [up.skip_terms(skip) for up, skip in zip(self.ups, reversed(skips))]

    def forward_with_terms(self, x: torch.Tensor, terms: list) -> torch.Tensor:
        """forward(x, skips) from the skips' `skip_terms` (whole tensors, no frozen statistics)."""
        for up, level_terms in zip(self.ups, terms):
            x = up.forward_with_terms(x, level_terms)
        return self.head(x)

    def head(self, x: torch.Tensor, norms: Norms | None = None) -> torch.Tensor:
        if streams(x):  # slab by slab: GroupNorm statistics first, then the 1x1 convolution of each slab
            slabs = slabs_of(x, x.shape[1], x.shape[1])
            stats = {self.final_norm: channel_stats(self.final_norm, [x], slabs, norms)}
            return assemble(slabs, lambda a, b: self.final_conv(norm_relu(self.final_norm, x[:, :, a:b], stats)))
        return self.final_conv(norm_relu(self.final_norm, x, norms))

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


SEPARABLE_UPSAMPLE_BYTES = 64 * 2**20  # up to this output size, upsample2x runs axis by axis


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False) for x [N, C, d, h, w].

    Up to SEPARABLE_UPSAMPLE_BYTES of output it is computed one axis at a time (the same weights:
    every new voxel is 3/4 of its nearer and 1/4 of its farther neighbour, edges clamped). On the CPU
    (one thread, 16 x 24x32x32 -> 48x64x64) its forward is 2.5x faster than aten's kernel in bf16 and
    1.5x in fp32, its backward 1.5x (bf16) and 2.6x (fp32); training's decoder upsamples 18 times a
    sample. Larger tensors (inference on big images) take aten's single pass: the separable one's
    temporaries reach about 2.5 times its output.
    """
    if x.numel() * 8 * x.element_size() > SEPARABLE_UPSAMPLE_BYTES:
        return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
    for dim in (2, 3, 4):
        x = _upsample_axis(x, dim)
    return x


def _upsample_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x twice as long along `dim`: voxel i becomes (3 x[i] + x[i-1]) / 4, (3 x[i] + x[i+1]) / 4."""
    n = x.shape[dim]
    before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)  # x[i-1], clamped
    after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)  # x[i+1], clamped
    out = torch.stack([torch.lerp(x, before, 0.25), torch.lerp(x, after, 0.25)], dim + 1)
    return out.flatten(dim, dim + 1)


# --------------------------------------------------------------------------------- streaming (CPU inference)
# Without autograd, a CPU block on a large tensor runs slab by slab along depth (dim 2): GroupNorm
# statistics of the whole tensor first (a pass over it), then every slab's convolution from its rows
# plus one halo row either side, normalised into one reused buffer. Same result as the whole-tensor
# pass up to rounding (Testing/core/test_network_streaming.py), but the temporaries (normalised input,
# ReLU, concatenation) are a slab instead of the whole tensor: the encoder's peak memory drops by two
# full-resolution tensors, and a slab's convolution output stays under glibc's largest mmap threshold
# (32 MB), so it is reused from the heap instead of being mapped, zero-filled and unmapped every layer.

STREAM_BYTES = 64 * 2**20  # a block whose fp32 input is larger streams (CPU, no autograd)
SLAB_BYTES = 24 * 2**20  # about what one slab of the block's widest tensor holds
ONEDNN_MIN_NCDH = 20481  # PyTorch hands fp32 convolutions with a smaller N*C*D*H to its slow native kernel


def streams(x: torch.Tensor) -> bool:
    """fp32 only: in bf16 (native-bf16 CPUs) tensors are half the size, and the slab-wise GroupNorm,
    its fp32 statistics and the per-slab conversions made the encoder 1.5x slower (measured)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.numel() * x.element_size() > STREAM_BYTES)


def slabs_of(x: torch.Tensor, widest: int, narrowest: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) along dim 2 of equal size (+-1), each about SLAB_BYTES for `widest` channels
    (a little more rather than less) and thick enough for oneDNN to convolve one of `narrowest` channels
    (ONEDNN_MIN_NCDH)."""
    n, _, depth, h, w = x.shape
    rows = max(SLAB_BYTES // (n * widest * h * w * x.element_size()), -(-ONEDNN_MIN_NCDH // (n * narrowest * h)), 1)
    count = max(1, depth // rows)
    bounds = [depth * i // count for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def stream_block(block: ResBlock, parts: list, norms: Norms | None) -> torch.Tensor:
    """block(torch.cat(parts, dim=1), norms), slab by slab (see above). The output goes into the memory
    of the first convolution's output h, each slab written once the next one has read its halo from h."""
    c_in, c_out = block.conv1.in_channels, block.conv1.out_channels
    slabs = slabs_of(parts[0], max(c_in, c_out), min(c_in, c_out))
    stats1 = channel_stats(block.norm1, parts, slabs, norms)
    buffer = _buffer(parts, c_in, slabs, halo=1)
    moments = [] if norms is None or block.norm2 not in norms else None  # of h's slabs, while in cache
    h = assemble(slabs, lambda a, b: _norm_conv(block.conv1, block.norm1, stats1, parts, a, b, buffer),
                 moments=moments)
    stats2 = channel_stats(block.norm2, [h], slabs, norms, moments)
    buffer = _buffer([h], c_out, slabs, halo=1)
    joined = _buffer(parts, c_in, slabs, halo=0) if len(parts) > 1 else None

    def output(a: int, b: int) -> torch.Tensor:
        y = _norm_conv(block.conv2, block.norm2, stats2, [h], a, b, buffer)
        x = parts[0][:, :, a:b] if joined is None else torch.cat([p[:, :, a:b] for p in parts], 1,
                                                                 out=joined[:, :, : b - a])
        return add_into(y, block.skip(x))

    return assemble(slabs, output, out=h, lag=True)


def channel_stats(norm: nn.GroupNorm, parts: list, slabs, norms: Norms | None, moments=None):
    """(mean, rstd) [N, groups] float32 of torch.cat(parts, dim=1): every slab's per-channel moments
    (`moments` when given, else read from the parts), merged in float64 (Chan et al.); taken from and
    stored in `norms` as group_norm does."""
    if norms is not None and norm in norms:
        return norms[norm]
    count, mean, m2 = 0, 0.0, 0.0
    for i, (a, b) in enumerate(slabs):
        var, m = moments[i] if moments else (torch.cat(t, 1) for t in zip(*(_moments(p[:, :, a:b]) for p in parts)))
        k = parts[0][0, 0, a:b].numel()
        delta, total = m - mean, count + k
        mean, m2, count = mean + delta * (k / total), m2 + var * k + delta**2 * (count * k / total), total
    n, g = mean.shape[0], norm.num_groups
    mean, m2 = mean.view(n, g, -1), m2.view(n, g, -1)
    group_mean = mean.mean(-1)
    var = (m2.sum(-1) / count + ((mean - group_mean[..., None]) ** 2).sum(-1)) / mean.shape[-1]
    stats = (group_mean.float(), (var + norm.eps).rsqrt().float())
    if norms is not None:
        norms[norm] = stats
    return stats


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(var, mean) [N, C] float64 of every channel of x [N, C, ...] over its space (native_group_norm
    with one group per channel: one fast pass, any layout)."""
    n, c = x.shape[:2]
    x = x.float().contiguous(memory_format=_format(x))  # a copy only for crops, bf16 and expanded batches
    _, mean, rstd = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), c, 0.0)
    return rstd.double().pow(-2), mean.double()


def _buffer(parts: list, channels: int, slabs, halo: int) -> torch.Tensor:
    """A reused slab buffer: the thickest slab plus `halo` rows either side, parts[0]'s layout."""
    x = parts[0]
    rows = max(b - a for a, b in slabs) + 2 * halo
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
    return torch.empty((x.shape[0], channels, rows, *x.shape[3:]), dtype=dtype, device=x.device,
                       memory_format=_format(x))


def _norm_conv(conv: nn.Conv3d, norm: nn.GroupNorm, stats, parts: list, a: int, b: int, buffer) -> torch.Tensor:
    """conv(relu(GN(x)))[:, :, a:b] for a 3x3x3 convolution with padding 1, from x's rows a-1 .. b
    (x = torch.cat(parts, dim=1); rows beyond x are the zeros the convolution pads with)."""
    lo, hi = max(0, a - 1), min(parts[0].shape[2], b + 1)
    t = buffer[:, :, : b - a + 2]
    scale, shift = scale_shift(norm, stats, buffer)
    c = 0
    for p in parts:
        rows = t[:, c:c + p.shape[1], lo - a + 1: hi - a + 1]
        torch.addcmul(shift[:, c:c + p.shape[1]], p[:, :, lo:hi], scale[:, c:c + p.shape[1]], out=rows)
        c += p.shape[1]
    t[:, :, : lo - a + 1].zero_()
    t[:, :, hi - a + 1:].zero_()
    return F.conv3d(F.relu_(t), conv.weight, conv.bias, 1, (0, 1, 1))


def assemble(slabs, compute, out=None, moments: list | None = None, lag: bool = False) -> torch.Tensor:
    """The tensor whose rows [a, b) along dim 2 are compute(a, b), written into `out` when it fits;
    `moments` receives every slab's (var, mean) per channel. lag: write each slab only after the next
    one is computed (when `out` is also what compute reads, with a halo)."""
    pending = []
    for a, b in slabs:
        y = compute(a, b)
        if moments is not None:
            moments.append(_moments(y))
        if out is None or (a == 0 and (out.dtype, out.shape[:2]) != (y.dtype, y.shape[:2])):
            out = torch.empty((*y.shape[:2], slabs[-1][1], *y.shape[3:]), dtype=y.dtype, device=y.device,
                              memory_format=_format(y))
        pending.append((a, b, y))
        while len(pending) > lag:
            a, b, y = pending.pop(0)
            out[:, :, a:b] = y
    for a, b, y in pending:
        out[:, :, a:b] = y
    return out


def _format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.channels_last_3d if channels_last else torch.contiguous_format


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
