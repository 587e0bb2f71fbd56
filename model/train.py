"""The trainer: one function that every launcher calls (one process, local DDP processes, Ray Train workers).

DDP (gloo on CPU, NCCL on GPU), bf16 autocast on GPU, AdamW without weight decay on biases, norms, class
tokens, position embeddings and logit parameters, warmup + cosine, gradient clipping, logit-scale clamp, optional gradient
checkpointing, gradient accumulation, sigmoid losses with every rank's features as negatives
(all-gather with gradients), metrics to JSONL + TensorBoard, a periodic evaluation, checkpoints that
resume exactly (data position included), and a graceful stop on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist

from .registry import all_configs, build
from .checkpoint import CheckpointError, latest, load_state, read_model_file, read_train_json, save_checkpoint
from .data import DataConfig, loader

log = logging.getLogger("longcap.train")
ARCH_KEYS = ("model", "model_changes")


class TrainConfigError(ValueError):
    """A training config that cannot run; the message names the key."""  # a checkpoint of another architecture is refused


@dataclass
class EvalSpec:
    """What the evaluation hook measures (rank 0): retrieval on `urls`, and synthetic grounding with `truth`
    (grouping models: phrase tIoU/F1 on the truth's phrases, and on Flickr30K Entities at `phrases`)."""
    urls: list[str]
    where: dict = field(default_factory=dict)
    truth: str | None = None  # truth.parquet of a synthetic world
    phrases: str | None = None  # a local Flickr30K Entities copy (grouping models)
    image_size: int = 224
    k_chunks: int = 4
    batch_size: int = 32


def run_eval(model, spec: EvalSpec, device: str = "cpu") -> dict:
    from .evaluate import encode_shards, read_truth, retrieval, synthetic_grounding

    if hasattr(model, "evaluate"):  # GOAL, grouping: their own measures
        was_training = model.training
        out = model.evaluate(spec, device)
        model.train(was_training)
        return out
    # a text is one caption: its K balanced chunks (as `longcap eval`), no extra sub-captions
    data = DataConfig(image_size=spec.image_size, n_sub=spec.k_chunks, k_chunks=spec.k_chunks, train=False,
                      batch_size=spec.batch_size, where=spec.where or None)
    was_training = model.training
    out = {"retrieval": retrieval(model, encode_shards(model, spec.urls, data, device))}
    if spec.truth and model.cfg.part_loss:  # grounding needs the trained attention pooling
        out["grounding"] = synthetic_grounding(model, spec.urls, read_truth(spec.truth), data, device)
    model.train(was_training)
    return out


# parameters that are class tokens or position embeddings, by their own name (last dotted part): CAFT's
# vision/text [CLS] and position tables, open_clip's and transformers' spellings (GOAL, GroupViT)
TOKEN_NAMES = {"cls", "cls_token", "class_embedding", "pos", "chunk_pos", "pos_embed", "positional_embedding",
               "position_embedding", "position_embeddings"}


def no_decay(name: str, p) -> bool:
    """No weight decay: biases, norms, gains (ndim < 2), class tokens, position embeddings, logit parameters."""
    last = name.rsplit(".", 1)[-1]
    return (p.ndim < 2 or "norm" in name or last == "bias" or "logit" in name or last in TOKEN_NAMES
            or name.rsplit(".", 2)[-2:-1] == ["position_embedding"])  # nn.Embedding position tables: <name>.weight


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def gather_others(x: torch.Tensor) -> torch.Tensor:
    """Every other rank's x, in rank order; floating tensors keep their gradients (all_gather backward)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if x.is_floating_point():
        parts = torch.distributed.nn.functional.all_gather(x)
    else:
        parts = [torch.empty_like(x, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(parts, x.to(torch.uint8))
        parts = [p.to(x.dtype) for p in parts]
    return torch.cat([p for i, p in enumerate(parts) if i != rank])


class _StopFlag:
    """SIGTERM -> finish the current step, checkpoint, exit. Only the main thread can install it."""

    def __init__(self):
        self.set = False
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._handle)
        else:
            self.old = None

    def _handle(self, signum, frame):
        log.warning("SIGTERM: stopping after this step with a checkpoint")
        self.set = True

    def restore(self):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


class Metrics:
    """metrics.jsonl (append) and TensorBoard, on rank 0."""

    def __init__(self, out: str, enabled: bool, tensorboard: bool):
        self.enabled, self.path, self.tb = enabled, f"{out}/metrics.jsonl", None
        if enabled and tensorboard and "://" in str(out) and not str(out).startswith("file://"):
            # TensorBoard's gfile talks to object storage with its own client, not fsspec's options (seen
            # failing against an S3 endpoint that fsspec reached): off there; metrics.jsonl has the same values
            log.warning("TensorBoard logging off for %s (object storage); metrics.jsonl has every value", out)
        elif enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(f"{out}/tensorboard")
            except ImportError as e:
                log.warning("TensorBoard logging off: %s", e)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with fsspec.open(self.path, "a") as f:  # local or any fsspec URL (s3fs appends by rewriting the object)
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in _flat(row).items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        import os
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _mean_over_ranks(values: dict, world: int) -> dict:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _check_resume(ckpt: str, cfg_dict: dict) -> None:
    saved = read_train_json(ckpt)
    diff = [k for k in ARCH_KEYS if saved.get(k) != cfg_dict.get(k)]
    if diff:
        raise CheckpointError(f"{ckpt}: trained with {', '.join(f'{k}={saved.get(k)!r}' for k in diff)}; the config "
                              f"says {', '.join(f'{k}={cfg_dict.get(k)!r}' for k in diff)}. Use another train.out.")
    for k in ("batch_size", "lr", "seed", "n_sub", "k_chunks", "image_size", "accum"):
        if saved.get(k) != cfg_dict.get(k):
            log.warning("resuming %s with %s=%r (checkpoint: %r)", ckpt, k, cfg_dict.get(k), saved.get(k))


def train(cfg, shards: list[str], out: str | Path, eval_spec: EvalSpec | None = None,
          device: str | None = None, epoch_samples: int | None = None, stop_after: int | None = None) -> dict:
    """Train `cfg` (a TrainSection) on export shards; checkpoints and metrics in `out`. Resumes from `out`.

    stop_after: leave after this many steps in this call (as if stopped), for tests and time slicing.
    """
    if cfg.model not in all_configs():
        raise TrainConfigError(f"train.model {cfg.model!r} is not a known model; known: {', '.join(all_configs())}")
    rank, world, local_rank = _dist_info()
    if cfg.batch_size % (world * cfg.accum):
        raise TrainConfigError(f"train.batch_size {cfg.batch_size} is not divisible by processes x accum "
                         f"({world} x {cfg.accum})")
    per_rank = cfg.batch_size // (world * cfg.accum)
    cuda = torch.cuda.is_available() and device != "cpu"
    device = device or (f"cuda:{local_rank}" if cuda else "cpu")
    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, shards, str(out).rstrip("/"), eval_spec, device, cuda, rank, world, local_rank, per_rank,
                      epoch_samples, stop_after)
    finally:
        torch.set_num_threads(prev_threads)


def _train(cfg, shards, out, eval_spec, device, cuda, rank, world, local_rank, per_rank, epoch_samples, stop_after):
    fs, out_path = fsspec.core.url_to_fs(out)  # a local folder or any fsspec URL (s3://...)
    fs.makedirs(out_path, exist_ok=True)
    cfg_dict = cfg.model_dump(mode="json")

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    try:
        model = build(cfg.model, **cfg.model_changes).to(device)
    except ValueError as e:  # a bad model_changes value, an unusable pretrained or CAFT checkpoint: named, no traceback
        raise TrainConfigError(f"train.model {cfg.model!r} with model_changes {cfg.model_changes}: {e}") from None
    want = getattr(model, "input_size", None)
    if want and want != cfg.image_size:
        raise TrainConfigError(f"train.image_size is {cfg.image_size} but model {cfg.model} takes {want} px images "
                               f"(set train.image_size: {want}, or model_changes.image_size)")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr))
    step, epoch, micro = 0, 0, 0  # micro: micro-batches consumed in this data epoch
    ckpt = latest(out)
    if ckpt is not None:
        _check_resume(ckpt, cfg_dict)
        weights, _ = read_model_file(f"{ckpt}/model.safetensors")
        model.load_state_dict(weights)
        state = load_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, micro = int(state["step"]), int(state["epoch"]), int(state["micro"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate((state["rng_python"][0], tuple(state["rng_python"][1]), state["rng_python"][2]))
        if rank == 0:
            log.info("resumed %s at step %d (data epoch %d, micro-batch %d)", ckpt, step, epoch, micro)
    model.train()
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[local_rank] if cuda else None,
                  find_unused_parameters=getattr(model, "find_unused_parameters", not getattr(model.cfg, "part_loss", True)))
    gather = gather_others if world > 1 else None
    bf16 = cuda and cfg.precision in ("auto", "bf16")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if cfg.sampling == "epoch" and cfg.epoch_samples and rank == 0:
        log.warning("train.epoch_samples=%d has no effect with sampling: epoch (a data epoch is one pass over the "
                    "shards); set sampling: resampled to use it", cfg.epoch_samples)
    epoch_samples = cfg.epoch_samples or epoch_samples or per_rank * 100
    context = "spawn" if "ray" in sys.modules and sys.modules["ray"].is_initialized() else None

    def batches(ep: int):
        data = DataConfig(image_size=cfg.image_size, n_sub=cfg.n_sub, k_chunks=cfg.k_chunks, batch_size=per_rank,
                          train=True, seed=cfg.seed, epoch=ep, resampled=cfg.sampling == "resampled",
                          epoch_samples=epoch_samples,
                          rank=rank, world_size=world, where=cfg.train_where or None, **_data_options(model))
        return iter(loader(shards, data, num_workers=cfg.workers, context=context))

    def draw():
        """The next micro-batch. sampling: epoch: when any rank's pass is done, every rank starts the next data
        epoch together (DDP needs the same step count everywhere); what the others had left of that pass is
        dropped, as drop_last would (none when the shards split evenly into whole batches)."""
        nonlocal it, epoch, micro
        for fresh in (False, True):
            batch = next(it, None)
            if world > 1 and cfg.sampling == "epoch":
                have = torch.tensor([0 if batch is None else 1], device=device)
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
                batch = batch if have.item() else None
            if batch is not None:
                micro += 1
                return batch
            if fresh:
                raise TrainConfigError(f"a data epoch of {len(shards)} shard(s) gives no full batch of "
                                       f"{per_rank} per process (train.batch_size / processes / accum)")
            epoch, micro = epoch + 1, 0
            it = batches(epoch)

    metrics = Metrics(out, rank == 0, cfg.tensorboard)
    keys_log = f"{out}/keys-rank{rank}.jsonl" if cfg.record_keys else None
    stop = _StopFlag()
    it = batches(epoch)
    for _ in range(micro):  # resume: the same stream, at the same place
        next(it)
    start_step, t_log, samples, data_s = step, time.time(), 0, 0.0
    running: dict[str, float] = {}
    result = {"stopped": False}
    try:
        while step < cfg.steps:
            t_step = time.time()
            for a in range(cfg.accum):
                t0 = time.time()
                batch = draw()
                data_s += time.time() - t0
                if keys_log:
                    with fsspec.open(keys_log, "a") as f:
                        f.write(json.dumps({"step": step + 1, "epoch": epoch, "micro": micro, "rank": rank,
                                            "keys": list(batch.get("keys", []))}) + "\n")
                sync = net.no_sync() if world > 1 and a < cfg.accum - 1 else contextlib.nullcontext()
                with sync, amp():
                    losses = net(**_inputs(model, batch, device), gather=gather)
                (losses["loss"] / cfg.accum).backward()
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + v.item() / cfg.accum
                samples += batch["image"].shape[0]
            if cfg.grad_clip:
                running["grad_norm"] = running.get("grad_norm", 0.0) + float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            model.clamp_logit_scales()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = (step - 1) % cfg.log_every + 1
                avg = _mean_over_ranks({k: v / n for k, v in running.items()}, world)
                dt = time.time() - t_log
                row = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in avg.items()},
                       "lr": sched.get_last_lr()[0], **_logit_scales(model), "samples_per_s": round(samples * world / dt, 2),
                       "data_share": round(data_s / dt, 3), "step_s": round(time.time() - t_step, 3),
                       "world_size": world, "time": time.time()}
                metrics.write(row)
                if rank == 0:
                    log.info("step %d/%d loss %.4f (%s) %.1f samples/s", step, cfg.steps, avg["loss"],
                             ", ".join(f"{k} {v:.3f}" for k, v in avg.items() if k not in ("loss", "grad_norm")),
                             row["samples_per_s"])
                result["last"] = row
                running, samples, data_s, t_log = {}, 0, 0.0, time.time()
            stopping = stop.set or (stop_after is not None and step - start_step >= stop_after)
            if world > 1:  # every rank stops together when any got the signal
                flag = torch.tensor([1 if stopping else 0], device=device)
                dist.all_reduce(flag)
                stopping = bool(flag.item())
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                _save(out, model, opt, sched, step, epoch, micro, cfg_dict, cfg.keep, rank, world)
            if eval_spec and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                _eval(model, eval_spec, device, step, metrics, rank, world)
            if stopping:
                result["stopped"] = True
                break
        if eval_spec and not result["stopped"]:
            result["eval"] = _eval(model, eval_spec, device, step, metrics, rank, world)
    finally:
        stop.restore()
        metrics.close()
    result.update(step=step, out=str(out), checkpoint=latest(out) if rank == 0 else None)
    return result


def _data_options(model) -> dict:
    """Loader fields a model kind needs (CAFT: none beyond the defaults)."""
    return model.data_options() if hasattr(model, "data_options") else {}


def _inputs(model, batch: dict, device) -> dict:
    """forward()'s keyword arguments from a batch."""
    if hasattr(model, "batch_inputs"):
        return model.batch_inputs(batch, device)
    return {"images": batch["image"].to(device), **{k: batch[k].to(device) for k in ("tokens", "valid", "whole")}}


def _logit_scales(model) -> dict:
    if hasattr(model, "logit_scales"):
        return model.logit_scales()
    return {"scale_whole": model.whole_logit.scale().item(), "scale_part": model.part_logit.scale().item()}


def _save(out, model, opt, sched, step, epoch, micro, cfg_dict, keep, rank, world) -> None:
    if rank == 0:
        rs = random.getstate()
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
                 "micro": micro, "rng_torch": torch.get_rng_state(), "rng_python": [rs[0], list(rs[1]), rs[2]]}
        save_checkpoint(out, model, state, cfg_dict, keep)
    if world > 1:
        dist.barrier()


def _eval(model, spec, device, step, metrics, rank, world) -> dict | None:
    res = None
    if rank == 0:
        res = run_eval(model, spec, device)
        metrics.write({"step": step, "eval": res})
        log.info("eval at step %d: %s", step, json.dumps(res))
    if world > 1:
        dist.barrier()
    return res


