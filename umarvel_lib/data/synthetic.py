"""Synthetic mini-M-BEIR: 16 dataset-task rows in the real M-BEIR layout, built from procedural scenes.

The build: its sizes (:class:`SyntheticConfig`, :data:`SYNTHETIC_PRESETS`), which items each split
draws (test, dev and train items disjoint), and :func:`generate`, which writes the whole root atomically.
What a row's queries and candidates are (near misses, twin groups): :mod:`umarvel_lib.data.synthetic_rows`;
the files in M-BEIR's, SimCSE's and LLaVA's formats: :mod:`umarvel_lib.data.synthetic_writer`.

A documented fraction of queries gets a **planted false negative**: an unlabelled near-duplicate of
its positive (same scene re-rendered with jitter, or a paraphrase of the positive text), listed in
``synthetic_meta/planted_false_negatives.jsonl``. This is the failure mode of M-BEIR that the
paper's similarity-threshold filter targets.

Also written: a **dev split** (``query/val``, ``qrels/val``, ``cand_pool/local/mbeir_<row>_val_cand_pool.jsonl``,
``n_dev`` queries per row, disjoint from test and train and never trained on), for the learning
curves and the plateau rule; and the two earlier-stage corpora in the formats the paper used, ``nli/nli_for_simcse.csv``
(``sent0,sent1,hard_neg``) and ``cc3m/chat.json`` (LLaVA CC3M-595K style conversations + images).

Deterministic: same config and seed give the same bytes (no set/dict-of-set iteration, PNGs from
pixel-identical images). Written atomically: the root appears only once complete.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io import atomic_dir, config_hash, file_lock
from .mbeir_rows import EVAL_ROWS, TASKS, row_name
from .synthetic_rows import TWINS, Example, row_groups
from .synthetic_writer import (
    Writer,
    dedup,
    row_seed,
    write_cc3m,
    write_instructions,
    write_jsonl,
    write_nli,
    write_qrels,
    write_split,
)


@dataclass
class SyntheticConfig:
    """Sizes of the synthetic mini-M-BEIR (see :data:`SYNTHETIC_PRESETS`)."""

    n_test: int = 300  # test queries per row
    n_train: int = 1200  # train queries per row (union_train = 16 x n_train)
    n_dev: int = 0  # dev (val split) queries per row, for learning curves (0: no dev split)
    near_misses: int = 3  # near-miss candidates per query (one attribute off)
    distractors: int = 100  # random extra candidates per row pool
    false_negative_rate: float = (
        0.1  # fraction of queries with a planted unlabelled duplicate of the positive
    )
    image_size: int = 112
    n_nli: int = 4000
    n_cc3m: int = 4000
    seed: int = 0


SYNTHETIC_PRESETS = {
    "smoke": dict(
        n_test=16,
        n_train=24,
        n_dev=4,
        near_misses=2,
        distractors=6,
        n_nli=64,
        n_cc3m=64,
        image_size=56,
    ),
    # cpu: 50 test / 30 dev queries per row (800 / 480; the dev Avg's 95% CI half-width is about 3-4
    # points), 300 train queries per row (4,800: a plateau of a few hundred steps of batch 16 within one
    # or two epochs, as the probe of Table 1 trained). Difficulty (6 near misses per query, 90 random
    # distractors per pool) chosen once by bench/calibrate.py on Table 1 row 4 alone, seed 0, from the
    # grid [(3, 30), (6, 90)] fixed before the runs, by the rule fixed with it (most dataset-task rows
    # with a plateau headline in [40, 80]): 6/16 rows in the band against 3/16 (results/calibration/).
    "cpu": dict(
        n_test=50,
        n_train=300,
        n_dev=30,
        near_misses=6,
        distractors=90,
        n_nli=800,
        n_cc3m=800,
    ),
    "gpu": dict(
        n_test=1000,
        n_train=5000,
        n_dev=200,
        near_misses=4,
        distractors=500,
        n_nli=20000,
        n_cc3m=20000,
    ),
}


def _item_keys(it) -> list[str]:
    """What must not leak from test or dev into train: an item's scene (for an example of a single
    row: the query's scene, or the positive's, or the query text)."""
    if not isinstance(it, Example):
        return [it.scene.key]
    if it.query.scene is not None:
        return [it.query.scene.key]
    if it.positive.scene is not None:
        return [it.positive.scene.key]
    return [it.query.txt or ""]


def _draw_items(
    draw, rng: random.Random, cfg: SyntheticConfig, n: int, held_out: set[str], what: str
) -> list:
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 100:
            raise RuntimeError(
                f"{what}: cannot draw {n} items disjoint from the test and dev items"
            )
        it = draw(rng, cfg)
        if not any(
            k in held_out for k in _item_keys(it)
        ):  # no test or dev scene leaks into a later split
            out.append(it)
    return out


RECIPE_FILE = Path("synthetic_meta") / "recipe.json"  # the build's recipe and its hash


def build_digest(root) -> str | None:
    """Identity of a synthetic mini-M-BEIR build: its recipe hash (``synthetic_meta/recipe.json``), so
    that runs and cached stages of another build of the same preset are not reused. None for a root
    without the marker (a real M-BEIR copy: its path identifies it)."""
    marker = Path(root) / RECIPE_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())["hash"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{marker}: not a synthetic recipe file ({e})") from e


def generate(root, cfg: SyntheticConfig | None = None, *, force: bool = False) -> Path:
    """Write the synthetic mini-M-BEIR under ``root`` (atomic; a no-op when an identical build exists,
    rebuilt when the recipe differs or its marker is unreadable)."""
    cfg = cfg or SyntheticConfig()
    root = Path(root)
    recipe = {"generator": "umarvel_lib.data.synthetic", "version": 2, "config": asdict(cfg)}
    h = config_hash(recipe)

    def built() -> bool:
        try:
            return build_digest(root) == h
        except ValueError:
            return False  # a broken marker: build again

    if not force and built():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # concurrent runs on one data root: the first builds, the others wait and reuse its build
    with file_lock(root.parent / f".{root.name}.lock"):
        if not force and built():
            return root
        with atomic_dir(root) as tmp:
            _build(tmp, cfg)
            (tmp / RECIPE_FILE).parent.mkdir(exist_ok=True)
            (tmp / RECIPE_FILE).write_text(
                json.dumps({**recipe, "hash": h}, indent=2, sort_keys=True) + "\n"
            )
    return root


SPLITS = ("test", "val", "train")  # drawn in this order; val is the dev split


def _build(root: Path, cfg: SyntheticConfig) -> None:
    w = Writer(root, cfg)
    fn_log: list[dict] = []
    written: dict[str, dict] = {}  # row name -> split -> (queries, pool records)
    sizes = {"test": cfg.n_test, "val": cfg.n_dev, "train": cfg.n_train}
    for dataset, tasks, draw, views in row_groups():
        held_out: set[str] = set()
        for split in SPLITS:
            n = sizes[split]
            if not n:
                continue
            rng = random.Random(row_seed(cfg.seed, dataset, "+".join(map(str, tasks)), split))
            what = f"{dataset} tasks {'/'.join(map(str, tasks))} ({split})"
            items = _draw_items(draw, rng, cfg, n, held_out, what)
            # random distractors: more items of the dataset, in the test and dev pools only (dev: pro rata)
            n_extra = {
                "test": cfg.distractors,
                "val": round(cfg.distractors * n / max(1, cfg.n_test)),
                "train": 0,
            }[split]
            extra = [draw(rng, cfg) for _ in range(n_extra)]
            held_out.update(k for it in items for k in _item_keys(it))
            for task in tasks:
                view, name = views[task], row_name(dataset, task)
                vrng = random.Random(row_seed(cfg.seed, dataset, task, f"{split}/view"))
                examples = [view(it, vrng, cfg) for it in items]
                pool: dict[str, dict] = {}
                queries = write_split(w, split, dataset, task, examples, vrng, pool, fn_log)
                for it in extra:
                    w.candidate(dataset, view(it, vrng, cfg).positive, pool)
                written.setdefault(name, {})[split] = (queries, list(pool.values()))
    union_train, test_pools, train_pool_all, stats = [], [], [], []
    for dataset, task in EVAL_ROWS:
        name = row_name(dataset, task)
        for split, (queries, pool) in written[name].items():
            write_jsonl(root / "query" / split / f"mbeir_{name}_{split}.jsonl", queries)
            write_qrels(root / "qrels" / split / f"mbeir_{name}_{split}_qrels.txt", queries)
            pool_name = (
                f"mbeir_{name}_cand_pool.jsonl"
                if split == "test"
                else f"mbeir_{name}_{split}_cand_pool.jsonl"
            )
            write_jsonl(root / "cand_pool" / "local" / pool_name, pool)
        tq, tpool = written[name]["test"]
        trq, trpool = written[name]["train"]
        dq, dpool = written[name].get("val", ([], []))
        union_train += trq
        test_pools += tpool
        train_pool_all += trpool
        stats.append(
            {
                "row": name,
                "task_id": task,
                "query_modality": TASKS[task][0],
                "cand_modality": TASKS[task][1],
                "twin_group": dataset if dataset in TWINS else None,
                "n_test_queries": len(tq),
                "n_test_pool": len(tpool),
                "n_dev_queries": len(dq),
                "n_dev_pool": len(dpool),
                "n_train_queries": len(trq),
                "n_train_pool": len(trpool),
            }
        )
    write_jsonl(root / "query" / "union_train" / "mbeir_union_up_train.jsonl", union_train)
    write_jsonl(
        root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl", dedup(test_pools)
    )
    write_jsonl(
        root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl", dedup(train_pool_all)
    )
    write_instructions(root)
    write_nli(root, cfg)
    write_cc3m(root, cfg)
    meta = root / "synthetic_meta"
    write_jsonl(meta / "planted_false_negatives.jsonl", fn_log)
    write_jsonl(meta / "rows.jsonl", stats)
