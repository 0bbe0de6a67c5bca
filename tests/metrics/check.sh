#!/usr/bin/env bash
# Validates the server's Prometheus exposition with promtool (Debian package
# `prometheus`, installed here when missing), after driving some traffic through it.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"

. tests/metrics/promtool.sh

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
