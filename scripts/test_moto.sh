#!/usr/bin/env bash
# Print a Python interpreter that has moto's S3 server (`python -m moto.server`) and boto3,
# for tests/it/s3.rs (it reads the path from SAEPIPE_MOTO), setting one up first if needed, so
# that `make test` runs the object-storage tests on a fresh machine with nothing but Python 3:
#   1. $SAEPIPE_MOTO when set (your choice, not checked);
#   2. .venv-moto/bin/python (git-ignored) when it imports moto.server and boto3;
#   3. else .venv-moto is created: a venv with `moto[server]` from PyPI, or, where
#      `python3 -m venv` cannot make one with pip, `pip install --target .venv-moto/site`
#      behind a small wrapper script (as scripts/test_python.sh does for pyarrow).
# Only the interpreter's path goes to stdout; progress and errors go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${SAEPIPE_MOTO:-}" ]; then
    echo "$SAEPIPE_MOTO"
    exit 0
fi
py="${PYTHON:-python3}"
venv=.venv-moto
has_moto() { "$1" -c 'import moto.server, boto3' >/dev/null 2>&1; }
fail() {
    echo "error: $1" >&2
    echo "       fix: make PyPI reachable, or point SAEPIPE_MOTO at a Python with" >&2
    echo "       \`pip install 'moto[server]'\` done" >&2
    exit 1
}

if [ -x "$venv/bin/python" ] && has_moto "$venv/bin/python"; then
    echo "$PWD/$venv/bin/python"
    exit 0
fi
command -v "$py" >/dev/null 2>&1 || fail "$py not found; the S3 tests need Python 3"

echo "make test: installing moto[server] (a local S3 server for tests/it/s3.rs) into $venv (once)" >&2
t0=$(date +%s)
rm -rf "$venv"
pip_quiet=(--quiet --disable-pip-version-check --no-input)
if "$py" -m venv "$venv" 1>&2 && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install "${pip_quiet[@]}" 'moto[server]' boto3 1>&2 ||
        fail "pip could not install moto[server] into $venv (is PyPI reachable?)"
else
    rm -rf "$venv"
    "$py" -m pip --version >/dev/null 2>&1 ||
        fail "$py has neither the venv module with pip nor pip (Debian/Ubuntu: apt install python3-venv)"
    mkdir -p "$venv/bin"
    "$py" -m pip install "${pip_quiet[@]}" --target "$venv/site" 'moto[server]' boto3 1>&2 ||
        fail "pip could not install moto[server] into $venv/site (is PyPI reachable?)"
    real="$(command -v "$py")"
    cat >"$venv/bin/python" <<WRAP
#!/bin/sh
# $real with the moto of $PWD/$venv/site (written by scripts/test_moto.sh).
PYTHONPATH="$PWD/$venv/site\${PYTHONPATH:+:\$PYTHONPATH}" exec "$real" "\$@"
WRAP
    chmod +x "$venv/bin/python"
fi
has_moto "$venv/bin/python" || fail "$venv/bin/python still cannot import moto.server and boto3"
echo "make test: moto installed in $(( $(date +%s) - t0 ))s" >&2
echo "$PWD/$venv/bin/python"
