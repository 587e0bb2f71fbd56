"""Training loader over export shards: webdataset streaming -> image tensors + chunked, tokenised captions.

Per sample: decode the JPEG (pixel limit, corrupt files skipped with a logged
reason), resize and centre-crop to the model's size, normalise (CLIP
mean/std); pick one long caption and chunk it into K sub-captions (random
chunking in training, balanced in evaluation), add N-K sub-captions drawn
from the image's other captions, tokenise with open_clip's CLIP BPE
tokenizer. Batches hold padded tensors with masks. Randomness is seeded per
(seed, epoch, key), so a sample gets the same chunks whatever worker reads it.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import random
from dataclasses import dataclass

import torch
import webdataset as wds

from pipeline.chunking import balanced_chunks, chunk_texts, random_chunks, sample_subcaptions
from pipeline.images import MAX_PIXELS, decode_image
from pipeline.records import key_seed

log = logging.getLogger("longcap.data")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    import fsspec

    return fsspec.open(url, mode).open()


# webdataset opens paths, http(s) and pipe: itself; any other scheme (s3://, gcs://, az://, memory://...) via fsspec.
importlib.import_module("webdataset.gopen").gopen_schemes["__default__"] = _fsspec_open


def expand_shards(patterns: list[str]) -> list[str]:
    """Shard URLs from paths, {a..b} braces and globs, on any fsspec filesystem; sorted per pattern."""
    import braceexpand
    import fsspec

    out = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            if not any(ch in item for ch in "*?["):
                out.append(item)
                continue
            fs, path = fsspec.core.url_to_fs(item)
            found = sorted(fs.glob(path))
            local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
            out.extend(found if local else [fs.unstrip_protocol(f) for f in found])
    if not out:
        raise FileNotFoundError(f"no shards match {patterns}")
    return out

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DataConfig:
    image_size: int = 224
    n_sub: int = 8  # N sub-captions per image
    k_chunks: int = 4  # K of them from one long caption (input of the whole-caption encoder)
    max_chunk: int = 3  # sentences per chunk at most
    context_length: int = 77
    batch_size: int = 32
    train: bool = True
    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False  # sample shards with replacement (multi-epoch streaming)
    epoch_samples: int | None = None  # with resampled: samples per epoch per worker
    rank: int = 0
    world_size: int = 1
    max_pixels: int = MAX_PIXELS
    where: dict | None = None  # keep samples whose json "extra" has these values, e.g. {"split": "train"}
    mode: str = "caft"  # what a sample carries: caft (chunked captions) | goal | grouping (model/localdata.py)
    max_pairs: int = 4  # goal: local region-sentence pairs per sample (0: none)
    long_text: str = "stretch"  # goal: stretch (one row of long_context tokens) | chunk (rows of 77, whole sentences)
    long_context: int = 248  # goal, stretch: tokens per caption row


@functools.lru_cache(maxsize=4)
def image_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """CLIP BPE token ids [len(texts), context_length]; repeated texts are encoded once."""
    import open_clip

    unique = list(dict.fromkeys(texts))
    tokens = open_clip.tokenize(unique, context_length=context_length)
    if len(unique) == len(texts):
        return tokens
    where = {t: i for i, t in enumerate(unique)}
    return tokens[[where[t] for t in texts]]


def selected(meta: dict, where: dict | None) -> bool:
    """Whether a sample's JSON matches `where` on its "extra" fields (no filter: every sample)."""
    return not where or all(meta.get("extra", {}).get(k) == v for k, v in where.items())


