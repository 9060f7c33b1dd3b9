"""Compute device and mixed precision for inference: cuda > mps > cpu, autocast on CUDA.

    device = resolve_device("auto")               # torch.device
    dtype = autocast_dtype(device, "auto")        # bf16 / fp16 on CUDA, None (fp32) elsewhere
    with autocast(device, dtype): ...

The precision "auto" is bf16 where the GPU supports it (Ampere and newer: no overflow risk, same
speed as fp16), else fp16. MPS and CPU stay in fp32: CPU autocast (bf16) was measured slower than
fp32 on the development machine (a 2-core AVX-512 Xeon) and MPS autocast support is uneven.
"""

from __future__ import annotations

import contextlib

import torch

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device="auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; 'cuda:1' etc. are accepted.

    Raises ValueError for an unknown name or a device this machine does not have.
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device or "auto").strip().lower()
    kind = name.split(":")[0]
    if kind not in DEVICE_NAMES:
        raise ValueError(f"unknown device {device!r}; use one of {DEVICE_NAMES} (or 'cuda:N')")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but PyTorch sees no CUDA GPU (CPU-only build or no driver)")
    if kind == "mps" and not mps_available():
        raise ValueError("device 'mps' requested but the Apple Metal backend is not available")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device`, or None for plain fp32."""
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision == "fp32" or device.type != "cuda":
        if precision in ("fp16", "bf16") and device.type != "cuda":
            raise ValueError(f"precision {precision!r} is only supported on CUDA here, not on {device.type}")
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Context: torch.autocast on `device` with `dtype`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Human-readable device name, e.g. 'cuda:0 (NVIDIA H100, bf16)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        text = f"cuda:{index} ({torch.cuda.get_device_name(index)}"
    elif device.type == "cpu":
        text = f"cpu ({torch.get_num_threads()} threads"
    else:
        text = f"{device.type} ("
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    return f"{text}, {precision})" if not text.endswith("(") else f"{text}{precision})"
