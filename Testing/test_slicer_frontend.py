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

import numpy as np
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


def test_shortcuts_unique_and_clear_of_segment_editor_keys():
    from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS, SEGMENT_EDITOR_KEYS, TOOLS

    keys = [key.upper() for _, key in ACTIONS.values()]
    assert len(keys) == len(set(keys)) == 6
    assert set(TOOLS) < set(ACTIONS)
    clash = {key for key in keys if key in {k.upper() for k in SEGMENT_EDITOR_KEYS}}
    assert not clash, f"the effect's keys clash with the Segment Editor's: {clash}"
    assert all(re.fullmatch(r"[A-Z]", key) for key in keys)  # plain letters: no modifier clashes


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


# --- the controller on real MRML scenes (slicer-core) with a real, small, untrained model -----

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
BOX = ((6, 8, 10), (17, 23, 29))  # inclusive (z, y, x)


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory):
    from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
    from ENSAMSegmentLib.core.network import ENSAMConfig

    return create_untrained_model_file(tmp_path_factory.mktemp("model") / "small.pt", seed=0,
                                       config=ENSAMConfig(**SMALL))


@pytest.fixture
def loop(small_model_file, one_thread):
    """(headless scene, volume node, geometry, controller) with the image already encoded."""
    pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    from ENSAMSegmentLib.core.geometry import VolumeGeometry
    from ENSAMSegmentLib.mrml import volumes
    from ENSAMSegmentLib.mrml.scene import new_scene
    from ENSAMSegmentLib.mrml.promptcontroller import PromptController

    headless = new_scene()
    rng = np.random.default_rng(0)
    image = rng.normal(0, 20, (24, 32, 40)).astype(np.float32)
    image[6:18, 8:24, 10:30] += 200
    geometry = VolumeGeometry.from_lps((2.0, 1.2, 1.0), (5.0, -3.0, 7.0), np.diag([1.0, -1.0, 1.0]), image.shape)
    volume = volumes.add_volume(headless.scene, image, geometry, "phantom")
    events = {"wake": 0, "change": 0, "before": 0}

    def count(name):
        def bump():
            events[name] += 1
        return bump

    controller = PromptController(headless.scene, headless.app_logic, wake=count("wake"),
                                  on_change=count("change"), before_change=count("before"))
    controller.set_model(small_model_file, "cpu")
    controller.set_volume(volume)
    assert controller.encoding and controller.busy and "Encoding" in controller.status
    controller.wait()
    assert not controller.busy and controller.status.startswith("Ready")
    assert "encoded in" in controller.timing
    yield headless, volume, geometry, controller, events
    controller.cleanup()
    headless.clear()


def _place_box(controller, geometry, box=BOX):
    from ENSAMSegmentLib.mrml import prompts
    from ENSAMSegmentLib.mrml.promptcontroller import roi_for_box

    roi = controller.prompt_nodes()[2]
    prompts.set_roi(roi, *roi_for_box(geometry, *box))
    return roi


def _click(node, geometry, kji):
    return node.AddControlPointWorld(*geometry.kji_to_ras(kji).tolist())


def test_roi_for_box_gives_back_the_box_on_every_grid():
    """The ROI drawn after undo covers exactly the object's box, for every grid the MRML layer tests."""
    pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    from ENSAMSegmentLib.mrml import prompts
    from ENSAMSegmentLib.mrml.scene import new_scene
    from ENSAMSegmentLib.mrml.selftest_scenarios import SHAPE, geometries
    from ENSAMSegmentLib.mrml.promptcontroller import roi_for_box

    headless = new_scene()
    roi = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    for name, geometry in geometries().items():
        for lo, hi in (((0, 0, 0), np.subtract(SHAPE, 1)), ((1, 2, 3), (3, 3, 5)), ((2, 2, 2), (2, 2, 2))):
            prompts.set_roi(roi, *roi_for_box(geometry, lo, hi))
            got = prompts.box_from_roi(roi, geometry)
            assert [g.tolist() for g in got] == [list(lo), list(np.asarray(hi).tolist())], name
    headless.clear()


