"""Shared pytest set-up. Fixtures live in tests/fixtures/, one module per layer."""

pytest_plugins = [
    "tests.fixtures.identity",
    "tests.fixtures.brokers",
    "tests.fixtures.model",
    "tests.fixtures.postgres",
]
