"""Building a micro backbone: the stock transformers architecture at micro size, pre-trained and cached.

:func:`build_backbone` builds a micro model from the stock transformers classes (tokenizer from
:mod:`.tokenizer`, image-only processor from :mod:`umarvel_lib.models.loading`), pre-trains it
generatively on freshly sampled scenes (:func:`.pretrain.pretrain`, on the project's
:class:`~umarvel_lib.train.engine.Trainer`, so an interrupted build resumes from its last
checkpoint), and caches it under ``cache_dir/<kind>-<size>-<hash>/`` (built in a temporary dir,
renamed when complete). The result loads like any checkpoint, through
:func:`umarvel_lib.models.loading.load_backbone`.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from ..io import atomic_dir, atomic_write_json, file_lock, read_json
from ..models.loading import (
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
    Qwen2VLImageProcessorPil,
    record_token_ids,
)
from ..models.qwen_vl import QWEN2_VL_CHAT_TEMPLATE
from .pretrain import heldout_caption_loss, pretrain
from .recipe import KINDS, BackboneConfig
from .tokenizer import build_tokenizer, special_token_ids

RECIPE_FILE = "recipe.json"


def patch_size_for(kind: str) -> int:
    return 16 if kind == "qwen3_vl" else 14


def build_processor(
    tokenizer,
    kind: str = "qwen2_vl",
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Image-only processor around ``tokenizer`` with Qwen2-VL's chat template.

    One visual token covers ``2*patch`` pixels a side (28 for Qwen2-VL, 32 for Qwen3-VL). The defaults
    (min 56², max 112² for Qwen2-VL) give 4-16 visual tokens for the 56-112 px synthetic images.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    p = patch_size_for(kind)
    unit = 2 * p
    min_pixels = min_pixels if min_pixels is not None else (2 * unit) ** 2
    max_pixels = max_pixels if max_pixels is not None else (4 * unit) ** 2
    ip = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=p,
        temporal_patch_size=2,
        merge_size=2,
    )
    cls = ImageOnlyQwen3VLProcessor if kind == "qwen3_vl" else ImageOnlyQwen2VLProcessor
    if tokenizer.chat_template is None:
        tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return cls(image_processor=ip, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2  # t gets a quarter, h and w share the rest (Qwen2-VL: 16/24/24 of 64)
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def processor_for(cfg: BackboneConfig, tokenizer):
    cfg = cfg.resolved()
    unit = 2 * patch_size_for(cfg.kind)
    side = int(math.isqrt(cfg.max_image_tokens))
    return build_processor(
        tokenizer,
        cfg.kind,
        min_pixels=min(4, cfg.max_image_tokens) * unit * unit,
        max_pixels=side * side * unit * unit,
    )


def build_micro_model(cfg: BackboneConfig, tokenizer):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``.

    Seeded with ``cfg.seed`` (same seed, same weights). Causal attention (the stock default); the
    embedder switches ``config.text_config.is_causal`` itself.
    """
    import torch

    cfg = cfg.resolved()
    ids = special_token_ids(tokenizer)
    head_dim = cfg.hidden_size // cfg.num_heads
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(head_dim),
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=4096,
        use_cache=False,
        rms_norm_eps=1e-6,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
    )
    top = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    if cfg.kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        conf = Qwen2VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(
                depth=cfg.vision_depth,
                embed_dim=cfg.vision_dim,
                hidden_size=cfg.hidden_size,
                num_heads=cfg.vision_heads,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            **top,
        )
        model = Qwen2VLForConditionalGeneration(conf)
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        conf = Qwen3VLConfig(
            text_config=dict(
                text, head_dim=head_dim, rope_parameters=dict(rope, mrope_interleaved=True)
            ),
            vision_config=dict(
                depth=cfg.vision_depth,
                hidden_size=cfg.vision_dim,
                intermediate_size=2 * cfg.vision_dim,
                num_heads=cfg.vision_heads,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                out_hidden_size=cfg.hidden_size,
                num_position_embeddings=256,
                deepstack_visual_indexes=[max(0, cfg.vision_depth // 2 - 1)]
                if cfg.vision_depth > 1
                else [0],
            ),
            **top,
        )
        model = Qwen3VLForConditionalGeneration(conf)
    _set_generation_ids(model, tokenizer)
    record_token_ids(model, tokenizer)
    return model


def _set_generation_ids(model, tokenizer):
    gc = model.generation_config
    gc.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = None


def is_complete_build(path) -> bool:
    p = Path(path)
    return (
        (p / RECIPE_FILE).is_file()
        and (p / "config.json").is_file()
        and (p / "model.safetensors").is_file()
    )


def build_backbone(
    cfg: BackboneConfig, cache_dir, *, progress: bool = True, force: bool = False
) -> Path:
    """Build (or reuse) the micro backbone of ``cfg`` under ``cache_dir/<kind>-<size>-<hash>/``.

    The directory holds ``model.safetensors`` + ``config.json`` (``save_pretrained``), the processor
    files and ``recipe.json`` (config, hash, versions, loss log, timings). It is built in a temporary
    sibling and renamed when complete, so an interrupted build leaves nothing that looks complete;
    its pre-training run (``cache_dir/.<name>.pretrain/``, removed once the build is complete)
    resumes from its newest checkpoint when the build is started again. ``force`` rebuilds from
    scratch (no resume).
    """
    import torch
    import transformers

    cfg = cfg.resolved()
    cache_dir = Path(cache_dir)
    out = cache_dir / cfg.name
    if is_complete_build(out) and not force:
        return out
    with file_lock(cache_dir / f".{cfg.name}.lock"):
        if is_complete_build(out) and not force:
            return out
        run_dir = cache_dir / f".{cfg.name}.pretrain"
        if force:
            shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.time()
        tokenizer = build_tokenizer(cfg.max_vocab, cfg.tokenizer_seed)
        processor = processor_for(cfg, tokenizer)
        model = build_micro_model(cfg, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        heldout = dict(
            n=32 if cfg.size == "test" else 128, image_size=cfg.image_size, seed=cfg.seed + 999
        )
        loss_before = heldout_caption_loss(model, processor, **heldout)
        log = (
            pretrain(model, processor, cfg, run_dir, progress=progress)
            if cfg.pretrain_steps > 0
            else []
        )
        t_train = time.time() - t0
        loss_after = (
            heldout_caption_loss(model, processor, **heldout)
            if cfg.pretrain_steps > 0
            else loss_before
        )
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            recipe = {
                "config": cfg.to_dict(),
                "hash": cfg.hash,
                "name": cfg.name,
                "params": n_params,
                "vocab_size": len(tokenizer),
                "token_ids": special_token_ids(tokenizer),
                "heldout_caption_loss": {
                    "untrained": round(loss_before, 5),
                    "pretrained": round(loss_after, 5),
                },
                "pretrain_log": log,
                "build_seconds": round(time.time() - t0, 1),
                "pretrain_seconds": round(t_train, 1),
                "torch_threads": torch.get_num_threads(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
            atomic_write_json(tmp / RECIPE_FILE, recipe)
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def read_recipe(path) -> dict:
    return read_json(Path(path) / RECIPE_FILE)


def tiny_backbone(
    cache_dir, kind: str = "qwen2_vl", *, pretrain_steps: int = 0, seed: int = 0
) -> Path:
    """Shortcut for tests of other modules: a ``test``-size build (seconds)."""
    return build_backbone(
        BackboneConfig(kind=kind, size="test", pretrain_steps=pretrain_steps, seed=seed),
        cache_dir,
        progress=False,
    )
