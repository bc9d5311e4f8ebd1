"""Where tensors run and in what precision (udml.devices): which precision a CPU gets (bfloat16 where it computes it
natively, float32 elsewhere, both channels_last) and the environment's override, a Precision's layout and autocast,
glibc's freed memory kept for reuse, and the precision a training session runs in."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import BF16_CL, FP32_CL

from udml import devices
from udml.config import make_config
from udml.devices import FLOAT32, precision_for
from udml.session import prepare, resolve_num_clusters


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without AVX512-BF16 and without AMX, as far as PyTorch's probes say."""
    monkeypatch.delenv(devices.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_a_cpu_without_native_bfloat16_runs_float32_channels_last(no_native_bf16):
    assert not devices.cpu_has_native_bf16()
    assert precision_for("cpu") == FP32_CL and not FP32_CL.autocast_on
    assert precision_for("cpu", amp=False) == FLOAT32


def test_a_cpu_with_avx512_bf16_or_amx_runs_bfloat16(monkeypatch, no_native_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision_for("cpu") == BF16_CL
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision_for("cpu") == BF16_CL
    assert precision_for("cpu", amp=False) == FLOAT32  # amp=false: float32 NCHW whatever the CPU has


def test_the_environment_overrides_the_detection(monkeypatch, no_native_bf16):
    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")
    assert precision_for("cpu") == BF16_CL
    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision_for("cpu") == FP32_CL


def test_the_training_session_uses_the_detected_precision(no_native_bf16):
    s = prepare(resolve_num_clusters(make_config("digits", ["device=cpu", "num_workers=0"])), torch.device("cpu"))
    assert s.precision == FP32_CL
    conv = next(m for m in s.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


FAULTS_PROBE = """
import resource, sys, torch
from udml import devices
print(devices.keep_freed_memory() if sys.argv[1] == "keep" else "default", end=" ")
for _ in range(10):  # 64 MB: over glibc's largest automatic mmap threshold; the heap settles in a few rounds
    x = torch.ones(64 * 2**20, dtype=torch.uint8); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(64 * 2**20, dtype=torch.uint8); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_on_the_cpu_instead_of_faulted_in_again():
    """A 64 MB block freed and allocated again: with glibc's defaults every allocation page-faults its 16,384
    pages in anew (the cause of half a training step's time at 224 px); kept, the block is reused."""

    def faults(mode: str, env: dict) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_PROBE, mode], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        kept, n = out.stdout.split()
        return kept, int(n)

    kept, n_kept = faults("keep", {})
    assert kept == "True"
    assert n_kept < 3 * 16_384  # at most two of the ten allocations faulted in anew (the kernel may still reclaim one)
    assert faults("keep", {devices.KEEP_MEMORY_ENV: "0"})[0] == "False"
    _, n_default = faults("default", {})
    assert n_default > 10 * 16_000  # every one of the 10 allocations faulted its pages in
    assert devices.precision_for("cpu") and devices.keep_freed_memory()  # the CPU path turns it on


def test_layout_and_autocast():
    x = torch.zeros(2, 3, 8, 8)
    assert BF16_CL.layout(x).is_contiguous(memory_format=torch.channels_last)
    assert FLOAT32.layout(x).is_contiguous()
    with BF16_CL.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.bfloat16
    with FP32_CL.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.float32
