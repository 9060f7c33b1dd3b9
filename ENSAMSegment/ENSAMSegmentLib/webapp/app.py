"""The browser app: trame-slicer's scene and views, the image, the shared PromptController, the page state.

    browser (trame page)                      server (this file)
    tool buttons ---- trame triggers ------>  PromptController.start_tool / undo / reset_object / ...
    clicks in a view -- RCA mouse events -->  Slicer's markups widgets place the ROI / points
                                              -> controller observers -> InferenceSession worker
    status line  <--- trame state ---------   `sync_state` (the controller's status and timing)
    slice images <--- RCA JPEG frames -----   Slicer's displayable managers (segments, markups)

Everything about prompts, objects and undo lives in ENSAMSegmentLib/mrml/promptcontroller.py; this file
only wires it to the page: the controller's `wake` starts an asyncio task that calls `poll()` on the
server's event loop while the controller is busy, the way the Slicer module uses a Qt timer.
Views are created before any data is added (trame-slicer needs its view pipelines first). The model is
loaded and the image encoded once the server runs, so the page shows that as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from pathlib import Path

from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS, TOOLS

POLL_SECONDS = 0.03  # while busy: how often finished requests are picked up
LAYOUT_ID = "ENSAM"
UNTRAINED_NOTE = "Note: this model is untrained (random weights); its segmentations are not meaningful."

# Page state (trame) and its start values. The page shows these; tests read them.
STATE_DEFAULTS = {
    "ensam_status": "Starting...",
    "ensam_timing": "",
    "ensam_model": "",
    "ensam_note": "",
    "ensam_tool": None,  # box | foreground | background | None
    "ensam_busy": False,
    "ensam_ready": False,  # the image is encoded
    "ensam_segment": "",  # the target segment's name
    "ensam_voxels": 0,  # voxels in the target segment
    "ensam_volume_ml": 0.0,
    "ensam_segments": 0,  # segments in the segmentation
    "ensam_saved": "",  # where the last save went
}


def image_name(path: Path) -> str:
    """'ct' for ct.nii.gz / ct.nrrd / ct.seg.nrrd: the file name without its (double) suffix."""
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


SUMMARY_CHARS = 60  # of the training data shown in the page header


def model_summary(model_path) -> tuple[str, str]:
    """(what the page says about the model, the untrained note or ''). Raises ModelFileError."""
    from ENSAMSegmentLib.core.modelfile import default_model_path, read_model_info

    info = read_model_info(model_path or default_model_path())
    data = info.training_data
    if len(data) > SUMMARY_CHARS:  # the header has one line; `ensam info` prints all of it
        data = data[:SUMMARY_CHARS].rsplit(" ", 1)[0]
        if data.count("(") > data.count(")"):  # no parenthesis left open
            data = data[: data.rindex("(")]
        data = data.rstrip(",;( ") + " ..."
    label = f"Model: {Path(info.path).name}" + (f" (trained on {data})" if not info.untrained else "")
    return label, (UNTRAINED_NOTE if info.untrained else "")


def ensam_layout():
    """Axial view on the left, coronal and sagittal on the right. No 3D view: on a CPU-only server
    (llvmpipe) each slice view already costs 40-500 ms to render, and a 3D view would need a surface
    of every segment rebuilt after each prompt."""
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    side = Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()])
    return Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.axial_view(), side], flex_sizes=["2", "1"])


def build_views(server):
    """(trame-slicer SlicerApp, LayoutManager) with the ENSAM layout's slice views streamed to ``server``."""
    from trame_slicer import module as trame_slicer_module
    from trame_slicer.core import LayoutManager, SlicerApp
    from trame_slicer.rca_view import register_rca_factories

    from .layout import slice_view_gutter

    server.enable_module(trame_slicer_module)
    slicer_app = SlicerApp()
    register_rca_factories(slicer_app.view_manager, server, slice_view_ui_f=slice_view_gutter, rca_encoder="jpeg")
    layout_manager = LayoutManager(slicer_app.scene, slicer_app.view_manager, server)
    layout_manager.register_layout(LAYOUT_ID, ensam_layout())
    layout_manager.set_layout(LAYOUT_ID)
    return slicer_app, layout_manager


