#!/usr/bin/env bash
# Checks and unit-tests the Prometheus rules of the compose stack (deploy/prometheus/rules.yml,
# docs/DEPLOY.md "Alerts and recording rules") with promtool (Debian package `prometheus`,
# installed here when missing): every metric they name is one the server or the agent
# exports, the rules parse, prometheus.yml loads them, and rules_test.yml passes.
set -euo pipefail
cd "$(dirname "$0")/../.."
rules=deploy/prometheus/rules.yml
tests=deploy/prometheus/rules_test.yml

. tests/metrics/promtool.sh

# Every dmar_* metric the rules read or name (a histogram by its base name) must be a name
# the server's or the agent's metrics module registers: a misspelt name matches nothing and never fires, and
# the unit tests, written with the same names, would not notice. Recorded series (with a
# colon) are the rules' own.
exported=$(grep -rho '"dmar_[a-z_]*"' server/src/service/metrics device-agent/src/metrics | tr -d '"' | sort -u)
used=$(grep -v '^\s*#' "$rules" | grep -oE '(^|[^:a-z_])dmar_[a-z_]+' | grep -oE 'dmar_[a-z_]+' |
    sed -E 's/_(bucket|sum|count)$//' | sort -u)
missing=$(comm -23 <(echo "$used") <(echo "$exported"))
if [ -n "$missing" ]; then
    echo "$rules names metrics nobody exports: $(echo "$missing" | tr '\n' ' ')" >&2
    exit 1
fi
echo "every metric $rules names is exported ($(echo "$used" | wc -l) names)"

promtool check rules "$rules"
# prometheus.yml must load the rules file beside it.
out=$(promtool check config deploy/prometheus/prometheus.yml)
echo "$out"
grep -q "Checking $rules" <<<"$out" || { echo "deploy/prometheus/prometheus.yml does not load $rules" >&2; exit 1; }
promtool test rules "$tests"
