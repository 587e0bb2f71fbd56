"""Shared by the vLLM tests and benchmark: where the vLLM env is, whether it is built, `vllm serve` on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captioner_helpers import Serve

ROOT = Path(__file__).resolve().parents[1]
VLLM_ENV = Path(os.environ.get("LONGCAP_VLLM_ENV", ROOT / ".venv-vllm"))  # built by `make vllm-env`
VLLM_PY = VLLM_ENV / "bin" / "python"
# CPU engine: 1 GiB of KV cache; nothing leaves the machine (no hub, no usage stats)
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def vllm_env_missing() -> str | None:
    """Why the vLLM env cannot be used, or None."""
    if not (VLLM_ENV / ".installed").exists():
        return (f"the vLLM CPU env {VLLM_ENV} is not built: `make vllm-env` creates it "
                "(it needs the package registry; see the Makefile)")
    return None


def require_vllm_env() -> None:
    """Skip, loudly, where the env is missing; in CI (CI=true) that is a failure."""
    why = vllm_env_missing()
    if why is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"vLLM tests cannot run in CI: {why}")
    pytest.skip(f"VLLM TESTS NOT RUN: {why}")


class VLLMServe(Serve):
    """vLLM's real OpenAI-compatible server (what `vllm serve` runs) from the vLLM env, on 127.0.0.1."""

    name = "vllm serve"

    def command(self) -> list[str]:
        # the server `vllm serve` starts, by its module: vllm-cpu 0.32's `vllm` script dies at start looking up
        # the version of a distribution named `vllm` (the CPU build is named `vllm-cpu`)
        return [str(VLLM_PY), "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model, "--host", "127.0.0.1",
                "--port", str(self.port), "--max-model-len", "512", "--limit-mm-per-prompt", '{"image": 1}',
                "--dtype", "float32", "--enforce-eager"]  # float32: the same greedy tokens as the hf backend

    def env(self) -> dict:
        return {**os.environ, **VLLM_CPU_ENV}
