"""ENSAMTraining: select a coreset of labelled cases, train or fine-tune ENSAM on it, use the model in ENSAM Segment.

Thin Slicer front-end; the work is done by ENSAMTrainingLib (no Qt, tested on slicer-core):
  mrml/controller     the workflow: coreset selection, start / stop / resume, "Train on this scene", install
  runs/command        the `ensam train` / `ensam coreset` command lines and the checks before starting
  runs/process        the child processes, polled here by a QTimer (training never runs in the GUI thread)
  runs/folders        run folders: new ones, the last resumable one
  mrml/mrmlviews      progress -> table and plot nodes (Slicer's table and plot views; saved with the scene)
  mrml/sceneexport    segmentations + reference volumes -> challenge-format training cases
  mrml/models         the models ENSAM Segment offers (~/.ensam/models)
  mrml/scenarios      the checks the self-test runs (the same functions pytest runs)

Nothing at module level imports torch: the module must load before torch is installed (the checks
that need it import it when a button is pressed).
"""

import logging
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ENSAMTrainingLib.runs.command import DEFAULT_EPOCHS, DEFAULT_VOXEL_BUDGET

DEVICES = ("auto", "cpu", "cuda", "mps")
POLL_INTERVAL_MS = 500
DATA_FOLDER_DELAY_MS = 600  # the data folder is described once typing has paused this long


class ENSAMTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ENSAM Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["ENSAMSegment"]
        self.parent.contributors = ["ENSAM for 3D Slicer developers"]
        self.parent.helpText = (
            "Train or fine-tune ENSAM on your own labelled cases, without a server. Choose a folder of "
            "CVPR 2025 challenge .npz files or image/label pairs, optionally select a coreset (an equal "
            "number of cases from every dataset, unusable cases skipped with the reason), set the epochs, "
            "voxel budget and device, and press Start. Training runs in a separate process: Stop saves a "
            "checkpoint, Resume continues it. 'Train on this scene' fine-tunes a model on the segmentations "
            "of the current scene. 'Use in ENSAM Segment' makes the finished model available there."
        )
        self.parent.acknowledgementText = "ENSAM: Equivariant, Normalized, Segment Anything Model."


@parameterNodeWrapper
class ENSAMTrainingParameterNode:
    """The module's settings (saved with the scene). Paths left empty read as '.' (see _path)."""

    dataFolder: Path
    coresetFraction: Annotated[float, WithinRange(0.001, 1.0)] = 0.1  # decimals and step: the .ui's spin box
    coresetMax: Annotated[int, WithinRange(0, 10_000_000)] = 0  # 0: no maximum
    coresetExclude: str = ""
    useCoreset: bool = True
    epochs: Annotated[int, WithinRange(1, 10_000)] = DEFAULT_EPOCHS
    voxelBudget: Annotated[int, WithinRange(4096, 2**31 - 1)] = DEFAULT_VOXEL_BUDGET
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    outputFolder: Path
    initModel: Path


def _stopRequested(controller):
    """True when the running training was already asked to stop. Quitting Slicer calls both cleanup() and
    onAboutToQuit (qSlicerCoreApplication::onAboutToQuit unloads the modules, which calls cleanup():
    Base/QTCore/qSlicerCoreApplication.cxx, v5.10.0 lines 610 and 2161-2165), and a second request_stop
    kills the run at once, without the checkpoint the close confirmation promised."""
    training = controller.training
    return training is not None and training.stop_requests > 0


def _path(value):
    """A Path parameter, or None when the field is empty."""
    return None if value is None or str(value) in ("", ".") else Path(value)


class CloseGuard(qt.QObject):
    """Event filter on Slicer's main window: closing it while a training runs asks first. It only asks: the
    run is stopped at aboutToQuit, once the close went through Slicer's own confirmation too (an event
    filter sees the Close event before qSlicerMainWindow::closeEvent asks about unsaved data, and that
    question may still cancel the close)."""

    def __init__(self, widget):
        qt.QObject.__init__(self)
        self.widget = widget

    def eventFilter(self, watched, event):
        if event.type() == qt.QEvent.Close and not self.widget.confirmClose():
            event.ignore()
            return True
        return False


class ENSAMTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the .ui, connects it to the parameter node and to the logic's TrainingController."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.timer = None
        self.closeGuard = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ENSAMTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ENSAMTrainingLogic()

        ui = self.ui
        ui.selectCoresetButton.connect("clicked()", self.onSelectCoreset)
        ui.startButton.connect("clicked()", self.onStart)
        ui.stopButton.connect("clicked()", self.onStop)
        ui.resumeButton.connect("clicked()", self.onResume)
        ui.trainOnSceneButton.connect("clicked()", self.onTrainOnScene)
        ui.useInSegmentButton.connect("clicked()", self.onUseInSegment)
        ui.showChartButton.connect("clicked()", self.onShowChart)
        # currentPathChanged fires on every keystroke that forms a path (ctkPathLineEdit): describe the
        # folder (a walk of its tree) only once typing has paused
        self.dataFolderTimer = qt.QTimer()
        self.dataFolderTimer.setSingleShot(True)
        self.dataFolderTimer.setInterval(DATA_FOLDER_DELAY_MS)
        self.dataFolderTimer.connect("timeout()", self.onDataFolderSettled)
        ui.dataFolderPathLineEdit.connect("currentPathChanged(QString)", self.onDataFolderChanged)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPoll)
        mainWindow = slicer.util.mainWindow()  # None with --no-main-window (the generic tests)
        if mainWindow is not None:
            self.closeGuard = CloseGuard(self)
            mainWindow.installEventFilter(self.closeGuard)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.refresh()

    def cleanup(self):
        """Slicer closes, or the module is reloaded: ask a running training to stop with a checkpoint. Nothing
        waits for it: the run finishes its step, writes the checkpoint and exits by itself (its folder's
        lock refuses another run there until it has)."""
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        mainWindow = slicer.util.mainWindow()
        if self.closeGuard is not None and mainWindow is not None:
            mainWindow.removeEventFilter(self.closeGuard)
        if self.logic is not None and not _stopRequested(self.logic.controller):
            self.logic.controller.request_stop()

    def enter(self):
        self.initializeParameterNode()
        self.refresh()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.refresh()  # the table and chart nodes are made again at the next update

    # -- parameter node --------------------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if _path(node.outputFolder) is None:
            node.outputFolder = Path.home() / "ENSAM" / "training"

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onParameterNodeModified(self, caller=None, event=None):
        self.refresh()

    # -- actions ------------------------------------------------------------------------------------

    def _run(self, action, *args):
        """Call a logic action; a refusal is shown to the user, then the GUI follows the new state.
        torch, MONAI and scipy are installed first (after asking) when they are missing."""
        from ENSAMSegmentLib.slicerui import dependencies
        from ENSAMTrainingLib.mrml.controller import USER_ERRORS

        if not dependencies.ensure_dependencies():
            return None
        try:
            result = action(*args)
        except USER_ERRORS as error:
            slicer.util.errorDisplay(str(error), windowTitle="ENSAM Training")
            result = None
        if self.logic.controller.busy:
            self.timer.start()
        self.refresh()
        return result

    def onDataFolderChanged(self, _path):
        self.dataFolderTimer.start()  # (re)starts: onDataFolderSettled runs once typing has paused

    def onDataFolderSettled(self):
        path = self.ui.dataFolderPathLineEdit.currentPath
        self.ui.dataSummaryLabel.text = self.logic.describeDataFolder(path) if path else ""

    def onSelectCoreset(self):
        self._run(self.logic.selectCoreset, self._parameterNode)

    def onStart(self):
        self._startRun(self.logic.startTraining)

    def onStop(self):
        self._run(self.logic.controller.request_stop)

    def onResume(self):
        self._startRun(self.logic.resume)

    def onTrainOnScene(self):
        self._startRun(self.logic.trainOnScene)

    def _startRun(self, action):
        self.ui.logTextEdit.clear()
        if self._run(action, self._parameterNode) is not None:
            self.onShowChart()

    def onUseInSegment(self):
        path = self._run(self.logic.useInSegment, self.ui.modelNameLineEdit.text)
        if path is not None:
            slicer.util.infoDisplay(f"Installed {path}.\nENSAM Segment now uses it (model '{path.stem}').",
                                    windowTitle="ENSAM Training")

    def onShowChart(self):
        chart = self.logic.controller.views.charts()[0]
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onPoll(self):
        controller = self.logic.controller
        lines = controller.poll()
        if lines:
            self.ui.logTextEdit.appendPlainText("\n".join(lines))
        if not controller.busy:
            self.timer.stop()
        self.refresh()

    # -- closing Slicer while training ----------------------------------------------------------

    def confirmClose(self):
        """True when Slicer may go on closing: nothing runs, or the user agreed that closing stops the run.
        Nothing is stopped here: Slicer's own confirmation comes next and may still cancel the close."""
        controller = self.logic.controller
        if not controller.busy:
            return True
        return slicer.util.confirmYesNoDisplay(
            "ENSAM training is running. If Slicer closes, the training stops after its current step and saves a "
            "checkpoint; 'Resume' in ENSAM Training continues it later.\n\nClose Slicer?",
            windowTitle="ENSAM Training",
        )

    def onAboutToQuit(self):
        """The close went through every confirmation: ask the run to stop (checkpoint), without waiting."""
        if self.logic is not None:
            if not _stopRequested(self.logic.controller):  # cleanup() may have asked already: see _stopRequested
                self.logic.controller.request_stop()
            if self.logic.controller.coreset_running:
                self.logic.controller.clear_coreset()

    # -- GUI state ----------------------------------------------------------------------------------

    def refresh(self):
        """Buttons, progress bar, tables and labels from the controller's state."""
        ui, controller = self.ui, self.logic.controller
        busy = controller.busy
        ui.selectCoresetButton.enabled = not busy
        ui.startButton.enabled = not busy
        ui.trainOnSceneButton.enabled = not busy
        ui.stopButton.enabled = controller.training_running
        ui.stopButton.text = "Stop now" if controller.training_running and controller.training.stop_requests else "Stop"
        ui.resumeButton.enabled = not busy and self.logic.resumableRun(self._parameterNode) is not None
        ui.useInSegmentButton.enabled = controller.finished_model is not None and not busy
        training = controller.training
        if training is not None:
            ui.progressBar.value = int(round(1000 * training.progress.fraction))
            ui.progressLabel.text = training.progress.summary() if training.running else training.message
            if controller.finished_model is not None and not ui.modelNameLineEdit.text:
                ui.modelNameLineEdit.text = training.command.run_dir.name
        views = controller.views
        if training is not None and ui.metricsTableView.mrmlTableNode() is not views.node("epochs"):
            ui.metricsTableView.setMRMLTableNode(views.node("epochs"))
        coreset = controller.coreset
        if coreset is not None and coreset.report is not None:
            from ENSAMTrainingLib.mrml.mrmlviews import find_node

            ui.coresetDatasetsTableView.setMRMLTableNode(find_node(slicer.mrmlScene, "vtkMRMLTableNode", "coreset datasets"))
            ui.coresetSkippedTableView.setMRMLTableNode(find_node(slicer.mrmlScene, "vtkMRMLTableNode", "coreset skipped"))
            modalities = coreset.report.get("modalities", {})
            ui.coresetLabel.text = "Per modality: " + ", ".join(
                f"{m} {c['selected']}/{c['found']}" for m, c in modalities.items()) + (
                f"\n{coreset.problem}" if coreset.problem else "")
        ui.modelsLabel.text = self.logic.describeOfferedModels()
        ui.statusLabel.text = controller.message


