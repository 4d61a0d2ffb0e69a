"""One training step of the real micro Qwen2-VL embedder, split into collate / forward / backward / optimizer.

The step is the M-BEIR stage's as the cpu preset runs it (LoRA r16 on the language model, frozen
vision tower, in-batch InfoNCE with the learnable tau, gradient clipping, AdamW), on batches of
``--batch`` (query, positive) pairs of the cpu synthetic mini-M-BEIR (images and text). Model FLOPs
are counted by ``torch.utils.flop_counter`` on one forward + backward (every matmul and attention
of the step, not an estimate); the matmul peak is the single-thread fp32 rate of a 1024^3 matmul
measured in the same run. Times are medians over ``--steps`` steps after one warm-up step.

    .venv/bin/python bench/step.py                                 # the default micro backbone (shipped/cached)
    .venv/bin/python bench/step.py --random-micro                  # micro architecture, random init (no build)
    .venv/bin/python bench/step.py --backbone PATH --profile       # + the top ops by self CPU time

``--cache-collate`` measures the step with each item's processor output cached after its first
collate (what a per-data-build cache of rendered/tokenized inputs would save); the embeddings are the
same (checked: max |difference| printed).

The last line is "achieved X% of matmul peak" (the whole step: model FLOPs / step time / peak).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _backbone(args) -> Path:
    from umarvel_lib.micro.build import build_backbone, is_complete_build
    from umarvel_lib.micro.recipe import BackboneConfig
    from umarvel_lib.micro.shipped import shipped_backbone
    from umarvel_lib.presets import make_run_config
    from umarvel_lib.run_inputs import backbone_path

    if args.backbone:
        return Path(args.backbone)
    if (
        args.random_micro
    ):  # the micro architecture without pre-training (seconds): same FLOPs and split
        return build_backbone(
            BackboneConfig(size="micro", pretrain_steps=0),
            Path(args.cache_dir) / "backbones",
            progress=False,
        )
    cfg = BackboneConfig(size="micro")
    path = shipped_backbone(cfg) or Path(args.cache_dir) / "backbones" / cfg.resolved().name
    if not is_complete_build(path):
        sys.exit(
            f"no micro backbone at {path}: build it (`umarvel backbone`), or pass --backbone PATH or --random-micro"
        )
    return backbone_path(make_run_config("cpu", {"backbone": str(path)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--backbone", help="a local backbone directory (default: the shipped or cached micro build)"
    )
    ap.add_argument(
        "--random-micro", action="store_true", help="a random-init micro backbone (no pre-training)"
    )
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument(
        "--data-root", default=None, help="default: data/mini-mbeir-cpu (prepared if missing)"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--profile", action="store_true", help="print the top ops of one step by self CPU time"
    )
    ap.add_argument(
        "--cache-collate",
        action="store_true",
        help="also measure the step with per-item collate outputs cached",
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from train import _matmul_flops  # bench/train.py: the single-thread fp32 matmul rate

    from umarvel_lib.data.mbeir import MBEIR
    from umarvel_lib.presets import make_run_config
    from umarvel_lib.run_inputs import ensure_data
    from umarvel_lib.train.losses import info_nce
    from umarvel_lib.train.stage_data import mbeir_pairs
    from umarvel_lib.train.stages import _embedder_for

    cfg = make_run_config("cpu", {"data_root": args.data_root})
    data = MBEIR(ensure_data(cfg), check_images=False)
    stage = cfg.scaled_stage("mbeir")
    base = _backbone(args)
    emb = _embedder_for(cfg, stage, base, seed=0)
    emb.train()
    pairs = mbeir_pairs(data, instructions=cfg.embedder.instructions, seed=0)
    params = [p for p in emb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in emb.parameters())

    def batches(i):
        b = pairs[(i * args.batch) % len(pairs) :][: args.batch]
        return [p.query for p in b], [p.positive for p in b]

    def step(i, collate=emb.collate, count=None):
        qs, cs = batches(i)
        t = [time.perf_counter()]
        bq, bc = collate(qs), collate(cs)
        t.append(time.perf_counter())
        ctx = count() if count else _null()
        with ctx:
            q, c = emb(bq), emb(bc)
            loss = info_nce(q, c, emb.temperature.tau)
            t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t.append(time.perf_counter())
        tokens = int(bq["attention_mask"].sum() + bc["attention_mask"].sum())
        padded = int(bq["attention_mask"].numel() + bc["attention_mask"].numel())
        return (
            [b - a for a, b in zip(t, t[1:])],
            tokens,
            padded,
            (ctx.get_total_flops() if count else None),
        )

    from torch.utils.flop_counter import FlopCounterMode

    step(0)  # warm-up
    _, _, _, flops = step(1, count=lambda: FlopCounterMode(display=False))
    runs = [step(2 + i) for i in range(args.steps)]
    parts = ["collate", "forward", "backward", "optimizer"]
    med = {p: statistics.median(r[0][j] for r in runs) for j, p in enumerate(parts)}
    total = sum(med.values())
    tokens = statistics.mean(r[1] for r in runs)
    padded = statistics.mean(r[2] for r in runs)
    peak = _matmul_flops(args.threads)
    print(
        f"backbone {base} ({n_all / 1e6:.2f} M parameters, {n_train / 1e6:.3f} M trainable: LoRA r{stage.lora_r} "
        f"+ tau); batch {args.batch} (query, positive) pairs of the cpu mini-M-BEIR; {args.threads} thread(s); "
        f"median of {args.steps} steps"
    )
    print(f"tokens per step {tokens:.0f} of {padded:.0f} padded ({tokens / padded:.0%} real)")
    print(f"{'part':<10}{'s':>8}{'share':>8}")
    for p in parts:
        print(f"{p:<10}{med[p]:8.3f}{med[p] / total:8.0%}")
    print(f"{'step':<10}{total:8.3f}")
    fb = med["forward"] + med["backward"]
    print(
        f"model FLOPs per step {flops / 1e9:.2f} G (forward + backward, counted); single-thread fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (1024^3, this run)"
    )
    print(
        f"forward + backward alone: {flops / fb / 1e9:.1f} GFLOP/s = {flops / fb / peak:.0%} of matmul peak"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(2 + args.steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.cache_collate:
        _cached_collate_report(emb, batches, step, med, args)
    print(
        f"achieved {flops / total / 1e9:.1f} GFLOP/s over the whole step = {flops / total / peak:.0%} of matmul peak"
    )
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _cached_collate_report(emb, batches, step, med, args) -> None:
    """The step again with each batch's collate output memoised (as a per-data-build cache would):
    same embeddings, the collate time gone after the first epoch."""
    import torch

    memo = {}

    def cached(items):
        key = tuple(id(it) for it in items)
        if key not in memo:
            memo[key] = emb.collate(items)
        return memo[key]

    for i in range(args.steps):
        step(2 + i, collate=cached)  # fill
    runs = [step(2 + i, collate=cached) for i in range(args.steps)]
    parts = ["collate", "forward", "backward", "optimizer"]
    m2 = {p: statistics.median(r[0][j] for r in runs) for j, p in enumerate(parts)}
    qs, _ = batches(2)
    emb.eval()
    with torch.no_grad():
        diff = float((emb(emb.collate(qs)) - emb(cached(qs))).abs().max())
    emb.train()
    print("with cached collate outputs (second epoch on):")
    for p in parts:
        print(f"  {p:<10}{med[p]:8.3f} -> {m2[p]:8.3f}")
    print(
        f"  step      {sum(med.values()):8.3f} -> {sum(m2.values()):8.3f}; max |embedding difference| {diff:.1e}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
