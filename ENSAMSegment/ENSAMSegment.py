"""ENSAMSegment: interactive 3D segmentation with ENSAM (box + foreground/background clicks).

Thin Slicer front-end; the work is done by ENSAMSegmentLib:
  mrml/promptcontroller  markups prompts -> session -> segments (no Qt; tested on slicer-core)
  core/worker            the model in a worker process (python-real), one per volume, shared with the effect
  slicerui/promptpanel   buttons, shortcuts, poll timer, status labels, Cancel (Qt; shared with the effect)
  slicerui/dependencies  first-run installation of torch (PyTorch extension), MONAI, scipy; the Slicer version
  slicerui/sampledata    the sample CT in the Sample Data module
  mrml                   volumes, markups, ROI and segmentation nodes <-> arrays; the self-test scenarios
  SegmentEditorEffect    the Segment Editor effect "ENSAM", registered here at start-up

Nothing at module level imports torch: the module must load (and offer to install it) without it, and
the model never runs in Slicer's process (core/worker.py says why). Needs Slicer 5.10 or newer.
"""

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ENSAMSegmentLib.mrml.actions import ACTIONS, DEFAULT_MODEL, DEVICES, PROMPT_NAMES, model_choices
from ENSAMSegmentLib.slicerui.dependencies import slicer_version_problem

EFFECT_SOURCE = os.path.join(os.path.dirname(__file__), "ENSAMSegmentLib", "SegmentEditorEffect.py")
EFFECT_NAME = "ENSAM"


def _versionProblem():
    """Why this Slicer cannot run ENSAM ("" when it can)."""
    return slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)


class ENSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ENSAM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["ENSAM for 3D Slicer developers"]
        keys = ", ".join(f"{key} {label.lower()}" for label, key in ACTIONS.values())
        self.parent.helpText = (
            "Segment any structure in a 3D image with ENSAM: draw a 3D box around it, then add "
            "foreground or background clicks. The segment updates after every interaction. "
            "The image is encoded once (in a separate process); each interaction then runs only the prompt "
            f"decoder. Keys (while this module or the effect is active): {keys}. A box drawn in one slice is "
            "as deep as the mean of its width and height; drag its handles in another view to change that. "
            "The same tools are in the Segment Editor as the effect 'ENSAM'. Try it on Sample Data > ENSAM. "
            "Needs 3D Slicer 5.10 or newer."
        )
        self.parent.acknowledgementText = (
            "ENSAM (Equivariant, Normalized, Segment Anything Model) was presented in the CVPR 2025 "
            "Foundation Models for Interactive 3D Biomedical Image Segmentation challenge."
        )
        if not _versionProblem():
            slicer.app.connect("startupCompleted()", registerEditorEffect)
            slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled sample CT in Sample Data, category ENSAM (slicerui/sampledata.py)."""
    from ENSAMSegmentLib.slicerui import sampledata

    try:
        sampledata.register()
    except Exception as error:  # never stops Slicer's start-up; said in the log
        logging.warning(f"ENSAM: the sample CT could not be added to Sample Data: {error}")


def registerEditorEffect():
    """Register the Segment Editor effect "ENSAM" that lives in ENSAMSegmentLib/SegmentEditorEffect.py.

    Slicer's loader (qSlicerSegmentEditorScriptedEffect::setPythonSource) looks the effect class up
    as sys.modules[<folder>].<file name>, here ENSAMSegmentLib.SegmentEditorEffect; when that is not
    a class it loads the file *as* the module "ENSAMSegmentLib", replacing this package. Binding the
    class there first (as SegmentEditorExtraEffects' Lib/__init__.py does with a star import) keeps
    the package intact; the core package's __init__ stays free of Qt.
    """
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    import ENSAMSegmentLib
    from ENSAMSegmentLib.SegmentEditorEffect import SegmentEditorEffect

    ENSAMSegmentLib.SegmentEditorEffect = SegmentEditorEffect
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    instance.self().register()


@parameterNodeWrapper
class ENSAMSegmentParameterNode:
    """inputVolume: the image; segmentation / segmentID: where the current object goes ('' = a new
    segment at the first prompt); modelPath: the model file; device: where the model runs."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentID: str = ""
    modelPath: Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"


class ENSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the .ui and connects it to a PromptController through a PromptPanel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._dependenciesReady = None  # None: not checked yet
        self._askedDependencies = False
        self._syncingFromController = False

    def setup(self):
        from ENSAMSegmentLib.mrml.promptcontroller import PromptController
        from ENSAMSegmentLib.slicerui.promptpanel import PromptPanel
        from ENSAMSegmentLib.slicerui.sessions import shared_pool

        ScriptedLoadableModuleWidget.setup(self)
        problem = _versionProblem()
        if problem:  # an older Slicer: say so instead of failing later (slicerui/dependencies.py)
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            logging.error(problem)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ENSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ENSAMSegmentLogic()

        ui = self.ui
        buttons = {"box": ui.boxButton, "foreground": ui.foregroundButton, "background": ui.backgroundButton,
                   "undo": ui.undoButton, "reset": ui.resetButton, "next": ui.nextObjectButton}
        self.panel = PromptPanel(buttons, ui.statusLabel, ui.timingLabel, ui.progressBar, ui.cancelButton)
        self.controller = PromptController(slicer.mrmlScene, slicer.app.applicationLogic(), wake=self.panel.wake,
                                           on_change=self.onControllerChanged, pool=shared_pool(),
                                           prompt_name=PROMPT_NAMES["module"])
        self.panel.set_controller(self.controller)

        self.refreshModelChoices()
        ui.modelComboBox.connect("activated(int)", self.onModelChosen)
        ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        """Module reloaded or Slicer closing: observers go, the worker is released (never waited for)."""
        self.removeObservers()
        if self.panel is not None:
            self.panel.cleanup()
        if self.controller is not None:
            self.controller.cleanup()

    def refreshModelChoices(self):
        """List the default model and the models in ~/.ensam/models (ENSAM Training installs there)."""
        combo = self.ui.modelComboBox
        current = combo.currentData
        combo.clear()
        for label, path in model_choices():
            combo.addItem(label, str(path))
        index = combo.findData(current) if current else -1
        combo.setCurrentIndex(max(index, 0))

    def enter(self):
        if self.controller is None:  # an older Slicer: the module only says why
            return
        self.refreshModelChoices()  # a model trained since the last visit appears at once
        self.initializeParameterNode()
        self.panel.install_shortcuts()  # the module's keys exist only while it is shown

    def exit(self):
        if self.controller is None:
            return
        self.panel.remove_shortcuts()
        if self.controller.active_tool() is not None:
            self.controller.stop_tool()
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.controller.set_volume(None)  # releases the volume's worker with the scene
        self.controller.set_target(None, None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.inputVolume:
            node.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not str(node.modelPath) or not node.modelPath.is_file():
            node.modelPath = DEFAULT_MODEL

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        """Parameters -> GUI extras and controller (each controller setter is a no-op when unchanged)."""
        node = self._parameterNode
        if node is None or self._syncingFromController:
            return
        self._showSegment(node.segmentation, node.segmentID)
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.findData(str(node.modelPath))  # -1: other
        self.ui.modelComboBox.blockSignals(wasBlocked)
        if not self.dependenciesReady():
            if node.inputVolume is not None and not self._askedDependencies:
                self._askedDependencies = True
                qt.QTimer.singleShot(0, self.onInstallDependencies)  # not from inside this MRML event
            return
        self.controller.set_model(node.modelPath, node.device)
        self.controller.set_volume(node.inputVolume)
        self.controller.set_target(node.segmentation, node.segmentID or None)
        self._showModel()
        self.panel.refresh()

    def _showSegment(self, segmentationNode, segmentID):
        selector = self.ui.segmentSelector
        wasBlocked = selector.blockSignals(True)
        if selector.currentNode() is not segmentationNode:
            selector.setCurrentNode(segmentationNode)
        selector.setCurrentSegmentID(segmentID)
        selector.blockSignals(wasBlocked)

    def _showModel(self):
        """What the model's worker said about it (parameters, training data, device), else its file name.
        Nothing is read here: reading a model file means torch, which stays out of Slicer's process."""
        summary = self.controller.model_summary
        if not summary and self._parameterNode is not None:
            summary = f"{Path(str(self._parameterNode.modelPath)).name}: details once the model is loaded."
        self.ui.modelInfoLabel.text = summary

    # -- user actions ------------------------------------------------------------------------------

    def onSegmentChanged(self, segmentID):
        if self._parameterNode is not None and not self._syncingFromController:
            self._parameterNode.segmentID = segmentID or ""

    def onModelChosen(self, index):
        if self._parameterNode is not None:
            self._parameterNode.modelPath = Path(self.ui.modelComboBox.itemData(index))

    def onInstallDependencies(self):
        from ENSAMSegmentLib.slicerui import dependencies

        self._dependenciesReady = dependencies.ensure_dependencies()
        if self.dependenciesReady():
            self.onParameterNodeModified()

    def onControllerChanged(self):
        """Controller -> parameter node and GUI: a segmentation or segment it created, status, buttons."""
        node, controller = self._parameterNode, self.controller
        # Only what the controller made (it has None before the parameters reach it: keep those).
        if node is not None and controller is not None and controller.segment_id and not self._syncingFromController:
            segmentation, segmentID = controller.segmentation_node, controller.segment_id
            if node.segmentation is not segmentation or node.segmentID != segmentID:
                self._syncingFromController = True  # the controller already has these: no echo back
                try:
                    with slicer.util.NodeModify(node.parameterNode):
                        node.segmentation = segmentation
                        node.segmentID = segmentID
                finally:
                    self._syncingFromController = False
                self._showSegment(segmentation, segmentID)
        if controller is not None:
            self._showModel()
        if self.panel is not None:
            self.panel.refresh()

    def dependenciesReady(self):
        """True when torch, MONAI and scipy are there (checked once; 'Install dependencies...' re-checks)."""
        from ENSAMSegmentLib.slicerui import dependencies

        if self._dependenciesReady is None:
            self._dependenciesReady = dependencies.current_plan().satisfied
        if not self._dependenciesReady:
            self.ui.statusLabel.text = "ENSAM needs more Python packages: press 'Install dependencies...'."
        self.ui.installDependenciesButton.visible = not self._dependenciesReady
        return self._dependenciesReady


class ENSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """GUI-free helpers of the module (usable from the Python console and the self-test)."""

    def getParameterNode(self):
        return ENSAMSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def defaultModelPath():
        return DEFAULT_MODEL

    @staticmethod
    def describeModel(path):
        """One line about a model file: parameters, training data, creation date. Imports torch in this
        process (the module itself shows what its worker process reports instead)."""
        from ENSAMSegmentLib.core.modelfile import read_model_info

        info = read_model_info(path)
        return f"{info.parameters / 1e6:.2f} M parameters, trained on: {info.training_data or 'unknown'}" + (
            f", created {info.created[:10]}" if info.created else "")


class ENSAMSegmentTest(ScriptedLoadableModuleTest):
    """Runs the shared MRML scenarios (the same functions pytest runs on slicer-core), then clicks
    through the module: volume, box, foreground click, undo, next object."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Reload and Test: every test; what cannot run in this Slicer is skipped with the reason."""
        from ENSAMSegmentLib.slicerui.selftest import run_each

        run_each(self, (self.test_mrml_scenarios, self.test_module_widget))

    def _requireSlicer(self):
        problem = _versionProblem()
        if problem:
            self.skipTest(problem)

    def _requireTorch(self):
        from ENSAMSegmentLib.slicerui import dependencies

        plan = dependencies.current_plan()
        if not plan.satisfied:
            self.skipTest(f"needs ENSAM's Python packages, which are not installed here ({plan.describe()}) "
                          "ENSAM Segment offers to install them when it is opened")

    def test_mrml_scenarios(self):
        from ENSAMSegmentLib.mrml.selftest_scenarios import SCENARIOS

        self._requireSlicer()
        for name, scenario in SCENARIOS.items():
            self.delayDisplay(f"MRML scenario: {name}", 50)
            slicer.mrmlScene.Clear()
            scenario(slicer.mrmlScene)

    def _waitIdle(self, controller, timeout=120.0):
        end = time.monotonic() + timeout
        while controller.busy:
            self.assertLess(time.monotonic(), end, f"ENSAM still busy: {controller.status}")
            slicer.app.processEvents()
            time.sleep(0.01)
        slicer.app.processEvents()

    def _segmentArray(self, segmentationNode, segmentID, volumeNode):
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentID, volumeNode).astype(bool)

    def _modelPath(self):
        """The shipped model, or (in a source checkout without it) a small untrained one."""
        if DEFAULT_MODEL.is_file():
            return DEFAULT_MODEL
        from ENSAMSegmentLib.core.modelfile import create_untrained_model_file
        from ENSAMSegmentLib.core.network import ENSAMConfig

        path = Path(slicer.app.temporaryPath) / "ENSAMSegmentTest-untrained.pt"
        config = ENSAMConfig(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
        return create_untrained_model_file(path, seed=0, config=config)

    def test_module_widget(self):
        """The module's buttons on a phantom, the model in its worker process (python-real)."""
        self._requireSlicer()
        self._requireTorch()
        import numpy as np

        from ENSAMSegmentLib.core.geometry import VolumeGeometry
        from ENSAMSegmentLib.mrml import prompts, volumes
        from ENSAMSegmentLib.core.phantom import make_phantom
        from ENSAMSegmentLib.mrml.promptcontroller import roi_for_box

        self.delayDisplay("Phantom volume")
        image, labels = make_phantom((32, 48, 48), seed=1, spacing=(2.0, 1.0, 1.0), n_objects=1)
        geometry = VolumeGeometry.from_lps((1.0, 1.0, 2.0), (-24.0, -24.0, -32.0), np.eye(3), image.shape)
        volumeNode = volumes.add_volume(slicer.mrmlScene, image, geometry, "ENSAMSegmentTest phantom")
        inside = np.argwhere(labels == 1)
        lo, hi = inside.min(0), inside.max(0)

        self.delayDisplay("Open the module")
        slicer.util.selectModule("ENSAMSegment")
        widget = slicer.modules.ENSAMSegmentWidget
        controller, ui = widget.controller, widget.ui
        self.assertEqual(set(widget.panel.shortcuts), {key for _, key in ACTIONS.values()})
        widget._parameterNode.modelPath = self._modelPath()
        widget._parameterNode.device = "cpu"
        ui.inputVolumeSelector.setCurrentNode(volumeNode)
        self.assertIs(controller.volume_node, volumeNode)
        self._waitIdle(controller)
        self.assertIn("Ready", controller.status)
        from ENSAMSegmentLib.core.interpreter import python_interpreter

        session = controller.session  # the model runs in a worker process on Slicer's real interpreter
        self.assertNotEqual(session.pid, os.getpid())
        self.assertEqual(session.process.args[0], python_interpreter())
        self.assertTrue(session.device_name.startswith("cpu"), session.device_name)

        self.delayDisplay("Box: the button enters ROI placement; an ROI placed on the structure")
        ui.boxButton.click()
        self.assertEqual(controller.active_tool(), "box")
        self.assertTrue(ui.boxButton.checked)
        ui.boxButton.click()
        self.assertIsNone(controller.active_tool())
        roi = controller.prompt_nodes()[2]
        prompts.set_roi(roi, *roi_for_box(controller.geometry, lo, hi))
        self._waitIdle(controller)
        segmentationNode = ui.segmentationSelector.currentNode()
        segmentID = ui.segmentSelector.currentSegmentID()
        self.assertIsNotNone(segmentationNode)
        self.assertTrue(segmentID)
        afterBox = self._segmentArray(segmentationNode, segmentID, volumeNode)
        self.assertTrue(afterBox.any(), "the segment is empty after the box")

        self.delayDisplay("Foreground click")
        ui.foregroundButton.click()
        self.assertEqual(controller.active_tool(), "foreground")
        foreground = controller.prompt_nodes()[0]
        center = inside[len(inside) // 2]
        foreground.AddControlPointWorld(*geometry.kji_to_ras(center).tolist())
        self._waitIdle(controller)
        objectPrompts = controller.session.object_prompts(controller.object_for_segment(segmentID))
        self.assertEqual(objectPrompts.fg, (tuple(int(v) for v in center),))
        widget.panel.trigger("foreground")  # what its key does: toggles the tool off
        self.assertIsNone(controller.active_tool())

        self.delayDisplay("Undo restores the segment after the box")
        ui.undoButton.click()
        self._waitIdle(controller)
        np.testing.assert_array_equal(self._segmentArray(segmentationNode, segmentID, volumeNode), afterBox)
        self.assertEqual(foreground.GetNumberOfControlPoints(), 0)

        self.delayDisplay("Next object: a new, empty, selected segment")
        ui.nextObjectButton.click()
        newID = ui.segmentSelector.currentSegmentID()
        self.assertTrue(newID and newID != segmentID)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertFalse(self._segmentArray(segmentationNode, newID, volumeNode).any())
        self.delayDisplay("Module test passed")
        logging.info("ENSAMSegmentTest: module widget test passed")
