#!/usr/bin/env bash
# Installs the programs the end-to-end tests drive (tests/e2e_*.rs, tests/conformance.rs):
#   docker-registry  CNCF distribution, the real upstream registry (/usr/bin/docker-registry)
#   skopeo           the real client that pushes seed images and pulls through entrepot
#   containerd       containerd and ctr, pulling through entrepot in mirror mode (hosts.toml)
#   podman           podman pulling through a registries.conf mirror (path-prefix style)
#   apache2-utils    htpasswd, for a docker-registry upstream with basic auth
#   openssl          keys and certificates for a docker-registry behind a token service
# Idempotent: packages already present are skipped, and `apt-get update` runs at most once,
# only when something has to be installed. The tests start their own registry instances on
# free ports, so the package's own service is kept from starting and never matters.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# package name -> the command it provides
declare -A wanted=(
    [docker-registry]=docker-registry
    [skopeo]=skopeo
    [containerd]=ctr
    [podman]=podman
    [apache2-utils]=htpasswd
    [openssl]=openssl
)

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
    sudo_cmd=(sudo)
fi

missing=()
for pkg in "${!wanted[@]}"; do
    # A removed package can linger as "deinstall ok config-files": ask for the full status.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status == "install ok installed" ]] && command -v "${wanted[$pkg]}" >/dev/null 2>&1; then
        echo "install-deps: $pkg already installed ($(command -v "${wanted[$pkg]}"))"
    else
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: nothing to install"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"

# Keep maintainer scripts from starting the registry daemon: a policy-rc.d that exits 101
# denies every service start. Only put one in place (and remove it) if none exists already.
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

echo "install-deps: apt-get update"
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# Under systemd the unit may still be enabled for the next boot; the tests never use it.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo_cmd[@]}" systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
fi

for pkg in "${missing[@]}"; do
    cmd=${wanted[$pkg]}
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "install-deps: $pkg installed but '$cmd' is not on PATH" >&2
        exit 1
    fi
    echo "install-deps: installed $pkg ($(command -v "$cmd"))"
done
