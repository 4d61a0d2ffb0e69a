"""What the table notebooks call: run a table's rows x seeds, then show it beside the paper.

Notebooks stay thin (a parameters cell, these calls, display). Parameters arrive from papermill as
simple scalars: ``seeds="0,1,2"``, ``rows=""`` (all) or ``"0,4"``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from .ablation import Ablation, load_ablation
from .io import atomic_write_text
from .report import figures, tables


def parse_list(s) -> list[str]:
    if s is None:
        return []
    if isinstance(s, (list, tuple)):
        return [str(x) for x in s]
    return [x.strip() for x in str(s).split(",") if x.strip()]


def results_dir(preset: str, results: str | None = None) -> Path:
    """``results`` or ``results/<preset>``; an unknown preset is refused (no ``results/nonsense``)."""
    from .presets import check_preset

    check_preset(preset)
    return Path(results) if results else Path("results") / preset


def run_table(
    ablation: str | Ablation,
    *,
    preset: str,
    seeds="0,1,2",
    rows="",
    results: str | None = None,
    backbone: str | None = None,
    data_root: str | None = None,
    train: bool = True,
    nli_path: str | None = None,
    cc3m_root: str | None = None,
) -> pd.DataFrame:
    """Train + evaluate every (row, seed) not yet done; one failed row does not stop the others.
    With ``train=False`` nothing is trained: the finished runs are only collected."""
    from tqdm.auto import tqdm

    from .experiment import run_row

    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    res = results_dir(preset, results)
    want = parse_list(rows)
    # the reader's own rows (extra_rows) always run, whatever ``rows`` selects of the paper's
    todo = (
        [
            (r, int(s))
            for r in ab.rows
            if not want or r.id in want or r.own
            for s in parse_list(seeds)
        ]
        if train
        else []
    )
    failures = []
    for r, s in tqdm(todo, desc=f"table {ab.table}", mininterval=10):
        try:
            run_row(
                ab,
                r,
                preset=preset,
                seed=s,
                results=res,
                backbone=backbone,
                data_root=data_root,
                progress=False,
                nli_path=nli_path,
                cc3m_root=cc3m_root,
            )
        except Exception as e:  # noqa: BLE001  (recorded in the run's FAILED.json; the other rows go on)
            failures.append(f"row {r.id} seed {s}: {type(e).__name__}: {e}")
            print(f"row {r.id} seed {s} FAILED: {type(e).__name__}: {e}")
    if (
        failures
    ):  # the notebook (and papermill, and `umarvel reproduce`) fails once every row was tried
        raise RowsFailedError(
            f"table {ab.table}: {len(failures)} of {len(todo)} runs failed (each run directory's "
            "FAILED.json has the traceback):\n" + "\n".join(failures)
        )
    return tables.runs_frame(res, ab.table)


class RowsFailedError(RuntimeError):
    """Some (row, seed) runs of a table failed; raised after every run was tried."""


def checks(ablation: str | Ablation, *, preset: str, results: str | None = None) -> pd.DataFrame:
    """The table's diagnostic paired comparisons (YAML ``checks``); see :func:`tables.checks`."""
    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    return tables.checks(results_dir(preset, results), ab)


def table(ablation: str, extra_rows=None) -> Ablation:
    """The table's ablation plus the reader's own rows (papermill parameter ``extra_rows``: YAML/JSON
    text, validated against the config schema; see :func:`umarvel_lib.ablation.parse_extra_rows`)."""
    return load_ablation(ablation).with_extra_rows(extra_rows)


def wrong_modality(
    ablation: str | Ablation, *, preset: str, results: str | None = None, k: int = 5
) -> pd.DataFrame:
    """The wrong-modality rate of each row's global top-k (with / without instructions); see
    :func:`tables.wrong_modality`."""
    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    return tables.wrong_modality(results_dir(preset, results), ab.table, k=k)


