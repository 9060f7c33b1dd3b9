"""The Segment Editor effect "ENSAM": box and foreground/background clicks inside the Segment Editor.

Registered by ENSAMSegment.registerEditorEffect at start-up. The same PromptController and
PromptPanel as the ENSAMSegment module do the work; this class only maps the Segment Editor onto
them: the source volume is the image, the selected segment is the current object, the editor's
parameter node (a vtkMRMLSegmentEditorNode) supplies the masking and overwrite settings of every
write, and scriptedEffect.saveStateForUndo() runs before every change, so the editor's own undo
(Z / Ctrl+Z) restores the segmentation too. The effect's Undo (U) also steps the prompts back.

Imports are absolute (ENSAMSegmentLib.…): Slicer may load this file by path.
"""

import logging
from pathlib import Path

import qt

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from ENSAMSegmentLib.mrml.promptcontroller import ACTIONS, DEFAULT_MODEL, DEVICES, model_choices

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
            "The source volume is encoded once. Writes follow the masking settings below (editable "
            f"area, intensity range, overwrite). Keys: {keys}.</html>"
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
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.timingLabel = qt.QLabel()
        self.scriptedEffect.addOptionsWidget(self.timingLabel)
        self.installButton = qt.QPushButton("Install dependencies...")
        self.installButton.toolTip = "Install PyTorch (PyTorch extension), MONAI and scipy, after asking."
        self.installButton.visible = False
        self.scriptedEffect.addOptionsWidget(self.installButton)

        self.panel = PromptPanel(buttons, self.statusLabel, self.timingLabel, self.progressBar)
        self.modelComboBox.connect("activated(int)", self.updateMRMLFromGUI)
        self.deviceComboBox.connect("activated(int)", self.updateMRMLFromGUI)
        self.installButton.connect("clicked()", self.onInstallDependencies)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ModelPath", str(DEFAULT_MODEL))
        self.scriptedEffect.setParameterDefault("Device", "auto")

    def updateGUIFromMRML(self):
        _selectData(self.modelComboBox, self.scriptedEffect.parameter("ModelPath"))
        _selectText(self.deviceComboBox, self.scriptedEffect.parameter("Device"))
        if self.scriptedEffect.active() and not self._syncingToEditor:
            self._syncController()

    def updateMRMLFromGUI(self, *unused):
        index = self.modelComboBox.currentIndex
        if index >= 0:
            self.scriptedEffect.setParameter("ModelPath", self.modelComboBox.itemData(index))
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentText)

    # -- life cycle ----------------------------------------------------------------------------

    def activate(self):
        if not self._dependenciesReady():
            return
        self._syncController()
        self.panel.install_shortcuts()

    def deactivate(self):
        if self.panel is not None:
            self.panel.remove_shortcuts()
        if self.controller is not None and self.controller.active_tool() is not None:
            self.controller.stop_tool()

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()
        if self.controller is not None:
            self.controller.cleanup()
        self.controller = None

    def sourceVolumeNodeChanged(self):
        if self.scriptedEffect.active():
            self._syncController()

    def masterVolumeNodeChanged(self):  # Slicer before 5.2
        self.sourceVolumeNodeChanged()

    def interactionNodeModified(self, interactionNode):
        """Placing ENSAM's own prompts keeps the effect; any other placement ends it (Slicer's rule)."""
        if self.controller is not None and self.controller.active_tool() is not None:
            self.panel.refresh()
            return
        if interactionNode.GetCurrentInteractionMode() != interactionNode.ViewTransform:
            self.scriptedEffect.selectEffect("")

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor  # the markups place cursor shows when placing

    # -- controller ----------------------------------------------------------------------------

    def _syncController(self):
        """Segment Editor state -> controller (source volume, segmentation, selected segment, model)."""
        from ENSAMSegmentLib.mrml.promptcontroller import PromptController

        editor = self.scriptedEffect.parameterSetNode()
        if editor is None:
            return
        if self.controller is None:
            self.controller = PromptController(
                slicer.mrmlScene, slicer.app.applicationLogic(), wake=self.panel.wake,
                on_change=self._onControllerChanged, editor_node=editor,
                before_change=self.scriptedEffect.saveStateForUndo)
            self.panel.set_controller(self.controller)
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

    def _dependenciesReady(self):
        from ENSAMSegmentLib.slicerui import dependencies

        ready = dependencies.current_plan().satisfied
        self.installButton.visible = not ready
        if not ready:
            self.statusLabel.text = "ENSAM needs more Python packages: press 'Install dependencies...'."
        return ready

    def onInstallDependencies(self):
        from ENSAMSegmentLib.slicerui import dependencies

        if dependencies.ensure_dependencies() and self._dependenciesReady() and self.scriptedEffect.active():
            self.activate()


def _sourceVolume(editor):
    getter = getattr(editor, "GetSourceVolumeNode", None) or editor.GetMasterVolumeNode
    return getter()


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
