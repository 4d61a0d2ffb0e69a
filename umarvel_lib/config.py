"""One config system: dataclasses, scale presets, and YAML rows as dotted overrides.

A run is a :class:`RunConfig`: which backbone, which data, how the embedder computes an embedding
(:class:`EmbedderConfig`, here so that this module stays torch-free), which training stages run with which recipe
(:class:`StageConfig`, the paper's values in :data:`PAPER_STAGES`, docs/recipe.md "Stages"), and how it is
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

STAGE_ORDER = ("nli", "cc3m", "mbeir", "hard_negatives", "distill")

# ---- the embedder's switches (validated by EmbedderConfig; used by umarvel_lib.models.embedder) ----
ATTENTION_MODES = ("causal", "bidirectional")
POOLING_MODES = ("mean", "last")
POSITION_MODES = ("mrope", "sequential")
#: Attention implementations on which the ``text_config.is_causal`` switch was validated
#: (leak test, padded and unpadded). Anything else is refused.
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class UnsupportedAttentionError(ValueError):
    """The model's attention implementation (or architecture) cannot be switched reliably."""


@dataclass
class EmbedderConfig:
    """Everything that changes what the embedder computes (hashed into :meth:`Embedder.fingerprint`)."""

    attention: str = "bidirectional"  # causal | bidirectional
    pooling: str = "mean"  # mean | last (hidden state just before <emb>)
    compression_prompt: bool = (
        False  # paper's best row: off; released stages 1-3 and M-BEIR eval: on
    )
    instructions: bool = True  # queries get "<instruction_start>{instr}<instruction_end> {txt}"
    instruction_mask: bool = True  # exclude the instruction span (markers included) from the mean
    positions: str = (
        "mrope"  # mrope (Qwen-VL 3-D rope index) | sequential (released code's 1-D positions)
    )
    generation_prompt: bool = (
        False  # the released eval's extra "<|im_start|>assistant\n" (explicit switch)
    )
    max_text_tokens: int | None = (
        480  # training (forward with grad): the released collators truncate at 480
    )
    eval_max_text_tokens: int | None = (
        None  # encode() (evaluation, mining, teacher): None = no truncation, as released
    )
    # image budget (the processor resizes into [min_pixels, max_pixels]); None: the paper's value for the
    # checkpoint's kind (backbone.PAPER_PIXELS: Qwen2-VL 4*28*28 .. 300*28*28, Qwen3-VL max 224*224)
    min_pixels: int | None = None
    max_pixels: int | None = None
    temperature_init: float = 0.05
    train_temperature: bool = True
    temperature_min: float | None = None
    attn_implementation: str | None = None  # None: keep the loaded model's (must be eager or sdpa)
    autocast_bf16: bool = True  # bf16 autocast for encode() on CUDA

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if (
            self.attn_implementation is not None
            and self.attn_implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS
        ):
            raise UnsupportedAttentionError(
                f"attn_implementation {self.attn_implementation!r} is not supported; use one of "
                f"{SUPPORTED_ATTN_IMPLEMENTATIONS} (flash-attention is causal-only and is refused)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EmbedderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown EmbedderConfig fields: {unknown}")
        return cls(**d)


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
    budget: str = "fixed"  # fixed: max_steps/epochs | plateau: stop when the dev curve plateaus (eval.plateau), capped
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
    teacher_weight_overrides: dict = field(
        default_factory=lambda: {"mscoco_task0": 0.5, "mscoco_task3": 0.1}
    )
    distill_mode: str = "kl"  # kl | continue_hard (the same sample trained with hard negatives)
    mixed_precision: str = "no"  # no | bf16 (autocast); set by the preset's scale.mixed_precision


