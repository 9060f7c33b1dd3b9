"""The prompt controller's markups: its ROI and two point lists, Slicer's place mode, what to send.

`PromptNodes` is the half of `PromptController` (promptcontroller.py) that deals with markups nodes and
the interaction node; promptcontroller.py holds the session, the requests and the writes.

Prompt nodes: one ROI ("<name> box") and two point lists ("<name> foreground" / "<name> background",
`mrml.prompts.add_click_nodes`), where <name> is the front-end's (actions.PROMPT_NAMES: the module's are
"ENSAM ...", the Segment Editor effect's "ENSAM editor ...", so that each sends only its own). A newly
*defined* control point is one click (then locked: a click cannot be moved, only undone); the ROI is
sent when its placement completes and again after each move or resize (PointEndInteractionEvent).
Events only mark work; `poll()` does it, so the many events of one ROI placement collapse into one box.
A box drawn with two clicks in one slice gets the depth of boxdepth.py's rule when its placement ends.
"""

from __future__ import annotations

import logging

import numpy as np

from ENSAMSegmentLib.core.geometry import OutsideVolumeError
from . import boxdepth
from . import prompts as mrml_prompts
from .actions import TOOLS


class PromptNodes:
    """Markups and place mode of a PromptController (not used on its own). Needs from the controller:
    scene, app_logic, prompt_name, geometry, session, on_change(), wake(), _follow_volume(), _set_status(),
    _send(kind, submit, note) and _tool_started()."""

    def _init_prompt_nodes(self) -> None:
        self._observations: list[tuple[object, int]] = []  # (node, observer tag) on the prompt nodes
        self._sent_points: dict[tuple[str, str], int] = {}  # (node id, point id) -> number of its request
        self._sent_box: tuple | None = None  # (lo, hi) last sent for the current object
        self._first_corner = None  # world RAS of a box's first corner while it is being placed
        self._prompts_dirty = False
        self.foreground_node = self.background_node = self.roi_node = None
        # Place mode ending (ROI finished, Escape) may complete a box and changes the active tool.
        interaction = self.app_logic.GetInteractionNode()
        self._interaction_tag = (interaction, interaction.AddObserver(
            interaction.InteractionModeChangedEvent, self._on_interaction_mode))

    # -- nodes and tools ------------------------------------------------------------------------

    def prompt_nodes(self):
        """(foreground, background, roi) markups nodes, created and observed on first use."""
        import slicer

        defined = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        if not all(n is not None and n.GetScene() is self.scene for n in (self.foreground_node, self.background_node)):
            self._unobserve(self.foreground_node, self.background_node)
            self.foreground_node, self.background_node = mrml_prompts.add_click_nodes(self.scene, self.prompt_name)
            for node in (self.foreground_node, self.background_node):
                node.SetSaveWithScene(False)  # prompts are session state, not data
                self._observations.append((node, node.AddObserver(defined, self._on_prompt_event)))
        if self.roi_node is None or self.roi_node.GetScene() is not self.scene:
            self._fresh_roi()
        return self.foreground_node, self.background_node, self.roi_node

    def _fresh_roi(self) -> None:
        """A new, empty ROI node in place of the old one. A new box needs one: once placed, a box ROI takes no
        new corners (vtkMRMLMarkupsROINode::UpdateControlPointsFromBoxROI sets its maximum number of control
        points to 1, Libs/MRML/Core/vtkMRMLMarkupsROINode.cxx, v5.10.0 lines 1041-1042)."""
        import slicer

        old = self.roi_node
        self._unobserve(old)
        if old is not None and old.GetScene() is self.scene:
            self.scene.RemoveNode(old)
        roi = self.roi_node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{self.prompt_name} box")
        roi.CreateDefaultDisplayNodes()
        roi.SetSaveWithScene(False)
        for event, callback in ((slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._on_roi_point_defined),
                                (slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._on_prompt_event)):
            self._observations.append((roi, roi.AddObserver(event, callback)))
        self._first_corner = None

    def start_tool(self, tool: str) -> None:
        """Enter Slicer's place mode for a box (one ROI) or clicks (persistent) in the right node."""
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; use one of {TOOLS}")
        foreground, background, roi = self.prompt_nodes()
        if tool == "box":  # a new box: placement starts from two fresh corners, in a fresh node
            self._fresh_roi()
            roi = self.roi_node
        node = {"box": roi, "foreground": foreground, "background": background}[tool]
        selection, interaction = self.app_logic.GetSelectionNode(), self.app_logic.GetInteractionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(0 if tool == "box" else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)
        self._tool_started()
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

    # -- events ---------------------------------------------------------------------------------

    def _on_prompt_event(self, caller=None, event=None) -> None:
        self._prompts_dirty = True
        self.wake()

    def _on_roi_point_defined(self, caller=None, event=None) -> None:
        if self._first_corner is None and self.roi_node is not None:
            self._first_corner = boxdepth.first_corner(self.roi_node)
        self._on_prompt_event()

    def _on_interaction_mode(self, caller=None, event=None) -> None:
        if self.roi_node is not None:
            self._on_prompt_event()
        self.on_change()

    def _unobserve_prompts(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()

    def _unobserve(self, *nodes) -> None:
        for node, tag in [o for o in self._observations if any(o[0] is n for n in nodes if n is not None)]:
            node.RemoveObserver(tag)
            self._observations.remove((node, tag))

    def _unobserve_interaction(self) -> None:
        if self._interaction_tag is not None:
            node, tag = self._interaction_tag
            node.RemoveObserver(tag)
            self._interaction_tag = None

    # -- sending --------------------------------------------------------------------------------

    def _send_prompts(self) -> None:
        """New clicks, and the box when it is placed and differs from the last one sent."""
        if self.geometry is None or self.session is None or self.roi_node is None:
            return
        self._follow_volume()  # prompts are read in world RAS: a volume moved since is followed
        if self._roi_ready():
            depth_note = self._apply_depth_rule()
            try:
                lo, hi = mrml_prompts.box_from_roi(self.roi_node, self.geometry)
            except OutsideVolumeError as error:
                logging.info("ENSAM: box ignored: %s", error)
                self._set_status(f"Box ignored: {error}")
            else:
                box = (tuple(lo.tolist()), tuple(hi.tolist()))
                if box != self._sent_box:
                    self._send("box", lambda oid: self.session.submit_box(*box, object_id=oid), depth_note)
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
                    logging.info("ENSAM: click at RAS %s is outside the volume: ignored", world)
                    self._set_status("Click outside the volume: ignored.")
                    continue
                self._send("click", lambda oid, kji=kji, fg=foreground: self.session.submit_click(kji, fg, object_id=oid))

    def _apply_depth_rule(self) -> str:
        """A box just drawn in one slice gets boxdepth's depth; returns what to tell the user ("": nothing)."""
        corner, self._first_corner = self._first_corner, None
        if corner is None:
            return ""
        depth = boxdepth.apply_depth_rule(self.roi_node, corner)
        if depth is None:
            return ""
        return (f" Box drawn in one slice: depth {depth:.0f} mm ({boxdepth.RULE}), centred on that slice; "
                "drag its handles in another view to change it.")

    def _roi_ready(self) -> bool:
        """The ROI is placed (all points defined, non-zero size) and Slicer is not placing it now."""
        roi = self.roi_node
        defined = roi.GetNumberOfDefinedControlPoints()
        if defined == 0 or defined != roi.GetNumberOfControlPoints() or self.active_tool() == "box":
            return False
        return all(size > 0 for size in roi.GetSize())

    # -- showing an object's prompts ------------------------------------------------------------

    def _remove_clicks_before(self, number: int) -> None:
        """Remove the click markups sent before request `number` (later ones are still to come)."""
        for node in (self.foreground_node, self.background_node):
            for point_id, sent in list(self._sent_points.items()):
                if point_id[0] == node.GetID() and sent < number:
                    index = node.GetNthControlPointIndexByID(point_id[1])
                    if index >= 0:
                        node.RemoveNthControlPoint(index)
                    del self._sent_points[point_id]

    def _clear_prompts(self) -> None:
        """Empty the prompt nodes (not the segments) and forget what was sent."""
        for node in (self.foreground_node, self.background_node, self.roi_node):
            if node is not None:
                node.RemoveAllControlPoints()
        self._sent_points.clear()
        self._sent_box = None
        self._first_corner = None
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
