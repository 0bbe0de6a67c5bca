#!/usr/bin/env bash
# One-command control of the dmar compose stack (deploy/docker-compose.yml).
#
#   deploy/dmar.sh build                  # images, no registry (deploy/build-images.sh)
#   deploy/dmar.sh up [--dashboards]      # server (healthy first), agents, Prometheus
#   deploy/dmar.sh sweep [FLAGS]          # loadgen sweep against the stack, e.g. --steps 1,2,4
#   deploy/dmar.sh loadgen [ARGS]         # any loadgen run, e.g. invalidate --devices 4
#   deploy/dmar.sh ps | logs [SERVICE] | down
#
# Environment: AGENTS (agent replicas, default 3), DMAR_PROJECT (compose project name,
# default dmar), UP_TIMEOUT (seconds to wait for health, default 120), and the compose
# variables documented in docker-compose.yml (DMAR_FUNCTIONS, DMAR_PUBLISH_*, ...).
# Loadgen output files (--output/--plot) land in deploy/out/ (DMAR_OUT), seen as /out.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

agents=${AGENTS:-3}
project=${DMAR_PROJECT:-dmar}
up_timeout=${UP_TIMEOUT:-120}
export DMAR_AGENT_REPLICAS=$agents

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
        for arg in "$@"; do
            case $arg in
                --dashboards) profiles=(--profile dashboards) ;;
                *) echo "dmar.sh up: unknown option $arg" >&2; exit 2 ;;
            esac
        done
        services=(server agent prometheus)
        if [ ${#profiles[@]} -gt 0 ]; then services+=(grafana); fi
        # depends_on makes compose start the agents only once the server is healthy.
        compose "${profiles[@]}" up -d --scale "agent=$agents" "${services[@]}"
        wait_healthy
        compose ps
        echo "server gRPC 127.0.0.1:${DMAR_PUBLISH_GRPC:-50051}, metrics http://127.0.0.1:${DMAR_PUBLISH_METRICS:-9464}/metrics," \
            "Prometheus http://127.0.0.1:${DMAR_PUBLISH_PROMETHEUS:-9090}"
        if [ ${#profiles[@]} -gt 0 ]; then echo "Grafana http://127.0.0.1:${DMAR_PUBLISH_GRAFANA:-3000}"; fi
        ;;
    sweep)
        mkdir -p "${DMAR_OUT:-$here/out}"
        compose --profile loadgen run --rm --no-deps loadgen "$@"
        ;;
    loadgen)
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
        compose --profile loadgen --profile dashboards down --volumes --remove-orphans "$@"
        ;;
    help | -h | --help)
        sed -n '2,13p' "$0"
        ;;
    *)
        echo "dmar.sh: unknown command $cmd (build, up, sweep, loadgen, ps, logs, down)" >&2
        exit 2
        ;;
esac
