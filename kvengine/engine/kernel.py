"""The decode attention kernel (`paged_decode.cpp`): built once per machine, loaded, or skipped.

Decoding sequences attend over their caches where the blocks lie in the
pool, through the torch op `kvengine::paged_decode` (a small C++ kernel, CPU
only). It is compiled by torch's extension builder the first time an engine
needs it (about 30-60 s on two cores; `make install` does it ahead) into
`$KVENGINE_KERNEL_DIR`, default `<kvengine cache dir>/kernels/<build tag>`,
and loaded from there afterwards.

Without it (no C++ compiler, no `ninja`, a device other than the CPU, or
`KVENGINE_KERNEL=off`) decoding reads the caches into a padded batch and
runs SDPA: same results up to float rounding, slower, and logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from kvengine.config import default_cache_dir

log = logging.getLogger("kvengine.kernel")

_SOURCE = Path(__file__).with_name("paged_decode.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast"]

PagedDecode = Callable[..., torch.Tensor]


def _cpu_tag() -> str:
    """A tag of this CPU's instruction sets: a kernel built with -march=native runs only where they match."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def build_dir() -> Path:
    """Where the kernel is built and cached: one directory per source, torch version and CPU."""
    explicit = os.environ.get("KVENGINE_KERNEL_DIR")
    if explicit:
        return Path(explicit).expanduser()
    source = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__.replace('+', '_')}-{source}-{_cpu_tag()}"
    return default_cache_dir() / "kernels" / tag


def disabled_reason() -> str | None:
    """Why the kernel is not to be used at all, or None."""
    if os.environ.get("KVENGINE_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return "KVENGINE_KERNEL is off"
    return None


@cache
def paged_decode() -> PagedDecode | None:
    """The `kvengine::paged_decode` op, built on first call; None (logged once) where it cannot be had."""
    reason = disabled_reason()
    if reason is None:
        try:
            return _load()
        except Exception as exc:  # a missing compiler or ninja, a failed build: fall back, say why
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    log.warning(
        "kvengine: decode attention kernel unavailable (%s); decoding gathers caches for SDPA", reason
    )
    return None


def _load() -> PagedDecode:
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.kvengine, "paged_decode"):
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        log.info("kvengine: building the decode attention kernel in %s (once per machine)", directory)
        load(  # the file as is: only ATen's headers, no Python bindings to compile
            name="kvengine_paged_decode",
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    op: PagedDecode = torch.ops.kvengine.paged_decode
    return op


def decode_kernel_for(device: torch.device, seals_blocks: bool) -> PagedDecode | None:
    """The kernel when it applies: a CPU pool whose blocks stay in the pool's dtype."""
    if device.type != "cpu" or seals_blocks:
        return None
    return paged_decode()
