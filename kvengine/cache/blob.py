"""The blob codec: KV-cache chunks as authenticated safetensors bytes.

A blob is a safetensors file (never pickle: a blob read from a shared Redis or
disk must not be able to run code) whose metadata carries the caller's cache
key (`meta`: model, layout, the chunk key that commits to the tenant salt and
the tokens...), a format version and an HMAC-SHA256 keyed by a secret. The
MAC covers every byte of the blob, the header included (tensor names, dtypes,
shapes, offsets, metadata) and all tensor bytes, with the 64 hex characters of
the MAC itself read as zeros. So any changed byte is caught, and so is a blob
written by anyone without the secret: a plain digest could be recomputed by
whoever can write to the store, a MAC cannot. Checking costs one hash pass
over the blob and no Python loop over elements.

Which secret, and how processes share it, is the caller's business
(`CacheConfig.tier_secret`). This module knows nothing about tiers or the
engine: `encode` turns tensors into bytes, `decode` turns bytes back into
tensors or raises a `BlobError`, and nothing else, for any input bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import safetensors.torch
import torch

from kvengine.errors import InvalidRequestError

# Version 1 carried a plain SHA-256 that any writer could recompute: such blobs are
# unauthenticated now, never trusted.
FORMAT_VERSION = "2"
VERSION_KEY = "kvengine_blob_version"
MAC_KEY = "kvengine_blob_hmac_sha256"
RESERVED_KEYS = frozenset({VERSION_KEY, MAC_KEY})

_ZERO_MAC = "0" * 64
_HEX = frozenset("0123456789abcdef")
# safetensors writes compact JSON ("key":"value"), and a quote inside a string
# is escaped, so this byte string occurs exactly once: at the MAC's value.
_MAC_PREFIX = b'"' + MAC_KEY.encode() + b'":"'


class BlobError(Exception):
    """A blob that cannot be used; `kind` says why ("corrupt", "unauthenticated" or "mismatch")."""

    kind = "error"


class CorruptBlobError(BlobError):
    """Unreadable: too short, a header that is not safetensors JSON, tensor data that does not parse."""

    kind = "corrupt"


class UnauthenticatedBlobError(BlobError):
    """Not provably written with the secret: another format version, no MAC, or a MAC mismatch.

    A MAC mismatch is any byte changed since writing (damage on disk) or a
    blob written without this secret (forged, or by a process configured
    with another one): the two cannot be told apart, and neither is used.
    """

    kind = "unauthenticated"


class KeyMismatchError(BlobError):
    """An authentic blob written for another cache key (model, press, tenant or tokens)."""

    kind = "mismatch"


def encode(meta: dict[str, str], tensors: dict[str, torch.Tensor], *, secret: bytes) -> bytes:
    """Serialize `tensors` with `meta` as safetensors bytes that `decode` with `secret` accepts.

    Tensors may live on any device and be non-contiguous or views of one
    storage; they are copied to contiguous CPU tensors first. `meta` must map
    str to str and must not use the reserved keys (`RESERVED_KEYS`); `secret`
    is non-empty bytes. Raises InvalidRequestError for bad arguments.
    """
    _check_secret(secret)
    _check_meta(meta)
    metadata = {**meta, VERSION_KEY: FORMAT_VERSION, MAC_KEY: _ZERO_MAC}
    raw = safetensors.torch.save(_prepare(tensors), metadata=metadata)
    header_len = int.from_bytes(raw[:8], "little")
    marker = _MAC_PREFIX + _ZERO_MAC.encode() + b'"'
    found = raw.find(marker, 8, 8 + header_len)
    if found < 0:  # safetensors changed its JSON layout: fail loudly, never write unverifiable blobs
        raise RuntimeError("blob codec: MAC field not found in the safetensors header")
    pos = found + len(_MAC_PREFIX)
    mac = hmac.new(secret, raw, hashlib.sha256).hexdigest().encode()
    view = memoryview(raw)
    return b"".join((view[:pos], mac, view[pos + 64 :]))


def decode(
    blob: bytes | bytearray | memoryview, expect: dict[str, str], *, secret: bytes
) -> dict[str, torch.Tensor]:
    """The tensors of `blob` (contiguous, on CPU, writable), after checking it.

    Raises CorruptBlobError if its header cannot be read,
    UnauthenticatedBlobError unless `encode` wrote it with this `secret` and
    no byte changed since, and KeyMismatchError if it is authentic but
    `meta.get(k) != expect[k]` for some key of `expect`. Never raises any
    other exception for bytes-like input (InvalidRequestError for a bad
    `secret`).
    """
    _check_secret(secret)
    view = memoryview(blob).cast("B")
    meta = _read_meta(view)
    if meta.get(VERSION_KEY) != FORMAT_VERSION:
        raise UnauthenticatedBlobError(
            f"blob format version {meta.get(VERSION_KEY)!r} carries no MAC (this engine writes {FORMAT_VERSION})"
        )
    mac = meta.get(MAC_KEY, "")
    if len(mac) != 64 or not _HEX.issuperset(mac):
        raise UnauthenticatedBlobError("blob MAC is missing or not 64 hex digits")
    _verify_mac(view, mac, secret)
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


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or not secret:
        raise InvalidRequestError("the blob secret must be non-empty bytes")


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


def _verify_mac(view: memoryview, mac: str, secret: bytes) -> None:
    header_end = 8 + int.from_bytes(view[:8], "little")
    marker = _MAC_PREFIX + mac.encode() + b'"'
    header = bytes(view[:header_end])
    found = header.find(marker)
    if found < 0 or header.find(marker, found + 1) >= 0:
        raise UnauthenticatedBlobError("blob MAC field is not where the encoder puts it")
    pos = found + len(_MAC_PREFIX)
    h = hmac.new(secret, view[:pos], hashlib.sha256)
    h.update(_ZERO_MAC.encode())
    h.update(view[pos + 64 :])
    if not hmac.compare_digest(h.hexdigest(), mac):
        raise UnauthenticatedBlobError(
            "blob MAC mismatch: changed since it was written, or written without this engine's tier secret"
        )
