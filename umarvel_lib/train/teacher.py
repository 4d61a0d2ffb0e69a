"""The distillation stage's teacher: a pointwise Yes/No reranker trained on mined negatives, and each
sampled query's top-k train-pool candidates with the fused score (cos + w P(Yes)) / 2.

The reranker is trained once per hard-negative model and reranker recipe (its directory is keyed by
that hash) and is also what a ``reranker: true`` ablation row evaluates (U-MARVEL+).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, StageConfig
from ..data.items import candidate_item
from ..data.mbeir import MBEIR
from ..io import DamagedFileError, atomic_write_text, file_lock, read_jsonl
from ..models.reranker import Reranker, fused_teacher, fusion_weights
from .engine import TrainConfig, Trainer
from .mining import exact_topk
from .stage_data import Pair, encode_queries_and_pool, with_hard_negatives
from .stage_dir import checkpoint_complete

log = logging.getLogger(__name__)


def reranker_dir(cfg: RunConfig, out_root: Path) -> Path:
    """The reranker checkpoint of a run: keyed by the hard-negative model's run + the reranker recipe."""
    return (
        Path(out_root)
        / f"reranker-{cfg.hash(upto_stage='hard_negatives', reranker=True)}"
        / "model"
    )


def train_reranker(
    cfg: RunConfig, hn_model: Path, out_root: Path, *, backbone: Path, progress: bool = True
) -> Path:
    """Pointwise Yes/No reranker from the raw ``backbone`` on positives + one random mined negative."""
    final = reranker_dir(cfg, out_root)
    rdir, h = final.parent, final.parent.name.removeprefix("reranker-")
    if checkpoint_complete(final, "reranker.json"):
        return final
    with file_lock(
        out_root / f".reranker-{h}.lock"
    ):  # a row and a distillation stage may need it at once
        if checkpoint_complete(final, "reranker.json"):
            return final
        return _train_reranker(cfg, hn_model, rdir, h, backbone=backbone, progress=progress)


def _train_reranker(
    cfg: RunConfig, hn_model: Path, rdir: Path, h: str, *, backbone: Path, progress: bool
) -> Path:
    from ..models.loading import load_backbone

    final = rdir / "model"
    rdir.mkdir(parents=True, exist_ok=True)
    data = MBEIR(cfg.resolved_data_root(), check_images=False)
    stage = dataclasses.replace(
        cfg.scaled_stage("hard_negatives"),
        negatives="in_batch+hard",
        num_hard=1,
        filter_max_score=None,
    )
    pairs = with_hard_negatives(cfg, stage, hn_model, rdir, data, progress=progress)
    examples = [(p.query, p.positive, True) for p in pairs] + [
        (p.query, p.negatives[0], False) for p in pairs
    ]
    rng = random.Random(cfg.seed)
    rng.shuffle(examples)
    model, processor = load_backbone(backbone)
    rr = Reranker(model, processor, source=backbone)
    from ..models.lora import apply_lora, merge_lora

    for p in rr.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    rc = cfg.reranker_recipe()  # exactly what the reranker's cache key hashes
    rr.model = apply_lora(rr.model, r=rc["lora_r"], alpha=rc["lora_alpha"], dropout=0.05)
    tcfg = TrainConfig(
        lr=rc["lr"],
        max_steps=rc["max_steps"],
        epochs=rc["epochs"],
        batch_size=min(rc["batch_size"], len(examples)),
        seed=cfg.seed,
        save_every=50,
        tqdm_mininterval=5.0,
        progress=progress,
    )

    def step(batch, ctx):
        loss = rr.loss(rr.collate([(q, c) for q, c, _ in batch], labels=[y for _, _, y in batch]))
        ctx.backward(loss)
        return loss.detach()

    # never sharded (merged and saved in place below): replicated, gradients averaged by the engine
    Trainer(
        rr,
        step,
        examples,
        tcfg,
        rdir / "train",
        collate_fn=list,
        run_identity={"hash": h},
        shard="none",
    ).fit()
    rr.model = merge_lora(rr.model)
    rr.save(final)
    return final


def teacher_lists(
    cfg: RunConfig,
    stage: StageConfig,
    hn_model: Path,
    reranker_dir: Path,
    data: MBEIR,
    pairs: list[Pair],
    sdir: Path,
    *,
    progress: bool = True,
) -> list[dict]:
    """Top-k train-pool candidates of each sampled query with fused teacher scores (cached as JSONL)."""

    f = sdir / "teacher.jsonl"
    pool = data.train_pool()
    by_did = {c.did: c for c in pool}
    recs = None
    if f.is_file():
        try:
            recs = read_jsonl(f)
        except DamagedFileError as e:  # computed by this function: compute it again
            log.warning("%s; scoring the teacher lists again", e)
    if recs is None:
        q, c = encode_queries_and_pool(
            hn_model, cfg, pairs, pool, data, what="teacher", progress=progress
        )
        k = min(stage.teacher_top_k, len(pool))
        scores, idx = exact_topk(q, c, k)  # the shared search and tie-break (eval.search)
        rr = Reranker.from_pretrained(reranker_dir)
        # one batched pass over every (query, candidate) pair, k per query in order
        py = rr.p_yes(
            [
                (p.query, candidate_item(pool[j], data))
                for i, p in enumerate(pairs)
                for j in idx[i].tolist()
            ],
            progress=progress,
        )
        py = torch.from_numpy(np.asarray(py, dtype=np.float32)).view(len(pairs), k)
        w = fusion_weights(
            [p.row for p in pairs], stage.teacher_weight_overrides, default=stage.teacher_weight
        )
        fused = fused_teacher(scores, py, w)
        recs = [
            {
                "qid": p.qid,
                "dids": [pool[j].did for j in idx[i].tolist()],
                "teacher": fused[i].tolist(),
            }
            for i, p in enumerate(pairs)
        ]
        atomic_write_text(f, "".join(json.dumps(r) + "\n" for r in recs))
        recs = read_jsonl(f)  # the values as every later run reads them (float round trip)
    qmap = {p.qid: p for p in pairs}
    return [
        {
            "query": qmap[r["qid"]].query,
            "candidates": [candidate_item(by_did[d], data) for d in r["dids"]],
            "teacher": np.asarray(r["teacher"], dtype=np.float32),
        }
        for r in recs
    ]
