"""The embedded backbone: tokenizer, processor, micro builds, cache, one loading path (test size only)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from umarvel_lib.data import scenes  # noqa: E402
from umarvel_lib.micro import build as micro_build  # noqa: E402
from umarvel_lib.micro import pretrain as micro_pretrain  # noqa: E402
from umarvel_lib.micro.build import (  # noqa: E402
    build_backbone,
    build_micro_model,
    build_processor,
    is_complete_build,
    read_recipe,
    tiny_backbone,
)
from umarvel_lib.micro.pretrain import chat_text, heldout_caption_loss  # noqa: E402
from umarvel_lib.micro.probe import generate_captions, score_caption  # noqa: E402
from umarvel_lib.micro.recipe import BackboneConfig  # noqa: E402
from umarvel_lib.micro.tokenizer import build_tokenizer, special_token_ids  # noqa: E402
from umarvel_lib.models.loading import ImageOnlyQwen2VLProcessor, load_backbone, load_processor  # noqa: E402
from umarvel_lib.models.qwen_vl import (  # noqa: E402
    ANSWER_TOKENS,
    QWEN_SPECIAL_TOKENS,
    UMARVEL_TOKENS,
)

REPO = Path(__file__).resolve().parents[1]
TEST_CFG = BackboneConfig(kind="qwen2_vl", size="test", seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backbones")


@pytest.fixture(scope="module")
def built(cache):
    """A pre-trained test-size Qwen2-VL build (about a second)."""
    return build_backbone(TEST_CFG, cache, progress=False)


def _image(seed=0, size=56):
    import random

    return scenes.render(scenes.sample_scene(random.Random(seed)), size)


# ---- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_special_tokens_and_chat_template():
    tok = build_tokenizer()
    ids = special_token_ids(tok)  # raises if any token is missing or splits
    assert [ids[t] for t in QWEN_SPECIAL_TOKENS] == list(range(7))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for t in UMARVEL_TOKENS + ANSWER_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    # U-MARVEL tokens stay atomic inside text and survive decoding (they are plain added tokens)
    enc = tok.encode(
        "a red star<instruction_start>find it<instruction_end> <emb>.", add_special_tokens=False
    )
    assert ids["<instruction_start>"] in enc and ids["<emb>"] in enc
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red star"}]},
        {"role": "assistant", "content": "<emb>."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>a red star<|im_end|>\n"
        "<|im_start|>assistant\n<emb>.<|im_end|>\n"
    )
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("a red star<|im_end|>\n<|im_start|>assistant\n")
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(sys_msgs, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )


_HASH_SNIPPET = """
import hashlib, sys, tempfile
from umarvel_lib.micro.tokenizer import build_tokenizer
d = tempfile.mkdtemp()
build_tokenizer().save_pretrained(d)
print(hashlib.sha256(open(d + "/tokenizer.json", "rb").read()).hexdigest())
"""


def test_tokenizer_byte_identical_across_hash_seeds(tmp_path):
    procs = []
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _HASH_SNIPPET],
                env=env,
                cwd=str(REPO),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines()[-1])
    build_tokenizer().save_pretrained(tmp_path)
    here = hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    assert outs[0] == outs[1] == here


# ---- loading ----------------------------------------------------------------------------------------
def test_load_backbone_and_auto_classes(built, monkeypatch):
    from transformers import AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, proc = load_backbone(built)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert isinstance(proc, ImageOnlyQwen2VLProcessor)
    tok = proc.tokenizer
    assert model.config.emb_token_id == tok.convert_tokens_to_ids("<emb>")
    assert model.config.instruction_start_token_id == tok.convert_tokens_to_ids(
        "<instruction_start>"
    )
    assert model.config.instruction_end_token_id == tok.convert_tokens_to_ids("<instruction_end>")
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    # stock auto class and the concrete class load the same directory, offline
    auto = AutoModelForImageTextToText.from_pretrained(built, local_files_only=True)
    assert isinstance(auto, Qwen2VLForConditionalGeneration)
    sd_a, sd_b = auto.state_dict(), model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_b)
    # the saved processor renders an image+text chat with the right special tokens and image tokens
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red star"}]}
    ]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>a red star" in text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    batch = proc(text=[text], images=[_image()], return_tensors="pt")
    n_img = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_img == 4  # 56 px at the test size: 2x2 merged tokens
    assert int(batch["mm_token_type_ids"].sum()) == n_img


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen2-VL-7B-Instruct", "chaxjli/U-MARVEL-Qwen2VL-7B", "/no/such/dir"]
)
def test_hub_id_fails_fast(name):
    t = time.time()
    with pytest.raises(
        FileNotFoundError, match="not a local directory.*no download is attempted.*local copy"
    ):
        load_backbone(name)
    with pytest.raises(FileNotFoundError, match="no download is attempted"):
        load_processor(name)
    assert time.time() - t < 2


def test_missing_umarvel_tokens_are_added(built, tmp_path):
    """A 'real' checkpoint without U-MARVEL's tokens: they are added, embeddings grown, ids recorded."""
    from tokenizers import Tokenizer

    model, proc = load_backbone(built)
    tj = json.loads(proc.tokenizer.backend_tokenizer.to_str())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in UMARVEL_TOKENS]
    raw = Tokenizer.from_str(json.dumps(tj))
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    tok.chat_template = proc.tokenizer.chat_template
    assert "<emb>" not in tok.get_vocab()
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path)
    build_processor(tok, "qwen2_vl").save_pretrained(tmp_path)
    m2, p2 = load_backbone(tmp_path)
    ids = special_token_ids(p2.tokenizer)
    assert m2.config.emb_token_id == ids["<emb>"] >= len(tok)
    assert m2.get_input_embeddings().weight.shape[0] == len(p2.tokenizer)


