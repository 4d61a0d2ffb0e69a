"""M-BEIR metric semantics: success@k ("R@k"), headline k per row, unweighted Avg, skipped queries, CIs,
TREC round trip (and agreement with ranx's hit_rate)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umarvel_lib.eval import runs
from umarvel_lib.eval.metrics import hits_table, score_rows, success_at_k


def _ranked(pos_rank: int, n: int = 20, pos: str = "p") -> list[str]:
    out = [f"n{i}" for i in range(n)]
    out.insert(pos_rank - 1, pos)
    return out


def test_positive_at_rank_6_counts_for_r10_not_r5():
    ranked = _ranked(6)
    assert success_at_k(ranked, {"p"}, 5) == 0.0
    assert success_at_k(ranked, {"p"}, 6) == 1.0
    assert success_at_k(ranked, {"p"}, 10) == 1.0
    m = score_rows({"q": ranked}, {"q": {"p"}}, {"mscoco_task0": ["q"]}, n_boot=50)
    row = m["rows"]["mscoco_task0"]
    assert (row["R@1"], row["R@5"], row["R@10"], row["R@50"]) == (0.0, 0.0, 100.0, 100.0)
    assert row["headline_metric"] == "R@5" and row["headline"] == 0.0


def test_any_positive_is_a_hit_not_fractional_recall():
    ranked = ["a", "x", "y"]
    assert success_at_k(ranked, {"a", "b", "c", "d"}, 1) == 1.0  # fractional recall would be 0.25


def test_query_absent_from_run_is_a_miss():
    run = {"q1": ["p1"]}
    m = score_rows(run, {"q1": {"p1"}, "q2": {"p2"}}, {"mscoco_task0": ["q1", "q2"]}, n_boot=50)
    row = m["rows"]["mscoco_task0"]
    assert row["n_queries"] == 2 and row["R@1"] == 50.0 and row["R@50"] == 50.0


def test_fashion_rows_use_r10_and_avg_is_unweighted():
    # positive at rank 7 in every row: R@5 misses, R@10 hits
    run = {f"{r}-{i}": _ranked(7) for r in ("f0", "f3", "fiq", "m") for i in range(3)}
    qrels = {q: {"p"} for q in run}
    rows = {
        "fashion200k_task0": [f"f0-{i}" for i in range(3)],
        "fashion200k_task3": [f"f3-{i}" for i in range(3)],
        "fashioniq_task7": [f"fiq-{i}" for i in range(3)],
        "mscoco_task0": ["m-0", "m-1", "m-2"],
    }
    m = score_rows(run, qrels, rows, n_boot=50)
    for r in ("fashion200k_task0", "fashion200k_task3", "fashioniq_task7"):
        assert m["rows"][r]["headline_metric"] == "R@10" and m["rows"][r]["headline"] == 100.0
    assert (
        m["rows"]["mscoco_task0"]["headline_metric"] == "R@5"
        and m["rows"]["mscoco_task0"]["headline"] == 0.0
    )
    assert m["avg"]["headline"] == 75.0

    # unweighted: a 1-query row at 100 and a 3-query row at 0 average to 50, not 25
    run = {"a": ["p"], "b1": ["x"], "b2": ["x"], "b3": ["x"]}
    m = score_rows(
        run,
        {q: {"p"} for q in run},
        {"cirr_task7": ["a"], "nights_task4": ["b1", "b2", "b3"]},
        n_boot=50,
    )
    assert m["avg"]["headline"] == 50.0
    assert (
        m["avg"]["n_rows"] == 2
        and not m["avg"]["is_full_16"]
        and "mscoco_task0" in m["avg"]["rows_missing"]
    )


def test_queries_without_positives_are_skipped_and_counted():
    run = {"q1": ["p"], "q2": ["p"], "q3": ["x"]}
    qrels = {"q1": {"p"}, "q3": {"p"}}  # q2 has no positive (e.g. only relevance-0 lines)
    m = score_rows(run, qrels, {"webqa_task1": ["q1", "q2", "q3"]}, n_boot=50)
    row = m["rows"]["webqa_task1"]
    assert row["n_queries"] == 2 and row["n_skipped_no_positive"] == 1 and row["R@1"] == 50.0
    assert m["n_skipped_no_positive"] == 1
    with pytest.raises(ValueError, match="no relevant"):
        success_at_k(["p"], set(), 1)
    with pytest.raises(ValueError, match="nothing to score"):
        score_rows({}, {}, {"webqa_task1": ["q2"]})


def test_bootstrap_ci_seeded_and_sane():
    rng = np.random.default_rng(1)
    run = {f"q{i}": (["p"] if rng.random() < 0.3 else ["x"]) for i in range(400)}
    qrels = {q: {"p"} for q in run}
    rows = {"mscoco_task0": list(run)[:200], "nights_task4": list(run)[200:]}
    a = score_rows(run, qrels, rows, n_boot=500, seed=3)
    b = score_rows(run, qrels, rows, n_boot=500, seed=3)
    assert a == b
    for r in a["rows"].values():
        lo, hi = r["ci95"]
        assert lo <= r["headline"] <= hi and hi - lo > 1
    lo, hi = a["avg"]["ci95"]
    assert lo <= a["avg"]["headline"] <= hi
    all_hit = score_rows({"q": ["p"]}, {"q": {"p"}}, {"mscoco_task0": ["q"]}, n_boot=50)
    assert all_hit["rows"]["mscoco_task0"]["ci95"] == [100.0, 100.0]


def _random_run(rng, n_q=60, n_d=200, depth=50):
    run, qrels = {}, {}
    for i in range(n_q):
        q = f"9:{i}"
        dids = rng.choice(n_d, size=depth, replace=False)
        scores = np.sort(rng.random(depth))[::-1]  # distinct scores, best first
        run[q] = [(f"9:{100000 + d}", float(s)) for d, s in zip(dids, scores)]
        qrels[q] = {
            f"9:{100000 + d}" for d in rng.choice(n_d, size=rng.integers(1, 4), replace=False)
        }
    return run, qrels


def _write_dir(tmp_path, run, qrels, task=0, with_queries=True):
    qids = list(run)
    idx_of = {}
    dids = []
    for lst in run.values():
        for d, _ in lst:
            if d not in idx_of:
                idx_of[d] = len(dids)
                dids.append(d)
    ind = np.array([[idx_of[d] for d, _ in run[q]] for q in qids])
    sc = np.array([[s for _, s in run[q]] for q in qids], np.float32)
    runs.write_run(tmp_path / runs.RUN_FILE, runs.trec_lines(qids, ind, sc, dids, "t"))
    runs.write_qrels(tmp_path / runs.QRELS_FILE, qrels, {q: task for q in qrels})
    if with_queries:
        runs.write_queries(
            tmp_path / runs.QUERIES_FILE, [{"qid": q, "row": "mscoco_task0"} for q in qids]
        )
    return tmp_path


def test_trec_roundtrip_and_rescore_without_queries_file(tmp_path):
    rng = np.random.default_rng(0)
    run, qrels = _random_run(rng)
    d = _write_dir(tmp_path, run, qrels, with_queries=False)
    back = runs.read_run(d / runs.RUN_FILE)
    assert [x for x, _ in back["9:0"]] == [x for x, _ in run["9:0"]]
    lines = (d / runs.RUN_FILE).read_text().splitlines()
    assert lines[0].split()[1] == "Q0" and lines[0].split()[3] == "1" and len(lines) == 60 * 50
    m = runs.rescore(d, n_boot=50)  # rows from the qrels: dataset 9 + task 0
    ref = score_rows(
        {q: [x for x, _ in v] for q, v in run.items()},
        qrels,
        {"mscoco_task0": list(run)},
        n_boot=50,
    )
    assert m["rows"] == ref["rows"]


def test_ranx_hit_rate_equals_our_success_at_k(tmp_path):
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(7)
    run, qrels = _random_run(rng, n_q=80)
    d = _write_dir(tmp_path, run, qrels)
    hits, scored, _ = hits_table(
        runs.ranked_dids(runs.read_run(d / runs.RUN_FILE)),
        runs.read_qrels(d / runs.QRELS_FILE),
        list(run),
        ks=(1, 5, 10, 50),
    )
    r_run = ranx.Run.from_file(str(d / runs.RUN_FILE), kind="trec")
    r_qrels = ranx.Qrels({q: {x: 1 for x in rel} for q, rel in qrels.items()})
    got = ranx.evaluate(r_qrels, r_run, [f"hit_rate@{k}" for k in (1, 5, 10, 50)])
    ours = hits.mean(0)
    assert 0 < ours[1] < 1  # non-trivial
    for j, k in enumerate((1, 5, 10, 50)):
        assert got[f"hit_rate@{k}"] == pytest.approx(ours[j], abs=1e-12)


def test_metrics_frame_is_tidy(tmp_path):
    rng = np.random.default_rng(0)
    run, qrels = _random_run(rng, n_q=30)
    d = _write_dir(tmp_path, run, qrels)
    m = runs.rescore(d, n_boot=50)
    m["pool"] = "local"
    (d / runs.METRICS_FILE).write_text(json.dumps(m))
    df = runs.metrics_frame(d)
    assert list(df.columns) == ["row", "pool", "metric", "value", "ci_lo", "ci_hi", "n_queries"]
    h = df[(df.row == "mscoco_task0") & (df.metric == "headline")].iloc[0]
    assert h.value == m["rows"]["mscoco_task0"]["R@5"] and h.pool == "local" and h.n_queries == 30
    assert set(df.row) == {"mscoco_task0", "avg"}
