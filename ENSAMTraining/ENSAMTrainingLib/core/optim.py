"""Optimisers for ENSAM: Muon for weight matrices and conv kernels, AdamW for the rest.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) orthogonalises the
Nesterov-momentum update of a weight matrix with 5 quintic Newton-Schulz steps. The paper
applies it to every weight of 2 or more dimensions, flattened beyond the first: a conv
kernel [C_out, C_in, k, k, k] is treated as the matrix [C_out, C_in*k^3].

``torch.optim.Muon`` refuses any parameter that is not 2-D, and handing it flattened views
means keeping a second set of leaf tensors (and their state) in step with the real
parameters. So this module has its own ``Muon``: the same arithmetic as
``torch.optim.Muon`` (same Newton-Schulz iteration, same momentum, same lr adjustment),
applied to ``grad.view(rows, -1)`` and written back in the parameter's shape.
Testing/training/test_optim.py checks the updates equal torch.optim.Muon on 2-D weights
(bit for bit with ``ns_dtype=torch.bfloat16``). The Newton-Schulz iteration runs in bf16 on
CUDA, as the reference does, and in float32 elsewhere: CPUs have no fast bf16 matmul
(float32 is about 10x faster there, and more accurate).

Parameter grouping (``split_parameters``):
- Muon: every parameter with ndim >= 2 of the convolutions and linear layers;
- AdamW: every 1-D parameter (GroupNorm affines, biases, the nGPT eigen learning rates
  alpha and scales s_qk, s_u, s_out), every nn.Embedding, and the parameters matched by
  ``ADAMW_NAME_PATTERNS`` even when 2-D or more:
  * the prompt-token embeddings (``prompt_encoder.embedding``, [5, C]: one unit row per token
    type; orthogonalising that "matrix" of unrelated rows has no meaning, and Muon's author
    keeps embeddings on Adam);
  * the positional encoding: LieRE's per-head angles ``liere.theta`` [heads, 3, d/2] and
    basis generators ``liere.basis_generator`` [heads, d, d] (parameters of rotations, not
    maps between feature spaces), and the ablation's absolute-position projection
    (``absolute.proj``), an embedding of coordinates.
  Everything else of 2 or more dimensions (conv kernels, the q/k/v/out and MLP matrices of
  the interaction, the prev-logit convolutions, the first and last convolutions) is Muon's,
  as the paper says.

Schedule: the learning rate of both optimisers is halved at epochs 2, 5 and 10
(``lr_at_epoch``), computed from the epoch number so that resuming restores it exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Parameter names (regular expressions, searched) that AdamW takes even when 2-D or more.
ADAMW_NAME_PATTERNS = (r"embed", r"(^|\.)liere\.", r"(^|\.)absolute\.")
LR_MILESTONES = (2, 5, 10)
SCALE_LR_FACTOR = 10.0  # the nGPT scales' AdamW lr = adamw_lr x this (make_optimizers)


def zeropower_via_newtonschulz(
    g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Approximate U V^T of g = U S V^T (g: [rows, cols]) by the quintic Newton-Schulz iteration.

    Identical arithmetic to torch.optim.Muon (and KellerJordan/Muon) when dtype is bf16:
    transposed when rows > cols, normalised by the Frobenius norm first.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for parameters of any ndim >= 2, each viewed as [shape[0], prod(shape[1:])].

    The update of a 2-D parameter equals torch.optim.Muon with the same arguments.
    ``weight_decay`` is decoupled (p *= 1 - lr*wd); ENSAM uses 0, as nGPT renormalises the
    weights after every step. ``ns_dtype``: dtype of the Newton-Schulz iteration; None = bf16
    for CUDA parameters, float32 for others.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay, eps=eps
        )
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes parameters with 2 or more dimensions, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.view(p.shape[0], -1)  # [rows, cols]
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.is_cuda else torch.float32)
                update = zeropower_via_newtonschulz(update, group["ns_steps"], group["eps"], dtype)
                rows, cols = grad.shape
                scaled_lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.view_as(p), alpha=-scaled_lr)
        return loss


def wants_adamw(name: str, param: Tensor, patterns: Sequence[str] = ADAMW_NAME_PATTERNS) -> bool:
    """True when AdamW (not Muon) should train this parameter (see the module docstring)."""
    if param.ndim < 2:
        return True
    leaf = name.lower()
    return any(re.search(pattern, leaf) for pattern in patterns)


def split_parameters(
    model: nn.Module, patterns: Sequence[str] = ADAMW_NAME_PATTERNS
) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(muon, adamw) lists of (name, parameter) for the trainable parameters of ``model``."""
    muon, adamw = [], []
    embedding_params = {
        id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_params or wants_adamw(name, param, patterns):
            adamw.append((name, param))
        else:
            muon.append((name, param))
    return muon, adamw


def scale_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the nGPT scales (eigen learning rates alpha, s_qk, s_u, s_out): ngpt.Scale parameters."""
    from ENSAMSegmentLib.core.network.ngpt import Scale

    return {id(p) for module in model.modules() if isinstance(module, Scale) for p in module.parameters()}


def make_optimizers(
    model: nn.Module,
    kind: str = "muon",
    muon_lr: float = 0.02,
    adamw_lr: float = 3e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    scale_lr_factor: float = SCALE_LR_FACTOR,
) -> list[torch.optim.Optimizer]:
    """The optimisers for ``model``: kind "muon" = [Muon, AdamW], kind "adamw" = [AdamW on all].

    The nGPT scales get their own AdamW param group at ``adamw_lr * scale_lr_factor``: they are
    stored with nGPT's trick (stored value ~ 1/sqrt(C), effective = stored * init * sqrt(C)), so an
    AdamW step of 3e-4 moves an alpha of 0.05 by 0.34 % (unchanged to 3 decimals after 85 steps);
    nGPT's own runs move them about 10x faster. Each param group remembers its initial lr as
    ``base_lr`` for ``set_epoch_lr``.
    """
    if kind not in ("muon", "adamw"):
        raise ValueError(f"optimizer kind must be 'muon' or 'adamw', got {kind!r}")
    muon_params, adamw_params = split_parameters(model)
    optimizers: list[torch.optim.Optimizer] = []
    if kind == "adamw":
        adamw_params = muon_params + adamw_params
    elif muon_params:
        optimizers.append(Muon([p for _, p in muon_params], lr=muon_lr, weight_decay=weight_decay))
    if adamw_params:
        scales = scale_parameter_ids(model)
        groups = [{"params": [p for _, p in adamw_params if id(p) not in scales], "lr": adamw_lr},
                  {"params": [p for _, p in adamw_params if id(p) in scales], "lr": adamw_lr * scale_lr_factor}]
        groups = [g for g in groups if g["params"]]
        optimizers.append(torch.optim.AdamW(groups, lr=adamw_lr, betas=betas, weight_decay=weight_decay))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_factor(epoch: int, milestones: Sequence[int] = LR_MILESTONES) -> float:
    """0.5 ** (number of milestones reached): epochs 0-1 -> 1, 2-4 -> 0.5, 5-9 -> 0.25, 10+ -> 0.125.

    Epochs count from 0, as torch's MultiStepLR(milestones=[2, 5, 10], gamma=0.5) stepped per epoch.
    """
    return 0.5 ** sum(epoch >= m for m in milestones)


def set_epoch_lr(optimizers: Sequence[torch.optim.Optimizer], epoch: int) -> None:
    """Set every param group's lr to base_lr * lr_factor(epoch)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(epoch)
