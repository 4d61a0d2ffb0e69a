"""Training-step cost: plain backward vs GradCache, fp32 vs bf16 autocast, through the engine.

A small transformer text-like encoder (random tokens, mean pooling, L2-normalised) is trained with
in-batch InfoNCE for ``--steps`` steps per mode through :func:`umarvel_lib.train.engine.train_loop`
(no checkpoints but the final one). Rounds alternate the modes so that load from other processes
hits them alike; the median seconds per step is reported with the first/last loss per mode (bf16
should follow fp32 closely; GradCache differs from plain only because dropout draws per chunk
instead of per full batch; the exact-gradient check is ``tests/test_gradcache.py``). On a shared
machine, run with ``--rounds 3`` or more and read the ratios, not the absolute times.

    .venv/bin/python bench/train.py                       # batch 64, chunk 16, 10 steps, 2 rounds
    .venv/bin/python bench/train.py --batch 128 --chunk 32 --dim 256 --layers 4 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="plain-fp32,gc-fp32,plain-bf16,gc-bf16")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="also: peak RSS of one step at a 3840 global batch with GradCache vs plain batches, "
        "the largest plain batch that fits this machine's RAM, and achieved vs matmul FLOP/s",
    )
    ap.add_argument("--one-step", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one_step:
        return _one_step(args, args.one_step[0], int(args.one_step[1]))

    import torch

    from umarvel_lib.train.engine import TrainConfig, train_loop
    from umarvel_lib.train.gradcache import grad_cache_step
    from umarvel_lib.train.losses import info_nce

    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    q_ids = torch.randint(0, 1000, (n, args.seq), generator=g)
    c_ids = q_ids.clone()
    c_ids[:, ::3] = torch.randint(
        0, 1000, c_ids[:, ::3].shape, generator=g
    )  # noisy copy = positive
    data = [(q_ids[i], c_ids[i]) for i in range(n)]

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def run(mode: str, tmp: Path) -> tuple[float, list[float]]:
        gc, prec = mode.split("-")
        torch.manual_seed(0)
        model = _encoder(args)

        def step(batch, ctx):
            q, c = batch
            if gc == "gc":
                return grad_cache_step(
                    model,
                    (q, c),
                    lambda a, b: info_nce(a, b, model.tau),
                    args.chunk,
                    backward=ctx.backward,
                )
            return info_nce(model(q), model(c), model.tau)

        cfg = TrainConfig(
            lr=1e-4,
            max_steps=args.steps,
            batch_size=args.batch,
            shuffle=False,
            progress=False,
            mixed_precision="bf16" if prec == "bf16" else "no",
            grad_cache_chunk=args.chunk if gc == "gc" else None,
        )
        t0 = time.perf_counter()
        res = train_loop(model, step, data, cfg, tmp / mode, collate_fn=collate)
        return (time.perf_counter() - t0) / args.steps, [h["loss"] for h in res.history]

    modes = args.modes.split(",")
    times = {m: [] for m in modes}
    losses = {}
    for r in range(args.rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            with tempfile.TemporaryDirectory() as d:
                sec, ls = run(m, Path(d))
            times[m].append(sec)
            losses[m] = ls
    print(
        f"batch {args.batch}, chunk {args.chunk}, seq {args.seq}, dim {args.dim}, layers {args.layers}, "
        f"threads {torch.get_num_threads()}, {args.steps} steps × {args.rounds} rounds"
    )
    base = statistics.median(times[modes[0]])
    print(f"{'mode':<12} {'s/step':>8} {'vs ' + modes[0]:>14} {'loss first':>11} {'loss last':>10}")
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:<12} {med:8.3f} {med / base:14.2f} {losses[m][0]:11.4f} {losses[m][-1]:10.4f}")
    if args.memory:
        _memory_report(args)
    return 0


def _encoder(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, args.dim)
            layer = nn.TransformerEncoderLayer(
                args.dim, 4, 4 * args.dim, dropout=0.1, batch_first=True
            )
            self.enc = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
            self.tau = nn.Parameter(torch.tensor(0.05))

        def forward(self, ids):
            return F.normalize(self.enc(self.emb(ids)).mean(1), dim=-1)

    return Enc()


def _one_step(args, mode: str, batch: int) -> int:
    """Child process: one optimizer-free fwd+bwd step; prints seconds, peak RSS (MB) and model FLOPs."""
    import resource

    import torch

    from umarvel_lib.train.gradcache import grad_cache_step
    from umarvel_lib.train.losses import info_nce

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _encoder(args)
    q = torch.randint(0, 1000, (batch, args.seq))
    c = torch.randint(0, 1000, (batch, args.seq))
    t0 = time.perf_counter()
    if mode == "gc":
        grad_cache_step(model, (q, c), lambda a, b: info_nce(a, b, model.tau), args.chunk)
    else:
        info_nce(model(q), model(c), model.tau).backward()
    sec = time.perf_counter() - t0
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("emb"))
    tokens = 2 * batch * args.seq
    flops = 6 * n_params * tokens * (4 / 3 if mode == "gc" else 1)  # GradCache re-runs the forward
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {sec:.4f} {rss:.1f} {flops:.6g}")
    return 0


def _child(args, mode, batch):
    import subprocess

    cmd = [
        sys.executable,
        __file__,
        "--one-step",
        mode,
        str(batch),
        "--seq",
        str(args.seq),
        "--dim",
        str(args.dim),
        "--layers",
        str(args.layers),
        "--chunk",
        str(args.chunk),
    ] + (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    sec, rss, flops = next(
        line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")
    )
    return float(sec), float(rss), float(flops)


def _matmul_flops(threads) -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def _memory_report(args) -> None:
    import numpy as np

    print("\nmemory: one fwd+bwd step per child process (peak RSS includes ~0.3 GB of imports)")
    plain = [(b, *_child(args, "plain", b)) for b in (256, 512, 1024, 2048)]
    gc = (3840, *_child(args, "gc", 3840))
    for b, sec, rss, _ in plain:
        print(f"  plain  batch {b:5d}: {rss:8.0f} MB, {sec:6.2f} s")
    print(f"  GradCache batch {gc[0]} (chunk {args.chunk}): {gc[2]:8.0f} MB, {gc[1]:6.2f} s")
    slope, icpt = np.polyfit([p[0] for p in plain], [p[2] for p in plain], 1)
    with open("/proc/meminfo") as f:
        total_mb = int(next(x for x in f if x.startswith("MemTotal")).split()[1]) / 1024
    fits = int((0.9 * total_mb - icpt) / slope) if slope > 0 else None
    print(
        f"  plain RSS grows {slope:.2f} MB per sample: the largest plain batch fitting 90% of this machine's "
        f"{total_mb / 1024:.0f} GiB is about {fits} (linear extrapolation); GradCache at 3840 needs "
        f"{gc[2]:.0f} MB (plain at 3840 would need about {icpt + slope * 3840:.0f} MB)"
    )
    peak = _matmul_flops(args.threads)
    for name, (_b, sec, _rss, flops) in (("plain 2048", plain[-1]), ("GradCache 3840", gc)):
        print(
            f"  achieved {name}: {flops / sec / 1e9:.1f} GFLOP/s = {flops / sec / peak:.0%} of this machine's "
            f"fp32 matmul rate ({peak / 1e9:.0f} GFLOP/s)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
