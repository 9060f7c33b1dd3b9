"""ENSAM network: shapes, prompts, LieRE equivariance, hypersphere invariants, batching, regions."""

from __future__ import annotations

import pytest
import torch

from ENSAMSegmentLib.core.network import (
    ENSAM,
    ENSAMConfig,
    ImageEmbedding,
    PromptError,
    Prompts,
    crop_to_shape,
    pad_to_multiple,
    renormalize_weights,
)
from ENSAMSegmentLib.core.network.ngpt import InteractionLayer, NormLinear
from ENSAMSegmentLib.core.network.prompts import grid_positions, voxel_to_position

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/core/conftest.py


def small_model(seed=0, **overrides) -> ENSAM:
    torch.manual_seed(seed)
    return ENSAM(ENSAMConfig(**{**SMALL, **overrides})).eval()


def two_objects() -> Prompts:
    return Prompts.from_objects([
        {"box": ((2, 3, 4), (12, 20, 25)), "fg": [(7, 11, 14)], "bg": [(3, 4, 5)]},
        {"fg": [(10, 5, 20)]},
    ])


def test_prompts_layout_and_padding():
    p = two_objects()
    assert p.coords.shape == (2, 4, 3) and p.labels.dtype == torch.long
    assert p.labels.tolist() == [[1, 2, 3, 4], [3, 0, 0, 0]]
    assert p.coords[0, 1].tolist() == [12, 20, 25]
    assert p.mask.tolist() == [[True] * 4, [True, False, False, False]]
    with pytest.raises(PromptError, match="object 1 has no box and no click"):
        Prompts.from_objects([{"fg": [(1, 2, 3)]}, {"bg": []}])
    with pytest.raises(PromptError, match="3 coordinates"):
        Prompts.from_objects([{"fg": [(1, 2)]}])


def test_config_round_trip_and_validation():
    cfg = ENSAMConfig(**SMALL, position_encoding="absolute")
    assert ENSAMConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["blocks_down"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown ENSAM config keys"):
        ENSAMConfig.from_dict({**cfg.to_dict(), "width": 3})
    with pytest.raises(ValueError, match="4 levels"):
        ENSAMConfig(blocks_down=(1, 2, 2))
    with pytest.raises(ValueError, match="position_encoding"):
        ENSAMConfig(position_encoding="rope")


def test_odd_input_shapes_through_padding():
    model = small_model()
    image = torch.rand(1, 1, 13, 21, 30)
    padded, info = pad_to_multiple(image, 8)
    assert padded.shape[-3:] == (16, 24, 32) and info.original_shape == (13, 21, 30)
    assert torch.equal(padded[..., :13, :21, :30], image) and padded[..., 13:, :, :].abs().sum() == 0
    with torch.no_grad():
        emb = model.encode(padded)
        assert isinstance(emb, ImageEmbedding) and emb.shape == (16, 24, 32) and emb.grid == (2, 3, 4)
        logits = model.decode(emb, two_objects())
    assert logits.shape == (2, 1, 16, 24, 32) and torch.isfinite(logits).all()
    assert crop_to_shape(logits, info).shape == (2, 1, 13, 21, 30)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(image)


def test_encode_decode_under_autocast_and_no_grad():
    model = small_model()
    image = torch.rand(1, 1, 16, 16, 24)
    with torch.no_grad():
        reference = model(image, two_objects())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model.encode(image)
            logits = model.decode(emb, two_objects(), prev_logits=reference)
    assert emb.bottleneck.dtype == torch.bfloat16 and not emb.bottleneck.requires_grad
    assert logits.shape == reference.shape and torch.isfinite(logits).all()


def _interaction_inputs(model, prompts, grid, shift_cells=(0, 0, 0)):
    """Random image tokens on `grid`; image and prompts both translated by whole bottleneck cells."""
    torch.manual_seed(1)
    n, c = prompts.n_objects, model.config.dim
    image = torch.randn(n, grid[0] * grid[1] * grid[2], c)
    scale = model.config.position_scale
    shift = torch.tensor(shift_cells, dtype=torch.float32)
    image_pos = grid_positions(grid, scale) + shift * scale  # the grid's cells, moved
    tokens, _, mask = model.prompt_encoder.tokens(prompts)
    token_pos = voxel_to_position(prompts.coords + 8 * shift, scale)  # prompts moved by 8 voxels/cell
    return tokens, image, token_pos, image_pos, mask


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 3), (5, 7, -4)])
def test_liere_interaction_is_translation_equivariant(shift):
    model = small_model()
    prompts = two_objects()
    with torch.no_grad():
        out0 = model.interaction(*_interaction_inputs(model, prompts, (2, 3, 4)))
        out1 = model.interaction(*_interaction_inputs(model, prompts, (2, 3, 4), shift))
    for a, b in zip(out0, out1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_absolute_positions_are_not_translation_equivariant():
    model = small_model(position_encoding="absolute")
    prompts = two_objects()
    with torch.no_grad():
        tokens0, _ = model.interaction(*_interaction_inputs(model, prompts, (2, 3, 4)))
        tokens1, _ = model.interaction(*_interaction_inputs(model, prompts, (2, 3, 4), (1, 0, 0)))
    assert (tokens0 - tokens1).abs().max() > 1e-3


def test_liere_generators_commute_and_relative_scores():
    """R(p) = Q rot(theta p) Q^T: R(a)^T R(b) = R(b - a) for any a, b (checked on explicit matrices)."""
    torch.manual_seed(0)
    liere = small_model().interaction.layers[0].self_attn.liere
    with torch.no_grad():
        liere.basis_generator.normal_(0, 0.3)  # a non-trivial basis
        basis = liere.basis()

        def rotation(p):  # [H, d, d] acting on column vectors: x -> R(p) x = Q rot Q^T x
            eye = torch.eye(basis.shape[-1]).expand(1, basis.shape[0], -1, -1)
            return liere(eye, p.view(1, 3), basis)[0] @ basis.transpose(-1, -2)

        a, b = torch.tensor([1.5, -2.0, 0.25]), torch.tensor([-3.0, 0.5, 4.0])
        torch.testing.assert_close(rotation(a).transpose(-1, -2) @ rotation(b), rotation(b - a), atol=1e-5, rtol=0)
        torch.testing.assert_close(rotation(a) @ rotation(a).transpose(-1, -2),
                                   torch.eye(basis.shape[-1]).expand_as(basis), atol=1e-5, rtol=0)


def test_interaction_states_stay_on_the_unit_sphere():
    model = small_model()
    states = []
    for layer in model.modules():
        if isinstance(layer, InteractionLayer):
            layer.register_forward_hook(lambda mod, args, out: states.extend(out))
    image = torch.rand(1, 1, 16, 24, 32)
    with torch.no_grad():
        emb = model.encode(image)
        prev = torch.randn(2, 1, 16, 24, 32) * 5
        state = model.interact(emb, two_objects(), prev_logits=prev)
    assert len(states) == 4  # (tokens, image) of 2 layers
    for h in [*states, state.tokens, state.image]:
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(h.shape[:-1]), atol=1e-5, rtol=0)
    assert state.image.shape == (2, 2 * 3 * 4, model.config.dim)


