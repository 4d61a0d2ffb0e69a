"""The synthetic mini-M-BEIR: real layout, 16 rows, deterministic, idempotent, atomic."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umarvel_lib.data import synthetic
from umarvel_lib.data.corpora import read_cc3m, read_nli
from umarvel_lib.data.mbeir import MBEIR
from umarvel_lib.data.mbeir_rows import DATASET_IDS, ROW_NAMES, TASKS
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
    words = {
        "image": ("image", "photo", "picture"),
        "text": ("caption", "text", "passage", "description", "sentence"),
        "image,text": ("image",),
    }
    for (did, _qm, cm), prompts in data.instructions.items():
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
    log = [
        json.loads(x)
        for x in (smoke_data / "synthetic_meta/planted_false_negatives.jsonl")
        .read_text()
        .splitlines()
    ]
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
    code = (
        "import sys; from umarvel_lib.data.synthetic import *; "
        "generate(sys.argv[1], SyntheticConfig(**SYNTHETIC_PRESETS['smoke']))"
    )
    for i, hs in enumerate(("1", "2")):
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"d{i}")],
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hs},
        )
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

    monkeypatch.setattr(synthetic, "write_cc3m", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", SMOKE)
    assert not (tmp_path / "data").exists()
    assert [p.name for p in tmp_path.iterdir()] == [
        ".data.lock"
    ]  # only the (empty) generation lock


def test_rows_of_a_dataset_share_one_item_set(smoke_data):
    """M-BEIR's construction: the task-3 queries are the task-0 pool's photos and the task-0 queries are
    the task-3 pool's captions (VisualNews, MSCOCO, Fashion200K); OVEN/INFOSEEK 6 and 8 ask about the same
    query photos and hold the same entities as text and as image + text. So the global pool has twins."""
    data = MBEIR(smoke_data)
    fn: dict[str, set[str]] = {name: set() for name in ROW_NAMES}
    for x in (smoke_data / "synthetic_meta/planted_false_negatives.jsonl").read_text().splitlines():
        f = json.loads(x)
        if f["split"] == "test":
            fn[f["row"]].add(f["false_negative"])

    def row(name):
        (r,) = data.rows([name])
        return data.queries(r), data.local_pool(r), data.qrels(r)

    for ds in ("visualnews", "mscoco", "fashion200k"):
        q0, p0, r0 = row(f"{ds}_task0")
        q3, p3, r3 = row(f"{ds}_task3")
        img0 = {c.did: c.img_path for c in p0}
        txt3 = {c.did: c.txt for c in p3}
        # query i of each row is item i: its caption -> its photo, and its photo -> its caption
        for a, b in zip(q0, q3):
            (pos0,), (pos3,) = r0[a.qid], r3[b.qid]
            assert b.img_path == img0[pos0] and a.txt == txt3[pos3]
        # the pools are the same items (positives, near misses, distractors) in two modalities; only the
        # planted false negatives (another photo / a paraphrase) are the row's own
        assert len(p0) - len(fn[f"{ds}_task0"]) == len(p3) - len(fn[f"{ds}_task3"])
    for ds in ("oven", "infoseek"):
        q6, p6, _ = row(f"{ds}_task6")
        q8, p8, _ = row(f"{ds}_task8")
        assert [q.img_path for q in q6] == [q.img_path for q in q8]
        assert {c.txt for c in p6 if c.did not in fn[f"{ds}_task6"]} == {
            c.txt for c in p8 if c.did not in fn[f"{ds}_task8"]
        }
        assert {c.modality for c in p8} == {"image,text"}
    # the other rows are drawn on their own: no query photo of WebQA-2 is an EDIS candidate, etc.
    meta = [
        json.loads(x) for x in (smoke_data / "synthetic_meta/rows.jsonl").read_text().splitlines()
    ]
    assert {m["row"] for m in meta if m["twin_group"]} == {
        f"{d}_task{t}" for d in ("visualnews", "mscoco", "fashion200k") for t in (0, 3)
    } | {f"{d}_task{t}" for d in ("oven", "infoseek") for t in (6, 8)}


def test_test_dev_and_train_items_are_disjoint(smoke_data):
    """No photo or caption of a test or dev item of a twin group appears in training, in any of its rows."""
    splits = {s: MBEIR(smoke_data, split=s) for s in ("test", "val", "train")}
    for ds in ("visualnews", "mscoco", "fashion200k", "oven", "infoseek"):
        seen = {}
        for split, data in splits.items():
            imgs, txts = set(), set()
            for r in data.rows():
                if not r.name.startswith(ds + "_"):
                    continue
                for q in data.queries(r):
                    imgs.add(q.img_path)
                    txts.add(q.txt)
            seen[split] = (imgs - {None}, txts - {None})
        assert len(seen["val"][0] | seen["val"][1]) > 0, ds
        for held in ("test", "val"):
            assert not seen[held][0] & seen["train"][0], (ds, held)
            if ds not in ("oven", "infoseek"):  # their questions are templates; the photos decide
                assert not seen[held][1] & seen["train"][1], (ds, held)
    assert len(splits["val"].queries(splits["val"].rows()[0])) == SMOKE.n_dev
