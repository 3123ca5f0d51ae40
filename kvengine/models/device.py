"""Which device a model and its KV cache run on: "auto", "cpu", "cuda", "cuda:N", "mps", "xpu".

`resolve_device("auto")` is the first CUDA GPU where torch sees one, else the
CPU. An explicit name is checked against this torch build and this machine,
so asking for a GPU that is not there fails at load with a clear error
instead of deep inside the first forward pass. The names a config accepts
are `config.DEVICE_PATTERN`'s.

This module only asks torch what it can reach; it loads and moves nothing.
"""

from __future__ import annotations

import torch

from kvengine.config import check_device_name
from kvengine.errors import InvalidRequestError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device `name` stands for here; InvalidRequestError if it is unknown or unavailable."""
    if isinstance(name, torch.device):
        name = str(name)
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    missing = _why_unavailable(device)
    if missing:
        raise InvalidRequestError(f"device {name!r} is not available: {missing}; use --device cpu or auto")
    return device


def _why_unavailable(device: torch.device) -> str:
    """Why this torch cannot run on `device`, or "" if it can."""
    if device.type == "cpu":
        return ""
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch ({torch.__version__}) was built without CUDA"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "torch sees no CUDA GPU on this machine"
        if device.index is not None and device.index >= count:
            return f"torch sees {count} CUDA GPU(s), numbered from 0"
        return ""
    if device.type == "mps":
        return "" if torch.backends.mps.is_available() else "torch has no MPS (Apple GPU) backend here"
    if device.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        return "" if xpu is not None and xpu.is_available() else "torch sees no Intel XPU here"
    return f"kvengine does not run on {device.type!r} devices"
