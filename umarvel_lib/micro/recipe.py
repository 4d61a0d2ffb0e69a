"""The recipe of a micro backbone: :class:`BackboneConfig` and its per-size presets.

Torch-free. The recipe's hash names the build directory (``<kind>-<size>-<hash>``) and is what a
shipped backbone is matched against (:mod:`.shipped`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..io import config_hash

KINDS = ("qwen2_vl", "qwen3_vl")
RECIPE_VERSION = 2  # bump when the build procedure changes in a way that changes the weights

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
