"""The prepared GPU check runs every part tiny on the CPU (--smoke), so it cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_smoke_runs_every_part(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(tmp_path), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=880)
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["errors"] == {}, res["errors"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = res["parts"]
    assert set(parts) == {"models", "superpixels", "regions", "captioner", "ablation"}
    rows = {r["model"]: r for r in parts["models"]["rows"]}
    assert set(rows) == {"caft-tiny", "flair-tiny", "siglip-tiny"}
    for r in rows.values():  # FLOPs counted and a real step timed
        assert r["step_tflop"] > 0 and r["samples_per_s"] > 0 and r["achieved_tflops"] > 0
    # caft has the hierarchical text side: more FLOPs per step than the flat siglip row on the same batch
    assert rows["caft-tiny"]["step_tflop"] > rows["siglip-tiny"]["step_tflop"]
    assert parts["models"]["caft_top_kernels"] and all(k["ms"] >= 0 for k in parts["models"]["caft_top_kernels"])
    for b in ("slic", "sfcn"):
        assert parts["superpixels"][b]["device_images_per_s"] > 0 and parts["superpixels"][b]["cpu_images_per_s"] > 0
    assert parts["regions"]["images"] == 4 and parts["regions"]["ratio"] > 0
    cap = parts["captioner"]
    assert cap["images"] == 4 and cap["backend_tokens_per_s"] > 0 and cap["same_text"] == "4/4"
    ab = parts["ablation"]  # the paper rows, tiny, every row trained and evaluated
    assert ab["table"] and len(ab["rows"]) >= 5 and ab["claims"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "caft-tiny" in summary and "regions: stage" in summary and "captioner hf" in summary
