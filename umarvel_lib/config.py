"""One config system: dataclasses, scale presets, and YAML rows as dotted overrides.

A run is a :class:`RunConfig`: which backbone, which data, how the embedder computes an embedding
(:class:`~umarvel_lib.models.embedder.EmbedderConfig`), which training stages run with which recipe
(:class:`StageConfig`, the paper's values in :data:`PAPER_STAGES`, FACTS.md §4), and how it is
evaluated (:class:`EvalConfig`).

``make_run_config(preset, overrides)`` starts from the paper recipe, applies the preset's scaling
(batch, steps, LR multipliers for the micro model) and then the overrides of an ablation row, e.g.
``{"embedder.attention": "causal", "stage.mbeir.lr": 1e-4, "stages": ["mbeir"]}``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig
from .io import config_hash
from .models.embedder import EmbedderConfig

STAGE_ORDER = ("nli", "cc3m", "mbeir", "hard_negatives", "distill")


@dataclass
class StageConfig:
    """One training stage. ``batch_size`` is the *global* batch (GradCache chunks it)."""

    name: str
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    full_finetune: bool = False
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None  # cap (same steps for every ablation row of a table)
    budget: str = "fixed"  # fixed: max_steps/epochs | plateau: stop when the dev curve plateaus (train.plateau), capped
    min_steps: int = 0  # plateau budget: never stop before this many optimizer steps
    batch_size: int = 64
    chunk_size: int = 32  # GradCache chunk (memory), never changes the result
    warmup_ratio: float = 0.03
    symmetric: bool = False  # add the candidate->query InfoNCE term (summed), CC3M stage
    train_temperature: bool = False  # learnable tau from the M-BEIR stage on
    compression_prompt: bool | None = None  # None: the embedder's setting
    # hard negatives (stage 4)
    negatives: str = "in_batch"  # in_batch | in_batch+hard | hard_only
    num_hard: int = 5
    mine_top_m: int = 100
    mine_pool: str = "global"  # global (union of train pools) | local (per-task pool)
    filter_max_score: float | None = None  # paper: 0.7
    filter_relative_margin: float | None = None
    # distillation (stage 5)
    sample_fraction: float = 0.1  # per-task sample of training queries
    teacher_top_k: int = 50
    teacher_weight: float = 1.0
    teacher_weight_overrides: dict = field(default_factory=lambda: {"mscoco_task0": 0.5, "mscoco_task3": 0.1})
    distill_mode: str = "kl"  # kl | continue_hard (the same sample trained with hard negatives)
    mixed_precision: str = "no"  # no | bf16 (autocast); set by the preset's scale.mixed_precision


# The paper's recipe (FACTS.md §4, Qwen2-VL-7B, 64 devices). Batches are global.
PAPER_STAGES: dict[str, StageConfig] = {
    "nli": StageConfig("nli", lora_r=64, lora_alpha=128, lr=2e-4, epochs=2, batch_size=72 * 64),
    "cc3m": StageConfig("cc3m", lora_r=128, lora_alpha=256, lr=1e-4, epochs=1, batch_size=60 * 64, symmetric=True),
    "mbeir": StageConfig("mbeir", lr=4e-4, epochs=1, batch_size=60 * 64, train_temperature=True),
    "hard_negatives": StageConfig("hard_negatives", lr=1.5e-5, epochs=1, batch_size=17 * 64, train_temperature=True,
                                  negatives="in_batch+hard", num_hard=5, filter_max_score=0.7,
                                  compression_prompt=False),
    "distill": StageConfig("distill", lr=1e-5, epochs=1, batch_size=2 * 64, train_temperature=True,
                           compression_prompt=False),
}


@dataclass
class RerankerStageConfig:
    lora_r: int = 128
    lora_alpha: int = 256
    lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    top_k: int = 100  # negatives drawn from the stage-3 model's local top-k


@dataclass
class EvalConfig:
    pools: tuple[str, ...] = ("local", "global")
    rows: tuple[str, ...] | None = None  # None: all 16
    instruction_seed: int = 0
    batch_size: int = 64
    eval_every: int | None = None  # steps between dev-curve evaluations (None: no dev curve)
    curve_rows: tuple[str, ...] | None = None  # rows evaluated for the dev curve (None: all)
    dev_queries: int | None = None  # dev curve: the first N queries of each row's dev (val) split (None: all)
    dedup_global: bool = True
    rerank_top_k: int = 50  # U-MARVEL+ / reranker row: candidates re-scored per query


@dataclass
class ScaleConfig:
    """How a preset shrinks the paper recipe: global batch / ``batch_divisor``, LR x ``lr_multiplier``."""

    batch_divisor: float = 60.0
    min_batch: int = 4
    lr_multiplier: float = 5.0
    max_steps: int | None = None
    chunk_size: int = 32
    lora_r: int | None = 16  # micro models: small adapters (None keeps the paper's r/alpha)
    lora_alpha: int | None = 32
    epochs: float | None = None  # override every stage's epochs
    mixed_precision: str = "no"  # no | bf16: autocast in every stage's training step


@dataclass
class RunConfig:
    preset: str = "cpu"
    seed: int = 0
    backbone: str | None = None  # local checkpoint dir; None: the micro backbone of the preset
    backbone_kind: str = "qwen2_vl"
    backbone_size: str = "micro"
    data_root: str | None = None  # None: data/mini-mbeir-<data_preset>
    data_preset: str = "cpu"
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    stages: list[str] = field(default_factory=lambda: ["nli", "cc3m", "mbeir"])
    stage: dict[str, StageConfig] = field(default_factory=lambda: copy.deepcopy(PAPER_STAGES))
    reranker: RerankerStageConfig = field(default_factory=RerankerStageConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int | None = None
    cache_dir: str = "cache"
    # the weights actually used (io.checkpoint_digest of the resolved backbone), set by experiment.run_row
    backbone_digest: str | None = None
    # the synthetic data's recipe hash (experiment.data_digest), set by experiment.run_row
    data_digest: str | None = None

    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(**{**SYNTHETIC_PRESETS[self.data_preset], "seed": 0})

    def resolved_data_root(self) -> Path:
        return Path(self.data_root) if self.data_root else Path("data") / f"mini-mbeir-{self.data_preset}"

    def scaled_stage(self, name: str) -> StageConfig:
        """The stage recipe after the preset's scaling (what actually runs)."""
        s = copy.deepcopy(self.stage[name])
        sc = self.scale
        s.batch_size = max(sc.min_batch, int(round(s.batch_size / sc.batch_divisor)))
        s.lr = s.lr * sc.lr_multiplier
        s.chunk_size = sc.chunk_size
        if sc.max_steps is not None:
            s.max_steps = sc.max_steps if s.max_steps is None else min(s.max_steps, sc.max_steps)
        if sc.lora_r is not None:
            s.lora_r, s.lora_alpha = sc.lora_r, sc.lora_alpha or 2 * sc.lora_r
        if sc.epochs is not None:
            s.epochs = sc.epochs
        s.mixed_precision = sc.mixed_precision
        return s

    def hash(self, *, upto_stage: str | None = None) -> str:
        """Config hash; with ``upto_stage``, only what determines the checkpoint after that stage."""
        d = dataclasses.asdict(self)
        if upto_stage is not None:
            keep = self.stages[: self.stages.index(upto_stage) + 1]
            d = {"seed": self.seed, "backbone": self.backbone, "backbone_digest": self.backbone_digest,
                 "data_digest": self.data_digest, "backbone_kind": self.backbone_kind,
                 "backbone_size": self.backbone_size, "data_root": str(self.resolved_data_root()),
                 "data_preset": self.data_preset, "embedder": d["embedder"], "stages": keep,
                 "stage": {k: dataclasses.asdict(self.scaled_stage(k)) for k in keep}}
            if any(self.scaled_stage(k).budget == "plateau" for k in keep):  # the dev curve decides the weights
                d["dev"] = {k: d_eval for k, d_eval in dataclasses.asdict(self.eval).items()
                            if k in ("eval_every", "curve_rows", "dev_queries", "instruction_seed")}
        return config_hash(_drop_added_defaults(d))