# The paper's recipe (docs/recipe.md "Stages", Qwen2-VL-7B, 64 devices). Batches are global.
PAPER_STAGES: dict[str, StageConfig] = {
    "nli": StageConfig("nli", lora_r=64, lora_alpha=128, lr=2e-4, epochs=2, batch_size=72 * 64),
    "cc3m": StageConfig(
        "cc3m", lora_r=128, lora_alpha=256, lr=1e-4, epochs=1, batch_size=60 * 64, symmetric=True
    ),
    "mbeir": StageConfig("mbeir", lr=4e-4, epochs=1, batch_size=60 * 64, train_temperature=True),
    "hard_negatives": StageConfig(
        "hard_negatives",
        lr=1.5e-5,
        epochs=1,
        batch_size=17 * 64,
        train_temperature=True,
        negatives="in_batch+hard",
        num_hard=5,
        filter_max_score=0.7,
        compression_prompt=False,
    ),
    "distill": StageConfig(
        "distill",
        lr=1e-5,
        epochs=1,
        batch_size=2 * 64,
        train_temperature=True,
        compression_prompt=False,
    ),
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
    """How an embedder is evaluated (:func:`umarvel_lib.eval.evaluate.evaluate`): what, and how searched/scored."""

    pools: tuple[str, ...] = ("local", "global")
    rows: tuple[str, ...] | None = None  # None: all 16
    instructions: bool | None = (
        None  # None: the encoder's own setting (Embedder.cfg.instructions), else True
    )
    instruction_seed: int = 0
    batch_size: int = 64
    eval_every: int | None = None  # steps between dev-curve evaluations (None: no dev curve)
    curve_rows: tuple[str, ...] | None = None  # rows evaluated for the dev curve (None: all)
    dev_queries: int | None = (
        None  # dev curve: the first N queries of each row's dev (val) split (None: all)
    )
    dedup_global: bool = True  # global pool deduplicated by did (False: the official concatenation)
    rerank_top_k: int = 50  # U-MARVEL+ / reranker row: candidates re-scored per query
    backend: str = "torch"  # exact search: torch | faiss
    depth: int = 50  # results kept per query in run.trec
    ks: tuple[int, ...] = (1, 5, 10, 50)  # R@k reported (must include each row's headline k)
    n_boot: int = 1000  # bootstrap replicates of the confidence intervals
    boot_seed: int = 0
    shard_size: int = 16384  # embedding-cache layout
    cache_dtype: str = "float32"  # float16 halves the cache of a large global pool
    block_size: int = 16384  # candidates per search block
    query_chunk: int = 4096  # queries per search chunk
    run_tag: str = "umarvel"  # the TREC run's tag column


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
    # the stage-1/2 corpora, separate downloads (data paths, not result identity: left out of hash())
    nli_path: str | None = (
        None  # SimCSE nli_for_simcse.csv; None: <data root>/nli/nli_for_simcse.csv
    )
    cc3m_root: str | None = (
        None  # folder of LLaVA CC3M-595K chat.json + images; None: <data root>/cc3m
    )
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
    # content digests of the data a run reads, {"mbeir": ..., "nli": ..., "cc3m": ...}
    # (experiment.data_digest: every file's bytes, images included), set by experiment.run_row
    data_digest: dict | None = None

    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(**{**SYNTHETIC_PRESETS[self.data_preset], "seed": 0})

    def resolved_data_root(self) -> Path:
        return (
            Path(self.data_root)
            if self.data_root
            else Path("data") / f"mini-mbeir-{self.data_preset}"
        )

    def resolved_nli_path(self) -> Path:
        return (
            Path(self.nli_path)
            if self.nli_path
            else self.resolved_data_root() / "nli" / "nli_for_simcse.csv"
        )

    def resolved_cc3m_root(self) -> Path:
        return Path(self.cc3m_root) if self.cc3m_root else self.resolved_data_root() / "cc3m"

    def corpus_paths(self) -> dict[str, Path]:
        """The file or folder each stage reads beyond M-BEIR (``nli``, ``cc3m``), for the stages this run has.

        A missing one is a :class:`FileNotFoundError` naming the file and the flag that sets it."""
        out = {}
        for stage, flag, path, what in (
            ("nli", "--nli-path", self.resolved_nli_path(), "SimCSE's nli_for_simcse.csv"),
            (
                "cc3m",
                "--cc3m-root",
                self.resolved_cc3m_root(),
                "a folder with LLaVA CC3M-595K chat.json + images",
            ),
        ):
            if stage not in self.stages:
                continue
            probe = path if stage == "nli" else path / "chat.json"
            if not probe.is_file():
                set_by = (
                    f"{flag} {path}"
                    if (self.nli_path if stage == "nli" else self.cc3m_root)
                    else "default"
                )
                raise FileNotFoundError(
                    f"stage {stage!r} needs {what}: {probe} not found ({set_by}); pass {flag} "
                    f"(papermill: -p {flag[2:].replace('-', '_')} ...; config: {flag[2:].replace('-', '_')})"
                )
            out[stage] = path
        return out

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

    def reranker_recipe(self) -> dict:
        """The reranker's training recipe after the preset's scaling (what ``train_reranker`` runs)."""
        rc, sc = self.reranker, self.scale
        return {
            "lora_r": sc.lora_r or rc.lora_r,
            "lora_alpha": sc.lora_alpha or rc.lora_alpha,
            "lr": rc.lr * sc.lr_multiplier,
            "epochs": None if rc.max_steps else rc.epochs,
            "max_steps": rc.max_steps,
            "batch_size": rc.batch_size,
        }

    def identity(self, *, upto_stage: str | None = None, reranker: bool = False) -> dict:
        """What determines a result (see :data:`NOT_IDENTITY`): the weights (``backbone_digest``), the data
        bytes each stage reads (``data_digest``), the seed, the embedder, the stages that run with their
        scaled recipes, and (whole runs only) the evaluation settings. With ``upto_stage``: only what
        determines the checkpoint after that stage. ``reranker``: the run uses the reranker (a
        ``reranker: true`` row), so its recipe and the fusion weights are part of it; a distillation
        stage with the KL teacher includes the reranker recipe by itself."""
        names = list(
            self.stages if upto_stage is None else self.stages[: self.stages.index(upto_stage) + 1]
        )
        d = identity(self)
        d["stage"] = {k: identity(self.scaled_stage(k)) for k in names}
        d["stages"] = names
        d["backbone_digest"] = (
            self.backbone_digest
            or {  # not yet measured: name the backbone instead
                "path": self.backbone,
                "kind": self.backbone_kind,
                "size": self.backbone_size,
            }
        )
        parts = data_parts(names, evaluate=upto_stage is None)
        d["data_digest"] = (
            {k: self.data_digest.get(k) for k in parts}
            if isinstance(self.data_digest, dict)
            else self.data_digest or {"root": str(self.resolved_data_root()), "parts": parts}
        )
        uses_teacher = "distill" in names and self.scaled_stage("distill").distill_mode == "kl"
        if uses_teacher or reranker:
            d["reranker"] = self.reranker_recipe()
        else:
            d.pop("reranker")
        if (
            reranker and upto_stage is None
        ):  # the reranked evaluation (eval.rerank) fuses with the distillation stage's weights
            st = self.scaled_stage("distill")
            d["fusion"] = {
                "teacher_weight": st.teacher_weight,
                "overrides": st.teacher_weight_overrides,
            }
        if upto_stage is not None:
            d.pop("eval")
            if any(
                self.scaled_stage(k).budget == "plateau" for k in names
            ):  # the dev curve decides the weights
                d["dev"] = {
                    k: identity(getattr(self.eval, k))
                    for k in ("eval_every", "curve_rows", "dev_queries", "instruction_seed")
                }
        return d

    def hash(self, *, upto_stage: str | None = None, reranker: bool = False) -> str:
        """Short hash of :meth:`identity`: names a finished run, or with ``upto_stage`` a stage checkpoint."""
        return config_hash(self.identity(upto_stage=upto_stage, reranker=reranker))


def data_parts(stages, *, evaluate: bool) -> list[str]:
    """Which parts of the data (keys of ``RunConfig.data_digest``) a run of ``stages`` reads: ``nli`` and
    ``cc3m`` for those stages, ``mbeir`` (queries, pools, qrels, instructions and their images) for the
    M-BEIR stages and for evaluation."""
    parts = {"nli" if s == "nli" else "cc3m" if s == "cc3m" else "mbeir" for s in stages}
    if evaluate:
        parts.add("mbeir")
    return sorted(parts)


# ---- identity: which settings change a result ------------------------------------------------------
# Every field of every config dataclass is classified here: a field listed in NOT_IDENTITY (with the
# reason) is left out of every hash that names a run, a stage checkpoint or a cache entry; every other
# field is in them. A field missing from IDENTITY_FIELDS and NOT_IDENTITY makes identity() raise, so a
# new field cannot enter or leave the hashes by accident (tests/test_config.py checks every field).
NOT_IDENTITY: dict[str, dict[str, str]] = {
    "RunConfig": {
        "preset": "a name for a set of overrides; their values are classified field by field",
        "backbone": "a path; the weights it holds are hashed (backbone_digest)",
        "backbone_kind": "selects the micro backbone; its weights are hashed (backbone_digest)",
        "backbone_size": "selects the micro backbone; its weights are hashed (backbone_digest)",
        "data_root": "a path; the bytes under it are hashed (data_digest)",
        "data_preset": "selects the synthetic build; its bytes are hashed (data_digest)",
        "scale": "applied by scaled_stage() and reranker_recipe(), whose results are hashed",
        "threads": "CPU threads: speed only",
        "cache_dir": "where caches live, not what they hold",
        "nli_path": "a path; the bytes of the NLI file are hashed (data_digest['nli'])",
        "cc3m_root": "a path; the bytes of chat.json and its images are hashed (data_digest['cc3m'])",
    },
    "StageConfig": {
        "chunk_size": "GradCache chunk: memory only; the gradients equal the full batch's up to float rounding "
        "(1e-10 in float64, tests/test_gradcache.py)",
    },
    "RerankerStageConfig": {
        "top_k": "not read: the reranker's negatives come from the mined hard-negative file",
    },
    "EvalConfig": {
        "batch_size": "encoding batch size: speed and memory only (each item's embedding is its own, up to "
        "float rounding of batched kernels)",
        "backend": "exact inner-product search either way, same tie-break (tests/test_eval_search.py checks "
        "faiss against torch): speed only, up to float rounding",
        "shard_size": "embedding-cache layout on disk, not the embeddings it holds",
        "block_size": "candidates per search block: memory only (the streaming top-k is exact)",
        "query_chunk": "queries per search chunk: memory only (the streaming top-k is exact)",
        "run_tag": "a label in run.trec's tag column; no ranking or metric reads it",
    },
    "ScaleConfig": {
        f: "applied by scaled_stage() and reranker_recipe(), whose results are hashed"
        for f in (
            "batch_divisor",
            "min_batch",
            "lr_multiplier",
            "max_steps",
            "chunk_size",
            "lora_r",
            "lora_alpha",
            "epochs",
            "mixed_precision",
        )
    },
    "EmbedderConfig": {},
}
IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "RunConfig": (
        "seed",
        "embedder",
        "stages",
        "stage",
        "reranker",
        "eval",
        "backbone_digest",
        "data_digest",
    ),
    "StageConfig": (
        "name",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "full_finetune",
        "lr",
        "epochs",
        "max_steps",
        "batch_size",
        "warmup_ratio",
        "symmetric",
        "train_temperature",
        "compression_prompt",
        "negatives",
        "num_hard",
        "mine_top_m",
        "mine_pool",
        "filter_max_score",
        "filter_relative_margin",
        "sample_fraction",
        "teacher_top_k",
        "teacher_weight",
        "teacher_weight_overrides",
        "distill_mode",
        "mixed_precision",
        "budget",
        "min_steps",
    ),
    "RerankerStageConfig": ("lora_r", "lora_alpha", "lr", "epochs", "max_steps", "batch_size"),
    "EvalConfig": (
        "pools",
        "rows",
        "instruction_seed",
        "eval_every",
        "curve_rows",
        "dedup_global",
        "rerank_top_k",
        "dev_queries",
        "instructions",
        "depth",
        "ks",
        "n_boot",
        "boot_seed",
        "cache_dtype",
    ),
    "ScaleConfig": (),
    "EmbedderConfig": (
        "attention",
        "pooling",
        "compression_prompt",
        "instructions",
        "instruction_mask",
        "positions",
        "generation_prompt",
        "max_text_tokens",
        "temperature_init",
        "train_temperature",
        "temperature_min",
        "attn_implementation",
        "autocast_bf16",
        "min_pixels",
        "max_pixels",
        "eval_max_text_tokens",
    ),
}


