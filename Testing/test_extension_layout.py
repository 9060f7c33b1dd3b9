"""The Slicer extension's build files agree with the tree.

The extension build (CMake + Slicer) cannot run here, and a file listed in a module's
CMakeLists.txt but missing, or a Lib file that is not listed (so not installed), breaks it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["ENSAMSegment", "ENSAMTraining"]
# Resource files a module ships with the extension (besides its .py scripts).
RESOURCE_SUFFIXES = {".png", ".ui", ".json", ".nrrd", ".pt"}


def cmake_list(cmake_text: str, variable: str, module: str) -> list[str]:
    """Entries of `set(<variable> ...)` with ${MODULE_NAME} substituted."""
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", cmake_text, re.S)
    assert match, f"set({variable} ...) not found"
    entries = []
    for line in match.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(line.replace("${MODULE_NAME}", module))
    return entries


def git_ignored(path: Path) -> bool:
    """Files git ignores (e.g. the untrained model `make setup` writes) are not part of the extension."""
    result = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, capture_output=True)
    return result.returncode == 0


@pytest.mark.parametrize("module", MODULES)
def test_listed_files_exist(module):
    folder = ROOT / module
    text = (folder / "CMakeLists.txt").read_text()
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for entry in cmake_list(text, variable, module):
            assert (folder / entry).is_file(), f"{module}/CMakeLists.txt lists {entry}, which does not exist"


@pytest.mark.parametrize("module", MODULES)
def test_every_module_file_is_listed(module):
    folder = ROOT / module
    text = (folder / "CMakeLists.txt").read_text()
    scripts = set(cmake_list(text, "MODULE_PYTHON_SCRIPTS", module))
    resources = set(cmake_list(text, "MODULE_PYTHON_RESOURCES", module))
    python_files = {p.relative_to(folder).as_posix() for p in (folder / f"{module}Lib").rglob("*.py")}
    python_files.add(f"{module}.py")
    unlisted = sorted(python_files - scripts)
    assert not unlisted, f"{module}/CMakeLists.txt does not list: {unlisted}"
    resource_files = {
        p.relative_to(folder).as_posix()
        for p in (folder / "Resources").rglob("*")
        if p.is_file() and p.suffix in RESOURCE_SUFFIXES and not git_ignored(p)
    }
    unlisted = sorted(resource_files - resources)
    assert not unlisted, f"{module}/CMakeLists.txt does not list resources: {unlisted}"


def test_shipped_models_are_listed_committed_and_as_registered():
    """Each model in the shipped registry (Resources/Models/models.json) ships with the extension: listed
    in MODULE_PYTHON_RESOURCES, not git-ignored (the untrained placeholder is), its sha256 as registered."""
    from ENSAMSegmentLib.core.registry import SHIPPED_DIR, SHIPPED_MAX_BYTES, Registry, file_sha256

    resources = cmake_list((ROOT / "ENSAMSegment" / "CMakeLists.txt").read_text(), "MODULE_PYTHON_RESOURCES",
                           "ENSAMSegment")
    assert "Resources/Models/models.json" in resources
    registry = Registry.load(SHIPPED_DIR)
    assert registry.default is None or registry.get(registry.default), f"{registry.path}: unknown default"
    for entry in registry.models:
        path, listed = registry.file_of(entry), f"Resources/Models/{entry.file}"
        assert listed in resources, f"list {listed} in ENSAMSegment/CMakeLists.txt (MODULE_PYTHON_RESOURCES)"
        assert not git_ignored(path), f"{path} is git-ignored: remove its line from .gitignore, then commit it"
        assert file_sha256(path) == entry.sha256, f"{path} is not the file registered in {registry.path}"
        assert entry.bytes <= SHIPPED_MAX_BYTES, f"{path}: over 12 MB"


@pytest.mark.parametrize("module", MODULES)
def test_module_structure(module):
    folder = ROOT / module
    source = (folder / f"{module}.py").read_text()
    for cls in ("", "Widget", "Logic", "Test"):
        assert re.search(rf"^class {module}{cls}\(", source, re.M), f"class {module}{cls} missing"
    assert (folder / "Resources" / "UI" / f"{module}.ui").is_file()
    assert (folder / "Resources" / "Icons" / f"{module}.png").is_file()
    assert (folder / "Testing" / "Python" / "CMakeLists.txt").is_file()
    assert "slicer_add_python_unittest" in (folder / "CMakeLists.txt").read_text()


def test_top_level_cmake():
    text = (ROOT / "CMakeLists.txt").read_text()
    for field in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert re.search(rf'set\({field} "[^"]+"\)', text), f"{field} missing or empty"
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text
    for module in MODULES:
        assert f"add_subdirectory({module})" in text


def test_icons_are_128_png():
    from PIL import Image

    for path in [ROOT / "Resources" / "ENSAM.png"] + [
        ROOT / m / "Resources" / "Icons" / f"{m}.png" for m in MODULES
    ]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128), path


def test_ui_files_are_valid_xml():
    import xml.etree.ElementTree as ET

    for module in MODULES:
        tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
        assert tree.getroot().tag == "ui"


def test_lint_clean():
    """ruff over the modules, the Lib packages and the tests (the Slicer widgets cannot run here)."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--quiet", "ENSAMSegment", "ENSAMTraining", "Testing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# The layers of ENSAMSegmentLib, bottom up, and what each may import from the project and from Slicer/Qt.
# Imports point down only: core knows nothing of Slicer or Qt; mrml/ and evaluation/ use Slicer's
# Python wheel (slicer-core) but no Qt; the front-ends sit on top.
LAYERS = {
    "core": {"project": {"core"}, "slicer": False, "qt": False},
    "mrml": {"project": {"core", "mrml"}, "slicer": True, "qt": False},
    "evaluation": {"project": {"core", "evaluation"}, "slicer": True, "qt": False},
    "cli": {"project": {"core", "mrml", "evaluation", "cli", "webapp"}, "slicer": True, "qt": False},
    "webapp": {"project": {"core", "mrml", "webapp"}, "slicer": True, "qt": False},
}


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = path.parent.relative_to(LIB.parent).parts
                base = package[: len(package) - node.level + 1]
                yield ".".join(base + ((node.module,) if node.module else ()))
            else:
                yield node.module or ""


LIB = ROOT / "ENSAMSegment" / "ENSAMSegmentLib"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_point_down(layer):
    rule = LAYERS[layer]
    for path in sorted((LIB / layer).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "ENSAMSegmentLib" and "." in name:
                assert name.split(".")[1] in rule["project"] | {"__init__"} or name.split(".")[1] == "__version__", \
                    f"{path.relative_to(ROOT)} imports {name}: layer {layer} may import only {sorted(rule['project'])}"
            if top in ("slicer", "vtk", "vtkmodules", "trame_slicer"):
                assert rule["slicer"], f"{path.relative_to(ROOT)} imports {name}: layer {layer} must not use Slicer"
            if top in ("qt", "ctk", "PythonQt") or name.startswith(("slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper")):
                assert rule["qt"], f"{path.relative_to(ROOT)} imports {name}: layer {layer} must not use Qt"


def test_screenshot_urls_name_files_of_this_tree():
    """EXTENSION_SCREENSHOTURLS: each URL (space-separated) names a file under Resources/Screenshots."""
    text = (ROOT / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split()
    assert urls
    for url in urls:
        path = url.split("/main/", 1)[1]
        assert (ROOT / path).is_file(), f"{url} names {path}, which does not exist"
