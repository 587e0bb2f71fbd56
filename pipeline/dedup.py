"""Duplicates and evaluation-set contamination: exact (normalised URL, same bytes) and near (perceptual hash).

Near duplicates are found in two steps. Candidates: images whose 64-bit pHash (imagehash; DCT of a 32x32
grey thumbnail), or the pHash of their mirror image, lies within `max_distance` bits, found through an index of
hash bands (pigeonhole: two hashes within d bits agree exactly on at least one of d + 1 bands), so no pass ever
compares all pairs. Verification: pHash is blind to colour and to small details (the synthetic world's family
variants, which differ in one shape's colour or a printed digit, have pHash distance 0), so every candidate
pair is checked on colour thumbnails: the second image is aligned onto the first (mirror, scale for crops,
offset by template matching) and the pair is a duplicate when few pixels differ by much. Our design; the
thresholds are measured in benchmarks/dedup_bench.py (BENCHMARKS.md).

Pure functions, no Ray: the stage (and its global pass over all shards) composes them. Determinism: in every
group of duplicates the key that comes first in key order is kept; the others point to it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np
from PIL import Image, ImageOps

@dataclass(frozen=True)
class NearParams:
    max_distance: int = 8  # pHash bits (of 64) for a candidate pair
    pixel_delta: float = 48.0  # a thumbnail pixel "differs" when its RGB distance is above this (0..441)
    max_differing: float = 0.0005  # a candidate is a duplicate when at most this fraction of pixels differs
    max_mean: float = 12.0  # ... and the mean RGB distance is at most this (a changed background)
    thumb: int = 128  # thumbnail side of the comparison (at most the smaller image's side)
    scales: tuple = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88)  # crops: the smaller image shows this share of the side


def normalise_url(url: str) -> str:
    """Scheme and host lower-case, default port and fragment dropped, percent-escapes in one spelling.
    Path and query keep their case and order (servers may treat them as case- and order-sensitive)."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port
    if port and not ((scheme == "http" and port == 80) or (scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    if parts.username:
        host = f"{parts.username}@{host}"
    path = quote(unquote(parts.path or "/"), safe="/:@!$&'()*+,;=-._~")
    query = quote(unquote(parts.query), safe="=&/:@!$'()*+,;-._~?")
    return urlunsplit((scheme, host, path, query, ""))


def phash(img: Image.Image) -> tuple[int, int]:
    """(pHash, pHash of the mirror image) as signed 64-bit ints (parquet-friendly). imagehash's pHash of the
    32x32 grey thumbnail it would make itself, and of that thumbnail mirrored: one resize for both."""
    import imagehash

    def as_int(h) -> int:
        v = int(str(h), 16)
        return v - (1 << 64) if v >= 1 << 63 else v

    small = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    return as_int(imagehash.phash(small)), as_int(imagehash.phash(ImageOps.mirror(small)))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))


def lsh_tables(max_distance: int, bits: int = 20, recall: float = 0.98) -> int:
    """Tables of `bits` sampled bits each so that a pair at max_distance shares a whole table key with
    probability >= recall (bit-sampling LSH for Hamming distance)."""
    p = (1 - max_distance / 64) ** bits
    return max(1, math.ceil(math.log(1 - recall) / math.log(1 - p)))


