"""ENSAMTraining: coreset selection and training of ENSAM on the user's data, from inside Slicer.

Thin Slicer front-end over ENSAMTrainingLib; training itself runs in a separate process
(`ensam train`), never in Slicer's GUI thread.
"""

import logging
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


class ENSAMTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ENSAM Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["ENSAMSegment"]
        self.parent.contributors = ["ENSAM for 3D Slicer developers"]
        self.parent.helpText = (
            "Select a coreset of your labelled cases (CVPR 2025 challenge .npz files or image/label "
            "pairs), train or fine-tune ENSAM on it, and use the trained model in ENSAM Segment."
        )
        self.parent.acknowledgementText = "ENSAM: Equivariant, Normalized, Segment Anything Model."


class ENSAMTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ENSAMTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ENSAMTrainingLogic()
        self.ui.modelsFolderLineEdit.currentPath = str(self.logic.userModelsFolder())
        self.ui.refreshModelsButton.connect("clicked()", self.onRefreshModels)
        self.onRefreshModels()

    def cleanup(self):
        self.removeObservers()

    def onRefreshModels(self):
        folder = Path(self.ui.modelsFolderLineEdit.currentPath)
        models = self.logic.listModels(folder)
        self.ui.modelsListWidget.clear()
        for path, description in models:
            self.ui.modelsListWidget.addItem(f"{path.name}: {description}")
        self.ui.statusLabel.text = f"{len(models)} model(s) in {folder}"


class ENSAMTrainingLogic(ScriptedLoadableModuleLogic):
    """GUI-free logic: where trained models live and what they are."""

    @staticmethod
    def userModelsFolder():
        """Folder where trained models are kept for ENSAMSegment (per user, outside the extension)."""
        return Path.home() / ".ensam" / "models"

    @staticmethod
    def listModels(folder):
        """(path, one-line description) of every readable ENSAM model file in `folder`."""
        from ENSAMSegmentLib.modelfile import ModelFileError, read_model_info

        models = []
        for path in sorted(Path(folder).glob("*.pt")):
            try:
                info = read_model_info(path)
            except ModelFileError as error:
                logging.warning(str(error))
                continue
            models.append((path, f"{info.parameters / 1e6:.2f} M parameters, {info.training_data}"))
        return models


class ENSAMTrainingTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_list_models()

    def test_list_models(self):
        import tempfile

        from ENSAMSegmentLib.modelfile import create_untrained_model_file

        with tempfile.TemporaryDirectory() as folder:
            create_untrained_model_file(Path(folder) / "a.pt")
            (Path(folder) / "broken.pt").write_bytes(b"not a model")
            models = ENSAMTrainingLogic.listModels(folder)
        self.assertEqual([path.name for path, _ in models], ["a.pt"])
        self.delayDisplay("Test passed")
