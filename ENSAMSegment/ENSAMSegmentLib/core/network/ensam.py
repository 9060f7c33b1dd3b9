"""ENSAM: SegResNet-style U-Net whose bottleneck interacts with box/click prompt tokens.

    image [1, 1, D, H, W] --encode--> ImageEmbedding (skips at 1, 1/2, 1/4; bottleneck at 1/8)
    decode(embedding, prompts [N objects], prev_logits [N, 1, D, H, W] | None):
        bottleneck (+ prev-logit path) --Norm--> image tokens ┐
        prompt tokens (unit vectors + coordinates) ───────────┴─ two-way nGPT/LieRE interaction (x2)
        image tokens * s_out --> decoder (with the skips) --> logits [N, 1, D, H, W]

Back into the decoder: the interaction returns unit-norm image embeddings; the decoder receives them
multiplied by a learned per-channel scale s_out (effective init sqrt(C), so entries are O(1) like
convolutional features). The bottleneck's own magnitudes are not re-added: everything the decoder gets
from the bottleneck has passed through the prompts' attention; the encoder's magnitudes still reach
it through the skip connections at 1, 1/2 and 1/4.

Size (the paper: 5.5 M parameters, "368 G FLOPs" at a 4,194,304-voxel patch). The default config,
init_filters 16 (widths 16/32/64/128), blocks_down (1, 2, 2, 4), bottleneck/token width 128, 4 heads
of 32, MLP width 512, 2 interaction layers, has 5,576,745 parameters (+1.4 %) and, for one object
with a box at 128 x 128 x 256 (encode + decode), 346.2 G MACs (-5.9 %) = 692.3 G FLOPs: the paper's
number is a MAC count. The encoder alone is 188.4 G MACs and 4.40 M parameters; the decoder 156.5 G
MACs and 0.46 M; the interaction 0.68 M parameters and under 1 G MACs (complexity.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .blocks import Decoder, Encoder, Norms
from .ngpt import Scale, TwoWayInteraction, renormalize_weights
from .prompts import DOWNSAMPLING, PromptEncoder, Prompts, grid_positions


@dataclass
class ENSAMConfig:
    """Architecture hyper-parameters; the defaults are the paper-sized model (about 5.5 M parameters;
    see complexity.py for its MACs at the largest training patch)."""

    in_channels: int = 1
    init_filters: int = 16            # encoder widths C, 2C, 4C, 8C; bottleneck / token width 8C
    blocks_down: tuple = (1, 2, 2, 4)  # ResBlocks per encoder level (MONAI SegResNet default)
    norm_groups: int = 8
    heads: int = 4
    mlp_hidden: int = 512
    interaction_layers: int = 2
    position_encoding: str = "liere"   # "liere" (relative) or "absolute" (ablation)
    position_scale: float = 1.0        # position units per bottleneck cell (8 voxels); fixed, not per image
    prev_channels: tuple = (8, 32)     # widths of the prev-logit downsampling convolutions
    region_margin_cells: int = 2       # bottleneck cells decoded around a region (receptive field)
    alpha_init: float = 0.05           # nGPT eigen learning rate of the token steps (nGPT's init)
    image_alpha_init: float = 0.3      # ... of the image-update step: the prompts' only way into the image

    def __post_init__(self):
        self.blocks_down = tuple(int(b) for b in self.blocks_down)
        self.prev_channels = tuple(int(c) for c in self.prev_channels)
        if len(self.blocks_down) != 4:
            raise ValueError(f"blocks_down needs 4 levels (3 stride-2 downsamplings), got {self.blocks_down}")
        if self.init_filters % self.norm_groups:
            raise ValueError(f"init_filters {self.init_filters} not divisible by norm_groups {self.norm_groups}")
        if (self.dim // self.heads) % 2 or self.dim % self.heads:
            raise ValueError(f"bottleneck width {self.dim} must split into {self.heads} heads of even width")
        if self.position_encoding not in ("liere", "absolute"):
            raise ValueError(f"position_encoding must be 'liere' or 'absolute', got {self.position_encoding!r}")

    @property
    def dim(self) -> int:
        """Bottleneck (token) width."""
        return self.init_filters * 2 ** (len(self.blocks_down) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ENSAMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ENSAM config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class ImageEmbedding:
    """The encoder's output for one image: skips (fine to coarse: [B, C, D, H, W], [B, 2C, D/2, ...],
    [B, 4C, D/4, ...]) and the bottleneck [B, 8C, D/8, H/8, W/8]; `shape` = input (D, H, W)."""

    skips: list = field(default_factory=list)
    bottleneck: torch.Tensor | None = None
    shape: tuple = ()
    skip_terms: list | None = None  # ENSAM.with_skip_terms: the skips' share of the decoder, per level

    def to(self, device=None, dtype=None) -> ImageEmbedding:
        terms = None if self.skip_terms is None else [
            tuple(t.to(device=device, dtype=dtype) for t in level) for level in self.skip_terms]
        return ImageEmbedding([s.to(device=device, dtype=dtype) for s in self.skips],
                              self.bottleneck.to(device=device, dtype=dtype), self.shape, terms)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.bottleneck.shape[-3:])


@dataclass
class InteractionState:
    """Outputs of the bottleneck interaction: unit-norm tokens [N, T, C] and image [N, L, C]."""

    tokens: torch.Tensor
    image: torch.Tensor
    grid: tuple


def check_region(region, shape) -> tuple[slice, slice, slice]:
    """Validate a region (3 slices in input voxels, starts/stops multiples of 8, inside `shape`)."""
    if region is None or len(region) != 3:
        raise ValueError(f"region must be a tuple of 3 slices (z, y, x), got {region!r}")
    out = []
    for s, n in zip(region, shape):
        start, stop, step = s.indices(n)
        if step != 1 or start % DOWNSAMPLING or stop % DOWNSAMPLING or stop <= start:
            raise ValueError(f"region slices need step 1, starts/stops multiples of {DOWNSAMPLING} and a "
                             f"non-empty extent inside the image {tuple(shape)}; got {region!r}")
        out.append(slice(start, stop))
    return tuple(out)


class ENSAM(nn.Module):
    def __init__(self, config: ENSAMConfig | None = None):
        super().__init__()
        self.config = cfg = config or ENSAMConfig()
        self.encoder = Encoder(cfg.in_channels, cfg.init_filters, cfg.blocks_down, cfg.norm_groups)
        self.prompt_encoder = PromptEncoder(cfg.dim, cfg.position_scale, cfg.prev_channels)
        self.interaction = TwoWayInteraction(cfg.dim, cfg.heads, cfg.mlp_hidden, cfg.interaction_layers,
                                             cfg.position_encoding, cfg.alpha_init, cfg.image_alpha_init)
        self.s_out = Scale(cfg.dim, init=math.sqrt(cfg.dim), scaling=cfg.dim**-0.5)
        self.decoder = Decoder(cfg.init_filters, len(cfg.blocks_down), cfg.norm_groups)
        renormalize_weights(self)

    def encode(self, image: torch.Tensor) -> ImageEmbedding:
        """image [B, 1, D, H, W], sides multiples of 8 (see pad_to_multiple), intensities ~[0, 1]."""
        if image.dim() != 5 or image.shape[1] != self.config.in_channels:
            raise ValueError(f"expected an image [B, {self.config.in_channels}, D, H, W], got {tuple(image.shape)}")
        if any(s % DOWNSAMPLING for s in image.shape[-3:]):
            raise ValueError(f"image sides {tuple(image.shape[-3:])} must be multiples of {DOWNSAMPLING}: "
                             "use pad_to_multiple")
        *skips, bottleneck = self.encoder(image)
        return ImageEmbedding(skips, bottleneck, tuple(image.shape[-3:]))

    def with_skip_terms(self, emb: ImageEmbedding) -> ImageEmbedding:
        """emb with the skips' share of every decoder level computed once (Decoder.skip_terms). Whole
        decodes (no region, no frozen statistics) of that embedding then skip a third of the decoder's
        convolutions and give the same logits up to rounding: training's box + 5 click decodes."""
        return ImageEmbedding(emb.skips, emb.bottleneck, emb.shape, self.decoder.skip_terms(emb.skips))

    def interact(self, emb: ImageEmbedding, prompts: Prompts, prev_logits=None) -> InteractionState:
        """Run the prompt/image interaction over the whole bottleneck for N objects."""
        n = prompts.n_objects
        bottleneck = _per_object(emb.bottleneck, n, "bottleneck")  # [N, C, d, h, w]
        if prev_logits is not None:
            if tuple(prev_logits.shape) != (n, 1, *emb.shape):
                raise ValueError(f"prev_logits must be [{n}, 1, {', '.join(map(str, emb.shape))}], "
                                 f"got {tuple(prev_logits.shape)}")
            bottleneck = bottleneck + self.prompt_encoder.prev(prev_logits.to(bottleneck.dtype))
        grid = emb.grid
        image = bottleneck.flatten(2).transpose(1, 2)  # [N, L, C]
        image_pos = grid_positions(grid, self.config.position_scale, image.device)
        tokens, token_pos, mask = self.prompt_encoder.tokens(prompts.to(image.device))
        tokens, image = self.interaction(tokens.to(image.dtype), image, token_pos, image_pos, mask,
                                         image_key=("grid", grid))
        return InteractionState(tokens, image, grid)

    def decode(self, emb: ImageEmbedding, prompts: Prompts, prev_logits=None, region=None,
               norms: Norms | None = None) -> torch.Tensor:
        """-> logits [N, 1, D, H, W] (>0 = inside), or [N, 1, *region sizes] when `region` is given.

        region: 3 slices in input voxels (starts/stops multiples of 8). The interaction still runs over
        the whole bottleneck, but the decoder only sees the region plus `region_margin_cells` bottleneck
        cells around it (enough for the convolutions' receptive field). GroupNorm statistics then come
        from that crop, so region decoding approximates full decoding (exact when the crop is the
        whole image). norms: an empty dict receives the decoder's GroupNorm statistics of this pass
        (for `decode_window`); a filled one is reused (blocks.group_norm).
        """
        if region is None and norms is None and emb.skip_terms is not None:
            x = self.decoder_image(self.interact(emb, prompts, prev_logits))
            terms = [tuple(_per_object(t, x.shape[0], "skip term") for t in level) for level in emb.skip_terms]
            return self.decoder.forward_with_terms(x, terms)
        x, skips = self.decoder_inputs(emb, prompts, prev_logits)
        if region is None:
            return self.decoder(x, skips, norms)
        region = check_region(region, emb.shape)
        m = self.config.region_margin_cells
        cells = [(max(0, s.start // DOWNSAMPLING - m), min(g, s.stop // DOWNSAMPLING + m))
                 for s, g in zip(region, x.shape[-3:])]
        x = x[_crop(cells, 1)]
        skips = [s[_crop(cells, DOWNSAMPLING >> i)] for i, s in enumerate(skips)]
        logits = self.decoder(x, skips, norms)
        offset = [s.start - lo * DOWNSAMPLING for s, (lo, _) in zip(region, cells)]
        return logits[(..., *(slice(o, o + s.stop - s.start) for o, s in zip(offset, region)))]

    def decode_window(self, emb: ImageEmbedding, prompts: Prompts, prev_logits, window, norms: Norms):
        """-> logits [N, 1, *window sizes]: what `decode(emb, prompts, prev_logits, norms=norms)` gives
        over `window` (3 slices in input voxels, any alignment), at the decoder cost of the window.

        The interaction runs over the whole bottleneck as always; the decoder reuses the GroupNorm
        statistics `norms` of an earlier whole or region pass (an interactive click keeps those of
        the object's last box), which makes it local, and computes only what the window needs
        (Decoder.forward_window). Cost: a 64^3 window is about 1/32 of decoding 128x256x256.
        """
        if not norms:
            raise ValueError("decode_window needs the GroupNorm statistics of an earlier decode (norms={} there)")
        window = tuple(slice(*s.indices(n)[:2]) for s, n in zip(window, emb.shape))
        if any(s.stop <= s.start for s in window):
            raise ValueError(f"empty window {window} in an image of {emb.shape}")
        x, skips = self.decoder_inputs(emb, prompts, prev_logits)
        return self.decoder.forward_window(x, skips, window, norms)

    def decoder_inputs(self, emb: ImageEmbedding, prompts: Prompts, prev_logits):
        """The interaction's image embeddings, scaled and back on the grid [N, 8C, d, h, w], and the
        skips expanded to N objects."""
        x = self.decoder_image(self.interact(emb, prompts, prev_logits))
        return x, [_per_object(s, x.shape[0], "skip") for s in emb.skips]

    def decoder_image(self, state: InteractionState) -> torch.Tensor:
        """The interaction's image embeddings scaled by s_out, back on the grid: [N, 8C, d, h, w]."""
        n, c = state.image.shape[0], state.image.shape[-1]
        return (state.image * self.s_out().to(state.image.dtype)).transpose(1, 2).reshape(n, c, *state.grid)

    def forward(self, image: torch.Tensor, prompts: Prompts, prev_logits=None) -> torch.Tensor:
        return self.decode(self.encode(image), prompts, prev_logits)


def _per_object(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"the image embedding's {what} has batch {x.shape[0]}: expected 1 or {n} (one per object)")


def _crop(cells, factor: int) -> tuple:
    return (..., *(slice(lo * factor, hi * factor) for lo, hi in cells))
