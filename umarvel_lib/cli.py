"""The ``umarvel`` command line: ``prepare`` (synthetic data), ``backbone``, ``reproduce`` ..."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path("data")
DEFAULT_CACHE = Path("cache")


def cmd_prepare(args) -> int:
    from .data.mbeir import MBEIR
    from .data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate

    if args.preset not in SYNTHETIC_PRESETS:
        print(f"unknown preset {args.preset!r}; choose from {sorted(SYNTHETIC_PRESETS)}", file=sys.stderr)
        return 2
    cfg = SyntheticConfig(**{**SYNTHETIC_PRESETS[args.preset], "seed": args.seed})
    root = Path(args.out or DEFAULT_DATA / f"mini-mbeir-{args.preset}")
    t0 = time.time()
    generate(root, cfg, force=args.force)
    data = MBEIR(root)
    rows = data.rows()
    n_q = sum(len(data.queries(r)) for r in rows)
    print(f"mini-M-BEIR ({args.preset}, seed {args.seed}) at {root}: {len(rows)} rows, {n_q} test queries, "
          f"global pool {len(data.global_pool())} candidates, {len(data.union_train())} union-train queries "
          f"[{time.time() - t0:.1f} s]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="umarvel", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("prepare", help="write the synthetic mini-M-BEIR in the real M-BEIR layout")
    sp.add_argument("--preset", default="cpu", help="smoke | cpu | gpu (sizes)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", help="data root (default data/mini-mbeir-<preset>)")
    sp.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    sp.set_defaults(func=cmd_prepare)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