# ---- builds and cache ---------------------------------------------------------------------------------
def test_same_seed_same_weights_and_cache_reuse(built, cache, tmp_path):
    from safetensors.torch import load_file

    other = build_backbone(TEST_CFG, tmp_path, progress=False)
    assert other.name == built.name
    a, b = load_file(built / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (built / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    recipe = read_recipe(built)
    assert recipe["hash"] == TEST_CFG.hash and recipe["config"] == TEST_CFG.to_dict()
    t = time.time()
    again = build_backbone(TEST_CFG, cache, progress=False)
    assert again == built and time.time() - t < 1.0
    # explicit values equal to the preset are the same recipe; a different seed is not
    same = BackboneConfig(
        kind="qwen2_vl", size="test", pretrain_steps=TEST_CFG.resolved().pretrain_steps
    )
    assert same.name == TEST_CFG.name
    assert BackboneConfig(size="test", seed=1).name != TEST_CFG.name


def test_interrupted_build_leaves_nothing_complete(tmp_path, monkeypatch):
    cfg = BackboneConfig(size="test", pretrain_steps=0, seed=7)

    def boom(*a, **k):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(
        micro_build, "atomic_write_json", boom
    )  # fails after the weights were written
    with pytest.raises(RuntimeError, match="killed mid-save"):
        build_backbone(cfg, tmp_path, progress=False)
    assert not (tmp_path / cfg.name).exists()
    leftovers = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert leftovers == [] and not any(is_complete_build(p) for p in leftovers)
    monkeypatch.undo()
    assert is_complete_build(build_backbone(cfg, tmp_path, progress=False))


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Pre-training runs on the project's Trainer: a build killed mid-pre-training and started
    again resumes from its newest checkpoint and ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    cfg = BackboneConfig(size="test", pretrain_steps=12, seed=3).resolved()
    tok = build_tokenizer(cfg.max_vocab, cfg.tokenizer_seed)
    proc = micro_build.processor_for(cfg, tok)
    whole = micro_pretrain.pretrain(
        build_micro_model(cfg, tok), proc, cfg, tmp_path / "whole", progress=False
    )
    assert whole["resumed_from"] is None
    # the pre-training of a build, killed in step 8 (here in this process, checkpoints every 5 steps)
    run_dir = tmp_path / f".{cfg.name}.pretrain"
    real, calls = micro_pretrain.lm_loss, []

    def dying(model, batch):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("killed mid-pre-training")
        return real(model, batch)

    monkeypatch.setattr(micro_pretrain, "PRETRAIN_SAVE_EVERY", 5)
    monkeypatch.setattr(micro_pretrain, "lm_loss", dying)
    with pytest.raises(RuntimeError, match="killed mid-pre-training"):
        micro_pretrain.pretrain(build_micro_model(cfg, tok), proc, cfg, run_dir, progress=False)
    assert (run_dir / "checkpoints" / "step_00000005").is_dir()
    assert not is_complete_build(tmp_path / cfg.name)
    resumed = build_backbone(cfg, tmp_path, progress=False)  # its child process resumes at step 5
    recipe = read_recipe(resumed)
    assert recipe["pretrain_resumed_from"] == 5 and recipe["pretrain_log"] == whole["log"]
    assert not run_dir.exists()
    ref = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    model, _ = load_backbone(resumed)
    params = dict(model.named_parameters())
    assert set(params) == set(ref)
    assert all(torch.equal(params[n], ref[n]) for n in ref)


def test_pretraining_reduces_heldout_caption_loss(built):
    recipe = read_recipe(built)
    assert (
        recipe["heldout_caption_loss"]["pretrained"]
        < recipe["heldout_caption_loss"]["untrained"] - 1.0
    )
    model, proc = load_backbone(built)
    untrained = build_micro_model(TEST_CFG, proc.tokenizer)
    kw = dict(n=16, seed=4242, image_size=56)
    assert (
        heldout_caption_loss(model, proc, **kw) < heldout_caption_loss(untrained, proc, **kw) - 1.0
    )
    assert [r["step"] for r in recipe["pretrain_log"]][-1] == TEST_CFG.resolved().pretrain_steps


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_forward_with_image(kind, cache):
    path = tiny_backbone(cache, kind, pretrain_steps=0)
    model, proc = load_backbone(path)
    assert type(model).__name__ == (
        "Qwen3VLForConditionalGeneration"
        if kind == "qwen3_vl"
        else "Qwen2VLForConditionalGeneration"
    )
    texts = [
        chat_text(proc, "a red star", "<emb>.", image=True),
        chat_text(proc, "only text here, a bit longer", "<emb>.", image=False),
    ]
    batch = proc(text=texts, images=[_image(1)], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        h = model.model(**batch, use_cache=False).last_hidden_state
    B, L = batch["input_ids"].shape
    assert out.logits.shape == (B, L, len(proc.tokenizer))
    assert h.shape == (B, L, model.config.text_config.hidden_size)
    assert torch.isfinite(h).all()
    # generation runs and stops (reranker/probe path)
    caps = generate_captions(model, proc, [_image(2)], max_new_tokens=4)
    assert len(caps) == 1


def test_caption_parser_roundtrip():
    import random

    rng = random.Random(3)
    for _ in range(200):
        s = scenes.sample_scene(rng)
        r = score_caption(s, scenes.caption(s, rng))
        for attr in ("color", "shape", "position", "size", "texture", "count", "color_shape_pair"):
            assert r[attr] == 1.0, (attr, scenes.caption(s, random.Random(0)))
        assert score_caption(s, scenes.canonical_caption(s))["count"] == 1.0
        assert r["binding"] in (None, 1.0)
