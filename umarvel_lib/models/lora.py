"""LoRA on the language model only, through peft (docs/recipe.md "LoRA, frozen parts, images").

U-MARVEL puts LoRA on every linear layer of the LLM (q, k, v, o, gate, up, down in every layer) and
keeps the vision tower, the merger, the embeddings and the lm_head frozen. The released code selects
modules with a substring rule ("model" in the name), which on Qwen3-VL (``model.visual.*``) also
catches the vision tower. Here the targets are the exact module names found *under the language
model*, so no vision module can be selected, whatever the architecture calls its layers.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .qwen_vl import unwrap_model, vlm_core

#: Linear layers of a Qwen decoder layer that U-MARVEL adapts.
LM_LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_peft(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft")


def _prefix_of(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError("language model not found inside the model")


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of all language-model linear layers (q,k,v,o,gate,up,down), sorted by layer.

    Never the vision tower, the merger(s) or the lm_head: only modules inside ``model.language_model``
    are considered. Names are relative to the unwrapped ``*ForConditionalGeneration``; peft matches
    them by suffix, so they also work after wrapping.
    """
    base = unwrap_model(model)
    lm = vlm_core(base).language_model
    prefix = _prefix_of(base, lm)
    names = []
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in LM_LINEAR_SUFFIXES:
            names.append(f"{prefix}.{name}" if prefix else name)
    if not names:
        raise ValueError(f"no LoRA target found in {type(base).__name__}'s language model")
    if any(
        ".visual." in f".{n}." or n.endswith("lm_head") for n in names
    ):  # defensive; cannot happen
        raise AssertionError("LoRA target list contains a vision module or the lm_head")
    return names


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float = 0.05,
    *,
    target_modules: list[str] | None = None,
    modules_to_save: list[str] | None = None,
):
    """Wrap ``model`` with a peft LoRA adapter on :func:`lora_target_modules`. Returns the ``PeftModel``.

    Base weights (vision tower, merger, embeddings, lm_head included) are frozen by peft; the
    attention switch in ``text_config`` is kept.
    """
    from peft import LoraConfig, get_peft_model

    if _is_peft(model):
        raise ValueError(
            "model already carries a LoRA adapter; merge_lora() it first (U-MARVEL merges per stage)"
        )
    targets = target_modules or lora_target_modules(model)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights (``merge_and_unload``); a plain model is returned as is."""
    if not _is_peft(model):
        return model
    return model.merge_and_unload()


def save_lora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter as standard peft artifacts (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    if not _is_peft(model):
        raise ValueError("save_lora() needs a peft-wrapped model")
    directory = Path(directory)
    model.save_pretrained(str(directory))
    return directory


def load_lora(base_model: nn.Module, directory: str | os.PathLike, *, is_trainable: bool = False):
    """Attach a saved peft adapter to ``base_model`` (``PeftModel.from_pretrained``)."""
    from peft import PeftModel

    d = Path(directory)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d} has no adapter_config.json (not a peft adapter directory)")
    return PeftModel.from_pretrained(base_model, str(d), is_trainable=is_trainable)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Names -> sizes of the trainable parameters (to print and check what LoRA touches)."""
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


__all__ = [
    "LM_LINEAR_SUFFIXES",
    "lora_target_modules",
    "apply_lora",
    "merge_lora",
    "save_lora",
    "load_lora",
    "trainable_parameters",
]
