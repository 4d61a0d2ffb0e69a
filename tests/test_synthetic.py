"""The synthetic mini-M-BEIR: real layout, 16 rows, deterministic, idempotent, atomic."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umarvel_lib.data import synthetic
from umarvel_lib.data.mbeir import DATASET_IDS, MBEIR, ROW_NAMES, TASKS
from umarvel_lib.data.corpora import read_cc3m, read_nli
from umarvel_lib.data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, generate

SMOKE = SyntheticConfig(**SYNTHETIC_PRESETS["smoke"])


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_sixteen_rows_through_the_real_reader(smoke_data):
    data = MBEIR(smoke_data)
    rows = data.rows()
    assert [r.name for r in rows] == list(ROW_NAMES)
    for r in rows:
        qs, pool, qrels = data.queries(r), data.local_pool(r), data.qrels(r)
        assert len(qs) == SMOKE.n_test and len(qrels) == len(qs)
        qmod, cmod = TASKS[r.task_id]
        assert {q.modality for q in qs} == {qmod}
        assert {c.modality for c in pool} == {cmod}
        assert all(q.qid.startswith(f"{DATASET_IDS[r.dataset]}:") for q in qs)
        assert all(c.did.startswith(f"{DATASET_IDS[r.dataset]}:") for c in pool)
        assert len(pool) > len(qs)  # near misses and distractors
    assert len(data.global_pool()) == sum(len(data.local_pool(r)) for r in rows)
    assert len(data.union_train()) == 16 * SMOKE.n_train
    train = MBEIR(smoke_data, split="train")
    assert all(len(train.qrels(r)) == SMOKE.n_train for r in train.rows())


def test_instructions_name_the_target_modality(smoke_data):
    data = MBEIR(smoke_data)
    assert len(data.instructions) == 16
    words = {"image": ("image", "photo", "picture"), "text": ("caption", "text", "passage", "description", "sentence"),
             "image,text": ("image",)}
    for (did, qm, cm), prompts in data.instructions.items():
        assert len(prompts) == 4
        assert all(any(w in p.lower() for w in words[cm]) for p in prompts), (did, cm, prompts)


def test_near_misses_in_both_directions(smoke_data):
    data = MBEIR(smoke_data)
    for name in ("visualnews_task0", "visualnews_task3"):
        (row,) = data.rows([name])
        pool = data.local_pool(row)
        # every query has at least `near_misses` unlabelled candidates of its own kind beyond the positive
        assert len(pool) >= len(data.queries(row)) * (1 + SMOKE.near_misses)


def test_planted_false_negatives_are_documented_and_unlabelled(smoke_data):
    log = [json.loads(x) for x in (smoke_data / "synthetic_meta/planted_false_negatives.jsonl").read_text().splitlines()]
    assert log, "no planted false negatives at the smoke preset"
    data = MBEIR(smoke_data)
    for rec in log:
        if rec["split"] != "test":
            continue
        (row,) = data.rows([rec["row"]])
        assert rec["false_negative"] not in data.qrels(row)[rec["qid"]]
        assert rec["false_negative"] in {c.did for c in data.local_pool(row)}


def test_stage_corpora(smoke_data):
    nli = read_nli(smoke_data / "nli" / "nli_for_simcse.csv")
    assert len(nli) == SMOKE.n_nli and all(len(t) == 3 and t[0] != t[2] for t in nli)
    cc = read_cc3m(smoke_data / "cc3m")
    assert len(cc) == SMOKE.n_cc3m and all(Path(p).is_file() for _, p in cc[:5])


def test_same_seed_same_bytes_across_processes(tmp_path):
    """Two processes with different hash seeds write byte-identical datasets; a second call is a no-op."""
    code = ("import sys; from umarvel_lib.data.synthetic import *; "
            "generate(sys.argv[1], SyntheticConfig(**SYNTHETIC_PRESETS['smoke']))")
    for i, hs in enumerate(("1", "2")):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"d{i}")], check=True,
                       env={**os.environ, "PYTHONHASHSEED": hs})
    assert _tree_digest(tmp_path / "d0") == _tree_digest(tmp_path / "d1")
    marker = tmp_path / "d0/synthetic_meta/recipe.json"
    mtime = marker.stat().st_mtime_ns
    generate(tmp_path / "d0", SMOKE)  # idempotent: nothing rewritten
    assert marker.stat().st_mtime_ns == mtime
    other = tmp_path / "d2"
    generate(other, SyntheticConfig(**{**SYNTHETIC_PRESETS["smoke"], "seed": 1}))
    assert _tree_digest(other) != _tree_digest(tmp_path / "d0")


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_cc3m", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", SMOKE)
    assert not (tmp_path / "data").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".data.lock"]  # only the (empty) generation lock
