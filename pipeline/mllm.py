"""What the MLLM captioners (hf, openai, vllm) share: images in, prompts, seeds, caption rows out.

A backend only turns a list of `Request`s into a list of `Result`s; reading the
shard's images, skipping keys without an image, parameters, prompt hashes and
quality flags are done here, once, for all of them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

import fsspec
import pyarrow as pa
from PIL import Image

from .images import MAX_PIXELS, decode_image
from .quality import QualityChecker
from .records import CAPTIONS, FAILED, OK, SKIPPED, download_reason, empty_row, key_seed, table
from .sentences import decode_text, normalize, text_measures

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Request:
    key: str
    prompt_id: str
    jpeg: bytes  # the image as sent: the stored JPEG if it needed no resize, else the resized one re-encoded
    seed: int

    @property
    def image(self) -> Image.Image:
        """Decoded on demand, so a shard in flight holds JPEG bytes, not pixels."""
        with Image.open(io.BytesIO(self.jpeg)) as im:
            return im.convert("RGB")


def image_url(r: Request) -> str:
    """The request's image as a base64 JPEG data URL (what OpenAI-compatible servers take inline)."""
    return "data:image/jpeg;base64," + base64.b64encode(r.jpeg).decode("ascii")


@dataclass
class Result:
    text: str | None = None
    n_tokens: int | None = None
    finish_reason: str | None = None
    latency_s: float | None = None
    error: str | None = None  # set: the row is failed with this reason


def prompt_hash(prompt) -> str:
    """sha256 of the system message and the prompt text (16 hex digits)."""
    return hashlib.sha256(f"{prompt.system or ''}\0{prompt.text}".encode()).hexdigest()[:16]


def chat_messages(prompt, image_part: dict) -> list[dict]:
    """OpenAI-style chat messages: optional system message, then the image and the prompt text."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    messages.append({"role": "user", "content": [image_part, {"type": "text", "text": prompt.text}]})
    return messages


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_tar_images(tar_path: str, keys: set[str]) -> dict[str, bytes]:
    """Image bytes of `keys` from an images/<shard>.tar (any fsspec URL)."""
    out = {}
    with fsspec.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            key, _, ext = m.name.rpartition(".")
            if key in keys and ext.lower() in IMAGE_EXTS and m.isfile():
                out[key] = tar.extractfile(m).read()
    return out


def caption_flags(checker: QualityChecker, text, finish_reason: str | None) -> list[str]:
    """The sentences stage's quality flags of one caption (same normalisation, tokenizer and checker)."""
    raw, bad_utf8 = decode_text(text)
    body = normalize(raw)
    tokens = text_measures(body, checker.cfg.repetition_n)
    return checker.flags(checker.measure(body, finish_reason, tokens), bad_utf8 or "\ufffd" in raw)


class MLLMCaptioner:
    """Base of the model backends; a subclass adds `generate(requests) -> results` (same order)."""

    backend = "mllm"

    def __init__(self, cfg, prompts: dict, quality_cfg, run_seed: int = 0, max_pixels: float = MAX_PIXELS):
        missing = [p for p in cfg.prompts if p not in prompts]
        if missing:
            raise ValueError(f"captioner {cfg.name!r}: prompts {missing} are not defined (have {sorted(prompts)})")
        self.cfg, self.name, self.model_id = cfg, cfg.name, cfg.model
        self.prompts = {p: prompts[p] for p in cfg.prompts}
        self.hashes = {p: prompt_hash(v) for p, v in self.prompts.items()}
        self.checker = QualityChecker(quality_cfg)
        self.seed_base = cfg.generation.seed if cfg.generation.seed is not None else run_seed
        self.max_pixels = max_pixels

    def seed(self, key: str, prompt_id: str) -> int:
        return key_seed(self.seed_base, f"captions:{self.name}:{prompt_id}", key) & 0x7FFFFFFF

    def params(self, prompt_id: str, seed: int) -> str:
        g = self.cfg.generation
        return json.dumps({"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                           "seed": seed, "image_max_side": self.cfg.image_max_side,
                           "prompt_version": self.prompts[prompt_id].version}, sort_keys=True)

    def prepare(self, data: bytes) -> bytes:
        """Checked image bytes to send: the stored JPEG when it fits image_max_side, else resized and re-encoded."""
        image = decode_image(data, self.max_pixels, max_side=self.cfg.image_max_side)
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and im.mode == "RGB" and im.size == image.size:
                return data
        return jpeg_bytes(image)

    def caption_shard(self, images: pa.Table, tar_path: str | None = None, skip: dict[str, str] | None = None) -> pa.Table:
        """One row per (key, prompt) of the shard; keys without a usable image get a skipped/failed row, keys in
        `skip` (key -> reason, e.g. the dedup stage's duplicates) a skipped row with that reason."""
        skip = skip or {}
        meta = images.select(["key", "status", "error_message"]).to_pylist()
        usable = {r["key"] for r in meta if download_reason(r["status"], r["error_message"]) == OK and r["key"] not in skip}
        data = read_tar_images(tar_path, usable) if usable else {}
        rows, requests, slots = [], [], []
        for r in meta:
            key = r["key"]
            base = [empty_row(CAPTIONS, key=key, captioner=self.name, model=self.model_id, prompt_id=p,
                              prompt_hash=self.hashes[p], params=self.params(p, self.seed(key, p)))
                    for p in self.prompts]
            rows.extend(base)
            reason = download_reason(r["status"], r["error_message"])
            if reason != OK or key in skip:
                for row in base:
                    row.update(status=SKIPPED, error=skip[key] if reason == OK else f"no image ({reason}): {r['error_message']}")
                continue
            try:
                if key not in data:
                    raise ValueError(f"not in {tar_path}")
                blob = self.prepare(data[key])
            except Exception as e:  # noqa: BLE001 - a broken image costs its own rows only
                for row in base:
                    row.update(status=FAILED, error=f"image unreadable: {type(e).__name__}: {e}")
                continue
            for row in base:
                requests.append(Request(key, row["prompt_id"], blob, self.seed(key, row["prompt_id"])))
                slots.append(row)
        results = self.generate(requests) if requests else []
        if len(results) != len(requests):
            raise RuntimeError(f"captioner {self.name!r}: {len(results)} results for {len(requests)} requests")
        for row, res in zip(slots, results):
            row.update(text=res.text, n_tokens=res.n_tokens, finish_reason=res.finish_reason, latency_s=res.latency_s)
            if res.error is not None:
                row.update(status=FAILED, error=res.error)
            else:
                row.update(status=OK, flags=json.dumps(caption_flags(self.checker, res.text or "", res.finish_reason)))
        return table(rows, CAPTIONS)
