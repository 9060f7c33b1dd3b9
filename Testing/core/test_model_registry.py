"""The model registry (models.json beside model files): round trip, sha256 checks on loading,
float16 shipping files, registering and importing, and what `make setup` writes."""

from __future__ import annotations

import json

import pytest
import torch

from ENSAMSegmentLib.core import registry
from ENSAMSegmentLib.core.modelfile import (CorruptModelFileError, ModelChecksumError, ModelFileNotFoundError, ModelRegistryError,
                                           create_untrained_model_file, ensure_default_model, load_model,
                                           read_model_info, save_model)
from ENSAMSegmentLib.core.modelstore import ModelStoreError, check_file, import_model, register_model
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts
from ENSAMSegmentLib.core.registry import ModelEntry, Registry, RegistryError

TINY = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)


@pytest.fixture
def trained_file(tmp_path):
    """A small model file that says it was trained (register refuses untrained ones)."""
    torch.manual_seed(1)
    return save_model(tmp_path / "run" / "model.pt", ENSAM(TINY), training_data="phantoms (test)",
                      metrics={"final_dsc": 0.5}, notes="test model", voxel_budget=196_608)


def test_registry_round_trip(tmp_path):
    entry = ModelEntry(name="a", file="a.pt", sha256="0" * 64, bytes=10, weights_dtype="float16",
                       parameters=5, architecture=TINY.to_dict(), training_data="x", metrics={"dsc": 0.9},
                       created="2026-12-01T00:00:00+00:00", ensam_version="0.1.0", notes="n")
    reg = Registry(tmp_path, "a", [entry])
    path = reg.save()
    assert path == tmp_path / "models.json" and [p.name for p in tmp_path.iterdir()] == ["models.json"]
    loaded = Registry.load(tmp_path)
    assert loaded == reg and loaded.get("a") == entry and loaded.for_file("a.pt") == entry
    assert json.loads(path.read_text())["format"] == "ensam-model-registry"
    loaded.put(ModelEntry(name="a", file="a.pt", sha256="1" * 64, bytes=11))  # same name: replaced
    assert [m.sha256 for m in loaded.models] == ["1" * 64]
    assert Registry.load(tmp_path / "nowhere") == Registry(tmp_path / "nowhere")  # no file: empty


def test_default_model_path_follows_the_registry(tmp_path):
    assert registry.default_model_path(tmp_path) == tmp_path / "ensam-default.pt"
    Registry(tmp_path, "small", [ModelEntry(name="small", file="small-v2.pt", sha256="0" * 64, bytes=1)]).save()
    assert registry.default_model_path(tmp_path) == tmp_path / "small-v2.pt"
    assert registry.default_model_path().parent == registry.SHIPPED_DIR


@pytest.mark.parametrize("text, phrase", [("{not json", "cannot be read"),
                                          ('{"format": "ensam-model-registry", "format_version": 9}', "version 9"),
                                          ('{"format": "ensam-model-registry", "format_version": 1, '
                                           '"models": [{"name": "a"}]}', "missing bytes, file, sha256")])
def test_a_broken_registry_is_named_when_loading_a_model_beside_it(tmp_path, trained_file, text, phrase):
    (tmp_path / "run" / "models.json").write_text(text)
    with pytest.raises(RegistryError, match=phrase):
        Registry.load(tmp_path / "run")
    for read in (load_model, read_model_info):
        with pytest.raises(ModelRegistryError) as caught:
            read(trained_file)
        assert str(tmp_path / "run" / "models.json") in str(caught.value) and phrase in str(caught.value)


def test_another_programs_models_json_beside_a_model_file_is_not_a_registry(tmp_path, trained_file):
    (tmp_path / "run" / "models.json").write_text('{"models": ["resnet50"]}')
    assert load_model(trained_file)[1].training_data == "phantoms (test)"
    with pytest.raises(ModelRegistryError, match="not an ENSAM model registry"):  # but never written over
        import_model(trained_file, "x", tmp_path / "run")


def test_loading_a_modified_registered_file_says_which_file_expected_actual_and_what_to_do(tmp_path, trained_file):
    entry, _probe = register_model(trained_file, "liver", tmp_path / "shipped")
    path = tmp_path / "shipped" / "liver.pt"
    assert load_model(path)[1].training_data == "phantoms (test)" and check_file(path).status == "ok"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, the size unchanged
    path.write_bytes(bytes(data))
    actual = registry.file_sha256(path)
    for read in (load_model, read_model_info):
        with pytest.raises(ModelChecksumError) as caught:
            read(path)
        message = str(caught.value)
        assert str(path) in message and entry.sha256 in message and actual in message
        assert str(tmp_path / "shipped" / "models.json") in message and "register it again" in message
    assert check_file(path).status == "modified"


def test_hashes_are_cached_by_size_and_mtime(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    first = registry.file_sha256(path)
    assert registry.file_sha256(path) == first and len(registry._HASHES) >= 1
    path.write_bytes(b"b" * 1001)  # another size: hashed again
    assert registry.file_sha256(path) != first


def test_float16_file_is_half_the_size_loads_as_float32_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = ENSAM(TINY).eval()
    fp32 = save_model(tmp_path / "fp32.pt", model, training_data="test")
    fp16 = save_model(tmp_path / "fp16.pt", model, training_data="test", dtype=torch.float16)
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    loaded, info = load_model(fp16)
    assert info.weights_dtype == "float16" and read_model_info(fp32).weights_dtype == "float32"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    image = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = Prompts.from_objects([{"box": ((8, 8, 8), (23, 23, 23)), "fg": [(16, 16, 16)]}])
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, prompts), model(image, prompts), atol=2e-2, rtol=1e-2)


