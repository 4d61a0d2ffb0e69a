"""The artefacts of the paper's mechanisms that a run leaves behind, beside its retrieval numbers:
the reranker's accuracy on held-out pairs and the distillation teacher's agreement with the labels
(the hard-negative mining report is written by :func:`~umarvel_lib.train.mining.save_negatives`).

Both are measurements, not settings: they change no run identity. Each is computed once and kept
beside what it measures (the reranker checkpoint, the distillation stage), and
:func:`mechanism_records` copies them into the run's ``row.json`` (the report and notebook 06 read
them from there, so a clone without the stage cache still shows them).

* ``reranker_accuracy``: the dev split's queries (M-BEIR ``val``, the first ``eval.dev_queries``
  of each row; never trained on), each with one labelled positive and the
  :data:`DEV_NEGATIVES` hardest non-positives of its row's dev pool, mined by the hard-negative
  model (the reranker's training negatives come from the same model on the train split); the
  reranker's ``P(Yes)`` of each pair scored by :func:`~umarvel_lib.eval.metrics.reranker_accuracy`.
* ``teacher_agreement``: the fused teacher lists of the distillation sample (``teacher.jsonl``)
  against the queries' labelled positives, at the student's tau when distillation starts (the
  temperature of the KL target), by :func:`~umarvel_lib.eval.metrics.teacher_agreement`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from ..config import RunConfig
from ..data.items import candidate_item, query_item
from ..data.mbeir import MBEIR
from ..data.mbeir_rows import TASKS
from ..eval.metrics import reranker_accuracy, teacher_agreement
from ..io import DamagedFileError, atomic_write_json, read_json, read_jsonl
from ..models.reranker import Reranker
from .mining import mine_hard_negatives
from .stage_data import Pair, encode_queries_and_pool
from .stage_dir import stage_path
from .teacher import reranker_dir

log = logging.getLogger(__name__)

#: Mined negatives per dev query scored for the reranker's accuracy.
DEV_NEGATIVES = 3
RERANKER_ACCURACY_FILE = "dev_accuracy.json"  # beside the reranker checkpoint
TEACHER_AGREEMENT_FILE = "teacher_agreement.json"  # in the distillation stage directory


def _cached(path: Path) -> dict | None:
    if path.is_file():
        try:
            return read_json(path)
        except DamagedFileError as e:  # computed by this module: compute it again
            log.warning("%s; computing it again", e)
    return None


def reranker_dev_accuracy(
    cfg: RunConfig, hn_model: Path, rr_dir: Path, *, progress: bool = True
) -> dict | None:
    """The reranker in ``rr_dir`` on held-out dev pairs (module doc), kept as
    ``dev_accuracy.json`` beside it. None when the data has no dev split."""
    f = Path(rr_dir).parent / RERANKER_ACCURACY_FILE
    if (done := _cached(f)) is not None:
        return done
    dev = MBEIR(
        cfg.resolved_data_root(), check_images=False, split="val", max_queries=cfg.eval.dev_queries
    )
    rows = dev.rows()
    if not rows:
        log.info("%s: no dev split, the reranker's accuracy is not measured", dev.root)
        return None
    rng = random.Random(cfg.seed)
    pairs, pool, spans, positives = [], [], [], {}
    for row in rows:
        qrels, local = dev.qrels(row), dev.local_pool(row)
        by_did = {c.did: c for c in local}
        q0, c0 = len(pairs), len(pool)
        for q in dev.queries(row):
            pos = sorted(d for d in qrels.get(q.qid, ()) if d in by_did)
            if not pos:
                continue
            ins = (
                dev.sample_instruction(q, TASKS[q.task_id][1], rng)
                if cfg.embedder.instructions
                else None
            )
            pairs.append(
                Pair(
                    query_item(q, dev, instruction=ins),
                    candidate_item(by_did[pos[0]], dev),
                    qid=q.qid,
                    row=row.name,
                )
            )
            positives[q.qid] = set(qrels[q.qid])
        pool += local
        spans.append((q0, len(pairs), c0, len(pool)))
    q_emb, c_emb = encode_queries_and_pool(
        hn_model, cfg, pairs, pool, dev, what="reranker dev", progress=progress
    )
    negatives = []  # per pair, in order: the row's hardest non-positives of its own dev pool
    for q0, q1, c0, c1 in spans:
        if q1 == q0:
            continue
        df, _ = mine_hard_negatives(
            q_emb[q0:q1],
            c_emb[c0:c1],
            [p.qid for p in pairs[q0:q1]],
            [c.did for c in pool[c0:c1]],
            positives,
            top_m=min(c1 - c0, 50),
            num_negatives=DEV_NEGATIVES,
            fill="none",
            if_empty="keep",
        )
        by_did = {c.did: c for c in pool[c0:c1]}
        negatives += [[by_did[d] for d in negs] for negs in df["negatives"]]
    rr = Reranker.from_pretrained(rr_dir)
    flat = [(p.query, p.positive) for p in pairs] + [
        (p.query, candidate_item(c, dev)) for p, negs in zip(pairs, negatives) for c in negs
    ]
    py = rr.p_yes(flat, progress=progress).tolist()
    p_pos, rest, p_neg = py[: len(pairs)], py[len(pairs) :], []
    for negs in negatives:
        p_neg.append(rest[: len(negs)])
        rest = rest[len(negs) :]
    out = {
        **reranker_accuracy(p_pos, p_neg),
        "split": "val",
        "negatives_per_query": DEV_NEGATIVES,
        "negatives_from": "each row's dev pool, mined by the hard-negative model",
    }
    atomic_write_json(f, out)
    return out


def distill_teacher_agreement(sdir: Path, data: MBEIR, tau: float) -> dict | None:
    """The teacher lists of the distillation stage in ``sdir`` against the training labels (module
    doc), kept as ``teacher_agreement.json`` there. None when the stage has no teacher lists."""
    f = Path(sdir) / TEACHER_AGREEMENT_FILE
    if (done := _cached(f)) is not None:
        return done
    lists = Path(sdir) / "teacher.jsonl"
    if not lists.is_file():
        return None
    positives = {q.qid: set(q.pos) for q in data.union_train()}
    out = teacher_agreement(
        ((r["dids"], r["teacher"], positives.get(r["qid"], set())) for r in read_jsonl(lists)),
        tau=tau,
    )
    atomic_write_json(f, out)
    return out


def mechanism_records(
    cfg: RunConfig, stage_root: Path, *, reranker: bool, progress: bool = True
) -> dict:
    """``{"mining": ..., "reranker_accuracy": ..., "teacher_agreement": ...}`` for the mechanisms this run
    used (a hard-negative stage's mining report, a reranked evaluation, ``reranker``, or a KL
    distillation stage), computed where missing; what the run's ``row.json`` records."""
    out = {}
    stage_root = Path(stage_root)
    if (
        "hard_negatives" in cfg.stages
    ):  # the mining report, kept in row.json so a clone without the cache shows it
        rep = _cached(
            stage_path(cfg, stage_root, "hard_negatives") / "hard_negatives.jsonl.report.json"
        )
        if rep:
            out["mining"] = rep
    distill = "distill" in cfg.stages and cfg.scaled_stage("distill").distill_mode == "kl"
    if reranker or distill:
        rr = reranker_dir(cfg, stage_root)
        hn = stage_path(cfg, stage_root, "hard_negatives") / "model"
        if rr.is_dir() and hn.is_dir():
            acc = reranker_dev_accuracy(cfg, hn, rr, progress=progress)
            if acc is not None:
                out["reranker_accuracy"] = acc
    if distill:
        sdir = stage_path(cfg, stage_root, "distill")
        plan = (_cached(sdir / "stage.json") or {}).get("plan") or {}
        if plan.get("tau_start"):
            data = MBEIR(cfg.resolved_data_root(), check_images=False)
            agree = distill_teacher_agreement(sdir, data, plan["tau_start"])
            if agree is not None:
                out["teacher_agreement"] = agree
    return out
