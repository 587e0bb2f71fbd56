"""Duplicates and evaluation-set contamination: exact (normalised URL, same bytes) and near (perceptual hash).

Near duplicates are found in two steps. Candidates: every image gets a 64-bit pHash as imagehash defines it
(8x8 lowest DCT frequencies of a 32x32 grey thumbnail against their median) of itself, of its mirror image and of 9 crop windows (92.5% of each side on a 3x3 grid
of offsets); a pair is a candidate when one image's hash, mirror hash or a window's hash lies within
`max_distance` bits of the other's hash, found through bit-sampling LSH tables, so no pass ever compares all
pairs (a 5-10% crop moves the plain pHash 14-30 bits, the nearest window's hash a few). Verification: pHash is
blind to colour and to small details (the synthetic world's family variants, which differ in one shape's
colour or a printed digit, often have pHash distance 0), so every candidate pair is checked on colour
thumbnails: the two are aligned (mirror, crop scale, offset by template matching, refined by an ECC affine
fit) and compared by where they differ (difference()): diffuse small differences (a re-encode, a resampling)
pass, one window that differs where the rest agrees (a changed detail) does not. Our design; the thresholds
are measured in benchmarks/dedup_bench.py (BENCHMARKS.md).

Pure functions, no Ray: the stage (and its global pass over all shards) composes them. Determinism: in every
group of duplicates the key that comes first in key order is kept; the others point to it.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np
from PIL import Image, ImageOps

@dataclass(frozen=True)
class NearParams:
    max_distance: int = 8  # pHash bits (of 64) for a candidate pair
    max_mean: float = 12.0  # verification: mean RGB distance of the aligned thumbnails (a changed background)
    max_local: float = 46.0  # ... RMS RGB distance of the worst window after a small blur (a changed object)
    max_ratio: float = 50.0  # ... worst window's mean squared distance over the image's (+ ratio_floor): a
    #                          small detail changed in an image that otherwise agrees
    ratio_floor: float = 4.0  # squared RGB distance added to the image's mean in that ratio
    blur: float = 1.0  # Gaussian sigma (thumbnail px) applied to both before the window statistics
    window: int = 13  # side of the window (thumbnail px)
    thumb: int = 256  # compared at min(thumb, the smaller image's shorter side) px a side (half of it: resized copies)
    scales: tuple = tuple(round(1 - i / 100, 2) for i in range(14))  # crops: share of the side the smaller image shows


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


# ---------------------------------------------------------------- hashes

HASH_VERSION = 2  # names the global pass (workflows/stages.py): cached evaluation-set hashes of another version are not reused
BASE = 64  # every image is hashed from a grey BASE x BASE thumbnail (JPEGs decoded at a reduced scale to it)
CROP = 0.925  # crop windows: CROP of each side, on a 3x3 grid of offsets; a 2-10% crop of either image lies
#               within 2.5% (of the side) of one window (recall of crop copies: benchmarks/dedup_bench.py)
WINDOWS = [(x, y, x + CROP, y + CROP) for y in (0, (1 - CROP) / 2, 1 - CROP) for x in (0, (1 - CROP) / 2, 1 - CROP)]


def _dct_bits(arrs: np.ndarray) -> np.ndarray:
    """imagehash's pHash of each 32x32 array (the 8x8 lowest DCT frequencies against their median), as signed
    64-bit ints in imagehash's bit order; one batched DCT for all."""
    from scipy.fft import dct

    low = dct(dct(arrs, axis=1), axis=2)[:, :8, :8].reshape(len(arrs), 64)
    bits = (low > np.median(low, axis=1, keepdims=True)).astype(np.uint64)
    return (bits << np.arange(63, -1, -1, dtype=np.uint64)).sum(axis=1).view(np.int64)


