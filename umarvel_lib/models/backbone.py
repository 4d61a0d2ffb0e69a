"""The MLLM backbone: one loading path for micro builds and real checkpoints, and the micro builder.

* :func:`load_backbone` loads any *local* Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory (a micro build
  from :func:`build_backbone`, Qwen2-VL-7B-Instruct, Qwen3-VL-4B, a released U-MARVEL checkpoint)
  with ``from_pretrained(..., local_files_only=True)``, makes sure U-MARVEL's added tokens exist and
  records their ids in the config. Anything that is not a local directory fails at once: nothing is
  ever downloaded.
* :func:`build_backbone` builds a micro model from the stock transformers classes (tokenizer from
  :mod:`.tokenizer`, processor without torchvision), pre-trains it generatively on freshly sampled
  scenes (next-token loss on captions given images, and on caption text), and caches it under
  ``cache_dir/<kind>-<size>-<hash>/`` (built in a temporary dir, renamed when complete).
* :func:`caption_probe` checks what the pre-trained model knows: greedy captions of held-out scenes,
  parsed back into attributes and scored against the truth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import scenes
from ..io import atomic_dir, atomic_write_json, check_safetensors, config_hash, file_lock, read_json
from .tokenizer import (
    ANSWER_TOKENS,
    EMB_TOKEN,
    INSTRUCTION_END,
    INSTRUCTION_START,
    QWEN2_VL_CHAT_TEMPLATE,
    UMARVEL_TOKENS,
    build_tokenizer,
    special_token_ids,
)

KINDS = ("qwen2_vl", "qwen3_vl")
RECIPE_FILE = "recipe.json"
RECIPE_VERSION = 2  # bump when the build procedure changes in a way that changes the weights
CAPTION_PROMPT = "Describe the image."

# ------------------------------------------------------------------------------------------------
# processor (image-only subclasses: the stock ones need torchvision for their video slot)
# ------------------------------------------------------------------------------------------------
try:  # these imports are cheap compared with the models; keep them at module level for subclassing
    from transformers import Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
except ImportError as e:  # pragma: no cover - only with a transformers too old for this kit
    raise ImportError(
        f"umarvel_lib.models.backbone needs transformers>=5 with Qwen2-VL/Qwen3-VL: {e}"
    ) from e


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _qwen25_processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

    return ImageOnlyQwen2_5_VLProcessor


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


# The paper's image budget per backbone kind (FACTS: the released vision_process MIN_PIXELS/MAX_PIXELS):
# Qwen2-VL 4*28*28 .. 300*28*28 (at most 300 visual tokens after the 2x2 merge); Qwen3-VL resets the
# maximum to 224*224. (min_pixels, max_pixels).
PAPER_PIXELS: dict[str, tuple[int, int]] = {
    "qwen2_vl": (4 * 28 * 28, 300 * 28 * 28),
    "qwen2_5_vl": (4 * 28 * 28, 300 * 28 * 28),
    "qwen3_vl": (4 * 28 * 28, 224 * 224),
}


def set_pixel_limits(processor, min_pixels: int, max_pixels: int) -> None:
    """Make ``processor`` resize every image into ``[min_pixels, max_pixels]`` (its visual-token budget)."""
    from transformers.image_utils import SizeDict

    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    ip = processor.image_processor
    ip.size = SizeDict(shortest_edge=int(min_pixels), longest_edge=int(max_pixels))
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if getattr(ip, name, None) is not None:
            setattr(ip, name, int(v))


def _model_type(path: Path) -> str | None:
    cfg = path / "config.json"
    if cfg.is_file():
        return read_json(cfg).get("model_type")
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = path / name
        if f.is_file():
            pc = read_json(f).get("processor_class", "")
            if "Qwen3" in pc:
                return "qwen3_vl"
            if "Qwen2_5" in pc:
                return "qwen2_5_vl"
            if "Qwen2" in pc:
                return "qwen2_vl"
    return None


def _require_local_dir(path) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} is not a local directory; no download is attempted; pass the path of a local "
            f"copy (e.g. a directory made with `huggingface-cli download` on a machine with network, or a micro "
            f"build from umarvel_lib.models.backbone.build_backbone)"
        )
    return p


def load_processor(path):
    """Load the processor of a local model directory through the image-only subclass.

    (``AutoProcessor.from_pretrained`` silently returns only the tokenizer without torchvision.)
    """
    p = _require_local_dir(path)
    mt = _model_type(p)
    if mt == "qwen3_vl":
        cls = ImageOnlyQwen3VLProcessor
    elif mt == "qwen2_5_vl":
        cls = _qwen25_processor_class()
    elif mt in ("qwen2_vl", None):
        cls = ImageOnlyQwen2VLProcessor
    else:
        raise ValueError(f"{p}: model_type {mt!r} is not a Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint")
    with _quiet_transformers():
        proc = cls.from_pretrained(str(p), local_files_only=True)
    if type(proc.image_processor).__name__ != "Qwen2VLImageProcessorPil":
        # real checkpoints name the torchvision processor; rebuild the PIL one from the same settings
        ip = Qwen2VLImageProcessorPil.from_pretrained(str(p), local_files_only=True)
        proc = cls(image_processor=ip, tokenizer=proc.tokenizer, chat_template=proc.chat_template)
    if proc.chat_template is None and getattr(proc.tokenizer, "chat_template", None):
        proc.chat_template = (
            proc.tokenizer.chat_template
        )  # template stored only in tokenizer_config.json
    return proc


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


# ------------------------------------------------------------------------------------------------
# configuration of a micro build
# ------------------------------------------------------------------------------------------------
# Architecture and training presets per size. "test" builds and pre-trains in seconds (for tests);
# "micro" is a few million parameters with a deeper vision tower and 112 px images so that shapes
# (14 % in the first probe at 56 px / depth 2) get learned.
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "test": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vision_depth=1,
        vision_dim=32,
        vision_heads=2,
        image_size=56,
        max_image_tokens=4,
        pretrain_steps=40,
        batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        max_vocab=2048,
    ),
    "micro": dict(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=512,
        vision_depth=4,
        vision_dim=128,
        vision_heads=4,
        image_size=112,
        max_image_tokens=16,
        pretrain_steps=2000,
        batch_size=32,
        lr=1e-3,
        warmup_steps=100,
        max_vocab=2048,
    ),
}


@dataclass(frozen=True)
class BackboneConfig:
    """Recipe of a micro backbone. ``None`` fields take the value of :data:`SIZE_PRESETS` [size].

    The cache key is a hash of :meth:`resolved` (every field filled in), so an explicit value equal
    to the preset gives the same build.
    """

    kind: str = "qwen2_vl"  # "qwen2_vl" | "qwen3_vl"
    size: str = "micro"  # "test" | "micro"
    seed: int = 0
    # architecture
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vision_depth: int | None = None
    vision_dim: int | None = None
    vision_heads: int | None = None
    max_vocab: int | None = None  # cap for the BPE vocabulary (the corpus supports ~1.1k)
    tokenizer_seed: int = 0
    # images: rendered at image_size px; the processor allows up to max_image_tokens visual tokens
    image_size: int | None = None
    max_image_tokens: int | None = None
    # generative pre-training
    pretrain_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    text_fraction: float = 0.15  # share of text-only rows (caption LM) in each batch
    grad_clip: float = 1.0
    version: int = RECIPE_VERSION

    def resolved(self) -> BackboneConfig:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.size not in SIZE_PRESETS:
            raise ValueError(f"size must be one of {tuple(SIZE_PRESETS)}, got {self.size!r}")
        fill = {k: v for k, v in SIZE_PRESETS[self.size].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **fill)
        head_dim = out.hidden_size // out.num_heads
        if head_dim % 4 or out.hidden_size % out.num_heads:
            raise ValueError(
                f"hidden_size/num_heads = {out.hidden_size}/{out.num_heads} must give a head_dim divisible by 4"
            )
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self.resolved())

    @property
    def hash(self) -> str:
        return config_hash(self.to_dict())

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.size}-{self.hash}"

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown BackboneConfig fields: {sorted(unknown)}")
        return cls(**d)


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


def record_token_ids(model, tokenizer) -> dict[str, int]:
    """Write ``emb_token_id``/``instruction_start_token_id``/``instruction_end_token_id`` into the config."""
    ids = {
        "emb_token_id": tokenizer.convert_tokens_to_ids(EMB_TOKEN),
        "instruction_start_token_id": tokenizer.convert_tokens_to_ids(INSTRUCTION_START),
        "instruction_end_token_id": tokenizer.convert_tokens_to_ids(INSTRUCTION_END),
    }
    for k, v in ids.items():
        setattr(model.config, k, v)
    return ids


def ensure_umarvel_tokens(model, tokenizer) -> dict[str, int]:
    """Add ``<emb>``, ``<instruction_start>``, ``<instruction_end>`` if missing (as U-MARVEL's loader does),
    grow the embeddings if the tokenizer outgrew them, and record the ids in ``model.config``.

    Unlike the released loader we never *shrink* the embedding matrix (Qwen2-VL pads it to 152064 rows).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in UMARVEL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing)
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:
        model.resize_token_embeddings(len(tokenizer))
    return record_token_ids(model, tokenizer)


