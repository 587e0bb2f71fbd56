"""Fault injectors for the reliability suite, all on 127.0.0.1: an image server that misbehaves on purpose
and an OpenAI-compatible caption server that answers badly on purpose."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
from PIL import Image

from http_helpers import QuietHandler


def jpeg(seed: int, size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bomb(side: int) -> bytes:
    """A side x side 1-bit PNG: a few KB on the wire, side**2 pixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


BOMB = png_bomb(30_000)  # 900 Mpixel; PIL's own limit (2 x 89 Mpixel) refuses it too
QUIET_BOMB = png_bomb(12_000)  # 144 Mpixel: PIL only warns (it refuses from 179 Mpixel): longcap's limit must stop it
GOOD = {i: jpeg(i) for i in range(64)}
TIMEOUT = 1.0  # download.timeout of the scenarios' configs

# (path, reason longcap status gives it)
IMAGE_FAULTS = [
    ("missing.jpg", "http_404"),
    ("error.jpg", "http_500"),
    ("slow-headers.jpg", "timeout"),  # no answer within the timeout
    ("slow-body.jpg", "timeout"),  # headers at once, then one byte every 0.2 s: each read is within the timeout
    ("truncated.jpg", "truncated"),
    ("html.jpg", "not_an_image"),  # served as image/jpeg
    ("loop.jpg", "redirect_loop"),
    ("tiny.jpg", "too_small"),  # 1x1
    ("bomb.png", "too_large"),
    ("quiet-bomb.png", "too_large"),
    ("", "bad_url"),
]


class ImageFaults(QuietHandler):
    """GET /ok/<i>.jpg is a good JPEG; every IMAGE_FAULTS path fails in its own way; anything else is 404."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        p = self.path.lstrip("/")
        if p.startswith("ok/"):
            return self._send(200, GOOD[int(p.split("/")[1].split(".")[0])])
        if p == "error.jpg":
            return self._send(500, b"internal error", "text/plain")
        if p == "slow-headers.jpg":
            time.sleep(TIMEOUT + 1.5)
            return self._send(200, GOOD[0])
        if p == "slow-body.jpg":
            return self._dribble(GOOD[1])
        if p == "truncated.jpg":
            return self._send(200, GOOD[2][: len(GOOD[2]) // 2])
        if p == "html.jpg":
            return self._send(200, b"<html><body>not an image</body></html>")
        if p == "loop.jpg":
            return self._send(302, b"", headers=[("Location", "/loop.jpg")])
        if p == "tiny.jpg":
            return self._send(200, jpeg(3, (1, 1)))
        if p == "bomb.png":
            return self._send(200, BOMB, "image/png")
        if p == "quiet-bomb.png":
            return self._send(200, QUIET_BOMB, "image/png")
        return self._send(404, b"not found", "text/plain")

    def _dribble(self, body: bytes, every: float = 0.2, give_up: float = 30.0):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        t0 = time.monotonic()
        try:
            for i in range(len(body)):
                if time.monotonic() - t0 > give_up:
                    break
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(every)
        except OSError:
            pass  # the client gave up
        self.close_connection = True


# What the caption server answers, chosen by the request's seed (longcap derives one per key and prompt), so a
# key gets the same answer on every run whatever the order of requests.
CAPTION_FAULTS = ("good", "empty", "null", "loop", "huge", "bad_utf8", "length", "http400", "http500", "garbage")
LOOP_TEXT = "The red circle is on the left. " * 3000


def _huge_text(n_chars: int = 200_000) -> str:
    """Distinct sentences of random words (no repetition flag), cut at n_chars, mid-sentence."""
    import random

    rng, words, out = random.Random(0), [f"{a}{b}" for a in ("red", "blue", "tall", "flat", "old", "dark", "wide")
                                         for b in ("stone", "leaf", "wall", "cup", "tree", "road", "box", "lamp")], []
    while sum(map(len, out)) < n_chars:
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + ". ")
    return "".join(out)[:n_chars]


HUGE_TEXT = _huge_text()


def caption_fault(seed: int) -> str:
    return CAPTION_FAULTS[seed % len(CAPTION_FAULTS)]


def good_caption(seed: int) -> str:
    return (f"A scene numbered {seed % 1000} with a blue square in the top left. "
            f"A small red circle is in the middle. The background is plain white.")


class CaptionFaults(QuietHandler):
    """POST /v1/chat/completions. `gate` (when cleared) holds every request until it is set again; `arrived` is
    set when a request has come in: a test can kill the captioner while it waits for an answer."""

    protocol_version = "HTTP/1.1"
    gate = threading.Event()
    arrived = threading.Event()
    requests = 0

    def _send(self, code, body: bytes, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests += 1
        type(self).arrived.set()
        type(self).gate.wait(60)
        kind = caption_fault(req["seed"])
        if kind == "http400":
            return self._send(400, b'{"error": "bad request"}')
        if kind == "http500":
            return self._send(500, b'{"error": "internal"}')
        if kind == "garbage":
            return self._send(200, b"this is not json", "text/plain")
        text, finish = {"good": (good_caption(req["seed"]), "stop"), "empty": ("", "stop"), "null": (None, "stop"),
                        "loop": (LOOP_TEXT, "stop"), "huge": (HUGE_TEXT, "stop"), "bad_utf8": ("@BAD@", "stop"),
                        "length": ("A blue square is in the top left. A red circle is", "length")}[kind]
        doc = {"id": "x", "object": "chat.completion", "model": req["model"],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
               "usage": {"completion_tokens": len((text or "").split())}}
        body = json.dumps(doc).encode()
        if kind == "bad_utf8":  # bytes that are not UTF-8 inside the JSON string
            body = body.replace(b"@BAD@", b"A red \xff\xfe circle. It is \xc3 big.")
        return self._send(200, body)


CaptionFaults.gate.set()
