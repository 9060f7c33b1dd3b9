"""The CUDA path (marked `gpu`; skipped where torch sees no CUDA GPU). Run on a GPU machine by
.ci/gpu-check, which also runs `ensam bench --device cuda` and writes both as JSON.

What only a GPU can show: the decoder's GroupNorm statistics recorded in CUDA bf16 (blocks.group_norm
has its own branch there), windowed clicks still exact against the whole decode on CUDA, CUDA fp32
against the CPU, a bf16 session on CUDA against fp32, and the benchmark's CUDA timings and memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ENSAMSegmentLib.core import devices
from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts
from ENSAMSegmentLib.core.phantom import make_phantom
from ENSAMSegmentLib.core.session import InferenceSession

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch sees none)")]

SMALL = dict(init_filters=8, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32)
PROMPTS = Prompts.from_objects([{"box": ((8, 8, 8), (40, 50, 56)), "fg": [(20, 30, 30)]}])


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 on the GPU without TF32, so that comparisons with the CPU mean something."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def small_model(seed=0) -> ENSAM:
    torch.manual_seed(seed)
    return ENSAM(ENSAMConfig(**SMALL)).eval()


def image(shape=(48, 64, 64), seed=1) -> torch.Tensor:
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


def test_cuda_fp32_matches_the_cpu():
    cpu, cuda = small_model(), small_model().cuda()
    with torch.inference_mode():
        expected = cpu.decode(cpu.encode(image()), PROMPTS)
        got = cuda.decode(cuda.encode(image().cuda()), PROMPTS.to("cuda"))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_windows_equal_the_whole_decode_on_cuda(dtype):
    model = devices.prepare_model(small_model(), torch.device("cuda"), dtype)
    with torch.inference_mode(), devices.autocast(torch.device("cuda"), dtype):
        emb = model.encode(image().cuda())
        norms = {}
        model.decode(emb, PROMPTS.to("cuda"), None, None, norms)
        assert all(m.dtype == r.dtype == torch.float32 and m.is_cuda for m, r in norms.values())
        full = model.decode(emb, PROMPTS.to("cuda"), None, None, norms).float()
        window = (slice(5, 30), slice(17, 64), slice(0, 21))
        part = model.decode_window(emb, PROMPTS.to("cuda"), None, window, norms).float()
    tolerance = 1e-4 if dtype is None else 0.05 * full.abs().max().item()
    torch.testing.assert_close(part, full[(..., *window)], rtol=0, atol=tolerance)


def test_bf16_statistics_on_cuda_match_fp32():
    model = small_model().cuda()
    x = image().cuda()
    with torch.inference_mode():
        emb = model.encode(x)
        fp32 = {}
        model.decode(emb, PROMPTS.to("cuda"), None, None, fp32)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = {}
            model.decode(emb, PROMPTS.to("cuda"), None, None, low)
    for norm, (mean, rstd) in fp32.items():
        torch.testing.assert_close(low[norm][0], mean, rtol=0.05, atol=0.05)
        torch.testing.assert_close(low[norm][1], rstd, rtol=0.05, atol=0.05)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def run_session(array, precision: str, box, clicks) -> list:
    with InferenceSession(model=small_model(), device="cuda", precision=precision) as session:
        assert session.device.type == "cuda" and ("fp32" in session.device_name) == (precision == "fp32")
        session.set_image(array)
        session.create_object()
        masks = [session.add_box(*box).mask]
        masks += [session.add_click(point, foreground=fg).mask for point, fg in clicks]
    return masks


def test_a_cuda_session_in_bf16_agrees_with_fp32():
    array, labels = make_phantom((48, 64, 64), seed=0, n_objects=1)
    where = np.argwhere(labels == 1)
    box = (tuple(where.min(0).tolist()), tuple(where.max(0).tolist()))
    clicks = [(tuple(where[len(where) // 2].tolist()), True), ((2, 2, 2), False)]
    fp32, auto = run_session(array, "fp32", box, clicks), run_session(array, "auto", box, clicks)
    assert len(fp32) == len(auto) == 3
    for a, b in zip(fp32, auto):
        assert a.sum() > 0 and dice(a, b) > 0.9


def test_the_benchmark_on_cuda_reports_synchronised_timings_and_memory():
    from ENSAMSegmentLib.evaluation.benchmark import run_benchmark

    report = run_benchmark((32, 48, 48), "cuda", repeats=1, warmup=1, growcut=False, progress=lambda _: None)
    assert report["device"].startswith("cuda") and report["gpu"] == torch.cuda.get_device_name()
    assert report["cuda_max_memory_allocated_mb"] > 0 and report["click_s_median"] > 0
    assert report["targets"]["applies"] is False  # the targets are the CPU's
