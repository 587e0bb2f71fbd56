import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from localpairs_helpers import region_shards
from model.caft import build
from model.checkpoint import CheckpointError, load_model, load_state, read_model_file, save_checkpoint
from model.train import gather_others, param_groups, warmup_cosine
from pipeline.config import TrainSection

ROOT = Path(__file__).resolve().parents[1]


def world_shards(world, folder, per_shard=5):
    """Export-format shards (jpg + json with sentences and extra.split) from the synthetic world."""
    return region_shards(world, folder, per_shard, regions=False)


def tiny_cfg(**kw):
    base = dict(model="caft-tiny", steps=6, batch_size=4, warmup=2, log_every=1, ckpt_every=100, workers=0,
                n_sub=3, k_chunks=2, image_size=56, lr=1e-3, tensorboard=False, threads=1, epoch_samples=8)
    base.update(kw)
    return TrainSection(**base)


def losses(out):
    rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:
        if "loss" in r:
            by_step[r["step"]] = r["loss"]  # a resumed run repeats steps after its last checkpoint: keep the last
    return by_step


def test_schedule_and_weight_decay_groups():
    f = warmup_cosine(10, 110, 0.1)
    assert [round(f(s), 4) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    model = build("caft-tiny")
    decay, plain = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "whole_logit.log_scale" in plain_names and "part_logit.bias" in plain_names
    assert all(p.ndim >= 2 for p in decay["params"]) and not any(n.endswith(".bias") for n in decay_names)
    assert any("norm" in n for n in plain_names) and "text.sub.tok.weight" in decay_names
    # class tokens, position embeddings (CAFT: [1,1,D] and [77,D], [16,D] tables): no decay
    assert {"vision.cls", "text.cls", "text.chunk_pos", "text.sub.pos"} <= plain_names
    assert "vision.proj.weight" in decay_names and "pool.attn.in_proj_weight" in decay_names
    assert len(plain_names) + len(decay_names) == len(list(model.parameters()))
    from model.registry import build as build_any

    goal = build_any("goal-tiny")  # open_clip's spellings: class_embedding, positional_embedding, logit_scale
    g_names = {id(p): n for n, p in goal.named_parameters()}
    g_decay, g_plain = param_groups(goal, 0.2)
    assert {"clip.visual.class_embedding", "clip.visual.positional_embedding", "clip.positional_embedding",
            "clip.logit_scale"} <= {g_names[id(p)] for p in g_plain["params"]}
    assert "clip.token_embedding.weight" in {g_names[id(p)] for p in g_decay["params"]}


def _ddp_worker(rank, world, port, path, inputs):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build("caft-tiny")
    net = DDP(model)
    half = inputs[0].shape[0] // world
    part = [x[rank * half:(rank + 1) * half] for x in inputs]
    out = net(*part, gather=gather_others)
    out["loss"].backward()
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": {n: p.grad for n, p in model.named_parameters()}}, path)
    dist.destroy_process_group()


def test_two_processes_match_one_process_with_double_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(1)
    b = 4
    images = torch.rand(b, 3, 56, 56) * 2 - 1
    tokens = torch.randint(1, 49406, (b, 3, 77))
    tokens[..., 20] = 49407
    valid = torch.ones(b, 3, dtype=torch.bool)
    valid[1, 2] = valid[3, 1] = False
    whole = torch.tensor([[True, True, False]] * b)
    inputs = (images, tokens, valid, whole)
    torch.manual_seed(0)
    model = build("caft-tiny")
    out = model(*inputs)
    out["loss"].backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(2, port, path, inputs), nprocs=2, start_method="spawn")
    ddp = torch.load(path, weights_only=True)
    # tolerance: float32 sums in another order (1e-5 relative on the loss, 1e-4 on gradients)
    assert torch.allclose(ddp["loss"], out["loss"].detach(), rtol=1e-5), (ddp["loss"], out["loss"])
    worst = max((ddp["grads"][n] - p.grad).abs().max().item() / (p.grad.abs().max().item() + 1e-8)
                for n, p in model.named_parameters())
    assert worst < 1e-4, worst


def _train_cmd(cfg_path, *extra):
    return [sys.executable, "-m", "workflows.cli", "train", str(cfg_path), *extra]


