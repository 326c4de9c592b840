#!/usr/bin/env bash
# The project's test command: installs the programs the end-to-end tests need, then runs every
# test target. Extra arguments go to `cargo test`; one that picks targets (e.g.
# `./scripts/test.sh --test e2e_skopeo`) replaces `--all-targets`, which cargo would otherwise
# add to the selection rather than narrow.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install-deps.sh

targets=(--all-targets)
for arg in "$@"; do
    case $arg in
        --) break ;;
        --lib | --bin | --bin=* | --bins | --example | --example=* | --examples | --test | --test=* | \
            --tests | --bench | --bench=* | --benches | --all-targets | --doc)
            targets=()
            break
            ;;
    esac
done
cargo test "${targets[@]}" "$@"
