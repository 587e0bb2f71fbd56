"""The synthetic world: scenes of simple shapes with exact long captions.

Each scene has 2-4 objects on a 3x3 grid (shape, colour, size, texture, an
optional printed digit) on a plain background. Its caption has one sentence
per object, one for the background and one or two relation sentences, in a
seeded order. Every sentence carries the box and mask of what it describes;
every noun phrase carries its character and word-token span. Scenes come in
families whose variants differ from the base in exactly one detail.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from .storage import atomic_write_table

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (245, 130, 20),
    "pink": (240, 120, 185),
}
SIZES = {"small": 0.45, "large": 0.82}  # fraction of the grid cell
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "white": (248, 248, 248),
    "light gray": (205, 205, 205),
    "light blue": (200, 222, 245),
    "beige": (238, 226, 196),
    "pale green": (208, 236, 204),
}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
ATTRS = ("shape", "colour", "size", "texture", "digit", "cell")
DETAILS = ATTRS + ("background",)
WORD_RE = re.compile(r"\w+|[^\w\s]")


def cell_name(cell: int) -> str:
    r, c = divmod(cell, 3)
    if r == 1 and c == 1:
        return "center"
    if r == 1:
        return f"middle {COLS[c]}"
    if c == 1:
        return f"{ROWS[r]} center"
    return f"{ROWS[r]} {COLS[c]}"


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    texture: str
    digit: int | None
    cell: int
    jitter: tuple[float, float] = (0.0, 0.0)  # offset inside the cell, fraction of free room

    def noun(self) -> str:
        """The short reference used in relation sentences ('the red circle')."""
        return f"the {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    relations: tuple[tuple[int, int], ...]  # object index pairs
    order_seed: int  # sentence order and templates (shared by a family)
    diff: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------- sampling


def _random_object(rng: random.Random, cell: int, taken: set[tuple[str, str]]) -> Obj:
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if (colour, shape) not in taken:
            break
    digit = rng.choice([None, None] + list(range(10)))
    return Obj(
        shape=shape,
        colour=colour,
        size=rng.choice(list(SIZES)),
        texture=rng.choice(TEXTURES),
        digit=digit,
        cell=cell,
        jitter=(rng.uniform(-1, 1), rng.uniform(-1, 1)),
    )


def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(2, 4)
    cells = rng.sample(range(9), n)
    objs: list[Obj] = []
    for cell in cells:
        objs.append(_random_object(rng, cell, {(o.colour, o.shape) for o in objs}))
    pairs = [(i, j) for i in range(n) for j in range(n) if i < j]
    relations = tuple(rng.sample(pairs, min(len(pairs), rng.randint(1, 2))))
    return Scene(tuple(objs), rng.choice(list(BACKGROUNDS)), relations, rng.randrange(2**31))


def vary(scene: Scene, rng: random.Random) -> Scene:
    """A copy of `scene` that differs in exactly one detail."""
    detail = rng.choice(DETAILS)
    if detail == "background":
        new = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        return replace(scene, background=new, diff={"detail": "background", "from": scene.background, "to": new})
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    others = [o for k, o in enumerate(scene.objects) if k != i]
    if detail == "cell":
        choices = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
    elif detail == "digit":
        choices = [d for d in [None] + list(range(10)) if d != obj.digit]
    else:
        pool = {"shape": SHAPES, "colour": list(COLOURS), "size": list(SIZES), "texture": TEXTURES}[detail]
        choices = [v for v in pool if v != getattr(obj, detail)]
        if detail in ("shape", "colour"):  # keep (colour, shape) unique for relation sentences
            taken = {(o.colour, o.shape) for o in others}
            key = (lambda v: (v, obj.shape)) if detail == "colour" else (lambda v: (obj.colour, v))
            choices = [v for v in choices if key(v) not in taken]
    if not choices:
        return vary(scene, rng)
    new_val = rng.choice(choices)
    objs = list(scene.objects)
    objs[i] = replace(obj, **{detail: new_val})
    diff = {"detail": detail, "object": i, "from": getattr(obj, detail), "to": new_val}
    return replace(scene, objects=tuple(objs), diff=diff)


# ---------------------------------------------------------------- text


def _object_phrase(o: Obj) -> str:
    texture = "" if o.texture == "plain" else f"{o.texture} "
    return f"a {o.size} {o.colour} {texture}{o.shape}"


def _relation_word(a: Obj, b: Obj) -> str:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    if ca != cb:
        return "to the left of" if ca < cb else "to the right of"
    return "above" if ra < rb else "below"


def sentences(scene: Scene) -> list[dict]:
    """Sentences in caption order; each with kind, object ids and noun-phrase spans (sentence-relative)."""
    rng = random.Random(scene.order_seed)
    out = []
    for i, o in enumerate(scene.objects):
        np_ = _object_phrase(o)
        pos = f"the {cell_name(o.cell)}"
        digit = f", marked with the digit {o.digit}" if o.digit is not None else ""
        if rng.random() < 0.5:
            text = f"In {pos} there is {np_}{digit}."
            phrases = [(pos, "position", i), (np_, "object", i)]
        else:
            text = f"{np_[0].upper()}{np_[1:]}{digit}{',' if digit else ''} sits in {pos}."
            phrases = [(np_[0].upper() + np_[1:], "object", i), (pos, "position", i)]
        if o.digit is not None:
            phrases.append((f"the digit {o.digit}", "digit", i))
        out.append({"kind": "object", "objects": [i], "text": text, "phrases": phrases})
    out.append({
        "kind": "background",
        "objects": [],
        "text": f"The background is {scene.background}.",
        "phrases": [("The background", "background", -1)],
    })
    for a, b in scene.relations:
        oa, ob = scene.objects[a], scene.objects[b]
        na, nb = oa.noun(), ob.noun()
        text = f"{na[0].upper()}{na[1:]} is {_relation_word(oa, ob)} {nb}."
        out.append({
            "kind": "relation",
            "objects": [a, b],
            "text": text,
            "phrases": [(na[0].upper() + na[1:], "object", a), (nb, "object", b)],
        })
    order = list(range(len(out)))
    rng.shuffle(order)
    return [out[k] for k in order]


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the word tokens used for phrase token spans."""
    return [m.span() for m in WORD_RE.finditer(text)]


