//! The platform file: the operator's TOML description of the remapping units the server
//! builds, read into a validated [`PlatformSpec`].
//!
//! This module owns the file format (every key, its defaults, its error messages); the rules
//! a platform must follow are `PlatformSpec::validate`'s, and building units from the spec
//! is the server's. `docs/PLATFORM.md` documents the format; in short:
//!
//! ```toml
//! memory = "4GiB"                      # bytes: an integer, "0x..", or K/M/G/T(iB) suffixed
//! [[unit]]
//! name = "dmar0"
//! scope = ["00:02.0", "00:1c.0 -> 10-1f"]   # endpoints and bridges; or include_all = true
//! driver = "builtin"                   # or "client" with region = { base = .., size = .. }
//! [[unit]]
//! name = "dmar1"
//! include_all = true                   # INCLUDE_PCI_ALL: the last unit
//! ```
//!
//! The file is at most [`MAX_PLATFORM_FILE_BYTES`]; unknown keys are refused. Error
//! messages give the file, a line and column and at most the offending key, never a value
//! from the file (a mistyped path may point at a secret).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use dmar_vtd::driver::DriverConfig;
use dmar_vtd::platform::{
    AtsRootPorts, DEFAULT_REGISTER_BASE, PlatformError, PlatformSpec, Region, ReservedMemory, Satc, ScopeEntry,
    UnitDriver, UnitScope, UnitSpec,
};
use dmar_vtd::unit::{CacheGeometry, UnitConfig};
use dmar_vtd::{Hpa, SourceId};
use serde::Deserialize;
use toml::Spanned;

/// The largest platform file [`load`] reads: a platform of 64 units with full scopes is a
/// few kilobytes; the bound keeps a wrong path (a device, a log) out of memory.
pub const MAX_PLATFORM_FILE_BYTES: u64 = 64 << 10;

/// The longest device-TLB invalidation time-out a unit may be given.
pub const MAX_DEVICE_TLB_TIMEOUT_MS: u64 = 60_000;

pub use dmar_process::Location;

fn at(location: &Option<Location>) -> String {
    location.map(|l| format!(":{}:{}", l.line, l.column)).unwrap_or_default()
}

/// Why a platform file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PlatformFileError {
    /// The file could not be opened or read.
    #[error("cannot read platform file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_PLATFORM_FILE_BYTES`].
    #[error("platform file {} is larger than {limit} bytes", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The file is not UTF-8, so not TOML.
    #[error("platform file {} is not utf-8 text", .path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// Not TOML, an unknown or mistyped key, or a value this format does not accept.
    #[error("{origin}{}: {message}", at(.location))]
    Invalid {
        /// The file's path, or `platform` for text given directly.
        origin: String,
        /// Where, when known.
        location: Option<Location>,
        /// What is wrong, naming at most the key.
        message: String,
    },
    /// The description breaks a platform rule; units are named by index only.
    #[error("{origin}{}: {error}", at(.location))]
    Rule {
        /// The file's path, or `platform`.
        origin: String,
        /// The table the rule is about, when it is about one.
        location: Option<Location>,
        /// The rule, with unit names redacted.
        #[source]
        error: Box<PlatformError>,
    },
}

