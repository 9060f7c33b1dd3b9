"""A training run seen from outside, as the ENSAM Training module starts and watches it (no Slicer, no Qt).

  command         command lines of `ensam train` / `ensam coreset` for Slicer's Python, and the
                  checks made before starting one (data folder, device, coreset)
  folders         run folders: naming, finished or resumable
  progressparser  the JSON-lines progress stream -> TrainingProgress (steps, epochs, state)
  process         BackgroundCommand / TrainingProcess: a child process polled without blocking,
                  Stop, and the verdict on how the run ended

Nothing here imports torch at import time, so the module loads before torch is installed.
"""
