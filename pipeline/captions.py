"""Captions stage: one row per (key, captioner, prompt). Backends plug in here.

The `source` backend takes captions that came with the input (one prompt id
per column), so corpora that already have captions need no MLLM. The model
backends (`hf`, `openai`, `vllm`) share pipeline/mllm.py and are imported only
when a config uses them.
"""

from __future__ import annotations

import json

import pyarrow as pa

from .records import CAPTIONS, FAILED, OK, SKIPPED, download_reason, empty_row, table


class SourceCaptioner:
    """Captions from input columns; `columns` defaults to every caption column of the input."""

    def __init__(self, name: str, columns: list[str], quality_cfg=None):
        if not columns:
            raise ValueError(f"captioner {name!r}: the input has no caption columns (set input.caption_cols)")
        self.name, self.columns = name, list(columns)
        self.checker = None
        if quality_cfg is not None:
            from .quality import QualityChecker

            self.checker = QualityChecker(quality_cfg)

    def caption_shard(self, images: pa.Table, tar_path: str | None = None, skip: dict[str, str] | None = None) -> pa.Table:
        """One row per (key, caption column); `skip`: key -> reason for keys left out (the dedup stage's duplicates)."""
        skip = skip or {}
        missing = [c for c in self.columns if c not in images.column_names]
        if missing:
            raise ValueError(f"captioner {self.name!r}: columns {missing} are not in the image metadata "
                             f"(it has {images.column_names})")
        rows = []
        data = images.select(["key", "status", "error_message"] + self.columns).to_pylist()
        for r in data:
            reason = download_reason(r["status"], r["error_message"])
            for col in self.columns:
                text = r[col]
                row = empty_row(CAPTIONS, key=r["key"], captioner=self.name, model=f"source:{col}",
                                prompt_id=col, text=text, finish_reason="source")
                if reason != OK:
                    row.update(status=SKIPPED, error=f"no image ({reason}): {r['error_message']}")
                elif r["key"] in skip:
                    row.update(status=SKIPPED, error=skip[r["key"]])
                elif text is None or not str(text).strip():
                    row.update(status=FAILED, error=f"empty caption in column {col!r}")
                else:
                    row.update(status=OK, text=str(text))
                    if self.checker is not None:
                        from .mllm import caption_flags

                        row["flags"] = json.dumps(caption_flags(self.checker, row["text"], "source"))
                rows.append(row)
        return table(rows, CAPTIONS)


def build_captioner(cfg, input_caption_cols: list[str], prompts: dict | None = None, quality_cfg=None,
                    run_seed: int = 0, max_pixels: float | None = None):
    """A captioner object from one `captioners[]` config entry (model backends load their model here)."""
    if cfg.backend == "source":
        return SourceCaptioner(cfg.name, cfg.columns or input_caption_cols, quality_cfg)
    if quality_cfg is None:
        from .config import QualitySection

        quality_cfg = QualitySection()
    if prompts is None:
        from .config import DEFAULT_PROMPTS, PromptSection

        prompts = {k: PromptSection(**v) for k, v in DEFAULT_PROMPTS.items()}
    extra = {} if max_pixels is None else {"max_pixels": max_pixels}
    if cfg.backend == "hf":
        from .hf_captioner import HFCaptioner as cls
    elif cfg.backend == "openai":
        from .openai_captioner import OpenAICaptioner as cls
    elif cfg.backend == "vllm":
        from .vllm_captioner import VLLMCaptioner as cls
    else:
        raise ValueError(f"captioner {cfg.name!r}: unknown backend {cfg.backend!r}")
    return cls(cfg, prompts, quality_cfg, run_seed, **extra)
