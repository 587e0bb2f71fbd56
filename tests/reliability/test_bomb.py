"""Decompression bombs (PNGs of 17 KB and 109 KB that decode to 144 and 900 Mpixel) at every place longcap decodes
an image: refused by the pixel limit from the header, with a named reason, and memory stays flat."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_GROWTH_MB = 40  # a 144-Mpixel decode would add at least 144 MB (1 byte per pixel)


def test_bombs_are_refused_everywhere_with_flat_memory():
    res = subprocess.run([sys.executable, str(HERE / "decode_probe.py")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    sizes = got.pop("_sizes")
    assert max(sizes) < 200_000
    download, download_mb = got.pop("download")
    quiet, loud = download.split("; ")
    # the download stage: longcap's header check refuses it before img2dataset (or PIL) decodes anything
    assert quiet.startswith("too_large: pixel limit: 12000x12000 = 144000000 pixels > 50000000")
    assert loud.startswith("too_large: pixel limit: Image size (900000000 pixels) exceeds limit")
    named = ("pixel limit",)
    for step, (outcome, _) in got.items():
        assert any(n in outcome for n in named), f"{step}: {outcome}"
    growth = {"download": round(download_mb, 1), **{step: round(mb, 1) for step, (_, mb) in got.items()}}
    assert max(growth.values()) < MAX_GROWTH_MB, growth
