//! The platform file's tests: the examples, every key, and every refusal.

use super::*;
use dmar_vtd::UnitId;
use dmar_vtd::platform::Routing;

const SECRET: &str = "hunter2-s3cr3t";

fn err(text: &str) -> String {
    let e = parse(text).expect_err("the text should be refused").to_string();
    assert!(!e.contains(SECRET), "the message repeats the file: {e}");
    e
}

fn example(name: &str) -> PlatformSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/platforms").join(name);
    load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_examples_load_and_split_the_load_generators_ids() {
    for name in ["two-units.toml", "raw-driver.toml"] {
        let spec = example(name);
        let routing = Routing::new(&spec);
        // Load generator agent a uses bus 0x10 + a (loadgen `embedded_sid`).
        assert_eq!(routing.unit_for(SourceId::new(0x10, 3, 0)), Some(UnitId(0)), "{name}");
        assert_eq!(routing.unit_for(SourceId::new(0x11, 0, 0)), Some(UnitId(1)), "{name}");
        assert_eq!(routing.unit_for(SourceId::new(0x12, 0x1f, 0)), Some(UnitId(1)), "{name}");
    }
    let raw = example("raw-driver.toml");
    assert_eq!(raw.units[1].driver, UnitDriver::Client { region: Region { base: Hpa(0xe000_0000), size: 256 << 20 } });
    assert_eq!(raw.builtin_region, Region { base: Hpa(0xf000_0000), size: 256 << 20 });
}

#[test]
fn the_readmes_example_is_a_valid_platform() {
    let readme = include_str!("../../../README.md");
    let start = readme.find("```toml\n").expect("the README shows a platform file") + "```toml\n".len();
    let end = start + readme[start..].find("```").expect("closed");
    let spec = parse(&readme[start..end]).unwrap_or_else(|e| panic!("README example: {e}"));
    assert_eq!(spec.units.len(), 2);
    assert!(matches!(spec.units[1].driver, UnitDriver::Client { .. }));
}

#[test]
fn a_full_file_parses_with_every_key() {
    let spec = parse(
        r#"
memory = 1073741824
builtin_region = { base = "0x3000_0000", size = "256M" }
[[unit]]
name = "north"
register_base = "0xfed80000"
scope = ["00:02.0", "00:1c.0 -> 10-1f", "00:1d.0 -> 20"]
iotlb = "128x4"
context_cache = "32x2"
paging_cache = "64X4"
stale_detection = false
device_tlb_timeout_ms = 250
[[unit]]
include_all = true
driver = "client"
region = { base = 0, size = "16MiB" }
[[reserved]]
base = "0x1000000"
size = "64KiB"
devices = ["00:02.0"]
[ats_root_ports]
ports = ["00:1c.0"]
[[satc]]
atc_required = true
devices = ["00:02.0", "21:00.0"]
"#,
    )
    .unwrap();
    assert_eq!(spec.memory_size, 1 << 30);
    assert_eq!(spec.builtin_region, Region { base: Hpa(0x3000_0000), size: 256 << 20 });
    assert_eq!(spec.units[0].register_base, 0xfed8_0000);
    assert_eq!(
        spec.units[0].scope,
        UnitScope::Devices(vec![
            ScopeEntry::Endpoint(SourceId::new(0, 2, 0)),
            ScopeEntry::Bridge { bridge: SourceId::new(0, 0x1c, 0), buses: 0x10..=0x1f },
            ScopeEntry::Bridge { bridge: SourceId::new(0, 0x1d, 0), buses: 0x20..=0x20 },
        ])
    );
    let config = UnitConfig::default()
        .with_iotlb(CacheGeometry::new(128, 4))
        .and_then(|c| c.with_context_cache(CacheGeometry::new(32, 2)))
        .and_then(|c| c.with_paging_cache(CacheGeometry::new(64, 4)))
        .unwrap()
        .with_stale_detection(false)
        .with_device_tlb_timeout(Duration::from_millis(250));
    assert_eq!(spec.units[0].config, config);
    assert_eq!((spec.units[1].name.as_str(), spec.units[1].register_base), ("dmar1", 0xfed9_1000));
    assert_eq!(spec.units[1].scope, UnitScope::All);
    assert_eq!(spec.reserved[0].region, Region { base: Hpa(16 << 20), size: 64 << 10 });
    assert_eq!(spec.ats_root_ports, Some(AtsRootPorts::Ports(vec![SourceId::new(0, 0x1c, 0)])));
    assert!(spec.satc[0].atc_required);
}

#[test]
fn defaults_match_the_single_unit_platform() {
    let spec = parse("memory = \"4GiB\"\n[[unit]]\ninclude_all = true\n").unwrap();
    assert_eq!(spec, PlatformSpec::single(4 << 30, UnitConfig::default()));
    let no_atsr = parse("memory = \"4GiB\"\n[[unit]]\ninclude_all = true\n[ats_root_ports]\nall = false\n");
    assert_eq!(no_atsr.unwrap().ats_root_ports, None);
}

