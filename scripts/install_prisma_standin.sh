#!/usr/bin/env bash
# Test-only: what tests/test_litellm_db_keys.py needs to run LiteLLM's database keys (mode 2 of
# plugins/auth) on a machine that cannot download Prisma's native engines. Idempotent.
#
#   scripts/install_prisma_standin.sh [VENV]        (VENV: default the repository's .venv)
#
# * PostgreSQL (server and psql): Debian package `postgresql`, if initdb is missing;
# * Node.js >= 18 and npm: Debian packages `nodejs` `npm`, if node is missing;
# * tests/prisma_engine: `npm ci --ignore-scripts` (the query engine compiled to WebAssembly,
#   node-postgres, the Prisma CLI 5.17.0; --ignore-scripts: @prisma/engines' postinstall would
#   download native engines from binaries.prisma.sh);
# * prisma-client-py, the version LiteLLM's proxy takes (pinned below), with VENV's pip into
#   tests/prisma_engine/python (a --target folder, put on the test proxy's PYTHONPATH), not into
#   VENV itself: with a generated client importable, every LiteLLM proxy start imports it
#   (litellm.proxy.management_endpoints.workflow_management_endpoints imports prisma.errors,
#   which loads the 250,000-line generated client: about 6 s), the mode-1 tests' proxies too;
# * `prisma generate` from LiteLLM's schema (litellm/proxy/schema.prisma), with the stand-in as
#   the query engine: the generated client goes into that folder's prisma package.
#
# Nothing is fetched from Prisma's servers: PyPI, the npm registry and Debian only.
set -euo pipefail

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-"$REPO_ROOT/.venv"}
ENGINE_DIR="$REPO_ROOT/tests/prisma_engine"
PRISMA_CLIENT_PY_VERSION=0.15.0 # pins the Prisma CLI 5.17.0, engine 393aa359 (package.json)
NODEENV_VERSION=1.12.0          # a dependency of prisma-client-py (unused: node is installed)
VENV=$(cd -- "$VENV" && pwd)
PY="$VENV/bin/python"

log() { printf 'install_prisma_standin: %s\n' "$*" >&2; }

[ -x "$PY" ] || { log "no python at $PY (give the venv as \$1)"; exit 2; }

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    "${SUDO[@]}" apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

# -- PostgreSQL -------------------------------------------------------------------------------
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  log "installing PostgreSQL (Debian package postgresql)"
  apt_install postgresql
fi
# the package starts a cluster of its own on Debian; the test runs its own server on a free port
command -v psql >/dev/null || apt_install postgresql-client

# -- Node.js ----------------------------------------------------------------------------------
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "installing Node.js (Debian packages nodejs npm)"
  apt_install nodejs npm
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 18 ]; then
  log "node $(node --version) is too old: the WebAssembly engine needs Node.js >= 18"
  exit 1
fi

# -- the query-engine stand-in ----------------------------------------------------------------
export CHECKPOINT_DISABLE=1 PRISMA_HIDE_UPDATE_MESSAGE=true
if [ ! -f "$ENGINE_DIR/node_modules/@prisma/query-engine-wasm/postgresql/query_engine_bg.wasm" ] \
  || [ ! -f "$ENGINE_DIR/node_modules/prisma/build/index.js" ] \
  || [ "$ENGINE_DIR/package-lock.json" -nt "$ENGINE_DIR/node_modules/.package-lock.json" ]; then
  log "npm ci in tests/prisma_engine"
  (cd "$ENGINE_DIR" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
"$ENGINE_DIR/query-engine" --version >/dev/null

# -- prisma-client-py and its generated client ------------------------------------------------
TARGET="$ENGINE_DIR/python"
# its other dependencies (httpx, jinja2, pydantic, click, python-dotenv, tomlkit,
# typing-extensions) are LiteLLM's too: taken from VENV, never shadowed by copies in TARGET
"$PY" -c 'import httpx, jinja2, pydantic, click, dotenv, tomlkit, typing_extensions' || {
  log "VENV lacks a dependency of prisma-client-py (see above)"
  exit 1
}
if [ "$(PYTHONPATH="$TARGET" "$PY" -c 'import importlib.metadata as m; print(m.version("prisma"))' 2>/dev/null || true)" != "$PRISMA_CLIENT_PY_VERSION" ]; then
  log "pip install prisma==$PRISMA_CLIENT_PY_VERSION into $TARGET"
  rm -rf "$TARGET"
  "$PY" -m pip install -q --no-deps --target "$TARGET" "prisma==$PRISMA_CLIENT_PY_VERSION" "nodeenv==$NODEENV_VERSION"
fi

# find_spec: where the packages are, without importing them (litellm's import is slow)
SCHEMA=$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("litellm").origin).parent / "proxy" / "schema.prisma")')
PRISMA_PKG="$TARGET/prisma"
STAMP="$PRISMA_PKG/.triage-generated-from"
want="$(sha256sum "$SCHEMA" | cut -d' ' -f1) $ENGINE_DIR"
if [ ! -f "$PRISMA_PKG/client.py" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  log "prisma generate from $SCHEMA"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cp "$SCHEMA" "$work/schema.prisma"
  # the Prisma CLI runs the generator as `prisma-client-py` from PATH (TARGET/bin);
  # PRISMA_BINARY_CACHE_DIR: prisma-client-py runs the CLI from tests/prisma_engine/node_modules
  # (it would npm-install one otherwise); the engine variables keep the CLI from downloading
  (cd "$work" && env PATH="$TARGET/bin:$VENV/bin:$PATH" PYTHONPATH="$TARGET" \
    PRISMA_BINARY_CACHE_DIR="$ENGINE_DIR" \
    PRISMA_QUERY_ENGINE_BINARY="$ENGINE_DIR/query-engine" \
    PRISMA_SCHEMA_ENGINE_BINARY="$ENGINE_DIR/schema-engine" \
    PRISMA_ENGINES_CHECKSUM_IGNORE_MISSING=1 \
    "$PY" -m prisma generate --schema schema.prisma)
  # compiled now, not by the test's first proxy start (the generated types.py is large)
  "$PY" -m compileall -q "$PRISMA_PKG" >/dev/null
  echo "$want" >"$STAMP"
fi
log "ready: $("$ENGINE_DIR/query-engine" --version), prisma-client-py $PRISMA_CLIENT_PY_VERSION in $TARGET"