# ------------------------------------------------------------------------------------------------
# one loading path
# ------------------------------------------------------------------------------------------------
def load_backbone(path, *, attn_implementation: str | None = None, dtype=None):
    """``(model, processor)`` from a local directory; never downloads.

    Works for micro builds and for real Qwen2-VL / Qwen2.5-VL / Qwen3-VL / U-MARVEL checkpoints. The
    U-MARVEL tokens are ensured and their ids recorded in ``model.config``.
    """
    from transformers import AutoModelForImageTextToText

    p = _require_local_dir(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} has no config.json; is it a model directory (or an incomplete build)?"
        )
    for w in sorted(
        p.glob("*.safetensors")
    ):  # a cut weight file: its name, not transformers' bare error
        check_safetensors(w)
    kw: dict[str, Any] = {"local_files_only": True}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    if dtype is not None:
        kw["dtype"] = dtype
    with _quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(str(p), **kw)
    processor = load_processor(p)
    ensure_umarvel_tokens(model, processor.tokenizer)
    model.eval()
    return model, processor


# ------------------------------------------------------------------------------------------------
# generative pre-training
# ------------------------------------------------------------------------------------------------
def chat_text(processor, prompt: str | None, answer: str | None, *, image: bool) -> str:
    """A one-turn chat: user = [image] + prompt; the assistant turn is ``answer`` or a generation prompt."""
    content: list[dict] = [{"type": "image"}] if image else []
    if prompt:
        content.append({"type": "text", "text": prompt})
    msgs = [{"role": "user", "content": content}]
    if answer is None:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)


