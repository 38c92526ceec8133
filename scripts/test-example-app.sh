#!/usr/bin/env bash
# Run examples/app-tests against the installed wheel, as an app team would: build the wheel,
# install it into a fresh venv, and run pytest in a copy of the example outside this repository
# (so this checkout's sdk/ is not on sys.path; the autoglm plugin loads from its entry point).
#
#   scripts/test-example-app.sh [pytest args...]     e.g. --autoglm-broker=mosquitto
#
# Environment:
#   PYTHON (or PY)             interpreter to build with and base the venv on (default: python3)
#   AUTOGLM_EXAMPLE_VENV       "system" (default): a venv with --system-site-packages, reusing the
#                              dependencies already installed for PYTHON (CI); "plain": an empty
#                              venv that installs the wheel's [testing] dependencies from the index
#   AUTOGLM_EXAMPLE_WORKDIR    where to build (default: a fresh temporary directory, removed after)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-${PY:-python3}}"
MODE="${AUTOGLM_EXAMPLE_VENV:-system}"
case "$MODE" in system|plain) ;; *) echo "AUTOGLM_EXAMPLE_VENV must be system or plain, not '$MODE'" >&2; exit 2;; esac

if [[ -n "${AUTOGLM_EXAMPLE_WORKDIR:-}" ]]; then
    WORK="$AUTOGLM_EXAMPLE_WORKDIR"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/autoglm-example.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
fi
case "$WORK/" in "$ROOT"/*) echo "the work directory must be outside the repository" >&2; exit 2;; esac
unset PYTHONPATH PYTEST_DISABLE_PLUGIN_AUTOLOAD PYTEST_PLUGINS PYTEST_ADDOPTS
step() { printf '== %s\n' "$*" >&2; }

# 1. the wheel, built from a copy of the working tree (the build writes egg-info and build/ next
#    to the sources: not in this checkout, where pytest would pick the egg-info up)
step "copying the sources"
rm -rf "$WORK/src" "$WORK/dist" "$WORK/venv" "$WORK/app"
mkdir -p "$WORK/src" "$WORK/dist"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
    tar -C "$ROOT" --exclude=.git --exclude='*.egg-info' --exclude=build --exclude=dist --exclude=.venv -cf - . \
        | tar -xf - -C "$WORK/src"
fi
step "building the wheel"
isolation=()
if "$PYTHON" - <<'PY' 2>/dev/null; then
import setuptools, sys
major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (70, 1) else 1)   # bdist_wheel built in: no isolated build env needed
PY
    isolation=(--no-build-isolation)
fi
"$PYTHON" -m pip wheel --quiet --no-deps "${isolation[@]}" -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/open_autoglm_sdk-*.whl)"
echo "wheel: $WHEEL" >&2

# 2. a fresh venv with the wheel (and nothing of this checkout)
step "creating a $MODE venv"
if [[ "$MODE" == system ]]; then
    "$PYTHON" -m venv --system-site-packages "$WORK/venv"
    "$WORK/venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"
else
    "$PYTHON" -m venv "$WORK/venv"
    "$WORK/venv/bin/python" -m pip install --quiet --force-reinstall "$WHEEL[testing]"
fi
VPY="$WORK/venv/bin/python"

# 3. the example project, copied out of the repository, against the installed wheel
cp -r "$ROOT/examples/app-tests" "$WORK/app"
cd "$WORK/app"
"$VPY" - "$WORK/venv" <<'PY'
import importlib.metadata as md
import os
import sys

import sdk
import sdk.testing.plugin

venv = os.path.realpath(sys.argv[1])
for module in (sdk, sdk.testing.plugin):
    path = os.path.realpath(module.__file__)
    assert path.startswith(venv + os.sep), f"{module.__name__} comes from {path}, not the venv {venv}"
plugins = [ep.value for ep in md.entry_points(group="pytest11") if ep.name == "autoglm"]
assert "sdk.testing.plugin" in plugins, f"no autoglm pytest11 entry point installed: {plugins}"
print(f"sdk {md.version('open-autoglm-sdk')} from {os.path.dirname(os.path.realpath(sdk.__file__))}",
      file=sys.stderr)
PY
step "pytest in $WORK/app"
start=$(date +%s.%N)
"$VPY" -m pytest -p no:cacheprovider "$@"
end=$(date +%s.%N)
"$VPY" -c "import sys; print(f'example app tests: {$end - $start:.2f} s', file=sys.stderr)"
