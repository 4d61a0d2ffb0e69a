"""Generative pointwise reranker (U-MARVEL+ / distillation teacher; docs/recipe.md "Stages", Reranker).

The same stock Qwen-VL ``*ForConditionalGeneration`` as the embedder, run **causally**, asked whether a
candidate meets a query and scored by ``P(Yes) = softmax([logit_Yes, logit_No])[0]`` at the first answer
token. Training is next-token cross-entropy on that answer token only (labels are -100 everywhere else).

Prompt (one user turn, then the assistant answer):
``RERANK_PROMPT`` + ``"Query:"`` + [image] + query text + ``"Candidate:"`` + [image] + candidate text.
The query text carries the task instruction without marker tokens,
``format_string(f"{instruction} {txt}")``; texts are truncated to ``max_text_tokens`` (256, as released).
The released prompt string has a source-code line continuation inside it (a run of spaces after
"candidate"); we use the clean single-space sentence.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.items import Item
from ..data.mbeir_records import format_string
from .input_cache import VISION_FEATURES
from .loading import load_backbone, resolve_local_checkpoint
from .qwen_vl import (
    NO_TOKEN,
    YES_TOKEN,
    check_attention,
    model_inputs,
    model_type,
    move_to_device,
    render_chat,
    run_core,
    set_attention,
    truncate_text,
    unwrap_model,
)

RERANK_PROMPT = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the "
    "requirements of the query. If it does, respond with 'Yes'; if it doesn't, responed with 'No'."
)
YES, NO = YES_TOKEN, NO_TOKEN
RERANKER_JSON = "reranker.json"


# ---- fusion of the embedding score with P(Yes): the teacher of stage 5 and the U-MARVEL+ reranking ----
#: Reranker fusion weights per M-BEIR row (docs/recipe.md, Distillation): w = 1 except MSCOCO t→i 0.5 and i→t 0.1.
DEFAULT_FUSION_WEIGHTS: Mapping[str, float] = {"mscoco_task0": 0.5, "mscoco_task3": 0.1}


def fusion_weights(
    tasks: Sequence[str],
    weights: Mapping[str, float] | None = None,
    *,
    default: float = 1.0,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Per-query fusion weight ``w`` from each query's row name (e.g. ``"mscoco_task0"``).

    A ``syn_`` prefix (synthetic rows) is ignored for the lookup.
    """
    weights = DEFAULT_FUSION_WEIGHTS if weights is None else weights
    out = [float(weights.get(t, weights.get(t.removeprefix("syn_"), default))) for t in tasks]
    return torch.tensor(out, device=device, dtype=dtype)


