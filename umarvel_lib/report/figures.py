"""Figures a reviewer reads at a glance: each table as differences from its baseline row (paper and
ours side by side, one axis, 95% CIs over seeds x queries), the findings forest plot, learning
curves with stage boundaries, and a check that no two tick labels overlap.

The intervals are the paired seeds x queries bootstrap of :func:`.findings.paired_difference` (the
same machinery as the verdicts); this module reads run directories only and imports no model code.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from ..ablation import Ablation
from ..paper import FINDINGS_BY_ID
from .findings import paired_difference
from .tables import hits_by_row, sidecars, table_vs_paper

DPI = 90  # moderate: the executed notebooks embed these figures
VERDICT_COLOURS = {
    "held": "#1a9850",
    "within noise": "#878787",
    "contradicted": "#d73027",
    "too few seeds": "#fdae61",
    "not at plateau": "#abd9e9",
    "not run": "#d9d9d9",
}
OURS, OWN, PAPER = "#4575b4", "#e66101", "#bdbdbd"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else f


def _source(r) -> str:
    return "yours" if r.own else "diagnostic" if r.explain else "paper"


def differences(results, ablation: Ablation, *, n_boot: int = 1000) -> pd.DataFrame:
    """Per row and pool: ours minus the baseline row (paired over the seeds both finished, bootstrapped
    over seeds x queries, 95% interval) beside the paper's difference of the same rows."""
    df = table_vs_paper(results, ablation).set_index("id")
    base = ablation.baseline.id
    recs = []
    for pool in ablation.pools:
        hits, _ = hits_by_row(results, ablation.table, pool)
        pb = _num(df.at[base, f"paper_{pool}"]) if f"paper_{pool}" in df else None
        for r in ablation.rows:
            pr = _num(df.at[r.id, f"paper_{pool}"]) if f"paper_{pool}" in df else None
            rec = {
                "id": r.id,
                "row": r.label,
                "source": _source(r),
                "pool": pool,
                "paper_diff": None if pr is None or pb is None else round(pr - pb, 2),
                "diff": None,
                "ci95_lo": None,
                "ci95_hi": None,
                "n_seeds": 0,
                "ours": _num(df.at[r.id, f"ours_{pool}"]),
                "paper": pr,
            }
            seeds = sorted(set(hits.get(r.id, {})) & set(hits.get(base, {})))
            if r.id == base and seeds:
                rec.update(diff=0.0, ci95_lo=0.0, ci95_hi=0.0, n_seeds=len(seeds))
            elif seeds:
                d, (lo, hi), _ = paired_difference(
                    [hits[r.id][s] for s in seeds], [hits[base][s] for s in seeds], n_boot=n_boot
                )
                rec.update(
                    diff=round(d, 2), ci95_lo=round(lo, 2), ci95_hi=round(hi, 2), n_seeds=len(seeds)
                )
            recs.append(rec)
    return pd.DataFrame.from_records(
        recs,
        columns=[
            "id",
            "row",
            "source",
            "pool",
            "paper_diff",
            "diff",
            "ci95_lo",
            "ci95_hi",
            "n_seeds",
            "ours",
            "paper",
        ],
    )


def _wrap(s: str, width: int = 34) -> str:
    return "\n".join("\n".join(textwrap.wrap(line, width)) or line for line in str(s).split("\n"))


