"""`pip install -e '.[vllm]'` (the CUDA vLLM) resolves together with longcap's own pins.

A resolver dry run against the package registry: nothing is installed, but pip
fetches package metadata, so this test needs the registry (marker `registry`,
several minutes on a slow link). Without a registry it skips, loudly; in CI
(CI=true) that is a failure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.registry
@pytest.mark.timeout(1200)
def test_the_vllm_extra_resolves_with_longcaps_torch(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-e", f"{ROOT}[vllm]"],
                          capture_output=True, text=True, timeout=1100, cwd=ROOT)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        unreachable = any(s in proc.stderr for s in ("NewConnectionError", "Temporary failure in name resolution",
                                                     "No route to host", "Network is unreachable"))
        if unreachable and os.environ.get("CI", "").lower() not in ("true", "1"):
            pytest.skip(f"VLLM INSTALL CHECK NOT RUN: the package registry is unreachable ({err[-1]})")
        pytest.fail("pip cannot resolve longcap[vllm]:\n" + "\n".join(err[-30:]))
    got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    # the pair vLLM 0.33 pins is longcap's own (torch 2.14, torchvision 0.29), and transformers is in both ranges
    assert got["vllm"].startswith("0.33.")
    assert got["torch"].startswith("2.14.") and got["torchvision"].startswith("0.29.")
    major, minor = (int(x) for x in got["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 20) and (major, minor) < (5, 21)
    assert got["longcap"] == "0.1.0" and "ray" in got
