"""`openai` captioner: any OpenAI-compatible chat-completions server (vLLM, SGLang, transformers serve, hosted).

Images go inline as base64 JPEG data URLs. At most `max_in_flight` requests
are open at once. 429, 502/503/504, timeouts and connection errors mean the
server is busy or gone: they are retried with exponential backoff, and if they
outlast `retries` the shard fails (nothing is written, so a rerun does it
again). Other answers are per image: a 4xx (400: the server rejects this
request) fails that row at once; a 500 is retried, then fails that row.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

from .mllm import MLLMCaptioner, Request, Result, chat_messages, image_url

UNAVAILABLE = {408, 429, 502, 503, 504}


class ServerUnavailable(RuntimeError):
    """The server did not answer (or kept saying it is busy) through every retry: the shard fails."""


class OpenAICaptioner(MLLMCaptioner):
    backend = "openai"

    def __init__(self, cfg, prompts, quality_cfg, run_seed=0, **kw):
        super().__init__(cfg, prompts, quality_cfg, run_seed, **kw)
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ValueError(f"captioner {cfg.name!r}: environment variable {cfg.api_key_env} "
                                 "(captioners[].api_key_env) is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def body(self, r: Request) -> dict:
        g = self.cfg.generation
        image = {"type": "image_url", "image_url": {"url": image_url(r)}}
        return {"model": self.model_id, "messages": chat_messages(self.prompts[r.prompt_id], image),
                "max_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "seed": r.seed,
                "stream": False, **self.cfg.extra_body}

    def generate(self, requests: list[Request]) -> list[Result]:
        return asyncio.run(self._all(requests))

    async def _all(self, requests: list[Request]) -> list[Result]:
        import httpx

        limits = httpx.Limits(max_connections=self.cfg.max_in_flight, max_keepalive_connections=self.cfg.max_in_flight)
        sem = asyncio.Semaphore(self.cfg.max_in_flight)
        async with httpx.AsyncClient(timeout=self.cfg.timeout, limits=limits, headers=self.headers) as client:
            tasks = [asyncio.ensure_future(self._one(client, sem, r)) for r in requests]
            try:
                return list(await asyncio.gather(*tasks))
            finally:  # one request gave up on the server: stop the others now
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, client, sem, r: Request) -> Result:
        async with sem:
            body = json.dumps(self.body(r))
            return await self.post(client, body)

    async def post(self, client, body: str) -> Result:
        """One request with its retries; returns a Result or raises ServerUnavailable."""
        import httpx

        cfg = self.cfg
        attempt = 0
        while True:
            t0 = time.perf_counter()
            wait = None
            try:
                resp = await client.post(self.url, content=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                status = None
            else:
                latency = time.perf_counter() - t0
                if resp.status_code == 200:
                    return parse_completion(resp, latency)
                status, problem = resp.status_code, f"HTTP {resp.status_code}: {resp.text[:300]}"
                if status not in UNAVAILABLE and status < 500:
                    return Result(error=problem, latency_s=latency)
                wait = retry_after(resp)
            if attempt == cfg.retries:
                if status is None or status in UNAVAILABLE:
                    raise ServerUnavailable(f"captioner {cfg.name!r}: {self.url} unavailable after "
                                            f"{attempt + 1} attempts: {problem}")
                return Result(error=f"{problem} (after {attempt + 1} attempts)")
            if wait is None:
                wait = cfg.backoff * 2**attempt * (0.5 + random.random() / 2)
            await asyncio.sleep(min(wait, cfg.backoff_max))
            attempt += 1


def retry_after(resp) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def parse_completion(resp, latency: float) -> Result:
    """A chat.completion response -> Result; a malformed one is an error for this row. Bytes that are not
    UTF-8 become U+FFFD (the caption is kept and flagged invalid_utf8, as for source captions)."""
    try:
        doc = json.loads(resp.content.decode("utf-8", errors="replace"))
        choice = doc["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return Result(error=f"malformed response ({type(e).__name__}: {e}): {resp.text[:200]}", latency_s=latency)
    usage = doc.get("usage") or {}
    return Result(text=text if isinstance(text, str) else "", n_tokens=usage.get("completion_tokens"),
                  finish_reason=choice.get("finish_reason"), latency_s=latency)
