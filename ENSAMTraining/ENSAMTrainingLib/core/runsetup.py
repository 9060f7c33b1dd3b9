"""Setting a training run up: its settings, and the device, cases and model they name.

    TrainConfig    the settings of one run (the flags of `ensam train`; saved in config.json and
                   in every checkpoint)
    pick_device    "auto" / "cpu" / "cuda[:N]" / "mps" -> the torch device, TrainingError when absent
    split_cases    the training and held-out validation cases (+ label maps, procedural scenes)
    build_model    a new ENSAM, or the --init-model to fine-tune
    renormalize    the nGPT weight renormalisation (after every optimizer step)

trainer.py runs the loop on what these return.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from torch import nn

from .cases import CaseRef, DataError, find_cases, find_label_maps, mix_cases, read_case_list
from .data import CHALLENGE_BOX_PROBABILITY, DEFAULT_VOXEL_BUDGET, NO_BOX_PROBABILITY, OTHER_OBJECT_PROBABILITY
from .optim import SCALE_LR_FACTOR
from .step import CLICKS


class TrainingError(Exception):
    """A run that cannot start or continue (bad settings, data, device or checkpoint)."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (the flags of `ensam train`)."""

    data: str
    out: str
    cases: str | None = None  # case list (e.g. from `ensam coreset`); default: every case under data
    epochs: int = 15
    voxel_budget: int = DEFAULT_VOXEL_BUDGET
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    init_model: str | None = None  # model file to fine-tune
    val_cases: str | None = None
    val_fraction: float = 0.05
    val_max: int = 20
    checkpoint_minutes: float = 30.0
    progress_json: str | None = None  # "-" = stdout
    optimizer: str = "muon"  # "muon" (Muon + AdamW) or "adamw" (AdamW on everything)
    muon_lr: float = 0.02
    adamw_lr: float = 3e-4
    weight_decay: float = 0.0
    accumulation: int = 4
    clicks: int = CLICKS
    workers: int | None = None  # DataLoader workers per process; None: min(8, cpus per process - 1)
    seed: int = 0
    augment: bool = True
    no_box_probability: float = NO_BOX_PROBABILITY
    challenge_box_probability: float = CHALLENGE_BOX_PROBABILITY
    other_object_probability: float = OTHER_OBJECT_PROBABILITY  # target another object in the crop (data.py)
    grad_clicks: int | None = None  # click steps with gradients per sample (None: all; step.InteractiveStep)
    scale_lr_factor: float = SCALE_LR_FACTOR  # nGPT scales' lr = adamw_lr x this (optim.make_optimizers)
    synthetic: str | None = None  # folder of label maps: images synthesised from them (synth.py)
    synth_probability: float = 0.0  # chance that a real training sample's image is synthesised instead
    procedural: int = 0  # procedural scenes added to each epoch (data.procedural_cases)
    repeat: int = 1  # each real case and label map is visited this many times an epoch
    model_config: dict | None = None  # ENSAMConfig fields for a new model
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (step.autocast_for)
    stop_after: int | None = None  # stop (with a checkpoint) after this many optimizer steps in total
    progress_bar: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {"other_object_probability": 0.0, **values}  # a run from before the option had none
        return cls(**{k: v for k, v in values.items() if k in names})


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for "auto" / "cpu" / "cuda[:n]" / "mps"; TrainingError when it is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device {name!r} asked for, but this torch has no CUDA device")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise TrainingError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("device 'mps' asked for, but it is not available")
    return device


def default_workers(world_size: int) -> int:
    return max(0, min(8, (os.cpu_count() or 1) // world_size - 1))


def split_cases(config: TrainConfig) -> tuple[list[CaseRef], list[CaseRef]]:
    """(training, validation) cases: the given lists, or a seeded held-out fraction; then the
    synthetic part (data.mix_cases). With label maps alone, validation holds out some of them."""
    try:
        cases = (read_case_list(config.cases, config.data) if config.cases else find_cases(config.data)) if config.data else []
        maps = find_label_maps(config.synthetic) if config.synthetic else []
        val = read_case_list(config.val_cases, config.data) if config.val_cases else None
    except DataError as error:
        raise TrainingError(str(error)) from None
    cases, maps = (cases, maps) if cases else (maps, [])
    if val is not None:
        held = {c.image for c in val}
        train = [c for c in cases if c.image not in held]
    else:
        n_val = min(config.val_max, int(round(config.val_fraction * len(cases))), len(cases) - 1)
        order = np.random.default_rng([config.seed, 7]).permutation(len(cases))
        held = set(order[: max(0, n_val)].tolist())
        val = [c for i, c in enumerate(cases) if i in held]
        train = [c for i, c in enumerate(cases) if i not in held]
    if not train:
        raise TrainingError("no training case left after holding out the validation cases")
    try:
        return mix_cases(train, val, maps, config.synth_probability, config.procedural, config.repeat), val
    except DataError as error:
        raise TrainingError(str(error)) from None


def build_model(config: TrainConfig, device: torch.device, model_config: dict | None = None) -> nn.Module:
    """A new ENSAM (from ``model_config`` or config.model_config), or the model of ``init_model``."""
    from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig

    if model_config is None and config.init_model:
        from ENSAMSegmentLib.core.modelfile import ModelFileError, load_model

        try:
            model, _info = load_model(config.init_model, device)
        except ModelFileError as error:
            raise TrainingError(f"cannot load --init-model {config.init_model}: {error}") from None
        return model.to(device)
    values = model_config if model_config is not None else (config.model_config or {})
    try:
        net_config = ENSAMConfig.from_dict(values) if values else ENSAMConfig()
    except (TypeError, ValueError) as error:
        raise TrainingError(f"bad model configuration {values}: {error}") from None
    torch.manual_seed(config.seed)
    return ENSAM(net_config).to(device)


def renormalize(model: nn.Module) -> None:
    from ENSAMSegmentLib.core.network import renormalize_weights

    renormalize_weights(model)


__all__ = ["TrainConfig", "TrainingError", "build_model", "default_workers", "pick_device", "renormalize",
           "split_cases"]
