#!/usr/bin/env bash
# Installs the peers that `cargo bench --bench compare` (benches/compare.rs) runs beside entrepot:
#   docker-registry  CNCF distribution: the upstream, and distribution's own proxy mode
#   nginx            serves the same blob files from disk with sendfile: "as fast as a file"
#   wrk              the load generator for request rates, run as a separate process
# Idempotent: packages already present are skipped, and `apt-get update` runs at most once,
# only when something has to be installed. The bench starts its own instances on free ports in
# a temporary folder, so the packages' own services are kept from starting and never matter.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# package name -> the command it provides
declare -A wanted=(
    [docker-registry]=docker-registry
    [nginx]=nginx
    [wrk]=wrk
)

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
    sudo_cmd=(sudo)
fi

# nginx lives in /usr/sbin, which a non-root PATH may lack.
has_command() {
    command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]] || [[ -x /usr/bin/$1 ]]
}

missing=()
for pkg in "${!wanted[@]}"; do
    # A removed package can linger as "deinstall ok config-files": ask for the full status.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status == "install ok installed" ]] && has_command "${wanted[$pkg]}"; then
        echo "install-bench-deps: $pkg already installed"
    else
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-bench-deps: nothing to install"
    exit 0
fi

echo "install-bench-deps: installing ${missing[*]}"

# Keep maintainer scripts from starting nginx or the registry daemon: a policy-rc.d that exits
# 101 denies every service start. Only put one in place (and remove it) if none exists already.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod 755 "$policy"
    added_policy=1
fi
cleanup() {
    if [[ $added_policy -eq 1 ]]; then
        "${sudo_cmd[@]}" rm -f "$policy"
    fi
}
trap cleanup EXIT

echo "install-bench-deps: apt-get update"
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Under systemd the units may still be enabled for the next boot; the bench never uses them.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo_cmd[@]}" systemctl disable --now nginx.service docker-registry.service \
        >/dev/null 2>&1 || true
fi

for pkg in "${missing[@]}"; do
    cmd=${wanted[$pkg]}
    if ! has_command "$cmd"; then
        echo "install-bench-deps: $pkg installed but '$cmd' was not found" >&2
        exit 1
    fi
    echo "install-bench-deps: installed $pkg"
done
