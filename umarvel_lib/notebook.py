"""What the table notebooks call: run a table's rows x seeds, then show it beside the paper.

Notebooks stay thin (a parameters cell, these calls, display). Parameters arrive from papermill as
simple scalars: ``seeds="0,1,2"``, ``rows=""`` (all) or ``"0,4"``.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .config import Ablation, load_ablation
from .io import atomic_write_json, atomic_write_text
from .report import tables


def parse_list(s) -> list[str]:
    if s is None:
        return []
    if isinstance(s, (list, tuple)):
        return [str(x) for x in s]
    return [x.strip() for x in str(s).split(",") if x.strip()]


def results_dir(preset: str, results: str | None = None) -> Path:
    return Path(results) if results else Path("results") / preset


def run_table(ablation: str | Ablation, *, preset: str, seeds="0,1,2", rows="", results: str | None = None,
              backbone: str | None = None, data_root: str | None = None, train: bool = True) -> pd.DataFrame:
    """Train + evaluate every (row, seed) not yet done; one failed row does not stop the others.
    With ``train=False`` nothing is trained: the finished runs are only collected."""
    from tqdm.auto import tqdm

    from .experiment import run_row

    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    res = results_dir(preset, results)
    want = parse_list(rows)
    todo = [(r, int(s)) for r in ab.rows if not want or r.id in want for s in parse_list(seeds)] if train else []
    failures = []
    for r, s in tqdm(todo, desc=f"table {ab.table}", mininterval=10):
        try:
            run_row(ab, r, preset=preset, seed=s, results=res, backbone=backbone, data_root=data_root, progress=False)
        except Exception as e:  # noqa: BLE001  (recorded; the batch goes on)
            failures.append({"row": r.id, "seed": s, "error": f"{type(e).__name__}: {e}"})
            print(f"row {r.id} seed {s} FAILED: {type(e).__name__}: {e}")
    if failures:
        atomic_write_json(res / f"table{ab.table}_failures.json", failures)
    return tables.runs_frame(res, ab.table)


def checks(ablation: str | Ablation, *, preset: str, results: str | None = None) -> pd.DataFrame:
    """The table's diagnostic paired comparisons (YAML ``checks``); see :func:`tables.checks`."""
    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    return tables.checks(results_dir(preset, results), ab)


def wrong_modality(ablation: str | Ablation, *, preset: str, results: str | None = None, k: int = 5) -> pd.DataFrame:
    """The wrong-modality rate of each row's global top-k (with / without instructions); see
    :func:`tables.wrong_modality`."""
    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    return tables.wrong_modality(results_dir(preset, results), ab.table, k=k)


def table_outputs(ablation: str | Ablation, *, preset: str, results: str | None = None, n_boot: int = 1000) -> dict:
    """Write ``table<N>.csv``, ``table<N>_findings.csv``, ``table<N>.png``, ``table<N>_curves.png``; return frames."""
    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    res = results_dir(preset, results)
    res.mkdir(parents=True, exist_ok=True)
    df = tables.table_vs_paper(res, ab)
    vdf = tables.verdicts(res, ab, n_boot=n_boot)
    atomic_write_text(res / f"table{ab.table}.csv", df.to_csv(index=False))
    atomic_write_text(res / f"table{ab.table}_findings.csv", vdf.to_csv(index=False))
    fig = tables.plot_table(df, f"Table {ab.table}: {ab.title} ({preset})", _tmp_png(res / f"table{ab.table}.png"))
    _commit_png(res / f"table{ab.table}.png")
    curves = tables.plot_curves(res, ab.table, _tmp_png(res / f"table{ab.table}_curves.png"))
    _commit_png(res / f"table{ab.table}_curves.png")
    per_task = tables.per_task_frame(res, ab.table, ab.pools[0])
    return {"table": df, "findings": vdf, "per_task": per_task, "figure": fig, "curves": curves,
            "provenance": tables.provenance_note(ab.table)}


