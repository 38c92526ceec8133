"""An assistant that answers through the inference mesh (any node serving its model)."""

from __future__ import annotations

from typing import Any

from sdk.inference import GenerationRequest


class Assistant:
    """Asks ``model`` on the mesh (an ``sdk.mesh.Mesh`` router); prompts travel encrypted to the node."""

    def __init__(self, mesh: Any, model: str, *, max_tokens: int = 128) -> None:
        self.mesh = mesh
        self.model = model
        self.max_tokens = max_tokens

    @staticmethod
    def prompt(question: str) -> str:
        """The prompt sent for ``question``."""
        return f"Answer briefly. {question.strip()}"

    async def answer(self, question: str) -> str:
        """The model's answer to ``question``."""
        request = GenerationRequest(prompt=self.prompt(question), max_new_tokens=self.max_tokens,
                                    temperature=0.0, model=self.model)
        result = await self.mesh.generate(request)
        return result.text.strip()
