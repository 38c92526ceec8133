"""`autoglm` commands for the inference layer: ``serve`` (OpenAI-compatible HTTP) and ``generate``.

torch, transformers and the web stack are imported inside the commands so ``autoglm --help``
stays fast. Arguments are checked before the model loads (:func:`check_engine_options`): an
out-of-range value is an error naming the limit, an option the device ignores is a warning line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
API_KEY_HELP = ("Require this bearer key on /v1 (repeatable). Keys are also read from $AUTOGLM_API_KEYS "
                "(comma-separated).")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices and not (name == "--device" and value.startswith("cuda:")):
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=name)
    return value


def _warn(message: str) -> None:
    log.warning("%s", message)
    typer.echo(f"warning: {message}", err=True)


def _runs_on_gpu(device: str) -> bool:
    """Whether ``device`` (auto, cpu, cuda, cuda:N) means CUDA here (auto asks torch)."""
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    import torch

    return bool(torch.cuda.is_available())


def check_engine_options(*, model_path: str | None, device: str, dtype: str, max_sequence_length: int | None,
                         gpu_memory_utilization: float | None = None) -> None:
    """Check the engine's options before anything loads: choices, ``--max-sequence-length``
    against the model's context length (read from its files), ``--gpu-memory-utilization`` in
    (0, 1] and only meaningful on CUDA (a warning otherwise)."""
    from sdk.cli.errors import fail

    _check_choice(device, DEVICE_CHOICES, "--device")
    _check_choice(dtype, DTYPE_CHOICES, "--dtype")
    if gpu_memory_utilization is not None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            fail("invalid_option", f"--gpu-memory-utilization {gpu_memory_utilization} is not in (0, 1]",
                 "give a fraction of GPU memory such as 0.9", usage=True)
        if not _runs_on_gpu(device):
            _warn(f"--gpu-memory-utilization {gpu_memory_utilization} is ignored on CPU (the KV cache grows "
                  "up to --kv-memory, default --max-batch-size x --max-sequence-length tokens)")
    if max_sequence_length is not None:
        from sdk.inference.limits import model_context_length

        limit = model_context_length(model_path)
        if limit is not None and max_sequence_length > limit:
            fail("invalid_config", f"--max-sequence-length {max_sequence_length} is above the model's context "
                 f"length {limit}", f"use --max-sequence-length {limit} or less, or leave it out (default: the "
                 "model's context length)", usage=True)


def api_keys(flags: list[str] | None) -> tuple[str, ...]:
    """``--api-key`` values plus ``$AUTOGLM_API_KEYS`` (the one rule ``serve`` and ``gateway`` share)."""
    from sdk.inference.server import api_keys_from

    return api_keys_from(flags)


def setup_logging(log_level: str) -> str:
    """Check ``--log-level`` and configure logging to stderr; returns the lower-case name."""
    from sdk.cli.options import log_level as check_level

    level = check_level(log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return log_level.strip().lower()


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``autoglm serve`` needs, so other layers can reuse the serving loop."""

    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_sequence_length: int | None = None
    max_batch_size: int = 8
    max_queue_size: int = 256
    kv_memory: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_concurrent: int = 64
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    log_level: str = "info"
    runtime: str = "auto"


#: Hook for the mesh layer (issue 6): ``autoglm serve --broker ... --keystore ...`` builds an
#: attachment from its options; it receives the started engine and, while the HTTP API serves,
#: keeps the engine on the mesh (e.g. ``async with MeshNode(engine, ...)``). None: HTTP only.
EngineAttachment = Callable[[Any], AbstractAsyncContextManager[Any]]


async def run_serve(settings: ServeSettings, *, attach: EngineAttachment | None = None) -> None:
    """Start the engine, optionally attach it to the mesh, and serve HTTP until SIGINT/SIGTERM."""
    from sdk.inference.engine import Engine
    from sdk.inference.server import serve_backend
    from sdk.inference.types import EngineConfig

    config = EngineConfig(
        model_path=settings.model_path,
        device=settings.device,
        dtype=settings.dtype,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_sequence_length=settings.max_sequence_length,
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue_size,
        kv_memory=settings.kv_memory,
        runtime=settings.runtime,
    )
    engine = await Engine.start(config)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if attach is not None:
                await stack.enter_async_context(attach(engine))
            await serve_backend(
                engine,
                host=settings.host,
                port=settings.port,
                served_model_name=settings.served_model_name,
                max_concurrent=settings.max_concurrent,
                max_queued=settings.max_queue_size,
                api_keys=settings.api_keys or None,
                log_level=settings.log_level,
            )
    finally:
        await engine.aclose()


