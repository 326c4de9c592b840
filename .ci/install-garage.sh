#!/usr/bin/env bash
# Installs garage, the S3 server the S3 storage tests run against (tests/common/garage.rs), with
# `cargo install`: there is no Debian package of it. Idempotent: a garage of the right version,
# on PATH or in cargo's bin directory (where the tests also look), is left as it is.
# Building it takes 10-17 minutes on 2 cores, which is why scripts/test.sh runs this in the
# background while it builds the tests.
set -euo pipefail

version=2.5.0
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin

# `garage --version` prints "garage cargo:2.5.0 [features: ...]" for a cargo-installed build
# and "garage v2.5.0 [...]" for a release binary: match the number alone.
has_version() {
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    [[ $out =~ (^|[^0-9.])${version//./\\.}([^0-9.]|$) ]]
}

for candidate in "$(command -v garage || true)" "$cargo_bin/garage"; do
    if [[ -n $candidate && -x $candidate ]] && has_version "$candidate"; then
        echo "install-garage: garage $version already installed ($candidate)"
        exit 0
    fi
done

echo "install-garage: building garage $version with cargo install (10-17 minutes on 2 cores)"
started=$SECONDS
# A CARGO_TARGET_DIR shared with the project would make this build and the tests' build wait on
# each other's lock; cargo install's own temporary target directory keeps them apart.
env -u CARGO_TARGET_DIR cargo install garage --version "$version" --locked
if ! has_version "$cargo_bin/garage"; then
    echo "install-garage: $cargo_bin/garage does not report version $version" >&2
    exit 1
fi
echo "install-garage: installed garage $version in $((SECONDS - started))s ($cargo_bin/garage)"
