"""kvengine's C++ kernels (`paged_decode.cpp`, `small_linear.cpp`): built once per machine, loaded, or skipped.

Decoding sequences attend over their caches where the blocks lie in the
pool, through the torch op `kvengine::paged_decode` (a small C++ kernel, CPU
only). It is compiled by torch's extension builder the first time an engine
needs it (about 30-60 s on two cores; `make install` does it ahead) into
`$KVENGINE_KERNEL_DIR`, default `<kvengine cache dir>/kernels/<source>-<build tag>`,
and loaded from there afterwards. `load_op` builds any such file the same
way (`engine/linear.py` loads the small-batch linear kernel with it).

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
from typing import Any

import torch

from kvengine.config import default_cache_dir

log = logging.getLogger("kvengine.kernel")

_SOURCE = Path(__file__).with_name("paged_decode.cpp")
# -fopenmp, not just -fopenmp-simd: `at::parallel_for` is an inline template whose `omp parallel`
# exists only when the kernel itself is compiled with OpenMP (it then runs on torch's own libgomp).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]

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


def build_dir(source: Path = _SOURCE) -> Path:
    """Where `source` is built and cached: one directory per source, torch version and CPU.

    `$KVENGINE_KERNEL_DIR/<source stem>` when that variable is set.
    """
    explicit = os.environ.get("KVENGINE_KERNEL_DIR")
    if explicit:
        return Path(explicit).expanduser() / source.stem
    digest = hashlib.sha256(source.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__.replace('+', '_')}-{digest}-{_cpu_tag()}"
    return default_cache_dir() / "kernels" / f"{source.stem}-{tag}"


def disabled_reason() -> str | None:
    """Why the kernels are not to be used at all, or None."""
    if os.environ.get("KVENGINE_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return "KVENGINE_KERNEL is off"
    return None


def load_op(source: Path, namespace: str, op_name: str, purpose: str) -> Callable[..., Any] | None:
    """The torch op `namespace::op_name` that the C++ file `source` registers, built on first use.

    None where it cannot be had (`KVENGINE_KERNEL=off`, no compiler or
    ninja, a failed build), with one warning naming the reason and what
    `purpose` falls back to.
    """
    reason = disabled_reason()
    if reason is None:
        try:
            return _load(source, namespace, op_name)
        except Exception as exc:  # a missing compiler or ninja, a failed build: fall back, say why
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    log.warning("kvengine: %s kernel unavailable (%s)", purpose, reason)
    return None


@cache
def paged_decode() -> PagedDecode | None:
    """The `kvengine::paged_decode` op; None (logged once) where it cannot be had."""
    return load_op(_SOURCE, "kvengine", "paged_decode", "decode attention (decoding gathers caches for SDPA)")


def _load(source: Path, namespace: str, op_name: str) -> Callable[..., Any]:
    from torch.utils.cpp_extension import load

    if not hasattr(getattr(torch.ops, namespace), op_name):
        directory = build_dir(source)
        directory.mkdir(parents=True, exist_ok=True)
        log.info("kvengine: building %s in %s (once per machine)", source.name, directory)
        load(  # the file as is: only ATen's headers, no Python bindings to compile
            name=f"kvengine_{source.stem}",
            sources=[str(source)],
            extra_cflags=_FLAGS,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    op: Callable[..., Any] = getattr(getattr(torch.ops, namespace), op_name)
    return op


def decode_kernel_for(device: torch.device, seals_blocks: bool) -> PagedDecode | None:
    """The kernel when it applies: a CPU pool whose blocks stay in the pool's dtype."""
    if device.type != "cpu" or seals_blocks:
        return None
    return paged_decode()
