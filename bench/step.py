"""One training step of the real micro Qwen2-VL embedder, split into collate / forward / backward / optimizer.

The step is the M-BEIR stage's as the cpu preset runs it (LoRA r16 on the language model, frozen
vision tower, in-batch InfoNCE with the learnable tau, gradient clipping, AdamW), on batches of
``--batch`` (query, positive) pairs of the cpu synthetic mini-M-BEIR (images and text). Model FLOPs
are counted by ``torch.utils.flop_counter`` on one forward + backward (every matmul and attention
of the step, not an estimate); the matmul peak is the single-thread fp32 rate of a 1024^3 matmul,
measured in bursts between the timed steps (median). Times are CPU seconds of this process
(``time.process_time``; one thread, so time other processes hold the core is not counted, on a shared
machine the same for the steps and the peak), medians over ``--steps`` steps after one warm-up step.

    .venv/bin/python bench/step.py                                 # the default micro backbone (shipped/cached)
    .venv/bin/python bench/step.py --random-micro                  # micro architecture, random init (no build)
    .venv/bin/python bench/step.py --backbone PATH --profile       # + the top ops by self CPU time
    .venv/bin/python bench/step.py --what-if-dropout --encode 512  # + numpy-drawn dropout masks (timing
                                                                   #   only), + evaluation encoding

Two paths are measured side by side in the same run, on the same batches, alternating step by step:
**uncached** (every collate runs the processor, every forward runs the vision tower: the step as it
was before ``umarvel_lib/models/input_cache.py``) and **cached** (the per-item processor outputs and the
frozen vision tower's per-image outputs memoised, warmed by one pass over the measured batches, as in
every epoch after the first; the vision memo also spans the stages and rows run in one process). Before timing, both
paths train ``--check-steps`` steps from the same weights, optimizer and RNG state; the losses and the
trainable weights must come out bitwise equal, or the bench stops.

The last line is "achieved X% of matmul peak" (the cached step: the FLOPs it executes / its time /
peak); the line before it divides the uncached step's FLOPs (vision tower included) by the cached
step's time.
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
        "--check-steps",
        type=int,
        default=3,
        help="steps trained on both paths from one state, compared bitwise (0: skip)",
    )
    ap.add_argument(
        "--what-if-dropout",
        action="store_true",
        help="also time the cached step with LoRA dropout masks drawn by numpy (other masks: a measurement only)",
    )
    ap.add_argument(
        "--encode",
        type=int,
        default=0,
        metavar="N",
        help="also time evaluation encoding of N global-pool candidates: uncached, cached cold, cached warm",
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

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

    def step(i, count=None):
        qs, cs = batches(i)
        t = [_clock()]
        bq, bc = emb.collate(qs), emb.collate(cs)
        t.append(_clock())
        ctx = count() if count else _null()
        with ctx:
            q, c = emb(bq), emb(bc)
            loss = info_nce(q, c, emb.temperature.tau)
            t.append(_clock())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t.append(_clock())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t.append(_clock())
        tokens = int(bq["attention_mask"].sum() + bc["attention_mask"].sum())
        padded = int(bq["attention_mask"].numel() + bc["attention_mask"].numel())
        return (
            [b - a for a, b in zip(t, t[1:])],
            tokens,
            padded,
            (ctx.get_total_flops() if count else None),
            float(loss.detach()),
        )

    from torch.utils.flop_counter import FlopCounterMode

    from umarvel_lib.models.input_cache import VISION_FEATURES, ItemInputs

    warm_items = ItemInputs()

    def use(path):  # the uncached path: no memo of processor outputs, the vision tower every time
        emb.item_inputs = warm_items if path == "cached" else None
        emb.vision_cache = VISION_FEATURES if path == "cached" else None

    paths = ("uncached", "cached")
    if args.check_steps:
        _check_equal(emb, opt, params, step, use, args.check_steps)
    use("cached")
    for i in range(args.steps + 2):  # warm the memos on the measured batches (a later epoch)
        step(i)
    flops = {}
    for path in paths:
        use(path)
        step(0)  # warm-up
        flops[path] = step(1, count=lambda: FlopCounterMode(display=False))[3]
    runs = {path: [] for path in paths}
    peaks = []
    for i in range(args.steps):  # alternate, so both paths and the peak see the same machine load
        peaks.append(_matmul_rate())
        for path in paths:
            use(path)
            runs[path].append(step(2 + i))
    parts = ["collate", "forward", "backward", "optimizer"]
    med = {
        path: {p: statistics.median(r[0][j] for r in runs[path]) for j, p in enumerate(parts)}
        for path in paths
    }
    total = {path: sum(med[path].values()) for path in paths}
    tokens = statistics.mean(r[1] for r in runs["cached"])
    padded = statistics.mean(r[2] for r in runs["cached"])
    peak = statistics.median(peaks)
    print(
        f"backbone {base} ({n_all / 1e6:.2f} M parameters, {n_train / 1e6:.3f} M trainable: LoRA r{stage.lora_r} "
        f"+ tau); batch {args.batch} (query, positive) pairs of the cpu mini-M-BEIR; {args.threads} thread(s); "
        f"median of {args.steps} steps per path, the two paths alternating; CPU seconds of this process"
    )
    print(f"tokens per step {tokens:.0f} of {padded:.0f} padded ({tokens / padded:.0%} real)")
    print(f"{'part':<10}{'uncached':>10}{'share':>7}{'cached':>10}{'share':>7}")
    for p in parts:
        print(
            f"{p:<10}{med['uncached'][p]:10.3f}{med['uncached'][p] / total['uncached']:7.0%}"
            f"{med['cached'][p]:10.3f}{med['cached'][p] / total['cached']:7.0%}"
        )
    print(f"{'step':<10}{total['uncached']:10.3f}{'':7}{total['cached']:10.3f}")
    print(
        f"model FLOPs per step (forward + backward, counted): uncached {flops['uncached'] / 1e9:.2f} G, "
        f"cached {flops['cached'] / 1e9:.2f} G (no vision tower); single-thread fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (1024^3, median of bursts between the steps)"
    )
    for path in paths:
        fb = med[path]["forward"] + med[path]["backward"]
        print(
            f"{path}: forward + backward alone {flops[path] / fb / 1e9:.1f} GFLOP/s = {flops[path] / fb / peak:.0%} "
            f"of matmul peak; whole step {flops[path] / total[path] / 1e9:.1f} GFLOP/s = "
            f"{flops[path] / total[path] / peak:.0%}"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(2)  # a batch of the warmed memos
        print("cached step, top ops by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.what_if_dropout:
        _what_if_dropout(emb, step, use, args, total["cached"], flops["cached"], peak)
    if args.encode:
        _encode_report(emb, data, args.encode)
    print(
        f"speed-up {total['uncached'] / total['cached']:.2f}x; the uncached step's FLOPs in the cached "
        f"step's time: {flops['uncached'] / total['cached'] / peak:.0%} of matmul peak"
    )
    print(
        f"achieved {flops['cached'] / total['cached'] / 1e9:.1f} GFLOP/s over the whole step = "
        f"{flops['cached'] / total['cached'] / peak:.0%} of matmul peak"
    )
    return 0


class _NumpyMaskDropout:
    """Dropout whose keep-mask is drawn by numpy's SFC64 (uniform float32 >= p), seeded by one draw of
    torch's generator: the same Bernoulli(1 - p) keep-mask distribution and 1/(1 - p) scaling as
    ``nn.Dropout``, other draws. Used only by ``--what-if-dropout`` to measure what a cheaper mask
    generator would save; training keeps peft's ``nn.Dropout``."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x):
        import numpy as np
        import torch

        seed = int(torch.randint(0, 2**62, (1,)))
        u = np.random.Generator(np.random.SFC64(seed)).random(x.numel(), dtype=np.float32)
        keep = torch.from_numpy(u).view(x.shape) >= self.p
        return x * keep.to(x.dtype).div_(1 - self.p)


