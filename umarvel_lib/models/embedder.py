"""The U-MARVEL embedder: a stock Qwen2-VL / Qwen3-VL model turned into a retrieval encoder.

One class (:class:`Embedder`), configured by one dataclass (:class:`EmbedderConfig`). Every option the
paper ablates is a named field, and every piece of math is a pure, named function that the tests check
by hand:

* **attention** -- :func:`set_attention` is the *only* place the causal/bidirectional switch is made.
  It sets ``text_config.is_causal`` (the one switch measured to work in transformers 5.x for eager and
  SDPA, padded or not; see docs/micro_scale.md "The attention switch") and refuses any attention implementation
  it was not validated on (flash-attention, flex, ...) instead of silently running causal.
  :func:`check_attention` re-validates before every forward, so a later
  ``model.set_attn_implementation(...)`` cannot slip through.
* **pooling** -- :func:`masked_mean` over non-pad tokens minus the instruction span
  (:func:`instruction_span_mask`, both markers included), or :func:`last_before_token` (the hidden
  state just before ``<emb>``). Always L2-normalised; no projection head.
* **positions** -- ``"mrope"``: Qwen2-VL's own 3-D rope index (``get_rope_index``), computed
  explicitly per batch so the cached ``rope_deltas`` state is never used; ``"sequential"``: the
  released code's 1-D positions replicated over the three M-RoPE sections (a fidelity switch).
  Both are padding-aware (pads do not advance positions), so a sample's embedding does not depend
  on which batch it is in.
* **format** -- one chat format for training and evaluation: user turn = image then text, assistant
  turn = ``<emb>.``; ``generation_prompt`` (the released eval's extra ``<|im_start|>assistant\\n``)
  is an explicit switch, off by default. Query text is
  ``format_string(f"<instruction_start>{instr}<instruction_end> {txt}")``; candidates never get an
  instruction. Optional compression-prompt suffix by content type.
* **temperature** -- :class:`Temperature`: a raw scalar tau (init 0.05, logits = cos / tau, no clamp
  by default), trainable or frozen, saved and loaded with the embedder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    ATTENTION_MODES,
    POOLING_MODES,
    POSITION_MODES,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    EmbedderConfig,
    UnsupportedAttentionError,
)
from ..data.items import Item
from ..data.mbeir_records import format_string
from .input_cache import VISION_FEATURES, ItemInputs, pad_item_inputs, vision_cacheable
from .qwen_vl import SUPPORTED_MODEL_TYPES, unwrap_model, vlm_core

# ---------------------------------------------------------------------------------------------
# Constants (the mode names and EmbedderConfig live in umarvel_lib.config, torch-free)
# ---------------------------------------------------------------------------------------------

EMB_TOKEN = "<emb>"
INSTRUCTION_START = "<instruction_start>"
INSTRUCTION_END = "<instruction_end>"
#: The assistant turn of every embedder sample (U-MARVEL / LamRA).
ASSISTANT_EMB_TEXT = "<emb>."

#: Compression-prompt suffixes (U-MARVEL ``prompt1``), by content type.
COMPRESSION_SUFFIXES = {
    "image_text": "\nSummarize above image and sentence in one word: ",
    "text": "\nSummarize above sentence in one word: ",
    "image": "\nSummarize above image in one word: ",
}

WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# Model plumbing: attention switch (unwrap_model / vlm_core: models/qwen_vl.py)
# ---------------------------------------------------------------------------------------------


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
# Pure pooling / mask functions
# ---------------------------------------------------------------------------------------------


def instruction_span_mask(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """Bool mask (B, L) of every token from ``<instruction_start>`` to ``<instruction_end>``, both included.

    Same cumulative-sum construction as the released ``get_instruction_mask``: a token is inside a
    span when more starts than ends have been seen up to it, or it is an end marker itself. A start
    without an end masks to the end of the sequence; rows without markers are all False.
    """
    is_start = (input_ids == start_id).long()
    is_end = (input_ids == end_id).long()
    depth = is_start.cumsum(-1) - is_end.cumsum(-1) + is_end
    return depth > 0


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over positions where ``mask`` (B, L) is nonzero, in float32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp(min=1e-7)


def last_before_token(hidden: torch.Tensor, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Hidden state just before the first ``token_id`` (``<emb>``) of every row, in float32."""
    hit = input_ids == token_id
    if not bool(hit.any(-1).all()):
        raise ValueError(f"token id {token_id} is missing from some rows; cannot pool 'last'")
    pos = hit.int().argmax(-1)
    if bool((pos == 0).any()):
        raise ValueError(f"token id {token_id} is the first token of a row; nothing precedes it")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos - 1].to(torch.float32)


