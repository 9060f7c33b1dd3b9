"""The page: a panel (the untrained-model note, tools, object actions, save, status) and the slice views.

Wide windows (1000 px and more) show the panel on the left of the views; narrower ones (a laptop
at 800 x 600, a tablet, a phone) show it above them, the buttons in wrapping rows, and a portrait
window stacks the views. Each view shows its name and colour, its slice position and orientation
letters at its edges, as Slicer shows them (`view_annotations`).

Buttons call `ENSAMWebApp.run_action` through trame triggers; the keyboard shortcuts are the shared
ones of promptcontroller.ACTIONS (the same keys as in Slicer), sent by a small page script to the
trigger ``ensam_key``. Element ids (``ensam-<action>``, ``ensam-status``, ...) name what a user sees,
for tests and for anyone scripting the page.
"""

from __future__ import annotations

import re

from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS

TOOL_TIPS = {
    "box": "Box: click two opposite corners in a slice view",
    "foreground": "Foreground click: click inside the structure",
    "background": "Background click: click outside the structure",
    "undo": "Undo the last step of this object",
    "reset": "Clear this object's prompts and segment",
    "next": "Keep this segment; the next prompts start a new one",
}
SAVE_TIP = "Download the segmentation as a Slicer .seg.nrrd file"

# Keys (lower case) -> action; sent only when no modifier is held and no text field has the focus.
KEY_SCRIPT = """
document.addEventListener('keydown', (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const tag = (event.target && event.target.tagName) || '';
  if (tag === 'INPUT' || tag === 'TEXTAREA') return;
  const keys = %s;
  const action = keys[event.key.toLowerCase()];
  if (action && window.trame) { window.trame.trigger('ensam_key', [action]); event.preventDefault(); }
});
"""


def key_table() -> dict[str, str]:
    """{key: action} from the shared ACTIONS table, keys in lower case (what the page script compares)."""
    return {key.lower(): action for action, (_label, key) in ACTIONS.items()}


# Narrow windows: the panel above the views, buttons in rows; portrait windows: the views stacked.
PAGE_CSS = """
.ensam-page { display: flex; flex-direction: row; height: calc(100vh - 48px); }
.ensam-panel { width: 260px; flex: none; overflow-y: auto; }
.ensam-views { flex: 1; display: flex; min-width: 0; min-height: 0; }
.ensam-model { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; min-width: 0; }
@media (max-width: 999px) {
  .ensam-page { flex-direction: column; }
  .ensam-panel { width: 100%; overflow-y: visible; }
  .ensam-heading, .ensam-divider { display: none !important; }
  .ensam-tools { flex-direction: row !important; flex-wrap: wrap; }
  .ensam-tools .v-btn { width: auto; flex: 1 1 auto; min-width: 0; }
}
@media (max-aspect-ratio: 1/1) {
  .ensam-views > .layout-grid-container > .layout-grid-container { flex-direction: column !important; }
  .ensam-views > .layout-grid-container > .layout-grid-container > div > .layout-grid-container {
    flex-direction: row !important; }
}
.ensam-view-bar { position: absolute; top: 0; left: 0; right: 0; height: 20px; padding: 0 6px; z-index: 1;
  font: 12px/20px sans-serif; color: #111; display: flex; gap: 10px; pointer-events: none; }
.view-gutter { top: 20px !important; }
.ensam-letter { position: absolute; color: #ffd54f; font: bold 13px sans-serif; pointer-events: none;
  text-shadow: 0 0 3px #000; }
"""


def build_page(app):
    """The VAppLayout of ``app`` (an ENSAMWebApp); views come from its layout manager."""
    import json

    from trame.ui.vuetify3 import VAppLayout
    from trame.widgets import client, html
    from trame.widgets import vuetify3 as v

    server = app.server
    server.trigger("ensam_key")(app.run_action)
    save_trigger = server.trigger_name(app.save)
    file_name = f"{app.volume_name}-ensam.seg.nrrd"

    with VAppLayout(server, full_height=True, theme="dark") as page:
        client.Style(PAGE_CSS)
        client.Script(KEY_SCRIPT % json.dumps(key_table()))
        with v.VAppBar(density="compact"):
            v.VToolbarTitle(f"ENSAM: {app.volume_name}", classes="flex-0-1")
            html.Span("{{ ensam_model }}", id="ensam-model", classes="ensam-model text-caption mx-4")
            v.VProgressLinear(indeterminate=True, active=("ensam_busy",), absolute=True, location="bottom",
                              color="green")

        with v.VMain(), html.Div(classes="ensam-page"):
            with html.Div(classes="ensam-panel pa-2 d-flex flex-column ga-2"):
                v.VAlert(text=("ensam_note",), id="ensam-note", v_show="ensam_note", type="warning",
                         density="compact", variant="tonal", classes="text-caption flex-0-0")
                with html.Div(classes="ensam-tools d-flex flex-column ga-2"):
                    html.Div("Prompts", classes="ensam-heading text-overline")
                    for action in ("box", "foreground", "background"):
                        _action_button(app, action, active=f"ensam_tool === '{action}'")
                    v.VDivider(classes="ensam-divider my-1")
                    html.Div("Object", classes="ensam-heading text-overline")
                    for action in ("undo", "reset", "next"):
                        _action_button(app, action)
                    v.VDivider(classes="ensam-divider my-1")
                    app_button(
                        "Save segmentation", id="ensam-save", prepend_icon="mdi-content-save", variant="tonal",
                        title=SAVE_TIP, disabled=("ensam_segments === 0",),
                        click=f"utils.download('{file_name}', trigger('{save_trigger}'), 'application/octet-stream')",
                    )
                html.Div("{{ ensam_saved }}", id="ensam-saved", v_show="ensam_saved",
                         classes="text-caption text-wrap", style="word-break: break-all;")
                v.VDivider(classes="ensam-divider my-1")
                html.Div("Status", classes="ensam-heading text-overline")
                with html.Div(id="ensam-status-block"):
                    html.Div("{{ ensam_status }}", id="ensam-status", classes="text-body-2")
                    html.Div("{{ ensam_timing }}", id="ensam-timing", classes="text-body-2 text-medium-emphasis")
                    html.Div("{{ ensam_segment }}: {{ ensam_voxels }} voxels ({{ ensam_volume_ml }} mL), "
                             "{{ ensam_segments }} segment(s)", id="ensam-segment", v_show="ensam_segment",
                             classes="text-body-2")
            with html.Div(classes="ensam-views"):
                app.layout_manager.initialize_layout_grid(page)
    return page


