import hashlib
import io
import resource
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from http_helpers import QuietHandler
from pipeline.config import DownloadSection
from pipeline.download import check_image, download_shard, make_key
from pipeline.records import download_reason
from workflows.serve import serve


def jpeg(seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


GOOD = [jpeg(i) for i in range(6)]


def _bomb():
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, "PNG")
    return buf.getvalue()


BOMB = _bomb()


class Faults(QuietHandler):
    elsewhere = ""  # base URL of a second server on 127.0.0.2

    def do_GET(self):
        p = self.path
        if p.startswith("/ok/"):
            return self._send(200, GOOD[int(p.split("/")[2].split(".")[0])])
        if p == "/server-error.jpg":
            return self._send(500, b"oops", "text/plain")
        if p == "/slow.jpg":
            time.sleep(4)
            return self._send(200, GOOD[0])
        if p == "/html.jpg":
            return self._send(200, b"<html>hello</html>")
        if p == "/truncated.jpg":
            return self._send(200, GOOD[1][: len(GOOD[1]) // 2])
        if p == "/bomb.png":
            return self._send(200, BOMB, "image/png")
        if p == "/tiny.jpg":
            return self._send(200, jpeg(9, (1, 1)))
        if p == "/redirect.jpg":
            return self._send(302, b"", headers=[("Location", "/ok/5.jpg")])
        if p == "/redirect-elsewhere.jpg":  # to another loopback address the config does not allow
            return self._send(302, b"", headers=[("Location", f"{Faults.elsewhere}/ok/0.jpg")])
        if p == "/noai.jpg":
            return self._send(200, GOOD[2], headers=[("X-Robots-Tag", "noai")])
        return self._send(404, b"nope", "text/plain")


CASES = [  # (url, expected reason)
    ("ok/0.jpg", "ok"), ("ok/1.jpg", "ok"), ("ok/2.jpg", "ok"),
    ("missing.jpg", "http_404"),
    ("server-error.jpg", "http_500"),
    ("slow.jpg", "timeout"),
    ("html.jpg", "not_an_image"),
    ("truncated.jpg", "truncated"),
    ("bomb.png", "too_large"),
    ("tiny.jpg", "too_small"),
    ("redirect.jpg", "ok"),
    ("noai.jpg", "disallowed_by_site"),
    ("", "bad_url"),
    ("redirect-elsewhere.jpg", "blocked"),
]


def run_shard(out, base, shard_id=3, shard_size=100, **cfg):
    rows = pa.table({"url": [u for u, _ in CASES], "caption": [f"caption {i}" for i in range(len(CASES))],
                     "ident": list(range(len(CASES)))})
    cfg.setdefault("allow_networks", ["127.0.0.1/32"])
    c = DownloadSection(image_size=32, timeout=2, threads=8, min_image_size=8, max_image_area=50_000_000, **cfg)
    return download_shard(shard_id, rows, str(out), c, shard_size, base)


class Counting(BaseHTTPRequestHandler):
    hits = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        Counting.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(GOOD[0])))
        self.end_headers()
        self.wfile.write(GOOD[0])


@pytest.fixture(scope="module")
def elsewhere():
    with serve(Counting, host="127.0.0.2") as base:
        Faults.elsewhere = base
        yield base


@pytest.fixture(scope="module")
def server(elsewhere):
    with serve(Faults) as base:
        yield base


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, server):
    out = tmp_path_factory.mktemp("images")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = run_shard(out, server)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return out, summary, grew_mb


def test_every_url_gets_its_reason(downloaded):
    out, summary, _ = downloaded
    meta = pq.read_table(out / "00003.parquet").to_pylist()
    assert [m["key"] for m in meta] == [make_key(3, i, 100) for i in range(len(CASES))]
    assert [m["url"] for m in meta] == [u for u, _ in CASES]  # the list's URL, not the fetched one
    got = [download_reason(m["status"], m["error_message"]) for m in meta]
    assert got == [want for _, want in CASES]
    assert summary["rows"] == len(CASES) and summary["ok"] == 4
    assert summary["reasons"]["http_404"] == 1 and summary["reasons"]["timeout"] == 1
    assert meta[0]["ident"] == 0 and meta[-1]["ident"] == len(CASES) - 1
    assert Counting.hits == []  # the redirect to 127.0.0.2 was refused before connecting
    assert meta[-1]["error_message"].startswith("blocked: 127.0.0.2 resolves to 127.0.0.2 (loopback)")


