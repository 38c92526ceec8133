"""Next-token selection: greedy, or temperature / top-k / top-p sampling with a per-request generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "apply_token_bitmask", "make_generator", "sample_rows"]


@dataclass(frozen=True)
class SamplingParams:
    """The sampling fields of one request; ``temperature`` 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        """True when the argmax is taken (no randomness)."""
        return self.temperature <= 0.0 or self.top_k == 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one request: seeded for reproducibility, else from fresh entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _sample_one(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Sample one id from a 1-D logits row."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = (cum - sorted_probs) > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=gen)[0]


_BYTE_BIAS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_bias(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each byte value, 0 where its bit is set and -inf where it is not."""
    table = _BYTE_BIAS.get((device, dtype))
    if table is None:
        bits = torch.tensor([[(b >> i) & 1 for i in range(8)] for b in range(256)], dtype=torch.bool)
        table = torch.where(bits, 0.0, float("-inf")).to(device=device, dtype=dtype)
        _BYTE_BIAS[(device, dtype)] = table
    return table


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] with each token whose bit in ``bitmask`` [rows, words] (int32,
    bit ``i % 32`` of word ``i // 32``) is 0 at -inf; a new tensor. One table lookup per mask byte."""
    rows, vocab = logits.shape
    words = bitmask.to(logits.device, non_blocking=True).contiguous()
    bias = torch.nn.functional.embedding(words.view(torch.uint8).int(), _byte_bias(logits.device, logits.dtype))
    bias = bias.view(rows, -1)
    if bias.shape[1] < vocab:  # tokens past the mask (padding of the output layer) are never allowed
        bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[1]), value=float("-inf"))
    return logits + bias[:, :vocab]


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    *, masks: tuple[list[int], torch.Tensor] | None = None,
) -> list[int]:
    """Pick one token per row of ``logits`` [rows, vocab]; one host sync for the whole batch.

    ``masks`` = (row indices, bitmask [len(rows), words]) restricts those rows to the tokens
    their grammar allows (constrained decoding); other rows sample as usual.
    """
    if masks is not None and masks[0]:
        rows, bitmask = masks
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits = logits.index_copy(0, index, apply_token_bitmask(logits.index_select(0, index), bitmask))
    picks = torch.argmax(logits, dim=-1)
    if not all(p.greedy for p in params):
        picks = picks.clone()
        for i, (p, g) in enumerate(zip(params, generators, strict=True)):
            if not p.greedy:
                picks[i] = _sample_one(logits[i], p, g)
    return picks.tolist()
