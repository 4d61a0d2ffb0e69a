"""A failing row fails its notebook, papermill and `umarvel reproduce`; unknown presets are refused."""

from pathlib import Path

import pytest

from umarvel_lib.cli import main
from umarvel_lib.io import read_json

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--preset", "nonsense"],
        ["reproduce", "--preset", "nonsense"],
        ["run", "--table", "table1", "--row", "0", "--preset", "nonsense"],
    ],
)
def test_cli_refuses_an_unknown_preset(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("backbone", ["/nonexistent", "Qwen/Qwen2-VL-7B-Instruct"])
def test_reproduce_refuses_a_missing_or_hub_backbone(backbone, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--preset", "smoke", "--backbone", backbone]) == 2
    assert backbone in capsys.readouterr().err


@pytest.mark.slow  # two notebooks through papermill (about a minute on 2 cores)
def test_a_failing_row_fails_its_notebook_and_the_batch(tmp_path, monkeypatch):
    """The row's error reaches FAILED.json, batch.json (ename, evalue, traceback) and REPORT.md (first)."""
    monkeypatch.chdir(tmp_path)
    empty = (
        tmp_path / "not-a-checkpoint"
    )  # a directory without weights: every row fails when it starts
    empty.mkdir()
    res = tmp_path / "results" / "smoke"
    rc = main(
        [
            "reproduce",
            "--preset",
            "smoke",
            "--tables",
            "2",
            "--seeds",
            "0",
            "--backbone",
            str(empty),
            "--timeout",
            "300",
        ]
    )
    assert rc == 1
    nb = read_json(res / "batch.json")["02_instruction_masking"]
    assert nb["status"] == "failed" and nb["ename"] == "RowsFailedError"
    assert (
        "no *.safetensors" in nb["evalue"]
        and "run_table" in nb["traceback"]
        and "\x1b[" not in nb["traceback"]
    )
    assert (res / "notebooks" / "02_instruction_masking.FAILED.ipynb").is_file()
    fail = read_json(
        res / "runs" / "table2" / "1" / "seed0" / "FAILED.json"
    )  # smoke: the first finding's rows
    assert "no *.safetensors" in fail["error"] and "Traceback" in fail["traceback"]
    assert not (res / "runs" / "table2" / "1" / "seed0" / "row.json").exists()
    report = (res / "REPORT.md").read_text()
    assert report.index("## Failures") < report.index("## Table 1")
    assert "notebook `02_instruction_masking` FAILED: RowsFailedError" in report
    assert "table 2 row `1` seed 0 FAILED: FileNotFoundError" in report


def test_papermill_refuses_an_unknown_preset(tmp_path, monkeypatch):
    import papermill as pm

    from umarvel_lib.runner import kernel_name

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        pm.PapermillExecutionError, match="unknown preset 'nonsense'; choose from cpu, gpu"
    ):
        pm.execute_notebook(
            str(ROOT / "notebooks" / "08_report.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters={"preset": "nonsense"},
            kernel_name=kernel_name(),
            progress_bar=False,
        )
    assert not (tmp_path / "results").exists()
