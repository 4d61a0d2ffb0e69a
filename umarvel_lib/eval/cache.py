"""Embedding shard cache: encode once, resume after interruption, never reuse a stale cache.

A cache entry is a directory ``<cache_dir>/<kind>-<hash of key>/`` holding ``meta.json`` (the full
key, item count, shard size, dtype) and ``shard_000000.npy``, ``shard_000001.npy``, ... Shard ``i``
holds the embeddings of items ``[i*shard_size, (i+1)*shard_size)``.

- **Key.** Whatever identifies the embeddings: for candidate pools (checkpoint fingerprint, embedder
  config hash, pool file sha256, a digest of the bytes of the images its records name, item count,
  shard size, dtype); for queries the same with a digest of the query records *and the sampled
  instructions* and of their images. Any change gives a different directory, so
  a stale cache is never read; ``meta.json`` is compared with the requested key on open.
- **Atomic shards.** Each shard is written to a temporary sibling named after its writer (host, pid),
  fsynced and renamed, so a shard file that exists is complete. An interrupted encode leaves complete
  shards plus, at most, a hidden temporary (removed once its writer is dead); the next call encodes
  only the missing shards. A shard damaged later (fewer bytes than its header needs) is logged with
  its path, deleted and encoded again.
- **Processes.** Shards are assigned round-robin over *all* (entry, shard) pairs, identically on
  every process, and a process skips shards that already exist: ``world_size`` processes share the
  work with no communication; after a barrier every process sees the complete entry.
- **Streaming reads.** :class:`ShardStore` is a :class:`~umarvel_lib.eval.search.CandidateSource`.
  Blocks are read with plain file reads into fresh arrays (not ``mmap``: touched mmap pages count
  towards RSS until the kernel reclaims them), so memory stays at one block whatever the pool size.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import (
    DamagedFileError,
    atomic_write_bytes,
    atomic_write_json,
    config_hash,
    read_json,
    remove_stale_tmp,
)

log = logging.getLogger(__name__)

META = "meta.json"
NORM_TOL = 1e-2


class CacheError(ValueError):
    """A cache entry that cannot be used (key mismatch, corrupt shard, bad encoder output)."""


def check_embeddings(emb, n: int, where: str, *, dim: int | None = None) -> np.ndarray:
    """Validate an encoder's output: (n, dim) finite float rows of unit L2 norm. Returns float32."""
    if hasattr(emb, "detach"):  # a torch tensor
        emb = emb.detach().float().cpu().numpy()
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise CacheError(f"{where}: encoder returned shape {emb.shape}, expected ({n}, dim)")
    if dim is not None and emb.shape[1] != dim:
        raise CacheError(
            f"{where}: encoder returned dim {emb.shape[1]}, but earlier shards have dim {dim}"
        )
    emb = emb.astype(np.float32, copy=False)
    if not np.isfinite(emb).all():
        raise CacheError(f"{where}: encoder returned NaN or inf")
    norms = np.linalg.norm(emb, axis=1)
    bad = np.abs(norms - 1) > NORM_TOL
    if bad.any():
        raise CacheError(
            f"{where}: encoder must return L2-normalised rows; {int(bad.sum())} of {n} rows have "
            f"norm outside 1±{NORM_TOL} (e.g. {float(norms[bad][0]):.4f})"
        )
    return emb


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise CacheError(f"{f.name}: Fortran-ordered shard")
    return shape, dtype, f.tell()


