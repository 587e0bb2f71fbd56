"""`longcap report RUN` -> RUN/report/index.html, and `longcap ground IMAGE TEXT` -> a heat map PNG.

The report is one static folder (index.html + img/): the accounting of every input URL, caption statistics
per captioner, quality flags, regions and pair scores, a gallery of images with their boxes and matched
sentences, grounding heat maps of the trained model, training curves and every evaluation result the run
holds. Each section reads only its own stage's files; a stage the run has not done shows "not run".
Figures are PNGs drawn with matplotlib (Agg, no pyplot state) or PIL; the page has no JavaScript and no
external URL.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import fsspec
import numpy as np

from pipeline.download import shard_name
from pipeline.images import MAX_PIXELS
from pipeline.storage import atomic_write_bytes, exists, read_table
from . import report_html as H
from .rundir import RunDir

log = logging.getLogger("longcap.report")

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#9a6324", "#800000", "#469990", "#000075"]


# ---------------------------------------------------------------- grounding (shared with `longcap ground`)

def checkpoint_image_size(path: str | Path) -> int:
    """The input size a checkpoint was trained at (train.json next to the weights), else 224."""
    from .evalcmd import checkpoint_defaults

    return checkpoint_defaults(str(path))["image_size"]


def heat_overlay(image, heat, alpha: float = 0.55):
    """A PIL image of `image`'s size: the heat map (model geometry: the centred square crop) in colour over
    the image, the Otsu mask outlined in white, the parts of the image the model did not see dimmed."""
    import torch
    from matplotlib import colormaps
    from PIL import Image

    from model.grounding import grounding_mask, minmax

    image = image.convert("RGB")
    w, h = image.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    heat = torch.as_tensor(heat, dtype=torch.float32)
    mask = grounding_mask(heat).numpy()
    hm = np.asarray(Image.fromarray(minmax(heat).numpy().astype(np.float32)).resize((m, m), Image.BILINEAR))
    mk = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((m, m), Image.NEAREST)) > 127
    base = np.asarray(image, dtype=np.float32) / 255.0
    out = base * 0.35  # outside the crop: dimmed
    colour = colormaps["jet"](np.clip(hm, 0, 1))[..., :3]
    crop = base[top:top + m, left:left + m]
    blended = crop * (1 - alpha) + colour * alpha
    edge = mk & ~(np.roll(mk, 1, 0) & np.roll(mk, -1, 0) & np.roll(mk, 1, 1) & np.roll(mk, -1, 1))
    edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)  # two pixels wide
    blended[edge] = 1.0
    out[top:top + m, left:left + m] = blended
    return Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


def ground_images(model, image, texts: list[str], size: int, device: str = "cpu") -> list:
    """Image + sub-captions -> one overlay per text (PIL, the image's size). The one path from pixels and text
    to a heat picture: `longcap ground` and the report's heat maps both call it."""
    from model.grounding import image_heatmaps

    heats = image_heatmaps(model, image, texts, size, device)
    return [heat_overlay(image, heats[i]) for i in range(len(texts))]


def open_image(path: str):
    from pipeline.images import decode_image
    from pipeline.sources import InputError

    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    try:
        return decode_image(data, MAX_PIXELS)
    except Exception as e:  # noqa: BLE001 - any decoder failure: a named, clean error
        raise InputError(f"{path}: not a decodable image ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- reading the run

def _shards(run: RunDir) -> list[int]:
    plan = run.images("_shards", "plan.json")
    if not exists(plan):
        raise FileNotFoundError(f"{run.root} is not a started run (no images/_shards/plan.json)")
    with fsspec.open(plan, "r") as f:
        return list(range(json.load(f)["shards"]))


def _rows(run: RunDir, folder: str, shards: list[int], columns: list[str]) -> list[dict] | None:
    """Rows of one stage folder (the shards it has finished), or None when it has none."""
    out, found = [], False
    for s in shards:
        p = run.path(folder, f"{shard_name(s)}.parquet")
        if exists(p):
            found = True
            t = read_table(p)
            out += t.select([c for c in columns if c in t.column_names]).to_pylist()
    return out if found else None


def _spread(items: list, n: int) -> list:
    """n items spread evenly over a list (all of them when n <= 0 or the list is shorter), in order."""
    if n <= 0 or len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def _done(run: RunDir, folder: str, shards: list[int]) -> int:
    return sum(exists(run.path(folder, f"{shard_name(s)}.parquet")) for s in shards)


class Ctx:
    """What the section builders share: the run, its shards, the output folder and the figures written."""

    def __init__(self, run: RunDir, shards: list[int], stat_shards: int = 0):
        self.run, self.img = run, run.report("img")
        self.shards = shards
        self.sample = _spread(shards, stat_shards)  # the shards statistics are read from
        self.images_written: list[str] = []
        self.counts: dict = {}
        self.status: dict | None = None

    def glob(self, pattern: str) -> list[str]:
        """Openable paths of the run's files matching a pattern relative to the run."""
        return self.run.glob(pattern)

    def save_fig(self, fig, name: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return self._written(name, buf)

    def save_pil(self, im, name: str) -> str:
        buf = io.BytesIO()
        if name.endswith(".jpg"):
            im.convert("RGB").save(buf, format="JPEG", quality=88)
        else:
            im.save(buf, format="PNG")
        return self._written(name, buf)

    def _written(self, name: str, buf: io.BytesIO) -> str:
        """The figure goes straight to RUN/report/img/ (a local folder or any fsspec URL)."""
        fs, p = fsspec.core.url_to_fs(f"{self.img}/{name}")
        fs.pipe_file(p, buf.getvalue())
        rel = f"img/{name}"
        self.images_written.append(rel)
        return rel


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _int_bins(values) -> np.ndarray:
    lo, hi = int(min(values)), int(max(values))
    return np.arange(lo, hi + 2) - 0.5


# ---------------------------------------------------------------- sections

def sec_overview(c: Ctx) -> str:
    from .status import run_status

    st = run_status(c.run)
    c.status = st
    snap = c.run.load_snapshot() or {}
    caps = [f"{x.get('name')} ({x.get('backend')})" for x in snap.get("captioners") or []]
    sampled = (f"{len(c.sample)} of {len(c.shards)} shards, spread over the run" if len(c.sample) < len(c.shards)
               else f"all {len(c.shards)} shards")
    parts = [H.table(None, [["run directory", c.run.root], ["shards", st["shards"]], ["input URLs", st["urls"]],
                            ["configured stages", ", ".join((snap.get("run") or {}).get("stages") or [])],
                            ["captioners", ", ".join(caps)],
                            ["training", (snap.get("train") or {}).get("model") or "not configured"],
                            ["statistics (captions, quality, regions) from", sampled]], tid="run")]
    rows = []
    for stage, info in st["stages"].items():
        rows.append([stage, info["shards_done"], info["shards_failed"], info["shards_pending"],
                     "; ".join(f"{k}: {v}" for k, v in info["rows"].items())])
    parts.append("<h3>Stages</h3>")
    parts.append(H.table(["stage", "shards done", "failed", "pending", "rows by outcome"], rows, tid="stages"))
    failed = {f"{stage} {name}": err for stage, info in st["stages"].items() for name, err in info["failed"].items()}
    if failed:
        parts.append(H.table(["failed shard", "error"], [[k, v[:300]] for k, v in failed.items()]))
    return "\n".join(parts)


def sec_accounting(c: Ctx) -> str:
    st = c.status
    if st is None:
        from .status import run_status

        st = c.status = run_status(c.run)
    acc = st["accounting"]
    total = sum(acc.values())
    mark = (f'<span class="ok">all {st["urls"]} accounted for</span>' if st["accounted"]
            else f'<span class="bad">MISMATCH: {total} of {st["urls"]}</span>')
    parts = [f"<p>Every URL of the input list, by what the download stage made of it: {mark}.</p>",
             H.table(["outcome", "URLs"], [[k, v] for k, v in acc.items()], tid="accounting", total=["total", total])]
    if acc:
        fig = _figure(6.5, 0.35 * len(acc) + 1.0)
        ax = fig.subplots()
        names = list(acc)[::-1]
        ax.barh(names, [acc[n] for n in names], color=["#3cb44b" if n == "ok" else "#e6194b" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("URLs (log scale)")
        parts.append(H.fig(c.save_fig(fig, "accounting.png"), "input URLs by outcome"))
    return "\n".join(parts)


def sec_dedup(c: Ctx) -> str:
    """Duplicates and contamination (the dedup stage) and repeated captions (export)."""
    st = c.status
    if st is None:
        from .status import run_status

        st = c.status = run_status(c.run)
    parts = []
    d = st.get("dedup")
    if d is None:
        parts.append("<p>No dedup stage in this run (config section <code>dedup</code>): duplicates and "
                     "evaluation images were not looked for.</p>")
    else:
        rows = [["kept", d["kept"]]] + [[f"duplicate: {k}", v] for k, v in d["duplicates"].items()]
        rows += [[f"contaminated: {k}", v] for k, v in d["contaminated"].items()]
        rows += [["no image", d["no_image"]]]
        parts.append("<p>Every key of the downloaded shards, by what the dedup stage made of it; export leaves "
                     "duplicates and contaminated keys out (their reasons are in <code>export/&lt;shard&gt;.parquet"
                     "</code>).</p>")
        parts.append(H.table(["outcome", "keys"], rows, tid="dedup"))
        sets = {k: v for k, v in d["contaminated"].items()}
        parts.append(H.table(["evaluation set", "contaminated training images"], [[k, v] for k, v in sets.items()]
                             or [["(none configured or none found)", 0]], tid="contamination"))
    r = st.get("repeated_captions")
    if r is not None:
        parts.append(f"<p>Repeated captions: {r['texts']} caption text(s) on {r['min_images']} or more exported "
                     f"images each ({r['images']} images; <code>export/repeated_captions.json</code>).</p>")
    return "\n".join(parts)


def _captioner_of(r: dict) -> str:
    return str(r.get("captioner"))


def sec_captions(c: Ctx) -> str:
    caps = _rows(c.run, "captions", c.sample, ["captioner", "prompt_id", "text", "status"])
    sents = _rows(c.run, "sentences", c.sample, ["captioner", "n_sentences", "n_words", "status", "excluded"])
    if caps is None and sents is None:
        return H.not_run("no captions/ or sentences/ in this run")
    parts = []
    words, nsent = defaultdict(list), defaultdict(list)
    table = defaultdict(Counter)
    for r in caps or []:
        name = _captioner_of(r)
        table[name]["captions"] += 1
        table[name]["ok" if r["status"] == "ok" else "not ok"] += 1
        if r["status"] == "ok" and sents is None:
            words[name].append(len((r["text"] or "").split()))
    for r in sents or []:
        name = _captioner_of(r)
        if r["status"] == "ok":
            words[name].append(r["n_words"] or 0)
            nsent[name].append(r["n_sentences"] or 0)
            table[name]["excluded"] += bool(r.get("excluded"))
    names = sorted(table)
    rows = []
    for n in names:
        t = table[n]
        rows.append([n, t["captions"] if caps is not None else None, t["ok"] if caps is not None else None,
                     t["not ok"] if caps is not None else None, t["excluded"] if sents is not None else None,
                     float(np.mean(words[n])) if words[n] else None, float(np.mean(nsent[n])) if nsent[n] else None])
    parts.append(H.table(["captioner", "caption rows", "ok", "not ok", "excluded by quality", "mean words",
                          "mean sentences"], rows, tid="captioners"))
    if sents is None:
        parts.append(H.not_run("sentences stage (no sentences/): sentences per caption unknown"))
    drawn = [n for n in names if words[n]]
    if drawn:
        fig = _figure(9, 2.4 * len(drawn) + 0.4)
        axes = fig.subplots(len(drawn), 2, squeeze=False)
        for i, n in enumerate(drawn):
            a, b = axes[i]
            a.hist(words[n], bins=min(40, max(5, len(set(words[n])))), color="#4363d8")
            a.set_title(f"{n}: caption length (words), n={len(words[n])}", fontsize=9)
            a.set_xlabel("words")
            a.set_ylabel("captions")
            if nsent[n]:
                b.hist(nsent[n], bins=_int_bins(nsent[n]), color="#f58231", rwidth=0.85)
                b.set_title(f"{n}: sentences per caption", fontsize=9)
                b.set_xlabel("sentences")
            else:
                b.set_axis_off()
                b.text(0.5, 0.5, "sentences not run", ha="center", va="center")
        parts.append(H.fig(c.save_fig(fig, "captions.png"), "caption length and sentences per caption"))
    c.counts["captioners"] = names
    return "\n".join(parts)


def sec_quality(c: Ctx) -> str:
    sents = _rows(c.run, "sentences", c.sample, ["captioner", "flags", "exclude_reasons", "stripped", "status"])
    if sents is None:
        return H.not_run("no sentences/ in this run (quality flags are raised by the sentences stage)")
    flags, excl, stripped, total = defaultdict(Counter), defaultdict(Counter), defaultdict(Counter), Counter()
    for r in sents:
        if r["status"] != "ok":
            continue
        n = _captioner_of(r)
        total[n] += 1
        for f in r.get("flags") or []:
            flags[n][f] += 1
        for f in r.get("exclude_reasons") or []:
            excl[n][f.split(":")[0]] += 1
        for f in r.get("stripped") or []:
            stripped[n][str(f).split(":")[0]] += 1
    names = sorted(total)
    parts = [f"<p>Captions checked: {sum(total.values())}. A flag's action (keep, strip, exclude) comes from "
             "<code>sentences.quality.actions</code>.</p>"]
    all_flags = sorted({f for n in names for f in flags[n]})
    rows = [[f] + [flags[n][f] for n in names] + [sum(flags[n][f] for n in names)] for f in all_flags]
    parts.append("<h3>Flags raised</h3>")
    parts.append(H.table(["flag"] + names + ["all"], rows, tid="flags",
                         total=["captions checked"] + [total[n] for n in names] + [sum(total.values())])
                 if rows else "<p>No caption raised a flag.</p>")
    all_ex = sorted({f for n in names for f in excl[n]})
    if all_ex:
        parts.append("<h3>Excluded, by reason</h3>")
        parts.append(H.table(["reason"] + names, [[f] + [excl[n][f] for n in names] for f in all_ex], tid="excluded"))
    all_st = sorted({f for n in names for f in stripped[n]})
    if all_st:
        parts.append("<h3>Stripped, by what</h3>")
        parts.append(H.table(["stripped"] + names, [[f] + [stripped[n][f] for n in names] for f in all_st]))
    return "\n".join(parts)


def _region_stages(c: Ctx) -> list[tuple[str, str]]:
    out = []
    for folder, label in (("regions", "regions/ (pipeline scorer)"), ("regions-caft", "regions-caft/ (trained CAFT)")):
        if _done(c.run, folder, c.shards):
            out.append((folder, label))
    if exists(c.run.selftrain()):  # `longcap selftrain`'s rounds, last: the gallery shows the last one
        try:
            rounds = _read_json(c.run.selftrain()).get("rounds", [])
        except (OSError, ValueError) as e:
            log.warning("report: %s unreadable: %s", c.run.selftrain(), e)
            rounds = []
        for e in rounds:
            folder = f"selftrain/round-{e['round']}/regions"
            if _done(c.run, folder, c.shards):
                out.append((folder, f"{folder}/ (self-training round {e['round']}: {e['kind']}, {e['model']})"))
    return out


def sec_regions(c: Ctx) -> str:
    stages = _region_stages(c)
    if not stages:
        return H.not_run("no regions/ in this run (regions stage not configured or not done)")
    parts, rows = [], []
    fig = _figure(10, 2.6 * len(stages) + 0.4)
    axes = fig.subplots(len(stages), 2, squeeze=False)
    for i, (folder, label) in enumerate(stages):
        data = _rows(c.run, folder, c.sample, ["key", "regions", "matches", "status"]) or []
        ok = [r for r in data if r["status"] == "ok" and r["regions"] is not None]
        per_image = [len(r["regions"]) for r in ok]
        sources = Counter((g["source"] or "?").split(":")[0] for r in ok for g in r["regions"])
        kept = [m["score"] for r in ok for m in r["matches"] or [] if m["kept"] and m["score"] is not None]
        dropped = [m["score"] for r in ok for m in r["matches"] or [] if not m["kept"] and m["score"] is not None]
        n_sent = sum(len(r["matches"] or []) for r in ok)
        rows.append([label, len(data), len(ok), sum(per_image), float(np.mean(per_image)) if per_image else None,
                     ", ".join(f"{k} {v}" for k, v in sorted(sources.items())), n_sent, len(kept)])
        a, b = axes[i]
        if per_image:
            a.hist(per_image, bins=_int_bins(per_image), color="#469990", rwidth=0.85)
        a.set_title(f"{label}: regions per image", fontsize=9)
        a.set_xlabel("regions")
        a.set_ylabel("images")
        if kept or dropped:
            lo, hi = min(kept + dropped), max(kept + dropped)
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 31)
            b.hist([kept, dropped], bins=bins, stacked=True, color=["#3cb44b", "#bbbbbb"],
                   label=[f"kept pair ({len(kept)})", f"not kept ({len(dropped)})"])
            b.legend(fontsize=8)
        b.set_title(f"{label}: best-region score per sentence", fontsize=9)
        b.set_xlabel("score")
    parts.append(H.table(["regions from", "rows", "images with regions", "regions", "per image", "boxes by source",
                          "sentences", "pairs kept"], rows, tid="regions"))
    parts.append(H.fig(c.save_fig(fig, "regions.png"), "regions per image and pair scores"))
    return "\n".join(parts)


def _image_bytes(run: RunDir, shard: int, keys: set[str]) -> dict[str, bytes]:
    """The jpg of each key from the download stage's tar of a shard."""
    out = {}
    with fsspec.open(run.images(f"{shard_name(shard)}.tar"), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            stem, _, ext = m.name.rpartition(".")
            if ext == "jpg" and stem in keys:
                out[stem] = tar.extractfile(m).read()
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def sec_gallery(c: Ctx, n: int) -> str:
    from PIL import ImageDraw

    from pipeline.images import decode_image

    stages = _region_stages(c)
    if not stages:
        c.counts["gallery"] = 0
        return H.not_run("no regions/ in this run: no boxes or matched sentences to show")
    folder, label = stages[-1]  # the last self-training round, else regions-caft when the run has it
    cands = []
    done = [s for s in c.shards if exists(c.run.path(folder, f"{shard_name(s)}.parquet"))]
    for s in _spread(done, n):  # at most n shards are read
        for r in read_table(c.run.path(folder, f"{shard_name(s)}.parquet"),
                            ["key", "regions", "matches", "status"]).to_pylist():
            if r["status"] == "ok" and r["regions"] and r["matches"]:
                cands.append((s, r))
    with_pairs = [x for x in cands if any(m["kept"] for m in x[1]["matches"])]
    pool = with_pairs if len(with_pairs) >= n else cands
    chosen = _spread(pool, n)  # spread over the run, deterministic
    by_shard = defaultdict(set)
    for s, r in chosen:
        by_shard[s].add(r["key"])
    data = {}
    for s, keys in by_shard.items():
        data.update(_image_bytes(c.run, s, keys))
    cards = []
    for s, r in chosen:
        if r["key"] not in data:
            continue
        try:
            im = decode_image(data[r["key"]], MAX_PIXELS)
        except Exception as e:  # noqa: BLE001 - a bad image costs only its card
            log.warning("report: gallery image %s skipped: %s", r["key"], e)
            continue
        scale = 384 / max(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)))
        w, h = im.size
        draw = ImageDraw.Draw(im)
        items = []
        for j, m in enumerate(r["matches"]):
            colour = PALETTE[j % len(PALETTE)]
            text = H.esc(m["sentence"])
            if m["kept"] and m["region"] is not None and 0 <= m["region"] < len(r["regions"]):
                g = r["regions"][m["region"]]
                x0, y0, x1, y1 = g["box"]
                draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=colour, width=3)
                items.append(f'<li><span class="swatch" style="background:{colour}"></span>{text} '
                             f'<span class="note">[{H.esc(g["source"])}, {H.esc(H.fmt(m["score"]))}]</span></li>')
            else:
                items.append(f'<li class="unpaired"><span class="swatch" style="background:#fff"></span>{text} '
                             '<span class="note">[no region kept]</span></li>')
        src = c.save_pil(im, f"gallery-{_safe(r['key'])}.jpg")
        n_kept = sum(bool(m["kept"]) for m in r["matches"])
        cards.append(f'<div class="card gallery-item"><img src="{H.esc(src)}" alt="{H.esc(r["key"])}">'
                     f'<div><b>{H.esc(r["key"])}</b> <span class="note">shard {shard_name(s)}, '
                     f'{len(r["regions"])} regions, {n_kept} of {len(r["matches"])} sentences paired</span></div>'
                     f'<ol>{"".join(items)}</ol></div>')
    c.counts["gallery"] = len(cards)
    if not cards:
        return H.not_run(f"{folder}/ has no image with regions and sentences")
    return (f"<p>{len(cards)} images from {H.esc(label)}; each kept pair's box has its sentence's colour; "
            "grey sentences kept no region.</p>" f'<div class="gallery">{"".join(cards)}</div>')


def _models(c: Ctx) -> list[str]:
    """Training folders in models/ (openable paths): those with metrics.jsonl or a checkpoint."""
    found = {f.rsplit("/", 1)[0] for f in c.glob("models/*/metrics.jsonl") + c.glob("models/*/latest")}
    return sorted(found)


def _base(folder: str) -> str:
    return folder.rstrip("/").rsplit("/", 1)[-1]


def _metrics(folder: str) -> list[dict]:
    p = f"{folder}/metrics.jsonl"
    if not exists(p):
        return []
    out = []
    with fsspec.open(p, "r") as f:
        text = f.read()
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed writer
    return out


def _eval_samples(c: Ctx, n: int) -> list[tuple[str, object, list[str]]]:
    """(key, PIL image, sentences of its longest caption) of n export samples, the test split first."""
    import webdataset as wds

    from pipeline.images import decode_image

    tars = c.glob("export/*.tar")
    if not tars:
        return []
    test, other = [], []
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError):
            continue
        caps = [x for x in meta.get("captions", []) if x.get("sentences")]
        if not caps or "jpg" not in sample:
            continue
        sents = max(caps, key=lambda x: len(x["sentences"]))["sentences"]
        target = test if (meta.get("extra") or {}).get("split") == "test" else other
        if len(target) < n:
            try:
                target.append((sample["__key__"], decode_image(sample["jpg"], MAX_PIXELS), sents))
            except Exception as e:  # noqa: BLE001 - a bad image costs only itself
                log.warning("report: skipped %s: %s", sample.get("__key__"), e)
        if len(test) >= n:
            break
    return (test + other)[:n]


def sec_heatmaps(c: Ctx, n_images: int, n_texts: int = 3) -> str:
    from model.checkpoint import load_model
    from model.grounding import cannot_ground

    models = [m for m in _models(c) if exists(f"{m}/latest")]
    c.counts["heatmaps"] = 0
    if not models:
        return H.not_run("no trained model in models/ (training not run)")
    samples = _eval_samples(c, n_images)
    if not samples:
        return H.not_run("no export shards with captions to ground")
    parts = []
    for folder in models:
        try:
            model = load_model(folder)
        except Exception as e:  # noqa: BLE001 - a broken checkpoint is said, not fatal to the report
            parts.append(f'<p class="bad">{H.esc(_base(folder))}: cannot load: {H.esc(e)}</p>')
            continue
        why = cannot_ground(model)
        if why:
            parts.append(f"<p>{H.esc(_base(folder))}: no heat maps: {H.esc(why)}</p>")
            continue
        size = checkpoint_image_size(folder)
        parts.append(f"<h3>{H.esc(_base(folder))} <span class='note'>step {model.trained_steps}, "
                     f"input {size}px</span></h3>")
        for key, im, sents in samples:
            texts = sents[:n_texts]
            try:
                overlays = ground_images(model, im, texts, size)
            except Exception as e:  # noqa: BLE001 - said under this model; the other models still drawn
                parts.append(f'<p class="bad">{H.esc(_base(folder))}: cannot ground {H.esc(key)}: {H.esc(e)}</p>')
                continue
            thumb = im.copy()
            thumb.thumbnail((256, 256))
            cells = [f'<div class="card small"><img src="{H.esc(c.save_pil(thumb, f"heat-{_safe(_base(folder))}-{_safe(key)}.jpg"))}"'
                     f' alt="{H.esc(key)}"><div><b>{H.esc(key)}</b> (image)</div></div>']
            for j, (t, ov) in enumerate(zip(texts, overlays)):
                ov.thumbnail((256, 256))
                src = c.save_pil(ov, f"heat-{_safe(_base(folder))}-{_safe(key)}-{j}.png")
                cells.append(f'<div class="card small heatmap"><img src="{H.esc(src)}" alt="heat map">'
                             f"<div>{H.esc(t)}</div></div>")
                c.counts["heatmaps"] += 1
            parts.append(f'<div class="gallery">{"".join(cells)}</div>')
    parts.insert(0, "<p>Each sub-caption's attention over the part-level segments, painted back to pixels (blue low, "
                 "red high); the white outline is its Otsu mask. Images from the export's test split where it has "
                 "one.</p>")
    return "\n".join(parts)


def sec_training(c: Ctx) -> str:
    models = _models(c)
    curves = [(m, [r for r in _metrics(m) if "loss" in r]) for m in models]
    curves = [(m, rows) for m, rows in curves if rows]
    if not curves:
        return H.not_run("no models/*/metrics.jsonl in this run (training not run)")
    parts = []
    for folder, rows in curves:
        steps = [r["step"] for r in rows]
        losses = ("loss", "whole", "part",  # CAFT; GOAL; grouping
                  "global", "local", "tsl_image", "tsl_text", "contrastive", "recon")
        panels = [("loss", [k for k in losses if any(k in r for r in rows)]),
                  ("learning rate", [k for k in ("lr",) if any(k in r for r in rows)]),
                  ("logit scale", [k for k in ("scale_whole", "scale_part", "scale") if any(k in r for r in rows)]),
                  ("throughput", [k for k in ("samples_per_s",) if any(k in r for r in rows)])]
        panels = [(t, ks) for t, ks in panels if ks]
        fig = _figure(3.2 * len(panels), 2.8)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, keys) in zip(axes, panels):
            for k in keys:
                ax.plot(steps, [r.get(k, np.nan) for r in rows], marker="." if len(rows) < 30 else None, label=k)
            ax.set_title(f"{_base(folder)}: {title}", fontsize=9)
            ax.set_xlabel("step")
            if len(keys) > 1:
                ax.legend(fontsize=8)
        parts.append(f"<h3>{H.esc(_base(folder))}</h3>")
        parts.append(H.fig(c.save_fig(fig, f"train-{_safe(_base(folder))}.png"), f"training curves of {_base(folder)}"))
        last = {k: v for k, v in rows[-1].items() if k != "time"}
        parts.append(H.table(list(last), [list(last.values())]))
    return "\n".join(parts)


