"""Where tensors run and in what precision: the device a configuration asks for, and the fast path on it.

``amp=true`` (the default) means, on every device: the network in bfloat16 autocast where the hardware computes
bfloat16 natively (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX), with channels_last activations and
weights. A CPU without native bfloat16 emulates it more slowly than float32, so it gets float32 channels_last.
``amp=false`` keeps float32 in the plain NCHW layout: bit-stable, the numbers of earlier udml versions.
Losses, miner thresholds, k-means and evaluation always run in float32 on float32 embeddings.
On the CPU the C allocator is also told to keep freed memory for reuse (``keep_freed_memory``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import dataclass

import torch

from .errors import InputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} was asked for but CUDA is not available here; use device=cpu or auto")
    return device


# UDML_CPU_BF16=0 or 1 overrides the detection (0: a machine whose bfloat16 misbehaves; 1: a CPU the probe
# below does not know, such as an ARM core with BF16).
CPU_BF16_ENV = "UDML_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products and convolutions in hardware (AVX512-BF16 or AMX
    tiles, which oneDNN uses). Elsewhere PyTorch's bfloat16 kernels convert to float32 and back: slower than
    float32, never assumed."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, p)()) for p in probes if hasattr(cpu, p))
    except RuntimeError:  # a build without cpuinfo
        return False


# UDML_CPU_KEEP_MEMORY=0 leaves the C allocator's defaults alone.
KEEP_MEMORY_ENV = "UDML_CPU_KEEP_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_memory_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the kernel.

    By default glibc serves every block over 32 MB (a batch's activations at 224 px) with its own mmap and unmaps
    it when freed, so each training step or embedding batch page-faults its activations in again, and the kernel
    zeroes every page: 500,000-780,000 page faults a step for Lite0 at 224 px (80 + 64 images), about half of
    the step's time. With both thresholds at their maximum the freed blocks are reused (a few hundred faults a
    step). The price: the process holds its peak memory until it exits rather than returning it in between; peak
    memory itself does not grow. glibc (Linux) only, once per process; True when the setting is in force."""
    global _memory_kept
    if _memory_kept is None:
        _memory_kept = False
        if os.environ.get(KEEP_MEMORY_ENV) != "0" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                most = 2**31 - 1  # mallopt takes an int
                _memory_kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, most)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, most)
                )
            except (OSError, AttributeError):
                pass
    return _memory_kept


def cuda_has_native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else False


@dataclass(frozen=True)
class Precision:
    """How the network runs: ``dtype`` of its convolutions and linear layers (bfloat16 under autocast, or
    float32) and whether activations and weights are channels_last."""

    device_type: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    @property
    def autocast_on(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        if not self.autocast_on:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A batch [B, C, H, W] in the memory layout the network runs in. udml's own passes leave uint8 images
        in NCHW (UDMLNet.normalize says why): a convolution whose weights are channels_last lays its output out
        channels_last whatever its input's layout (oneDNN and cuDNN alike)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's 4-d weights in the layout (in place; a no-op when they already are)."""
        return model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def __str__(self) -> str:
        name = "bfloat16 autocast" if self.autocast_on else "float32"
        return f"{name}, {'channels_last' if self.channels_last else 'NCHW'}"


FLOAT32 = Precision("cpu")  # amp=false anywhere: float32, NCHW


def precision_for(device: torch.device | str, amp: bool = True) -> Precision:
    """The fast path of ``device`` when ``amp``, float32 NCHW otherwise (see the module's text)."""
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()
    if not amp:
        return Precision(device.type)
    if device.type == "cuda":
        bf16 = cuda_has_native_bf16(device)
    elif device.type == "cpu":
        bf16 = cpu_has_native_bf16()
    else:  # mps and others: float32 NCHW, not measured there
        return Precision(device.type)
    return Precision(device.type, torch.bfloat16 if bf16 else torch.float32, channels_last=True)


def precision_of(model: torch.nn.Module, amp: bool = True) -> Precision:
    return precision_for(next(model.parameters()).device, amp)
