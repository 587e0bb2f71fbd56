"""`longcap report` on a small synthetic run (regions by spatial division, a few training steps), the same run
with its regions and training removed, the page in headless Chromium, and `longcap ground`."""

import functools
import html as html_lib
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from workflows.cli import main

from conftest import demo_config

REGIONS = {"division": ["whole", "quadrants"], "scorer": {"model": "ViT-S-32", "image_size": 32},
           "threshold": -1.0}
TRAIN = {"model": "caft-tiny", "steps": 2, "log_every": 1, "ckpt_every": 2, "image_size": 56, "workers": 0,
         "batch_size": 4, "warmup": 1, "n_sub": 4, "k_chunks": 2, "train_where": {"split": "train"},
         "eval_where": {"split": "test"}}
GALLERY, HEAT_IMAGES = 4, 2

EVAL = {"dataset": "docci", "checkpoint": "models/caft-tiny/step-0000002", "model": "caft-tiny",
        "retrieval": {"n": 40, "chance_r1": 0.025, "alpha": 0.3,
                      "whole": {"i2t_r1": 0.4567, "i2t_r5": 0.8, "t2i_r1": 0.5, "t2i_r5": 0.9},
                      "part": {"i2t_r1": 0.3, "i2t_r5": 0.7, "t2i_r1": 0.35, "t2i_r5": 0.75},
                      "caftpp": {"i2t_r1": 0.5, "i2t_r5": 0.85, "t2i_r1": 0.55, "t2i_r5": 0.95,
                                 "i2t_r10": 0.9876}},  # a key the report does not know
        "grounding": {"miou": 0.2222, "n": 66, "baseline_whole_image_miou": 0.024},
        "new_section": {"thing": 1.2345}}
ABLATION = {"steps": 100, "rows": [
    {"row": "siglip-tiny", "seeds": [0, 1], "i2t_r1": {"mean": 0.25, "std": 0.01}, "t2i_r1": {"mean": 0.2, "std": 0.02},
     "miou": {"mean": 0.1, "std": 0.005}},
    {"row": "ablate-tiny-hloss", "seeds": [0, 1], "i2t_r1": {"mean": 0.375, "std": 0.03},
     "t2i_r1": {"mean": 0.3, "std": 0.01}, "miou": {"mean": 0.2, "std": 0.015}}]}


@pytest.fixture(scope="module")
def full_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run = tmp / "run"
    # 5 families: the fifth is the held-out test split (3 images)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(demo_config(run, regions=REGIONS, train=TRAIN, **{
        "run.shard_size": 4, "input.synthetic.families": 5})))
    assert main(["run", str(tmp / "cfg.yaml"), "--no-progress"]) == 0
    (run / "eval").mkdir()
    (run / "eval" / "docci-caft-tiny.json").write_text(json.dumps(EVAL))
    (run / "ablation.json").write_text(json.dumps(ABLATION))
    return run


def status_json(run, capsys) -> dict:
    capsys.readouterr()
    main(["status", str(run), "--json"])
    return json.loads(capsys.readouterr().out)


def report(run, capsys) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["report", str(run), "--gallery", str(GALLERY), "--heat-images", str(HEAT_IMAGES)]) == 0
    out = capsys.readouterr().out
    return (run / "report" / "index.html").read_text(), out


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


def table_rows(html: str, tid: str) -> list[list[str]]:
    m = re.search(rf'<table id="{tid}">(.*?)</table>', html, re.S)
    assert m, f"no table {tid}"
    return [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", m.group(1), re.S)][1:]


def check_images(run: Path, html: str) -> list[str]:
    """Every <img src> is a file in the report folder that decodes; every figure written is used."""
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html)
    assert srcs and not [s for s in srcs if "://" in s or s.startswith("/")]
    for s in srcs:
        with Image.open(run / "report" / s) as im:
            im.load()
            assert im.width > 10 and im.height > 10
    assert sorted(set(srcs)) == sorted(f"img/{p.name}" for p in (run / "report" / "img").iterdir())
    return srcs


