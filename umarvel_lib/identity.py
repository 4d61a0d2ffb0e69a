"""Which config settings change a result: what every hash naming a run, a stage checkpoint or a cache
entry is computed from (:meth:`umarvel_lib.config.RunConfig.identity`).

Classes are named by their class name, so a config dataclass defined in a higher layer (e.g.
``train.engine.TrainConfig``) classifies its fields by adding entries to the two tables here.
"""

from __future__ import annotations

import dataclasses

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
        "min_examples",
        "plateau_min_evals",
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
                    f"NOT_IDENTITY with the reason (it does not), in umarvel_lib/identity.py"
                )
        return out
    if isinstance(obj, dict):
        return {str(k): identity(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [identity(v) for v in obj]
    return obj
