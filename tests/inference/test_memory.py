"""What a model load leaves resident: no unused optional packages on CPU, no load-time garbage.

The model tests run the loader in a fresh interpreter (the test session has imported everything
already) and compare its greedy output with the session's fp32 model.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sdk.inference.loader import UNUSED_ON_CPU, hidden_modules

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"


def test_hidden_modules_look_uninstalled_inside_the_block_only(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "autoglm_probe_pkg").mkdir()
    (tmp_path / "autoglm_probe_pkg" / "__init__.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with hidden_modules(("autoglm_probe_pkg", "json")) as hidden:
        assert hidden == ["autoglm_probe_pkg"]  # json is imported already: left alone
        assert importlib.util.find_spec("autoglm_probe_pkg") is None
        with pytest.raises(ImportError):
            importlib.import_module("autoglm_probe_pkg")
        assert sys.modules["json"] is json
    assert "autoglm_probe_pkg" not in sys.modules
    assert importlib.import_module("autoglm_probe_pkg").VALUE == 7
    sys.modules.pop("autoglm_probe_pkg", None)


_LOAD = textwrap.dedent(
    """
    import ctypes, gc, json, re, sys
    from sdk.inference.loader import load_model

    def anon_kb():
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    loaded = load_model(sys.argv[1], device="cpu", dtype=sys.argv[2], max_sequence_length=512)
    before = anon_kb()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    freed_kb = before - anon_kb()
    import torch
    ids = loaded.tokenizer(sys.argv[3], return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    print(json.dumps({
        "modules": sorted(m for m in sys.argv[4].split(",") if sys.modules.get(m) is not None),
        "freed_by_extra_trim_kb": freed_kb,
        "ids": out[0].tolist(),
    }))
    """
)


def _load_in_fresh_process(path: Path, dtype: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), dtype, PROMPT, ",".join(UNUSED_ON_CPU)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.model
def test_cpu_load_skips_unused_packages_frees_its_garbage_and_matches_transformers(smollm2: Any) -> None:
    if all(importlib.util.find_spec(m) is None for m in UNUSED_ON_CPU):
        pytest.skip(f"none of {', '.join(UNUSED_ON_CPU)} installed: nothing to keep out")
    result = _load_in_fresh_process(smollm2.path, "float32")
    assert result["modules"] == [], f"a CPU load imported {result['modules']}"
    # Without the loader's gc + malloc_trim an extra trim here hands back ~30 MB of load-time heap.
    assert result["freed_by_extra_trim_kb"] < 8 * 1024, result["freed_by_extra_trim_kb"]
    import torch

    ids = smollm2.tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        expected = smollm2.model.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist()
    assert result["ids"] == expected


_CONVERT_AFTER_LEAN_LOAD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sdk.inference.loader import default_model_path, ensure_converted, load_model

    load_model(sys.argv[1], device="cpu", dtype="float32", max_sequence_length=512)
    assert sys.modules.get("accelerate") is None
    print(ensure_converted(default_model_path(), cache_dir=Path(sys.argv[2])))
    """
)


@pytest.mark.slow
@pytest.mark.model
def test_gguf_conversion_still_works_after_a_lean_cpu_load(smollm2: Any, tmp_path: Path) -> None:
    """GGUF loading needs accelerate, which a CPU load kept out: the conversion runs in a subprocess."""
    proc = subprocess.run([sys.executable, "-c", _CONVERT_AFTER_LEAN_LOAD, str(smollm2.path), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = Path(proc.stdout.strip().splitlines()[-1])
    assert target.parent == tmp_path and (target / "model.safetensors").is_file()
    assert (target / "tokenizer.json").read_bytes() == (smollm2.path / "tokenizer.json").read_bytes()


class _CountingStorage:
    """Block storage that records how many blocks each reallocation copies."""

    def __init__(self) -> None:
        self.capacity = 0
        self.copied = 0

    def resize(self, capacity: int) -> None:
        self.copied += min(self.capacity, capacity)
        self.capacity = capacity

    def compact(self, keep: list[int], capacity: int) -> None:
        self.capacity = capacity


def test_the_kv_pool_starts_small_and_grows_without_copying_itself_per_step() -> None:
    from types import SimpleNamespace

    import torch

    from sdk.inference.block_pool import BlockPool
    from sdk.inference.placement import KV_GROW_BYTES, KV_INITIAL_BYTES, plan_paged_kv

    smollm2_135m = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=64, hidden_size=576, max_position_embeddings=8192)
    plan = plan_paged_kv(smollm2_135m, torch.bfloat16, "cpu", max_sequence_length=8192, max_batch_size=8)
    assert plan.initial_blocks * plan.bytes_per_block <= KV_INITIAL_BYTES < KV_GROW_BYTES
    assert plan.grow_blocks * plan.bytes_per_block > KV_GROW_BYTES - plan.bytes_per_block
    assert plan.max_blocks == 8 * 8192 // 16
    storage = _CountingStorage()
    pool = BlockPool(block_size=plan.block_size, max_blocks=plan.max_blocks, storage=storage,
                     initial_blocks=plan.initial_blocks, grow_blocks=plan.grow_blocks)
    assert storage.capacity == plan.initial_blocks
    for _ in range(plan.max_blocks):  # one block at a time: the worst case for reallocation
        assert pool.allocate(1) is not None
    assert pool.capacity == plan.max_blocks
    # Geometric growth (x1.5): every copy together is at most 3 final pools (10,177 blocks here); a
    # fixed step of grow_blocks would copy max_blocks**2 / (2 * grow_blocks), about 92,000.
    assert storage.copied <= 3 * plan.max_blocks, (storage.copied, pool.grows)
    assert pool.grows <= 12


_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    import torch

    from sdk.inference.loader import choose_dtype, cpu_has_native_bf16

    assert cpu_has_native_bf16(_CPUINFO.format(extra="avx512_bf16"))
    assert cpu_has_native_bf16(_CPUINFO.format(extra="amx_bf16 amx_tile"))
    assert not cpu_has_native_bf16(_CPUINFO.format(extra="avx512_vnni"))
    assert not cpu_has_native_bf16("")
    cpu = torch.device("cpu")
    assert choose_dtype(cpu, "float32") is torch.float32  # explicit wins
    assert choose_dtype(cpu, "auto") is (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


@pytest.mark.model
async def test_bf16_engine_matches_transformers_in_bf16(smollm2: Any) -> None:
    """What ``auto`` serves on a CPU with native bf16: the engine's greedy ids equal ``generate``'s."""
    import torch

    from sdk.inference import Engine, EngineConfig, GenerationRequest
    from sdk.inference.loader import load_model

    loaded = load_model(smollm2.path, device="cpu", dtype="bfloat16", max_sequence_length=512)
    engine = Engine.from_model(loaded.model, loaded.tokenizer,
                               EngineConfig(max_sequence_length=512, max_batch_size=4, warmup=False),
                               metadata=loaded.metadata)
    prompts = [PROMPT, "Once upon a time, in a small village by the sea,", "def fibonacci(n):"]
    try:
        results = await asyncio.gather(*(engine.generate(GenerationRequest(prompt=p, max_new_tokens=12,
                                                                           temperature=0.0)) for p in prompts))
    finally:
        await engine.aclose()
    assert engine.metadata["dtype"] == "bfloat16"
    for prompt, result in zip(prompts, results, strict=True):
        ids = loaded.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False)
        expected = out[0, ids["input_ids"].shape[1]:].tolist()
        assert list(result.token_ids) == expected[:len(result.token_ids)] and result.token_ids, prompt
    assert "Paris" in results[0].text
