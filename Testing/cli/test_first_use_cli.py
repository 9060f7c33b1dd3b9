"""What a new user meets in the `ensam` tool: outputs, device and model checked before any work, the
next step when something is missing, help that says how, and the untrained model said everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ENSAMSegmentLib.cli.main import build_parser, main
from ENSAMSegmentLib.core.phantom import write_challenge_dataset


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 24, 24), np.int16)), str(path))
    return path


@pytest.fixture
def broken_model(tmp_path):
    """A model file that fails only when loaded: any error about an output must come before it."""
    path = tmp_path / "broken.pt"
    path.write_text("not a model")
    return path


def _error(args, capsys) -> str:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not captured.out
    return captured.err.strip()


@pytest.mark.parametrize("output, message", [
    ("out.png", "-o {out}: unsupported file type; use one of .seg.nrrd, .nii.gz, .nii, .nrrd, .mha, .npz"),
    ("dir.nrrd", "-o {out} is a folder; give a file name"),
    ("notes.txt/out.nrrd", "-o {out}: {tmp}/notes.txt is a file, not a folder"),
])
def test_segment_output_is_checked_before_any_work(image_file, broken_model, tmp_path, capsys, output, message):
    (tmp_path / "dir.nrrd").mkdir()
    (tmp_path / "notes.txt").write_text("")
    out = tmp_path / output
    err = _error(["segment", str(image_file), "--fg", "1,1,1", "-o", str(out), "--checkpoint", str(broken_model)],
                 capsys)
    assert err == "ensam segment: error: " + message.format(out=out, tmp=tmp_path)


def test_seg_nrrd_output_must_be_a_seg_nrrd(image_file, broken_model, tmp_path, capsys):
    err = _error(["segment", str(image_file), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd"),
                  "--seg-nrrd", str(tmp_path / "s.nrrd"), "--checkpoint", str(broken_model)], capsys)
    assert err.endswith(f"--seg-nrrd {tmp_path / 's.nrrd'}: unsupported file type; use one of .seg.nrrd")
    assert not (tmp_path / "o.nrrd").exists()


def test_output_folders_are_checked_before_any_work(tmp_path, broken_model, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    data = write_challenge_dataset(tmp_path / "data", 1, shape=(16, 24, 24), seed=1)[0].parent
    for command in (["demo", "--out", str(a_file)], ["predict", "--input", str(data), "--output", str(a_file)],
                    ["evaluate", "--data", str(data), "--out", str(a_file)]):
        err = _error([*command, "--checkpoint", str(broken_model)], capsys)
        assert err.endswith(f"{a_file} is a file, not a folder"), err


def test_a_missing_default_model_says_what_to_do(image_file, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "Models" / "ensam-default.pt"
    monkeypatch.setattr("ENSAMSegmentLib.core.modelfile.default_model_path", lambda: missing)
    for command in (["segment", str(image_file), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd")],
                    ["demo", "--out", str(tmp_path / "demo")]):
        err = _error(command, capsys)
        assert f"the default model file {missing} is missing" in err
        assert "`make setup`" in err and "--checkpoint FILE" in err and "Model card" in err
    assert not (tmp_path / "o.nrrd").exists()
    err = _error(["segment", str(image_file), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd"),
                  "--checkpoint", str(tmp_path / "mine.pt")], capsys)
    assert err.endswith(f"--checkpoint {tmp_path / 'mine.pt'}: no such file")


def test_a_missing_registered_default_says_how_to_restore_it(image_file, model_file, tmp_path, monkeypatch, capsys):
    """Once a trained default is registered (committed), `make setup` no longer writes one: the message
    says to restore the file instead."""
    from ENSAMSegmentLib.core.modelfile import load_model, save_model
    from ENSAMSegmentLib.core.modelstore import register_model

    trained = save_model(tmp_path / "run" / "model.pt", load_model(model_file, "cpu")[0], training_data="a test")
    folder = tmp_path / "Models"
    register_model(trained, "ensam-default", folder, default=True)
    missing = folder / "ensam-default.pt"
    missing.unlink()
    monkeypatch.setattr("ENSAMSegmentLib.core.modelfile.default_model_path", lambda: missing)
    err = _error(["segment", str(image_file), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd")], capsys)
    assert f"the default model file {missing} is missing" in err
    assert f"git checkout -- {missing}" in err and "make setup" not in err and "--checkpoint FILE" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("command", ["segment", "demo", "bench"])
def test_cuda_without_cuda_says_how_to_get_a_cuda_torch(command, image_file, model_file, tmp_path, capsys):
    args = {"segment": [str(image_file), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd")],
            "demo": ["--out", str(tmp_path / "demo")], "bench": ["--repeats", "1"]}[command]
    err = _error([command, *args, "--checkpoint", str(model_file), "--device", "cuda"], capsys)
    assert err.startswith(f"ensam {command}: error: --device cuda: this torch")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu" in err and "--device cpu" in err


def test_a_folder_is_neither_an_image_nor_a_model(image_file, model_file, tmp_path, capsys):
    err = _error(["segment", str(tmp_path), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd"),
                  "--checkpoint", str(model_file)], capsys)
    assert err.endswith(f"{tmp_path} is a folder; give an image file (.nii.gz, .nrrd, .mha, .npz, ...)")
    for command in (["info"], ["segment", str(image_file), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd")]):
        assert _error([*command, "--checkpoint", str(tmp_path)], capsys).endswith(
            f"--checkpoint {tmp_path}: a folder, not a model file")


def test_a_single_slice_image_is_refused(model_file, tmp_path, capsys):
    image = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 24, 24), np.int16)), str(image))
    err = _error(["segment", str(image), "--fg", "0,1,1", "-o", str(tmp_path / "o.nrrd"),
                  "--checkpoint", str(model_file)], capsys)
    assert err.endswith("slice.nii.gz is a single slice along z (shape 1 x 24 x 24, z, y, x): ENSAM segments "
                        "3-D volumes, so it needs at least 2 voxels along every axis")


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("command", ["demo", "segment", "predict", "evaluate", "web"])
def test_device_has_help(command, capsys):
    assert "--device {auto,cpu,cuda,mps} compute device: auto (default: cuda when available" in _help(command, capsys)


def test_segment_help_lists_every_modality_and_says_how_to_pass_negative_numbers(capsys):
    from ENSAMSegmentLib.cli.common import MODALITIES
    from ENSAMSegmentLib.core.intensity import MODALITIES as ACCEPTED

    assert MODALITIES == ACCEPTED
    text = _help("segment", capsys)
    assert "{auto,ct,mr,pet,us,xray,microscopy,other}" in text
    assert "--box -13.5,2,40,... works, as does --box=-13.5,2,40,..." in text
    assert build_parser().parse_args(["segment", "x.nrrd", "-o", "o.nrrd", "--modality", "xray"]).modality == "xray"


def test_one_shape_syntax_for_bench_and_train_bench():
    from ENSAMSegmentLib.evaluation.benchmark import parse_shape

    args = build_parser().parse_args(["train-bench", "throughput", "--shapes", "64,64,64", "64x128x128"])
    assert args.shapes == [(64, 64, 64), (64, 128, 128)]  # the older DxHxW still works
    assert parse_shape("64,128,128") == parse_shape("64x128x128") == (64, 128, 128)
    assert build_parser().parse_args(["bench"]).shape == "128,256,256"


def test_demo_says_untrained_in_its_text_png_and_report(model_file, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--checkpoint", str(model_file), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "NOTE: this model is UNTRAINED (random weights)" in text
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["untrained"] is True
    paths = [report["image"], report["model"]["path"], *report["outputs"]]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths), paths
    assert [Path(p).name for p in report["outputs"]] == ["ensam-sample-ct-segmentation.nrrd",
                                                         "ensam-sample-ct-overlay.png", "report.json"]
    assert _red_pixels(out / "ensam-sample-ct-overlay.png") > 2000  # the UNTRAINED banner


def _red_pixels(path) -> int:
    import matplotlib.pyplot as plt

    rgb = (plt.imread(path)[..., :3] * 255).astype(int)
    return int(((rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def test_overlay_fill_is_the_orange_its_legend_names(tmp_path):
    import matplotlib.pyplot as plt

    from ENSAMSegmentLib.cli.cmd_demo import write_overlay_png

    image = np.zeros((3, 64, 64), np.float32) - 1000  # black
    mask = np.zeros(image.shape, bool)
    mask[:, 10:50, 10:50] = True
    write_overlay_png(tmp_path / "o.png", image, mask, mask, ((0, 5, 5), (2, 55, 55)), [((1, 30, 30), True)])
    assert _red_pixels(tmp_path / "o.png") == 0  # no banner without a warning, and no red fill
    rgb = plt.imread(tmp_path / "o.png")[..., :3]
    filled = rgb[np.all(np.abs(rgb - rgb[rgb.shape[0] // 2, rgb.shape[1] // 3]) < 1e-3, axis=-1)]
    r, g, b = filled[0]
    assert len(filled) > 1000 and r > g > b and 0.4 < g / r < 0.7  # orange (#ff8c00: g/r = 0.55), as in the legend
