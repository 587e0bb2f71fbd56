import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources import InputError, read_url_lists

ROWS = [("http://a/1.jpg", "one"), ("http://a/2.jpg", "two, with comma"), ("http://a/3.jpg", "three")]


def write_all(d):
    pq.write_table(pa.table({"u": [r[0] for r in ROWS], "text": [r[1] for r in ROWS]}), d / "l.parquet")
    (d / "l.csv").write_text("u,text\n" + "".join(f'{u},"{t}"\n' for u, t in ROWS))
    (d / "l.tsv").write_text("u\ttext\n" + "".join(f"{u}\t{t}\n" for u, t in ROWS))
    (d / "l.jsonl").write_text("".join(json.dumps({"u": u, "text": t}) + "\n" for u, t in ROWS))
    with gzip.open(d / "l.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"u": u, "text": t}) + "\n" for u, t in ROWS))


@pytest.mark.parametrize("name", ["l.parquet", "l.csv", "l.tsv", "l.jsonl", "l.jsonl.gz"])
def test_each_format_reads_the_same_rows(tmp_path, name):
    write_all(tmp_path)
    t = read_url_lists([str(tmp_path / name)], "auto", "u", ["text"], [])
    assert t.column_names == ["url", "text"]
    assert list(zip(t["url"].to_pylist(), t["text"].to_pylist())) == ROWS


def test_txt_is_one_url_per_line_and_files_concatenate(tmp_path):
    (tmp_path / "a.txt").write_text("http://x/1.jpg\nhttp://x/2,3.jpg\n")
    (tmp_path / "b.txt").write_text("http://x/4.jpg\n")
    t = read_url_lists([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], "auto", "url", [], [])
    assert t["url"].to_pylist() == ["http://x/1.jpg", "http://x/2,3.jpg", "http://x/4.jpg"]


def test_missing_column_and_unknown_extension_are_named(tmp_path):
    write_all(tmp_path)
    with pytest.raises(InputError, match=r"l.csv: missing column\(s\) \['caption'\]; the file has \['u', 'text'\]"):
        read_url_lists([str(tmp_path / "l.csv")], "auto", "u", ["caption"], [])
    (tmp_path / "list.dat").write_text("x")
    with pytest.raises(InputError, match="cannot tell the format"):
        read_url_lists([str(tmp_path / "list.dat")], "auto", "url", [], [])
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="bad.parquet: cannot read as parquet"):
        read_url_lists([str(tmp_path / "bad.parquet")], "auto", "url", [], [])


def test_bytes_that_are_not_utf8_keep_their_row(tmp_path):
    (tmp_path / "l.csv").write_bytes(b"url,caption\nhttp://a/1.jpg,caf\xe9 au lait\nhttp://a/2.jpg,fine\n")
    t = read_url_lists([str(tmp_path / "l.csv")], "auto", "url", ["caption"], [])
    assert t["caption"].to_pylist() == ["caf\ufffd au lait", "fine"]
