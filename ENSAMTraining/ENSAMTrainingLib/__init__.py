"""ENSAMTrainingLib: datasets, coreset selection and training of ENSAM (core layer, no Slicer)."""