def pick_texts(captions: list[dict], rng: random.Random, cfg: DataConfig) -> tuple[list[str], int]:
    """The N sub-captions of one sample; the first `k` come from one long caption."""
    caps = [c for c in captions if c.get("sentences")]
    if not caps:
        return [], 0
    if cfg.train:  # any caption of two sentences or more can be the long one
        long = rng.choice([c for c in caps if len(c["sentences"]) >= 2] or caps)
        chunks = random_chunks(len(long["sentences"]), cfg.k_chunks, rng, cfg.max_chunk)
    else:
        long = max(caps, key=lambda c: len(c["sentences"]))
        chunks = balanced_chunks(len(long["sentences"]), cfg.k_chunks)
    texts = chunk_texts(long["sentences"], chunks)
    k = len(texts)
    others = [c for c in caps if c is not long] or [long]
    for _ in range(cfg.n_sub - cfg.k_chunks):
        o = rng.choice(others)
        texts += chunk_texts(o["sentences"], sample_subcaptions(len(o["sentences"]), 1, rng, cfg.max_chunk))
    return texts, k


class SampleBuilder:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __call__(self, sample: dict):
        key = sample.get("__key__")
        where = sample.get("__url__", "?")
        try:
            meta = json.loads(sample["json"])
            if not selected(meta, self.cfg.where):
                return None  # not selected (e.g. a held-out split): not an error
            image = decode_image(sample["jpg"], self.cfg.max_pixels)
        except Exception as e:  # noqa: BLE001 - a bad sample is skipped and said, never a crash
            log.warning("skipping sample %s in %s: %s: %s", key, where, type(e).__name__, e)
            return None
        stage = f"loader:{self.cfg.epoch}" if self.cfg.train else "loader:eval"
        rng = random.Random(key_seed(self.cfg.seed, stage, key))
        if self.cfg.mode == "goal":
            from .localdata import goal_sample
            return goal_sample(self.cfg, key, where, meta, image, rng, image_transform(self.cfg.image_size))
        texts, k = pick_texts(meta.get("captions", []), rng, self.cfg)
        if not texts:
            log.warning("skipping sample %s in %s: no captions with sentences", key, where)
            return None
        if self.cfg.mode == "grouping":
            from .localdata import tokenize_words
            tokens = tokenize_words(texts, self.cfg.context_length)
        else:
            tokens = tokenize(texts, self.cfg.context_length)
        return {"key": key, "url": where, "image": image_transform(self.cfg.image_size)(image),
                "tokens": tokens, "n_whole": k, "texts": texts}


