//! Static checks of the provisioned Grafana dashboards in `deploy/grafana/dashboards/`:
//! the JSON parses, the structure is what Grafana's file provisioning loads (unique uids
//! and panel ids, grid positions, targets with expressions), every panel queries the
//! datasource that `deploy/grafana/provisioning/datasources/` provisions, and every metric
//! a PromQL expression names is one the server or the agent exports
//! (`dmar_server::service::metrics::METRIC_NAMES`, `dmar_agent::metrics::METRIC_NAMES`).
//!
//! CI cannot run Grafana (no registry reaches its image), so this is what keeps the
//! dashboards honest; `tests/deploy/smoke.sh` then checks the same names on live
//! `/metrics` endpoints and evaluates every expression in a live Prometheus.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Histogram series suffixes that PromQL may name instead of the histogram itself.
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

/// Panel types the dashboards may use (all ship with Grafana).
const PANEL_TYPES: &[&str] = &["timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text"];

/// What the dashboards must show, whatever else they add (issue 8's list).
const REQUIRED: &[&str] = &[
    // server: translations by result, cache hit ratios, walk latency
    "dmar_unit_translations_total",
    "dmar_unit_cache_lookups_total",
    "dmar_unit_walk_duration_seconds",
    // invalidation queue and wait latency, device-TLB invalidation time-outs
    "dmar_unit_invalidation_descriptors_total",
    "dmar_unit_device_tlb_invalidation_duration_seconds",
    "dmar_unit_device_tlb_timeouts_total",
    // faults by reason, links
    "dmar_unit_faults_total",
    "dmar_link_connections",
    // agents: ATC hit ratio, miss latency, invalidations handled
    "dmar_agent_atc_lookups_total",
    "dmar_agent_translation_duration_seconds",
    "dmar_agent_invalidations_total",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The dashboard files, sorted, parsed.
fn dashboards() -> Vec<(String, Value)> {
    let dir = deploy_dir().join("grafana").join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().expect("file name").to_string_lossy().into_owned();
            let v: Value = serde_json::from_str(&read(&p)).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
            (name, v)
        })
        .collect()
}

/// The `uid:` of the one provisioned datasource (a flat YAML file: a line scan suffices).
fn provisioned_datasource_uid() -> String {
    let path = deploy_dir().join("grafana").join("provisioning").join("datasources").join("prometheus.yml");
    let text = read(&path);
    let uids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("uid:"))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_owned())
        .collect();
    assert_eq!(uids.len(), 1, "{}: expected one datasource uid, found {uids:?}", path.display());
    assert!(text.contains("type: prometheus"), "{}: not a prometheus datasource", path.display());
    uids[0].clone()
}

/// Every `dmar_*` identifier in a PromQL expression, outside string literals. Label names
/// and functions never start with `dmar_`, and `$__rate_interval` / `$instance` are
/// variables, not metric names.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // Skip the string literal, honouring backslash escapes.
                let mut escaped = false;
                for (_, d) in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            '$' => {
                while chars.peek().is_some_and(|&(_, d)| d.is_ascii_alphanumeric() || d == '_') {
                    chars.next();
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[i..end];
                if word.starts_with("dmar_") {
                    names.push(word.to_owned());
                }
            }
            _ => {}
        }
    }
    names
}

/// Brackets balance outside string literals (a cheap guard against a mangled edit).
fn brackets_balance(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && quote.is_none()
}

/// The exported metric a series name belongs to, if any.
fn resolve<'a>(name: &str, known: &BTreeSet<&'a str>) -> Option<&'a str> {
    if let Some(k) = known.get(name) {
        return Some(k);
    }
    HISTOGRAM_SUFFIXES.iter().find_map(|s| name.strip_suffix(s).and_then(|base| known.get(base).copied()))
}

fn known_metrics() -> BTreeSet<&'static str> {
    dmar_server::service::metrics::METRIC_NAMES.iter().chain(dmar_agent::metrics::METRIC_NAMES).copied().collect()
}

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
        for p in panels {
            out.push(p);
            if let Some(inner) = p.get("panels").and_then(Value::as_array) {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dashboard["panels"].as_array().map(Vec::as_slice).unwrap_or_default(), &mut out);
    out
}

/// PromQL of every target and template query of a dashboard, with where it came from.
fn expressions(name: &str, dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        for t in p.get("targets").and_then(Value::as_array).into_iter().flatten() {
            if let Some(expr) = t.get("expr").and_then(Value::as_str) {
                out.push((format!("{name}: panel {:?}", p["title"].as_str().unwrap_or("?")), expr.to_owned()));
            }
        }
    }
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = match &v["query"] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("query").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        if let Some(q) = query {
            out.push((format!("{name}: variable {:?}", v["name"].as_str().unwrap_or("?")), q));
        }
    }
    out
}

fn check_datasource(where_: &str, ds: &Value, uid: &str, errors: &mut Vec<String>) {
    if ds["type"].as_str() != Some("prometheus") || ds["uid"].as_str() != Some(uid) {
        errors.push(format!("{where_}: datasource {ds} is not the provisioned prometheus datasource {uid:?}"));
    }
}

