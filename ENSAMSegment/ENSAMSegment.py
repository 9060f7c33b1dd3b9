"""ENSAMSegment: interactive 3D segmentation with ENSAM (box + foreground/background clicks).

Thin Slicer front-end. The work is done by ENSAMSegmentLib:
  core        ENSAMSegmentLib.session.InferenceSession (model, cached embedding, objects, undo)
  MRML logic  ENSAMSegmentLib.mrml (volumes, markups, ROI and segmentation nodes <-> arrays)
"""

import logging

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


class ENSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ENSAM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["ENSAM for 3D Slicer developers"]
        self.parent.helpText = (
            "Segment any structure in a 3D image with ENSAM: draw a 3D box around it, then add "
            "foreground or background clicks. The segment updates after every interaction. "
            "The image is encoded once; each interaction then runs only the prompt decoder."
        )
        self.parent.acknowledgementText = (
            "ENSAM (Equivariant, Normalized, Segment Anything Model) was presented in the CVPR 2025 "
            "Foundation Models for Interactive 3D Biomedical Image Segmentation challenge."
        )


class ENSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the .ui and forwards user actions to ENSAMSegmentLogic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ENSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ENSAMSegmentLogic()
        self.ui.modelPathLineEdit.currentPath = str(self.logic.defaultModelPath())
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.onModelPathChanged(self.ui.modelPathLineEdit.currentPath)

    def cleanup(self):
        self.removeObservers()

    def onModelPathChanged(self, path):
        try:
            self.ui.statusLabel.text = self.logic.describeModel(path)
        except Exception as error:  # shown to the user, the module keeps working
            self.ui.statusLabel.text = f"Cannot use this model file: {error}"


class ENSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """GUI-free logic of the module (usable from the Python console and the self-test)."""

    @staticmethod
    def defaultModelPath():
        from ENSAMSegmentLib.modelfile import default_model_path

        return default_model_path()

    @staticmethod
    def describeModel(path):
        """One line about a model file: parameters, training data, version."""
        from ENSAMSegmentLib.modelfile import read_model_info

        info = read_model_info(path)
        return f"{info.parameters / 1e6:.2f} M parameters, trained on: {info.training_data}"


class ENSAMSegmentTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_default_model_loads()

    def test_default_model_loads(self):
        self.delayDisplay("Loading the default ENSAM model")
        logic = ENSAMSegmentLogic()
        description = logic.describeModel(logic.defaultModelPath())
        logging.info(description)
        self.assertIn("parameters", description)
        self.delayDisplay("Test passed")

