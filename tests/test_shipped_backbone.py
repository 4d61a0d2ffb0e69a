"""The micro backbone shipped in the repository: default loading, digest check, `umarvel backbone --rebuild`.

The mechanism is tested with test-size builds in a temporary ``backbones/``; the real shipped micro
backbone (if present in this checkout) is checked against its recorded digest.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from umarvel_lib.cli import main as cli_main  # noqa: E402
from umarvel_lib.io import checkpoint_digest  # noqa: E402
from umarvel_lib.micro import shipped  # noqa: E402
from umarvel_lib.micro.build import build_backbone, read_recipe  # noqa: E402
from umarvel_lib.micro.recipe import KINDS, BackboneConfig  # noqa: E402
from umarvel_lib.models.loading import load_backbone  # noqa: E402

TEST_CFG = BackboneConfig(kind="qwen2_vl", size="test")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_backbone(TEST_CFG, tmp_path_factory.mktemp("cache") / "backbones", progress=False)


@pytest.fixture()
def root(tmp_path, monkeypatch):
    r = tmp_path / "backbones"
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", r)
    return r


def _perturb(path):
    from safetensors.torch import load_file, save_file

    w = load_file(path / "model.safetensors")
    k = sorted(w)[0]
    w[k] = w[k] + 1e-3
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})


def test_ship_then_runs_load_the_shipped_build(build, root, tmp_path, monkeypatch):
    from umarvel_lib.presets import make_run_config
    from umarvel_lib.run_inputs import backbone_path

    assert shipped.shipped_backbone(TEST_CFG) is None  # nothing shipped yet
    out = shipped.ship(build)
    assert out == root / "qwen2_vl-test"
    meta = json.loads((out / shipped.SHIPPED_FILE).read_text())
    assert (
        meta["digest"] == checkpoint_digest(build) == checkpoint_digest(out)
        and meta["name"] == build.name
    )
    assert (out / "tokenizer.json").read_bytes() == (build / "tokenizer.json").read_bytes()
    assert shipped.shipped_backbone(TEST_CFG) == out
    model, proc = load_backbone(out)
    assert model.config.emb_token_id == proc.tokenizer.convert_tokens_to_ids("<emb>")
    # a run without --backbone uses the shipped build, not a cache build
    cfg = make_run_config("smoke", {"cache_dir": str(tmp_path / "elsewhere")})
    assert backbone_path(cfg) == out and not (tmp_path / "elsewhere").exists()
    # another recipe (seed 1) is not the shipped one
    assert shipped.shipped_backbone(BackboneConfig(kind="qwen2_vl", size="test", seed=1)) is None


def test_shipped_weights_must_match_their_digest(build, root):
    out = shipped.ship(build)
    _perturb(out)
    with pytest.raises(shipped.ShippedBackboneError, match="model.safetensors"):
        shipped.shipped_backbone(TEST_CFG)


def test_ship_refuses_an_incomplete_build(tmp_path, root):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="half"):
        shipped.ship(tmp_path / "half")
    assert not root.exists()


def test_cli_rebuild_says_whether_bitwise_identical(build, root, tmp_path, capsys):
    shipped.ship(build)
    argv = [
        "backbone",
        "--size",
        "test",
        "--cache-dir",
        str(tmp_path / "c"),
        "--shipped-root",
        str(root),
    ]
    assert cli_main(argv + ["--rebuild"]) == 0
    out = capsys.readouterr().out
    assert "bitwise identical to the shipped backbone" in out and checkpoint_digest(build) in out
    _perturb(root / "qwen2_vl-test")
    assert cli_main(argv + ["--rebuild"]) == 1
    assert "DIFFERENT from the shipped backbone" in capsys.readouterr().out
    # --ship copies the (rebuilt) cached build back; plain `backbone` then reports the shipped one
    assert cli_main(argv + ["--ship"]) == 0
    assert shipped.shipped_backbone(TEST_CFG) == root / "qwen2_vl-test"
    assert cli_main(argv) == 0
    assert "(shipped)" in capsys.readouterr().out


@pytest.mark.parametrize("kind", KINDS)
def test_repository_backbone_loads_and_matches_its_digest(kind):
    """The micro backbone(s) shipped in this checkout, if any: the recorded digest is the weights'."""
    d = shipped.shipped_dir(kind, "micro")
    if not (d / shipped.SHIPPED_FILE).is_file():
        pytest.skip(f"no shipped {kind} micro backbone in this checkout")
    assert json.loads((d / shipped.SHIPPED_FILE).read_text())["digest"] == checkpoint_digest(d)
    assert shipped.shipped_backbone(BackboneConfig(kind=kind, size="micro")) == d
    model, proc = load_backbone(d)
    assert sum(p.numel() for p in model.parameters()) == read_recipe(d)["params"]