# Fields added after results were published, with the value every earlier run implicitly had. They are
# left out of hashes while at that value, so finished runs and cached stages stay valid; any other
# value is hashed as usual.
_ADDED_DEFAULTS = {"mixed_precision": "no", "backbone_digest": None, "data_digest": None, "budget": "fixed",
                   "min_steps": 0, "dev_queries": None}


def _drop_added_defaults(obj):
    if isinstance(obj, dict):
        return {k: _drop_added_defaults(v) for k, v in obj.items()
                if not (k in _ADDED_DEFAULTS and v == _ADDED_DEFAULTS[k])}
    if isinstance(obj, list):
        return [_drop_added_defaults(v) for v in obj]
    return obj


# Scale presets: what `--preset` means. Each is a dict of dotted overrides on RunConfig.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"data_preset": "smoke", "backbone_size": "test", "scale.max_steps": 3, "scale.batch_divisor": 480,
              "scale.chunk_size": 8, "scale.epochs": 1.0, "eval.batch_size": 32, "reranker.max_steps": 3,
              "reranker.batch_size": 4, "eval.rerank_top_k": 5, "stage.distill.teacher_top_k": 8, "threads": 1},
    # cpu (the embedded default), sized for every table x 3 seeds in about 2 hours on 2 cores (measured
    # times: README, "cpu preset"). Batches = paper / 30 (480 -> 16, 3840 -> 128), LR x 10 for the micro
    # model's small LoRA, half an epoch of every stage, so rows that differ in batch size see the same
    # examples (as the paper's 1 epoch) with proportionally fewer steps (30 steps of 16 for the 480-batch
    # rows on the cpu mini-M-BEIR). The reranker re-sorts the recall top 10 (enough for R@5; the R@10 rows
    # are unchanged by it), the distillation teacher scores the top 20.
    "cpu": {"data_preset": "cpu", "backbone_size": "micro", "scale.batch_divisor": 30, "scale.lr_multiplier": 10.0,
            "scale.epochs": 0.5, "scale.chunk_size": 32, "threads": 2, "reranker.max_steps": 100,
            "eval.rerank_top_k": 10, "stage.distill.teacher_top_k": 20,
            "eval.eval_every": 20},  # dev curve every 20 steps on the 30 dev queries per row
    "gpu": {"data_preset": "gpu", "backbone_size": "micro", "scale.batch_divisor": 15, "scale.chunk_size": 64,
            "scale.max_steps": 2000, "eval.eval_every": 100},
    "paper": {"data_preset": "cpu", "scale.batch_divisor": 1, "scale.lr_multiplier": 1.0, "scale.lora_r": None,
              "scale.lora_alpha": None, "scale.chunk_size": 16, "scale.min_batch": 1},
}


