"""A whole run (download, captions, sentences, export) over a URL list full of faults: every URL and every
caption ends with a named reason or flag, nothing is lost or duplicated, and no fault holds the run up."""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from faults import GOOD, HUGE_TEXT, IMAGE_FAULTS, LOOP_TEXT, TIMEOUT, ImageFaults
from invariants import accounted, no_duplicates_and_nothing_lost
from workflows.cli import main
from workflows.serve import serve

pytestmark = pytest.mark.slow  # whole runs: 30-70 s on 2 cores
N_OK = 10
# caption of ok/<i>.jpg (the `source` captioner reads it) -> what the sentences stage must make of it
CAPTIONS = [
    ("A small red circle is in the top left. The background is white.".encode(), "kept"),
    (b"", "empty"),
    (None, "empty"),
    (b"  \n\t  ", "empty"),
    (LOOP_TEXT.encode(), "repetition"),
    (HUGE_TEXT.encode(), "too_long"),
    (b"A red \xff\xfe circle is on the left. The \xc3 background is grey.", "invalid_utf8"),
    ("12 34 56 78 90 11 22 33 44 55 66 77 88 99 00 a.".encode(), "non_alpha"),
    ("A red\x00 circle \x07is on\u200b the left.\r\n- The background is white.".encode(), "kept"),
    ("The image shows a red circle on the left side of a white background.".encode(), "boilerplate"),
]
FAULTY = [(path, why) for path, why in IMAGE_FAULTS]


@pytest.fixture(scope="module")
def faulty_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    urls = [f"ok/{i}.jpg" for i in range(N_OK)] + [p for p, _ in FAULTY]
    caps = [c for c, _ in CAPTIONS] + [b"A caption for a URL that fails." for _ in FAULTY]
    pq.write_table(pa.table({"url": pa.array(urls), "caption": pa.array(caps, pa.binary())}), tmp / "urls.parquet")
    run_dir = tmp / "run"
    with serve(ImageFaults) as base:
        cfg = {"run": {"dir": str(run_dir), "shard_size": 5},
               "input": {"urls": [str(tmp / "urls.parquet")], "caption_cols": ["caption"], "base_url": base},
               "download": {"image_size": 64, "threads": 16, "timeout": TIMEOUT, "min_image_size": 8,
                            "max_image_area": 50_000_000, "allow_networks": ["127.0.0.1/32"]},
               "captioners": [{"name": "source", "backend": "source"}],
               "ray": {"shard_retries": 0}}
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.time()
        rc = main(["run", str(tmp / "cfg.yaml"), "--no-progress"])
        seconds = time.time() - t0
    return run_dir, urls, rc, seconds


def test_every_url_is_accounted_for_by_reason(faulty_run):
    run_dir, urls, rc, seconds = faulty_run
    assert rc == 0
    st = accounted(run_dir, len(urls))
    want = {"ok": N_OK}
    for _, why in FAULTY:
        want[why] = want.get(why, 0) + 1
    assert st["accounting"] == want
    got = {r["url"]: r for f in sorted((run_dir / "images").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    from pipeline.records import download_reason
    for path, why in FAULTY:
        assert download_reason(got[path]["status"], got[path]["error_message"]) == why, (path, got[path])
    # the slow body (one byte per 0.2 s of a JPEG) is cut at the timeout instead of holding its thread for minutes:
    # the whole run ends before that one body could have been read (no tighter bound: CI machines are shared)
    assert len(GOOD[1]) * 0.2 > 300 and seconds < len(GOOD[1]) * 0.2


def test_no_key_is_lost_or_duplicated_in_any_stage(faulty_run):
    run_dir, urls, _, _ = faulty_run
    rows = no_duplicates_and_nothing_lost(run_dir)
    assert rows["images"] == rows["captions"] == rows["sentences"] == rows["export"] == len(urls)


def _by_url(run_dir, stage):
    keys = {r["key"]: r["url"] for f in (run_dir / "images").glob("*.parquet")
            for r in pq.read_table(f, columns=["key", "url"]).to_pylist()}
    return {keys[r["key"]]: r for f in (run_dir / stage).glob("[0-9]*.parquet") for r in pq.read_table(f).to_pylist()}


def test_each_bad_caption_gets_its_flag_or_reason(faulty_run):
    run_dir = faulty_run[0]
    caps, sents, export = (_by_url(run_dir, s) for s in ("captions", "sentences", "export"))
    for i, (_, want) in enumerate(CAPTIONS):
        url = f"ok/{i}.jpg"
        c, s, e = caps[url], sents[url], export[url]
        if want == "empty":
            assert c["status"] == "failed" and c["error"].startswith("empty caption"), c
            assert s["status"] == "skipped" and s["exclude_reasons"] == ["no caption"]
            assert not e["exported"] and e["reasons"] == ["no caption left: source/caption: skipped"]
            continue
        assert c["status"] == s["status"] == "ok", (url, c, s)
        assert json.loads(c["flags"]) == s["flags"], url  # captions and sentences agree on the flags
        if want == "kept":
            assert s["flags"] == [] and e["exported"], (url, s["flags"], e)
        elif want in ("repetition", "non_alpha"):
            assert want in s["flags"] and s["exclude_reasons"] == [want] and not e["exported"], (url, s)
            assert e["reasons"] == [f"no caption left: source/caption: {want}"]
        else:  # flagged, stripped or kept as is, and exported
            assert want in s["flags"] and not s["excluded"] and e["exported"], (url, s["flags"], s["exclude_reasons"])
    huge = sents["ok/5.jpg"]
    assert huge["n_chars"] >= 199_000 and sum(len(x.split()) for x in huge["sentences"]) <= 1000
    assert any(x.startswith("too_long") for x in huge["stripped"])
    bad = sents["ok/6.jpg"]
    assert "\ufffd" in bad["text"] and bad["sentences"][0].startswith("A red \ufffd\ufffd circle")
    assert "\x00" not in sents["ok/8.jpg"]["text"] and sents["ok/8.jpg"]["n_sentences"] == 2
    assert sents["ok/9.jpg"]["sentences"][0].startswith("a red circle")


def test_failed_downloads_carry_their_reason_to_export(faulty_run):
    run_dir = faulty_run[0]
    export = _by_url(run_dir, "export")
    for path, why in FAULTY:
        assert export[path]["reasons"] == [f"no image ({why})"] and not export[path]["exported"]
