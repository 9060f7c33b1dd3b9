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


# The layers of each Lib package, bottom up: which of the project's layers each may import, and whether it
# may use Slicer (its MRML API, through Slicer or the slicer-core wheel), Qt, and torch directly.
# Imports point down only: core knows nothing of Slicer or Qt; mrml/ and evaluation/ use Slicer's
# Python wheel (slicer-core) but no Qt; the front-ends sit on top. ENSAMSegmentLib never imports
# ENSAMTrainingLib (the `ensam` tool finds the training commands by name, when they are installed).
SEGMENT_LAYERS = {
    "core": {"ENSAMSegmentLib": {"core"}, "slicer": False, "qt": False},
    "mrml": {"ENSAMSegmentLib": {"core", "mrml"}, "slicer": True, "qt": False},
    "evaluation": {"ENSAMSegmentLib": {"core", "evaluation"}, "slicer": True, "qt": False},
    "cli": {"ENSAMSegmentLib": {"core", "mrml", "evaluation", "cli", "webapp"}, "slicer": True, "qt": False},
    "webapp": {"ENSAMSegmentLib": {"core", "mrml", "webapp"}, "slicer": True, "qt": False},
}
# ENSAMTrainingLib stands on ENSAMSegmentLib: its core/ (the training) uses ENSAMSegmentLib's core only;
# runs/ (a run started and watched from outside: command lines, run folders, progress, child processes)
# is as free of Slicer and Qt as core, and of torch too: the Slicer module imports it in its GUI process;
# mrml/ is the module's logic on the MRML API (ENSAMSegmentLib's mrml/ included); cli/ is a front-end.
TRAINING_LAYERS = {
    "core": {"ENSAMTrainingLib": {"core"}, "ENSAMSegmentLib": {"core"}, "slicer": False, "qt": False},
    "runs": {"ENSAMTrainingLib": {"core", "runs"}, "ENSAMSegmentLib": {"core"}, "slicer": False, "qt": False,
             "torch": False},
    "mrml": {"ENSAMTrainingLib": {"core", "runs", "mrml"}, "ENSAMSegmentLib": {"core", "mrml"}, "slicer": True,
             "qt": False, "torch": False},
    "cli": {"ENSAMTrainingLib": {"core", "runs", "cli"}, "ENSAMSegmentLib": {"core", "cli"}, "slicer": False,
            "qt": False},
}
LIBS = {
    "ENSAMSegmentLib": (ROOT / "ENSAMSegment" / "ENSAMSegmentLib", SEGMENT_LAYERS),
    "ENSAMTrainingLib": (ROOT / "ENSAMTraining" / "ENSAMTrainingLib", TRAINING_LAYERS),
}
LAYER_CASES = [(lib, layer) for lib, (_, layers) in LIBS.items() for layer in sorted(layers)]


def _imports(path, lib_root):
    """Every module name ``path`` imports, anywhere in the file (also inside functions); ``from a.b import
    c`` gives a.b.c (c may be a module), relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = path.parent.relative_to(lib_root.parent).parts
                base = ".".join(package[: len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            else:
                base = node.module or ""
            yield from (f"{base}.{a.name}" for a in node.names)


def layer_violations(path, rule) -> list[str]:
    """Why the imports of ``path`` break ``rule`` (a row of SEGMENT_LAYERS / TRAINING_LAYERS); [] when none."""
    lib_root = next(root for root, _ in LIBS.values() if root in path.parents)
    problems = []
    for name in _imports(path, lib_root):
        parts = name.split(".")
        top = parts[0]
        if top in LIBS and len(parts) > 1 and parts[1] not in ("__init__", "__version__"):
            allowed = rule.get(top, set())
            if parts[1] not in allowed:
                problems.append(f"imports {name}: may import only {sorted(allowed)} of {top}")
        if top in ("slicer", "vtk", "vtkmodules", "trame_slicer") and not rule["slicer"]:
            problems.append(f"imports {name}: must not use Slicer")
        if (top in ("qt", "ctk", "PythonQt") or name.startswith(("slicer.ScriptedLoadableModule",
                                                                 "slicer.parameterNodeWrapper"))) and not rule["qt"]:
            problems.append(f"imports {name}: must not use Qt")
        if top in ("torch", "monai") and not rule.get("torch", True):
            problems.append(f"imports {name}: must not import torch (the Slicer module imports it without torch)")
    return problems


@pytest.mark.parametrize("lib, layer", LAYER_CASES)
def test_imports_point_down(lib, layer):
    root, layers = LIBS[lib]
    files = sorted((root / layer).rglob("*.py"))
    assert files, f"{lib}/{layer} holds no Python file"
    problems = [f"{path.relative_to(ROOT)} {problem}" for path in files
                for problem in layer_violations(path, layers[layer])]
    assert not problems, f"layer {layer} of {lib}:\n" + "\n".join(problems)


def test_a_wrong_import_is_caught(tmp_path, monkeypatch):
    """The check itself: an import pointing up (also a relative one inside a function), Slicer in core,
    Qt in mrml, torch in runs, ENSAMTrainingLib in ENSAMSegmentLib: each is found."""
    monkeypatch.setitem(LIBS, "ENSAMTrainingLib", (tmp_path / "ENSAMTrainingLib", TRAINING_LAYERS))
    monkeypatch.setitem(LIBS, "ENSAMSegmentLib", (tmp_path / "ENSAMSegmentLib", SEGMENT_LAYERS))
    for lib, layer, code, message in [
        ("ENSAMTrainingLib", "core", "from ENSAMTrainingLib.mrml.controller import TrainingController", "may import only"),
        ("ENSAMTrainingLib", "core", "from ENSAMSegmentLib.mrml import volumes", "may import only"),
        ("ENSAMTrainingLib", "runs", "def f():\n    from ..mrml import models", "may import only"),
        ("ENSAMTrainingLib", "core", "import slicer", "must not use Slicer"),
        ("ENSAMTrainingLib", "mrml", "import qt", "must not use Qt"),
        ("ENSAMTrainingLib", "runs", "import torch", "must not import torch"),
        ("ENSAMSegmentLib", "cli", "import ENSAMTrainingLib.core.trainer", "may import only"),
    ]:
        root, layers = LIBS[lib]
        path = root / layer / "wrong.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code + "\n")
        problems = layer_violations(path, layers[layer])
        assert any(message in p for p in problems), (lib, layer, code, problems)


def test_training_lib_folders_are_its_layers():
    """Every file of ENSAMTrainingLib lies in one of its layers' folders (only __init__.py at the top)."""
    root, layers = LIBS["ENSAMTrainingLib"]
    top = sorted(p.name for p in root.glob("*.py"))
    assert top == ["__init__.py"], f"files outside the layer folders: {top}"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(layers), f"folders {folders}, layers {sorted(layers)}: add the folder to TRAINING_LAYERS"


def test_screenshot_urls_name_files_of_this_tree():
    """EXTENSION_SCREENSHOTURLS: each URL (space-separated) names a file under Resources/Screenshots."""
    text = (ROOT / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split()
    assert urls
    for url in urls:
        path = url.split("/main/", 1)[1]
        assert (ROOT / path).is_file(), f"{url} names {path}, which does not exist"
