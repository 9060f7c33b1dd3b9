"""Coreset selection: equal counts per dataset, small datasets whole, bad cases skipped with reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHAPE, write_case

from ENSAMSegmentLib.core.phantom import make_phantom, write_challenge_dataset
from ENSAMTrainingLib.core.coreset import (
    equal_shares,
    label_overflow,
    normalisation_problem,
    select_coreset,
    write_coreset,
)
from ENSAMTrainingLib.core.cases import NoCasesError, read_case_list


def overflow_labels():
    labels = np.zeros(SHAPE, np.uint8)
    labels.flat[: 255 * 10] = np.repeat(np.arange(1, 256), 10)
    return labels


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """CT/A 6 cases, CT/B 2, MR/C 5 (one uint8 overflow, one flat image), MR/D 3."""
    root = tmp_path_factory.mktemp("collection")
    write_challenge_dataset(root / "CT" / "A", 6, shape=SHAPE, seed=1, modalities=("ct",))
    write_challenge_dataset(root / "CT" / "B", 2, shape=SHAPE, seed=2, modalities=("ct",))
    write_challenge_dataset(root / "MR" / "C", 3, shape=SHAPE, seed=3, modalities=("mr",))
    write_challenge_dataset(root / "MR" / "D", 3, shape=SHAPE, seed=4, modalities=("mr",))
    image, labels = make_phantom(SHAPE, 5, n_objects=2, modality="mr")
    image = (image / image.max() * 255).astype(np.uint8)
    write_case(root / "MR" / "C" / "overflow.npz", image, overflow_labels())
    write_case(root / "MR" / "C" / "flat.npz", ((labels > 0) * 200).astype(np.uint8), labels)
    return root


def test_equal_shares():
    assert equal_shares(8, {"a": 6, "b": 2, "c": 5}, ["a", "b", "c"]) == {"b": 2, "a": 3, "c": 3}
    assert equal_shares(7, {"a": 6, "b": 6}, ["b", "a"]) == {"a": 3, "b": 4}
    assert equal_shares(100, {"a": 3, "b": 1}, ["a", "b"]) == {"a": 3, "b": 1}
    assert equal_shares(2, {"a": 5, "b": 5, "c": 5}, ["c", "a", "b"]) == {"a": 1, "b": 0, "c": 1}


def test_criteria():
    assert label_overflow(overflow_labels())
    assert not label_overflow(overflow_labels().astype(np.uint16))
    binary = np.zeros(SHAPE, np.uint8)
    binary[4:8, 4:8, 4:8] = 255  # a 0/255 mask is not an overflow
    assert not label_overflow(binary)
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:15, 10:30, 10:30] = 1
    ok = np.random.default_rng(0).integers(0, 256, SHAPE).astype(np.uint8)
    assert normalisation_problem(ok, labels) == ""
    assert "outside 0..255" in normalisation_problem(ok.astype(np.float32) * 10, labels)
    assert "distinct grey values" in normalisation_problem((labels * 90).astype(np.uint8), labels)
    saturated = ok.copy()
    saturated[labels > 0] = 255
    assert "labelled voxels at 0 or 255" in normalisation_problem(saturated, labels)


def test_selection_counts_and_report(collection, tmp_path):
    # 16 cases -> 8: B (2) whole, A and C 3 each; C draws until it has 3 usable ones
    result = select_coreset(collection, fraction=0.5, exclude=["d"], seed=0)
    rows = {r["dataset"]: r for r in result.table()}
    assert {d: r["selected"] for d, r in rows.items()} == {"A": 3, "B": 2, "C": 3, "D": 0}
    assert sum(rows["C"]["skipped"].values()) == len(result.skipped) <= 2
    # 16 -> 12: B 2, then A and C 5 each; C has only 3 usable, A gives what it has
    result = select_coreset(collection, fraction=0.75, exclude=["d"], seed=0)
    rows = {r["dataset"]: r for r in result.table()}
    assert {d: r["selected"] for d, r in rows.items()} == {"A": 6, "B": 2, "C": 3, "D": 0}
    assert result.warnings == ["only 11 usable cases for a target of 12"]
    assert rows["D"]["excluded"] and result.excluded == ["D"]
    assert rows["C"]["skipped"] == {"uint8 label overflow": 1, "broken normalisation": 1}
    assert result.modalities() == {"CT": {"found": 8, "selected": 8}, "MR": {"found": 8, "selected": 3}}
    assert not any(c.name in ("overflow", "flat") for c in result.selected)

    report = write_coreset(result, tmp_path / "coreset.txt")
    assert report == tmp_path / "coreset.report.json"
    data = json.loads(report.read_text())
    assert data["selected"] == 11 and data["found"] == 16 and data["target"] == 12
    assert {s["reason"] for s in data["skipped"]} == {"uint8 label overflow", "broken normalisation"}
    listed = read_case_list(tmp_path / "coreset.txt", collection)
    assert [c.image for c in listed] == [c.image for c in result.selected]
    text = result.format()
    assert "excluded (--exclude)" in text and "uint8 label overflow: 1" in text


def test_max_seed_and_warnings(collection):
    a = select_coreset(collection, fraction=1.0, max_cases=3, seed=1, exclude=["nothing*"])
    b = select_coreset(collection, fraction=1.0, max_cases=3, seed=1, workers=2)  # checks in 2 processes
    assert len(a.selected) == 3 and [c.image for c in a.selected] == [c.image for c in b.selected]
    assert {c.dataset for c in a.selected} <= {"A", "B", "C", "D"} and len({c.dataset for c in a.selected}) == 3
    assert any("matches no dataset" in w for w in a.warnings)
    assert any("contribute no case" in w for w in a.warnings)
    everything = select_coreset(collection, fraction=1.0, exclude=["MR/*"])
    assert {c.dataset for c in everything.selected} == {"A", "B"} and len(everything.selected) == 8


def test_too_small(collection, tmp_path):
    with pytest.raises(NoCasesError, match="less than one case"):
        select_coreset(collection, fraction=0.01)
    with pytest.raises(NoCasesError, match="no training cases"):
        select_coreset(tmp_path, fraction=0.5)


def test_coreset_command(collection, tmp_path, capsys):
    from ENSAMSegmentLib.cli.main import main

    out = tmp_path / "lists" / "core.txt"
    assert main(["coreset", "--data", str(collection), "--fraction", "0.5", "--exclude", "MR/D", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "selected 8 of 16 cases (target 8)" in printed and "per modality: CT 5/8, MR 3/8" in printed
    assert len(out.read_text().splitlines()) == 8
    assert json.loads((tmp_path / "lists" / "core.report.json").read_text())["excluded"] == ["D"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["coreset", "--data", str(empty), "-o", str(tmp_path / "x.txt")]) == 2
    assert "no training cases in" in capsys.readouterr().err