def _encode_report(emb, data, n: int) -> None:
    """``Embedder.encode`` (evaluation: no grad, batches of 32) of the first ``n`` candidates of the
    global pool without memos, with fresh memos, and again with them warm; embeddings compared."""
    import numpy as np

    from umarvel_lib.data.items import candidate_item
    from umarvel_lib.models.input_cache import ItemInputs, VisionFeatures

    items = [candidate_item(c, data) for c in data.global_pool()[:n]]
    out, times = [], []
    for path in ("uncached", "cached, cold", "cached, warm"):
        if path == "uncached":
            emb.item_inputs, emb.vision_cache = None, None
        elif path == "cached, cold":
            emb.item_inputs, emb.vision_cache = ItemInputs(), VisionFeatures()
        t0 = _clock()
        out.append(emb.encode(items, batch_size=32, progress=False))
        times.append(_clock() - t0)
    same = all(np.array_equal(out[0], o) for o in out[1:])
    print(
        f"encoding {len(items)} candidates ({sum(it.has_image for it in items)} with an image): uncached "
        f"{times[0]:.2f} s, cached cold {times[1]:.2f} s, warm {times[2]:.2f} s "
        f"({times[0] / times[2]:.2f}x); embeddings bitwise equal: {same}"
    )


def _what_if_dropout(emb, step, use, args, t_cached, flops, peak) -> None:
    """The cached step again with every LoRA dropout's mask drawn by :class:`_NumpyMaskDropout`."""
    import statistics

    from torch import nn

    swapped = []
    for mod in emb.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for d in drops.values():
                if isinstance(d, nn.Dropout) and d.p > 0:
                    swapped.append((d, d.forward))
                    d.forward = _NumpyMaskDropout(d.p)
    use("cached")
    try:
        step(2)
        t = statistics.median(sum(step(2 + i)[0]) for i in range(args.steps))
    finally:
        for d, fwd in swapped:
            d.forward = fwd
    print(
        f"what if ({len(swapped)} LoRA dropouts drew their masks with numpy's SFC64 instead of torch's "
        f"bernoulli_: other masks, same distribution, not used by training): cached step {t_cached:.3f} -> "
        f"{t:.3f} s, {flops / t / peak:.0%} of matmul peak"
    )


