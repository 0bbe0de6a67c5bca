#!/usr/bin/env bash
# Validates the server's Prometheus exposition with promtool (Debian package
# `prometheus`, installed here when missing), after driving some traffic through it.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"

if ! command -v promtool >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo_cmd=""
        [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
fi
command -v promtool >/dev/null || { echo "promtool is not available and could not be installed" >&2; exit 1; }

cargo build --quiet --release -p dmar-server
pick_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=$(pick_port)
metrics=$(pick_port)
log=$target/metrics-server.log
DMAR_LISTEN="127.0.0.1:$grpc" DMAR_METRICS_LISTEN="127.0.0.1:$metrics" DMAR_MEMORY=1G "$target/release/dmar-server" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$metrics/metrics" -o "$target/metrics.txt" 2>/dev/null && break
    sleep 0.1
done
[ -s "$target/metrics.txt" ] || { echo "no /metrics from the server"; tail -20 "$log"; exit 1; }
promtool check metrics < "$target/metrics.txt"
echo "promtool accepts the server's /metrics ($(grep -c '^dmar_' "$target/metrics.txt") samples)"
