"""Which floating-point type a model runs in: 16-bit where the hardware computes it natively.

`resolve_dtype("auto", device)` gives bfloat16 on a CUDA GPU that supports
it and on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX: there bf16
matmul runs ~4x faster than fp32, and weights and KV cache take half the
bytes), float32 everywhere else. Any explicit name is taken as is. The
choice comes with a one-line reason for the startup line.

This module only reads what the hardware offers; it loads nothing.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from kvengine.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags of this CPU (from /proc/cpuinfo on Linux; none elsewhere)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if platform.system() != "Linux" or not path.is_file():
            return []
        cpuinfo = path.read_text(errors="replace")
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return [f for f in _CPU_BF16_FLAGS if f in flags]


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """The dtype `name` stands for on `device`, and why: ("auto" or a name in `DTYPES`).

    Raises InvalidRequestError for any other name.
    """
    if name in DTYPES:
        return DTYPES[name], "asked for"
    if name != "auto":
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU computes bf16 natively"
        return torch.float32, "auto: the GPU has no native bf16"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return torch.bfloat16, f"auto: the CPU computes bf16 natively ({', '.join(flags)})"
        return torch.float32, "auto: the CPU has no native bf16 (no avx512_bf16 / amx_bf16)"
    return torch.float32, f"auto: float32 on {device.type}"


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16, and so on."""
    return str(dtype).removeprefix("torch.")
