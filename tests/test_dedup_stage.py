"""The dedup stage: exact and near duplicates across shards, contamination by evaluation sets, resume, status."""

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import synthetic
from pipeline.config import load_config
from pipeline.download import make_key, shard_name
from pipeline.storage import atomic_write_table, exists, read_table
from workflows.rundir import RunDir
from workflows.stages import DedupWorker

from conftest import demo_config

SHARD = 4


def K(shard: int, i: int) -> str:
    return make_key(shard, i, SHARD)


def _jpeg(img: Image.Image, q: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _scene(i: int, variant: int = 0) -> Image.Image:
    fam = synthetic.families(i + 1, max(2, variant + 1), seed=7)[i]
    return synthetic.render(fam[variant], 256)[0]


def _write_images(root, shards: list[list[tuple[str, bytes | None]]]) -> RunDir:
    """images/<shard>.parquet + .tar as the download stage leaves them: (url, bytes or None for a 404)."""
    run = RunDir(str(root))
    for s, items in enumerate(shards):
        rows = []
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for i, (url, data) in enumerate(items):
                key = make_key(s, i, SHARD)
                ok = data is not None
                rows.append({"key": key, "url": url, "status": "success" if ok else "failed_to_download",
                             "error_message": None if ok else "HTTP Error 404: Not Found",
                             "sha256": hashlib.sha256(data).hexdigest() if ok else None})
                if ok:
                    info = tarfile.TarInfo(f"{key}.jpg")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        atomic_write_table(run.images(f"{shard_name(s)}.parquet"), pa.Table.from_pylist(rows))
        with open(run.images(f"{shard_name(s)}.tar"), "wb") as f:
            f.write(tar_buf.getvalue())
    return run


def _cfg(run_dir, **dedup):
    return load_config(data=demo_config(run_dir, **{"run.shard_size": SHARD, "dedup": dedup}))


def _dedup(run: RunDir, cfg, n_shards: int, verify_all=None) -> dict:
    """The stage without Ray: hash every shard, the global pass, every shard's output; {key: row}."""
    w = DedupWorker(cfg, run.root)
    for s in range(n_shards):
        w.hash(s)
    w.global_pass(list(range(n_shards)), verify_all)
    rows = {}
    for s in range(n_shards):
        w.run(s)
        rows.update({r["key"]: r for r in read_table(run.output("dedup", s)).to_pylist()})
    return rows


@pytest.fixture(scope="module")
def images():
    a, b, c = _scene(0), _scene(1), _scene(2)
    return {"a": _jpeg(a), "b": _jpeg(b), "c": _jpeg(c), "a_other": _jpeg(a, 80),
            "a_small": _jpeg(a.resize((128, 128), Image.BILINEAR), 90), "c_q85": _jpeg(c, 85),
            "v0": _jpeg(_scene(3, 0)), "v1": _jpeg(_scene(3, 1))}


def test_exact_near_and_variants_across_two_shards(tmp_path, images):
    shards = [[("http://h.example/a.jpg", images["a"]), ("http://h.example/b.jpg", images["b"]),
               ("http://h.example/v0.jpg", images["v0"]), ("http://h.example/gone.jpg", None)],
              [("HTTP://H.example:80/a.jpg#x", images["a_other"]),  # the same URL spelled otherwise, other bytes
               ("http://h.example/b-copy.jpg", images["b"]),  # the same bytes under another URL
               ("http://h.example/a-small.jpg", images["a_small"]),  # a resized re-encode
               ("http://h.example/v1.jpg", images["v1"])]]  # a family variant: one detail differs
    run = _write_images(tmp_path / "run", shards)
    rows = _dedup(run, _cfg(tmp_path / "run"), 2)
    got = {k: (r["kept"], r["duplicate_of"], (r["reason"] or "").split(" (")[0]) for k, r in rows.items()}
    assert got == {K(0, 0): (True, None, ""), K(0, 1): (True, None, ""), K(0, 2): (True, None, ""),
                   K(0, 3): (False, None, ""),
                   K(1, 0): (False, K(0, 0), "same url"), K(1, 1): (False, K(0, 1), "same bytes"),
                   K(1, 2): (False, K(0, 0), "near duplicate"), K(1, 3): (True, None, "")}
    assert rows[K(0, 3)]["status"] == "skipped" and rows[K(0, 3)]["error"] == "no image (http_404)"
    assert rows[K(1, 2)]["reason"].startswith("near duplicate (phash d=")
    # deterministic: a second run in another folder gives the same rows
    again = _dedup(_write_images(tmp_path / "again", shards), _cfg(tmp_path / "again"), 2)
    assert {k: (r["kept"], r["duplicate_of"], r["reason"]) for k, r in again.items()} == \
        {k: (r["kept"], r["duplicate_of"], r["reason"]) for k, r in rows.items()}


def test_contaminated_image_is_excluded_with_its_set(tmp_path, images):
    evalset = tmp_path / "heldout"
    evalset.mkdir()
    (evalset / "x.jpg").write_bytes(images["c"])
    (evalset / "y.jpg").write_bytes(images["v0"])
    run = _write_images(tmp_path / "run", [[("u/1.jpg", images["a"]), ("u/2.jpg", images["c_q85"])],
                                           [("u/3.jpg", images["v1"])]])
    cfg = _cfg(tmp_path / "run", evalsets=[{"name": "heldout", "path": str(evalset), "kind": "folder"}])
    rows = _dedup(run, cfg, 2)
    assert rows[K(0, 1)]["reason"] == "contaminated: heldout"
    assert rows[K(0, 1)]["duplicate_of"] == "heldout/x.jpg" and not rows[K(0, 1)]["kept"]
    assert rows[K(0, 0)]["kept"] and rows[K(1, 0)]["kept"]  # v1 is a variant of the evaluation image v0: kept


def _crop(img: Image.Image, frac: float, dx: int, dy: int) -> Image.Image:
    cw, ch = int(img.width * frac), int(img.height * frac)
    return img.crop((dx, dy, img.width - cw + dx, img.height - ch + dy))


def test_cropped_heavily_reencoded_and_resized_copies_across_shards(tmp_path, images):
    """The crop windows' hashes make 5-10% crops candidates through the stage's stored hashes; verification takes
    a q30 re-encode and a lanczos resize, keeps a one-detail variant; a crop of an evaluation image (and the
    evaluation image a crop of a training image) is contamination."""
    a, b, c = _scene(0), _scene(1), _scene(2)
    shards = [[("u/a", images["a"]), ("u/b", images["b"]), ("u/c", images["c"]), ("u/v0", images["v0"])],
              [("u/b-crop10", _jpeg(_crop(b, 0.10, 3, 20), 75)), ("u/a-q30", _jpeg(a, 30)),
               ("u/c-lanczos", _jpeg(c.resize((160, 160), Image.LANCZOS), 90)), ("u/v1", images["v1"])]]
    run = _write_images(tmp_path / "run", shards)
    rows = _dedup(run, _cfg(tmp_path / "run"), 2)
    assert {k: r["duplicate_of"] for k, r in rows.items() if not r["kept"]} == \
        {K(1, 0): K(0, 1), K(1, 1): K(0, 0), K(1, 2): K(0, 2)}
    assert rows[K(1, 3)]["kept"] and rows[K(0, 3)]["kept"]  # v1: a variant of v0
    assert int(rows[K(1, 0)]["distance"]) <= 8  # the crop's distance is the window hash's, as the search measured
    evalset = tmp_path / "heldout"
    evalset.mkdir()
    (evalset / "a-crop.jpg").write_bytes(_jpeg(_crop(a, 0.06, 10, 2)))  # the evaluation image is the crop
    (evalset / "b.jpg").write_bytes(images["b"])
    run = _write_images(tmp_path / "run2", [[("u/a", images["a"]), ("u/b-crop", _jpeg(_crop(b, 0.05, 0, 12), 50))],
                                            [("u/c", images["c"])]])
    cfg = _cfg(tmp_path / "run2", evalsets=[{"name": "heldout", "path": str(evalset), "kind": "folder"}])
    rows = _dedup(run, cfg, 2)
    assert {k: (r["reason"], r["duplicate_of"]) for k, r in rows.items() if not r["kept"]} == \
        {K(0, 0): ("contaminated: heldout", "heldout/a-crop.jpg"), K(0, 1): ("contaminated: heldout", "heldout/b.jpg")}


def test_resume_after_a_kill_in_the_global_pass(tmp_path, images):
    shards = [[("u/a", images["a"]), ("u/b", images["b"]), ("u/c", images["c"])],
              [("u/a2", images["a_small"]), ("u/v0", images["v0"]), ("u/v1", images["v1"]), ("u/c2", images["c_q85"])]]
    run = _write_images(tmp_path / "run", shards)
    cfg = _cfg(tmp_path / "run", verify_chunk=1)
    w = DedupWorker(cfg, run.root)
    for s in range(2):
        w.hash(s)

    class Killed(BaseException):
        pass

    def killed_after_one(ids):
        assert len(ids) >= 2  # several chunks, so the kill lands in the middle
        w.verify(ids[0])
        raise Killed

    with pytest.raises(Killed):
        w.global_pass([0, 1], killed_after_one)
    assert not exists(w.groups_path()) and exists(w._chunk_path(0)) and not exists(w._chunk_path(1))
    done = []
    resumed = _dedup(run, cfg, 2, verify_all=lambda ids: done.extend(ids) or [w.verify(i) for i in ids])
    assert 0 not in done and 1 in done  # the verified chunk was kept
    fresh = _dedup(_write_images(tmp_path / "fresh", shards), _cfg(tmp_path / "fresh", verify_chunk=1), 2)
    assert resumed == fresh
    assert resumed[K(1, 0)]["duplicate_of"] == K(0, 0) and resumed[K(1, 3)]["duplicate_of"] == K(0, 2)


def test_before_captions_duplicates_are_not_captioned(tmp_path, images):
    """dedup.before_captions: captions wait for the dedup stage (requires) and give duplicate and contaminated keys
    a skipped row with the dedup reason instead of a caption; off (the default), every image is captioned."""
    from workflows.stages import CaptionsWorker, requires

    evalset = tmp_path / "heldout"
    evalset.mkdir()
    (evalset / "x.jpg").write_bytes(images["c"])
    shards = [[("u/a", images["a"]), ("u/b", images["b"]), ("u/gone", None)],
              [("u/a", images["a_other"]), ("u/c", images["c_q85"]), ("u/v1", images["v1"])]]
    run = _write_images(tmp_path / "run", shards)
    for s in range(2):  # a caption column, as the input's caption_cols bring it
        meta = read_table(run.images(f"{shard_name(s)}.parquet"))
        meta = meta.append_column("caption", pa.array([f"caption of {u}" for u in meta["url"].to_pylist()]))
        atomic_write_table(run.images(f"{shard_name(s)}.parquet"), meta)
    heldout = [{"name": "heldout", "path": str(evalset), "kind": "folder"}]
    cfg = _cfg(tmp_path / "run", evalsets=heldout, before_captions=True)
    assert requires("captions", cfg) == ["download", "dedup"]
    assert requires("captions", _cfg(tmp_path / "run", evalsets=heldout)) == ["download"]
    _dedup(run, cfg, 2)
    CaptionsWorker(cfg, run.root).run(1)
    rows = {r["key"]: r for r in read_table(run.output("captions", 1)).to_pylist()}
    assert [(rows[K(1, i)]["status"], (rows[K(1, i)]["error"] or "")[:40].strip()) for i in range(3)] == [
        ("skipped", f"duplicate: same url, duplicate_of {K(0, 0)}"[:40]),
        ("skipped", "contaminated: heldout (near duplicate of"),
        ("ok", "")]
    assert rows[K(1, 2)]["text"] == "caption of u/v1"
    CaptionsWorker(_cfg(tmp_path / "run", evalsets=heldout), run.root).run(1)  # the default: all captioned
    assert [r["status"] for r in read_table(run.output("captions", 1)).to_pylist()] == ["ok", "ok", "ok"]


@pytest.mark.slow
def test_demo_world_run_accounts_for_duplicates_and_contamination(tmp_path, ray_session):
    """A run of a small synthetic world seeded with a duplicate URL and a copy of an evaluation image: both are
    left out of export with their reasons (and, with dedup.before_captions, never captioned), and status counts them. (This world also has a real duplicate:
    family 1's variants 1 and 2 made the same change, so their JPEGs are byte for byte the same.)"""
    from workflows.cli import main
    from workflows.status import format_status, run_status

    run_dir = tmp_path / "run"
    cfg = demo_config(run_dir, **{"input.synthetic.duplicates": True, "run.shard_size": 4,
                                  "dedup": {"evalsets": [{"name": "synth-heldout", "path": "synth/evalset"}],
                                            "before_captions": True}})
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    assert main(["run", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 0
    st = run_status(RunDir(str(run_dir)))
    assert st["accounted"] and st["urls"] == 9 + 2 + 3
    assert st["dedup"] == {"kept": 8, "duplicates": {"same bytes": 1, "same url": 1},
                           "contaminated": {"synth-heldout": 1}, "no_image": 3}
    assert st["stages"]["export"]["rows"]["ok"] == 8
    # before_captions: the duplicates and the contaminated image were never captioned
    assert st["stages"]["captions"]["rows"] == {"ok": 8, "skipped: duplicate": 2, "skipped: contaminated": 1,
                                                "skipped: no image (http_404)": 1, "skipped: no image (not_an_image)": 1,
                                                "skipped: no image (truncated)": 1}
    assert st["stages"]["export"]["rows"]["not exported: duplicate"] == 2
    text = format_status(st)
    assert "8 kept, 2 duplicate(s), 1 same bytes, 1 same url; 1 contaminated, 1 by synth-heldout" in text
    assert st["repeated_captions"] == {"min_images": 3, "texts": 0, "images": 0}
    from workflows.report import Ctx, sec_dedup

    html = sec_dedup(Ctx(RunDir(str(run_dir)), list(range(4))))
    assert '<tr><td>synth-heldout</td><td class="n">1</td></tr>' in html
    assert '<tr><td>duplicate: same url</td><td class="n">1</td></tr>' in html
    index = pa.concat_tables([read_table(p) for p in RunDir(str(run_dir)).glob("export/0000?.parquet")])
    why = {r["url"]: r["reasons"] for r in index.to_pylist() if not r["exported"]}
    assert why["images/evalset-copy.jpg"][0].startswith("contaminated: synth-heldout (near duplicate of synth-heldout/e0000.jpg")
    first = index.filter(pa.compute.equal(index["url"], "images/f0000_v0.jpg")).to_pylist()
    assert sorted(r["exported"] for r in first) == [False, True]
    assert any(r.startswith("duplicate: same url, duplicate_of ") for r in why["images/f0000_v0.jpg"])
    assert index.num_rows == 14


def test_repeated_captions_are_flagged_with_their_count(tmp_path):
    from pipeline.dedup_stage import caption_digest
    from workflows.stages import write_repeated_captions

    run = RunDir(str(tmp_path / "run"))
    boiler, other = "The image shows a scene.", "A red circle above a blue square."
    texts = {"k1": boiler, "k2": "the  image shows a SCENE.", "k3": boiler, "k4": other}
    atomic_write_table(run.path("sentences", "00000.parquet"),
                       pa.Table.from_pylist([{"key": k, "text": t} for k, t in texts.items()]))
    index = pa.Table.from_pylist([{"key": k, "shard": "00000", "caption_digests": [caption_digest(t)]}
                                  for k, t in texts.items()])
    counts = write_repeated_captions(run, index, 3)
    assert counts == [3, 3, 3, 1]
    doc = json.loads(open(run.repeated_captions()).read())
    assert doc["texts"] == 1 and doc["images"] == 3
    assert doc["repeated"][0]["images"] == 3 and doc["repeated"][0]["text"] == boiler


def test_evalset_kinds_are_the_readers_of_model_evalsets(tmp_path):
    from model import evalsets
    from pipeline.config import ConfigError, EVALSET_KINDS

    assert set(EVALSET_KINDS) == {"folder", *evalsets.RETRIEVAL_SETS, *evalsets.REFER_SETS}
    with pytest.raises(ConfigError, match="duplicate evaluation set names"):
        _cfg(tmp_path, evalsets=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}])
    with pytest.raises(ConfigError, match="run.stages has 'dedup' but there is no dedup section"):
        load_config(data=demo_config(tmp_path, **{"run.stages": ["download", "dedup"]}))
    urban = tmp_path / "urban"
    (urban / "image").mkdir(parents=True)
    (urban / "caption").mkdir()
    Image.new("RGB", (8, 8)).save(urban / "image" / "1.jpg")
    (urban / "caption" / "1.txt").write_text("a caption")
    from pipeline.dedup_stage import evalset_images

    assert evalset_images(str(urban), "urban-1k") == [("image/1.jpg", str(urban / "image" / "1.jpg"))]
