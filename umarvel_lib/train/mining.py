"""Hard-negative mining with named false-negative filters that report what they removed.

One function, :func:`mine_hard_negatives`, in the spirit of sentence-transformers'
``util.mine_hard_negatives``: exact top-``top_m`` search by cosine, then these filters, applied
in this order to each query's ranked list (each count is attributed to the *first* filter that
removes a candidate):

1. ``duplicate``: a did seen earlier in the same list (duplicated candidates in a concatenated
   global pool) is dropped.
2. ``positive`` (``exclude_positives=True``): labelled positives of the query are dropped. This
   is the only filter in the released U-MARVEL code (``_select_topk_hard_neg``).
3. ``max_score`` (paper: 0.7): candidates with cosine ``> max_score`` are dropped as likely
   false negatives. Not in the released code (docs/paper_vs_code.md, point 2).
4. ``relative_margin``: dropped if ``score > pos_score · (1 − relative_margin)``.
5. ``absolute_margin``: dropped if ``score > pos_score − absolute_margin``.
   ``pos_score`` is the query's cosine with its **most similar** labelled positive that is in
   the pool; queries with no positive in the pool skip the margin filters (counted).

The first ``num_negatives`` survivors in rank order are kept (the official "topk" strategy).

**Fewer than K survivors** (documented choice, matching the official code):
``fill="repeat_first"`` pads the list by repeating the first (hardest) surviving negative, so
every query has exactly K; ``fill="none"`` keeps short lists. A query with **no** survivor gets
``if_empty="random"`` negatives (uniform from the pool minus its positives, seeded; the official
fallback), or is dropped (``"drop"``), or kept with an empty list (``"keep"``). The table's
``num_mined`` column records how many genuine mined negatives each row has and ``fill`` says
how it was completed, so nothing is hidden.

Inputs are expected L2-normalised (scores are dot products = cosine); a warning is logged if not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from umarvel_lib.io import atomic_write_json, atomic_write_text, read_json, read_jsonl

log = logging.getLogger(__name__)

__all__ = ["MiningReport", "exact_topk", "mine_hard_negatives", "save_negatives", "load_negatives"]


@dataclass
class MiningReport:
    """How many candidates each filter removed (sequential attribution) and how lists were completed."""

    num_queries: int = 0
    top_m: int = 0
    num_negatives: int = 0
    max_score: float | None = None
    relative_margin: float | None = None
    absolute_margin: float | None = None
    exclude_positives: bool = True
    retrieved: int = 0  # candidates looked at (queries × top_m, capped by pool size)
    removed_duplicate: int = 0
    removed_positive: int = 0
    removed_max_score: int = 0
    removed_relative_margin: int = 0
    removed_absolute_margin: int = 0
    survived: int = 0  # candidates passing every filter
    used: int = 0  # genuine mined negatives kept (≤ K per query)
    queries_full: int = 0  # queries with ≥ K survivors
    queries_short: int = 0  # 1..K-1 survivors
    queries_empty: int = 0  # 0 survivors
    queries_without_positive_in_pool: int = 0  # margin filters skipped for these
    filled_repeat_first: int = 0  # padding slots filled by repeating the first negative
    filled_random_queries: int = 0  # empty queries given random negatives
    dropped_queries: int = 0  # empty queries dropped (if_empty="drop")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        d = self.as_dict()
        removed = ", ".join(
            f"{k.removeprefix('removed_')}={d[k]}" for k in d if k.startswith("removed_")
        )
        return (
            f"mined {self.num_queries} queries (top_m={self.top_m}, K={self.num_negatives}): "
            f"looked at {self.retrieved}, removed [{removed}], survived {self.survived}, used {self.used}; "
            f"queries full/short/empty = {self.queries_full}/{self.queries_short}/{self.queries_empty}; "
            f"padding by repeat_first {self.filled_repeat_first}, random-filled queries {self.filled_random_queries}, "
            f"dropped {self.dropped_queries}; no positive in pool {self.queries_without_positive_in_pool}"
        )


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def exact_topk(
    query_emb, cand_emb, k: int, *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-``k``: ``(scores, indices)``, each ``(Q, k)``, ``k ≤ N``.

    Delegates to :func:`umarvel_lib.eval.search.search` (streamed candidate blocks), so mining and
    evaluation share one search and one tie-break: score descending, then candidate index ascending.
    """
    from umarvel_lib.eval.search import search

    q, c = _as_tensor(query_emb), _as_tensor(cand_emb)
    k = min(k, c.shape[0])
    if q.shape[0] == 0:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    top = search(q.numpy(), c.numpy(), k, query_chunk=chunk_size)
    return torch.from_numpy(top.scores), torch.from_numpy(top.indices)


