"""Captions stage: one row per (key, captioner, prompt). Backends plug in here.

The `source` backend takes captions that came with the input (one prompt id
per column), so corpora that already have captions need no MLLM.
"""

from __future__ import annotations

import pyarrow as pa

from .records import CAPTIONS, FAILED, OK, SKIPPED, download_reason, empty_row, table


class SourceCaptioner:
    """Captions from input columns; `columns` defaults to every caption column of the input."""

    def __init__(self, name: str, columns: list[str]):
        if not columns:
            raise ValueError(f"captioner {name!r}: the input has no caption columns (set input.caption_cols)")
        self.name, self.columns = name, list(columns)

    def caption_shard(self, images: pa.Table) -> pa.Table:
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
                elif text is None or not str(text).strip():
                    row.update(status=FAILED, error=f"empty caption in column {col!r}")
                else:
                    row.update(status=OK, text=str(text))
                rows.append(row)
        return table(rows, CAPTIONS)


def build_captioner(cfg, input_caption_cols: list[str]):
    """A captioner object from one `captioners[]` config entry."""
    if cfg.backend == "source":
        cols = cfg.columns or input_caption_cols
        return SourceCaptioner(cfg.name, cols)
    raise ValueError(f"captioner {cfg.name!r}: unknown backend {cfg.backend!r}")