def test_box_click_undo_reset_next(loop):
    import slicer

    from ENSAMSegmentLib.mrml import prompts

    headless, volume, geometry, controller, events = loop
    session = controller.session

    # box: placing it makes the segmentation, the segment and the object
    _place_box(controller, geometry)
    assert controller.busy and events["wake"] > 0
    controller.wait()
    assert controller.timing.startswith("Box:") and "ms" in controller.timing
    segmentation, segment_id = controller.segmentation_node, controller.segment_id
    assert segmentation is not None and segmentation.GetSegmentation().GetSegment(segment_id) is not None
    object_id = controller.object_for_segment(segment_id)
    assert session.object_prompts(object_id).box == BOX
    after_box = controller.writer.read(segment_id)
    assert after_box.any()
    np.testing.assert_array_equal(after_box, session.object_mask(object_id))
    assert events["before"] == 1  # saveStateForUndo before the one write

    # a foreground click: locked, sent once, written
    foreground, background, roi = controller.prompt_nodes()
    n = _click(foreground, geometry, (12, 16, 20))
    controller.wait()
    assert foreground.GetNthControlPointLocked(n)
    assert session.object_prompts(object_id).fg == ((12, 16, 20),)
    np.testing.assert_array_equal(controller.writer.read(segment_id), session.object_mask(object_id))
    controller._on_prompt_event()  # a repeated event sends nothing new
    controller.wait()
    assert session.object_prompts(object_id).fg == ((12, 16, 20),)

    # a background click outside the volume is refused, not sent
    background.AddControlPointWorld(*geometry.kji_to_ras((12, 16, 80)).tolist())
    controller.wait()
    assert "outside the volume" in controller.status
    assert session.object_prompts(object_id).bg == ()

    # undo: the segment after the box, exactly; the markups show the remaining prompts
    writes_before_undo = events["before"]
    controller.undo()
    controller.wait()
    np.testing.assert_array_equal(controller.writer.read(segment_id), after_box)
    assert foreground.GetNumberOfControlPoints() == 0
    assert events["before"] == writes_before_undo + 1
    assert [b.tolist() for b in prompts.box_from_roi(roi, geometry)] == [list(BOX[0]), list(BOX[1])]

    # reset: empty segment, no markups; itself undoable
    controller.reset_object()
    controller.wait()
    assert not controller.writer.read(segment_id).any() and roi.GetNumberOfControlPoints() == 0
    controller.undo()
    controller.wait()
    np.testing.assert_array_equal(controller.writer.read(segment_id), after_box)
    assert roi.GetNumberOfControlPoints() > 0

    # next object: a new empty segment; the first segment keeps its voxels
    new_id = controller.next_object()
    assert new_id != segment_id and controller.segment_id == new_id
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert roi.GetNumberOfControlPoints() == 0 and foreground.GetNumberOfControlPoints() == 0
    _place_box(controller, geometry, ((2, 2, 2), (8, 10, 12)))
    controller.wait()
    assert controller.object_for_segment(new_id) not in (None, object_id)
    assert controller.writer.read(new_id).any()
    np.testing.assert_array_equal(controller.writer.read(segment_id), after_box)
    assert isinstance(segmentation, slicer.vtkMRMLSegmentationNode)


def test_place_mode_and_box_completion(loop):
    headless, volume, geometry, controller, events = loop
    interaction = headless.app_logic.GetInteractionNode()
    controller.start_tool("foreground")
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert interaction.GetPlaceModePersistence() == 1
    assert controller.active_tool() == "foreground"
    controller.start_tool("box")
    assert controller.active_tool() == "box" and interaction.GetPlaceModePersistence() == 0
    selection = headless.app_logic.GetSelectionNode()
    assert selection.GetActivePlaceNodeID() == controller.roi_node.GetID()
    # an ROI that changes while Slicer still places it is not sent ...
    _place_box(controller, geometry)
    controller.wait()
    assert controller.session.object_ids == ()
    # ... until placement ends
    controller.stop_tool()
    assert controller.active_tool() is None and interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    controller.wait()
    assert controller.session.object_prompts(controller.object_for_segment(controller.segment_id)).box == BOX
    with pytest.raises(ValueError, match="unknown tool"):
        controller.start_tool("lasso")