def _assistant_labels(input_ids, attention_mask, tokenizer):
    """Labels that keep only the last assistant turn's content and its ``<|im_end|>``."""
    import torch

    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = len(tokenizer.encode("assistant\n", add_special_tokens=False))
    labels = torch.full_like(input_ids, -100)
    for i in range(input_ids.shape[0]):
        row = input_ids[i]
        starts = (row == im_start).nonzero().flatten()
        s = int(starts[-1]) + 1 + head
        ends = (row[s:] == im_end).nonzero().flatten()
        e = s + int(ends[0]) + 1 if len(ends) else int(attention_mask[i].sum())
        labels[i, s:e] = row[s:e]
    return labels


def make_caption_batch(
    processor, rng: random.Random, n: int, *, image_size: int, text_fraction: float
):
    """A batch of fresh scenes: image->caption rows and (``text_fraction``) caption-only rows.

    Returns the processor's tensors plus ``labels`` (caption tokens only) and the scenes.
    """
    texts, images, sc = [], [], []
    for _ in range(n):
        s = scenes.sample_scene(rng)
        cap = scenes.caption(s, rng)
        if rng.random() < text_fraction:
            texts.append(chat_text(processor, None, cap, image=False))
        else:
            images.append(scenes.render(s, image_size, jitter_seed=rng.randrange(1 << 30)))
            texts.append(chat_text(processor, CAPTION_PROMPT, cap, image=True))
        sc.append(s)
    batch = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    batch = dict(batch)
    batch["labels"] = _assistant_labels(
        batch["input_ids"], batch["attention_mask"], processor.tokenizer
    )
    return batch, sc


