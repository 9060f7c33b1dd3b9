"""What can be checked here of the ENSAMTraining Slicer module (the Slicer app cannot run here): the
source parses and uses only widget names its .ui defines; the parameter node's fields match the .ui's
SlicerParameterName widgets through connectors Slicer's parameterNodeWrapper has; the self-test runs
the shared scenarios; nothing the module loads at start-up imports torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "ENSAMTraining" / "ENSAMTraining.py"
UI = ROOT / "ENSAMTraining" / "Resources" / "UI" / "ENSAMTraining.ui"


def widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}


def parameter_widgets() -> dict[str, str]:
    out = {}
    for widget in ET.parse(UI).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[prop.find("string").text] = widget.get("class")
    return out


def class_body(name: str) -> list[ast.stmt]:
    tree = ast.parse(MODULE.read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name).body


def test_every_ui_name_the_module_uses_exists():
    used = set(re.findall(r"\bui\.(\w+)", MODULE.read_text()))
    assert {"startButton", "stopButton", "resumeButton", "progressBar", "metricsTableView"} <= used
    missing = sorted(used - set(widgets()))
    assert not missing, f"ENSAMTraining.py uses names that ENSAMTraining.ui lacks: {missing}"


def test_parameter_node_fields_match_ui_connectors():
    """Slicer's guiConnectors.py matches exact widget classes to field types."""
    fields = {n.target.id: ast.unparse(n.annotation) for n in class_body("ENSAMTrainingParameterNode")
              if isinstance(n, ast.AnnAssign)}
    connectable = {
        "ctkPathLineEdit": lambda t: t == "Path",
        "QDoubleSpinBox": lambda t: t.startswith("Annotated[float"),
        "QSpinBox": lambda t: t.startswith("Annotated[int, WithinRange("),  # unbounded spin boxes misbehave
        "QLineEdit": lambda t: t == "str",
        "QCheckBox": lambda t: t == "bool",
        "QComboBox": lambda t: t.startswith("Annotated[str, Choice("),
    }
    parameters = parameter_widgets()
    assert set(parameters) == set(fields), (set(parameters) ^ set(fields))
    for name, widget_class in parameters.items():
        assert connectable[widget_class](fields[name]), (name, widget_class, fields[name])


def test_devices_agree_with_ensamsegment():
    from ENSAMSegmentLib.mrml.promptcontroller import DEVICES

    tree = ast.parse(MODULE.read_text())
    value = next(n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "DEVICES")
    assert ast.literal_eval(value) == DEVICES


def test_self_test_runs_the_shared_scenarios_and_is_registered():
    text = MODULE.read_text()
    assert "from ENSAMTrainingLib.mrml.scenarios import SCENARIOS" in text
    assert "scenario(slicer.mrmlScene, Path(work))" in text
    methods = {f.name for f in class_body("ENSAMTrainingTest") if isinstance(f, ast.FunctionDef)}
    assert {"runTest", "test_logic_scenarios", "test_module_widget"} <= methods
    cmake = (ROOT / "ENSAMTraining" / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake


def test_closing_slicer_stops_the_run_only_after_every_confirmation_and_nothing_waits():
    """The close guard only asks (Slicer's own confirmation comes after it and may still cancel the close);
    the run is asked to stop at aboutToQuit and in cleanup(); nothing waits for it on the GUI thread."""
    text = MODULE.read_text()
    assert "installEventFilter(self.closeGuard)" in text and 'slicer.app.connect("aboutToQuit()", self.onAboutToQuit)' in text
    assert "qt.QEvent.Close" in text and "event.ignore()" in text
    widget = {f.name: ast.unparse(f) for f in class_body("ENSAMTrainingWidget") if isinstance(f, ast.FunctionDef)}
    assert set(re.findall(r"controller\.(\w+)", widget["confirmClose"])) == {"busy"}  # it asks, it does nothing
    for name in ("onAboutToQuit", "cleanup"):
        assert "request_stop()" in widget[name], name
    assert "removeEventFilter" in widget["cleanup"]
    assert "stop_and_wait" not in text and "STOP_TIMEOUT" not in text and ".wait(" not in text


def test_parameter_annotations_are_all_used():
    """Decimals / SingleStep on a field the .ui's spin box already sets made Slicer log 'Unused annotations'."""
    fields = "\n".join(ast.unparse(n) for n in class_body("ENSAMTrainingParameterNode") if isinstance(n, ast.AnnAssign))
    assert "Decimals" not in fields and "SingleStep" not in fields
    assert "Decimals" not in MODULE.read_text() and "SingleStep" not in MODULE.read_text()


def test_module_logic_imports_without_torch():
    """The module imports these when it loads, before torch may be installed."""
    code = ("import sys; import ENSAMTrainingLib.mrml.controller, ENSAMTrainingLib.runs.command; "
            "bad = {'torch', 'monai', 'qt'} & set(sys.modules); assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
