"""The Segment Editor effect "ENSAM": box and foreground/background clicks inside the Segment Editor.

Registered by ENSAMSegment.registerEditorEffect at start-up. The same PromptController and
PromptPanel as the ENSAMSegment module do the work; this class only maps the Segment Editor onto
them: the source volume is the image, the selected segment is the current object, the editor's
parameter node (a vtkMRMLSegmentEditorNode) supplies the masking and overwrite settings of every
write, and scriptedEffect.saveStateForUndo() runs before every change, so the editor's own undo
(Z / Ctrl+Z) restores the segmentation too. The effect's Undo (X) also steps the prompts back.

The model runs in the application's worker process for the source volume, the same one the module
uses for that volume (slicerui/sessions.py); the effect's prompt nodes are its own ("ENSAM editor ...").
Nothing is built before the Python packages are there (torch, MONAI, scipy): the editor calls
updateGUIFromMRML before activate(). The worker is released when the scene closes and in cleanup()
(which Slicer calls from 5.10 on, when the editor widget goes), and ends with the application anyway.

Imports are absolute (ENSAMSegmentLib.…): Slicer may load this file by path.
"""

import logging
from pathlib import Path

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from ENSAMSegmentLib.mrml.actions import ACTIONS, DEFAULT_MODEL, DEVICES, PROMPT_NAMES, model_choices

