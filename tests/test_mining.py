"""Hard-negative mining: named filters, counts, fill policy, JSONL round trip."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umarvel_lib.train.mining import exact_topk, load_negatives, mine_hard_negatives, save_negatives


def _unit(angle_deg):
    """2-D unit vector at an angle; cos between unit(0) and unit(a) is cos(a)."""
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


@pytest.fixture
def toy():
    # one query at angle 0; candidates at known cosines 0.99, 0.95, 0.8, 0.75, 0.6, 0.5, 0.3, 0.1
    cos_vals = [0.99, 0.95, 0.8, 0.75, 0.6, 0.5, 0.3, 0.1]
    cands = torch.tensor([_unit(math.degrees(math.acos(v))) for v in cos_vals])
    cand_ids = [f"d{i}" for i in range(len(cos_vals))]
    q = torch.tensor([_unit(0)])
    return q, cands, ["q0"], cand_ids, cos_vals


def test_exact_topk_matches_full_sort():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(7, 4, generator=g), dim=-1)
    c = F.normalize(torch.randn(50, 4, generator=g), dim=-1)
    s, i = exact_topk(q, c, 5, chunk_size=3)
    full = q @ c.T
    ws, wi = full.sort(dim=1, descending=True)
    assert torch.allclose(s, ws[:, :5]) and torch.equal(i, wi[:, :5])


def test_positives_removed_and_first_k_kept(toy):
    q, c, qids, dids, _ = toy
    df, rep = mine_hard_negatives(q, c, qids, dids, {"q0": {"d0"}}, top_m=8, num_negatives=3)
    assert df.loc[0, "negatives"] == ["d1", "d2", "d3"]
    assert df.loc[0, "scores"] == pytest.approx([0.95, 0.8, 0.75], abs=1e-6)
    assert rep.removed_positive == 1 and rep.removed_max_score == 0
    assert rep.retrieved == 8 and rep.survived == 7 and rep.used == 3 and rep.queries_full == 1
    assert df.loc[0, "pos_score"] == pytest.approx(0.99, abs=1e-6)
    assert df.loc[0, "fill"] == "none" and df.loc[0, "num_mined"] == 3


def test_max_score_threshold(toy):
    q, c, qids, dids, _ = toy
    df, rep = mine_hard_negatives(
        q, c, qids, dids, {"q0": {"d0"}}, top_m=8, num_negatives=3, max_score=0.7
    )
    assert df.loc[0, "negatives"] == ["d4", "d5", "d6"]  # 0.95, 0.8, 0.75 are > 0.7
    assert rep.removed_positive == 1 and rep.removed_max_score == 3 and rep.survived == 4
    # exclude_positives=False: the positive is then caught by the threshold instead (sequential attribution)
    _, rep2 = mine_hard_negatives(
        q,
        c,
        qids,
        dids,
        {"q0": {"d0"}},
        top_m=8,
        num_negatives=3,
        max_score=0.7,
        exclude_positives=False,
    )
    assert rep2.removed_positive == 0 and rep2.removed_max_score == 4


def test_relative_and_absolute_margin(toy):
    q, c, qids, dids, _ = toy
    # positive d2 (cos 0.8): relative margin 0.1 keeps scores <= 0.72
    df, rep = mine_hard_negatives(
        q, c, qids, dids, {"q0": {"d2"}}, top_m=8, num_negatives=2, relative_margin=0.1
    )
    assert df.loc[0, "negatives"] == ["d4", "d5"]
    assert rep.removed_positive == 1 and rep.removed_relative_margin == 3  # d0, d1, d3
    # absolute margin 0.25 keeps scores <= 0.55
    df, rep = mine_hard_negatives(
        q, c, qids, dids, {"q0": {"d2"}}, top_m=8, num_negatives=2, absolute_margin=0.25
    )
    assert df.loc[0, "negatives"] == ["d5", "d6"] and rep.removed_absolute_margin == 4
    # a positive outside the pool: margins are skipped for that query and counted
    df, rep = mine_hard_negatives(
        q, c, qids, dids, {"q0": {"elsewhere"}}, top_m=8, num_negatives=2, relative_margin=0.1
    )
    assert df.loc[0, "negatives"] == ["d0", "d1"] and rep.queries_without_positive_in_pool == 1
    assert math.isnan(df.loc[0, "pos_score"])


def test_fewer_than_k_repeat_first_and_empty_policies(toy):
    q, c, qids, dids, _ = toy
    df, rep = mine_hard_negatives(q, c, qids, dids, {"q0": {"d0"}}, top_m=3, num_negatives=5)
    assert df.loc[0, "negatives"] == ["d1", "d2", "d1", "d1", "d1"]  # official: repeat the first
    assert df.loc[0, "num_mined"] == 2 and df.loc[0, "fill"] == "repeat_first"
    assert rep.queries_short == 1 and rep.filled_repeat_first == 3
    df, _ = mine_hard_negatives(
        q, c, qids, dids, {"q0": {"d0"}}, top_m=3, num_negatives=5, fill="none"
    )
    assert df.loc[0, "negatives"] == ["d1", "d2"]
    # nothing survives: random fallback (never a positive), drop, or keep empty
    pos = {"q0": {"d0", "d1"}}
    df, rep = mine_hard_negatives(q, c, qids, dids, pos, top_m=2, num_negatives=3, seed=1)
    assert (
        rep.queries_empty == 1 and rep.filled_random_queries == 1 and df.loc[0, "fill"] == "random"
    )
    assert len(df.loc[0, "negatives"]) == 3 and not set(df.loc[0, "negatives"]) & pos["q0"]
    assert df.loc[0, "num_mined"] == 0
    df, rep = mine_hard_negatives(q, c, qids, dids, pos, top_m=2, num_negatives=3, if_empty="drop")
    assert len(df) == 0 and rep.dropped_queries == 1
    df, _ = mine_hard_negatives(q, c, qids, dids, pos, top_m=2, num_negatives=3, if_empty="keep")
    assert df.loc[0, "negatives"] == []


def test_duplicate_dids_in_pool_are_removed_once(toy):
    q, c, qids, dids, _ = toy
    c2 = torch.cat([c, c[1:2]])  # d1 appears twice (concatenated pools)
    df, rep = mine_hard_negatives(
        q, c2, qids, dids + ["d1"], {"q0": {"d0"}}, top_m=9, num_negatives=3
    )
    assert df.loc[0, "negatives"] == ["d1", "d2", "d3"] and rep.removed_duplicate == 1
    # a positive duplicated in the pool is removed in both places
    df, rep = mine_hard_negatives(
        q, c2, qids, dids + ["d1"], {"q0": {"d1"}}, top_m=9, num_negatives=2
    )
    assert "d1" not in df.loc[0, "negatives"] and rep.removed_positive + rep.removed_duplicate == 2


def test_many_queries_counts_add_up_and_jsonl_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    c = F.normalize(torch.randn(60, 8, generator=g), dim=-1)
    qids, dids = [f"9:{i}" for i in range(20)], [f"9:{100 + i}" for i in range(60)]
    top = (q @ c.T).argmax(1)
    pos = {qid: {dids[int(top[i])]} for i, qid in enumerate(qids)}  # top-1 is the labelled positive
    df, rep = mine_hard_negatives(
        q, c, qids, dids, pos, top_m=10, num_negatives=4, max_score=0.5, chunk_size=7
    )
    assert rep.removed_positive == 20
    removed = rep.removed_duplicate + rep.removed_positive + rep.removed_max_score
    assert rep.retrieved == 200 and removed + rep.survived == rep.retrieved
    assert all(len(x) == 4 for x in df["negatives"])
    for _, r in df.iterrows():
        assert not set(r["negatives"]) & pos[r["qid"]]
        assert all(s <= 0.5 + 1e-6 for s in r["scores"][: r["num_mined"]])
    assert df.attrs["mining_report"]["removed_positive"] == 20
    path = save_negatives(df, tmp_path / "neg" / "mined.jsonl", rep)
    back = load_negatives(path)
    assert back["qid"].tolist() == df["qid"].tolist()
    assert back["negatives"].tolist() == df["negatives"].tolist()
    assert np.allclose(
        np.concatenate(back["scores"].tolist()), np.concatenate(df["scores"].tolist())
    )
    assert back.attrs["mining_report"]["removed_max_score"] == rep.removed_max_score
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"qid", "negatives", "scores", "num_mined", "fill", "pos_score"}
    assert not list((tmp_path / "neg").glob(".*.tmp"))
