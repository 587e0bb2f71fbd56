"""`hf` captioner: transformers AutoModelForImageTextToText + AutoProcessor, batched generate."""

from __future__ import annotations

import pickle
import time

from .mllm import MLLMCaptioner, Request, Result, chat_messages
from .storage import unpickler_reason

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class HFCaptioner(MLLMCaptioner):
    backend = "hf"

    def __init__(self, cfg, prompts, quality_cfg, run_seed=0, **kw):
        super().__init__(cfg, prompts, quality_cfg, run_seed, **kw)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        dtype = getattr(torch, DTYPES[cfg.dtype]) if cfg.dtype in DTYPES else "auto"
        try:
            self.processor = AutoProcessor.from_pretrained(cfg.model)
            if cfg.device == "auto":
                self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype, device_map="auto")
            else:
                self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype).to(cfg.device)
        except (OSError, ValueError) as e:
            raise ValueError(f"captioner {cfg.name!r}: cannot load model {cfg.model!r}: {e}") from None
        except pickle.UnpicklingError as e:  # a .bin with objects other than tensors (transformers: weights_only)
            raise ValueError(f"captioner {cfg.name!r}: {cfg.model} has weights with objects other than tensors; "
                             f"refused without unpickling them: {unpickler_reason(e)}") from None
        self.model.eval()
        self.processor.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos))
        self.templates = {p: self.processor.apply_chat_template(chat_messages(v, {"type": "image"}),
                                                                add_generation_prompt=True)
                          for p, v in self.prompts.items()}

    def gen_kwargs(self) -> dict:
        g = self.cfg.generation
        kw = {"max_new_tokens": g.max_new_tokens, "pad_token_id": self.pad}
        if g.temperature > 0:
            kw.update(do_sample=True, temperature=g.temperature, top_p=g.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def generate(self, requests: list[Request]) -> list[Result]:
        out = []
        bs = self.cfg.batch_size
        for i in range(0, len(requests), bs):
            batch = requests[i:i + bs]
            try:
                out.extend(self._batch(batch))
            except Exception as e:  # noqa: BLE001 - find the request that broke the batch: one by one
                if len(batch) == 1:
                    out.append(Result(error=f"generate failed: {type(e).__name__}: {e}"))
                else:
                    out.extend(self.generate_one_by_one(batch))
        return out

    def generate_one_by_one(self, batch: list[Request]) -> list[Result]:
        out = []
        for r in batch:
            try:
                out.extend(self._batch([r]))
            except Exception as e:  # noqa: BLE001 - recorded per image
                out.append(Result(error=f"generate failed: {type(e).__name__}: {e}"))
        return out

    def _batch(self, batch: list[Request]) -> list[Result]:
        torch = self.torch
        inputs = self.processor(text=[self.templates[r.prompt_id] for r in batch], images=[r.image for r in batch],
                                padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        if self.cfg.generation.temperature > 0:
            torch.manual_seed(batch[0].seed)  # sampling: the batch's first seed (batches are the same on a rerun)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **self.gen_kwargs())
        latency = time.perf_counter() - t0
        new = ids[:, inputs["input_ids"].shape[1]:].tolist()
        results = []
        for row in new:
            stop = next((j for j, t in enumerate(row) if t in self.eos), None)
            n = len(row) if stop is None else stop + 1
            text = self.processor.decode(row[:n], skip_special_tokens=True).strip()
            results.append(Result(text=text, n_tokens=n, finish_reason="length" if stop is None else "stop",
                                  latency_s=latency))
        return results