class UnclassifiedFieldError(TypeError):
    """A config field that is neither in IDENTITY_FIELDS nor in NOT_IDENTITY."""


def identity(obj):
    """The result-determining part of a config value: dataclasses keep their IDENTITY_FIELDS (recursively),
    containers are walked, scalars are kept."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj).__name__
        keep, drop = set(IDENTITY_FIELDS.get(cls, ())), NOT_IDENTITY.get(cls, {})
        out = {}
        for f in dataclasses.fields(obj):
            if f.name in keep:
                out[f.name] = identity(getattr(obj, f.name))
            elif f.name not in drop:
                raise UnclassifiedFieldError(
                    f"{cls}.{f.name} is not classified: add it to IDENTITY_FIELDS (it changes results) or to "
                    f"NOT_IDENTITY with the reason (it does not), in umarvel_lib/config.py"
                )
        return out
    if isinstance(obj, dict):
        return {str(k): identity(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [identity(v) for v in obj]
    return obj


# Scale presets: what `--preset` means. Each is a dict of dotted overrides on RunConfig.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data_preset": "smoke",
        "backbone_size": "test",
        "scale.max_steps": 3,
        "scale.batch_divisor": 480,
        "scale.chunk_size": 8,
        "scale.epochs": 1.0,
        "eval.batch_size": 32,
        "reranker.max_steps": 3,
        "reranker.batch_size": 4,
        "eval.rerank_top_k": 5,
        "stage.distill.teacher_top_k": 8,
        "threads": 1,
    },
    # cpu (the embedded default): every stage trains to the plateau of its dev curve (eval/plateau.py; the
    # rule fixed before any run), from at least 100 optimizer steps (200 for M-BEIR: the calibration
    # curves of Table 1 row 4 rose by less than their CI half-width between steps 50 and 100 before they
    # took off), capped at 1500 steps (the LR schedule is laid over the cap). Batches = paper / 30 where
    # a finding compares batch sizes or the M-BEIR stage (480 -> 16, 3840 -> 128: Table 4's ratios
    # kept); the NLI, CC3M and hard-negative stages, whose batch no finding varies, train at 16. LR x 10
    # for the micro model's small LoRA. Dev Avg every 50 steps on the 30 dev queries per row. The
    # reranker trains a fixed 100 steps and re-sorts the recall top 10 (enough for R@5; R@10 rows are
    # unchanged by it); the distillation teacher scores the top 20.
    "cpu": {
        "data_preset": "cpu",
        "backbone_size": "micro",
        "scale.batch_divisor": 30,
        "scale.lr_multiplier": 10.0,
        "scale.max_steps": 1500,
        "scale.chunk_size": 32,
        "threads": 2,
        "stage.nli.batch_size": 480,
        "stage.cc3m.batch_size": 480,
        "stage.hard_negatives.batch_size": 480,
        **{f"stage.{s}.budget": "plateau" for s in STAGE_ORDER},
        **{f"stage.{s}.min_steps": 200 if s == "mbeir" else 100 for s in STAGE_ORDER},
        "reranker.max_steps": 100,
        "eval.rerank_top_k": 10,
        "stage.distill.teacher_top_k": 20,
        "eval.eval_every": 50,
    },
    "gpu": {
        "data_preset": "gpu",
        "backbone_size": "micro",
        "scale.batch_divisor": 15,
        "scale.chunk_size": 64,
        "scale.max_steps": 2000,
        "eval.eval_every": 100,
    },
    "paper": {
        "data_preset": "cpu",
        "scale.batch_divisor": 1,
        "scale.lr_multiplier": 1.0,
        "scale.lora_r": None,
        "scale.lora_alpha": None,
        "scale.chunk_size": 16,
        "scale.min_batch": 1,
    },
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
        raise KeyError(
            f"unknown config key {dotted!r} ({type(obj).__name__} has no field {last!r})"
        )
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


class UnknownPresetError(KeyError):
    def __str__(self):
        return str(self.args[0])


def check_preset(preset: str) -> str:
    """``preset`` if it is one of :data:`PRESETS`, else :class:`UnknownPresetError` naming the choices."""
    if preset not in PRESETS:
        raise UnknownPresetError(
            f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}"
        )
    return preset


def make_run_config(preset: str = "cpu", overrides: dict | None = None, **kw) -> RunConfig:
    check_preset(preset)
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
    explain: bool = (
        False  # a diagnostic row (no paper value), e.g. Table 1's full-fine-tuning check of T1b
    )
    own: bool = (
        False  # a reader's own row (notebook parameter ``extra_rows``), shown beside the paper's
    )


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

    @property
    def baseline(self) -> AblationRow:
        """The row every other row is compared with in the table's figure: the first row of the YAML."""
        return self.rows[0]

    def with_extra_rows(self, text) -> Ablation:
        """This table plus a reader's own rows (YAML/JSON text, see :func:`parse_extra_rows`)."""
        return dataclasses.replace(self, rows=self.rows + parse_extra_rows(text, self))

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
    rows = [
        AblationRow(
            id=str(r["id"]),
            label=r.get("label", str(r["id"])),
            overrides=r.get("overrides") or {},
            paper_key=r.get("paper", r["id"]),
            reranker=bool(r.get("reranker", False)),
            explain=bool(r.get("explain", False)),
        )
        for r in d["rows"]
    ]
    return Ablation(
        name=p.stem,
        table=int(d["table"]),
        title=d["title"],
        base=d.get("base") or {},
        rows=rows,
        findings=list(d.get("findings") or []),
        pools=tuple(d.get("pools", ("local", "global"))),
        checks={
            str(k): (str(v[0]), str(v[1]))
            for k, v in (d.get("checks") or {}).get("pairs", {}).items()
        },
        checks_title=(d.get("checks") or {}).get("title", ""),
    )


