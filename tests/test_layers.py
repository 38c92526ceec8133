"""The layers of docs/ARCHITECTURE.md, enforced.

Two checks:

* importing a layer in a fresh interpreter loads nothing from the layers above it, nor the heavy
  third-party stacks it must not need (``sys.modules`` after ``python -c "import <layer>"``);
* the package graph built from every ``import`` statement (lazy ones included) in ``sdk/`` and
  ``brokers/`` is acyclic and has only the edges the import-rules table of docs/ARCHITECTURE.md allows.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

#: The top-level packages of the layer graph (``sdk.errors`` is the shared root every layer may use).
PACKAGES = ("sdk.identity", "sdk.messaging", "sdk.coord", "sdk.inference", "sdk.mesh", "sdk.cli", "brokers",
            "sdk.testing")
SHARED = ("sdk", "sdk.errors")
#: Modules outside a layer's package that belong to it (``python -m sdk`` is the CLI's entry point).
MEMBERS = {"sdk.__main__": "sdk.cli"}

BROKER_STACKS = ("paho", "amqtt", "brokers")
HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "typer", "rich")

# (modules imported together, modules that must not be loaded afterwards, xfail reason or None)
IMPORT_CASES: list[tuple[tuple[str, ...], tuple[str, ...], str | None]] = [
    (("sdk.errors",), ("sdk.identity", "sdk.messaging", "sdk.coord", "sdk.inference", "sdk.mesh",
                       "sdk.cli", *BROKER_STACKS, *HEAVY), None),
    (("sdk.identity",), ("paho", "amqtt", "torch", "transformers", "sdk.messaging", "sdk.coord",
                         "sdk.mesh", "sdk.inference", "sdk.cli", "brokers", "sqlite3", "prometheus_client"),
     None),
    (("sdk.messaging",), ("sdk.coord", "sdk.mesh", "sdk.inference", "sdk.cli", "sqlite3",
                          "prometheus_client", "amqtt", "torch", "brokers", "paho"), None),
    (("sdk.messaging.client",), ("sdk.coord", "sdk.mesh", "sdk.inference", "sdk.cli", "sqlite3",
                                 "prometheus_client", "amqtt", "torch", "brokers", *HEAVY), None),
    (("sdk.messaging.transport",), ("sdk.coord", "sdk.mesh", "sdk.inference", "sdk.cli", "sqlite3",
                                    "prometheus_client", "amqtt", "torch", "brokers", *HEAVY), None),
    (("sdk.messaging.status",), ("sdk.coord", "sdk.mesh", "sdk.inference", "sdk.cli", "sqlite3",
                                 "prometheus_client", "amqtt", "torch", "brokers", *HEAVY), None),
    (("sdk.coord.protocol",), ("sdk.coord.coordinator", "sdk.coord.device", "sdk.mesh", "sdk.inference",
                               "sqlite3", "prometheus_client", "amqtt", "torch", "brokers"), None),
    (("sdk.coord.device",), ("sdk.coord.coordinator", "sdk.mesh", "sdk.inference", "sqlite3",
                             "prometheus_client", "amqtt", "torch", "brokers", *HEAVY), None),
    (("sdk.mesh.router",), ("torch", "transformers", "sdk.coord", "sdk.cli", "amqtt", "brokers",
                            "sqlite3"), None),
    (("sdk.coord.coordinator",), ("sdk.mesh", "sdk.inference", "sdk.cli", "amqtt", "brokers", *HEAVY), None),
    (("sdk.mesh", "sdk.mesh.node", "sdk.mesh.gateway"), ("torch", "transformers", "sdk.coord", "sdk.cli",
                                                         "amqtt", "brokers", "sqlite3"), None),
    (("sdk.inference.http",), ("torch", "transformers", "paho", "amqtt", "sdk.identity", "sdk.messaging",
                               "sdk.coord", "sdk.mesh", "brokers"), None),
    (("sdk.messaging.broker_auth",), ("paho", "amqtt", "sdk.coord", "sdk.mesh", "sdk.inference", "brokers",
                                      "sqlite3", "prometheus_client", *HEAVY), None),
    (("brokers", "brokers.mosquitto"), ("amqtt", "paho", "sdk.coord", "sdk.mesh", "sdk.inference", "sdk.cli",
                                        "sqlite3", "prometheus_client", *HEAVY), None),
    (("brokers.did_auth",), ("sdk.coord", "sdk.mesh", "sdk.inference", "sdk.cli", "torch", "paho",
                             "sqlite3", "prometheus_client"), None),
    (("sdk.inference", "sdk.inference.types", "sdk.inference.errors", "sdk.inference.backend"),
     ("paho", "amqtt", "torch", "transformers", "fastapi", "sdk.messaging", "sdk.coord", "sdk.mesh",
      "sdk.identity", "brokers"), None),
    # the pytest plugin loads in every test run of a project with the SDK installed: pytest only
    (("sdk.testing", "sdk.testing.plugin"), ("sdk.identity", "sdk.messaging", "sdk.coord", "sdk.mesh",
                                             "sdk.inference", "sdk.cli", *BROKER_STACKS, *HEAVY), None),
    (("sdk.testing.fake_engine",), ("torch", "transformers", "paho", "amqtt", "sdk.messaging", "sdk.coord",
                                    "sdk.mesh", "brokers", "fastapi"), None),
]


def _loaded_after_import(modules: Iterable[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _offending(loaded: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    names = tuple(forbidden)
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in names))


def _case_id(case: tuple[tuple[str, ...], tuple[str, ...], str | None]) -> str:
    return "+".join(case[0])


def _params() -> list[object]:
    params: list[object] = []
    for case in IMPORT_CASES:
        modules, forbidden, xfail = case
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        params.append(pytest.param(modules, forbidden, marks=marks, id=_case_id(case)))
    return params


@pytest.mark.parametrize(("modules", "forbidden"), _params())
def test_layer_imports_nothing_from_above(modules: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    loaded = _loaded_after_import(modules)
    assert not _offending(loaded, forbidden), f"importing {modules} loaded {_offending(loaded, forbidden)}"


def test_offending_detects_submodules() -> None:
    # the check itself must be able to fail
    assert _offending(["sdk.coord.coordinator.store", "sqlite3", "sdk.coordx"], ["sdk.coord", "sqlite3"]) == [
        "sdk.coord.coordinator.store",
        "sqlite3",
    ]


# ------------------------------------------------------------------ the static package graph


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imported_names(path: Path) -> set[str]:
    """Every module name an ``import`` in ``path`` may refer to (``from a import b``: ``a`` and ``a.b``)."""
    module, is_package = _module_name(path)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _package_of(module: str) -> str | None:
    if module in MEMBERS:
        return MEMBERS[module]
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return None


def _import_edges() -> dict[str, dict[str, set[str]]]:
    """``{package: {imported package: {imported module names}}}`` over sdk/ and brokers/."""
    edges: dict[str, dict[str, set[str]]] = {p: {} for p in PACKAGES}
    files = [*(ROOT / "sdk").rglob("*.py"), *(ROOT / "brokers").rglob("*.py")]
    for path in files:
        module, _ = _module_name(path)
        source = _package_of(module)
        for name in _imported_names(path):
            target = _package_of(name)
            if source is None:
                assert target is None, f"{module} (shared root) imports {name}"
                continue
            if target is not None and target != source:
                edges[source].setdefault(target, set()).add(name)
    return edges


def _allowed_from_doc() -> dict[str, set[str] | None]:
    """The import-rules table: ``{package: allowed project imports}`` (None: everything).

    A package name allows the whole package; a module name (``sdk.messaging.broker_auth``) only
    that module.
    """
    table: dict[str, set[str] | None] = {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"`[\w.]+`", cells[0]):
            continue
        package = cells[0].strip("`")
        if package not in PACKAGES:
            continue
        may = cells[1]
        if "everything" in may:
            table[package] = None
            continue
        names = set(re.findall(r"`((?:sdk|brokers)[\w.]*)`", may)) - set(SHARED)
        table[package] = names
    return table


def _is_allowed(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_architecture_table_names_every_package() -> None:
    assert set(_allowed_from_doc()) == set(PACKAGES)


def test_package_graph_is_acyclic() -> None:
    graph = {source: set(targets) for source, targets in _import_edges().items()}
    assert _find_cycle(graph) is None, f"import cycle between packages: {_find_cycle(graph)}"


def test_only_test_suites_import_sdk_testing() -> None:
    importers = sorted(source for source, targets in _import_edges().items() if "sdk.testing" in targets)
    assert importers == [], f"library packages import sdk.testing: {importers}"


def test_find_cycle_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_imports_follow_the_architecture_table() -> None:
    allowed = _allowed_from_doc()
    violations = []
    for source, targets in _import_edges().items():
        rule = allowed[source]
        if rule is None:
            continue
        for target, names in targets.items():
            bad = sorted(n for n in names if not _is_allowed(n, rule) and n != target)
            if target not in {_package_of(a) for a in rule}:
                bad = sorted(names)
            if bad:
                violations.append(f"{source} -> {target}: {', '.join(bad)}")
    header = "imports the table in docs/ARCHITECTURE.md does not allow:\n"
    assert not violations, header + "\n".join(violations)


# ------------------------------------------------------------------ dependencies follow the layers


def _requirement_names(requirements: Iterable[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_install_is_identity_and_messaging_only() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert _requirement_names(project["dependencies"]) == {"pynacl", "cryptography", "paho-mqtt", "joserfc"}
    extras = project["optional-dependencies"]
    assert "amqtt" in _requirement_names(extras["broker"])
    assert {"typer", "rich"} <= _requirement_names(extras["cli"])
    assert "prometheus-client" in _requirement_names(extras["coordinator"])
    assert "torch" in _requirement_names(extras["inference"])
    assert set(extras) - {"all"} <= set(re.findall(r"\w+", extras["all"][0].partition("[")[2]))


def test_cli_without_its_extra_names_the_extra() -> None:
    code = "import sys; sys.modules['typer'] = None\nimport sdk.cli\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode != 0
    assert "MissingExtra" in out.stderr and "open-autoglm-sdk[cli]" in out.stderr, out.stderr
