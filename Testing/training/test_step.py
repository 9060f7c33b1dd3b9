"""The training step: box then clicks from the model's own prediction, prev logits detached."""

from __future__ import annotations

import numpy as np
import torch
from conftest import TINY_BUDGET, TINY_MODEL

from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
from ENSAMTrainingLib.core.cases import find_cases, load_case
from ENSAMTrainingLib.core.data import make_sample
from ENSAMTrainingLib.core.loss import segmentation_loss
from ENSAMTrainingLib.core.step import InteractiveStep, interact


class Recording(ENSAM):
    """The real network, noting what each decode call receives."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def decode(self, emb, prompts, prev_logits=None, region=None):
        self.calls.append((prompts.labels[0].tolist(), prev_logits))
        return super().decode(emb, prompts, prev_logits, region)


def sample_of(four_cases, no_box=False):
    case = load_case(find_cases(four_cases)[0])
    return make_sample(case, np.random.default_rng(0), TINY_BUDGET, augment=False, no_box_probability=float(no_box))


def test_box_then_five_clicks_with_detached_prev_logits(four_cases):
    torch.manual_seed(0)
    model = Recording(ENSAMConfig(**TINY_MODEL))
    sample = sample_of(four_cases)
    loss, step_losses = InteractiveStep(model, stop_when_stuck=False)(sample)  # all 6 steps, even when stuck
    assert len(model.calls) == 6 and step_losses.shape == (6,)
    torch.testing.assert_close(loss.detach(), step_losses.mean())
    labels = [labels for labels, _ in model.calls]
    assert labels[0] == [1, 2]  # box-min, box-max tokens
    assert [len(t) for t in labels] == [2, 3, 4, 5, 6, 7]  # one click more per step
    assert all(t[:-1] == labels[i][: len(t) - 1] for i, t in enumerate(labels[1:]))  # clicks accumulate
    prevs = [prev for _, prev in model.calls]
    assert prevs[0] is None and all(p is not None and not p.requires_grad for p in prevs[1:])
    loss.backward()
    assert model.encoder.init_conv.weight.grad.abs().sum() > 0
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in encoder_grads) and sum(g.abs().sum() for g in encoder_grads) > 0


def test_without_box_the_first_prompt_is_a_foreground_click(four_cases):
    torch.manual_seed(0)
    model = Recording(ENSAMConfig(**TINY_MODEL))
    sample = sample_of(four_cases, no_box=True)
    assert sample.box is None
    gt = sample.target[0, 0].numpy() > 0.5
    with torch.no_grad():
        embedding = model.encode(sample.image)
        logits = list(interact(model, embedding, gt, None, clicks=5, rng=np.random.default_rng(1)))
    assert len(logits) == 5
    assert model.calls[0][0] == [3]  # a single foreground click
    losses = [float(segmentation_loss(x, sample.target)) for x in logits]
    assert all(np.isfinite(losses))
