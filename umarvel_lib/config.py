"""The config dataclasses: what a run is (:class:`RunConfig`) and what determines its result.

A run is a :class:`RunConfig`: which backbone, which data, how the embedder computes an embedding
(:class:`EmbedderConfig`, here so that this module stays torch-free), which training stages run with which recipe
(:class:`StageConfig`, the paper's values in :data:`PAPER_STAGES`, docs/recipe.md "Stages"), and how it is
evaluated (:class:`EvalConfig`). Which fields enter a run's hash is classified in
:mod:`umarvel_lib.identity`; the scale presets and dotted overrides that make a run config are in
:mod:`umarvel_lib.presets` (``make_run_config(preset, overrides)``), and the ablation YAML rows in
:mod:`umarvel_lib.ablation`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig
from .identity import identity
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
    # checkpoint's kind (models.loading.PAPER_PIXELS: Qwen2-VL 4*28*28 .. 300*28*28, Qwen3-VL max 224*224)
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
    min_examples: int = (
        0  # ... nor before this many training examples (steps = ceil(min_examples / batch))
    )
    plateau_min_evals: int = 4  # plateau rule: its window holds at least this many dev evaluations
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

    def plateau_min_steps(self) -> int:
        """The first step at which a ``budget: plateau`` stage may stop: ``min_steps``, or more where
        ``min_examples`` needs more steps of this stage's batch."""
        return max(self.min_steps, -(-self.min_examples // max(1, self.batch_size)))


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
    # (run_inputs.data_digest: every file's bytes, images included), set by experiment.run_row
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
        for (
            k
        ) in names:  # the plateau rule's window decides the weights only under the plateau budget
            if d["stage"][k]["budget"] != "plateau":
                d["stage"][k].pop("plateau_min_evals")
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
