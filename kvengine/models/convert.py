"""Conversion of a GGUF file into a Hugging Face model directory, done once.

transformers can read a GGUF file directly, but it dequantizes every tensor on
each load (tens of seconds). `convert_gguf` does it once and saves a float32
model and its tokenizer as an ordinary HF directory, which later loads in well
under a second. The directory appears atomically: it is written under a
temporary sibling name and renamed when complete, so a crash mid-conversion
never leaves a directory that a later load would take for a finished one.

This module never touches the network (`local_files_only=True`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

_TMP_TAG = ".tmp-"


def converted_dir(cache_dir: Path, name: str) -> Path:
    """Where the converted model `name` lives under `cache_dir`."""
    return cache_dir / "models" / name


def is_converted(model_dir: Path) -> bool:
    """Whether `model_dir` holds a finished conversion (it only ever appears complete)."""
    return (model_dir / "config.json").is_file()


@contextlib.contextmanager
def quiet_transformers(*, errors_only: bool) -> Iterator[None]:
    """Turn off transformers' progress bars for the block, and its warnings if `errors_only`.

    Errors are still logged and exceptions still propagate; both settings are
    restored on exit.
    """
    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _stderr_bars_muted(muted: bool) -> Iterator[None]:
    """Drop progress bars written straight to stderr; other lines are written back.

    The GGUF dequantizer draws its own tqdm bar, which transformers' switch does
    not reach. tqdm frames start with a carriage return, so on success lines
    holding one are dropped; on failure everything captured is written back.
    """
    if not muted:
        yield
        return
    stderr, captured = sys.stderr, io.StringIO()
    failed = True
    try:
        with contextlib.redirect_stderr(captured):
            yield
        failed = False
    finally:
        text = captured.getvalue()
        if not failed:
            # split("\n"), not splitlines(): the latter also splits at "\r".
            text = "".join(line + "\n" for line in text.split("\n") if line and "\r" not in line)
        stderr.write(text)


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Dequantize `gguf_path` to float32 and save model and tokenizer into `out_dir`.

    Returns `out_dir`. If `out_dir` already holds a finished conversion (another
    process won the race) that one is kept. On any failure nothing is left at
    `out_dir` and the temporary directory is removed.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp_dir = out_dir.with_name(f".{out_dir.name}{_TMP_TAG}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    src, gguf_file = str(gguf_path.parent), gguf_path.name
    bar = tqdm(total=3, desc=f"Converting {out_dir.name}", unit="stage", disable=not progress)
    try:
        with bar, quiet_transformers(errors_only=True), _stderr_bars_muted(not progress):
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file, local_files_only=True)
            bar.update()
            bar.set_postfix_str("dequantize weights")
            model = AutoModelForCausalLM.from_pretrained(
                src, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
            )
            bar.update()
            bar.set_postfix_str("save")
            _save_dequantized(model, tokenizer, tmp_dir)
            bar.update()
        _publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tmp_dir: Path) -> None:
    """Save a GGUF-loaded model as plain float weights (and its tokenizer) into `tmp_dir`."""
    # The weights are already dequantized; the quantizer left attached only
    # makes save_pretrained refuse, and its config entry would make the saved
    # directory claim to be GGUF-quantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Rename the finished `tmp_dir` to `out_dir`; keep an existing finished `out_dir`."""
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        if not is_converted(out_dir):
            raise


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Remove temporary siblings of `out_dir` left by killed conversions on this host.

    A temporary directory is named `.<name>.tmp-<host>-<pid>-<random>`; one whose
    process no longer runs on this host is stale (hundreds of MB of weights).
    """
    prefix = f".{out_dir.name}{_TMP_TAG}"
    for path in out_dir.parent.glob(prefix + "*"):
        host, _, rest = path.name[len(prefix) :].partition("-")
        pid = rest.partition("-")[0]
        if host == _host() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
