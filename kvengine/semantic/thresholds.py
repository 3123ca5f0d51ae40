"""Similarity thresholds learned online under a maximum error rate (vCache-style), and their registry.

A semantic cache serves a new prompt from its nearest cached entry when the
two are similar enough. How similar is "enough" is learned, not set: every
time the real answer of a prompt is computed while a cached neighbour was
near (a miss, or an exploration that computes it anyway), the pair gives an
`Observations` point (similarity, was the neighbour's answer correct?).
`certified_threshold` picks the lowest similarity t such that, among the
observations at or above t, the one-sided Wilson upper confidence bound of
the error rate is at most the user's `max_error`: reusing answers only at
similarity >= t, a reused answer is wrong at most `max_error` of the time,
at the stated confidence (up to the usual caveat that t was chosen after
looking at the data, which makes the bound a little optimistic).

Policies (registry `THRESHOLD_POLICIES`):

- `global`: one threshold per tenant, from all its observations;
- `vcache`: one per cached entry, as vCache (Schroeder et al., 2025) does;
  an entry with enough observations of its own is certified on them alone
  (its threshold may be lower or higher than the tenant's); until then it
  uses the tenant's threshold, raised above every similarity at which the
  entry itself was seen to be wrong. vCache fits a sigmoid per entry; this
  uses the distribution-free binomial bound instead.

This module is pure arithmetic on arrays: no embeddings, no index, no model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from kvengine.errors import InvalidRequestError
from kvengine.registry import Registry

NEVER = math.inf  # a threshold no similarity reaches: nothing is served from the cache


def check_bound(max_error: float, confidence: float) -> None:
    """InvalidRequestError unless both lie strictly between 0 and 1 (and are finite numbers)."""
    for name, value in (("max_error", max_error), ("confidence", confidence)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
            raise InvalidRequestError(f"{name} must be a number in (0, 1), got {value!r}", param=name)


def wilson_upper(num_wrong: np.ndarray, num: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Wilson score upper bounds of error rates `num_wrong / num` (num >= 1), elementwise."""
    z = NormalDist().inv_cdf(confidence)
    n = num.astype(np.float64)
    p = num_wrong / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.minimum(1.0, (centre + spread) / (1 + z * z / n))


def wilson_interval(num_wrong: int, num: int, level: float) -> tuple[float, float]:
    """Two-sided Wilson score interval of `num_wrong / num` at `level` ((0, 1) when num is 0)."""
    if num == 0:
        return 0.0, 1.0
    one_sided = (1 + level) / 2
    high = wilson_upper(np.array([num_wrong]), np.array([num]), one_sided)[0]
    low = 1.0 - wilson_upper(np.array([num - num_wrong]), np.array([num]), one_sided)[0]
    return float(low), float(high)


def certified_threshold(
    similarities: np.ndarray, correct: np.ndarray, max_error: float, confidence: float
) -> float:
    """The lowest observed similarity t whose observations at >= t have an error bound <= max_error.

    NEVER if no t qualifies (no observations, or too few to certify the
    bound: with none wrong, about z^2 / max_error of them are needed).
    """
    if similarities.size == 0:
        return NEVER
    order = np.argsort(-similarities, kind="stable")
    sims = similarities[order]
    num = np.arange(1, sims.size + 1)
    num_wrong = np.cumsum(~correct[order])
    # A threshold at a similarity takes in all observations tied with it: keep each tie group's last.
    last_of_tie = np.append(sims[1:] != sims[:-1], True)
    ok = last_of_tie & (wilson_upper(num_wrong, num, confidence) <= max_error)
    hits = np.flatnonzero(ok)
    return float(sims[hits[-1]]) if hits.size else NEVER


@dataclass
class Observations:
    """(similarity, correct) points, appended in arrival order; at most `capacity` (oldest dropped)."""

    capacity: int = 100_000
    _sims: list[float] = field(default_factory=list)
    _correct: list[bool] = field(default_factory=list)

    def add(self, similarity: float, correct: bool) -> None:
        self._sims.append(float(similarity))
        self._correct.append(bool(correct))
        if len(self._sims) > self.capacity:
            del self._sims[0], self._correct[0]

    def __len__(self) -> int:
        return len(self._sims)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self._sims, dtype=np.float64), np.asarray(self._correct, dtype=bool)

    def highest_wrong(self) -> float:
        """The highest similarity at which a neighbour's answer was wrong (-inf if none was)."""
        wrong = [s for s, c in zip(self._sims, self._correct, strict=True) if not c]
        return max(wrong, default=-math.inf)

    def threshold(self, max_error: float, confidence: float) -> float:
        return certified_threshold(*self.arrays(), max_error, confidence)


class ThresholdPolicy(ABC):
    """Decides the similarity at or above which an entry's answer may be reused.

    Contract: `threshold` reads the observations and changes nothing; it
    returns NEVER when nothing may be reused. A policy keeps no state of its
    own: the cache owns the observations (per entry and per tenant).
    """

    @abstractmethod
    def threshold(
        self, entry: Observations, tenant: Observations, max_error: float, confidence: float
    ) -> float: ...


THRESHOLD_POLICIES: Registry[ThresholdPolicy] = Registry("threshold policy", "threshold policies")


@THRESHOLD_POLICIES.register("global")
class GlobalThreshold(ThresholdPolicy):
    """One threshold per tenant, certified on all of the tenant's observations."""

    def threshold(
        self, entry: Observations, tenant: Observations, max_error: float, confidence: float
    ) -> float:
        return tenant.threshold(max_error, confidence)


@THRESHOLD_POLICIES.register("vcache")
class PerEntryThreshold(ThresholdPolicy):
    """vCache's per-entry thresholds: the entry's own when certified, else the tenant's, raised past its errors."""

    def threshold(
        self, entry: Observations, tenant: Observations, max_error: float, confidence: float
    ) -> float:
        own = entry.threshold(max_error, confidence)
        if own < NEVER:
            return own
        shared = tenant.threshold(max_error, confidence)
        return max(shared, float(np.nextafter(entry.highest_wrong(), np.inf)))


def make_policy(name: str) -> ThresholdPolicy:
    """The threshold policy registered as `name`; InvalidRequestError listing the known ones otherwise."""
    return THRESHOLD_POLICIES.lookup(name)()
