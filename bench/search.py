"""Benchmark: our exact streaming top-k search vs faiss-cpu IndexFlatIP, and a multi-million streaming run.

    .venv/bin/python bench/search.py                 # defaults: 200k x 256, 2k queries, top-50; 3M x 64 stream
    .venv/bin/python bench/search.py --n 50000 --big-n 500000   # quicker
    .venv/bin/python bench/search.py --threads 1                # one thread each (a shared machine)

Each measurement runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own;
``rss_base`` is the RSS after imports, before any embedding is loaded. The machine may be shared, so
the methods run in ``--repeat`` interleaved rounds (faiss, ours, ours streamed, faiss, ...: every
method sees the same load) and each reports its best wall time and its best CPU time
(``time.process_time``: time on a core, which other jobs inflate far less than wall time); the load
average is printed before and after. Ids/order of ours vs faiss are compared exactly;
mismatches are listed with the score gap that explains them (float near-ties; see
``umarvel_lib.eval.search``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def gen(a):
    from umarvel_lib.eval.cache import EmbeddingCache, EncodeJob

    w = Path(a.workdir)
    rng = np.random.default_rng(0)
    np.save(w / "cands.npy", _unit(rng, a.n, a.dim))
    np.save(w / "queries.npy", _unit(rng, a.queries, a.dim))
    np.save(w / "queries_big.npy", _unit(rng, a.queries, a.big_dim))

    class Gen:  # "encodes" random unit vectors, one shard at a time
        def __init__(self, d, seed):
            self.d, self.rng = d, np.random.default_rng(seed)

        def encode(self, items, batch_size):
            return _unit(self.rng, len(items), self.d)

        def fingerprint(self):
            return "bench"

    for name, n, d, seed in (("small", a.n, a.dim, 0), ("big", a.big_n, a.big_dim, 1)):
        if name == "big" and not a.big_n:
            continue
        cache = EmbeddingCache(w / f"shards_{name}", shard_size=a.shard_size)
        job = EncodeJob(
            {"kind": "pool", "source": name}, n, lambda lo, hi: [None] * (hi - lo), name=name
        )
        if name == "small":  # the same vectors as cands.npy, as shards
            arr = np.load(w / "cands.npy", mmap_mode="r")
            store = cache.open(job)
            for i in range(store.num_parts):
                lo, hi = store.shard_range(i)
                store.write_shard(i, np.asarray(arr[lo:hi]))
        else:
            (store,) = cache.encode([job], Gen(d, seed), batch_size=1)
        (w / f"store_{name}.txt").write_text(str(store.path))


def measure(a):
    import torch

    from umarvel_lib.eval.cache import ShardStore
    from umarvel_lib.eval.search import ArraySource, search

    w = Path(a.workdir)
    base = _rss_mb()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"phase": a.phase, "rss_base_mb": round(base, 1), "threads": torch.get_num_threads()}
    big = a.phase == "big"
    q = np.load(w / ("queries_big.npy" if big else "queries.npy"))
    times, cpu = [], []
    if a.phase == "faiss":
        import faiss

        if a.threads:
            faiss.omp_set_num_threads(a.threads)
        out["threads"] = faiss.omp_get_max_threads()
        c = np.load(w / "cands.npy")
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(c.shape[1])
        index.add(c)
        out["add_s"] = round(time.perf_counter() - t0, 3)
        for _ in range(a.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            s, i = index.search(q, a.k)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        np.save(w / "res_faiss.npy", i)
        np.save(w / "res_faiss_s.npy", s)
    else:
        if a.phase == "ours_mem":
            src = ArraySource(np.load(w / "cands.npy"), check=False)
        else:
            src = ShardStore((w / f"store_{'big' if big else 'small'}.txt").read_text())
        for _ in range(1 if big else a.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            r = search(q, src, a.k, block_size=a.block_size, query_chunk=a.query_chunk)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if not big:
            np.save(w / f"res_{a.phase}.npy", r.indices)
            np.save(w / f"res_{a.phase}_s.npy", r.scores)
        out["n_candidates"] = src.n
    out["seconds"] = round(min(times), 3)
    out["all_seconds"] = [round(t, 3) for t in times]
    out["cpu_seconds"] = round(min(cpu), 3)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    print(json.dumps(out))


def _run(a, phase, repeat=None):
    cmd = [sys.executable, __file__, "--phase", phase, "--workdir", a.workdir]
    for k in (
        "n",
        "dim",
        "queries",
        "k",
        "big_n",
        "big_dim",
        "shard_size",
        "block_size",
        "query_chunk",
        "repeat",
        "threads",
    ):
        v = repeat if k == "repeat" and repeat is not None else getattr(a, k)
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"phase {phase} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if phase != "gen" else None


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--big-n", type=int, default=3_000_000, help="streamed pool size (0: skip)")
    ap.add_argument("--big-dim", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=65536)
    ap.add_argument("--block-size", type=int, default=16384)
    ap.add_argument("--query-chunk", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for both torch and faiss (0: each library's default). On a shared machine use 1: "
        "faiss's OpenMP threads slow down several-fold when other jobs hold the cores",
    )
    ap.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir, removed)")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase == "gen":
        return gen(a)
    if a.phase:
        return measure(a)

    own = a.workdir is None
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="umarvel_bench_")
    try:
        t0 = time.perf_counter()
        _run(a, "gen")
        print(f"generated embeddings in {time.perf_counter() - t0:.1f}s under {a.workdir}")
        from umarvel_lib.eval.search import faiss_available

        res = {}
        phases = (["faiss"] if faiss_available() else []) + ["ours_mem", "ours_disk"]
        load0 = os.getloadavg()
        for _ in range(a.repeat):  # interleaved rounds: every method sees the same load
            for ph in phases:
                r = _run(a, ph, repeat=1)
                if ph in res:
                    r["all_seconds"] = res[ph]["all_seconds"] + r["all_seconds"]
                    for key, pick in (("seconds", min), ("cpu_seconds", min), ("peak_rss_mb", max)):
                        r[key] = pick(r[key], res[ph][key])
                res[ph] = r
        load1 = os.getloadavg()
        w = Path(a.workdir)
        print(
            f"\n== exact top-{a.k}: {a.n:,} x {a.dim} candidates, {a.queries:,} queries "
            f"(best of {a.repeat} interleaved rounds; ours {res['ours_mem']['threads']} threads"
            f"{(', faiss ' + str(res['faiss']['threads'])) if 'faiss' in res else ''}) =="
        )
        print(
            f"load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after, on {os.cpu_count()} CPUs"
        )
        print(
            f"{'method':<34}{'search s':>10}{'cpu s':>8}{'q/s':>10}{'peak RSS MB':>13}{'RSS base MB':>13}"
        )
        names = {
            "faiss": "faiss IndexFlatIP (in memory)",
            "ours_mem": "ours, torch (in-memory array)",
            "ours_disk": "ours, torch (streamed from shards)",
        }
        for ph in phases:
            r = res[ph]
            print(
                f"{names[ph]:<34}{r['seconds']:>10.3f}{r['cpu_seconds']:>8.3f}"
                f"{a.queries / r['seconds']:>10.0f}"
                f"{r['peak_rss_mb']:>13.0f}{r['rss_base_mb']:>13.0f}"
            )
        if "faiss" in res:
            for ph in ("ours_mem", "ours_disk"):
                print(
                    f"speed {ph} / faiss = {res['faiss']['seconds'] / res[ph]['seconds']:.2f}x wall, "
                    f"{res['faiss']['cpu_seconds'] / res[ph]['cpu_seconds']:.2f}x cpu (target >= 0.8x)"
                )
            fi, fs = np.load(w / "res_faiss.npy"), np.load(w / "res_faiss_s.npy")
            oi, os_ = np.load(w / "res_ours_disk.npy"), np.load(w / "res_ours_disk_s.npy")
            same_rows = int((fi == oi).all(1).sum())
            gap = float(np.abs(fs - os_).max())
            print(
                f"ids and order identical for {same_rows}/{a.queries} queries; max |score diff| {gap:.2e}"
            )
            bad = np.flatnonzero(~(fi == oi).all(1))[:3]
            for b in bad:
                j = int(np.flatnonzero(fi[b] != oi[b])[0])
                print(
                    f"  query {b}: first difference at rank {j + 1}: faiss {fi[b, j]} ({fs[b, j]:.9g}) vs "
                    f"ours {oi[b, j]} ({os_[b, j]:.9g})"
                )
        if a.big_n:
            r = _run(a, "big")
            gb = a.big_n * a.big_dim * 4 / 2**30
            print(
                f"\n== streaming: {a.big_n:,} x {a.big_dim} candidates in {a.shard_size:,}-row shards on disk "
                f"({gb:.2f} GiB), {a.queries:,} queries, top-{a.k} =="
            )
            print(
                f"search {r['seconds']:.1f}s ({a.big_n * a.queries / r['seconds'] / 1e9:.2f} G scores/s), "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['rss_base_mb']:.0f} MB)"
            )
    finally:
        if own:
            shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
