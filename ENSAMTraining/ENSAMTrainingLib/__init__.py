"""ENSAMTrainingLib: datasets, coreset selection and training of ENSAM, and the ENSAM Training module's logic.

Layers (imports point down only; Testing/test_extension_layout.py checks them):
  core/  the training itself, what `ensam train` runs: cases and samples, the loop, checkpoints,
         validation, coreset selection, data preparation, benchmarks (torch, numpy, MONAI,
         SimpleITK; no Slicer, no Qt)
  runs/  a training run seen from outside: its command line, run folder, progress stream and child
         process (no Slicer, no Qt, no torch: the Slicer module loads and starts runs without it)
  mrml/  the ENSAM Training module's logic on Slicer's MRML API (no Qt): the workflow controller,
         progress tables and charts, scene export, model installation, self-test scenarios
  cli/   front-end: `ensam train`, `ensam coreset`, `ensam train-bench`, `ensam data`
The other front-end, the module's Qt widget, is ENSAMTraining/ENSAMTraining.py.
"""
