#!/usr/bin/env bash
# One-command control of the dmar compose stack (deploy/docker-compose.yml).
#
#   deploy/dmar.sh build                  # images and dmar-certs, no registry (deploy/build-images.sh)
#   deploy/dmar.sh up [--dashboards] [--platform FILE]
#                                         # certificates (first time), server (healthy first), agents, Prometheus;
#                                         # --platform: the server on FILE's remapping units (e.g. deploy/platforms/two-units.toml)
#   deploy/dmar.sh certs                  # make new certificates (a new CA: restart the stack)
#   deploy/dmar.sh sweep [FLAGS]          # loadgen sweep against the stack, e.g. --steps 1,2,4
#   deploy/dmar.sh loadgen [ARGS]         # any loadgen run, e.g. invalidate --devices 4
#   deploy/dmar.sh ps | logs [SERVICE] | down [--volumes]   # --volumes: also Prometheus's data
#
# Environment: DMAR_PLATFORM (the platform file of `up`, as --platform), DMAR_CERTS
# (certificate folder, default deploy/certs), DMAR_CERTS_BIN (the
# dmar-certs binary, default $CARGO_TARGET_DIR/release/dmar-certs, built with cargo when
# missing), DMAR_PROJECT (compose project name, default dmar), UP_TIMEOUT (seconds to wait
# for health, default 120), and the compose variables documented in docker-compose.yml
# (DMAR_PUBLISH_*, ...). Loadgen output files (--output/--plot) land in deploy/out/
# (DMAR_OUT), seen as /out.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

