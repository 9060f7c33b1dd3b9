"""What can be checked here of the Slicer front-end (the Slicer app itself cannot run here).

- the first-run dependency decision (ENSAMSegmentLib.slicerui.dependencies), on real version strings;
- the module and effect sources: they parse, pass ruff, use only widget names the .ui defines,
  and agree with each other on the effect's name, class and registration;
- the shared keyboard-shortcut table: one key per action, no clash with the Segment Editor's keys;
- the ExtensionsIndex entry against the catalog-entry schema 1.0.1 and the top CMakeLists.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ENSAMSegmentLib.slicerui import dependencies as deps

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "ENSAMSegment" / "ENSAMSegment.py"
EFFECT = ROOT / "ENSAMSegment" / "ENSAMSegmentLib" / "SegmentEditorEffect.py"
CONTROLLER = ROOT / "ENSAMSegment" / "ENSAMSegmentLib" / "mrml" / "promptcontroller.py"
UI = ROOT / "ENSAMSegment" / "Resources" / "UI" / "ENSAMSegment.ui"
FRONTEND_FILES = [MODULE, EFFECT, CONTROLLER, ROOT / "ENSAMSegment" / "ENSAMSegmentLib" / "slicerui" / "dependencies.py"]


# --- dependency decision ---------------------------------------------------------------------

ALL_GOOD = {"torch": "2.13.0+cpu", "monai": "1.6.1", "scipy": "1.15.2", "numpy": "2.4.6", "SimpleITK": "2.5.7"}


@pytest.mark.parametrize(
    "version, minimum, expected",
    [
        ("2.6.0", "2.6", True),
        ("2.6", "2.6.0", True),
        ("2.13.0+cu124", "2.6", True),  # numeric, not string, comparison: 13 > 6
        ("2.5.1", "2.6", False),
        ("1.4rc1", "1.4", True),  # pre-release tags are ignored: a 1.4 candidate counts as 1.4
        ("1.3.2", "1.4", False),
        ("10.0", "9.9", True),
        (deps.UNKNOWN_VERSION, "2.3", True),
    ],
)
def test_version_at_least(version, minimum, expected):
    assert deps.version_at_least(version, minimum) is expected


def test_release_tuple_rejects_non_versions():
    with pytest.raises(ValueError, match="not a version"):
        deps.release_tuple("nightly")


def test_plan_nothing_to_do():
    plan = deps.plan_dependencies(ALL_GOOD)
    assert plan.satisfied and not plan.torch and plan.pip == [] and plan.broken == [] and not plan.restart
    assert plan.describe() == ""


def test_plan_fresh_slicer_installs_torch_then_pip_packages():
    installed = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": None, "monai": None, "scipy": None}
    plan = deps.plan_dependencies(installed)
    assert plan.torch
    assert plan.pip == ["monai>=1.4", "scipy>=1.11"]
    assert not plan.broken and not plan.restart and not plan.satisfied
    text = plan.describe()
    assert "torch>=2.6" in text and "PyTorch extension" in text and "monai>=1.4" in text


def test_plan_old_torch_already_imported_needs_restart():
    installed = dict(ALL_GOOD, torch="2.4.1")
    assert deps.plan_dependencies(installed).torch
    assert not deps.plan_dependencies(installed).restart
    plan = deps.plan_dependencies(installed, loaded_modules={"torch", "numpy"})
    assert plan.torch and plan.restart and "Restart Slicer" in plan.describe()
    # a package that was never installed cannot be "already loaded"
    fresh = deps.plan_dependencies(dict(ALL_GOOD, monai=None), loaded_modules={"monai"})
    assert fresh.pip == ["monai>=1.4"] and not fresh.restart


def test_plan_never_pip_installs_bundled_packages():
    plan = deps.plan_dependencies(dict(ALL_GOOD, numpy="1.21.0", SimpleITK=None))
    assert plan.pip == [] and not plan.torch
    assert len(plan.broken) == 2
    assert "numpy is version 1.21.0" in plan.broken[0] and "SimpleITK is missing" in plan.broken[1]
    assert not plan.satisfied


def test_pip_requirements_agree_with_pyproject():
    """The Slicer-side minimums are the pip package's own (pyproject) minimums."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    minimums = dict(re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", spec).groups() for spec in listed)
    for requirement in deps.ALL_REQUIREMENTS:
        assert minimums[requirement.dist] == requirement.minimum, requirement