def fused_teacher(cos: torch.Tensor, p_yes: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Teacher score ``(cos + w·P(Yes)) / 2`` (docs/recipe.md, Distillation).

    ``cos`` and ``p_yes`` are ``(B, N)``; ``w`` is a float or a per-query ``(B,)`` tensor (see
    :func:`fusion_weights`). With ``w = 1`` this is ``0.5·cos + 0.5·P(Yes)``.
    """
    if cos.shape != p_yes.shape:
        raise ValueError(
            f"cos and p_yes must have the same shape, got {tuple(cos.shape)} / {tuple(p_yes.shape)}"
        )
    if isinstance(w, torch.Tensor) and w.ndim == 1:
        w = w.to(cos.dtype).unsqueeze(-1)
    return (cos + w * p_yes) / 2


@dataclass
class RerankerConfig:
    max_text_tokens: int | None = 256
    instructions: bool = True  # the query text carries its instruction (no marker tokens)
    positions: str = "mrope"
    attn_implementation: str | None = None
    autocast_bf16: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{word!r} is {len(ids)} tokens in this tokenizer; the reranker needs it as one token"
        )
    return int(ids[0])


class Reranker(nn.Module):
    """Pointwise Yes/No reranker over a causal Qwen-VL model (kept separate from the embedder's model)."""

    def __init__(
        self, model: nn.Module, processor, cfg: RerankerConfig | None = None, *, source=None
    ):
        super().__init__()
        self.cfg = cfg or RerankerConfig()
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.source = str(source) if source is not None else None
        self.yes_id = _single_token_id(self.tokenizer, YES)
        self.no_id = _single_token_id(self.tokenizer, NO)
        set_attention(self.model, "causal", attn_implementation=self.cfg.attn_implementation)
        #: the frozen vision tower's per-image outputs, memoised (scores bitwise unchanged; None: off)
        self.vision_cache = VISION_FEATURES

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ formatting
    def _text(self, item: Item, *, query: bool) -> str:
        instr = item.instruction if (query and self.cfg.instructions) else None
        txt = format_string(f"{instr} {item.txt or ''}") if instr else format_string(item.txt or "")
        return truncate_text(txt, self.tokenizer, self.cfg.max_text_tokens)

    def messages(self, query: Item, cand: Item, answer: str | None = None) -> list[dict]:
        content: list[dict] = [
            {"type": "text", "text": RERANK_PROMPT},
            {"type": "text", "text": "Query:"},
        ]
        for it, is_q in ((query, True), (cand, False)):
            if not is_q:
                content.append({"type": "text", "text": "Candidate:"})
            if it.has_image:
                content.append({"type": "image"})
            t = self._text(it, query=is_q)
            if t:
                content.append({"type": "text", "text": t})
        msgs = [{"role": "user", "content": content}]
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return msgs

    def collate(
        self, pairs: Sequence[tuple[Item, Item]], labels: Sequence[bool] | None = None
    ) -> dict:
        """Batch of (query, candidate) pairs.

        Without ``labels``: scoring prompts ending in the generation prompt (``score_index`` = last real
        token). With ``labels`` (True = relevant): training sequences whose assistant turn is Yes/No;
        ``labels`` tensor is -100 everywhere but the answer token.
        """
        if not pairs:
            raise ValueError("collate() needs at least one pair")
        texts, images = [], []
        for i, (q, c) in enumerate(pairs):
            ans = None if labels is None else (YES if labels[i] else NO)
            texts.append(
                render_chat(
                    self.processor, self.messages(q, c, ans), add_generation_prompt=ans is None
                )
            )
            images += [it.load_image() for it in (q, c) if it.has_image]
        kw: dict[str, Any] = dict(text=texts, padding=True, return_tensors="pt")
        if images:
            kw["images"] = images
        enc = dict(self.processor(**kw))
        batch = model_inputs(self.model, enc, positions=self.cfg.positions)
        ids, am = batch["input_ids"], batch["attention_mask"]
        if labels is None:
            # right or left padding: the last real token is the one whose logits answer
            last = (
                torch.where(am.bool(), torch.arange(ids.shape[1]).expand_as(ids), -1).max(1).values
            )
            batch["score_index"] = last
        else:
            target = torch.tensor([self.yes_id if y else self.no_id for y in labels])
            is_ans = ((ids == self.yes_id) | (ids == self.no_id)) & am.bool()
            pos = torch.where(is_ans, torch.arange(ids.shape[1]).expand_as(ids), -1).max(1).values
            if bool((pos < 0).any()) or bool((ids[torch.arange(len(pos)), pos] != target).any()):
                raise RuntimeError(
                    "could not locate the Yes/No answer token in a rendered training sequence"
                )
            lab = torch.full_like(ids, -100)
            lab[torch.arange(len(pos)), pos] = target
            batch["labels"] = lab
        return batch

    # ------------------------------------------------------------------ math
    def _logits_at(self, batch: dict, index: torch.Tensor) -> torch.Tensor:
        check_attention(self.model, "causal")
        h = run_core(self.model, batch, vision_cache=self.vision_cache)
        rows = torch.arange(h.shape[0], device=h.device)
        return unwrap_model(self.model).lm_head(h[rows, index.to(h.device)]).float()  # (B, V)

    def loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the answer token (the only label that is not -100), mean over the batch."""
        batch = move_to_device(batch, self.device)
        lab = batch["labels"]
        if not bool(((lab != -100).sum(1) == 1).all()):
            raise ValueError("each row must carry exactly one answer label")
        pos = (lab != -100).int().argmax(1)
        logits = self._logits_at(batch, pos - 1)  # the token before the answer predicts it
        return F.cross_entropy(logits, lab[torch.arange(lab.shape[0], device=lab.device), pos])

    def yes_no_logits(self, batch: dict) -> torch.Tensor:
        batch = move_to_device(batch, self.device)
        logits = self._logits_at(batch, batch["score_index"])
        return logits[:, [self.yes_id, self.no_id]]

    @torch.no_grad()
    def p_yes(
        self, pairs: Sequence[tuple[Item, Item]], batch_size: int = 16, progress: bool = False
    ) -> np.ndarray:
        """``P(Yes)`` for every (query, candidate) pair: softmax over the [Yes, No] logits of the first answer token."""
        from tqdm.auto import tqdm

        out = np.empty(len(pairs), dtype=np.float32)
        dev = self.device
        was_training = self.training
        self.eval()
        try:
            with tqdm(
                total=len(pairs), disable=not progress, mininterval=5.0, desc="rerank"
            ) as bar:
                for s in range(0, len(pairs), batch_size):
                    b = self.collate(pairs[s : s + batch_size])
                    with torch.autocast(
                        device_type="cuda",
                        dtype=torch.bfloat16,
                        enabled=dev.type == "cuda" and self.cfg.autocast_bf16,
                    ):
                        yn = self.yes_no_logits(b)
                    out[s : s + len(yn)] = torch.softmax(yn.float(), -1)[:, 0].cpu().numpy()
                    bar.update(len(yn))
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Weights + processor + ``reranker.json`` (a plain model: ``lora.merge_lora`` an adapter first)."""
        from ..io import atomic_dir, atomic_write_json

        if type(self.model).__module__.startswith("peft"):
            raise ValueError("merge the LoRA adapter (lora.merge_lora) before saving the reranker")
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            atomic_write_json(
                tmp / RERANKER_JSON,
                {"config": self.cfg.to_dict(), "model_type": model_type(self.model)},
            )
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        cfg: RerankerConfig | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Reranker:
        p = resolve_local_checkpoint(path)
        if cfg is None and (p / RERANKER_JSON).is_file():
            from ..io import read_json

            cfg = RerankerConfig(**read_json(p / RERANKER_JSON)["config"])
        cfg = cfg or RerankerConfig()
        model, processor = load_backbone(
            p, attn_implementation=cfg.attn_implementation, dtype=dtype
        )
        if device is not None:
            model = model.to(device)
        return cls(model, processor, cfg, source=p)


__all__ = ["RERANK_PROMPT", "RerankerConfig", "Reranker"]
