"""`autoglm` commands for the inference layer: ``serve`` (OpenAI-compatible HTTP) and ``generate``.

torch, transformers and the web stack are imported inside the commands so ``autoglm --help``
stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices and not (name == "--device" and value.startswith("cuda:")):
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=name)
    return value


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``autoglm serve`` needs, so other layers can reuse the serving loop."""

    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_sequence_length: int = 8192
    max_batch_size: int = 8
    max_queue_size: int = 256
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_concurrent: int = 64
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    log_level: str = "info"


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
        float, typer.Option(min=0.01, max=1.0, help="Fraction of GPU memory for weights + KV cache.")
    ] = 0.9,
    max_sequence_length: Annotated[int, typer.Option(min=2, help="Max prompt + output tokens.")] = 8192,
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
    api_key: Annotated[
        list[str] | None,
        typer.Option(help="Require this bearer key on /v1 (repeatable; env AUTOGLM_API_KEYS, comma list)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning.")] = "info",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/models, /v1/completions,
    /v1/chat/completions, /health, /metrics)."""
    _check_choice(device, DEVICE_CHOICES, "--device")
    _check_choice(dtype, DTYPE_CHOICES, "--dtype")
    keys = list(api_key or []) + [k for k in os.environ.get("AUTOGLM_API_KEYS", "").split(",") if k]
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(
        model_path=model_path,
        device=device,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_sequence_length=max_sequence_length,
        max_batch_size=max_batch_size,
        max_queue_size=max_queue_size,
        host=host,
        port=port,
        served_model_name=served_model_name,
        max_concurrent=max_concurrent,
        api_keys=tuple(keys),
        log_level=log_level.lower(),
    )
    _run_or_exit(run_serve(settings))


def _run_or_exit(coro: Any) -> None:
    """Run ``coro``; an SDK error becomes a one-line message and exit status 1."""
    from rich.console import Console

    from sdk.errors import AutoGLMError

    try:
        asyncio.run(coro)
    except AutoGLMError as exc:
        Console(stderr=True, emoji=False).print(f"[red]error[/red] ({exc.reason}): {exc}")
        raise typer.Exit(1) from exc
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
    max_sequence_length: int,
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
    max_sequence_length: Annotated[int, typer.Option(min=2)] = 8192,
) -> None:
    """Generate once from a local model, streaming the text to stdout (status on stderr)."""
    from rich.console import Console

    _check_choice(device, DEVICE_CHOICES, "--device")
    _check_choice(dtype, DTYPE_CHOICES, "--dtype")
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
    "stream_generation",
]