def table_outputs(
    ablation: str | Ablation, *, preset: str, results: str | None = None, n_boot: int = 1000
) -> dict:
    """Write ``table<N>.csv``, ``table<N>_findings.csv``, ``table<N>.png`` (each row's difference from the
    baseline row, paper and ours side by side) and ``table<N>_curves.png``; return frames and figures.

    With the reader's own rows (``Ablation.with_extra_rows``) the table and figure with them go to
    ``table<N>_yours.csv`` / ``.png`` (and are returned), while ``table<N>.*`` keep the paper's rows only
    (``REPORT.md`` shows those)."""
    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    res = results_dir(preset, results)
    res.mkdir(parents=True, exist_ok=True)
    vdf = tables.verdicts(res, ab, n_boot=n_boot)
    atomic_write_text(res / f"table{ab.table}_findings.csv", vdf.to_csv(index=False))
    paper_only = dataclasses.replace(ab, rows=[r for r in ab.rows if not r.own])
    out = {}
    for a, stem in ((paper_only, f"table{ab.table}"), (ab, f"table{ab.table}_yours")):
        if a is ab and len(a.rows) == len(paper_only.rows):
            break
        df = tables.table_vs_paper(res, a)
        diff = figures.differences(res, a, n_boot=n_boot)
        atomic_write_text(res / f"{stem}.csv", df.to_csv(index=False))
        fig = figures.plot_differences(
            diff,
            f"Table {a.table}: {a.title} ({preset})",
            f"{a.baseline.id}: {a.baseline.label}",
            _tmp_png(res / f"{stem}.png"),
        )
        _commit_png(res / f"{stem}.png")
        out.update(table=df, differences=diff, figure=fig)
    curves = figures.plot_curves(res, ab.table, _tmp_png(res / f"table{ab.table}_curves.png"))
    _commit_png(res / f"table{ab.table}_curves.png")
    per_task = tables.per_task_frame(res, ab.table, ab.pools[0])
    return {
        **out,
        "findings": vdf,
        "per_task": per_task,
        "curves": curves,
        "provenance": tables.provenance_note(ab.table),
    }


def recipe(ablation: str | Ablation, *, preset: str, results: str | None = None) -> dict:
    """What the rows change from the table's base (in words), each row's stage plan, the mining
    report where the rows mined hard negatives, the reranker's accuracy and the distillation teacher's
    agreement with the labels where rows used them (:mod:`umarvel_lib.report.recipe`)."""
    from .report import recipe as rc

    ab = load_ablation(ablation) if isinstance(ablation, str) else ablation
    res = results_dir(preset, results)
    return {
        "rows": rc.recipe_frame(ab),
        "stage_plan": rc.stage_plans(res, ab, preset),
        "mining": rc.mining_reports(res, ab.table),
        "reranker": rc.mechanism_artefacts(res, ab.table, "reranker_accuracy"),
        "teacher": rc.mechanism_artefacts(res, ab.table, "teacher_agreement"),
    }


def show(fig):
    """A figure as a PNG image to ``display`` (the library draws off-screen, so an executed notebook keeps
    the image itself, at the figures' moderate DPI)."""
    import io

    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=figures.DPI)
    return Image(data=buf.getvalue(), format="png")


def _tmp_png(path: Path) -> Path:
    """This process's temporary of a figure (two notebooks of one table may plot at once)."""
    from .io import tmp_prefix

    return path.with_name(tmp_prefix(path.name) + "fig.png")


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
    from .models.embedder import Embedder
    from .presets import apply_overrides, make_run_config
    from .run_inputs import backbone_path

    cfg = make_run_config(preset, {"backbone": checkpoint})
    apply_overrides(cfg.embedder, embedder_overrides)
    return Embedder.from_pretrained(backbone_path(cfg), cfg.embedder)


