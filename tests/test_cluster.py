"""Several Ray nodes on one machine (issue 18 item 3): a head and two worker nodes (ray.cluster_utils.Cluster,
each node its own raylet and resources), the pipeline driven by `longcap run` with `ray.address` on an S3 run
directory (moto on 127.0.0.1). One worker node's raylet is SIGKILLed mid-run, while a worker of that node is
frozen (SIGSTOP) in the middle of a shard: the shard is retried, the run finishes on the other node,
every URL is accounted for, and the outputs equal a clean run's.

The driver runs in a subprocess: this test process may already hold the session's local Ray, and a process
joins one cluster at a time. Workers get longcap from the install (`pip install -e .`), as on a real cluster
with an image that has it.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import psutil
import pytest
import yaml

from conftest import demo_config
from reliability.invariants import accounted, content_hashes, no_duplicates_and_nothing_lost

ROOT = Path(__file__).resolve().parents[1]


def _driver(cfg_path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workflows.cli", "run", str(cfg_path), "--no-progress"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), LONGCAP_LOG="INFO"))


def _config(tmp_path, run: str, address: str, name: str) -> Path:
    cfg = demo_config(run, **{"ray.address": address, "ray.shard_retries": 3, "run.shard_size": 2,
                              "input.synthetic.families": 4, "input.synthetic.image_size": 96,
                              "download.image_size": 96})
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


_BUSY = ("ray::_shard_task", "ray::_StageActor.run", "ray::_dedup_task")  # Ray's process titles while running one


def _freeze_busy_worker(raylet_pid: int, driver: subprocess.Popen, deadline: float) -> psutil.Process | None:
    """SIGSTOP a worker of this raylet while it runs a shard (Ray retitles a worker `ray::<task>` while it
    executes and replies to the owner only after the title is reset, so a worker stopped with a busy title has
    not returned its shard). None if the run ended first."""
    while time.time() < deadline and driver.poll() is None:
        for p in psutil.Process(raylet_pid).children(recursive=True):
            try:
                if not " ".join(p.cmdline()).startswith(_BUSY):
                    continue
                p.suspend()
                title = " ".join(p.cmdline())
                if title.startswith(_BUSY):
                    return p
                p.resume()
            except psutil.Error:
                continue
        time.sleep(0.02)
    return None


def _local_copy(run: str, dest: Path) -> Path:
    fs, base = fsspec.core.url_to_fs(run)
    fs.get(base + "/", str(dest) + "/", recursive=True)
    return dest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_node_killed_mid_run_the_run_finishes_on_the_other(s3_bucket, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        # two worker nodes of 2 CPUs each; the head schedules only (as on a real cluster)
        workers = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
        cluster.wait_for_nodes()
        clean, faulted = f"{s3_bucket}/clean", f"{s3_bucket}/faulted"
        # the clean run, on the same cluster
        log = tmp_path / "clean.log"
        assert _driver(_config(tmp_path, clean, cluster.address, "clean"), log).wait(600) == 0, log.read_text()[-3000:]

        # the faulted run: once the first shard is committed, freeze a worker of the second node mid-shard and
        # SIGKILL that node's raylet
        log = tmp_path / "faulted.log"
        proc = _driver(_config(tmp_path, faulted, cluster.address, "faulted"), log)
        fs, base = fsspec.core.url_to_fs(faulted)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if fs.glob(f"{base}/images/0000[0-9].parquet"):  # the first shard is in: others are in flight
                    break
            except OSError:
                pass
            time.sleep(0.2)
        raylet = workers[1].all_processes["raylet"][0].process
        frozen = _freeze_busy_worker(raylet.pid, proc, deadline)
        assert frozen, "no shard ran on the second node before the run ended: " + log.read_text()[-3000:]
        os.kill(raylet.pid, signal.SIGKILL)
        raylet.wait(30)  # dead: the node's shards from now on run on the other node
        # the frozen worker dies with its raylet (die_with_raylet's parent-death signal; SIGKILL ends a stopped
        # process too); alive, it would hold the driver's call open until gRPC's 5-minute keepalive
        try:
            frozen.wait(10)
        except psutil.TimeoutExpired:
            frozen.kill()
            pytest.fail("a worker outlived its raylet by 10 s")
        rc = proc.wait(600)
        out = log.read_text()
        assert rc == 0, out[-4000:]
        assert re.search(r"failed.*retrying", out), out[-4000:]  # the shard frozen on the killed node ran again
    finally:
        cluster.shutdown()

    a, b = _local_copy(clean, tmp_path / "a"), _local_copy(faulted, tmp_path / "b")
    total = 4 * 3 + 3  # 4 families x 3 variants + 3 broken URLs
    accounted(b, total)
    assert no_duplicates_and_nothing_lost(b) == no_duplicates_and_nothing_lost(a)
    ha, hb = content_hashes(a), content_hashes(b)
    assert ha == hb and len(ha) > 20