def mine_hard_negatives(
    query_emb,
    cand_emb,
    query_ids: Sequence[Hashable],
    cand_ids: Sequence[Hashable],
    positives: Mapping[Hashable, set],
    *,
    top_m: int = 100,
    num_negatives: int = 5,
    max_score: float | None = None,
    relative_margin: float | None = None,
    absolute_margin: float | None = None,
    exclude_positives: bool = True,
    fill: Literal["repeat_first", "none"] = "repeat_first",
    if_empty: Literal["random", "drop", "keep"] = "random",
    seed: int = 0,
    chunk_size: int = 1024,
) -> tuple[pd.DataFrame, MiningReport]:
    """Mine ``num_negatives`` hard negatives per query from its top-``top_m`` (see module doc).

    Args:
        query_emb: ``(Q, D)`` L2-normalised query embeddings (tensor or array).
        cand_emb: ``(N, D)`` L2-normalised candidate embeddings.
        query_ids / cand_ids: ids aligned with the rows (cand_ids may repeat; deduplicated per list).
        positives: ``qid -> set of positive dids`` (missing qid = no positives).
        top_m: list depth searched (paper/official: 100).
        num_negatives: K (official: 5).
        max_score: drop cosine > this (paper: 0.7; ``None`` = off, as in the released code).
        relative_margin / absolute_margin: see module doc (``None`` = off).
        exclude_positives: drop labelled positives (official: on).
        fill, if_empty, seed: what happens with fewer than K survivors (module doc).

    Returns:
        ``(table, report)``. ``table`` has one row per kept query, in input order, with columns
        ``qid``, ``negatives`` (list of dids), ``scores`` (list of cosine), ``num_mined`` (genuine mined
        negatives), ``fill`` (``"none"``, ``"repeat_first"`` or ``"random"``) and ``pos_score``
        (cosine with the best in-pool positive, NaN if none). The report is also logged and put in
        ``table.attrs["mining_report"]``.
    """
    if fill not in ("repeat_first", "none"):
        raise ValueError(f"fill must be 'repeat_first' or 'none', got {fill!r}")
    if if_empty not in ("random", "drop", "keep"):
        raise ValueError(f"if_empty must be 'random', 'drop' or 'keep', got {if_empty!r}")
    q, c = _as_tensor(query_emb), _as_tensor(cand_emb)
    query_ids, cand_ids = list(query_ids), list(cand_ids)
    if q.shape[0] != len(query_ids) or c.shape[0] != len(cand_ids):
        raise ValueError(
            f"{q.shape[0]} query rows for {len(query_ids)} ids, {c.shape[0]} candidate rows for {len(cand_ids)} ids"
        )
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(
            f"embeddings must be (Q, D) and (N, D), got {tuple(q.shape)} and {tuple(c.shape)}"
        )
    for name, t in (("query", q), ("candidate", c)):
        if t.numel() and not torch.allclose(t.norm(dim=1), torch.ones(t.shape[0]), atol=1e-3):
            log.warning(
                "%s embeddings are not L2-normalised; scores are dot products, thresholds assume cosine",
                name,
            )

    report = MiningReport(
        num_queries=len(query_ids),
        top_m=top_m,
        num_negatives=num_negatives,
        max_score=max_score,
        relative_margin=relative_margin,
        absolute_margin=absolute_margin,
        exclude_positives=exclude_positives,
    )
    # canonical code per did (first occurrence), so duplicates and positives compare by did
    first_index: dict[Hashable, int] = {}
    codes = np.empty(len(cand_ids), dtype=np.int64)
    for i, d in enumerate(cand_ids):
        codes[i] = first_index.setdefault(d, i)
    codes_t = torch.from_numpy(codes)
    rng = np.random.default_rng(seed)
    unique_idx = np.nonzero(codes == np.arange(len(codes)))[0]

    rows = []
    for start in range(0, len(query_ids), chunk_size):
        qids = query_ids[start : start + chunk_size]
        qc = q[start : start + chunk_size]
        scores, idx = exact_topk(qc, c, top_m, chunk_size=chunk_size)
        n, m = idx.shape
        report.retrieved += n * m
        cand_code = codes_t[idx]  # (n, m)
        # positive codes per query, padded with -1
        pos_lists = [
            [first_index[d] for d in positives.get(qid, ()) if d in first_index] for qid in qids
        ]
        P = max((len(p) for p in pos_lists), default=0)
        pos_codes = torch.full((n, max(P, 1)), -1, dtype=torch.long)
        for r, p in enumerate(pos_lists):
            if p:
                pos_codes[r, : len(p)] = torch.tensor(p)
        # best in-pool positive score
        pos_score = torch.full((n,), float("nan"))
        for r, p in enumerate(pos_lists):
            if p:
                pos_score[r] = (c[p] @ qc[r]).max()

        alive = torch.ones(n, m, dtype=torch.bool)

        def _apply(mask: torch.Tensor, field: str):
            nonlocal alive
            removed = alive & mask
            setattr(report, field, getattr(report, field) + int(removed.sum()))
            alive = alive & ~mask

        eq = cand_code.unsqueeze(2) == cand_code.unsqueeze(1)  # (n, m, m)
        earlier = torch.ones(m, m, dtype=torch.bool).tril(-1)
        _apply((eq & earlier).any(-1), "removed_duplicate")
        if exclude_positives:
            _apply((cand_code.unsqueeze(2) == pos_codes.unsqueeze(1)).any(-1), "removed_positive")
        if max_score is not None:
            _apply(scores > max_score, "removed_max_score")
        has_pos = ~torch.isnan(pos_score)
        if relative_margin is not None or absolute_margin is not None:
            report.queries_without_positive_in_pool += int((~has_pos).sum())
        if relative_margin is not None:
            thr = (pos_score * (1 - relative_margin)).unsqueeze(1)
            _apply(has_pos.unsqueeze(1) & (scores > thr), "removed_relative_margin")
        if absolute_margin is not None:
            thr = (pos_score - absolute_margin).unsqueeze(1)
            _apply(has_pos.unsqueeze(1) & (scores > thr), "removed_absolute_margin")

        report.survived += int(alive.sum())
        for r, qid in enumerate(qids):
            keep = alive[r].nonzero().flatten()[:num_negatives].tolist()
            dids = [cand_ids[int(idx[r, j])] for j in keep]
            scs = [float(scores[r, j]) for j in keep]
            report.used += len(dids)
            how = "none"
            if len(dids) >= num_negatives:
                report.queries_full += 1
            elif dids:
                report.queries_short += 1
                if fill == "repeat_first":
                    pad = num_negatives - len(dids)
                    dids += [dids[0]] * pad
                    scs += [scs[0]] * pad
                    report.filled_repeat_first += pad
                    how = "repeat_first"
            else:
                report.queries_empty += 1
                if if_empty == "drop":
                    report.dropped_queries += 1
                    continue
                if if_empty == "random":
                    banned = set(positives.get(qid, ()))
                    pool = (
                        [int(i) for i in unique_idx if cand_ids[i] not in banned]
                        if banned
                        else unique_idx
                    )
                    take = (
                        rng.choice(len(pool), size=min(num_negatives, len(pool)), replace=False)
                        if len(pool)
                        else []
                    )
                    picked = [pool[int(t)] for t in take]
                    dids = [cand_ids[i] for i in picked]
                    scs = [float(c[i] @ qc[r]) for i in picked]
                    report.filled_random_queries += 1
                    how = "random"
            rows.append(
                {
                    "qid": qid,
                    "negatives": dids,
                    "scores": scs,
                    "num_mined": len(keep),
                    "fill": how,
                    "pos_score": float(pos_score[r]),
                }
            )

    df = pd.DataFrame(
        rows, columns=["qid", "negatives", "scores", "num_mined", "fill", "pos_score"]
    )
    df.attrs["mining_report"] = report.as_dict()
    log.info("%s", report)
    return df, report


def save_negatives(df: pd.DataFrame, path: str | Path, report: MiningReport | None = None) -> Path:
    """Write the mined table as JSONL (one query per line, scores included), atomically.

    The report (if given, else ``df.attrs["mining_report"]``) goes to ``<path>.report.json``.
    """
    path = Path(path)
    lines = []
    for rec in df.to_dict(orient="records"):
        rec = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in rec.items()}
        rec["scores"] = [float(s) for s in rec["scores"]]
        lines.append(json.dumps(rec, default=_json_default))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    rep = report.as_dict() if report is not None else df.attrs.get("mining_report")
    if rep is not None:
        atomic_write_json(path.with_name(path.name + ".report.json"), rep)
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def load_negatives(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`save_negatives` (report, if present, in ``attrs``)."""
    path = Path(path)
    rows = read_jsonl(path)
    df = pd.DataFrame(
        rows, columns=["qid", "negatives", "scores", "num_mined", "fill", "pos_score"]
    )
    df["pos_score"] = df["pos_score"].astype(float)
    rep = path.with_name(path.name + ".report.json")
    if rep.exists():
        df.attrs["mining_report"] = read_json(rep)
    return df
