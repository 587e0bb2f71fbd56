"""Readers for local copies of the long-caption retrieval benchmarks and the refer-style grounding sets.

Each reader takes the folder a dataset was unpacked into, in its published layout, and returns an
`EvalSet` (image paths, caption texts, the image of each text) or, for RefCOCO/+/g, `RefItem`s. Nothing
is fetched: a missing file is a `DatasetError` that names the path and the layout expected.

Layouts (what each reader expects under ROOT):
- dci:        densely_captioned_images/{splits.json, annotations/*.json, photos/*}; caption =
              short_caption + newline + extra_caption; split "all" (train+valid+test, 7,805 images, as
              the long-caption papers evaluate) or one of splits.json's keys.
- docci:      docci_descriptions.jsonlines (or annotations/docci_descriptions.jsonline[s]) and images/;
              rows with split == "test".
- urban-1k:   image/N.jpg and caption/N.txt (or images/), paired by N.
- sharegpt4v: share-captioner_coco_lcs_sam_1246k_1107.json (or --annotations) and the image paths it
              names, relative to ROOT; the first 1,000 / 10,000 entries; caption = the gpt turn.
- iiw:        {IIW-400, DCI_Test, DOCCI_Test}/data.jsonl with images in docci_aar/, dci/, docci/
              (ImageInWords' human-authored "IIW" descriptions).
- refcoco, refcoco+, refcocog: <name>/refs(<split_by>).p + <name>/instances.json (refer's layout;
              split_by unc, unc, google as SaG uses them, or --split-by),
              COCO train2014 images in images/mscoco/images/train2014 (or --images).
- fg-ovd-{hard,medium,easy,trivial,color,material,pattern,transparency}: the FG-OVD benchmarks
              (Bianchi et al., CVPR 2024, github lorebianchi98/FG-OVD, benchmarks/): 1_attributes.json
              (hard), 2_attributes.json (medium), 3_attributes.json (easy), shuffle_negatives.json
              (trivial), color/material/pattern/transparency.json, in benchmarks/ or ROOT itself; LVIS
              format (images, annotations with bbox [x,y,w,h] and neg_category_ids, categories whose name
              is the caption); COCO 2017 images under ROOT/coco (or --images), by file_name.
- coco-5k, flickr30k-1k: Karpathy's dataset_coco.json / dataset_flickr30k.json (split "test": 5,000 /
              1,000 images, 5 captions each, the "raw" sentences); images under ROOT/<filepath>/<filename>
              (COCO: val2014/...) or ROOT/flickr30k-images/<filename> (or --images).
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """A benchmark copy that cannot be read: the message names the file and what was expected."""


@dataclass
class EvalSet:
    name: str
    images: list[str]  # image file paths
    captions: list[str]  # one entry per text
    image_of_text: list[int]  # index into images
    notes: str = ""
    skipped: list[dict] = field(default_factory=list)  # {"item", "reason"} for entries not evaluated


@dataclass
class RefItem:
    image: str
    sentences: list[str]
    segmentation: object  # COCO polygons or RLE
    height: int
    width: int
    ref_id: int


@dataclass
class FgItem:
    """One FG-OVD annotation: the object's box in its image, its positive caption and the hard negatives."""
    image: str
    bbox: list[float]  # x, y, width, height (pixels)
    positive: str
    negatives: list[str]
    ann_id: int


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path} not found: expected {what}")
    return path


def _first(root: Path, names: list[str], what: str) -> Path:
    for n in names:
        if (root / n).exists():
            return root / n
    raise DatasetError(f"none of {[str(root / n) for n in names]} found: expected {what}")


def _json_lines(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path} line {i}: not JSON ({e.msg})") from None
    return rows


def _field(row: dict, key: str, where: str):
    if key not in row:
        raise DatasetError(f"{where}: no {key!r} field (fields: {sorted(row)})")
    return row[key]


def _build(name: str, pairs: list[tuple[str, str]], notes: str = "") -> EvalSet:
    """(image path, caption) pairs -> an EvalSet; the same image may carry several captions."""
    index: dict[str, int] = {}
    caps, of = [], []
    skipped = []
    for img, cap in pairs:
        if not isinstance(cap, str) or not cap.strip():
            skipped.append({"item": img, "reason": "empty caption"})
            continue
        of.append(index.setdefault(img, len(index)))
        caps.append(cap.strip())
    if not caps:
        raise DatasetError(f"{name}: no captions read")
    return EvalSet(name, list(index), caps, of, notes, skipped)


