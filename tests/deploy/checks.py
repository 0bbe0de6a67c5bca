"""Checks of the compose smoke test (tests/deploy/smoke.sh) that need gRPC or parsing.

Python grpcio with stubs generated from proto/dmar/v1/dmar.proto (as tests/interop does),
plus grpcio-health-checking for an independent grpc.health.v1 client. Each check prints
one line per thing it verified and exits non-zero with one line on the first failure.

Every gRPC check speaks mutual TLS with the certificates in $SMOKE_CERTS (the layout
dmar-certs writes): as `operator` unless a check says otherwise, expecting the server's
certificate to name `dmar-server` and every agent's `agent` (the shared SAN), whatever
address is dialled. Without $SMOKE_CERTS they speak plaintext.

Usage: checks.py GENERATED_STUBS_DIR CHECK [ARGS]

  health ADDR [SERVICE]                    grpc.health.v1 Check is SERVING, over TLS
                                           without a client certificate (as a probe)
  server-gate ADDR                         plaintext is refused; without a certificate
                                           only health answers; the observer reads stats
                                           but may not create domains; the operator may
  agents-linked AGENT..                    each agent's control port answers health without
                                           a certificate, refuses AgentControl without one,
                                           and reports its ATS link bound to the operator
  dashboard-metrics DIR                    every dmar_* series the dashboards query
  expositions DIR SERVER_FILE AGENT_FILE.. every such series is on the live /metrics
  sweep-report FILE [DEVICES] [BASELINE]   a loadgen JSON sweep report measured something;
                                           with BASELINE (unary, link), every step also
                                           measured a baseline of that kind
  prometheus URL DIR AGENTS                targets up (server + AGENTS agents), and every
                                           dashboard expression evaluates
  ite SERVER VICTIM CONTAINER METRICS OTHER..
                                           pause the victim agent's container with an
                                           invalidation pending for it, check the server
                                           times it out (ITE) and keeps serving OTHER agents;
                                           the victim is left paused (the caller unpauses)
  link-recovered AGENT                     the agent's ATS link is bound again
"""

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

GEN = None  # the generated stubs' folder, from argv


def fail(msg: str) -> None:
    print(f"smoke: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def ok(msg: str) -> None:
    print(f"smoke: ok: {msg}", flush=True)


def stubs():
    sys.path.insert(0, GEN)
    import grpc  # noqa: E402
    from dmar.v1 import dmar_pb2 as pb  # noqa: E402
    from dmar.v1 import dmar_pb2_grpc as rpc  # noqa: E402

    return grpc, pb, rpc


# What the server's and the agents' certificates name (docker-compose.yml, dmar.sh).
SERVER_NAME = "dmar-server"
AGENT_NAME = "agent"


def certs() -> "Path | None":
    import os

    d = os.environ.get("SMOKE_CERTS")
    return Path(d) if d else None


def channel(addr: str, peer: str = "server", identity: "str | None" = "operator"):
    """A channel to ADDR: mutual TLS as IDENTITY (None: no client certificate) when
    $SMOKE_CERTS is set, else plaintext. PEER (server or agent) picks the name the
    peer's certificate must carry."""
    import grpc

    d = certs()
    if d is None:
        return grpc.insecure_channel(addr)
    ca = (d / "ca.pem").read_bytes()
    if identity is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=ca,
                                             private_key=(d / f"{identity}.key").read_bytes(),
                                             certificate_chain=(d / f"{identity}.pem").read_bytes())
    name = SERVER_NAME if peer == "server" else AGENT_NAME
    return grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", name)])


# ------------------------------------------------------------------------ dashboards

