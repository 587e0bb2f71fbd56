import os
import shutil

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# S3 in tests is the moto server on loopback (tests/s3_helpers.py). Set here, before any Ray starts, so Ray
# workers inherit it; forced (never setdefault), so no test can reach a real bucket with a developer's settings.
from s3_helpers import free_port, loopback_env, moto_server, new_bucket  # noqa: E402

# one port per test process, even if this module is imported twice (as `conftest` and `tests.conftest`): a
# second pick would point AWS_ENDPOINT_URL away from the session's server
S3_PORT = int(os.environ.setdefault("LONGCAP_TEST_S3_PORT", str(free_port())))
for _k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(_k, None)
os.environ.update(loopback_env(S3_PORT))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for the session (the port the environment already names)."""
    with moto_server(S3_PORT, str(tmp_path_factory.mktemp("moto") / "server.log")) as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the loopback S3 server; its s3:// URL."""
    import re
    import uuid

    return new_bucket(re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8])


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic world with the three broken URLs."""
    from pipeline.synthetic import write_world

    out = tmp_path_factory.mktemp("world")
    write_world(out, families_n=5, variants=3, image_size=128, seed=1, broken=True)
    return out


def demo_config(run_dir, **overrides):
    """A config dict like configs/demo.yaml, small."""
    cfg = {
        "run": {"dir": str(run_dir), "seed": 0, "shard_size": 2},
        "input": {"synthetic": {"families": 3, "variants": 3, "image_size": 128, "seed": 2, "broken": True}},
        "download": {"image_size": 128, "threads": 4, "timeout": 5, "allow_networks": ["127.0.0.1/32"]},
        "captioners": [{"name": "source", "backend": "source"}],
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@pytest.fixture
def fresh_dir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


SLOW_TIMEOUT = 900  # s: whole runs on 2 shared cores; the global limit (pyproject: timeout = 300) is for the rest


def pytest_collection_modifyitems(config, items):
    """Slow tests without their own @pytest.mark.timeout get SLOW_TIMEOUT instead of the global limit."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