def read_dci(root: str | Path, split: str = "all") -> EvalSet:
    base = _need(Path(root) / "densely_captioned_images", "DCI's densely_captioned_images/ folder")
    splits = json.loads(_need(base / "splits.json", "DCI's splits.json").read_text())
    if split == "all":
        files = [f for part in splits.values() for f in part]
    elif split in splits:
        files = splits[split]
    else:
        raise DatasetError(f"DCI split {split!r} not in {base / 'splits.json'} (has: {', '.join(splits)}, or all)")
    pairs = []
    for f in files:
        path = _need(base / "annotations" / f, "a DCI annotation JSON listed in splits.json")
        anno = json.loads(path.read_text(encoding="utf-8"))
        cap = f"{_field(anno, 'short_caption', str(path))}\n{_field(anno, 'extra_caption', str(path))}"
        pairs.append((str(base / "photos" / _field(anno, "image", str(path))), cap))
    return _build(f"dci-{split}", pairs, "caption = short_caption + extra_caption")


def read_docci(root: str | Path, split: str = "test") -> EvalSet:
    root = Path(root)
    names = ["docci_descriptions.jsonlines", "docci_descriptions.jsonline",
             "annotations/docci_descriptions.jsonlines", "annotations/docci_descriptions.jsonline"]
    path = _first(root, names, "DOCCI's docci_descriptions.jsonlines")
    pairs = [(str(root / "images" / _field(r, "image_file", str(path))), _field(r, "description", str(path)))
             for r in _json_lines(path) if _field(r, "split", str(path)) == split]
    return _build(f"docci-{split}", pairs)


