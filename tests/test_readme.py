"""The README's Python example runs as written."""

import contextlib
import io
import pathlib
import re


def test_readme_python_example_runs():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert out.getvalue().strip() == "True []"


# -- the README's install and command lines stay true ----------------------------------------------------

ROOT = pathlib.Path(__file__).parent.parent


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_quick_start_has_the_venv_step_and_the_two_make_commands():
    quick = re.search(r"## Quick start.*?```bash\n(.*?)```", _readme(), re.S)
    assert quick, "README has no quick start block"
    lines = [line.split("#")[0].strip() for line in quick.group(1).splitlines()]
    assert "python3 -m venv .venv && . .venv/bin/activate" in lines
    assert lines.index("python3 -m venv .venv && . .venv/bin/activate") < lines.index("make demo")
    assert "make test" in lines


def test_every_make_target_the_readme_names_exists():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", _readme())) | {"demo", "test"}
    assert named <= targets, named - targets


def test_make_install_stamp_is_per_interpreter_and_mosquitto_check_is_portable():
    import hashlib
    import shutil
    import subprocess
    import sys

    if shutil.which("make") is None:
        import pytest

        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "install", f"PY={sys.executable}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    stamp = f".install.stamp-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]}"
    if "touch" in out.stdout:  # nothing to print when this environment is already installed
        assert f"touch {stamp}" in out.stdout
        assert "command -v mosquitto" in out.stdout and "/usr/sbin/mosquitto -h" not in out.stdout
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "bench/run_all.py" in makefile
    # make test runs the example app project through the suite's own test of it
    example = (ROOT / "tests" / "test_example_app.py").read_text(encoding="utf-8")
    assert "scripts/test-example-app.sh" in example and (ROOT / "scripts/test-example-app.sh").exists()


def test_bench_runner_names_only_benchmarks_that_exist():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    assert spec and spec.loader
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    assert run_all.BENCHES
    for script in run_all.BENCHES.values():
        assert (ROOT / "bench" / script).is_file(), script


def test_license_is_the_declared_apache_2():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_install_from_a_checkout_or_a_git_url_is_documented():
    text = _readme()
    assert "pip install ." in text and "git+https://" in text and "not on PyPI" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # CPU-only torch elsewhere
    assert "pip install open-autoglm-sdk\n" not in text and "`pip install open-autoglm-sdk`" not in text


def test_console_script_and_examples_ship_in_the_package():
    import importlib
    import tomllib

    from sdk.cli.examples_cmd import EXAMPLE_FILES, example_text

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    module, _, func = project["scripts"]["autoglm"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    repo_examples = sorted(p.name for p in (ROOT / "examples").glob("*.toml"))
    assert sorted(EXAMPLE_FILES) == repo_examples
    for name in EXAMPLE_FILES:  # the packaged copy (sdk/cli/examples) is the repository's file
        assert example_text(name) == (ROOT / "examples" / name).read_text(encoding="utf-8"), name


def test_commands_the_docs_name_exist():
    from typer.testing import CliRunner

    from sdk.cli import app

    runner = CliRunner()
    block = re.search(r"## Command line\s*```\n(.*?)```", _readme(), re.S)
    assert block
    commands = set(re.findall(r"autoglm ([a-z][\w-]*)", block.group(1)))
    for command in sorted(commands):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0, command
    # commands with options in the examples' comments (e.g. "autoglm id new --keystore F")
    for path in (ROOT / "examples").glob("*.toml"):
        for words, option in re.findall(r"autoglm ((?:[a-z][\w-]* ?)+?) ?(--[a-z][\w-]*)", path.read_text()):
            shown = runner.invoke(app, [*words.split(), "--help"], env={"COLUMNS": "200"})
            assert shown.exit_code == 0 and option in shown.stdout, (path.name, words, option)
