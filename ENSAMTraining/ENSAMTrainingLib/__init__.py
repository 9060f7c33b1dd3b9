"""ENSAMTrainingLib: datasets, coreset selection and training of ENSAM.

Layers (imports point down only):
  core        data, coreset, optim, loss, step, trainer, validation, checkpoint, progress, ... (no Slicer)
  MRML logic  slicerlogic/ (training command lines, progress parsing, MRML table/plot views,
              scene export; Slicer's MRML API, no Qt)
  front-ends  cli_commands (`ensam train`, `ensam coreset`, `ensam train-bench`); the Slicer
              widget lives in ENSAMTraining.py
"""