def stage_plan(cfg: RunConfig, steps: dict[str, int] | None = None) -> list[dict]:
    """What each stage of ``cfg`` runs after the preset's scaling: global batch, LR, epochs or step cap,
    tau (learnable or fixed), negatives; ``steps`` (stage -> optimizer steps a run recorded) fills the
    step column, else the cap (``max_steps``) when there is one."""
    out = []
    for name in cfg.stages:
        s = cfg.scaled_stage(name)
        out.append(
            {
                "stage": name,
                "steps": (steps or {}).get(name, s.max_steps),
                "global_batch": s.batch_size,
                "lr": s.lr,
                "epochs": s.epochs if s.max_steps is None else None,
                "tau": "learnable"
                if s.train_temperature
                else f"fixed {cfg.embedder.temperature_init:g}",
                "lora_r": None if s.full_finetune else s.lora_r,
                "loss": f"distill: {s.distill_mode}"
                if name == "distill"
                else f"InfoNCE, {s.negatives}",
            }
        )
    return out


# ---- a reader's own rows (notebook parameter ``extra_rows``) ----------------------------------------
_TYPE_NAMES = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "None": (type(None),),
    "dict": (dict,),
    "list": (list,),
    "tuple": (list, tuple),
    "Any": (object,),
}


def _allowed_types(obj, name: str) -> tuple[str, ...]:
    """The type names a dataclass field accepts, from its annotation (``"float | None"`` -> float, None)."""
    ann = {f.name: f.type for f in dataclasses.fields(obj)}[name]
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return tuple(p.strip().split("[")[0] for p in ann.split("|"))


