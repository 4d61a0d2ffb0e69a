"""What a run would cost: tokens per stage and a GPU-hour estimate, printed before a ``paper``-preset run."""

from __future__ import annotations

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
