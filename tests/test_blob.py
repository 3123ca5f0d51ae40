"""The blob codec: bit-exact round trips, and every damaged, foreign or forged blob rejected as a BlobError.

The reference for "forged" is what a writer without the secret can make: a
blob of this codec under another secret, the version-1 format (a plain
SHA-256 anyone can recompute, `_v1_blob` below reproduces it), plain
safetensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvengine.cache.blob import (
    MAC_KEY,
    BlobError,
    CorruptBlobError,
    KeyMismatchError,
    UnauthenticatedBlobError,
    decode,
    encode,
)
from kvengine.errors import InvalidRequestError

META = {"model": "smollm2-135m", "layout": "30x3x16x64:torch.float16", "key": "ab" * 32}
SECRET = b"the engine processes' shared secret"


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "k": torch.randn(3, 2, 16, 8, generator=g),
        "v": torch.randn(3, 2, 16, 8, generator=g).to(torch.float16),
        "codes": torch.randint(0, 256, (3, 2, 16, 4), generator=g, dtype=torch.uint8),
    }


# One small real blob, shared by the exhaustive damage tests.
SMALL = {"k": torch.arange(12, dtype=torch.float32).reshape(3, 4), "v": torch.ones(2, 3, dtype=torch.float16)}
SMALL_BLOB = encode(META, SMALL, secret=SECRET)


def _check_or_error(blob: bytes, reference: dict[str, torch.Tensor]) -> None:
    """Decoding gives exactly `reference` or a BlobError; anything else fails the test."""
    try:
        out = decode(blob, META, secret=SECRET)
    except BlobError:
        return
    assert out.keys() == reference.keys()
    for name, t in reference.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        t = torch.randn(2, 3, 16, 8, generator=g).to(dtype)
        t[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    else:
        t = torch.randint(-128 if dtype == torch.int8 else 0, 128, (2, 3, 16, 8), generator=g, dtype=dtype)
    blob = encode(META, {"k": t, "empty": torch.zeros(0, 4, dtype=dtype)}, secret=SECRET)
    out = decode(blob, META, secret=SECRET)
    assert out["k"].dtype == dtype and out["k"].shape == t.shape
    # Compare bytes, not values: NaN != NaN and -0.0 == 0.0 would hide differences.
    assert out["k"].view(torch.uint8).equal(t.view(torch.uint8))
    assert out["empty"].shape == (0, 4)
    assert out["k"].is_contiguous() and out["k"].device.type == "cpu"


def test_round_trip_of_views_and_non_contiguous_tensors() -> None:
    base = torch.randn(4, 6, 8)
    tensors = {"slice": base[1:3], "t": base.transpose(0, 1), "again": base}
    out = decode(encode(META, tensors, secret=SECRET), META, secret=SECRET)
    for name, t in tensors.items():
        assert torch.equal(out[name], t)
    out["slice"].add_(1)  # returned tensors are writable and independent of the blob
    assert not torch.equal(out["slice"], tensors["slice"])


def test_metadata_and_mac_are_in_the_safetensors_header() -> None:
    blob = encode(META, _tensors(), secret=SECRET)
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    meta = header["__metadata__"]
    assert {k: meta[k] for k in META} == META
    assert len(meta[MAC_KEY]) == 64
    # A plain safetensors reader reads it too: the format is safetensors, nothing more.
    assert torch.equal(safetensors.torch.load(blob)["k"], _tensors()["k"])


@pytest.mark.parametrize("field", sorted(META))
def test_another_cache_key_is_a_mismatch(field: str) -> None:
    blob = encode(META, _tensors(), secret=SECRET)
    with pytest.raises(KeyMismatchError, match=field) as info:
        decode(blob, {**META, field: META[field] + "x"}, secret=SECRET)
    assert info.value.kind == "mismatch"
    with pytest.raises(KeyMismatchError):
        decode(blob, {**META, "tenant": "t1"}, secret=SECRET)  # a key the writer never set
    assert decode(blob, {"model": META["model"]}, secret=SECRET).keys() == _tensors().keys()


def test_changed_tensor_bytes_are_caught_by_the_mac() -> None:
    blob = bytearray(encode(META, _tensors(), secret=SECRET))
    blob[-1] ^= 0x01  # the last byte of tensor data: the header still parses
    with pytest.raises(UnauthenticatedBlobError, match="MAC mismatch") as info:
        decode(bytes(blob), META, secret=SECRET)
    assert info.value.kind == "unauthenticated"


def test_truncation_at_every_offset_is_rejected() -> None:
    for n in range(len(SMALL_BLOB)):
        with pytest.raises((CorruptBlobError, UnauthenticatedBlobError)):
            decode(SMALL_BLOB[:n], META, secret=SECRET)
    with pytest.raises(CorruptBlobError):
        decode(SMALL_BLOB[:20], META, secret=SECRET)  # not even a header


Forge = Callable[[dict[str, str], dict[str, torch.Tensor]], bytes]


def _v1_blob(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    """A blob of format version 1: a SHA-256 over the blob with its own field read as zeros."""
    zero = "0" * 64
    raw = safetensors.torch.save(
        tensors, metadata={**meta, "kvengine_blob_version": "1", "kvengine_blob_sha256": zero}
    )
    digest = hashlib.sha256(raw).hexdigest()
    return raw.replace(
        f'"kvengine_blob_sha256":"{zero}"'.encode(), f'"kvengine_blob_sha256":"{digest}"'.encode()
    )


def _plain(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors, metadata=meta)


def _other_secret(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    return encode(meta, tensors, secret=b"a writer's guess at the secret")


def _copied_mac(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    """New tensors under the MAC of a real blob (the writer can read those)."""
    real = json.loads(SMALL_BLOB[8 : 8 + int.from_bytes(SMALL_BLOB[:8], "little")])["__metadata__"]
    return safetensors.torch.save(tensors, metadata={**meta, **{k: real[k] for k in real if k not in meta}})


@pytest.mark.parametrize("forge", [_v1_blob, _plain, _other_secret, _copied_mac])
def test_a_writer_without_the_secret_cannot_make_a_blob_that_decodes(forge: Forge) -> None:
    blob = forge(META, _tensors())
    with pytest.raises(UnauthenticatedBlobError) as info:
        decode(blob, META, secret=SECRET)
    assert info.value.kind == "unauthenticated"
    assert torch.equal(safetensors.torch.load(blob)["k"], _tensors()["k"])  # well-formed: only the MAC tells


def test_the_secret_is_checked() -> None:
    with pytest.raises(InvalidRequestError, match="secret"):
        encode(META, _tensors(), secret=b"")
    with pytest.raises(InvalidRequestError, match="secret"):
        decode(SMALL_BLOB, META, secret="text")  # type: ignore[arg-type]


@pytest.mark.parametrize("xor", [0x01, 0x20, 0x80, 0xFF])
def test_one_changed_byte_anywhere_is_rejected(xor: int) -> None:
    # Every offset of a real blob: header (length, JSON, padding, digest) and data.
    for i in range(len(SMALL_BLOB)):
        blob = bytearray(SMALL_BLOB)
        blob[i] ^= xor
        with pytest.raises(BlobError):
            decode(bytes(blob), META, secret=SECRET)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_are_a_blob_error(data: bytes) -> None:
    with pytest.raises(BlobError):
        decode(data, META, secret=SECRET)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(SMALL_BLOB) - 1), st.binary(min_size=1, max_size=16))
def test_overwritten_runs_never_give_wrong_tensors(offset: int, patch: bytes) -> None:
    blob = bytearray(SMALL_BLOB)
    blob[offset : offset + len(patch)] = patch
    _check_or_error(bytes(blob), SMALL)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_crafted_headers_are_a_blob_error(header: bytes, length: int) -> None:
    # A wrong length prefix and arbitrary header bytes, followed by a real blob's data.
    blob = length.to_bytes(8, "little") + header + SMALL_BLOB[8:]
    _check_or_error(blob, SMALL)


def test_bad_meta_and_tensors_are_rejected_when_encoding() -> None:
    with pytest.raises(InvalidRequestError, match="reserved"):
        encode({MAC_KEY: "0" * 64}, _tensors(), secret=SECRET)
    with pytest.raises(InvalidRequestError, match="str to str"):
        encode({"layers": 3}, _tensors(), secret=SECRET)  # type: ignore[dict-item]
    with pytest.raises(InvalidRequestError, match=r"torch\.Tensor"):
        encode(META, {"k": [1.0, 2.0]}, secret=SECRET)  # type: ignore[dict-item]


def test_bytearray_and_memoryview_input() -> None:
    blob = encode(META, _tensors(), secret=SECRET)
    for form in (bytearray(blob), memoryview(blob)):
        assert torch.equal(decode(form, META, secret=SECRET)["codes"], _tensors()["codes"])
