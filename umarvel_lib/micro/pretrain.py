"""Generative pre-training of a micro backbone on captions of freshly sampled scenes.

Runs on the project's :class:`~umarvel_lib.train.engine.Trainer` (exact resume from the newest
checkpoint of its run directory) with the micro recipe's own optimiser: AdamW with weight decay
on matrices only, betas (0.9, 0.98), linear warm-up then cosine decay to 5 % of the peak learning
rate, gradient clipping; everything trainable (vision tower included).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from ..data import scenes
from ..io import read_jsonl
from .recipe import BackboneConfig

CAPTION_PROMPT = "Describe the image."
PRETRAIN_SAVE_EVERY = 100  # optimizer steps between resumable checkpoints


def chat_text(processor, prompt: str | None, answer: str | None, *, image: bool) -> str:
    """A one-turn chat: user = [image] + prompt; the assistant turn is ``answer`` or a generation prompt."""
    content: list[dict] = [{"type": "image"}] if image else []
    if prompt:
        content.append({"type": "text", "text": prompt})
    msgs = [{"role": "user", "content": content}]
    if answer is None:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)


def _assistant_labels(input_ids, attention_mask, tokenizer):
    """Labels that keep only the last assistant turn's content and its ``<|im_end|>``."""
    import torch

    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = len(tokenizer.encode("assistant\n", add_special_tokens=False))
    labels = torch.full_like(input_ids, -100)
    for i in range(input_ids.shape[0]):
        row = input_ids[i]
        starts = (row == im_start).nonzero().flatten()
        s = int(starts[-1]) + 1 + head
        ends = (row[s:] == im_end).nonzero().flatten()
        e = s + int(ends[0]) + 1 if len(ends) else int(attention_mask[i].sum())
        labels[i, s:e] = row[s:e]
    return labels


def make_caption_batch(
    processor, rng: random.Random, n: int, *, image_size: int, text_fraction: float
):
    """A batch of fresh scenes: image->caption rows and (``text_fraction``) caption-only rows.

    Returns the processor's tensors plus ``labels`` (caption tokens only) and the scenes.
    """
    texts, images, sc = [], [], []
    for _ in range(n):
        s = scenes.sample_scene(rng)
        cap = scenes.caption(s, rng)
        if rng.random() < text_fraction:
            texts.append(chat_text(processor, None, cap, image=False))
        else:
            images.append(scenes.render(s, image_size, jitter_seed=rng.randrange(1 << 30)))
            texts.append(chat_text(processor, CAPTION_PROMPT, cap, image=True))
        sc.append(s)
    batch = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    batch = dict(batch)
    batch["labels"] = _assistant_labels(
        batch["input_ids"], batch["attention_mask"], processor.tokenizer
    )
    return batch, sc


def lm_loss(model, batch):
    """Next-token loss of ``model`` on a caption batch (moved to the model's device)."""
    dev = next(model.parameters()).device
    batch = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in batch.items()}
    return model(**batch, use_cache=False).loss


def _optimizer(cfg: BackboneConfig):
    """``(model, total_steps) -> (optimizer, scheduler)``: the micro recipe's AdamW and schedule."""
    import torch

    def make(model, total: int):
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.98),
        )

        def lr_at(step):
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    return make


def pretrain(
    model,
    processor,
    cfg: BackboneConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    log_every: int = 50,
) -> list[dict]:
    """Next-token pre-training on captions of freshly sampled scenes, in this process.

    Returns ``{"log": [...], "resumed_from": step or None}``.

    Runs ``cfg.pretrain_steps`` steps on the project's Trainer in ``run_dir`` (checkpoints every
    :data:`PRETRAIN_SAVE_EVERY` steps; a run interrupted and started again with the same recipe
    resumes from the newest one and ends with the same weights). The batches are a deterministic
    stream (``random.Random(f"pretrain-{seed}")``) that resuming replays up to its position.
    Deterministic given ``cfg.seed`` and the number of torch threads. The log has one entry per
    ``log_every`` steps: the mean loss over them and the learning rate of the last one.
    :func:`~.build.build_backbone` calls it in a child process (CPU, no process group).
    """
    from ..train.engine import TrainConfig, Trainer

    cfg = cfg.resolved()

    def batches(epoch: int):  # an endless stream: the Trainer only ever asks for epoch 0
        rng = random.Random(f"pretrain-{cfg.seed}")
        while True:
            yield make_caption_batch(
                processor,
                rng,
                cfg.batch_size,
                image_size=cfg.image_size,
                text_fraction=cfg.text_fraction,
            )[0]

    tcfg = TrainConfig(
        lr=cfg.lr,
        max_steps=cfg.pretrain_steps,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        adam_betas=(0.9, 0.98),
        max_grad_norm=cfg.grad_clip,
        seed=cfg.seed + 1,
        shuffle=False,
        save_every=PRETRAIN_SAVE_EVERY,
        tqdm_mininterval=5.0,
        progress=progress,
    )
    result = Trainer(
        model,
        lambda batch, ctx: lm_loss(ctx.model, batch),
        batches,
        tcfg,
        run_dir,
        run_identity={"backbone": cfg.to_dict()},
        optimizer_fn=_optimizer(cfg),
    ).fit()
    model.eval()
    steps = read_jsonl(Path(run_dir) / "metrics.jsonl")
    log = []
    for i in range(0, len(steps), log_every):
        window = steps[i : i + log_every]
        avg = sum(r["loss"] for r in window) / len(window)
        log.append({"step": window[-1]["step"], "loss": round(avg, 5), "lr": window[-1]["lr"]})
    return {"log": log, "resumed_from": result.resumed_from}


def heldout_caption_loss(
    model,
    processor,
    *,
    n: int = 64,
    seed: int = 12345,
    image_size: int = 56,
    batch_size: int = 16,
    text_fraction: float = 0.0,
) -> float:
    """Mean per-token caption loss on held-out scenes (a seed stream disjoint from pre-training's)."""
    import torch

    rng = random.Random(f"heldout-{seed}")
    tot, cnt = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            b, _ = make_caption_batch(
                processor,
                rng,
                min(batch_size, n - start),
                image_size=image_size,
                text_fraction=text_fraction,
            )
            k = int((b["labels"][:, 1:] != -100).sum())
            tot += float(lm_loss(model, b)) * k
            cnt += k
    return tot / max(1, cnt)