def _read_json(path: str):
    with fsspec.open(path, "r") as f:
        return json.load(f)


def sec_evaluation(c: Ctx) -> str:
    parts, found = [], 0
    # (a) evaluations written during training
    for folder in _models(c):
        evals = [r for r in _metrics(folder) if "eval" in r]
        for r in evals:
            found += 1
            parts.append(f"<h3>Training evaluation: {H.esc(_base(folder))}, step {H.esc(r.get('step'))}</h3>")
            parts.append(H.generic(r["eval"]))
    def read(p):  # a bad file costs only its own entry
        try:
            return _read_json(p)
        except (OSError, ValueError) as e:
            parts.append(f'<p class="bad">{H.esc(p)}: unreadable: {H.esc(e)}</p>')
            return None

    # (b) eval-pairs reports
    for p in c.glob("report/eval_pairs*.json"):
        found += 1
        rep = read(p)
        if rep is not None:
            parts.append(f"<h3>Local pairs against the synthetic truth ({H.esc(Path(p).name)})</h3>")
            parts.append(H.generic(rep))
    # (c) `longcap eval` results
    for p in c.glob("eval/*.json"):
        found += 1
        rep = read(p)
        if rep is None:
            continue
        title = (" · ".join(str(rep.get(k)) for k in ("dataset", "model") if rep.get(k)) if isinstance(rep, dict)
                 else "") or Path(p).stem
        parts.append(f"<h3>Evaluation: {H.esc(title)} <span class='note'>{H.esc(Path(p).name)}</span></h3>")
        if isinstance(rep, dict) and rep.get("checkpoint"):
            parts.append(f"<p class='note'>checkpoint <code>{H.esc(rep['checkpoint'])}</code></p>")
            rep = {k: v for k, v in rep.items() if k not in ("dataset", "model", "checkpoint")}
        parts.append(H.generic(rep))
    # (d) the ablation table
    abl = c.run.path("ablation.json")
    if exists(abl):
        found += 1
        rep = read(abl)
        parts.append("<h3>Ablation</h3>")
        if rep is None:
            pass
        elif isinstance(rep, dict) and isinstance(rep.get("rows"), list):
            parts.append(H.generic(rep["rows"]))
            rest = {k: v for k, v in rep.items() if k != "rows"}
            if rest:
                parts.append(H.generic(rest))
        else:
            parts.append(H.generic(rep))
    if not found:
        return H.not_run("no evaluation results (models/*/metrics.jsonl eval rows, report/eval_pairs.json, "
                         "eval/*.json, ablation.json)")
    return "\n".join(parts)