def plot_differences(diff: pd.DataFrame, title: str, baseline_label: str, path=None):
    """Horizontal bars, one panel per pool on one shared axis each: the paper's difference from the
    baseline row (grey) and ours (blue; a reader's own rows orange) with its 95% CI."""
    plt = _pyplot()
    pools = list(dict.fromkeys(diff["pool"])) or ["local"]
    rows = list(dict.fromkeys(diff["id"]))
    labels = {}
    for rid in rows:
        d = diff[diff.id == rid].iloc[0]
        tag = (
            " (yours)"
            if d["source"] == "yours"
            else " (diagnostic)"
            if d["source"] == "diagnostic"
            else ""
        )
        if rid == rows[0]:  # the baseline: its absolute values (the bars are differences from them)
            vals = ", ".join(
                f"{p} ours {_num(v['ours'])} / paper {v['paper'] if v['paper'] is not None else '-'}"
                for p, v in zip(
                    diff[diff.id == rid]["pool"], diff[diff.id == rid].to_dict("records")
                )
            )
            tag += f" [baseline: {vals}]"
        labels[rid] = _wrap(f"{rid}: {d['row']}{tag}")
    n_lines = sum(labels[r].count("\n") + 1 for r in rows)
    fig, axes = plt.subplots(
        1,
        len(pools),
        figsize=(5.2 + 3.4 * len(pools), 1.2 + 0.36 * n_lines + 0.25 * len(rows)),
        sharey=True,
        squeeze=False,
        dpi=DPI,
    )
    y = np.arange(len(rows))[::-1].astype(float)
    for ax, pool in zip(axes[0], pools):
        sub = diff[diff.pool == pool].set_index("id")
        for yi, rid in zip(y, rows):
            if rid not in sub.index:
                continue
            d = sub.loc[rid]
            if d["paper_diff"] is not None and not pd.isna(d["paper_diff"]):
                ax.barh(
                    yi + 0.2,
                    d["paper_diff"],
                    height=0.38,
                    color=PAPER,
                    edgecolor="k",
                    linewidth=0.4,
                )
            if d["diff"] is None or pd.isna(d["diff"]):
                ax.text(0, yi - 0.2, " no per-query hits", fontsize=7, color="0.4", va="center")
            else:
                colour = OWN if d["source"] == "yours" else OURS
                err = np.array([[d["diff"] - d["ci95_lo"]], [d["ci95_hi"] - d["diff"]]])
                ax.barh(
                    yi - 0.2,
                    d["diff"],
                    height=0.38,
                    color=colour,
                    xerr=err,
                    capsize=2,
                    error_kw={"elinewidth": 0.8},
                )
        ax.axvline(0, color="k", linewidth=0.6)
        ax.set_title(f"{pool} pool", fontsize=9)
        ax.set_xlabel("difference from the baseline row (points)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    axes[0][0].set_yticks(y)
    axes[0][0].set_yticklabels([labels[r] for r in rows], fontsize=7)
    axes[0][0].set_ylim(-0.7, len(rows) - 0.3)
    from matplotlib.patches import Patch

    handles = [
        Patch(color=PAPER, label="paper"),
        Patch(color=OURS, label="ours (95% CI, seeds x queries)"),
    ]
    if (diff["source"] == "yours").any():
        handles.append(Patch(color=OWN, label="your rows (same seeds)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(_wrap(f"{title}\nbaseline = {baseline_label}", 90), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    if path:
        fig.savefig(path, dpi=DPI)
    return fig


def finding_paper_diff(finding, paper: pd.DataFrame, pool: str) -> float | None:
    """The paper's difference for one finding (better minus worse; for a 'worst' finding, the closest
    other row minus the worst), from the table's ``paper_<pool>`` column."""
    col = f"paper_{pool}"
    if col not in paper:
        return None
    vals = {str(k): _num(v) for k, v in zip(paper["id"], paper[col])}
    b = vals.get(finding.better)
    if finding.kind == "worst":
        others = [v for k, v in vals.items() if k != finding.better and v is not None]
        return None if b is None or not others else round(min(others) - b, 2)
    w = vals.get(finding.worse)
    return None if b is None or w is None else round(b - w, 2)


def findings_frame(verdicts: pd.DataFrame, paper_tables: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """The verdicts of all findings with the paper's difference beside ours (``paper_diff``)."""
    out = verdicts.copy()
    out["paper_diff"] = [
        finding_paper_diff(FINDINGS_BY_ID[f], paper_tables[FINDINGS_BY_ID[f].table], p)
        if FINDINGS_BY_ID[f].table in paper_tables
        else None
        for f, p in zip(out["finding"], out["pool"])
    ]
    return out


def plot_findings(ff: pd.DataFrame, title: str, path=None):
    """Forest plot: one line per finding, our paired difference with its 95% CI coloured by verdict,
    the paper's difference as a black marker (positive = the paper's direction)."""
    plt = _pyplot()
    ff = ff.reset_index(drop=True)
    labels = [_wrap(f"{r.finding}: {r.claim}", 48) for r in ff.itertuples()]
    n_lines = sum(lab.count("\n") + 1 for lab in labels)
    fig, ax = plt.subplots(figsize=(10, 1.3 + 0.24 * n_lines + 0.12 * len(ff)), dpi=DPI)
    y = np.arange(len(ff))[::-1].astype(float)
    for yi, r in zip(y, ff.itertuples()):
        colour = VERDICT_COLOURS.get(r.verdict, "k")
        if _num(r.diff) is not None:
            lo, hi = _num(r.ci95_lo), _num(r.ci95_hi)
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [yi, yi], color=colour, linewidth=2)
            ax.plot([r.diff], [yi], "o", color=colour, markersize=6)
        else:
            ax.text(0, yi, r.verdict, fontsize=7, color="0.4", va="center", ha="center")
        if _num(r.paper_diff) is not None:
            ax.plot([r.paper_diff], [yi], "D", color="k", markersize=5, markerfacecolor="none")
    ax.axvline(0, color="k", linewidth=0.6)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(-0.7, len(ff) - 0.3)
    ax.set_xlabel("difference in Avg (points): the paper's direction is positive", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, marker="o", linewidth=2, label=f"ours: {v}")
        for v, c in VERDICT_COLOURS.items()
        if v in set(ff.verdict)
    ]
    handles.append(
        Line2D([], [], color="k", marker="D", markerfacecolor="none", linestyle="", label="paper")
    )
    fig.legend(
        handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False
    )
    ax.set_title(_wrap(title, 70), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    if path:
        fig.savefig(path, dpi=DPI)
    return fig


def curve_frames(results, table: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training loss, dev metric) per row, seed, stage and run-wide optimizer step, from ``row.json``
    ``curves``; the dev frame is empty for runs trained without periodic evaluation."""
    loss, dev = [], []
    for s in sidecars(results, table):
        offset, seen, last = 0, {}, None
        for c in s.get("curves") or []:
            st = c.get("stage")
            if st != last:
                if last is not None:
                    offset += seen.get(last, 0)
                last = st
            step = int(c.get("step", 0))
            seen[st] = max(seen.get(st, 0), step)
            rec = {
                "row": str(s["row"]),
                "seed": s["seed"],
                "stage": st,
                "global_step": offset + step,
            }
            if c.get("kind") == "train" and "loss" in c:
                loss.append({**rec, "loss": c["loss"]})
            elif c.get("kind") == "eval":
                metric = next((k for k in ("dev_avg", "local_avg") if k in c), None)
                if metric:
                    dev.append({**rec, "metric": metric, "value": c[metric]})
    return (
        pd.DataFrame(loss, columns=["row", "seed", "stage", "global_step", "loss"]),
        pd.DataFrame(dev, columns=["row", "seed", "stage", "global_step", "metric", "value"]),
    )


def plot_curves(results, table: int, path=None):
    """Training loss over optimizer steps and, where the runs evaluated periodically, the dev retrieval
    metric; one line per row (seed mean), stage boundaries as dotted lines."""
    plt = _pyplot()
    loss, dev = curve_frames(results, table)
    panels = 2 if not dev.empty else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 3.8), squeeze=False, dpi=DPI)
    for ax, (df, col, ylab) in zip(
        axes[0], ((loss, "loss", "training loss"), (dev, "value", "dev Avg (%)"))
    ):
        if df.empty:
            ax.text(
                0.5, 0.5, "no curves recorded", ha="center", va="center", transform=ax.transAxes
            )
            continue
        for rid, g in df.groupby("row", sort=False):
            m = g.groupby("global_step")[col].mean()
            ax.plot(
                m.index, m.values, marker="." if len(m) < 12 else None, label=str(rid), linewidth=1
            )
        bounds = df.groupby(["row", "stage"], sort=False)["global_step"].min()
        for b in sorted(set(bounds.values) - {bounds.values.min()}):
            ax.axvline(b, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xlabel("optimizer step (all stages; dotted: a stage starts)", fontsize=8)
        ax.set_ylabel(ylab, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(title="row", fontsize=7, title_fontsize=7, ncol=2)
    fig.suptitle(
        f"Table {table}: learning curves (seed mean)"
        + ("" if not dev.empty else "; no dev evaluation recorded"),
        fontsize=9,
    )
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=DPI)
    return fig


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels whose rendered bounding boxes overlap (per axis of every panel); a label cut
    off by the figure's edge is reported paired with ``"<figure edge>"``."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    edge = fig.bbox
    out = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            labs = [
                t.label1
                for t in axis.get_major_ticks()  # the ticks drawn: inside the view
                if t.label1.get_visible()
                and t.label1.get_text()
                and lo - 1e-9 <= t.get_loc() <= hi + 1e-9
            ]
            boxes = [t.get_window_extent(renderer) for t in labs]
            out += [
                (t.get_text(), "<figure edge>")
                for t, b in zip(labs, boxes)
                if b.x0 < edge.x0 - 0.5
                or b.x1 > edge.x1 + 0.5
                or b.y0 < edge.y0 - 0.5
                or b.y1 > edge.y1 + 0.5
            ]
            for i in range(len(labs)):
                for j in range(i + 1, len(labs)):
                    if boxes[i].overlaps(boxes[j]):
                        out.append((labs[i].get_text(), labs[j].get_text()))
    return out