def pooling_mask(
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    start_id: int | None,
    end_id: int | None,
    mask_instruction: bool,
) -> torch.Tensor:
    """Tokens that enter the mean: non-pad tokens, minus the instruction span when requested."""
    keep = attention_mask.bool()
    if mask_instruction and start_id is not None and end_id is not None:
        keep = keep & ~instruction_span_mask(input_ids, start_id, end_id)
    return keep


# ---------------------------------------------------------------------------------------------
# Positions
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


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def compression_suffix(has_image: bool, has_text: bool) -> str:
    if has_image and has_text:
        return COMPRESSION_SUFFIXES["image_text"]
    if has_image:
        return COMPRESSION_SUFFIXES["image"]
    return COMPRESSION_SUFFIXES["text"]


def query_text(txt: str | None, instruction: str | None) -> str:
    """``format_string(f"<instruction_start>{instr}<instruction_end> {txt}")`` (docs/recipe.md "Embedder")."""
    if instruction:
        return format_string(f"{INSTRUCTION_START}{instruction}{INSTRUCTION_END} {txt or ''}")
    return format_string(txt or "")


def truncate_text(text: str, tokenizer, max_tokens: int | None) -> str:
    """Keep at most ``max_tokens`` tokens of ``text`` (tokenise, cut, decode, as the released code)."""
    if not text or max_tokens is None or len(text.encode("utf-8")) <= max_tokens:
        return text  # byte-level BPE: never more tokens than bytes
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens])


def _token_id(tokenizer, token: str, *, required: bool = True) -> int | None:
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


def _image_size(item: Item) -> tuple[int, int] | None:
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
    if vision_cache is not None and "pixel_values" in kw:
        if vision_cacheable(core.visual):
            pixels = kw.pop("pixel_values")
            kw["mm_encoder_outputs"] = {
                "image": vision_cache.image_outputs(core, pixels, kw["image_grid_thw"])
            }
    core.rope_deltas = None  # never let a stale cached delta reach this forward
    return core(**kw, use_cache=False).last_hidden_state


# ---------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------


class Temperature(nn.Module):
    """Raw learnable temperature: ``logits = cos / tau`` (U-MARVEL ``Similarity``; init 0.05, no clamp).

    ``min_value`` (default ``None``) optionally clamps tau from below in the forward; off to match the
    released code.
    """

    def __init__(
        self, init: float = 0.05, *, trainable: bool = True, min_value: float | None = None
    ):
        super().__init__()
        self.tau = nn.Parameter(
            torch.tensor(float(init), dtype=torch.float32), requires_grad=trainable
        )
        self.min_value = min_value

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        """``cos / tau`` in float32 (a bf16 tau would round 0.05 to 0.0500488)."""
        tau = self.tau if self.min_value is None else self.tau.clamp(min=self.min_value)
        return cos.to(torch.float32) / tau

    @property
    def value(self) -> float:
        return float(self.tau.detach().cpu())

    def extra_repr(self) -> str:
        return (
            f"tau={self.value:.6g}, trainable={self.tau.requires_grad}, min_value={self.min_value}"
        )


# ---------------------------------------------------------------------------------------------
# Checkpoint helpers
# ---------------------------------------------------------------------------------------------

EMBEDDER_JSON = "embedder.json"
TEMPERATURE_FILE = "temperature.safetensors"
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1


