"""Encoding throughput: length-bucketed vs naive order, side by side in one run.

A mixed micro pool (short texts, long texts, small and large images, image+text) is encoded twice
per round by the same embedder: once in the given (shuffled) order, once sorted by length
(``Embedder.encode(..., sort_by_length=True)``, the default). Rounds alternate the two so that load
from other processes hits both alike; the median per mode is reported, plus the ratio and the max
difference between the two outputs (they must agree: order is restored).

    .venv/bin/python bench/encode.py                # micro Qwen2-VL (random init), 512 items
    .venv/bin/python bench/encode.py --kind qwen3_vl --n 256 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "red green blue yellow purple orange small large tiny huge circle square triangle star "
    "striped dotted plain left right top bottom centre near far above below next to beside"
).split()


def make_pool(n: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    from umarvel_lib.data.items import Item

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    def image(side):
        return Image.fromarray(nrng.integers(0, 255, (side, side, 3), dtype=np.uint8))

    items = []
    for i in range(n):
        k = i % 5
        if k == 0:
            items.append(Item(txt=text(3, 10)))  # short caption
        elif k == 1:
            items.append(Item(txt=text(80, 300)))  # long passage
        elif k == 2:
            items.append(Item(image=image(56)))  # small image
        elif k == 3:
            items.append(
                Item(image=image(112), txt=text(3, 8), instruction="Retrieve a matching image")
            )
        else:
            items.append(
                Item(txt=text(20, 60), instruction="Find the caption that describes the image")
            )
    rng.shuffle(items)
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kind", default="qwen2_vl", choices=("qwen2_vl", "qwen3_vl"))
    ap.add_argument(
        "--size",
        default="micro",
        help="backbone size preset (random init; weights do not matter here)",
    )
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--cache-dir", default="cache/backbones")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from umarvel_lib.micro.build import build_backbone
    from umarvel_lib.micro.recipe import BackboneConfig
    from umarvel_lib.models.embedder import Embedder, EmbedderConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    path = build_backbone(
        BackboneConfig(kind=args.kind, size=args.size, pretrain_steps=0),
        args.cache_dir,
        progress=False,
    )
    emb = Embedder.from_pretrained(path, EmbedderConfig())
    items = make_pool(args.n)
    lens = emb.lengths(items)
    print(
        f"pool: {len(items)} items, token length min {lens.min()} / median {int(np.median(lens))} / "
        f"max {lens.max()}; model {path.name} ({sum(p.numel() for p in emb.model.parameters()) / 1e6:.2f} M params), "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, device {emb.device}"
    )
    emb.encode(items[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up

    times = {"naive": [], "bucketed": []}
    outs = {}
    for r in range(args.rounds):
        modes = ("naive", "bucketed") if r % 2 == 0 else ("bucketed", "naive")
        for mode in modes:
            t0 = time.perf_counter()
            outs[mode] = emb.encode(
                items, batch_size=args.batch_size, progress=False, sort_by_length=mode == "bucketed"
            )
            times[mode].append(time.perf_counter() - t0)
    naive, bucketed = statistics.median(times["naive"]), statistics.median(times["bucketed"])
    diff = float(np.abs(outs["naive"] - outs["bucketed"]).max())
    print(
        f"naive order   : {len(items) / naive:8.1f} items/s  ({naive:.2f} s; rounds {[round(t, 2) for t in times['naive']]})"
    )
    print(
        f"length-bucket : {len(items) / bucketed:8.1f} items/s  ({bucketed:.2f} s; rounds {[round(t, 2) for t in times['bucketed']]})"
    )
    print(f"speed-up      : {naive / bucketed:.2f}x   (max |naive - bucketed| = {diff:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