def _tmp_png(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.png")


def _commit_png(path: Path) -> None:
    tmp = _tmp_png(path)
    if tmp.is_file():
        tmp.replace(path)


def timed(fn, *a, **kw):
    t = time.time()
    out = fn(*a, **kw)
    return out, time.time() - t


def load_embedder(checkpoint: str | None = None, *, preset: str = "smoke", **embedder_overrides):
    """An :class:`~umarvel_lib.models.embedder.Embedder` on a local checkpoint (a released U-MARVEL or
    Qwen2-VL directory), or on the preset's micro backbone when ``checkpoint`` is None."""
    from .config import apply_overrides, make_run_config
    from .experiment import backbone_path
    from .models.embedder import Embedder

    cfg = make_run_config(preset, {"backbone": checkpoint})
    apply_overrides(cfg.embedder, embedder_overrides)
    return Embedder.from_pretrained(backbone_path(cfg), cfg.embedder)


def quickstart(checkpoint: str | None = None, *, preset: str = "smoke", data_root: str | None = None,
               row: str = "mscoco_task3", n_candidates: int = 4, seed: int = 0) -> dict:
    """The model card's demo on real files: an image query with its instruction vs a few text candidates.

    Returns the query, the candidates, the similarity matrix (cosine and cos/tau) and a figure with
    the query image and the candidates ranked.
    """
    import random

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from .config import make_run_config
    from .data.items import candidate_item, query_items
    from .data.mbeir import MBEIR
    from .experiment import ensure_data

    cfg = make_run_config(preset, {"data_root": data_root})
    data = MBEIR(ensure_data(cfg), check_images=False)
    (r,) = data.rows([row])
    q = data.queries(r)[seed % len(data.queries(r))]
    pool = {c.did: c for c in data.local_pool(r)}
    rng = random.Random(seed)
    others = rng.sample([d for d in pool if d not in q.pos], n_candidates - 1)
    dids = [q.pos[0]] + others
    rng.shuffle(dids)
    emb = load_embedder(checkpoint, preset=preset)
    (qi,), (ins,) = query_items([q], data, instructions=emb.cfg.instructions, seed=seed)
    cands = [candidate_item(pool[d], data) for d in dids]
    qv = emb.encode([qi], progress=False)
    cv = emb.encode(cands, progress=False)
    cos = (qv @ cv.T)[0]
    sim = pd.DataFrame({"did": dids, "text": [c.txt for c in cands], "cosine": cos.round(4),
                        "logit (cos/tau)": (cos / emb.temperature.value).round(2),
                        "positive": [d in q.pos for d in dids]}).sort_values("cosine", ascending=False)
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(np.asarray(qi.load_image()))
    ax.set_title(ins or "(no instruction)", fontsize=7, wrap=True)
    ax.axis("off")
    return {"query": qi, "instruction": ins, "candidates": cands, "similarity": sim, "figure": fig,
            "embedding_dim": emb.dim, "tau": emb.temperature.value}


def evaluate_checkpoint(checkpoint: str, *, preset: str = "smoke", data_root: str | None = None,
                        results: str | None = None, label: str = "released") -> pd.DataFrame:
    """Evaluate a local checkpoint as-is (e.g. a released U-MARVEL model) on local and global pools."""
    from .config import make_run_config
    from .eval.evaluate import evaluate
    from .eval.runs import metrics_frame
    from .experiment import ensure_data
    from .data.mbeir import MBEIR

    cfg = make_run_config(preset, {"backbone": checkpoint, "data_root": data_root})
    emb = load_embedder(checkpoint, preset=preset)
    out = results_dir(preset, results) / "checkpoints" / label
    evaluate(emb, MBEIR(ensure_data(cfg), check_images=False), out, pools=("local", "global"),
             instructions=emb.cfg.instructions, instruction_seed=cfg.eval.instruction_seed,
             batch_size=cfg.eval.batch_size, cache_dir=Path(cfg.cache_dir) / "embeddings")
    return metrics_frame(out)


def write_report(*, preset: str, results: str | None = None) -> Path:
    from .report.report import write_report as _write

    return _write(results_dir(preset, results), preset)
