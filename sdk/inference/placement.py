"""Device and precision choice, and the KV-cache memory plan that bounds the engine.

CUDA if available with bf16 (fp16 where the GPU lacks bf16), else CPU fp32; both overridable.
:func:`plan_kv_cache` turns ``gpu_memory_utilization`` into a KV-cache budget in tokens;
:func:`plan_paged_kv` sizes the engine's paged KV pool (a budget it grows into on demand).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from sdk.errors import InferenceError

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

#: Upper bound on concurrently decoded sequences, per device type (the scheduler's batch width).
MAX_BATCH_CUDA = 256
MAX_BATCH_CPU = 32
#: On CPU the cache may take at most this share of available RAM, and never more than this many bytes.
CPU_RAM_SHARE = 0.25
CPU_KV_CAP_BYTES = 4 << 30
#: Memory kept free on a GPU for activations, logits and allocator slack (share of the budget, minimum).
ACTIVATION_RESERVE_SHARE = 0.05
ACTIVATION_RESERVE_MIN = 512 << 20


class InsufficientMemory(InferenceError):
    """The memory budget cannot hold the weights plus one full-length sequence's KV cache."""

    reason = "insufficient_memory"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"bf16"``/``"float16"``/``torch.float32``... to a torch dtype; ``ValueError`` otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``device`` if given (checked), else ``cuda`` when available, else ``cpu``."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InferenceError(
                f"device {dev} requested but CUDA is not available", reason="device_unavailable"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise InferenceError(f"device {dev} does not exist", reason="device_unavailable")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"unsupported device type {dev.type!r}")
    return dev


