"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a dict saved with torch.save (loadable with ``weights_only=True``):
``format`` ("ensam-train-checkpoint"), ``version``, ``config`` (the run's TrainConfig as a
dict), ``model_config`` (ENSAMConfig.to_dict()), ``model`` (state dict), ``optimizers``
(list of state dicts), ``epoch`` (0-based, the epoch in progress), ``position`` (samples of
that epoch this rank has trained), ``step`` (optimizer steps done), ``world_size`` (processes; ``position`` counts per process), ``samples`` (samples trained, all ranks), ``rng`` (python, numpy,
torch and CUDA generator states), ``elapsed_s``, ``epoch_loss`` ([sum, count] of the epoch
so far), ``last_val`` (latest validation metrics or None).
Checkpoints are only taken between optimizer steps, so no gradient is ever half-accumulated.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

FORMAT = "ensam-train-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not an ENSAM training checkpoint."""


def rng_state() -> dict:
    """The state of every random generator the run uses (python, numpy global, torch, CUDA)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    numpy = state["numpy"]
    has_gauss, cached = numpy["gauss"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), int(numpy["pos"]), has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples all the way down (a reload may give lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    from ENSAMSegmentLib.core.modelfile import atomic_torch_save

    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by save_checkpoint. Raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds for a corrupt or foreign file
        raise CheckpointError(f"cannot read the checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ENSAM training checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']}, newer than this code ({VERSION})")
    return state
