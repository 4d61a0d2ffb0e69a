"""The cost of a reproduction on this device, printed before it starts (umarvel_lib.cost.estimate_reproduction)."""

import pytest

from umarvel_lib.ablation import load_ablation
from umarvel_lib.cost import estimate_reproduction, measure_speed
from umarvel_lib.presets import apply_overrides


def _runs(smoke_data, backbones, overrides=None, rows=(("table1", "4"), ("table2", "1"))):
    out = []
    for table, rid in rows:
        ab = load_ablation(table)
        cfg = ab.run_config(
            rid, "smoke", 0, backbone=str(backbones["qwen2_vl"]), data_root=str(smoke_data)
        )
        apply_overrides(cfg, overrides or {})
        out.append((cfg, ab.row(rid).reranker))
    return out


def test_a_stage_two_rows_share_is_counted_once(smoke_data, backbones):
    runs = _runs(smoke_data, backbones)
    assert runs[0][0].hash(upto_stage="mbeir") == runs[1][0].hash(upto_stage="mbeir")
    speed = {"train": 1.0, "encode": 0.0}  # seconds per training item only: exact arithmetic
    est = estimate_reproduction(runs, speed=speed).set_index("what")
    assert est.loc["stage mbeir", "count"] == 1 and est.loc["final evaluation", "count"] == 2
    st = runs[0][0].scaled_stage("mbeir")
    gc = 4 / 3 if st.batch_size > st.chunk_size else 1.0
    want = st.max_steps * st.batch_size * 2 * gc / 3600
    assert est.loc["stage mbeir", "low_h"] == est.loc["stage mbeir", "high_h"]
    assert est.loc["stage mbeir", "high_h"] == pytest.approx(want)
    two = estimate_reproduction(runs, speed=speed, workers=2).set_index("what")
    assert two.loc["stage mbeir", "high_h"] == pytest.approx(want / 2)


def test_a_plateau_stage_lies_between_its_minimum_and_its_cap(smoke_data, backbones):
    over = {
        "stage.mbeir.budget": "plateau",
        "stage.mbeir.min_steps": 20,
        "scale.max_steps": 200,
        "eval.eval_every": 10,
    }
    runs = _runs(smoke_data, backbones, over, rows=(("table1", "4"),))
    train_only = estimate_reproduction(runs, speed={"train": 1.0, "encode": 0.0})
    row = train_only.set_index("what").loc["stage mbeir"]
    assert row.high_h == pytest.approx(row.low_h * 10)  # 200 / 20 steps
    # the dev curve's evaluations: (steps / eval_every + 1) x the dev items, nothing else
    evals = estimate_reproduction(runs, speed={"train": 0.0, "encode": 1.0}).set_index("what")
    lo, hi = evals.loc["stage mbeir", ["low_h", "high_h"]]
    assert hi / lo == pytest.approx((200 // 10 + 1) / (20 // 10 + 1))


def test_speeds_are_measured_on_this_device(smoke_data, backbones):
    cfg, _ = _runs(smoke_data, backbones, rows=(("table1", "4"),))[0]
    speed = measure_speed(cfg, steps=1, encode_items=8)
    assert speed["train"] > 0 and speed["encode"] > 0


def test_reproduce_estimate_prints_and_trains_nothing(smoke_data, backbones, tmp_path, capsys):
    from umarvel_lib.cli import main

    rc = main(
        [
            "reproduce",
            "--preset",
            "smoke",
            "--tables",
            "1",
            "--estimate",
            "--results",
            str(tmp_path / "res"),
            "--backbone",
            str(backbones["qwen2_vl"]),
            "--data-root",
            str(smoke_data),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "estimate (smoke, 1 worker(s)):" in out and "stage mbeir" in out
    assert not (tmp_path / "res" / "runs").exists()
