//! `dmar-healthcheck`: a container health probe that asks a gRPC server's standard
//! `grpc.health.v1.Health/Check` whether it is SERVING, with nothing but `std`.
//!
//! The images are `FROM scratch` (no shell, no curl, no grpc_health_probe), so the compose
//! health checks need a program of their own. This one speaks just enough cleartext HTTP/2
//! (prior knowledge, RFC 9113) for one unary call: the connection preface, an empty
//! SETTINGS, one HEADERS frame of HPACK literals (RFC 7541 §6.2.2, no Huffman, no table),
//! one DATA frame holding the gRPC message, then it reads frames until the stream ends.
//! The response headers are never decoded: the answer is the `HealthCheckResponse` in the
//! DATA frame (`status` = 1 is SERVING). A trailers-only answer (an unknown service, any
//! gRPC error) carries no DATA and counts as unhealthy.
//!
//! A workspace member with no dependencies beyond `std`, so that it builds in seconds and
//! runs on an empty base image; `deploy/build-images.sh` and `deploy/Dockerfile` build it
//! with cargo (`-p dmar-healthcheck`) beside the other binaries.
//!
//! Usage: `dmar-healthcheck [--service NAME] [--timeout-ms N] [HOST:PORT]`
//! (default `127.0.0.1:50051`, the whole server: service ""). Exit 0 when SERVING,
//! 1 otherwise, with one line on standard error.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const STREAM: u32 = 1;
/// Largest frame accepted (the HTTP/2 default SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;

const USAGE: &str = "usage: dmar-healthcheck [--service NAME] [--timeout-ms N] [HOST:PORT]";

#[derive(Debug, PartialEq, Eq)]
struct Options {
    addr: String,
    service: String,
    timeout: Duration,
}

/// Parses the arguments after the program name.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut o = Options { addr: "127.0.0.1:50051".into(), service: String::new(), timeout: Duration::from_secs(3) };
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--service" => o.service = args.next().ok_or("--service needs a name")?,
            "--timeout-ms" => {
                let ms: u64 = args.next().and_then(|v| v.parse().ok()).ok_or("--timeout-ms needs milliseconds")?;
                o.timeout = Duration::from_millis(ms.max(1));
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ => o.addr = a,
        }
    }
    Ok(o)
}

/// One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK string literal without Huffman coding (RFC 7541 §5.2), 7-bit prefix integer.
fn hpack_string(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s.as_bytes());
}

/// The request's header block: literals without indexing, new names (RFC 7541 §6.2.2).
fn header_block(authority: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "dmar-healthcheck"),
    ] {
        b.push(0x00);
        hpack_string(&mut b, name);
        hpack_string(&mut b, value);
    }
    b
}

/// A length-prefixed gRPC message holding `HealthCheckRequest { service }`.
fn request_message(service: &str) -> Vec<u8> {
    let mut pb = Vec::new();
    if !service.is_empty() {
        pb.push(0x0a); // field 1, length-delimited
        let mut n = service.len();
        while n >= 0x80 {
            pb.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        pb.push(n as u8);
        pb.extend_from_slice(service.as_bytes());
    }
    let mut m = vec![0u8]; // not compressed
    m.extend_from_slice(&(pb.len() as u32).to_be_bytes());
    m.extend_from_slice(&pb);
    m
}

/// `HealthCheckResponse.status` from the gRPC message bytes (0 when absent: UNKNOWN).
fn response_status(msg: &[u8]) -> Result<u64, String> {
    if msg.len() < 5 {
        return Err("no health response (unknown service or a gRPC error)".into());
    }
    if msg[0] != 0 {
        return Err("compressed health response".into());
    }
    let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
    let pb = msg.get(5..5 + len).ok_or("truncated health response")?;
    let mut i = 0;
    let mut status = 0;
    while i < pb.len() {
        let key = pb[i];
        i += 1;
        let mut v: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *pb.get(i).ok_or("truncated varint")?;
            i += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 || shift > 63 {
                break;
            }
        }
        match key {
            0x08 => status = v,
            _ if key & 7 == 0 => {}
            _ => return Err(format!("unexpected field key {key:#x} in health response")),
        }
    }
    Ok(status)
}

