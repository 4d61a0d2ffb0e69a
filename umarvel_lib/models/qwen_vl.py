"""Qwen-VL plumbing shared by the embedder, the reranker and LoRA (the bottom of :mod:`umarvel_lib.models`).

* **tokens and chat** -- Qwen2-VL's special tokens and chat template, U-MARVEL's added tokens,
  :func:`render_chat`, :func:`truncate_text`, :func:`token_id`.
* **model** -- :func:`unwrap_model` (PEFT), :func:`vlm_core`, :func:`model_type`.
* **attention** -- :func:`set_attention` is the *only* place the causal/bidirectional switch is made.
  It sets ``text_config.is_causal`` (the one switch measured to work in transformers 5.x for eager
  and SDPA, padded or not; see docs/micro_scale.md "The attention switch") and refuses any attention
  implementation it was not validated on (flash-attention, flex, ...) instead of silently running
  causal. :func:`check_attention` re-validates before every forward, so a later
  ``model.set_attn_implementation(...)`` cannot slip through.
* **positions** -- ``"mrope"``: Qwen-VL's own 3-D rope index (``get_rope_index``), computed
  explicitly per batch so the cached ``rope_deltas`` state is never used; ``"sequential"``: the
  released code's 1-D positions replicated over the three M-RoPE sections (a fidelity switch).
  Both are padding-aware (pads do not advance positions). :func:`model_inputs` turns a processor
  output into language-model inputs, :func:`run_core` runs the VLM core without the lm_head (the
  frozen vision tower's outputs optionally from the memo of :mod:`.input_cache`, the one model
  module imported here).
* **digests** -- :func:`weights_digest` and :func:`processor_digest` (the embedder's fingerprint).

Loading a checkpoint (processors, pixel budget, U-MARVEL tokens) is :mod:`.loading`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..config import (
    ATTENTION_MODES,
    POSITION_MODES,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    UnsupportedAttentionError,
)
from ..data.items import Item
from .input_cache import vision_cacheable

#: Architectures the attention switch, the rope index and the LoRA target rule were validated on.
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen3_vl")

# ---------------------------------------------------------------------------------------------
# Tokens and chat
# ---------------------------------------------------------------------------------------------
# Qwen2-VL's special tokens, in the order they get ids 0..6 in our vocabulary.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",  # pad (Qwen2-VL uses it as pad)
    "<|im_start|>",
    "<|im_end|>",  # eos of a chat turn
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# U-MARVEL's added tokens (plain added tokens in the released loader, not special ones).
EMB_TOKEN = "<emb>"
INSTRUCTION_START = "<instruction_start>"
INSTRUCTION_END = "<instruction_end>"
UMARVEL_TOKENS = (EMB_TOKEN, INSTRUCTION_START, INSTRUCTION_END)
# Single-token answers for the pointwise reranker.
YES_TOKEN, NO_TOKEN = "Yes", "No"
ANSWER_TOKENS = (YES_TOKEN, NO_TOKEN)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL-Instruct's chat template (image and video parts, optional "Picture N: " ids).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def truncate_text(text: str, tokenizer, max_tokens: int | None) -> str:
    """Keep at most ``max_tokens`` tokens of ``text`` (tokenise, cut, decode, as the released code)."""
    if not text or max_tokens is None or len(text.encode("utf-8")) <= max_tokens:
        return text  # byte-level BPE: never more tokens than bytes
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens])


def token_id(tokenizer, token: str, *, required: bool = True) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (
        unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None)
    ):
        if required:
            raise ValueError(
                f"the tokenizer has no {token!r} token; the backbone loader must add U-MARVEL's tokens "
                f"({EMB_TOKEN}, {INSTRUCTION_START}, {INSTRUCTION_END}) and resize the embeddings"
            )
        return None
    return int(tid)


def render_chat(processor, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with the processor's (or its tokenizer's) chat template, untokenised."""
    owner = (
        processor
        if getattr(processor, "chat_template", None)
        else getattr(processor, "tokenizer", processor)
    )
    return owner.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def move_to_device(batch: dict, device: torch.device) -> dict:
    """The tensors of a collated batch on ``device`` (other values as they are)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def image_token_count(processor, image_size: tuple[int, int] | None) -> int:
    """Visual tokens an image of ``(width, height)`` becomes (0 when unknown)."""
    if image_size is None:
        return 0
    ip = getattr(processor, "image_processor", None)
    fn = getattr(ip, "get_number_of_image_patches", None)
    if fn is None:
        return 0
    w, h = image_size
    merge = getattr(ip, "merge_size", 2) or 2
    try:
        return int(fn(h, w, {})) // (merge * merge)
    except Exception:  # noqa: BLE001 - length is only a bucketing hint
        return 0


def image_size(item: Item) -> tuple[int, int] | None:
    """``(width, height)`` of an item's image (read from the file header when not loaded), or None."""
    if item.image is not None:
        return item.image.size
    if item.image_path is None:
        return None
    try:
        from PIL import Image

        with Image.open(item.image_path) as im:  # reads the header only
            return im.size
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Model and attention switch
# ---------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``*ForConditionalGeneration`` under a PEFT wrapper (or the model itself).

    Under PEFT the LoRA layers are injected into the returned modules, so calling them runs the
    adapter.
    """
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def vlm_core(model: nn.Module) -> nn.Module:
    """The ``Qwen2VLModel`` / ``Qwen3VLModel`` (vision tower + language model, no lm_head)."""
    base = unwrap_model(model)
    core = getattr(base, "model", None)
    if core is None or not hasattr(core, "language_model") or not hasattr(core, "get_rope_index"):
        raise UnsupportedAttentionError(
            f"{type(base).__name__} is not a supported Qwen-VL model (expected `.model.language_model` "
            f"and `.model.get_rope_index`); supported model types: {SUPPORTED_MODEL_TYPES}"
        )
    return core


def _text_configs(model: nn.Module) -> list:
    """Every config object the language model may read ``is_causal`` from (usually one object)."""
    base = unwrap_model(model)
    cfgs = [base.config.text_config]
    lm_cfg = vlm_core(model).language_model.config
    if lm_cfg is not cfgs[0]:
        cfgs.append(lm_cfg)
    return cfgs


def model_type(model: nn.Module) -> str:
    """``config.model_type`` of the (unwrapped) model, ``"?"`` when it has none."""
    return getattr(unwrap_model(model).config, "model_type", "?")


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the language model will use."""
    cfg = _text_configs(model)[-1]
    impl = getattr(cfg, "_attn_implementation", None)
    return impl if impl is not None else "eager"


