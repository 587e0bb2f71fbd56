"""The demo pipeline on an S3 run directory (moto's server on 127.0.0.1): download -> captions -> sentences
-> regions -> export -> train -> eval -> report, resume from the S3 checkpoint, and no run file on local disk."""

import json
import os
import tempfile
import time
from pathlib import Path

import fsspec
import pytest

from workflows.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["input.synthetic.families=5", "input.synthetic.image_size=96", "download.image_size=96",
         "train.steps=4", "train.log_every=2", "train.ckpt_every=2", "train.image_size=56", "train.workers=0",
         "train.batch_size=4", "train.warmup=1", "regions.detector=null", "regions.scorer.image_size=64"]
# names only a run writes: any of them appearing on local disk during the test is a run file that leaked
RUN_FILE_NAMES = {"run.yaml", "manifest.json", "plan.json", "00000.parquet", "00000.tar", "index.parquet",
                  "metrics.jsonl", "model.safetensors", "state.pt", "train.json", "latest", "index.html",
                  "truth.parquet", "urls.parquet", "eval_pairs.json"}


def _local_run_files(folder: Path, since: float) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if (f in RUN_FILE_NAMES or f.endswith((".safetensors", ".parquet", ".tar"))) and os.path.getmtime(p) >= since:
                    out.append(p)
            except OSError:
                pass
    return out


@pytest.mark.slow
def test_demo_on_s3_end_to_end_with_nothing_on_local_disk(ray_session, s3_bucket, tmp_path, monkeypatch, capsys):
    import ray

    sandbox, tmp = tmp_path / "cwd", tmp_path / "tmp"
    sandbox.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    since = time.time() - 1
    run = f"{s3_bucket}/demo"

    assert main(["run", str(ROOT / "configs" / "demo.yaml"), f"run.dir={run}", *SMALL, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "all accounted for" in out and "trained to step 4" in out
    assert "regions rescored with the trained caft-tiny" in out
    assert main(["status", run, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    # 5 families x 3 + 3 broken, + the demo's seeded duplicate URL and copy of an evaluation image (synth/evalset on S3)
    assert st["accounted"] and st["urls"] == 20 and st["accounting"]["ok"] == 17, st
    assert st["dedup"]["duplicates"].get("same url") == 1 and st["dedup"]["contaminated"] == {"synth-heldout": 1}, st["dedup"]
    assert main(["eval-pairs", run]) == 0
    assert "local pairs" in capsys.readouterr().out
    assert main(["eval", f"{run}/models/caft-tiny", "synthetic", "--run", run]) == 0
    assert f"wrote {run}/eval/synthetic-caft-tiny.json" in capsys.readouterr().out
    assert main(["report", run]) == 0
    assert f"report: {run}/report/index.html" in capsys.readouterr().out

    fs, base = fsspec.core.url_to_fs(run)
    for name in ("run.yaml", "manifest.json", "images/00000.tar", "captions/00000.parquet", "sentences/00000.parquet",
                 "regions/00000.parquet", "regions-caft/00000.parquet", "export/00000-000.tar", "export/index.parquet",
                 "models/caft-tiny/metrics.jsonl", "models/caft-tiny/step-0000004/model.safetensors",
                 "report/eval_pairs.json", "eval/synthetic-caft-tiny.json", "report/index.html", "synth/truth.parquet"):
        assert fs.exists(f"{base}/{name}"), name
    assert fs.cat_file(f"{base}/models/caft-tiny/latest").decode().strip() == "step-0000004"
    assert not fs.exists(f"{base}/models/caft-tiny/step-0000000")  # keep=2: only the two newest checkpoints
    page = fs.cat_file(f"{base}/report/index.html").decode()
    assert "training curves of caft-tiny" in page and "Evaluation: synthetic · caft-tiny" in page
    imgs = fs.ls(f"{base}/report/img")
    assert imgs and all(f'src="img/{p.rsplit("/", 1)[1]}"' in page for p in imgs)
    ev = json.loads(fs.cat_file(f"{base}/eval/synthetic-caft-tiny.json"))
    assert ev["trained_steps"] == 4 and ev["retrieval"]["n"] == 3  # family 0 of 5 held out

    # resume reads the checkpoint back from S3: nothing to train, no new metrics rows
    assert main(["run", run, "--no-progress"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    rows = fs.cat_file(f"{base}/models/caft-tiny/metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows if '"loss"' in r] == [2, 4]

    # nothing of the run on local disk: not in the working directory, the temp folder, or Ray's session folder
    assert list(sandbox.iterdir()) == []
    assert [p for p in tmp.rglob("*") if p.is_file()] == []  # (libraries leave empty scratch folders, e.g. wandb's)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert _local_run_files(session, since) == []