def quickstart(
    checkpoint: str | None = None,
    *,
    preset: str = "smoke",
    data_root: str | None = None,
    row: str = "mscoco_task3",
    n_candidates: int = 5,
    seed: int = 0,
) -> dict:
    """The model card's demo on real files: one query with its instruction, retrieved from the row's
    local pool.

    Returns the query, its rendered chat prompt and its tokens (instruction span, tokens that enter
    the pooled embedding), the top ``n_candidates`` retrieved candidates with cosine and cos/tau (and
    the rank of the first positive), and a figure with the query image and the ranked candidates.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from .data.items import candidate_item, query_items
    from .data.mbeir import MBEIR
    from .presets import make_run_config
    from .run_inputs import ensure_data

    cfg = make_run_config(preset, {"data_root": data_root})
    data = MBEIR(ensure_data(cfg), check_images=False)
    (r,) = data.rows([row])
    q = data.queries(r)[seed % len(data.queries(r))]
    pool = data.local_pool(r)
    emb = load_embedder(checkpoint, preset=preset)
    (qi,), (ins,) = query_items([q], data, instructions=emb.cfg.instructions, seed=seed)
    cands = [candidate_item(c, data) for c in pool]
    qv = emb.encode([qi], progress=False)
    cv = emb.encode(cands, progress=False, batch_size=cfg.eval.batch_size)
    cos = (qv @ cv.T)[0]
    order = np.argsort(-cos, kind="stable")
    dids = [c.did for c in pool]
    first_pos = next((i + 1 for i, j in enumerate(order) if dids[j] in q.pos), None)
    top = order[:n_candidates]
    sim = pd.DataFrame(
        {
            "rank": np.arange(1, len(top) + 1),
            "did": [dids[j] for j in top],
            "text": [cands[j].txt for j in top],
            "cosine": cos[top].round(4),
            "logit (cos/tau)": (cos[top] / emb.temperature.value).round(2),
            "positive": [dids[j] in q.pos for j in top],
        }
    )
    cands = [cands[j] for j in top]
    fig = _ranked_figure(qi, ins, cands, sim, plt, np)
    tokens = pd.DataFrame(emb.pooled_tokens(qi))
    return {
        "query": qi,
        "instruction": ins,
        "candidates": cands,
        "similarity": sim,
        "figure": fig,
        "embedding_dim": emb.dim,
        "tau": emb.temperature.value,
        "prompt": emb.render(qi),
        "tokens": tokens,
        "tokens_html": tokens_html(tokens),
        "instruction_mask": emb.cfg.instruction_mask,
        "pooling": emb.cfg.pooling,
        "first_positive_rank": first_pos,
        "pool_size": len(pool),
    }


def _ranked_figure(qi, ins, cands, sim, plt, np):
    """The query image and instruction, then the candidates in ranked order with their scores."""
    import textwrap

    fig, axes = plt.subplots(1, 1 + len(sim), figsize=(2.4 * (1 + len(sim)), 2.9), dpi=80)
    axes[0].imshow(np.asarray(qi.load_image()))
    axes[0].set_title(textwrap.fill("query: " + (ins or "(no instruction)"), 30), fontsize=7)
    for rank, (ax, r, c) in enumerate(zip(axes[1:], sim.itertuples(), cands), 1):
        if c.has_image:
            ax.imshow(np.asarray(c.load_image()))
        else:
            ax.text(
                0.5,
                0.5,
                textwrap.fill(c.txt or "", 24),
                ha="center",
                va="center",
                fontsize=7,
                wrap=True,
            )
        ax.set_title(
            f"#{rank}  cos {r.cosine:.3f}" + ("  (positive)" if r.positive else ""),
            fontsize=7,
            color="green" if r.positive else "black",
        )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def tokens_html(tokens: pd.DataFrame, *, collapse: int = 4) -> str:
    """The prompt's tokens as HTML: the instruction span struck through in red, the tokens that enter
    the pooled embedding on green; runs of one repeated token (the visual tokens) shown once with a count."""
    import html

    out, i, recs = [], 0, tokens.to_dict("records")
    while i < len(recs):
        j = i
        while j + 1 < len(recs) and recs[j + 1] == recs[i]:
            j += 1
        r, n = recs[i], j - i + 1
        text = html.escape(r["token"].replace("\u0120", " ").replace("\u010a", "\\n"))
        text = f"{text} x{n}" if n >= collapse else text * n if n > 1 else text
        style = ["padding:0 2px", "margin:1px", "border:1px solid #ccc", "display:inline-block"]
        if r["pooled"]:
            style.append("background:#c7e9c0")
        if r["instruction"]:
            style += ["color:#b2182b"] + ([] if r["pooled"] else ["text-decoration:line-through"])
        out.append(f'<span style="{";".join(style)}">{text}</span>')
        i = j + 1
    legend = (
        '<p style="font-size:90%">green: enters the pooled embedding; red: the instruction span '
        "(struck through when masked out of the pool)</p>"
    )
    return (
        legend
        + '<div style="font-family:monospace;font-size:85%;line-height:1.9">'
        + "".join(out)
        + "</div>"
    )


def evaluate_checkpoint(
    checkpoint: str,
    *,
    preset: str = "smoke",
    data_root: str | None = None,
    results: str | None = None,
    label: str = "released",
) -> pd.DataFrame:
    """Evaluate a local checkpoint as-is (e.g. a released U-MARVEL model) on local and global pools;
    trains nothing (:func:`~umarvel_lib.experiment.evaluate_checkpoint`)."""
    from .eval.runs import metrics_frame
    from .experiment import EVAL_INPUTS_DIR
    from .experiment import evaluate_checkpoint as _evaluate

    out = results_dir(preset, results) / "checkpoints" / label
    _evaluate(
        checkpoint,
        out,
        preset=preset,
        data_root=data_root,
        shared_dir=out.parent.parent / EVAL_INPUTS_DIR,
    )
    return metrics_frame(out)


def write_report(*, preset: str, results: str | None = None) -> Path:
    from .report.report import write_report as _write

    return _write(results_dir(preset, results), preset)
