"""A headless MRML scene with the module logics ENSAM needs (slicer-core wheel, no Qt, no app).

Inside the Slicer application use ``slicer.mrmlScene`` and ``slicer.modules.*.logic()`` instead;
nothing else in ``ENSAMSegmentLib.mrml`` needs this file. Tests and the browser app call
`new_scene`, which wires the logics the way the application does at start-up:
application logic, colour logic with the default colour nodes (segmentations need them),
subject hierarchy, segmentations, markups, volumes and transforms.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HeadlessScene:
    """An MRML scene and its logics; keep this object alive as long as the scene is used."""

    scene: object  # slicer.vtkMRMLScene
    app_logic: object  # slicer.vtkSlicerApplicationLogic
    colors: object  # vtkMRMLColorLogic
    subject_hierarchy: object  # vtkSlicerSubjectHierarchyModuleLogic
    segmentations: object  # vtkSlicerSegmentationsModuleLogic
    markups: object  # vtkSlicerMarkupsLogic
    volumes: object  # vtkSlicerVolumesLogic
    transforms: object  # vtkSlicerTransformLogic

    def clear(self) -> None:
        """Remove every node the user could have added (the scene and its logics stay)."""
        self.scene.Clear(False)


def _attach(logic, scene, app_logic, module_name: str | None = None):
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    if module_name:
        app_logic.SetModuleLogic(module_name, logic)
    return logic


def new_scene() -> HeadlessScene:
    """A fresh scene with application, colour, subject-hierarchy, segmentations, markups, volumes
    and transforms logics (technical-notes section 4). Needs the ``slicer-core`` wheel."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)
    return HeadlessScene(
        scene=scene,
        app_logic=app_logic,
        colors=colors,
        subject_hierarchy=_attach(
            slicer.vtkSlicerSubjectHierarchyModuleLogic(), scene, app_logic, "SubjectHierarchy"
        ),
        segmentations=_attach(slicer.vtkSlicerSegmentationsModuleLogic(), scene, app_logic, "Segmentations"),
        markups=_attach(slicer.vtkSlicerMarkupsLogic(), scene, app_logic, "Markups"),
        volumes=_attach(slicer.vtkSlicerVolumesLogic(), scene, app_logic, "Volumes"),
        transforms=_attach(slicer.vtkSlicerTransformLogic(), scene, app_logic, "Transforms"),
    )