/// Reads and parses the platform file at `path`, at most [`MAX_PLATFORM_FILE_BYTES`] long
/// (a larger file is refused from its size before it is read), and validates it.
pub fn load(path: &Path) -> Result<PlatformSpec, PlatformFileError> {
    let read_err = |source| PlatformFileError::Read { path: path.to_owned(), source };
    let too_large = || PlatformFileError::TooLarge { path: path.to_owned(), limit: MAX_PLATFORM_FILE_BYTES };
    let file = std::fs::File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.len() > MAX_PLATFORM_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    // The size can change, and pipes have none: read one byte past the limit at most.
    file.take(MAX_PLATFORM_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_PLATFORM_FILE_BYTES {
        return Err(too_large());
    }
    let text = String::from_utf8(bytes).map_err(|_| PlatformFileError::NotUtf8 { path: path.to_owned() })?;
    parse_named(&text, &path.display().to_string())
}

/// Parses and validates platform text; errors name it `platform`.
pub fn parse(text: &str) -> Result<PlatformSpec, PlatformFileError> {
    parse_named(text, "platform")
}

fn parse_named(text: &str, origin: &str) -> Result<PlatformSpec, PlatformFileError> {
    let invalid = |offset: Option<usize>, message: String| PlatformFileError::Invalid {
        origin: origin.to_owned(),
        location: offset.map(|o| Location::of(text, o)),
        message,
    };
    if text.len() as u64 > MAX_PLATFORM_FILE_BYTES {
        return Err(invalid(None, format!("the text is larger than {MAX_PLATFORM_FILE_BYTES} bytes")));
    }
    let file: File = toml::from_str(text).map_err(|e| invalid(e.span().map(|s| s.start), scrub(e.message())))?;
    let spans = Spans {
        memory: file.memory.span().start,
        builtin: file.builtin_region.as_ref().map(|r| r.span().start),
        units: file.unit.iter().map(|u| u.span().start).collect(),
        reserved: file.reserved.iter().map(|r| r.span().start).collect(),
        satc: file.satc.iter().map(|s| s.span().start).collect(),
    };
    let spec = file.into_spec().map_err(|(offset, message)| invalid(Some(offset), message))?;
    spec.validate().map_err(|error| PlatformFileError::Rule {
        origin: origin.to_owned(),
        location: spans.of(&error).map(|o| Location::of(text, o)),
        error: Box::new(error.redact_names()),
    })?;
    Ok(spec)
}

/// Where each table starts, to point a rule's error at it.
struct Spans {
    memory: usize,
    builtin: Option<usize>,
    units: Vec<usize>,
    reserved: Vec<usize>,
    satc: Vec<usize>,
}

impl Spans {
    fn of(&self, error: &PlatformError) -> Option<usize> {
        use dmar_vtd::platform::RegionOwner;
        if let Some(i) = error.unit_index() {
            return self.units.get(i).copied();
        }
        match error {
            PlatformError::MemorySize { .. } => Some(self.memory),
            PlatformError::BuiltinRegionTooSmall { .. } => self.builtin.or(Some(self.memory)),
            PlatformError::RegionMisaligned { owner }
            | PlatformError::RegionEmpty { owner }
            | PlatformError::RegionOutsideMemory { owner, .. }
            | PlatformError::RegionsOverlap { owner, .. } => match owner {
                RegionOwner::BuiltIn => self.builtin,
                RegionOwner::Reserved(i) => self.reserved.get(*i).copied(),
                _ => None,
            },
            PlatformError::ReservedWithoutDevices { index } | PlatformError::ReservedDeviceUncovered { index, .. } => {
                self.reserved.get(*index).copied()
            }
            PlatformError::SatcDeviceUncovered { index, .. } => self.satc.get(*index).copied(),
            _ => None,
        }
    }
}

/// serde's messages quote the offending value (`invalid type: string "x", expected u64`);
/// keep only what was expected. Keys (`unknown field `x``) stay: they are what to fix.
fn scrub(message: &str) -> String {
    for prefix in ["invalid type", "invalid value", "invalid length", "unknown variant"] {
        if message.starts_with(prefix) {
            return match message.rsplit_once(", expected ") {
                Some((_, expected)) => format!("{prefix}, expected {expected}"),
                None => prefix.to_owned(),
            };
        }
    }
    message.to_owned()
}

/// A byte count or address: an integer, or text (`"0x..."`, `"4096"`, `"4GiB"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Num {
    Int(u64),
    Text(String),
}

/// Error while converting the file into a spec: byte offset and message.
type Conv<T> = Result<T, (usize, String)>;

fn num(v: &Spanned<Num>, key: &str) -> Conv<u64> {
    let fail = || (v.span().start, format!("`{key}`: expected a byte count: an integer, \"0x..\" or like \"4GiB\""));
    match v.get_ref() {
        Num::Int(n) => Ok(*n),
        Num::Text(s) => parse_size(s).ok_or_else(fail),
    }
}

