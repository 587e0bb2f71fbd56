"""Runs every benchmark and prints its JSON lines; record the numbers in benchmarks/BENCHMARKS.md."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [["download_bench.py"], ["sentences_bench.py"], ["loader_bench.py"], ["model_bench.py"],
           ["caption_bench.py"], ["regions_bench.py"], ["chunking_drop.py"]]

if __name__ == "__main__":
    rc = 0
    for argv in BENCHES:
        print(f"== {' '.join(argv)}", flush=True)
        rc |= subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:], *sys.argv[1:]], cwd=HERE.parent)
    sys.exit(rc)
