"""Embedding shard cache: resume after an interrupted encode, no stale reuse, atomic shards, bad encoder output."""

from __future__ import annotations

import os

import numpy as np
import pytest

from umarvel_lib.eval.cache import (
    CacheError,
    EmbeddingCache,
    EncodeJob,
    ShardStore,
    check_embeddings,
)

N, DIM, SHARD = 23, 8, 5  # 5 shards, the last one short


def _table(dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((N, dim)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


class Counting:
    """Encodes integer items by table lookup; can be told to die after some calls."""

    def __init__(self, table, fail_after=None, fp="ckpt-A"):
        self.table, self.fail_after, self.fp = table, fail_after, fp
        self.calls = self.items = 0

    def encode(self, items, batch_size):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.items += len(items)
        return self.table[np.array(items)]

    def fingerprint(self):
        return self.fp


def _job(fp="ckpt-A", sha="pool-sha-1"):
    return EncodeJob(
        {"kind": "pool", "encoder": fp, "embedder_config": "cfg1", "source": sha, "n": N},
        N,
        lambda lo, hi: list(range(lo, hi)),
        name="pool:test",
    )


def test_resume_after_interrupted_encode(tmp_path):
    table = _table()
    cache = EmbeddingCache(tmp_path, shard_size=SHARD)
    with pytest.raises(KeyboardInterrupt):
        cache.encode([_job()], Counting(table, fail_after=2), batch_size=4)
    store = ShardStore(cache.path_for(_job().key))
    assert store.missing() == [2, 3, 4] and not store.complete
    with pytest.raises(CacheError, match="incomplete"):
        store.verify()
    enc = Counting(table)
    (store,) = cache.encode([_job()], enc, batch_size=4)
    assert enc.calls == 3 and enc.items == N - 2 * SHARD  # only the missing shards
    np.testing.assert_array_equal(store.verify().load(), table)
    enc2 = Counting(table)
    cache.encode([_job()], enc2, batch_size=4)
    assert enc2.calls == 0  # complete: nothing to do


def test_changed_key_recomputes_never_stale(tmp_path):
    cache = EmbeddingCache(tmp_path, shard_size=SHARD)
    (a,) = cache.encode([_job()], Counting(_table(seed=0)), batch_size=4)
    new_ckpt = Counting(_table(seed=1), fp="ckpt-B")
    (b,) = cache.encode([_job(fp="ckpt-B")], new_ckpt, batch_size=4)
    assert new_ckpt.items == N and a.path != b.path
    np.testing.assert_array_equal(b.load(), _table(seed=1))
    changed_pool = Counting(_table(seed=2))
    (c,) = cache.encode([_job(sha="pool-sha-2")], changed_pool, batch_size=4)
    assert changed_pool.items == N and c.path not in (a.path, b.path)
    other_shards = Counting(_table())
    EmbeddingCache(tmp_path, shard_size=7).encode([_job()], other_shards, batch_size=4)
    assert other_shards.items == N  # layout is part of the key too
    np.testing.assert_array_equal(a.load(), _table(seed=0))  # the old entry is untouched


def test_meta_mismatch_is_an_error(tmp_path):
    cache = EmbeddingCache(tmp_path, shard_size=SHARD)
    (s,) = cache.encode([_job()], Counting(_table()), batch_size=4)
    meta = (s.path / "meta.json").read_text().replace('"n": 23', '"n": 24')
    (s.path / "meta.json").write_text(meta)
    with pytest.raises(CacheError, match="different key or size"):
        cache.encode([_job()], Counting(_table()), batch_size=4)


def test_partial_or_wrong_shards_are_not_trusted(tmp_path):
    cache = EmbeddingCache(tmp_path, shard_size=SHARD)
    (s,) = cache.encode([_job()], Counting(_table()), batch_size=4)
    np.save(s.shard_path(1), np.zeros((3, DIM), np.float32))  # wrong row count: discarded
    import subprocess
    import sys

    from umarvel_lib.io import tmp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_prefix("shard_000003.npy")  # ".shard_000003.npy.tmp-<host>-<pid>-"
    (s.path / (mine.replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "abc")).write_bytes(
        b"half a shard"
    )  # a killed write
    (s.path / (mine + "def")).write_bytes(b"a live writer's shard")  # this (live) process's: kept
    assert s.missing() == [1]
    assert cache.cleanup_tmp() == 1
    assert (s.path / (mine + "def")).is_file()
    enc = Counting(_table())
    cache.encode([_job()], enc, batch_size=4)
    assert enc.items == SHARD
    np.testing.assert_array_equal(s.load(), _table())


def test_ranks_share_the_work(tmp_path):
    table = _table()
    jobs = [_job(), _job(sha="other")]
    cache = EmbeddingCache(tmp_path, shard_size=SHARD)
    e0, e1 = Counting(table), Counting(table)
    cache.encode(jobs, e0, batch_size=4, rank=0, world_size=2)
    cache.encode(jobs, e1, batch_size=4, rank=1, world_size=2)
    assert e0.calls == 5 and e1.calls == 5  # 10 shards split evenly, none twice
    for j in jobs:
        np.testing.assert_array_equal(ShardStore(cache.path_for(j.key)).load(), table)


def test_float16_storage_roundtrip(tmp_path):
    cache = EmbeddingCache(tmp_path, shard_size=SHARD, dtype="float16")
    (s,) = cache.encode([_job()], Counting(_table()), batch_size=4)
    got = s.load()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _table(), atol=1e-3)


def test_bad_encoder_output(tmp_path):
    x = _table()
    with pytest.raises(CacheError, match="shape"):
        check_embeddings(x[:3], 4, "t")
    with pytest.raises(CacheError, match="L2-normalised"):
        check_embeddings(x * 2, N, "t")
    y = x.copy()
    y[0, 0] = np.inf
    with pytest.raises(CacheError, match="NaN or inf"):
        check_embeddings(y, N, "t")

    class DimDrift(Counting):
        def encode(self, items, batch_size):
            out = super().encode(items, batch_size)
            return out if self.calls == 1 else _table(dim=DIM + 1)[np.array(items)]

    with pytest.raises(CacheError, match="dim"):
        EmbeddingCache(tmp_path, shard_size=SHARD).encode([_job()], DimDrift(x), batch_size=4)
