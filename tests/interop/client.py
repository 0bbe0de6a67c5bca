"""Interop check with an independent gRPC implementation (Python grpcio).

Generates stubs from proto/dmar/v1/dmar.proto, then against a running dmar-server over
mutual TLS: checks that a call without a client certificate is refused, creates a paging
domain, attaches a device with ATS and maps a page (operator certificate), opens an ATS
link, binds the function and performs a translation over the link (agent certificate).
Exits non-zero with one line on any mismatch.

Usage: client.py HOST:PORT GENERATED_DIR CERT_DIR
(CERT_DIR as written by dmar-certs: ca.pem, operator.{pem,key}, python-interop.{pem,key})
"""

import os

import queue
import sys


def main() -> int:
    addr, gen_dir, cert_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, gen_dir)
    import grpc  # noqa: E402
    from dmar.v1 import dmar_pb2 as pb  # noqa: E402
    from dmar.v1 import dmar_pb2_grpc as rpc  # noqa: E402

    def read(name: str) -> bytes:
        with open(os.path.join(cert_dir, name), "rb") as f:
            return f.read()

    ca = read("ca.pem")
    # The server's certificate names localhost, 127.0.0.1 and ::1.
    options = [("grpc.ssl_target_name_override", "localhost")]

    def channel_as(name):
        if name is None:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
        else:
            creds = grpc.ssl_channel_credentials(ca, read(f"{name}.key"), read(f"{name}.pem"))
        ch = grpc.secure_channel(addr, creds, options=options)
        grpc.channel_ready_future(ch).result(timeout=30)
        return ch

    def refused(what: str, call, code) -> bool:
        """Whether `call` fails with status `code`; if not, says what it did instead."""
        try:
            call()
        except grpc.RpcError as e:
            if e.code() == code:
                return True
            print(f"interop: {what} gave {e.code()}", file=sys.stderr)
            return False
        print(f"interop: {what} was accepted", file=sys.stderr)
        return False

    # Without a client certificate the handshake completes (health answers probes), but
    # every dmar call is refused.
    if not refused("a call without a client certificate",
                   lambda: rpc.ControlStub(channel_as(None)).GetStats(pb.GetStatsRequest(), timeout=10),
                   grpc.StatusCode.UNAUTHENTICATED):
        return 1

    control = rpc.ControlStub(channel_as("operator"))
    sid = (2 << 8) | (3 << 3) | 1  # 02:03.1

    did = control.CreateDomain(pb.CreateDomainRequest(kind=pb.DOMAIN_KIND_PAGING, address_width=48)).domain_id
    control.Attach(pb.AttachRequest(source_id=sid, domain_id=did, ats=True))
    perms = pb.Permissions(read=True, write=False)
    mapping = pb.MapRequest(domain_id=did, ranges=[pb.MapRange(iova=0x7000_0000, hpa=0x1234_5000, length=0x1000, permissions=perms)])
    control.Map(mapping)

    # A bad request gets a status, not a crash.
    if not refused("overlapping map", lambda: control.Map(mapping), grpc.StatusCode.ALREADY_EXISTS):
        return 1

    outbound: "queue.Queue[pb.LinkUp]" = queue.Queue()
    outbound.put(pb.LinkUp(bind=pb.Bind(agent="python-interop", functions=[pb.Function(source_id=sid, invalidate_queue_depth=4)])))
    outbound.put(pb.LinkUp(translations=[pb.TranslationRequest(tag=42, source_id=sid, address=0x7000_0abc, no_write=True)]))

    def requests():
        while True:
            item = outbound.get()
            if item is None:
                return
            yield item

    link = rpc.AtsLinkStub(channel_as("python-interop")).Open(requests(), timeout=30)
    bound = next(link)
    if list(bound.bound.source_ids) != [sid]:
        print(f"interop: bind answered {bound}", file=sys.stderr)
        return 1
    for down in link:
        if down.completions:
            c = down.completions[0]
            e = c.entry
            ok = (c.tag == 42 and c.status == pb.COMPLETION_STATUS_SUCCESS and e.translated_address == 0x1234_5000
                  and e.size_shift == 12 and e.read and not e.write)
            if not ok:
                print(f"interop: unexpected completion {c}", file=sys.stderr)
                return 1
            break
    outbound.put(None)
    link.cancel()
    print("interop: python grpcio client over mutual TLS: refused without a certificate; created a domain, "
          "attached, mapped and translated over the ATS link")
    return 0


if __name__ == "__main__":
    sys.exit(main())
