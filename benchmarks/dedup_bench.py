"""Near-duplicate detection measured on a labelled set: copies that must be found, variants that must be kept.

Positives: exact copies, JPEG re-encodes (q 30/50/75), resizes (1/2, 1/4, 1.5x), small crops (5% and 10% of
each side's length, random sides), mirror images; made from the synthetic world's scenes and from the real
photographs scikit-image ships. Hard negatives: the synthetic families' variants (one detail differs) and
all pairs of distinct images. Prints recall per transformation, precision, the distance / differing-fraction
distributions that set the defaults, hashing throughput, and LSH index time at 1M simulated hashes.

    python benchmarks/dedup_bench.py [--families 60] [--index-size 1000000]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time

import numpy as np
from PIL import Image, ImageOps

from pipeline import dedup, synthetic

REAL = ["astronaut", "camera", "chelsea", "coffee", "coins", "horse", "moon", "page", "rocket", "text", "clock",
        "immunohistochemistry", "logo", "colorwheel", "brick", "grass", "gravel", "hubble_deep_field", "retina"]


def real_images() -> list[Image.Image]:
    import skimage.data as data

    out = []
    for name in REAL:
        a = getattr(data, name)()
        if a.dtype != np.uint8:
            a = (a * 255).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(a[:, :, :3] if a.ndim == 3 else a).convert("RGB")
        im.thumbnail((512, 512))
        out.append(im)
    return out


def jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(im, frac, rng):
    w, h = im.size
    cw, ch = int(w * frac), int(h * frac)
    dx, dy = rng.randint(0, cw), rng.randint(0, ch)
    return im.crop((dx, dy, w - cw + dx, h - ch + dy))


TRANSFORMS = {
    "exact": lambda im, rng: im.copy(),
    "jpeg30": lambda im, rng: jpeg(im, 30), "jpeg50": lambda im, rng: jpeg(im, 50),
    "jpeg75": lambda im, rng: jpeg(im, 75),
    "resize0.5": lambda im, rng: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "resize0.25": lambda im, rng: im.resize((im.width // 4, im.height // 4), Image.BILINEAR),
    "resize1.5": lambda im, rng: im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC),
    "crop5": lambda im, rng: crop(im, 0.05, rng), "crop10": lambda im, rng: crop(im, 0.10, rng),
    "mirror": lambda im, rng: ImageOps.mirror(im),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", type=int, default=60)
    ap.add_argument("--index-size", type=int, default=1_000_000)
    ap.add_argument("--max-distance", type=int, default=dedup.NearParams().max_distance)
    a = ap.parse_args()
    params = dedup.NearParams(max_distance=a.max_distance)
    rng = random.Random(0)
    fams = [[synthetic.render(s, 256)[0] for s in fam] for fam in synthetic.families(a.families, 3, 7)]
    originals = [f[0] for f in fams] + real_images()
    hashes = [dedup.phash(im) for im in originals]

    def verdict(x, y, hx, hy):
        d = min(dedup.hamming(np.array([hx[0]]), np.array([hy[0]]))[0],
                dedup.hamming(np.array([hx[1]]), np.array([hy[0]]))[0])
        diff = dedup.difference(x, y, params) if d <= params.max_distance else None
        dup = diff is not None and diff[0] <= params.max_differing and diff[1] <= params.max_mean
        return int(d), diff[0] if diff else None, dup

    rows = {}
    for name, fn in TRANSFORMS.items():
        dists, fracs, hits = [], [], 0
        for im, h in zip(originals, hashes):
            copy = fn(im, rng)
            d, frac, dup = verdict(im, copy, h, dedup.phash(copy))
            dists.append(d)
            fracs.append(frac)
            hits += dup
        rows[name] = {"recall": round(hits / len(originals), 3), "n": len(originals),
                      "phash_bits_max": max(dists), "phash_bits_p90": float(np.percentile(dists, 90)),
                      "differing_max": max((f for f in fracs if f is not None), default=None)}
        print(json.dumps({"transform": name, **rows[name]}), flush=True)
    # hard negatives: family variants (pHash is often 0 between them), and every pair of distinct originals
    neg_variant = [verdict(f[0], v, dedup.phash(f[0]), dedup.phash(v)) for f in fams for v in f[1:]]
    fp_variant = int(sum(x[2] for x in neg_variant))
    cands = dedup.candidate_pairs(np.array([h[0] for h in hashes]), np.array([h[1] for h in hashes]),
                                  params.max_distance)
    fp_distinct = int(sum(dedup.is_near_duplicate(originals[i], originals[j], params) for i, j in cands))
    positives = sum(r["recall"] * r["n"] for r in rows.values())
    fp = fp_variant + fp_distinct
    print(json.dumps({"negatives": {"family_variants": len(neg_variant), "variants_removed": fp_variant,
                                    "variant_min_differing": min(x[1] for x in neg_variant if x[1] is not None),
                                    "variant_phash_zero": int(sum(x[0] == 0 for x in neg_variant)),
                                    "distinct_pairs_candidates": len(cands), "distinct_pairs_removed": fp_distinct},
                      "precision": round(positives / (positives + fp), 4)}), flush=True)
    # throughput: pHash (+ mirror) of 256 px JPEG-decoded images, one core
    blobs = []
    for f in fams[:50]:
        buf = io.BytesIO()
        f[0].save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    t0 = time.perf_counter()
    for b in blobs * 4:
        dedup.phash(Image.open(io.BytesIO(b)).convert("RGB"))
    per_s = len(blobs) * 4 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in blobs * 4:
        Image.open(io.BytesIO(b)).convert("RGB")
    decode_s = len(blobs) * 4 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    pairs = [(fams[i][0], fams[i][1]) for i in range(min(40, len(fams)))]
    for x, y in pairs:
        dedup.difference(x, y, params)
    verify_per_s = len(pairs) / (time.perf_counter() - t0)
    # index at scale: uniform random hashes (real pHashes cluster more: more candidates), self-join
    r = np.random.default_rng(0)
    h = r.integers(-2**63, 2**63 - 1, a.index_size, dtype=np.int64)
    f = r.integers(-2**63, 2**63 - 1, a.index_size, dtype=np.int64)
    t0 = time.perf_counter()
    found = dedup.candidate_pairs(h, f, params.max_distance)
    index_s = time.perf_counter() - t0
    print(json.dumps({"hash_images_per_s": round(per_s, 1), "decode_only_images_per_s": round(decode_s, 1),
                      "verify_pairs_per_s": round(verify_per_s, 1), "index_size": a.index_size,
                      "lsh_tables": dedup.lsh_tables(params.max_distance), "index_self_join_s": round(index_s, 1),
                      "random_pairs_found": len(found)}), flush=True)


if __name__ == "__main__":
    main()
