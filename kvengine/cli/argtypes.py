"""Argument types shared by the command-line parsers: each raises argparse's error with a clear message."""

from __future__ import annotations

import argparse
import ast
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated positive integers, at least one."""
    values = [positive_int(x) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def key_values(text: str) -> dict[str, Any]:
    """`KEY=VALUE,KEY=VALUE` (hyperparameters) as a dict: VALUE a Python literal where it parses, else text."""
    out: dict[str, Any] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs, comma-separated, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def ratio_list(text: str) -> list[float]:
    """Comma-separated compression ratios, each in [0, 1)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must be in [0, 1), got {text!r}")
    return values


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def int_range(text: str) -> tuple[int, int]:
    """`LOW,HIGH`: two integers with 1 <= LOW <= HIGH."""
    parts = text.split(",")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH integers, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return low, high


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def byte_size(text: str) -> int:
    """A size in bytes: `2147483648`, `2GiB`, `512MiB`, `1.5GB` (decimal and binary units, any case)."""
    stripped = text.strip().replace("_", "")
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = stripped[len(number) :].strip().lower()
    if unit not in _SIZE_UNITS or not number:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 2GiB, 512MiB, 1.5GB or a number of bytes, got {text!r}"
        )
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB or 512MiB, got {text!r}") from None
    if not 1 <= value < 2**63:  # rejects 0, negatives, NaN and inf
        raise argparse.ArgumentTypeError(f"a size must be at least 1 byte and below 2**63, got {text!r}")
    return int(value)
