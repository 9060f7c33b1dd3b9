"""The ENSAM Training module's logic on Slicer's MRML API: everything it does except drawing widgets (no Qt).

  controller   TrainingController: the module's workflow (coreset, start, stop, resume, install),
               over the child processes of runs/
  mrmlviews    progress and coreset report -> table and plot nodes (Slicer's own views)
  sceneexport  segmentations of a scene + reference volumes -> challenge-format training cases
  models       the models ENSAMSegment offers; installing a finished model atomically
  scenarios    checks shared by pytest (Testing/training_module) and the module's self-test

Works in Slicer and on the slicer-core wheel; ``import slicer`` / ``import vtk`` happen inside
functions. Nothing here imports torch at import time, so the module loads before torch is installed.
"""