class ENSAMTrainingLogic(ScriptedLoadableModuleLogic):
    """The module's actions on a parameter node (usable from the Python console and the self-test)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from ENSAMTrainingLib.mrml.controller import TrainingController

        self.controller = TrainingController(slicer.mrmlScene)
        self.extraOptions = {}  # further `ensam train` flags, e.g. {"workers": 2} (the self-test makes tiny runs)

    def getParameterNode(self):
        return ENSAMTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def describeDataFolder(path):
        """What the folder holds, or why it cannot be trained on ("" before torch is installed)."""
        from ENSAMSegmentLib.slicerui import dependencies
        from ENSAMTrainingLib.runs.command import describe_data_folder

        if not dependencies.current_plan().satisfied:
            return ""
        return describe_data_folder(path)

    def selectCoreset(self, p):
        from ENSAMTrainingLib.runs.command import parse_exclude

        return self.controller.start_coreset(_path(p.dataFolder), _path(p.outputFolder), p.coresetFraction,
                                             p.coresetMax or None, parse_exclude(p.coresetExclude))

    def trainingSettings(self, p):
        from ENSAMTrainingLib.runs import folders
        from ENSAMTrainingLib.runs.command import SetupError, TrainSettings

        output = _path(p.outputFolder)
        if output is None:
            raise SetupError("choose an output folder for the runs first")
        coreset = self.controller.coreset
        cases = coreset.list_path if p.useCoreset and coreset is not None else None
        if cases is not None and _path(p.dataFolder) is not None and Path(p.dataFolder).resolve() != coreset.data.resolve():
            raise SetupError(f"the selected coreset is of {coreset.data}: select a coreset of this data "
                             "folder, or untick 'Train on the selected coreset'")
        return TrainSettings(data=_path(p.dataFolder), run_dir=folders.new_folder(output), cases=cases, epochs=p.epochs,
                             voxel_budget=p.voxelBudget, device=p.device, init_model=_path(p.initModel),
                             options=dict(self.extraOptions))

    def startTraining(self, p):
        return self.controller.start_training(self.trainingSettings(p))

    def resumableRun(self, p):
        """The run Resume continues: the last run when it can be resumed, else the newest in the output folder."""
        from ENSAMTrainingLib.runs import folders

        training = self.controller.training
        if training is not None and folders.run_status(training.command.run_dir) == folders.RESUMABLE:
            return training.command.run_dir
        output = _path(p.outputFolder) if p is not None else None
        return folders.latest_resumable(output) if output is not None else None

    def resume(self, p):
        return self.controller.resume(self.resumableRun(p), device=p.device)

    def currentModel(self, p):
        """The model to fine-tune: 'Start from model', else ENSAM Segment's model, else the shipped default."""
        from ENSAMSegmentLib.mrml.promptcontroller import DEFAULT_MODEL

        if _path(p.initModel) is not None:
            return _path(p.initModel)
        try:
            import ENSAMSegment

            segmentModel = _path(ENSAMSegment.ENSAMSegmentLogic().getParameterNode().modelPath)
        except Exception as error:  # ENSAM Segment's parameters are a convenience here, never a requirement
            logging.warning(f"ENSAM Training: cannot read ENSAM Segment's model: {error}")
            segmentModel = None
        for candidate in (segmentModel, DEFAULT_MODEL):
            if candidate is not None and candidate.is_file():
                return candidate
        return None

    def trainOnScene(self, p):
        options = {k: v for k, v in self.extraOptions.items() if k != "model-config"}  # the model fixes it
        return self.controller.train_on_scene(_path(p.outputFolder), self.currentModel(p), epochs=p.epochs,
                                              device=p.device, voxel_budget=p.voxelBudget, options=options)

    def useInSegment(self, name):
        """Install the finished model for ENSAM Segment and make it ENSAM Segment's model."""
        path = self.controller.install_model(name or None)
        try:
            import ENSAMSegment

            ENSAMSegment.ENSAMSegmentLogic().getParameterNode().modelPath = path
        except Exception as error:  # installed all the same: ENSAM Segment lists it at its next start
            logging.warning(f"ENSAM Training: could not select the model in ENSAM Segment: {error}")
        return path

    @staticmethod
    def describeOfferedModels():
        from ENSAMTrainingLib.mrml.models import offered_models

        return "ENSAM Segment offers: " + ", ".join(label for label, _ in offered_models())


