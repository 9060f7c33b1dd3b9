"""Positional encodings for the bottleneck attention: LieRE (relative, default) and absolute.

LieRE rotates queries and keys by R(p) = exp(p_z A_z + p_y A_y + p_x A_x) with learned skew-symmetric
generators. Here the three generators commute exactly: A_i = Q B_i Q^T with one learned orthogonal
basis Q (per head) and per-axis learned angles in 2x2 blocks B_i, so

    R(p) = Q blockdiag(rot(theta_1 . p), ..., rot(theta_{d/2} . p)) Q^T,   R(p_q)^T R(p_k) = R(p_k - p_q),

and attention scores depend only on relative positions (exact translation equivariance). Since the
final Q cancels in the score q^T R(p_q)^T R(p_k) k, only z = Q^T q is computed, then rotated.

Positions are in a fixed physical-grid unit: one bottleneck cell (8 voxels) = `position_scale`, never
normalised per image, so that equivariance also holds across image shapes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _init_angles(heads: int, head_dim: int, max_period: float = 64.0) -> torch.Tensor:
    """theta [heads, 3, head_dim // 2]: RoPE-like frequencies (period 2 .. max_period cells) along a
    random 3D direction per block ("mixed" RoPE), so every block sees all three axes."""
    n = head_dim // 2
    periods = 2.0 * (max_period / 2.0) ** (torch.arange(n) / max(n - 1, 1))
    direction = torch.randn(heads, 3, n)
    direction = direction / direction.norm(dim=1, keepdim=True)
    return direction * (2 * math.pi / periods)


def rotate_pairs(z: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive halves (z[..., :n], z[..., n:]) of z by the given (cos, sin), 2x2 block-wise."""
    cos, sin = angles
    z1, z2 = z.chunk(2, dim=-1)
    return torch.cat([z1 * cos - z2 * sin, z1 * sin + z2 * cos], dim=-1)


class LieRE(nn.Module):
    """Commuting-generator LieRE for `heads` heads of width `head_dim` (even)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"LieRE needs an even head dimension, got {head_dim}")
        self.theta = nn.Parameter(_init_angles(heads, head_dim))             # [H, 3, d/2]
        self.basis_generator = nn.Parameter(torch.zeros(heads, head_dim, head_dim))  # Q = exp(W - W^T)
        self._cache: dict = {}

    def basis(self) -> torch.Tensor:
        """Q = exp(W - W^T) [H, d, d], orthogonal; cached while no gradient is recorded."""
        w = self.basis_generator
        key = ("basis", w.device, w.data_ptr(), w._version)
        if not torch.is_grad_enabled() and key in self._cache:
            return self._cache[key]
        q = torch.linalg.matrix_exp(w - w.transpose(-1, -2))
        if not torch.is_grad_enabled():
            self._remember(key, q)
        return q

    def _remember(self, key, value) -> None:
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[key] = value

    def angles(self, pos: torch.Tensor, cache_key=None) -> tuple[torch.Tensor, torch.Tensor]:
        """pos [..., L, 3] -> (cos, sin) [..., H, L, d/2]; cached by `cache_key` when no grad is recorded."""
        use_cache = cache_key is not None and not torch.is_grad_enabled()
        key = (cache_key, pos.device, pos.dtype, self.theta.data_ptr(), self.theta._version)
        if use_cache and key in self._cache:
            return self._cache[key]
        a = torch.einsum("...lc,hcj->...hlj", pos, self.theta.to(pos.dtype))
        result = (a.cos(), a.sin())
        if use_cache:
            self._remember(key, result)
        return result

    def forward(self, x: torch.Tensor, pos: torch.Tensor, basis: torch.Tensor, cache_key=None) -> torch.Tensor:
        """x [N, H, L, d], pos [N, L, 3] or [L, 3], basis from `basis()` -> rotated Q^T x, [N, H, L, d]."""
        z = torch.einsum("nhld,hde->nhle", x, basis.to(x.dtype))  # rows: (Q^T x)^T = x^T Q
        cos, sin = self.angles(pos, cache_key)
        if cos.dim() == 3:  # positions shared by the batch
            cos, sin = cos[None], sin[None]
        return rotate_pairs(z, (cos.to(x.dtype), sin.to(x.dtype)))


class AbsolutePosition(nn.Module):
    """Absolute encoding for the ablation: sinusoidal features of the position (same physical unit),
    mapped by a learned linear layer to the embedding width and added to the tokens (then renormalised)."""

    def __init__(self, dim: int, n_freqs: int = 8, max_period: float = 64.0):
        super().__init__()
        periods = 2.0 * (max_period / 2.0) ** (torch.arange(n_freqs) / max(n_freqs - 1, 1))
        self.register_buffer("freqs", 2 * math.pi / periods, persistent=False)
        self.proj = nn.Linear(6 * n_freqs, dim, bias=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        a = pos[..., None] * self.freqs.to(pos.dtype)  # [..., 3, F]
        features = torch.cat([a.sin(), a.cos()], dim=-1).flatten(-2)  # [..., 6F]
        return self.proj(features.to(self.proj.weight.dtype))
