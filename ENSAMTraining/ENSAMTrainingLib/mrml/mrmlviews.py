"""Training progress and coreset reports as MRML table and plot nodes (Slicer's own views show them).

`ProgressViews.update(progress)` keeps these nodes in step with a `TrainingProgress`:

    <prefix> loss              table: step, epoch (1-based), loss, lr, samples_per_s; a row per optimizer step
    <prefix> epochs            table: epoch, step, train_loss, dsc_auc, nsd_auc, final_dsc, final_nsd
    <prefix> loss chart        chart: "loss" (per step) and "epoch loss" (mean per epoch) against the step
    <prefix> validation chart  chart: final DSC and final NSD (after the last click) against the epoch

`coreset_tables(scene, report)` fills three tables from an `ensam coreset` report: counts per
dataset, counts per modality, and the skipped cases with the reason.

They are ordinary scene nodes: the table and plot views of Slicer show them, and saving the scene
writes the tables (.tsv through their storage nodes) and the charts. Each node carries the
attribute ``ENSAMTraining.role`` so a later update (or a reloaded scene) finds it again instead
of adding another; a node the user deleted is simply made again at the next update.
Uses the MRML API only (works on the slicer-core wheel).
"""

from __future__ import annotations

import math

from ENSAMTrainingLib.runs.progressparser import TrainingProgress

ROLE = "ENSAMTraining.role"
PREFIX = "ENSAM training"
LOSS_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_s")
EPOCH_COLUMNS = ("epoch", "step", "train_loss", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd")
SERIES = {  # role: (table role, x column, y column, colour, marker)
    "loss series": ("loss", "step", "loss", (0.12, 0.47, 0.71), False),
    "epoch loss series": ("epochs", "step", "train_loss", (1.0, 0.5, 0.05), True),
    "dsc series": ("epochs", "epoch", "final_dsc", (0.17, 0.63, 0.17), True),
    "nsd series": ("epochs", "epoch", "final_nsd", (0.84, 0.15, 0.16), True),
}
CHARTS = {  # role: (title, x title, y title, series roles)
    "loss chart": ("ENSAM training loss", "optimizer step", "loss", ("loss series", "epoch loss series")),
    "validation chart": ("ENSAM validation", "epoch", "score (after the last click)", ("dsc series", "nsd series")),
}


def _nan(value) -> float:
    return float(value) if value is not None else math.nan


def find_node(scene, class_name: str, role: str):
    """The node of ``class_name`` with attribute ENSAMTraining.role == role, or None."""
    nodes = scene.GetNodesByClass(class_name)
    nodes.UnRegister(scene)  # the collection is returned with a reference the caller owns (as slicer.util does)
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ROLE) == role:
            return node
    return None


def role_node(scene, class_name: str, role: str, name: str):
    """find_node, or a new node of that role named ``name``."""
    node = find_node(scene, class_name, role)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
        node.SetAttribute(ROLE, role)
    return node