def serve(
    model_path: Annotated[
        str | None, typer.Option(help="Model directory or GGUF file (default: the bundled SmolLM2).")
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(min=0.01, max=1.0, help="Fraction of GPU memory for weights + KV cache "
                                   "(default 0.9; ignored on CPU, with a warning).")
    ] = None,
    max_sequence_length: Annotated[
        int | None, typer.Option(min=2, help="Max prompt + output tokens (default: the model's context length, "
                                 "at most 8192; above it is an error).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind (0: any free port).")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    served_model_name: Annotated[
        str | None, typer.Option(help="Model id clients use (default: the metadata name).")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 8,
    max_queue_size: Annotated[int, typer.Option(min=0, help="Requests waiting before 429.")] = 256,
    max_concurrent: Annotated[int, typer.Option(min=1, help="HTTP generations in flight.")] = 64,
    api_key: Annotated[list[str] | None, typer.Option(help=API_KEY_HELP)] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning, error.")] = "info",
    kv_memory: Annotated[
        str | None, typer.Option(help="Most memory the paged KV cache grows to, e.g. 1GiB or 512MiB (default: "
                                 "--gpu-memory-utilization on GPU; max-batch-size x max-sequence-length on CPU).")
    ] = None,
    runtime: Annotated[
        str, typer.Option(help="transformers, native (plain-torch Llama: less memory) or auto (native on CPU "
                          "for a supported Llama model, transformers otherwise).")
    ] = "auto",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/models, /v1/completions,
    /v1/chat/completions, /health, /metrics).

    API keys: --api-key (repeatable) and $AUTOGLM_API_KEYS (comma-separated); none given, no key is needed."""
    level = setup_logging(log_level)
    check_engine_options(model_path=model_path, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                         gpu_memory_utilization=gpu_memory_utilization)
    kv_bytes = _kv_memory(kv_memory)
    settings = ServeSettings(
        model_path=model_path,
        device=device,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION,
        max_sequence_length=max_sequence_length,
        max_batch_size=max_batch_size,
        max_queue_size=max_queue_size,
        kv_memory=kv_bytes,
        host=host,
        port=port,
        served_model_name=served_model_name,
        max_concurrent=max_concurrent,
        api_keys=api_keys(api_key),
        log_level=level,
        runtime=_check_choice(runtime, ("auto", "transformers", "native"), "--runtime"),
    )
    _run_or_exit(run_serve(settings))


def _kv_memory(text: str | None) -> int | None:
    """``--kv-memory`` in bytes (None when not given); a malformed size is a usage error."""
    if text is None:
        return None
    from sdk.cli.errors import fail
    from sdk.inference.placement import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        fail("invalid_option", f"--kv-memory: {exc}", "give a size such as 1GiB, 512MiB or a number of bytes",
             usage=True)


def _run_or_exit(coro: Any, *, as_json: bool = False) -> None:
    """Run ``coro``; a failure becomes the CLI's one ``error:`` line (JSON with ``as_json``) and
    its exit status (see :mod:`sdk.cli.errors`); Ctrl-C exits 130."""
    from sdk.cli.errors import guard

    with guard(as_json=as_json):
        try:
            asyncio.run(coro)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


async def stream_generation(
    prompt: str,
    *,
    chat: bool,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    model_path: str | None,
    device: str,
    dtype: str,
    max_sequence_length: int | None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[Any]:
    """Start a one-request engine and yield its ``TokenChunk``s (the engine closes afterwards)."""
    from sdk.inference.engine import Engine
    from sdk.inference.types import EngineConfig, GenerationRequest

    config = EngineConfig(model_path=model_path, device=device, dtype=dtype,
                          max_sequence_length=max_sequence_length, max_batch_size=1, warmup=False)
    engine = await Engine.start(config)
    try:
        if on_ready is not None:
            on_ready(dict(engine.metadata))
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            req = GenerationRequest(messages=messages, max_new_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, seed=seed)
        else:
            req = GenerationRequest(prompt=prompt, max_new_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, seed=seed)
        async for chunk in engine.stream(req):
            yield chunk
    finally:
        await engine.aclose()


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (or user message with --chat).")],
    max_tokens: Annotated[int, typer.Option(min=1, help="Max new tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="0 = off.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (reproducible output).")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Apply the chat template.")] = True,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    model_path: Annotated[
        str | None, typer.Option(help="Model directory or GGUF (default: bundled SmolLM2).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    max_sequence_length: Annotated[
        int | None, typer.Option(min=2, help="Max prompt + output tokens (default: the model's context length, "
                                 "at most 8192; above it is an error).")
    ] = None,
) -> None:
    """Generate once from a local model, streaming the text to stdout (status on stderr)."""
    from rich.console import Console

    check_engine_options(model_path=model_path, device=device, dtype=dtype, max_sequence_length=max_sequence_length)
    err = Console(stderr=True, emoji=False)

    async def main() -> None:
        status = err.status("loading model…")
        status.start()

        def ready(meta: dict[str, Any]) -> None:
            status.stop()
            device = meta.get("device", "?")
            device = device.get("type", "?") if isinstance(device, dict) else device
            err.print(f"[dim]{meta.get('name', 'model')} on {device} ({meta.get('dtype', '?')})[/dim]")

        usage = None
        try:
            async for chunk in stream_generation(
                prompt, chat=chat, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                top_k=top_k, seed=seed, model_path=model_path, device=device, dtype=dtype,
                max_sequence_length=max_sequence_length, on_ready=ready,
            ):
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if chunk.usage is not None:
                    usage = chunk.usage
        finally:
            status.stop()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if usage is not None:
            err.print(f"[dim]{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
                      f"first token {usage.time_to_first_token_s:.2f}s, "
                      f"{usage.tokens_per_s:.1f} tokens/s[/dim]")

    _run_or_exit(main())


def register(app: typer.Typer) -> None:
    """Attach this module's commands and groups to the root app."""
    app.command("serve")(serve)
    app.command("generate")(generate)


__all__ = [
    "register",
    "serve",
    "generate",
    "run_serve",
    "ServeSettings",
    "EngineAttachment",
    "check_engine_options",
    "api_keys",
    "setup_logging",
    "stream_generation",
]
