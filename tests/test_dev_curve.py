"""Dev curves, stage plans and the plateau budget, on the smoke preset with the test-size backbone."""

import json

import pytest

from umarvel_lib import report
from umarvel_lib.ablation import Ablation, AblationRow
from umarvel_lib.presets import make_run_config
from umarvel_lib.train.stages import run_stages

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_run_writes_dev_curve_and_stage_plan(smoke_data, backbones, tmp_path):
    from umarvel_lib.experiment import run_row

    ab = Ablation(
        "t",
        99,
        "dev curve",
        {
            "stages": ["mbeir"],
            "scale.max_steps": 4,
            "eval.eval_every": 2,
            "cache_dir": str(tmp_path / "cache"),
        },
        [AblationRow("0", "row", {})],
        [],
        pools=("local",),
    )
    side = run_row(
        ab,
        "0",
        preset="smoke",
        seed=0,
        results=tmp_path / "res",
        backbone=str(backbones["qwen2_vl"]),
        data_root=str(smoke_data),
        progress=False,
    )
    rdir = tmp_path / "res" / "runs" / "table99" / "0" / "seed0"
    plan = report.stage_plan(rdir)
    assert list(plan["stage"]) == ["mbeir"] and side["stage_plan"][0]["steps"] == 4
    p = plan.iloc[0]
    assert p.steps == 4 and p.max_steps == 4 and p.budget == "fixed" and not p.stopped_early
    assert (
        p.examples_seen == 4 * p.batch
        and p.examples == 16 * 24
        and p.lr > 0
        and p.tau_start == pytest.approx(0.05)
    )
    curve = report.dev_curve(rdir)
    assert list(curve["step"]) == [0, 2, 4] and (curve["stage"] == "mbeir").all()
    assert list(curve["examples_seen"]) == [0, 2 * p.batch, 4 * p.batch]
    assert (
        (curve["dev_ci_lo"] <= curve["dev_avg"]) & (curve["dev_avg"] <= curve["dev_ci_hi"])
    ).all()
    assert (
        curve["dev_queries"] == 16 * 4
    ).all()  # the smoke dev split: 4 queries per row, never the test split
    assert p.dev_avg_end == curve["dev_avg"].iloc[-1]
    checks = report.plateau_checks(rdir, min_steps=100)
    assert (
        list(checks["stage"]) == ["mbeir"]
        and not checks["ok"].iloc[0]
        and "minimum 100" in checks["reason"].iloc[0]
    )


def _flat_dev(model, step):
    return {"dev_avg": 50.0, "dev_ci_lo": 45.0, "dev_ci_hi": 55.0}


def test_plateau_budget_stops_at_the_rule_and_is_part_of_the_stage_identity(
    smoke_data, backbones, tmp_path
):
    base = {
        "data_root": str(smoke_data),
        "cache_dir": str(tmp_path),
        "stages": ["mbeir"],
        "scale.max_steps": 12,
        "eval.eval_every": 2,
    }
    plateau = make_run_config(
        "smoke", {**base, "stage.mbeir.budget": "plateau", "stage.mbeir.min_steps": 4}
    )
    fixed = make_run_config("smoke", base)
    ckpt = run_stages(plateau, backbones["qwen2_vl"], tmp_path / "stages", eval_fn=_flat_dev)
    rec = json.loads((ckpt.parent / "stage.json").read_text())
    # a flat curve: at step 4 (>= min_steps) the window has only 3 of its 4 evaluations; at step 6 the
    # last quarter widened to 4 evaluations (steps 0-6) moved 0 < half-width 5
    assert (
        rec["plan"]["steps"] == 6
        and rec["plan"]["stopped_early"]
        and rec["plan"]["max_steps"] == 12
        and rec["plan"]["min_evals"] == 4
    )
    assert [c["step"] for c in rec["dev_curve"]] == [0, 2, 4, 6]
    ckpt = run_stages(fixed, backbones["qwen2_vl"], tmp_path / "stages", eval_fn=_flat_dev)
    rec = json.loads((ckpt.parent / "stage.json").read_text())
    assert rec["plan"]["steps"] == 12 and not rec["plan"]["stopped_early"]
    # the dev settings decide the weights only under the plateau budget
    h = lambda cfg, **o: make_run_config("smoke", {**base, **cfg, **o}).hash(upto_stage="mbeir")  # noqa: E731
    pl = {"stage.mbeir.budget": "plateau"}
    assert (
        h(pl) != h({})
        and h(pl, **{"eval.eval_every": 4}) != h(pl)
        and h(pl, **{"eval.dev_queries": 2}) != h(pl)
        and h(pl, **{"stage.mbeir.plateau_min_evals": 2}) != h(pl)
    )
    assert h({}, **{"eval.eval_every": 4}) == h({}) and h({}, **{"eval.dev_queries": 2}) == h({})
    assert h({}, **{"stage.mbeir.plateau_min_evals": 2}) == h({})
    with pytest.raises(ValueError, match="needs a dev curve"):
        run_stages(
            make_run_config(
                "smoke",
                {
                    **base,
                    "eval.eval_every": None,
                    "stage.mbeir.budget": "plateau",
                    "cache_dir": str(tmp_path / "x"),
                },
            ),
            backbones["qwen2_vl"],
            tmp_path / "x",
            eval_fn=None,
        )
    assert not (tmp_path / "x").exists() or not any(
        (tmp_path / "x").iterdir()
    )  # refused before anything is written


def test_dev_subset_is_the_first_queries_of_each_row(smoke_data):
    from umarvel_lib.data.mbeir import MBEIR

    full, sub = MBEIR(smoke_data, split="val"), MBEIR(smoke_data, split="val", max_queries=2)
    for r in full.rows():
        assert sub.queries(r) == full.queries(r)[:2]
        assert set(sub.qrels(r)) == {q.qid for q in full.queries(r)[:2]}