def caption_and_spans(scene: Scene) -> tuple[str, list[dict], list[dict]]:
    """The caption, its sentences with char spans, and its phrases with char and token spans."""
    sents = sentences(scene)
    caption, sent_rows, phrase_rows = "", [], []
    for si, s in enumerate(sents):
        start = len(caption) + (1 if caption else 0)
        caption = f"{caption} {s['text']}" if caption else s["text"]
        sent_rows.append({**s, "start": start, "end": start + len(s["text"])})
        for text, kind, obj in sorted(s["phrases"], key=lambda p: s["text"].index(p[0])):
            k = s["text"].index(text)
            phrase_rows.append({"text": text, "kind": kind, "object": obj, "sentence": si,
                                "char_start": start + k, "char_end": start + k + len(text)})
    spans = word_spans(caption)
    for p in phrase_rows:
        toks = [t for t, (a, b) in enumerate(spans) if a >= p["char_start"] and b <= p["char_end"]]
        p["tok_start"], p["tok_end"] = toks[0], toks[-1] + 1
    return caption, sent_rows, phrase_rows


# ---------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "hexagon":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.radians(np.arange(0, 360, 60))]
    if shape == "star":
        pts = []
        for k in range(10):
            a = np.radians(-90 + 36 * k)
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    return None


def _texture(texture: str, rgb: tuple[int, int, int], size: int) -> Image.Image:
    base = np.zeros((size, size, 3), np.uint8) + np.array(rgb, np.uint8)
    dark = (np.array(rgb) * 0.45).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(6, size // 24)
    if texture == "striped":
        sel = ((xx + yy) // period) % 2 == 1
    elif texture == "checkered":
        sel = ((xx // period) + (yy // period)) % 2 == 1
    elif texture == "dotted":
        sel = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.5) ** 2
    else:
        sel = np.zeros_like(xx, bool)
    base[sel] = dark
    return Image.fromarray(base)


def _object_mask(o: Obj, size: int) -> Image.Image:
    cell = size / 3
    r = cell * SIZES[o.size] / 2
    row, col = divmod(o.cell, 3)
    room = cell / 2 - r - 1
    cx = col * cell + cell / 2 + o.jitter[0] * max(room, 0)
    cy = row * cell + cell / 2 + o.jitter[1] * max(room, 0)
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    poly = _shape_polygon(o.shape, cx, cy, r)
    if poly is not None:
        d.polygon(poly, fill=255)
    elif o.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:  # square
        s = r * 0.85
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    return mask


def render(scene: Scene, size: int) -> tuple[Image.Image, list[np.ndarray]]:
    """The image and one boolean mask per object."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    masks = []
    for o in scene.objects:
        mask = _object_mask(o, size)
        img.paste(_texture(o.texture, COLOURS[o.colour], size), (0, 0), mask)
        if o.digit is not None:
            arr = np.asarray(mask) > 0
            ys, xs = np.nonzero(arr)
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            font = ImageFont.load_default(size=max(8, int((ys.max() - ys.min()) * 0.45)))
            ImageDraw.Draw(img).text((cx, cy), str(o.digit), fill=(255, 255, 255), font=font,
                                     anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
        masks.append(np.asarray(mask) > 0)
    return img, masks


def box_of(mask: np.ndarray) -> list[float]:
    """Normalised xyxy of a boolean mask (pixel edges, so the box covers every set pixel)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).convert("1").save(buf, "PNG", optimize=True)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 0


# ---------------------------------------------------------------- the world


def families(n_families: int, n_variants: int, seed: int) -> list[list[Scene]]:
    out = []
    for f in range(n_families):
        rng = random.Random(f"{seed}:family:{f}")
        base = random_scene(rng)
        out.append([base] + [vary(base, rng) for _ in range(n_variants - 1)])
    return out


def split_of(family: int) -> str:
    """Every fifth family is held out for evaluation."""
    return "test" if family % 5 == 4 else "train"


def truth_row(scene: Scene, family: int, variant: int, size: int, masks: list[np.ndarray]) -> dict:
    caption, sents, phrases = caption_and_spans(scene)
    union_all = np.any(masks, axis=0) if masks else np.zeros((size, size), bool)
    sent_rows = []
    for s in sents:
        if s["kind"] == "background":
            m = ~union_all
            box = [0.0, 0.0, 1.0, 1.0]
        else:
            m = np.any([masks[i] for i in s["objects"]], axis=0)
            box = box_of(m)
        sent_rows.append({"text": s["text"], "kind": s["kind"], "objects": s["objects"],
                          "start": s["start"], "end": s["end"], "box": box, "mask_png": mask_png(m)})
    objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "texture": o.texture,
                "digit": o.digit, "cell": o.cell, "box": box_of(masks[i]), "mask_png": mask_png(masks[i])}
               for i, o in enumerate(scene.objects)]
    return {
        "id": f"f{family:04d}_v{variant}",
        "family": family,
        "variant": variant,
        "split": split_of(family),
        "caption": caption,
        "background": scene.background,
        "diff": json.dumps(scene.diff) if scene.diff else "",
        "objects": objects,
        "sentences": sent_rows,
        "phrases": phrases,
    }