EFFECT_NAME = "ENSAM"
ICON = Path(__file__).parents[1] / "Resources" / "Icons" / "SegmentEditorENSAM.png"
TOOLTIPS = {
    "box": "Draw a 3D box (ROI) around the structure: click two opposite corners in a slice view.",
    "foreground": "Place foreground clicks: voxels that belong to the structure.",
    "background": "Place background clicks: voxels that do not belong to the structure.",
    "undo": "Undo the last prompt of this segment (many levels).",
    "reset": "Remove all prompts of this segment and clear it.",
    "next": "Keep this segment and start a new one.",
}


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """ENSAM promptable segmentation as a Segment Editor effect."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.perSegment = False  # it creates and selects its segments itself
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.controller = None
        self.panel = None
        self._syncingToEditor = False
        self._ready = None  # Slicer version and Python packages checked (None: not yet)
        self._sceneObservation = None
        self._editorObservation = None  # (segment editor node, tag) while the effect is active

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        return qt.QIcon(str(ICON)) if ICON.is_file() else qt.QIcon()

    def helpText(self):
        keys = ", ".join(f"{key} {label.lower()}" for label, key in ACTIONS.values())
        return (
            "<html>Segment the selected structure with <b>ENSAM</b>: draw a 3D box around it, then add "
            "foreground (+) or background (-) clicks; the segment updates after every prompt. "
            "The source volume is encoded once. A box drawn in one slice is as deep as the mean of its width "
            "and height. Writes follow the masking settings below (editable "
            f"area, intensity range, overwrite). Keys while the effect is active: {keys}.</html>"
        )

    # -- options -------------------------------------------------------------------------------

    def setupOptionsFrame(self):
        from ENSAMSegmentLib.slicerui.promptpanel import PromptPanel

        grid = qt.QGridLayout()
        buttons = {}
        for index, action in enumerate(ACTIONS):
            button = qt.QPushButton()
            button.objectName = f"ENSAM_{action}_button"
            button.toolTip = TOOLTIPS[action]
            grid.addWidget(button, index // 3, index % 3)
            buttons[action] = button
        self.scriptedEffect.addOptionsWidget(grid)

        self.modelComboBox = qt.QComboBox()
        self.modelComboBox.toolTip = "The shipped model, or one trained with ENSAM Training (~/.ensam/models)."
        for label, path in model_choices():
            self.modelComboBox.addItem(label, str(path))
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)
        self.deviceComboBox = qt.QComboBox()
        self.deviceComboBox.toolTip = "Where the model runs: auto picks CUDA (or Apple MPS) when present."
        for device in DEVICES:
            self.deviceComboBox.addItem(device)
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceComboBox)

        self.progressBar = qt.QProgressBar()
        self.progressBar.minimum, self.progressBar.maximum = 0, 0  # busy indicator
        self.progressBar.format = "Encoding the image..."
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Stop encoding the image (a box or click encodes it again)."
        self.cancelButton.visible = False
        progressRow = qt.QHBoxLayout()
        progressRow.addWidget(self.progressBar)
        progressRow.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(progressRow)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.timingLabel = qt.QLabel()
        self.scriptedEffect.addOptionsWidget(self.timingLabel)
        self.installButton = qt.QPushButton("Install dependencies...")
        self.installButton.toolTip = "Install PyTorch (PyTorch extension), MONAI and scipy, after asking."
        self.installButton.visible = False
        self.scriptedEffect.addOptionsWidget(self.installButton)

        self.panel = PromptPanel(buttons, self.statusLabel, self.timingLabel, self.progressBar, self.cancelButton)
        self.modelComboBox.connect("activated(int)", self.updateMRMLFromGUI)
        self.deviceComboBox.connect("activated(int)", self.updateMRMLFromGUI)
        self.installButton.connect("clicked()", self.onInstallDependencies)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ModelPath", str(DEFAULT_MODEL))
        self.scriptedEffect.setParameterDefault("Device", "auto")

    def updateGUIFromMRML(self):
        _selectData(self.modelComboBox, self.scriptedEffect.parameter("ModelPath"))
        _selectText(self.deviceComboBox, self.scriptedEffect.parameter("Device"))
        if self.scriptedEffect.active() and not self._syncingToEditor and self._readyToRun():
            self._syncController()

    def updateMRMLFromGUI(self, *unused):
        index = self.modelComboBox.currentIndex
        if index >= 0:
            self.scriptedEffect.setParameter("ModelPath", self.modelComboBox.itemData(index))
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentText)

    # -- life cycle ----------------------------------------------------------------------------

    def activate(self):
        if not self._readyToRun():
            return
        self._syncController()
        self._observeEditor()
        self.panel.install_shortcuts()  # the effect's keys exist only while it is active

    def deactivate(self):
        self._unobserveEditor()
        if self.panel is not None:
            self.panel.remove_shortcuts()
        if self.controller is not None and self.controller.active_tool() is not None:
            self.controller.stop_tool()

    def cleanup(self):
        """Called by Slicer (5.10 and later) when the editor widget goes: observers and the worker go too."""
        self._unobserveScene()
        self._unobserveEditor()
        if self.panel is not None:
            self.panel.cleanup()
        if self.controller is not None:
            self.controller.cleanup()
        self.controller = None

    def sourceVolumeNodeChanged(self):
        if self.scriptedEffect.active() and self._readyToRun():
            self._syncController()

    def interactionNodeModified(self, interactionNode):
        """Placing ENSAM's own prompts keeps the effect; any other placement ends it (Slicer's rule)."""
        if self.controller is not None and self.controller.active_tool() is not None:
            self.panel.refresh()
            return
        if interactionNode.GetCurrentInteractionMode() != interactionNode.ViewTransform:
            self.scriptedEffect.selectEffect("")

    def createCursor(self, widget):
        mainWindow = slicer.util.mainWindow()  # None with --no-main-window
        return mainWindow.cursor if mainWindow is not None else qt.QCursor()  # the place cursor shows when placing

    # -- controller ----------------------------------------------------------------------------

    def _syncController(self):
        """Segment Editor state -> controller (source volume, segmentation, selected segment, model)."""
        from ENSAMSegmentLib.mrml.promptcontroller import PromptController

        editor = self.scriptedEffect.parameterSetNode()
        if editor is None:
            return
        if self.controller is None:
            from ENSAMSegmentLib.slicerui.sessions import shared_pool

            self.controller = PromptController(
                slicer.mrmlScene, slicer.app.applicationLogic(), wake=self.panel.wake,
                on_change=self._onControllerChanged, editor_node=editor,
                before_change=self.scriptedEffect.saveStateForUndo, pool=shared_pool(),
                prompt_name=PROMPT_NAMES["effect"])
            self.panel.set_controller(self.controller)
            self._observeScene()
        self.controller.editor_node = editor
        try:
            self.controller.set_model(self.scriptedEffect.parameter("ModelPath"),
                                      self.scriptedEffect.parameter("Device") or "auto")
        except ValueError as error:
            logging.warning("ENSAM effect: %s", error)
        self.controller.set_volume(_sourceVolume(editor))
        self.controller.set_target(editor.GetSegmentationNode(), editor.GetSelectedSegmentID() or None)
        self.panel.refresh()

    def _onControllerChanged(self):
        """A segment the controller created becomes the editor's selected segment."""
        editor = self.scriptedEffect.parameterSetNode()
        controller = self.controller
        if editor is not None and controller is not None and controller.segment_id:
            if controller.segmentation_node is editor.GetSegmentationNode() and \
                    editor.GetSelectedSegmentID() != controller.segment_id:
                self._syncingToEditor = True
                try:
                    editor.SetSelectedSegmentID(controller.segment_id)
                finally:
                    self._syncingToEditor = False
        if self.panel is not None:
            self.panel.refresh()

    def _readyToRun(self):
        """This Slicer is recent enough and torch, MONAI and scipy are there (checked until they are: after
        that once). Nothing builds a session before: without torch the editor's every change would fail."""
        from ENSAMSegmentLib.slicerui import dependencies

        if self._ready:
            return True
        problem = dependencies.slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)
        plan = dependencies.current_plan() if not problem else None
        self._ready = not problem and plan.satisfied
        self.installButton.visible = not problem and not self._ready
        if problem:
            self.statusLabel.text = problem
        elif not self._ready:
            self.statusLabel.text = "ENSAM needs more Python packages: press 'Install dependencies...'."
        return self._ready

    def onInstallDependencies(self):
        from ENSAMSegmentLib.slicerui import dependencies

        if dependencies.ensure_dependencies() and self._readyToRun() and self.scriptedEffect.active():
            self.activate()

    def _observeScene(self):
        """The scene closes: release the worker of the volume (the effect may never be deactivated first)."""
        if self._sceneObservation is None:
            tag = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self._onSceneStartClose)
            self._sceneObservation = (slicer.mrmlScene, tag)

    def _unobserveScene(self):
        if self._sceneObservation is not None:
            scene, tag = self._sceneObservation
            scene.RemoveObserver(tag)
            self._sceneObservation = None

    def _observeEditor(self):
        """Follow the segment the user selects while the effect is active. The Segment Editor tells an effect
        nothing when the selection changes (segment table, Q/W keys): qMRMLSegmentEditorWidget::
        onSegmentSelectionChanged only sets the editor node's SelectedSegmentID (Slicer v5.10.0,
        Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx lines 1397-1437), and
        updateGUIFromMRML is called only for effect parameters (EffectParameterModified:
        qSlicerSegmentEditorAbstractEffect.cxx lines 809, 924). Without this the next prompt would go to the
        segment selected when the effect was activated."""
        editor = self.scriptedEffect.parameterSetNode()
        if self._editorObservation is not None and self._editorObservation[0] is editor:
            return
        self._unobserveEditor()
        if editor is not None:
            self._editorObservation = (editor, editor.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onEditorModified))

    def _unobserveEditor(self):
        if self._editorObservation is not None:
            editor, tag = self._editorObservation
            editor.RemoveObserver(tag)
            self._editorObservation = None

    def _onEditorModified(self, caller=None, event=None):
        """The editor node changed: follow its selected segment once the current event is over (the editor
        node may change while the controller itself adds a segment; by then both agree and nothing happens)."""
        if not self._syncingToEditor and self.controller is not None:
            qt.QTimer.singleShot(0, self._followEditorSelection)

    def _followEditorSelection(self):
        """The editor's selected segment becomes the controller's target (a no-op when it already is; the
        segmentation itself cannot change while the effect is active: the editor deactivates it first)."""
        editor = self.scriptedEffect.parameterSetNode()
        if self.controller is None or editor is None or not self.scriptedEffect.active():
            return
        self.controller.set_target(editor.GetSegmentationNode(), editor.GetSelectedSegmentID() or None)

    def _onSceneStartClose(self, caller=None, event=None):
        if self.controller is not None:
            self.controller.set_volume(None)
            self.controller.set_target(None, None)


def _sourceVolume(editor):
    return editor.GetSourceVolumeNode()  # (Slicer 5.10 still also calls the deprecated masterVolumeNodeChanged)


def _selectData(comboBox, data):
    wasBlocked = comboBox.blockSignals(True)
    index = comboBox.findData(data)
    if index < 0 and data:
        comboBox.addItem(Path(data).stem, data)
        index = comboBox.count - 1
    comboBox.currentIndex = index
    comboBox.blockSignals(wasBlocked)


def _selectText(comboBox, text):
    wasBlocked = comboBox.blockSignals(True)
    comboBox.currentIndex = max(0, comboBox.findText(text))
    comboBox.blockSignals(wasBlocked)
