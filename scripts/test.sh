#!/usr/bin/env bash
# Runs every test file under test/ (Node 20's `node --test` does not expand globs itself).
# Usage: scripts/test.sh [FILTER]   e.g. scripts/test.sh qmp  runs test/**/*qmp*.test.ts
set -euo pipefail
cd "$(dirname "$0")/.."
npx tsc -p tsconfig.json --noEmit
mapfile -t files < <(find test -path "*${1:-}*" -name "*.test.ts" | sort)
if ((${#files[@]} == 0)); then echo "no test files match '${1:-}'" >&2; exit 1; fi
# One file at a time: the tests boot real QEMU guests and the machine has 2 cores.
exec node --import tsx --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