def read_urban1k(root: str | Path) -> EvalSet:
    root = Path(root)
    images = _first(root, ["image", "images"], "Urban-1k's image/ folder")
    captions = _need(root / "caption", "Urban-1k's caption/ folder")
    by_stem = {p.stem: p for p in images.iterdir() if p.is_file()}
    pairs = []
    for cap in sorted(captions.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
        img = by_stem.get(cap.stem)
        if img is None:
            raise DatasetError(f"{cap}: no image {cap.stem}.* in {images}")
        pairs.append((str(img), cap.read_text(encoding="utf-8")))
    return _build("urban-1k", pairs)


def read_sharegpt4v(root: str | Path, n: int, annotations: str | None = None) -> EvalSet:
    """The first n entries of ShareGPT4V's share-captioner file (the 1k/10k long-caption benchmarks)."""
    root = Path(root)
    path = Path(annotations) if annotations else _first(
        root, ["share-captioner_coco_lcs_sam_1246k_1107.json", "share4v_sam_10k.json"],
        "ShareGPT4V's share-captioner_coco_lcs_sam_1246k_1107.json")
    rows = json.loads(_need(path, "a ShareGPT4V annotation JSON").read_text(encoding="utf-8"))
    if len(rows) < n:
        raise DatasetError(f"{path} has {len(rows)} entries; sharegpt4v-{n // 1000}k needs {n}")
    pairs = []
    for i, r in enumerate(rows[:n]):
        turns = [t for t in _field(r, "conversations", f"{path} entry {i}") if t.get("from") == "gpt"]
        if not turns:
            raise DatasetError(f"{path} entry {i}: no gpt turn in conversations")
        pairs.append((str(root / _field(r, "image", f"{path} entry {i}")), turns[0]["value"]))
    return _build(f"sharegpt4v-{n // 1000}k", pairs, f"the first {n} entries of {path.name}")


KARPATHY = {"coco": ("dataset_coco.json", 5000), "flickr30k": ("dataset_flickr30k.json", 1000)}


def read_karpathy(root: str | Path, name: str, split: str = "test", images: str | None = None) -> EvalSet:
    """Karpathy's split file (FAST-GOAL's short-caption retrieval: MSCOCO 5k, Flickr30k 1k test images),
    every caption of an image kept (5 each), its "raw" text. COCO images at ROOT/<filepath>/<filename>,
    Flickr30k at ROOT/flickr30k-images/<filename>; --images replaces ROOT for the images."""
    root = Path(root)
    fname, expected = KARPATHY[name]
    path = _first(root, [fname, f"annotations/{fname}"], f"Karpathy's {fname}")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = [r for r in _field(data, "images", str(path)) if _field(r, "split", str(path)) == split]
    if not rows:
        raise DatasetError(f"{path}: no images in split {split!r}")
    img_root = Path(images) if images else root
    pairs = []
    for r in rows:
        where = f"{path} image {r.get('imgid', r.get('filename'))}"
        folder = r.get("filepath") or ("flickr30k-images" if name == "flickr30k" else "")
        img = str(img_root / folder / _field(r, "filename", where))
        for sent in _field(r, "sentences", where):
            pairs.append((img, _field(sent, "raw", where)))
    notes = f"Karpathy {split} split of {fname}: {len(rows)} images"
    if split == "test" and len(rows) != expected:
        notes += f" (the published split has {expected})"
    return _build(f"{name}-{split}", pairs, notes)


IIW_PARTS = {"IIW-400": "docci_aar", "DCI_Test": "dci", "DOCCI_Test": "docci"}


def read_iiw(root: str | Path) -> EvalSet:
    root = Path(root)
    pairs = []
    for part, images in IIW_PARTS.items():
        folder = next((d for d in (part, part.upper()) if (root / d).is_dir()), part)  # both spellings upstream
        path = _need(root / folder / "data.jsonl", f"ImageInWords' {part}/data.jsonl")
        for r in _json_lines(path):
            name = r.get("image") or _field(r, "image/key", str(path))
            name = name if Path(name).suffix else f"{name}.jpg"
            pairs.append((str(root / images / name), _field(r, "IIW", str(path))))
    return _build("iiw", pairs, "IIW-400 + DCI_Test + DOCCI_Test, human-authored IIW descriptions")


def retrieval_set(name: str, root: str, split: str | None = None, annotations: str | None = None,
                  images: str | None = None) -> EvalSet:
    if name == "dci":
        return read_dci(root, split or "all")
    if name == "docci":
        return read_docci(root, split or "test")
    if name == "urban-1k":
        return read_urban1k(root)
    if name in ("sharegpt4v-1k", "sharegpt4v-10k"):
        return read_sharegpt4v(root, 1000 if name.endswith("-1k") else 10_000, annotations)
    if name == "iiw":
        return read_iiw(root)
    if name == "coco-5k":
        return read_karpathy(root, "coco", split or "test", images)
    if name == "flickr30k-1k":
        return read_karpathy(root, "flickr30k", split or "test", images)
    raise DatasetError(f"unknown retrieval set {name!r}; known: {', '.join(RETRIEVAL_SETS)}")


RETRIEVAL_SETS = ("dci", "docci", "urban-1k", "sharegpt4v-1k", "sharegpt4v-10k", "iiw", "coco-5k", "flickr30k-1k")
# refer's split_by per set, as SaG builds its test data (build_batches.py: unc, unc+, and Gref = refcocog
# split by google); refcocog's umd split is one --split-by umd away
REFER_SETS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "google"}


class _PlainUnpickler(pickle.Unpickler):
    """refs(*.p) files hold only dicts, lists, strings and numbers: any class reference is refused."""

    def find_class(self, module, name):
        raise DatasetError(f"refusing to unpickle {module}.{name}: a refs file holds only plain data")


