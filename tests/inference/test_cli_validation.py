"""``autoglm serve`` / ``generate`` check their arguments before anything slow: a bad broker URL or
an out-of-range ``--max-sequence-length`` fails in a second or two, before torch or the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
#: Runs the CLI, then reports on stdout's last line whether torch was ever imported.
PROBE = ("import sys\nfrom sdk.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
         "    code = e.code\nprint('TORCH', 'torch' in sys.modules)\nsys.exit(code)")
#: A model load logs one of these (loader, engine); neither may appear when validation fails.
LOAD_LINES = ("loaded ", "engine ready")


def run(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)
    return done, time.monotonic() - started


@pytest.fixture
def small_model_dir(tmp_path: Path) -> Path:
    """A transformers directory whose config says 256 tokens of context (no weights: never loaded)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    return tmp_path


def test_serve_with_a_bad_broker_url_fails_before_loading_anything() -> None:
    done, seconds = run("serve", "--broker", "localhost:1883", "--trust", "did:key:z6Mkfake", "--port", "0",
                        "--log-level", "info")
    assert done.returncode == 2, done.stderr
    assert "error: invalid_broker_url: --broker 'localhost:1883'" in done.stderr and "hint: use mqtt://" in done.stderr
    assert "TORCH False" in done.stdout  # nothing slow started
    assert not any(line in done.stderr for line in LOAD_LINES) and "Traceback" not in done.stderr
    assert seconds < 15, f"took {seconds:.1f}s"


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_max_sequence_length_above_the_model_is_an_error_naming_it(command: str, small_model_dir: Path) -> None:
    args = ["hi"] if command == "generate" else ["--port", "0"]
    done, _ = run(command, *args, "--model-path", str(small_model_dir), "--max-sequence-length", "100000")
    assert done.returncode == 2, done.stderr
    assert "error: invalid_config: --max-sequence-length 100000 is above the model's context length 256" in done.stderr
    assert "hint: use --max-sequence-length 256 or less" in done.stderr
    assert not any(line in done.stderr for line in LOAD_LINES) and "Traceback" not in done.stderr


def test_bundled_model_limit_is_checked_before_it_loads() -> None:
    done, _ = run("serve", "--port", "0", "--max-sequence-length", "100000")
    if "model_not_found" in done.stderr:
        pytest.skip("bundled model not installed")
    assert done.returncode == 2 and "context length 8192" in done.stderr, done.stderr
    assert not any(line in done.stderr for line in LOAD_LINES)


def test_gpu_memory_utilization_on_cpu_is_a_warning(small_model_dir: Path) -> None:
    """Ignored on CPU: said on one line (the run then stops on the sequence length, before loading)."""
    done, _ = run("serve", "--device", "cpu", "--gpu-memory-utilization", "0.5", "--model-path",
                  str(small_model_dir), "--max-sequence-length", "100000", "--port", "0")
    assert "warning: --gpu-memory-utilization 0.5 is ignored on CPU" in done.stderr, done.stderr
    assert done.returncode == 2


def test_engine_option_checks_in_process(small_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdk.cli.errors import CliError
    from sdk.cli.inference_cmds import check_engine_options

    check_engine_options(model_path=str(small_model_dir), device="cpu", dtype="auto", max_sequence_length=256,
                         gpu_memory_utilization=0.8)
    assert "ignored on CPU" in capsys.readouterr().err
    check_engine_options(model_path=str(small_model_dir), device="cpu", dtype="auto", max_sequence_length=None)
    assert capsys.readouterr().err == ""  # nothing given, nothing to warn about
    with pytest.raises(CliError) as info:
        check_engine_options(model_path=None, device="cpu", dtype="auto", max_sequence_length=None,
                             gpu_memory_utilization=1.5)
    assert info.value.usage and info.value.reason == "invalid_option"


def test_out_of_range_gpu_memory_utilization_is_a_usage_error() -> None:
    done, _ = run("serve", "--gpu-memory-utilization", "0")
    assert done.returncode == 2 and "--gpu-memory-utilization" in done.stderr


def test_help_documents_the_api_key_variable() -> None:
    for command in ("serve", "gateway"):
        done, _ = run(command, "--help")
        assert done.returncode == 0 and "AUTOGLM_API_KEYS" in done.stdout, command
