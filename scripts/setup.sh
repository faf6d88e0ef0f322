#!/usr/bin/env bash
# Makes bin/snapstack runnable on this machine:
#   1. finds or installs Node.js >= 22.15 (scripts/ensure-node.sh: the node on
#      PATH if new enough, else node@24 from the npm registry into
#      ~/.cache/snapstack/node24);
#   2. links it as .toolchain/bin/node, so `export PATH="$PWD/.toolchain/bin:$PATH"`
#      makes it the node that bin/snapstack (#!/usr/bin/env node) runs with;
#   3. installs runtime npm dependencies if package.json declares any (it
#      declares none today: snapstack runs its TypeScript sources directly).
# Options:
#   --dev     also `npm ci` (lint, typecheck and test dependencies), so that
#             `npm test` can run next
#   --tools   also install the QEMU/NBD tools the interop tests and
#             benchmarks use (scripts/ensure-tools.sh; apt-get when root)
set -euo pipefail
cd "$(dirname "$0")/.."

with_dev=0
with_tools=0
for arg in "$@"; do
  case "$arg" in
    --dev) with_dev=1 ;;
    --tools) with_tools=1 ;;
    *)
      echo "setup: unknown option: $arg (known: --dev, --tools)" >&2
      exit 2
      ;;
  esac
done

node_bin="$(bash scripts/ensure-node.sh)"
mkdir -p .toolchain/bin
ln -sfn "$node_bin" .toolchain/bin/node
echo "setup: .toolchain/bin/node -> $node_bin ($("$node_bin" --version))"

if [ "$with_dev" = 1 ]; then
  PATH="$(dirname "$node_bin"):$PATH" npm ci --no-audit --no-fund
elif "$node_bin" -e 'process.exit(Object.keys(require("./package.json").dependencies ?? {}).length > 0 ? 0 : 1)' && [ ! -d node_modules ]; then
  PATH="$(dirname "$node_bin"):$PATH" npm ci --omit=dev --no-audit --no-fund
fi

if [ "$with_tools" = 1 ]; then
  bash scripts/ensure-tools.sh
fi

if [ "$(command -v node || true)" = "$node_bin" ]; then
  echo "setup: ready; try: bin/snapstack --help"
else
  echo "setup: ready; the node on PATH is older, so first: export PATH=\"$PWD/.toolchain/bin:\$PATH\""
fi