@functools.lru_cache(maxsize=None)
def _resamplers() -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) matrices, (1 + len(WINDOWS), 32, BASE): the whole BASE x BASE thumbnail and each window
    resampled to 32 x 32 as rows @ grey @ columns^T, with the triangle filter widened to the scale (PIL's
    antialiased bilinear). One matrix product for all windows instead of one PIL resize each."""
    def matrix(lo: float, hi: float) -> np.ndarray:
        scale = (hi - lo) * BASE / 32
        centres = lo * BASE + (np.arange(32) + 0.5) * scale
        w = np.clip(1 - np.abs((np.arange(BASE) + 0.5)[None, :] - centres[:, None]) / scale, 0, None)
        return w / w.sum(axis=1, keepdims=True)

    spans = [((0.0, 1.0), (0.0, 1.0))] + [((w[1], w[3]), (w[0], w[2])) for w in WINDOWS]
    return (np.stack([matrix(*ys) for ys, _ in spans]), np.stack([matrix(*xs) for _, xs in spans]))


def phashes(img: Image.Image) -> tuple[int, int, list[int]]:
    """(pHash, pHash of the mirror image, pHashes of the WINDOWS crops) of an image (best from
    images.decode_grey(data, BASE): any mode is taken to grey here). The candidate search indexes the first and
    probes with all of them: a mirrored copy matches the second, a cropped copy one of the windows."""
    g = img if img.mode == "L" else img.convert("L")
    if g.size != (BASE, BASE):
        g = g.resize((BASE, BASE), Image.Resampling.BOX)
    rows, cols = _resamplers()
    small = rows @ np.asarray(g, dtype=np.float64) @ cols.transpose(0, 2, 1)  # (1 + windows, 32, 32)
    h = _dct_bits(np.concatenate([small[:1], small[:1, :, ::-1], small[1:]]))
    return int(h[0]), int(h[1]), [int(v) for v in h[2:]]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))


# ---------------------------------------------------------------- candidate search

def lsh_tables(max_distance: int, bits: int = 24, recall: float = 0.98) -> int:
    """Tables of `bits` sampled bits each so that a pair at max_distance shares a whole table key with
    probability >= recall (bit-sampling LSH for Hamming distance)."""
    p = (1 - max_distance / 64) ** bits
    return 1 if p >= 1 else max(1, math.ceil(math.log(1 - recall) / math.log(1 - p)))


class _Table:
    """One LSH table: the sampled bit positions, read through one 256-entry lookup per byte of the hash (a
    handful of gathers instead of one shift per sampled bit)."""

    def __init__(self, positions: np.ndarray):
        self.bits = len(positions)
        self.luts = {}
        v = np.arange(256, dtype=np.uint64)
        for j, p in enumerate(positions):
            byte, bit = divmod(int(p), 8)
            lut = self.luts.setdefault(byte, np.zeros(256, dtype=np.uint64))
            lut |= ((v >> np.uint64(bit)) & np.uint64(1)) << np.uint64(j)

    def keys(self, byte_cols: np.ndarray) -> np.ndarray:
        out = np.zeros(byte_cols.shape[1], dtype=np.uint64)
        for byte, lut in self.luts.items():
            out |= lut[byte_cols[byte]]
        return out.astype(np.int64)


def _byte_cols(h: np.ndarray) -> np.ndarray:
    """(8, n) uint8: byte k of every hash (bits 8k..8k+7)."""
    return np.ascontiguousarray(np.asarray(h, dtype=np.int64).view(np.uint8).reshape(-1, 8).T)


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position) for every position starts[row] .. starts[row] + counts[row] - 1."""
    rows = np.repeat(np.arange(len(counts)), counts)
    offs = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.repeat(starts, counts) + offs


