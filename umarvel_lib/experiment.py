"""Run one row of an ablation table for one seed: backbone -> stages -> evaluation -> sidecar.

Every result lives in a run directory ``<results>/runs/table<N>/<row>/seed<k>/``::

    row.json            sidecar: table, row, seed, preset, config + hash, tau, git commit, versions, wall time
    eval/local/         run.trec, metrics.json, config.json, headline_hits.json, and references
                        (path + sha256) to the qrels.txt/queries.jsonl shared by every run on the
                        data build, under <results>/eval_inputs/   (eval.evaluate, eval.runs)
    eval/global/        the same for the global pool
    dev_curve.csv       the dev curve of every stage: step, examples seen, dev-split local Avg and its CI
                        (row.json also holds ``curves``, the training loss per step, ``stage_plan``, and
                        where the row used them ``reranker_accuracy`` and ``teacher_agreement``,
                        :mod:`umarvel_lib.train.mechanisms`)

A row whose ``row.json`` exists with the same config hash is skipped (rerunning a notebook is
cheap); stages shared by rows are trained once (checkpoints under ``<cache>/stages``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from .ablation import Ablation, AblationRow
from .config import RunConfig
from .data.check import validate_run
from .data.mbeir import MBEIR
from .io import (
    DamagedFileError,
    atomic_write_json,
    atomic_write_text,
    checkpoint_digest,
    file_lock,
    read_json,
)
from .provenance import git_commit, provenance, versions
from .run_inputs import backbone_path, data_digest, ensure_data
from .train.stage_dir import collect_curves, stage_records

log = logging.getLogger(__name__)


def read_sidecar(path: Path) -> dict | None:
    """A run's ``row.json``, or None when it is missing or damaged (a damaged one is logged with its path
    and counts as not finished: the row runs again and rewrites it)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except DamagedFileError as e:
        log.warning("%s; the run counts as not finished", e)
        return None


def curve_eval(cfg: RunConfig, root: Path):
    """Trainer eval callback, the dev curve: the local-pool Avg of the dev split (M-BEIR's ``val``; the
    first ``eval.dev_queries`` queries of each row, ``eval.curve_rows`` rows), with its 95% CI over the
    dev queries' hits. Never the test split, so the curve (and a plateau budget) can stop training
    without looking at the test queries."""
    import tempfile

    from .eval.evaluate import evaluate

    dev = MBEIR(root, check_images=False, split="val", max_queries=cfg.eval.dev_queries)
    if not dev.rows():
        raise FileNotFoundError(
            f"{root}: no dev split (query/val/*.jsonl) for the dev curve; rebuild the synthetic "
            f"data with n_dev > 0, or set eval.eval_every to null"
        )
    dev_cfg = dataclasses.replace(cfg.eval, pools=("local",), rows=cfg.eval.curve_rows, n_boot=1000)

    def fn(model, step):
        with tempfile.TemporaryDirectory(prefix="umarvel-dev-") as tmp:
            res = evaluate(model, dev, tmp, dev_cfg)
        avg = res["local"]["avg"]
        return {
            "dev_avg": avg["headline"],
            "dev_ci_lo": avg["ci95"][0],
            "dev_ci_hi": avg["ci95"][1],
            "dev_queries": res["local"]["n_queries"],
        }

    return fn


#: ``<results>/eval_inputs/``: the one copy of each data build's qrels/queries that run directories reference.
EVAL_INPUTS_DIR = "eval_inputs"


def pin_inputs(cfg: RunConfig, *, progress: bool = True) -> tuple[Path, Path]:
    """The backbone and the data root a run reads, their digests recorded in ``cfg`` (part of its
    hash): a different build of the backbone is a different run, and so are other data bytes (a fixed
    qrels file, a replaced image)."""
    base = backbone_path(cfg, progress=progress)
    cfg.backbone_digest = checkpoint_digest(base)
    root = ensure_data(cfg)
    cfg.data_digest = data_digest(cfg, root)
    return base, root


def run_dir_for(results: Path, table: int, row_id, seed: int) -> Path:
    """``<results>/runs/table<N>/<row id>/seed<S>``: one (row, seed) run directory (its ``row.json``)."""
    return Path(results) / "runs" / f"table{table}" / str(row_id) / f"seed{seed}"


FAILED_FILE = "FAILED.json"


