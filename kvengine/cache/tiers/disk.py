"""The disk tier: one file per key in a local directory, bounded in bytes, LRU; survives restarts.

It is not a shared store: a directory should have one writing process at a
time (see `redis_tier.py` for a tier several processes share).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from kvengine.cache.tiers.base import TIERS, Tier, check_capacity
from kvengine.errors import InvalidRequestError

log = logging.getLogger("kvengine.tiers")

_TMP_PREFIX = ".tmp-"


def _is_blob_name(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


@TIERS.register("disk")
class DiskTier(Tier):
    """One file per key under `directory`, least recently used evicted first; survives restarts.

    A key's file is `<directory>/<h[:2]>/<h>` with `h` the SHA-256 hex of the
    key; it is written to a temporary file in the same folder and renamed, so
    a reader sees a whole blob or none. Recency is the file's mtime (touched on
    every hit), so a new `DiskTier` on the same directory rebuilds the index
    and the LRU order by scanning it, and removes temporary files left by a
    crash. The index is this object's: a directory should have one writer
    process at a time (a second one only makes capacity inexact).
    """

    name = "disk"

    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int) -> None:
        super().__init__()
        self._capacity = self.capacity_bytes = check_capacity(capacity_bytes)
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidRequestError(f"disk tier directory {str(self.directory)!r}: {e}") from None
        self._sizes: OrderedDict[str, int] = OrderedDict()  # file name -> size, oldest access first
        self._used = 0
        self._dirty: set[str] = set()  # written since the last flush
        self._clock_ns = 0  # the last mtime given: strictly increasing, see _tick
        self._scan()
        with self._lock:
            self._evict_locked()

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []  # (mtime_ns, name, size)
        for sub in self.directory.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for entry in os.scandir(sub):
                try:
                    if entry.name.startswith(_TMP_PREFIX):
                        os.unlink(entry.path)  # a write that never finished
                    elif _is_blob_name(entry.name) and entry.is_file():
                        st = entry.stat()
                        found.append((st.st_mtime_ns, entry.name, st.st_size))
                except OSError:
                    self.stats.errors += 1
        for mtime_ns, name, size in sorted(found):
            self._sizes[name] = size
            self._used += size
            self._clock_ns = max(self._clock_ns, mtime_ns)

    def _tick(self) -> int:
        # File times come from a coarse clock (a few ms), so blobs written in a
        # burst would tie; explicit, strictly increasing times keep the order.
        self._clock_ns = max(time.time_ns(), self._clock_ns + 1)
        return self._clock_ns

    def _path(self, name: str) -> Path:
        return self.directory / name[:2] / name

    @staticmethod
    def _file_name(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def get(self, key: str) -> bytes | None:
        name = self._file_name(key)
        with self._lock:
            if name not in self._sizes:
                self.stats.misses += 1
                return None
            path = self._path(name)
            try:
                blob = path.read_bytes()
                t = self._tick()
                os.utime(path, ns=(t, t))  # recency survives a restart
            except OSError as e:
                # Vanished (removed by hand or another process) or unreadable: a miss from now on.
                self._forget_locked(name)
                self.stats.misses += 1
                if not isinstance(e, FileNotFoundError):
                    self.stats.errors += 1
                return None
            self._sizes.move_to_end(name)
            self.stats.hits += 1
            return blob

    def put(self, key: str, blob: bytes) -> bool:
        if len(blob) > self._capacity:
            return False
        name = self._file_name(key)
        path = self._path(name)
        with self._lock:
            tmp = None
            try:
                path.parent.mkdir(exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()  # the time set below must be the last change to the file
                    t = self._tick()
                    os.utime(f.fileno(), ns=(t, t))
                os.replace(tmp, path)
            except OSError as e:
                self.stats.errors += 1
                log.warning("disk tier: cannot write %s: %s", path, e)
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
                return False
            self._used += len(blob) - self._sizes.pop(name, 0)
            self._sizes[name] = len(blob)
            self._dirty.add(name)
            self.stats.stores += 1
            self._evict_locked()
            return True

    def _evict_locked(self) -> None:
        while self._used > self._capacity:
            name = next(iter(self._sizes))
            self._path(name).unlink(missing_ok=True)
            self._forget_locked(name)
            self.stats.evictions += 1

    def _forget_locked(self, name: str) -> None:
        self._used -= self._sizes.pop(name, 0)
        self._dirty.discard(name)

    def contains(self, key: str) -> bool:
        with self._lock:
            return self._file_name(key) in self._sizes

    def delete(self, key: str) -> None:
        name = self._file_name(key)
        with self._lock:
            try:
                self._path(name).unlink(missing_ok=True)
            except OSError:
                self.stats.errors += 1
            self._forget_locked(name)

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._used

    def flush(self) -> None:
        """fsync the files written since the last flush, then their folders (so the renames last)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            folders = {self.directory} | {self._path(n).parent for n in dirty}
            for path in [self._path(n) for n in dirty] + sorted(folders):
                try:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except FileNotFoundError:
                    pass  # evicted or deleted since
                except OSError:
                    self.stats.errors += 1

    def close(self) -> None:
        self.flush()
