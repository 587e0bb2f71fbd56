"""Checkpoints without pickle.

A training checkpoint is a folder `step-NNNNNNN/` holding
- `model.safetensors`: weights, metadata `format=longcap-model`, `kind` (caft | goal | grouping; absent in
  older files: caft), `config` (the model's config dataclass as JSON), `step`;
- `state.pt`: optimizer, scheduler, step, data position, RNG, read back with `torch.load(weights_only=True)`
  (tensors, numbers, strings, lists and dicts only: no arbitrary objects are ever unpickled);
- `train.json`: the training config, for people and for the resume check.
`latest` (a text file) names the newest complete one; it is written last, by rename, so a checkpoint that
was being written when the process died is never picked up. An exported model is `model.safetensors` alone.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

FORMAT = "longcap-model"


class CheckpointError(ValueError):
    """A file that is not a usable longcap checkpoint; the message says which file and why."""


def save_model(model, path: str | Path, step: int = 0, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    cfg = model.cfg
    meta = {"format": FORMAT, "kind": getattr(model, "kind", "caft"), "config": json.dumps(asdict(cfg)),
            "step": str(step), "extra": json.dumps(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def read_model_file(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a longcap model file, or CheckpointError naming the reason."""
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a longcap model checkpoint (metadata format="
                                      f"{meta.get('format')!r}, expected {FORMAT!r})")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e}); longcap never unpickles checkpoints") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    return state, meta


def load_model(path: str | Path, device: str = "cpu"):
    """A model (CAFT, GOAL or grouping, from the file's `kind`) from a model file or a checkpoint folder."""
    from .registry import config_from_fields, from_config

    p = Path(path)
    if p.is_dir():
        p = resolve(p) / "model.safetensors" if (p / "latest").exists() else p / "model.safetensors"
    state, meta = read_model_file(p)
    kind = meta.get("kind", "caft")
    try:
        cfg = config_from_fields(kind, json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: model config in the metadata is unusable: {e}") from e
    model = from_config(kind, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{p}: weights do not match config {cfg.name!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.trained_steps = int(meta.get("step", 0))
    return model.to(device).eval()


def resolve(folder: str | Path) -> Path:
    """The newest complete checkpoint in a training folder."""
    folder = Path(folder)
    name = (folder / "latest").read_text().strip()
    return folder / name


def latest(folder: str | Path) -> Path | None:
    folder = Path(folder)
    return resolve(folder) if (folder / "latest").exists() else None


def save_checkpoint(folder: str | Path, model, state: dict, train_cfg: dict, keep: int = 2) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    name = f"step-{step:07d}"
    tmp = folder / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_model(model, tmp / "model.safetensors", step)
    torch.save(state, tmp / "state.pt")
    (tmp / "train.json").write_text(json.dumps(train_cfg, indent=2, default=str))
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = folder / f".latest-{uuid.uuid4().hex[:8]}"
    pointer.write_text(name + "\n")
    pointer.replace(folder / "latest")
    done = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_state(ckpt: Path) -> dict:
    path = ckpt / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means: not a checkpoint we wrote
        raise CheckpointError(f"{path}: not a longcap training state (refused without unpickling objects: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
