#!/usr/bin/env bash
# Wheels the GPU check needs beyond what the GPU machine has (Python 3.12, its own torch 2.11 / CUDA 13,
# no network), downloaded here into .whl/ (git-ignored) for Python 3.12 / manylinux x86-64.
# Versions are the ones longcap's .venv runs. polars (ultralytics' table library, ~40 MB) is left out:
# YOLO predict does not import it. Run from the repository root: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  ultralytics-opencv-headless==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  webdataset==0.2.111 braceexpand==0.1.7 dill==0.4.1
  transformers==5.24.0 huggingface_hub==2.4.0
)
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLAT+=(--platform "$p")
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl "${WHEELS[@]}"
du -sh .whl