/// A received frame's header (RFC 9113 §4.1).
#[derive(Debug, PartialEq, Eq)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(head: [u8; 9]) -> FrameHead {
        FrameHead {
            len: u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize,
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        }
    }
}

/// What a `HealthCheckResponse.status` means for the probe.
fn verdict(addr: &str, status: u64) -> Result<(), String> {
    match status {
        1 => Ok(()),
        0 => Err(format!("{addr}: status UNKNOWN")),
        2 => Err(format!("{addr}: status NOT_SERVING")),
        3 => Err(format!("{addr}: status SERVICE_UNKNOWN")),
        n => Err(format!("{addr}: status {n}")),
    }
}

fn check(o: &Options) -> Result<(), String> {
    let deadline = Instant::now() + o.timeout;
    let addr = o
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", o.addr))?
        .next()
        .ok_or_else(|| format!("{}: no address", o.addr))?;
    let mut s = TcpStream::connect_timeout(&addr, o.timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let io = |e: std::io::Error| format!("{addr}: {e}");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, STREAM, &header_block(&o.addr)));
    out.extend(frame(DATA, END_STREAM, STREAM, &request_message(&o.service)));
    s.set_write_timeout(Some(o.timeout)).map_err(io)?;
    s.write_all(&out).map_err(io)?;

    let mut data = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{addr}: no answer within {:?}", o.timeout));
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        let mut head = [0u8; 9];
        s.read_exact(&mut head).map_err(io)?;
        let FrameHead { len, kind, flags, stream } = FrameHead::parse(head);
        if len > MAX_FRAME {
            return Err(format!("{addr}: frame of {len} bytes exceeds the default maximum"));
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).map_err(io)?;
        match kind {
            SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[])).map_err(io)?,
            PING if flags & ACK == 0 => s.write_all(&frame(PING, ACK, 0, &payload)).map_err(io)?,
            GOAWAY => return Err(format!("{addr}: the server sent GOAWAY")),
            RST_STREAM if stream == STREAM => return Err(format!("{addr}: the server reset the call")),
            DATA if stream == STREAM => {
                data.extend_from_slice(&payload);
                if flags & END_STREAM != 0 {
                    break;
                }
            }
            HEADERS if stream == STREAM && flags & END_STREAM != 0 => break,
            _ => {}
        }
    }
    verdict(&addr.to_string(), response_status(&data)?)
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(|o| check(&o));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmar-healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Options, String> {
        parse_args(a.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn arguments() {
        let o = args(&[]).expect("defaults");
        assert_eq!((o.addr.as_str(), o.service.as_str(), o.timeout), ("127.0.0.1:50051", "", Duration::from_secs(3)));
        let o = args(&["--service", "dmar.v1.AgentControl", "--timeout-ms", "250", "agent:50061"]).expect("parses");
        assert_eq!(
            o,
            Options {
                addr: "agent:50061".into(),
                service: "dmar.v1.AgentControl".into(),
                timeout: Duration::from_millis(250)
            }
        );
        assert_eq!(args(&["--timeout-ms", "0"]).expect("clamped").timeout, Duration::from_millis(1));
        assert!(args(&["--service"]).is_err());
        assert!(args(&["--timeout-ms", "soon"]).is_err());
        assert!(args(&["--verbose"]).is_err());
        assert_eq!(args(&["--help"]), Err(USAGE.to_owned()));
    }

    #[test]
    fn frames_have_a_nine_byte_header() {
        let f = frame(HEADERS, END_HEADERS, STREAM, b"abc");
        assert_eq!(f, [0, 0, 3, HEADERS, END_HEADERS, 0, 0, 0, 1, b'a', b'b', b'c']);
        assert_eq!(
            FrameHead::parse(f[..9].try_into().expect("9 bytes")),
            FrameHead { len: 3, kind: HEADERS, flags: END_HEADERS, stream: 1 }
        );
        // The reserved bit of the stream id is never sent and ignored on receipt.
        assert_eq!(frame(SETTINGS, ACK, 0x8000_0000, &[])[5..9], [0, 0, 0, 0]);
        let big = frame(DATA, 0, 3, &[0; 70_000]);
        assert_eq!(FrameHead::parse(big[..9].try_into().expect("9 bytes")).len, 70_000);
    }

    #[test]
    fn hpack_strings_use_a_seven_bit_prefix_integer() {
        let mut out = Vec::new();
        hpack_string(&mut out, "te");
        assert_eq!(out, b"\x02te");
        // RFC 7541 §5.1: 126 fits the prefix; 127 and more continue in 7-bit groups.
        for (len, prefix) in [(126, vec![126]), (127, vec![127, 0]), (128, vec![127, 1]), (300, vec![127, 0xad, 0x01])]
        {
            let mut out = Vec::new();
            hpack_string(&mut out, &"x".repeat(len));
            assert_eq!(out[..prefix.len()], prefix[..], "length {len}");
            assert_eq!(out.len(), prefix.len() + len);
        }
    }

    #[test]
    fn the_header_block_is_literals_without_indexing() {
        let b = header_block("127.0.0.1:50051");
        // First field: 0x00 (literal, new name), then ":method" and "POST".
        assert_eq!(b[..14], *b"\x00\x07:method\x04POST");
        let text = String::from_utf8_lossy(&b);
        for part in
            [":path", "/grpc.health.v1.Health/Check", ":authority", "127.0.0.1:50051", "application/grpc", "trailers"]
        {
            assert!(text.contains(part), "{part}");
        }
    }

    #[test]
    fn request_messages_are_length_prefixed_protobuf() {
        assert_eq!(request_message(""), [0, 0, 0, 0, 0]);
        let m = request_message("dmar.v1.Control");
        assert_eq!(m[..7], [0, 0, 0, 0, 17, 0x0a, 15]);
        assert_eq!(&m[7..], b"dmar.v1.Control");
        let long = "s".repeat(200);
        let m = request_message(&long);
        assert_eq!(m[..8], [0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
    }

    #[test]
    fn responses_give_the_status_or_a_reason() {
        assert_eq!(response_status(&[0, 0, 0, 0, 2, 0x08, 1]), Ok(1));
        assert_eq!(response_status(&[0, 0, 0, 0, 2, 0x08, 2]), Ok(2));
        assert_eq!(response_status(&[0, 0, 0, 0, 0]), Ok(0), "an empty message is UNKNOWN");
        // An unknown varint field is skipped.
        assert_eq!(response_status(&[0, 0, 0, 0, 5, 0x10, 0x96, 0x01, 0x08, 1]), Ok(1));
        assert_eq!(response_status(&[0, 0, 0, 0, 9, 0x08, 1]), Err("truncated health response".into()));
        assert!(response_status(&[]).is_err(), "no DATA: trailers only");
        assert!(response_status(&[1, 0, 0, 0, 2, 0x08, 1]).is_err(), "compressed");
        assert!(response_status(&[0, 0, 0, 0, 2, 0x08, 0x80]).is_err(), "truncated varint");
        assert!(response_status(&[0, 0, 0, 0, 2, 0x0a, 0]).is_err(), "length-delimited field");
        assert_eq!(verdict("a", 1), Ok(()));
        assert_eq!(verdict("a", 2), Err("a: status NOT_SERVING".into()));
        assert_eq!(verdict("a", 3), Err("a: status SERVICE_UNKNOWN".into()));
    }
}
