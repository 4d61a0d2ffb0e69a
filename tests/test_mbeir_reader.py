"""The M-BEIR reader on the literal record shapes of the real benchmark, and every bad-input case."""

import json
import random

import pytest
from PIL import Image

from umarvel_lib.data.mbeir import MBEIR
from umarvel_lib.data.mbeir_records import (
    MBEIRFormatError,
    format_string,
    read_instructions,
    read_pool,
    read_qrels,
    read_queries,
)
from umarvel_lib.data.mbeir_rows import EVAL_ROWS, ROW_NAMES, headline_k

# Literal records from the real M-BEIR (docs/mbeir.md, copied in castorini/UniRAG:README.md)
REAL_QUERY = {
    "qid": "9:6",
    "query_txt": None,
    "query_img_path": "mbeir_images/mscoco_images/val2014/COCO_val2014_000000391895.jpg",
    "query_modality": "image",
    "query_src_content": None,
    "pos_cand_list": ["9:2", "9:3", "9:4", "9:5", "9:6"],
    "neg_cand_list": [],
    "task_id": 3,
}
REAL_CANDS = [
    {
        "txt": None,
        "img_path": "mbeir_images/mscoco_images/val2014/COCO_val2014_000000391895.jpg",
        "modality": "image",
        "did": "9:1",
        "src_content": None,
    },
    {
        "txt": "A man riding on the back of a motorcycle down a road.",
        "img_path": None,
        "modality": "text",
        "did": "9:14174",
        "src_content": None,
    },
] + [
    {
        "txt": f"caption {i}",
        "img_path": None,
        "modality": "text",
        "did": f"9:{i}",
        "src_content": None,
    }
    for i in range(2, 7)
]
REAL_INSTR = (
    "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"
    "image\ttext\tMSCOCO\t9\tFind a caption for the image.\tDescribe this picture.\t"
    "Retrieve the sentence.\tWhich caption fits?\n"
)


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def real_slice(tmp_path):
    """A hand-written slice in the real M-BEIR layout (MSCOCO task 3)."""
    img = tmp_path / REAL_QUERY["query_img_path"]
    img.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(img, format="JPEG")
    _jsonl(tmp_path / "query/test/mbeir_mscoco_task3_test.jsonl", [REAL_QUERY])
    _jsonl(tmp_path / "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl", REAL_CANDS)
    q = tmp_path / "qrels/test/mbeir_mscoco_task3_test_qrels.txt"
    q.parent.mkdir(parents=True)
    q.write_text(
        "".join(f"9:6 0 {d} 1 3\n" for d in REAL_QUERY["pos_cand_list"]) + "9:6 0 9:1 0 3\n"
    )
    (tmp_path / "instructions").mkdir()
    (tmp_path / "instructions/query_instructions.tsv").write_text(REAL_INSTR)
    return tmp_path


def test_reads_real_layout(real_slice):
    data = MBEIR(real_slice)
    rows = data.rows()
    assert [r.name for r in rows] == ["mscoco_task3"]
    row = rows[0]
    assert (
        row.pool_file.name == "mbeir_mscoco_task3_test_cand_pool.jsonl"
    )  # MSCOCO's test-specific pool
    (q,) = data.queries(row)
    assert q.qid == "9:6" and q.modality == "image" and q.task_id == 3 and q.pos[0] == "9:2"
    assert len(data.local_pool(row)) == len(REAL_CANDS)
    assert data.qrels(row) == {
        "9:6": {"9:2", "9:3", "9:4", "9:5", "9:6"}
    }  # relevance 0 line dropped
    assert data.sample_instruction(q, "text", random.Random(0)) in {
        format_string(p) for p in data.instruction_options(q, "text")
    }
    assert row.headline_k == 5


def test_constants_follow_uniir():
    assert len(EVAL_ROWS) == 16 and len(set(ROW_NAMES)) == 16
    assert [headline_k(r) for r in ROW_NAMES].count(10) == 3
    assert headline_k("fashion200k_task0") == headline_k("syn_fashioniq_task7") == 10
    assert format_string("  find it") == "Find it." and format_string("Why?") == "Why?"


def _expect(match, fn, *a, **kw):
    with pytest.raises(MBEIRFormatError, match=match) as e:
        fn(*a, **kw)
    return e.value


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps(REAL_QUERY) + "\n{not json\n")
    err = _expect("malformed JSON", read_queries, p, tmp_path, check_images=False)
    assert err.line == 2 and str(p) in str(err)