def _check_equal(emb, opt, params, step, use, n: int) -> None:
    """Train ``n`` steps on each path from one state (weights, AdamW state, RNG); stop unless the
    losses and the trainable weights are bitwise equal."""
    import copy

    import torch

    start = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()))
    rng = torch.get_rng_state()
    out = {}
    for path in ("uncached", "cached", "cached"):  # cached twice: cold memo, then warm
        with torch.no_grad():
            for p, v in zip(params, start[0]):
                p.copy_(v)
        opt.load_state_dict(copy.deepcopy(start[1]))
        torch.set_rng_state(rng)
        use(path)
        losses = [step(i)[4] for i in range(n)]
        weights = [p.detach().clone() for p in params]
        if path in out:
            path = "cached, warm"
        out[path] = (losses, weights)
    ref = out["uncached"]
    for path in ("cached", "cached, warm"):
        same = ref[0] == out[path][0] and all(
            torch.equal(a, b) for a, b in zip(ref[1], out[path][1])
        )
        if not same:
            raise SystemExit(
                f"{path} path differs from the uncached one: losses {ref[0]} vs {out[path][0]}"
            )
    print(
        f"checked: {n} training steps on the uncached path, the cached path (cold memo) and again (warm) "
        f"from one state give bitwise-equal losses ({', '.join(f'{x:.6f}' for x in ref[0])}) and weights"
    )


def _clock() -> float:
    """CPU seconds of this process: on a shared machine, the time other processes hold the core is
    not counted (one thread; the matmul peak is measured the same way)."""
    return time.process_time()


def _matmul_rate(n: int = 8) -> float:
    """FLOP/s of a 1024^3 fp32 matmul on this thread, in CPU time (after one warm-up)."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0 = _clock()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (_clock() - t0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
