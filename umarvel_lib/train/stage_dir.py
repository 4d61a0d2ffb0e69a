"""A stage directory (``<stages>/<name>-<hash>/``) as later code reads it: is its checkpoint complete,
its dev curve, and a run's stage plan and training curves gathered from its stages.

A stage (or the reranker) saves its merged checkpoint under ``<stage dir>/model`` with a marker file
written last (``embedder.json``, ``reranker.json``), its record in ``stage.json`` (recipe, plan, dev
curve); the trainer logs the loss in ``<stage dir>/train/metrics.jsonl`` and the dev evaluations in
``<stage dir>/train/eval.jsonl``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import RunConfig
from ..io import DamagedFileError, check_safetensors, read_json, read_jsonl

log = logging.getLogger(__name__)


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


def stage_path(cfg: RunConfig, stage_root: Path, name: str) -> Path:
    """The directory of stage ``name`` of this run under ``stage_root``: ``<name>-<hash up to it>``."""
    return Path(stage_root) / f"{name}-{cfg.hash(upto_stage=name)}"


def stage_records(cfg: RunConfig, stage_root: Path) -> tuple[list[dict], list[dict]]:
    """The stage plan (one record per stage: steps, batch, LR, tau, examples seen, ...) and the dev
    curve of every stage of this run, from the stages' records (``stage.json``); a stage trained
    before plans were recorded has none (left out)."""
    plan, dev = [], []
    for name in cfg.stages:
        sdir = stage_path(cfg, stage_root, name)
        f = sdir / "stage.json"
        rec = read_json(f) if f.is_file() else {}
        if "plan" in rec:
            plan.append(rec["plan"])
            batch = rec["plan"]["batch"]
            dev += [
                {"stage": name, "examples_seen": c["step"] * batch, **c} for c in dev_curve(sdir)
            ]
    return plan, dev


def collect_curves(cfg: RunConfig, stage_root: Path) -> list[dict]:
    """Training loss (and periodic evals) of every stage of this run, in stage order."""
    out = []
    for name in cfg.stages:
        sdir = stage_path(cfg, stage_root, name) / "train"
        for fname, kind in (("metrics.jsonl", "train"), ("eval.jsonl", "eval")):
            f = sdir / fname
            if f.is_file():
                for rec in read_jsonl(f):
                    out.append(
                        {
                            "stage": name,
                            "kind": kind,
                            **{k: v for k, v in rec.items() if isinstance(v, (int, float, str))},
                        }
                    )
    return out
