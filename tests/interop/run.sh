#!/usr/bin/env bash
# Builds dmar-server, generates Python stubs from proto/ with grpcio-tools, makes a
# development CA and certificates with dmar-certs, starts the server over mutual TLS on a
# free loopback port and runs client.py against it (an operator's certificate for Control,
# an agent's for the ATS link). Installs what it needs into a virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"

venv=$target/interop-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check 'grpcio>=1.60' 'grpcio-tools>=1.60'

gen=$target/interop-gen
rm -rf "$gen" && mkdir -p "$gen"
"$venv/bin/python" -m grpc_tools.protoc -Iproto --python_out="$gen" --grpc_python_out="$gen" proto/dmar/v1/dmar.proto
touch "$gen/dmar/__init__.py" "$gen/dmar/v1/__init__.py"

# The dev profile: the workspace's own build is reused, and speed is not what is tested here.
cargo build --quiet -p dmar-server -p dmar-auth --bin dmar-server --bin dmar-certs
certs=$target/interop-certs
rm -rf "$certs"
"$target/debug/dmar-certs" --out "$certs" --agent python-interop=02:03.0-02:03.7 --operator operator >/dev/null
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$target/interop-server.log
DMAR_LISTEN="127.0.0.1:$port" DMAR_METRICS_LISTEN=off DMAR_MEMORY=1G DMAR_TLS_DIR="$certs" \
    "$target/debug/dmar-server" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT

if ! "$venv/bin/python" tests/interop/client.py "127.0.0.1:$port" "$gen" "$certs"; then
    echo "interop failed; server log:" >&2
    tail -20 "$log" >&2
    exit 1
fi
