"""The native Llama runtime: same greedy tokens as transformers, typed refusals, lean imports."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sdk.inference import Engine, EngineConfig, GenerationRequest  # noqa: E402
from sdk.inference.loader import load_model  # noqa: E402
from sdk.inference.native_llama import UnsupportedArchitecture, native_support  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request: Any, smollm2: Any) -> Any:
    """(native LoadedModel, transformers model in the same dtype) over the bundled model's cache."""
    dtype = getattr(torch, request.param)
    native = load_model(None, device="cpu", dtype=request.param, max_sequence_length=512, runtime="native")
    reference = smollm2.model if dtype == torch.float32 else load_model(
        None, device="cpu", dtype=request.param, max_sequence_length=512, runtime="transformers").model
    return native, reference


def _reference_ids(model: Any, tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return [int(t) for t in out[0, ids.shape[1]:]]


def _engine_ids(native: Any, prompts: list[str]) -> list[list[int]]:
    engine = Engine.from_model(native.model, native.tokenizer,
                               EngineConfig(max_sequence_length=512, warmup=False), metadata=native.metadata)

    async def run() -> list[list[int]]:
        results = await asyncio.gather(*(
            engine.generate(GenerationRequest(prompt=p, max_new_tokens=NEW_TOKENS, temperature=0.0))
            for p in prompts
        ))
        return [list(r.token_ids) for r in results]

    try:
        return asyncio.run(run())
    finally:
        engine.close()


def test_native_model_is_not_transformers(pair: Any) -> None:
    native, _ = pair
    assert type(native.model).__name__ == "NativeLlamaForCausalLM"
    assert native.metadata["architecture"]["tied_embeddings"] is True


def test_greedy_tokens_match_transformers_one_at_a_time(pair: Any) -> None:
    native, reference = pair
    for prompt in PROMPTS:
        assert _engine_ids(native, [prompt]) == [_reference_ids(reference, native.tokenizer, prompt)], prompt


def test_greedy_tokens_match_transformers_batched_mixed_lengths(pair: Any) -> None:
    native, reference = pair
    expected = [_reference_ids(reference, native.tokenizer, p) for p in PROMPTS]
    assert _engine_ids(native, PROMPTS) == expected


def test_logits_match_transformers_without_engine(pair: Any) -> None:
    native, reference = pair
    ids = native.tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.inference_mode():
        ours = native.model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert (ours.float() - theirs.float()).abs().max().item() < 1e-3


def _copy_with_config(src: Path, dst: Path, **changes: Any) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "config.json":
            (dst / item.name).symlink_to(item)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, fragment", [
    ({"rope_parameters": {"rope_theta": 1e5, "rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "silu"),
])
def test_unsupported_config_is_refused_or_falls_back(
    smollm2: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, changes: dict[str, Any], fragment: str,
) -> None:
    directory = _copy_with_config(smollm2.path, tmp_path / "model", **changes)
    cfg = json.loads((directory / "config.json").read_text())
    assert fragment in (native_support(cfg) or "")
    with pytest.raises(UnsupportedArchitecture) as info:
        load_model(directory, device="cpu", dtype="float32", runtime="native")
    assert info.value.reason == "unsupported_architecture" and fragment in str(info.value)
    if changes.get("model_type") == "mistral":
        return  # a Mistral config over Llama weights is not a model transformers should load either
    with caplog.at_level(logging.INFO, logger="sdk.inference.loader"):
        loaded = load_model(directory, device="cpu", dtype="float32", runtime="auto")
    assert type(loaded.model).__name__ != "NativeLlamaForCausalLM"
    assert any("runtime auto: transformers" in r.getMessage() and fragment in r.getMessage()
               for r in caplog.records)


def test_auto_picks_native_on_cpu_for_llama(smollm2: Any) -> None:
    loaded = load_model(None, device="cpu", dtype="float32", runtime="auto")
    assert type(loaded.model).__name__ == "NativeLlamaForCausalLM"


def test_engines_and_serve_default_to_auto() -> None:
    from sdk.cli.inference_cmds import ServeSettings

    assert EngineConfig().runtime == "auto" and ServeSettings().runtime == "auto"


def test_bad_runtime_value_is_refused() -> None:
    with pytest.raises(ValueError, match="runtime"):
        EngineConfig(runtime="onnx")


def test_native_path_does_not_import_modelling_code(smollm2: Any) -> None:
    code = (
        "import sys, asyncio\n"
        "from sdk.inference.loader import load_model\n"
        "from sdk.inference import Engine, EngineConfig, GenerationRequest\n"
        "m = load_model(None, device='cpu', dtype='float32', max_sequence_length=256, runtime='native')\n"
        "e = Engine.from_model(m.model, m.tokenizer, EngineConfig(max_sequence_length=256, warmup=False),"
        " metadata=m.metadata)\n"
        "r = asyncio.run(e.generate(GenerationRequest(prompt='Hi', max_new_tokens=2, temperature=0.0)))\n"
        "e.close()\n"
        "bad = [n for n in sys.modules if n == 'transformers.modeling_utils' or n.startswith('transformers.models')"
        " or n in ('torch._dynamo', 'sympy', 'transformers.masking_utils')]\n"
        "print('LOADED', bad, len(r.token_ids))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED [] " in out.stdout, out.stdout


def test_serve_cli_has_runtime_option() -> None:
    out = subprocess.run([sys.executable, "-m", "sdk", "serve", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200", "TERM": "dumb"},
                         cwd=Path(__file__).resolve().parents[2])
    assert "--runtime" in out.stdout, out.stdout + out.stderr
