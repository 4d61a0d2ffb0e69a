"""The wrong-modality diagnostic of the global top-k (notebook 02)."""

import json

import pytest

from umarvel_lib.eval.runs import wrong_modality_rate


def _run_dir(tmp_path, lines, queries):
    d = tmp_path / "global"
    d.mkdir()
    (d / "run.trec").write_text(
        "".join(
            f"{q} Q0 {did} {r} {1 - r / 10} t\n"
            for q, dids in lines.items()
            for r, did in enumerate(dids, 1)
        )
    )
    (d / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    return d


def test_counts_top_k_candidates_of_the_wrong_modality(tmp_path):
    mod = {
        "9:1": "image",
        "9:2": "text",
        "9:3": "image",
        "9:4": "text",
        "9:5": "image",
        "9:6": "text",
    }
    d = _run_dir(
        tmp_path,
        {
            "9:10": ["9:2", "9:1", "9:4", "9:3", "9:6", "9:5"],  # task 0 wants images: 3 of 5 wrong
            "9:11": ["9:2", "9:4", "9:6", "9:1", "9:3"],
        },  # task 3 wants text: 2 of 5 wrong
        [
            {"qid": "9:10", "row": "mscoco_task0", "task_id": 0, "scored": True},
            {"qid": "9:11", "row": "mscoco_task3", "task_id": 3, "scored": True},
            {"qid": "9:12", "row": "mscoco_task3", "task_id": 3, "scored": False},
        ],
    )
    w = wrong_modality_rate(d, mod, k=5)
    assert w["rows"] == {"mscoco_task0": 60.0, "mscoco_task3": 40.0}
    assert w["rate"] == 50.0 and w["n_queries"] == 2
    assert wrong_modality_rate(d, mod, k=1)["rows"] == {"mscoco_task0": 100.0, "mscoco_task3": 0.0}
    with pytest.raises(KeyError, match="no known modality"):
        wrong_modality_rate(d, {k: v for k, v in mod.items() if k != "9:6"}, k=5)
