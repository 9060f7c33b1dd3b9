"""Training from label maps and procedural scenes (data.py kinds "labels" / "procedural", `ensam train --synthetic`)."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import TINY_BUDGET, TINY_MODEL
from ENSAMTrainingLib.core.cases import (
    find_cases,
    find_label_maps,
    load_case,
    mix_cases,
    procedural_cases,
    with_synthesis,
)
from ENSAMTrainingLib.core.data import TrainingDataset

BUDGET = 24 * 40 * 40


def same(a, b) -> bool:
    return torch.equal(a.image, b.image) and torch.equal(a.target, b.target) and a.box == b.box


def test_label_maps_and_procedural_cases_load_without_images(npz_dataset):
    maps = find_label_maps(npz_dataset)
    assert len(maps) == 4 and {m.kind for m in maps} == {"labels"}
    case = load_case(maps[0])
    assert case.image is None and case.labels.max() > 0
    (scene,) = procedural_cases(1)
    first, again = load_case(scene), load_case(scene)
    assert first.image is None and np.array_equal(first.labels, again.labels) and len(np.unique(first.labels)) > 4


def test_synthetic_samples_depend_only_on_seed_epoch_index(npz_dataset):
    cases = find_label_maps(npz_dataset)[:2] + procedural_cases(2)
    one, two = TrainingDataset(cases, seed=3, voxel_budget=BUDGET), TrainingDataset(cases, seed=3, voxel_budget=BUDGET)
    for index in range(len(cases)):
        a, b = one[(1, index)], two[(1, index)]
        assert same(a, b) and a.target.sum() > 0 and 0 <= float(a.image.min()) and float(a.image.max()) <= 1
        assert not same(a, one[(2, index)])  # another epoch, another image


def test_synthesis_probability_replaces_real_images_and_zero_changes_nothing(npz_dataset):
    real = find_cases(npz_dataset)
    plain = TrainingDataset(real, seed=0, voxel_budget=BUDGET, augment=False)
    zero = TrainingDataset(with_synthesis(real, 0.0), seed=0, voxel_budget=BUDGET, augment=False)
    always = TrainingDataset(with_synthesis(real, 1.0), seed=0, voxel_budget=BUDGET, augment=False)
    for index in range(len(real)):
        assert same(plain[(0, index)], zero[(0, index)])
        assert not torch.equal(plain[(0, index)].image, always[(0, index)].image)


def test_mix_cases_keeps_validation_label_maps_out(npz_dataset):
    real, maps = find_cases(npz_dataset), find_label_maps(npz_dataset)
    mixed = mix_cases(real[1:], real[:1], maps, synth_probability=0.25, procedural=3)
    assert [c.kind for c in mixed] == ["npz"] * 3 + ["labels"] * 3 + ["procedural"] * 3
    assert real[0].image not in {c.image for c in mixed}
    assert {c.synth for c in mixed if c.kind == "npz"} == {0.25}
    twice = mix_cases(real[1:], real[:1], maps, procedural=1, repeat=2)
    assert len(twice) == 2 * 6 + 1 and twice[:6] == twice[6:12]


def test_ensam_train_from_label_maps_alone(npz_dataset, tmp_path, capsys):
    from ENSAMSegmentLib.cli.main import main

    out = tmp_path / "run"
    code = main(["train", "--synthetic", str(npz_dataset), "--procedural", "2", "--out", str(out),
                 "--epochs", "1", "--voxel-budget", str(TINY_BUDGET), "--val-fraction", "0.25", "--workers", "0",
                 "--accumulation", "2", "--stop-after", "1", "--clicks", "1", "--no-augment", "--no-progress-bar",
                 "--model-config", json.dumps(TINY_MODEL)])
    assert code == 0
    train_list = (out / "cases_train.txt").read_text().splitlines()
    assert len(train_list) == 3 + 2 and train_list[-1] == "procedural-00001"
    assert len((out / "cases_val.txt").read_text().splitlines()) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["synthetic"] == str(npz_dataset) and config["procedural"] == 2
