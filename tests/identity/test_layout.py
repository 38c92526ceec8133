"""The identity package's shape: safe API on top, primitives in hazmat, no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import nacl.bindings

import sdk.identity
from sdk.identity import Key
from sdk.identity.hazmat.keys import raw_private_bytes, signing_key_bytes, x25519_private

PACKAGE = Path(sdk.identity.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Every sdk.identity module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdk.identity"):
            found.add(node.module)
            for alias in node.names:  # "from sdk.identity import didkit_backend"
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent.parent / (candidate.replace(".", "/") + ".py")).exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sdk.identity"))
    return found


def test_no_import_cycle_inside_the_identity_package() -> None:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent.parent).with_suffix("").parts)
        if path.name == "__init__.py":
            continue  # the facade re-exports; nothing below imports it
        modules[name] = {
            m for m in _imports(path) if m != name and m not in ("sdk.identity", "sdk.identity.hazmat")
        }
    state: dict[str, int] = {}

    def visit(mod: str, trail: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(modules.get(mod, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, mod, dep]))
            if dep in modules and state.get(dep) is None:
                visit(dep, [*trail, mod])
        state[mod] = 2

    for mod in sorted(modules):
        if state.get(mod) is None:
            visit(mod, [])


def test_safe_api_leaves_primitives_to_hazmat() -> None:
    for name in ("DataIntegrityProof", "register_proof_backend"):
        assert name not in sdk.identity.__all__ and not hasattr(sdk.identity, name)
    for name in ("StatusListStore", "load_key", "load_credential", "TrustPolicy", "verify_credential"):
        assert name in sdk.identity.__all__
    key = Key.generate()
    assert not hasattr(key, "seed") and not hasattr(key, "x25519_private")
    assert Key.from_seed(raw_private_bytes(key)) == key
    sk = signing_key_bytes(key)
    assert len(sk) == 64 and sk[32:] == key.public.raw
    assert key.public.is_valid(nacl.bindings.crypto_sign(b"m", sk)[:64], b"m")
    other = Key.generate()
    assert nacl.bindings.crypto_scalarmult(
        x25519_private(key), other.x25519_public
    ) == nacl.bindings.crypto_scalarmult(x25519_private(other), key.x25519_public)
