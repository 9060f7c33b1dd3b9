"""devices.py: device names, CPU bf16 detection from cpuinfo, the autocast precision rules, memory
formats; and a whole session in CPU bf16 against the same session in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ENSAMSegmentLib.core import devices
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig
from ENSAMSegmentLib.core.phantom import make_phantom
from ENSAMSegmentLib.core.session import InferenceSession

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/core/conftest.py


def small_model(seed=0) -> ENSAM:
    torch.manual_seed(seed)
    return ENSAM(ENSAMConfig(**SMALL)).eval()


# ----------------------------------------------------------------------------- device names


def test_resolve_device_names():
    assert devices.resolve_device("cpu") == CPU
    assert devices.resolve_device(" CPU ") == CPU  # case and spaces do not matter
    assert devices.resolve_device(CPU) == CPU
    auto = devices.resolve_device("auto")
    assert auto == devices.resolve_device(None)
    assert auto.type == ("cuda" if torch.cuda.is_available() else "mps" if devices.mps_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        devices.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            devices.resolve_device("cuda:0")


def test_describe_names_the_precision():
    assert devices.describe(CPU) == f"cpu ({torch.get_num_threads()} threads, fp32)"
    assert devices.describe(CPU, torch.bfloat16).endswith(", bf16)")


# ----------------------------------------------------------------------------- CPU bf16 detection


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni{extra}
vmx flags\t: vnmi preemption_timer{vmx}
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize("extra, vmx, native", [
    (" avx512_bf16", "", True),
    (" amx_tile amx_bf16 amx_int8", "", True),
    ("", "", False),
    (" avx512_bf16x avx_bf16", "", False),  # whole flags only
    ("", " avx512_bf16", False),  # only the "flags" line counts
])
def test_cpu_native_bf16_reads_the_flags_line(tmp_path, extra, vmx, native):
    path = tmp_path / "cpuinfo"  # a distinct path per case: the function is lru_cached by path
    path.write_text(CPUINFO.format(extra=extra, vmx=vmx))
    assert devices.cpu_native_bf16(str(path)) is native


def test_cpu_native_bf16_without_a_readable_cpuinfo(tmp_path):
    assert devices.cpu_native_bf16(str(tmp_path / "missing")) is False  # e.g. macOS, Windows
    assert devices.cpu_native_bf16(str(tmp_path)) is False  # a directory: unreadable as text
    empty = tmp_path / "empty"
    empty.write_text("")
    assert devices.cpu_native_bf16(str(empty)) is False
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe flags : avx512_bf16\n\x80")  # undecodable bytes are replaced, not fatal
    assert devices.cpu_native_bf16(str(binary)) is False  # the line does not start with "flags"


def test_cpu_native_bf16_is_cached_per_path(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=" avx512_bf16", vmx=""))
    assert devices.cpu_native_bf16(str(path)) is True
    path.write_text(CPUINFO.format(extra="", vmx=""))
    assert devices.cpu_native_bf16(str(path)) is True  # read once per process
    assert devices.cpu_native_bf16(str(tmp_path / "cpuinfo2")) is False


# ----------------------------------------------------------------------------- precision rules


def test_autocast_dtype_on_the_cpu():
    native = devices.cpu_native_bf16()
    assert devices.autocast_dtype(CPU, "auto") == (torch.bfloat16 if native else None)
    assert devices.autocast_dtype(CPU) == devices.autocast_dtype(CPU, "auto")
    assert devices.autocast_dtype(CPU, "bf16") == torch.bfloat16  # forced, even without native bf16
    assert devices.autocast_dtype(CPU, "BF16") == torch.bfloat16
    assert devices.autocast_dtype(CPU, "fp32") is None
    with pytest.raises(ValueError, match="'fp16' is not supported on the CPU"):
        devices.autocast_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        devices.autocast_dtype(CPU, "int8")


def test_autocast_dtype_on_gpus():
    """Rules that need no GPU to check: explicit CUDA precisions, MPS (fp32 unless told otherwise)."""
    cuda, mps = torch.device("cuda"), torch.device("mps")
    assert devices.autocast_dtype(cuda, "fp16") == torch.float16
    assert devices.autocast_dtype(cuda, "bf16") == torch.bfloat16
    assert devices.autocast_dtype(cuda, "fp32") is None
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert devices.autocast_dtype(cuda, "auto") == expected
    assert devices.autocast_dtype(mps, "auto") is None and devices.autocast_dtype(mps, "fp32") is None
    for precision in ("bf16", "fp16"):
        with pytest.raises(ValueError, match="only supported on CUDA and CPU"):
            devices.autocast_dtype(mps, precision)


def test_memory_formats():
    assert devices.memory_format(CPU, torch.bfloat16) == torch.channels_last_3d
    assert devices.memory_format(CPU, None) == torch.channels_last_3d  # fp32 too: no oneDNN reorders
    assert devices.memory_format(torch.device("cuda"), torch.bfloat16) == torch.contiguous_format
    assert devices.memory_format(torch.device("cuda"), torch.float16) == torch.contiguous_format


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_prepare_model_and_input_use_channels_last_on_the_cpu(dtype):
    model = small_model().train()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(c.weight.is_contiguous() for c in convs)
    same = devices.prepare_model(model, CPU, dtype)
    assert same is model and not model.training  # eval mode
    wide = [c for c in convs if c.weight.shape[1] > 1 and c.kernel_size != (1, 1, 1)]  # else the layouts coincide
    assert wide and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in wide)
    assert all(not c.weight.is_contiguous() for c in wide)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts; weights stay fp32

    x = torch.rand(1, 3, 8, 16, 24)  # [B, C, D, H, W]
    last = devices.prepare_input(x, CPU, dtype)
    assert last.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(last, x)
    assert last.dtype == torch.float32


# ----------------------------------------------------------------------------- a bf16 session on the CPU


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def run_session(image, precision: str, box, clicks) -> tuple[list, list]:
    """Box then clicks on a small model in `precision` -> (updates, object logits after each)."""
    with InferenceSession(model=small_model(), device="cpu", precision=precision, decode_margin=0) as session:
        assert session.amp_dtype == (torch.bfloat16 if precision == "bf16" else None)
        session.set_image(image)
        session.create_object()
        updates = [session.add_box(*box)]
        logits = [session.object_logits()]
        for point, foreground in clicks:
            updates.append(session.add_click(point, foreground=foreground))
            logits.append(session.object_logits())
        if precision == "bf16":
            assert "bf16" in session.device_name
            convs = [m for m in session.model.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.shape[1] > 1]
            assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    return updates, logits


def test_cpu_bf16_session_agrees_with_fp32():
    """Small untrained model, 2-object phantom, box + foreground and background clicks: bf16 masks
    agree with fp32's at Dice 0.990-0.993 for this seed (0.97-0.99 over seeds 0-2, the lowest on a
    500-voxel mask), both through the same decoding paths; the bound leaves room for other CPUs'
    bf16 kernels."""
    image, labels = make_phantom((32, 48, 48), seed=1, n_objects=2)
    idx = np.argwhere(labels == 1)
    box = (tuple(idx.min(0)), tuple(idx.max(0)))
    clicks = [(tuple(idx[len(idx) // 2]), True), ((6, 14, 24), False)]
    fp32, fp32_logits = run_session(image, "fp32", box, clicks)
    bf16, bf16_logits = run_session(image, "bf16", box, clicks)
    assert [u.decoding for u in bf16] == [u.decoding for u in fp32] == ["region", "window", "window"]
    for a, b, (ea, la), (eb, lb) in zip(fp32, bf16, fp32_logits, bf16_logits):
        assert a.mask.sum() > 100 and dice(a.mask, b.mask) > 0.97, dice(a.mask, b.mask)
        # a click's window may grow in one precision and not the other: compare where both have logits
        common = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(ea, eb))
        la, lb = (v[tuple(slice(c.start - e.start, c.stop - e.start) for c, e in zip(common, ex))]
                  for v, ex in ((la, ea), (lb, eb)))
        assert lb.dtype == np.float32 and la.size > 1000
        assert not np.array_equal(la, lb)  # bf16 really ran: the logits are not fp32's bit for bit
        assert np.corrcoef(la.ravel(), lb.ravel())[0, 1] > 0.99


def test_keep_freed_memory_in_a_process_of_its_own():
    """glibc's mallopt applies (Linux); elsewhere nothing changes and it says so. In a child process: it
    changes malloc for the whole process."""
    import subprocess
    import sys

    code = ("from ENSAMSegmentLib.core import devices; import torch; ok = devices.keep_freed_memory(); "
            "x = [torch.ones(2**24) for _ in range(3)]; del x; y = torch.ones(2**24); print(ok, float(y.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, total = out.stdout.split()
    assert applied == str(sys.platform.startswith("linux") and _glibc()) and float(total) == 2**24


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


def test_auto_precision_follows_an_isa_cap_on_onednn():
    """ONEDNN_MAX_CPU_ISA=AVX2 (how an AVX2-only CPU is emulated on a newer one) makes "auto" fp32 even
    where /proc/cpuinfo lists bf16 instructions: oneDNN may not use them. In a child process: oneDNN
    reads the variable once."""
    import subprocess
    import sys

    code = ("import torch; from ENSAMSegmentLib.core import devices; "
            "print(devices.onednn_bf16(), devices.autocast_dtype(torch.device('cpu'), 'auto'), "
            "devices.autocast_dtype(torch.device('cpu'), 'bf16'))")
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None", "torch.bfloat16"]  # bf16 asked for: still bf16
