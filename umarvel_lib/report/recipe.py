"""The recipe behind a table, shown in its notebook: what each row changes from the table's base (in
words, not dotted keys only), the stage plan (steps, batch, LR, tau per stage) and the artefacts of
the paper's mechanisms that the runs left behind (the hard-negative mining report, the reranker's
accuracy on held-out pairs, the distillation teacher's agreement with the labels)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..ablation import Ablation
from ..presets import stage_plan
from .tables import sidecars

STAGE_NAMES = {
    "nli": "NLI stage",
    "cc3m": "CC3M stage",
    "mbeir": "M-BEIR stage",
    "hard_negatives": "hard-negative stage",
    "distill": "distillation stage",
}
FIELD_NAMES = {
    "batch_size": "global batch",
    "lr": "LR",
    "train_temperature": "learnable tau",
    "temperature_init": "tau at start",
    "attention": "attention",
    "pooling": "pooling",
    "compression_prompt": "compression prompt",
    "instruction_mask": "instruction span masked",
    "instructions": "instructions",
    "negatives": "negatives",
    "filter_max_score": "filter: drop score >",
    "filter_relative_margin": "filter: drop score > (1 - margin) x positive",
    "distill_mode": "distillation",
    "full_finetune": "full fine-tuning (no LoRA)",
    "stages": "stages",
    "num_hard": "hard negatives per query",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith("overrides"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def readable_key(dotted: str) -> str:
    """``stage.mbeir.batch_size`` -> ``M-BEIR stage: global batch``; ``embedder.pooling`` -> ``pooling``."""
    parts = dotted.split(".")
    field = FIELD_NAMES.get(parts[-1], parts[-1].replace("_", " "))
    if parts[0] == "stage" and len(parts) == 3:
        return f"{STAGE_NAMES.get(parts[1], parts[1])}: {field}"
    if parts[0] in ("embedder", "stages") or len(parts) == 1:
        return field
    return f"{parts[0]}: {field}"


def readable_value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "off"
    if isinstance(v, (list, tuple)):
        return " -> ".join(STAGE_NAMES.get(str(x), str(x)).removesuffix(" stage") for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def recipe_frame(ablation: Ablation) -> pd.DataFrame:
    """One line per row (the table's base first): what the row sets, one column per setting in words."""
    recs = [
        {
            "row": "base (every row)",
            "source": "",
            **{readable_key(k): readable_value(v) for k, v in _flatten(ablation.base).items()},
        }
    ]
    for r in ablation.rows:
        src = "yours" if r.own else "diagnostic" if r.explain else "paper"
        recs.append(
            {
                "row": f"{r.id}: {r.label}",
                "source": src,
                **{readable_key(k): readable_value(v) for k, v in _flatten(r.overrides).items()},
            }
        )
    return pd.DataFrame.from_records(recs).fillna("").set_index("row")


def recorded_steps(sidecar: dict) -> dict[str, int]:
    """Optimizer steps per stage that a run recorded (its training-loss curve)."""
    out: dict[str, int] = {}
    for c in sidecar.get("curves") or []:
        if c.get("kind") == "train":
            out[c["stage"]] = max(out.get(c["stage"], 0), int(c.get("step", 0)))
    return out


def stage_plans(results, ablation: Ablation, preset: str) -> pd.DataFrame:
    """The stage plan of every row: recorded by the run (``row.json`` ``stage_plan``) when there is one,
    else :func:`~umarvel_lib.presets.stage_plan` of the row's config with the steps its curves recorded."""
    done = {}
    for s in sidecars(results, ablation.table):
        done.setdefault(str(s["row"]), s)
    recs = []
    for r in ablation.rows:
        side = done.get(r.id, {})
        plan = side.get("stage_plan") or stage_plan(
            ablation.run_config(r, preset, 0), recorded_steps(side)
        )
        recs += [{"row": r.id, **p} for p in plan]
    return pd.DataFrame.from_records(recs).set_index(["row", "stage"])


def mining_reports(results, table: int) -> pd.DataFrame:
    """The hard-negative mining report of each row's run (seed 0 first): candidates looked at, removed
    by each filter, survivors used, how queries were filled. Empty when no row mined."""
    recs, seen = [], set()
    for s in sidecars(results, table):
        if str(s["row"]) in seen:
            continue
        rep = s.get("mining")  # recorded in row.json (runs since the cpu rerun)
        f = (
            Path(s["checkpoint"]).parent / "hard_negatives.jsonl.report.json"
            if s.get("checkpoint")
            else None
        )
        if rep is None and f is not None and f.is_file():  # older runs: the stage cache
            rep = json.loads(f.read_text())
        if rep:
            seen.add(str(s["row"]))
            recs.append({"row": str(s["row"]), "seed": s["seed"], **rep})
    if not recs:
        return pd.DataFrame()
    df = pd.DataFrame.from_records(recs).set_index("row")
    keep = (
        [
            "seed",
            "num_queries",
            "top_m",
            "num_negatives",
            "max_score",
            "relative_margin",
            "retrieved",
        ]
        + [c for c in df.columns if c.startswith("removed_")]
        + [
            "survived",
            "used",
            "queries_full",
            "queries_short",
            "queries_empty",
            "filled_repeat_first",
            "filled_random_queries",
            "dropped_queries",
        ]
    )
    return df[[c for c in keep if c in df.columns]].T


#: What a run's ``row.json`` records about a mechanism it used (:mod:`umarvel_lib.train.mechanisms`),
#: with the columns shown (percent unless said otherwise).
MECHANISM_COLUMNS = {
    "reranker_accuracy": [
        "pairwise",
        "pointwise",
        "positives_yes",
        "negatives_no",
        "mean_p_yes_positive",
        "mean_p_yes_negative",
        "n_queries",
        "n_pairs",
        "negatives_per_query",
        "split",
    ],
    "teacher_agreement": [
        "top1_positive",
        "recall_top1_positive",
        "mass_on_positives",
        "list_has_positive",
        "tau",
        "n_queries",
    ],
}


def mechanism_artefacts(results, table: int, key: str) -> pd.DataFrame:
    """One line per (row, seed) whose run recorded ``key`` in its ``row.json``: ``reranker_accuracy``
    (the reranker's accuracy on held-out dev pairs: its P(Yes) of each query's positive above each
    mined negative's, ``pairwise``, and P(Yes) > 0.5 right, ``pointwise``) or ``teacher_agreement``
    (the fused teacher on the distillation sample: its top-1 is a labelled positive, the KL target's
    mass on labelled positives). Empty when no run of the table recorded it."""
    if key not in MECHANISM_COLUMNS:
        raise ValueError(f"unknown mechanism record {key!r}; valid: {sorted(MECHANISM_COLUMNS)}")
    recs = [
        {"row": str(s["row"]), "seed": int(s["seed"]), **s[key]}
        for s in sidecars(results, table)
        if isinstance(s.get(key), dict)
    ]
    if not recs:
        return pd.DataFrame()
    df = pd.DataFrame.from_records(recs).sort_values(["row", "seed"]).set_index(["row", "seed"])
    return df[[c for c in MECHANISM_COLUMNS[key] if c in df.columns]].round(3)