DMAR_NAME = re.compile(r"(?<![\w$:])dmar_[A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def dashboard_exprs(folder: str):
    """(dashboard, panel title, expr) for every target and template query."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        d = json.loads(path.read_text())

        def walk(panels):
            for p in panels:
                for t in p.get("targets", []):
                    if t.get("expr"):
                        out.append((path.name, p.get("title", "?"), t["expr"]))
                walk(p.get("panels", []))

        walk(d.get("panels", []))
        for v in d.get("templating", {}).get("list", []):
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if q:
                out.append((path.name, f"variable {v.get('name')}", q))
    return out


def dashboard_series(folder: str) -> "set[str]":
    names = set()
    for _, _, expr in dashboard_exprs(folder):
        names.update(DMAR_NAME.findall(STRING.sub('""', expr)))
    return names


def exposition_series(text: str) -> "set[str]":
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", text, re.M)}


def cmd_dashboard_metrics(folder: str) -> None:
    for n in sorted(dashboard_series(folder)):
        print(n)


def cmd_expositions(folder: str, server_file: str, *agent_files: str) -> None:
    wanted = dashboard_series(folder)
    server = exposition_series(Path(server_file).read_text())
    agent_wanted = {n for n in wanted if n.startswith("dmar_agent_")}
    missing = sorted(wanted - agent_wanted - server)
    if missing:
        fail(f"on the server's /metrics, dashboard series missing: {', '.join(missing)}")
    for f in agent_files:
        have = exposition_series(Path(f).read_text())
        missing = sorted(agent_wanted - have)
        if missing:
            fail(f"on agent /metrics {Path(f).name}, dashboard series missing: {', '.join(missing)}")
    ok(f"all {len(wanted)} series the dashboards query are on the live /metrics "
       f"(server: {len(wanted) - len(agent_wanted)}, each of {len(agent_files)} agents: {len(agent_wanted)})")


# ------------------------------------------------------------------------ prometheus


def prom_get(url: str, path: str, **params):
    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{q}", timeout=10) as r:
        return json.load(r)


def cmd_prometheus(url: str, folder: str, agents: str) -> None:
    want_agents = int(agents)
    deadline = time.monotonic() + 60
    while True:
        targets = prom_get(url, "/api/v1/targets")["data"]["activeTargets"]
        up = [t for t in targets if t["health"] == "up"]
        server_up = sum(1 for t in up if t["labels"]["job"] == "dmar-server")
        agents_up = sum(1 for t in up if t["labels"]["job"] == "dmar-agent")
        if server_up == 1 and agents_up == want_agents:
            break
        if time.monotonic() > deadline:
            fail(f"Prometheus targets: server up {server_up}/1, agents up {agents_up}/{want_agents} "
                 f"(agents are found by DNS service discovery): {[(t['scrapeUrl'], t['lastError']) for t in targets]}")
        time.sleep(2)
    ok(f"Prometheus scrapes the server and {agents_up} agents found by DNS service discovery")
    # Every expression must parse and return at least one series: an empty answer means a
    # label mismatch across a binary operator or a series nobody exports, i.e. an empty
    # panel. rate() needs two scrapes of an agent found moments ago, hence the retries.
    pending = dashboard_exprs(folder)
    total = len(pending)
    deadline = time.monotonic() + 60
    while pending:
        empty = []
        for board, title, expr in pending:
            if expr.startswith("label_values("):
                metric = expr[len("label_values("):].split(",")[0].strip()
                res = prom_get(url, "/api/v1/series", **{"match[]": metric})
                series = res.get("data", [])
            else:
                q = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
                try:
                    res = prom_get(url, "/api/v1/query", query=q)
                except urllib.error.HTTPError as e:
                    fail(f"{board} / {title}: Prometheus refused {q!r}: {e.read().decode(errors='replace')}")
                series = res.get("data", {}).get("result", [])
            if res.get("status") != "success":
                fail(f"{board} / {title}: {res}")
            if not series:
                empty.append((board, title, expr))
        pending = empty
        if pending and time.monotonic() > deadline:
            fail("dashboard expressions with no series in Prometheus: "
                 + "; ".join(f"{b} / {t}: {e}" for b, t, e in pending))
        if pending:
            time.sleep(3)
    ok(f"Prometheus evaluates all {total} dashboard expressions, each to at least one series")


# ------------------------------------------------------------------------ loadgen report


def cmd_sweep_report(path: str, devices: str = "", baseline: str = "") -> None:
    r = json.loads(Path(path).read_text())
    steps = r.get("steps", [])
    if not steps:
        fail(f"{path}: no steps")
    for s in steps:
        c = s["ats"]["counts"]
        if c["accesses"] <= 0 or c["faults"] != 0:
            fail(f"{path}: step {s['devices']}: {c['accesses']} accesses, {c['faults']} faults")
    if devices and [s["devices"] for s in steps] != [int(x) for x in devices.split(",")]:
        fail(f"{path}: steps {[s['devices'] for s in steps]}, wanted {devices}")
    summary = ", ".join(f"{s['devices']} dev {s['ats']['device_translations_per_s']:.0f} tr/s" for s in steps)
    if baseline:
        kind = r.get("settings", {}).get("baseline")
        if kind != baseline:
            fail(f"{path}: baseline kind {kind!r}, wanted {baseline!r}")
        for s in steps:
            b = s.get("baseline")
            if not b:
                fail(f"{path}: step {s['devices']}: no baseline column")
            c = b["counts"]
            if c["baseline_calls"] <= 0 or c["faults"] != 0 or c["aborted"] != 0:
                fail(f"{path}: step {s['devices']}: {baseline} baseline: {c['baseline_calls']} translations, "
                     f"{c['faults']} faults, {c['aborted']} aborted")
            if not s.get("ats_over_baseline"):
                fail(f"{path}: step {s['devices']}: no ATS/baseline ratio")
        summary += "; " + ", ".join(
            f"{baseline} baseline {s['baseline']['device_translations_per_s']:.0f} tr/s" for s in steps)
    ok(f"sweep measured every step without faults ({summary})")


# ------------------------------------------------------------------------ gRPC


def cmd_health(addr: str, service: str = "") -> None:
    grpc, _, _ = stubs()
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

    with channel(addr, identity=None) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    if r.status != health_pb2.HealthCheckResponse.SERVING:
        fail(f"grpc.health.v1 {addr} {service!r}: {r.status}")
    how = "over TLS without a client certificate" if certs() else "plaintext"
    ok(f"grpc.health.v1 Check {addr} {service or '(server)'}: SERVING ({how})")


def expect_refused(grpc, call, codes, what: str) -> str:
    try:
        call()
    except grpc.RpcError as e:
        if e.code() in codes:
            return e.code().name
        fail(f"{what}: {e.code().name} ({e.details()}), wanted {'/'.join(c.name for c in codes)}")
    fail(f"{what}: succeeded, wanted {'/'.join(c.name for c in codes)}")


def cmd_server_gate(addr: str) -> None:
    grpc, pb, rpc = stubs()
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

    if certs() is None:
        fail("server-gate needs $SMOKE_CERTS")
    # A plaintext HTTP/2 client never gets an answer: the port speaks TLS only.
    with grpc.insecure_channel(addr) as ch:
        code = expect_refused(
            grpc, lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5),
            (grpc.StatusCode.UNAVAILABLE,), "plaintext health check on the gRPC port")
        expect_refused(grpc, lambda: rpc.ControlStub(ch).GetStats(pb.GetStatsRequest(), timeout=5),
                       (grpc.StatusCode.UNAVAILABLE,), "plaintext GetStats on the gRPC port")
    ok(f"plaintext client to {addr} refused ({code}): the gRPC port speaks TLS only")
    # TLS without a certificate: a probe's view. Health answers, nothing else does.
    with channel(addr, identity=None) as ch:
        code = expect_refused(grpc, lambda: rpc.ControlStub(ch).GetStats(pb.GetStatsRequest(), timeout=5),
                              (grpc.StatusCode.UNAUTHENTICATED,), "GetStats without a client certificate")
    ok(f"TLS without a client certificate: GetStats {code}")
    with channel(addr, identity="observer") as ch:
        control = rpc.ControlStub(ch)
        control.GetStats(pb.GetStatsRequest(), timeout=5)
        code = expect_refused(
            grpc, lambda: control.CreateDomain(pb.CreateDomainRequest(kind=pb.DOMAIN_KIND_PAGING), timeout=5),
            (grpc.StatusCode.PERMISSION_DENIED,), "CreateDomain as observer")
    ok(f"observer: GetStats served, CreateDomain {code}")
    with channel(addr) as ch:
        control = rpc.ControlStub(ch)
        did = control.CreateDomain(pb.CreateDomainRequest(kind=pb.DOMAIN_KIND_PAGING), timeout=5).domain_id
        control.DestroyDomain(pb.DestroyDomainRequest(domain_id=did), timeout=5)
    ok("operator: CreateDomain and DestroyDomain served")


def cmd_agents_linked(*addrs: str) -> None:
    grpc, pb, rpc = stubs()
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

    deadline = time.monotonic() + 60
    for addr in addrs:
        if certs() is not None:
            with channel(addr, peer="agent", identity=None) as ch:
                code = expect_refused(
                    grpc, lambda: rpc.AgentControlStub(ch).GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5),
                    (grpc.StatusCode.UNAUTHENTICATED,), f"agent {addr} GetAgentInfo without a client certificate")

        def linked():
            with channel(addr, peer="agent", identity=None) as ch:
                h = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="dmar.v1.AgentControl"), timeout=5)
            info = agent_info(grpc, pb, rpc, addr)
            return info if h.status == health_pb2.HealthCheckResponse.SERVING and info.connected else None

        info = wait_for(grpc, deadline, f"agent {addr} has no ATS link bound after 60 s", linked)
        fns = ",".join(f.name for f in info.functions)
        extra = f"; GetAgentInfo without a certificate: {code}" if certs() is not None else ""
        ok(f"agent {addr} ({info.agent}: {fns}) linked; health SERVING without a certificate{extra}")


def scrape(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def agent_info(grpc, pb, rpc, addr: str):
    with channel(addr, peer="agent") as ch:
        return rpc.AgentControlStub(ch).GetAgentInfo(pb.GetAgentInfoRequest(), timeout=10)


def wait_for(grpc, deadline: float, failure: str, check):
    """Calls `check` once a second until it returns a result (an RPC error counts as not
    yet) and returns it; fails with `failure` once the monotonic `deadline` has passed."""
    while True:
        try:
            result = check()
            if result:
                return result
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            fail(failure)
        time.sleep(1)


def cmd_ite(server: str, victim: str, container: str, metrics_url: str, *others: str) -> None:
    grpc, pb, rpc = stubs()
    ch = channel(server)
    control = rpc.ControlStub(ch)
    rw = pb.Permissions(read=True, write=True)
    iova, page = 0x4000_0000, 0x1000

    def domain_with(sid: int, hpa: int) -> int:
        # The sweep before may have left the function attached to one of its domains.
        control.Detach(pb.DetachRequest(source_id=sid), timeout=10)
        did = control.CreateDomain(pb.CreateDomainRequest(kind=pb.DOMAIN_KIND_PAGING), timeout=10).domain_id
        control.Attach(pb.AttachRequest(source_id=sid, domain_id=did, ats=True), timeout=10)
        control.Map(pb.MapRequest(domain_id=did, ranges=[pb.MapRange(iova=iova, hpa=hpa, length=page, permissions=rw)]),
                    timeout=10)
        return did

    def access(addr: str, sid: int):
        with channel(addr, peer="agent") as ach:
            return rpc.AgentControlStub(ach).Access(
                pb.AccessRequest(source_id=sid, iova=iova + 0x40, translate_only=True), timeout=10)

    # The victim caches a translation of a domain it is attached to with ATS.
    info = agent_info(grpc, pb, rpc, victim)
    if not info.connected or not info.functions:
        fail(f"victim agent {victim} is not linked: {info}")
    vsid = info.functions[0].source_id
    vdid = domain_with(vsid, 0x2000_0000)
    first, second = access(victim, vsid), access(victim, vsid)
    if first.result != pb.ACCESS_RESULT_OK or not second.atc_hit:
        fail(f"victim {info.functions[0].name}: access {first}, then {second}")
    ok(f"victim agent {victim} function {info.functions[0].name} caches a translation of domain {vdid}")

    before = scrape(metrics_url, "dmar_unit_device_tlb_timeouts_total")
    subprocess.run(["docker", "pause", container], check=True, capture_output=True, timeout=30)
    ok(f"victim container {container[:12]} paused (its TCP link stays open, it answers nothing)")

    # A strict unmap must invalidate the victim's device TLB: that invalidation is owed by a
    # device that never answers, so the unit must time it out instead of hanging.
    t0 = time.monotonic()
    try:
        control.Unmap(pb.UnmapRequest(domain_id=vdid, ranges=[pb.UnmapRange(iova=iova, length=page)],
                                      policy=pb.FLUSH_POLICY_STRICT), timeout=30)
        outcome = "OK"
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 >= 29:
            fail("the strict unmap hung for 30 s: no invalidation time-out")
        outcome = f"{e.code().name} ({e.details()})"
    elapsed = time.monotonic() - t0
    after = scrape(metrics_url, "dmar_unit_device_tlb_timeouts_total")
    if after <= before:
        fail(f"dmar_unit_device_tlb_timeouts_total stayed at {after:.0f} after an unanswered invalidation "
             f"(unmap: {outcome} in {elapsed:.1f} s)")
    ok(f"strict unmap returned {outcome} after {elapsed:.2f} s; "
       f"dmar_unit_device_tlb_timeouts_total {before:.0f} -> {after:.0f} (ITE)")

    # The others are still served: translation, then a strict unmap whose device-TLB
    # invalidation they complete, then a miss that faults because the entry is gone.
    for n, addr in enumerate(others):
        oinfo = agent_info(grpc, pb, rpc, addr)
        if not oinfo.connected:
            fail(f"agent {addr} lost its link while the victim was paused")
        osid = oinfo.functions[0].source_id
        odid = domain_with(osid, 0x3000_0000 + n * page)
        a = access(addr, osid)
        if a.result != pb.ACCESS_RESULT_OK:
            fail(f"agent {addr}: access after the ITE: {a}")
        t0 = time.monotonic()
        control.Unmap(pb.UnmapRequest(domain_id=odid, ranges=[pb.UnmapRange(iova=iova, length=page)],
                                      policy=pb.FLUSH_POLICY_STRICT), timeout=10)
        took = time.monotonic() - t0
        b = access(addr, osid)
        if b.result != pb.ACCESS_RESULT_FAULT or b.atc_hit:
            fail(f"agent {addr}: access after its strict unmap: {b}")
        control.Detach(pb.DetachRequest(source_id=osid), timeout=10)
        control.DestroyDomain(pb.DestroyDomainRequest(domain_id=odid), timeout=10)
        ok(f"agent {addr} ({oinfo.functions[0].name}) still translates; its strict unmap completed in "
           f"{took * 1000:.0f} ms and dropped its cached entry")
    ch.close()


def cmd_link_recovered(addr: str) -> None:
    grpc, pb, rpc = stubs()

    def connected():
        info = agent_info(grpc, pb, rpc, addr)
        return info if info.connected else None

    info = wait_for(grpc, time.monotonic() + 60, f"agent {addr} did not relink within 60 s of being unpaused", connected)
    ok(f"agent {addr} is linked again after being unpaused ({info.connections} binds since start)")


def main() -> None:
    global GEN
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    GEN, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    commands = {
        "health": cmd_health,
        "server-gate": cmd_server_gate,
        "agents-linked": cmd_agents_linked,
        "dashboard-metrics": cmd_dashboard_metrics,
        "expositions": cmd_expositions,
        "sweep-report": cmd_sweep_report,
        "prometheus": cmd_prometheus,
        "ite": cmd_ite,
        "link-recovered": cmd_link_recovered,
    }
    if cmd not in commands:
        fail(f"unknown check {cmd}")
    try:
        commands[cmd](*args)
    except Exception as e:  # one line, whatever failed
        fail(f"{cmd}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
