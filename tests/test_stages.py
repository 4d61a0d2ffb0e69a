"""Progressive stages: chained from merged checkpoints, cached by prefix hash, deterministic."""

import json

import numpy as np
import pytest

from umarvel_lib.data.items import Item
from umarvel_lib.models.embedder import Embedder
from umarvel_lib.presets import make_run_config
from umarvel_lib.train.stages import run_stages

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def setup(smoke_data, backbones):
    return smoke_data, backbones["qwen2_vl"]


def _cfg(data, tmp, **over):
    return make_run_config(
        "smoke", {"data_root": str(data), "cache_dir": str(tmp), "scale.max_steps": 2, **over}
    )


def _emb(path, cfg):
    e = Embedder.from_pretrained(path, cfg.embedder)
    return e.encode(
        [Item(txt="a red circle in the center"), Item(txt="two objects")], progress=False
    )


def test_chain_starts_each_stage_from_the_previous_one(setup, tmp_path):
    data, base = setup
    cfg = _cfg(data, tmp_path, stages=["nli", "mbeir"])
    final = run_stages(cfg, base, tmp_path / "stages")
    nli = json.loads(
        (tmp_path / "stages" / f"nli-{cfg.hash(upto_stage='nli')}" / "stage.json").read_text()
    )
    mb = json.loads((final.parent / "stage.json").read_text())
    assert nli["init"] == str(base)
    assert mb["init"] == str(tmp_path / "stages" / f"nli-{cfg.hash(upto_stage='nli')}" / "model")
    # a row sharing the prefix reuses the NLI checkpoint (nothing retrained)
    mtime = (
        (tmp_path / "stages" / f"nli-{cfg.hash(upto_stage='nli')}" / "model" / "embedder.json")
        .stat()
        .st_mtime_ns
    )
    cfg2 = _cfg(data, tmp_path, stages=["nli", "mbeir"], **{"stage.mbeir.lr": 1e-3})
    run_stages(cfg2, base, tmp_path / "stages")
    assert (
        tmp_path / "stages" / f"nli-{cfg.hash(upto_stage='nli')}" / "model" / "embedder.json"
    ).stat().st_mtime_ns == mtime
    assert cfg2.hash(upto_stage="mbeir") != cfg.hash(upto_stage="mbeir")


def test_same_seed_same_weights_different_seed_different(setup, tmp_path):
    data, base = setup
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = _cfg(data, tmp_path / name, stages=["mbeir"], seed=seed)
        outs.append(_emb(run_stages(cfg, base, tmp_path / name / "stages"), cfg))
    assert np.array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2])


def test_hard_negative_variants_mine_with_one_encoding(setup, tmp_path):
    """Table 5's variants share the stage-3 model: its mining embeddings are encoded once and cached
    beside it; the variants differ only in the filters, and so in the mined lists."""
    data, base = setup
    stages = tmp_path / "stages"
    lists = []
    for over in (
        {"stage.hard_negatives.filter_max_score": None},
        {
            "stage.hard_negatives.filter_max_score": None,
            "stage.hard_negatives.filter_relative_margin": 0.0,
        },
    ):
        cfg = _cfg(data, tmp_path, stages=["mbeir", "hard_negatives"], **over)
        final = run_stages(cfg, base, stages)
        lists.append((final.parent / "hard_negatives.jsonl").read_text())
    mbeir_dir = stages / f"mbeir-{cfg.hash(upto_stage='mbeir')}"
    cached = list(mbeir_dir.glob("mining-*.npz"))
    assert len(cached) == 1
    z = np.load(cached[0])
    assert z["queries"].shape[1] == z["pool"].shape[1] and len(z["pool"]) > 0
    assert len({p.parent for p in stages.glob("hard_negatives-*/hard_negatives.jsonl")}) == 2


def test_progress_false_reaches_the_training_bars(setup, tmp_path, monkeypatch, capsys):
    """``run_stages(progress=False)`` (what run_row passes for notebooks) reaches the trainer: no bar
    is printed; with ``progress=True`` the stage's bar appears. (transformers' own "Loading weights" bar
    is not the kit's and is not checked.)"""
    from umarvel_lib.train import stages as stages_mod

    data, base = setup
    seen = []
    real = stages_mod.Trainer

    class Spy(real):
        def __init__(self, model, step, examples, cfg, *a, **k):
            seen.append(cfg.progress)
            super().__init__(model, step, examples, cfg, *a, **k)

    monkeypatch.setattr(stages_mod, "Trainer", Spy)
    for progress in (False, True):
        cfg = _cfg(data, tmp_path / str(progress), stages=["nli"], **{"scale.max_steps": 1})
        run_stages(cfg, base, tmp_path / str(progress) / "stages", progress=progress)
        err = capsys.readouterr().err
        assert ("train: " in err) is progress, err[
            -500:
        ]  # the trainer's bar is named after its run dir
    assert seen == [False, True]
