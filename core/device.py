"""Device and precision choices shared by training and the audit."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device; None means CUDA when present, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
    return device


def cpu_has_fast_bfloat16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AMX tiles, or AVX512_BF16 as on AMD Zen 4),
    where oneDNN's bfloat16 kernels beat float32.

    Elsewhere (AVX2, AVX-512 without BF16) oneDNN emulates bfloat16 and it is many times slower
    than float32: measured 60x slower for a 1024^2 matmul on an AVX2 AMD EPYC. On an AVX512_BF16
    AMD EPYC, bfloat16 with channels_last ran PGD-10 adversarial training of ResNet-18 2.1x as
    fast as float32 (bench/bench_pretrain.py, docs/performance.md).
    """
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` ("auto", "float32", "bfloat16") on ``device``."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bfloat16()):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """An autocast context for ``dtype``, or a no-op for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def uses_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to lay images and convolution weights out channels_last.

    It pays off on CUDA, with oneDNN's bfloat16 kernels, and with its float32 ones too: on an
    AVX2 AMD EPYC, PGD on ResNet-18 and on the ConvNet ran 20-30% faster channels_last.
    """
    return device.type in ("cuda", "cpu") or dtype == torch.bfloat16
