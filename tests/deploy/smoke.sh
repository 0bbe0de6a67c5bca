#!/usr/bin/env bash
# Compose smoke test of deploy/: builds the images (no registry), makes certificates with
# deploy/dmar.sh certs, starts the server and three agents with Prometheus, every gRPC port
# under mutual TLS with a certificate per agent, checks that plaintext and certificate-less
# clients are refused and that each agent bound under its own identity, runs a short
# sweep with its link baseline from the loadgen container (as the operator), checks
# that every series the dashboards query is on the live /metrics endpoints, validates the
# expositions and prometheus.yml with promtool, evaluates every dashboard expression in the
# live Prometheus, then pauses one agent while an invalidation it owes is pending and
# checks the server times it out (ITE) and keeps serving the other agents. Always tears
# the stack down. Without a Docker engine it says so in one line and exits 0.
#
# Environment: SMOKE_TIMEOUT (whole run, seconds, default 900), SMOKE_KEEP=1 (leave the
# stack up for inspection), CARGO_TARGET_DIR (where binaries and contexts go).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

if ! docker info >/dev/null 2>&1; then
    echo "deploy smoke test skipped: no Docker engine ('docker info' failed)"
    exit 0
fi
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    echo "deploy smoke test skipped: Docker engine present but neither 'docker compose' nor 'docker-compose'"
    exit 0
fi

# The whole run under one deadline; the EXIT trap below still tears the stack down.
if [ -z "${SMOKE_INNER:-}" ]; then
    SMOKE_INNER=1 exec timeout -k 60 "${SMOKE_TIMEOUT:-900}" "$0" "$@"
fi

started=$SECONDS
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac
work=$target/deploy-smoke
rm -rf "$work" && mkdir -p "$work/out"
project=dmar-smoke
agents=3
agent_services=(agent-0 agent-1 agent-2)
steps=1,2,3
passed=0

step() { printf '\n==> smoke [%3ds] %s\n' "$((SECONDS - started))" "$*"; }
pass() { passed=$((passed + 1)); }
pick_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

DMAR_PUBLISH_GRPC=$(pick_port)
DMAR_PUBLISH_METRICS=$(pick_port)
DMAR_PUBLISH_PROMETHEUS=$(pick_port)
export DMAR_PUBLISH_GRPC DMAR_PUBLISH_METRICS DMAR_PUBLISH_PROMETHEUS
export DMAR_OUT=$work/out DMAR_IMAGE_TAG=local
# The smoke test's own certificates, so that a developer's deploy/certs is left alone.
export DMAR_CERTS=$work/certs SMOKE_CERTS=$work/certs
export DMAR_PROMETHEUS_IMAGE=dmar-prometheus:local
compose() { timeout 180 "${compose_cmd[@]}" -p "$project" -f deploy/docker-compose.yml "$@"; }

paused=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$paused" ]; then docker unpause "$paused" >/dev/null 2>&1 || true; fi
    if [ "$rc" != 0 ]; then
        echo "smoke: FAILED (exit $rc); last logs:" >&2
        compose logs --no-color --tail 15 server "${agent_services[@]}" prometheus >&2 2>/dev/null || true
    fi
    if [ "${SMOKE_KEEP:-}" = 1 ]; then
        echo "smoke: stack left up (project $project); remove it with: ${compose_cmd[*]} -p $project -f deploy/docker-compose.yml down -v"
    else
        compose --profile loadgen --profile dashboards down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