def _validate_backend(model: nn.Module) -> None:
    mt = model_type(model)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedAttentionError(
            f"model_type {mt!r} is not supported by set_attention (validated on {SUPPORTED_MODEL_TYPES})"
        )
    impls = {getattr(c, "_attn_implementation", None) or "eager" for c in _text_configs(model)}
    bad = sorted(i for i in impls if i not in SUPPORTED_ATTN_IMPLEMENTATIONS)
    if bad:
        raise UnsupportedAttentionError(
            f"attention implementation {bad[0]!r} is not supported: only {SUPPORTED_ATTN_IMPLEMENTATIONS} "
            "were validated to honour the causal/bidirectional switch (flash-attention kernels are causal "
            "by construction and would silently turn a bidirectional embedder causal). Load the model with "
            "attn_implementation='sdpa' or 'eager', or call model.set_attn_implementation('sdpa')."
        )


def set_attention(
    model: nn.Module, mode: str, *, attn_implementation: str | None = None
) -> nn.Module:
    """THE switch between causal and bidirectional attention (idempotent; returns ``model``).

    Sets ``text_config.is_causal`` (transformers' ``create_causal_mask`` then builds a bidirectional
    mask that still masks padded keys, and the ``is_causal`` forward default reaches the SDPA call even
    when no mask is built), and mirrors it on every language-model attention module. The vision tower
    is not touched. Raises :class:`UnsupportedAttentionError` for untested architectures or attention
    implementations.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if attn_implementation is not None:
        if attn_implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise UnsupportedAttentionError(
                f"attention implementation {attn_implementation!r} is not supported; use one of "
                f"{SUPPORTED_ATTN_IMPLEMENTATIONS}"
            )
        unwrap_model(model).set_attn_implementation(attn_implementation)
    _validate_backend(model)
    causal = mode == "causal"
    for cfg in _text_configs(model):
        cfg.is_causal = causal
    for layer in vlm_core(model).language_model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "is_causal"):
            attn.is_causal = causal
    check_attention(model, mode)
    return model


def attention_mode(model: nn.Module) -> str:
    """``"causal"`` or ``"bidirectional"`` as the language model will actually run."""
    return "causal" if getattr(_text_configs(model)[-1], "is_causal", True) else "bidirectional"


def check_attention(model: nn.Module, mode: str) -> None:
    """Raise unless the model runs ``mode`` attention on a validated backend (cheap; every forward)."""
    _validate_backend(model)
    flags = {bool(getattr(c, "is_causal", True)) for c in _text_configs(model)}
    if flags != {mode == "causal"}:
        raise RuntimeError(
            f"the model's attention is {attention_mode(model)!r} but {mode!r} was configured; "
            "call set_attention(model, mode) (the only supported switch)"
        )


# ---------------------------------------------------------------------------------------------
# Positions and the forward of the VLM core
# ---------------------------------------------------------------------------------------------


def sequential_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions over non-pad tokens (pads get 0), replicated over the 3 M-RoPE sections: (3, B, L).

    The released code's positions (no 2-D image positions); padding-aware so left and right padding
    give the same result.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos.unsqueeze(0).expand(3, -1, -1).contiguous()


def mrope_position_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Qwen-VL's own 3-D rope index (3, B, L), computed explicitly (no cached ``rope_deltas``)."""
    if mm_token_type_ids is None:
        mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
    pos, _ = vlm_core(model).get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return pos


