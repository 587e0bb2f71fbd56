import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_config
from pipeline.importers import import_corpus, write_url_list
from pipeline.sources import InputError
from workflows.cli import main

LONG = "A long description of a dog. It is brown."


def test_dreamlip_csv(tmp_path):
    p = tmp_path / "dreamlip.csv"
    p.write_text("image,raw,shortIB,longIB,shortSV,longSV,shortLLA,longLLA\n"
                 f'cc3m/0001.jpg,dog,a dog,"{LONG}",brown dog,"{LONG} SV",dog photo,"{LONG} LLA"\n')
    t = import_corpus("dreamlip", str(p)).to_pylist()
    assert t == [{"url": "cc3m/0001.jpg", "raw": "dog", "shortIB": "a dog", "longIB": LONG, "shortSV": "brown dog",
                  "longSV": LONG + " SV", "shortLLA": "dog photo", "longLLA": LONG + " LLA"}]


@pytest.mark.parametrize("keys", [
    {"ImagePath": "url", "RawCaption": "raw", "IBCaptionLong": "longIB", "SVCaptionShort": "shortSV",
     "LLACaptionLong": "longLLA"},
    {"image_path": "url", "raw_caption": "raw", "ib_caption_long": "longIB", "sv_caption_short": "shortSV",
     "lla_caption_long": "longLLA"},
])
def test_dreamlip_json_both_spellings(tmp_path, keys):
    values = {"url": "yfcc/42.jpg", "raw": "raw text", "longIB": LONG, "shortSV": "a dog", "longLLA": LONG + "!"}
    p = tmp_path / "dreamlip.json"
    p.write_text(json.dumps([{src: values[dst] for src, dst in keys.items()}]))
    (row,) = import_corpus("dreamlip", str(p)).to_pylist()
    for dst, v in values.items():
        assert row[dst] == v
    assert row["shortIB"] is None  # absent in this record: carried as null, not dropped


def test_sharegpt4v(tmp_path):
    p = tmp_path / "sharegpt4v.json"
    p.write_text(json.dumps([
        {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                           {"from": "gpt", "value": LONG}]},
        {"id": "x2", "image": "sam/images/sa_1.jpg", "conversations": [{"from": "human", "value": "hi"}]},
    ]))
    rows = import_corpus("sharegpt4v", str(p)).to_pylist()
    assert rows[0] == {"url": "coco/train2017/000000000009.jpg", "sharegpt4v": LONG, "source_id": "000000000009"}
    assert rows[1]["sharegpt4v"] is None  # no answer: kept, and the sentences stage will flag it empty


def test_pixelprose_parquet(tmp_path):
    p = tmp_path / "pixelprose.parquet"
    pq.write_table(pa.table({"uid": ["u1"], "url": ["http://x/1.jpg"], "key": ["k1"], "vlm_model": ["gemini"],
                             "vlm_caption": [LONG], "original_caption": ["dog"]}), p)
    assert import_corpus("pixelprose", str(p)).to_pylist() == [
        {"url": "http://x/1.jpg", "vlm_caption": LONG, "original_caption": "dog", "source_id": "u1"}]


def test_generic_jsonl_and_errors(tmp_path):
    p = tmp_path / "any.jsonl"
    p.write_text(json.dumps({"image_url": "http://x/1.jpg", "cap_a": "a", "cap_b": "b", "other": 1}) + "\n")
    assert import_corpus("generic", str(p), "image_url", ["cap_a", "cap_b"]).to_pylist() == [
        {"url": "http://x/1.jpg", "cap_a": "a", "cap_b": "b"}]
    with pytest.raises(InputError, match=r"missing column\(s\) \['cap_c'\]"):
        import_corpus("generic", str(p), "image_url", ["cap_c"])
    bad = tmp_path / "bad.csv"
    bad.write_text("image,raw\nx,y\n")
    with pytest.raises(InputError, match="not a DreamLIP CSV, missing"):
        import_corpus("dreamlip", str(bad))


def test_cli_import_writes_list_and_a_config_that_validates(tmp_path, capsys):
    p = tmp_path / "pixelprose.parquet"
    pq.write_table(pa.table({"uid": ["u1"], "url": ["http://x/1.jpg"], "vlm_caption": [LONG],
                             "original_caption": ["dog"]}), p)
    out = tmp_path / "list.parquet"
    assert main(["import", "pixelprose", str(p), str(out)]) == 0
    snippet = yaml.safe_load(capsys.readouterr().out)
    assert [c["name"] for c in snippet["captioners"]] == ["vlm_caption", "original_caption"]
    cfg = load_config(data={"run": {"dir": str(tmp_path / "run")}, **snippet})
    assert cfg.input.caption_cols == ["vlm_caption", "original_caption"] and cfg.input.extra_cols == ["source_id"]
    assert pq.read_table(out).num_rows == 1
    assert write_url_list(pa.table({"url": ["u"], "c": ["t"]}), str(tmp_path / "l2.parquet"))["captioners"] == [
        {"name": "c", "backend": "source", "columns": ["c"]}]
