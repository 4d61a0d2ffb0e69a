"""Qwen-VL model plumbing shared by the embedder, the reranker and LoRA: unwrap PEFT, find the VLM core.

The bottom of :mod:`umarvel_lib.models` (imports no other model module), so :mod:`.lora` and
:mod:`.embedder` can both use it without importing each other.
"""

from __future__ import annotations

from torch import nn

from ..config import UnsupportedAttentionError

#: Architectures the attention switch, the rope index and the LoRA target rule were validated on.
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen3_vl")


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
