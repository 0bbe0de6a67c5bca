//! Every metric the server exports, with its type, labels, unit and description: the one
//! list the descriptions, the buckets, the tests and `docs/METRICS.md` come from.

use metrics::Unit;

/// Histogram buckets for page walks (seconds): 25 ns to 100 µs.
const WALK_BUCKETS: &[f64] = &[25e-9, 50e-9, 100e-9, 200e-9, 400e-9, 800e-9, 1.6e-6, 3.2e-6, 10e-6, 100e-6];
/// Histogram buckets for device-TLB invalidations (seconds): 10 µs to 10 s.
const DEVTLB_BUCKETS: &[f64] = &[10e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 50e-3, 250e-3, 1.0, 10.0];
/// Histogram buckets for link message handling (seconds).
const LINK_BUCKETS: &[f64] = &[1e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 10e-3];

use dmar_process::metric_doc::label;
pub use dmar_process::metric_doc::{Kind, LabelDoc, MetricDoc};

/// Every metric the server exports, in the order of `docs/METRICS.md`. Names and label
/// values are an interface: dashboards, `deploy/prometheus/rules.yml` and tests use them.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "dmar_unit_translations_total",
        kind: Kind::Counter,
        labels: &[
            label("kind", &["untranslated", "ats", "translated"]),
            label("result", &["ok", "blocked", "no_access", "error"]),
        ],
        unit: None,
        help: "Requests answered by the unit, by kind and result",
        notes: "`ats`/`no_access` is a successful completion with R=W=0. Summed over the platform's units.",
    },
    MetricDoc {
        name: "dmar_unit_cache_lookups_total",
        kind: Kind::Counter,
        labels: &[label("cache", &["iotlb", "context", "paging"]), label("result", &["hit", "miss"])],
        unit: None,
        help: "Lookups in the unit's caches, by cache and result",
        notes: "Hit ratio = hit / (hit + miss).",
    },
    MetricDoc {
        name: "dmar_unit_walks_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Page walks (IOTLB misses)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_walk_loads_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Page-table entries read by walks",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_walk_duration_seconds",
        kind: Kind::Histogram(WALK_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Duration of sampled page walks (one in 64 per thread)",
        notes: "Buckets from 25 ns to 100 µs.",
    },
    MetricDoc {
        name: "dmar_unit_stale_uses_total",
        kind: Kind::Counter,
        labels: &[label("cache", &["iotlb", "context"])],
        unit: None,
        help: "Cache hits served although the source entry had changed",
        notes: "Software changed the entry in memory without invalidating the cache.",
    },
    MetricDoc {
        name: "dmar_unit_faults_total",
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &[
                "root_entry_not_present",
                "context_entry_not_present",
                "context_entry_invalid",
                "address_beyond_width",
                "no_write",
                "no_read",
                "paging_entry_access",
                "root_table_invalid",
                "context_table_invalid",
                "root_entry_reserved",
                "context_entry_reserved",
                "paging_entry_reserved",
                "translation_type_blocked",
                "interrupt_address",
                "ir_request_reserved",
                "ir_index_overflow",
                "ir_entry_not_present",
                "ir_table_access",
                "ir_entry_reserved",
                "ir_compat_blocked",
                "ir_source_id",
            ],
        )],
        unit: None,
        help: "Faults recorded, by reason",
        notes: "Recorded in the fault recording registers; the `reason` is the VT-d fault reason's name \
                (`FaultReason` in dmar-vtd). Each reaches `WatchFaults` once the driver services the registers.",
    },
    MetricDoc {
        name: "dmar_unit_faults_dropped_total",
        kind: Kind::Counter,
        labels: &[label("cause", &["fpd", "overflow"])],
        unit: None,
        help: "Faults not recorded, by cause (fpd, overflow)",
        notes: "Suppressed by a context entry's fault processing disable (`fpd`), or lost because all 8 fault \
                recording registers still held faults the driver had not yet serviced (`overflow`, FSTS.PFO: \
                faults arriving faster than the server's fault pump). Recorded plus `overflow` is every \
                recordable fault.",
    },
    MetricDoc {
        name: "dmar_unit_protected_memory_blocked_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "DMA blocked by a protected memory region (PMEN.EPM), recorded as no fault",
        notes: "VT-d 10.4.16: untranslated while translation is off, pass-through, or translated requests into a \
                region. Client-driven units start with the regions over all memory (docs/PLATFORM.md), so \
                devices behind them show up here until the owner enables translation. Summed over the \
                platform's units.",
    },
    MetricDoc {
        name: "dmar_unit_invalidation_descriptors_total",
        kind: Kind::Counter,
        labels: &[label("type", &["context", "iotlb", "device_tlb", "iec", "wait", "page_response"])],
        unit: None,
        help: "Invalidation descriptors processed, by type",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_invalidation_queue_errors_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Invalidation queue errors (IQE)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_device_tlb_invalidation_duration_seconds",
        kind: Kind::Histogram(DEVTLB_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Round trip of device-TLB invalidations to their function",
        notes: "Buckets from 10 µs to 10 s.",
    },
    MetricDoc {
        name: "dmar_unit_device_tlb_timeouts_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Device-TLB invalidations abandoned by a time-out (ITE)",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_translated_check_refusals_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Translated requests refused by translated-request checking (outside what the unit completed for the \
               function)",
        notes: "Only functions attached with `check_translated` (docs/SECURITY.md): outside every range the unit \
                completed for the function, or without the permission. Each is also a recorded fault \
                (`no_read`/`no_write`) and a blocked translated request.",
    },
    MetricDoc {
        name: "dmar_unit_translated_check_grants_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Translation completions recorded as grants for translated-request checking",
        notes: "",
    },
    MetricDoc {
        name: "dmar_unit_translated_check_evictions_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Grants evicted because a function reached its bound (translated-request checking)",
        notes: "The bound is 4096 grants per function.",
    },
    MetricDoc {
        name: "dmar_link_connections",
        kind: Kind::Gauge,
        labels: &[],
        unit: None,
        help: "Live ATS links",
        notes: "",
    },
    MetricDoc {
        name: "dmar_link_bound_functions",
        kind: Kind::Gauge,
        labels: &[],
        unit: None,
        help: "Functions bound on live ATS links",
        notes: "",
    },
    MetricDoc {
        name: "dmar_link_messages_total",
        kind: Kind::Counter,
        labels: &[label("kind", &["translation", "dma", "invalidation", "msi", "page_request"])],
        unit: None,
        help: "ATS link items, by kind",
        notes: "Items received over ATS links (several to a message).",
    },
    MetricDoc {
        name: "dmar_link_batch_duration_seconds",
        kind: Kind::Histogram(LINK_BUCKETS),
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "Time to handle one inbound link message",
        notes: "Buckets from 1 µs to 10 ms.",
    },
    MetricDoc {
        name: "dmar_link_reply_budget_waits_total",
        kind: Kind::Counter,
        labels: &[],
        unit: None,
        help: "Times a link stopped reading until the agent took the replies it owed (reply byte budget full)",
        notes: "The budget is 16 MiB of replies not yet taken by the transport: an agent that does not read.",
    },
    MetricDoc {
        name: "dmar_prq_page_requests_total",
        kind: Kind::Counter,
        labels: &[label("result", &["queued", "overflow"])],
        unit: None,
        help: "Page requests, by result (queued, overflow)",
        notes: "From functions, over their links.",
    },
    MetricDoc {
        name: "dmar_interrupt_remapped_total",
        kind: Kind::Counter,
        labels: &[label("result", &["remapped", "blocked"])],
        unit: None,
        help: "MSI writes, by result",
        notes: "From functions, over their links.",
    },
    MetricDoc {
        name: "dmar_server_cpu_used_seconds",
        kind: Kind::Gauge,
        labels: &[],
        unit: Some(Unit::Seconds),
        help: "CPU time used by the server process",
        notes: "User plus system, read from `/proc/self/stat` at each scrape.",
    },
    MetricDoc {
        name: "dmar_server_refusals_total",
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &[
                "page_request_capacity",
                "page_group_not_outstanding",
                "invalid_descriptor",
                "link_protocol",
                "unit_ownership",
            ],
        )],
        unit: None,
        help: "Peer requests refused with a status or a PCIe failure response, by reason",
        notes: "`page_request_capacity`: a page request past its function's bound capacity (a last request is \
                answered with Response Failure, others dropped). `page_group_not_outstanding`: \
                `RespondPageRequest` for a group with no request outstanding (FAILED_PRECONDITION). \
                `invalid_descriptor`: a raw invalidation descriptor refused by the driver or the unit \
                (INVALID_ARGUMENT). `link_protocol`: a link closed for breaking the protocol. `unit_ownership`: a \
                call on a unit or memory region its caller does not own (docs/SECURITY.md, \"Client-driven \
                units\"): a claim of a held or built-in unit, a register or region write without the unit's lease \
                (PERMISSION_DENIED), a write into the built-in driver's region, a map into a client-driven unit's \
                region, a built-in-only call aimed at a client-driven unit.",
    },
    MetricDoc {
        name: "dmar_server_auth_refusals_total",
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &[
                "no_certificate",
                "unknown_identity",
                "wrong_role",
                "requester_id_range",
                "requester_id_owned",
                "domain_owner",
            ],
        )],
        unit: None,
        help: "Calls refused by authentication or authorisation, by reason",
        notes: "docs/SECURITY.md: no client certificate (UNAUTHENTICATED), an identity the policy does not name, a \
                role the method does not allow, a bind outside the device's requester-id ranges or of an id \
                another identity owns, a domain destroyed by an operator who did not create it \
                (PERMISSION_DENIED). Logged at most once a second per reason.",
    },
    MetricDoc {
        name: "dmar_server_quota_refusals_total",
        kind: Kind::Counter,
        labels: &[label("quota", &["max_links", "max_domains", "max_frames"])],
        unit: None,
        help: "Calls refused because the caller reached a quota, by quota",
        notes: "RESOURCE_EXHAUSTED: a link past `max_links`, a domain past `max_domains`, a map (or a new paging \
                domain) needing more page-table frames than the domain owner's `max_frames` leaves.",
    },
    MetricDoc {
        name: "dmar_server_watch_events_dropped_total",
        kind: Kind::Counter,
        labels: &[label("stream", &["faults", "interrupts", "page_requests", "unit_interrupts"])],
        unit: None,
        help: "Events a watcher lost by falling more than 4096 behind its stream, by stream",
        notes: "The oldest go first; the unit never waits for a watcher.",
    },
    MetricDoc {
        name: dmar_auth::CONNECTION_REFUSALS,
        kind: Kind::Counter,
        labels: &[label(
            "reason",
            &["max_connections", "handshake_failed", "handshake_timeout", "no_first_bytes", "unusable_identity"],
        )],
        unit: None,
        help: "Connections closed before they were served, by reason (max_connections, handshake_failed, \
               handshake_timeout, no_first_bytes, unusable_identity)",
        notes: "Counted by the accept loop (`dmar-auth`) on the gRPC port and the health port: an identity already \
                holding its `max_connections` (unnamed and anonymous peers share one bucket of 16), a failed TLS \
                handshake (a plaintext client, another CA's certificate), a handshake not finished within 10 s, a \
                plaintext peer silent for 10 s, a CA-signed certificate without a usable identity. Logged at warn \
                at most once a second per reason. The same metric on every agent (its control and health ports).",
    },
];

/// Every metric name of [`METRICS`], for dashboards and tests.
pub const METRIC_NAMES: &[&str] = &dmar_process::metric_doc::names::<{ METRICS.len() }>(METRICS);
