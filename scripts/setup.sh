#!/usr/bin/env bash
# Makes bin/snapstack runnable on this machine:
#   1. finds or installs Node.js >= 22.15 (scripts/ensure-node.sh: the node on
#      PATH if new enough, else node@24 from the npm registry into
#      ~/.cache/snapstack/node24);
#   2. links it as .toolchain/bin/node, so `export PATH="$PWD/.toolchain/bin:$PATH"`
#      makes it the node that bin/snapstack (#!/usr/bin/env node) runs with;
#   3. `npm ci` (snapstack has no runtime dependencies; this brings the
#      TypeScript compiler, linters and test tools) and `npm run build`, so
#      bin/snapstack runs compiled JavaScript (it falls back to the sources
#      whenever one is newer than the build).
# Options:
#   --dev     accepted for compatibility (npm ci always runs now)
#   --tools   also install the QEMU/NBD tools the interop tests and
#             benchmarks use (scripts/ensure-tools.sh; apt-get when root)
set -euo pipefail
cd "$(dirname "$0")/.."

with_tools=0
for arg in "$@"; do
  case "$arg" in
    --dev) ;;
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

PATH="$(dirname "$node_bin"):$PATH" npm ci --no-audit --no-fund
PATH="$(dirname "$node_bin"):$PATH" npm run --silent build || echo "setup: build failed; bin/snapstack will run the TypeScript sources" >&2

if [ "$with_tools" = 1 ]; then
  bash scripts/ensure-tools.sh
fi

echo "setup: ready; try: bin/snapstack --help (it finds .toolchain/bin/node when the node on PATH is older)"