def _table_keys(h: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The sampled bits of every hash, packed into one int per hash."""
    bits = (h.view(np.uint64)[:, None] >> positions.astype(np.uint64)[None, :]) & np.uint64(1)
    return (bits << np.arange(len(positions), dtype=np.uint64)[None, :]).sum(axis=1)


def _joined(sorted_keys: np.ndarray, order: np.ndarray, probe_keys: np.ndarray, probe_owner: np.ndarray):
    """(probe owner, indexed item) for every probe key equal to an indexed key."""
    left = np.searchsorted(sorted_keys, probe_keys, side="left")
    counts = np.searchsorted(sorted_keys, probe_keys, side="right") - left
    offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(probe_owner, counts), order[np.repeat(left, counts) + offs]


def candidate_pairs(hashes, flips, max_distance: int, queries=None, query_flips=None, bits: int = 20,
                    recall: float = 0.98, seed: int = 0) -> np.ndarray:
    """Index pairs within max_distance bits (directly or one of them mirrored).

    Without queries: pairs (i, j), i < j, inside `hashes`. With queries: pairs (query i, hashes j), e.g.
    training images against an evaluation set. Bit-sampling LSH: `lsh_tables` tables of `bits` random bit
    positions (seeded: the same tables on every run); a pair is a candidate when its keys agree in some table,
    then its exact distance decides. A pair at max_distance is found with probability >= recall, closer pairs
    more surely. Equal hashes are collapsed first, so a thousand copies of one blank image cost one entry.
    """
    hashes = np.asarray(hashes, dtype=np.int64)
    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    uflip = np.asarray(flips, dtype=np.int64)[first]
    self_join = queries is None
    if self_join:
        probe, probe_flip = uniq, uflip
    else:
        probe, probe_flip = np.asarray(queries, dtype=np.int64), np.asarray(query_flips, dtype=np.int64)
    both = np.concatenate([probe, probe_flip])
    owner = np.concatenate([np.arange(len(probe))] * 2)
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(lsh_tables(max_distance, bits, recall)):
        positions = rng.choice(64, size=bits, replace=False)
        keys = _table_keys(uniq, positions)
        order = np.argsort(keys, kind="stable")
        a, b = _joined(keys[order], order, _table_keys(both, positions), owner)
        d = np.minimum(hamming(probe[a], uniq[b]), hamming(probe_flip[a], uniq[b]))
        keep = (d <= max_distance) & ((a != b) if self_join else True)
        found.append(np.stack([a[keep], b[keep]], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0)
    # back from unique hashes to input indices
    by_hash = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[by_hash], np.arange(len(uniq) + 1))

    def members(u):
        return by_hash[bounds[u]:bounds[u + 1]]

    out = []
    if self_join:
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)
        out += [[i, j] for a, b in pairs for i in members(a) for j in members(b)]
        out += [list(c) for u in np.flatnonzero(np.diff(bounds) > 1) for c in itertools.combinations(members(u), 2)]
        res = np.sort(np.array(out, dtype=np.int64).reshape(-1, 2), axis=1)
    else:
        res = np.array([[q, j] for q, u in pairs for j in members(u)], dtype=np.int64).reshape(-1, 2)
    return np.unique(res, axis=0)


def thumbnail(img: Image.Image, side: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32)


def difference(a: Image.Image, b: Image.Image, params: "NearParams" = None) -> tuple[float, float]:
    """(fraction of pixels that differ by more than pixel_delta, mean RGB distance) at the best alignment
    tried: b as is or mirrored, one image seen as a crop of the other at each scale, at its best offset
    (template matching). Compared at the smaller image's resolution (at most `thumb` px a side), so a
    downscaled copy is not blamed for the detail it cannot show."""
    import cv2

    params = params or NearParams()
    side0 = max(16, min(params.thumb, *a.size, *b.size))
    best = (1.0, 441.0)
    for big, small in ((a, b), (b, a)):
        base = thumbnail(big, side0)
        for mirror, scale in itertools.product((False, True), params.scales):
            if scale == 1.0 and big is b:
                continue  # same as (a, b) at scale 1
            side = max(8, round(side0 * scale))
            t = thumbnail(ImageOps.mirror(small) if mirror else small, side)
            dy = dx = 0
            if side < side0:
                score = cv2.matchTemplate(base, t, cv2.TM_SQDIFF)
                dy, dx = np.unravel_index(int(np.argmin(score)), score.shape)
            diff = np.sqrt(((base[dy:dy + side, dx:dx + side] - t) ** 2).sum(axis=2))
            cand = (float((diff > params.pixel_delta).mean()), float(diff.mean()))
            best = min(best, cand)
    return best


def is_near_duplicate(a: Image.Image, b: Image.Image, params: NearParams = None) -> bool:
    params = params or NearParams()
    frac, mean = difference(a, b, params)
    return frac <= params.max_differing and mean <= params.max_mean


def first_of_groups(keys: list[str], pairs) -> dict[str, str]:
    """Union of the duplicate pairs (key pairs) into groups; every key but the group's first (in key order)
    maps to that first key."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.get(k, k) != k:
            parent[k] = parent.get(parent[k], parent[k])
            k = parent[k]
        return k

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            parent[hi] = lo
    return {k: root(k) for k in keys if root(k) != k}
