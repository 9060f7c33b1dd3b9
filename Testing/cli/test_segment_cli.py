"""`ensam segment` round trips on real files with oblique, anisotropic, LPS geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ENSAMSegmentLib.cli.main import main
from ENSAMSegmentLib.core.geometry import VolumeGeometry, rotation_matrix
from ENSAMSegmentLib.core.imageio import read_image
from ENSAMSegmentLib.core.phantom import make_phantom

SHAPE = (24, 40, 32)  # z, y, x: deliberately not multiples of 8


@pytest.fixture(scope="module")
def geometry():
    """Oblique (rotated about two axes), anisotropic, with a non-trivial LPS origin."""
    direction = rotation_matrix((0, 0, 1), 25.0) @ rotation_matrix((1, 0.2, 0), -12.0)
    return VolumeGeometry.from_lps((0.8, 1.1, 2.5), (-40.0, 17.0, 95.5), direction, SHAPE)


@pytest.fixture(scope="module", params=[".nii.gz", ".nrrd"])
def image_file(request, tmp_path_factory, geometry):
    image, _ = make_phantom(SHAPE, seed=3, spacing=geometry.spacing_zyx, n_objects=2)
    itk = sitk.GetImageFromArray(image.astype(np.int16))
    geometry.apply_to_sitk(itk)
    path = tmp_path_factory.mktemp("img") / f"ct{request.param}"
    sitk.WriteImage(itk, str(path))
    return path


def run_json(args, capsys) -> dict:
    assert main(args + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_voxel_prompts_round_trip(image_file, model_file, tmp_path, capsys, geometry):
    out = tmp_path / "seg.nrrd"
    report = run_json([
        "segment", str(image_file), "--box", "4,6,5,18,30,25", "--fg", "10,20,14", "--bg", "5,7,6", "--fg", "12,18,15",
        "-o", str(out), "--checkpoint", str(model_file), "--device", "cpu", "--seg-nrrd", str(tmp_path / "s.seg.nrrd"),
    ], capsys)
    # prompts in command-line order, as voxel indices z,y,x
    assert [p["prompt"] for p in report["prompts_zyx"]] == ["box", "fg", "bg", "fg"]
    assert report["prompts_zyx"][0]["min_zyx"] == [4, 6, 5] and report["prompts_zyx"][0]["max_zyx"] == [18, 30, 25]
    assert report["prompts_zyx"][2]["zyx"] == [5, 7, 6]
    assert len(report["timing_s"]["steps"]) == 4 and all(t > 0 for t in report["timing_s"]["steps"])
    assert report["model"]["untrained"] is True
    labels, out_geometry = read_image(out)
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, 1}
    assert out_geometry.allclose(geometry, atol=1e-5)  # the labelmap lies in the input's geometry
    assert int(labels.sum()) == report["foreground_voxels"]
    assert (tmp_path / "s.seg.nrrd").is_file()


def test_ras_click_resolves_to_the_voxel_it_names(image_file, model_file, tmp_path, capsys, geometry):
    file_geometry = read_image(image_file)[1]
    voxel = np.array([11, 23, 17])
    # a point 0.3 voxel off the centre still names that voxel
    ras = file_geometry.kji_to_ras(voxel + np.array([0.3, -0.3, 0.2]))
    box_lo = file_geometry.kji_to_ras(np.array([3, 5, 4]))
    box_hi = file_geometry.kji_to_ras(np.array([20, 33, 27]))
    report = run_json([
        "segment", str(image_file), "--ras", "--fg", ",".join(f"{v:.6f}" for v in ras),
        "-o", str(tmp_path / "seg.nii.gz"), "--checkpoint", str(model_file), "--device", "cpu",
    ], capsys)
    assert report["prompts_zyx"] == [{"prompt": "fg", "zyx": voxel.tolist(), "decoding": "whole", "window_growth": 0}]
    # an RAS box (axis-aligned in RAS) covers at least the voxels whose corners it was built from
    report = run_json([
        "segment", str(image_file), "--ras", "--box", ",".join(f"{v:.6f}" for v in (*box_lo, *box_hi)),
        "-o", str(tmp_path / "seg2.nii.gz"), "--checkpoint", str(model_file), "--device", "cpu",
    ], capsys)
    lo, hi = np.array(report["prompts_zyx"][0]["min_zyx"]), np.array(report["prompts_zyx"][0]["max_zyx"])
    assert np.all(lo <= [3, 5, 4]) and np.all(hi >= [20, 33, 27])
    assert np.all(lo >= 0) and np.all(hi <= np.array(SHAPE) - 1)


@pytest.fixture(scope="module")
def roomy_image(tmp_path_factory):
    """64^3: room for a small box's decode region (box + 16 voxels) to be under half the image."""
    image, _ = make_phantom((64, 64, 64), seed=3, n_objects=2)
    path = tmp_path_factory.mktemp("roomy") / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.int16)), str(path))
    return path


