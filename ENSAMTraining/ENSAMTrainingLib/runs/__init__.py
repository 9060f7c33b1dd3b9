"""A training run seen from outside, as the ENSAM Training module starts and watches it (no Slicer, no Qt).

  command         command lines of `ensam train` / `ensam coreset` for Slicer's Python, and the
                  checks made before starting one (data folder, device name, coreset)
  folders         run folders: naming, finished or resumable
  progressparser  the JSON-lines progress stream -> TrainingProgress (steps, epochs, state)
  process         BackgroundCommand / TrainingProcess: a child process polled without blocking,
                  Stop, and the verdict on how the run ended

Nothing here imports torch until a run has finished (its model file is then checked), so the
module loads, and Start starts a run, without torch in Slicer's own process; the run imports it.
"""