def collate(samples: list[dict], n_sub: int, context_length: int) -> dict:
    b = len(samples)
    tokens = torch.zeros(b, n_sub, context_length, dtype=torch.long)
    valid = torch.zeros(b, n_sub, dtype=torch.bool)
    whole = torch.zeros(b, n_sub, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s["tokens"].shape[0]
        tokens[i, :n] = s["tokens"]
        valid[i, :n] = True
        whole[i, :s["n_whole"]] = True
    return {"image": torch.stack([s["image"] for s in samples]), "tokens": tokens, "valid": valid,
            "whole": whole, "keys": [s["key"] for s in samples], "urls": [s["url"] for s in samples],
            "texts": [s["texts"] for s in samples]}


def _split_by_rank(src, rank: int, world_size: int):
    for i, url in enumerate(src):
        if i % world_size == rank:
            yield url


def _is_sample(s) -> bool:
    return s is not None


def _log_and_continue(exn) -> bool:
    log.warning("skipping unreadable data: %s: %s", type(exn).__name__, exn)
    return True


class ResampledShards(torch.utils.data.IterableDataset):
    """Shards drawn with replacement, forever, from an RNG seeded by (seed, epoch, rank, DataLoader worker):
    the same stream on a rerun (webdataset's own resampler seeds from the clock)."""

    def __init__(self, urls: list[str], seed: int, epoch: int, rank: int):
        super().__init__()
        self.urls, self.seed, self.epoch, self.rank = list(urls), seed, epoch, rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(key_seed(self.seed, f"shards:{self.epoch}:{self.rank}:{worker}", "resampled"))
        while True:
            yield {"url": rng.choice(self.urls)}


def dataset(urls: list[str], cfg: DataConfig):
    """The sample stream of this rank (and, inside a DataLoader, of this worker), batched."""
    if cfg.mode not in ("caft", "goal", "grouping"):
        raise ValueError(f"loader mode {cfg.mode!r} is not one of caft, goal, grouping")
    build = SampleBuilder(cfg)
    batch = functools.partial(collate, n_sub=cfg.n_sub, context_length=cfg.context_length)
    if cfg.mode == "goal":
        from .localdata import goal_collate
        batch = functools.partial(goal_collate, long_text=cfg.long_text, long_context=cfg.long_context)
    if cfg.resampled:
        stages = [ResampledShards(urls, cfg.seed, cfg.epoch, cfg.rank),
                  wds.tarfile_to_samples(handler=_log_and_continue)]
        if cfg.train:
            stages.append(wds.shuffle(cfg.shuffle_buffer, rng=random.Random(cfg.seed * 1000 + cfg.epoch)))
        ds = wds.DataPipeline(*stages, wds.map(build), wds.select(_is_sample),
                              wds.batched(cfg.batch_size, collation_fn=batch, partial=not cfg.train))
        return ds.with_epoch(max(1, (cfg.epoch_samples or 10_000) // cfg.batch_size))
    if cfg.train:  # one pass: every shard read once across ranks and workers, in an order no rank count changes
        ds = wds.WebDataset(epoch_order(urls, cfg.seed, cfg.epoch), shardshuffle=False, handler=_log_and_continue,
                            empty_check=False, workersplitter=wds.split_by_worker,
                            nodesplitter=functools.partial(_split_by_rank, rank=cfg.rank, world_size=cfg.world_size))
        ds = ds.compose(functools.partial(_shuffle_within_shard, seed=cfg.seed, epoch=cfg.epoch))
    else:
        ds = wds.WebDataset(urls, shardshuffle=False, handler=_log_and_continue, empty_check=False,
                            nodesplitter=functools.partial(_split_by_rank, rank=cfg.rank, world_size=cfg.world_size))
    ds = ds.map(build).select(_is_sample)
    return ds.batched(cfg.batch_size, collation_fn=batch, partial=not cfg.train)


def epoch_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shards of one data epoch in their order, from (seed, epoch) alone: the same for any number of ranks,
    which then take every world_size-th shard (and their DataLoader workers every num_workers-th of those)."""
    order = sorted(urls)
    random.Random(key_seed(seed, f"shards:{epoch}", "order")).shuffle(order)
    return order


def _shuffle_within_shard(src, seed: int, epoch: int):
    """Each shard's samples in an order from (seed, epoch, shard): whichever rank or worker reads the shard gives
    the same order (a sample buffer mixing shards would depend on which shards one rank holds). Holds one shard."""
    def flush(group, url):
        random.Random(key_seed(seed, f"samples:{epoch}", url)).shuffle(group)
        yield from group

    group, url = [], None
    for sample in src:
        if sample.get("__url__") != url and group:
            yield from flush(group, url)
            group = []
        url = sample.get("__url__")
        group.append(sample)
    if group:
        yield from flush(group, url)


def loader(urls: list[str], cfg: DataConfig, num_workers: int = 2, context: str | None = None):
    """A DataLoader over `dataset`; `context='spawn'` where the process holds threads that fork badly (Ray)."""
    return torch.utils.data.DataLoader(dataset(urls, cfg), batch_size=None, num_workers=num_workers,
                                       multiprocessing_context=context if num_workers else None)


def shard_images(urls: list[str], limit: int | None = None, max_pixels: int = MAX_PIXELS):
    """PIL images (RGB) from the jpg members of webdataset shards (image or export shards), in order;
    undecodable members are skipped with a logged reason."""
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, handler=_log_and_continue, empty_check=False):
        data = sample.get("jpg")
        if data is None:
            continue
        try:
            yield decode_image(data, max_pixels)
        except Exception as e:  # noqa: BLE001 - a bad member costs only itself
            log.warning("skipped %s: %s", sample.get("__key__"), e)
            continue
        count += 1
        if limit is not None and count >= limit:
            return