class ENSAMTrainingTest(ScriptedLoadableModuleTest):
    """Runs the shared logic scenarios (the same functions pytest runs on slicer-core) on Slicer's
    scene: bad input, coreset tables, scene export of an oblique volume, a short real training run
    with Stop / Resume / install, a killed run, and "Train on this scene"; then the module widget."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Reload and Test: every test; what cannot run in this Slicer is skipped with the reason."""
        from ENSAMSegmentLib.slicerui.selftest import run_each

        run_each(self, (self.test_logic_scenarios, self.test_module_widget))

    def _requireTorch(self):
        from ENSAMSegmentLib.slicerui import dependencies

        problem = dependencies.slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)
        if problem:
            self.skipTest(problem)
        plan = dependencies.current_plan()
        if not plan.satisfied:
            self.skipTest(f"needs ENSAM's Python packages, which are not installed here ({plan.describe()}) "
                          "ENSAM Segment offers to install them when it is opened")

    def test_logic_scenarios(self):
        from ENSAMTrainingLib.mrml.scenarios import SCENARIOS

        self._requireTorch()
        for name, scenario in SCENARIOS.items():
            self.delayDisplay(f"ENSAM Training scenario: {name}", 50)
            slicer.mrmlScene.Clear()
            with tempfile.TemporaryDirectory(prefix=f"ENSAMTrainingTest-{name}-") as work:
                scenario(slicer.mrmlScene, Path(work))

    def test_module_widget(self):
        """The module's own buttons: a coreset of a tiny data set, then a one-epoch run to the end."""
        self._requireTorch()
        from ENSAMTrainingLib.runs.process import wait_until
        from ENSAMTrainingLib.mrml.scenarios import FAST, TINY_BUDGET, tiny_dataset

        slicer.util.selectModule("ENSAMTraining")
        widget = slicer.modules.ENSAMTrainingWidget
        controller, ui, p = widget.logic.controller, widget.ui, widget._parameterNode
        with tempfile.TemporaryDirectory(prefix="ENSAMTrainingTest-widget-") as work:
            data = tiny_dataset(Path(work) / "data", 3)
            p.dataFolder, p.outputFolder = data, Path(work) / "out"
            p.coresetFraction, p.epochs, p.voxelBudget, p.device = 1.0, 1, TINY_BUDGET, "cpu"
            self.assertIn("3 cases", ui.dataSummaryLabel.text)
            ui.selectCoresetButton.click()
            self.assertTrue(wait_until(lambda: not controller.busy, 300, poll=self._processEvents))
            self.assertEqual(controller.coreset.report["selected"], 3, controller.message)
            self.assertEqual(ui.coresetDatasetsTableView.mrmlTableNode().GetNumberOfRows(), 2)  # CT_Phantom, MR_Phantom

            widget.logic.extraOptions = dict(FAST)
            ui.startButton.click()
            self.assertTrue(controller.training_running, controller.message)
            self.assertTrue(ui.stopButton.enabled and not ui.startButton.enabled)
            self.assertTrue(wait_until(lambda: not controller.busy, 300, poll=self._processEvents), controller.message)
            self.assertIsNotNone(controller.finished_model, controller.message)
            self.assertEqual(ui.progressBar.value, 1000)
            self.assertTrue(ui.useInSegmentButton.enabled)
            self.assertGreater(ui.metricsTableView.mrmlTableNode().GetNumberOfRows(), 0)
            widget.logic.extraOptions = {}
        self.delayDisplay("Module test passed")

    @staticmethod
    def _processEvents():
        slicer.app.processEvents()
