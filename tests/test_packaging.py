"""Packaging, notebooks and CI plumbing."""

import json
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "python=3.11" in env["dependencies"]
    assert [p for p in pip if p != "-e ."] == deps


def test_layout_and_ci():
    for p in (
        "umarvel_lib",
        "notebooks",
        "ablations",
        "results",
        "tests",
        "environment.yml",
        "README.md",
        "pyproject.toml",
        "Makefile",
        ".ci/run",
    ):
        assert (ROOT / p).exists(), p
    assert "make test-all" in (ROOT / ".ci/run").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "test: lint" in make and "test-all: lint" in make and "ruff check" in make
    readme = (ROOT / "README.md").read_text()
    assert "make reproduce" in readme and "make test" in readme


def test_notebooks_have_parameters_and_no_outputs():
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(nbs) == 9
    for nb in nbs:
        d = json.loads(nb.read_text())
        code = [c for c in d["cells"] if c["cell_type"] == "code"]
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name}: exactly one cell tagged parameters"
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
            f"{nb.name} has outputs"
        )
        assert "preset" in "".join(tagged[0]["source"])


def test_cli_entry_point():
    from umarvel_lib.cli import build_parser

    p = build_parser()
    assert p.parse_args(["prepare", "--preset", "smoke"]).preset == "smoke"
    assert p.parse_args(["reproduce", "--tables", "1,5"]).tables == "1,5"


def test_checkpoint_digest_follows_the_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    from umarvel_lib.io import checkpoint_digest

    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"w": torch.zeros(3)}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    a = checkpoint_digest(d)
    (d / "config.json").write_text('{"x": 1}')
    assert checkpoint_digest(d) == a  # weights only
    save_file({"w": torch.ones(3)}, str(d / "model.safetensors"))
    assert checkpoint_digest(d) != a
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        checkpoint_digest(tmp_path / "empty")  # no weight files


def test_data_digest_names_the_synthetic_build(tmp_path):
    from umarvel_lib.data.synthetic import build_digest as data_digest

    assert data_digest(tmp_path) is None  # a real M-BEIR root: its path is hashed instead
    meta = tmp_path / "synthetic_meta"
    meta.mkdir()
    (meta / "recipe.json").write_text('{"hash": "abc"}')
    assert data_digest(tmp_path) == "abc"
    (meta / "recipe.json").write_text("{not json")
    with pytest.raises(ValueError, match="recipe.json"):
        data_digest(tmp_path)
    # generate() takes a broken marker for "no build" and writes a complete one
    from umarvel_lib.data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate

    generate(tmp_path, SyntheticConfig(**SYNTHETIC_PRESETS["smoke"]))
    assert len(data_digest(tmp_path)) == 16 and (tmp_path / "cand_pool" / "global").is_dir()


def test_committed_executed_notebooks_keep_their_outputs():
    """Executed copies under results/<preset>/notebooks/ keep their outputs (tables and figures), so a
    reviewer reads them on GitHub without running anything; only the sources in notebooks/ are stripped."""
    nbs = sorted((ROOT / "results").glob("*/notebooks/[0-9][0-9]_*.ipynb"))
    nbs = [nb for nb in nbs if ".FAILED." not in nb.name]
    if not nbs:
        pytest.skip("no committed executed notebooks")
    for nb in nbs:
        code = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        outs = [o for c in code for o in c.get("outputs", [])]
        assert outs, f"{nb} has no outputs"
        if nb.name[:2] in {"01", "02", "03", "04", "05", "06", "07"}:
            assert any("image/png" in o.get("data", {}) for o in outs), f"{nb} shows no figure"
            assert any("text/html" in o.get("data", {}) for o in outs), f"{nb} shows no table"
