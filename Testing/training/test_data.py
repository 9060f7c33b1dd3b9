"""Training data: case discovery, pairing rules, bad input, and the per-sample pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SHAPE, write_case, write_pair

from ENSAMSegmentLib.core.phantom import make_phantom, write_challenge_dataset
from ENSAMTrainingLib.core.cases import (
    CaseError,
    NoCasesError,
    find_cases,
    load_case,
    read_case_list,
    write_case_list,
)
from ENSAMTrainingLib.core.data import EpochSampler, TrainingDataset, augment_intensity, make_sample, pool_factors


def test_flat_and_nested_npz_names(tmp_path, npz_dataset):
    flat = find_cases(npz_dataset)
    assert [(c.name, c.dataset, c.modality) for c in flat[:2]] == [
        ("CT_Phantom_0000", "CT_Phantom", "CT"),
        ("CT_Phantom_0002", "CT_Phantom", "CT"),
    ]
    write_challenge_dataset(tmp_path / "MR" / "BrainSet", 2, shape=SHAPE, seed=1, modalities=("mr",))
    write_challenge_dataset(tmp_path / "CT_Liver", 1, shape=SHAPE, seed=2, modalities=("ct",))
    nested = find_cases(tmp_path)
    assert sorted({(c.dataset, c.modality) for c in nested}) == [("BrainSet", "MR"), ("CT_Liver", "CT")]
    assert all(c.kind == "npz" and c.label is None for c in nested)


def test_image_label_pairs(tmp_path):
    nnunet = tmp_path / "Dataset001_Toy"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    write_pair(nnunet / "imagesTr" / "toy_001_0000.nii.gz", nnunet / "labelsTr" / "toy_001.nii.gz", seed=1)
    write_pair(nnunet / "imagesTr" / "toy_002_0000.nii.gz", None, seed=2)  # no label
    loose = tmp_path / "loose"
    loose.mkdir()
    labels = write_pair(loose / "case7.nrrd", loose / "case7_seg.nrrd", seed=3)

    cases = {c.name: c for c in find_cases(tmp_path)}
    assert sorted(cases) == ["case7", "toy_001_0000", "toy_002_0000"]  # label files are not cases
    toy = cases["toy_001_0000"]
    assert (toy.dataset, toy.modality, toy.label.name) == ("Dataset001_Toy", "CT", "toy_001.nii.gz")
    assert cases["case7"].label.name == "case7_seg.nrrd" and cases["case7"].dataset == "loose"

    loaded = load_case(cases["case7"])
    assert loaded.image.dtype == np.uint8 and loaded.image.max() > 100  # CT window to 0..255
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.spacing == pytest.approx((2.0, 1.0, 1.0))
    with pytest.raises(CaseError, match="missing labels"):
        load_case(cases["toy_002_0000"])


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(NoCasesError, match="no training cases in"):
        find_cases(tmp_path)
    with pytest.raises(NoCasesError, match="does not exist"):
        find_cases(tmp_path / "nope")


@pytest.fixture()
def bad_cases(tmp_path):
    image, labels = make_phantom(SHAPE, 0, n_objects=2)
    image = (np.clip(image, -160, 240) + 160).astype(np.uint8)
    write_case(tmp_path / "good.npz", image, labels)
    write_case(tmp_path / "background.npz", image, np.zeros_like(labels))
    write_case(tmp_path / "mismatch.npz", image, labels[:-2])
    write_case(tmp_path / "nolabels.npz", image, None)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip file")
    return tmp_path


@pytest.mark.parametrize(
    "name, reason",
    [
        ("background", "labels all background"),
        ("mismatch", "mismatched shapes"),
        ("nolabels", "missing labels"),
        ("corrupt", "unreadable"),
    ],
)
def test_bad_case_reasons(bad_cases, name, reason):
    case = next(c for c in find_cases(bad_cases) if c.name == name)
    with pytest.raises(CaseError) as error:
        load_case(case)
    assert error.value.reason == reason and name in str(error.value)


def test_dataset_skips_bad_cases_and_stops_when_none_is_usable(bad_cases):
    cases = find_cases(bad_cases)  # background, corrupt, good, mismatch, nolabels
    dataset = TrainingDataset(cases, voxel_budget=20_000)
    sample = dataset[(0, 0)]  # "background" is bad: the next usable case is "good"
    assert sample.case == "good"
    assert [case for case, _ in sample.skipped] == ["background", "corrupt"]
    assert "labels all background" in sample.skipped[0][1]
    only_bad = TrainingDataset([c for c in cases if c.name != "good"], voxel_budget=20_000)
    with pytest.raises(NoCasesError, match="none of the 4 training cases can be used"):
        only_bad[(0, 0)]


def test_sample_crop_budget_padding_and_determinism(npz_dataset):
    case = load_case(find_cases(npz_dataset)[0])
    rng = np.random.default_rng(3)
    sample = make_sample(case, rng, voxel_budget=10**9, augment=False, no_box_probability=0.0)
    # no pooling: the crop holds every voxel of the chosen object
    assert sample.target.sum() == (case.labels == sample.label).sum()
    assert all(s % 8 == 0 for s in sample.image.shape[2:])
    assert 0.0 <= sample.image.min() and sample.image.max() <= 1.0
    (z0, y0, x0), (z1, y1, x1) = sample.box
    inside = sample.target[0, 0, z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1].sum()
    assert inside == sample.target.sum()  # the box holds the whole object
    small = make_sample(case, np.random.default_rng(3), voxel_budget=4096, augment=False)
    assert small.image[0, 0].numel() <= 4096 and small.target.sum() > 0
    assert small.spacing[0] >= case.spacing[0]  # pooled along z at least (z is coarse here)
    dataset = TrainingDataset(find_cases(npz_dataset), seed=5, voxel_budget=8192)
    a, b, c = dataset[(1, 2)], dataset[(1, 2)], dataset[(2, 2)]
    assert torch.equal(a.image, b.image) and a.box == b.box and a.click_seed == b.click_seed
    assert a.click_seed != c.click_seed


def test_pool_factors_reach_the_budget():
    for shape, budget in [((300, 512, 512), 4_194_304), ((40, 40, 40), 4096), ((7, 900, 20), 10_000)]:
        factors = pool_factors(shape, budget)
        padded = [math.ceil(math.ceil(s / f) / 8) * 8 for s, f in zip(shape, factors)]
        assert np.prod(padded) <= budget
    assert pool_factors((64, 64, 64), 4_194_304) == (1, 1, 1)


def test_augmentation_stays_in_unit_range():
    image = np.linspace(0, 1, 16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    changed = 0
    for seed in range(12):
        out = augment_intensity(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
        changed += not np.array_equal(out, image)
    assert 2 <= changed <= 11  # about half of them


def test_epoch_sampler_splits_and_resumes():
    full = EpochSampler(10, seed=1, epoch=3).keys()
    assert sorted(i for _, i in full) == list(range(10)) and all(e == 3 for e, _ in full)
    assert EpochSampler(10, seed=1, epoch=4).keys() != full
    ranks = [EpochSampler(10, 1, 3, rank=r, world_size=3).keys() for r in range(3)]
    assert [len(k) for k in ranks] == [4, 4, 4]
    assert {i for keys in ranks for _, i in keys} == set(range(10))
    assert EpochSampler(10, 1, 3, start=6).keys() == full[6:]


def test_case_list_round_trip(tmp_path, npz_dataset):
    cases = find_cases(npz_dataset)[:3]
    write_case_list(tmp_path / "list.txt", cases, npz_dataset)
    assert read_case_list(tmp_path / "list.txt", npz_dataset) == cases
    (tmp_path / "bad.txt").write_text("missing.npz\n")
    with pytest.raises(NoCasesError, match="not found"):
        read_case_list(tmp_path / "bad.txt", npz_dataset)


def _two_objects_case(tmp_path):
    """A case with two separate boxes of labels 1 and 2 (and a third object far away)."""
    labels = np.zeros((32, 48, 48), np.uint8)
    labels[10:20, 8:18, 8:18] = 1
    labels[10:20, 22:30, 8:18] = 2
    labels[24:30, 40:46, 40:46] = 3
    image = (labels * 60 + 20).astype(np.uint8)
    np.savez(tmp_path / "two.npz", imgs=image, gts=labels, spacing=np.array([1.0, 1.0, 1.0]))
    return load_case(find_cases(tmp_path)[0])


def test_other_object_sample_is_not_the_one_the_crop_is_drawn_around(tmp_path):
    """With other_object_probability 1 the target is another object that reached into the first crop, the
    crop grown to hold it whole, and the box is its box (only the box says which object is meant)."""
    from ENSAMTrainingLib.core.data import bounding_box, other_object

    case = _two_objects_case(tmp_path)
    crop_of_1 = (slice(5, 25), slice(3, 24), slice(3, 23))  # object 1 with a margin; object 2 reaches in
    chosen, grown = other_object(case.labels, crop_of_1, 1, np.random.default_rng(0))
    assert chosen == 2
    assert np.count_nonzero(case.labels[grown] == 2) == np.count_nonzero(case.labels == 2)  # whole
    assert np.count_nonzero(case.labels[grown] == 1) == np.count_nonzero(case.labels == 1)  # the decoy too
    assert other_object(case.labels, (slice(22, 32), slice(36, 48), slice(36, 48)), 3, np.random.default_rng(0)) is None

    switched = 0
    for seed in range(40):
        first = make_sample(case, np.random.default_rng(seed), voxel_budget=10**9, augment=False, no_box_probability=0.0)
        sample = make_sample(case, np.random.default_rng(seed), voxel_budget=10**9, augment=False,
                             no_box_probability=0.0, other_object_probability=1.0)
        target = sample.target[0, 0].numpy() > 0.5
        assert target.sum() == (case.labels == sample.label).sum()  # the target is whole in its crop
        (z0, y0, x0), (z1, y1, x1) = sample.box
        assert all(bounding_box(target)[0] >= (z0, y0, x0))  # the box is the target's
        assert target[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1].sum() == target.sum()
        if sample.label != first.label:  # switched: the first object stays in the crop as a decoy
            switched += 1
            assert {first.label, sample.label} == {1, 2}
            assert np.count_nonzero(case.labels[sample.crop] == first.label) > 0
    assert 8 <= switched <= 32  # objects 1 and 2 reach into each other's crops often, object 3 never
    plain = make_sample(case, np.random.default_rng(1), voxel_budget=10**9, augment=False)
    again = make_sample(case, np.random.default_rng(1), voxel_budget=10**9, augment=False, other_object_probability=0.0)
    assert plain.label == again.label and plain.box == again.box  # off by default in make_sample


def test_runs_from_before_the_option_resume_without_other_objects():
    from ENSAMTrainingLib.core.runsetup import TrainConfig

    assert TrainConfig(data="d", out="o").other_object_probability == 0.25
    assert TrainConfig.from_dict({"data": "d", "out": "o"}).other_object_probability == 0.0
    assert TrainConfig.from_dict({"data": "d", "out": "o", "other_object_probability": 0.5}).other_object_probability == 0.5