def test_click_window_reaches_the_session_and_each_step_reports_its_decoding(roomy_image, model_file, tmp_path,
                                                                              capsys):
    """Default: a click after the box decodes a window around it; --click-window 0: the box's region (here
    the box's whole crop: box + 16 voxels of decode margin covers it)."""
    prompts = ["--box", "28,28,28,35,35,35", "--fg", "31,31,31", "--bg", "33,30,34"]
    common = ["-o", str(tmp_path / "seg.nrrd"), "--checkpoint", str(model_file), "--device", "cpu"]
    windowed = run_json(["segment", str(roomy_image), *prompts, *common], capsys)
    boxed = run_json(["segment", str(roomy_image), *prompts, *common, "--click-window", "0"], capsys)
    narrow = run_json(["segment", str(roomy_image), *prompts, *common, "--click-window", "4"], capsys)
    assert (windowed["click_window"], boxed["click_window"], narrow["click_window"]) == (32, 0, 4)
    box_steps = {report["prompts_zyx"][0]["decoding"] for report in (windowed, boxed, narrow)}
    assert len(box_steps) == 1 and box_steps <= {"region", "whole"}  # the box step is the same in all three
    for report in (windowed, boxed, narrow):
        assert len(report["timing_s"]["steps"]) == len(report["prompts_zyx"]) == 3
    assert [p["decoding"] for p in windowed["prompts_zyx"][1:]] == ["window", "window"]
    assert [p["decoding"] for p in narrow["prompts_zyx"][1:]] == ["window", "window"]
    assert [p["decoding"] for p in boxed["prompts_zyx"][1:]] == [box_steps.pop()] * 2
    assert all(p["window_growth"] >= 0 for r in (windowed, narrow) for p in r["prompts_zyx"][1:])


def test_a_negative_click_window_is_refused(image_file, model_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(image_file), "--fg", "10,20,14", "-o", str(tmp_path / "o.nrrd"),
              "--checkpoint", str(model_file), "--click-window", "-1"])
    assert exit_info.value.code == 2 and "integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o.nrrd").exists()


@pytest.mark.parametrize("prompt, message", [
    (["--fg", "1,1,1", "--fg", "99,1,1"], "foreground click 2 (--fg 99,1,1) is outside the image: "
                                          "voxel indices z,y,x run 0..23, 0..39, 0..31"),
    (["--bg", "1.5,2,3"], "background click 1 (--bg 1.5,2,3): voxel indices are whole numbers (for millimetres "
                          "add --ras)"),
    (["--box", "1,2,3,4,5,40"], "box (--box 1,2,3,4,5,40), corner 2 is outside the image: voxel indices z,y,x "
                                "run 0..23, 0..39, 0..31"),
    (["--ras", "--fg", "500,-1e3,0"], "foreground click 1 (--fg 500,-1e3,0 --ras) is outside the image: "
                                      "the image spans R "),
    (["--ras", "--box", "-900,-900,-900,-800,-800,-800"], "box (--box -900,-900,-900,-800,-800,-800 --ras) lies "
                                                          "outside the image: the image spans R "),
    ([], "give a --box and/or at least one --fg click"),
])
def test_bad_prompts_name_the_prompt_as_given_and_the_image_extent(image_file, model_file, tmp_path, capsys,
                                                                     prompt, message):
    out = tmp_path / "never.nii.gz"
    code = main(["segment", str(image_file), *prompt, "-o", str(out), "--checkpoint", str(model_file)])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "np." not in err and "kji" not in err and "Traceback" not in err
    assert not out.exists()


