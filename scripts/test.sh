#!/usr/bin/env bash
# The project's test command: installs the programs the end-to-end tests need, then runs every
# test target. Extra arguments go to `cargo test` (e.g. `./scripts/test.sh --test e2e_skopeo`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install-deps.sh
cargo test --all-targets "$@"