def model_inputs(model: nn.Module, enc: dict, *, positions: str) -> dict:
    """Language-model inputs for a processor output: explicit position ids, no cached rope state."""
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    grid = enc.get("image_grid_thw")
    mm = enc.get("mm_token_type_ids")
    has_image = grid is not None and "pixel_values" in enc
    if has_image and mm is None:
        mm = (input_ids == unwrap_model(model).config.image_token_id).int()
    if positions == "mrope":
        pos = mrope_position_ids(model, input_ids, attention_mask, mm, grid if has_image else None)
    elif positions == "sequential":
        pos = sequential_position_ids(attention_mask)
    else:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": pos}
    if has_image:
        out.update(pixel_values=enc["pixel_values"], image_grid_thw=grid, mm_token_type_ids=mm)
    return out


def run_core(model: nn.Module, batch: dict, *, vision_cache=None) -> torch.Tensor:
    """Last hidden states (B, L, H) of the VLM core (no lm_head), ``use_cache=False``.

    ``vision_cache`` (an :class:`~.input_cache.VisionFeatures`): take the frozen vision tower's
    per-image outputs from it (transformers' ``mm_encoder_outputs``) instead of running the tower on
    the batch's pixels; used only while the tower is frozen (:func:`~.input_cache.vision_cacheable`)."""
    core = vlm_core(model)
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
        if batch.get(k) is not None and batch.get("pixel_values") is not None:
            kw[k] = batch[k]
    if vision_cache is not None and "pixel_values" in kw and vision_cacheable(core.visual):
        pixels = kw.pop("pixel_values")
        kw["mm_encoder_outputs"] = {
            "image": vision_cache.image_outputs(core, pixels, kw["image_grid_thw"])
        }
    core.rope_deltas = None  # never let a stale cached delta reach this forward
    return core(**kw, use_cache=False).last_hidden_state


# ---------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------


def _tensor_digest(h, name: str, t: torch.Tensor, sample: int = 4096) -> None:
    t = t.detach()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.reshape(-1)
    n = flat.numel()
    if n > 4 * sample:
        idx = torch.linspace(0, n - 1, sample, device=flat.device).long()
        flat = flat[idx]
    h.update(flat.to(torch.float32).cpu().numpy().tobytes())


def weights_digest(model: nn.Module) -> str:
    """Content hash of a model's weights (every tensor's name, shape, dtype and a strided sample).

    Deterministic, device-independent, and cheap enough for 7B models (about 4k values per tensor);
    LoRA matrices and other small tensors are hashed in full.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        _tensor_digest(h, name, t)
    return h.hexdigest()


def processor_digest(processor) -> str:
    tok = getattr(processor, "tokenizer", processor)
    info: dict[str, Any] = {
        "vocab": len(tok),
        "chat_template": getattr(processor, "chat_template", None)
        or getattr(tok, "chat_template", None),
    }
    ip = getattr(processor, "image_processor", None)
    if ip is not None:
        d = ip.to_dict() if hasattr(ip, "to_dict") else {}
        info["image_processor"] = {
            k: d.get(k) for k in sorted(d) if k not in ("processor_class", "_processor_class")
        }
    blob = json.dumps(info, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
