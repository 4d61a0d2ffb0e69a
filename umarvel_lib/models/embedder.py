"""The U-MARVEL embedder: a stock Qwen2-VL / Qwen3-VL model turned into a retrieval encoder.

(Over 400 lines: one class whose rendering, batching, forward, identity and checkpoint format all
follow one EmbedderConfig; its pure math is :mod:`.pooling`, its Qwen-VL plumbing :mod:`.qwen_vl`.)

One class (:class:`Embedder`), configured by one dataclass (:class:`EmbedderConfig`, in
:mod:`umarvel_lib.config`), saved and loaded as a self-describing directory. Every option the paper
ablates is a named field, and every piece of math is a pure, named function that the tests check
by hand. The Qwen-VL plumbing it runs on (the attention switch, position ids, chat rendering,
digests) is :mod:`.qwen_vl`; loading a checkpoint is :mod:`.loading`.

* **attention** -- :func:`~.qwen_vl.set_attention` (the only causal/bidirectional switch) at
  construction, :func:`~.qwen_vl.check_attention` before every forward.
* **pooling** -- :func:`~.pooling.masked_mean` over non-pad tokens minus the instruction span
  (:func:`~.pooling.instruction_span_mask`, both markers included), or :func:`~.pooling.last_before_token` (the hidden
  state just before ``<emb>``). Always L2-normalised; no projection head.
* **positions** -- ``"mrope"`` (Qwen-VL's own 3-D rope index) or ``"sequential"`` (the released
  code's 1-D positions), both padding-aware, so a sample's embedding does not depend on which batch
  it is in (:func:`~.qwen_vl.model_inputs`).
* **format** -- one chat format for training and evaluation: user turn = image then text, assistant
  turn = ``<emb>.``; ``generation_prompt`` (the released eval's extra ``<|im_start|>assistant\\n``)
  is an explicit switch, off by default. Query text is
  ``format_string(f"<instruction_start>{instr}<instruction_end> {txt}")``; candidates never get an
  instruction. Optional compression-prompt suffix by content type.
* **temperature** -- :class:`~.pooling.Temperature`: a raw scalar tau (init 0.05, logits = cos / tau, no clamp
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

from ..config import EmbedderConfig
from ..data.items import Item
from ..data.mbeir_records import format_string
from .input_cache import VISION_FEATURES, ItemInputs, pad_item_inputs
from .loading import PAPER_PIXELS, load_backbone, resolve_local_checkpoint, set_pixel_limits
from .pooling import (
    Temperature,
    instruction_span_mask,
    last_before_token,
    masked_mean,
    pooling_mask,
)
from .qwen_vl import (
    EMB_TOKEN,
    INSTRUCTION_END,
    INSTRUCTION_START,
    check_attention,
    image_size,
    image_token_count,
    model_inputs,
    model_type,
    move_to_device,
    processor_digest,
    render_chat,
    run_core,
    set_attention,
    token_id,
    truncate_text,
    unwrap_model,
    weights_digest,
)

#: The assistant turn of every embedder sample (U-MARVEL / LamRA).
ASSISTANT_EMB_TEXT = "<emb>."

#: Compression-prompt suffixes (U-MARVEL ``prompt1``), by content type.
COMPRESSION_SUFFIXES = {
    "image_text": "\nSummarize above image and sentence in one word: ",
    "text": "\nSummarize above sentence in one word: ",
    "image": "\nSummarize above image in one word: ",
}


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


# ---------------------------------------------------------------------------------------------
# Checkpoint helpers
# ---------------------------------------------------------------------------------------------

EMBEDDER_JSON = "embedder.json"
TEMPERATURE_FILE = "temperature.safetensors"
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The embedder
# ---------------------------------------------------------------------------------------------


class Embedder(nn.Module):
    """A stock Qwen-VL ``*ForConditionalGeneration`` (optionally LoRA-wrapped) used as an embedder.

    ``model`` is the transformers model (or a PEFT wrapper of it); ``processor`` the image-only
    Qwen-VL processor from :mod:`umarvel_lib.models.loading`. ``source`` is the directory the
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
        self.emb_id = token_id(self.tokenizer, EMB_TOKEN)
        self.instr_start_id = token_id(self.tokenizer, INSTRUCTION_START)
        self.instr_end_id = token_id(self.tokenizer, INSTRUCTION_END)
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
            image_token_count(self.processor, image_size(it)) if it.has_image else 0 for it in items
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

        Models load through :func:`~.loading.load_backbone` (micro and real Qwen2-VL / Qwen3-VL /
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
            model, processor = load_backbone(base, **load_kw)
            from .lora import load_lora

            model = load_lora(model, p / ADAPTER_DIR)
            source = base
        else:
            model, processor = load_backbone(p, **load_kw)
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
    "ASSISTANT_EMB_TEXT",
    "COMPRESSION_SUFFIXES",
    "EMBEDDER_JSON",
    "EmbedderConfig",
    "Embedder",
    "compression_suffix",
    "query_text",
]
