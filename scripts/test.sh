#!/usr/bin/env bash
# Runs every test file under test/ (Node 20's `node --test` does not expand globs itself).
# Usage: scripts/test.sh [FILTER]   e.g. scripts/test.sh qmp  runs test/**/*qmp*.test.ts
set -euo pipefail
cd "$(dirname "$0")/.."
npx tsc -p tsconfig.json --noEmit
mapfile -t files < <(find test -path "*${1:-}*" -name "*.test.ts" | sort)
if ((${#files[@]} == 0)); then echo "no test files match '${1:-}'" >&2; exit 1; fi
# The suite's scratch files (sparse disks of up to 64 GiB, LUKS targets) go under one directory
# of this run. A run that was killed never ran its tests' clean-up: its directory is removed
# here, or its targets would eat the free space the next run's copies are checked against.
base="${TMPDIR:-/tmp}"
for old in "$base"/idlecrypt-suite.*; do
  [[ -d "$old" ]] || continue
  kill -0 "${old##*.}" 2>/dev/null || rm -rf "$old"
done
export TMPDIR="$base/idlecrypt-suite.$$"
# 1777 like /tmp: some tests run the CLI as nobody against files in here.
mkdir -m 1777 "$TMPDIR"
trap 'rm -rf "$TMPDIR"' EXIT
# One file at a time: the tests boot real QEMU guests and the machine has 2 cores.
node --import tsx --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
