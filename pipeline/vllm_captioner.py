"""`vllm` captioner: vLLM's offline engine, one per Ray actor (`pip install 'longcap[vllm]'` on GPU machines).

A whole shard goes to the engine in one `LLM.chat` call so that continuous
batching stays full; each request carries its own seed. A request vLLM
rejects (ValueError/TypeError, e.g. a prompt longer than max_model_len) costs
only its row; any other engine error (a dead engine) fails the shard, which
the runner records and a rerun retries. tests/test_vllm.py runs it through
vLLM's CPU build in its own virtualenv (the captions actor started there with
Ray's runtime_env `py_executable`; README "Recaptioning with vLLM").
"""

from __future__ import annotations

import time

from .mllm import MLLMCaptioner, Request, Result, chat_messages, image_url


def engine_args(cfg) -> dict:
    """vllm.LLM(...) arguments of one captioner entry; `engine_args` in the config override them."""
    args = {"model": cfg.model, "tensor_parallel_size": cfg.tensor_parallel_size, "dtype": cfg.dtype,
            "limit_mm_per_prompt": {"image": 1}}
    if cfg.tensor_parallel_size > 1:
        args["distributed_executor_backend"] = "mp"  # workers on the GPUs Ray gave this actor
    return {**args, **cfg.engine_args}


def sampling_params(gen, seed: int) -> dict:
    """vllm.SamplingParams(...) arguments of one request."""
    return {"max_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": gen.top_p, "seed": seed}


def map_output(out, latency: float) -> Result:
    """A vllm RequestOutput -> Result (text, generated token count, finish reason)."""
    if not out.outputs:
        return Result(error="vLLM returned no completion", latency_s=latency)
    c = out.outputs[0]
    return Result(text=c.text, n_tokens=len(c.token_ids), finish_reason=c.finish_reason, latency_s=latency)


class VLLMCaptioner(MLLMCaptioner):
    backend = "vllm"

    def __init__(self, cfg, prompts, quality_cfg, run_seed=0, **kw):
        super().__init__(cfg, prompts, quality_cfg, run_seed, **kw)
        self.engine = self.load_engine()

    def load_engine(self):
        try:
            import vllm
        except ImportError as e:
            raise ValueError(f"captioner {self.name!r}: backend vllm needs vLLM in this Python "
                             f"(pip install 'longcap[vllm]', or the captions actor in a vLLM env): {e}") from None
        return vllm.LLM(**engine_args(self.cfg))

    def engine_call(self, messages: list, params: list[dict]) -> list:
        from vllm import SamplingParams

        return self.engine.chat(messages, sampling_params=[SamplingParams(**p) for p in params], use_tqdm=False)

    def messages(self, r: Request) -> list[dict]:
        return chat_messages(self.prompts[r.prompt_id], {"type": "image_url", "image_url": {"url": image_url(r)}})

    def generate(self, requests: list[Request]) -> list[Result]:
        messages = [self.messages(r) for r in requests]
        params = [sampling_params(self.cfg.generation, r.seed) for r in requests]
        t0 = time.perf_counter()
        try:
            outs = self.engine_call(messages, params)
        except (ValueError, TypeError) as e:  # vLLM rejects a whole call for one bad prompt: find it
            if len(requests) == 1:
                return [Result(error=f"vLLM rejected the request: {type(e).__name__}: {e}")]
            return [res for r in requests for res in self.generate([r])]
        per_request = (time.perf_counter() - t0) / len(requests)  # the engine batches: shard time per request
        if len(outs) != len(requests):
            raise RuntimeError(f"captioner {self.name!r}: vLLM returned {len(outs)} outputs for {len(requests)} requests")
        return [map_output(o, per_request) for o in outs]