def test_missing_field(tmp_path):
    rec = dict(REAL_QUERY)
    del rec["task_id"]
    _expect(
        r"q.jsonl:1: missing field\(s\) task_id",
        read_queries,
        _jsonl(tmp_path / "q.jsonl", [rec]),
        tmp_path,
        check_images=False,
    )


def test_unknown_modality(tmp_path):
    rec = dict(REAL_CANDS[1], modality="audio")
    _expect("unknown modality 'audio'", read_pool, _jsonl(tmp_path / "p.jsonl", [rec]), tmp_path)


def test_missing_image_file(tmp_path):
    _expect(
        "image file .* not found",
        read_pool,
        _jsonl(tmp_path / "p.jsonl", [REAL_CANDS[0]]),
        tmp_path,
    )


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "mbeir_images/../../x.png"])
def test_image_path_escaping_root_is_refused(tmp_path, bad):
    rec = dict(REAL_CANDS[0], img_path=bad)
    _expect(
        "refused|escapes",
        read_pool,
        _jsonl(tmp_path / "p.jsonl", [rec]),
        tmp_path,
        check_images=False,
    )


def test_qrels_unknown_query_or_candidate(tmp_path):
    p = tmp_path / "qrels.txt"
    p.write_text("9:6 0 9:2 1 3\n9:7 0 9:2 1 3\n")
    _expect(r"qrels.txt:2: qrels names unknown query '9:7'", read_qrels, p, known_qids={"9:6"})
    p.write_text("9:6 0 9:99 1 3\n")
    _expect("candidate '9:99', which is not in the pool", read_qrels, p, known_dids={"9:2"})
    p.write_text("9:6 0 9:2\n")
    _expect("expected 'qid 0 did rel", read_qrels, p)


def test_qrels_positive_outside_the_pool_is_counted(real_slice):
    """UniIR semantics: a positive need not be in the row's local pool (OVEN/INFOSEEK); counted."""
    q = real_slice / "qrels/test/mbeir_mscoco_task3_test_qrels.txt"
    q.write_text(q.read_text() + "9:6 0 9:424242 1 3\n")
    data = MBEIR(real_slice)
    row = data.rows()[0]
    assert "9:424242" in data.qrels(row)["9:6"] and data.positives_outside_pool(row) == 1


def test_duplicate_ids(tmp_path):
    _expect(
        "duplicate did '9:14174' .first at line 1",
        read_pool,
        _jsonl(tmp_path / "p.jsonl", [REAL_CANDS[1], REAL_CANDS[1]]),
        tmp_path,
    )
    _expect(
        "duplicate qid",
        read_queries,
        _jsonl(tmp_path / "q.jsonl", [REAL_QUERY, REAL_QUERY]),
        tmp_path,
        check_images=False,
    )


def test_empty_pool(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n")
    _expect("empty candidate pool", read_pool, p, tmp_path)


def test_bad_ids_and_task(tmp_path):
    _expect(
        "qid 'abc'",
        read_queries,
        _jsonl(tmp_path / "q.jsonl", [dict(REAL_QUERY, qid="abc")]),
        tmp_path,
        check_images=False,
    )
    _expect(
        "unknown task_id 11",
        read_queries,
        _jsonl(tmp_path / "q.jsonl", [dict(REAL_QUERY, task_id=11)]),
        tmp_path,
        check_images=False,
    )
    _expect(
        "list of did strings",
        read_queries,
        _jsonl(tmp_path / "q.jsonl", [dict(REAL_QUERY, pos_cand_list=[{"did": "9:2"}])]),
        tmp_path,
        check_images=False,
    )
    _expect(
        "no text",
        read_pool,
        _jsonl(tmp_path / "p.jsonl", [dict(REAL_CANDS[1], txt=None)]),
        tmp_path,
    )


def test_instructions_tsv_errors(tmp_path):
    p = tmp_path / "i.tsv"
    p.write_text(REAL_INSTR + "image\ttext\tMSCOCO\n")
    _expect(r"i.tsv:3: expected at least 5", read_instructions, p)
    p.write_text(REAL_INSTR)
    assert read_instructions(p)[(9, "image", "text")][0] == "Find a caption for the image."


def test_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="umarvel prepare"):
        MBEIR(tmp_path / "nope")