def _set(obj, dotted: str, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        obj = obj[p] if isinstance(obj, dict) else getattr(obj, p)
    last = parts[-1]
    if isinstance(obj, dict):
        if last not in obj:
            raise KeyError(f"unknown config key {dotted!r}")
        obj[last] = value
        return
    if not hasattr(obj, last):
        raise KeyError(f"unknown config key {dotted!r} ({type(obj).__name__} has no field {last!r})")
    cur = getattr(obj, last)
    if dataclasses.is_dataclass(cur) and isinstance(value, dict):
        for k, v in value.items():
            _set(cur, k, v)
        return
    if isinstance(cur, tuple) and isinstance(value, list):
        value = tuple(value)
    setattr(obj, last, value)
    if hasattr(obj, "__post_init__"):
        obj.__post_init__()  # re-validate (e.g. EmbedderConfig modes)


def apply_overrides(cfg, overrides: dict[str, Any] | None):
    """Apply ``{"a.b.c": value}`` (or nested dicts) in place; unknown keys are errors."""
    for k, v in (overrides or {}).items():
        _set(cfg, k, v)
    return cfg


def make_run_config(preset: str = "cpu", overrides: dict | None = None, **kw) -> RunConfig:
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = RunConfig(preset=preset)
    apply_overrides(cfg, PRESETS[preset])
    apply_overrides(cfg, overrides)
    apply_overrides(cfg, {k: v for k, v in kw.items() if v is not None})
    unknown = [s for s in cfg.stages if s not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGE_ORDER}")
    return cfg


# ---- ablation YAML ------------------------------------------------------------------------------
@dataclass
class AblationRow:
    id: str
    label: str
    overrides: dict
    paper_key: str | int | None = None
    reranker: bool = False  # evaluate the fused reranker teacher instead of the embedder (Table 6)
    explain: bool = False  # a diagnostic row (no paper value), e.g. Table 1's full-fine-tuning check of T1b


@dataclass
class Ablation:
    name: str
    table: int
    title: str
    base: dict
    rows: list[AblationRow]
    findings: list[str]
    pools: tuple[str, ...] = ("local", "global")
    # named paired comparisons beyond the paper's findings (diagnostic rows): {name: (row A, row B)}
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)
    checks_title: str = ""

    def row(self, rid: str) -> AblationRow:
        for r in self.rows:
            if r.id == str(rid):
                return r
        raise KeyError(f"{self.name}: no row {rid!r}")

    def run_config(self, row: AblationRow | str, preset: str, seed: int, **kw) -> RunConfig:
        row = self.row(row) if isinstance(row, str) else row
        over = {**self.base, **row.overrides, "seed": seed, "eval.pools": list(self.pools)}
        return make_run_config(preset, over, **kw)


def ablations_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "ablations"
    return here


def load_ablation(path_or_name) -> Ablation:
    p = Path(path_or_name)
    if not p.suffix:
        matches = sorted(ablations_dir().glob(f"{path_or_name}*.yaml"))
        if len(matches) != 1:
            raise FileNotFoundError(f"no unique ablation {path_or_name!r} in {ablations_dir()}")
        p = matches[0]
    with open(p, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: malformed YAML: {e}") from None
    for k in ("table", "title", "rows"):
        if k not in d:
            raise ValueError(f"{p}: missing key {k!r}")
    rows = [AblationRow(id=str(r["id"]), label=r.get("label", str(r["id"])), overrides=r.get("overrides") or {},
                        paper_key=r.get("paper", r["id"]), reranker=bool(r.get("reranker", False)),
                        explain=bool(r.get("explain", False))) for r in d["rows"]]
    return Ablation(name=p.stem, table=int(d["table"]), title=d["title"], base=d.get("base") or {}, rows=rows,
                    findings=list(d.get("findings") or []), pools=tuple(d.get("pools", ("local", "global"))),
                    checks={str(k): (str(v[0]), str(v[1])) for k, v in (d.get("checks") or {}).get("pairs", {}).items()},
                    checks_title=(d.get("checks") or {}).get("title", ""))
