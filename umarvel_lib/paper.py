"""The paper's numbers and findings, read from the shipped tables (``umarvel_lib/paper_tables``).

Tables 1-6 and 15 come from secondary summaries of the paper and are **provisional**
(see ``paper_tables/PROVENANCE.md``); Tables 7-10 are copied from the table images in the official
repository. This module is the only place the paper's numbers enter the kit: they appear in reports
as the *paper* column, never as results.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import pandas as pd

TABLE_FILES = {
    1: "secondary_table01_embedding_extraction.csv",
    2: "secondary_table02_instruction_masking.csv",
    3: "secondary_table03_progressive_transition.csv",
    4: "secondary_table04_batch_lr_temperature.csv",
    5: "secondary_table05_hard_negative_mining.csv",
    6: "secondary_table06_distillation.csv",
    7: "iclr_table07_mbeir_local_pool.csv",
    8: "iclr_table08_mbeir_global_pool.csv",
    15: "secondary_table15_stagewise_per_task.csv",
}
PROVISIONAL = {1, 2, 3, 4, 5, 6, 15}


def table_path(table: int):
    return resources.files("umarvel_lib") / "paper_tables" / TABLE_FILES[table]


def load_table(table: int) -> pd.DataFrame:
    """A paper table as printed (strings kept, e.g. ``failed``)."""
    with table_path(table).open("r", encoding="utf-8") as f:
        return pd.read_csv(f, dtype=str, keep_default_na=False)


def provenance(table: int) -> str:
    if table in PROVISIONAL:
        return (
            f"Table {table}: PROVISIONAL (secondary summary of the paper, not checked against the PDF; "
            f"{TABLE_FILES[table]})"
        )
    return f"Table {table}: from the table image in the official repository ({TABLE_FILES[table]})"


def _num(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None  # "failed", "-"


def paper_row(table: int, key: str | int) -> dict[str, float | str | None]:
    """``{'local': .., 'global': .., 'label': ..}`` for one row of Tables 1-6.

    ``key`` is the row's ID (Tables 1-5; the Table 5 baseline has ID ``"baseline"``) or its
    method name (Table 6).
    """
    df = load_table(table)
    if "ID" in df.columns:
        ids = df["ID"].replace("", "baseline")
        match = df[ids == str(key)]
    else:
        match = df[df["Methods"] == str(key)]
    if len(match) != 1:
        raise KeyError(f"paper Table {table} has no unique row {key!r} ({TABLE_FILES[table]})")
    r = match.iloc[0]
    local = r.get("Local Avg.")
    glob = r.get("Global Avg.", "")
    label = " / ".join(str(v) for k, v in r.items() if k not in ("ID", "Local Avg.", "Global Avg."))
    return {
        "local": _num(local),
        "global": _num(glob),
        "local_raw": local,
        "global_raw": glob,
        "label": label,
    }


@dataclass(frozen=True)
class Finding:
    """A paper claim ``better > worse`` (or a special kind) between two rows of a table."""

    id: str
    table: int
    text: str
    better: str  # row id in our ablation YAML
    worse: str
    pool: str = "local"
    kind: str = "greater"  # "greater" | "worst" (better is the worst row: `worse` lists are ignored) | "fails"
    sub_1pt: bool = (
        False  # the paper's effect is well under 1 point: expected within noise at micro scale
    )


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "T1a",
        1,
        "bidirectional+mean+no prompt > causal+last+prompt (57.2 vs 56.6)",
        "4",
        "0",
        sub_1pt=True,
    ),
    Finding(
        "T1b", 1, "causal+mean+prompt is the worst row of Table 1 (33.7)", "2", "*", kind="worst"
    ),
    Finding("T1c", 1, "with bidirectional+mean, no prompt > prompt (57.2 vs 51.7)", "4", "3"),
    Finding("T1d", 1, "bidirectional+last < causal+last (55.5 vs 56.6)", "0", "1"),
    Finding(
        "T2a",
        2,
        "no instructions < instructions, larger drop on the global pool (55.3/43.4 vs 57.2/55.2)",
        "1",
        "2",
        pool="global",
    ),
    Finding("T2b", 2, "instruction masking >= no masking (57.3 vs 57.2)", "0", "1", sub_1pt=True),
    Finding("T3a", 3, "+text-only stage > M-BEIR only (57.3 vs 56.6)", "1", "0", sub_1pt=True),
    Finding("T3b", 3, "+text-image stage > +text-only (57.7 vs 57.3)", "2", "1", sub_1pt=True),
    Finding(
        "T4a", 4, "batch 3840 / LR 4e-4 > batch 480 / LR 1e-4, tau fixed (58.9 vs 57.2)", "4", "0"
    ),
    Finding(
        "T4b", 4, "learnable tau > fixed tau at the same batch and LR (60.1 vs 58.9)", "7", "4"
    ),
    Finding(
        "T5a",
        5,
        "hard negatives only fails (far below the baseline)",
        "baseline",
        "0",
        kind="fails",
    ),
    Finding("T5b", 5, "in-batch + unfiltered top-k < baseline (57.4 vs 60.6)", "baseline", "1"),
    Finding("T5c", 5, "in-batch + filtered top-k > baseline (61.7 vs 60.6)", "2", "baseline"),
    Finding(
        "T6a", 6, "distillation > hard-negative baseline (63.2 vs 61.7)", "distillation", "baseline"
    ),
    Finding(
        "T6b",
        6,
        "the reranker teacher > the distilled student (64.5 vs 63.2)",
        "reranker",
        "distillation",
    ),
)
FINDINGS_BY_ID = {f.id: f for f in FINDINGS}


def finding_rows(table: int) -> set[str]:
    """Row ids of a table that its findings compare ("*": every paper row of the table, e.g. T1b's
    "worst row"); the batch runner trains these first."""
    out: set[str] = set()
    for f in FINDINGS:
        if f.table != table:
            continue
        for rid in (f.better, f.worse):
            if rid == "*":
                from .ablation import load_ablation

                out |= {str(r.id) for r in load_ablation(f"table{table}").rows if not r.explain}
            else:
                out.add(str(rid))
    return out
