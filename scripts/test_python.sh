#!/usr/bin/env bash
# Print the Python interpreter the interop tests run (tests/it/interop_pyarrow.rs reads it
# from SAEPIPE_PYTHON), setting one up first if needed, so that `make test` works on a
# fresh machine with nothing but Python 3:
#   1. $SAEPIPE_PYTHON when set (your choice, not checked);
#   2. $PYTHON (default python3) when it already imports pyarrow;
#   3. .venv-test/bin/python (git-ignored), created on first use: a venv with pyarrow from
#      PyPI, or, where `python3 -m venv` cannot make one with pip (Debian without
#      python3-venv), `pip install --target .venv-test/site` behind a small wrapper script.
# Only the interpreter's path goes to stdout; progress and errors go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${SAEPIPE_PYTHON:-}" ]; then
    echo "$SAEPIPE_PYTHON"
    exit 0
fi
py="${PYTHON:-python3}"
venv=.venv-test
has_pyarrow() { "$1" -c 'import pyarrow.parquet' >/dev/null 2>&1; }
fail() {
    echo "error: $1" >&2
    echo "       fix: install pyarrow for $py (\`$py -m pip install pyarrow\`), or point" >&2
    echo "       SAEPIPE_PYTHON (or PYTHON) at an interpreter that has it" >&2
    exit 1
}

if ! command -v "$py" >/dev/null 2>&1; then
    fail "$py not found; the interop tests need Python 3"
fi
if has_pyarrow "$py"; then
    command -v "$py"
    exit 0
fi
if [ -x "$venv/bin/python" ] && has_pyarrow "$venv/bin/python"; then
    echo "$PWD/$venv/bin/python"
    exit 0
fi

echo "make test: $py has no pyarrow; installing it into $venv (once)" >&2
rm -rf "$venv"
pip_quiet=(--quiet --disable-pip-version-check --no-input)
if "$py" -m venv "$venv" 1>&2 && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install "${pip_quiet[@]}" pyarrow 1>&2 ||
        fail "pip could not install pyarrow into $venv (is PyPI reachable?)"
else
    rm -rf "$venv"
    "$py" -m pip --version >/dev/null 2>&1 ||
        fail "$py has neither the venv module with pip nor pip (Debian/Ubuntu: apt install python3-venv)"
    mkdir -p "$venv/bin"
    "$py" -m pip install "${pip_quiet[@]}" --target "$venv/site" pyarrow 1>&2 ||
        fail "pip could not install pyarrow into $venv/site (is PyPI reachable?)"
    real="$(command -v "$py")"
    cat >"$venv/bin/python" <<WRAP
#!/bin/sh
# $real with the pyarrow of $PWD/$venv/site (written by scripts/test_python.sh).
PYTHONPATH="$PWD/$venv/site\${PYTHONPATH:+:\$PYTHONPATH}" exec "$real" "\$@"
WRAP
    chmod +x "$venv/bin/python"
fi
has_pyarrow "$venv/bin/python" || fail "$venv/bin/python still cannot import pyarrow"
echo "$PWD/$venv/bin/python"
