#!/usr/bin/env bash
# Installs Debian packages idempotently; the one place .ci/install-deps.sh (test suite) and
# .ci/install-bench-deps.sh (benchmark peers) share.
#   usage: apt-install.sh LABEL PACKAGE=COMMAND...
# A package counts as present when dpkg says "install ok installed" and its command is found
# (on PATH or in /usr/sbin, /usr/bin: nginx lives in /usr/sbin, which a non-root PATH may
# lack). `apt-get update` runs at most once, only when something has to be installed. The
# packages' own services (docker-registry, nginx, containerd) are kept from starting: the tests
# and the bench start their own instances on free ports.
set -euo pipefail

label=$1
shift
export DEBIAN_FRONTEND=noninteractive

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
    sudo_cmd=(sudo)
fi

has_command() {
    command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]] || [[ -x /usr/bin/$1 ]]
}

declare -A wanted=()
missing=()
for pair in "$@"; do
    pkg=${pair%%=*}
    cmd=${pair#*=}
    wanted[$pkg]=$cmd
    # A removed package can linger as "deinstall ok config-files": ask for the full status.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status == "install ok installed" ]] && has_command "$cmd"; then
        echo "$label: $pkg already installed"
    else
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "$label: nothing to install"
    exit 0
fi

echo "$label: installing ${missing[*]}"

# A policy-rc.d that exits 101 denies every service start during the install. Only put one in
# place (and remove it) if none exists already.
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

echo "$label: apt-get update"
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Under systemd the units may still be enabled for the next boot; nothing here uses them.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo_cmd[@]}" systemctl disable --now nginx.service docker-registry.service \
        containerd.service >/dev/null 2>&1 || true
fi

for pkg in "${missing[@]}"; do
    cmd=${wanted[$pkg]}
    if ! has_command "$cmd"; then
        echo "$label: $pkg installed but '$cmd' was not found" >&2
        exit 1
    fi
    echo "$label: installed $pkg"
done
