"""ENSAMTrainingLib: datasets, coreset selection and training of ENSAM (core layer, no Slicer).

    data.py        finding cases (challenge .npz trees, image/label pairs), loading, one sample per case
    coreset.py     `ensam coreset`: equal counts per dataset, bad cases skipped with reasons
    step.py        the training step: box + 5 clicks simulated from the model's own prediction
    loss.py        generalized Dice + 2 x BCE
    optim.py       Muon (any ndim >= 2, flattened) + AdamW, parameter split, lr schedule
    trainer.py     `ensam train`: loop, checkpoints, exact resume, signals, DistributedDataParallel
    validation.py  challenge metrics on held-out cases each epoch
    progress.py    the JSON-lines progress stream (documented there) for the Slicer module
    checkpoint.py, distributed.py, logs.py, plots.py   the trainer's helpers
    bench.py       `ensam train-bench`: the paper's ablation and training throughput
    cli_commands.py  registers train, coreset and train-bench with the `ensam` tool
"""
