"""The model metadata standard: built documents validate, bad ones fail with clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from sdk.inference.metadata import (
    SCHEMA_VERSION,
    MetadataError,
    build_metadata,
    metadata_schema,
    request_schema,
    result_schema,
    schema_errors,
    validate_metadata,
    with_serving,
)
from sdk.inference.types import GenerationRequest, GenerationResult, TokenChunk, Usage


@pytest.fixture(scope="module")
def tiny_model():
    """A random 2-layer Llama (no tokenizer): enough to describe, cheap to build."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def doc(tiny_model):
    return build_metadata(tiny_model, name="tiny-llama", version="abc123", device="cpu", dtype=torch.float32,
                          context_length=256, serving={"max_batch_size": 4, "kv_cache_tokens": 1024})


def test_built_document_describes_the_model(doc, tiny_model):
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["parameters"] == sum(p.numel() for p in tiny_model.parameters())
    arch = doc["architecture"]
    assert (arch["family"], arch["layers"], arch["kv_heads"], arch["head_dim"]) == ("llama", 2, 2, 16)
    assert doc["dtype"] == "float32" and doc["quantization"] is None
    assert doc["context_length"] == 256
    assert doc["device"]["type"] == "cpu" and doc["device"]["memory_bytes"] > 0
    assert "chat" not in doc["capabilities"]  # no tokenizer, no chat template
    assert doc["framework"]["name"] == "transformers" and doc["framework"]["torch"] == torch.__version__
    assert doc["inputs"]["properties"]["max_new_tokens"]["maximum"] == 255
    json.dumps(doc)  # a plain JSON document


def test_context_length_is_capped_at_the_model(tiny_model):
    doc = build_metadata(tiny_model, name="t", version="v", device="cpu", dtype=torch.float32,
                         context_length=99999)
    assert doc["context_length"] == 512


def test_with_serving_merges_engine_sizing(doc):
    served = with_serving(doc, {"max_batch_size": 8, "max_sequence_length": 128, "continuous_batching": True})
    assert served["serving"] == {"max_batch_size": 8, "kv_cache_tokens": 1024, "max_sequence_length": 128,
                                 "continuous_batching": True}
    assert served["context_length"] == 128
    assert served["inputs"]["properties"]["max_new_tokens"]["maximum"] == 127
    assert doc["serving"]["max_batch_size"] == 4  # the original is untouched
    with pytest.raises(MetadataError, match="unknown field 'gpu'"):
        with_serving(doc, {"gpu": "h100"})


def test_schema_file_is_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(metadata_schema())


def _mutations(doc):
    """(description, broken document) pairs, each breaking one rule of the standard."""
    out = []
    for field in metadata_schema()["required"]:
        d = copy.deepcopy(doc)
        del d[field]
        out.append((f"missing {field}", d))
    for path, value in [
        (("parameters",), 0),
        (("parameters",), "134M"),
        (("parameters",), True),
        (("dtype",), "int8"),
        (("device", "type"), "tpu"),
        (("schema_version",), "2.0"),
        (("name",), "has space"),
        (("capabilities",), []),
        (("capabilities",), ["chat", "chat"]),
        (("quantization",), {"method": "awq", "source_format": "x", "dequantized_to": None}),
        (("inputs",), {"type": "string"}),
        (("serving", "max_batch_size"), 0),
        (("architecture", "layers"), -1),
        (("unknown_field",), 1),
    ]:
        d = copy.deepcopy(doc)
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        out.append((f"{'.'.join(path)}={value!r}", d))
    return out


def test_every_broken_rule_is_reported_with_its_path(doc):
    for description, broken in _mutations(doc):
        with pytest.raises(MetadataError) as info:
            validate_metadata(broken)
        assert info.value.reason == "invalid_metadata", description
        assert info.value.errors and all(e.startswith("$") for e in info.value.errors), description
    with pytest.raises(MetadataError, match=r"\$\.device\.type: 'tpu' is not one of"):
        validate_metadata({**doc, "device": {**doc["device"], "type": "tpu"}})
    with pytest.raises(MetadataError, match="missing required field 'version'"):
        validate_metadata({k: v for k, v in doc.items() if k != "version"})


def test_builtin_validator_agrees_with_jsonschema(doc):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(metadata_schema())
    quant = {"method": "gguf", "source_format": "Q4_1", "dequantized_to": "float32",
             "runtime_dtype": "bfloat16", "tensor_types": {"Q4_1": 3}}
    quantized = {**doc, "quantization": quant}
    extended = {**doc, "x-node": {"region": "eu"}}
    for good in (doc, quantized, extended):
        assert validator.is_valid(good) and schema_errors(good, metadata_schema()) == []
    for description, broken in _mutations(doc):
        assert not validator.is_valid(broken), description
        assert schema_errors(broken, metadata_schema()), description


def test_request_schema_covers_the_engine_request_type():
    schema = request_schema(1024)
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    assert fields == set(schema["properties"])
    request = GenerationRequest(prompt="Hi", stop=("\n",))
    wire = {k: v for k, v in dataclasses.asdict(request).items() if v is not None}
    wire["stop"] = list(wire["stop"])
    assert schema_errors(wire, schema) == []
    assert schema_errors({"max_new_tokens": 4}, schema)  # neither prompt nor messages
    assert schema_errors({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, schema)  # both
    assert schema_errors({"prompt": "a", "max_new_tokens": 1024}, schema)  # cannot fit the context
    assert schema_errors({"prompt": "a", "top_p": 0}, schema)


def test_result_schema_covers_the_engine_result_types():
    schema = result_schema()
    usage = Usage(prompt_tokens=3, completion_tokens=2, time_to_first_token_s=0.01, tokens_per_s=50.0)
    result = GenerationResult(text="Paris.", token_ids=[7, 8], finish_reason="stop", usage=usage)
    assert {f.name for f in dataclasses.fields(GenerationResult)} == set(schema["properties"])
    assert {f.name for f in dataclasses.fields(Usage)} == set(schema["properties"]["usage"]["properties"])
    assert schema_errors(dataclasses.asdict(result), schema) == []
    chunk_schema = {**schema["$defs"]["TokenChunk"], "$defs": schema["$defs"]}
    assert {f.name for f in dataclasses.fields(TokenChunk)} == set(chunk_schema["properties"])
    assert schema_errors(dataclasses.asdict(TokenChunk(text="Par", token_ids=[7])), chunk_schema) == []
    assert schema_errors({**dataclasses.asdict(result), "finish_reason": "eos"}, schema)


@pytest.mark.model
def test_smollm2_metadata(smollm2):
    from tests.fixtures.model import TEST_MAX_SEQUENCE_LENGTH

    loaded = smollm2
    doc = validate_metadata(loaded.metadata)
    assert doc["name"] == "SmolLM2-135M-Instruct"
    assert doc["version"] == loaded.version and len(doc["version"]) == 16
    assert 130_000_000 < doc["parameters"] < 140_000_000
    assert doc["quantization"]["method"] == "gguf" and doc["quantization"]["source_format"] == "Q4_1"
    assert doc["quantization"]["dequantized_to"] == "float32"
    assert doc["context_length"] == TEST_MAX_SEQUENCE_LENGTH
    assert doc["architecture"]["max_position_embeddings"] == 8192
    assert "chat" in doc["capabilities"]