# ---------------------------------------------------------------- the report

def write_report(root: str, gallery: int = 8, heat_images: int = 3, stat_shards: int = 0) -> dict:
    """Write RUN/report/index.html and its figures; returns the path and what was drawn.

    stat_shards > 0: the statistics sections read that many shards spread over the run (large runs); the URL
    accounting always covers every shard."""
    run = RunDir(root)
    shards = _shards(run)  # before anything is written: a folder that is not a run is refused untouched
    img = run.fs._strip_protocol(run.report("img"))
    if run.fs.exists(img):
        run.fs.rm(img, recursive=True)  # only the report writes img/; figures of an earlier report go
    run.fs.makedirs(img, exist_ok=True)
    c = Ctx(run, shards, stat_shards)
    builders = [("overview", "Run", sec_overview),
                ("accounting", "Input URLs", sec_accounting),
                ("dedup", "Duplicates and contamination", sec_dedup),
                ("captions", "Captions", sec_captions),
                ("quality", "Quality flags", sec_quality),
                ("regions", "Regions and pairs", sec_regions),
                ("gallery", "Gallery", lambda c: sec_gallery(c, gallery)),
                ("heatmaps", "Grounding heat maps", lambda c: sec_heatmaps(c, heat_images)),
                ("training", "Training", sec_training),
                ("evaluation", "Evaluation", sec_evaluation)]
    sections, not_run, failed = [], [], []
    for sid, title, fn in builders:
        try:
            body = fn(c)
        except Exception as e:  # noqa: BLE001 - one unreadable stage costs its section, not the report
            log.exception("report section %s failed", sid)
            failed.append(sid)
            body = f'<p class="bad">section failed: {H.esc(type(e).__name__)}: {H.esc(e)}</p>'
        if 'class="notrun"' in body:
            not_run.append(sid)
        sections.append((sid, title, body))
    page = H.page(f"longcap report: {_base(run.root)}",
                  f"{run.root} · written {time.strftime('%Y-%m-%d %H:%M:%S')}", sections)
    index = run.report("index.html")
    atomic_write_bytes(index, page.encode())
    return {"index": index, "images": c.images_written, "gallery": c.counts.get("gallery", 0),
            "heatmaps": c.counts.get("heatmaps", 0), "not_run": not_run, "failed": failed}


