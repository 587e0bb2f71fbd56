"""`longcap run` killed with SIGKILL (its whole process group: the driver, the local Ray it started and every
worker) at seeded random points, several times in a row, then resumed: the outputs are those of an
uninterrupted run, every URL is accounted for, no key is duplicated, and no process of a killed run survives."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import demo_config
from invariants import accounted, content_hashes, no_duplicates_and_nothing_lost
from procs import cmdline, in_session
from workflows.cli import main

ROOT = Path(__file__).resolve().parents[2]
SEED = 10
STAGE_DIRS = ("images", "captions", "sentences", "export")
URLS, SHARDS = 12, 6  # demo_config: 3 families x 3 variants + 3 broken URLs, 2 per shard
COMMITS = SHARDS * len(STAGE_DIRS)


def committed(run_dir: Path) -> list[Path]:
    return [f for d in STAGE_DIRS for f in sorted((run_dir / d).glob("[0-9]*.parquet"))]


def write_cfg(tmp: Path, run_dir: Path) -> Path:
    p = tmp / f"{run_dir.name}.yaml"
    p.write_text(yaml.safe_dump(demo_config(run_dir)))
    return p


def kill_plan(rng: random.Random) -> list[tuple[str, float]]:
    """One kill at a random moment of start-up (config, world, plan, Ray), then one in each third of the run:
    once a random number of shard outputs exist, plus a random delay, so it lands in the middle of work."""
    thirds = [(1, 7), (8, 15), (16, COMMITS - 3)]
    return [("seconds", rng.uniform(0.5, 6.0))] + [("commits", rng.randint(a, b) + rng.uniform(0.0, 0.3))
                                                   for a, b in thirds]


def run_until_killed(cfg: Path, run_dir: Path, how: str, when: float, log) -> int:
    """Start `longcap run` in its own session, SIGKILL the session at the planned point; returns commits then."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "run", str(cfg), "--no-progress"], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0, deadline, start = time.time(), time.time() + 120, len(committed(run_dir))
    when = max(when, start + 1) if how == "commits" else when  # at least one new output
    if how == "seconds":
        time.sleep(when)
    else:
        while len(committed(run_dir)) < int(when) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(when - int(when))
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before its kill at {how} {when:.2f}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = committed(run_dir)
    time.sleep(2)  # the raylet dies with the driver, every worker that could have taken work with the raylet
    working = {pid: c[:100] for pid in in_session(proc.pid) if not is_idle_ray_worker(c := cmdline(pid))}
    assert not working, f"processes of the killed run survived it: {working}"
    assert committed(run_dir) == at_kill, "a process of the killed run committed an output after the kill"
    for pid in in_session(proc.pid):  # workers still booting: they exit by themselves once they find the
        with contextlib.suppress(ProcessLookupError):  # raylet gone (~30 s); spare the machine
            os.kill(pid, signal.SIGKILL)
    print(f"killed after {time.time() - t0:.1f} s ({how} {when:.2f}): {start} -> {len(at_kill)} of {COMMITS} outputs")
    return len(at_kill)


def is_idle_ray_worker(cmd: str) -> bool:
    """A Ray worker that cannot have run longcap code: still booting (not yet retitled 'ray::...', or not yet
    past its setup hook, which kills it when the raylet is gone) or idle."""
    return cmd.startswith("ray::IDLE") or "ray/_private/workers/default_worker.py" in cmd


@pytest.mark.slow
def test_repeated_sigkill_then_resume_gives_the_uninterrupted_outputs(ray_session, tmp_path):
    reference = tmp_path / "reference"
    assert main(["run", str(write_cfg(tmp_path, reference)), "--no-progress"]) == 0
    want = content_hashes(reference)
    assert len(committed(reference)) == COMMITS

    run_dir = tmp_path / "killed"
    cfg = write_cfg(tmp_path, run_dir)
    progress = []
    with open(tmp_path / "killed.log", "ab") as log:
        for how, when in kill_plan(random.Random(SEED)):
            progress.append(run_until_killed(cfg, run_dir, how, when, log))
            for f in committed(run_dir):  # what exists is complete
                pq.read_table(f)
    assert progress == sorted(progress) and progress[-2] < COMMITS, progress  # killed mid-run, not after it
    assert main(["run", str(cfg), "--no-progress"]) == 0  # resume
    assert content_hashes(run_dir) == want
    print(f"resumed after {len(progress)} kills at {progress} of {COMMITS} outputs: {len(want)} files identical")
    assert not list(run_dir.rglob("*.tmp-*")) and not (run_dir / "images" / "_staging").exists()
    accounted(run_dir, URLS)
    rows = no_duplicates_and_nothing_lost(run_dir)
    assert rows["images"] == rows["captions"] == rows["export"] == URLS