#[test]
fn syntax_and_schema_errors_name_the_line_and_the_key_only() {
    let e = err(&format!("memory = \"4GiB\"\n[[unit]]\ninclude_all = true\nsecret = \"{SECRET}\"\n"));
    assert!(e.starts_with("platform:4:1: unknown field `secret`"), "{e}");
    let e = err(&format!("memory = \"{SECRET}\"\n"));
    assert!(e.starts_with("platform:1:10: `memory`: expected a byte count"), "{e}");
    let e = err(&format!("memory = \"4G\"\n[[unit]]\nname = [\"{SECRET}\"]\n"));
    assert!(e.starts_with("platform:3:8: invalid type, expected a string"), "{e}");
    let e = err(&format!("memory = \"4G\"\n[[unit]]\nstale_detection = \"{SECRET}\"\n"));
    assert!(e.starts_with("platform:3:19: invalid type, expected a boolean"), "{e}");
    let e = err(&format!("memory = \"4G\"\n[[unit]]\nscope = [\"{SECRET}\"]\n"));
    assert!(e.contains(":3:10: `scope`: expected a requester id"), "{e}");
    let e = err(&format!("memory = \"4G\"\n[[unit]]\nscope = [\"00:1c.0 -> {SECRET}\"]\n"));
    assert!(e.contains(":3:10: `scope`: expected \"bb:dd.f\""), "{e}");
    let e = err(&format!("memory = \"4G\"\n[[unit]]\ninclude_all = true\ndriver = \"{SECRET}\"\n"));
    assert!(e.contains(":4:10: `driver`: expected"), "{e}");
    let e = err(&format!("memory = \"4G\"\n[[unit]]\ninclude_all = true\niotlb = \"{SECRET}\"\n"));
    assert!(e.contains(":4:9: `iotlb`: expected SETSxWAYS"), "{e}");
    assert!(err("memory = \"4G\"\n[[unit]]\ninclude_all = true\niotlb = \"3x8\"\n").contains("power of two"));
    assert!(err("memory = \"4G\"\n[[unit]]\ninclude_all = true\ndevice_tlb_timeout_ms = 0\n").contains(":4:25:"));
    assert!(err(&format!("memory = \"4G\"\n{SECRET} = [\n")).starts_with("platform:2:"));
    assert!(err("[[unit]]\ninclude_all = true\n").contains("missing field `memory`"));
}

#[test]
fn combinations_the_format_refuses() {
    let base = "memory = \"4G\"\n[[unit]]\n";
    assert!(err(&format!("{base}include_all = true\nscope = [\"00:02.0\"]\n")).contains("exclude each other"));
    assert!(err(&format!("{base}include_all = true\ndriver = \"client\"\n")).contains("needs `region"));
    let e = err(&format!("{base}include_all = true\nregion = {{ base = 0, size = 4096 }}\n"));
    assert!(e.contains(":4:10: `region` is only for"), "{e}");
    let e = err(&format!("{base}include_all = true\n[ats_root_ports]\nall = true\nports = [\"00:01.0\"]\n"));
    assert!(e.contains("exclude each other"), "{e}");
}

#[test]
fn platform_rules_point_at_the_unit_without_its_name() {
    let text = format!(
        "memory = \"4G\"\n[[unit]]\nname = \"{SECRET}\"\ninclude_all = true\n[[unit]]\nscope = [\"00:02.0\"]\n"
    );
    let e = parse(&text).unwrap_err();
    assert!(
        matches!(&e, PlatformFileError::Rule { error, .. } if matches!(**error, PlatformError::IncludeAllNotLast { .. }))
    );
    assert_eq!(
        e.to_string(),
        "platform:2:1: unit 0: the INCLUDE_PCI_ALL unit must be the last unit of the segment (VT-d 8.3)"
    );
    let e = err(&format!(
        "memory = \"4G\"\n[[unit]]\nname = \"{SECRET}\"\nscope = [\"00:02.0\"]\n[[unit]]\nname = \"{SECRET}\"\ninclude_all = true\n"
    ));
    assert_eq!(e, "platform:5:1: unit 1: the name is already used by unit 0");
    let e = err("memory = \"4G\"\n[[unit]]\ninclude_all = true\n[[reserved]]\nbase = 0\nsize = 4096\ndevices = []\n");
    assert_eq!(e, "platform:4:1: reserved region 0 lists no device");
    assert!(err("memory = \"3M\"\n[[unit]]\ninclude_all = true\n").starts_with("platform:1:10: memory size"));
}

#[test]
fn files_are_bounded_and_must_be_text() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; MAX_PLATFORM_FILE_BYTES as usize + 1]).unwrap();
    assert!(matches!(load(&big), Err(PlatformFileError::TooLarge { .. })));
    let binary = dir.path().join("bin.toml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    assert!(matches!(load(&binary), Err(PlatformFileError::NotUtf8 { .. })));
    assert!(matches!(load(&dir.path().join("missing.toml")), Err(PlatformFileError::Read { .. })));
    let named = dir.path().join("p.toml");
    std::fs::write(&named, "memory = 1\n").unwrap();
    let e = load(&named).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:", named.display())), "{e}");
}