def test_kill_and_resume_reproduce_the_uninterrupted_losses(world, tmp_path):
    urls = world_shards(world, tmp_path / "shards")
    from model.train import train

    full = train(tiny_cfg(), urls, tmp_path / "full")
    assert full["step"] == 6
    want = losses(tmp_path / "full")

    # SIGKILL at a random point after step 3 has been logged; checkpoints every 2 steps
    out = tmp_path / "killed"
    cfg = tiny_cfg(ckpt_every=2, shards=urls, out=str(out)).model_dump(mode="json")
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_train_cmd(cfg_path), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(losses(out))
    assert 3 <= done < 6, f"the run should have been killed mid-way, it logged {done} steps"

    # SIGTERM: a graceful stop writes a checkpoint at the step it stops
    proc = subprocess.Popen(_train_cmd(cfg_path, "steps=6"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start = len([1 for _ in Path(out, "metrics.jsonl").read_text().splitlines()])
    while time.time() < deadline and proc.poll() is None:
        if len(Path(out, "metrics.jsonl").read_text().splitlines()) > start:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    # resume to the end
    res = subprocess.run(_train_cmd(cfg_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "trained to step 6" in res.stdout
    got = losses(out)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), (step, got, want)


def test_checkpoints_refuse_other_files_without_unpickling(tmp_path):
    model = build("caft-tiny")
    opt = torch.optim.AdamW(model.parameters())
    ck = save_checkpoint(tmp_path / "run", model, {"optimizer": opt.state_dict(), "step": 1}, {"model": "caft-tiny"})
    assert load_model(tmp_path / "run").cfg.name == "caft-tiny"
    assert load_state(ck)["step"] == 1

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pickled = tmp_path / "model.safetensors"
    torch.save({"w": Evil()}, pickled)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_model_file(pickled)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a longcap model checkpoint"):
        load_model(foreign)
    torch.save({"step": 2, "x": Evil()}, Path(ck) / "state.pt")
    with pytest.raises(CheckpointError, match="refused without unpickling"):
        load_state(ck)
    assert not marker.exists()
    # the CLI names the file and the reason, no traceback
    res = subprocess.run([sys.executable, "-m", "workflows.cli", "export-model", str(pickled), str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and "not a safetensors file" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()


def test_export_model_scores_like_the_trained_model(world, tmp_path):
    from model.train import train
    from workflows.cli import main

    urls = world_shards(world, tmp_path / "shards")
    train(tiny_cfg(steps=2), urls, tmp_path / "t")
    assert main(["export-model", str(tmp_path / "t"), str(tmp_path / "m.safetensors")]) == 0
    a, b = load_model(tmp_path / "t"), load_model(tmp_path / "m.safetensors")
    x = torch.rand(2, 3, 56, 56)
    assert torch.equal(a.encode_image(x)["cls"], b.encode_image(x)["cls"])
    _, meta = read_model_file(tmp_path / "m.safetensors")
    assert json.loads(meta["config"])["name"] == "caft-tiny" and meta["step"] == "2"


def test_training_writes_tensorboard_event_files_with_the_logged_losses(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from model.train import train

    urls = world_shards(world, tmp_path / "shards")
    train(tiny_cfg(steps=2, tensorboard=True), urls, tmp_path / "t")
    assert list((tmp_path / "t" / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "t" / "tensorboard"))
    events.Reload()
    logged = losses(tmp_path / "t")
    got = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(got) == sorted(logged) == [1, 2]
    assert all(abs(got[s] - logged[s]) < 1e-5 for s in got)  # the same numbers as metrics.jsonl


def test_resume_refuses_another_architecture(world, tmp_path):
    from model.train import train

    urls = world_shards(world, tmp_path / "shards")
    train(tiny_cfg(steps=1), urls, tmp_path / "t")
    with pytest.raises(CheckpointError, match="trained with model='caft-tiny'"):
        train(tiny_cfg(steps=2, model="flair-tiny"), urls, tmp_path / "t")


def test_fsspec_shards_and_split_filter(world, tmp_path):
    import fsspec

    from model.data import DataConfig, dataset, expand_shards

    urls = world_shards(world, tmp_path / "shards")
    fs = fsspec.filesystem("memory")
    for u in urls:
        fs.pipe(f"/longcap-test/{Path(u).name}", Path(u).read_bytes())
    remote = expand_shards(["memory:///longcap-test/*.tar"])
    assert len(remote) == len(urls) and remote[0].startswith("memory://")
    cfg = DataConfig(train=False, batch_size=100, n_sub=2, k_chunks=1, image_size=56, where={"split": "test"})
    keys = [k for b in dataset(remote, cfg) for k in b["keys"]]
    truth = pq.read_table(world / "truth.parquet").to_pylist()
    assert len(keys) == sum(r["split"] == "test" for r in truth) > 0


def test_caft_scorer_embeds_like_the_model(world, tmp_path):
    import numpy as np
    from PIL import Image

    from model.data import image_transform, tokenize
    from model.scorer import CaftScorer
    from model.train import train

    urls = world_shards(world, tmp_path / "shards")
    train(tiny_cfg(steps=1), urls, tmp_path / "t")
    scorer = CaftScorer(str(tmp_path / "t"))
    assert scorer.image_size == 56 and scorer.name.endswith("@1")
    imgs = [Image.open(p) for p in sorted((world / "images").glob("*.jpg"))[:3]]
    texts = ["A small red square.", "The background is white."]
    iv, tv = scorer.encode_images(imgs), scorer.encode_texts(texts)
    assert iv.shape == (3, 64) and tv.shape == (2, 64)
    assert np.allclose(np.linalg.norm(iv, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(tv, axis=1), 1, atol=1e-5)
    m = scorer.model
    with torch.no_grad():
        cls = m.encode_image(torch.stack([image_transform(56)(im.convert("RGB")) for im in imgs]))["cls"]
        ones = torch.ones(2, 1, dtype=torch.bool)
        whole = m.encode_text(tokenize(texts).unsqueeze(1), ones, ones)["whole"]
    assert np.allclose(iv, torch.nn.functional.normalize(cls, dim=-1).numpy(), atol=1e-5)
    assert np.allclose(tv, torch.nn.functional.normalize(whole, dim=-1).numpy(), atol=1e-5)
