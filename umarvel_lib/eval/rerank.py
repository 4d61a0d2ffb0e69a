"""U-MARVEL's recall -> rerank evaluation: re-sort each query's top-k by the fused reranker score.

For every pool directory written by :func:`~umarvel_lib.eval.evaluate.evaluate`, each query's top
``k`` is re-sorted by ``(cos + w P(Yes)) / 2`` (:func:`~umarvel_lib.models.reranker.fused_teacher`,
per-row weights :func:`~umarvel_lib.models.reranker.fusion_weights`); below the head the recall
order is kept. The reranked run replaces ``run.trec`` (the embedding-only run is kept as
``run_recall.trec``) and ``metrics.json`` is rescored. P(Yes) is computed once per distinct
(query, instruction, candidate) across the pools (a pair in both pools' heads is scored once), in
batches that span queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..data.items import candidate_item, query_item
from ..data.mbeir import MBEIR
from ..models.reranker import Reranker, fused_teacher, fusion_weights
from . import runs

RERANK_TAG = "umarvel-rerank"
RECALL_RUN_FILE = "run_recall.trec"


def rerank_pools(
    eval_dir,
    reranker,
    data: MBEIR,
    *,
    top_k: int,
    weights: Mapping[str, float] | None = None,
    default_weight: float = 1.0,
    progress: bool = True,
) -> dict[str, dict]:
    """Rerank every pool directory under ``eval_dir``; returns ``{pool: rescored metrics}``.

    ``reranker``: a :class:`~umarvel_lib.models.reranker.Reranker` or its checkpoint directory;
    ``weights``/``default_weight``: the fusion weight of each row (None: the paper's defaults).
    """
    eval_dir = Path(eval_dir)
    pools = []
    for pool_dir in sorted(p for p in eval_dir.iterdir() if (p / runs.RUN_FILE).is_file()):
        queries = {
            q["qid"]: q for q in runs.read_queries(runs.input_file(pool_dir, runs.QUERIES_FILE))
        }
        pools.append((pool_dir, runs.read_run(pool_dir / runs.RUN_FILE), queries))
    keys = list(
        dict.fromkeys(
            (qid, queries[qid].get("instruction"), d)
            for _, run, queries in pools
            for qid, full in run.items()
            for d, _ in full[:top_k]
        )
    )
    cands = {c.did: c for c in data.global_pool(dedup=True)}
    qobj = {q.qid: q for r in data.rows() for q in data.queries(r)}
    mbeir_qid = {
        qid: q.get("mbeir_qid", qid) for _, _, queries in pools for qid, q in queries.items()
    }
    rr = Reranker.from_pretrained(reranker) if isinstance(reranker, (str, Path)) else reranker
    py = rr.p_yes(
        [
            (
                query_item(qobj[mbeir_qid[qid]], data, instruction=ins),
                candidate_item(cands[d], data),
            )
            for qid, ins, d in keys
        ],
        progress=progress,
    )
    p_yes = dict(zip(keys, py.tolist()))
    out = {}
    for pool_dir, run, queries in pools:
        ws = fusion_weights([queries[qid]["row"] for qid in run], weights, default=default_weight)

        def lines(run=run, queries=queries, ws=ws):
            for (qid, full), w in zip(run.items(), ws.tolist()):
                head, rest = full[:top_k], full[top_k:]
                ins = queries[qid].get("instruction")
                fused = fused_teacher(
                    torch.tensor([s for _, s in head]),
                    torch.tensor([p_yes[(qid, ins, d)] for d, _ in head], dtype=torch.float32),
                    w,
                )
                order = sorted(range(len(head)), key=lambda i: (-float(fused[i]), i))
                # below the reranked head the recall order is kept (scores shifted under the head's minimum)
                floor = float(fused.min()) if len(head) else 0.0
                yield from runs.ranked_lines(
                    qid,
                    [(head[i][0], float(fused[i])) for i in order]
                    + [(d, floor - 1 - j * 1e-3) for j, (d, _) in enumerate(rest, 1)],
                    RERANK_TAG,
                )

        (pool_dir / runs.RUN_FILE).replace(pool_dir / RECALL_RUN_FILE)
        runs.write_run(pool_dir / runs.RUN_FILE, lines())
        out[pool_dir.name] = runs.rescore(pool_dir)
        runs.write_metrics(pool_dir / runs.METRICS_FILE, out[pool_dir.name])
    return out