def select_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``dtype`` if given, else bf16 on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere."""
    if dtype is not None and str(dtype) != "auto":
        chosen = resolve_dtype(dtype)
        if device.type == "cuda" and chosen is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.warning("bf16 requested but %s lacks it; using float16", device)
            return torch.float16
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()


def _cfg(model_config: Any, name: str, default: Any = None) -> Any:
    text_cfg = getattr(model_config, "text_config", None)
    value = getattr(model_config, name, None)
    if value is None and text_cfg is not None:
        value = getattr(text_cfg, name, None)
    return default if value is None else value


def model_dims(model_config: Any) -> dict[str, int]:
    """Layers, attention heads, KV heads, head dim and context length of a transformers config."""
    layers = int(_cfg(model_config, "num_hidden_layers"))
    heads = int(_cfg(model_config, "num_attention_heads"))
    kv_heads = int(_cfg(model_config, "num_key_value_heads", heads))
    head_dim = _cfg(model_config, "head_dim") or int(_cfg(model_config, "hidden_size")) // heads
    context = int(_cfg(model_config, "max_position_embeddings", 2048))
    return {
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": int(head_dim),
        "context_length": context,
    }


def kv_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes of K and V cache one token takes across all layers."""
    d = model_dims(model_config)
    return 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * dtype_size(dtype)


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (falls back to free physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class KVPlan:
    """How much KV cache the engine may allocate.

    ``max_tokens`` cache slots in total (all sequences together), ``max_batch_size`` sequences
    decoded at once, each up to ``max_sequence_length`` tokens (prompt + output).
    """

    max_tokens: int
    max_batch_size: int
    bytes_per_token: int
    budget_bytes: int
    max_sequence_length: int

    def as_dict(self) -> dict[str, int]:
        """Plain numbers for stats and metadata."""
        return {
            "max_tokens": self.max_tokens,
            "max_batch_size": self.max_batch_size,
            "bytes_per_token": self.bytes_per_token,
            "budget_bytes": self.budget_bytes,
            "max_sequence_length": self.max_sequence_length,
        }


def memory_budget(device: torch.device, gpu_memory_utilization: float = 0.9) -> int:
    """Bytes left for the KV cache on ``device``, after what is already allocated (weights included).

    CUDA: ``utilization * total - (total - free)`` minus an activation reserve, so everything the
    process (and others) hold counts against the share. CPU: a quarter of available RAM, at most 4 GiB.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(gpu_memory_utilization * total) - (total - free)
        reserve = max(ACTIVATION_RESERVE_MIN, int(ACTIVATION_RESERVE_SHARE * max(budget, 0)))
        return max(0, budget - reserve)
    return int(min(available_ram_bytes() * CPU_RAM_SHARE, CPU_KV_CAP_BYTES))


def plan_kv_cache(
    model_config: Any,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    gpu_memory_utilization: float = 0.9,
    max_sequence_length: int | None = None,
    max_batch_size: int | None = None,
    budget_bytes: int | None = None,
) -> KVPlan:
    """Size the KV cache: tokens that fit the budget, and how many full-length sequences run at once.

    Call it after the weights are on ``device`` so they count. ``max_sequence_length`` defaults
    to the model's context length and may not exceed it; ``budget_bytes`` overrides the measured
    budget (tests, or an engine sharing the device). Raises :class:`InsufficientMemory` when not
    even one full-length sequence fits.
    """
    device = torch.device(device)
    dims = model_dims(model_config)
    context = dims["context_length"]
    seq = context if max_sequence_length is None else int(max_sequence_length)
    if seq <= 0:
        raise ValueError(f"max_sequence_length must be positive, got {seq}")
    if seq > context:
        raise ValueError(f"max_sequence_length {seq} exceeds the model's context length {context}")
    per_token = kv_bytes_per_token(model_config, dtype)
    budget = memory_budget(device, gpu_memory_utilization) if budget_bytes is None else int(budget_bytes)
    max_tokens = budget // per_token
    if max_tokens < seq:
        log.error("KV budget %d B holds %d tokens, fewer than one sequence of %d", budget, max_tokens, seq)
        raise InsufficientMemory(
            f"KV-cache budget of {budget / 2**20:.0f} MiB holds {max_tokens} tokens, fewer than one "
            f"sequence of {seq}; raise gpu_memory_utilization or lower max_sequence_length"
        )
    cap = MAX_BATCH_CUDA if device.type == "cuda" else MAX_BATCH_CPU
    if max_batch_size is not None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        cap = max_batch_size
    batch = max(1, min(cap, max_tokens // seq))
    plan = KVPlan(
        max_tokens=int(max_tokens),
        max_batch_size=int(batch),
        bytes_per_token=int(per_token),
        budget_bytes=int(budget),
        max_sequence_length=seq,
    )
    log.info("KV plan on %s: %s", device, plan)
    return plan


@dataclass(frozen=True)
class PagedKVPlan:
    """The paged KV pool's bounds: blocks of ``block_size`` tokens, at most ``max_blocks`` of them
    (``budget_bytes``), ``initial_blocks`` allocated at start and at least ``grow_blocks`` added
    at a time; ``max_batch_size`` sequences run at once, each up to ``max_sequence_length``."""

    block_size: int
    bytes_per_block: int
    max_blocks: int
    budget_bytes: int
    initial_blocks: int
    grow_blocks: int
    max_batch_size: int
    max_sequence_length: int

    @property
    def max_tokens(self) -> int:
        """Tokens the whole budget holds."""
        return self.max_blocks * self.block_size

    def as_dict(self) -> dict[str, int]:
        """Plain numbers for stats and metadata."""
        return {
            "block_size": self.block_size,
            "bytes_per_block": self.bytes_per_block,
            "max_blocks": self.max_blocks,
            "max_tokens": self.max_tokens,
            "budget_bytes": self.budget_bytes,
            "initial_blocks": self.initial_blocks,
            "grow_blocks": self.grow_blocks,
            "max_batch_size": self.max_batch_size,
            "max_sequence_length": self.max_sequence_length,
        }


#: Bytes the paged pool adds at least per growth step.
KV_GROW_BYTES = 32 << 20
#: Bytes the paged pool holds at start and shrinks back to when idle (at most one growth step).
#: Growth is geometric (at least half the pool each step), so a small start costs one extra
#: reallocation of a few MB under load, not a copy of the pool per step.
KV_INITIAL_BYTES = 8 << 20


def plan_paged_kv(
    model_config: Any,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    max_sequence_length: int,
    max_batch_size: int,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    budget_bytes: int | None = None,
) -> PagedKVPlan:
    """Size the paged KV pool. The budget is ``budget_bytes`` if given; else on CUDA what
    ``gpu_memory_utilization`` leaves (:func:`memory_budget`); else on CPU what
    ``max_batch_size`` full-length sequences take, at most :func:`memory_budget`'s share of RAM.
    Memory is taken only as sequences need it. Raises :class:`InsufficientMemory` when the budget
    cannot hold one full-length sequence."""
    device = torch.device(device)
    if block_size < 1 or max_sequence_length < 1 or max_batch_size < 1:
        raise ValueError("block_size, max_sequence_length and max_batch_size must be positive")
    per_block = kv_bytes_per_token(model_config, dtype) * block_size
    if budget_bytes is not None:
        budget = int(budget_bytes)
    elif device.type == "cuda":
        budget = memory_budget(device, gpu_memory_utilization)
    else:
        full = max_batch_size * -(-max_sequence_length // block_size) * per_block
        budget = min(full, memory_budget(device))
    max_blocks = budget // per_block
    needed = -(-max_sequence_length // block_size)
    if max_blocks < needed:
        log.error("KV budget %d B holds %d blocks, fewer than one sequence of %d tokens", budget, max_blocks,
                  max_sequence_length)
        raise InsufficientMemory(
            f"KV-cache budget of {budget / 2**20:.0f} MiB holds {max_blocks * block_size} tokens, fewer than "
            f"one sequence of {max_sequence_length}; raise the KV memory (or gpu_memory_utilization) or "
            "lower max_sequence_length"
        )
    grow = max(16, KV_GROW_BYTES // per_block)
    initial = min(grow, max(16, KV_INITIAL_BYTES // per_block), int(max_blocks))
    plan = PagedKVPlan(
        block_size=block_size, bytes_per_block=per_block, max_blocks=int(max_blocks), budget_bytes=budget,
        initial_blocks=initial, grow_blocks=grow,
        max_batch_size=min(max_batch_size, MAX_BATCH_CUDA if device.type == "cuda" else MAX_BATCH_CPU),
        max_sequence_length=max_sequence_length,
    )
    log.info("paged KV plan on %s: %s", device, plan)
    return plan


def parse_bytes(text: str | int) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"2G"``, ``"1500000"`` -> bytes; ``ValueError`` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        raw = str(text).strip().replace(" ", "")
        units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
                 "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}
        number = raw.rstrip("bBkKmMgGtTiI")
        unit = raw[len(number):].lower()
        if not number or unit not in units:
            raise ValueError(f"not a size: {text!r} (use e.g. 1GiB, 512MiB or a number of bytes)")
        try:
            value = int(float(number) * units[unit])
        except (ValueError, OverflowError):
            raise ValueError(f"not a size: {text!r} (use e.g. 1GiB, 512MiB or a number of bytes)") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return value


__all__ = [
    "InsufficientMemory",
    "KVPlan",
    "KV_GROW_BYTES",
    "KV_INITIAL_BYTES",
    "PagedKVPlan",
    "parse_bytes",
    "plan_paged_kv",
    "available_ram_bytes",
    "dtype_name",
    "dtype_size",
    "kv_bytes_per_token",
    "memory_budget",
    "model_dims",
    "plan_kv_cache",
    "resolve_dtype",
    "select_device",
    "select_dtype",
]