class ShardStore:
    """One cache entry on disk: a candidate source streaming its shards block by block."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_f = self.path / META
        if not meta_f.is_file():
            raise CacheError(f"{self.path}: not an embedding cache entry (no {META})")
        self.meta = read_json(meta_f)
        self.key = self.meta["key"]
        self.n = int(self.meta["n"])
        self.shard_size = int(self.meta["shard_size"])
        self.num_parts = -(-self.n // self.shard_size)
        self._dim: int | None = None

    # -- layout --------------------------------------------------------------------------------
    def shard_path(self, i: int) -> Path:
        return self.path / f"shard_{i:06d}.npy"

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.n)

    def shard_shape(self, i: int) -> tuple[int, ...] | None:
        """Shape of shard ``i``, or None when it is absent. A damaged shard (unreadable header, or fewer
        bytes than its header promises: a copy cut short, a full disk) is a cache miss: it is logged
        with its path, deleted and encoded again."""
        p = self.shard_path(i)
        if not p.is_file():
            return None
        try:
            with open(p, "rb") as f:
                shape, dtype, offset = _npy_header(f)
            if len(shape) != 2:
                raise ValueError(f"{len(shape)}-d array")
            want = offset + int(np.prod(shape)) * dtype.itemsize
            size = p.stat().st_size
            if size != want:
                raise ValueError(f"{size} bytes, its header needs {want}")
        except (ValueError, OSError, CacheError) as e:
            log.warning(
                "%s: damaged embedding shard (%s); discarding it, it is encoded again", p, e
            )
            p.unlink(missing_ok=True)
            return None
        return shape

    def has_shard(self, i: int) -> bool:
        """True if shard ``i`` exists with the expected row count (a wrong one is deleted)."""
        shape = self.shard_shape(i)
        if shape is None:
            return False
        lo, hi = self.shard_range(i)
        if len(shape) != 2 or shape[0] != hi - lo:
            log.warning(
                "%s has shape %s, expected (%d, dim); discarding it",
                self.shard_path(i),
                shape,
                hi - lo,
            )
            self.shard_path(i).unlink(missing_ok=True)
            return False
        return True

    def missing(self) -> list[int]:
        return [i for i in range(self.num_parts) if not self.has_shard(i)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    @property
    def dim(self) -> int:
        if self._dim is None:
            dims = {s[1] for i in range(self.num_parts) if (s := self.shard_shape(i)) is not None}
            if not dims:
                raise CacheError(f"{self.path}: no shard written yet; dimension unknown")
            if len(dims) > 1:
                raise CacheError(
                    f"{self.path}: shards have different embedding dims {sorted(dims)}"
                )
            self._dim = dims.pop()
        return self._dim

    def verify(self) -> ShardStore:
        """Raise unless every shard is present, with consistent dims."""
        miss = self.missing()
        if miss:
            raise CacheError(
                f"{self.path}: incomplete, {len(miss)} of {self.num_parts} shards missing "
                f"(first {miss[:5]}); was the encode interrupted?"
            )
        _ = self.dim
        return self

    def write_shard(self, i: int, emb: np.ndarray) -> None:
        lo, hi = self.shard_range(i)
        if emb.shape[0] != hi - lo:
            raise CacheError(f"{self.path}: shard {i} needs {hi - lo} rows, got {emb.shape[0]}")
        buf = io.BytesIO()
        np.save(
            buf, np.ascontiguousarray(emb.astype(self.meta.get("dtype", "float32"), copy=False))
        )
        atomic_write_bytes(self.shard_path(i), buf.getvalue())

    # -- reading -------------------------------------------------------------------------------
    def read_rows(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of shard ``i`` (local row numbers), as float32."""
        p = self.shard_path(i)
        try:
            with open(p, "rb") as f:
                shape, dtype, offset = _npy_header(f)
                stop = shape[0] if stop is None else min(stop, shape[0])
                f.seek(offset + start * shape[1] * dtype.itemsize)
                a = np.fromfile(f, dtype=dtype, count=(stop - start) * shape[1]).reshape(
                    stop - start, shape[1]
                )
        except (ValueError, OSError) as e:
            raise CacheError(
                f"{p}: damaged embedding shard ({e}); delete it and rerun to encode it again"
            ) from None
        return a.astype(np.float32, copy=False)

    def blocks(self, parts: Sequence[int] | None = None, block_size: int = 16384):
        parts = range(self.num_parts) if parts is None else parts
        for i in parts:
            lo, hi = self.shard_range(i)
            for s in range(0, hi - lo, block_size):
                e = min(s + block_size, hi - lo)
                yield self.read_rows(i, s, e), np.arange(lo + s, lo + e, dtype=np.int64)

    def load(self) -> np.ndarray:
        """All embeddings in memory (small entries only, e.g. a row's queries)."""
        self.verify()
        if self.n == 0:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([self.read_rows(i) for i in range(self.num_parts)])


