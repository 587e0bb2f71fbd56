"""The global test timeout (issue 18 item 8): a hung call fails with a message instead of stalling CI."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_has_a_limit(request):
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < int(ini["timeout"]) <= 600
    assert float(request.config.getini("timeout")) == float(ini["timeout"])


def test_a_hung_test_fails_with_a_timeout_message(tmp_path):
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import threading
        def test_hangs():
            threading.Event().wait()  # like a ray.get that never returns
    """))
    # the repository's own pytest settings, with the limit lowered so the check is quick
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                          "--rootdir", str(tmp_path), "-o", "timeout=2", str(tmp_path / "test_hang.py")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Timeout" in out.stdout and "1 failed" in out.stdout