/// `"0x1000"`, `"4096"`, `"4K"`/`"4KiB"`, M, G, T (binary multiples); `_` separators allowed.
fn parse_size(s: &str) -> Option<u64> {
    let s: String = s.trim().chars().filter(|&c| c != '_').collect();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    let shift = match suffix.trim_start() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return None,
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

fn sid(v: &Spanned<String>, key: &str) -> Conv<SourceId> {
    SourceId::from_str(v.get_ref().trim())
        .map_err(|_| (v.span().start, format!("`{key}`: expected a requester id bus:dev.fn in hex, like 00:1f.3")))
}

fn sids(list: &[Spanned<String>], key: &str) -> Conv<Vec<SourceId>> {
    list.iter().map(|v| sid(v, key)).collect()
}

/// `"bb:dd.f"`, or `"bb:dd.f -> ss-uu"` / `"bb:dd.f -> ss"` for a bridge and its buses.
fn scope_entry(v: &Spanned<String>) -> Conv<ScopeEntry> {
    let fail =
        || (v.span().start, "`scope`: expected \"bb:dd.f\" or \"bb:dd.f -> secondary-subordinate\" in hex".to_owned());
    let Some((bridge, buses)) = v.get_ref().split_once("->") else {
        return sid(v, "scope").map(ScopeEntry::Endpoint);
    };
    let bridge = SourceId::from_str(bridge.trim()).map_err(|_| fail())?;
    let (lo, hi) = buses.trim().split_once('-').unwrap_or((buses.trim(), buses.trim()));
    let bus = |s: &str| u8::from_str_radix(s.trim(), 16).map_err(|_| fail());
    Ok(ScopeEntry::Bridge { bridge, buses: bus(lo)?..=bus(hi)? })
}

fn geometry(v: &Option<Spanned<String>>, key: &str) -> Conv<Option<CacheGeometry>> {
    let Some(v) = v else { return Ok(None) };
    let fail = || (v.span().start, format!("`{key}`: expected SETSxWAYS, like 256x8"));
    let (sets, ways) = v.get_ref().split_once(['x', 'X']).ok_or_else(fail)?;
    let g = CacheGeometry::new(sets.trim().parse().map_err(|_| fail())?, ways.trim().parse().map_err(|_| fail())?);
    g.validate().map_err(|_| {
        (v.span().start, format!("`{key}`: sets must be a power of two, ways 1 to 64, at most 2^24 entries"))
    })?;
    Ok(Some(g))
}

/// The file's top level.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    memory: Spanned<Num>,
    builtin_region: Option<Spanned<FileRegion>>,
    #[serde(default)]
    unit: Vec<Spanned<FileUnit>>,
    #[serde(default)]
    reserved: Vec<Spanned<FileReserved>>,
    ats_root_ports: Option<FileAts>,
    #[serde(default)]
    satc: Vec<Spanned<FileSatc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegion {
    base: Spanned<Num>,
    size: Spanned<Num>,
}

impl FileRegion {
    fn region(&self) -> Conv<Region> {
        Ok(Region { base: Hpa(num(&self.base, "base")?), size: num(&self.size, "size")? })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUnit {
    name: Option<Spanned<String>>,
    register_base: Option<Spanned<Num>>,
    #[serde(default)]
    scope: Vec<Spanned<String>>,
    #[serde(default)]
    include_all: bool,
    driver: Option<Spanned<String>>,
    region: Option<Spanned<FileRegion>>,
    iotlb: Option<Spanned<String>>,
    context_cache: Option<Spanned<String>>,
    paging_cache: Option<Spanned<String>>,
    stale_detection: Option<bool>,
    device_tlb_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReserved {
    base: Spanned<Num>,
    size: Spanned<Num>,
    devices: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAts {
    all: Option<bool>,
    #[serde(default)]
    ports: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSatc {
    #[serde(default)]
    atc_required: bool,
    devices: Vec<Spanned<String>>,
}

impl File {
    fn into_spec(self) -> Conv<PlatformSpec> {
        let memory_size = num(&self.memory, "memory")?;
        let units =
            self.unit.iter().enumerate().map(|(i, u)| u.get_ref().unit(i, u.span().start)).collect::<Conv<Vec<_>>>()?;
        let builtin_region = match &self.builtin_region {
            Some(r) => r.get_ref().region()?,
            None if units.iter().any(|u| u.driver == UnitDriver::BuiltIn) => {
                let (base, size) = DriverConfig::for_memory(memory_size).table_region;
                Region { base, size }
            }
            None => Region { base: Hpa(0), size: 0 },
        };
        let reserved = self
            .reserved
            .iter()
            .map(|r| {
                let r = r.get_ref();
                let region = Region { base: Hpa(num(&r.base, "base")?), size: num(&r.size, "size")? };
                Ok(ReservedMemory { region, devices: sids(&r.devices, "devices")? })
            })
            .collect::<Conv<Vec<_>>>()?;
        let ats_root_ports = match self.ats_root_ports {
            None => Some(AtsRootPorts::All),
            Some(FileAts { all: Some(true), ports }) if ports.is_empty() => Some(AtsRootPorts::All),
            Some(FileAts { all: Some(true), ports }) => {
                let at = ports.first().map_or(0, |p| p.span().start);
                return Err((at, "`ats_root_ports`: `all = true` and `ports` exclude each other".to_owned()));
            }
            Some(FileAts { ports, .. }) if ports.is_empty() => None,
            Some(FileAts { ports, .. }) => Some(AtsRootPorts::Ports(sids(&ports, "ports")?)),
        };
        let satc = self
            .satc
            .iter()
            .map(|s| {
                let s = s.get_ref();
                Ok(Satc { atc_required: s.atc_required, devices: sids(&s.devices, "devices")? })
            })
            .collect::<Conv<Vec<_>>>()?;
        Ok(PlatformSpec { segment: 0, memory_size, units, builtin_region, reserved, ats_root_ports, satc })
    }
}

impl FileUnit {
    fn unit(&self, index: usize, at: usize) -> Conv<UnitSpec> {
        let name = self.name.as_ref().map_or_else(|| format!("dmar{index}"), |n| n.get_ref().clone());
        let register_base = match &self.register_base {
            Some(b) => num(b, "register_base")?,
            None => DEFAULT_REGISTER_BASE + 0x1000 * index as u64,
        };
        let scope = match (self.include_all, self.scope.is_empty()) {
            (true, true) => UnitScope::All,
            (true, false) => return Err((at, "`scope` and `include_all = true` exclude each other".to_owned())),
            (false, _) => UnitScope::Devices(self.scope.iter().map(scope_entry).collect::<Conv<_>>()?),
        };
        let driver = match (self.driver.as_ref().map(|d| (d.get_ref().as_str(), d.span().start)), &self.region) {
            (None | Some(("builtin", _)), None) => UnitDriver::BuiltIn,
            (None | Some(("builtin", _)), Some(r)) => {
                return Err((r.span().start, "`region` is only for `driver = \"client\"`".to_owned()));
            }
            (Some(("client", _)), Some(r)) => UnitDriver::Client { region: r.get_ref().region()? },
            (Some(("client", at)), None) => {
                return Err((at, "`driver = \"client\"` needs `region = { base = .., size = .. }`".to_owned()));
            }
            (Some((_, at)), _) => return Err((at, "`driver`: expected \"builtin\" or \"client\"".to_owned())),
        };
        let mut config = UnitConfig::default();
        let bad = |_| (at, "cache geometry".to_owned());
        if let Some(g) = geometry(&self.iotlb, "iotlb")? {
            config = config.with_iotlb(g).map_err(bad)?;
        }
        if let Some(g) = geometry(&self.context_cache, "context_cache")? {
            config = config.with_context_cache(g).map_err(bad)?;
        }
        if let Some(g) = geometry(&self.paging_cache, "paging_cache")? {
            config = config.with_paging_cache(g).map_err(bad)?;
        }
        if let Some(on) = self.stale_detection {
            config = config.with_stale_detection(on);
        }
        if let Some(ms) = &self.device_tlb_timeout_ms {
            if !(1..=MAX_DEVICE_TLB_TIMEOUT_MS).contains(ms.get_ref()) {
                let message = format!("`device_tlb_timeout_ms`: expected 1 to {MAX_DEVICE_TLB_TIMEOUT_MS}");
                return Err((ms.span().start, message));
            }
            config = config.with_device_tlb_timeout(Duration::from_millis(*ms.get_ref()));
        }
        Ok(UnitSpec { name, register_base, scope, config, driver })
    }
}

#[cfg(test)]
mod tests;
