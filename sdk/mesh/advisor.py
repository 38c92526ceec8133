"""``MeshAdvisor``: the coordinator's config advisor over the inference mesh.

    advisor = MeshAdvisor.connect(broker, coordinator_key, credential=access_vc,
                                  node_policy=NodePolicy.trusting(node_issuer_did), model="SmolLM2-135M-Instruct")
    await advisor.start()
    coordinator = Coordinator(coordinator_key, ..., advisor=advisor)

The coordinator is one more permitted mesh peer: its own key signs the requests and its own
``InferenceAccessCredential`` rides on them. Each call asks for a chat completion whose output is
constrained to the rule's JSON Schema (``response_format`` ``json_schema``, OpenAI's shape); the
coordinator validates the answer itself whatever the node did. Any object with ``generate(request)``
(a local ``Engine``, a ``FakeEngine``) can stand in for the mesh router.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from sdk.identity import Key
from sdk.inference.types import GenerationRequest
from sdk.mesh.credentials import NodePolicy
from sdk.mesh.errors import MeshTimeout
from sdk.mesh.router import Mesh, RouterConfig

log = logging.getLogger(__name__)

#: The system turn of every request: the task and the schema the answer must follow.
SYSTEM_PROMPT = ("You choose a device's configuration. Answer with one JSON object and nothing else; "
                 "it must validate against this JSON Schema: {schema}")
_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")
_HAS_RESPONSE_FORMAT = "response_format" in {f.name for f in dataclasses.fields(GenerationRequest)}


@dataclass(frozen=True)
class MeshAdvice:
    """The answer: completion text, and the model (name, version) that wrote it."""

    text: str
    model: str
    model_version: str = ""


def response_format(schema: dict[str, Any], name: str = "config") -> dict[str, Any]:
    """OpenAI's ``response_format`` for a JSON Schema: ``{"type": "json_schema", "json_schema": ...}``."""
    return {"type": "json_schema", "json_schema": {"name": _NAME_RE.sub("_", name)[:64] or "config",
                                                   "schema": schema, "strict": True}}


class MeshAdvisor:
    """A config advisor (``advise(prompt, schema, *, timeout)``) over a mesh router or any backend
    with ``generate(GenerationRequest)``; ``connect`` builds and owns the router. ``constrain=False``
    sends no ``response_format`` (a backend that cannot constrain): the answer is still validated."""

    def __init__(self, backend: Any, *, model: str | None = None, system: str = SYSTEM_PROMPT,
                 constrain: bool = True) -> None:
        if not callable(getattr(backend, "generate", None)):
            raise TypeError("backend must have generate(request): a Mesh, an Engine or a FakeEngine")
        self.backend = backend
        self.model = model
        self.system = system
        self.constrain = constrain
        self.calls = 0
        self._owned = False

    @classmethod
    def connect(cls, broker: Any, key: Key, *, credential: Any, node_policy: NodePolicy | Any,
                model: str | None = None, config: RouterConfig | None = None, **transport_options: Any
                ) -> MeshAdvisor:
        """An advisor with its own router: ``key`` signs, ``credential`` (an InferenceAccessCredential
        for ``key``'s DID) authorizes, ``node_policy`` says which nodes to trust. Call :meth:`start`."""
        mesh = Mesh(broker, key, credentials=[credential], node_policy=node_policy, default_model=model,
                    config=config or RouterConfig(), **transport_options)
        advisor = cls(mesh, model=model)
        advisor._owned = True
        return advisor

    async def start(self) -> None:
        """Start the router this advisor owns (nothing for a backend given to it)."""
        if self._owned:
            await self.backend.start()

    async def aclose(self) -> None:
        """Close the router this advisor owns."""
        if self._owned:
            await self.backend.aclose()

    async def __aenter__(self) -> MeshAdvisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def request(self, prompt: str, schema: dict[str, Any], *, max_tokens: int = 256,
                temperature: float = 0.0) -> GenerationRequest:
        """The generation request for one decision (system turn with the schema, user turn the prompt)."""
        system = self.system.replace("{schema}", json.dumps(schema, sort_keys=True, separators=(",", ":")))
        fields: dict[str, Any] = {"messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": prompt}],
                                  "max_new_tokens": max_tokens, "temperature": temperature, "seed": 0}
        if self.constrain and _HAS_RESPONSE_FORMAT:
            fields["response_format"] = response_format(schema)
        return GenerationRequest(**fields)

    async def advise(self, prompt: str, schema: dict[str, Any], *, timeout: float, max_tokens: int = 256,
                     temperature: float = 0.0) -> MeshAdvice:
        """One constrained completion within ``timeout`` seconds (``MeshTimeout`` past it; the mesh's
        own errors otherwise: ``NoNode``, ``NotPermitted``...)."""
        req = self.request(prompt, schema, max_tokens=max_tokens, temperature=temperature)
        self.calls += 1
        try:
            if isinstance(self.backend, Mesh):
                result = await asyncio.wait_for(self.backend.generate(req, model=self.model), timeout)
            else:
                result = await asyncio.wait_for(self.backend.generate(req), timeout)
        except TimeoutError as exc:
            raise MeshTimeout(f"no configuration advice within {timeout:g} s") from exc
        name, version = self._identity()
        log.debug("advice from %s %s: %d tokens", name, version, result.usage.completion_tokens)
        return MeshAdvice(result.text, name, version)

    def _identity(self) -> tuple[str, str]:
        """The model's name and version: the nodes' adverts (versions joined by ``|`` when several
        live nodes serve different ones), or a local engine's metadata."""
        if isinstance(self.backend, Mesh):
            adverts = self.backend.nodes(self.model)
            name = self.model or (adverts[0].models[0] if adverts and adverts[0].models else "")
            versions = sorted({str(a.metadata.get("version") or "") for a in adverts} - {""})
            return name, "|".join(versions)
        metadata = getattr(self.backend, "metadata", None) or {}
        return str(self.model or metadata.get("name") or ""), str(metadata.get("version") or "")


__all__ = ["MeshAdvisor", "MeshAdvice", "SYSTEM_PROMPT", "response_format"]