def _check_key(obj, dotted: str, value, path: str = "") -> None:
    """Raise ``ValueError`` naming ``dotted`` (and the valid choices) unless ``value`` fits the schema."""
    head, _, rest = dotted.partition(".")
    full = f"{path}{head}"
    if isinstance(obj, dict):  # the stage recipes, keyed by stage name
        if head not in obj:
            raise ValueError(
                f"unknown key {full!r}; valid: {', '.join(path + k for k in sorted(obj))}"
            )
        cur = obj[head]
    else:
        names = [f.name for f in dataclasses.fields(obj)]
        if head not in names:
            raise ValueError(
                f"unknown key {full!r} ({type(obj).__name__} has no field {head!r}); "
                f"valid: {', '.join(path + n for n in names)}"
            )
        cur = getattr(obj, head)
    nested = dataclasses.is_dataclass(cur) or (
        isinstance(cur, dict) and dataclasses.is_dataclass(obj) and head == "stage"
    )
    if rest:
        if not nested:
            raise ValueError(f"key {full!r} has no sub-keys (it takes a {type(cur).__name__})")
        return _check_key(cur, rest, value, full + ".")
    if nested:
        if not isinstance(value, dict):
            raise ValueError(
                f"key {full!r} is a group; set one of its fields, e.g. "
                f"{full}.{next(iter(cur)) if isinstance(cur, dict) else dataclasses.fields(cur)[0].name}"
            )
        for k, v in value.items():
            _check_key(cur, str(k), v, full + ".")
        return
    allowed = _allowed_types(obj, head)
    types = tuple(t for a in allowed for t in _TYPE_NAMES.get(a, (object,)))
    if (isinstance(value, bool) and "bool" not in allowed) or not isinstance(value, types):
        raise ValueError(
            f"key {full!r} takes {' or '.join(allowed)}, not {type(value).__name__} ({value!r})"
        )
    if full == "stages":
        bad = [s for s in value if s not in STAGE_ORDER]
        if bad:
            raise ValueError(
                f"key 'stages': unknown stage(s) {bad}; valid: {', '.join(STAGE_ORDER)}"
            )


