"""Progressive training stages, chained exactly (docs/recipe.md "Stages"; docs/paper_vs_code.md checklist 5-13).

    nli  ->  cc3m  ->  mbeir  ->  hard_negatives  ->  distill

Each stage starts from the previous stage's merged checkpoint (never from the raw backbone, which
is the released stage-3 script's bug), adds a fresh LoRA with the stage's r/alpha/LR, trains with
InfoNCE (GradCache over the global batch) or the distillation KL, merges, and saves a checkpoint
keyed by the hash of everything that determines it (:meth:`RunConfig.hash` ``upto_stage``), so
rows of an ablation that share a prefix of stages share its checkpoints, and a finished stage is
never re-run. Which stages run is ``RunConfig.stages``.

What each stage trains on is prepared by :mod:`umarvel_lib.train.stage_data` (pairs read from the
data root, hard negatives mined with the previous model), the distillation teacher by
:mod:`umarvel_lib.train.teacher`; this module builds the stage's embedder and loss step, runs the
trainer (stopping at the dev plateau for a ``budget: plateau`` stage), merges and records the stage.
The ``distill`` stage trains on the teacher's fused top-k lists, or with ``continue_hard`` on the
same sample with hard negatives (the paper's control).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, StageConfig
from ..data.mbeir import MBEIR
from ..io import atomic_write_json, file_lock
from ..models.embedder import Embedder
from .engine import TrainConfig, Trainer
from .gradcache import grad_cache_step, loss_in_full_precision
from .losses import distill_kl, gather_with_grad, info_nce
from .stage_data import (
    Pair,
    cc3m_pairs,
    mbeir_pairs,
    nli_pairs,
    per_task_sample,
    with_hard_negatives,
)
from .stage_dir import checkpoint_complete, dev_curve, stage_path
from .teacher import teacher_lists, train_reranker

log = logging.getLogger(__name__)


# ---- one training stage -----------------------------------------------------------------------
def train_config(
    stage: StageConfig,
    n_examples: int,
    seed: int,
    *,
    eval_every: int | None = None,
    progress: bool = True,
) -> TrainConfig:
    return TrainConfig(
        lr=stage.lr,
        epochs=None if stage.max_steps else stage.epochs,
        max_steps=stage.max_steps,
        batch_size=min(stage.batch_size, max(1, n_examples)),
        warmup_ratio=stage.warmup_ratio,
        seed=seed,
        save_every=50,
        eval_every=eval_every or 0,
        eval_at_start=bool(eval_every),
        tqdm_mininterval=5.0,
        mixed_precision=stage.mixed_precision,
        progress=progress,
    )


def contrastive_step(embedder: Embedder, stage: StageConfig):
    """The InfoNCE step of a stage, with GradCache over the global batch."""
    k = stage.num_hard if stage.negatives != "in_batch" else 0

    def loss_fn(q, c, hn=None):
        q, c = gather_with_grad(q), gather_with_grad(c)
        hard = gather_with_grad(hn).reshape(q.shape[0], k, -1) if hn is not None else None
        return info_nce(
            q,
            c,
            embedder.temperature.tau,
            hard_negatives=hard,
            symmetric=stage.symmetric,
            hard_negatives_only=stage.negatives == "hard_only",
        )

    def encode(items):
        return embedder(embedder.collate(items))

    def step(batch: list[Pair], ctx):
        inputs = [[p.query for p in batch], [p.positive for p in batch]]
        if k:
            inputs.append([n for p in batch for n in p.negatives[:k]])
        return grad_cache_step(
            encode, inputs, loss_fn, stage.chunk_size, backward=ctx.backward, autocast=ctx.autocast
        )

    return step


def distill_step(embedder: Embedder):
    """KL(softmax(teacher/tau.detach()) || softmax(cos/tau)) over each query's candidate list."""

    def step(batch: list[dict], ctx):
        cands = [c for b in batch for c in b["candidates"]]
        n = len(batch[0]["candidates"])
        qs = embedder(embedder.collate([b["query"] for b in batch]))  # under the engine's autocast
        c = embedder(embedder.collate(cands)).reshape(len(batch), n, -1)
        teacher = torch.tensor(np.stack([b["teacher"] for b in batch]), dtype=torch.float32)
        loss = loss_in_full_precision(
            lambda q, cc: distill_kl(
                torch.einsum("bd,bnd->bn", q, cc), teacher.to(q.dtype), embedder.temperature.tau
            ),
            qs,
            c,
        )
        ctx.backward(loss)
        return loss.detach()

    return step