def _lm_loss(model, batch):
    out = model(**batch, use_cache=False)
    return out.loss


def pretrain(
    model, processor, cfg: BackboneConfig, *, progress: bool = True, log_every: int = 50
) -> list[dict]:
    """Next-token pre-training on captions of freshly sampled scenes. Returns the loss log.

    AdamW + linear warm-up + cosine decay, gradient clipping, everything trainable (vision tower
    included). Deterministic given ``cfg.seed`` and the number of torch threads.
    """
    import torch
    from tqdm.auto import tqdm

    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed + 1)
    rng = random.Random(f"pretrain-{cfg.seed}")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.pretrain_steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log, run, t0 = [], [], time.time()
    bar = tqdm(
        range(cfg.pretrain_steps),
        disable=not progress,
        desc=f"pretrain {cfg.kind}-{cfg.size}",
        mininterval=5.0,
    )
    for step in bar:
        batch, _ = make_caption_batch(
            processor,
            rng,
            cfg.batch_size,
            image_size=cfg.image_size,
            text_fraction=cfg.text_fraction,
        )
        loss = _lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        run.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.pretrain_steps:
            avg = sum(run) / len(run)
            log.append(
                {
                    "step": step + 1,
                    "loss": round(avg, 5),
                    "lr": sched.get_last_lr()[0],
                    "seconds": round(time.time() - t0, 1),
                }
            )
            bar.set_postfix(loss=f"{avg:.3f}")
            run = []
    model.eval()
    return log


def heldout_caption_loss(
    model,
    processor,
    *,
    n: int = 64,
    seed: int = 12345,
    image_size: int = 56,
    batch_size: int = 16,
    text_fraction: float = 0.0,
) -> float:
    """Mean per-token caption loss on held-out scenes (a seed stream disjoint from pre-training's)."""
    import torch

    rng = random.Random(f"heldout-{seed}")
    tot, cnt = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            b, _ = make_caption_batch(
                processor,
                rng,
                min(batch_size, n - start),
                image_size=image_size,
                text_fraction=text_fraction,
            )
            k = int((b["labels"][:, 1:] != -100).sum())
            tot += float(_lm_loss(model, b)) * k
            cnt += k
    return tot / max(1, cnt)


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
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
    sibling and renamed when complete, so an interrupted build leaves nothing that looks complete.
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
        t0 = time.time()
        tokenizer = build_tokenizer(cfg.max_vocab, cfg.tokenizer_seed)
        processor = processor_for(cfg, tokenizer)
        model = build_micro_model(cfg, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        heldout = dict(
            n=32 if cfg.size == "test" else 128, image_size=cfg.image_size, seed=cfg.seed + 999
        )
        loss_before = heldout_caption_loss(model, processor, **heldout)
        log = pretrain(model, processor, cfg, progress=progress) if cfg.pretrain_steps > 0 else []
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


# ------------------------------------------------------------------------------------------------
# caption probe
# ------------------------------------------------------------------------------------------------
_NUM = {w: i for i, w in enumerate(scenes.NUMBER_WORDS)}


def _phrase_table(table: dict) -> list[tuple[str, str]]:
    pairs = [(w, k) for k, words in table.items() for w in words]
    return sorted(
        pairs, key=lambda x: -len(x[0])
    )  # longest first ("tilted square" before "square")


_SHAPE_P = _phrase_table(scenes.SHAPE_WORDS)
_POS_P = _phrase_table(scenes.POS_WORDS)
_SIZE_P = _phrase_table(scenes.SIZE_WORDS)
_TEX_P = _phrase_table(scenes.TEXTURE_WORDS)


def _find(text: str, table: list[tuple[str, str]]) -> tuple[str | None, str]:
    import re

    for w, k in table:
        m = re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)
        if m:
            return k, text[: m.start()] + " " + text[m.end() :]
    return None, text


