"""`ensam models list/verify/import/register` on real files, with the shipped and the user model
folders pointed at temporary folders."""

from __future__ import annotations

import json

import pytest
import torch

from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.core import registry
from ENSAMSegmentLib.core.modelfile import create_untrained_model_file, read_model_info, save_model
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig

SMALL = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    shipped, user = tmp_path / "Models", tmp_path / "user-models"
    shipped.mkdir()
    monkeypatch.setattr(registry, "SHIPPED_DIR", shipped)
    monkeypatch.setenv(registry.USER_DIR_ENV, str(user))
    return shipped, user


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(2)
    return save_model(tmp_path / "run7" / "model.pt", ENSAM(SMALL), training_data="phantoms (test)")


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *args) -> str:
    code, out, err = _run(capsys, *args)
    assert code == 2 and out == "" and "Traceback" not in err, (code, out, err)
    assert err.count("\n") == 1 and err.startswith(f"ensam {args[0]}: error: "), err
    return err.strip()


def test_register_list_import_verify(folders, trained, tmp_path, capsys):
    shipped, user = folders
    metrics = tmp_path / "dev.json"
    metrics.write_text(json.dumps({"final_dsc": 0.83, "auc_dsc": 4.1, "per_modality": {"ct": 0.8}}))
    code, out, _ = _run(capsys, "models", "register", str(trained), "--name", "ensam-default",
                        "--training-data", "TotalSegmentator examples (test)", "--metrics", str(metrics),
                        "--notes", "first")
    assert code == 0 and "registered 'ensam-default' (the default model)" in out and "float16 weights" in out
    assert "decisions differing" in out and "git add ENSAMSegment/Resources/Models/ensam-default.pt" in out
    assert read_model_info(shipped / "ensam-default.pt").metrics["final_dsc"] == 0.83

    inline = {"dev_set": "24 cases, 57 structures " * 12, "DSC_AUC": 2.2}  # longer than a file name may be
    code, out, _ = _run(capsys, "models", "register", str(trained), "--name", "ensam-default", "--replace",
                        "--metrics", json.dumps(inline), "--notes", "first")
    assert code == 0 and read_model_info(shipped / "ensam-default.pt").metrics == inline
    metrics.write_text(json.dumps({"final_dsc": 0.83, "auc_dsc": 4.1, "per_modality": {"ct": 0.8}}))
    code, out, _ = _run(capsys, "models", "register", str(trained), "--name", "ensam-default", "--replace",
                        "--training-data", "TotalSegmentator examples (test)", "--metrics", str(metrics),
                        "--notes", "first")
    assert code == 0 and read_model_info(shipped / "ensam-default.pt").metrics["final_dsc"] == 0.83

    code, out, _ = _run(capsys, "models", "import", str(trained))
    assert code == 0 and f"imported {trained} as 'run7': {user / 'run7.pt'}" in out

    code, out, _ = _run(capsys, "models", "list", "--json")
    listed = {m["name"]: m for m in json.loads(out)["models"]}
    assert code == 0 and set(listed) == {"ensam-default", "run7"}
    assert listed["ensam-default"]["where"] == "shipped" and listed["ensam-default"]["default"]
    assert listed["run7"]["where"] == "user" and not listed["run7"]["default"]
    assert all(m["status"] == "ok" for m in listed.values())
    assert listed["ensam-default"]["entry"]["metrics"]["auc_dsc"] == 4.1
    assert listed["ensam-default"]["metadata"]["weights_dtype"] == "float16"
    code, out, _ = _run(capsys, "models", "list")
    assert f"Shipped models in {shipped}:" in out and "ensam-default (default): ok (sha256 verified)" in out
    assert "metrics: final_dsc 0.830, auc_dsc 4.100 (+1 more: --json)" in out and "run7: ok" in out

    code, out, _ = _run(capsys, "models", "verify")
    assert code == 0 and out.strip().endswith("2 of 2 model files usable")

    data = bytearray((user / "run7.pt").read_bytes())  # a damaged copy
    data[-100] ^= 0xFF
    (user / "run7.pt").write_bytes(bytes(data))
    code, out, _ = _run(capsys, "models", "verify", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [m["status"] for m in report["models"]] == ["ok", "modified"]
    assert "import the model again: ensam models import FILE --name run7 --replace" in report["models"][1]["problem"]
    code, out, _ = _run(capsys, "models", "verify", "run7")
    assert code == 1 and "run7: MODIFIED" in out and "sha256 expected" in out
    err = _error(capsys, "info", "--checkpoint", str(user / "run7.pt"))  # every command that loads it
    assert "does not match its entry 'run7'" in err

    code, out, _ = _run(capsys, "models", "import", str(trained), "--replace")
    assert code == 0
    code, out, _ = _run(capsys, "models", "verify", str(user / "run7.pt"))
    assert code == 0 and "run7: ok (sha256 verified)" in out


def test_list_shows_the_unregistered_placeholder_as_untrained(folders, capsys):
    shipped, _user = folders
    create_untrained_model_file(shipped / "ensam-default.pt", config=SMALL)
    code, out, _ = _run(capsys, "models", "list")
    assert code == 0 and "ensam-default (default): unregistered (no sha256 to check)" in out
    assert "UNTRAINED" in out and "(none); `ensam models import FILE` adds one" in out


def test_import_refuses_a_truncated_file(folders, trained, tmp_path, capsys):
    _shipped, user = folders
    truncated = tmp_path / "download.pt"
    truncated.write_bytes(trained.read_bytes()[:-2000])
    err = _error(capsys, "models", "import", str(truncated), "--name", "liver")
    assert f"model file {truncated}: damaged or truncated" in err
    assert not user.exists()


def test_import_never_overwrites_a_user_model_silently(folders, trained, tmp_path, capsys):
    _shipped, user = folders
    assert _run(capsys, "models", "import", str(trained), "--name", "liver")[0] == 0
    before = (user / "liver.pt").read_bytes()
    other = save_model(tmp_path / "other.pt", ENSAM(SMALL), training_data="other (test)")
    err = _error(capsys, "models", "import", str(other), "--name", "liver")
    assert "'liver' is already registered" in err and "--replace" in err
    assert (user / "liver.pt").read_bytes() == before


@pytest.mark.parametrize("case", ["missing", "folder", "not-a-model", "bad-name", "unknown-name", "metrics",
                                  "untrained", "registry"])
def test_bad_input_is_one_line(case, folders, trained, tmp_path, capsys):
    shipped, _user = folders
    notes = tmp_path / "notes.pt"
    notes.write_text("not a model")
    args, phrase = {
        "missing": (["import", str(tmp_path / "nothing.pt")], "no such file"),
        "folder": (["verify", str(tmp_path)], "is a folder"),
        "not-a-model": (["import", str(notes)], "not an ENSAM model file"),
        "bad-name": (["import", str(trained), "--name", "../x"], "model name '../x'"),
        "unknown-name": (["verify", "nothing-like-this"], "no model named 'nothing-like-this'"),
        "metrics": (["register", str(trained), "--name", "a", "--metrics", "{oops"], "--metrics: neither"),
        "untrained": (["register", str(create_untrained_model_file(tmp_path / "u.pt", config=SMALL)), "--name", "a"],
                      "untrained model"),
        "registry": (["list"], "not an ENSAM model registry"),
    }[case]
    if case == "registry":
        (shipped / "models.json").write_text("[]")
    assert phrase in _error(capsys, "models", *args)
