#!/usr/bin/env bash
# Set-up, then `sluice up` on the embedded default (extra arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --release --locked -q -p sluice -- up "$@"
