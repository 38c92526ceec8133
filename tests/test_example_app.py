"""examples/app-tests against the installed wheel: scripts/test-example-app.sh builds the wheel,
installs it into a fresh venv and runs the example's tests outside this checkout."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test-example-app.sh"

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(600)]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_example_app_passes_against_the_installed_wheel(tmp_path: Path) -> None:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin",
           "HOME": str(Path.home()), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPT), "-q", "-p", "no:randomly"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=540, check=False)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert re.search(r"sdk \S+ from \S+/venv/lib/python[\d.]+/site-packages/sdk", log), log
    passed = re.search(r"(\d+) passed", log)
    assert passed and int(passed.group(1)) >= 6 and "failed" not in log, log
    seconds = float(re.search(r"example app tests: ([\d.]+) s", log).group(1))  # type: ignore[union-attr]
    assert seconds < 10.0, f"the example app's tests took {seconds:.1f} s (budget 10 s)"
