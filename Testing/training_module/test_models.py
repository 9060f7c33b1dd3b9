"""Installing a trained model where ENSAMSegment lists models: atomic, complete model files only."""

from __future__ import annotations

import pytest

from ENSAMSegmentLib.mrml.promptcontroller import USER_MODELS_DIR, model_choices
from ENSAMTrainingLib.mrml import models
from ENSAMTrainingLib.mrml.models import ModelInstallError, install_model


def test_same_folder_and_listing_as_ensamsegment(tmp_path):
    assert models.USER_MODELS_DIR == USER_MODELS_DIR
    assert models.offered_models() == model_choices()
    assert models.offered_models(tmp_path) == model_choices(tmp_path)


def test_install_lists_it_for_ensamsegment(tmp_path, tiny_model):
    folder = tmp_path / "models"
    installed = install_model(tiny_model, "My liver model!", folder)
    assert installed == folder / "My-liver-model.pt"
    assert installed.read_bytes() == tiny_model.read_bytes()
    assert ("My-liver-model", installed) in model_choices(folder)  # ENSAMSegment's own function
    # no temporary file left; registered (sha256), as `ensam models import` does
    assert sorted(p.name for p in folder.iterdir()) == ["My-liver-model.pt", "models.json"]
    from ENSAMSegmentLib.core.modelstore import load_registry

    assert load_registry(folder).get("My-liver-model").file == "My-liver-model.pt"
    again = install_model(tiny_model, "My liver model!", folder)
    assert again == folder / "My-liver-model-2.pt" and installed.exists()  # the first is kept
    assert install_model(tiny_model, "My liver model!", folder, overwrite=True) == installed
    assert "M parameters" in models.describe_model(installed)


def test_default_name_from_the_run_folder(tmp_path, tiny_model):
    run = tmp_path / "run-20250101-120000"
    run.mkdir()
    (run / "model.pt").write_bytes(tiny_model.read_bytes())
    assert install_model(run / "model.pt", folder=tmp_path / "m").name == "run-20250101-120000.pt"


@pytest.mark.parametrize("damage", ["truncated", "not a model", "missing"])
def test_incomplete_files_are_refused_and_nothing_appears(tmp_path, tiny_model, damage):
    source = tmp_path / "source.pt"
    data = tiny_model.read_bytes()
    if damage == "truncated":  # an interrupted copy
        source.write_bytes(data[: len(data) // 2])
    elif damage == "not a model":
        source.write_bytes(b"some text, not a model")
    folder = tmp_path / "models"
    with pytest.raises(ModelInstallError, match="source.pt"):
        install_model(source, "x", folder)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_weights_that_do_not_match_the_architecture_are_refused(tmp_path, tiny_model):
    """A file that reads but lacks weights is not a complete model (load_model checks every weight)."""
    import torch

    payload = torch.load(tiny_model, weights_only=True)
    payload["weights"].pop(next(iter(payload["weights"])))
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(ModelInstallError, match="missing"):
        models.check_model_file(tmp_path / "partial.pt")
    assert models.describe_model(tmp_path / "nothing.pt").startswith("cannot be used")


def test_model_name():
    assert models.model_name("  run 1 / final.pt ") == "run-1-final"
    assert models.model_name("***") == "ensam-model"