def _action_button(app, action: str, active: str | None = None):
    label, key = ACTIONS[action]
    return app_button(
        f"{label} [{key}]", id=f"ensam-{action}", title=f"{TOOL_TIPS[action]} ({key})",
        click=(app.run_action, f"['{action}']"),
        variant=(f"{active} ? 'flat' : 'tonal'",) if active else "tonal",
        color=(f"{active} ? 'primary' : undefined",) if active else None,
    )


def app_button(text: str, **kwargs):
    from trame.widgets import vuetify3 as v

    return v.VBtn(text, block=True, classes="text-none justify-start", **kwargs)


def slice_view_gutter(server, view_id: str, view) -> None:
    """Slicer's view annotations (name bar in the view's colour, slice position, orientation letters) and
    trame-slicer's overlay without its 'show in 3D' button: reset camera + slice slider."""
    from trame.widgets import html
    from trame_slicer.app.logic import connect_slice_view_slider_to_state
    from trame_slicer.app.ui import Slider, create_vertical_view_gutter_ui

    key = view_state_key(view_id)

    def update(_view=None) -> None:
        server.state[key] = view_annotations(view.get_view_node(), view.get_slice_value())

    update()
    view.modified.connect(update)
    with html.Div(classes="ensam-view-bar", style=(f"{{ backgroundColor: {key}.color }}",)):
        html.Span(f"{{{{ {key}.name }}}}", classes="font-weight-bold")
        html.Span(f"{{{{ {key}.position }}}}", classes="ensam-view-position")
    for edge, style in (("top", "top: 24px; left: 50%; transform: translateX(-50%)"),
                        ("right", "right: 6px; top: 50%; transform: translateY(-50%)"),
                        ("bottom", "bottom: 34px; left: 50%; transform: translateX(-50%)"),
                        ("left", "left: 6px; top: 50%; transform: translateY(-50%)")):
        html.Div(f"{{{{ {key}.letters.{edge} }}}}", classes=f"ensam-letter ensam-letter-{edge}", style=style)
    create_vertical_view_gutter_ui(server, view_id, view)
    with html.Div(style="position: absolute; bottom: 0; left: 0; width: 100%; background-color: transparent;"):
        Slider(typed_state=connect_slice_view_slider_to_state(server, view), theme="dark", dense=True)


def view_state_key(view_id: str) -> str:
    """The page state holding a view's annotations: 'ensam_view_Red' for the red (axial) view."""
    return "ensam_view_" + re.sub(r"\W", "_", view_id)


def view_annotations(slice_node, offset: float) -> dict:
    """What Slicer shows on a slice view: its orientation ('Axial'; a view Slicer turned to an oblique
    volume's axes, its 'Reformat', is named after the RAS axis nearest to its normal: 'Axial (oblique)'),
    its colour, the slice position along that axis ('S: 12.5 mm'), and the anatomical direction
    (R/L, A/P, S/I) at each edge."""
    matrix = slice_node.GetSliceToRAS()
    column = [[matrix.GetElement(row, col) for row in range(3)] for col in range(3)]  # screen x, screen y, normal
    right, up, normal = column
    axis = max(range(3), key=lambda i: abs(normal[i]))
    position = offset if normal[axis] > 0 else -offset
    color = "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in slice_node.GetLayoutColor()))
    name = slice_node.GetOrientation()
    if name not in ("Axial", "Coronal", "Sagittal"):  # Slicer's 'Reformat': turned to an oblique volume's axes
        name = ("Sagittal", "Coronal", "Axial")[axis] + " (oblique)"
    return {"name": name, "color": color, "position": f"{'RAS'[axis]}: {position:.1f} mm",
            "letters": {"right": _letter(right), "left": _letter([-c for c in right]),
                        "top": _letter(up), "bottom": _letter([-c for c in up])}}


def _letter(direction) -> str:
    """'R', 'L', 'A', 'P', 'S' or 'I': the anatomical direction nearest to an RAS vector."""
    axis = max(range(3), key=lambda i: abs(direction[i]))
    return ("RAS" if direction[axis] > 0 else "LPI")[axis]
