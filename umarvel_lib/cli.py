"""The ``umarvel`` command line: ``prepare`` (synthetic data), ``backbone``, ``reproduce`` ...

(Over 400 lines: the argument parser and one thin function per command; the work is in the library.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path("data")
DEFAULT_CACHE = Path("cache")


def cmd_prepare(args) -> int:
    from .data.mbeir import MBEIR
    from .data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate

    if args.preset not in SYNTHETIC_PRESETS:
        print(
            f"unknown preset {args.preset!r}; choose from {sorted(SYNTHETIC_PRESETS)}",
            file=sys.stderr,
        )
        return 2
    cfg = SyntheticConfig(**{**SYNTHETIC_PRESETS[args.preset], "seed": args.seed})
    root = Path(args.out or DEFAULT_DATA / f"mini-mbeir-{args.preset}")
    t0 = time.time()
    generate(root, cfg, force=args.force)
    data = MBEIR(root)
    rows = data.rows()
    n_q = sum(len(data.queries(r)) for r in rows)
    print(
        f"mini-M-BEIR ({args.preset}, seed {args.seed}) at {root}: {len(rows)} rows, {n_q} test queries, "
        f"global pool {len(data.global_pool())} candidates, {len(data.union_train())} union-train queries "
        f"[{time.time() - t0:.1f} s]"
    )
    return 0


def cmd_reproduce(args) -> int:
    from .runner import reproduce

    if (
        args.backbone
    ):  # refused before any notebook runs: a hub id or a missing directory fails every row
        from .models.loading import resolve_local_checkpoint

        try:
            resolve_local_checkpoint(args.backbone)
        except FileNotFoundError as e:
            print(f"--backbone: {e}", file=sys.stderr)
            return 2
    data = (
        cmd_prepare(
            argparse.Namespace(
                preset=_data_preset(args.preset), seed=0, out=args.data_root, force=False
            )
        )
        if not args.data_root
        else 0
    )
    if data:
        return data
    tables = [t for t in (args.tables or "").split(",") if t.strip()]
    status = reproduce(
        args.preset,
        tables=tables or None,
        seeds=args.seeds,
        results=args.results,
        backbone=args.backbone,
        data_root=args.data_root,
        timeout=args.timeout,
        jobs=args.jobs,
        train=not args.no_train,
        all_rows=args.all_rows,
        nli_path=args.nli_path,
        cc3m_root=args.cc3m_root,
        estimate=True if args.estimate else None,
    )
    if args.estimate:
        return 0
    return 0 if all(v.get("status") == "ok" for v in status.values()) else 1


def _data_preset(preset: str) -> str:
    from .presets import PRESETS

    return PRESETS[preset].get("data_preset", "cpu")


def cmd_run(args) -> int:
    """One (table row, seed); the entry point for `accelerate launch -m umarvel_lib.cli run ...`."""
    from .ablation import load_ablation
    from .cost import estimate_cost
    from .experiment import run_row

    ab = load_ablation(args.table)
    if args.preset == "paper" or args.estimate:
        cfg = ab.run_config(
            args.row,
            args.preset,
            args.seed,
            backbone=args.backbone,
            data_root=args.data_root,
            nli_path=args.nli_path,
            cc3m_root=args.cc3m_root,
        )
        est = estimate_cost(cfg)
        print(f"cost estimate for table {ab.table} row {args.row} ({args.preset}):")
        print(est.to_string(index=False))
        print(f"total: {est.tokens.sum():,} tokens, about {est.gpu_hours.sum():.1f} H100-hours")
        if args.estimate:
            return 0
        if not args.yes:
            print("re-run with --yes to start (the paper preset is expensive)")
            return 3
    side = run_row(
        ab,
        args.row,
        preset=args.preset,
        seed=args.seed,
        results=args.results or Path("results") / args.preset,
        backbone=args.backbone,
        data_root=args.data_root,
        nli_path=args.nli_path,
        cc3m_root=args.cc3m_root,
    )
    print(
        f"table {ab.table} row {args.row} seed {args.seed}: {side['status']} ({side.get('wall_s')} s)"
    )
    return 0 if side["status"] == "ok" else 1


def cmd_check_data(args) -> int:
    """Validate a data root (and the NLI / CC3M corpora given) before any training; non-zero on errors."""
    from .data.check import DataError, check_data

    stages = ["mbeir"] + (["nli"] if args.nli_path else []) + (["cc3m"] if args.cc3m_root else [])
    rows = [r for r in (args.rows or "").split(",") if r.strip()] or None
    try:
        report = check_data(
            args.data_root,
            nli_path=args.nli_path,
            cc3m_root=args.cc3m_root,
            rows=rows,
            stages=stages,
            open_images=not args.no_image_decode,
        )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.table())
    return 0 if report.ok else 1


def cmd_evaluate(args) -> int:
    """Evaluate a checkpoint as it is (no training) on the local and global pools."""
    from .experiment import evaluate_checkpoint

    out = (
        Path(args.results)
        if args.results
        else Path("results") / args.preset / "checkpoints" / Path(args.checkpoint).resolve().name
    )
    rows = [r for r in (args.rows or "").split(",") if r.strip()] or None
    pools = tuple(p for p in args.pools.split(",") if p.strip())
    res = evaluate_checkpoint(
        args.checkpoint, out, preset=args.preset, data_root=args.data_root, rows=rows, pools=pools
    )
    for pool in pools:
        avg = res[pool]["avg"]
        print(
            f"{pool}: Avg {avg['headline']:.2f} over {avg['n_rows']} rows ({out / pool / 'metrics.json'})"
        )
    return 0


def cmd_report(args) -> int:
    from .report.report import write_report
    from .report.tables import problems

    out = write_report(Path(args.results or Path("results") / args.preset), args.preset)
    bad = problems(out.parent)
    print(str(out) + (f" ({len(bad)} failed or damaged runs listed first)" if bad else ""))
    return 0


def cmd_backbone(args) -> int:
    """The default micro backbone: the shipped build, or the cached one (built when missing).

    ``--rebuild`` builds the recipe afresh into the cache and says whether it is bitwise identical
    to the shipped build (exit status 1 when it differs); ``--ship [BUILD]`` copies a complete build
    (default: the cached build of the recipe) into the repository's ``backbones/<kind>-<size>/``.
    """
    import torch

    from .io import checkpoint_digest
    from .micro import shipped
    from .micro.build import build_backbone
    from .micro.recipe import BackboneConfig

    # pre-training's float reductions depend on the thread count: the shipped build was made on one
    # thread, and only a one-thread build can come out bitwise identical to it
    torch.set_num_threads(1)
    t0 = time.time()
    cfg = BackboneConfig(kind=args.kind, size=args.size).resolved()
    cache = Path(args.cache_dir) / "backbones"
    root = args.shipped_root
    if args.rebuild:
        r = shipped.rebuild(cfg, cache, root)
        print(f"rebuilt {cfg.name}: {r['path']} (digest {r['digest']}) [{time.time() - t0:.1f} s]")
        if r["shipped"] is None:
            print(
                f"no shipped backbone of this recipe under {shipped.shipped_dir(cfg.kind, cfg.size, root)}: "
                f"nothing to compare with"
            )
            return 0
        verdict = "bitwise identical to" if r["identical"] else "DIFFERENT from"
        print(
            f"the rebuild is {verdict} the shipped backbone {r['shipped']} (digest {r['shipped_digest']})"
        )
        return 0 if r["identical"] else 1
    if args.ship is not None:
        src = Path(args.ship) if args.ship else cache / cfg.name
        out = shipped.ship(src, root)
        print(f"shipped {src} -> {out} (digest {checkpoint_digest(out)})")
        return 0
    path = shipped.shipped_backbone(cfg, root)
    origin = "shipped"
    if path is None:
        path, origin = build_backbone(cfg, cache), "cached build"
    print(
        f"backbone {args.kind}/{args.size} ({origin}): {path} (digest {checkpoint_digest(path)}) "
        f"[{time.time() - t0:.1f} s]"
    )
    return 0


def _presets() -> list[str]:
    from .presets import PRESETS

    return sorted(PRESETS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="umarvel", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("prepare", help="write the synthetic mini-M-BEIR in the real M-BEIR layout")
    sp.add_argument("--preset", default="cpu", help="smoke | cpu | gpu (sizes)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", help="data root (default data/mini-mbeir-<preset>)")
    sp.add_argument(
        "--force", action="store_true", help="rebuild even if an identical build exists"
    )
    sp.set_defaults(func=cmd_prepare)

    sb = sub.add_parser(
        "backbone",
        help="the micro Qwen2-VL / Qwen3-VL backbone: shipped, cached or built; "
        "--rebuild compares a fresh build with the shipped one",
    )
    sb.add_argument("--kind", default="qwen2_vl", choices=["qwen2_vl", "qwen3_vl"])
    sb.add_argument("--size", default="micro", help="test | micro")
    sb.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    sb.add_argument(
        "--rebuild",
        action="store_true",
        help="build the recipe afresh into the cache and say whether it is bitwise identical to the "
        "shipped backbone (exit status 1 if not)",
    )
    sb.add_argument(
        "--ship",
        nargs="?",
        const="",
        default=None,
        metavar="BUILD",
        help="copy a complete build (default: the cached build of the recipe) into backbones/<kind>-<size>/",
    )
    sb.add_argument(
        "--shipped-root", default=None, help=argparse.SUPPRESS
    )  # tests: another backbones/ dir
    sb.set_defaults(func=cmd_backbone)

    sr = sub.add_parser(
        "reproduce", help="run every notebook with papermill and write results/<preset>/REPORT.md"
    )
    sr.add_argument("--preset", default="cpu", choices=_presets(), help="smoke | cpu | gpu | paper")
    sr.add_argument("--tables", help="comma-separated paper tables, e.g. 1,5 (default: all)")
    sr.add_argument(
        "--seeds", help='comma-separated seeds (default: the notebooks\' "0,1,2"; smoke: "0")'
    )
    sr.add_argument(
        "--all-rows",
        action="store_true",
        help="every row of every table (the smoke preset otherwise runs the two rows of each "
        "table's first finding; cpu runs only Table 4's finding rows)",
    )
    sr.add_argument("--results", help="results directory (default results/<preset>)")
    sr.add_argument(
        "--backbone", help="local checkpoint directory (default: the preset's micro backbone)"
    )
    sr.add_argument("--data-root", help="local M-BEIR root (default: the synthetic mini-M-BEIR)")
    _corpus_flags(sr)
    sr.add_argument("--timeout", type=int, help="per-cell execution timeout in seconds")
    sr.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: re-execute the notebooks on the finished runs and rewrite the report",
    )
    sr.add_argument(
        "--estimate",
        action="store_true",
        help="print the batch's time on this device (speeds measured here; printed anyway before a "
        "gpu-preset reproduction) and stop",
    )
    sr.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("UMARVEL_JOBS", "1")),
        help="worker processes that train the rows before the notebooks run (1 thread each; "
        "default $UMARVEL_JOBS or 1)",
    )
    sr.set_defaults(func=cmd_reproduce)

    sx = sub.add_parser("run", help="train + evaluate one row of an ablation table for one seed")
    sx.add_argument("--table", required=True, help="ablation name or number prefix, e.g. table5")
    sx.add_argument("--row", required=True)
    sx.add_argument("--seed", type=int, default=0)
    sx.add_argument("--preset", default="cpu", choices=_presets())
    sx.add_argument("--results")
    sx.add_argument("--backbone")
    sx.add_argument(
        "--data-root", help="local M-BEIR root (default: the synthetic mini-M-BEIR of the preset)"
    )
    _corpus_flags(sx)
    sx.add_argument(
        "--estimate", action="store_true", help="print tokens per stage and GPU-hours, then stop"
    )
    sx.add_argument(
        "--yes", action="store_true", help="start a paper-preset run after the estimate"
    )
    sx.set_defaults(func=cmd_run)

    sc = sub.add_parser(
        "check-data", help="validate M-BEIR (+ NLI, CC3M) before any training; non-zero on errors"
    )
    sc.add_argument("--data-root", required=True, help="local M-BEIR root")
    _corpus_flags(sc)
    sc.add_argument(
        "--rows",
        help="comma-separated test rows to check (default: all 16; a missing one is an error)",
    )
    sc.add_argument(
        "--no-image-decode",
        action="store_true",
        help="check that images exist, without decoding them",
    )
    sc.set_defaults(func=cmd_check_data)

    se = sub.add_parser("evaluate", help="evaluate a checkpoint as it is (trains nothing)")
    se.add_argument(
        "--checkpoint",
        required=True,
        help="local checkpoint dir (released U-MARVEL or trained here)",
    )
    se.add_argument(
        "--data-root", help="local M-BEIR root (default: the synthetic mini-M-BEIR of the preset)"
    )
    se.add_argument(
        "--results", help="output dir (default results/<preset>/checkpoints/<checkpoint name>)"
    )
    se.add_argument(
        "--preset",
        default="paper",
        help="evaluation batch size and embedder defaults (default paper)",
    )
    se.add_argument("--rows", help="comma-separated test rows (default: all 16)")
    se.add_argument("--pools", default="local,global")
    se.set_defaults(func=cmd_evaluate)

    sp2 = sub.add_parser(
        "report", help="(re)write results/<preset>/REPORT.md from the run directories"
    )
    sp2.add_argument("--preset", default="cpu", choices=_presets())
    sp2.add_argument("--results")
    sp2.set_defaults(func=cmd_report)
    return p


def _corpus_flags(p) -> None:
    p.add_argument(
        "--nli-path", help="SimCSE nli_for_simcse.csv (default: <data root>/nli/nli_for_simcse.csv)"
    )
    p.add_argument(
        "--cc3m-root",
        help="folder with LLaVA CC3M-595K chat.json and its images (default: <data root>/cc3m)",
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    """Under `accelerate launch`/`torchrun`: tear the process group down before the interpreter exits."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
