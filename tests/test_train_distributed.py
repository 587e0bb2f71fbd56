"""Distributed training as users launch it: `longcap train` with `processes: 2` (the local DDP launcher) and
`ray_workers: 2` (Ray Train) against one process with the same global batch (twice the per-process batch).

12 synthetic samples in 6 shards of 2; global batch 4, so a process of two holds one whole shard per step and a
data epoch is 3 steps. Both the losses and the weights after step 1 and at the end must match, and the keys each
rank trained on (train.record_keys) must cover every sample once per data epoch with no rank reading another's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from localpairs_helpers import region_shards
from model.checkpoint import read_model_file
from pipeline.config import TrainSection

ROOT = Path(__file__).resolve().parents[1]
N, PER_SHARD, BATCH, STEPS = 12, 2, 4, 6


def cfg_for(urls, out, **kw):
    base = dict(model="caft-tiny", steps=STEPS, batch_size=BATCH, warmup=2, log_every=1, ckpt_every=1, keep=STEPS,
                workers=0, n_sub=3, k_chunks=2, image_size=56, lr=1e-3, tensorboard=False, threads=1,
                record_keys=True, shards=urls, out=str(out))
    base.update(kw)
    return TrainSection(**base)


def rows(out, name="metrics.jsonl"):
    return [json.loads(x) for x in Path(out, name).read_text().splitlines() if x.strip()]


def weights(out, step):
    return read_model_file(Path(out) / f"step-{step:07d}" / "model.safetensors")[0]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """Shards, and one process trained on them with the global batch."""
    from model.train import train

    tmp = tmp_path_factory.mktemp("dist")
    urls = region_shards(world, tmp / "shards", per_shard=PER_SHARD, regions=False, limit=N)
    assert len(urls) == N // PER_SHARD
    res = train(cfg_for(urls, tmp / "one"), urls, tmp / "one")
    assert res["step"] == STEPS
    return urls, tmp / "one"


def check_same_training(one, many, world_size):
    a = {r["step"]: r for r in rows(one) if "loss" in r}
    b = {r["step"]: r for r in rows(many) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(b[s]["world_size"] == world_size for s in b)
    # Tolerance. The runs add the same float32 terms in another order (each rank sums its half of the pairwise
    # sigmoid terms and DDP averages the ranks' gradients), and metrics.jsonl rounds to 6 decimals. Measured here
    # (2026-11-30): losses and gradient norms agree to 7e-7 relative, weights to 3e-7 absolute after 1 and 6 steps.
    # Allowed: 1e-5 relative and 1e-5 absolute (1% of one lr=1e-3 step). A wrong batch (one other sample, or a
    # rank's half missing) moves the loss by more than 1e-2, and under Adam a single gradient element that differs
    # in sign moves its weight by 2e-3 at step 1.
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), (s, a[s]["loss"], b[s]["loss"])
        # gradient fingerprint: the global gradient norm before clipping, after DDP's all-reduce
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-5), (s, a[s], b[s])
    for step in (1, STEPS):  # the weights themselves after the first and the last step
        wa, wb = weights(one, step), weights(many, step)
        assert wa.keys() == wb.keys()
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst < 1e-5, (step, worst)


def check_keys(one, many, urls, world_size):
    """Per data epoch, the ranks' keys are disjoint and together every sample once; per step, the ranks' keys
    together are the one-process batch; each rank's keys come from its own shards only."""
    import webdataset as wds

    shard_of = {s["__key__"]: u for u in urls for s in wds.WebDataset(u, shardshuffle=False, empty_check=False)}
    assert len(shard_of) == N
    ref = {r["step"]: set(r["keys"]) for r in rows(one, "keys-rank0.jsonl")}
    by_rank = [rows(many, f"keys-rank{r}.jsonl") for r in range(world_size)]
    per_step: dict[int, list] = {}
    per_epoch: dict[int, list] = {}
    for r, recs in enumerate(by_rank):
        assert [x["step"] for x in recs] == list(range(1, STEPS + 1))
        for x in recs:
            per_step.setdefault(x["step"], []).extend(x["keys"])
            per_epoch.setdefault(x["epoch"], []).extend(x["keys"])
        for ep in (0, 1):  # a data epoch deals the shards out anew; within one, no shard goes to two ranks
            shards = {shard_of[k] for x in recs if x["epoch"] == ep for k in x["keys"]}
            others = {shard_of[k] for q, o in enumerate(by_rank) if q != r for x in o if x["epoch"] == ep
                      for k in x["keys"]}
            assert not shards & others, f"epoch {ep}: rank {r} read a shard another rank read: {shards & others}"
    assert sorted(per_epoch) == [0, 1]
    for ep, keys in per_epoch.items():
        assert sorted(keys) == sorted(shard_of), f"data epoch {ep}: {len(keys)} keys, {len(set(keys))} distinct"
    for s, keys in per_step.items():
        assert len(keys) == BATCH and set(keys) == ref[s], (s, keys, ref[s])


@pytest.mark.slow
def test_longcap_train_two_processes_matches_one_process(reference, tmp_path):
    urls, one = reference
    out = tmp_path / "two"
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_for(urls, out).model_dump(mode="json")))
    res = subprocess.run([sys.executable, "-m", "workflows.cli", "train", str(cfg_path), "processes=2"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"trained to step {STEPS}" in res.stdout
    check_same_training(one, out, 2)
    check_keys(one, out, urls, 2)


@pytest.mark.slow
def test_ray_train_two_workers_matches_one_process(ray_session, reference, tmp_path):
    from model.checkpoint import load_model
    from workflows.training import launch, plan

    urls, one = reference
    out = tmp_path / "ray"
    cfg = cfg_for(urls, out, ray_workers=2)
    res = launch(cfg, plan(cfg))
    assert res["step"] == STEPS and load_model(out).cfg.name == "caft-tiny"
    check_same_training(one, out, 2)
    check_keys(one, out, urls, 2)


def test_an_epoch_without_one_full_batch_is_refused(reference, tmp_path):
    from model.train import TrainConfigError, train

    urls, _ = reference
    with pytest.raises(TrainConfigError, match="no full batch of 16"):
        train(cfg_for(urls[:1], tmp_path / "x", batch_size=16, steps=1), urls[:1], tmp_path / "x")
