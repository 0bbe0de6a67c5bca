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
//! It is not part of the Cargo workspace on purpose: no dependencies, built in a second by
//! `rustc` (see `deploy/build-images.sh` and `deploy/Dockerfile`).
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

struct Options {
    addr: String,
    service: String,
    timeout: Duration,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options { addr: "127.0.0.1:50051".into(), service: String::new(), timeout: Duration::from_secs(3) };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--service" => o.service = args.next().ok_or("--service needs a name")?,
            "--timeout-ms" => {
                let ms: u64 = args.next().and_then(|v| v.parse().ok()).ok_or("--timeout-ms needs milliseconds")?;
                o.timeout = Duration::from_millis(ms.max(1));
            }
            "-h" | "--help" => {
                return Err("usage: dmar-healthcheck [--service NAME] [--timeout-ms N] [HOST:PORT]".into());
            }
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ => o.addr = a,
        }
    }
    Ok(o)
}

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
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
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
    match response_status(&data)? {
        1 => Ok(()),
        0 => Err(format!("{addr}: status UNKNOWN")),
        2 => Err(format!("{addr}: status NOT_SERVING")),
        3 => Err(format!("{addr}: status SERVICE_UNKNOWN")),
        n => Err(format!("{addr}: status {n}")),
    }
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|o| check(&o));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmar-healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}