def _embedder_for(cfg: RunConfig, stage: StageConfig, init: Path, seed: int = 0) -> Embedder:
    ecfg = dataclasses.replace(cfg.embedder, train_temperature=stage.train_temperature)
    if stage.compression_prompt is not None:
        ecfg = dataclasses.replace(ecfg, compression_prompt=stage.compression_prompt)
    emb = Embedder.from_pretrained(init, ecfg)
    emb.temperature.tau.requires_grad_(stage.train_temperature)
    if stage.full_finetune:
        for n, p in emb.model.named_parameters():
            p.requires_grad_("visual" not in n)
    else:
        for p in emb.model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)  # LoRA init is random: make it a function of the run's seed
        emb.apply_lora(stage.lora_r, stage.lora_alpha, stage.lora_dropout)
    return emb


def run_stage(
    cfg: RunConfig,
    name: str,
    init: Path,
    out_root: Path,
    *,
    backbone: Path,
    eval_fn=None,
    progress: bool = True,
) -> Path:
    """Train one stage from the checkpoint ``init``; returns the merged checkpoint directory.

    ``backbone``: the raw backbone of the run (the distillation stage trains its reranker from it);
    ``progress``: show the stage's progress bars (training, mining, teacher scoring)."""
    stage = cfg.scaled_stage(name)
    h = cfg.hash(upto_stage=name)
    sdir = stage_path(cfg, out_root, name)
    final = sdir / "model"
    if checkpoint_complete(final, "embedder.json"):
        log.info("stage %s: reusing %s", name, final)
        return final
    stop_fn = _plateau_stop(cfg, stage, eval_fn)
    with file_lock(
        out_root / f".{name}-{h}.lock"
    ):  # parallel rows sharing this stage wait, then reuse it
        if checkpoint_complete(final, "embedder.json"):
            return final
        return _train_stage(
            cfg,
            name,
            stage,
            h,
            init,
            sdir,
            backbone=backbone,
            eval_fn=eval_fn,
            stop_fn=stop_fn,
            progress=progress,
        )


def _train_stage(
    cfg: RunConfig,
    name: str,
    stage: StageConfig,
    h: str,
    init: Path,
    sdir: Path,
    *,
    backbone: Path,
    eval_fn,
    stop_fn=None,
    progress: bool = True,
) -> Path:
    final = sdir / "model"
    sdir.mkdir(parents=True, exist_ok=True)
    data_root = cfg.resolved_data_root()
    data = MBEIR(data_root, check_images=False)
    emb = _embedder_for(cfg, stage, init, seed=cfg.seed)
    if name == "nli":
        examples, step = nli_pairs(cfg.corpus_paths()["nli"]), contrastive_step(emb, stage)
    elif name == "cc3m":
        examples, step = cc3m_pairs(cfg.corpus_paths()["cc3m"]), contrastive_step(emb, stage)
    elif name == "mbeir":
        examples, step = (
            mbeir_pairs(data, instructions=cfg.embedder.instructions, seed=cfg.seed),
            contrastive_step(emb, stage),
        )
    elif name == "hard_negatives":
        examples = with_hard_negatives(cfg, stage, init, sdir, data, progress=progress)
        step = contrastive_step(emb, stage)
    elif name == "distill":
        examples, step = distill_examples(
            cfg, stage, init, sdir, data, emb, backbone=backbone, progress=progress
        )
    else:
        raise ValueError(f"unknown stage {name!r}")
    tcfg = train_config(
        stage, len(examples), cfg.seed, eval_every=cfg.eval.eval_every, progress=progress
    )
    tau_start = emb.temperature.value
    trainer = Trainer(
        emb,
        step,
        examples,
        tcfg,
        sdir / "train",
        collate_fn=list,
        eval_fn=eval_fn,
        stop_fn=stop_fn,
        run_identity={"stage_hash": h, "init": str(init)},
    )
    res = trainer.fit()
    # sharded (an FSDP launch): the main process rebuilds the embedder with the trained weights
    emb = trainer.trained_model(lambda: _embedder_for(cfg, stage, init, seed=cfg.seed))
    if not trainer.acc.is_main_process:  # several processes: the main one saves, the others wait
        trainer.acc.wait_for_everyone()
        return final
    if emb.is_lora:
        emb.merge_lora()
    emb.save(final)
    fin = json.loads(trainer.finished_path.read_text())
    curve = dev_curve(sdir)
    plan = {
        "stage": name,
        "budget": stage.budget,
        "steps": res.step,
        "max_steps": trainer.total_steps(),
        "min_steps": stage.plateau_min_steps(),
        "min_examples": stage.min_examples,
        "min_evals": stage.plateau_min_evals,
        "batch": tcfg.batch_size,
        "lr": tcfg.lr,
        "tau_learnable": stage.train_temperature,
        "tau_start": tau_start,
        "tau_end": emb.temperature.value,
        "examples": len(examples),
        "examples_seen": res.step * tcfg.batch_size,
        "epochs_seen": res.step * tcfg.batch_size / max(1, len(examples)),
        "stopped_early": bool(fin.get("stopped_early")),
        "eval_every": cfg.eval.eval_every,
        "dev_avg_end": curve[-1]["dev_avg"] if curve else None,
        "shard": fin.get("shard"),  # how it was trained: {"mode": "fsdp", "processes": 2, ...}
    }
    atomic_write_json(
        sdir / "stage.json",
        {
            "stage": name,
            "hash": h,
            "init": str(init),
            "tau": emb.temperature.value,
            "recipe": dataclasses.asdict(stage),
            "n_examples": len(examples),
            "plan": plan,
            "dev_curve": curve,
        },
    )
    trainer.acc.wait_for_everyone()
    return final


