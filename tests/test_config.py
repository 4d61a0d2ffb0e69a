"""Config system: presets, dotted overrides, ablation rows and their paper values."""

import pytest

from umarvel_lib.ablation import ablations_dir, load_ablation
from umarvel_lib.paper import FINDINGS, FINDINGS_BY_ID, paper_row, provenance
from umarvel_lib.presets import PRESETS, apply_overrides, make_run_config


def test_presets_scale_the_paper_recipe():
    cpu = make_run_config("cpu")
    s = cpu.scaled_stage("mbeir")
    assert s.batch_size == 3840 // 30 and s.lr == pytest.approx(4e-4 * cpu.scale.lr_multiplier)
    # every stage to its dev plateau, capped at 2400 steps; batches no finding varies at 16
    for name in ("nli", "cc3m", "mbeir", "hard_negatives", "distill"):
        st = cpu.scaled_stage(name)
        assert (st.budget, st.max_steps) == ("plateau", 2400), name
        assert st.min_steps == 100, name
        # an M-BEIR stage never stops before two epochs of its train queries, whatever its batch
        want = max(100, -(-9600 // st.batch_size)) if name == "mbeir" else 100
        assert st.plateau_min_steps() == want, name
    assert cpu.scaled_stage("mbeir").plateau_min_steps() == 100  # batch 128: 75 steps -> min_steps
    t1 = load_ablation("table1").run_config("4", "cpu", 0).scaled_stage("mbeir")
    assert (t1.batch_size, t1.plateau_min_steps()) == (16, 600)
    assert cpu.scaled_stage("nli").batch_size == cpu.scaled_stage("hard_negatives").batch_size == 16
    assert cpu.eval.eval_every == 100
    syn = cpu.synthetic()
    assert (syn.n_test, syn.n_train, syn.near_misses, syn.distractors) == (50, 300, 6, 90)
    paper = make_run_config("paper")
    p = paper.scaled_stage("mbeir")
    assert (p.batch_size, p.lr, p.lora_r, p.lora_alpha) == (3840, 4e-4, 128, 256)
    assert paper.scaled_stage("nli").lora_r == 64 and paper.scaled_stage("cc3m").symmetric
    assert set(PRESETS) == {"smoke", "cpu", "gpu", "paper"}


def test_overrides_are_checked():
    cfg = make_run_config(
        "smoke", {"embedder.attention": "causal", "stage.mbeir.lr": 1e-3, "stages": ["mbeir"]}
    )
    assert cfg.embedder.attention == "causal" and cfg.stage["mbeir"].lr == 1e-3
    with pytest.raises(KeyError, match="unknown config key"):
        make_run_config("smoke", {"embedder.atention": "causal"})
    with pytest.raises(ValueError):
        apply_overrides(cfg, {"embedder.pooling": "max"})
    with pytest.raises(ValueError, match="unknown stage"):
        make_run_config("smoke", {"stages": ["mbeir", "rlhf"]})


def test_stage_hash_prefix_sharing():
    a = make_run_config("smoke", {"stages": ["nli", "mbeir"]})
    b = make_run_config(
        "smoke",
        {
            "stages": ["nli", "mbeir", "hard_negatives"],
            "stage.hard_negatives.filter_max_score": 0.5,
        },
    )
    assert a.hash(upto_stage="mbeir") == b.hash(upto_stage="mbeir")
    c = make_run_config("smoke", {"stages": ["nli", "mbeir"], "embedder.attention": "causal"})
    assert a.hash(upto_stage="nli") != c.hash(upto_stage="nli")


@pytest.mark.parametrize("path", sorted(ablations_dir().glob("table*.yaml")), ids=lambda p: p.stem)
def test_every_ablation_row_builds_and_has_its_paper_value(path):
    ab = load_ablation(path)
    for row in ab.rows:
        cfg = ab.run_config(row, "smoke", 0)
        assert cfg.stages
        if row.explain:  # diagnostic rows carry no paper value
            with pytest.raises(KeyError):
                paper_row(ab.table, row.paper_key)
        elif ab.table <= 6:
            p = paper_row(ab.table, row.paper_key)
            assert p["local"] is not None or p["local_raw"] == "failed"
    for fid in ab.findings:
        f = FINDINGS_BY_ID[fid]
        ids = {r.id for r in ab.rows}
        assert f.better in ids and (f.worse in ids or f.kind == "worst")


def test_fifteen_findings_and_provisional_labels():
    assert len(FINDINGS) == 15
    assert sum(len(load_ablation(p).findings) for p in ablations_dir().glob("table*.yaml")) == 15
    assert "PROVISIONAL" in provenance(1) and "PROVISIONAL" not in provenance(7)
    assert paper_row(1, 4)["local"] == 57.2 and paper_row(5, 0)["local_raw"] == "failed"
    assert paper_row(6, "Distillation")["global"] == 60.7


def test_every_config_field_is_classified_identity_or_not():
    """Fail safe: a new config field must be declared result-changing (IDENTITY_FIELDS) or not (NOT_IDENTITY,
    with its reason); an unclassified one makes every hash raise."""
    import dataclasses

    from umarvel_lib.config import (
        EvalConfig,
        RerankerStageConfig,
        RunConfig,
        ScaleConfig,
        StageConfig,
    )
    from umarvel_lib.identity import IDENTITY_FIELDS, NOT_IDENTITY, UnclassifiedFieldError, identity
    from umarvel_lib.models.embedder import EmbedderConfig

    classes = (RunConfig, StageConfig, RerankerStageConfig, EvalConfig, ScaleConfig, EmbedderConfig)
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        keep, drop = set(IDENTITY_FIELDS[cls.__name__]), set(NOT_IDENTITY[cls.__name__])
        assert not keep & drop, (cls.__name__, keep & drop)
        assert names == keep | drop, (cls.__name__, names ^ (keep | drop))
        assert all(NOT_IDENTITY[cls.__name__][n] for n in drop)  # every exclusion says why
    Extra = dataclasses.make_dataclass("EvalConfig", [("new_knob", int, 1)], bases=(EvalConfig,))
    with pytest.raises(UnclassifiedFieldError, match="new_knob"):
        identity(Extra())


def test_identity_is_what_changes_results_and_nothing_else():
    ab = load_ablation("table1")
    base = ab.run_config("0", "cpu", 0)
    h, hs = base.hash(), base.hash(upto_stage="mbeir")
    # settings that do not change a result leave every hash alone
    for over in (
        {"threads": 7},
        {"cache_dir": "/elsewhere"},
        {"eval.batch_size": 3},
        {"scale.chunk_size": 4},
        {"data_root": None, "backbone": None},
    ):
        c = ab.run_config("0", "cpu", 0)
        apply_overrides(c, over)
        assert (c.hash(), c.hash(upto_stage="mbeir")) == (h, hs), over
    # settings that do change it
    for over in (
        {"scale.mixed_precision": "bf16"},
        {"seed": 1},
        {"stage.mbeir.lr": 1e-3},
        {"embedder.max_text_tokens": 64},
    ):
        c = ab.run_config("0", "cpu", 0)
        apply_overrides(c, over)
        assert c.hash() != h and c.hash(upto_stage="mbeir") != hs, over
    # the instruction seed: evaluation only (the run, not its checkpoints) under a fixed budget; under the
    # cpu preset's plateau budget it also decides where the dev curve stops the stage
    c = ab.run_config("0", "cpu", 0)
    apply_overrides(c, {"eval.instruction_seed": 3})
    assert c.hash() != h and c.hash(upto_stage="mbeir") != hs
    fixed = {"stage.mbeir.budget": "fixed"}
    c0, c = ab.run_config("0", "cpu", 0), ab.run_config("0", "cpu", 0)
    apply_overrides(c0, fixed)
    apply_overrides(c, {**fixed, "eval.instruction_seed": 3})
    assert c.hash() != c0.hash() and c.hash(upto_stage="mbeir") == c0.hash(upto_stage="mbeir")
    # the weights and the data bytes: another build is another run; the NLI stage reads only the NLI part
    for field, a_val, b_val in (
        ("backbone_digest", "0123456789abcdef", "fedcba9876543210"),
        (
            "data_digest",
            {"mbeir": "a", "nli": "n", "cc3m": "c"},
            {"mbeir": "b", "nli": "n", "cc3m": "c"},
        ),
    ):
        a, b = (make_run_config("cpu", {"stages": ["nli", "cc3m", "mbeir"]}) for _ in range(2))
        setattr(a, field, a_val)
        setattr(b, field, b_val)
        assert a.hash() != b.hash() and a.hash(upto_stage="mbeir") != b.hash(upto_stage="mbeir")
    assert a.hash(upto_stage="nli") == b.hash(
        upto_stage="nli"
    )  # M-BEIR bytes changed, NLI's did not


def test_reranker_settings_key_the_reranker_and_the_teacher():
    ab = load_ablation("table6")
    for rid in ("reranker", "distillation"):
        row = ab.row(rid)
        a, b = ab.run_config(row, "cpu", 0), ab.run_config(row, "cpu", 0)
        apply_overrides(b, {"reranker.lr": 1e-3})
        assert a.hash(upto_stage="hard_negatives", reranker=True) != b.hash(
            upto_stage="hard_negatives", reranker=True
        )
        assert a.hash(reranker=row.reranker) != b.hash(reranker=row.reranker)
        assert a.hash(upto_stage="hard_negatives") == b.hash(
            upto_stage="hard_negatives"
        )  # the embedder stage
    c, d = ab.run_config("distillation", "cpu", 0), ab.run_config("distillation", "cpu", 0)
    apply_overrides(d, {"reranker.lr": 1e-3})
    assert c.hash(upto_stage="distill") != d.hash(
        upto_stage="distill"
    )  # the teacher's scores come from it
    e, f = ab.run_config("baseline", "cpu", 0), ab.run_config("baseline", "cpu", 0)
    apply_overrides(f, {"reranker.lr": 1e-3})
    assert e.hash() == f.hash()  # a row that uses no reranker


def test_hashes_are_pinned():
    """Changing a hash orphans every finished run and cached stage: it must be deliberate (update the pin
    and say so in the commit). Pinned: table 1 row 0 at the cpu preset."""
    cfg = load_ablation("table1").run_config("0", "cpu", 0)
    assert cfg.hash() == "6acbc6983f3be516" and cfg.hash(upto_stage="mbeir") == "d9205e8d4f93fcaf"


def test_unknown_preset_is_refused_with_the_choices():
    from umarvel_lib.notebook import results_dir
    from umarvel_lib.presets import check_preset

    for fn in (check_preset, lambda p: make_run_config(p), lambda p: results_dir(p)):
        with pytest.raises(
            KeyError, match="unknown preset 'nonsense'; choose from cpu, gpu, paper, smoke"
        ):
            fn("nonsense")


# ---- a reader's own rows (notebook parameter extra_rows) ------------------------------------------
def test_extra_rows_are_validated_and_marked_as_the_readers():
    from umarvel_lib.ablation import load_ablation

    ab = load_ablation("table4").with_extra_rows(
        '{"my_tau": {"label": "tau 0.02", "overrides": {"embedder.temperature_init": 0.02, "stage.mbeir.lr": 2.0e-4}}}'
    )
    mine = ab.rows[-1]
    assert (mine.id, mine.label, mine.own, mine.paper_key) == ("my_tau", "tau 0.02", True, None)
    assert not any(r.own for r in ab.rows[:-1]) and ab.baseline.id == "0"
    cfg = ab.run_config(mine, "smoke", 1)
    assert (
        cfg.embedder.temperature_init == 0.02 and cfg.stage["mbeir"].lr == 2.0e-4 and cfg.seed == 1
    )
    assert cfg.stages == ["mbeir"]  # the table's base still applies
    # YAML works too, nested keys as well; empty text adds nothing
    ab2 = load_ablation("table2").with_extra_rows("mine: {overrides: {embedder: {pooling: last}}}")
    assert ab2.run_config("mine", "smoke", 0).embedder.pooling == "last"
    assert load_ablation("table2").with_extra_rows("  ").rows == load_ablation("table2").rows


@pytest.mark.parametrize(
    "text, needles",
    [
        (
            '{"x": {"overrides": {"stage.mbeir.temprature": 0.02}}}',
            ["'stage.mbeir.temprature'", "stage.mbeir.lr"],
        ),
        ('{"x": {"overrides": {"stage.mbier.lr": 0.02}}}', ["'stage.mbier'", "stage.mbeir"]),
        ('{"x": {"overrides": {"stage.mbeir.lr": "fast"}}}', ["'stage.mbeir.lr'", "float"]),
        (
            '{"x": {"overrides": {"stage.mbeir.batch_size": 1.5}}}',
            ["'stage.mbeir.batch_size'", "int"],
        ),
        ('{"x": {"overrides": {"embedder.pooling": "max"}}}', ["'embedder.pooling'", "mean"]),
        ('{"x": {"overrides": {"stages": ["mbeir", "nope"]}}}', ["'stages'", "hard_negatives"]),
        ('{"x": {"lable": "typo"}}', ["'lable'", "label, overrides"]),
        ('{"0": {"label": "clash"}}', ["row '0'", "already has"]),
        ("[1, 2]", ["extra_rows must map"]),
        ('{"x": {', ["not YAML/JSON"]),
    ],
)
def test_bad_extra_rows_name_the_key(text, needles):
    from umarvel_lib.ablation import load_ablation

    with pytest.raises(ValueError) as e:
        load_ablation("table4").with_extra_rows(text)
    assert str(e.value).startswith("extra_rows")
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_stage_plan_follows_the_scaled_recipe():
    from umarvel_lib.ablation import load_ablation
    from umarvel_lib.presets import stage_plan

    cfg = load_ablation("table6").run_config("distillation", "cpu", 0)
    plan = stage_plan(cfg, {"mbeir": 4})
    assert [p["stage"] for p in plan] == ["nli", "cc3m", "mbeir", "hard_negatives", "distill"]
    mb = plan[2]
    assert (mb["steps"], mb["global_batch"], mb["tau"]) == (
        4,
        cfg.scaled_stage("mbeir").batch_size,
        "learnable",
    )
    assert mb["lr"] == pytest.approx(4e-4 * 10) and plan[0]["tau"].startswith("fixed")
    assert plan[3]["loss"] == "InfoNCE, in_batch+hard" and plan[4]["loss"] == "distill: kl"
