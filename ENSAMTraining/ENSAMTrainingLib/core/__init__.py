"""The training core: what `ensam train` runs (torch, numpy, MONAI, SimpleITK; no Slicer, no Qt).

  cases        training cases (challenge .npz, image/label pairs, label maps, procedural scenes),
               case lists, loading
  data         one case -> one training sample (crop, pooling, augmentation, box); the torch datasets
  synth        images synthesised from label maps (SynthSeg-style) and procedural scenes
  step         the training step: the box, then clicks simulated from the model's own prediction
  loss         generalized Dice + 2 x binary cross-entropy, per object
  optim        Muon for weight matrices, AdamW for the rest; the learning-rate schedule
  trainer      the training loop: `train`, `resume`, `export_model`; checkpoints, signals, DDP
  runsetup     a run's settings (TrainConfig) and the device, cases and model they name
  checkpoint   checkpoints that continue a run exactly, written atomically
  distributed  torchrun process groups and the collectives the loop needs
  validation   box + 5 clicks on held-out cases, with the controls that show the prompts are used
  logs         metrics.csv, validation.csv, TensorBoard
  plots        loss.png (matplotlib, no display)
  progress     the JSON-lines progress stream (`ensam train --progress-json`)
  runlock      one training process per run folder
  coreset      coreset selection: equal counts per dataset, bad cases skipped (`ensam coreset`)
  datasources  `ensam data fetch`: real data from package registries
  dataprep     `ensam data prepare`: a training tree and a disjoint development set
  bench        `ensam train-bench`: the ablation, prompt use, throughput

cases, progress and runlock import no torch: runs/ and mrml/ use them in Slicer's GUI process.
"""
