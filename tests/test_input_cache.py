"""The embedder's input memos change no number: processor outputs per item and frozen vision-tower
outputs per image (``umarvel_lib/models/input_cache.py``).

Every check is bitwise (``torch.equal``): batches against the processor's own padded batch, vision
features against the tower run on the whole batch, and LoRA training steps (dropout on) with and
without the memos from one seed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel_lib.data.items import Item
from umarvel_lib.models.embedder import Embedder, EmbedderConfig
from umarvel_lib.models.input_cache import (
    BoundedMemo,
    ItemInputs,
    VisionFeatures,
    pad_item_inputs,
    vision_cacheable,
    vision_digest,
)
from umarvel_lib.models.qwen_vl import vlm_core

KINDS = ("qwen2_vl", "qwen3_vl")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _write_img(path, seed: int, size=(56, 56)) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def _items(tmp_path) -> list[Item]:
    a = _write_img(tmp_path / "a.png", 1)
    b = _write_img(tmp_path / "b.png", 2, (56, 112))
    c = _write_img(tmp_path / "c.png", 3, (84, 56))
    return [
        Item(txt="a small red circle", instruction="Retrieve an image that matches the caption"),
        Item(image_path=a),
        Item(txt="two blue squares", image_path=b),
        Item(txt="a long " + "very " * 20 + "green triangle"),
        Item(txt="one shape", image_path=c, instruction="Find the caption"),
        Item(txt="two blue squares", image_path=a),
    ]


def _reference_collate(emb: Embedder, items, padding_side=None) -> dict:
    """The collate without a memo: the processor on the whole batch (the code before the memo)."""
    memo, emb.item_inputs = emb.item_inputs, None
    try:
        return emb.collate(items, padding_side=padding_side)
    finally:
        emb.item_inputs = memo


def _assert_same_batch(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_collate_equals_the_processor_batch(backbones, kind, tmp_path):
    emb = Embedder.from_pretrained(backbones[kind], EmbedderConfig())
    items = _items(tmp_path)
    for batch in (items, items[1:3], items[::-1], [items[0], items[3]], [items[1]]):
        for side in (None, "left", "right"):
            ref = _reference_collate(emb, batch, side)
            _assert_same_batch(emb.collate(batch, padding_side=side), ref)  # cold or warm memo
            _assert_same_batch(emb.collate(batch, padding_side=side), ref)  # warm memo
    assert emb.item_inputs.memo.hits > 0
    emb.item_inputs = ItemInputs(max_bytes=0)  # an empty budget: nothing kept, the same batches
    _assert_same_batch(emb.collate(items), _reference_collate(emb, items))
    assert len(emb.item_inputs.memo) == 0


def test_collate_memo_follows_the_image_file_and_the_text_budget(backbones, tmp_path):
    emb = Embedder.from_pretrained(backbones["qwen2_vl"], EmbedderConfig(max_text_tokens=8))
    items = _items(tmp_path)
    emb.collate(items)
    path = items[1].image_path
    st = os.stat(path)
    _write_img(path, 99)  # new content, and a different modification time for certain
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _assert_same_batch(emb.collate(items), _reference_collate(emb, items))
    with emb.eval_text_budget():  # the evaluation's truncation renders other text
        _assert_same_batch(emb.collate(items), _reference_collate(emb, items))


def test_pad_item_inputs_by_hand():
    e1 = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1])}
    e2 = {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1])}
    right = pad_item_inputs([e1, e2], pad_id=0, padding_side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad_item_inputs([e1, e2], pad_id=3, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]]
    with pytest.raises(ValueError, match="padding_side"):
        pad_item_inputs([e1], pad_id=0, padding_side="middle")


def test_bounded_memo_evicts_least_recently_used():
    m = BoundedMemo(max_bytes=3 * 400)
    for k in "abc":
        m.put(k, torch.zeros(100))  # 400 bytes each
    assert m.get("a") is not None  # a is now the most recent
    m.put("d", torch.zeros(100))
    assert m.get("b") is None and m.get("a") is not None and len(m) == 3
    m.put("huge", torch.zeros(1000))  # larger than the budget: not kept
    assert m.get("huge") is None


@pytest.mark.parametrize("kind", KINDS)
def test_vision_memo_equals_the_tower_on_the_batch(backbones, kind, tmp_path):
    emb = Embedder.from_pretrained(backbones[kind], EmbedderConfig())
    items = _items(tmp_path)
    batch = emb.collate(items)
    core = vlm_core(emb.model)
    cache = VisionFeatures()
    with torch.no_grad():
        ref = core.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        sizes = batch["image_grid_thw"].prod(-1).tolist()
        for rows, g in zip(batch["pixel_values"].split(sizes), batch["image_grid_thw"].split(1)):
            cache.image_outputs(core, rows, g)  # each image alone through the tower
        for _ in range(3):  # then the whole batch, from the memo
            got = cache.image_outputs(core, batch["pixel_values"], batch["image_grid_thw"])
            assert len(got.pooler_output) == len(ref.pooler_output) == 4
            for a, b in zip(got.pooler_output, ref.pooler_output):
                assert torch.equal(a, b)  # bitwise: each image alone gives the batch's bits
            deep_ref = getattr(ref, "deepstack_features", None)
            if deep_ref:
                for layer_a, layer_b in zip(got.deepstack_features, deep_ref):
                    assert all(torch.equal(a, b) for a, b in zip(layer_a, layer_b))
    # 3 distinct images: 3 misses one by one (the repeated one hits), then 3 x 4 hits
    assert (cache.memo.misses, cache.memo.hits) == (3, 13)
    emb.vision_cache = cache
    with torch.no_grad():
        on = emb(batch)
        emb.vision_cache = None
        off = emb(batch)
    assert torch.equal(on, off)


def test_vision_memo_key_follows_the_weights(backbones, tmp_path):
    emb = Embedder.from_pretrained(backbones["qwen2_vl"], EmbedderConfig())
    emb.vision_cache = VisionFeatures()
    batch = emb.collate(_items(tmp_path))
    visual = vlm_core(emb.model).visual
    with torch.no_grad():
        emb(batch)
        d0 = vision_digest(visual)
        next(visual.parameters()).mul_(1.5)  # in place: the version counter moves
        assert vision_digest(visual) != d0
        cached = emb(batch)
        emb.vision_cache = None
        assert torch.equal(cached, emb(batch))
    emb.train()
    next(visual.parameters()).requires_grad_(True)  # a trained tower is never memoised
    assert not vision_cacheable(visual)
    with torch.no_grad():
        assert vision_cacheable(visual)


def _train(
    emb: Embedder, batches, n: int, *, cached: bool
) -> tuple[list[float], list[torch.Tensor]]:
    from umarvel_lib.train.losses import info_nce

    emb.item_inputs = ItemInputs() if cached else None
    emb.vision_cache = VisionFeatures() if cached else None
    params = [p for p in emb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    torch.manual_seed(7)
    losses = []
    for i in range(n):
        qs, cs = batches[i % len(batches)]
        loss = info_nce(emb(emb.collate(qs)), emb(emb.collate(cs)), emb.temperature.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses, [p.detach().clone() for p in params]


def _lora_embedder(backbones) -> Embedder:
    """The tiny Qwen2-VL with LoRA r8 (dropout 0.05) from seed 0, in training mode."""
    emb = Embedder.from_pretrained(backbones["qwen2_vl"], EmbedderConfig())
    for p in emb.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    emb.apply_lora(8, 16, 0.05)
    emb.train()
    return emb


def test_lora_training_is_bitwise_the_same_with_and_without_the_memos(backbones, tmp_path):
    """LoRA (dropout 0.05 on) training steps, images in both streams, each batch seen twice: the
    losses and the trained weights are bitwise those of the step without memos."""
    items = _items(tmp_path)
    batches = [(items[:3], items[3:]), (items[3:], items[:3])]
    runs = []
    for cached in (False, True):
        emb = _lora_embedder(backbones)
        runs.append(_train(emb, batches, 4, cached=cached))
    (l0, w0), (l1, w1) = runs
    assert l0 == l1
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert not all(torch.equal(a, b) for a, b in zip(w0, [torch.zeros_like(w) for w in w0]))


def test_gradcache_second_pass_reuses_the_memos_with_the_same_gradients(backbones, tmp_path):
    """GradCache's second pass re-encodes every chunk: with the memos its collate and vision tower
    are hits, and the gradients stay bitwise those without memos (dropout masks replayed)."""
    from umarvel_lib.train.gradcache import grad_cache_step
    from umarvel_lib.train.losses import info_nce

    items = _items(tmp_path)
    qs, cs = items[:3], items[3:]  # no item in both: every hit is the second pass
    grads = []
    for cached in (False, True):
        emb = _lora_embedder(backbones)
        emb.item_inputs = ItemInputs() if cached else None
        emb.vision_cache = VisionFeatures() if cached else None
        torch.manual_seed(3)
        grad_cache_step(
            lambda chunk, e=emb: e(e.collate(chunk)),
            [qs, cs],
            lambda q, c, e=emb: info_nce(q, c, e.temperature.tau),
            chunk_size=2,
        )
        grads.append([p.grad.clone() for p in emb.parameters() if p.requires_grad])
        if cached:  # second pass: every collate and every image was a hit
            assert emb.item_inputs.memo.hits == len(qs) + len(cs)
            assert emb.vision_cache.memo.hits >= 3
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_reranker_scores_and_loss_are_bitwise_the_same_with_the_vision_memo(backbones, tmp_path):
    """The reranker scores each candidate image in many pairs: with the memo its P(Yes), loss and
    gradients are bitwise those without."""
    from umarvel_lib.models.reranker import Reranker

    items = _items(tmp_path)
    pairs = [(q, c) for q in items[:3] for c in items[1:]]  # each image in several pairs
    labels = [i % 2 == 0 for i in range(len(pairs))]
    out = []
    for cached in (False, True):
        r = Reranker.from_pretrained(backbones["qwen2_vl"])
        for name, p in r.model.named_parameters():  # the language model trains, the tower is frozen
            p.requires_grad_("visual" not in name)
        r.vision_cache = VisionFeatures() if cached else None
        scores = r.p_yes(pairs, batch_size=4)
        loss = r.loss(r.collate(pairs[:6], labels=labels[:6]))
        loss.backward()
        grads = [p.grad.clone() for p in r.model.parameters() if p.grad is not None]
        out.append((scores, float(loss.detach()), grads))
        if cached:
            assert r.vision_cache.memo.hits > 0
    (s0, l0, g0), (s1, l1, g1) = out
    assert np.array_equal(s0, s1) and l0 == l1 and len(g0) == len(g1) > 0
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