def parse_caption(text: str) -> dict:
    """Parse a generated caption back into ``{"count": int|None, "objects": [{...}]}`` (best effort)."""
    import re

    t = text.strip().lower()
    count = None
    m = re.match(r"^(\w+) objects? on an? \w+ background:\s*", t)
    if m:
        count = _NUM.get(m.group(1))
        t = t[m.end() :]
    pieces = [p for p in re.split(r";|, and |\. also | while |\.\s", t) if p.strip()]
    objs = []
    for piece in pieces:
        o: dict[str, str | None] = {}
        o["position"], rest = _find(piece, _POS_P)
        o["shape"], rest = _find(rest, _SHAPE_P)
        o["size"], rest = _find(rest, _SIZE_P)
        o["texture"], rest = _find(rest, _TEX_P)
        o["texture"] = o["texture"] or "solid"  # captions leave solid textures unnamed
        col = [c for c in scenes.COLORS if re.search(rf"\b{c}\b", rest)]
        o["color"] = col[0] if col else None
        if any(v for k, v in o.items() if k != "texture"):
            objs.append(o)
    return {"count": count, "objects": objs}


def score_caption(scene: scenes.Scene, text: str) -> dict[str, float | None]:
    """Per-attribute correctness of one generated caption (``None`` = not applicable)."""
    from itertools import permutations

    parsed = parse_caption(text)
    pred = parsed["objects"]
    by_pos = {}
    for o in pred:
        if o["position"] and o["position"] not in by_pos:
            by_pos[o["position"]] = o
    n = len(scene.objects)
    res: dict[str, Any] = {}
    # per object, the predicted object at the same position must carry the attribute
    for attr in ("color", "shape", "size", "texture"):
        hits = [float(by_pos.get(o.position, {}).get(attr) == o.get(attr)) for o in scene.objects]
        res[attr] = sum(hits) / n
    res["position"] = sum(float(o.position in by_pos) for o in scene.objects) / n
    res["color_anywhere"] = (
        sum(float(o.color in {p.get("color") for p in pred}) for o in scene.objects) / n
    )
    res["count"] = float(len(pred) == n)
    # colour+shape pair present anywhere in the caption (ignores position)
    pairs = {(o.get("color"), o.get("shape")) for o in pred}
    res["color_shape_pair"] = sum(float((o.color, o.shape) in pairs) for o in scene.objects) / n
    # binding: scenes with >=2 objects of distinct colours and shapes, where the caption names exactly the
    # right colours and shapes; is the colour-shape pairing right?
    cols, shps = [o.color for o in scene.objects], [o.shape for o in scene.objects]
    res["binding"] = None
    res["binding_chance"] = None
    if n >= 2 and len(set(cols)) == n and len(set(shps)) == n and len(pred) == n:
        if sorted(str(o["color"]) for o in pred) == sorted(cols) and sorted(
            str(o["shape"]) for o in pred
        ) == sorted(shps):
            res["binding"] = float({(o["color"], o["shape"]) for o in pred} == set(zip(cols, shps)))
            res["binding_chance"] = 1.0 / len(list(permutations(range(n))))
    return res


def _chance(attr: str, scene: scenes.Scene) -> float:
    n = len(scene.objects)
    if attr == "position":
        return n / len(scenes.POSITIONS)  # naming n random distinct positions
    if attr == "count":
        return 0.375  # sample_scene draws n from (1, 2, 2, 3): sum of p^2
    if attr == "color_anywhere":
        return 1 - (1 - 1 / len(scenes.COLORS)) ** n  # n random colour names
    if attr == "color_shape_pair":
        return 1.0 / (len(scenes.COLORS) * len(scenes.SHAPES))
    return 1.0 / len(scenes.VALUES[attr])


def generate_captions(
    model, processor, images, *, batch_size: int = 16, max_new_tokens: int = 64
) -> list[str]:
    """Greedy captions (left padding, stop at ``<|im_end|>``)."""
    import torch

    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs: list[str] = []
    try:
        prompt = chat_text(processor, CAPTION_PROMPT, None, image=True)
        model.eval()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                imgs = images[i : i + batch_size]
                b = processor(
                    text=[prompt] * len(imgs), images=imgs, padding=True, return_tensors="pt"
                )
                gen = model.generate(
                    **b,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                    pad_token_id=tok.pad_token_id,
                )
                new = gen[:, b["input_ids"].shape[1] :]
                outs.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return [o.strip() for o in outs]


