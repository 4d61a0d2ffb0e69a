"""M-BEIR retrieval metrics with UniIR semantics.

What M-BEIR (UniIR, U-MARVEL, LamRA) calls "Recall@k" is a **hit rate**: a query scores 1 at k if
*any* qrels-relevant candidate is among its top k, else 0, averaged over queries
(``UniIR:src/common/mbeir_retriever.py compute_recall_at_k``; trec_eval ``success``, ranx
``hit_rate``). In code it is named :func:`success_at_k`; tables keep the paper's label ``R@k``.

Conventions (docs/mbeir.md "Evaluation protocol"):

- The headline number of a row is R@5, except R@10 for Fashion200K (tasks 0, 3) and FashionIQ
  (task 7) (:func:`umarvel_lib.data.mbeir_rows.headline_k`). **Avg** is the plain (unweighted) mean of
  the rows' headline numbers.
- Only qrels with relevance > 0 count (the reader drops the others).
- A query that appears in the qrels but not in the run (or with fewer than k results) simply has
  fewer retrieved candidates: missing results are misses.
- A query with **no positive** in the qrels cannot be scored. UniIR would crash on it (``qrel[qid]``
  KeyError); we exclude it from the row's numbers and report it as ``n_skipped_no_positive``.
- All numbers are percentages (0-100). 95 % confidence intervals are percentile bootstraps over
  queries with a fixed seed. Because a per-query hit is 0/1, resampling n queries with replacement
  gives a mean distributed exactly as ``Binomial(n, p_hat) / n``; we draw that directly (same
  distribution, no ``n_boot x n`` index matrix). The Avg CI resamples every row independently
  (stratified bootstrap) and averages the rows' replicate means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..data.mbeir_rows import ROW_NAMES, headline_k

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50)
METRIC_NAME = "success@k (hit rate; labelled R@k as in UniIR/M-BEIR)"


def label(k: int) -> str:
    """Table label of success@k, as the paper prints it."""
    return f"R@{k}"


def success_at_k(ranked: Sequence[str], relevant: set[str] | frozenset[str], k: int) -> float:
    """1.0 if any of ``relevant`` is among the first ``k`` of ``ranked``, else 0.0.

    ``relevant`` must be non-empty: a query without positives has no defined success (callers skip
    it and count it, see the module doc).
    """
    if not relevant:
        raise ValueError(
            "success_at_k: query has no relevant candidates; skip it and count it instead"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 1.0 if any(d in relevant for d in ranked[:k]) else 0.0


def first_hit_rank(ranked: Sequence[str], relevant: set[str]) -> int | None:
    """1-based rank of the first relevant candidate, or None when none was retrieved."""
    for r, d in enumerate(ranked, 1):
        if d in relevant:
            return r
    return None


def hits_table(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, set[str]],
    qids: Iterable[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Per-query success for ``qids``: returns (hits (n_scored, len(ks)) of 0/1, scored qids, skipped qids).

    ``run[qid]`` is the ranked list of dids (best first); a qid absent from ``run`` retrieved
    nothing (all misses). qids without positives in ``qrels`` are returned as skipped.
    """
    ks = list(ks)
    rows, scored, skipped = [], [], []
    for qid in qids:
        rel = qrels.get(qid)
        if not rel:
            skipped.append(qid)
            continue
        r = first_hit_rank(run.get(qid, ()), rel)
        rows.append([r is not None and r <= k for k in ks])
        scored.append(qid)
    hits = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(ks))
    return hits, scored, skipped


