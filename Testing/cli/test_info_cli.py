"""`ensam info`: architecture, size, compute and metadata, as text and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
from ENSAMSegmentLib.core.network.complexity import count_macs


def test_info_without_checkpoint_describes_the_default_model_file(tmp_path, monkeypatch, capsys):
    config = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
    default = create_untrained_model_file(tmp_path / "ensam-default.pt", config=config)
    monkeypatch.setattr("ENSAMSegmentLib.core.modelfile.default_model_path", lambda: default)
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(default) and report["default"] is True and report["missing"] is None
    assert report["metadata"]["untrained"] and report["config"]["init_filters"] == 8
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"  model file: {default} (the default model)"
    assert lines[2] == "  trained on: untrained (random initialisation)" and "UNTRAINED" in lines[3]


def test_info_with_the_default_model_missing_says_what_to_do(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "ensam-default.pt"
    monkeypatch.setattr("ENSAMSegmentLib.core.modelfile.default_model_path", lambda: missing)
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metadata"] is None and "`make setup`" in report["missing"]
    assert report["config"] == ENSAMConfig().to_dict()  # the default architecture, without weights
    assert report["parameters"] == sum(p.numel() for p in ENSAM().parameters())
    assert report["gmacs_max_patch"] == pytest.approx(count_macs(ENSAMConfig(), (128, 128, 256)) / 1e9, rel=1e-12)
    assert report["gflops_max_patch"] == 2 * report["gmacs_max_patch"]
    assert report["max_patch_voxels"] == 4_194_304
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"MISSING: the default model file {missing} is missing" in text and "4,194,304 voxels" in text


def test_info_with_a_model_file(tmp_path, capsys):
    config = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
    path = create_untrained_model_file(tmp_path / "tiny.pt", config=config)
    assert main(["info", "--checkpoint", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["init_filters"] == 8
    assert report["metadata"]["untrained"] and report["metadata"]["training_data"].startswith("untrained")
    assert report["parameters"] == sum(v.numel() for v in torch.load(path, weights_only=True)["weights"].values())
    assert main(["info", "--checkpoint", str(path)]) == 0
    text = capsys.readouterr().out
    assert "UNTRAINED" in text and "G MACs" in text and "init_filters: 8" in text


def test_info_bad_file_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    assert main(["info", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not an ENSAM model file" in err and str(path) in err