def test_loopback_is_blocked_unless_allowed(tmp_path, elsewhere):
    Counting.hits.clear()
    rows = pa.table({"url": [f"{elsewhere}/ok/0.jpg", "http://169.254.169.254/latest/meta-data/"]})
    c = DownloadSection(image_size=32, timeout=2, threads=2)
    summary = download_shard(0, rows, str(tmp_path), c, 10, None)
    assert summary["reasons"] == {"blocked": 2} and Counting.hits == []
    meta = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert "cloud metadata service" in meta[1]["error_message"]
    c = DownloadSection(image_size=32, timeout=2, threads=2, allow_networks=["127.0.0.0/8"])
    assert download_shard(1, rows.slice(0, 1), str(tmp_path), c, 10, None)["ok"] == 1 and len(Counting.hits) == 1


def test_bomb_rejected_from_header_without_decoding(downloaded):
    out, _, grew_mb = downloaded
    meta = {m["url"]: m for m in pq.read_table(out / "00003.parquet").to_pylist()}
    assert "900000000 pixels" in meta["bomb.png"]["error_message"]
    assert grew_mb < 300, f"max RSS grew {grew_mb:.0f} MB while downloading a 900-Mpixel PNG"
    assert check_image(io.BytesIO(BOMB), 1e8).startswith("pixel limit")


