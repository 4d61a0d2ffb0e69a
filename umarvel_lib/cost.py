"""What a run would cost, printed before it starts: tokens per stage and a GPU-hour estimate of one
``paper``-preset run (:func:`estimate_cost`); the time of a whole reproduction on this device, from
speeds measured on it (:func:`estimate_reproduction`, printed before a ``gpu``-preset reproduction)."""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .data.check import validate_run
from .data.mbeir import MBEIR
from .run_inputs import backbone_path, ensure_data


def estimate_cost(
    cfg: RunConfig,
    *,
    n_params: float | None = None,
    sample: int = 200,
    gpu_flops: float = 989e12,
    mfu: float = 0.35,
) -> pandas.DataFrame:  # noqa: F821
    """Tokens per stage and a GPU-hour estimate, printed before a ``paper``-preset run starts.

    Tokens are measured on a sample of each stage's examples with the run's own tokenizer (images
    counted as their visual tokens); FLOPs = 6 x params x tokens x (2 for GradCache's re-forward);
    GPU-hours at ``mfu`` of an H100's dense bf16 peak. An estimate to stop accidents, not a budget.
    """
    import random as _random

    import pandas as pd

    from .models.embedder import Embedder
    from .train.stage_data import cc3m_pairs, mbeir_pairs, nli_pairs

    root = ensure_data(cfg)
    validate_run(
        cfg, open_images=False
    )  # records, ids and corpora; images are opened by the run itself
    data = MBEIR(root, check_images=False)
    emb = Embedder.from_pretrained(backbone_path(cfg), cfg.embedder)
    n_params = n_params or sum(p.numel() for p in emb.model.parameters())
    loaders = {
        "nli": lambda: nli_pairs(cfg.corpus_paths()["nli"]),
        "cc3m": lambda: cc3m_pairs(cfg.corpus_paths()["cc3m"]),
        "mbeir": lambda: mbeir_pairs(data, instructions=cfg.embedder.instructions, seed=0),
    }
    recs = []
    for name in cfg.stages:
        st = cfg.scaled_stage(name)
        pairs = loaders.get(name, loaders["mbeir"])()
        if name == "distill":
            pairs = pairs[: max(1, int(len(pairs) * st.sample_fraction))]
        rng = _random.Random(0)
        smp = rng.sample(pairs, min(sample, len(pairs)))
        per_example = float(
            emb.lengths([p.query for p in smp]).mean()
            + emb.lengths([p.positive for p in smp]).mean()
        )
        if name == "hard_negatives":
            per_example *= 1 + st.num_hard / 2  # K negatives ~ candidate length
        if name == "distill":
            per_example = float(
                emb.lengths([p.query for p in smp]).mean()
                + st.teacher_top_k * emb.lengths([p.positive for p in smp]).mean()
            )
        epochs = (
            st.epochs if not st.max_steps else st.max_steps * st.batch_size / max(1, len(pairs))
        )
        tokens = per_example * len(pairs) * epochs
        flops = 6 * n_params * tokens * 2
        recs.append(
            {
                "stage": name,
                "examples": len(pairs),
                "epochs": round(epochs, 3),
                "global_batch": st.batch_size,
                "tokens_per_example": round(per_example, 1),
                "tokens": int(tokens),
                "gpu_hours": round(flops / (gpu_flops * mfu) / 3600, 2),
            }
        )
    return pd.DataFrame.from_records(recs)


# ---- a whole reproduction: its time on this device, measured before it starts ------------------------
def measure_speed(cfg: RunConfig, *, steps: int = 3, encode_items: int = 64) -> dict:
    """Seconds per item on this device, measured with the run's own model and data: ``train`` (forward
    + backward of one M-BEIR training chunk, LoRA as the stage trains it, after one warm-up chunk) and
    ``encode`` (evaluation encoding of global-pool candidates, no grad)."""
    import random as _random
    import time

    import torch

    from .data.items import candidate_item
    from .train.losses import info_nce
    from .train.stage_data import mbeir_pairs
    from .train.stages import _embedder_for

    data = MBEIR(ensure_data(cfg), check_images=False)
    stage = cfg.scaled_stage("mbeir")
    emb = _embedder_for(cfg, stage, backbone_path(cfg), seed=0)
    pairs = mbeir_pairs(data, instructions=cfg.embedder.instructions, seed=0)
    _random.Random(0).shuffle(pairs)
    n = max(1, min(stage.chunk_size, stage.batch_size, len(pairs)))
    emb.train()

    def chunk(i):
        b = pairs[(i * n) % len(pairs) :][:n]
        q, c = emb(emb.collate([p.query for p in b])), emb(emb.collate([p.positive for p in b]))
        info_nce(q, c, emb.temperature.tau).backward()
        emb.zero_grad(set_to_none=True)

    chunk(0)
    sync = torch.cuda.synchronize if emb.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for i in range(1, steps + 1):
        chunk(i)
    sync()
    train = (time.perf_counter() - t) / (steps * 2 * n)
    pool = [candidate_item(c, data) for c in data.global_pool()[:encode_items]]
    emb.encode(pool[: min(8, len(pool))], progress=False)
    t = time.perf_counter()
    emb.encode(pool, batch_size=cfg.eval.batch_size, progress=False)
    sync()
    return {"train": train, "encode": (time.perf_counter() - t) / max(1, len(pool))}


