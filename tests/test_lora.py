"""LoRA: targets (language model only, both architectures), merge == unmerged, peft round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel_lib.data.items import Item
from umarvel_lib.models.embedder import Embedder, EmbedderConfig
from umarvel_lib.models.lora import (
    LM_LINEAR_SUFFIXES,
    apply_lora,
    lora_target_modules,
    merge_lora,
    trainable_parameters,
)
from umarvel_lib.models.qwen_vl import attention_mode, run_core

KINDS = ("qwen2_vl", "qwen3_vl")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _items():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    return [
        Item(txt="a red circle", instruction="Find the image"),
        Item(image=img),
        Item(txt="blue", image=img),
    ]


def _randomise_lora_b(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_targets_are_language_model_linears_only(backbones, kind):
    e = Embedder.from_pretrained(backbones[kind])
    names = lora_target_modules(e.model)
    n_layers = e.model.config.text_config.num_hidden_layers
    assert len(names) == n_layers * len(LM_LINEAR_SUFFIXES)
    assert all(".language_model.layers." in n for n in names)
    assert not any("visual" in n or "merger" in n or "lm_head" in n or "embed" in n for n in names)
    # a substring rule ("model" in the name) would also catch the vision tower: ours does not
    vision_linears = [
        n for n, m in e.model.named_modules() if isinstance(m, torch.nn.Linear) and "visual" in n
    ]
    assert vision_linears and not set(vision_linears) & set(names)

    e.apply_lora(r=4, alpha=8, dropout=0.0)
    trainable = trainable_parameters(e.model)
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    assert attention_mode(e.model) == "bidirectional"  # the switch survives wrapping


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged_adapter(backbones, kind):
    e = Embedder.from_pretrained(backbones[kind])
    items = _items()
    base = e.encode(items, progress=False)
    e.apply_lora(r=4, alpha=8, dropout=0.0)
    _randomise_lora_b(e.model)
    adapted = e.encode(items, progress=False)
    assert np.abs(adapted - base).max() > 1e-3  # the adapter does something
    e.merge_lora()
    assert not e.is_lora
    merged = e.encode(items, progress=False)
    np.testing.assert_allclose(merged, adapted, atol=1e-4)


def test_lora_save_load_roundtrip_and_leak(backbones, tmp_path):
    e = Embedder.from_pretrained(backbones["qwen2_vl"], EmbedderConfig())
    e.apply_lora(r=4, alpha=8, dropout=0.0)
    _randomise_lora_b(e.model)
    with torch.no_grad():
        e.temperature.tau.fill_(0.033)
    items = _items()
    x = e.encode(items, progress=False)
    e.save(tmp_path / "lora-ckpt")
    assert (tmp_path / "lora-ckpt" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "lora-ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    f = Embedder.from_pretrained(tmp_path / "lora-ckpt")
    assert f.is_lora and f.temperature.value == pytest.approx(0.033)
    np.testing.assert_allclose(f.encode(items, progress=False), x, atol=1e-6)
    # bidirectional attention still holds through the PEFT wrapper
    b = f.collate(items[:1])
    with torch.no_grad():
        h = run_core(f.model, b)
        b["input_ids"][0, -1] = 100
        assert (run_core(f.model, b)[0, 0] - h[0, 0]).abs().max().item() > 1e-4


def test_apply_twice_and_merge_plain(backbones):
    e = Embedder.from_pretrained(backbones["qwen3_vl"])
    assert merge_lora(e.model) is e.model  # plain model: unchanged
    pm = apply_lora(e.model, r=2, alpha=4, dropout=0.0)
    with pytest.raises(ValueError, match="already"):
        apply_lora(pm, r=2, alpha=4)
