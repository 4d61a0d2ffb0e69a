"""The figures read at a glance: differences from the baseline row on one axis, the findings forest
plot, and no two tick labels overlapping (checked on the rendered text extents)."""

import pandas as pd

from umarvel_lib.paper import FINDINGS
from umarvel_lib.report import figures
from umarvel_lib.report.findings import VERDICTS


def _diff_frame(n_rows=10, pools=("local", "global")):
    recs = []
    for pool in pools:
        for i in range(n_rows):
            recs.append(
                {
                    "id": str(i) if i < n_rows - 1 else "my_row",
                    "row": f"global batch {480 * (i + 1)}, learnable temperature, LR {i + 1}e-4, a long label",
                    "source": "yours" if i == n_rows - 1 else "paper",
                    "pool": pool,
                    "paper_diff": None if i == n_rows - 1 else 0.5 * i,
                    "diff": 0.0 if i == 0 else -0.3 * i,
                    "ci95_lo": -0.3 * i - 1,
                    "ci95_hi": -0.3 * i + 1,
                    "n_seeds": 3,
                    "ours": 15.0,
                    "paper": 57.2,
                }
            )
    return pd.DataFrame(recs)


def test_table_figure_labels_do_not_overlap_and_show_your_rows(tmp_path):
    fig = figures.plot_differences(
        _diff_frame(),
        "Table 4: batch size, learning rate and temperature (cpu)",
        "0: 480, fixed, 1e-4",
        tmp_path / "t.png",
    )
    assert figures.overlapping_tick_labels(fig) == []
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 10 and "(yours)" in labels[-1] and "baseline" in labels[0]
    assert len(fig.axes) == 2 and not any(ax.get_ylabel() for ax in fig.axes[1:])  # no twin axis
    assert (tmp_path / "t.png").stat().st_size > 5000


def test_the_overlap_check_can_fail():
    fig = figures.plot_differences(_diff_frame(), "t", "0")
    fig.set_size_inches(3, 1.5)
    assert figures.overlapping_tick_labels(fig)


def test_findings_forest_plot(tmp_path):
    verdicts = list(VERDICTS)
    vall = pd.DataFrame(
        [
            {
                "finding": f.id,
                "claim": f.text,
                "pool": f.pool,
                "verdict": verdicts[i % 6],
                "diff": None if i % 6 == 5 else 0.4 * i - 2,
                "ci95_lo": 0.4 * i - 3,
                "ci95_hi": 0.4 * i - 1,
            }
            for i, f in enumerate(FINDINGS)
        ]
    )
    paper = {
        1: pd.DataFrame(
            {"id": ["0", "1", "2", "3", "4"], "paper_local": [56.6, 55.5, 33.7, 51.7, 57.2]}
        )
    }
    ff = figures.findings_frame(vall, paper)
    got = dict(zip(ff.finding, ff.paper_diff))
    assert (
        got["T1a"] == 0.6 and got["T1b"] == 18.0 and got["T1d"] == 1.1
    )  # better - worse; worst: closest - worst
    assert pd.isna(got["T5a"])  # no paper table given
    fig = figures.plot_findings(ff, "The paper's findings", tmp_path / "f.png")
    assert len(fig.axes[0].get_yticklabels()) == 15 and figures.overlapping_tick_labels(fig) == []
    assert (tmp_path / "f.png").is_file()


def test_curves_without_dev_evaluation(tmp_path):
    import json

    run = tmp_path / "runs" / "table3" / "0" / "seed0"
    run.mkdir(parents=True)
    curves = [
        {"stage": s, "kind": "train", "step": k, "loss": 3.0 - k / 10}
        for s in ("nli", "mbeir")
        for k in (1, 2, 3)
    ]
    (run / "row.json").write_text(
        json.dumps({"table": 3, "row": "0", "seed": 0, "status": "ok", "curves": curves})
    )
    loss, dev = figures.curve_frames(tmp_path, 3)
    assert list(loss.global_step) == [1, 2, 3, 4, 5, 6] and dev.empty
    fig = figures.plot_curves(tmp_path, 3)
    assert len(fig.axes) == 1 and figures.overlapping_tick_labels(fig) == []
    curves += [{"stage": "mbeir", "kind": "eval", "step": 3, "dev_avg": 12.5}]
    (run / "row.json").write_text(
        json.dumps({"table": 3, "row": "0", "seed": 0, "status": "ok", "curves": curves})
    )
    assert len(figures.plot_curves(tmp_path, 3).axes) == 2