def _plateau_stop(cfg: RunConfig, stage: StageConfig, eval_fn):
    """The early stop of a ``budget: plateau`` stage: the plateau rule on its dev curve, from
    :meth:`~umarvel_lib.config.StageConfig.plateau_min_steps` (``min_steps``, ``min_examples``)."""
    if stage.budget == "fixed":
        return None
    if stage.budget != "plateau":
        raise ValueError(
            f"stage {stage.name}: budget must be 'fixed' or 'plateau', got {stage.budget!r}"
        )
    if not cfg.eval.eval_every or eval_fn is None:
        raise ValueError(
            f"stage {stage.name}: budget 'plateau' needs a dev curve (set eval.eval_every)"
        )
    from ..eval.plateau import plateau_of_curve

    return lambda evals: (
        plateau_of_curve(
            [r for r in evals if "dev_avg" in r],
            min_steps=stage.plateau_min_steps(),
            min_evals=stage.plateau_min_evals,
        ).ok
    )


# ---- distillation ---------------------------------------------------------------------------
def distill_examples(
    cfg: RunConfig,
    stage: StageConfig,
    hn_model: Path,
    sdir: Path,
    data: MBEIR,
    emb: Embedder,
    *,
    backbone: Path,
    progress: bool = True,
):
    pairs = per_task_sample(
        mbeir_pairs(data, instructions=cfg.embedder.instructions, seed=cfg.seed),
        stage.sample_fraction,
        seed=42 + cfg.seed,
    )
    if stage.distill_mode == "continue_hard":
        hn_stage = dataclasses.replace(
            cfg.scaled_stage("hard_negatives"), lr=stage.lr, batch_size=stage.batch_size
        )
        return (
            with_hard_negatives(cfg, hn_stage, hn_model, sdir, data, pairs, progress=progress),
            contrastive_step(emb, hn_stage),
        )
    reranker_dir = train_reranker(cfg, hn_model, sdir.parent, backbone=backbone, progress=progress)
    return (
        teacher_lists(cfg, stage, hn_model, reranker_dir, data, pairs, sdir, progress=progress),
        distill_step(emb),
    )


def run_stages(
    cfg: RunConfig, backbone: Path, out_root: Path, *, eval_fn=None, progress: bool = True
) -> Path:
    """Chain ``cfg.stages``: each starts from the previous merged checkpoint. Returns the last one."""
    ckpt = Path(backbone)
    for name in cfg.stages:
        ckpt = run_stage(
            cfg, name, ckpt, out_root, backbone=Path(backbone), eval_fn=eval_fn, progress=progress
        )
    return ckpt
