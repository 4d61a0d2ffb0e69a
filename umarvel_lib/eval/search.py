"""Exact top-k inner-product search, streamed over candidate blocks.

Scores are dot products of L2-normalised embeddings (= cosine). The candidate pool is never held
in memory as a whole: a :class:`CandidateSource` yields ``(block, global_indices)`` pairs (from an
in-memory array, from embedding shards on disk, or from a view over several shard stores), each
block is multiplied with a chunk of queries and a running top-k is merged block by block, so peak
memory is ``O(query_chunk * block_size + n_queries * k)``, independent of the pool size.

**Order and tie-break (the contract of this module).** Results are ordered by *higher score
first, then lower candidate index* (the index of the candidate in the pool's order, which is the
pool file's line order, or the concatenation order for the global pool). This is a total order, so
the top-k *set* and its order are uniquely defined even with exactly equal float scores, and the
torch and faiss backends, any block size, any query chunking and any split of the pool across
processes give identical ids in identical order (:func:`merge_topk` is exact and associative).

``torch.topk`` and faiss both break boundary ties arbitrarily; we ask them for ``k + 1`` results
per block and, only for the (rare) rows where the k-th and (k+1)-th scores are equal, recompute the
block's top-k for that row exactly. Scores themselves can differ in the last bits between BLAS
kernels (torch vs faiss, or different block shapes), so two *different* scores closer than ~1e-7
may be ordered differently by the two backends; exactly equal scores never are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

# Index sentinel for empty slots (pool smaller than k); sorts after every real index.
_PAD_IDX = np.iinfo(np.int64).max
TIE_BREAK = "score descending, then candidate index ascending"


class SearchError(ValueError):
    """Inconsistent search inputs (empty pool, dimension mismatch, non-finite embeddings...)."""


@dataclass
class TopK:
    """Per-query results: ``scores`` (Q, k) float32 and ``indices`` (Q, k) int64, best first.

    Empty slots (when the pool has fewer than k candidates) have score ``-inf`` and index ``-1``.
    """

    scores: np.ndarray
    indices: np.ndarray

    def __post_init__(self):
        if self.scores.shape != self.indices.shape:
            raise SearchError(
                f"scores {self.scores.shape} and indices {self.indices.shape} differ in shape"
            )

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def __len__(self) -> int:
        return self.scores.shape[0]

    @classmethod
    def empty(cls, n_queries: int, k: int) -> TopK:
        return cls(
            np.full((n_queries, k), -np.inf, np.float32), np.full((n_queries, k), -1, np.int64)
        )

    def save(self, path) -> None:
        np.savez(path, scores=self.scores, indices=self.indices)

    @classmethod
    def load(cls, path) -> TopK:
        with np.load(path) as z:
            return cls(z["scores"], z["indices"])


class CandidateSource(Protocol):
    """Anything that streams candidate embeddings in blocks.

    ``n``: pool size (indices are in ``[0, n)``); ``dim``: embedding dimension; ``num_parts``: the
    number of independent parts (shards) the pool can be split into across processes;
    ``blocks(parts, block_size)`` yields ``(float32 array (b, dim), int64 global indices (b,))``.
    """

    n: int
    dim: int
    num_parts: int

    def blocks(
        self, parts: Sequence[int] | None = None, block_size: int = 16384
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class ArraySource:
    """An in-memory (or memory-mapped) ``(n, dim)`` array as a candidate source.

    ``part_size`` rows form one part (for splitting the search across processes).
    """

    def __init__(self, emb: np.ndarray, *, part_size: int = 65536, check: bool = True):
        if emb.ndim != 2:
            raise SearchError(f"candidate embeddings must be 2-D (n, dim), got shape {emb.shape}")
        if emb.shape[0] == 0:
            raise SearchError("empty candidate pool: nothing to search")
        if check and not np.isfinite(emb).all():
            raise SearchError("candidate embeddings contain NaN or inf")
        self.emb = emb
        self.n, self.dim = emb.shape
        self.part_size = part_size
        self.num_parts = -(-self.n // part_size)

    def blocks(self, parts=None, block_size: int = 16384):
        parts = range(self.num_parts) if parts is None else parts
        for p in parts:
            lo, hi = p * self.part_size, min((p + 1) * self.part_size, self.n)
            for s in range(lo, hi, block_size):
                e = min(s + block_size, hi)
                yield (
                    np.ascontiguousarray(self.emb[s:e], dtype=np.float32),
                    np.arange(s, e, dtype=np.int64),
                )


def as_source(x) -> CandidateSource:
    return (
        ArraySource(np.asarray(x, dtype=np.float32))
        if isinstance(x, (np.ndarray, torch.Tensor))
        else x
    )


# ---- exact merge ----------------------------------------------------------------------------------


def _sort_rows(
    scores: torch.Tensor, idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (score desc, index asc) and keep the first k. Exact for any input order."""
    o = torch.argsort(idx, dim=1, stable=True)
    scores, idx = scores.gather(1, o), idx.gather(1, o)
    o = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, o), idx.gather(1, o)