def test_masking_settings_of_the_editor_node_are_followed(loop, small_model_file):
    """Without an editor node another segment keeps its voxels; with 'overwrite all' it loses them."""
    headless, volume, geometry, controller, events = loop
    from ENSAMSegmentLib.mrml.segments import OVERWRITE_MODES

    segmentation = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    other = segmentation.GetSegmentation().AddEmptySegment("", "other")
    controller.set_target(segmentation, None)
    _place_box(controller, geometry)
    controller.wait()
    ensam_mask = controller.writer.read(controller.segment_id)
    assert ensam_mask.any()
    controller.writer.write(other, ensam_mask)  # 'other' now covers the ENSAM object
    controller.reset_object()
    controller.wait()
    controller.undo()  # restored through the writer's record: 'other' untouched either way
    controller.wait()
    assert controller.writer.read(other).sum() == ensam_mask.sum()

    editor = headless.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetOverwriteMode(OVERWRITE_MODES["all"])
    controller.cleanup()
    from ENSAMSegmentLib.mrml.promptcontroller import PromptController

    overwriting = PromptController(headless.scene, headless.app_logic, editor_node=editor)
    overwriting.set_model(small_model_file, "cpu")
    overwriting.set_volume(volume)
    overwriting.wait()
    overwriting.set_target(segmentation, None)
    _place_box(overwriting, geometry)
    overwriting.wait()
    new_mask = overwriting.writer.read(overwriting.segment_id)
    assert new_mask.any()
    assert not (overwriting.writer.read(other) & new_mask).any(), "overwrite 'all' erases the overlap"
    overwriting.cleanup()


def test_bad_model_and_device_are_reported_not_raised(loop, tmp_path):
    headless, volume, geometry, controller, events = loop
    with pytest.raises(ValueError, match="unknown device"):
        controller.set_model(None, "tpu")
    for empty in (None, "", Path(), Path("")):  # an empty path field: the default model
        controller.set_model(empty, "cpu")
        assert controller.model_path is None
    controller.set_model(tmp_path / "missing.pt", "cpu")
    assert controller.session is None and "Cannot start ENSAM" in controller.status
    assert "missing.pt" in controller.status
    _place_box(controller, geometry)
    assert controller.poll() is False  # nothing to send to: no crash, no job


def test_moving_the_box_starts_the_object_over_and_undo_brings_clicks_back(loop):
    from ENSAMSegmentLib.mrml import prompts

    headless, volume, geometry, controller, events = loop
    roi = _place_box(controller, geometry)
    controller.wait()
    foreground = controller.prompt_nodes()[0]
    _click(foreground, geometry, (12, 16, 20))
    controller.wait()
    object_id = controller.object_for_segment(controller.segment_id)
    assert controller.session.object_prompts(object_id).fg == ((12, 16, 20),)

    moved = ((5, 7, 9), (18, 24, 30))
    _place_box(controller, geometry, moved)  # what dragging a handle ends with
    roi.InvokeEvent(roi.PointEndInteractionEvent)
    controller.wait()
    assert controller.session.object_prompts(object_id) == type(controller.session.object_prompts(object_id))(
        box=moved)
    assert foreground.GetNumberOfControlPoints() == 0, "the session dropped the click: so does the view"

    controller.undo()
    controller.wait()
    assert controller.session.object_prompts(object_id).fg == ((12, 16, 20),)
    assert foreground.GetNumberOfControlPoints() == 1
    ras = [0.0, 0.0, 0.0]
    foreground.GetNthControlPointPositionWorld(0, ras)
    assert geometry.ras_to_kji_index(ras).tolist() == [12, 16, 20]
    assert [b.tolist() for b in prompts.box_from_roi(roi, geometry)] == [list(BOX[0]), list(BOX[1])]
    controller.wait()  # the redraw sends nothing
    assert controller.session.object_prompts(object_id).fg == ((12, 16, 20),)


def test_a_box_placed_while_encoding_waits_for_the_encoder(loop):
    from ENSAMSegmentLib.mrml import volumes

    headless, volume, geometry, controller, events = loop
    image = np.random.default_rng(5).normal(0, 20, geometry.shape).astype(np.float32)
    other = volumes.add_volume(headless.scene, image, geometry, "second")
    controller.set_volume(other)
    assert controller.encoding
    _place_box(controller, geometry)
    controller.wait()
    assert controller.volume_node is other and not controller.encoding
    object_id = controller.object_for_segment(controller.segment_id)
    assert controller.session.object_prompts(object_id).box == BOX
    assert controller.writer.read(controller.segment_id).any()
    controller.set_volume(other)  # the same, unmodified volume: nothing to do
    assert not controller.busy
