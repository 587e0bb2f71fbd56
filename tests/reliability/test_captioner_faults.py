"""The captions stage against an OpenAI-compatible server that answers badly on purpose, and its Ray actor
killed in the middle of a shard: every row ends with a named outcome, and the run (retried, or rerun after a
recorded failure) ends with the outputs of an undisturbed run."""

import json
import os
import signal
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from faults import CAPTION_FAULTS, TIMEOUT, CaptionFaults, ImageFaults, caption_fault
from invariants import accounted, content_hashes, no_duplicates_and_nothing_lost
from procs import descendant_named
from workflows.cli import main
from workflows.serve import serve

pytestmark = pytest.mark.slow  # whole runs: 30-70 s on 2 cores
N_OK, SHARD = 15, 8  # 15 keys x 2 prompts: the seeds reach every fault kind
CLEAN_REQUESTS = []  # requests the caption server got during the clean run
URLS = [f"ok/{i}.jpg" for i in range(N_OK)] + ["missing.jpg", "html.jpg"]


@pytest.fixture(scope="module")
def servers():
    with serve(ImageFaults) as images, serve(CaptionFaults) as captions:
        yield images, captions + "/v1"


@pytest.fixture(scope="module")
def images_run(ray_session, servers, tmp_path_factory):
    """The images every captions run below reads (input.images_from), downloaded once."""
    tmp = tmp_path_factory.mktemp("images")
    pq.write_table(pa.table({"url": URLS}), tmp / "urls.parquet")
    cfg = {"run": {"dir": str(tmp / "run"), "shard_size": SHARD, "stages": ["download"]},
           "input": {"urls": [str(tmp / "urls.parquet")], "base_url": servers[0]},
           "download": {"image_size": 64, "timeout": TIMEOUT, "allow_networks": ["127.0.0.1/32"]}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "cfg.yaml"), "--no-progress"]) == 0
    return tmp / "run"


