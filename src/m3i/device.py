"""The one place a ``--device`` is read: a name torch knows and a device this machine has, or a
one-line error saying which are there; and the floating-point format it computes in.

``precision auto``: bf16 autocast pays only where the device has bfloat16 kernels (CUDA GPUs from
Ampere on; CPUs whose oneDNN runs bfloat16 natively, AVX512-BF16 or AMX). Elsewhere it is
emulated: on an AVX2-only CPU a bf16 convolution falls back to a reference kernel and the demo's
training step runs ~17× slower than in float32 (``benchmarks/precision.py``). So ``auto`` takes
bf16 where it is native, fp16 (with a gradient scaler) on a GPU without it, fp32 on other CPUs.
fp16 asked for on a CPU is warned about: a CPU without float16 kernels emulates it (on one with
AVX-512 and bfloat16 but no float16, a 32-channel 3×3 convolution ran ~100× slower than in fp32, a
linear layer ~6×), and its gradient scaler skips the first steps of a run while it lowers its loss
scale.
"""
from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

import torch


def available() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``--device`` -> a torch device: ``None`` is cuda where there is one, else cpu. A name torch
    does not know, or a device this machine (or this build of torch) lacks, raises ValueError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ", ".join(available())
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device name; this machine has {have}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this build of torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: {why} (torch {torch.__version__}); this machine has {have}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} GPUs; this machine has {have}")
    elif dev.type == "mps" and "mps" not in have:
        raise ValueError(f"--device {name}: no MPS device; this machine has {have}")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: m3i runs on cpu, cuda or mps; this machine has {have}")
    return dev


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in its own kernels rather than by emulation."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False  # mps: auto keeps float32 there


def native_fp16(device: torch.device | str) -> bool:
    """Whether ``device`` computes float16 in its own kernels (every CUDA GPU; CPUs with AVX512-FP16
    or AMX-FP16)."""
    device = torch.device(device)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return device.type in ("cuda", "mps")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> the fastest format ``device`` computes well; any other value as given (bf16 where
    it is emulated, and fp16 on a CPU, with a warning, since the user asked for it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    auto = resolve_precision("auto", device)
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(f"precision bf16 on a {device.type} without native bfloat16 kernels: it is emulated and "
                      f"can be many times slower than fp32; precision auto (the default) picks {auto} here",
                      stacklevel=2)
    if precision == "fp16" and device.type == "cpu":
        emulated = "" if native_fp16(device) else ("this CPU has no float16 kernels, so it is emulated and can be many "
                                                   "times slower than fp32; ")
        warnings.warn(f"precision fp16 on a cpu: float16 with a gradient scaler is meant for GPUs without bfloat16; "
                      f"{emulated}its scaler skips the first steps of a run while it lowers its loss scale; "
                      f"precision auto (the default) picks {auto} here", stacklevel=2)
    return precision


def autocast_for(device: torch.device | str, precision: str) -> AbstractContextManager:
    """The autocast of a resolved ``precision`` (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