def test_weights_unit_norm_after_renormalisation():
    model = small_model()
    linears = [m for m in model.modules() if isinstance(m, NormLinear)]
    assert len(linears) == 2 * (3 * 4 + 2)  # 2 layers x (3 attentions x q,k,v,out + MLP in, out)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) * 3)
    norms = lambda: [m.weight.norm(dim=m.norm_dim) for m in linears] + [  # noqa: E731
        model.prompt_encoder.embedding.weight.norm(dim=1)]
    assert max((n - 1).abs().max() for n in norms()) > 0.1  # the perturbation broke it
    renormalize_weights(model)
    for n in norms():
        torch.testing.assert_close(n, torch.ones_like(n), atol=1e-5, rtol=0)
    # q, k, v and MLP-in rows (input dim); output projections columns (output dim)
    attn = model.interaction.layers[0].self_attn
    assert attn.q.norm_dim == 1 and attn.out.norm_dim == 0
    assert model.interaction.layers[0].mlp.fc_out.norm_dim == 0


def test_batched_objects_equal_separate_objects():
    model = small_model()
    image = torch.rand(1, 1, 16, 24, 32)
    objects = [{"box": ((2, 3, 4), (12, 20, 25)), "fg": [(7, 11, 14)], "bg": [(3, 4, 5)]},
               {"fg": [(10, 5, 20)]}, {"box": ((0, 0, 0), (15, 23, 31))}]
    prev = torch.randn(3, 1, 16, 24, 32)
    with torch.no_grad():
        emb = model.encode(image)
        together = model.decode(emb, Prompts.from_objects(objects), prev_logits=prev)
        for i, obj in enumerate(objects):
            alone = model.decode(emb, Prompts.from_objects([obj]), prev_logits=prev[i:i + 1])
            torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=0)
        # the objects do differ (the prompts matter)
        assert (together[0] - together[1]).abs().max() > 1e-4


def test_region_decoding_shape_and_approximation():
    model = small_model()
    image = torch.rand(1, 1, 32, 32, 48)
    prompts = two_objects()
    with torch.no_grad():
        emb = model.encode(image)
        full = model.decode(emb, prompts)
        # a region whose crop (region + 2-cell margin) is the whole image: exact
        inner = (slice(8, 24), slice(8, 16), slice(16, 32))
        torch.testing.assert_close(model.decode(emb, prompts, region=inner), full[(..., *inner)],
                                   atol=1e-5, rtol=0)
        region = (slice(0, 16), slice(0, 16), slice(0, 24))
        part = model.decode(emb, prompts, region=region)
    assert part.shape == (2, 1, 16, 16, 24)
    inside = full[(..., *region)]
    # GroupNorm statistics come from the crop: an approximation, close to full decoding.
    error = (part - inside).abs().mean() / inside.std()
    correlation = torch.corrcoef(torch.stack([part.flatten(), inside.flatten()]))[0, 1]
    assert 0 < error < 0.2 and correlation > 0.95, (float(error), float(correlation))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.decode(emb, prompts, region=(slice(3, 16), slice(0, 8), slice(0, 8)))


def test_cached_rotations_follow_weight_changes():
    model = small_model()
    image = torch.rand(1, 1, 16, 24, 32)
    with torch.no_grad():
        emb = model.encode(image)
        first = model.decode(emb, two_objects())  # fills the LieRE caches
        for module in model.modules():
            if hasattr(module, "basis_generator"):
                module.theta.mul_(2)
                module.basis_generator.normal_(0, 0.1)
        cached = model.decode(emb, two_objects())
    fresh = model.decode(emb, two_objects()).detach()  # with gradients enabled nothing is cached
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)
    assert (cached - first).abs().max() > 1e-4