def test_register_writes_float16_metadata_and_the_entry(tmp_path, trained_file):
    folder = tmp_path / "shipped"
    entry, probe = register_model(trained_file, "ensam-default", folder, training_data="dev data",
                                  metrics={"final_dsc": 0.8, "auc": 4.0}, notes="v1")
    path = folder / "ensam-default.pt"
    info = read_model_info(path)
    assert (info.training_data, info.metrics, info.notes) == ("dev data", {"final_dsc": 0.8, "auc": 4.0}, "v1")
    assert info.created == read_model_info(trained_file).created  # the training date, not today's
    assert info.voxel_budget == 196_608  # the training patch budget travels (the session's grid default)
    assert entry == Registry.load(folder).get("ensam-default") and Registry.load(folder).default == "ensam-default"
    assert (entry.sha256, entry.bytes) == (registry.file_sha256(path), path.stat().st_size)
    assert entry.weights_dtype == "float16" and entry.architecture == TINY.to_dict()
    assert entry.parameters == info.parameters and entry.metrics == info.metrics
    assert probe["max_abs_logit_difference"] < 0.05 and probe["decision_flips"] < 0.01
    assert sorted(p.name for p in folder.iterdir()) == ["ensam-default.pt", "models.json"]  # no temporary
    with pytest.raises(ModelStoreError, match="already registered.*--replace"):
        register_model(trained_file, "ensam-default", folder)
    register_model(trained_file, "small", folder)
    assert Registry.load(folder).default == "ensam-default"  # the first stays the default ...
    register_model(trained_file, "small", folder, default=True, replace=True)
    assert Registry.load(folder).default == "small" and registry.default_model_path(folder) == folder / "small.pt"


def test_register_refuses_untrained_and_oversized_models_and_keeps_the_placeholder_rule(tmp_path, trained_file):
    folder = tmp_path / "shipped"
    placeholder = create_untrained_model_file(folder / "ensam-default.pt", config=TINY)
    with pytest.raises(ModelStoreError, match="untrained"):
        register_model(placeholder, "ensam-default", folder)
    with pytest.raises(ModelStoreError, match="over the 0 MB limit"):
        register_model(trained_file, "ensam-default", folder, max_bytes=1000)
    assert read_model_info(placeholder).untrained and not (folder / "models.json").exists()
    register_model(trained_file, "ensam-default", folder)  # the untrained placeholder may be replaced
    assert not read_model_info(placeholder).untrained


def test_import_copies_checks_and_registers_and_never_overwrites_silently(tmp_path, trained_file):
    user = tmp_path / "user"
    entry = import_model(trained_file, folder=user)  # a run's model.pt is named after its run folder
    assert entry.name == "run" and (user / "run.pt").read_bytes() == trained_file.read_bytes()
    assert Registry.load(user).get("run") == entry and check_file(user / "run.pt", full=True).status == "ok"
    other = save_model(tmp_path / "other.pt", ENSAM(TINY), training_data="other")
    with pytest.raises(ModelStoreError, match="already registered.*--replace"):
        import_model(other, "run", user)
    assert registry.file_sha256(user / "run.pt") == entry.sha256
    assert import_model(other, "run", user, replace=True).sha256 == registry.file_sha256(other)
    with pytest.raises(ModelStoreError, match="model name"):
        import_model(other, "bad name/..", user)
    create_untrained_model_file(user / "mine.pt", config=TINY)  # unregistered, untrained: still the user's
    with pytest.raises(ModelStoreError, match="mine.pt already exists.*--replace"):
        import_model(other, "mine", user)
    assert sorted(p.name for p in user.iterdir()) == ["mine.pt", "models.json", "run.pt"]


def test_import_refuses_a_truncated_file_and_leaves_nothing(tmp_path, trained_file):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained_file.read_bytes()[:5000])
    with pytest.raises(CorruptModelFileError) as caught:
        import_model(truncated, folder=tmp_path / "user")
    assert "damaged or truncated" in str(caught.value) and str(truncated) in str(caught.value)
    assert not (tmp_path / "user").exists()


def test_user_models_dir_is_the_slicer_modules_and_follows_the_environment(tmp_path, monkeypatch):
    from ENSAMSegmentLib.mrml.promptcontroller import USER_MODELS_DIR

    monkeypatch.delenv(registry.USER_DIR_ENV, raising=False)
    assert registry.user_models_dir() == USER_MODELS_DIR
    monkeypatch.setenv(registry.USER_DIR_ENV, str(tmp_path))
    assert registry.user_models_dir() == tmp_path


def test_make_setup_writes_the_placeholder_only_until_a_default_is_registered(tmp_path, trained_file, monkeypatch):
    monkeypatch.setattr("ENSAMSegmentLib.core.modelfile.create_untrained_model_file",
                        lambda path, seed: create_untrained_model_file(path, seed, TINY))  # fast
    folder = tmp_path / "shipped"
    assert "wrote the untrained placeholder" in ensure_default_model(folder)
    assert read_model_info(folder / "ensam-default.pt").untrained
    assert "(unregistered)" in ensure_default_model(folder)  # there: nothing to do
    (folder / "ensam-default.pt").unlink()
    register_model(trained_file, "ensam-v2", folder)
    assert "registered" in ensure_default_model(folder) and not (folder / "ensam-default.pt").exists()
    (folder / "ensam-v2.pt").unlink()
    with pytest.raises(ModelFileNotFoundError, match="registered default model .*ensam-v2.pt.* is missing"):
        ensure_default_model(folder)