# ---------------------------------------------------------------- commands

def cmd_report(args) -> int:
    res = write_report(args.run, gallery=args.gallery, heat_images=args.heat_images, stat_shards=args.stat_shards)
    print(f"report: {res['index']}")
    print(f"  {len(res['images'])} figures, {res['gallery']} gallery images, {res['heatmaps']} heat maps"
          + (f"; not run: {', '.join(res['not_run'])}" if res["not_run"] else ""))
    if res["failed"]:
        print(f"  sections that failed (see the page): {', '.join(res['failed'])}")
        return 1
    return 0


def cmd_ground(args) -> int:
    from pipeline.config import ConfigError
    from model.checkpoint import load_model
    from model.grounding import cannot_ground

    if not args.checkpoint:
        raise ConfigError("ground: --checkpoint is required: a training folder (e.g. runs/demo/models/caft-tiny, its "
                          "latest checkpoint) or a model .safetensors file")
    image = open_image(args.image)
    model = load_model(args.checkpoint, args.device)
    why = cannot_ground(model)
    if why:
        raise ConfigError(f"ground: {args.checkpoint}: {why}")
    size = args.size or checkpoint_image_size(args.checkpoint)
    [overlay] = ground_images(model, image, [args.text], size, args.device)
    buf = io.BytesIO()
    overlay.save(buf, format="PNG")
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}: {overlay.width}x{overlay.height} heat map of {args.text!r} "
          f"({model.cfg.name}, step {model.trained_steps}, input {size}px)")
    return 0


def add_commands(sub) -> None:
    r = sub.add_parser("report", help="write RUN/report/index.html: accounting, statistics, gallery, heat maps, "
                                      "training curves, evaluations")
    r.add_argument("run")
    r.add_argument("--gallery", type=int, default=8, help="images in the gallery")
    r.add_argument("--heat-images", type=int, default=3, help="images with grounding heat maps (per model)")
    r.add_argument("--stat-shards", type=int, default=0,
                   help="statistics from this many shards spread over the run (default 0: all); accounting uses all")
    r.set_defaults(fn=cmd_report)

    g = sub.add_parser("ground", help="heat map PNG of a text over an image, from a trained CAFT checkpoint")
    g.add_argument("image", help="an image file (any fsspec path)")
    g.add_argument("text", help="the sub-caption to ground")
    g.add_argument("--checkpoint", help="a training folder (its latest checkpoint) or a model .safetensors")
    g.add_argument("--out", default="heat.png", help="the PNG to write (the image's size)")
    g.add_argument("--size", type=int, help="model input size (default: the checkpoint's training size, else 224)")
    g.add_argument("--device", default="cpu")
    g.set_defaults(fn=cmd_ground)