def merge_topk(parts: Sequence[TopK], k: int | None = None) -> TopK:
    """Exact merge of per-part top-k results for the same queries (pure function).

    Each part must hold the top-k (under the module's total order) of a disjoint subset of the
    pool; the result is then the top-k of the union, whatever the number and order of parts.
    """
    parts = [p for p in parts if p is not None]
    if not parts:
        raise SearchError("merge_topk: no parts")
    nq = len(parts[0])
    if any(len(p) != nq for p in parts):
        raise SearchError(
            f"merge_topk: parts have different numbers of queries {[len(p) for p in parts]}"
        )
    k = k or max(p.k for p in parts)
    s = torch.from_numpy(np.concatenate([p.scores for p in parts], axis=1).astype(np.float32))
    i = torch.from_numpy(np.concatenate([p.indices for p in parts], axis=1).astype(np.int64))
    i = torch.where(i < 0, torch.full_like(i, _PAD_IDX), i)
    if s.shape[1] < k:
        s = torch.cat([s, torch.full((nq, k - s.shape[1]), -np.inf)], 1)
        i = torch.cat([i, torch.full((nq, k - i.shape[1]), _PAD_IDX, dtype=torch.int64)], 1)
    s, i = _sort_rows(s, i, k)
    i = torch.where(i == _PAD_IDX, torch.full_like(i, -1), i)
    return TopK(s.numpy().copy(), i.numpy().copy())


def dense_topk(queries: np.ndarray, cands: np.ndarray, k: int) -> TopK:
    """Reference implementation: the full score matrix and a stable sort (small inputs only)."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    c = torch.from_numpy(np.ascontiguousarray(cands, np.float32))
    s = q @ c.T
    idx = torch.arange(c.shape[0], dtype=torch.int64).expand_as(s).contiguous()
    s, idx = _sort_rows(s, idx, min(k, c.shape[0]))
    return merge_topk([TopK(s.numpy(), idx.numpy())], k)


# ---- block top-k with exact boundary ties ---------------------------------------------------------


def _topk_set(scores: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k *set* of each row under (score desc, index asc), in no particular order.

    ``idx``: the candidates' indices, ``(C,)`` shared by all rows or ``(R, C)`` per row. ``topk``
    is asked for k+1 values; only rows whose k-th and (k+1)-th scores are equal (where ``topk``'s
    choice among the tied candidates is arbitrary) are redone by a full stable sort.
    """
    r, c = scores.shape
    if c <= k:
        return scores, (idx.expand(r, c) if idx.dim() == 1 else idx)
    vals, pos = torch.topk(scores, k + 1, dim=1, sorted=True)
    amb = (vals[:, k] == vals[:, k - 1]).nonzero().flatten()
    vals, pos = vals[:, :k].contiguous(), pos[:, :k]
    ids = idx[pos] if idx.dim() == 1 else idx.gather(1, pos)
    if amb.numel():
        rows_idx = idx.expand(r, c)[amb] if idx.dim() == 1 else idx[amb]
        vals[amb], ids[amb] = _sort_rows(scores[amb], rows_idx, k)
    return vals, ids


