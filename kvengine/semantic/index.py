"""Nearest-neighbour search over unit vectors by inner product (cosine), and its registry.

`VectorIndex` is the contract: vectors are added under integer ids, removed
by id, and `search` returns each query's nearest live vector. Three
implementations (registry `INDEXES`):

- `exact`: brute force in numpy, the reference the others are tested against;
- `faiss-flat`: faiss's exact inner-product index (SIMD, removal by id);
- `faiss-hnsw`: faiss's HNSW graph, approximate; removed ids are skipped at
  search time by an id selector, and the graph is rebuilt from the kept
  vectors once half of it is removed.

faiss is the optional extra `semantic` (pip install 'kvengine[semantic]');
without it the faiss indexes fail with MissingDependencyError. This module
knows nothing of prompts, answers or thresholds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from kvengine.errors import MissingDependencyError
from kvengine.registry import Registry

NO_ID = -1  # the id `search` returns when the index holds no live vector


class VectorIndex(ABC):
    """Unit vectors of one dimension under unique int ids; nearest by inner product.

    Contract: `add` refuses an id already present and vectors of another
    dimension (ValueError); `remove` of an absent id is a no-op; `search`
    returns (ids, similarities) of shape (Q,), NO_ID and -inf where the
    index is empty. Vectors are float32 and expected L2-normalized (the
    inner product is then the cosine similarity).
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        self.dim = dim

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None: ...

    @abstractmethod
    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def _check(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size != vectors.shape[0]:
            raise ValueError(f"{ids.size} ids for {vectors.shape[0]} vectors")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors must be finite")
        return ids, vectors


INDEXES: Registry[VectorIndex] = Registry("vector index", "vector indexes")


@INDEXES.register("exact")
class ExactIndex(VectorIndex):
    """Brute force: every query against every vector (the reference)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._vectors: dict[int, np.ndarray] = {}

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check(ids, vectors)
        if any(int(i) in self._vectors for i in ids) or len(set(ids.tolist())) < ids.size:
            raise ValueError("ids must be new and unique")
        for i, v in zip(ids.tolist(), vectors, strict=True):
            self._vectors[i] = v.copy()

    def remove(self, ids: np.ndarray) -> None:
        for i in np.asarray(ids).reshape(-1).tolist():
            self._vectors.pop(int(i), None)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if not self._vectors:
            return np.full(len(queries), NO_ID, np.int64), np.full(len(queries), -np.inf, np.float32)
        ids = np.fromiter(self._vectors, np.int64)
        sims = queries @ np.stack(list(self._vectors.values())).T  # (Q, N)
        best = sims.argmax(axis=1)
        return ids[best], sims[np.arange(len(queries)), best]

    def __len__(self) -> int:
        return len(self._vectors)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "the faiss indexes need faiss-cpu: pip install 'kvengine[semantic]'"
        ) from exc
    return faiss


class _FaissIndex(VectorIndex):
    """Shared bookkeeping of the faiss indexes: which ids are live."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.faiss = _faiss()
        self._live: set[int] = set()

    def _check_new(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors = self._check(ids, vectors)
        if self._live.intersection(ids.tolist()) or len(set(ids.tolist())) < ids.size:
            raise ValueError("ids must be new and unique")
        return ids, vectors

    def _empty(self, num: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(num, NO_ID, np.int64), np.full(num, -np.inf, np.float32)

    def __len__(self) -> int:
        return len(self._live)


@INDEXES.register("faiss-flat")
class FaissFlatIndex(_FaissIndex):
    """faiss `IndexFlatIP` under an id map: exact, with removal by id."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._index = self.faiss.IndexIDMap2(self.faiss.IndexFlatIP(dim))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check_new(ids, vectors)
        self._index.add_with_ids(vectors, ids)
        self._live.update(ids.tolist())

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray([i for i in np.asarray(ids).reshape(-1).tolist() if i in self._live], np.int64)
        if ids.size:
            self._index.remove_ids(ids)
            self._live.difference_update(ids.tolist())

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if not self._live:
            return self._empty(len(queries))
        sims, ids = self._index.search(queries, 1)
        return ids[:, 0].astype(np.int64), sims[:, 0]


@INDEXES.register("faiss-hnsw")
class FaissHNSWIndex(_FaissIndex):
    """faiss `IndexHNSWFlat` (inner product): approximate; removal by skipping, rebuilt at half removed."""

    def __init__(self, dim: int, neighbours: int = 32, ef_search: int = 64) -> None:
        super().__init__(dim)
        self.neighbours, self.ef_search = neighbours, ef_search
        self._vectors: dict[int, np.ndarray] = {}  # live ones: the graph is rebuilt from them
        self._build()

    def _build(self) -> None:
        inner = self.faiss.IndexHNSWFlat(self.dim, self.neighbours, self.faiss.METRIC_INNER_PRODUCT)
        self._index = self.faiss.IndexIDMap2(inner)
        self._num_removed = 0
        if self._vectors:
            ids = np.fromiter(self._vectors, np.int64)
            self._index.add_with_ids(np.stack(list(self._vectors.values())), ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = self._check_new(ids, vectors)
        self._index.add_with_ids(vectors, ids)
        self._live.update(ids.tolist())
        self._vectors.update(zip(ids.tolist(), vectors.copy(), strict=True))

    def remove(self, ids: np.ndarray) -> None:
        gone = [i for i in np.asarray(ids).reshape(-1).tolist() if i in self._live]
        self._live.difference_update(gone)
        for i in gone:
            del self._vectors[i]
        self._num_removed += len(gone)
        if self._num_removed * 2 > self._index.ntotal:
            self._build()

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if not self._live:
            return self._empty(len(queries))
        params = self.faiss.SearchParametersHNSW()
        params.efSearch = self.ef_search
        if self._num_removed:
            params.sel = self.faiss.IDSelectorBatch(np.fromiter(self._live, np.int64))
        sims, ids = self._index.search(queries, 1, params=params)
        return ids[:, 0].astype(np.int64), sims[:, 0]


def make_index(name: str, dim: int) -> VectorIndex:
    """The index registered as `name`, for vectors of `dim`; InvalidRequestError listing the known ones."""
    return INDEXES.lookup(name)(dim)
