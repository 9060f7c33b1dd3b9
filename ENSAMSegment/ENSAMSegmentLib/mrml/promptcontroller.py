"""The interactive loop shared by the ENSAMSegment module and the Segment Editor effect "ENSAM".

    markups (box ROI, foreground / background point lists)
        --observers--> PromptController --submit_*--> InferenceSession (its worker thread)
        <--poll()----- futures         --SegmentWriter.write--> the object's segment

No Qt here: the front-ends own a timer that calls `poll()` while `busy` (the controller asks for it
through the `wake` callback) and refresh their labels from `status` / `timing` in `on_change`.
Nothing waits on the model in the calling thread, so the GUI never blocks. It runs on the
slicer-core wheel as well, which is how it is tested (Testing/test_slicer_frontend.py).

Prompt nodes: one ROI ("ENSAM box") and two point lists ("ENSAM foreground" / "ENSAM background",
`mrml.prompts.add_click_nodes`). A newly *defined* control point is one click (then locked: a
click cannot be moved, only undone); the ROI is sent when its placement completes and again after
each move or resize (PointEndInteractionEvent). Events only mark work; `poll()` does it, so the
many events of one ROI placement collapse into one box.

Objects: one session object per segment. `next_object()` starts a new segment; prompts go to the
selected segment, which is created on the first prompt when there is none. Undo / reset act on
the current object: the session steps back, the segmentation is restored exactly by the writer's
undo record of that step (other segments included) when it is the newest one, else the session's
mask is written; the markups are then redrawn from the object's remaining prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ENSAMSegmentLib.core.geometry import OutsideVolumeError
from . import prompts as mrml_prompts

# -- the front-ends' shared tables (tested: unique keys, no clash with the Segment Editor) --------

TOOLS = ("box", "foreground", "background")
# action -> (button label, keyboard shortcut). The same keys in the module and in the effect.
ACTIONS = {
    "box": ("Box", "B"),
    "foreground": ("+ Click", "F"),
    "background": ("- Click", "G"),
    "undo": ("Undo", "U"),
    "reset": ("Reset object", "R"),
    "next": ("Next object", "N"),
}
# Keys the Segment Editor binds while it is shown (qMRMLSegmentEditorWidget::installKeyboardShortcuts),
# and Ctrl+Z of Slicer's Edit > Undo menu action: the effect's keys must differ from all of them.
SEGMENT_EDITOR_KEYS = frozenset(
    [str(d) for d in range(10)] + [f"Shift+{d}" for d in range(10)]
    + ["Esc", "Space", "Z", "Ctrl+Z", "Y", "Ctrl+Y", "Q", "W", "/", "*", ",", ".", ">", "<"]
)
DEVICES = ("auto", "cpu", "cuda", "mps")  # = ENSAMSegmentLib.core.devices.DEVICE_NAMES (without torch)
USER_MODELS_DIR = Path.home() / ".ensam" / "models"  # where ENSAM Training keeps trained models
DEFAULT_MODEL = Path(__file__).parents[2] / "Resources" / "Models" / "ensam-default.pt"  # = modelfile's


def model_choices(user_dir: Path = USER_MODELS_DIR, default: Path = DEFAULT_MODEL) -> list[tuple[str, Path]]:
    """(label, path) of the selectable models: the shipped default first, then user_dir/*.pt by name."""
    choices = [("Default (shipped with the extension)", default)]
    if user_dir.is_dir():
        choices += [(path.stem, path) for path in sorted(user_dir.glob("*.pt"))]
    return choices


def format_seconds(seconds: float) -> str:
    """'85 ms' below 10 s is how prompts are reported; '12.3 s' above."""
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


# -- the controller ---------------------------------------------------------------------------


@dataclass
class _Job:
    """One submitted request: what to do with its result on the GUI thread."""

    kind: str  # image | box | click | undo | reset
    future: object  # concurrent.futures.Future
    started: float
    segment_id: str | None = None
    number: int = 0  # submission order


class PromptController:
    """One interactive ENSAM segmentation in a scene (see the module docstring).

    scene, app_logic: slicer.mrmlScene and slicer.app.applicationLogic() in the application, or a
    `mrml.scene.HeadlessScene`'s. wake(): ask the front-end to call `poll()` soon (a timer).
    on_change(): status, timing, target segment or tool changed. editor_node: the Segment Editor's
    vtkMRMLSegmentEditorNode whose masking / overwrite settings every write follows (None: allow
    overlap, edit everywhere). before_change(): called before every change of the segmentation
    (the effect passes scriptedEffect.saveStateForUndo).
    """

    def __init__(self, scene, app_logic, *, wake: Callable[[], None] | None = None,
                 on_change: Callable[[], None] | None = None, editor_node=None,
                 before_change: Callable[[], object] | None = None, session_factory=None):
        self.scene, self.app_logic = scene, app_logic
        self.wake = wake or (lambda: None)
        self.on_change = on_change or (lambda: None)
        self.editor_node, self.before_change = editor_node, before_change
        self._session_factory = session_factory or _default_session
        self._observations: list[tuple[object, int]] = []  # (node, observer tag) on the prompt nodes
        self.model_path: Path | None = None  # None: the default model
        self.device = "auto"
        self.session = None
        self.volume_node = self.segmentation_node = None
        self.segment_id: str | None = None
        self.geometry = None  # world VolumeGeometry of volume_node
        self.writer = None  # mrml.segments.SegmentWriter for (segmentation_node, volume_node)
        self._writes: list[tuple[int, int]] = []  # (object id, step) of each writer undo record
        self._objects: dict[str, int] = {}  # segment id -> session object id
        self._jobs: list[_Job] = []
        self._sent_points: dict[tuple[str, str], int] = {}  # (node id, point id) -> number of its request
        self._submitted = 0  # requests submitted so far
        self._sent_box: tuple | None = None  # (lo, hi) last sent for the current object
        self._prompts_dirty = False
        self.foreground_node = self.background_node = self.roi_node = None
        self.status = "Select a volume, then draw a box."
        self.timing = ""
        self.image_seconds: float | None = None
        self._volume_mtime = None
        # Place mode ending (ROI finished, Escape) may complete a box and changes the active tool.
        interaction = app_logic.GetInteractionNode()
        self._interaction_tag = (interaction, interaction.AddObserver(
            interaction.InteractionModeChangedEvent, self._on_interaction_mode))

    # -- configuration ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while requests run or prompt events wait for `poll()`."""
        return bool(self._jobs) or self._prompts_dirty

    def object_for_segment(self, segment_id: str) -> int | None:
        """The session object id behind a segment (None: no ENSAM prompts for it yet)."""
        return self._objects.get(segment_id)

    @property
    def encoding(self) -> bool:
        return any(job.kind == "image" for job in self._jobs)

    def set_model(self, model_path=None, device: str = "auto") -> None:
        """Use another model file (None or '': the default) or device; the image is encoded again."""
        text = "" if model_path is None else str(model_path)
        path = Path(text) if text not in ("", ".") else None  # Path() is what an empty path field gives
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; use one of {DEVICES}")
        if (path, device) == (self.model_path, self.device):
            return
        self.model_path, self.device = path, device
        self._close_session()
        if self.volume_node is not None:
            volume, self.volume_node = self.volume_node, None
            self.set_volume(volume)

    def set_volume(self, volume_node) -> None:
        """Encode this volume (asynchronously); None stops. The same unmodified volume is a no-op."""
        from .volumes import volume_to_array

        if volume_node is self.volume_node and (volume_node is None or not self._volume_modified()):
            return
        self._objects.clear()
        self._clear_prompts()
        self.volume_node, self.geometry = volume_node, None
        self._set_writer(None)
        if volume_node is None:
            self._set_status("Select a volume, then draw a box.")
            return
        array, self.geometry = volume_to_array(volume_node)
        self._volume_mtime = volume_node.GetImageData().GetMTime()
        session = self._session()
        if session is None:
            return
        self._submit("image", lambda: session.submit_image(array, spacing_zyx=self.geometry.spacing_zyx))
        self._set_status(f"Encoding '{volume_node.GetName()}'...")

    def set_target(self, segmentation_node, segment_id: str | None) -> None:
        """The segment that receives the next prompts (None: a new segment at the first prompt)."""
        if segment_id == "":
            segment_id = None
        if segmentation_node is self.segmentation_node and segment_id == self.segment_id:
            return
        if segmentation_node is not self.segmentation_node:
            self._set_writer(None)
            self._objects.clear()
        if self.segment_id is not None or segment_id is not None:
            self._clear_prompts()  # the markups show the current object's prompts only
        self.segmentation_node, self.segment_id = segmentation_node, segment_id
        if segment_id is not None and self.session is not None and segment_id in self._objects:
            self.session.select_object(self._objects[segment_id])
        self.on_change()

    # -- prompt nodes and tools -----------------------------------------------------------------

    def prompt_nodes(self):
        """(foreground, background, roi) markups nodes, created and observed on first use."""
        import slicer

        alive = [n is not None and n.GetScene() is self.scene
                 for n in (self.foreground_node, self.background_node, self.roi_node)]
        if not all(alive):
            self._unobserve_prompts()
            self.foreground_node, self.background_node = mrml_prompts.add_click_nodes(self.scene, "ENSAM")
            self.roi_node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ENSAM box")
            self.roi_node.CreateDefaultDisplayNodes()
            for node in (self.foreground_node, self.background_node, self.roi_node):
                node.SetSaveWithScene(False)  # prompts are session state, not data
            events = {self.foreground_node: [slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent],
                      self.background_node: [slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent],
                      self.roi_node: [slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                      slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent]}
            for node, node_events in events.items():
                for event in node_events:
                    self._observations.append((node, node.AddObserver(event, self._on_prompt_event)))
        return self.foreground_node, self.background_node, self.roi_node

    def start_tool(self, tool: str) -> None:
        """Enter Slicer's place mode for a box (one ROI) or clicks (persistent) in the right node."""
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; use one of {TOOLS}")
        foreground, background, roi = self.prompt_nodes()
        node = {"box": roi, "foreground": foreground, "background": background}[tool]
        if tool == "box":
            roi.RemoveAllControlPoints()  # a new box: placement starts from two fresh corners
        selection, interaction = self.app_logic.GetSelectionNode(), self.app_logic.GetInteractionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(0 if tool == "box" else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)
        self.on_change()

    def stop_tool(self) -> None:
        interaction = self.app_logic.GetInteractionNode()
        interaction.SetPlaceModePersistence(0)
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        self.on_change()

    def active_tool(self) -> str | None:
        """The tool whose node Slicer is placing into now, else None."""
        interaction = self.app_logic.GetInteractionNode()
        if interaction.GetCurrentInteractionMode() != interaction.Place:
            return None
        active = self.app_logic.GetSelectionNode().GetActivePlaceNodeID()
        nodes = {"box": self.roi_node, "foreground": self.foreground_node, "background": self.background_node}
        return next((tool for tool, node in nodes.items() if node is not None and node.GetID() == active), None)

    def _on_prompt_event(self, caller=None, event=None) -> None:
        self._prompts_dirty = True
        self.wake()

    def _on_interaction_mode(self, caller=None, event=None) -> None:
        if self.roi_node is not None:
            self._on_prompt_event()
        self.on_change()

    # -- object actions -------------------------------------------------------------------------

    def undo(self) -> None:
        """Back one step of the current object (its last box or clicks)."""
        self._object_op("undo")

    def reset_object(self) -> None:
        """Clear the current object's prompts and segment (itself undoable)."""
        self._object_op("reset")

    def next_object(self) -> str | None:
        """Keep the current segment as it is; a new empty segment becomes the target. Returns its id."""
        self._clear_prompts()
        self.segment_id = None
        if self.volume_node is None:
            self.on_change()
            return None
        self.segment_id = self._target_or_status()
        if self.segment_id is None:  # the status says why
            self.on_change()
            return None
        name = self.segmentation_node.GetSegmentation().GetSegment(self.segment_id).GetName()
        self._set_status(f"Next object: {name}. Draw a box, or click on the structure.")
        return self.segment_id

    def _object_op(self, kind: str) -> None:
        object_id = self._objects.get(self.segment_id) if self.segment_id else None
        if object_id is None or self.session is None:
            self._set_status("Nothing to " + kind + ": this segment has no ENSAM prompts yet.")
            return
        method = self.session.submit_undo if kind == "undo" else self.session.submit_reset
        self._submit(kind, lambda: method(object_id), segment_id=self.segment_id)

    # -- the loop -------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Send new prompts, apply finished results. Returns `busy` (call again later while True)."""
        if self._prompts_dirty:
            self._prompts_dirty = False
            self._send_prompts()
        for job in [j for j in self._jobs if j.future.done()]:
            self._jobs.remove(job)
            self._finish(job)
        return self.busy

    def wait(self, timeout: float = 60.0) -> None:
        """Poll until idle (scripts and tests; a GUI uses its timer instead)."""
        end = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > end:
                raise TimeoutError(f"ENSAM still busy after {timeout} s: {self.status}")
            time.sleep(0.01)

    def cleanup(self) -> None:
        """Stop observing, close the session, remove the private editor node (prompt nodes stay)."""
        self._unobserve_prompts()
        if self._interaction_tag is not None:
            node, tag = self._interaction_tag
            node.RemoveObserver(tag)
            self._interaction_tag = None
        self._close_session()
        self._set_writer(None)

    # -- internals: sending ---------------------------------------------------------------------

    def _send_prompts(self) -> None:
        if self.geometry is None or self.session is None or self.roi_node is None:
            return
        if self._roi_ready():
            try:
                lo, hi = mrml_prompts.box_from_roi(self.roi_node, self.geometry)
            except OutsideVolumeError as error:
                self._set_status(f"Box ignored: {error}")
            else:
                box = (tuple(lo.tolist()), tuple(hi.tolist()))
                if box != self._sent_box:
                    self._send("box", lambda oid: self.session.submit_box(*box, object_id=oid))
                    self._sent_box = box
        for node, foreground in ((self.foreground_node, True), (self.background_node, False)):
            for n in range(node.GetNumberOfControlPoints()):
                point_id = (node.GetID(), node.GetNthControlPointID(n))  # point ids are unique per node only
                if point_id in self._sent_points or node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
                    continue
                self._sent_points[point_id] = self._submitted + 1  # the number _submit will give it
                node.SetNthControlPointLocked(n, True)
                world = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(n, world)
                try:
                    kji = tuple(self.geometry.ras_to_kji_index(world).tolist())
                except OutsideVolumeError:
                    self._set_status("Click outside the volume: ignored.")
                    continue
                self._send("click", lambda oid, kji=kji, fg=foreground: self.session.submit_click(kji, fg, object_id=oid))

    def _roi_ready(self) -> bool:
        """The ROI is placed (all points defined, non-zero size) and Slicer is not placing it now."""
        roi = self.roi_node
        defined = roi.GetNumberOfDefinedControlPoints()
        if defined == 0 or defined != roi.GetNumberOfControlPoints() or self.active_tool() == "box":
            return False
        return all(size > 0 for size in roi.GetSize())

    def _send(self, kind: str, submit) -> None:
        """Submit a prompt for the target segment's object, creating segment and object if needed."""
        segment_id = self._target_or_status()
        if segment_id is None:
            return
        object_id = self._objects.get(segment_id)
        if object_id is None:
            object_id = self._objects[segment_id] = self.session.create_object()
        self._submit(kind, lambda: submit(object_id), segment_id=segment_id)

    def _submit(self, kind: str, submit, segment_id: str | None = None) -> None:
        from ENSAMSegmentLib.core.session import SessionError

        try:
            future = submit()
        except SessionError as error:  # bad prompt or no image: the session is unchanged
            self._set_status(f"{kind.capitalize()} refused: {error}")
            return
        self._submitted += 1
        self._jobs.append(_Job(kind, future, time.perf_counter(), segment_id, self._submitted))
        self.wake()
        self.on_change()

    # -- internals: results ---------------------------------------------------------------------

    def _finish(self, job: _Job) -> None:
        from ENSAMSegmentLib.core.session import StaleRequest

        if job.future.cancelled():
            return  # its prompts travel with a newer request of the same object
        try:
            result = job.future.result()
        except StaleRequest:
            return
        except Exception as error:  # shown to the user; the session keeps its previous state
            logging.exception("ENSAM %s failed", job.kind)
            self._set_status(f"{job.kind.capitalize()} failed: {error}")
            return
        if job.kind == "image":
            self.image_seconds = result.seconds
            encoded = "encoded" if result.encoded else "already encoded"
            self.timing = f"Image {encoded} in {format_seconds(result.seconds)}."
            self._set_status("Ready: draw a box, or click on the structure.")
            self.wake()  # prompts placed while encoding
            return
        if job.segment_id is None or self.writer is None:
            return
        self._apply(job, result)
        total = time.perf_counter() - job.started
        self.timing = (f"{job.kind.capitalize()}: {format_seconds(total)} "
                       f"(model {format_seconds(result.seconds)}).")
        self._set_status(f"Object {result.object_id}: step {result.step}.")

    def _apply(self, job: _Job, update) -> None:
        """Write a finished update into its segment (undo: the writer's own record when possible)."""
        segmentation = self.writer.segmentation
        if segmentation.GetSegment(job.segment_id) is None:
            return  # the user removed the segment meanwhile
        if job.kind == "undo" and self._writes and self._writes[-1] == (update.object_id, update.step + 1):
            self._writes.pop()
            self.writer.undo()
        elif update.changed is not None:
            self.writer.write(job.segment_id, update.mask, update.changed)
            self._writes.append((update.object_id, update.step))
            del self._writes[: max(0, len(self._writes) - self.writer.max_undo)]
        if job.segment_id != self.segment_id:
            return
        if job.kind in ("undo", "reset"):
            self._redraw_prompts(self.session.object_prompts(update.object_id))
        elif job.kind == "box":
            self._remove_clicks_before(job.number)  # a box starts the object over: earlier clicks are gone

    def _remove_clicks_before(self, number: int) -> None:
        """Remove the click markups sent before request `number` (later ones are still to come)."""
        for node in (self.foreground_node, self.background_node):
            for point_id, sent in list(self._sent_points.items()):
                if point_id[0] == node.GetID() and sent < number:
                    index = node.GetNthControlPointIndexByID(point_id[1])
                    if index >= 0:
                        node.RemoveNthControlPoint(index)
                    del self._sent_points[point_id]

    # -- internals: targets, prompts, session ---------------------------------------------------

    def _target_or_status(self) -> str | None:
        """`_ensure_target`, or None with the reason in the status line (e.g. segments on another grid)."""
        from .volumes import MRMLError

        try:
            return self._ensure_target()
        except MRMLError as error:
            self._set_status(f"Cannot write into '{self.segmentation_node.GetName()}': {error}")
            return None

    def _ensure_target(self) -> str:
        """The target segment id: creates the segmentation and the segment when missing."""
        from .segments import SegmentWriter

        if self.segmentation_node is None or self.segmentation_node.GetScene() is not self.scene:
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{self.volume_node.GetName()} ENSAM")
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume_node)
            self.segmentation_node, self.segment_id = node, None
            self._set_writer(None)
        if self.writer is None:
            self._set_writer(SegmentWriter(self.segmentation_node, self.volume_node, editor_node=self.editor_node,
                                           before_change=self.before_change, max_undo=32))
        segmentation = self.segmentation_node.GetSegmentation()
        if self.segment_id is None or segmentation.GetSegment(self.segment_id) is None:
            self.segment_id = self.writer.add_segment(f"ENSAM {segmentation.GetNumberOfSegments() + 1}")
            self.on_change()
        return self.segment_id

    def _set_writer(self, writer) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = writer
        self._writes.clear()

    def _clear_prompts(self) -> None:
        """Empty the prompt nodes (not the segments) and forget what was sent."""
        for node in (self.foreground_node, self.background_node, self.roi_node):
            if node is not None:
                node.RemoveAllControlPoints()
        self._sent_points.clear()
        self._sent_box = None
        self._prompts_dirty = False

    def _redraw_prompts(self, prompts) -> None:
        """Show exactly an object's remaining prompts (after undo / reset); nothing is re-sent."""
        self._clear_prompts()
        foreground, background, roi = self.prompt_nodes()
        for node, points in ((foreground, prompts.fg), (background, prompts.bg)):
            for kji in points:
                n = node.AddControlPointWorld(*self.geometry.kji_to_ras(kji).tolist())
                node.SetNthControlPointLocked(n, True)
                self._sent_points[(node.GetID(), node.GetNthControlPointID(n))] = 0
        if prompts.box is not None:
            center, size, axes = roi_for_box(self.geometry, *prompts.box)
            mrml_prompts.set_roi(roi, center, size, axes)
            self._sent_box = tuple(tuple(int(v) for v in corner) for corner in prompts.box)
        self._prompts_dirty = False

    def _session(self):
        if self.session is None:
            try:
                self.session = self._session_factory(self.model_path, self.device)
            except Exception as error:  # model file or device problem: said in the status line
                logging.exception("ENSAM session could not start")
                self._set_status(f"Cannot start ENSAM: {error}")
                return None
        return self.session

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None
        self._jobs.clear()
        self._objects.clear()

    def _volume_modified(self) -> bool:
        image = self.volume_node.GetImageData()
        return image is not None and image.GetMTime() != self._volume_mtime

    def _unobserve_prompts(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()

    def _set_status(self, text: str) -> None:
        self.status = text
        self.on_change()


def roi_for_box(geometry, kji_min, kji_max):
    """(centre RAS, size along the ROI axes, 3x3 axes) of the ROI covering exactly an inclusive voxel
    box: the box's outer voxel faces, axes along the volume's i, j, k directions (right-handed)."""
    lo, hi = np.asarray(kji_min, dtype=np.float64), np.asarray(kji_max, dtype=np.float64)
    center = geometry.kji_to_ras((lo + hi) / 2).reshape(3)
    size = (hi - lo + 1)[::-1] * np.asarray(geometry.spacing_xyz)
    axes = np.array(geometry.direction_ras, dtype=np.float64)
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1  # the box is symmetric about its centre: flipping k keeps it, and the ROI right-handed
    return center, size, axes


def _default_session(model_path, device):
    from ENSAMSegmentLib.core.session import InferenceSession

    return InferenceSession(model_path=model_path, device=device)
