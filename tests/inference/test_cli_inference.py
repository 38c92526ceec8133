"""``autoglm serve`` and ``autoglm generate`` as real subprocesses (the real model; kept short)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

AUTOGLM = [sys.executable, "-c", "from sdk.cli import main; main()"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def autoglm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AUTOGLM, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_help_lists_commands_without_importing_torch() -> None:
    code = "import sys; from sdk.cli import app; assert not {'torch', 'fastapi'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = autoglm("--help").stdout
    assert "serve" in out and "generate" in out
    serve_help = autoglm("serve", "--help").stdout
    for option in ("--model-path", "--gpu-memory-utilization", "--max-sequence-length", "--host", "--port"):
        assert option in serve_help


def test_bad_options_are_rejected() -> None:
    r = autoglm("serve", "--device", "tpu")
    assert r.returncode == 2 and "--device" in r.stderr
    r = autoglm("serve", "--gpu-memory-utilization", "1.5")
    assert r.returncode == 2


@pytest.mark.slow
def test_generate_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    r = autoglm("generate", "hi", "--model-path", str(tmp_path / "absent"))
    assert r.returncode == 1 and "model_not_found" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.model
def test_generate_streams_greedy_text() -> None:
    r = autoglm("generate", "The capital of France is", "--no-chat", "--temperature", "0",
                "--max-tokens", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" in r.stderr and "tokens/s" not in r.stdout  # status on stderr only


@pytest.fixture
def serve_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [*AUTOGLM, "serve", "--port", "0", "--max-sequence-length", "512", "--device", "cpu",
         "--served-model-name", "smol", "--log-level", "info"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    url = None
    deadline = time.monotonic() + 120
    assert proc.stderr is not None
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        match = re.search(r"serving the OpenAI API on (http://\S+/v1)", line)
        url = match.group(1) if match else None
    try:
        assert url is not None, "autoglm serve did not start"
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


@pytest.mark.slow
@pytest.mark.model
def test_serve_answers_openai_client_then_stops_on_sigint(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = serve_process
    assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()["models"] == ["smol"]
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
        r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4,
                                      temperature=0)
    assert "Paris" in r.choices[0].text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