def resolve_local_checkpoint(path: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a clear error (this kit never downloads from a hub)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve()
    s = str(path)
    looks_like_hub = (
        "/" in s and not s.startswith(("/", ".", "~")) and s.count("/") == 1
    ) or "/" not in s
    hint = (
        f"{s!r} looks like a hub id; this kit loads checkpoints from local directories only (no hub access). "
        "Download it first (e.g. `huggingface-cli download ORG/NAME --local-dir DIR` on a machine with network) "
        "and pass DIR."
        if looks_like_hub
        else f"checkpoint directory {s!r} does not exist"
    )
    raise FileNotFoundError(hint)


def _load_backbone(path: Path, **kw):
    from . import backbone  # the backbone module owns model + processor loading

    return backbone.load_backbone(path, **kw)


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


# ---------------------------------------------------------------------------------------------
# The embedder
# ---------------------------------------------------------------------------------------------


class Embedder(nn.Module):
    """A stock Qwen-VL ``*ForConditionalGeneration`` (optionally LoRA-wrapped) used as an embedder.

    ``model`` is the transformers model (or a PEFT wrapper of it); ``processor`` the image-only
    Qwen-VL processor from :mod:`umarvel_lib.models.backbone`. ``source`` is the directory the
    weights came from (needed to save a LoRA adapter next to a reference to its base).
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        cfg: EmbedderConfig | None = None,
        *,
        source: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.cfg = cfg or EmbedderConfig()
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.source = str(source) if source is not None else None
        self.temperature = Temperature(
            self.cfg.temperature_init,
            trainable=self.cfg.train_temperature,
            min_value=self.cfg.temperature_min,
        )
        self.emb_id = _token_id(self.tokenizer, EMB_TOKEN)
        self.instr_start_id = _token_id(self.tokenizer, INSTRUCTION_START)
        self.instr_end_id = _token_id(self.tokenizer, INSTRUCTION_END)
        set_attention(
            self.model, self.cfg.attention, attn_implementation=self.cfg.attn_implementation
        )
        self.temperature.to(self.device)
        self._template_cache: dict[tuple[bool, bool, bool], tuple[str, str]] = {}
        self.pixel_limits = self._apply_pixel_limits()
        self._text_budget = self.cfg.max_text_tokens
        #: per-item processor outputs and the frozen vision tower's per-image outputs, memoised
        #: (results bitwise unchanged; ``None``: the processor on every batch, the tower every time)
        self.item_inputs = ItemInputs()
        self.vision_cache = VISION_FEATURES

    def _apply_pixel_limits(self) -> tuple[int, int] | None:
        """Resize images into the configured (or the paper's, per backbone kind) pixel budget."""
        from .backbone import PAPER_PIXELS, set_pixel_limits

        if getattr(self.processor, "image_processor", None) is None:
            return None
        mn, mx = PAPER_PIXELS.get(model_type(self.model), (None, None))
        mn = self.cfg.min_pixels if self.cfg.min_pixels is not None else mn
        mx = self.cfg.max_pixels if self.cfg.max_pixels is not None else mx
        if mn is None or mx is None:
            raise ValueError(
                f"no default image budget for model_type {model_type(self.model)!r}; set "
                f"embedder.min_pixels and embedder.max_pixels"
            )
        set_pixel_limits(self.processor, mn, mx)
        return mn, mx

    @contextlib.contextmanager
    def eval_text_budget(self):
        """Within: texts are truncated to ``cfg.eval_max_text_tokens`` (None: not at all), as the
        released evaluation; training keeps ``cfg.max_text_tokens``."""
        old, self._text_budget = self._text_budget, self.cfg.eval_max_text_tokens
        try:
            yield
        finally:
            self._text_budget = old

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(unwrap_model(self.model).config.text_config.hidden_size)

    # ------------------------------------------------------------------ formatting
    def user_text(self, item: Item) -> str:
        """The text part of the user turn (instruction, truncation and compression suffix applied)."""
        txt = item.txt or None
        instr = item.instruction if self.cfg.instructions else None
        text = query_text(txt, instr) if (txt or instr) else ""
        text = truncate_text(text, self.tokenizer, self._text_budget)
        if self.cfg.compression_prompt:
            text = text + compression_suffix(item.has_image, bool(text))
        return text

    def messages(self, item: Item) -> list[dict]:
        """The 2-turn chat of one item: user = [image] + text, assistant = ``<emb>.``."""
        if not item.has_image and not (item.txt or (self.cfg.instructions and item.instruction)):
            raise ValueError(f"item has neither text nor image: {item!r}")
        content: list[dict] = []
        if item.has_image:
            content.append({"type": "image"})
        text = self.user_text(item)
        if text:
            content.append({"type": "text", "text": text})
        return [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT_EMB_TEXT}]},
        ]

    def _frame(self, has_image: bool, has_text: bool) -> tuple[str, str]:
        """Rendered chat around the user text, cached per layout (the template is rendered once)."""
        key = (has_image, has_text, bool(self.cfg.generation_prompt))
        if key not in self._template_cache:
            sentinel = "\x00UMARVEL_USER_TEXT\x00"
            content = ([{"type": "image"}] if has_image else []) + (
                [{"type": "text", "text": sentinel}] if has_text else []
            )
            msgs = [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT_EMB_TEXT}]},
            ]
            s = render_chat(self.processor, msgs, add_generation_prompt=self.cfg.generation_prompt)
            if has_text:
                if s.count(sentinel) != 1:
                    raise RuntimeError("chat template did not render the user text exactly once")
                pre, post = s.split(sentinel)
            else:
                pre, post = s, ""
            self._template_cache[key] = (pre, post)
        return self._template_cache[key]

    def render(self, item: Item) -> str:
        """The full chat string of one item (identical for training and evaluation)."""
        self.messages(item)  # validates
        text = self.user_text(item)
        pre, post = self._frame(item.has_image, bool(text))
        return pre + text + post if text else pre

    # ------------------------------------------------------------------ batching
    def collate(self, items: Sequence[Item], *, padding_side: str | None = None) -> dict:
        """Processor inputs + explicit position ids + the pooling mask for ``items`` (CPU tensors)."""
        if not items:
            raise ValueError("collate() needs at least one item")
        enc = self._processor_inputs(items, padding_side)
        batch = model_inputs(self.model, enc, positions=self.cfg.positions)
        batch["pool_mask"] = pooling_mask(
            batch["attention_mask"],
            batch["input_ids"],
            start_id=self.instr_start_id,
            end_id=self.instr_end_id,
            mask_instruction=self.cfg.instruction_mask,
        )
        return batch

    def _processor_inputs(self, items: Sequence[Item], padding_side: str | None) -> dict:
        """The processor's padded batch for ``items``, assembled from per-item outputs memoised in
        :attr:`item_inputs` (bitwise what ``processor(text=texts, images=images, padding=True)``
        gives; ``tests/test_input_cache.py``)."""
        texts = [self.render(it) for it in items]
        if self.item_inputs is None:  # no memo: the processor on the whole batch
            kw: dict[str, Any] = dict(text=texts, padding=True, return_tensors="pt")
            images = [it.load_image() for it in items if it.has_image]
            if images:
                kw["images"] = images
            if padding_side is not None:
                kw["padding_side"] = padding_side
            return dict(self.processor(**kw))
        digest = processor_digest(self.processor)
        encs = self.item_inputs.encode(self.processor, digest, texts, list(items))
        side = padding_side or getattr(self.tokenizer, "padding_side", None) or "right"
        return pad_item_inputs(encs, pad_id=self.tokenizer.pad_token_id, padding_side=side)

    def pooled_tokens(self, item: Item) -> list[dict]:
        """One item's tokens as the model sees them (the rendered chat prompt, visual tokens included):
        ``token``, ``instruction`` (inside the ``<instruction_start>..<instruction_end>`` span) and
        ``pooled`` (enters the embedding: the :func:`pooling_mask` of :meth:`collate` for mean pooling,
        the token before ``<emb>`` for last-token pooling)."""
        batch = self.collate([item])
        ids = batch["input_ids"][0]
        span = (
            instruction_span_mask(batch["input_ids"], self.instr_start_id, self.instr_end_id)[0]
            if self.instr_start_id is not None and self.instr_end_id is not None
            else torch.zeros_like(ids, dtype=torch.bool)
        )
        if self.cfg.pooling == "mean":
            pooled = batch["pool_mask"][0].bool()
        else:
            pooled = torch.zeros_like(ids, dtype=torch.bool)
            pooled[int((ids == self.emb_id).int().argmax()) - 1] = True
        toks = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        return [
            {"token": t, "instruction": bool(i), "pooled": bool(p)}
            for t, i, p in zip(toks, span.tolist(), pooled.tolist())
        ]

    def lengths(self, items: Sequence[Item]) -> np.ndarray:
        """Approximate token length of every item (text tokens + visual tokens), for bucketing."""
        texts = [self.render(it) for it in items]
        n_txt = [len(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        n_img = [
            image_token_count(self.processor, _image_size(it)) if it.has_image else 0
            for it in items
        ]
        return np.asarray(n_txt, dtype=np.int64) + np.asarray(n_img, dtype=np.int64)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> torch.Tensor:
        """L2-normalised embeddings (B, D) in float32, with grad (training path)."""
        check_attention(self.model, self.cfg.attention)
        batch = move_to_device(batch, self.device)
        h = run_core(self.model, batch, vision_cache=self.vision_cache)
        if self.cfg.pooling == "mean":
            pooled = masked_mean(h, batch["pool_mask"])
        else:
            pooled = last_before_token(h, batch["input_ids"], self.emb_id)
        return F.normalize(pooled, dim=-1)

    def similarity_logits(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``(q @ d.T) / tau`` for normalised embeddings."""
        return self.temperature(q @ d.T)

    @torch.no_grad()
    def encode(
        self,
        items: Sequence[Item],
        batch_size: int = 32,
        progress: bool = True,
        *,
        sort_by_length: bool = True,
        desc: str = "encode",
    ) -> np.ndarray:
        """Embeddings (N, D) float32, row i for ``items[i]``.

        Length-bucketed (sorted by length, longest first, order restored), no grad, eval mode,
        bf16 autocast on CUDA, a ``tqdm.auto`` bar updated at most every ~5 s. Texts are truncated
        to ``cfg.eval_max_text_tokens`` (default: not at all, as the released evaluation).
        """
        n = len(items)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        with self.eval_text_budget():
            return self._encode(items, out, batch_size, progress, sort_by_length, desc)

    def _encode(self, items, out, batch_size, progress, sort_by_length, desc) -> np.ndarray:
        from tqdm.auto import tqdm

        n = len(items)
        order = np.argsort(-self.lengths(items), kind="stable") if sort_by_length else np.arange(n)
        dev = self.device
        use_autocast = dev.type == "cuda" and self.cfg.autocast_bf16
        was_training = self.training
        self.eval()
        try:
            with tqdm(
                total=n, desc=desc, disable=not progress, mininterval=5.0, unit="item"
            ) as bar:
                for s in range(0, n, batch_size):
                    idx = order[s : s + batch_size]
                    batch = self.collate([items[i] for i in idx])
                    with torch.autocast(
                        device_type="cuda", dtype=torch.bfloat16, enabled=use_autocast
                    ):
                        emb = self.forward(batch)
                    out[idx] = emb.float().cpu().numpy()
                    bar.update(len(idx))
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """Stable hash of (weights content, processor, EmbedderConfig, tau): the eval cache key."""
        h = hashlib.sha256()
        h.update(b"umarvel-embedder/v1|")
        h.update(type(unwrap_model(self.model)).__name__.encode())
        h.update(weights_digest(self.model).encode())
        h.update(processor_digest(self.processor).encode())
        h.update(json.dumps(self.cfg.to_dict(), sort_keys=True, default=str).encode())
        h.update(np.float32(self.temperature.value).tobytes())
        return h.hexdigest()[:16]

    def config_hash(self) -> str:
        """Short hash of the EmbedderConfig alone (recorded next to :meth:`fingerprint` by eval)."""
        from ..io import config_hash

        return config_hash(self.cfg)

    # ------------------------------------------------------------------ LoRA
    def apply_lora(self, r: int, alpha: int, dropout: float = 0.05, **kw) -> Embedder:
        from .lora import apply_lora

        self.model = apply_lora(self.model, r=r, alpha=alpha, dropout=dropout, **kw)
        set_attention(self.model, self.cfg.attention)
        return self

    def merge_lora(self) -> Embedder:
        from .lora import merge_lora

        self.model = merge_lora(self.model)
        set_attention(self.model, self.cfg.attention)
        return self

    @property
    def is_lora(self) -> bool:
        return type(self.model).__module__.startswith("peft")

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write a self-describing checkpoint directory (atomically).

        Plain model: ``model.safetensors`` + ``config.json`` + processor files (the directory is itself
        a backbone that ``load_backbone`` reads) + ``temperature.safetensors`` + ``embedder.json``.
        LoRA-wrapped model: the PEFT adapter under ``adapter/`` and ``embedder.json`` pointing at the
        base checkpoint (``source``); merge first (:meth:`merge_lora`) for a standalone directory.
        """
        from safetensors.torch import save_file

        from ..io import atomic_dir, atomic_write_json

        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "tau": self.temperature.value,
            "model_type": model_type(self.model),
        }
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            if self.is_lora:
                if self.source is None:
                    raise ValueError(
                        "cannot save a LoRA embedder without a base checkpoint path (source); "
                        "merge_lora() first or build the embedder with from_pretrained()"
                    )
                meta["base"] = self.source
                from .lora import save_lora

                save_lora(self.model, tmp / ADAPTER_DIR)
            else:
                unwrap_model(self.model).save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
            save_file(
                {"tau": self.temperature.tau.detach().cpu().contiguous()},
                str(tmp / TEMPERATURE_FILE),
            )
            atomic_write_json(tmp / EMBEDDER_JSON, meta)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        cfg: EmbedderConfig | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Embedder:
        """Load an embedder saved by :meth:`save`, or wrap a backbone checkpoint directory.

        Models load through ``backbone.load_backbone(path)`` (micro and real Qwen2-VL / Qwen3-VL /
        released U-MARVEL checkpoints alike). ``cfg`` overrides the saved config; tau comes from the
        saved ``temperature.safetensors`` when present, else ``cfg.temperature_init``. A hub id
        without local files is refused with a clear error.
        """
        from safetensors.torch import load_file

        p = resolve_local_checkpoint(path)
        meta = None
        if (p / EMBEDDER_JSON).is_file():
            from ..io import read_json

            meta = read_json(p / EMBEDDER_JSON)
            if cfg is None:
                cfg = EmbedderConfig.from_dict(meta["config"])
        cfg = cfg or EmbedderConfig()
        load_kw = dict(attn_implementation=cfg.attn_implementation, dtype=dtype)
        if meta is not None and meta.get("base"):
            base = resolve_local_checkpoint(meta["base"])
            model, processor = _load_backbone(base, **load_kw)
            from .lora import load_lora

            model = load_lora(model, p / ADAPTER_DIR)
            source = base
        else:
            model, processor = _load_backbone(p, **load_kw)
            source = p
        if device is not None:
            model = model.to(device)
        emb = cls(model, processor, cfg, source=source)
        if (p / TEMPERATURE_FILE).is_file():
            from ..io import check_safetensors

            check_safetensors(p / TEMPERATURE_FILE)
            tau = load_file(str(p / TEMPERATURE_FILE))["tau"]
            with torch.no_grad():
                emb.temperature.tau.copy_(tau.to(emb.temperature.tau.dtype))
        emb.temperature.to(emb.device)
        return emb


__all__ = [
    "ATTENTION_MODES",
    "POOLING_MODES",
    "POSITION_MODES",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "COMPRESSION_SUFFIXES",
    "UnsupportedAttentionError",
    "EmbedderConfig",
    "Embedder",
    "Temperature",
    "set_attention",
    "check_attention",
    "attention_mode",
    "unwrap_model",
    "vlm_core",
    "instruction_span_mask",
    "masked_mean",
    "last_before_token",
    "pooling_mask",
    "sequential_position_ids",
    "mrope_position_ids",
    "model_inputs",
    "run_core",
    "compression_suffix",
    "query_text",
    "truncate_text",
    "render_chat",
    "weights_digest",
    "model_type",
    "move_to_device",
    "resolve_local_checkpoint",
]
