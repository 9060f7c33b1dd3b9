"""Muon and parameter grouping: equal to torch.optim.Muon on 2-D weights; conv kernels flattened."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ENSAMTrainingLib.core.optim import Muon, lr_factor, make_optimizers, set_epoch_lr, split_parameters


def run_steps(optimizer_cls, shape, steps=4, **kwargs):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(shape))
    grads = [torch.randn(shape) for _ in range(steps)]
    optimizer = optimizer_cls([weight], **kwargs)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach()


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_torch_muon_on_2d_weights(shape, nesterov):
    kwargs = dict(lr=0.02, momentum=0.95, nesterov=nesterov, ns_steps=5, weight_decay=0.1)
    ours = run_steps(Muon, shape, ns_dtype=torch.bfloat16, **kwargs)
    reference = run_steps(torch.optim.Muon, shape, **kwargs)
    start = run_steps(Muon, shape, steps=0)
    assert not torch.equal(ours, start)  # it moved
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_muon_on_conv_kernel_equals_muon_on_flattened_matrix():
    kernel = run_steps(Muon, (8, 4, 3, 3, 3), lr=0.05, ns_dtype=torch.bfloat16)
    matrix = run_steps(torch.optim.Muon, (8, 4 * 27), lr=0.05, weight_decay=0.0)
    # same seed, same numbers: the kernel's rows are the matrix's rows
    torch.testing.assert_close(kernel.view(8, -1), matrix, rtol=0, atol=0)


def test_float32_newton_schulz_is_close_to_bf16():
    bf16 = run_steps(Muon, (24, 40), lr=0.02, ns_dtype=torch.bfloat16)
    fp32 = run_steps(Muon, (24, 40), lr=0.02)  # the CPU default
    reference = run_steps(torch.optim.Muon, (24, 40), lr=0.02, weight_decay=0.0)
    start = run_steps(Muon, (24, 40), steps=0)
    torch.testing.assert_close(bf16, reference, rtol=0, atol=0)
    # the two precisions differ by far less than the update itself
    assert (fp32 - bf16).norm() < 0.05 * (bf16 - start).norm()


def test_muon_update_is_orthogonal():
    torch.manual_seed(1)
    weight = nn.Parameter(torch.zeros(16, 64))
    optimizer = Muon([weight], lr=1.0, momentum=0.0, nesterov=False)
    weight.grad = torch.randn(16, 64)
    optimizer.step()
    singular = torch.linalg.svdvals(weight.detach())
    # Newton-Schulz gives singular values roughly in (0.5, 1.5), not the gradient's spread
    assert singular.min() > 0.4 and singular.max() < 1.6


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="2 or more dimensions"):
        Muon([nn.Parameter(torch.zeros(3))])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.linear = nn.Linear(4, 4, bias=False)
        self.token_embedding = nn.Parameter(torch.randn(3, 4))
        self.embedding_table = nn.Embedding(5, 4)
        self.alpha = nn.Parameter(torch.ones(4))


def test_split_parameters():
    muon, adamw = split_parameters(Toy())
    assert sorted(n for n, _ in muon) == ["conv.weight", "linear.weight"]
    assert sorted(n for n, _ in adamw) == [
        "alpha", "conv.bias", "embedding_table.weight", "norm.bias", "norm.weight", "token_embedding",
    ]


def test_make_optimizers_and_schedule():
    model = Toy()
    muon, adamw = make_optimizers(model, "muon", muon_lr=0.02, adamw_lr=1e-3)
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    (only,) = make_optimizers(model, "adamw", adamw_lr=1e-3)
    assert sum(p.numel() for g in only.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    assert [lr_factor(e) for e in range(12)] == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.125, 0.125]
    set_epoch_lr([muon, adamw], 5)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.005)
    assert adamw.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_split_of_the_real_network():
    from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig

    for encoding in ("liere", "absolute"):
        model = ENSAM(ENSAMConfig(init_filters=8, position_encoding=encoding))
        muon, adamw = (dict(group) for group in split_parameters(model))
        assert all(p.ndim >= 2 for p in muon.values())
        # interaction matrices (also token_to_image / image_to_token) and every conv kernel: Muon
        assert "interaction.layers.0.token_to_image.q.weight" in muon
        assert "interaction.layers.0.image_to_token.out.weight" in muon
        assert sum(name.startswith(("encoder.", "decoder.")) for name in muon) > 10
        # token embeddings and position-encoding parameters: AdamW, whatever their ndim
        assert "prompt_encoder.embedding.weight" in adamw
        positional = [n for n, p in adamw.items() if p.ndim >= 2 and "embedding" not in n]
        assert positional and all((".liere." if encoding == "liere" else ".absolute.") in n for n in positional)
        assert len(muon) + len(adamw) == len(list(model.parameters()))
