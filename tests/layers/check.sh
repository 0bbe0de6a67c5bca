#!/usr/bin/env bash
# The crate graph is the architecture: checks the layering rules that docs/ARCHITECTURE.md
# states, so that a dependency that breaks one fails CI instead of going unnoticed.
#
# - dmar-vtd (the hardware and driver model) has no async, gRPC, protobuf or exporter crate
#   anywhere in its graph, dev-dependencies included.
# - dmar-agent (a device process) does not depend on dmar-server, even for its tests.
# - dmar-process (shared plumbing) knows nothing of VT-d or the wire.
# - dmar-auth (identities, policy, TLS) serves both faces and depends on neither; its
#   cryptography is ring's, so nothing needs cmake.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail=0
forbid() {
    local package=$1
    shift
    local tree
    tree=$(cargo tree --locked -p "$package" -e normal,build,dev --prefix none --format '{p}' | awk '{print $1}' | sort -u)
    for crate in "$@"; do
        if grep -qx "$crate" <<<"$tree"; then
            echo "layering: $package depends on $crate (cargo tree -p $package -i $crate shows the path)" >&2
            fail=1
        fi
    done
}

forbid dmar-vtd tokio tonic prost tonic-prost metrics-exporter-prometheus hyper dmar-proto dmar-server dmar-agent
forbid dmar-agent dmar-server
forbid dmar-process dmar-vtd dmar-proto dmar-server tonic prost
forbid dmar-auth dmar-server dmar-agent dmar-proto aws-lc-rs aws-lc-sys

if [ "$fail" -ne 0 ]; then
    exit 1
fi
echo "layering: dmar-vtd has no async or network crate; dmar-agent does not depend on dmar-server"
