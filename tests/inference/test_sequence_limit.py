"""``max_sequence_length`` beyond the model's context is an error naming the limit (never a silent
clamp), and the limit is read from the model's files without loading it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from sdk.inference.errors import InvalidConfig
from sdk.inference.limits import (
    config_context_length,
    gguf_context_length,
    model_context_length,
    transformers_context_length,
)


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, *, arch: str = "llama", context: int = 4096, extra_first: bool = True) -> Path:
    """A GGUF v3 header: an array and a float before ``<arch>.context_length``, as real files have."""
    kvs = [_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(arch)]
    if extra_first:
        kvs.append(_gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2)
                   + _gguf_string("a") + _gguf_string("bc"))
        kvs.append(_gguf_string("general.score") + struct.pack("<If", 6, 0.5))
        kvs.append(_gguf_string("other.context_length") + struct.pack("<II", 4, 7))  # another arch's key
    kvs.append(_gguf_string(f"{arch}.context_length") + struct.pack("<II", 4, context))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs) + b"\0" * 64)
    return path


def test_gguf_header_gives_the_context_length(tmp_path: Path) -> None:
    assert gguf_context_length(write_gguf(tmp_path / "m.gguf", context=4096)) == 4096
    assert gguf_context_length(write_gguf(tmp_path / "q.gguf", arch="qwen2", context=32768)) == 32768


@pytest.mark.parametrize("data", [b"", b"GGUF", b"NOPE" + b"\0" * 40, b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
                                  + struct.pack("<Q", 1 << 40)])
def test_unreadable_gguf_headers_say_nothing(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    assert gguf_context_length(path) is None


def test_config_json_gives_the_context_length(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert transformers_context_length(tmp_path) == 2048
    assert config_context_length({"text_config": {"max_position_embeddings": 1024}}) == 1024
    assert config_context_length({"max_position_embeddings": True}) is None
    assert transformers_context_length(tmp_path / "absent") is None


def test_bundled_model_limit_without_loading_it() -> None:
    pytest.importorskip("torch")
    try:
        limit = model_context_length(None)
    except Exception as exc:  # noqa: BLE001 - the bundled model package is optional
        pytest.skip(f"bundled model not installed: {exc}")
    assert limit == 8192


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    """A random 2-layer Llama with a 256-token context (no tokenizer)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_engine_refuses_a_sequence_length_above_the_context(tiny_model: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from sdk.inference import Engine, EngineConfig

    with pytest.raises(InvalidConfig) as info:
        Engine.from_model(tiny_model, None, EngineConfig(device="cpu", max_sequence_length=100_000, warmup=False))
    assert info.value.reason == "invalid_config" and info.value.limit == 256
    assert info.value.field == "max_sequence_length" and "256" in str(info.value)
    assert "above the model's context length 256" in caplog.text


def test_engine_config_default_is_the_model_context() -> None:
    from sdk.inference import EngineConfig
    from sdk.inference.engine import _sequence_length

    assert EngineConfig().max_sequence_length is None
    assert _sequence_length(None, 256) == 256 and _sequence_length(None, 131072) == 8192
    assert _sequence_length(256, 256) == 256
    with pytest.raises(InvalidConfig):
        _sequence_length(257, 256)
    with pytest.raises(ValueError):
        EngineConfig(max_sequence_length=1)
