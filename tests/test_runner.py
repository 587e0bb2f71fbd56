import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from workflows.cli import main

from conftest import demo_config

ROOT = Path(__file__).resolve().parents[1]


def write_cfg(tmp_path, run_dir, **over):
    p = tmp_path / f"cfg-{run_dir.name}.yaml"
    p.write_text(yaml.safe_dump(demo_config(run_dir, **over)))
    return p


def outputs(run_dir: Path) -> dict:
    """Content hash of every stage output (img2dataset's timing stats excluded)."""
    out = {}
    for d in ("images", "captions"):
        for f in sorted((run_dir / d).glob("*")):
            if f.is_file() and not f.name.endswith("_stats.json"):
                out[f"{d}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def keys_of(run_dir: Path, stage: str) -> list[str]:
    return [k for f in sorted((run_dir / stage).glob("*.parquet")) for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]


@pytest.fixture(scope="module")
def clean_run(ray_session, tmp_path_factory):
    """One uninterrupted run of the small demo config."""
    tmp = tmp_path_factory.mktemp("clean")
    run_dir = tmp / "run"
    assert main(["run", str(write_cfg(tmp, run_dir)), "--no-progress"]) == 0
    return run_dir


def test_run_accounts_for_every_url(clean_run, capsys):
    assert main(["status", str(clean_run), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["urls"] == 12 and st["shards"] == 6 and st["accounted"]
    assert st["accounting"] == {"ok": 9, "http_404": 1, "not_an_image": 1, "truncated": 1}
    assert st["stages"]["captions"]["rows"] == {"ok": 9, "skipped: no image (http_404)": 1,
                                                "skipped: no image (not_an_image)": 1,
                                                "skipped: no image (truncated)": 1}
    image_keys, caption_keys = keys_of(clean_run, "images"), keys_of(clean_run, "captions")
    assert len(image_keys) == len(set(image_keys)) == 12
    assert caption_keys == image_keys  # every key the download saw, in every later stage
    manifest = json.loads((clean_run / "manifest.json").read_text())
    assert manifest["stages"]["download"]["summary"]["shards_done"] == 6
    assert manifest["stages"]["captions"]["summary"]["samples_ok"] == 9
    snap = yaml.safe_load((clean_run / "run.yaml").read_text())
    assert snap["download"]["image_size"] == 128
    assert not (clean_run / "images" / "_staging").exists()  # no empty staging folder left behind


def test_source_captions_match_the_input(clean_run):
    truth = {r["id"]: r["caption"] for r in pq.read_table(clean_run / "synth" / "truth.parquet").to_pylist()}
    images = {r["key"]: r["id"] for f in sorted((clean_run / "images").glob("*.parquet"))
              for r in pq.read_table(f, columns=["key", "id"]).to_pylist()}
    caps = [r for f in sorted((clean_run / "captions").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    ok = [r for r in caps if r["status"] == "ok"]
    assert len(ok) == 9
    for r in ok:
        assert r["text"] == truth[images[r["key"]]] and r["captioner"] == "source" and r["prompt_id"] == "caption"


def test_second_start_skips_finished_shards(clean_run, tmp_path):
    before = {f: os.stat(clean_run / f).st_mtime_ns for f in outputs(clean_run)}
    assert main(["run", str(clean_run), "--no-progress"]) == 0
    assert {f: os.stat(clean_run / f).st_mtime_ns for f in outputs(clean_run)} == before


def test_failing_shard_is_recorded_and_the_rest_finish(ray_session, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = write_cfg(tmp_path, run_dir, **{"ray.shard_retries": 1})
    assert main(["run", str(cfg), "--stages", "download", "--no-progress"]) == 0
    (run_dir / "images" / "00001.parquet").write_bytes(b"this is not parquet")
    capsys.readouterr()
    assert main(["run", str(cfg), "--stages", "captions", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "FAILED captions shard 00001" in err
    assert f"longcap run {run_dir} --stages captions --shards 00001" in err
    assert sorted(p.name for p in (run_dir / "captions").glob("*.parquet")) == [
        f"0000{i}.parquet" for i in (0, 2, 3, 4, 5)]
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["captions"]["shards"]["00001"]
    assert entry["status"] == "failed" and entry["attempts"] == 2 and "parquet" in entry["error"].lower()
    # status still accounts for every URL; the broken shard's rows are named as such
    assert main(["status", str(run_dir)]) in (0, 1)
    assert "shard 00001 FAILED" in capsys.readouterr().out


def test_sigkill_mid_stage_then_resume_gives_identical_outputs(ray_session, clean_run, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_cfg(tmp_path, run_dir)
    # the same config as clean_run except the directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "run", str(cfg), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "images" / "00000.parquet").exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "images" / "00000.parquet").exists()
    killed_at = outputs(run_dir)
    assert len(killed_at) < len(outputs(clean_run)), "the kill came after the run had finished"
    for name in killed_at:  # what exists is complete
        if name.endswith(".parquet"):
            pq.read_table(run_dir / name)
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert outputs(run_dir) == outputs(clean_run)
    assert not list(run_dir.rglob("*.tmp-*"))
    assert keys_of(run_dir, "captions") == keys_of(clean_run, "captions")


def test_clean_stale_removes_leftovers_of_killed_writers(tmp_path):
    from workflows.rundir import RunDir

    leftovers = ["manifest.json.tmp-1a2b", "images/00001.parquet.tmp-3c4d", "images/_shards/00002.parquet.tmp-5e6f",
                 "captions/00000.parquet.tmp-7a8b", "sentences/00003.parquet.tmp-9c0d"]
    keep = ["images/00001.tar", "captions/00000.parquet"]
    for rel in leftovers + keep:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "images" / "_staging" / "00004-abcd").mkdir(parents=True)
    assert RunDir(tmp_path).clean_stale() == len(leftovers)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(keep)
    assert not (tmp_path / "images" / "_staging").exists()


def test_drop_leftovers_removes_what_killed_attempts_of_committed_shards_left(tmp_path):
    """An attempt killed with its node leaves images/_staging/<shard>-<id>/ or a `<shard>.parquet.tmp-<id>` file;
    once the shard is committed (by a retry) the leftover goes, while a shard still in the works keeps its own."""
    from workflows.rundir import RunDir

    staging = tmp_path / "images" / "_staging"
    for name in ["00000-11552ba8", "00002-88d29ef5", "00003-0badf00d"]:
        (staging / name).mkdir(parents=True)
        (staging / name / "input.arrow").write_text("x")
    for rel in ["images/00001.parquet", "images/00001.parquet.tmp-abc71ee43ae3", "images/00003.tar.tmp-1234",
                "captions/00001.parquet", "captions/00001.parquet.tmp-77", "captions/00002.parquet.tmp-78",
                "export/00001-000.tar.tmp-9", "export/00001-000.tar"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    RunDir(tmp_path).drop_leftovers({"download": {0, 1, 2}, "captions": {1}, "export": {1}})
    assert sorted(p.name for p in staging.iterdir()) == ["00003-0badf00d"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "_staging" not in str(p)) == [
        "captions/00001.parquet", "captions/00002.parquet.tmp-78", "export/00001-000.tar", "images/00001.parquet",
        "images/00003.tar.tmp-1234"]
    RunDir(tmp_path).drop_leftovers({"download": {0, 1, 2, 3}})
    assert not staging.exists() and not (tmp_path / "images" / "00003.tar.tmp-1234").exists()


def test_status_from_progress_summaries_equals_a_full_recount(clean_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(clean_run, run)
    assert sorted(p.name for p in (run / "progress").glob("*.json")) == ["captions.json", "export.json",
                                                                         "images.json", "sentences.json"]

    def status(*flags):
        rc = main(["status", str(run), "--json", *flags])
        return rc, json.loads(capsys.readouterr().out)

    fast, full = status(), status("--full")
    assert fast == full and fast[0] == 0 and fast[1]["accounting"] == {"ok": 9, "http_404": 1, "not_an_image": 1,
                                                                       "truncated": 1}
    # a summary that names a file that is gone is rebuilt from the files
    (run / "captions" / "00002.parquet").unlink()
    fast, full = status(), status("--full")
    assert fast == full and fast[1]["stages"]["captions"]["shards_done"] == 5
    assert fast[1]["stages"]["captions"]["shards_pending"] == 1
    # an output the summary does not know (committed by a driver that died before its summary update) is read
    from workflows import progress
    from workflows.rundir import RunDir
    from workflows.status import reconcile

    shutil.copy(clean_run / "captions" / "00002.parquet", run / "captions" / "00002.parquet")
    (run / "sentences" / "00004.parquet").rename(tmp_path / "kept.parquet")
    rd = RunDir(str(run))
    progress.save(rd.progress("sentences"), reconcile(rd, "sentences", 6, full=True)[0])  # 5 shards known
    (tmp_path / "kept.parquet").rename(run / "sentences" / "00004.parquet")
    fast, full = status(), status("--full")
    assert fast == full and fast[1]["stages"]["sentences"]["shards_done"] == 6
    # no summaries at all (a run from before progress/): the same answer, from the files
    shutil.rmtree(run / "progress")
    assert status() == full


@pytest.mark.slow
def test_read_only_commands_exit_cleanly_when_run_many_times_in_parallel(clean_run):
    """Every exit code, for each read-only command run 10 times, 4 at once (issue 18 item 5: an abort with
    'terminate called without an active exception', exit 134, once in ~30 parallel runs)."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, PYTHONPATH=str(ROOT), LONGCAP_LOG="WARNING")
    commands = [["status", str(clean_run)], ["status", str(clean_run), "--json", "--full"],
                ["config", str(clean_run)], ["model-info", "caft-tiny", "--no-reference"]]

    def once(argv):
        p = subprocess.run([sys.executable, "-m", "workflows.cli", *argv], capture_output=True, text=True, env=env,
                           timeout=240)
        return argv, p.returncode, p.stderr[-400:]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(once, [c for c in commands for _ in range(10)]))
    bad = [r for r in results if r[1] != 0 or "terminate called" in r[2]]
    assert bad == [], bad


def test_actors_never_hold_the_last_cpu_while_shard_tasks_wait():
    """The rule behind a CI hang: on 2 CPUs a captions and a regions actor held both, while download and
    sentences tasks (which they wait for) could never start. An actor is not started, and an idle one is let go,
    when actors would hold every CPU and a task stage has work."""
    import time
    from workflows.runner import Runner

    r = object.__new__(Runner)
    r.stages = ["download", "captions", "sentences", "regions", "export"]
    r._cpus_at = (time.time(), 2.0)
    none = {s: [] for s in r.stages}
    downloads_left = dict(none, download=[3, 4])
    assert not r._starves_tasks(1, downloads_left, {})  # the captions actor: one CPU stays for tasks
    assert r._starves_tasks(2, downloads_left, {})  # + a regions actor: none would
    assert r._starves_tasks(2, none, {"ref": ("sentences", 0, None)})  # a sentences task in flight needs one too
    assert not r._starves_tasks(2, none, {"ref": ("captions", 0, object())})  # only actors have work: both may run
    assert not r._starves_tasks(2, dict(none, captions=[5]), {})
    r._cpus_at = (time.time(), 4.0)
    assert not r._starves_tasks(2, downloads_left, {}) and r._starves_tasks(4, downloads_left, {})


def test_task_and_actor_workers_die_with_their_raylet(ray_session):
    """die_with_raylet runs first in every task and actor method: the parent-death signal it sets belongs to the
    calling thread, so it must be the worker's main thread (where Ray runs tasks and sync actor methods), and the
    parent must be the raylet."""
    import ctypes
    import threading

    import ray

    from workflows.runner import die_with_raylet

    def probe():
        die_with_raylet()
        sig = ctypes.c_int(0)
        ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read()
        return sig.value, threading.current_thread() is threading.main_thread(), b"raylet" in parent

    @ray.remote
    class Probe:
        def run(self):
            return probe()

    assert ray.get(ray.remote(probe).remote()) == (signal.SIGKILL, True, True)
    assert ray.get(Probe.remote().run.remote()) == (signal.SIGKILL, True, True)
