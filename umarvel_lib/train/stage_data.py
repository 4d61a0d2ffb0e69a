"""What each training stage trains on: (query, positive[, hard negatives]) pairs read from the data.

* ``nli``: ``nli/nli_for_simcse.csv`` sent0 -> sent1 (the ``hard_neg`` column is unused, as released)
* ``cc3m``: ``cc3m/chat.json`` caption -> image
* ``mbeir``: ``query/union_train/mbeir_union_up_train.jsonl`` with a random positive and an
  instruction per query; candidates from ``cand_pool/global/mbeir_union_train_cand_pool.jsonl``
* ``hard_negatives``: the same queries + K negatives mined with the stage-3 model
  (:func:`~umarvel_lib.train.mining.mine_hard_negatives`, filters from the config)
* ``distill``: a per-task sample of the training queries (:func:`per_task_sample`); its teacher lists
  are :mod:`umarvel_lib.train.teacher`'s.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from pathlib import Path

import numpy as np

from ..config import RunConfig, StageConfig
from ..data.corpora import read_cc3m, read_nli
from ..data.items import Item, candidate_item, query_item
from ..data.mbeir import MBEIR
from ..data.mbeir_rows import TASKS, row_of_query
from ..io import DamagedFileError, atomic_write_bytes, config_hash, file_lock
from ..models.embedder import Embedder
from .mining import load_negatives, mine_hard_negatives, save_negatives

log = logging.getLogger(__name__)


# ---- examples --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pair:
    query: Item
    positive: Item
    negatives: tuple[Item, ...] = ()
    qid: str | None = None
    row: str | None = None


def nli_pairs(path) -> list[Pair]:
    """``sent0 -> sent1`` of the NLI CSV file (``hard_neg`` unused, as released)."""
    return [Pair(Item(txt=a), Item(txt=b)) for a, b, _ in read_nli(path)]


def cc3m_pairs(root) -> list[Pair]:
    """caption -> image of the CC3M ``chat.json`` folder."""
    return [Pair(Item(txt=cap), Item(image_path=img)) for cap, img in read_cc3m(root)]


def mbeir_pairs(data: MBEIR, *, instructions: bool, seed: int) -> list[Pair]:
    """union_train queries with one random positive and a seeded instruction each."""
    rng = random.Random(seed)
    pool = {c.did: c for c in data.train_pool()}
    out = []
    for q in data.union_train():
        cands = [d for d in q.pos if d in pool]
        if not cands:
            raise ValueError(f"union_train query {q.qid} has no positive in the train pool")
        ins = data.sample_instruction(q, TASKS[q.task_id][1], rng) if instructions else None
        out.append(
            Pair(
                query_item(q, data, instruction=ins),
                candidate_item(pool[rng.choice(cands)], data),
                qid=q.qid,
                row=row_of_query(q.qid, q.task_id),
            )
        )
    return out


def per_task_sample(pairs: list[Pair], fraction: float, seed: int) -> list[Pair]:
    """A per-task random sample (the paper's 10% distillation subset, seed 42 in the release)."""
    rng = random.Random(seed)
    by_row: dict[str, list[Pair]] = {}
    for p in pairs:
        by_row.setdefault(p.row or "", []).append(p)
    out = []
    for row in sorted(by_row):
        ps = by_row[row]
        out += rng.sample(ps, max(1, int(round(len(ps) * fraction))))
    return out


# ---- hard negatives ---------------------------------------------------------------------------
def with_hard_negatives(
    cfg: RunConfig,
    stage: StageConfig,
    model_dir: Path,
    sdir: Path,
    data: MBEIR,
    pairs: list[Pair] | None = None,
    *,
    progress: bool = True,
) -> list[Pair]:
    """Mine with the previous stage's model and attach K negatives to every training pair."""
    pairs = (
        pairs
        if pairs is not None
        else mbeir_pairs(data, instructions=cfg.embedder.instructions, seed=cfg.seed)
    )
    neg_file = sdir / "hard_negatives.jsonl"
    pool = data.train_pool()
    if neg_file.is_file():
        try:
            load_negatives(neg_file)
        except DamagedFileError as e:  # written by this function from the mining model: mine again
            log.warning("%s; mining again", e)
            neg_file.unlink(missing_ok=True)
    if not neg_file.is_file():
        q_emb, c_emb = _mining_embeddings(cfg, model_dir, pairs, pool, data, progress=progress)
        positives = {q.qid: set(q.pos) for q in data.union_train()}
        df, report = mine_hard_negatives(
            q_emb,
            c_emb,
            [p.qid for p in pairs],
            [c.did for c in pool],
            positives,
            top_m=min(stage.mine_top_m, len(pool)),
            num_negatives=stage.num_hard,
            max_score=stage.filter_max_score,
            relative_margin=stage.filter_relative_margin,
        )
        save_negatives(df, neg_file, report)
    df = load_negatives(neg_file)
    by_did = {c.did: c for c in pool}
    # mine_hard_negatives already pads every list to K (repeat-first, or seeded random non-positives
    # when nothing survives the filters) and records it in the mining report
    negs = {q: tuple(n) for q, n in zip(df["qid"], df["negatives"])}
    return [
        dataclasses.replace(
            p,
            negatives=tuple(candidate_item(by_did[d], data) for d in negs[p.qid][: stage.num_hard]),
        )
        for p in pairs
    ]


def _mining_embeddings(
    cfg: RunConfig, model_dir: Path, pairs: list[Pair], pool, data: MBEIR, *, progress: bool
):
    """Train-query and train-pool embeddings of the model that mines, cached beside its checkpoint:
    the variants of the hard-negative stage (Table 5's rows) mine with the same model and differ only
    in the filters applied afterwards, so they encode once."""
    key = config_hash(
        {
            "embedder": dataclasses.asdict(cfg.embedder),
            "queries": [p.qid for p in pairs],
            "query_text": [(p.query.txt, p.query.instruction) for p in pairs],
            "pool": [c.did for c in pool],
        }
    )
    path = Path(model_dir).parent / f"mining-{key}.npz"
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["queries"], z["pool"]
            except Exception as e:  # noqa: BLE001  (a cut file: encode again)
                log.warning(
                    "%s: damaged mining embeddings (%s: %s); encoding again",
                    path,
                    type(e).__name__,
                    e,
                )
        q_emb, c_emb = encode_queries_and_pool(
            model_dir, cfg, pairs, pool, data, what="mine", progress=progress
        )
        buf = io.BytesIO()
        np.savez(buf, queries=np.asarray(q_emb), pool=np.asarray(c_emb))
        atomic_write_bytes(path, buf.getvalue())
        return q_emb, c_emb


def encode_queries_and_pool(
    model_dir: Path, cfg: RunConfig, pairs, pool, data, *, what: str, progress: bool
):
    """The training queries of ``pairs`` (with their instructions) and the candidates of ``pool``
    encoded by the embedder in ``model_dir``: what hard-negative mining and the distillation teacher
    search over."""
    emb = Embedder.from_pretrained(model_dir, cfg.embedder)
    bs = cfg.eval.batch_size
    q = emb.encode(
        [p.query for p in pairs], batch_size=bs, desc=f"{what}: queries", progress=progress
    )
    c = emb.encode(
        [candidate_item(x, data) for x in pool],
        batch_size=bs,
        desc=f"{what}: pool",
        progress=progress,
    )
    return q, c
