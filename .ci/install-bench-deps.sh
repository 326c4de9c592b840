#!/usr/bin/env bash
# Installs the peers that `cargo bench --bench compare` (benches/compare.rs) runs beside entrepot:
#   docker-registry  CNCF distribution: the upstream, and distribution's own proxy mode
#   nginx            serves the same blob files from disk with sendfile: "as fast as a file"
#   wrk              the load generator for request rates, run as a separate process
# Idempotent (see apt-install.sh).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" install-bench-deps \
    docker-registry=docker-registry nginx=nginx wrk=wrk
