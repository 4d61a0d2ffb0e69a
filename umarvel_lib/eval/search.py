"""Exact top-k inner-product search, streamed over candidate blocks.

(Over 400 lines: one concern, the exact search; its sources, the exact tie-break and the tiled merge
that keeps it within reach of faiss are one algorithm read together.)

Scores are dot products of L2-normalised embeddings (= cosine). The candidate pool is never held
in memory as a whole: a :class:`CandidateSource` yields ``(block, global_indices)`` pairs (from an
in-memory array, from embedding shards on disk, or from a view over several shard stores), each
block is multiplied with a chunk of queries and a running top-k is merged block by block, so peak
memory is ``O(query_chunk * block_size + n_queries * k)``, independent of the pool size.

**Speed (torch backend).** The scores of a block are computed in tiles (on CPU ``_TILE`` candidates
by at most ``_QTILE`` queries, into one reused buffer that stays in cache) and, once a query's
running top-k holds k candidates, only the candidates scoring at least its current k-th best are
gathered and merged (what faiss's heaps do): after the first few tiles that is a few per query and
tile, so the search costs the matmul plus a pass over each tile (``bench/search.py``). The tiling,
the pruning and when survivors are merged do not change the results (tests/test_eval_search.py).

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


# Candidates per score tile of the torch backend (CPU): a (query_chunk, _TILE) float32 tile stays in
# cache for the threshold pass that follows its matmul. Internal: results do not depend on it.
_TILE = 2048
_QTILE = 4096
_GROUP = 64
_MERGE_EVERY = 8  # tiles whose survivors are merged at once


def _at_least(sc: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sc >= thr).nonzero()`` as (rows, cols) in row-major order, for a ``thr`` (R, 1) that few
    scores reach: the maxima of groups of _GROUP columns (a fast reduction) are compared first, and
    only the groups that reach ``thr`` are compared element by element."""
    r, t = sc.shape
    m = t - t % _GROUP
    rows, cols = [], []
    if m:
        g = sc[:, :m].view(r, m // _GROUP, _GROUP)
        gr, gc = (g.amax(2) >= thr).nonzero(as_tuple=True)
        h, pos = (g[gr, gc] >= thr[gr]).nonzero(as_tuple=True)
        rows.append(gr[h])
        cols.append(gc[h] * _GROUP + pos)
    if m < t:
        tr, tc = (sc[:, m:] >= thr).nonzero(as_tuple=True)
        rows.append(tr)
        cols.append(tc + m)
    if len(rows) == 1:
        return rows[0], cols[0]
    rows, cols = torch.cat(rows), torch.cat(cols)
    o = torch.argsort(rows, stable=True)
    return rows[o], cols[o]


class _RunningTopK:
    """Exact running top-k of one query chunk (views ``s``, ``i`` (R, k) into the result), fed score
    tiles by :meth:`add`.

    Once the top-k holds k candidates, only a tile's candidates scoring ``>=`` a row's current k-th
    best can enter it (a lower score has k better ones already; an equal one may still win on a lower
    index): they alone are gathered (:func:`_at_least`; a few per row and tile), kept for a few tiles
    and merged by :func:`_topk_set`. The threshold is the one of the last merge, which is never above
    the current one, so the result is exactly that of merging every tile's full top-k.
    """

    def __init__(self, s: torch.Tensor, i: torch.Tensor, k: int):
        self.s, self.i, self.k = s, i, k
        self.seen, self.tiles, self.n_pending = 0, 0, 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.thr = s.amin(1, keepdim=True)

    def add(self, sc: torch.Tensor, idx: torch.Tensor) -> None:
        """Merge a score tile ``sc`` (R, t) of the candidates ``idx`` (t,)."""
        full, self.seen = self.seen >= self.k, self.seen + sc.shape[1]
        if full:
            rows, cols = _at_least(sc, self.thr)
            if rows.numel() <= sc.numel() // 8:
                if rows.numel():
                    self.pending.append((rows, sc[rows, cols], idx[cols]))
                    self.n_pending += rows.numel()
                self.tiles += 1
                if self.tiles >= _MERGE_EVERY or self.n_pending > self.s.numel():
                    self.flush()
                return
        # not full yet, or many survivors (tie-heavy data): the tile's own top-k is cheaper
        self.merge(*_topk_set(sc, idx, self.k))

    def merge(self, v: torch.Tensor, i: torch.Tensor) -> None:
        """Merge a block's top-k set ``(v, i)`` (R, k), e.g. from :func:`_topk_set`."""
        self.flush()
        self.s[:], self.i[:] = _topk_set(
            torch.cat([self.s, v], 1), torch.cat([self.i, i], 1), self.k
        )
        self.thr = self.s.amin(1, keepdim=True)

    def flush(self) -> None:
        """Merge the pending survivors into the top-k and raise the threshold."""
        self.tiles = 0
        if not self.pending:
            return
        rows, sv, iv = (torch.cat(x) for x in zip(*self.pending))
        if len(self.pending) > 1:  # each tile's survivors are row-major; their concatenation is not
            o = torch.argsort(rows, stable=True)
            rows, sv, iv = rows[o], sv[o], iv[o]
        self.pending, self.n_pending = [], 0
        counts = torch.bincount(rows, minlength=self.s.shape[0])
        hit = counts.nonzero().flatten()
        # slot of each survivor within its row, and its row's number among the rows ``hit``
        slot = (
            torch.arange(rows.numel(), device=rows.device)
            - (torch.cumsum(counts, 0) - counts)[rows]
        )
        crow = (torch.cumsum(counts > 0, 0) - 1)[rows]
        width = int(counts.max())
        s_new = torch.full((hit.numel(), width), -np.inf, dtype=sv.dtype, device=sv.device)
        i_new = torch.full((hit.numel(), width), _PAD_IDX, dtype=torch.int64, device=sv.device)
        s_new[crow, slot], i_new[crow, slot] = sv, iv
        self.s[hit], self.i[hit] = _topk_set(
            torch.cat([self.s[hit], s_new], 1), torch.cat([self.i[hit], i_new], 1), self.k
        )
        self.thr = self.s.amin(1, keepdim=True)


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

    ``backend``: ``"torch"`` (tiled matmul + threshold-pruned merge; runs on ``device``) or ``"faiss"``
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
    cpu = dev.type == "cpu"
    chunks = list(iter_chunks(nq, min(query_chunk, _QTILE) if cpu else query_chunk))
    tile = _TILE if cpu else block_size
    tops = [_RunningTopK(run_s[qs:qe], run_i[qs:qe], k) for qs, qe in chunks]
    buf = None
    t0, n_seen, n_blocks = time.perf_counter(), 0, 0
    for block, gidx in source.blocks(parts, block_size):
        if block.shape[1] != source.dim:
            raise SearchError(f"candidate block has dim {block.shape[1]}, expected {source.dim}")
        n_blocks += 1
        idx_t = torch.from_numpy(np.ascontiguousarray(gidx, dtype=np.int64)).to(dev)
        if backend == "faiss":
            for (qs, qe), top in zip(chunks, tops):
                top.merge(*_block_topk_faiss(queries[qs:qe], block, idx_t, k))
            n_seen += block.shape[0]
            continue
        b_t = torch.from_numpy(block).to(dev)
        for ts in range(0, b_t.shape[0], tile):
            c_t, i_t = b_t[ts : ts + tile], idx_t[ts : ts + tile]
            for (qs, qe), top in zip(chunks, tops):
                # scores into a reused buffer (no fresh pages per block); contiguous view of its head
                need = (qe - qs) * c_t.shape[0]
                if buf is None or buf.numel() < need:
                    buf = torch.empty(need, dtype=torch.float32, device=dev)
                sc = buf[:need].view(qe - qs, c_t.shape[0])
                torch.mm(q_all[qs:qe], c_t.T, out=sc)
                top.add(sc, i_t)
        n_seen += b_t.shape[0]
    for top in tops:
        top.flush()
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