step "tools: Python grpcio and grpc health client, stubs from proto/dmar/v1/dmar.proto"
venv=$target/interop-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
timeout 300 "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcio>=1.60' 'grpcio-tools>=1.60' 'grpcio-health-checking>=1.60'
gen=$work/gen
mkdir -p "$gen"
"$venv/bin/python" -m grpc_tools.protoc -Iproto --python_out="$gen" --grpc_python_out="$gen" proto/dmar/v1/dmar.proto
touch "$gen/dmar/__init__.py" "$gen/dmar/v1/__init__.py"
check() { PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" tests/deploy/checks.py "$gen" "$@"; }

step "build images (host release binaries on FROM scratch)"
timeout 900 deploy/build-images.sh
promtool() { timeout 60 docker run --rm -i --network none --entrypoint /bin/promtool dmar-prometheus:local "$@"; }

step "certificates: deploy/dmar.sh certs (a CA, dmar-server, agent-0..2, operator, observer, policy.toml)"
deploy/dmar.sh certs
for f in ca.pem policy.toml dmar-server.key agent-0.key agent-1.key agent-2.key operator.key observer.key; do
    [ -s "$DMAR_CERTS/$f" ] || { echo "smoke: $f was not made" >&2; exit 1; }
done
[ "$(stat -c %a "$DMAR_CERTS/ca.key")" = 600 ] || { echo "smoke: ca.key is not 0600" >&2; exit 1; }
echo "smoke: ok: certificates and policy made; the CA key stays 0600 and is mounted nowhere"
pass

step "clean up any previous run, then up: server (healthy first), $agents agents, Prometheus"
compose --profile loadgen --profile dashboards down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
up_since=$(date +%s)
compose up -d server "${agent_services[@]}" prometheus
deadline=$((SECONDS + 120))
while :; do
    state=$(docker inspect --format '{{.State.Health.Status}}' "$(compose ps -q server)")
    # An agent is healthy once its probe (its loopback health port) sees
    # dmar.v1.AgentControl SERVING: its ATS link is bound.
    healthy=$(for id in $(compose ps -q "${agent_services[@]}"); do
        docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id"
    done | grep -c '^healthy$' || true)
    [ "$state" = healthy ] && [ "$healthy" = "$agents" ] && break
    [ "$SECONDS" -lt "$deadline" ] || {
        echo "smoke: within 120 s: server $state, $healthy/$agents agents healthy" >&2
        exit 1
    }
    sleep 1
done
echo "smoke: ok: server healthy and $agents agents healthy (links bound; probes on their loopback health ports)"
pass
# The agents started only once the server was healthy (depends_on: service_healthy): the
# engine's event log orders the server's first "healthy" before every agent's "start".
agent_ids=()
for svc in "${agent_services[@]}"; do agent_ids+=("$(compose ps -q "$svc")"); done
[ "${#agent_ids[@]}" = "$agents" ] || { echo "smoke: ${#agent_ids[@]} agent containers, wanted $agents" >&2; exit 1; }
server_id=$(compose ps -q server)
timeout 30 docker events --since "$up_since" --until "$(date +%s)" \
    --format '{{.TimeNano}} {{.ID}} {{.Status}}' >"$work/events.txt"
healthy_at=$(awk -v id="$server_id" '$2 == id && /health_status: healthy/ { print $1; exit }' "$work/events.txt")
[ -n "$healthy_at" ] || { echo "smoke: no healthy event for the server" >&2; exit 1; }
for id in "${agent_ids[@]}"; do
    started_at=$(awk -v id="$id" '$2 == id && $3 == "start" { print $1; exit }' "$work/events.txt")
    if [ -z "$started_at" ] || [ "$started_at" -lt "$healthy_at" ]; then
        echo "smoke: agent ${id:0:12} started (${started_at:-never}) before the server was healthy ($healthy_at)" >&2
        exit 1
    fi
done
echo "smoke: ok: every agent started after the server reported healthy"
pass
check health "127.0.0.1:$DMAR_PUBLISH_GRPC"
pass

agent_ips=()
for id in "${agent_ids[@]}"; do
    agent_ips+=("$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")")
done
echo "smoke: agents at ${agent_ips[*]}"

step "TLS: who may talk to the server and the agents"
check server-gate "127.0.0.1:$DMAR_PUBLISH_GRPC"
pass
check agents-linked "${agent_ips[@]/%/:50061}"
pass
# Each agent bound its link: the server logs every bind with the agent's name.
compose logs --no-color server >"$work/server.log" 2>&1
for name in "${agent_services[@]}"; do
    grep -E "ATS link bound.*agent=$name( |$)" "$work/server.log" >/dev/null || {
        echo "smoke: the server's log shows no link bound by $name:" >&2
        grep "ATS link bound" "$work/server.log" >&2 || true
        exit 1
    }
done
echo "smoke: ok: the server's log shows a link bound by each of ${agent_services[*]}"
pass
# ...and under its own certificate: agent-0's certificate (run once more, as "impostor")
# asking for a function of agent-1's range is refused by the server's policy, which it can
# only apply by the identity in the certificate.
refusals() {
    curl -fsS --max-time 10 "http://127.0.0.1:$DMAR_PUBLISH_METRICS/metrics" |
        awk '/^dmar_server_auth_refusals_total\{.*reason="requester_id_range"/ { n += $NF } END { print n + 0 }'
}
before=$(refusals)
impostor=$(compose run -d --no-deps -e DMAR_NAME=impostor -e DMAR_FUNCTIONS=11:00.7 agent-0 | tail -n 1)
deadline=$((SECONDS + 30))
until [ "$(refusals)" -gt "$before" ]; do
    [ "$SECONDS" -lt "$deadline" ] || {
        docker rm -f "$impostor" >/dev/null 2>&1 || true
        echo "smoke: agent-0's certificate bound 11:00.7 (agent-1's range): no refusal within 30 s" >&2
        exit 1
    }
    sleep 1
done
docker rm -f "$impostor" >/dev/null 2>&1 || true
compose logs --no-color server 2>&1 | grep -E "call refused.*requester_id_range" | tail -n 1 |
    grep -E "identity=\"?agent-0" >/dev/null || {
    echo "smoke: the server's refusal does not name the certificate's identity agent-0" >&2
    exit 1
}
echo "smoke: ok: agent-0's certificate may not bind agent-1's 11:00.7 (refused: requester_id_range, identity agent-0)"
pass

step "sweep from the loadgen container (--steps $steps, agents found as agent:50061)"
# The baseline runs over each agent's own ATS link (DMAR_BASELINE=link in the compose
# file): the agents hold the device role only, which may not call Control.Translate.
compose --profile loadgen run --rm --no-deps loadgen --steps "$steps" --duration 1s --warmup 200ms \
    --format json --output /out/sweep.json
check sweep-report "$work/out/sweep.json" "$steps" link
pass

step "live /metrics: every series the dashboards query; promtool check metrics"
curl -fsS --max-time 10 "http://127.0.0.1:$DMAR_PUBLISH_METRICS/metrics" -o "$work/server.prom"
agent_files=()
for i in "${!agent_ips[@]}"; do
    f=$work/agent-$i.prom
    curl -fsS --max-time 10 "http://${agent_ips[$i]}:9465/metrics" -o "$f"
    agent_files+=("$f")
done
check expositions deploy/grafana/dashboards "$work/server.prom" "${agent_files[@]}"
pass
for f in "$work/server.prom" "${agent_files[@]}"; do
    promtool check metrics <"$f" || { echo "smoke: promtool rejects $(basename "$f")" >&2; exit 1; }
done
echo "smoke: ok: promtool check metrics accepts the server's and the $agents agents' expositions"
pass

step "promtool check config; Prometheus discovers the agents and evaluates the dashboards"
timeout 60 docker run --rm --network none -v "$root/deploy/prometheus:/p:ro" \
    --entrypoint /bin/promtool dmar-prometheus:local check config /p/prometheus.yml
echo "smoke: ok: promtool check config accepts deploy/prometheus/prometheus.yml and its rules"
pass
check prometheus "http://127.0.0.1:$DMAR_PUBLISH_PROMETHEUS" deploy/grafana/dashboards "$agents"
pass

step "invalidation time-out: pause agent 1 with an invalidation pending for it"
victim_id=${agent_ids[0]}
paused=$victim_id
others=("${agent_ips[@]:1}")
check ite "127.0.0.1:$DMAR_PUBLISH_GRPC" "${agent_ips[0]}:50061" "$victim_id" \
    "http://127.0.0.1:$DMAR_PUBLISH_METRICS/metrics" "${others[@]/%/:50061}"
pass

step "the server keeps serving the others: sweep over the ${#others[@]} live agents while agent 1 is paused"
others_list=$(IFS=,; echo "${others[*]/%/:50061}")
compose --profile loadgen run --rm --no-deps loadgen --agents "$others_list" --steps 1,2 --duration 1s \
    --warmup 200ms --format json --output /out/sweep-others.json
check sweep-report "$work/out/sweep-others.json" 1,2 link
pass

step "unpause agent 1: it relinks"
timeout 30 docker unpause "$victim_id" >/dev/null
paused=""
check link-recovered "${agent_ips[0]}:50061"
pass

step "tear down"
trap - EXIT
if [ "${SMOKE_KEEP:-}" = 1 ]; then
    echo "smoke: stack left up (project $project)"
else
    compose --profile loadgen --profile dashboards down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
fi
echo
echo "deploy smoke test passed in $((SECONDS - started)) s"
echo "smoke: $passed passed, 0 failed"
