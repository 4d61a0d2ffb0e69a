"""What does a pre-trained micro backbone know? Greedy captions of held-out scenes, scored per attribute.

    python bench/caption_probe.py --size micro --cache-dir cache/backbones          # build if needed, probe
    python bench/caption_probe.py --path cache/backbones/qwen2_vl-micro-<hash>      # probe an existing build

Prints a table (accuracy vs chance for colour, shape, position, size, texture, count, colour+shape
pair, binding) and the held-out caption loss of the pre-trained vs an untrained model of the same
recipe; writes ``caption_probe.csv`` and ``caption_probe_samples.txt`` into ``--out`` (default: the
build directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--path", help="an existing backbone directory (skips building)")
    ap.add_argument("--kind", default="qwen2_vl", choices=("qwen2_vl", "qwen3_vl"))
    ap.add_argument("--size", default="micro", choices=("test", "micro"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--cache-dir", default="cache/backbones")
    ap.add_argument("--n", type=int, default=200, help="held-out scenes to caption")
    ap.add_argument("--probe-seed", type=int, default=777)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    ap.add_argument(
        "--out", default=None, help="where to write the csv (default: the backbone directory)"
    )
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from umarvel_lib.micro.build import build_backbone, build_micro_model, read_recipe
    from umarvel_lib.micro.probe import caption_probe
    from umarvel_lib.micro.recipe import BackboneConfig
    from umarvel_lib.models.loading import load_backbone

    t0 = time.time()
    if args.path:
        path = Path(args.path)
    else:
        cfg = BackboneConfig(
            kind=args.kind, size=args.size, seed=args.seed, pretrain_steps=args.pretrain_steps
        )
        print(f"building/reusing {cfg.name} under {args.cache_dir}", flush=True)
        path = build_backbone(cfg, args.cache_dir)
    print(f"backbone: {path}  ({time.time() - t0:.1f} s)", flush=True)
    model, processor = load_backbone(path)
    recipe = read_recipe(path) if (path / "recipe.json").is_file() else None
    untrained = None
    image_size = 112
    if recipe is not None:
        cfg = BackboneConfig.from_dict(recipe["config"])
        untrained = build_micro_model(cfg, processor.tokenizer)
        image_size = cfg.image_size
        print(
            f"params {recipe['params']:,}  vocab {recipe['vocab_size']}  build {recipe['build_seconds']} s  "
            f"(pretrain {recipe['pretrain_seconds']} s, {cfg.pretrain_steps} steps x {cfg.batch_size})"
        )
        if recipe["pretrain_log"]:
            last = recipe["pretrain_log"][-1]
            print(
                f"final train loss (mean over the last logging window, step {last['step']}): {last['loss']}"
            )
        print(f"build-time held-out caption loss: {json.dumps(recipe['heldout_caption_loss'])}")
    t1 = time.time()
    df, caps = caption_probe(
        model,
        processor,
        n=args.n,
        seed=args.probe_seed,
        image_size=image_size,
        untrained_model=untrained,
        return_captions=True,
    )
    print(f"\ncaption probe on {args.n} held-out scenes ({time.time() - t1:.1f} s)")
    with __import__("pandas").option_context("display.float_format", "{:.3f}".format):
        print(df.to_string(index=False))
    print("\nsamples (truth | generated):")
    for truth, gen in caps[:8]:
        print(f"  {truth}\n    -> {gen}")
    out = Path(args.out) if args.out else path
    try:
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "caption_probe.csv", index=False)
        (out / "caption_probe_samples.txt").write_text("".join(f"{t}\t{g}\n" for t, g in caps))
        print(f"\nwrote {out / 'caption_probe.csv'}")
    except OSError as e:  # a read-only checkpoint directory
        print(f"could not write results into {out}: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
