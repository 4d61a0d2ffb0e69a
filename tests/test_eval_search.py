"""Exact streaming search: equals a dense full-matrix top-k (ids and order, ties included), for any
block size, query chunking, process split and backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umarvel_lib.eval.cache import EmbeddingCache, EncodeJob
from umarvel_lib.eval.search import (
    ArraySource,
    MappedSource,
    SearchError,
    TopK,
    dense_topk,
    faiss_available,
    merge_topk,
    search,
    search_sharded,
    split_parts,
)

K = 20


@pytest.fixture(scope="module")
def tied():
    """Integer-valued vectors: every dot product is exact in float32 and ties are everywhere."""
    rng = np.random.default_rng(0)
    c = rng.integers(-2, 3, size=(1500, 6)).astype(np.float32)
    q = rng.integers(-2, 3, size=(32, 6)).astype(np.float32)
    return q, c


@pytest.fixture(scope="module")
def floats():
    rng = np.random.default_rng(1)
    c = rng.standard_normal((4000, 32)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = rng.standard_normal((50, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, c


def _same(a: TopK, b: TopK):
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_dense_reference_is_score_desc_then_index_asc(tied):
    q, c = tied
    ref = dense_topk(q, c, K)
    s = q @ c.T
    for r in range(len(q)):
        order = sorted(range(len(c)), key=lambda j: (-s[r, j], j))[:K]
        assert ref.indices[r].tolist() == order
    # plenty of exact ties at the boundary, or the test would prove nothing
    full = np.sort(s, axis=1)[:, ::-1]
    assert (full[:, K - 1] == full[:, K]).mean() > 0.5


@pytest.mark.parametrize("block_size,query_chunk", [(97, 32), (600, 5), (5000, 32)])
def test_streaming_equals_dense_with_ties(tied, block_size, query_chunk):
    q, c = tied
    _same(
        search(q, ArraySource(c, part_size=700), K, block_size=block_size, query_chunk=query_chunk),
        dense_topk(q, c, K),
    )


@pytest.mark.parametrize(
    "tile,qtile,group,merge_every", [(64, 7, 16, 1), (300, 32, 64, 3), (2048, 4096, 64, 8)]
)
def test_tiles_and_pruning_do_not_change_results(
    monkeypatch, tied, tile, qtile, group, merge_every
):
    """The torch backend's internal tiling, group-max prefilter and delayed merges are exact: ties at
    the running k-th score (integer data) and float scores (dim 256, bits compared) come out identical
    to the dense reference / the default settings."""
    import umarvel_lib.eval.search as S

    rng = np.random.default_rng(7)
    c = rng.standard_normal((5000, 256)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = c[rng.choice(len(c), 40, replace=False)] + 0.1 * rng.standard_normal((40, 256)).astype(
        np.float32
    )
    default = search(q, c, K, block_size=1000)
    for name, v in (
        ("_TILE", tile),
        ("_QTILE", qtile),
        ("_GROUP", group),
        ("_MERGE_EVERY", merge_every),
    ):
        monkeypatch.setattr(S, name, v)
    tq, tc = tied
    # the pool read backwards: a candidate tied with the running k-th arrives later yet wins
    backwards = MappedSource([(tc[::-1].copy(), np.arange(len(tc))[::-1].copy())], n=len(tc))
    for bs in (97, 1000):
        _same(search(tq, ArraySource(tc, part_size=700), K, block_size=bs), dense_topk(tq, tc, K))
        _same(search(tq, backwards, K, block_size=bs), dense_topk(tq, tc, K))
        _same(search(q, c, K, block_size=bs), default)
    np.testing.assert_array_equal(default.indices, dense_topk(q, c, K).indices)


def test_streaming_equals_torch_topk_on_floats(floats):
    q, c = floats
    got = search(q, c, K, block_size=333)
    s = torch.from_numpy(q) @ torch.from_numpy(c).T
    v, i = torch.topk(s, K, dim=1)
    np.testing.assert_array_equal(got.indices, i.numpy())
    np.testing.assert_allclose(got.scores, v.numpy(), atol=1e-6)


def test_split_across_processes_merges_exactly(tied):
    q, c = tied
    ref = dense_topk(q, c, K)
    src = ArraySource(c, part_size=256)
    for world in (2, 5):
        _same(search_sharded(q, src, K, world_size=world), ref)
    parts = [search(q, src, K, parts=split_parts(src.num_parts, r, 3)) for r in range(3)]
    _same(merge_topk(parts[::-1], K), ref)  # order of parts does not matter
    _same(merge_topk([merge_topk(parts[:2], K), parts[2]], K), ref)  # associative


def test_pool_smaller_than_k_pads():
    c = np.eye(4, dtype=np.float32)
    r = search(c[:2], c, 10)
    assert r.indices[0].tolist()[:4] == [0, 1, 2, 3] and (r.indices[:, 4:] == -1).all()
    assert np.isneginf(r.scores[:, 4:]).all()


def test_mapped_source_exclusions_and_permuted_indices(tied):
    q, c = tied
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(c))  # pool index of each row
    gmap = perm.copy()
    drop = rng.choice(len(c), 200, replace=False)
    gmap[drop] = -1
    half = len(c) // 2
    view = MappedSource(
        [
            (ArraySource(c[:half], part_size=400), gmap[:half]),
            (ArraySource(c[half:], part_size=400), gmap[half:]),
        ],
        n=len(c),
    )
    pool = np.zeros_like(c)
    pool[perm] = c
    keep = np.ones(len(c), bool)
    keep[perm[drop]] = False
    ref = dense_topk(q, pool[keep], K)
    ref_idx = np.flatnonzero(keep)[ref.indices]
    got = search(q, view, K, block_size=256)
    np.testing.assert_array_equal(got.indices, ref_idx)
    _same(search_sharded(q, view, K, world_size=2), got)


def test_shard_store_source_equals_array(tmp_path, floats):
    q, c = floats

    class Fixed:
        def encode(self, items, batch_size):
            return c[np.array(items)]

        def fingerprint(self):
            return "fixed"

    cache = EmbeddingCache(tmp_path, shard_size=900)
    (store,) = cache.encode(
        [EncodeJob({"kind": "pool"}, len(c), list(range(len(c))))], Fixed(), batch_size=8
    )
    _same(search(q, store.verify(), K, block_size=250), search(q, c, K))


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_backend_equals_ours(tied, floats):
    q, c = tied
    _same(search(q, c, K, backend="faiss", block_size=700), dense_topk(q, c, K))
    q, c = floats
    ours, theirs = search(q, c, K), search(q, c, K, backend="faiss", block_size=1500)
    # different BLAS kernels may order two *different* scores closer than ~1e-7 differently
    np.testing.assert_allclose(ours.scores, theirs.scores, atol=1e-5)
    diff = ours.indices != theirs.indices
    if diff.any():
        gaps = np.abs(np.diff(ours.scores, axis=1)).min()
        assert gaps < 1e-5, "faiss and torch disagree on well-separated scores"


def test_bad_inputs_raise_clear_errors(floats):
    q, c = floats
    with pytest.raises(SearchError, match="dimension mismatch"):
        search(q[:, :16], c, K)
    with pytest.raises(SearchError, match="empty candidate pool"):
        search(q, np.zeros((0, 32), np.float32), K)
    bad = c.copy()
    bad[5, 0] = np.nan
    with pytest.raises(SearchError, match="NaN"):
        search(q, bad, K)
    with pytest.raises(SearchError, match="unknown search backend"):
        search(q, c, K, backend="annoy")
    with pytest.raises(SearchError, match="k must be"):
        search(q, c, 0)
    with pytest.raises(SearchError, match="different embedding dims"):
        MappedSource([(c, np.arange(len(c))), (c[:, :8], np.arange(len(c)))], n=2 * len(c))
