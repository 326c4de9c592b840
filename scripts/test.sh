#!/usr/bin/env bash
# The project's test command: installs the programs the end-to-end tests need, then runs every
# test target. Extra arguments go to `cargo test`; one that picks targets (e.g.
# `./scripts/test.sh --test e2e_skopeo`) replaces `--all-targets`, which cargo would otherwise
# add to the selection rather than narrow.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install-deps.sh

targets=(--all-targets)
no_run=0
for arg in "$@"; do
    case $arg in
        --) break ;;
        --no-run) no_run=1 ;;
        --lib | --bin | --bin=* | --bins | --example | --example=* | --examples | --test | --test=* | \
            --tests | --bench | --bench=* | --benches | --all-targets | --doc)
            targets=()
            ;;
    esac
done

# garage (the S3 tests' server) may have to be built from source, which takes many minutes:
# install it in the background, in a process group of its own so that leaving early stops all
# of its cargo and rustc, and build the tests meanwhile.
garage_log=$(mktemp)
set -m
bash .ci/install-garage.sh >"$garage_log" 2>&1 &
garage_pid=$!
set +m
stop_garage_install() {
    kill -- -"$garage_pid" 2>/dev/null || true
    rm -f "$garage_log"
}
trap stop_garage_install EXIT

# `cargo test --no-run --no-run` is an error: a caller's own --no-run is the build.
if [[ $no_run -eq 0 ]]; then
    cargo test --no-run "${targets[@]}" "$@"
fi

if ! wait "$garage_pid"; then
    echo "test.sh: .ci/install-garage.sh failed; its output:" >&2
    cat "$garage_log" >&2
    exit 1
fi
tail -n 1 "$garage_log"

cargo test "${targets[@]}" "$@"
