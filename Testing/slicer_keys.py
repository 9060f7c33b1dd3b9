"""The keys 3D Slicer binds, read from Slicer's own source lines (Testing/slicer_keys.txt).

slicer_keys.txt quotes, with their line numbers, the lines of Slicer's sources (tag v5.10.0) that bind a
key in the views, the markups, the Segment Editor and the main window. `parse` turns those lines into
keys; Testing/test_slicer_frontend.py checks ENSAM's shortcuts against them. To quote a newer Slicer:

    python Testing/slicer_keys.py /path/to/Slicer v5.12.0 > Testing/slicer_keys.txt

(a git checkout of github.com/Slicer/Slicer; the lines are taken with `git show TAG:FILE`).
"""

from __future__ import annotations

import re
import subprocess
import sys

# file -> what marks a key-binding line in it
SOURCES = {
    "Libs/MRML/DisplayableManager/vtkMRMLSliceIntersectionWidget.cxx": r"SetKeyboardEventTranslation\(",
    "Libs/MRML/DisplayableManager/vtkMRMLCameraWidget.cxx": r"SetKeyboardEventTranslation\(",
    "Libs/MRML/DisplayableManager/vtkMRMLInteractionWidget.cxx": r"SetKeyboardEventTranslation\(",
    "Libs/MRML/DisplayableManager/vtkMRMLWindowLevelWidget.cxx": r"SetKeyboardEventTranslation\(",
    "Modules/Loadable/Markups/VTKWidgets/vtkSlicerMarkupsWidget.cxx": r"SetKeyboardEventTranslation\(",
    "Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx":
        r"new QShortcut\(QKeySequence|^\s*Qt::Key_\w+,",
    "Modules/Loadable/Markups/Widgets/qMRMLMarkupsToolBar.cxx": r"q->add\w+Shortcut\(\"",
    "Modules/Loadable/Sequences/Widgets/qMRMLSequenceBrowserPlayWidget.cxx": r"Shortcut\{ \"",
    "Libs/MRML/Widgets/qMRMLPlotView.cxx": r"event->key\(\) == Qt::Key_",
    "Libs/MRML/Widgets/qMRMLTableView.cxx": r"event->(key\(\) == Qt::Key_|matches\()",
    "Libs/MRML/Widgets/qMRMLTreeView.cxx": r"e->key\(\) == Qt::Key_",
    "Base/QTApp/qSlicerMainWindow.cxx": r"setShortcuts?\(",
    "Base/QTGUI/qSlicerModuleSelectorToolBar.cxx": r"setShortcuts?\(",
    "Base/QTApp/Resources/UI/qSlicerMainWindow.ui": r"<string>(Ctrl|Shift|Alt)\+",
}

# VTK key symbols -> Qt key names (the keys a QKeySequence would name)
VTK_KEYS = {"bracketleft": "[", "bracketright": "]", "braceleft": "{", "braceright": "}", "plus": "+",
            "minus": "-", "Next": "PgDown", "Prior": "PgUp", "Escape": "Esc", "Delete": "Del",
            "BackSpace": "Backspace", "space": "Space"}
QT_KEYS = {"Escape": "Esc", "Slash": "/", "Asterisk": "*", "Comma": ",", "Period": ".", "Greater": ">",
           "Less": "<", "Space": "Space"}
QT_STANDARD = {"Undo": ["Ctrl+Z"], "Redo": ["Ctrl+Y", "Ctrl+Shift+Z"], "Back": ["Alt+Left"],
               "Forward": ["Alt+Right"], "Cut": ["Ctrl+X"], "Copy": ["Ctrl+C"], "Paste": ["Ctrl+V"]}
ANY = None  # modifiers of a binding that fires with any modifiers


def key(text: str) -> tuple[frozenset, str]:
    """'Ctrl+Shift+A' -> ({'Ctrl', 'Shift'}, 'A'); 'd' -> ((), 'D')."""
    parts = text.split("+") if text != "+" else ["+"]
    if parts[-1] == "" and len(parts) > 1:  # 'Ctrl++'
        parts = parts[:-2] + ["+"]
    name = parts[-1]
    return frozenset(parts[:-1]), name.upper() if len(name) == 1 else name


def parse(text: str) -> list[tuple[object, str, str]]:
    """[(modifiers frozenset or ANY, key name, 'file:line'), ...] from slicer_keys.txt's text."""
    found, source = [], ""
    for line in text.splitlines():
        if line.startswith("@ "):
            source = line[2:].strip()
            continue
        match = re.match(r"(\d+): (.*)", line)
        if not match:
            continue
        where, code = f"{source}:{match.group(1)}", match.group(2)
        for modifiers, name in _keys_of(code):
            found.append((modifiers, name, where))
    return found


def _keys_of(code: str):
    vtk = re.search(r'SetKeyboardEventTranslation\(\s*\w+,\s*([\w:+ ]+?),\s*\d+,\s*\d+,\s*"([^"]+)"', code)
    if vtk:
        modifier_text, sym = vtk.groups()
        names = set(re.findall(r"vtkEvent::(\w+)", modifier_text))
        if "AnyModifier" in names:
            modifiers = ANY
        else:
            modifiers = {"ShiftModifier": "Shift", "ControlModifier": "Ctrl", "AltModifier": "Alt"}
            modifiers = frozenset(modifiers[n] for n in names if n in modifiers)
        if len(sym) == 1 and sym.isalpha():
            if sym.isupper() and modifiers is not ANY:
                modifiers = modifiers | {"Shift"}
            yield modifiers, sym.upper()
        else:
            yield modifiers, VTK_KEYS.get(sym, sym)
        return
    if "QString::number(effectIndex % 10)" in code:
        prefix = "Shift+" if '"Shift+"' in code else ""
        for digit in range(10):
            yield key(f"{prefix}{digit}")
        return
    for standard in re.findall(r"QKeySequence::(\w+)", code):
        for text in QT_STANDARD.get(standard, []):
            yield key(text)
    combo = re.search(r"Qt::ControlModifier \+ Qt::Key_(\w+)", code)
    if combo:
        yield key(f"Ctrl+{QT_KEYS.get(combo.group(1), combo.group(1))}")
        return
    for name in re.findall(r"Qt::Key_(\w+)", code):
        if name != "unknown":
            yield key(QT_KEYS.get(name, name))
    for text in re.findall(r'"((?:Ctrl|Shift|Alt)\+[^"]+)"', code) + re.findall(r"<string>([^<]+)</string>", code):
        yield key(text)


def clashes(shortcut: str, bindings) -> list[str]:
    """The bindings (as 'file:line') that the Qt shortcut `shortcut` would take away."""
    modifiers, name = key(shortcut)
    return [where for mods, other, where in bindings if other == name and (mods is ANY or mods == modifiers)]


def quote(checkout: str, tag: str) -> str:
    """slicer_keys.txt for a Slicer git checkout at `tag`."""
    out = [f"# Key bindings of 3D Slicer {tag}, quoted from github.com/Slicer/Slicer (line: source).",
           "# Read by Testing/slicer_keys.py; regenerate with: python Testing/slicer_keys.py SLICER_CHECKOUT TAG"]
    for path, pattern in SOURCES.items():
        text = subprocess.run(["git", "-C", checkout, "show", f"{tag}:{path}"], check=True, capture_output=True,
                              text=True).stdout
        out.append(f"@ {path}")
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            if path.endswith(".ui") and 'name="shortcut"' not in lines[number - 2]:
                continue
            if re.search(pattern, line):
                out.append(f"{number}: {line.strip()}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(quote(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "v5.10.0"))
