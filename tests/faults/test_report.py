"""A damaged sidecar or metrics file: the report skips and lists it, the run counts as not finished."""

import shutil
from pathlib import Path

from umarvel_lib.experiment import _metrics_readable, read_sidecar
from umarvel_lib.report.report import write_report

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "results" / "cpu" / "runs" / "table1" / "{}" / "seed0"  # committed finished runs


def _cut(f: Path):
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def test_report_skips_and_lists_damaged_runs(tmp_path, caplog):
    res = tmp_path / "results"
    for rid in ("0", "1", "2"):
        shutil.copytree(
            str(RUN).format(rid),
            res / "runs" / "table1" / rid / "seed0",
            ignore=shutil.ignore_patterns("*.trec"),
        )
    side = res / "runs/table1/1/seed0/row.json"
    metrics = res / "runs/table1/2/seed0/eval/local/metrics.json"
    _cut(side)
    _cut(metrics)
    report = write_report(res, "cpu", n_boot=50).read_text()
    fail = report[report.index("## Failures") : report.index("## Summary")]
    assert (
        "table 1 row `1` seed 0 has a damaged file" in fail
        and "runs/table1/1/seed0/row.json" in fail
    )
    assert (
        "table 1 row `2` seed 0 has a damaged file" in fail
        and "runs/table1/2/seed0/eval/local/metrics.json" in fail
    )
    assert "damaged JSON" in fail
    # the intact run is reported as usual
    ours = [line for line in report.splitlines() if line.startswith("| 0 | ")]
    assert ours and ours[0].split(" | ")[3] not in ("", "None")
    # and the damaged ones count as not finished: the next run of the row trains it again
    with caplog.at_level("WARNING"):
        assert read_sidecar(side) is None
        ok = read_sidecar(res / "runs/table1/2/seed0/row.json")
        assert ok is not None and not _metrics_readable(metrics.parents[2], ok)
    assert str(side) in caplog.text and str(metrics) in caplog.text
