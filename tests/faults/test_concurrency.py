"""Several processes on one data root / one embedding cache at once finish with identical results; the
embedding cache is keyed by the image bytes; a cut shard is re-encoded."""

import subprocess
import sys
import textwrap

import pytest

from umarvel_lib.io import DigestCache


def _run_all(scripts, timeout=300):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for s in scripts
    ]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o
    return outs


def test_concurrent_generation_of_one_data_root(tmp_path):
    root = tmp_path / "data"
    gen = f"""
        from umarvel_lib.data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate
        generate({str(root)!r}, SyntheticConfig(**SYNTHETIC_PRESETS["smoke"]))
    """
    _run_all([gen] * 3)
    together = DigestCache().tree_digest(root)
    _run_all([gen.replace(str(root), str(tmp_path / "alone"))])
    assert together == DigestCache().tree_digest(tmp_path / "alone")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


EVAL = """
    import json, sys
    from umarvel_lib.data.mbeir import MBEIR
    from umarvel_lib.config import EvalConfig
    from umarvel_lib.eval.evaluate import HashingEncoder, evaluate
    res = evaluate(HashingEncoder(), MBEIR({root!r}, check_images=False), sys.argv[1] if len(sys.argv) > 1 else {out!r},
                   EvalConfig(pools=("local", "global"), n_boot=50), cache_dir={cache!r})
    print("AVG", json.dumps([res["local"]["avg"]["headline"], res["global"]["avg"]["headline"]]))
"""


@pytest.mark.slow  # three evaluations at once (about a minute on 2 cores)
def test_concurrent_evaluations_share_one_embedding_cache(smoke_data, tmp_path):
    cache = tmp_path / "cache"
    outs = _run_all(
        [
            EVAL.format(root=str(smoke_data), out=str(tmp_path / f"out{i}"), cache=str(cache))
            for i in range(3)
        ]
    )
    avgs = {o.split("AVG", 1)[1].strip() for o in outs}
    assert len(avgs) == 1
    runs = {(tmp_path / f"out{i}" / "global" / "run.trec").read_text() for i in range(3)}
    assert len(runs) == 1
    assert not list(cache.glob("*/.*tmp-*"))


def test_embedding_cache_is_keyed_by_image_bytes_and_survives_a_cut_shard(
    smoke_data, tmp_path, caplog
):
    import shutil

    import numpy as np

    from umarvel_lib.config import EvalConfig
    from umarvel_lib.data.mbeir import MBEIR
    from umarvel_lib.eval.evaluate import HashingEncoder, evaluate

    root = tmp_path / "data"
    shutil.copytree(smoke_data, root)

    class Counting(HashingEncoder):
        n = 0

        def encode(self, items, batch_size):
            Counting.n += len(items)
            return super().encode(items, batch_size)

    def ev(out):
        Counting.n = 0
        m = evaluate(
            Counting(),
            MBEIR(root, check_images=False),
            tmp_path / out,
            EvalConfig(pools=("local",), n_boot=50),
            cache_dir=tmp_path / "cache",
        )
        return m["local"]["avg"]["headline"], Counting.n

    first, n_first = ev("a")
    assert n_first > 0 and ev("b")[1] == 0  # all from the cache
    # a shard cut short (a full disk, a copy interrupted): logged with its path, encoded again, same numbers
    shard = sorted((tmp_path / "cache").glob("pool-*/shard_000000.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    with caplog.at_level("WARNING"):
        again, n_again = ev("c")
    assert str(shard) in caplog.text and 0 < n_again < n_first and again == first
    # an image replaced in place (same name): its pool is encoded again, not served from the cache
    data = MBEIR(root, check_images=False)
    img = root / next(c.img_path for r in data.rows() for c in data.local_pool(r) if c.img_path)
    img.write_bytes(img.read_bytes() + b"\0")
    assert ev("d")[1] > 0
    np.testing.assert_equal(ev("e")[1], 0)


@pytest.mark.slow  # three trainings of one smoke row at once (a few minutes on 2 cores)
def test_concurrent_runs_of_one_row_finish_with_one_result(tmp_path, backbones):
    """Three `umarvel run` of the same (row, seed) on one results tree, one cache and one (not yet built)
    data root: all exit 0, the row is trained once, and its metrics equal an undisturbed run's."""
    import json
    import os

    def cmd(results):
        return [
            sys.executable,
            "-m",
            "umarvel_lib.cli",
            "run",
            "--table",
            "table2",
            "--row",
            "0",
            "--seed",
            "0",
            "--preset",
            "smoke",
            "--results",
            str(results),
            "--backbone",
            str(backbones["qwen2_vl"]),
        ]

    env = {**os.environ, "UMARVEL_THREADS": "1"}
    procs = [
        subprocess.Popen(
            cmd(tmp_path / "results"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    alone = tmp_path / "alone"
    alone.mkdir()
    subprocess.run(cmd(alone / "results"), cwd=alone, env=env, check=True, capture_output=True)
    m = [
        json.loads((r / "runs/table2/0/seed0/eval/local/metrics.json").read_text())["avg"]
        for r in (tmp_path / "results", alone / "results")
    ]
    assert m[0] == m[1]
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
