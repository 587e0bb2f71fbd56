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

import io
import json
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

FORMAT = "longcap-model"


class CheckpointError(ValueError):
    """A file that is not a usable longcap checkpoint; the message says which file and why."""


def _fs(path) -> tuple:
    """(filesystem, path in it) of a local path or any fsspec URL."""
    import fsspec

    return fsspec.core.url_to_fs(str(path).rstrip("/"))


def _join(folder, name: str) -> str:
    return f"{str(folder).rstrip('/')}/{name}"


def save_model(model, path: str | Path, step: int = 0, extra: dict | None = None) -> None:
    from safetensors.torch import save

    cfg = model.cfg
    meta = {"format": FORMAT, "kind": getattr(model, "kind", "caft"), "config": json.dumps(asdict(cfg)),
            "step": str(step), "extra": json.dumps(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fs, p = _fs(path)
    fs.pipe_file(p, save(state, metadata=meta))


def _read_safetensors(fs, p: str, path: str) -> tuple[dict, dict]:
    """Tensors and metadata of a safetensors file: mapped from disk when local, else read whole."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    try:
        if "file" in fs.protocol:
            with safe_open(p, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    return {}, meta
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        data = fs.cat_file(p)
        n = int.from_bytes(data[:8], "little")
        try:
            meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        except (ValueError, AttributeError) as e:
            raise SafetensorError(f"header is not JSON: {e}") from None
        return (load(data) if meta.get("format") == FORMAT else {}), meta
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e}); longcap never unpickles checkpoints") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e


def read_model_file(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a longcap model file (a local path or any fsspec URL), or CheckpointError."""
    path = str(path)
    fs, p = _fs(path)
    if not fs.isfile(p):
        raise CheckpointError(f"{path}: no such checkpoint file")
    state, meta = _read_safetensors(fs, p, path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a longcap model checkpoint (metadata format="
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    return state, meta


def model_file(path: str | Path) -> str:
    """The model.safetensors of a training folder (its latest checkpoint), a step-* folder, or a model file."""
    fs, p = _fs(path)
    if fs.isdir(p):
        ck = latest(path)
        return _join(ck if ck is not None else path, "model.safetensors")
    return str(path)


def load_model(path: str | Path, device: str = "cpu"):
    """A model (CAFT, GOAL or grouping, from the file's `kind`) from a model file or a checkpoint folder."""
    from .registry import config_from_fields, from_config

    p = model_file(path)
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


def resolve(folder: str | Path) -> str:
    """The newest complete checkpoint in a training folder (a local path or an fsspec URL)."""
    fs, p = _fs(folder)
    name = fs.cat_file(_join(p, "latest")).decode().strip()
    return _join(folder, name)


def latest(folder: str | Path) -> str | None:
    fs, p = _fs(folder)
    return resolve(folder) if fs.isfile(_join(p, "latest")) else None


def read_train_json(ckpt: str | Path) -> dict:
    """The training config saved with a checkpoint (train.json)."""
    fs, p = _fs(ckpt)
    return json.loads(fs.cat_file(_join(p, "train.json")))


def save_checkpoint(folder: str | Path, model, state: dict, train_cfg: dict, keep: int = 2) -> str:
    """Write step-N/, then point `latest` at it (written last, by rename), so `latest` names only complete
    checkpoints. Locally step-N/ is written under a tmp name and renamed; an object store has no folder
    rename, so there the files go straight into step-N/ (unreferenced until `latest` names it)."""
    fs, root = _fs(folder)
    local = "file" in fs.protocol
    fs.makedirs(root, exist_ok=True)
    step = int(state["step"])
    name = f"step-{step:07d}"
    final = _join(root, name)
    if fs.exists(final):
        fs.rm(final, recursive=True)
    stage = _join(root, f".tmp-{name}-{uuid.uuid4().hex[:8]}") if local else final
    fs.makedirs(stage, exist_ok=True)
    save_model(model, _join(folder, stage.rsplit("/", 1)[1] + "/model.safetensors"), step)
    buf = io.BytesIO()
    torch.save(state, buf)
    fs.pipe_file(_join(stage, "state.pt"), buf.getvalue())
    fs.pipe_file(_join(stage, "train.json"), json.dumps(train_cfg, indent=2, default=str).encode())
    if local:
        fs.mv(stage, final)
    pointer = _join(root, f".latest-{uuid.uuid4().hex[:8]}")
    fs.pipe_file(pointer, (name + "\n").encode())
    fs.mv(pointer, _join(root, "latest"))
    entries = fs.ls(root, detail=True)
    done = sorted(e["name"] for e in entries
                  if e["type"] == "directory" and e["name"].rsplit("/", 1)[-1].startswith("step-"))
    for old in done[:-keep]:
        fs.rm(old, recursive=True)
    for e in entries:
        if e["name"].rsplit("/", 1)[-1].startswith(".tmp-"):
            fs.rm(e["name"], recursive=True)
    return _join(folder, name)


def load_state(ckpt: str | Path) -> dict:
    path = _join(ckpt, "state.pt")
    try:
        fs, p = _fs(path)
        return torch.load(io.BytesIO(fs.cat_file(p)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means: not a checkpoint we wrote
        raise CheckpointError(f"{path}: not a longcap training state (refused without unpickling objects: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
