"""Progressive training stages, chained exactly (docs/recipe.md "Stages"; docs/paper_vs_code.md checklist 5-13).

    nli  ->  cc3m  ->  mbeir  ->  hard_negatives  ->  distill

Each stage starts from the previous stage's merged checkpoint (never from the raw backbone, which
is the released stage-3 script's bug), adds a fresh LoRA with the stage's r/alpha/LR, trains with
InfoNCE (GradCache over the global batch) or the distillation KL, merges, and saves a checkpoint
keyed by the hash of everything that determines it (:meth:`RunConfig.hash` ``upto_stage``), so
rows of an ablation that share a prefix of stages share its checkpoints, and a finished stage is
never re-run. Which stages run is ``RunConfig.stages``.

Data per stage (all read from the data root; the same readers serve the real corpora):

* ``nli``: ``nli/nli_for_simcse.csv`` sent0 -> sent1 (the ``hard_neg`` column is unused, as released)
* ``cc3m``: ``cc3m/chat.json`` caption -> image, symmetric loss (summed)
* ``mbeir``: ``query/union_train/mbeir_union_up_train.jsonl`` with a random positive and an
  instruction per query; candidates from ``cand_pool/global/mbeir_union_train_cand_pool.jsonl``
* ``hard_negatives``: the same queries + K negatives mined with the stage-3 model
  (:func:`~umarvel_lib.train.mining.mine_hard_negatives`, filters from the config)
* ``distill``: a per-task sample of the training queries; teacher = (cos + w P(Yes)) / 2 over the
  hard-negative model's top-k, from a pointwise reranker trained on positives + mined negatives;
  or ``continue_hard``: the same sample trained with hard negatives (the paper's control).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, StageConfig
from ..data.corpora import read_cc3m, read_nli
from ..data.items import Item, candidate_item, query_item
from ..data.mbeir import MBEIR, TASKS, row_of_query
from ..io import (
    DamagedFileError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_safetensors,
    config_hash,
    file_lock,
    read_json,
    read_jsonl,
)
from ..models.embedder import Embedder
from ..models.reranker import Reranker, fused_teacher, fusion_weights
from .engine import TrainConfig, Trainer
from .gradcache import grad_cache_step, loss_in_full_precision
from .losses import distill_kl, gather_with_grad, info_nce
from .mining import exact_topk, load_negatives, mine_hard_negatives, save_negatives

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
    sdir = out_root / f"{name}-{h}"
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
        "min_steps": stage.min_steps,
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


def checkpoint_complete(final: Path, marker: str) -> bool:
    """A finished stage (or reranker) checkpoint: ``marker`` written last, and whole weight files. A damaged
    one (a weight file cut short) is logged with its path and counts as not finished: it is trained
    again and replaced as a whole."""
    if not (final / marker).is_file():
        return False
    try:
        for f in sorted(final.glob("*.safetensors")):
            check_safetensors(f)
        read_json(final / marker)
    except DamagedFileError as e:
        log.warning("%s; %s is trained again", e, final)
        return False
    return True


def dev_curve(sdir: Path) -> list[dict]:
    """A stage's dev curve: ``{"step", "dev_avg", "dev_ci_lo", "dev_ci_hi", ...}`` from its ``train/eval.jsonl``."""
    f = Path(sdir) / "train" / "eval.jsonl"
    if not f.is_file():
        return []
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return [r for r in recs if "dev_avg" in r]


def _plateau_stop(cfg: RunConfig, stage: StageConfig, eval_fn):
    """The early stop of a ``budget: plateau`` stage: the plateau rule on its dev curve, from ``min_steps``."""
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
        plateau_of_curve([r for r in evals if "dev_avg" in r], min_steps=stage.min_steps).ok
    )


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


# ---- reranker and distillation ----------------------------------------------------------------
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