@dataclass
class EncodeJob:
    """Something to encode into the cache: ``n`` items, fetched lazily by ``items(start, stop)``."""

    key: dict
    n: int
    items: Callable[[int, int], list] | Sequence
    name: str = ""

    def get(self, lo: int, hi: int) -> list:
        return self.items(lo, hi) if callable(self.items) else list(self.items[lo:hi])


class EmbeddingCache:
    """Key-addressed embedding shards under ``root`` (see the module doc)."""

    def __init__(self, root: str | os.PathLike, *, shard_size: int = 16384, dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"cache dtype must be float32 or float16, got {dtype!r}")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.root = Path(root)
        self.shard_size = shard_size
        self.dtype = dtype

    def full_key(self, key: dict) -> dict:
        return {**key, "shard_size": self.shard_size, "dtype": self.dtype}

    def path_for(self, key: dict) -> Path:
        fk = self.full_key(key)
        return self.root / f"{fk.get('kind', 'emb')}-{config_hash(fk)}"

    def open(self, job: EncodeJob) -> ShardStore:
        """Create (or reopen) the entry of ``job``; a ``meta.json`` that disagrees is an error."""
        path = self.path_for(job.key)
        fk = self.full_key(job.key)
        meta = {
            "key": fk,
            "n": job.n,
            "shard_size": self.shard_size,
            "dtype": self.dtype,
            "name": job.name,
        }
        mf = path / META
        old = None
        if mf.is_file():
            try:
                old = read_json(mf)
            except (
                DamagedFileError
            ) as e:  # its content is fully determined by the key: write it again
                log.warning("%s; rewriting it", e)
        if old is not None:
            if old.get("key") != json.loads(json.dumps(fk)) or old.get("n") != job.n:
                raise CacheError(
                    f"{path}: cache entry holds a different key or size than requested "
                    f"(hash collision or hand-edited cache); delete it"
                )
        else:
            atomic_write_json(mf, meta)  # identical content from every process: the rename is safe
        return ShardStore(path)

    def encode(
        self,
        jobs: Sequence[EncodeJob],
        encoder,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> list[ShardStore]:
        """Encode the missing shards of ``jobs`` that belong to ``rank``; return the stores.

        Call it on every process, then synchronise (barrier) and :meth:`ShardStore.verify`.
        """
        stores = [self.open(j) for j in jobs]
        work = [(s, j, i) for s, j in zip(stores, jobs) for i in range(s.num_parts)]
        mine = work[rank::world_size]
        todo = [(s, j, i) for s, j, i in mine if not s.has_shard(i)]
        if todo:
            log.info(
                "encoding %d of %d shards (rank %d/%d; %d already cached)",
                len(todo),
                len(work),
                rank,
                world_size,
                len(mine) - len(todo),
            )
        t0, done_items = time.perf_counter(), 0
        dims: dict[Path, int] = {}
        for s, j, i in todo:
            lo, hi = s.shard_range(i)
            items = j.get(lo, hi)
            if len(items) != hi - lo:
                raise CacheError(
                    f"{j.name or s.path}: expected {hi - lo} items for shard {i}, got {len(items)}"
                )
            emb = check_embeddings(
                encoder.encode(items, batch_size),
                hi - lo,
                f"{j.name or s.path} shard {i}",
                dim=dims.get(s.path),
            )
            dims[s.path] = emb.shape[1]
            s.write_shard(i, emb)
            done_items += hi - lo
            if progress:
                rate = done_items / max(time.perf_counter() - t0, 1e-9)
                log.info("%s shard %d/%d written (%.1f items/s)", j.name, i + 1, s.num_parts, rate)
        return stores

    def cleanup_tmp(self) -> int:
        """Remove temporaries left by killed writes: only those whose owner process is dead (a shard
        temporary is named after its writer's host and pid), so it is safe while other processes encode
        into the same cache."""
        n = 0
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_dir():
                    n += remove_stale_tmp(entry, ".shard_*.tmp-*") + remove_stale_tmp(
                        entry, f".{META}.tmp-*"
                    )
        return n