def test_tar_holds_ok_images_in_key_order_readable_by_webdataset(downloaded):
    out, _, _ = downloaded
    samples = list(wds.WebDataset(str(out / "00003.tar"), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    keys = [s[0] for s in samples]
    assert keys == sorted(keys) and len(keys) == 4
    assert [s[3]["url"] for s in samples] == ["ok/0.jpg", "ok/1.jpg", "ok/2.jpg", "redirect.jpg"]
    assert [s[2] for s in samples] == ["caption 0", "caption 1", "caption 2", "caption 10"]
    assert all(min(s[1].size) == 32 for s in samples)  # keep_ratio: short side = download.image_size


def test_rerun_gives_identical_bytes(tmp_path, server):
    ok = [c for c in CASES if c[1] == "ok"]
    rows = pa.table({"url": [u for u, _ in ok] * 5})
    digests = []
    for name in ("a", "b"):
        download_shard(0, rows, str(tmp_path / name), DownloadSection(threads=8), 100, server)
        digests.append([hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest()
                        for f in ("00000.tar", "00000.parquet")])
        assert not list((tmp_path / name).glob("*.tmp-*"))
    assert digests[0] == digests[1]


def test_reserved_column_names_rejected(tmp_path, server):
    with pytest.raises(ValueError, match=r"\['width'\] clash with img2dataset"):
        download_shard(0, pa.table({"url": ["ok/0.jpg"], "width": [1]}), str(tmp_path), DownloadSection(), 10, server)


def test_own_server_gone_fails_the_shard_instead_of_committing_errors(tmp_path):
    with serve(Faults) as base:
        pass  # the server is closed now: like the demo's server after its driver was killed
    rows = pa.table({"url": ["ok/0.jpg", "ok/1.jpg"]})
    with pytest.raises(RuntimeError, match="local image server stopped answering"):
        download_shard(0, rows, str(tmp_path), DownloadSection(timeout=2, allow_networks=["127.0.0.1/32"]), 10, base, own_server=True)
    assert not (tmp_path / "00000.parquet").exists() and not (tmp_path / "00000.tar").exists()
    # a server that is not ours: the errors are the URLs' own and are committed
    summary = download_shard(0, rows, str(tmp_path), DownloadSection(timeout=2, allow_networks=["127.0.0.1/32"]), 10, base)
    assert summary["reasons"] == {"connection_error": 2}


def test_check_image_completeness_without_a_second_decode():
    """A JPEG ending in its EOI marker passes on the header alone; cut anywhere (even just the last byte) it
    fails as truncated; bytes after the EOI, or another format, get the decode instead."""
    good = jpeg(7, (200, 150))
    assert good.endswith(b"\xff\xd9") and check_image(io.BytesIO(good), 1e8) is None
    for cut in (len(good) - 1, len(good) - 2, len(good) * 2 // 3, len(good) // 3):
        assert check_image(io.BytesIO(good[:cut]), 1e8).startswith("truncated image"), cut
    assert check_image(io.BytesIO(good + b"\x00" * 16), 1e8) is None  # padding after EOI: decoded, complete
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(png, "PNG")
    assert check_image(io.BytesIO(png.getvalue()), 1e8) is None
    assert check_image(io.BytesIO(png.getvalue()[:-40]), 1e8) is not None


def test_key_order_writer_sorts_out_of_order_samples_past_its_memory_spool(tmp_path, monkeypatch):
    """img2dataset hands samples over in the order downloads finish; the shard comes out in key order, with
    fixed tar metadata and the list's URLs, also when the spool has moved to disk."""
    import functools
    import json
    import tarfile

    from pipeline import shardwriter

    monkeypatch.setattr(shardwriter, "SPOOL_BYTES", 1000)  # the spool rolls to a temp file after the first image
    schema = pa.schema([("url", pa.string()), ("key", pa.string()), ("status", pa.string())])
    given = [f"img/{i}.jpg" for i in range(4)]
    writer = functools.partial(shardwriter.KeyOrderWriter, given=given, key_digits=1)(
        7, str(tmp_path), True, 5, schema, "jpg")
    for i in (3, 0, 2, 1):
        ok = i != 2
        writer.write(GOOD[i] if ok else None, f"0000007{i}", f"caption {i}",
                     {"url": f"http://fetched/{i}", "key": f"0000007{i}", "status": "success" if ok else "failed"})
    assert writer.spool._rolled
    writer.close()

    with tarfile.open(tmp_path / "00007.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"0000007{i}.{e}" for i in (0, 1, 3) for e in ("jpg", "json", "txt")]
        assert {(m.mtime, m.mode, m.uid, m.uname) for m in members} == {(0, 0o444, 0, "")}
        assert tar.extractfile("00000073.jpg").read() == GOOD[3]
        assert tar.extractfile("00000071.txt").read() == b"caption 1"
        assert json.loads(tar.extractfile("00000073.json").read())["url"] == "img/3.jpg"
    meta = pq.read_table(tmp_path / "00007.parquet")
    assert meta["key"].to_pylist() == [f"0000007{i}" for i in range(4)]
    assert meta["url"].to_pylist() == given
    assert meta["status"].to_pylist() == ["success", "success", "failed", "success"]


def test_key_order_writer_keeps_rows_whose_columns_json_cannot_encode(tmp_path):
    """An input column of dates: img2dataset's own writer raised on it and lost the row (the shard then failed
    its row count); the .json gets the text, the parquet the typed value."""
    import datetime
    import functools
    import json
    import tarfile

    from pipeline.shardwriter import KeyOrderWriter

    schema = pa.schema([("url", pa.string()), ("taken", pa.date32()), ("key", pa.string()), ("status", pa.string())])
    writer = functools.partial(KeyOrderWriter, given=["a.jpg"], key_digits=0)(4, str(tmp_path), False, 5, schema,
                                                                               "jpg")
    day = datetime.date(2024, 5, 1)
    writer.write(GOOD[0], "00004", None, {"url": "http://x/a.jpg", "taken": day, "key": "00004", "status": "success"})
    writer.close()
    with tarfile.open(tmp_path / "00004.tar") as tar:
        assert [m.name for m in tar.getmembers()] == ["00004.jpg", "00004.json"]
        assert json.loads(tar.extractfile("00004.json").read())["taken"] == "2024-05-01"
    assert pq.read_table(tmp_path / "00004.parquet")["taken"].to_pylist() == [day]