BROKEN = (
    ("broken-404", "missing/does-not-exist.jpg", "http_404"),
    ("broken-not-image", "broken/not-an-image.jpg", "not_an_image"),
    ("broken-truncated", "broken/truncated.jpg", "truncated"),
)


EVALSET_FAMILIES = 4  # families of synth/evalset/ (duplicates=True): rendered there only, never in the URL list


def write_world(out_dir: str | Path, families_n: int = 12, variants: int = 3, image_size: int = 256,
                seed: int = 0, broken: bool = True, duplicates: bool = False) -> dict:
    """Write images/, urls.parquet (relative url, caption, id, family, variant, split) and truth.parquet.
    `duplicates`: also evalset/ (a plain folder of images of EVALSET_FAMILIES families of their own: a held-out
    evaluation fixture), and two more URLs: the first image's URL again, and a JPEG re-encode (quality 85) of
    evalset/'s first image under images/ (split train: contamination the dedup stage must catch).
    truth.parquet is committed last, by rename: a world killed while being written is written again."""
    fs, out = fsspec.core.url_to_fs(str(out_dir).rstrip("/"))  # a local folder or any fsspec URL
    fs.makedirs(f"{out}/images", exist_ok=True)
    rows, truth = [], []
    for f, fam in enumerate(families(families_n, variants, seed)):
        for v, scene in enumerate(fam):
            img, masks = render(scene, image_size)
            t = truth_row(scene, f, v, image_size, masks)
            rel = f"images/{t['id']}.jpg"
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=92)
            fs.pipe_file(f"{out}/{rel}", buf.getvalue())
            rows.append({"url": rel, "caption": t["caption"], "id": t["id"], "family": f,
                         "variant": v, "split": t["split"]})
            truth.append(t)
    if duplicates:
        fs.makedirs(f"{out}/evalset", exist_ok=True)
        for e in range(EVALSET_FAMILIES):
            scene = random_scene(random.Random(f"{seed}:evalset:{e}"))
            img, _ = render(scene, image_size)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=92)
            fs.pipe_file(f"{out}/evalset/e{e:04d}.jpg", buf.getvalue())
            if e == 0:
                copy = io.BytesIO()
                img.save(copy, "JPEG", quality=85)
                fs.pipe_file(f"{out}/images/evalset-copy.jpg", copy.getvalue())
                rows.append({"url": "images/evalset-copy.jpg", "caption": caption_and_spans(scene)[0],
                             "id": "evalset-copy", "family": -1, "variant": -1, "split": "train"})
        rows.append({**rows[0], "id": f"{rows[0]['id']}-again"})
    if broken:
        fs.makedirs(f"{out}/broken", exist_ok=True)
        fs.pipe_file(f"{out}/broken/not-an-image.jpg", b"<html><body>not an image</body></html>\n")
        good = fs.cat_file(f"{out}/{rows[0]['url']}")
        fs.pipe_file(f"{out}/broken/truncated.jpg", good[: len(good) // 2])
        for ident, rel, _ in BROKEN:
            rows.append({"url": rel, "caption": "An image that cannot be fetched.", "id": ident,
                         "family": -1, "variant": -1, "split": "broken"})
    out = fs.unstrip_protocol(out) if "file" not in fs.protocol else out
    atomic_write_table(f"{out}/urls.parquet", pa.Table.from_pylist(rows))
    atomic_write_table(f"{out}/truth.parquet", pa.Table.from_pylist(truth))  # last: marks the world complete
    return {"dir": str(out), "images": len(truth), "urls": len(rows)}