def _block_topk_faiss(q: np.ndarray, block: np.ndarray, idx: torch.Tensor, k: int):
    """Same contract as :func:`_topk_set` for one block, with faiss computing scores and top-(k+1)."""
    import faiss

    b = block.shape[0]
    index = faiss.IndexFlatIP(block.shape[1])
    index.add(block)
    d, pos = index.search(q, min(k + 1, b))
    vals, pos_t = torch.from_numpy(d), torch.from_numpy(pos)
    if b <= k:
        return vals, idx[pos_t]
    amb = (vals[:, k] == vals[:, k - 1]).nonzero().flatten()
    vals, ids = vals[:, :k].contiguous(), idx[pos_t[:, :k]]
    if amb.numel():
        rows = torch.from_numpy(q)[amb] @ torch.from_numpy(block).T
        vals[amb], ids[amb] = _sort_rows(rows, idx.expand(rows.shape[0], -1), k)
    return vals, ids


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def search(
    queries: np.ndarray,
    source,
    k: int,
    *,
    backend: str = "torch",
    parts: Sequence[int] | None = None,
    block_size: int = 16384,
    query_chunk: int = 4096,
    device: str | torch.device | None = None,
    stats: dict | None = None,
) -> TopK:
    """Exact top-k of ``queries`` (Q, d) against a candidate ``source`` (an array or a
    :class:`CandidateSource`), streaming candidate blocks. ``parts`` restricts the search to some
    parts of the source (for splitting across processes; merge the results with :func:`merge_topk`).

    ``backend``: ``"torch"`` (chunked matmul + ``torch.topk``; runs on ``device``) or ``"faiss"``
    (an ``IndexFlatIP`` per block; CPU). Both return the same ids in the same order (module doc).
    """
    if backend not in ("torch", "faiss"):
        raise SearchError(f"unknown search backend {backend!r} (expected 'torch' or 'faiss')")
    if backend == "faiss" and not faiss_available():
        raise SearchError(
            "backend='faiss' but faiss is not importable; pip install faiss-cpu or use backend='torch'"
        )
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise SearchError(f"query embeddings must be 2-D (n, dim), got shape {queries.shape}")
    source = as_source(source)
    if source.n == 0:
        raise SearchError("empty candidate pool: nothing to search")
    if queries.shape[1] != source.dim:
        raise SearchError(
            f"embedding dimension mismatch: queries have dim {queries.shape[1]}, "
            f"candidates have dim {source.dim} (were they encoded by different models?)"
        )
    if not np.isfinite(queries).all():
        raise SearchError("query embeddings contain NaN or inf")
    nq = queries.shape[0]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "faiss":
        dev = torch.device("cpu")
    run_s = torch.full((nq, k), -np.inf, dtype=torch.float32, device=dev)
    run_i = torch.full((nq, k), _PAD_IDX, dtype=torch.int64, device=dev)
    q_all = torch.from_numpy(queries).to(dev)
    chunks = list(iter_chunks(nq, query_chunk))
    # Block results wait in a buffer and are merged a few blocks at a time (fewer small ops);
    # the buffer is bounded to ~256 MB whatever the number of queries.
    merge_every = int(max(1, min(8, (256 << 20) // max(1, nq * k * 12))))
    pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in chunks]

    def flush(c: int):
        if pending[c]:
            qs, qe = chunks[c]
            cs = torch.cat([run_s[qs:qe]] + [v for v, _ in pending[c]], 1)
            ci = torch.cat([run_i[qs:qe]] + [i for _, i in pending[c]], 1)
            run_s[qs:qe], run_i[qs:qe] = _topk_set(cs, ci, k)
            pending[c].clear()

    t0, n_seen, n_blocks = time.perf_counter(), 0, 0
    for block, gidx in source.blocks(parts, block_size):
        if block.shape[1] != source.dim:
            raise SearchError(f"candidate block has dim {block.shape[1]}, expected {source.dim}")
        n_seen += block.shape[0]
        n_blocks += 1
        idx_t = torch.from_numpy(np.ascontiguousarray(gidx, dtype=np.int64)).to(dev)
        b_t = torch.from_numpy(block).to(dev) if backend == "torch" else None
        for c, (qs, qe) in enumerate(chunks):
            if backend == "torch":
                pending[c].append(_topk_set(q_all[qs:qe] @ b_t.T, idx_t, k))
            else:
                pending[c].append(_block_topk_faiss(queries[qs:qe], block, idx_t, k))
            if len(pending[c]) >= merge_every:
                flush(c)
    for c in range(len(chunks)):
        flush(c)
    run_s, run_i = _sort_rows(run_s, run_i, k)
    if stats is not None:
        stats.update(seconds=time.perf_counter() - t0, candidates=n_seen, blocks=n_blocks)
    run_i = torch.where(run_i == _PAD_IDX, torch.full_like(run_i, -1), run_i)
    return TopK(run_s.cpu().numpy(), run_i.cpu().numpy())


def split_parts(num_parts: int, rank: int, world_size: int) -> list[int]:
    """Parts handled by process ``rank`` of ``world_size`` (round-robin)."""
    return list(range(rank, num_parts, world_size))


def search_sharded(queries: np.ndarray, source, k: int, *, world_size: int, **kw) -> TopK:
    """Single-process emulation of a ``world_size``-way split: each simulated rank searches its
    parts, the partial results are merged exactly. Equals :func:`search` on the whole source."""
    source = as_source(source)
    outs = [
        search(queries, source, k, parts=split_parts(source.num_parts, r, world_size), **kw)
        for r in range(world_size)
    ]
    return merge_topk(outs, k)


def iter_chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(s + size, n)


class MappedSource:
    """Several sources seen as one pool through index maps (the global pool over local shard stores).

    ``members``: ``[(source, gmap), ...]`` where ``gmap[i]`` is the pool index of the member's row
    ``i``, or -1 to leave that row out (a duplicate removed by deduplication). Parts are the
    members' parts, in order.
    """

    def __init__(self, members: Sequence[tuple[object, np.ndarray]], n: int):
        self.members = [(as_source(s), np.asarray(g, dtype=np.int64)) for s, g in members]
        if n == 0 or not self.members:
            raise SearchError("empty candidate pool: nothing to search")
        dims = {s.dim for s, _ in self.members}
        if len(dims) != 1:
            raise SearchError(f"candidate sources have different embedding dims {sorted(dims)}")
        for s, g in self.members:
            if g.shape != (s.n,):
                raise SearchError(f"index map of shape {g.shape} for a source of {s.n} rows")
        self.n, self.dim = n, dims.pop()
        self._parts = [(m, j) for m, (s, _) in enumerate(self.members) for j in range(s.num_parts)]
        self.num_parts = len(self._parts)

    def blocks(self, parts=None, block_size: int = 16384):
        parts = range(self.num_parts) if parts is None else parts
        for p in parts:
            m, j = self._parts[p]
            src, gmap = self.members[m]
            for block, lidx in src.blocks([j], block_size):
                g = gmap[lidx]
                keep = g >= 0
                if not keep.all():
                    block, g = block[keep], g[keep]
                if g.size:
                    yield block, g