def load_refs(path: Path) -> list[dict]:
    data = _need(path, "refer's refs(<split_by>).p").read_bytes()
    try:
        refs = _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file is named, not a traceback
        raise DatasetError(f"{path}: not a refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise DatasetError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def read_refer(root: str | Path, name: str, split: str = "val", split_by: str | None = None,
               images: str | None = None) -> list[RefItem]:
    """RefCOCO/RefCOCO+/RefCOCOg refs of one split, each with its sentences and the referred mask."""
    if name not in REFER_SETS:
        raise DatasetError(f"unknown grounding set {name!r}; known: {', '.join(REFER_SETS)}")
    root = Path(root)
    folder = _need(root / name, f"refer's {name}/ folder")
    refs = load_refs(folder / f"refs({split_by or REFER_SETS[name]}).p")
    inst = json.loads(_need(folder / "instances.json", f"refer's {name}/instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    imgs = {i["id"]: i for i in inst["images"]}
    img_dir = Path(images) if images else root / "images" / "mscoco" / "images" / "train2014"
    out = []
    for r in refs:
        if r.get("split") != split:
            continue
        ann, im = anns.get(r["ann_id"]), imgs.get(r["image_id"])
        if ann is None or im is None:
            raise DatasetError(f"{folder}: ref {r.get('ref_id')} names annotation {r['ann_id']} / image "
                               f"{r['image_id']} that instances.json lacks")
        sents = [s.get("sent") or s.get("raw", "") for s in r.get("sentences", [])]
        out.append(RefItem(str(img_dir / im["file_name"]), [s for s in sents if s.strip()], ann["segmentation"],
                           im["height"], im["width"], r.get("ref_id", -1)))
    if not out:
        raise DatasetError(f"{folder}: no refs in split {split!r}")
    return out


def ref_mask(item: RefItem):
    """The referred object's mask [H,W] (bool numpy) from COCO polygons or RLE (pycocotools)."""
    from pycocotools import mask as cocomask

    seg = item.segmentation
    if isinstance(seg, list):  # polygons
        rles = cocomask.frPyObjects(seg, item.height, item.width)
        rle = cocomask.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = cocomask.frPyObjects(seg, item.height, item.width)
    else:
        rle = seg
    return cocomask.decode(rle).astype(bool)


FGOVD_SETS = {"fg-ovd-hard": "1_attributes.json", "fg-ovd-medium": "2_attributes.json",
              "fg-ovd-easy": "3_attributes.json", "fg-ovd-trivial": "shuffle_negatives.json",
              "fg-ovd-color": "color.json", "fg-ovd-material": "material.json", "fg-ovd-pattern": "pattern.json",
              "fg-ovd-transparency": "transparency.json"}


def _coco_image(img_root: Path, file_name: str) -> str:
    """A COCO 2017 image by the benchmark's file_name, with or without its train2017/ or val2017/ folder."""
    for cand in (img_root / file_name, img_root / "val2017" / Path(file_name).name,
                 img_root / "train2017" / Path(file_name).name):
        if cand.exists():
            return str(cand)
    return str(img_root / file_name)  # missing: the evaluation records it as an unreadable image


def read_fgovd(root: str | Path, name: str, images: str | None = None, n_neg: int = 10) -> tuple[list[FgItem],
                                                                                                  list[dict]]:
    """One FG-OVD benchmark: every annotation with at least n_neg negative captions (the benchmark's own
    filter in its ranking code, NoctOWL/eval/fg-ovd/ranks.py), its first n_neg negatives kept. Returns the
    items and the annotations left out, with the reason."""
    if name not in FGOVD_SETS:
        raise DatasetError(f"unknown FG-OVD benchmark {name!r}; known: {', '.join(FGOVD_SETS)}")
    root = Path(root)
    fname = FGOVD_SETS[name]
    path = _first(root, [f"benchmarks/{fname}", fname], f"FG-OVD's {fname} (the repository's benchmarks/ folder)")
    data = json.loads(path.read_text(encoding="utf-8"))
    cats = {c["id"]: c["name"] for c in _field(data, "categories", str(path))}
    imgs = {i["id"]: i for i in _field(data, "images", str(path))}
    img_root = Path(images) if images else root / "coco"
    items, left = [], []
    for a in _field(data, "annotations", str(path)):
        where = f"{path} annotation {a.get('id')}"
        negs = _field(a, "neg_category_ids", where)
        if len(negs) < n_neg:
            left.append({"item": f"annotation {a.get('id')}", "reason": f"{len(negs)} negatives < {n_neg}"})
            continue
        ids = [_field(a, "category_id", where), *negs[:n_neg]]
        missing = [c for c in ids if c not in cats]
        im = imgs.get(_field(a, "image_id", where))
        if missing or im is None:
            raise DatasetError(f"{where}: names categories {missing} / image {a['image_id']} that the file lacks")
        x, y, w, h = _field(a, "bbox", where)
        items.append(FgItem(_coco_image(img_root, im["file_name"]), [x, y, w, h], cats[ids[0]],
                            [cats[c] for c in ids[1:]], a.get("id", -1)))
    if not items:
        raise DatasetError(f"{path}: no annotation with {n_neg} negatives")
    return items, left
