"""`autoglm demo` runs the whole scenario on a fresh temp dir and exits 0 (no torch needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdk.cli.demo import DEMO_RULES, run_demo

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def test_demo_command_exits_0_without_torch() -> None:
    # torch is made unimportable: the demo must not need it
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['autoglm', 'demo', '--plain'];"
            "from sdk.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all steps succeeded" in proc.stdout
    assert "revoked tablet refused" in proc.stdout
    assert "did:key:z6Mk" in proc.stdout  # DIDs print verbatim (Rich emoji codes like :key: are off)
    assert "model picks the tablet" in proc.stdout and "stand-in engine" in proc.stdout   # no torch: the stand-in


async def test_demo_reports_every_step() -> None:
    result = await run_demo(live=False, model="fake")
    assert result.ok and result.failed_step is None
    assert [s.status for s in result.steps] == ["ok"] * len(result.steps)
    assert result.convergence_ms is not None and result.convergence_ms > 0
    assert len(result.auth_ms) == 3
    model_step = result.steps[5]
    assert model_step.name == "model picks the tablet layout"
    assert model_step.detail.startswith("tablet layout=compact chosen by stand-in-layout-model 1 (stand-in engine")
    assert "prompt sha256:" in model_step.detail


async def test_demo_model_step_falls_back_when_the_model_answers_badly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sdk.cli.demo.FAKE_CHOICE", "the compact one, surely")
    result = await run_demo(live=False, model="fake")
    assert result.ok, result.error
    assert result.steps[5].detail.startswith("tablet layout=standalone: fallback config (model_invalid_json")


@pytest.mark.model
@pytest.mark.timeout(300)
async def test_demo_model_step_with_smollm2() -> None:
    pytest.importorskip("torch")
    result = await run_demo(live=False, model="smollm2")
    assert result.ok, result.error
    detail = result.steps[5].detail      # constrained to the rule's schema: the model's answer is taken
    assert detail.startswith("tablet layout=") and "chosen by SmolLM2-135M-Instruct" in detail, detail
    assert "(bundled SmolLM2, over the mesh; prompt sha256:" in detail


async def test_demo_names_the_failed_step() -> None:
    rules = DEMO_RULES.replace('"device.kind" = "phone"', '"device.kind" = "television"')
    result = await run_demo(live=False, rules_toml=rules, step_timeout=2)
    assert not result.ok
    assert result.failed_step == "phone applies companion config"
    statuses = [s.status for s in result.steps]
    assert statuses[:4] == ["ok"] * 4 and statuses[4] == "failed" and statuses[5:] == ["pending"] * 4


def test_demo_command_exits_nonzero_naming_the_step(tmp_path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text(DEMO_RULES.replace('"device.kind" = "phone"', '"device.kind" = "television"'))
    code = ("import sys; sys.argv = ['autoglm', 'demo', '--plain', '--step-timeout', '2', '--rules', sys.argv[1]];"
            "from sdk.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1
    assert "failed step: phone applies companion config" in proc.stderr
