"""The page: a tool panel on the left (tools, object actions, save, status), the slice views on the right.

Buttons call `ENSAMWebApp.run_action` through trame triggers; the keyboard shortcuts are the shared
ones of promptcontroller.ACTIONS (the same keys as in Slicer), sent by a small page script to the
trigger ``ensam_key``. Element ids (``ensam-<action>``, ``ensam-status``, ...) name what a user sees,
for tests and for anyone scripting the page.
"""

from __future__ import annotations

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
    """{'b': 'box', 'f': 'foreground', ...} from the shared ACTIONS table."""
    return {key.lower(): action for action, (_label, key) in ACTIONS.items()}


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
        client.Script(KEY_SCRIPT % json.dumps(key_table()))
        with v.VAppBar(density="compact"):
            v.VToolbarTitle(f"ENSAM: {app.volume_name}")
            v.VSpacer()
            html.Span("{{ ensam_model }}", id="ensam-model", classes="text-caption mr-4")
            v.VProgressLinear(indeterminate=True, active=("ensam_busy",), absolute=True, location="bottom",
                              color="green")

        with v.VNavigationDrawer(permanent=True, width=260, location="left"):
            with html.Div(classes="pa-3 d-flex flex-column ga-2"):
                html.Div("Prompts", classes="text-overline")
                for action in ("box", "foreground", "background"):
                    _action_button(app, action, active=f"ensam_tool === '{action}'")
                v.VDivider(classes="my-1")
                html.Div("Object", classes="text-overline")
                for action in ("undo", "reset", "next"):
                    _action_button(app, action)
                v.VDivider(classes="my-1")
                app_button(
                    "Save segmentation", id="ensam-save", prepend_icon="mdi-content-save", variant="tonal",
                    title=SAVE_TIP, disabled=("ensam_segments === 0",),
                    click=f"utils.download('{file_name}', trigger('{save_trigger}'), 'application/octet-stream')",
                )
                html.Div("{{ ensam_saved }}", id="ensam-saved", classes="text-caption text-wrap",
                         style="word-break: break-all;")
                v.VDivider(classes="my-1")
                html.Div("Status", classes="text-overline")
                html.Div("{{ ensam_status }}", id="ensam-status", classes="text-body-2")
                html.Div("{{ ensam_timing }}", id="ensam-timing", classes="text-body-2 text-medium-emphasis")
                html.Div("{{ ensam_segment }}: {{ ensam_voxels }} voxels ({{ ensam_volume_ml }} mL), "
                         "{{ ensam_segments }} segment(s)", id="ensam-segment", v_show="ensam_segment",
                         classes="text-body-2")
                v.VAlert(text=("ensam_note",), id="ensam-note", v_show="ensam_note", type="warning",
                         density="compact", variant="tonal", classes="text-caption")

        with v.VMain(), html.Div(classes="d-flex flex-row fill-height", style="height: calc(100vh - 48px);"):
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
    """trame-slicer's slice-view overlay without its 'show in 3D' button: reset camera + slice slider."""
    from trame.widgets import html
    from trame_slicer.app.logic import connect_slice_view_slider_to_state
    from trame_slicer.app.ui import Slider, create_vertical_view_gutter_ui

    create_vertical_view_gutter_ui(server, view_id, view)
    with html.Div(style="position: absolute; bottom: 0; left: 0; width: 100%; background-color: transparent;"):
        Slider(typed_state=connect_slice_view_slider_to_state(server, view), theme="dark", dense=True)