#[test]
fn dashboards_are_well_formed_and_use_the_provisioned_datasource() {
    let uid = provisioned_datasource_uid();
    let mut errors = Vec::new();
    let mut uids = HashSet::new();
    for (name, d) in dashboards() {
        let duid = d["uid"].as_str().unwrap_or_default();
        if duid.is_empty() || !uids.insert(duid.to_owned()) {
            errors.push(format!("{name}: uid {duid:?} is empty or used twice"));
        }
        if d["title"].as_str().unwrap_or_default().is_empty() {
            errors.push(format!("{name}: no title"));
        }
        if !d["schemaVersion"].is_u64() {
            errors.push(format!("{name}: no schemaVersion"));
        }
        let panels = all_panels(&d);
        if panels.iter().all(|p| p["type"] == "row") {
            errors.push(format!("{name}: no panels"));
        }
        let mut ids = HashSet::new();
        for p in &panels {
            let title = p["title"].as_str().unwrap_or_default();
            let at = format!("{name}: panel {title:?}");
            match p["id"].as_u64() {
                Some(id) if ids.insert(id) => {}
                id => errors.push(format!("{at}: id {id:?} missing or used twice")),
            }
            if title.is_empty() {
                errors.push(format!("{name}: a panel has no title"));
            }
            let g = &p["gridPos"];
            match (g["x"].as_u64(), g["y"].as_u64(), g["w"].as_u64(), g["h"].as_u64()) {
                (Some(x), Some(_), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24 => {}
                _ => errors.push(format!("{at}: bad gridPos {g}")),
            }
            let kind = p["type"].as_str().unwrap_or_default();
            if kind == "row" {
                continue;
            }
            if !PANEL_TYPES.contains(&kind) {
                errors.push(format!("{at}: unknown panel type {kind:?}"));
            }
            if kind == "text" {
                continue;
            }
            check_datasource(&at, &p["datasource"], &uid, &mut errors);
            let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
            if targets.is_empty() {
                errors.push(format!("{at}: no targets"));
            }
            let mut ref_ids = HashSet::new();
            for t in targets {
                let ref_id = t["refId"].as_str().unwrap_or_default();
                if ref_id.is_empty() || !ref_ids.insert(ref_id) {
                    errors.push(format!("{at}: refId {ref_id:?} empty or used twice"));
                }
                if t["expr"].as_str().unwrap_or_default().trim().is_empty() {
                    errors.push(format!("{at}: target {ref_id} has no expr"));
                }
                if !t["datasource"].is_null() {
                    check_datasource(&at, &t["datasource"], &uid, &mut errors);
                }
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] == "query" {
                check_datasource(&format!("{name}: variable {}", v["name"]), &v["datasource"], &uid, &mut errors);
            }
        }
    }
    assert!(errors.is_empty(), "dashboard problems:\n{}", errors.join("\n"));
}

#[test]
fn dashboards_reference_only_exported_metrics() {
    let known = known_metrics();
    let mut used: BTreeMap<&str, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, d) in dashboards() {
        for (at, expr) in expressions(&name, &d) {
            if !brackets_balance(&expr) {
                errors.push(format!("{at}: unbalanced brackets in {expr:?}"));
            }
            let names = metric_names(&expr);
            if names.is_empty() {
                errors.push(format!("{at}: no dmar metric in {expr:?}"));
            }
            for n in names {
                match resolve(&n, &known) {
                    Some(m) => *used.entry(m).or_default() += 1,
                    None => errors.push(format!("{at}: {n} is not an exported metric")),
                }
            }
        }
    }
    for m in REQUIRED {
        assert!(known.contains(m), "required metric {m} is no longer exported; update REQUIRED and the dashboards");
        if !used.contains_key(m) {
            errors.push(format!("no dashboard shows {m}"));
        }
    }
    assert!(errors.is_empty(), "dashboard metric problems:\n{}", errors.join("\n"));
}

#[test]
fn provisioning_paths_agree_with_compose() {
    let provider = read(&deploy_dir().join("grafana").join("provisioning").join("dashboards").join("dmar.yml"));
    assert!(provider.contains("path: /var/lib/grafana/dashboards"), "dashboard provider path changed");
    let compose = read(&deploy_dir().join("docker-compose.yml"));
    for mount in
        ["./grafana/dashboards:/var/lib/grafana/dashboards", "./grafana/provisioning:/etc/grafana/provisioning"]
    {
        assert!(compose.contains(mount), "docker-compose.yml no longer mounts {mount}");
    }
}

#[test]
fn metric_name_extraction() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(dmar_unit_walk_duration_seconds_bucket{instance=~"$instance", x="dmar_not_a_metric"}[$__rate_interval]))) / dmar_link_connections"#;
    assert_eq!(metric_names(expr), ["dmar_unit_walk_duration_seconds_bucket", "dmar_link_connections"]);
    assert_eq!(metric_names("label_values(dmar_agent_functions, instance)"), ["dmar_agent_functions"]);
    let known = known_metrics();
    assert_eq!(resolve("dmar_unit_walk_duration_seconds_count", &known), Some("dmar_unit_walk_duration_seconds"));
    assert_eq!(resolve("dmar_unit_walks_total", &known), Some("dmar_unit_walks_total"));
    assert_eq!(resolve("dmar_unit_nonexistent_total", &known), None);
    assert!(brackets_balance(expr));
    assert!(!brackets_balance("sum(rate(x[1m])"));
}