def validate_overrides(
    overrides: dict, *, preset: str = "smoke", base: dict | None = None
) -> RunConfig:
    """Check dotted overrides against the config schema (the dataclasses above), then apply them with
    :func:`apply_overrides` on top of ``base``: unknown keys and wrong types raise ``ValueError`` naming
    the key and the valid choices; values the dataclasses themselves refuse (e.g. an unknown pooling
    mode) too. Returns the resulting config."""
    if not isinstance(overrides, dict):
        raise ValueError(
            f"overrides must be a mapping of config keys to values, not {type(overrides).__name__}"
        )
    cfg = make_run_config(preset, base)
    for k, v in overrides.items():
        _check_key(cfg, str(k), v)
        try:
            apply_overrides(cfg, {k: v})
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"key {k!r}: {e.args[0] if e.args else e}") from None
    return cfg


EXTRA_ROW_KEYS = ("label", "overrides")


def parse_extra_rows(text, ablation: Ablation | None = None) -> list[AblationRow]:
    """A reader's own rows from YAML/JSON text (or an already parsed mapping)::

        {"my_tau": {"label": "tau 0.02", "overrides": {"embedder.temperature_init": 0.02}}}

    Each row id must be new to the table (and usable as a directory name); each row has only
    ``label`` and ``overrides``; the overrides are checked by :func:`validate_overrides` on top of the
    table's base. Every error is a ``ValueError`` that starts with ``extra_rows`` and names the row
    and the key."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if isinstance(text, str):
        try:
            d = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            raise ValueError(f"extra_rows: not YAML/JSON: {e}") from None
    else:
        d = text
    if not isinstance(d, dict):
        raise ValueError(
            "extra_rows must map row ids to {label, overrides}, e.g. "
            '\'{"my_tau": {"label": "tau 0.02", "overrides": {"embedder.temperature_init": 0.02}}}\''
        )
    taken = {r.id for r in ablation.rows} if ablation is not None else set()
    out = []
    for rid, spec in d.items():
        rid = str(rid)
        where = f"extra_rows: row {rid!r}"
        if rid in taken:
            raise ValueError(f"{where}: the table already has a row {rid!r}; choose a new id")
        if not rid.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"{where}: a row id may hold letters, digits, '_', '-' and '.' only")
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping with keys {', '.join(EXTRA_ROW_KEYS)}")
        unknown = [k for k in spec if k not in EXTRA_ROW_KEYS]
        if unknown:
            raise ValueError(
                f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(EXTRA_ROW_KEYS)}"
            )
        label = spec.get("label", rid)
        if not isinstance(label, str):
            raise ValueError(f"{where}: key 'label' takes str, not {type(label).__name__}")
        over = spec.get("overrides") or {}
        try:
            validate_overrides(over, base=ablation.base if ablation is not None else None)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.append(AblationRow(id=rid, label=label, overrides=dict(over), paper_key=None, own=True))
        taken.add(rid)
    return out
