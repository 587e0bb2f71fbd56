"""Launching the trainer: one process, several local processes (DDP), or Ray Train's TorchTrainer.

All three call `model.train.train` with the same config; only the process group setup differs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger("longcap.training")


def plan(cfg, run_root: str | None = None) -> dict:
    """Shards, evaluation spec, output folder and data-epoch size for a TrainSection (in a run or alone)."""
    from model.data import expand_shards
    from model.train import EvalSpec, TrainConfigError
    from pipeline.storage import exists, parquet_rows

    if not cfg.shards and not run_root:
        raise TrainConfigError("train.shards is empty and there is no run directory to take export/*.tar from")
    from .rundir import RunDir

    run = RunDir(run_root) if run_root else None
    shards = expand_shards(cfg.shards or [run.export_shards()])
    eval_urls = expand_shards(cfg.eval_shards) if cfg.eval_shards else shards
    truth = run.truth() if run else None
    out = cfg.out or (run.models(cfg.model) if run else None)
    if not out:
        raise TrainConfigError("train.out is not set (where checkpoints go)")
    epoch_samples = None
    index = run.path("export", "index.parquet") if run else None
    if index and exists(index):
        world = max(cfg.processes, cfg.ray_workers, 1)
        # a resampled stream's "epoch" only sets how often the loader restarts: at least 50 batches
        epoch_samples = max(parquet_rows(index) // world, 50 * cfg.batch_size // world)
    spec = EvalSpec(eval_urls, where=cfg.eval_where, truth=truth, phrases=cfg.eval_phrases, image_size=cfg.image_size,
                    k_chunks=cfg.k_chunks)
    return {"shards": shards, "eval": spec, "out": out, "epoch_samples": epoch_samples}


def launch(cfg, p: dict) -> dict:
    if cfg.ray_workers:
        return train_on_ray(cfg, p)
    if cfg.processes > 1:
        return train_processes(cfg, p)
    from model.train import train
    return train(cfg, p["shards"], p["out"], p["eval"], epoch_samples=p["epoch_samples"])


# ---------------------------------------------------------------- local processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, world: int, port: int, cfg_json: dict, p: dict, result_path: str) -> None:
    import torch
    import torch.distributed as dist

    from model.train import EvalSpec, train
    from pipeline.config import TrainSection

    logging.basicConfig(level=os.environ.get("LONGCAP_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        spec = EvalSpec(**p["eval"]) if p["eval"] else None
        res = train(TrainSection(**cfg_json), p["shards"], p["out"], spec, epoch_samples=p["epoch_samples"])
        if rank == 0:
            Path(result_path).write_text(json.dumps(res, default=str))
    finally:
        dist.destroy_process_group()


def train_processes(cfg, p: dict) -> dict:
    """`cfg.processes` local processes (spawned), one per GPU when there are GPUs."""
    import torch.multiprocessing as mp

    q = dict(p, eval=asdict(p["eval"]) if p["eval"] else None)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.start_processes(_process, args=(cfg.processes, _free_port(), cfg.model_dump(mode="json"), q, result),
                           nprocs=cfg.processes, start_method="spawn")
        return json.loads(Path(result).read_text())


# ---------------------------------------------------------------- Ray Train


def _ray_loop(conf: dict) -> None:
    import ray.train
    import ray.train.torch

    from model.train import EvalSpec, train
    from pipeline.config import TrainSection

    device = str(ray.train.torch.get_device()) if conf["gpu"] else "cpu"
    spec = EvalSpec(**conf["eval"]) if conf["eval"] else None
    res = train(TrainSection(**conf["cfg"]), conf["shards"], conf["out"], spec, device=device,
                epoch_samples=conf["epoch_samples"])
    ray.train.report({"step": res["step"], "stopped": res["stopped"]})


def train_on_ray(cfg, p: dict) -> dict:
    """The same training through Ray Train's TorchTrainer (`ray.address` picks the cluster).

    Shards and `train.out` must be reachable from every worker (a shared or fsspec path)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpu = cfg.gpus_per_worker > 0
    per_worker = {"CPU": 1, **({"GPU": cfg.gpus_per_worker} if gpu else {})}
    try:  # Ray Train v1 runs a coordinator that wants a CPU; on a small machine give it none
        scaling = ScalingConfig(num_workers=cfg.ray_workers, use_gpu=gpu, resources_per_worker=per_worker,
                                trainer_resources={"CPU": 0})
    except DeprecationWarning:  # Ray Train v2: the controller takes no CPU
        scaling = ScalingConfig(num_workers=cfg.ray_workers, use_gpu=gpu, resources_per_worker=per_worker)
    out = str(Path(p["out"]).resolve()) if "://" not in p["out"] else p["out"]
    storage = str(Path(out, "ray").resolve()) if "://" not in out else f"{out}/ray"
    conf = {"cfg": cfg.model_dump(mode="json"), "shards": p["shards"], "out": out, "gpu": gpu,
            "eval": asdict(p["eval"]) if p["eval"] else None, "epoch_samples": p["epoch_samples"]}
    trainer = TorchTrainer(_ray_loop, train_loop_config=conf, scaling_config=scaling,
                           run_config=RunConfig(name="longcap-train", storage_path=storage))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train failed: {result.error}")
    return summary_from_files(out)


def summary_from_files(out: str) -> dict:
    """The result of a training run from what it wrote (metrics.jsonl, the latest checkpoint)."""
    from model.checkpoint import latest

    import fsspec

    with fsspec.open(f"{out}/metrics.jsonl", "r") as f:
        rows = [json.loads(x) for x in f.read().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    last = steps[-1] if steps else {}
    ck = latest(out)
    return {"step": last.get("step"), "last": last, "out": out, "checkpoint": ck,
            "eval": evals[-1]["eval"] if evals and evals[-1]["step"] == last.get("step") else None,
            "stopped": False}
