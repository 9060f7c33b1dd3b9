"""Compute device and mixed precision for inference: cuda > mps > cpu.

    device = resolve_device("auto")               # torch.device
    dtype = autocast_dtype(device, "auto")        # bf16 / fp16 on CUDA, bf16 on bf16 CPUs, else None
    model = prepare_model(model, device, dtype)   # on the device, in its memory format
    with autocast(device, dtype): model.encode(prepare_input(x, device, dtype)) ...

The precision "auto" is bf16 where the GPU supports it (Ampere and newer: no overflow risk, same
speed as fp16), else fp16. On a CPU with native bf16 arithmetic (AVX512-BF16 or AMX, read from
/proc/cpuinfo) it is bf16 autocast with channels-last 3-D tensors (oneDNN's fast path): measured on
the development machine (2-core Xeon, AVX512-BF16, `ensam bench` at 128x256x256) the encoder ran 1.4x
and a box decode 2x faster than fp32, masks agreeing with fp32 at Dice 0.97-0.99 (a small model,
Testing/core/test_devices.py; README "Performance"). Other CPUs, and MPS (uneven autocast
support), stay in fp32; "fp32" forces it anywhere. CPU tensors are channels-last in fp32 too: oneDNN
convolves that layout directly, where the default one costs two reorders of every activation per
convolution (the fp32 AVX2 encoder took 1.25x less CPU time, README "Performance").
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

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


@functools.lru_cache(maxsize=None)
def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16 flags; Linux only)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def onednn_bf16() -> bool:
    """Whether oneDNN may use its bf16 kernels here: False where ONEDNN_MAX_CPU_ISA caps it below them
    (e.g. AVX2, to emulate such a CPU on a newer one), so that "auto" then means fp32 as it would there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private helper: assume yes where it is gone
        return True


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device`, or None for plain fp32."""
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("precision 'fp16' is not supported on the CPU; use bf16 or fp32")
        return torch.bfloat16 if precision == "bf16" or (cpu_native_bf16() and onednn_bf16()) else None
    if device.type != "cuda":
        if precision != "auto":
            raise ValueError(f"precision {precision!r} is only supported on CUDA and CPU, not on {device.type}")
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def memory_format(device: torch.device, dtype: torch.dtype | None = None) -> torch.memory_format:
    """channels_last_3d on the CPU, in bf16 and fp32 alike (oneDNN convolves it directly; the default
    layout costs two reorders of every activation per convolution), else the default layout."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def prepare_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """The model on `device`, in eval mode, its convolution weights in the matching memory format."""
    return model.to(device=device, memory_format=memory_format(device, dtype)).eval()


def prepare_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """An image batch [B, C, D, H, W] on `device` in the memory format the model expects."""
    return x.to(device=device, memory_format=memory_format(device, dtype))


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


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(trim_threshold: int = 256 * 2**20) -> bool:
    """In this process, let glibc's malloc keep the memory it frees for the next allocation: True when
    applied (Linux with glibc), False elsewhere (macOS, Windows, musl: nothing is changed).

    By default glibc maps every allocation above 32 MB (most activations of the network) afresh and
    unmaps it when freed, so every layer pays page faults and the kernel's zero-filling again: with
    fp32 on a 2-core AVX2 CPU that was 83 % of the user time in the kernel (issue 14). Here large
    allocations come from the heap too (M_MMAP_MAX 0) and up to `trim_threshold` bytes free at its top
    stay mapped (M_TRIM_THRESHOLD). The cost: the process keeps its peak footprint mapped. For a
    process that runs the model (the inference worker, `ensam bench`), not for a whole application.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (and the tunables below)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