def _eval_items(cfg: RunConfig) -> dict:
    """Items one evaluation encodes: ``dev`` (the dev curve: dev queries + their rows' local pools),
    ``final`` (the test queries + each pool the run evaluates), ``mine`` (train queries + train pool);
    and ``train_queries`` (what an epoch of the M-BEIR stage sees)."""
    test = MBEIR(ensure_data(cfg), check_images=False)
    dev = MBEIR(test.root, check_images=False, split="val", max_queries=cfg.eval.dev_queries)
    curve_rows = dev.rows(cfg.eval.curve_rows)
    n_dev = sum(len(dev.queries(r)) + len(dev.local_pool(r)) for r in curve_rows)
    queries = sum(len(test.queries(r)) for r in test.rows())
    final = 0
    if "local" in cfg.eval.pools:
        final += queries + sum(len(test.local_pool(r)) for r in test.rows())
    if "global" in cfg.eval.pools:
        final += queries + len(test.global_pool())
    return {
        "dev": n_dev,
        "final": final,
        "mine": len(test.union_train()) + len(test.train_pool()),
        "train_queries": len(test.union_train()),
    }


def _stage_steps(st, n_examples: int) -> tuple[int, int]:
    """(fewest, most) optimizer steps of a stage: a plateau budget stops between its minimum and its cap."""
    full = (
        st.max_steps
        if st.max_steps
        else max(1, -(-int(n_examples * st.epochs) // max(1, st.batch_size)))
    )
    return (min(st.plateau_min_steps(), full), full) if st.budget == "plateau" else (full, full)


def estimate_reproduction(
    runs: list[tuple[RunConfig, bool]], *, workers: int = 1, speed: dict | None = None
) -> pandas.DataFrame:  # noqa: F821
    """What a reproduction costs on this device, before it starts: ``runs`` holds one (config, uses the
    reranker) per (row, seed).

    Each stage is counted once however many rows share it (the stage cache does the same), as its
    training items (global batch x (2 + hard negatives, or 1 + teacher list for distillation)) and its
    dev-curve evaluations, between the fewest and the most optimizer steps its budget allows; each run
    adds its final evaluation, a hard-negative stage its mining, a reranked run its reranker steps.
    Seconds per item come from :func:`measure_speed` on this device (``speed`` to pass them in).
    GradCache's second forward (batches over one chunk) adds a third to a step; ``workers`` processes
    share the total. An estimate to plan a night or a GPU-hour by, not a promise: a plateau stage may
    stop anywhere between the two columns.
    """
    import pandas as pd

    from .train.stage_dir import stage_path

    if not runs:
        return pd.DataFrame(columns=["what", "count", "low_h", "high_h"])
    cfg0 = runs[0][0]
    speed = speed or measure_speed(cfg0)
    items = _eval_items(cfg0)
    recs, seen = [], set()
    for cfg, reranker in runs:
        for name in cfg.stages:
            key = stage_path(cfg, Path("."), name).name
            if key in seen:
                continue
            seen.add(key)
            st = cfg.scaled_stage(name)
            lo, hi = _stage_steps(st, items["train_queries"])
            per_step = st.batch_size * (
                1 + st.teacher_top_k
                if name == "distill"
                else 2 + (st.num_hard if st.negatives != "in_batch" else 0)
            )
            gc = 4 / 3 if st.batch_size > st.chunk_size else 1.0
            evals = [(s // cfg.eval.eval_every + 1) if cfg.eval.eval_every else 0 for s in (lo, hi)]
            cost = [
                s * per_step * gc * speed["train"] + e * items["dev"] * speed["encode"]
                for s, e in zip((lo, hi), evals)
            ]
            if name == "hard_negatives":
                cost = [c + items["mine"] * speed["encode"] for c in cost]
            recs.append({"what": f"stage {name}", "low_s": cost[0], "high_s": cost[1]})
        final = items["final"] * speed["encode"]
        if reranker:  # its steps (query, candidate) pairs; a shared reranker is counted per run
            rr = cfg.reranker_recipe()
            final += (rr["max_steps"] or 0) * rr["batch_size"] * 2 * speed["train"]
        recs.append({"what": "final evaluation", "low_s": final, "high_s": final})
    df = pd.DataFrame.from_records(recs)
    out = df.groupby("what", sort=False).agg(
        count=("low_s", "size"), low_s=("low_s", "sum"), high_s=("high_s", "sum")
    )
    out = out.reset_index()
    out["low_h"] = out.low_s / 3600 / max(1, workers)
    out["high_h"] = out.high_s / 3600 / max(1, workers)
    return out[["what", "count", "low_h", "high_h"]]
