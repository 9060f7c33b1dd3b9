"""The ENSAMTraining module's logic: everything it does except drawing widgets (no Qt here).

  command         command lines of `ensam train` / `ensam coreset` for Slicer's Python, and the
                  checks made before starting one (data folder, device, coreset)
  runs            run folders: naming, finished or resumable
  progressparser  the JSON-lines progress stream -> TrainingProgress (steps, epochs, state)
  process         BackgroundCommand / TrainingProcess: a child process polled without blocking
  mrmlviews       progress and coreset report -> table and plot nodes (Slicer's own views)
  sceneexport     segmentations of a scene + reference volumes -> challenge-format training cases
  models          the models ENSAMSegment offers; installing a finished model atomically
  controller      TrainingController: the module's workflow (coreset, start, stop, resume, install)
  scenarios       checks shared by pytest (Testing/training_module) and the module's self-test

Layering: command, runs, progressparser, process and models are core (no slicer import);
mrmlviews and sceneexport use Slicer's MRML API (slicer-core works); the controller joins them.
Nothing here imports torch at import time, so the module loads before torch is installed.
"""