def near_pairs(index, probes, max_distance: int, self_join: bool, bits: int = 24, recall: float = 0.98,
               seed: int = 0) -> np.ndarray:
    """(probe row, index item, distance) rows for every index hash within max_distance bits of one of the row's
    probe hashes (the smallest such distance); probes: (rows, k) int64, e.g. phashes' hash, mirror and crop
    windows of each image; index: one hash per item.

    Bit-sampling LSH: `lsh_tables` tables of `bits` random bit positions (seeded: the same tables on every run);
    a (probe, item) pair is a candidate when its keys agree in some table, then its exact distance decides; a pair
    at max_distance is found with probability >= recall, closer pairs more surely. Equal index hashes are
    collapsed first, so a thousand copies of one blank image cost one entry. self_join: the index is the rows'
    own first hashes; rows (i, j, d) with i < j, each pair once.
    """
    index = np.asarray(index, dtype=np.int64)
    probes = np.asarray(probes, dtype=np.int64)
    probes = probes.reshape(len(probes), -1) if probes.ndim != 2 else probes
    if not len(index) or not len(probes):
        return np.zeros((0, 3), dtype=np.int64)
    uniq, inverse = np.unique(index, return_inverse=True)
    pvals, pinv = np.unique(probes.ravel(), return_inverse=True)
    powner = np.repeat(np.arange(len(probes)), probes.shape[1])
    ucols, pcols = _byte_cols(uniq), _byte_cols(pvals)
    rng = np.random.default_rng(seed)
    # buckets: the key's low `nb` bits (about two hashes per bucket); equal keys are checked after the lookup
    nb = min(bits, max(8, int(np.ceil(np.log2(len(uniq) + 1))) + 1))
    mask = np.int64((1 << nb) - 1)
    found = []
    for _ in range(lsh_tables(max_distance, bits, recall)):
        table = _Table(rng.choice(64, size=bits, replace=False))
        ukeys, pk = table.keys(ucols), table.keys(pcols)
        ub = ukeys & mask
        order = np.argsort(ub, kind="stable")
        counts = np.bincount(ub, minlength=1 << nb)
        starts = np.cumsum(counts) - counts
        pb = pk & mask
        p, pos = _expand(starts[pb], counts[pb])
        u = order[pos]
        p, u = p[ukeys[u] == pk[p]], u[ukeys[u] == pk[p]]
        keep = hamming(pvals[p], uniq[u]) <= max_distance
        found.append(p[keep] * len(uniq) + u[keep])
    pu = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    pu = np.stack([pu // len(uniq), pu % len(uniq), hamming(pvals[pu // len(uniq)], uniq[pu % len(uniq)])], axis=1)
    # probe values -> rows, unique hashes -> index items
    by_val = np.argsort(pinv, kind="stable")
    vbounds = np.searchsorted(pinv[by_val], np.arange(len(pvals) + 1))
    k, rpos = _expand(vbounds[pu[:, 0]], np.diff(vbounds)[pu[:, 0]])
    rows = np.stack([powner[by_val[rpos]], pu[k, 1], pu[k, 2]], axis=1)  # (row, uniq, d)
    by_hash = np.argsort(inverse, kind="stable")
    ubounds = np.searchsorted(inverse[by_hash], np.arange(len(uniq) + 1))
    k, ipos = _expand(ubounds[rows[:, 1]], np.diff(ubounds)[rows[:, 1]])
    out = np.stack([rows[k, 0], by_hash[ipos], rows[k, 2]], axis=1)
    if self_join:
        out = out[out[:, 0] != out[:, 1]]
        out[:, :2] = np.sort(out[:, :2], axis=1)
    # one row per pair, its smallest distance
    out = out[np.lexsort((out[:, 2], out[:, 1], out[:, 0]))]
    first = np.ones(len(out), bool)
    first[1:] = (out[1:, 0] != out[:-1, 0]) | (out[1:, 1] != out[:-1, 1])
    return out[first]


# ---------------------------------------------------------------- verification

def _thumb(img: Image.Image, w: int, h: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)


def align(a: Image.Image, b: Image.Image, side: int, scales=NearParams.scales,
          coarse: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The two images on one grid: one (as `side` x `side` thumbnail) is the base, the other (mirrored or not,
    seen as a crop of the base at one of `scales`, its aspect ratio from the two sizes) the template. The best of
    these by mean squared error at its best integer offset (template matching on thumbnails of at most `coarse`
    px), then at `side` px refined to sub-pixel by an affine ECC fit (cv2.findTransformECC) when the template is
    smaller. Returns (base resampled onto the template's grid, template), float32 RGB."""
    import cv2

    cs = min(side, coarse)
    best = None
    for big, small in ((a, b), (b, a)):
        r = (small.width / small.height) / (big.width / big.height)
        base = _thumb(big, cs, cs)
        for mirror, s in itertools.product((False, True), scales):
            if s == 1.0 and big is b:
                continue  # same as (a, b) at scale 1
            sx, sy = (s, s / r) if r >= 1 else (s * r, s)
            w, h = max(8, round(cs * sx)), max(8, round(cs * sy))
            t = _thumb(ImageOps.mirror(small) if mirror else small, w, h)
            score = cv2.matchTemplate(base, t, cv2.TM_SQDIFF)
            dy, dx = np.unravel_index(int(np.argmin(score)), score.shape)
            mse = float(score[dy, dx]) / (w * h)
            if best is None or mse < best[0]:
                best = (mse, big, small, mirror, sx, sy, int(dx), int(dy))
    _, big, small, mirror, sx, sy, dx, dy = best
    k = side / cs
    base = _thumb(big, side, side)
    w, h = max(8, round(side * sx)), max(8, round(side * sy))
    t = _thumb(ImageOps.mirror(small) if mirror else small, w, h)
    if (w, h) == (side, side):
        return base, t
    dx, dy = min(round(dx * k), side - w), min(round(dy * k), side - h)
    x = base[dy:dy + h, dx:dx + w]
    warp = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    try:
        _, warp = cv2.findTransformECC(cv2.cvtColor(t, cv2.COLOR_RGB2GRAY), cv2.cvtColor(base, cv2.COLOR_RGB2GRAY),
                                       warp, cv2.MOTION_AFFINE,
                                       (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4), None, 1)
        x = cv2.warpAffine(base, warp, (w, h), flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE)
    except cv2.error:
        pass  # no convergence (flat images): the integer offset stands
    return x, t


def difference(a: Image.Image, b: Image.Image, params: NearParams = None) -> tuple[float, float, float]:
    """(mean RGB distance, worst window's RMS distance, worst window over image ratio) of two aligned images.

    Compared at the smaller image's resolution (at most `thumb` px a side), at half of it when one image is
    more than 1.25x the other (a resized copy: resampling filters differ pixel by pixel), so a downscaled copy is
    not blamed for the detail it cannot show. A re-encode or a resampling leaves small differences along every edge
    (spread over the image); a changed detail leaves one window with a difference the rest of the image does
    not have: the ratio finds it however small it is, the RMS finds a large change, the mean a changed
    background. Our design; the thresholds are measured (benchmarks/dedup_bench.py)."""
    import cv2

    params = params or NearParams()
    small, large = sorted((min(a.size), min(b.size)))
    same_scale = large <= 1.25 * small
    side = max(16, min(params.thumb, small if same_scale else small // 2))
    x, y = align(a, b, side, params.scales)
    mean = float(np.sqrt(((x - y) ** 2).sum(axis=2)).mean())
    # blur and window are given at `thumb` px; at the same scale they keep their share of the image on a smaller
    # side (a detail of a small image is as visible as that of a large one); a resized copy differs pixel by
    # pixel of the comparison (resampling), so it keeps them in comparison pixels
    k = side / params.thumb if same_scale else 1.0
    blur, win = params.blur * k, max(3, round(params.window * k) | 1)
    e = ((cv2.GaussianBlur(x, (0, 0), blur) - cv2.GaussianBlur(y, (0, 0), blur)) ** 2).sum(axis=2)
    local = float(cv2.boxFilter(e, -1, (win, win), borderType=cv2.BORDER_CONSTANT).max())
    return mean, math.sqrt(max(local, 0.0)), local / (float(e.mean()) + params.ratio_floor)


def accept(score: tuple[float, float, float], params: NearParams = None) -> bool:
    """Whether a difference() score is a near duplicate."""
    params = params or NearParams()
    mean, local, ratio = score
    return mean <= params.max_mean and local <= params.max_local and ratio <= params.max_ratio


def is_near_duplicate(a: Image.Image, b: Image.Image, params: NearParams = None) -> bool:
    return accept(difference(a, b, params), params)


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