def _boot_means(hits: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicate means of 0/1 hits, (n_boot, n_metrics); exact Binomial shortcut."""
    n = hits.shape[0]
    p = hits.mean(0)
    return rng.binomial(n, np.broadcast_to(p, (n_boot, p.shape[0]))) / n


def _ci(reps: np.ndarray) -> list[list[float]]:
    lo, hi = np.percentile(reps, [2.5, 97.5], axis=0)
    return [[round(100 * float(a), 4), round(100 * float(b), 4)] for a, b in zip(lo, hi)]


def score_rows(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, set[str]],
    row_qids: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Score every row and their Avg.

    ``row_qids``: {row name (e.g. ``mscoco_task0``): the row's qids (all of them, including those
    without positives, which are skipped and counted)}. ``run``: {qid: ranked dids}. Returns the
    ``metrics.json`` body: ``{"rows": {...}, "avg": {...}, ...}`` with values in percent.
    """
    ks = sorted(set(int(k) for k in ks))
    for name in row_qids:
        if headline_k(name) not in ks:
            raise ValueError(f"row {name} needs R@{headline_k(name)} but ks={ks}")
    rng = np.random.default_rng(seed)
    rows, reps_headline = {}, []
    n_q = n_skip = 0
    for name in _ordered(row_qids):
        hits, scored, skipped = hits_table(run, qrels, row_qids[name], ks)
        n_q += len(scored)
        n_skip += len(skipped)
        hk = headline_k(name)
        hcol = ks.index(hk)
        if not scored:
            raise ValueError(
                f"row {name}: no query has a positive in the qrels ({len(skipped)} queries); "
                f"nothing to score"
            )
        means = hits.mean(0)
        reps = _boot_means(hits, n_boot, rng)
        cis = _ci(reps)
        entry = {label(k): round(100 * float(m), 4) for k, m in zip(ks, means)}
        entry.update(
            headline=entry[label(hk)],
            headline_metric=label(hk),
            n_queries=len(scored),
            n_skipped_no_positive=len(skipped),
            ci95=cis[hcol],
            ci95_by_metric={label(k): c for k, c in zip(ks, cis)},
        )
        rows[name] = entry
        reps_headline.append(reps[:, hcol])
    if not rows:
        raise ValueError("no rows to score")
    avg_reps = np.mean(np.stack(reps_headline, 1), 1)
    lo, hi = np.percentile(avg_reps, [2.5, 97.5])
    avg = {
        "headline": round(float(np.mean([r["headline"] for r in rows.values()])), 4),
        "headline_metric": "mean of rows' headline (R@5; R@10 for Fashion200K, FashionIQ)",
        "ci95": [round(100 * float(lo), 4), round(100 * float(hi), 4)],
        "n_rows": len(rows),
        "rows_missing": [r for r in ROW_NAMES if r not in rows],
        "is_full_16": all(r in rows for r in ROW_NAMES),
    }
    for k in ks:
        avg[label(k)] = round(float(np.mean([r[label(k)] for r in rows.values()])), 4)
    return {
        "metric": METRIC_NAME,
        "rows": rows,
        "avg": avg,
        "n_queries": n_q,
        "n_skipped_no_positive": n_skip,
        "ks": ks,
        "bootstrap": {
            "n": n_boot,
            "seed": seed,
            "ci": "percentile 95%",
            "method": "per-query resampling (exact Binomial form); Avg: stratified by row",
        },
    }


def _ordered(names: Iterable[str]) -> list[str]:
    """Rows in the paper's column order (unknown names after, alphabetically)."""
    names = list(names)
    order = {n: i for i, n in enumerate(ROW_NAMES)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


# ---- the artefacts of the paper's mechanisms: the reranker's accuracy, the teacher's agreement ----------
def reranker_accuracy(p_pos: Sequence[float], p_neg: Sequence[Sequence[float]]) -> dict:
    """How well a pointwise reranker tells each query's labelled positive from its mined negatives.

    ``p_pos[i]``: ``P(Yes)`` of query ``i``'s positive; ``p_neg[i]``: ``P(Yes)`` of its negatives (a
    query without negatives counts in the pointwise numbers only). Percentages (0-100):

    * ``pairwise``: of all (positive, negative) pairs of one query, the share where the positive's
      ``P(Yes)`` is above the negative's (a tie counts one half, the AUC convention);
    * ``pointwise``: of all scored (query, candidate) pairs, the share that ``P(Yes) > 0.5`` labels
      right (the positive Yes, a negative No); ``positives_yes`` and ``negatives_no`` are its two parts.
    """
    p_pos = np.asarray(p_pos, dtype=np.float64)
    if len(p_neg) != len(p_pos):
        raise ValueError(f"{len(p_pos)} positives but negatives for {len(p_neg)} queries")
    negs = [np.asarray(n, dtype=np.float64) for n in p_neg]
    all_neg = np.concatenate(negs) if negs else np.empty(0)
    wins = sum(float((p > n).sum() + 0.5 * (p == n).sum()) for p, n in zip(p_pos, negs))
    n_pairs = len(all_neg)
    right = float((p_pos > 0.5).sum() + (all_neg <= 0.5).sum())

    def pct(a: float, n: int) -> float | None:
        return 100.0 * a / n if n else None

    return {
        "pairwise": pct(wins, n_pairs),
        "pointwise": pct(right, len(p_pos) + n_pairs),
        "positives_yes": pct(float((p_pos > 0.5).sum()), len(p_pos)),
        "negatives_no": pct(float((all_neg <= 0.5).sum()), n_pairs),
        "mean_p_yes_positive": float(p_pos.mean()) if len(p_pos) else None,
        "mean_p_yes_negative": float(all_neg.mean()) if n_pairs else None,
        "n_queries": len(p_pos),
        "n_pairs": n_pairs,
    }


def teacher_agreement(
    lists: Iterable[tuple[Sequence[str], Sequence[float], set[str] | frozenset[str]]], tau: float
) -> dict:
    """How far a distillation teacher agrees with the labels. ``lists``: per query, its candidate dids
    in recall order (the embedding model's ranking), the teacher's score of each, and the query's
    labelled positives; ``tau``: the temperature of the distillation target ``softmax(teacher / tau)``.
    Percentages over queries (0-100):

    * ``top1_positive``: the teacher's highest-scored candidate is a labelled positive (a tie: the
      first in recall order), beside ``recall_top1_positive``, the same for the recall order alone;
    * ``mass_on_positives``: the mean probability the target ``softmax(teacher / tau)`` puts on them;
    * ``list_has_positive``: the list holds a labelled positive at all (the ceiling of both).
    """
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    top1 = recall1 = has = n = 0
    mass = 0.0
    for dids, scores, pos in lists:
        s = np.asarray(scores, dtype=np.float64)
        if len(dids) != len(s):
            raise ValueError(f"{len(dids)} candidates but {len(s)} teacher scores")
        n += 1
        if not len(s):
            continue
        is_pos = np.array([d in pos for d in dids])
        p = np.exp((s - s.max()) / tau)
        top1 += bool(is_pos[int(np.argmax(s))])
        recall1 += bool(is_pos[0])
        has += bool(is_pos.any())
        mass += float(p[is_pos].sum() / p.sum())
    return {
        "top1_positive": 100.0 * top1 / n if n else None,
        "recall_top1_positive": 100.0 * recall1 / n if n else None,
        "mass_on_positives": 100.0 * mass / n if n else None,
        "list_has_positive": 100.0 * has / n if n else None,
        "tau": float(tau),
        "n_queries": n,
    }


__all__ = [
    "DEFAULT_KS",
    "METRIC_NAME",
    "label",
    "success_at_k",
    "first_hit_rank",
    "hits_table",
    "score_rows",
    "reranker_accuracy",
    "teacher_agreement",
]