def captions_config(tmp, images_run, servers, retries: int):
    cfg = {"run": {"dir": str(tmp / "run"), "shard_size": SHARD}, "input": {"images_from": str(images_run)},
           "captioners": [{"name": "srv", "backend": "openai", "base_url": servers[1], "model": "stub",
                           "prompts": ["long", "short"], "retries": 1, "backoff": 0.01, "timeout": 30}],
           "ray": {"shard_retries": retries, "captions_actors": 1}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "cfg.yaml", tmp / "run"


@pytest.fixture(scope="module")
def clean(images_run, servers, tmp_path_factory):
    cfg, run_dir = captions_config(tmp_path_factory.mktemp("clean"), images_run, servers, retries=0)
    CaptionFaults.requests = 0
    assert main(["run", str(cfg), "--no-progress"]) == 0
    CLEAN_REQUESTS.append(CaptionFaults.requests)
    return run_dir


def test_every_bad_answer_gets_a_named_outcome(clean):
    accounted(clean, len(URLS))
    rows = no_duplicates_and_nothing_lost(clean)
    assert rows["captions"] == rows["sentences"] == 2 * len(URLS) and rows["export"] == len(URLS)
    caps = [r for f in sorted((clean / "captions").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    sents = {(r["key"], r["prompt_id"]): r for f in sorted((clean / "sentences").glob("*.parquet"))
             for r in pq.read_table(f).to_pylist()}
    seen = set()
    for c in caps:
        s = sents[(c["key"], c["prompt_id"])]
        if c["status"] == "skipped":
            assert c["error"].startswith(("no image (http_404)", "no image (not_an_image)")) and s["status"] == "skipped"
            continue
        kind = caption_fault(json.loads(c["params"])["seed"])
        seen.add(kind)
        flags = json.loads(c["flags"]) if c["flags"] else None
        if kind in ("http400", "http500", "garbage"):
            want = {"http400": "HTTP 400: ", "http500": "HTTP 500: ", "garbage": "malformed response (JSONDecodeError"}
            assert c["status"] == "failed" and c["error"].startswith(want[kind]), (kind, c["error"])
            assert s["status"] == "skipped" and s["exclude_reasons"] == ["no caption"]
            continue
        assert c["status"] == s["status"] == "ok" and flags == s["flags"], (kind, c, s["flags"])
        if kind in ("empty", "null"):
            assert flags == ["empty"] and s["exclude_reasons"] == ["empty"]
        elif kind == "loop":
            assert "repetition" in flags and s["exclude_reasons"] == ["repetition"]
        elif kind == "huge":
            assert "too_long" in flags and not s["excluded"] and s["n_chars"] >= 199_000
        elif kind == "bad_utf8":
            assert flags == ["invalid_utf8"] and "\ufffd" in c["text"] and not s["excluded"]
        elif kind == "length":
            assert flags == ["truncated"] and c["finish_reason"] == "length"
        else:
            assert kind == "good" and flags == [] and not s["excluded"]
    assert seen == set(CAPTION_FAULTS), f"the seeds did not reach every fault: {set(CAPTION_FAULTS) - seen}"
    asked = [c for c in caps if c["status"] != "skipped"]
    n500 = sum("HTTP 500" in (c["error"] or "") and c["error"].endswith("(after 2 attempts)") for c in asked)
    assert n500 and CLEAN_REQUESTS == [len(asked) + n500]  # a 500 is retried once (retries: 1), then recorded


def kill_the_captions_actor(killed: list):
    """Wait for a request to reach the held server (an actor is mid-shard), SIGKILL that actor, let the server go."""
    try:
        assert CaptionFaults.arrived.wait(120), "no caption request arrived"
        pid = descendant_named(os.getpid(), "_StageActor")  # this test's own Ray workers only
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    finally:
        CaptionFaults.gate.set()


def run_with_actor_kill(cfg) -> tuple[int, list]:
    killed = []
    CaptionFaults.arrived.clear()
    CaptionFaults.gate.clear()
    killer = threading.Thread(target=kill_the_captions_actor, args=(killed,), daemon=True)
    killer.start()
    try:
        rc = main(["run", str(cfg), "--no-progress"])
    finally:
        CaptionFaults.gate.set()
        killer.join(5)
    assert len(killed) == 1, "the captions actor was not found mid-shard"
    return rc, killed


def captions_entries(run_dir) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["captions"]["shards"]


def test_actor_killed_mid_shard_is_retried_and_outputs_match(clean, images_run, servers, tmp_path):
    cfg, run_dir = captions_config(tmp_path, images_run, servers, retries=1)
    rc, _ = run_with_actor_kill(cfg)
    assert rc == 0
    attempts = {name: e["attempts"] for name, e in captions_entries(run_dir).items()}
    assert sorted(attempts.values()) == [1, 1, 2], attempts  # the killed shard took a second attempt
    accounted(run_dir, len(URLS))
    no_duplicates_and_nothing_lost(run_dir)
    assert content_hashes(run_dir) == content_hashes(clean)


def test_actor_killed_without_retries_is_recorded_then_a_rerun_completes(clean, images_run, servers, tmp_path, capsys):
    cfg, run_dir = captions_config(tmp_path, images_run, servers, retries=0)
    rc, _ = run_with_actor_kill(cfg)
    assert rc == 1
    failed = {n: e for n, e in captions_entries(run_dir).items() if e["status"] == "failed"}
    assert len(failed) == 1 and next(iter(failed.values()))["error"].startswith("worker died"), failed
    name = next(iter(failed))
    assert not (run_dir / "captions" / f"{name}.parquet").exists()
    rerun = f"longcap run {run_dir} --stages captions,sentences,export --shards {name}"
    assert rerun in capsys.readouterr().err
    st = accounted(run_dir, len(URLS))
    assert st["stages"]["captions"]["shards_failed"] == 1 and name in st["stages"]["captions"]["failed"]
    assert main([*rerun.split()[1:], "--no-progress"]) == 0  # the command it printed finishes the run
    assert content_hashes(run_dir) == content_hashes(clean)
    no_duplicates_and_nothing_lost(run_dir)