project=${DMAR_PROJECT:-dmar}
up_timeout=${UP_TIMEOUT:-120}
certs=${DMAR_CERTS:-$here/certs}
case $certs in /*) ;; *) certs=$(pwd)/$certs ;; esac
export DMAR_CERTS=$certs
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac
certs_bin=${DMAR_CERTS_BIN:-$target/release/dmar-certs}

# The stack's identities: one per agent service in docker-compose.yml, each with the
# requester ids its policy entry grants (agent-N: bus 0x10+N), all sharing the SAN `agent`
# (the name the loadgen dials them by); the server under its service names; the operator
# (the loadgen) and an observer; and `stalled-device`, the device identity the loadgen's
# own function presents in `invalidate --stalled-device` (every requester id off the
# agents' buses 0x10-0x12).
cert_args=(
    --server dmar-server --server-san server,dmar-server,localhost,127.0.0.1
    --agent agent-0=10:00.0-10:1f.7 --agent agent-1=11:00.0-11:1f.7 --agent agent-2=12:00.0-12:1f.7
    --agent stalled-device=00:00.0-0f:1f.7,13:00.0-ff:1f.7
    --agent-san agent --operator operator --observer observer
)

# Whether $certs holds everything the compose file mounts.
certs_complete() {
    [ -f "$certs/ca.pem" ] && [ -f "$certs/policy.toml" ] && [ -f "$certs/stalled-device.pem" ]
}

# Refuses a loadgen run against certificates made before an identity the compose file
# mounts existed (docker would mount an empty folder in its place).
require_certs() {
    if ! certs_complete; then
        echo "dmar.sh: $certs lacks certificates the stack mounts: run 'deploy/dmar.sh certs', then 'up' again (a new CA)" >&2
        exit 1
    fi
}

# Makes the certificates and policy into $certs (replacing what is there), readable by
# the containers' user (uid 65534) through their read-only file mounts: keys 0644 inside
# a 0700 folder, so other host users cannot reach them; the CA key stays 0600 and is
# mounted nowhere.
make_certs() {
    if [ ! -x "$certs_bin" ]; then
        echo "dmar.sh: building dmar-certs (cargo build --release -p dmar-auth)" >&2
        (cd "$root" && cargo build --quiet --release --locked -p dmar-auth)
    fi
    mkdir -p "$certs"
    chmod 0700 "$certs"
    "$certs_bin" --out "$certs" --force "${cert_args[@]}" >/dev/null
    for key in "$certs"/*.key; do
        [ "$(basename "$key")" = ca.key ] || chmod 0644 "$key"
    done
    echo "dmar.sh: certificates and policy.toml in $certs"
}

# `docker compose` (v2 plugin) where installed, else the standalone docker-compose (1.29+).
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    echo "dmar.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi
compose() { "${compose_cmd[@]}" -p "$project" -f "$here/docker-compose.yml" "$@"; }

# Waits until every container of the project that has a health check reports healthy.
wait_healthy() {
    local deadline=$((SECONDS + up_timeout)) ids id state unhealthy
    while :; do
        ids=$(compose ps -q)
        unhealthy=0
        for id in $ids; do
            state=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
            case $state in healthy | running) ;; *) unhealthy=$((unhealthy + 1)) ;; esac
        done
        if [ -n "$ids" ] && [ "$unhealthy" = 0 ]; then
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "dmar.sh: $unhealthy container(s) not healthy after ${up_timeout}s:" >&2
            compose ps >&2
            return 1
        fi
        sleep 1
    done
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case $cmd in
    build)
        "$here/build-images.sh" "$@"
        ;;
    up)
        profiles=()
        platform=${DMAR_PLATFORM:-}
        while [ $# -gt 0 ]; do
            case $1 in
                --dashboards) profiles=(--profile dashboards) ;;
                --platform)
                    [ $# -ge 2 ] || { echo "dmar.sh up: --platform needs a file" >&2; exit 2; }
                    platform=$2
                    shift
                    ;;
                --platform=*) platform=${1#--platform=} ;;
                *) echo "dmar.sh up: unknown option $1" >&2; exit 2 ;;
            esac
            shift
        done
        files=()
        if [ -n "$platform" ]; then
            [ -f "$platform" ] || { echo "dmar.sh up: platform file $platform not found" >&2; exit 2; }
            # The file sets memory and the units' caches and time-out; the server refuses both.
            for v in DMAR_MEMORY DMAR_IOTLB DMAR_INVALIDATION_TIMEOUT_MS; do
                if [ -n "${!v:-}" ]; then
                    echo "dmar.sh up: $v cannot be combined with --platform (the platform file sets it)" >&2
                    exit 2
                fi
            done
            DMAR_PLATFORM_FILE=$(cd "$(dirname "$platform")" && pwd)/$(basename "$platform")
            export DMAR_PLATFORM_FILE
            files=(-f "$here/docker-compose.platform.yml")
        fi
        # First up: certificates. Later ups reuse them (`dmar.sh certs` makes new ones).
        certs_complete || make_certs
        services=(server agent-0 agent-1 agent-2 prometheus)
        if [ ${#profiles[@]} -gt 0 ]; then services+=(grafana); fi
        # depends_on makes compose start the agents only once the server is healthy.
        compose "${files[@]}" "${profiles[@]}" up -d "${services[@]}"
        wait_healthy
        compose ps
        echo "server gRPC 127.0.0.1:${DMAR_PUBLISH_GRPC:-50051}, metrics http://127.0.0.1:${DMAR_PUBLISH_METRICS:-9464}/metrics," \
            "Prometheus http://127.0.0.1:${DMAR_PUBLISH_PROMETHEUS:-9090}"
        if [ -n "$platform" ]; then echo "platform: $DMAR_PLATFORM_FILE"; fi
        if [ ${#profiles[@]} -gt 0 ]; then echo "Grafana http://127.0.0.1:${DMAR_PUBLISH_GRAFANA:-3000}"; fi
        ;;
    certs)
        make_certs
        ;;
    sweep)
        require_certs
        mkdir -p "${DMAR_OUT:-$here/out}"
        compose --profile loadgen run --rm --no-deps loadgen "$@"
        ;;
    loadgen)
        require_certs
        mkdir -p "${DMAR_OUT:-$here/out}"
        compose --profile loadgen run --rm --no-deps loadgen "$@"
        ;;
    ps)
        compose ps "$@"
        ;;
    logs)
        compose logs "$@"
        ;;
    down)
        # Keeps the Prometheus volume (its retention is DMAR_PROMETHEUS_RETENTION, 2 days by
        # default); `down --volumes` deletes it too.
        compose --profile loadgen --profile dashboards down --remove-orphans "$@"
        ;;
    help | -h | --help)
        sed -n '2,20p' "$0"
        ;;
    *)
        echo "dmar.sh: unknown command $cmd (build, up, certs, sweep, loadgen, ps, logs, down)" >&2
        exit 2
        ;;
esac