def run_row(
    ablation: Ablation,
    row: AblationRow | str,
    *,
    preset: str,
    seed: int,
    results: str | Path,
    backbone: str | None = None,
    data_root: str | None = None,
    progress: bool = True,
    nli_path: str | None = None,
    cc3m_root: str | None = None,
) -> dict:
    """Train and evaluate one (row, seed); returns the sidecar. Skips when done with the same config.

    Before anything trains, every file the run reads is validated (:func:`~umarvel_lib.data.check.validate_run`).

    A failure is recorded in the run directory's ``FAILED.json`` (the whole error and its traceback; the
    report lists it first) and raised again; a finished ``row.json`` of an earlier run is left as it
    was. The next success removes ``FAILED.json``."""
    import traceback

    row = ablation.row(row) if isinstance(row, str) else row
    rdir = run_dir_for(results, ablation.table, row.id, seed)
    fail = rdir / FAILED_FILE
    try:
        # one process per (row, seed) at a time (two notebooks, `reproduce --jobs` beside a notebook): the
        # second waits, then finds the run finished and skips it
        with file_lock(rdir.parent / f".{rdir.name}.lock"):
            side = _run_row(
                ablation,
                row,
                preset=preset,
                seed=seed,
                results=results,
                backbone=backbone,
                data_root=data_root,
                progress=progress,
                nli_path=nli_path,
                cc3m_root=cc3m_root,
            )
    except Exception as e:
        atomic_write_json(
            fail,
            {
                "table": ablation.table,
                "row": row.id,
                "seed": seed,
                "preset": preset,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
                "failed_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        raise
    fail.unlink(missing_ok=True)
    return side


def _run_row(
    ablation: Ablation,
    row: AblationRow,
    *,
    preset: str,
    seed: int,
    results: str | Path,
    backbone: str | None,
    data_root: str | None,
    progress: bool,
    nli_path: str | None,
    cc3m_root: str | None,
) -> dict:
    import torch

    from .eval.evaluate import evaluate
    from .models.embedder import Embedder
    from .train.engine import NonFiniteLossError
    from .train.stages import run_stages

    cfg = ablation.run_config(
        row,
        preset,
        seed,
        backbone=backbone,
        data_root=data_root,
        nli_path=nli_path,
        cc3m_root=cc3m_root,
    )
    base, root = pin_inputs(cfg, progress=progress)
    h = cfg.hash(reranker=row.reranker)
    rdir = run_dir_for(results, ablation.table, row.id, seed)
    side = rdir / "row.json"
    old = read_sidecar(side)
    if old is not None:
        if (
            old.get("hash") == h
            and old.get("status") in ("ok", "diverged")
            and _metrics_readable(rdir, old)
        ):
            log.info(
                "table %s row %s seed %s: done (hash %s), skipped", ablation.table, row.id, seed, h
            )
            return old
    validate_run(cfg)  # a data error now, not after hours of training
    threads = int(os.environ.get("UMARVEL_THREADS", cfg.threads or 0))  # env wins: shared machines
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    data = MBEIR(root, check_images=False)
    sidecar = {
        "table": ablation.table,
        "ablation": ablation.name,
        "row": row.id,
        "label": row.label,
        "seed": seed,
        "preset": preset,
        "hash": h,
        "config": dataclasses.asdict(cfg),
        "backbone": str(base),
        "data_root": str(root),
        **provenance(),
        "reranker": row.reranker,
    }
    stage_root = Path(cfg.cache_dir) / "stages"
    try:
        ckpt = run_stages(
            cfg,
            base,
            stage_root,
            progress=progress,
            eval_fn=curve_eval(cfg, root) if cfg.eval.eval_every else None,
        )
    except NonFiniteLossError as e:
        sidecar.update(status="diverged", error=str(e), wall_s=round(time.time() - t0, 1))
        atomic_write_json(side, sidecar)
        return sidecar
    rr_dir = None
    if row.reranker:
        from .train.teacher import train_reranker

        rr_dir = train_reranker(cfg, ckpt, stage_root, backbone=base, progress=progress)
    emb = Embedder.from_pretrained(ckpt, cfg.embedder)
    distill = cfg.scaled_stage(
        "distill"
    )  # the reranked row fuses with the distillation teacher's weights
    evaluate(
        emb,
        data,
        rdir / "eval",
        cfg.eval,
        cache_dir=Path(cfg.cache_dir) / "embeddings",
        shared_dir=Path(results) / EVAL_INPUTS_DIR,
        reranker=rr_dir,
        fusion_weights=distill.teacher_weight_overrides,
        fusion_default=distill.teacher_weight,
        progress=progress,
    )
    from .eval.plateau import DEV_CURVE_COLUMNS, DEV_CURVE_FILE
    from .train.mechanisms import mechanism_records

    plan, dev = stage_records(cfg, stage_root)
    if dev:
        atomic_write_text(rdir / DEV_CURVE_FILE, _csv(dev, DEV_CURVE_COLUMNS))
    sidecar.update(
        status="ok",
        checkpoint=str(ckpt),
        tau=emb.temperature.value,
        wall_s=round(time.time() - t0, 1),
        image_pixels=_pixels(emb),
        curves=collect_curves(cfg, stage_root),
        stage_plan=plan,
        # the reranker's dev accuracy and the distillation teacher's agreement, where the row used them
        **mechanism_records(cfg, stage_root, reranker=row.reranker, progress=progress),
    )
    atomic_write_json(side, sidecar)
    return sidecar


def evaluate_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    preset: str = "smoke",
    data_root: str | None = None,
    rows: list[str] | None = None,
    pools: tuple[str, ...] = ("local", "global"),
    embedder_overrides: dict | None = None,
    shared_dir: str | Path | None = None,
) -> dict:
    """Evaluate a local checkpoint as it is (a released U-MARVEL model, or one this kit trained): no
    stage runs, nothing is trained. The data is validated first (no training stages: only the test
    rows, pools, qrels and instructions). A checkpoint saved by this kit keeps its own embedder
    settings; any other uses the preset's (``embedder_overrides`` on top). Returns :func:`evaluate`'s
    metrics; writes ``<out_dir>/{local,global}/`` and ``<out_dir>/checkpoint.json``. ``shared_dir``: where the
    qrels/queries shared by the runs of a results tree go (``inputs.ref.json``); None: in the run directories."""
    from .eval.evaluate import evaluate
    from .models.embedder import EMBEDDER_JSON, Embedder, EmbedderConfig
    from .models.loading import resolve_local_checkpoint
    from .presets import apply_overrides, make_run_config

    ckpt = resolve_local_checkpoint(checkpoint)
    cfg = make_run_config(
        preset,
        {
            "data_root": data_root,
            "stages": [],
            "eval.pools": list(pools),
            "eval.rows": tuple(rows) if rows else None,
        },
    )
    if (ckpt / EMBEDDER_JSON).is_file():
        cfg.embedder = EmbedderConfig.from_dict(read_json(ckpt / EMBEDDER_JSON)["config"])
    apply_overrides(cfg.embedder, embedder_overrides)
    root = ensure_data(cfg)
    validate_run(cfg)
    emb = Embedder.from_pretrained(ckpt, cfg.embedder)
    out_dir = Path(out_dir)
    # cfg.eval: the preset's evaluation settings (dedup_global, ks, ...) with these pools and rows; the
    # instructions are the embedder's own (cfg.eval.instructions None)
    res = evaluate(
        emb,
        MBEIR(root, check_images=False),
        out_dir,
        cfg.eval,
        cache_dir=Path(cfg.cache_dir) / "embeddings",
        shared_dir=shared_dir,
    )
    atomic_write_json(
        out_dir / "checkpoint.json",
        {
            "checkpoint": str(ckpt),
            "preset": preset,
            "data_root": str(root),
            "embedder": dataclasses.asdict(cfg.embedder),
            "image_pixels": _pixels(emb),
            "git": git_commit(),
            "versions": versions(),
        },
    )
    return res


def _pixels(emb) -> dict | None:
    """The image budget the embedder used (the config's None resolved to the paper's value for its kind)."""
    return dict(zip(("min_pixels", "max_pixels"), emb.pixel_limits)) if emb.pixel_limits else None


def _metrics_readable(rdir: Path, side: dict) -> bool:
    """A finished run's ``metrics.json`` files parse (a damaged one: the run counts as not finished)."""
    if side.get("status") != "ok":
        return True
    for f in sorted((rdir / "eval").glob("*/metrics.json")):
        try:
            read_json(f)
        except DamagedFileError as e:
            log.warning("%s; the run counts as not finished", e)
            return False
    return True


def _csv(records: list[dict], columns) -> str:
    import io

    import pandas as pd

    buf = io.StringIO()
    pd.DataFrame.from_records(records, columns=list(columns)).to_csv(buf, index=False)
    return buf.getvalue()