@contextlib.contextmanager
def vtk_warnings_off():
    """No VTK warnings while the views are made: trame-slicer's slice views observe the interactor's
    WindowResizeEvent, which VTK 9.6 warns about once per view; nothing a user can act on."""
    from vtkmodules.vtkCommonCore import vtkObject

    shown = vtkObject.GetGlobalWarningDisplay()
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtkObject.SetGlobalWarningDisplay(shown)


def style_prompt_nodes(controller) -> None:
    """No name labels on the prompts (they overlap on small views); a light box fill shows the segment."""
    for node in controller.prompt_nodes():
        display = node.GetDisplayNode()
        display.SetPointLabelsVisibility(False)
        display.SetPropertiesLabelVisibility(False)
        if display.IsA("vtkMRMLMarkupsROIDisplayNode"):
            display.SetFillOpacity(0.1)


class ENSAMWebApp:
    """One browser session of ENSAM on one image (every connected page sees the same scene).

    image_path: the volume to segment. model_path: an ENSAM model file (None: the default model).
    device: auto | cpu | cuda | mps. out_dir: where "Save segmentation" also writes its .seg.nrrd
    (None: download only). server: a trame server or its name (None: trame's default server).
    A bad image or model file raises (ImageReadError, ModelFileError) before anything starts.
    """

    def __init__(self, image_path, *, model_path=None, device: str = "auto", out_dir=None, server=None):
        from trame.app import get_server

        from ENSAMSegmentLib.core.geometry import check_volume_shape
        from ENSAMSegmentLib.core.imageio import read_image
        from ENSAMSegmentLib.mrml.volumes import add_volume
        from ENSAMSegmentLib.mrml.promptcontroller import PromptController
        from .layout import build_page

        self.image_path = Path(image_path)
        self.volume_name = image_name(self.image_path)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._encoding_since: float | None = None  # when start_encoding ran
        array, geometry = read_image(self.image_path)  # (z, y, x); bad files fail here, before any view
        check_volume_shape(array.shape, self.image_path.name)
        self.model_label, self.model_note = model_summary(model_path)
        self.server = get_server(server, client_type="vue3")
        self.state.update(STATE_DEFAULTS)
        self.state.trame__title = "ENSAM"

        # views first, data after (trame-slicer's view pipelines must exist before the nodes they show)
        with vtk_warnings_off():
            self.slicer, self.layout_manager = build_views(self.server)
            self.page = build_page(self)
        self.volume_node = add_volume(self.slicer.scene, array, geometry, self.volume_name)
        self.slicer.display_manager.show_volume_in_slice_background(self.volume_node)
        self.slicer.display_manager.reset_views()

        self._woken: asyncio.Event | None = None  # set by `wake` once the server loop runs
        self.controller = PromptController(self.slicer.scene, self.slicer.app_logic,
                                           wake=self.wake, on_change=self.sync_state)
        style_prompt_nodes(self.controller)
        self.controller.set_model(model_path, device)
        self.server.controller.on_server_ready.add_task(self._poll_loop)  # loads the model, encodes the image
        self.sync_state()
        self.state.ensam_status = "Starting: the model loads and the image is encoded once the page is served."

    @property
    def state(self):
        return self.server.state

    # -- page actions (bound to the buttons in layout.py) ----------------------------------------

    def toggle_tool(self, tool: str) -> None:
        """Enter the tool's place mode, or leave it when it is the active one."""
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; use one of {TOOLS}")
        if self.controller.active_tool() == tool:
            self.controller.stop_tool()
        else:
            self.controller.start_tool(tool)

    def run_action(self, action: str) -> None:
        """A button or key of ACTIONS (promptcontroller's shared table)."""
        if action in TOOLS:
            self.toggle_tool(action)
        elif action == "undo":
            self.controller.undo()
        elif action == "reset":
            self.controller.reset_object()
        elif action == "next":
            self.controller.next_object()
            self._update_counts()
        elif action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; use one of {tuple(ACTIONS)}")

    def save(self) -> bytes:
        """The segmentation as .seg.nrrd bytes (the page downloads them); also written to out_dir."""
        from .export import ExportError, seg_nrrd_bytes

        try:
            data = seg_nrrd_bytes(self.controller.segmentation_node)
        except ExportError as error:
            self.state.ensam_saved = f"Not saved: {error}."
            return b""
        if self.out_dir is not None:
            path = self.out_dir / f"{self.volume_name}-ensam.seg.nrrd"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.state.ensam_saved = f"Saved {path}"
        else:
            self.state.ensam_saved = "Downloaded the segmentation (.seg.nrrd)."
        return data

    def close(self) -> None:
        """Stop the controller and its session worker (the server has stopped)."""
        self.controller.cleanup()

    # -- controller -> page ---------------------------------------------------------------------

    def start_encoding(self) -> None:
        """Load the model and encode the image in the session's worker (the page shows the progress)."""
        self._encoding_since = time.monotonic()
        self.controller.set_volume(self.volume_node)

    def sync_state(self) -> None:
        """Copy the controller's status, timing, tool and target into the page state."""
        c = self.controller
        encoding = self._encoding_since is not None and c.encoding
        self.state.update({
            "ensam_status": c.status,
            "ensam_timing": f"{time.monotonic() - self._encoding_since:.0f} s so far." if encoding else c.timing,
            "ensam_model": self.model_label,
            "ensam_note": self.model_note,
            "ensam_tool": c.active_tool(),
            "ensam_busy": c.busy,
            "ensam_ready": c.session is not None and c.image_seconds is not None and not c.encoding,
        })

    def _update_counts(self) -> None:
        """Target segment name, its voxel count and volume; number of segments (after each result)."""
        c = self.controller
        node, segment_id = c.segmentation_node, c.segment_id
        segment = node.GetSegmentation().GetSegment(segment_id) if node is not None and segment_id else None
        voxels = int(c.writer.read(segment_id).sum()) if segment is not None and c.writer is not None else 0
        self.state.update({
            "ensam_segment": segment.GetName() if segment is not None else "",
            "ensam_voxels": voxels,
            "ensam_volume_ml": round(voxels * math.prod(c.geometry.spacing_zyx) / 1000.0, 2) if c.geometry else 0.0,
            "ensam_segments": node.GetSegmentation().GetNumberOfSegments() if node is not None else 0,
        })

    def wake(self) -> None:
        """The controller has work for `poll()` (PromptController's `wake` callback)."""
        if self._woken is not None:
            self._woken.set()

    async def _poll_loop(self, **_) -> None:
        """On the server's loop for its lifetime: poll the controller while it is busy."""
        self._woken = asyncio.Event()
        with self.state:
            self.state.ensam_status = "Loading the model..."
        await asyncio.sleep(0)  # the page gets that before the model loads (it blocks the loop briefly)
        with self.state:
            self.start_encoding()
            self.sync_state()
        self._woken.set()
        while True:
            await self._woken.wait()
            self._woken.clear()
            busy = True
            while busy:
                with self.state:  # flushes the changes to the page
                    try:
                        busy = self.controller.poll()
                    except Exception:  # keep the page alive; the log has the details
                        logging.exception("ENSAM web: poll failed")
                        busy = False
                    self.sync_state()
                    if not busy:
                        self._update_counts()
                if busy:
                    await asyncio.sleep(POLL_SECONDS)


def serve(app: ENSAMWebApp, host: str = "127.0.0.1", port: int = 8080, open_browser: bool = False) -> None:
    """Run the web server until Ctrl+C or SIGTERM (no idle timeout); then return normally."""
    from aiohttp.web_runner import GracefulExit

    try:
        app.server.start(host=host, port=port, open_browser=open_browser, timeout=0, show_connection_info=False)
    except GracefulExit:  # how aiohttp (under wslink) stops on SIGINT / SIGTERM
        pass
