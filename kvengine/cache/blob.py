"""The blob codec: KV-cache chunks as self-checking safetensors bytes.

A blob is a safetensors file (never pickle: a blob read from a shared Redis or
disk must not be able to run code) whose metadata carries the caller's cache
key (`meta`: model, press, tenant salt, token hash...), a format version and a
SHA-256 digest. The digest covers every byte of the blob, the header included
(tensor names, dtypes, shapes, offsets, metadata) and all tensor bytes, with
the 64 hex characters of the digest itself read as zeros. So any changed byte
is caught, not only changes to tensor data, and checking costs one hash pass
over the blob and no Python loop over elements.

This module knows nothing about tiers or the engine: `encode` turns tensors
into bytes, `decode` turns bytes back into tensors or raises a `BlobError`,
and nothing else, for any input bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import safetensors.torch
import torch

from kvengine.errors import InvalidRequestError

FORMAT_VERSION = "1"
VERSION_KEY = "kvengine_blob_version"
DIGEST_KEY = "kvengine_blob_sha256"
RESERVED_KEYS = frozenset({VERSION_KEY, DIGEST_KEY})

_ZERO_DIGEST = "0" * 64
_HEX = frozenset("0123456789abcdef")
# safetensors writes compact JSON ("key":"value"), and a quote inside a string
# is escaped, so this byte string occurs exactly once: at the digest's value.
_DIGEST_PREFIX = b'"' + DIGEST_KEY.encode() + b'":"'


class BlobError(Exception):
    """A blob that cannot be used; `kind` says why ("corrupt" or "mismatch")."""

    kind = "error"


class CorruptBlobError(BlobError):
    """Unreadable, truncated, not safetensors, an unknown version, or a digest mismatch."""

    kind = "corrupt"


class KeyMismatchError(BlobError):
    """An intact blob written for another cache key (model, press, tenant or tokens)."""

    kind = "mismatch"


def encode(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize `tensors` with `meta` as safetensors bytes that `decode` can verify.

    Tensors may live on any device and be non-contiguous or views of one
    storage; they are copied to contiguous CPU tensors first. `meta` must map
    str to str and must not use the reserved keys (`RESERVED_KEYS`).
    Raises InvalidRequestError for bad `meta` or non-tensor values.
    """
    _check_meta(meta)
    metadata = {**meta, VERSION_KEY: FORMAT_VERSION, DIGEST_KEY: _ZERO_DIGEST}
    raw = safetensors.torch.save(_prepare(tensors), metadata=metadata)
    header_len = int.from_bytes(raw[:8], "little")
    marker = _DIGEST_PREFIX + _ZERO_DIGEST.encode() + b'"'
    found = raw.find(marker, 8, 8 + header_len)
    if found < 0:  # safetensors changed its JSON layout: fail loudly, never write unverifiable blobs
        raise RuntimeError("blob codec: digest field not found in the safetensors header")
    pos = found + len(_DIGEST_PREFIX)
    digest = hashlib.sha256(raw).hexdigest().encode()
    view = memoryview(raw)
    return b"".join((view[:pos], digest, view[pos + 64 :]))


def decode(blob: bytes | bytearray | memoryview, expect: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of `blob` (contiguous, on CPU, writable), after checking it.

    Raises CorruptBlobError if the blob is not one `encode` wrote or was
    changed since (any byte), and KeyMismatchError if it is intact but
    `meta.get(k) != expect[k]` for some key of `expect`. Never raises any
    other exception for bytes-like input.
    """
    view = memoryview(blob).cast("B")
    meta = _read_meta(view)
    digest = meta.get(DIGEST_KEY, "")
    if len(digest) != 64 or not _HEX.issuperset(digest):
        raise CorruptBlobError("blob digest is missing or not 64 hex digits")
    if meta.get(VERSION_KEY) != FORMAT_VERSION:
        raise CorruptBlobError(f"unknown blob format version {meta.get(VERSION_KEY)!r}")
    _verify_digest(view, digest)
    wrong = sorted(k for k, v in expect.items() if meta.get(k) != v)
    if wrong:
        raise KeyMismatchError(f"blob was stored for another cache key (differs in: {', '.join(wrong)})")
    try:
        tensors = safetensors.torch.load(blob if isinstance(blob, bytes) else bytes(view))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust parser may panic (a BaseException) on crafted headers
        raise CorruptBlobError(f"blob is not valid safetensors: {e}") from None
    return tensors


def _check_meta(meta: dict[str, str]) -> None:
    if not isinstance(meta, dict):
        raise InvalidRequestError(f"blob meta must be a dict of str to str, got {type(meta).__name__}")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidRequestError(f"blob meta must map str to str; got {k!r}: {v!r}")
    reserved = RESERVED_KEYS & meta.keys()
    if reserved:
        raise InvalidRequestError(f"blob meta uses reserved keys: {', '.join(sorted(reserved))}")


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses shared storage)."""
    if not isinstance(tensors, dict):
        raise InvalidRequestError(f"blob tensors must be a dict, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InvalidRequestError(f"blob tensors must map str to torch.Tensor; got {name!r}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # a view of a larger or shared storage: give it its own
            ptr = t.untyped_storage().data_ptr()
        if t.nbytes:
            seen.add(ptr)
        out[name] = t
    return out


def _read_meta(view: memoryview) -> dict[str, Any]:
    """The `__metadata__` of a safetensors header; CorruptBlobError if unreadable."""
    if len(view) < 8:
        raise CorruptBlobError(f"blob of {len(view)} bytes is too short")
    header_len = int.from_bytes(view[:8], "little")
    if header_len < 2 or header_len > len(view) - 8:
        raise CorruptBlobError(f"blob header length {header_len} does not fit in {len(view)} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptBlobError(f"blob header is not JSON: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptBlobError("blob header has no string metadata")
    return meta


def _verify_digest(view: memoryview, digest: str) -> None:
    header_end = 8 + int.from_bytes(view[:8], "little")
    marker = _DIGEST_PREFIX + digest.encode() + b'"'
    header = bytes(view[:header_end])
    found = header.find(marker)
    if found < 0 or header.find(marker, found + 1) >= 0:
        raise CorruptBlobError("blob digest field is not where the encoder puts it")
    pos = found + len(_DIGEST_PREFIX)
    h = hashlib.sha256(view[:pos])
    h.update(_ZERO_DIGEST.encode())
    h.update(view[pos + 64 :])
    if h.hexdigest() != digest:
        raise CorruptBlobError("blob digest mismatch: contents changed since it was written")
