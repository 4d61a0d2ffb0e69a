"""Embedder: attention switch, pooling, masks, positions, formatting, encode, save/load, fingerprint.

Runs on tiny random-init Qwen2-VL and Qwen3-VL builds (``backbone.tiny_backbone``, built once per
session into a shared cache under pytest's base temp dir).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel_lib.config import UnsupportedAttentionError
from umarvel_lib.data.items import Item
from umarvel_lib.models.embedder import COMPRESSION_SUFFIXES, Embedder, EmbedderConfig
from umarvel_lib.models.pooling import (
    Temperature,
    instruction_span_mask,
    last_before_token,
    masked_mean,
)
from umarvel_lib.models.qwen_vl import attention_mode, check_attention, run_core, set_attention

KINDS = ("qwen2_vl", "qwen3_vl")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _img(seed: int, size=(56, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _items() -> list[Item]:
    return [
        Item(
            txt="a small red circle in the top left corner",
            instruction="Retrieve an image that matches the caption",
        ),
        Item(image=_img(1)),
        Item(txt="two blue squares", image=_img(2, (56, 112))),
        Item(txt="a long " + "very " * 30 + "green triangle"),
    ]


def _emb(backbones, kind, **kw) -> Embedder:
    return Embedder.from_pretrained(backbones[kind], EmbedderConfig(**kw))


def _real(batch, i):
    return batch["attention_mask"][i].nonzero().flatten()


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_leak_bidirectional_vs_causal(backbones, kind, impl):
    """Bidirectional: changing the last real token changes position 0; causal: it does not.

    Checked for an unpadded batch and right/left-padded mixed (image + text) batches; padded keys never
    leak (changing pad ids leaves every real position unchanged).
    """
    e = _emb(backbones, kind, attn_implementation=impl)
    torch.manual_seed(0)
    items = _items()
    cases = {
        "none": ([items[0], items[0]], "right"),
        "none-image": ([items[2], items[2]], "right"),
        "right": (items[:3], "right"),
        "left": (items[:3], "left"),
    }
    other = e.tokenizer.convert_tokens_to_ids("x") if "x" in e.tokenizer.get_vocab() else 100
    for mode in ("bidirectional", "causal"):
        set_attention(e.model, mode)
        assert attention_mode(e.model) == mode
        for name, (its, side) in cases.items():
            b = e.collate(its, padding_side=side)
            if name.startswith("none"):
                assert bool(b["attention_mask"].all())
            else:
                assert not bool(b["attention_mask"].all())
            with torch.no_grad():
                h = run_core(e.model, b)
                # rows are independent: change the last real token of every row in one forward
                b2 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                firsts, lasts = [], []
                for i in range(len(its)):
                    real = _real(b, i)
                    firsts.append(int(real[0]))
                    lasts.append(int(real[-1]))
                    b2["input_ids"][i, lasts[-1]] = other
                h2 = run_core(e.model, b2)
                for i, first in enumerate(firsts):
                    d = (h2[i, first] - h[i, first]).abs().max().item()
                    if mode == "bidirectional":
                        assert d > 1e-4, (kind, impl, name, i, d)
                    else:
                        assert d < 1e-6, (kind, impl, name, i, d)
                if not name.startswith("none"):  # pad ids are masked keys: no influence anywhere
                    b3 = {
                        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()
                    }
                    b3["input_ids"][b["attention_mask"] == 0] = other
                    m = b["attention_mask"].bool()
                    assert (run_core(e.model, b3)[m] - h[m]).abs().max().item() < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_padding_invariance(backbones, kind, attention):
    e = _emb(backbones, kind, attention=attention)
    items = _items()
    alone = np.stack([e.encode([it], progress=False)[0] for it in items])
    for side in ("right", "left"):
        with torch.no_grad():
            batched = e.forward(e.collate(items, padding_side=side)).numpy()
        np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(e.encode(items, batch_size=4, progress=False), alone, atol=1e-5)


def test_unsupported_attention_is_refused(backbones):
    with pytest.raises(UnsupportedAttentionError, match="flash_attention_2"):
        EmbedderConfig(attn_implementation="flash_attention_2")
    e = _emb(backbones, "qwen2_vl")
    b = e.collate(_items()[:2])
    # a backend switched after construction is caught at the next forward, not silently run causal
    for cfg in (e.model.config.text_config, e.model.model.language_model.config):
        cfg._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedAttentionError, match="flash"):
        e.forward(b)
    with pytest.raises(UnsupportedAttentionError):
        set_attention(e.model, "bidirectional")
    with pytest.raises(ValueError):
        set_attention(e.model, "sideways")


def test_attention_mismatch_is_caught(backbones):
    e = _emb(backbones, "qwen3_vl")
    e.model.config.text_config.is_causal = True  # someone flips the flag behind the embedder's back
    with pytest.raises(RuntimeError, match="set_attention"):
        e.forward(e.collate(_items()[:1]))
    set_attention(e.model, "bidirectional")
    check_attention(e.model, "bidirectional")


# ------------------------------------------------------------------------------------ pooling


def test_instruction_span_mask_by_hand():
    S, E = 7, 8
    ids = torch.tensor(
        [[1, S, 3, 4, E, 5, 6, 0], [1, 2, 3, 4, 5, 6, 0, 0], [S, 3, E, 4, S, 5, E, 2]]
    )
    want = torch.tensor(
        [[0, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1, 1, 0]],
        dtype=torch.bool,
    )
    assert torch.equal(instruction_span_mask(ids, S, E), want)


def test_masked_mean_and_last_before_token_pure():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    m = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(masked_mean(h, m)[0].numpy(), ((h[0, 0] + h[0, 2]) / 2).numpy())
    np.testing.assert_allclose(masked_mean(h, m)[1].numpy(), h[1].mean(0).numpy())
    ids = torch.tensor([[5, 9, 7, 0], [5, 5, 5, 9]])
    np.testing.assert_allclose(
        last_before_token(h, ids, 9).numpy(), torch.stack([h[0, 0], h[1, 2]]).numpy()
    )


@pytest.mark.parametrize("kind", KINDS)
def test_mean_pooling_by_hand(backbones, kind):
    e = _emb(backbones, kind)
    items = _items()
    b = e.collate(items)
    with torch.no_grad():
        h = run_core(e.model, b)
        got = e.forward(b)
    for i in range(len(items)):
        ids = b["input_ids"][i].tolist()
        keep = [j for j in range(len(ids)) if b["attention_mask"][i, j]]
        if e.instr_start_id in ids:  # remove exactly the marker span, both markers included
            s, t = ids.index(e.instr_start_id), ids.index(e.instr_end_id)
            assert s < t
            keep = [j for j in keep if not (s <= j <= t)]
            assert torch.equal(b["pool_mask"][i].nonzero().flatten(), torch.tensor(keep))
        v = h[i, keep].mean(0)
        np.testing.assert_allclose(got[i].numpy(), (v / v.norm()).numpy(), atol=1e-6)
    np.testing.assert_allclose(got.norm(dim=-1).numpy(), 1.0, atol=1e-6)


def test_instruction_mask_off_and_instructions_off(backbones):
    it = _items()[0]
    on = _emb(backbones, "qwen2_vl")
    off = _emb(backbones, "qwen2_vl", instruction_mask=False)
    b_on, b_off = on.collate([it]), off.collate([it])
    assert torch.equal(b_on["input_ids"], b_off["input_ids"])
    span = instruction_span_mask(b_on["input_ids"], on.instr_start_id, on.instr_end_id)
    assert int(span.sum()) > 2
    assert torch.equal(b_off["pool_mask"], b_off["attention_mask"].bool())
    assert torch.equal(b_on["pool_mask"], b_on["attention_mask"].bool() & ~span)
    no_instr = _emb(backbones, "qwen2_vl", instructions=False)
    assert "<instruction_start>" not in no_instr.render(it)
    # candidates (no instruction) never get markers
    assert "<instruction_start>" not in on.render(Item(txt="a candidate caption"))


def test_pooled_tokens_show_the_span_and_the_pool(backbones):
    """What notebook 00 shows: the instruction span and the tokens that enter the pool, from the same
    masks that :meth:`Embedder.collate` gives the model."""
    it = _items()[0]
    for mask in (True, False):
        e = _emb(backbones, "qwen2_vl", instruction_mask=mask)
        toks = e.pooled_tokens(it)
        b = e.collate([it])
        assert [t["pooled"] for t in toks] == b["pool_mask"][0].tolist()
        span = [t["token"] for t in toks if t["instruction"]]
        assert span[0] == "<instruction_start>" and span[-1] == "<instruction_end>"
        assert any(t["pooled"] for t in toks if t["instruction"]) is (
            not mask
        )  # masked: the span stays out
    last = _emb(backbones, "qwen2_vl", pooling="last").pooled_tokens(it)
    i = [t["pooled"] for t in last].index(True)
    assert sum(t["pooled"] for t in last) == 1 and last[i + 1]["token"] == "<emb>"


@pytest.mark.parametrize("kind", KINDS)
def test_last_pooling_is_token_before_emb(backbones, kind):
    e = _emb(backbones, kind, pooling="last")
    items = _items()
    for side in ("right", "left"):
        b = e.collate(items, padding_side=side)
        with torch.no_grad():
            h = run_core(e.model, b)
            got = e.forward(b)
        for i in range(len(items)):
            j = b["input_ids"][i].tolist().index(e.emb_id)
            v = h[i, j - 1]
            np.testing.assert_allclose(got[i].numpy(), (v / v.norm()).numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------ positions


@pytest.mark.parametrize("kind", KINDS)
def test_mrope_positions_are_3d_for_images_and_differ_from_sequential(backbones, kind):
    mr = _emb(backbones, kind)
    sq = _emb(backbones, kind, positions="sequential")
    items = [Item(txt="two blue squares", image=_img(3, (112, 56)))]
    bm, bs = mr.collate(items), sq.collate(items)
    pm, ps = bm["position_ids"][:, 0], bs["position_ids"][:, 0]
    img = bm["input_ids"][0] == mr.model.config.image_token_id
    assert int(img.sum()) >= 2
    assert not torch.equal(pm[1, img], pm[2, img])  # height and width rows differ on image tokens
    assert torch.equal(pm[0, ~img], pm[1, ~img]) and torch.equal(
        pm[1, ~img], pm[2, ~img]
    )  # text: 1-D
    assert torch.equal(
        ps[0], torch.arange(ps.shape[1])
    )  # sequential: plain 0..L-1 on every section
    assert not torch.equal(pm, ps)
    with torch.no_grad():
        assert (mr.forward(bm) - sq.forward(bs)).abs().max().item() > 1e-5
    # text-only: both schemes coincide
    t = [Item(txt="just text")]
    assert torch.equal(mr.collate(t)["position_ids"], sq.collate(t)["position_ids"])


# ------------------------------------------------------------------------------------ formatting


def test_format_compression_generation_truncation(backbones):
    e = _emb(backbones, "qwen2_vl")
    r = e.render(_items()[0])
    assert (
        "<instruction_start>Retrieve an image that matches the caption<instruction_end> a small red circle in the top left corner."
        in r
    )
    assert r.endswith("<|im_start|>assistant\n<emb>.<|im_end|>\n")
    assert r.index("<|im_start|>user") < r.index("<instruction_start>")
    ri = e.render(_items()[2])
    assert ri.index("<|image_pad|>") < ri.index("Two blue squares.")  # image then text
    cp = _emb(backbones, "qwen2_vl", compression_prompt=True)
    assert COMPRESSION_SUFFIXES["text"] in cp.render(Item(txt="t"))
    assert COMPRESSION_SUFFIXES["image"] in cp.render(Item(image=_img(0)))
    assert COMPRESSION_SUFFIXES["image_text"] in cp.render(Item(txt="t", image=_img(0)))
    assert not any(s in r for s in COMPRESSION_SUFFIXES.values())
    gp = _emb(backbones, "qwen2_vl", generation_prompt=True)
    assert gp.render(Item(txt="t")).endswith("<emb>.<|im_end|>\n<|im_start|>assistant\n")
    tr = _emb(backbones, "qwen2_vl", max_text_tokens=8)
    text = tr.user_text(Item(txt="word " * 100))
    assert len(tr.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 8
    with pytest.raises(ValueError):
        e.render(Item())


# ------------------------------------------------------------------------------------ encode / temperature


def test_encode_order_dtype_and_bucketing(backbones):
    e = _emb(backbones, "qwen3_vl")
    items = _items() * 3
    a = e.encode(items, batch_size=5, progress=False)
    b = e.encode(items, batch_size=5, progress=False, sort_by_length=False)
    assert a.dtype == np.float32 and a.shape == (len(items), e.dim)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a[:4], a[4:8], atol=1e-5)
    lens = e.lengths(items)
    assert lens[3] > lens[1]  # the long text is longer than the image-only item
    assert e.encode([], progress=False).shape == (0, e.dim)


def test_temperature_module():
    t = Temperature()
    assert t.value == pytest.approx(0.05) and t.tau.requires_grad
    cos = torch.tensor([[0.5, -0.1]])
    np.testing.assert_allclose(t(cos).detach().numpy(), (cos / 0.05).numpy(), rtol=1e-6)
    t(cos).sum().backward()
    assert t.tau.grad is not None
    assert not Temperature(0.07, trainable=False).tau.requires_grad
    assert Temperature(1e-4, min_value=0.01)(torch.tensor([1.0])).item() == pytest.approx(100.0)


def test_forward_has_grad_and_temperature_trains(backbones):
    e = _emb(backbones, "qwen2_vl")
    b = e.collate(_items()[:2])
    q = e.forward(b)
    loss = torch.nn.functional.cross_entropy(e.similarity_logits(q, q.detach()), torch.arange(2))
    loss.backward()
    assert e.temperature.tau.grad is not None
    assert any(p.grad is not None for p in e.model.parameters())
    frozen = _emb(backbones, "qwen2_vl", train_temperature=False)
    assert not frozen.temperature.tau.requires_grad


# ------------------------------------------------------------------------------------ save / load / identity


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(backbones, kind, tmp_path):
    cfg = EmbedderConfig(pooling="mean", compression_prompt=True, positions="mrope")
    e = Embedder.from_pretrained(backbones[kind], cfg)
    with torch.no_grad():
        e.temperature.tau.fill_(0.0421)
    items = _items()
    x = e.encode(items, progress=False)
    e.save(tmp_path / "ckpt")
    f = Embedder.from_pretrained(tmp_path / "ckpt")
    assert f.cfg == cfg
    assert f.temperature.value == e.temperature.value
    np.testing.assert_array_equal(f.encode(items, progress=False), x)
    assert f.fingerprint() == e.fingerprint()


def test_fingerprint_tracks_config_weights_and_tau(backbones):
    e = _emb(backbones, "qwen2_vl")
    fp = e.fingerprint()
    assert fp == e.fingerprint() == _emb(backbones, "qwen2_vl").fingerprint()
    assert _emb(backbones, "qwen2_vl", pooling="last").fingerprint() != fp
    assert _emb(backbones, "qwen2_vl", pooling="last").config_hash() != e.config_hash()
    assert _emb(backbones, "qwen3_vl").fingerprint() != fp
    with torch.no_grad():
        e.temperature.tau.fill_(0.03)
    fp_tau = e.fingerprint()
    assert fp_tau != fp
    with torch.no_grad():
        e.model.model.language_model.layers[0].mlp.up_proj.weight.add_(1e-3)
    assert e.fingerprint() != fp_tau


def test_hub_id_without_local_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub"):
        Embedder.from_pretrained("Qwen/Qwen2-VL-7B-Instruct")
    with pytest.raises(FileNotFoundError):
        Embedder.from_pretrained(tmp_path / "missing")
