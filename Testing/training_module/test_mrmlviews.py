"""Progress and coreset reports as table and plot nodes of a real MRML scene (slicer-core)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ENSAMTrainingLib.mrml.mrmlviews import ProgressViews, coreset_tables, find_node
from ENSAMTrainingLib.runs.progressparser import ProgressParser, parse_stream

RECORDED = Path(__file__).parent / "data" / "progress_recorded.jsonl"


def column(node, name):
    table = node.GetTable()
    array = table.GetColumnByName(name)
    return [array.GetValue(r) for r in range(table.GetNumberOfRows())]


def count(scene, class_name):
    return scene.GetNumberOfNodesByClass(class_name)


def test_views_follow_the_recorded_stream(scene):
    text = RECORDED.read_text()
    parser, views = ProgressParser(), ProgressViews(scene)
    seen = []
    for line in text.splitlines(keepends=True):  # update after every line, as the timer would
        parser.feed(line)
        views.update(parser.progress)
        seen.append(views.node("loss").GetNumberOfRows())
    assert max(seen) == 4 and seen[-1] == 4
    loss = views.node("loss")
    p = parser.progress
    assert column(loss, "step") == [1, 2, 3, 4] and column(loss, "epoch") == [1, 1, 2, 2]
    assert column(loss, "loss") == pytest.approx([s.loss for s in p.steps])
    epochs = views.node("epochs")
    assert column(epochs, "epoch") == [1, 2] and column(epochs, "final_dsc") == [0.0, 0.0]
    assert all(math.isnan(v) for v in column(epochs, "dsc_auc"))  # null in the stream: NaN, not 0
    loss_chart, val_chart = views.charts()
    assert loss_chart.GetNumberOfPlotSeriesNodes() == 2 and val_chart.GetNumberOfPlotSeriesNodes() == 2
    series = [loss_chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert [(s.GetTableNodeID(), s.GetXColumnName(), s.GetYColumnName()) for s in series] == [
        (loss.GetID(), "step", "loss"), (epochs.GetID(), "step", "train_loss")]
    dsc = val_chart.GetNthPlotSeriesNode(0)
    assert (dsc.GetTableNodeID(), dsc.GetXColumnName(), dsc.GetYColumnName()) == (epochs.GetID(), "epoch", "final_dsc")
    assert (count(scene, "vtkMRMLTableNode"), count(scene, "vtkMRMLPlotSeriesNode"),
            count(scene, "vtkMRMLPlotChartNode")) == (2, 4, 2)


def test_a_resumed_history_is_redrawn(scene):
    """Steps redone after a resume replace the old ones: the table never holds a step twice."""
    views = ProgressViews(scene)
    first = parse_stream('{"event": "start", "epochs": 1, "total_steps": 3}\n'
                         + "".join(f'{{"event": "step", "epoch": 0, "step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3)))
    views.update(first.progress)
    resumed = parse_stream('{"event": "start", "epochs": 1, "total_steps": 3}\n'
                           + "".join(f'{{"event": "step", "epoch": 0, "step": {s}, "loss": 1.0}}\n' for s in (1, 2))
                           + '{"event": "start", "resumed": true, "epochs": 1, "total_steps": 3, "epoch": 0, "step": 1}\n'
                           + '{"event": "step", "epoch": 0, "step": 2, "loss": 0.25}\n')
    views.update(resumed.progress)
    assert column(views.node("loss"), "step") == [1, 2] and column(views.node("loss"), "loss") == [1.0, 0.25]


def test_nodes_are_found_again_and_made_again(scene):
    progress = parse_stream(RECORDED.read_text()).progress
    ProgressViews(scene).update(progress)
    views = ProgressViews(scene)  # e.g. the module reloaded: the same nodes, no duplicates
    views.update(progress)
    assert count(scene, "vtkMRMLTableNode") == 2 and count(scene, "vtkMRMLPlotChartNode") == 2
    scene.RemoveNode(views.node("loss"))  # the user deleted the table
    views.update(progress)
    assert count(scene, "vtkMRMLTableNode") == 2 and views.node("loss").GetNumberOfRows() == 4
    assert views.node("loss series").GetTableNodeID() == views.node("loss").GetID()
    scene.Clear(False)  # the scene was closed while training
    views.update(progress)
    assert views.node("loss").GetNumberOfRows() == 4 and views.charts()[0].GetNumberOfPlotSeriesNodes() == 2
    views.clear()
    assert views.node("loss").GetNumberOfRows() == 0 and views.node("epochs").GetNumberOfRows() == 0


def test_saved_with_the_scene(scene, tmp_path):
    """Tables write and read back through their storage nodes; charts and series are in the scene file."""
    import slicer

    views = ProgressViews(scene)
    views.update(parse_stream(RECORDED.read_text()).progress)
    loss = views.node("loss")
    assert loss.AddDefaultStorageNode()
    storage = loss.GetStorageNode()
    storage.SetFileName(str(tmp_path / "loss.tsv"))
    assert storage.WriteData(loss)
    back = scene.AddNewNodeByClass("vtkMRMLTableNode")
    reader = scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    reader.SetFileName(str(tmp_path / "loss.tsv"))
    assert reader.ReadData(back)
    assert column(back, "step") == [1, 2, 3, 4] and column(back, "loss") == pytest.approx(column(loss, "loss"), rel=1e-5)
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    copy = slicer.vtkMRMLScene()
    copy.SetLoadFromXMLString(1)
    copy.SetSceneXMLString(xml)
    copy.Import()
    chart = find_node(copy, "vtkMRMLPlotChartNode", "loss chart")
    assert chart is not None and chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(0).GetYColumnName() == "loss"


def test_coreset_tables_from_a_real_selection(scene, tmp_path):
    from ENSAMTrainingLib.core.coreset import select_coreset
    from ENSAMTrainingLib.mrml.scenarios import tiny_dataset

    data = tmp_path / "data"
    tiny_dataset(data / "CT" / "CT_Liver", 2, 1)
    tiny_dataset(data / "MR" / "MR_Knee", 1, 2)
    (data / "MR" / "MR_Knee" / "bad.npz").write_bytes(b"\0")
    report = select_coreset(data, 1.0).to_dict()
    datasets, modalities, skipped = coreset_tables(scene, report)
    assert column(datasets, "dataset") == ["CT_Liver", "MR_Knee"]
    assert column(datasets, "found") == [2, 2] and column(datasets, "selected") == [2, 1]
    assert column(datasets, "skipped") == ["", "unreadable: 1"] and column(datasets, "excluded") == ["", ""]
    assert column(modalities, "modality") == ["CT", "MR"] and column(modalities, "selected") == [2, 1]
    assert column(skipped, "case") == ["MR/MR_Knee/bad.npz"] and column(skipped, "reason") == ["unreadable"]
    assert column(skipped, "detail")[0]  # what the reader said
    coreset_tables(scene, {**report, "skipped": []})  # a new selection refills the same nodes
    assert skipped.GetNumberOfRows() == 0 and count(scene, "vtkMRMLTableNode") == 3