def fill_table(node, columns: list[tuple[str, str]], rows: list[tuple]) -> None:
    """Replace the table's content: ``columns`` = [(name, "double" | "int" | "string")], one tuple per row."""
    import vtk

    kinds = {"double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray, "string": vtk.vtkStringArray}
    table = vtk.vtkTable()
    for name, kind in columns:
        array = kinds[kind]()
        array.SetName(name)
        array.SetNumberOfValues(len(rows))
        table.AddColumn(array)
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            kind = columns[c][1]
            column = table.GetColumn(c)
            if kind == "string":
                column.SetValue(r, "" if value is None else str(value))
            elif kind == "int":
                column.SetValue(r, int(value or 0))
            else:
                column.SetValue(r, _nan(value))
    modifying = node.StartModify()
    node.SetAndObserveTable(table)
    for name, kind in columns:  # so the storage node writes the types and reading gives them back
        node.SetColumnProperty(name, "type", kind)
    node.EndModify(modifying)


def _append_rows(node, rows: list[tuple]) -> None:
    table = node.GetTable()
    modifying = node.StartModify()
    for row in rows:
        r = table.InsertNextBlankRow()
        for c, value in enumerate(row):
            table.GetColumn(c).SetValue(r, _nan(value))
    table.Modified()
    node.Modified()
    node.EndModify(modifying)


class ProgressViews:
    """Table, plot-series and chart nodes that show one run's progress (module docstring)."""

    def __init__(self, scene, prefix: str = PREFIX):
        self.scene = scene
        self.prefix = prefix
        self._steps_written: list[int] = []  # step numbers now in the loss table
        self._epochs_written: list[tuple] = []

    def node(self, role: str):
        """The node of ``role`` ("loss", "epochs", one of SERIES or CHARTS), made when missing."""
        if role in ("loss", "epochs"):
            node = role_node(self.scene, "vtkMRMLTableNode", role, f"{self.prefix} {role}")
            if node.GetNumberOfColumns() == 0:
                self._reset_table(role, node)
            return node
        if role in SERIES:
            table_role, x, y, colour, marker = SERIES[role]
            table = self.node(table_role)
            node = role_node(self.scene, "vtkMRMLPlotSeriesNode", role, f"{self.prefix} {role[:-7]}")
            if node.GetTableNodeID() != table.GetID():
                node.SetAndObserveTableNodeID(table.GetID())
                node.SetXColumnName(x)
                node.SetYColumnName(y)
                node.SetPlotType(node.PlotTypeScatter)
                node.SetColor(*colour)
                node.SetMarkerStyle(node.MarkerStyleCircle if marker else node.MarkerStyleNone)
            return node
        title, x_title, y_title, series = CHARTS[role]
        chart = role_node(self.scene, "vtkMRMLPlotChartNode", role, f"{self.prefix} {role}")
        chart.SetTitle(title)
        chart.SetXAxisTitle(x_title)
        chart.SetYAxisTitle(y_title)
        for series_role in series:
            series_node = self.node(series_role)
            if not chart.HasPlotSeriesNodeID(series_node.GetID()):
                chart.AddAndObservePlotSeriesNodeID(series_node.GetID())
        return chart

    def _reset_table(self, role: str, node) -> None:
        names = LOSS_COLUMNS if role == "loss" else EPOCH_COLUMNS
        fill_table(node, [(n, "double") for n in names], [])
        if role == "loss":
            self._steps_written = []
        else:
            self._epochs_written = []

    def charts(self) -> tuple:
        """(loss chart, validation chart), made when missing."""
        return self.node("loss chart"), self.node("validation chart")

    def update(self, progress: TrainingProgress) -> None:
        """Bring the nodes up to date with ``progress`` (new steps appended; a resumed history redrawn)."""
        self.charts()
        loss = self.node("loss")
        steps = [s.step for s in progress.steps]
        written = self._steps_written
        if loss.GetNumberOfRows() != len(written) or steps[: len(written)] != written:
            self._reset_table("loss", loss)
            written = self._steps_written
        new = progress.steps[len(written):]
        if new:
            _append_rows(loss, [(s.step, s.epoch + 1, s.loss, s.lr, s.samples_per_s) for s in new])
            self._steps_written = steps
        rows = [(r.epoch + 1, r.step, r.train_loss, *(r.metric(m) for m in EPOCH_COLUMNS[3:]))
                for r in progress.epochs]
        epochs = self.node("epochs")
        if rows != self._epochs_written or epochs.GetNumberOfRows() != len(rows):
            fill_table(epochs, [(n, "double") for n in EPOCH_COLUMNS], rows)
            self._epochs_written = rows

    def clear(self) -> None:
        """Empty both tables (a new run starts)."""
        for role in ("loss", "epochs"):
            self._reset_table(role, self.node(role))


# ---------------------------------------------------------------------------- coreset report


def _skipped_text(skipped: dict) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))


def coreset_tables(scene, report: dict, prefix: str = "ENSAM coreset") -> tuple:
    """(datasets, modalities, skipped) table nodes filled from an `ensam coreset` report dict."""
    datasets = role_node(scene, "vtkMRMLTableNode", "coreset datasets", f"{prefix} datasets")
    fill_table(
        datasets,
        [("dataset", "string"), ("modality", "string"), ("found", "int"), ("selected", "int"),
         ("skipped", "string"), ("excluded", "string")],
        [(r["dataset"], r["modality"], r["found"], r["selected"], _skipped_text(r.get("skipped", {})),
          "excluded" if r.get("excluded") else "") for r in report.get("datasets", [])],
    )
    modalities = role_node(scene, "vtkMRMLTableNode", "coreset modalities", f"{prefix} modalities")
    fill_table(
        modalities, [("modality", "string"), ("found", "int"), ("selected", "int")],
        [(m, c.get("found", 0), c.get("selected", 0)) for m, c in sorted(report.get("modalities", {}).items())],
    )
    skipped = role_node(scene, "vtkMRMLTableNode", "coreset skipped", f"{prefix} skipped cases")
    fill_table(
        skipped, [("case", "string"), ("dataset", "string"), ("reason", "string"), ("detail", "string")],
        [(s["case"], s["dataset"], s["reason"], s.get("detail", "")) for s in report.get("skipped", [])],
    )
    return datasets, modalities, skipped


__all__ = ["CHARTS", "EPOCH_COLUMNS", "LOSS_COLUMNS", "ROLE", "SERIES", "ProgressViews", "coreset_tables",
           "fill_table", "find_node", "role_node"]