def test_installed_versions_in_this_environment():
    versions = deps.installed_versions()
    assert set(versions) == {r.dist for r in deps.ALL_REQUIREMENTS}
    import monai
    import torch

    assert deps.release_tuple(versions["torch"]) == deps.release_tuple(torch.__version__)
    assert versions["monai"] == monai.__version__
    assert deps.current_plan().satisfied  # this venv has everything


def test_installed_version_without_metadata_falls_back_to_module():
    """Slicer's own SimpleITK may lack distribution metadata: an importable module still counts."""
    import importlib.metadata

    def no_metadata(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    import SimpleITK

    sitk = deps.Requirement("SimpleITK", "SimpleITK", "2.3")
    assert deps.installed_version(sitk, version_of=no_metadata) == SimpleITK.__version__
    missing = deps.Requirement("no-such-dist", "no_such_module_ensam", "1.0")
    assert deps.installed_version(missing, version_of=no_metadata) is None


def test_dependencies_module_imports_without_torch():
    """It runs before torch exists: importing it must not import torch, MONAI or slicer."""
    code = (
        "import sys; import ENSAMSegmentLib.slicerui.dependencies as d; "
        "bad = {'torch', 'monai', 'slicer', 'qt'} & set(sys.modules); "
        "assert not bad, bad; print(d.TORCH.spec)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch>=2.6"


def test_frontend_modules_import_without_torch():
    """The module imports these at load time, before torch may exist."""
    code = (
        "import sys; import ENSAMSegmentLib.mrml.promptcontroller as c; "
        "bad = {'torch', 'monai', 'qt'} & set(sys.modules); assert not bad, bad; print(len(c.ACTIONS))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6"


# --- sources: parse, lint, names ----------------------------------------------------------------


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"class {name} not found"
    return found[0]


def _ui_widgets() -> dict[str, str]:
    """{widget name: class} of every widget in the module's .ui file."""
    root = ET.parse(UI).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _ui_parameter_widgets() -> dict[str, str]:
    """{SlicerParameterName: widget class} from the .ui's dynamic properties."""
    out = {}
    for widget in ET.parse(UI).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[prop.find("string").text] = widget.get("class")
    return out


def test_frontend_sources_parse_and_pass_ruff():
    for path in FRONTEND_FILES + [ROOT / "ENSAMSegment" / "ENSAMSegmentLib" / "slicerui" / "promptpanel.py"]:
        _tree(path)
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--quiet", *map(str, FRONTEND_FILES)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ui_name_the_module_uses_exists():
    used = set(re.findall(r"\bui\.(\w+)", MODULE.read_text()))
    widgets = _ui_widgets()
    assert used, "the module uses no ui widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"ENSAMSegment.py uses ui names that ENSAMSegment.ui lacks: {missing}"


def test_action_buttons_cover_every_action():
    from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS

    tree = _tree(MODULE)
    dicts = [n for n in ast.walk(tree) if isinstance(n, ast.Dict) and n.keys
             and all(isinstance(k, ast.Constant) for k in n.keys)
             and {k.value for k in n.keys} == set(ACTIONS)]
    assert len(dicts) == 1, "one {action: button} dict for the PromptPanel"
    widgets = _ui_widgets()
    for value in dicts[0].values:
        assert isinstance(value, ast.Attribute) and widgets.get(value.attr) == "QPushButton", ast.dump(value)


def test_parameter_node_fields_match_ui_connectors():
    """Each SlicerParameterName in the .ui is a field of the parameter node, on a widget that Slicer's
    parameterNodeWrapper can connect to that field's type (guiConnectors.py)."""
    fields = {}
    for node in _class(_tree(MODULE), "ENSAMSegmentParameterNode").body:
        if isinstance(node, ast.AnnAssign):
            fields[node.target.id] = ast.unparse(node.annotation)
    connectable = {
        "qMRMLNodeComboBox": lambda t: t.startswith("vtkMRML"),
        "ctkPathLineEdit": lambda t: t == "Path",
        "QComboBox": lambda t: t.startswith("Annotated[str, Choice("),
    }
    parameters = _ui_parameter_widgets()
    assert set(parameters) == {"inputVolume", "segmentation", "modelPath", "device"}
    for name, widget_class in parameters.items():
        assert name in fields, f"{name} is not a parameter node field"
        assert connectable[widget_class](fields[name]), (name, widget_class, fields[name])
    node_types = {w.get("name"): [s.text for s in w.iter("string")] for w in ET.parse(UI).getroot().iter("widget")
                  if w.get("class") == "qMRMLNodeComboBox"}
    assert node_types["inputVolumeSelector"][1] == fields["inputVolume"]
    assert node_types["segmentationSelector"][1] == fields["segmentation"]


def test_shortcuts_clash_with_no_slicer_key():
    """ENSAM's keys against every key Slicer 5.10 binds in its views, markups, Segment Editor and main window,
    read from Slicer's own source lines (Testing/slicer_keys.txt, parsed by Testing/slicer_keys.py)."""
    import slicer_keys

    from ENSAMSegmentLib.mrml.actions import ACTIONS, TOOLS

    bindings = slicer_keys.parse((ROOT / "Testing" / "slicer_keys.txt").read_text())
    # the parse found what the sources say (the keys the issue names, and the Segment Editor's)
    for key, where in [("F", "vtkMRMLSliceIntersectionWidget.cxx:177"), ("B", "vtkMRMLSliceIntersectionWidget.cxx:178"),
                       ("G", "vtkMRMLSliceIntersectionWidget.cxx:168"), ("R", "vtkMRMLCameraWidget.cxx:111"),
                       ("Ctrl+B", "vtkMRMLCameraWidget.cxx:101"), ("Z", "qMRMLSegmentEditorWidget.cxx:2340"),
                       ("I", "qMRMLSegmentEditorWidget.cxx:2375"), ("Shift+7", "qMRMLSegmentEditorWidget.cxx:2321"),
                       ("Esc", "qMRMLSegmentEditorWidget.cxx:2328"), ("Ctrl+O", "qSlicerMainWindow.ui:370"),
                       ("U", "qMRMLPlotView.cxx:1026")]:
        assert any(c.endswith(where) for c in slicer_keys.clashes(key, bindings)), (key, where)
    keys = [key for _, key in ACTIONS.values()]
    assert len(keys) == len({k.upper() for k in keys}) == 6 and set(TOOLS) < set(ACTIONS)
    taken = {key: slicer_keys.clashes(key, bindings) for key in keys}
    assert not any(taken.values()), f"ENSAM's keys take Slicer's: {taken}"


def test_shortcuts_are_installed_only_while_active():
    """The module installs its keys in enter() and removes them in exit(); the effect in activate() /
    deactivate(); both remove them in cleanup() too."""
    def calls(path, method):
        cls = [n for n in _tree(path).body if isinstance(n, ast.ClassDef) and n.name.endswith(("Widget", "Effect"))][0]
        return {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and f".{method}(" in ast.unparse(f)}

    assert calls(MODULE, "install_shortcuts") == {"enter"}
    assert {"exit"} <= calls(MODULE, "remove_shortcuts")
    assert calls(EFFECT, "install_shortcuts") == {"activate"}
    assert {"deactivate"} <= calls(EFFECT, "remove_shortcuts")
    panel = (ROOT / "ENSAMSegment" / "ENSAMSegmentLib" / "slicerui" / "promptpanel.py").read_text()
    assert "self.remove_shortcuts()" in panel.split("def cleanup", 1)[1]


# Methods qSlicerSegmentEditorScriptedEffect calls by name (qSlicerSegmentEditorScriptedEffect.cxx,
# PythonCppAPI.declareMethod) plus AbstractScriptedSegmentEditorEffect's register().
SLICER_EFFECT_METHODS = {
    "icon", "helpText", "clone", "activate", "deactivate", "setupOptionsFrame", "createCursor",
    "processInteractionEvents", "processViewNodeEvents", "setMRMLDefaults", "referenceGeometryChanged",
    "sourceVolumeNodeChanged", "masterVolumeNodeChanged", "layoutChanged", "interactionNodeModified",
    "updateGUIFromMRML", "updateMRMLFromGUI", "cleanup", "register",
}


def test_effect_name_class_and_registration_agree():
    effect, module = _tree(EFFECT), _tree(MODULE)
    # Slicer's loader: module name = the file's folder, class name = file name (+ "Effect").
    class_name = EFFECT.stem if EFFECT.stem.endswith("Effect") else EFFECT.stem + "Effect"
    assert EFFECT.parent.name == "ENSAMSegmentLib"
    cls = _class(effect, class_name)
    assert [ast.unparse(b) for b in cls.bases] == ["AbstractScriptedSegmentEditorEffect"]
    public = {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and not f.name.startswith(("_", "on"))}
    unknown = public - SLICER_EFFECT_METHODS
    assert not unknown, f"effect methods Slicer never calls (typo?): {unknown}"
    assert {"setupOptionsFrame", "activate", "deactivate", "clone", "interactionNodeModified"} <= public

    def constant(tree, name):
        values = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
        assert len(values) == 1, name
        return values[0]

    assert constant(effect, "EFFECT_NAME") == constant(module, "EFFECT_NAME") == "ENSAM"
    init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assert "scriptedEffect.name = EFFECT_NAME" in ast.unparse(init)
    assert "clonedEffect.setPythonSource(__file__" in EFFECT.read_text()

    register = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "registerEditorEffect")
    text = ast.unparse(register)
    # the class must be bound as ENSAMSegmentLib.SegmentEditorEffect before setPythonSource looks it up
    assert text.index(f"ENSAMSegmentLib.{class_name} = {class_name}") < text.index("setPythonSource(")
    assert "instance.self().register()" in text
    assert 'slicer.app.connect("startupCompleted()", registerEditorEffect)' in MODULE.read_text()
    source = ast.unparse(next(n for n in module.body if isinstance(n, ast.Assign)
                              and ast.unparse(n.targets[0]) == "EFFECT_SOURCE").value)
    assert source == "os.path.join(os.path.dirname(__file__), 'ENSAMSegmentLib', 'SegmentEditorEffect.py')"


def test_self_test_runs_the_shared_scenarios_and_is_registered():
    text = MODULE.read_text()
    assert "from ENSAMSegmentLib.mrml.selftest_scenarios import SCENARIOS" in text
    assert "scenario(slicer.mrmlScene)" in text
    cmake = (ROOT / "ENSAMSegment" / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    test_class = _class(_tree(MODULE), "ENSAMSegmentTest")
    methods = {f.name for f in test_class.body if isinstance(f, ast.FunctionDef)}
    assert {"runTest", "test_mrml_scenarios", "test_module_widget"} <= methods


def test_constants_agree_with_the_core():
    from ENSAMSegmentLib.core import devices, modelfile
    from ENSAMSegmentLib.mrml.promptcontroller import DEFAULT_MODEL, DEVICES

    assert DEVICES == devices.DEVICE_NAMES
    assert DEFAULT_MODEL == modelfile.default_model_path()


def test_model_choices(tmp_path):
    from ENSAMSegmentLib.mrml.promptcontroller import model_choices

    default = tmp_path / "default.pt"
    assert model_choices(tmp_path / "missing", default) == [("Default (shipped with the extension)", default)]
    (tmp_path / "b-model.pt").write_bytes(b"")
    (tmp_path / "a-model.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a model")
    labels = [label for label, _ in model_choices(tmp_path, default)]
    assert labels == ["Default (shipped with the extension)", "a-model", "b-model"]


# --- packaging ----------------------------------------------------------------------------------

# slicer-extension-catalog-entry-schema-v1.0.1.json (Slicer/Slicer, Schemas/): required keys,
# additionalProperties false, and the property types.
CATALOG_SCHEMA_101 = {
    "required": {"$schema", "category", "scm_url"},
    "types": {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
              "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int},
}


def test_extensions_index_entry_follows_schema_101_and_cmake():
    entry = json.loads((ROOT / "Resources" / "ExtensionsIndex" / "ENSAM.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert CATALOG_SCHEMA_101["required"] <= set(entry)
    assert set(entry) <= set(CATALOG_SCHEMA_101["types"]), "additionalProperties is false"
    for key, value in entry.items():
        assert type(value) is CATALOG_SCHEMA_101["types"][key], key
    assert 1 <= entry["tier"] <= 5 and entry.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert f'set(EXTENSION_DEPENDS "{" ".join(entry["build_dependencies"])}")' in cmake
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"#]+)', cmake).group(1)
    assert entry["scm_url"].removesuffix(".git") == homepage.rstrip("/")


def test_readme_has_install_in_slicer_section():
    text = (ROOT / "README.md").read_text()
    assert "## Install in 3D Slicer" in text
    section = text.split("## Install in 3D Slicer", 1)[1]
    for words in ("Extensions Manager", "PyTorch", "Developer mode", "Additional module paths"):
        assert words in section, words


# --- Slicer version, self-tests, Sample Data ------------------------------------------------------


@pytest.mark.parametrize("version, runs", [((5, 8), False), ((5, 9), False), ((5, 10), True), ((5, 12), True),
                                           ((6, 0), True), ((4, 13), False)])
def test_slicer_5_10_is_the_minimum(version, runs):
    problem = deps.slicer_version_problem(*version)
    assert (problem == "") is runs
    if not runs:
        assert "5.10 or newer" in problem and f"Slicer {version[0]}.{version[1]}" in problem


def test_the_minimum_is_the_same_everywhere():
    """README, the extension description and the module say 5.10; no 5.8 promise is left."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install in 3D Slicer", 1)[1].split("\n## ", 1)[0]
    assert "3D Slicer 5.10 or newer" in section and "5.8 or newer" not in readme
    assert "Slicer 5.10" in (ROOT / "CMakeLists.txt").read_text()
    assert deps.MINIMUM_SLICER == (5, 10)
    assert "5.10 or newer" in MODULE.read_text()


def test_self_tests_skip_what_they_cannot_run_and_never_install():
    """The self-tests run unattended (slicer_add_python_unittest): no installation dialog, and what needs
    torch or Slicer 5.10 is skipped with the reason."""
    for path, test_class in ((MODULE, "ENSAMSegmentTest"),
                             (ROOT / "ENSAMTraining" / "ENSAMTraining.py", "ENSAMTrainingTest")):
        cls = _class(_tree(path), test_class)
        text = ast.unparse(cls)
        assert "ensure_dependencies" not in text and "confirm" not in text, path
        assert "skipTest(" in text and "run_each(self" in text, path


def test_the_self_test_runner_runs_each_test_and_reports_skips(caplog):
    import unittest

    from ENSAMSegmentLib.slicerui.selftest import run_each

    class Case:  # what run_each uses of a ScriptedLoadableModuleTest
        def __init__(self):
            self.calls, self.shown = [], []

        def setUp(self):
            self.calls.append("setUp")

        def delayDisplay(self, text):
            self.shown.append(text)

        def test_needs_torch(self):
            self.calls.append("needs_torch")
            raise unittest.SkipTest("torch is not installed")

        def test_runs(self):
            self.calls.append("runs")

    case = Case()
    run_each(case, (case.test_needs_torch, case.test_runs))
    assert case.calls == ["setUp", "needs_torch", "setUp", "runs"]  # a skip does not stop the others
    assert case.shown == ["test_needs_torch skipped: torch is not installed"]
    assert "Case.test_needs_torch skipped: torch is not installed" in caplog.text


def test_the_sample_ct_is_offered_to_sample_data():
    from ENSAMSegmentLib.slicerui import sampledata

    source = sampledata.source()
    assert source["category"] == "ENSAM" and source["sampleName"] == source["nodeNames"] == "ENSAM sample CT"
    image = sampledata.IMAGE
    assert source["uris"] == image.resolve().as_uri() and source["uris"].startswith("file://")
    import hashlib

    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert source["checksums"] == f"SHA256:{digest}" and digest[:12] in source["fileNames"]
    assert source["fileNames"].endswith(".nrrd") and source["loadFileTypes"] == "VolumeFile"
    assert Path(source["thumbnailFileName"]).is_file()
    cmake = (ROOT / "ENSAMSegment" / "CMakeLists.txt").read_text()
    for path in (image, Path(source["thumbnailFileName"])):
        assert path.relative_to(ROOT / "ENSAMSegment").as_posix() in cmake
    module = MODULE.read_text()
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in module
    # what registerCustomSampleDataSource takes (SampleData.py, Slicer v5.10.0 lines 510-515)
    assert set(source) <= {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                           "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums"}


def test_no_main_window_is_survived():
    """`--no-main-window` (WITH_GENERIC_TESTS): slicer.util.mainWindow() is None; every use is guarded."""
    for path in (MODULE, EFFECT, ROOT / "ENSAMTraining" / "ENSAMTraining.py",
                 ROOT / "ENSAMSegment" / "ENSAMSegmentLib" / "slicerui" / "promptpanel.py"):
        for line in path.read_text().splitlines():
            if "mainWindow()." in line:
                pytest.fail(f"{path.name}: mainWindow() used without a None check: {line.strip()}")
