"""Pointwise Yes/No reranker: causal, P(Yes) in [0, 1], loss on the answer token only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel_lib.data.items import Item
from umarvel_lib.models.qwen_vl import attention_mode, run_core, unwrap_model
from umarvel_lib.models.reranker import RERANK_PROMPT, Reranker

KINDS = ("qwen2_vl", "qwen3_vl")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _pairs():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    q1 = Item(txt="a red circle", instruction="Retrieve the matching image")
    return [
        (q1, Item(image=img)),
        (Item(image=img), Item(txt="a blue square, Yes")),
        (q1, Item(txt="x", image=img)),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_p_yes_in_unit_interval_and_causal(backbones, kind):
    r = Reranker.from_pretrained(backbones[kind])
    assert attention_mode(r.model) == "causal"
    p = r.p_yes(_pairs(), batch_size=2)
    assert p.shape == (3,) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    # batch composition does not change a score
    np.testing.assert_allclose(r.p_yes(_pairs()[:1]), p[:1], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_on_answer_token_only(backbones, kind):
    r = Reranker.from_pretrained(backbones[kind])
    pairs = _pairs()
    labels = [True, False, True]
    b = r.collate(pairs, labels=labels)
    lab = b["labels"]
    assert ((lab != -100).sum(1) == 1).all()
    pos = (lab != -100).int().argmax(1)
    want = torch.tensor([r.yes_id if y else r.no_id for y in labels])
    assert torch.equal(lab[torch.arange(3), pos], want)
    assert torch.equal(b["input_ids"][torch.arange(3), pos], want)
    # the answer sits right after the generation prompt of the scoring prompt
    s = r.collate(pairs)
    assert torch.equal(s["score_index"] + 1, pos)  # right padding, same prefix
    assert RERANK_PROMPT in r.processor.tokenizer.decode(b["input_ids"][0])

    loss = r.loss(b)
    with torch.no_grad():
        logits = unwrap_model(r.model).lm_head(run_core(r.model, b)).float()
    manual = torch.nn.functional.cross_entropy(logits[torch.arange(3), pos - 1], want)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None for p in r.model.parameters())

    # P(Yes) is the [Yes, No] softmax at the same position of the training sequence (causal => same prefix)
    p = r.p_yes(pairs)
    yn = logits[torch.arange(3), pos - 1][:, [r.yes_id, r.no_id]]
    np.testing.assert_allclose(p, torch.softmax(yn, -1)[:, 0].numpy(), atol=1e-5)


def test_loss_ignores_everything_but_the_answer(backbones):
    """Changing tokens after the answer (the closing <|im_end|>) cannot change a causal answer-token loss."""
    r = Reranker.from_pretrained(backbones["qwen2_vl"])
    b = r.collate(_pairs()[:1], labels=[True])
    with torch.no_grad():
        l0 = r.loss(b).item()
        pos = int((b["labels"] != -100).int().argmax(1))
        b["input_ids"][0, pos + 1 :] = 100
        assert r.loss(b).item() == pytest.approx(l0, abs=1e-6)
        # the answer label matters
        b2 = r.collate(_pairs()[:1], labels=[False])
        assert r.loss(b2).item() != pytest.approx(l0, abs=1e-6)
