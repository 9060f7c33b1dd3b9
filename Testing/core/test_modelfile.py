"""ENSAM model files: round trip, metadata, atomic writes, and every way a file can be wrong."""

from __future__ import annotations

import pickle

import pytest
import torch

from ENSAMSegmentLib.core.modelfile import (
    UNTRAINED,
    ArchitectureMismatchError,
    CorruptModelFileError,
    ModelFileError,
    ModelFileNotFoundError,
    ModelFileVersionError,
    NotAModelFileError,
    create_untrained_model_file,
    default_model_path,
    load_model,
    read_model_info,
    save_model,
)
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts

SMALL = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = ENSAM(SMALL)
    path = save_model(tmp_path / "model.pt", model, training_data="phantoms", metrics={"dice": 0.5},
                      notes="test")
    return path, model


def test_round_trip_gives_the_same_model_and_metadata(model_file):
    path, model = model_file
    loaded, info = load_model(path)
    assert not loaded.training and info.config == SMALL
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    image = torch.rand(1, 1, 16, 16, 16)
    prompts = Prompts.from_objects([{"fg": [(8, 8, 8)]}])
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, prompts), model.eval()(image, prompts))
    assert (info.training_data, info.metrics, info.notes) == ("phantoms", {"dice": 0.5}, "test")
    assert info.parameters == sum(p.numel() for p in model.parameters()) and not info.untrained
    assert info.created[:4].isdigit() and "T" in info.created and info.ensam_version
    assert read_model_info(path).metadata() == info.metadata()
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left


def test_untrained_model_file_is_deterministic_and_marked(tmp_path):
    a = create_untrained_model_file(tmp_path / "a.pt", seed=3, config=SMALL)
    b = create_untrained_model_file(tmp_path / "b.pt", seed=3, config=SMALL)
    (ma, info), (mb, _) = load_model(a), load_model(b)
    assert info.untrained and info.training_data == UNTRAINED
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert default_model_path().parts[-4:] == ("ENSAMSegment", "Resources", "Models", "ensam-default.pt")


def _expect(error_class, path, *phrases):
    for read in (load_model, read_model_info):
        with pytest.raises(error_class) as caught:
            read(path)
        assert isinstance(caught.value, ModelFileError) and str(path) in str(caught.value)
        for phrase in phrases:
            assert phrase in str(caught.value)


def test_missing_file(tmp_path):
    _expect(ModelFileNotFoundError, tmp_path / "nothing.pt", "no such file")


@pytest.mark.parametrize("kind", ["text", "tensor", "pickle", "python-object", "other-dict"])
def test_files_that_are_not_models(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3, 3), path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"format": "ensam-model"}))
    elif kind == "python-object":
        torch.save({"format": "ensam-model", "thing": pickle.PickleError()}, path)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    _expect(NotAModelFileError, path, "not an ENSAM model file")


def test_wrong_format_version(tmp_path, model_file):
    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    _expect(ModelFileVersionError, tmp_path / "v99.pt", "format version 99", "reads version 1")


def test_architecture_mismatch(tmp_path, model_file):
    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    payload["config"]["init_filters"] = 16  # weights are for 8 filters
    torch.save(payload, tmp_path / "wider.pt")
    with pytest.raises(ArchitectureMismatchError, match="wrong shape") as caught:
        load_model(tmp_path / "wider.pt")
    assert str(tmp_path / "wider.pt") in str(caught.value)
    payload = torch.load(path, weights_only=True)
    del payload["weights"]["decoder.final_conv.bias"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(ArchitectureMismatchError, match="1 missing: decoder.final_conv.bias"):
        load_model(tmp_path / "missing.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["heads"] = 3  # 64 is not divisible by 3: an invalid config
    torch.save(payload, tmp_path / "invalid.pt")
    _expect(ArchitectureMismatchError, tmp_path / "invalid.pt", "invalid architecture config")


def test_truncated_file(tmp_path, model_file):
    path, _ = model_file
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    _expect(CorruptModelFileError, tmp_path / "cut.pt", "damaged or truncated")


def test_failed_save_leaves_the_old_file(tmp_path, model_file, monkeypatch):
    path, model = model_file
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, model)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_metrics_are_stored_as_plain_data(tmp_path):
    import numpy as np

    model = ENSAM(SMALL)
    metrics = {"dice": np.float64(0.75), "steps": np.int64(12), "curve": np.array([0.1, 0.2]),
               "loss": torch.tensor(0.5), "per_class": {"liver": np.float32(0.5)}}
    info = read_model_info(save_model(tmp_path / "m.pt", model, metrics=metrics))
    assert info.metrics == {"dice": 0.75, "steps": 12, "curve": [0.1, 0.2], "loss": 0.5,
                            "per_class": {"liver": 0.5}}
    assert type(info.metrics["dice"]) is float and type(info.metrics["steps"]) is int
    with pytest.raises(TypeError, match=r"metrics\['bad'\]"):
        save_model(tmp_path / "bad.pt", model, metrics={"bad": object()})
    assert not (tmp_path / "bad.pt").exists()