def caption_probe(
    model,
    processor,
    n: int = 200,
    seed: int = 777,
    *,
    image_size: int = 112,
    untrained_model=None,
    batch_size: int = 16,
    return_captions: bool = False,
):
    """Greedy captions of ``n`` held-out scenes, scored per attribute against the truth.

    Returns a ``pandas.DataFrame`` with one row per metric (``accuracy``, ``chance``, ``n``) and, as
    extra rows, the held-out caption loss of ``model`` and of ``untrained_model`` (if given). With
    ``return_captions`` also returns the list of (canonical truth, generated) captions.

    Metrics (per true object, averaged per scene, then over scenes):
    ``color``/``shape``/``size``/``texture``: the object the caption puts at the true object's
    position has the right value (so these include colour-to-position binding); ``position``: the
    true position is named; ``count``: the caption describes exactly n objects; ``color_anywhere``:
    the colour is named somewhere; ``color_shape_pair``: the (colour, shape) pair is named anywhere;
    ``binding``: scenes with 2-3 objects of distinct colours and shapes whose caption names exactly
    the right colours and shapes: is the colour-shape pairing right (chance 1/n!)?
    Chance: a uniform guess (1/|values|); position n/5; count 0.375 (sum of p² of sample_scene's n).
    """
    import pandas as pd

    rng = random.Random(f"probe-{seed}")
    sc = [scenes.sample_scene(rng) for _ in range(n)]
    imgs = [scenes.render(s, image_size, jitter_seed=rng.randrange(1 << 30)) for s in sc]
    caps = generate_captions(model, processor, imgs, batch_size=batch_size)
    attrs = (
        "color",
        "shape",
        "position",
        "size",
        "texture",
        "count",
        "color_anywhere",
        "color_shape_pair",
        "binding",
    )
    acc: dict[str, list[float]] = {a: [] for a in attrs}
    ch: dict[str, list[float]] = {a: [] for a in attrs}
    for s, c in zip(sc, caps):
        r = score_caption(s, c)
        for a in attrs:
            if r[a] is None:
                continue
            acc[a].append(r[a])
            ch[a].append(r["binding_chance"] if a == "binding" else _chance(a, s))
    rows = [
        {
            "metric": a,
            "accuracy": (sum(acc[a]) / len(acc[a])) if acc[a] else float("nan"),
            "chance": (sum(ch[a]) / len(ch[a])) if ch[a] else float("nan"),
            "n": len(acc[a]),
        }
        for a in attrs
    ]
    loss_kw = dict(n=min(n, 128), seed=seed, image_size=image_size, batch_size=batch_size)
    rows.append(
        {
            "metric": "heldout_caption_loss",
            "accuracy": heldout_caption_loss(model, processor, **loss_kw),
            "chance": float("nan"),
            "n": loss_kw["n"],
        }
    )
    if untrained_model is not None:
        rows.append(
            {
                "metric": "heldout_caption_loss_untrained",
                "accuracy": heldout_caption_loss(untrained_model, processor, **loss_kw),
                "chance": float("nan"),
                "n": loss_kw["n"],
            }
        )
    df = pd.DataFrame(rows)
    if return_captions:
        return df, [(scenes.canonical_caption(s), c) for s, c in zip(sc, caps)]
    return df


__all__ = [
    "BackboneConfig",
    "SIZE_PRESETS",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "build_tokenizer",
    "build_processor",
    "processor_for",
    "load_processor",
    "build_micro_model",
    "ensure_umarvel_tokens",
    "record_token_ids",
    "load_backbone",
    "pretrain",
    "heldout_caption_loss",
    "make_caption_batch",
    "chat_text",
    "build_backbone",
    "tiny_backbone",
    "read_recipe",
    "is_complete_build",
    "caption_probe",
    "generate_captions",
    "parse_caption",
    "score_caption",
    "ANSWER_TOKENS",
]
