"""Normalized (nGPT) attention and the two-way prompt/image interaction at the bottleneck.

Following Loshchilov et al. (NVIDIA/ngpt): hidden states live on the unit hypersphere; every step is
h <- Norm(h + alpha (Norm(block(h)) - h)) with a learned per-channel alpha (effective init 0.05);
q and k are normalised per head and scaled by a learned per-channel s_qk (effective init 1); the
softmax scale is sqrt(d_head); there is no LayerNorm, and weight matrices are renormalised to unit
norm along the embedding dimension by `renormalize_weights` (at init and after every optimizer step).
Learned scales use nGPT's storage trick: stored value `scaling`, effective value stored * init/scaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .liere import AbsolutePosition, LieRE


def justnorm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x|| along `dim` (nGPT's justnorm; eps only guards exact zeros)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


class Scale(nn.Module):
    """A learned per-channel scale with nGPT's init trick: returns param * (init / scaling)."""

    def __init__(self, dim: int, init: float, scaling: float, absolute: bool = False):
        super().__init__()
        self.init, self.scaling, self.absolute = init, scaling, absolute
        self.param = nn.Parameter(torch.full((dim,), scaling))

    def forward(self) -> torch.Tensor:
        s = self.param * (self.init / self.scaling)
        return s.abs() if self.absolute else s


class NormLinear(nn.Linear):
    """Bias-free linear layer whose weight `renormalize_weights` keeps unit-norm along the embedding
    dimension: `normalize="input"` (q, k, v, MLP-in: every row, dim 1) or "output" (output
    projections: every column, dim 0)."""

    def __init__(self, c_in: int, c_out: int, normalize: str):
        super().__init__(c_in, c_out, bias=False)
        self.norm_dim = {"input": 1, "output": 0}[normalize]


class NormAttention(nn.Module):
    """Multi-head normalized attention from x_q to x_kv, with optional LieRE on q and k."""

    def __init__(self, dim: int, heads: int, liere: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = (NormLinear(dim, dim, "input") for _ in range(3))
        self.out = NormLinear(dim, dim, "output")
        self.s_qk = Scale(dim, init=1.0, scaling=dim**-0.5)
        self.liere = LieRE(heads, self.head_dim) if liere else None

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, C] -> [N, H, L, d]
        n, length, _ = x.shape
        return x.view(n, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x_q, x_kv, pos_q=None, pos_kv=None, key_mask=None, cache_q=None, cache_kv=None):
        """x_q [N, Lq, C], x_kv [N, Lk, C]; pos [N, L, 3] or [L, 3]; key_mask [N, Lk] bool (True = attend)."""
        s = self.s_qk().view(self.heads, 1, self.head_dim)
        q = s * justnorm(self._split(self.q(x_q)))
        k = s * justnorm(self._split(self.k(x_kv)))
        v = self._split(self.v(x_kv))
        if self.liere is not None:
            basis = self.liere.basis()
            q = self.liere(q, pos_q, basis, cache_q)
            k = self.liere(k, pos_kv, basis, cache_kv)
        scores = (q @ k.transpose(-1, -2)).float() * math.sqrt(self.head_dim)  # [N, H, Lq, Lk]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        h = scores.softmax(dim=-1).to(v.dtype) @ v  # [N, H, Lq, d]
        return self.out(h.transpose(1, 2).flatten(2))


class NormMLP(nn.Module):
    """h -> W_out relu(s_u * W_in h), hidden width `hidden`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = NormLinear(dim, hidden, "input")
        self.fc_out = NormLinear(hidden, dim, "output")
        self.s_u = Scale(hidden, init=1.0, scaling=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.relu(self.s_u() * self.fc_in(x)))


class InteractionLayer(nn.Module):
    """The four steps of one two-way layer, each a residual step on the hypersphere:
    1. self-attention of the prompt tokens; 2. tokens attend to the image; 3. MLP (ReLU) on the
    tokens; 4. the image attends to the updated tokens.

    Eigen learning rates: nGPT starts every alpha at 0.05. Step 4 is the prompts' only way into the
    image embeddings the decoder sees, and with two layers an alpha of 0.05 leaves the image almost
    unchanged (tokens before/after cosine 0.997 at init: moving the box flipped 0.3 % of the voxels),
    so its init is separate (`image_alpha_init`, ENSAMConfig's default 0.3)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, liere: bool, alpha_init: float = 0.05,
                 image_alpha_init: float = 0.05):
        super().__init__()
        self.self_attn = NormAttention(dim, heads, liere)
        self.token_to_image = NormAttention(dim, heads, liere)
        self.mlp = NormMLP(dim, mlp_hidden)
        self.image_to_token = NormAttention(dim, heads, liere)
        inits = (alpha_init, alpha_init, alpha_init, image_alpha_init)
        self.alphas = nn.ModuleList(Scale(dim, init=a, scaling=dim**-0.5, absolute=True) for a in inits)

    @staticmethod
    def _step(h: torch.Tensor, update: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return justnorm(h + alpha * (justnorm(update) - h))

    def forward(self, tokens, image, token_pos, image_pos, token_mask, image_key=None):
        """tokens [N, T, C], image [N, L, C] (unit rows); token_pos [N, T, 3]; image_pos [L, 3]."""
        a = [alpha() for alpha in self.alphas]
        tokens = self._step(tokens, self.self_attn(tokens, tokens, token_pos, token_pos, token_mask), a[0])
        update = self.token_to_image(tokens, image, token_pos, image_pos, cache_kv=image_key)
        tokens = self._step(tokens, update, a[1])
        tokens = self._step(tokens, self.mlp(tokens), a[2])
        update = self.image_to_token(image, tokens, image_pos, token_pos, token_mask, cache_q=image_key)
        image = self._step(image, update, a[3])
        return tokens, image


class TwoWayInteraction(nn.Module):
    """`layers` interaction layers (the paper: 2) over prompt tokens and bottleneck image embeddings.

    position "liere": relative positions through LieRE in every attention; "absolute": a sinusoidal
    absolute encoding added once to tokens and image embeddings on entry (the paper's ablation).
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int, layers: int, position: str,
                 alpha_init: float = 0.05, image_alpha_init: float = 0.05):
        super().__init__()
        if position not in ("liere", "absolute"):
            raise ValueError(f"position encoding must be 'liere' or 'absolute', got {position!r}")
        self.absolute = AbsolutePosition(dim) if position == "absolute" else None
        liere = position == "liere"
        self.layers = nn.ModuleList(InteractionLayer(dim, heads, mlp_hidden, liere, alpha_init, image_alpha_init)
                                    for _ in range(layers))

    def forward(self, tokens, image, token_pos, image_pos, token_mask, image_key=None):
        """Inputs need not be unit-norm; returns unit-norm (tokens [N, T, C], image [N, L, C])."""
        if self.absolute is not None:
            tokens = tokens + self.absolute(token_pos).to(tokens.dtype)
            image = image + self.absolute(image_pos).to(image.dtype)
        tokens, image = justnorm(tokens), justnorm(image)
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pos, image_pos, token_mask, image_key)
        return tokens, image


@torch.no_grad()
def renormalize_weights(model: nn.Module) -> None:
    """Unit-normalise every nGPT weight along the embedding dimension (call at init and after every
    optimizer step): NormLinear weights along their `norm_dim`, and the prompt-token embeddings
    (any nn.Embedding inside the model) along the embedding width."""
    for module in model.modules():
        if isinstance(module, NormLinear):
            module.weight.copy_(justnorm(module.weight, module.norm_dim))
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(justnorm(module.weight, 1))
