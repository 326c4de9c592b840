#!/usr/bin/env bash
# Installs the programs the end-to-end tests drive (tests/e2e_*.rs, tests/conformance.rs, ...):
#   docker-registry  CNCF distribution, the real upstream registry (/usr/bin/docker-registry)
#   skopeo           the real client that pushes seed images and pulls through entrepot
#   containerd       containerd and ctr, pulling through entrepot in mirror mode (hosts.toml)
#   podman           podman pulling through a registries.conf mirror (path-prefix style)
#   apache2-utils    htpasswd, for a docker-registry upstream with basic auth
#   openssl          keys and certificates for a docker-registry behind a token service
#   systemd          systemd-analyze, which checks deploy/systemd/entrepot.service
#   chromium         the headless browser tests/ui_browser.rs drives (the status page)
# Idempotent (see apt-install.sh).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" install-deps \
    docker-registry=docker-registry skopeo=skopeo containerd=ctr podman=podman \
    apache2-utils=htpasswd openssl=openssl systemd=systemd-analyze chromium=chromium
