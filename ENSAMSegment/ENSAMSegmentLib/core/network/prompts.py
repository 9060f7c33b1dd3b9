"""Prompts (boxes and clicks) as labelled tokens with 3D coordinates, and the prompt encoder.

A box is two tokens (learned "box-min" and "box-max" embeddings placed at its two inclusive corners),
a click is one token (learned foreground or background embedding at the click). Objects of a batch
may have different token counts: shorter ones are padded with label PAD, which attention masks out.
Previous-step logits, clamped to +-2, are downsampled to the bottleneck grid by three stride-2
convolutions and added to the image embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOX_MIN, BOX_MAX, FG_CLICK, BG_CLICK = 0, 1, 2, 3, 4
N_LABELS = 5
DOWNSAMPLING = 8  # input voxels per bottleneck cell along each axis


class PromptError(ValueError):
    """Malformed prompts (no prompt for an object, wrong coordinate shape)."""


@dataclass
class Prompts:
    """Prompt tokens of N objects: coords float [N, T, 3] in input voxels (z, y, x); labels long [N, T]
    (0 pad, 1 box-min, 2 box-max, 3 foreground click, 4 background click)."""

    coords: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_objects(cls, objects: list[dict]) -> Prompts:
        """One dict per object: {"box": ((z0,y0,x0),(z1,y1,x1)) inclusive corners (optional),
        "fg": [(z,y,x), ...], "bg": [(z,y,x), ...]}. Every object needs at least one prompt."""
        if not objects:
            raise PromptError("no objects given")
        rows = []
        for i, obj in enumerate(objects):
            unknown = set(obj) - {"box", "fg", "bg"}
            if unknown:
                raise PromptError(f"object {i}: unknown prompt kinds {sorted(unknown)} (expected box, fg, bg)")
            row = []
            if obj.get("box") is not None:
                lo, hi = obj["box"]
                row += [(_point(lo, i, "box"), BOX_MIN), (_point(hi, i, "box"), BOX_MAX)]
            row += [(_point(p, i, "fg"), FG_CLICK) for p in obj.get("fg") or []]
            row += [(_point(p, i, "bg"), BG_CLICK) for p in obj.get("bg") or []]
            if not row:
                raise PromptError(f"object {i} has no box and no click")
            rows.append(row)
        t = max(len(row) for row in rows)
        coords = torch.zeros(len(rows), t, 3)
        labels = torch.zeros(len(rows), t, dtype=torch.long)
        for i, row in enumerate(rows):
            for j, (point, label) in enumerate(row):
                coords[i, j] = torch.tensor(point)
                labels[i, j] = label
        return cls(coords, labels)

    def to(self, device) -> Prompts:
        return Prompts(self.coords.to(device), self.labels.to(device))

    @property
    def n_objects(self) -> int:
        return self.labels.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """bool [N, T]: True for real tokens, False for padding."""
        return self.labels != PAD


def _point(p, i: int, kind: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in p)
    if len(values) != 3:
        raise PromptError(f"object {i}: a {kind} point needs 3 coordinates (z, y, x), got {p!r}")
    return values


def voxel_to_position(coords: torch.Tensor, scale: float) -> torch.Tensor:
    """Input-voxel coordinates -> position units: bottleneck cells (cell i is centred on voxel
    8 i + 3.5) times the fixed `scale`. Never normalised per image."""
    return (coords - (DOWNSAMPLING - 1) / 2) / DOWNSAMPLING * scale


def grid_positions(grid: tuple[int, int, int], scale: float, device=None) -> torch.Tensor:
    """Positions [d*h*w, 3] of the bottleneck cells (row-major z, y, x), in the same unit."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3) * scale


PREV_LOGIT_BOUND = 2.0  # logits fed back are clamped to +-2 (then divided by 2): confident voxels all look alike


class PrevLogitEncoder(nn.Module):
    """Previous logits [N, 1, D, H, W] -> [N, C, D/8, H/8, W/8]: the logits clamped to +-2 and scaled to
    [-1, 1], then three stride-2 2x2x2 convolutions with ReLU between them.

    Local on purpose: each bottleneck cell sees exactly its own 8x8x8 voxels, and nothing depends on
    statistics over the grid (no GroupNorm/instance norm, which made shifted or rescaled logits, i.e.
    different masks, give identical features). So features differ wherever the mask differs, and the
    session may decode a region and fill the logits elsewhere with a constant without changing the
    features of the cells it decoded. The bound makes the input the mask plus a thin band of
    uncertainty at its border: confident voxels (|l| >= 2) look alike whatever their logit, so the
    logits' scale (bf16 rounding, the session's fill constant) does not matter.
    """

    def __init__(self, dim: int, channels=(8, 32)):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv3d(1, c1, 2, stride=2)
        self.conv2 = nn.Conv3d(c1, c2, 2, stride=2)
        self.conv3 = nn.Conv3d(c2, dim, 2, stride=2)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.clamp(-PREV_LOGIT_BOUND, PREV_LOGIT_BOUND) / PREV_LOGIT_BOUND
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.conv3(x)


class PromptEncoder(nn.Module):
    """Learned unit-vector embeddings per prompt label (row 0 = padding) and the prev-logit path."""

    def __init__(self, dim: int, position_scale: float, prev_channels=(8, 32)):
        super().__init__()
        self.position_scale = position_scale
        self.embedding = nn.Embedding(N_LABELS, dim)
        self.prev = PrevLogitEncoder(dim, prev_channels)

    def tokens(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (tokens [N, T, C], positions [N, T, 3], mask [N, T])."""
        tokens = self.embedding(prompts.labels)
        pos = voxel_to_position(prompts.coords.float(), self.position_scale)
        return tokens, pos, prompts.mask