@pytest.fixture(scope="module")
def full_report(full_run):
    """The full run's report, written once (capsys is function-scoped: stdout captured here)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["report", str(full_run), "--gallery", str(GALLERY), "--heat-images", str(HEAT_IMAGES)]) == 0
    return (full_run / "report" / "index.html").read_text(), buf.getvalue()


@pytest.mark.slow
def test_report_of_a_full_run(full_run, full_report, capsys):
    html, out = full_report
    assert out.splitlines()[0] == f"report: {full_run}/report/index.html"
    assert 'class="notrun"' not in html and "section failed" not in html
    srcs = check_images(full_run, html)

    # the accounting is `longcap status --json`'s, number for number
    st = status_json(full_run, capsys)
    rows = table_rows(html, "accounting")
    assert rows[:-1] == [[k, str(v)] for k, v in st["accounting"].items()]
    assert rows[-1] == ["total", str(st["urls"])] and st["accounted"]
    assert {"ok", "http_404", "not_an_image", "truncated"} <= set(st["accounting"])
    stages = {r[0]: r[1:4] for r in table_rows(html, "stages")}
    assert stages == {k: [str(v["shards_done"]), str(v["shards_failed"]), str(v["shards_pending"])]
                      for k, v in st["stages"].items()}

    # captions: one captioner, its counts from the files
    caps = [r for f in sorted((full_run / "captions").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    [row] = table_rows(html, "captioners")
    assert row[:4] == ["source", str(len(caps)), str(sum(r["status"] == "ok" for r in caps)),
                       str(sum(r["status"] != "ok" for r in caps))]
    assert "img/captions.png" in srcs and "img/regions.png" in srcs and "img/train-caft-tiny.png" in srcs

    # regions: both scorers' files, their pair counts
    regions = {r[0]: r for r in table_rows(html, "regions")}
    for folder, label in (("regions", "regions/ (pipeline scorer)"), ("regions-caft", "regions-caft/ (trained CAFT)")):
        rr = [r for f in sorted((full_run / folder).glob("0*.parquet")) for r in pq.read_table(f).to_pylist()]
        assert regions[label][1] == str(len(rr))
        assert regions[label][7] == str(sum(bool(m["kept"]) for r in rr for m in r["matches"] or []))

    # gallery: the asked number of images, from regions-caft/, each with its sentences
    gallery = section(html, "gallery")
    cards = re.findall(r'<div class="card gallery-item"><img src="img/gallery-(\w+)\.jpg".*?<ol>(.*?)</ol>', gallery, re.S)
    assert len(cards) == GALLERY and "from regions-caft/" in gallery
    caft = {r["key"]: r for f in sorted((full_run / "regions-caft").glob("0*.parquet"))
            for r in pq.read_table(f).to_pylist()}
    for key, items in cards:
        listed = re.findall(r'<li[^>]*><span class="swatch"[^>]*></span>(.*?) <span class="note">', items)
        assert [html_lib.unescape(x) for x in listed] == [m["sentence"] for m in caft[key]["matches"]]

    # heat maps: test-split images only, a card per sub-caption
    split = {r["key"]: r["split"] for f in sorted((full_run / "images").glob("0*.parquet"))
             for r in pq.read_table(f, columns=["key", "split"]).to_pylist()}
    heat = re.findall(r"img/heat-caft-tiny-(\w+)-\d\.png", section(html, "heatmaps"))
    assert len(set(heat)) == HEAT_IMAGES and {split[k] for k in heat} == {"test"}
    assert f"{len(heat)} heat maps" in out

    # evaluation: the training eval row, eval_pairs.json, eval/*.json (unknown keys too) and the ablation
    ev = section(html, "evaluation")
    metrics = [json.loads(x) for x in (full_run / "models" / "caft-tiny" / "metrics.jsonl").read_text().splitlines()]
    train_eval = [r for r in metrics if "eval" in r][-1]
    assert f"Training evaluation: caft-tiny, step {train_eval['step']}" in ev
    assert f'{train_eval["eval"]["grounding"]["miou"]:.3f}' in ev
    assert "Local pairs against the synthetic truth (eval_pairs.json)" in ev
    assert "docci · caft-tiny" in ev and "models/caft-tiny/step-0000002" in ev
    for text in ("0.457", "i2t_r10", "0.988", "new_section", "1.234", "0.222"):
        assert text in ev
    assert re.search(r"<td>ablate-tiny-hloss</td><td>0, 1</td><td>0\.375 ± 0\.030</td>", ev)


@pytest.mark.slow
def test_report_of_a_run_without_regions_or_training(full_run, tmp_path, capsys):
    run = tmp_path / "bare"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("models", "regions", "regions-caft", "report",
                                                                 "eval", "ablation.json"))
    html, out = report(run, capsys)
    assert out.splitlines()[0] == f"report: {run}/report/index.html"
    for sid in ("regions", "gallery", "heatmaps", "training", "evaluation"):
        assert 'class="notrun"' in section(html, sid), sid
    for sid in ("overview", "accounting", "captions", "quality"):
        assert 'class="notrun"' not in section(html, sid), sid
    assert "not run: regions, gallery, heatmaps, training, evaluation" in out
    st = status_json(run, capsys)
    assert table_rows(html, "accounting")[:-1] == [[k, str(v)] for k, v in st["accounting"].items()]
    srcs = check_images(run, html)
    assert not [s for s in srcs if "gallery" in s or "heat" in s or "train" in s]
    # statistics from 2 shards spread over the 5 (00000 and 00002); the accounting still covers all
    capsys.readouterr()
    assert main(["report", str(run), "--stat-shards", "2"]) == 0
    html = (run / "report" / "index.html").read_text()
    assert "2 of 5 shards, spread over the run" in html
    n = sum(pq.read_table(run / "captions" / f"{s}.parquet").num_rows for s in ("00000", "00002"))
    assert table_rows(html, "captioners")[0][1] == str(n)
    assert table_rows(html, "accounting")[-1] == ["total", str(st["urls"])]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_opens_in_headless_chromium_without_errors(full_run, full_report, tmp_path):
    exe = chromium()
    if not exe:
        pytest.skip("chromium not found (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    html, _ = full_report
    handler = functools.partial(QuietHandler, directory=str(full_run / "report"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems, requested = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on("response", lambda r: requested.append(r.url) or (r.status >= 400 and problems.append(
                f"HTTP {r.status}: {r.url}")))
            page.goto(f"http://127.0.0.1:{server.server_port}/index.html", wait_until="load")
            loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert problems == []
    n_img = len(re.findall(r"<img\s", html))
    assert len(loaded) == n_img and all(loaded)
    assert len([u for u in requested if "/img/" in u]) == len(set(re.findall(r'src="(img/[^"]+)"', html)))
    assert not [u for u in requested if not u.startswith(f"http://127.0.0.1:{server.server_port}/")]
    px = np.asarray(Image.open(shot).convert("RGB"))
    assert px.shape[0] > 2000 and px.shape[1] == 1280  # the full page, not one screen
    assert px.std() > 20 and len(np.unique(px.reshape(-1, 3), axis=0)) > 1000  # not blank


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ---------------------------------------------------------------- longcap ground

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from model.caft import build
    from model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "caft-tiny"
    save_checkpoint(folder, build("caft-tiny"), {"step": 0}, {"image_size": 56})
    return folder


def scene(path: Path, size=(160, 120)) -> Path:
    from PIL import ImageDraw

    im = Image.new("RGB", size, (235, 235, 220))
    d = ImageDraw.Draw(im)
    d.rectangle([30, 20, 70, 60], fill=(220, 30, 30))
    d.ellipse([95, 55, 140, 100], fill=(30, 60, 220))
    im.save(path)
    return path


def test_ground_writes_a_heat_png_of_the_image_size(tiny_checkpoint, tmp_path, capsys):
    img = scene(tmp_path / "scene.png")
    outs = []
    for i, text in enumerate(["A red square in the top left.", "A blue circle sits in the bottom right."]):
        out = tmp_path / f"heat{i}.png"
        assert main(["ground", str(img), text, "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert f"wrote {out}: 160x120 heat map" in said and "input 56px" in said  # the size in train.json
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size == (160, 120)
            outs.append(np.asarray(im.convert("RGB")).astype(int))
    a, b = outs
    # the model sees the centred 120x120 square: outside it both PNGs are the same dimmed image
    assert (a[:, :20] == b[:, :20]).all() and (a[:, 140:] == b[:, 140:]).all()
    assert a[:, :20].max() < 0.4 * 255
    # inside it the two texts give different heat
    assert np.abs(a[:, 20:140] - b[:, 20:140]).mean() > 1.0
    # a stated model input size is used
    out = tmp_path / "heat-s.png"
    assert main(["ground", str(img), "a red square", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--size", "112"]) == 0
    assert "input 112px" in capsys.readouterr().out and Image.open(out).size == (160, 120)


def test_ground_errors_are_named(tiny_checkpoint, tmp_path, capsys):
    img = scene(tmp_path / "scene.png")
    assert main(["ground", str(img), "a red square", "--out", str(tmp_path / "x.png")]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert main(["ground", str(img), "a red square", "--checkpoint", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    assert main(["ground", str(bad), "a red square", "--checkpoint", str(tiny_checkpoint),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "not a decodable image" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # a model whose attention pooling never trained (no part loss) draws nothing
    import torch

    from model.caft import build
    from model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "siglip", build("siglip-tiny"), {"step": 0}, {"image_size": 56})
    assert main(["ground", str(img), "a red square", "--checkpoint", str(tmp_path / "siglip"),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "without the part-level loss" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_report_of_a_run_with_a_goal_model(full_run, tmp_path, capsys):
    """A model kind without sub-caption attention: noted under heat maps, its own losses in the curves."""
    from localpairs_helpers import tiny_train

    run = tmp_path / "goal"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("models", "report", "eval", "ablation.json"))
    cfg = tiny_train(model="goal-tiny", shards=[str(run / "export" / "*.tar")], out=str(run / "models" / "goal-tiny"),
                     train_where={"split": "train"}, eval_where={"split": "test"}, steps=2, ckpt_every=2)
    (tmp_path / "goal.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(tmp_path / "goal.yaml")]) == 0
    (run / "eval").mkdir()
    (run / "eval" / "broken.json").write_text("{not json")  # bad files cost only their own entries
    (run / "eval" / "list.json").write_text("[1, 2]")
    (run / "ablation.json").write_text("")
    html, out = report(run, capsys)
    ev = section(html, "evaluation")
    assert ev.count("unreadable") == 2 and "broken.json" in ev and "list.json" in ev
    assert "goal-tiny: no heat maps: a goal-tiny model (goal) has no sub-caption attention" in section(html, "heatmaps")
    curves = section(html, "training")
    assert "training curves of goal-tiny" in curves and all(k in curves for k in ("tsl_image", "tsl_text", "global"))
    assert "Training evaluation: goal-tiny, step 2" in section(html, "evaluation")
    check_images(run, html)