def test_negative_coordinates_are_read_as_values(image_file, model_file, tmp_path, capsys):
    """RAS millimetres are often negative: `--fg -12.5,...` (argparse alone takes it for an option) and
    `--box=-...` both work, and each names the voxel it is nearest to."""
    geometry = read_image(image_file)[1]
    voxel = np.array([12, 20, 16])
    ras = geometry.kji_to_ras(voxel)
    corners = geometry.kji_to_ras(np.array([[6, 10, 8], [18, 30, 24]]))
    assert (ras < 0).any() and (corners < 0).any(), "the test needs negative RAS coordinates"
    text = lambda values: ",".join(f"{v:.4f}" for v in values)  # noqa: E731
    report = run_json(["segment", str(image_file), "--ras", f"--box={text(corners.ravel())}", "--fg", text(ras),
                       "-o", str(tmp_path / "seg.nrrd"), "--checkpoint", str(model_file), "--device", "cpu"], capsys)
    assert report["prompts_zyx"][1]["zyx"] == voxel.tolist()
    lo, hi = geometry.box_from_ras_corners(np.round(corners, 4))  # the values as written on the command line
    assert (report["prompts_zyx"][0]["min_zyx"], report["prompts_zyx"][0]["max_zyx"]) == (lo.tolist(), hi.tolist())


def test_box_corners_in_any_order(image_file, model_file, tmp_path, capsys):
    report = run_json(["segment", str(image_file), "--box", "18,6,25,4,30,5", "-o", str(tmp_path / "seg.nrrd"),
                       "--checkpoint", str(model_file), "--device", "cpu"], capsys)
    assert (report["prompts_zyx"][0]["min_zyx"], report["prompts_zyx"][0]["max_zyx"]) == ([4, 6, 5], [18, 30, 25])


def test_text_output_says_the_model_is_untrained(image_file, model_file, tmp_path, capsys):
    out = tmp_path / "seg.nrrd"
    assert main(["segment", str(image_file), "--fg", "10,20,14", "-o", str(out), "--checkpoint", str(model_file),
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("segmented ") and f"model: {model_file}" in lines[1]
    assert "UNTRAINED" in lines[2] and "not meaningful" in lines[2]
    assert lines[3] == f"wrote {out.resolve()}"


def test_missing_image_and_bad_model_file(tmp_path, model_file, capsys):
    assert main(["segment", str(tmp_path / "none.nrrd"), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd"),
                 "--checkpoint", str(model_file)]) == 2
    assert "none.nrrd" in capsys.readouterr().err
    image = tmp_path / "img.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16, 16), np.int16)), str(image))
    broken = tmp_path / "broken.pt"
    broken.write_text("not a model")
    assert main(["segment", str(image), "--fg", "1,1,1", "-o", str(tmp_path / "o.nrrd"), "--checkpoint", str(broken)]) == 2
    assert "broken.pt" in capsys.readouterr().err


def test_challenge_npz_input_writes_segs(tmp_path, model_file, capsys):
    from ENSAMSegmentLib.core.phantom import write_challenge_dataset

    case = write_challenge_dataset(tmp_path / "data", 1, shape=(24, 32, 32), seed=1)[0]
    out = tmp_path / "out.npz"
    report = run_json(["segment", str(case), "--box", "2,3,3,20,28,28", "-o", str(out),
                       "--checkpoint", str(model_file)], capsys)
    segs = np.load(out)["segs"]
    assert segs.dtype == np.uint8 and segs.shape == (24, 32, 32)
    assert int((segs > 0).sum()) == report["foreground_voxels"]
