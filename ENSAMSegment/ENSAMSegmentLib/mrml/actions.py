"""Tables every ENSAM front-end shares: tools, actions and their keys, devices, models, prompt node names.

Keys. A window-wide QShortcut wins over a view's own key handling (Slicer's views do not claim key
presses first), so ENSAM's keys must be none of the keys Slicer's views, the Segment Editor and the main
window already use, and they are installed only while the module or the effect is active (ENSAMSegment.py
enter/exit, SegmentEditorEffect.py activate/deactivate). Slicer 5.10 uses, among others (full list with
the source lines: Testing/slicer_keys.txt, checked by Testing/test_slicer_frontend.py):

* slice views (vtkMRMLSliceIntersectionWidget.cxx): f b and the arrows (slice), g t (opacities), v V,
  r (field of view), [ ] { } (volumes);
* 3-D views (vtkMRMLCameraWidget.cxx): r, arrows, + -, keypad, Home End Insert PageDown, Ctrl+b;
* markups (vtkSlicerMarkupsWidget.cxx): s, Delete, BackSpace; Escape while placing;
* Segment Editor (qMRMLSegmentEditorWidget.cxx): 0-9, Shift+0-9, Escape, Space, z y, q w / * , . < >, i;
* plot views (qMRMLPlotView.cxx): s r u; table views: arrows, Ctrl+C/V; tree views: !;
* main window: Ctrl+letters and digits.

Free, within reach of the left hand, and mnemonic where possible: D draw box, A add (+) click, E exclude
(-) click, X undo (strike out the last prompt), C clear (reset) object, N next object. The web app uses
the same keys.
"""

from __future__ import annotations

from pathlib import Path

from ENSAMSegmentLib.core.registry import default_model_path, user_models_dir

TOOLS = ("box", "foreground", "background")
# action -> (button label, keyboard shortcut as a QKeySequence string). The module, the effect and the web app.
ACTIONS = {
    "box": ("Box", "D"),
    "foreground": ("+ Click", "A"),
    "background": ("- Click", "E"),
    "undo": ("Undo", "X"),
    "reset": ("Reset object", "C"),
    "next": ("Next object", "N"),
}
DEVICES = ("auto", "cpu", "cuda", "mps")  # = ENSAMSegmentLib.core.devices.DEVICE_NAMES (without torch)
# ~/.ensam/models (or $ENSAM_USER_MODELS_DIR): ENSAM Training and `ensam models import` put models there
USER_MODELS_DIR = user_models_dir()
DEFAULT_MODEL = default_model_path()  # the shipped registry's default (Resources/Models/models.json)

# The prompt nodes' name prefix per front-end: the module and the effect each place their own box and
# clicks ("ENSAM box", "ENSAM editor box", ...), so neither ever sends the other's prompts.
PROMPT_NAMES = {"module": "ENSAM", "effect": "ENSAM editor", "web": "ENSAM"}


def model_choices(user_dir: Path = USER_MODELS_DIR, default: Path = DEFAULT_MODEL) -> list[tuple[str, Path]]:
    """(label, path) of the selectable models: the shipped default first, then user_dir/*.pt by name."""
    choices = [("Default (shipped with the extension)", default)]
    if user_dir.is_dir():
        choices += [(path.stem, path) for path in sorted(user_dir.glob("*.pt"))]
    return choices


def format_seconds(seconds: float) -> str:
    """'85 ms' below 10 s is how prompts are reported; '12.3 s' above."""
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"
