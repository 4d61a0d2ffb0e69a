"""Building a micro backbone: the stock transformers architecture at micro size, pre-trained and cached.

:func:`build_backbone` builds a micro model from the stock transformers classes (tokenizer from
:mod:`.tokenizer`, image-only processor from :mod:`umarvel_lib.models.loading`), pre-trains it
generatively on freshly sampled scenes (:func:`.pretrain.pretrain`, on the project's
:class:`~umarvel_lib.train.engine.Trainer`, so an interrupted build resumes from its last
checkpoint), and caches it under ``cache_dir/<kind>-<size>-<hash>/`` (built in a temporary dir,
renamed when complete). The result loads like any checkpoint, through
:func:`umarvel_lib.models.loading.load_backbone`.

The pre-training runs in a child process (``python -m umarvel_lib.micro.build RUN_DIR ...``) with
the parent's torch thread count, on the CPU, outside any ``torchrun``/``accelerate launch`` process
group and any accelerate state of the parent: as before the Trainer, a build is the same computation
wherever it is started (a notebook that already trained on a GPU, one rank of a multi-GPU launch,
``umarvel backbone``). The child rebuilds the seeded initial model, trains it and leaves the final
weights in the run directory, which the parent loads.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..io import atomic_dir, atomic_write_json, file_lock, read_json
from ..models.loading import (
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
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
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

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
    # every rank of a launch waits here while one builds: the build runs no collective
    with file_lock(cache_dir / f".{cfg.name}.lock", every_rank=True):
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
        trained = {"log": [], "resumed_from": None}
        if cfg.pretrain_steps > 0:
            trained = _pretrain_in_child(cfg, run_dir, progress=progress)
            from safetensors.torch import load_file

            from ..train.engine import load_trainable_state_dict

            load_trainable_state_dict(
                model, load_file(str(run_dir / "final" / "model.safetensors"))
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
                "pretrain_log": trained["log"],
                "pretrain_resumed_from": trained["resumed_from"],
                "build_seconds": round(time.time() - t0, 1),
                "pretrain_seconds": round(t_train, 1),
                "torch_threads": torch.get_num_threads(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
            atomic_write_json(tmp / RECIPE_FILE, recipe)
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


#: Environment variables of a torchrun / accelerate launch that the pre-training child must not see.
_LAUNCH_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _pretrain_in_child(cfg: BackboneConfig, run_dir: Path, *, progress: bool) -> dict:
    """Pre-train ``cfg``'s model in a child process (see the module docstring); returns
    ``{"log", "resumed_from"}``, the final weights are ``run_dir/final/model.safetensors``."""
    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "backbone.json", cfg.to_dict())
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(("TORCHELASTIC_", "ACCELERATE_"))
    }
    env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    # started in the directory above this copy of umarvel_lib, so that `-m` imports this copy and
    # not one that lies in the caller's working directory
    root = Path(__file__).resolve().parents[2]
    threads = str(torch.get_num_threads())
    cmd = [sys.executable, "-m", "umarvel_lib.micro.build", str(run_dir.resolve()), threads]
    rc = subprocess.run(cmd + [str(int(progress))], env=env, cwd=root).returncode
    if rc != 0:
        raise RuntimeError(
            f"pre-training {cfg.name} failed in its child process (exit status {rc}; its error is "
            f"printed above); {run_dir} keeps its checkpoints: building again resumes from the newest"
        )
    return read_json(run_dir / "pretrain.json")


def _pretrain_child(run_dir: Path, threads: int, progress: bool) -> None:
    """The child of :func:`_pretrain_in_child`: the seeded initial model, pre-trained in ``run_dir``."""
    import torch

    torch.set_num_threads(threads)
    cfg = BackboneConfig.from_dict(read_json(run_dir / "backbone.json")).resolved()
    tokenizer = build_tokenizer(cfg.max_vocab, cfg.tokenizer_seed)
    model = build_micro_model(cfg, tokenizer)
    # one pre-training per run directory at a time (a killed parent may leave its child running)
    with file_lock(run_dir.parent / f"{run_dir.name}.lock"):
        result = pretrain(model, processor_for(cfg, tokenizer), cfg, run_dir, progress=progress)
    atomic_write_json(run_dir / "pretrain.json", result)


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


if __name__ == "__main__":  # the pre-training child: RUN_DIR THREADS PROGRESS
    _pretrain_child(Path(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3])))
