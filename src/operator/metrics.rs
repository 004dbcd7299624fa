//! Prometheus metrics, served as OpenMetrics text on `GET /metrics` from their
//! own plain-HTTP listener (`metrics.listen`, loopback by default), which also
//! serves the operator's dashboard (`GET /`).
//!
//! # Series (all prefixed `throughcare_`)
//! | series | type | labels |
//! |---|---|---|
//! | `submits_total` | counter | `event`, `format` (as sent), `outcome` |
//! | `submit_duration_seconds` | histogram | (accepted submits: request in to durable receipt) |
//! | `pulls_total` | counter | `outcome` (calls) |
//! | `pulled_deliveries_total` | counter | `event`, `format` (as rendered) |
//! | `acks_total` | counter | `outcome` |
//! | `nacks_total` | counter | `permanent`, `outcome` |
//! | `barrier_duration_seconds` | histogram | (`flush` + `fdatasync`s of one group commit) |
//! | `barrier_commands`, `barrier_submits` | histogram | (messages per barrier) |
//! | `certificate_expiry_timestamp_seconds` | gauge | `certificate` = `server` or `ca` (its `notAfter`, Unix seconds), or `crl` (its `nextUpdate`) |
//! | `build_info` | gauge (1) | `version`, `commit` |
//! | `grpc_server_handled_total` | counter | `grpc_service`, `grpc_method`, `grpc_code` (every call on the mutual-TLS listener) |
//! | `grpc_server_handling_seconds` | histogram | `grpc_service`, `grpc_method` (request in to the call's last frame) |
//! | `claim_failures_total` | counter | (claims by a practice that matched nothing) |
//! | `claim_lockouts_total` | counter | `scope` = `practice_and_patient`, `practice` or `patient` (a failed-claim counter reached its limit) |
//! | `claims_refused_locked_total` | counter | `scope` (claims refused because a counter is at its limit) |
//! | `pds_lookups_total` | counter | `outcome` = `routed`, `not_connected`, `no_practice`, `not_found`, `dob_mismatch`, `superseded`, `deceased`, `restricted`, `no_nhs_number` or `failed` |
//! | `pds_breaker_open` | gauge | (1 while the PDS circuit breaker is open) |
//! | `mllp_acks_total` | counter | `ack` = `AA`, `AE` or `AR` (HL7 ACKs written on the MLLP listener) |
//! | `mllp_refusals_total` | counter | `reason` = `connection_limit`, `identity_connection_limit`, `message_too_large`, `malformed_frame` or `idle_timeout` |
//! | `mllp_connections` | gauge | (open MLLP connections) |
//! | `mesh_messages_total` | counter | `direction` = `out` (`outcome` = `sent`, `acknowledged`, `failed`, `error`) or `in` (`submitted`, `refused`, `report`, `acknowledged`, `error`) |
//! | `mesh_reachable` | gauge | (1 while the last exchange with MESH succeeded) |
//! | `mailbox_depth`, `_leased`, `_oldest_age_seconds`, `_overdue`, `_quarantined`, `_parked` | gauge | `mailbox` |
//! | `continuity_releases` | gauge | `prison` (releases of the last 28 days; absent when suppressed) |
//! | `continuity_ratio` | gauge | `prison`, `indicator` = `gp_within_deadline`, `parked_over_three_days`, `parked_over_seven_days`, `ost_before_next_dose` or `mental_health_within_72h` (0 to 1; absent when suppressed or nothing measured) |
//! | `continuity_median_to_gp_seconds` | gauge | `prison` (absent under 5 values) |
//! | `retention_payloads_held`, `_payloads_in_grace`, `_payloads_shredded`, `_metadata_expiring`, `_metadata_removed`, `_tombstones`, `_key_epochs`, `_audit_entries_held`, `_audit_entries_removed`, `_identity_records_held`, `_identity_records_removed` | gauge | (set after each retention pass) |
//!
//! Label values are fixed words (`&'static str`) or [`OdsCode`]s: nothing a
//! caller sends can become a label, so neither can patient data (a gRPC path
//! the gateway does not serve is counted as `unknown`). Every family without
//! per-mailbox labels has its series at zero from start-up (the outcomes
//! `ok`, the known methods with `OK`), so `rate()` and alerts see them before
//! the first call.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::journey::{Format, JourneyEvent};
use crate::store::{BarrierObserver, BarrierReport, RetentionStats};

/// The content type of an OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format (0.0.4), for scrapers and
/// tools (`promtool check metrics`, `curl`) that do not ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition of
/// `prometheus-client` (which writes only OpenMetrics): a counter family is
/// named with its `_total` suffix in `HELP` and `TYPE`, and the `UNIT` and
/// `EOF` lines, which that format does not have, are left out. Samples are
/// unchanged (we set no exemplars and no `_created` series).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match comment {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Whether an `Accept` header asks for OpenMetrics (Prometheus itself does).
fn wants_openmetrics(accept: Option<&axum::http::HeaderValue>) -> bool {
    accept
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"))
}

/// How a call ended, as a label value: `ok`, `duplicate` (a repeated submit
/// answered with its original receipt), `requeued` or `quarantined` (nacks),
/// or the gRPC code that refused it in snake case (`invalid_argument`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Outcome(&'static str);

impl Outcome {
    /// Done.
    pub const OK: Outcome = Outcome("ok");
    /// A repeated submit, answered with the original receipt.
    pub const DUPLICATE: Outcome = Outcome("duplicate");
    /// A nack that put the delivery back in the queue.
    pub const REQUEUED: Outcome = Outcome("requeued");
    /// A nack that quarantined the delivery.
    pub const QUARANTINED: Outcome = Outcome("quarantined");

    /// Refused with the gRPC code named `code` (snake case).
    pub const fn refused(code: &'static str) -> Self {
        Outcome(code)
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        self.0
    }

    fn accepted(self) -> bool {
        self == Outcome::OK || self == Outcome::DUPLICATE
    }
}

/// One mailbox's queue, for the per-mailbox gauges (see [`Metrics::set_mailboxes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxRow {
    /// The mailbox: an organisation's ODS code, or `@parked` (the holding
    /// mailbox of releases with no known GP).
    pub mailbox: String,
    /// Deliveries waiting or out on lease (not yet acknowledged or quarantined).
    pub depth: u64,
    /// Of those, out on lease now.
    pub leased: u64,
    /// Age of the oldest unacknowledged delivery, seconds (0 when empty).
    pub oldest_age_seconds: f64,
    /// Unacknowledged deliveries past their deadline.
    pub overdue: u64,
    /// Quarantined deliveries awaiting an operator.
    pub quarantined: u64,
    /// Parked releases (no known GP): the depth of `@parked`, 0 elsewhere.
    pub parked: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubmitLabels {
    event: &'static str,
    format: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeshLabels {
    direction: &'static str,
    outcome: &'static str,
}

/// The outcomes of MESH messages, by direction (the MESH edge, `src/mesh/`): fixed words.
pub const MESH_OUTCOMES: [(&str, &str); 9] = [
    ("out", "sent"),
    ("out", "acknowledged"),
    ("out", "failed"),
    ("out", "error"),
    ("in", "submitted"),
    ("in", "refused"),
    ("in", "report"),
    ("in", "acknowledged"),
    ("in", "error"),
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    event: &'static str,
    format: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NackLabels {
    permanent: bool,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AckLabels {
    ack: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The PDS lookups' series.
#[derive(Debug)]
struct PdsMetrics {
    lookups: Family<OutcomeLabels, Counter>,
    breaker_open: Gauge,
}

impl PdsMetrics {
    /// The PDS series, registered in `r` (put at zero by `at_zero`).
    fn registered(r: &mut Registry) -> Self {
        let m = Self {
            lookups: Family::default(),
            breaker_open: Gauge::default(),
        };
        r.register(
            "pds_lookups",
            "PDS lookups of parked releases and admissions, by what PDS said (or failed)",
            m.lookups.clone(),
        );
        r.register(
            "pds_breaker_open",
            "1 while the PDS circuit breaker is open (lookups wait)",
            m.breaker_open.clone(),
        );
        m
    }
}

/// The MESH edge's series.
#[derive(Debug)]
struct MeshMetrics {
    messages: Family<MeshLabels, Counter>,
    reachable: Gauge,
}

impl MeshMetrics {
    /// The MESH series, registered in `r` (put at zero by `at_zero`).
    fn registered(r: &mut Registry) -> Self {
        let m = Self {
            messages: Family::default(),
            reachable: Gauge::default(),
        };
        r.register(
            "mesh_messages",
            "MESH messages by direction and outcome (out: sent, acknowledged, failed, error; in: submitted, refused, report, acknowledged, error)",
            m.messages.clone(),
        );
        r.register(
            "mesh_reachable",
            "1 while the last exchange with MESH succeeded (0 when MESH is off or failing)",
            m.reachable.clone(),
        );
        m
    }
}

/// The MLLP listener's series.
#[derive(Debug)]
struct MllpMetrics {
    acks: Family<AckLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    connections: Gauge,
}

impl MllpMetrics {
    /// The ACK codes and refusal reasons, each at zero from start-up.
    const ACKS: [&'static str; 3] = ["AA", "AE", "AR"];
    const REFUSALS: [&'static str; 5] = [
        "connection_limit",
        "identity_connection_limit",
        "message_too_large",
        "malformed_frame",
        "idle_timeout",
    ];

    /// The MLLP series, registered in `r` and at zero.
    fn registered(r: &mut Registry) -> Self {
        let m = Self {
            acks: Family::default(),
            refusals: Family::default(),
            connections: Gauge::default(),
        };
        r.register(
            "mllp_acks",
            "HL7 ACKs written on the MLLP listener, by acknowledgement code",
            m.acks.clone(),
        );
        r.register(
            "mllp_refusals",
            "MLLP connections closed or refused by a limit or a framing error, by reason",
            m.refusals.clone(),
        );
        r.register(
            "mllp_connections",
            "Open MLLP connections",
            m.connections.clone(),
        );
        for ack in Self::ACKS {
            m.acks.get_or_create_owned(&AckLabels { ack });
        }
        for reason in Self::REFUSALS {
            m.refusals.get_or_create_owned(&ReasonLabels { reason });
        }
        m
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcCallLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcMethodLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn grpc_seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrisonLabels {
    prison: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IndicatorLabels {
    prison: String,
    indicator: &'static str,
}

/// The continuity indicators of the last 28 days (`docs/continuity.md`).
#[derive(Debug, Default)]
struct ContinuityGauges {
    releases: Family<PrisonLabels, Gauge>,
    ratio: Family<IndicatorLabels, Gauge<f64, AtomicU64>>,
    median_to_gp_seconds: Family<PrisonLabels, Gauge<f64, AtomicU64>>,
}

impl ContinuityGauges {
    fn registered(r: &mut Registry) -> Self {
        let c = ContinuityGauges::default();
        r.register(
            "continuity_releases",
            "Releases submitted in the last 28 days, by sending prison (absent when under 5)",
            c.releases.clone(),
        );
        r.register(
            "continuity_ratio",
            "Continuity of care indicators of the last 28 days, 0 to 1 (absent when suppressed)",
            c.ratio.clone(),
        );
        r.register_with_unit(
            "continuity_median_to_gp",
            "Median time from submission to a GP's acknowledgement, last 28 days",
            Unit::Seconds,
            c.median_to_gp_seconds.clone(),
        );
        c
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailboxLabels {
    mailbox: String,
}

/// The label value of an event (`unknown` when the request named none we know).
fn event_label(event: Option<JourneyEvent>) -> &'static str {
    match event {
        Some(JourneyEvent::Admission) => "admission",
        Some(JourneyEvent::Transfer) => "transfer",
        Some(JourneyEvent::Release) => "release",
        Some(JourneyEvent::CommunitySummary) => "community_summary",
        None => "unknown",
    }
}

/// The label value of a document format (`unknown` when there was none).
fn format_label(format: Option<Format>) -> &'static str {
    match format {
        Some(Format::Native) => "native",
        Some(Format::Fhir) => "fhir_json",
        Some(Format::Hl7v2) => "hl7v2",
        None => "unknown",
    }
}

/// Times each group commit's barrier; given to the store as its observer.
#[derive(Debug)]
struct BarrierMetrics {
    seconds: Histogram,
    commands: Histogram,
    submits: Histogram,
    anchored_audit_seq: Gauge,
    anchored_commit_seq: Gauge,
}

impl BarrierObserver for BarrierMetrics {
    fn synced(&self, _barrier: u64) -> io::Result<()> {
        Ok(())
    }

    fn committed(&self, report: &BarrierReport) {
        self.seconds.observe(report.elapsed.as_secs_f64());
        // Batches are at most a few thousand: exact as f64.
        self.commands.observe(report.commands as f64);
        self.submits.observe(report.submits as f64);
    }

    fn anchored(&self, checkpoint: &crate::audit::Checkpoint) {
        self.anchored_audit_seq.set(gauge_i64(checkpoint.audit_seq));
        self.anchored_commit_seq
            .set(gauge_i64(checkpoint.commit_seq));
    }
}

#[derive(Debug, Default)]
struct MailboxGauges {
    depth: Family<MailboxLabels, Gauge>,
    leased: Family<MailboxLabels, Gauge>,
    oldest_age_seconds: Family<MailboxLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    overdue: Family<MailboxLabels, Gauge>,
    quarantined: Family<MailboxLabels, Gauge>,
    parked: Family<MailboxLabels, Gauge>,
}

#[derive(Debug, Default)]
struct RetentionGauges {
    payloads_held: Gauge,
    payloads_in_grace: Gauge,
    payloads_shredded: Gauge,
    metadata_expiring: Gauge,
    metadata_removed: Gauge,
    tombstones: Gauge,
    key_epochs: Gauge,
    audit_entries_held: Gauge,
    audit_entries_removed: Gauge,
    identity_records_held: Gauge,
    identity_records_removed: Gauge,
}

impl BarrierMetrics {
    /// The barrier series, registered in `r`.
    fn registered(r: &mut Registry) -> Arc<Self> {
        let barrier = Arc::new(BarrierMetrics {
            seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            commands: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            submits: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            anchored_audit_seq: Gauge::default(),
            anchored_commit_seq: Gauge::default(),
        });
        r.register(
            "audit_anchored_seq",
            "Audit entries covered by the newest durable signed checkpoint in the witness (`throughcare admin audit anchor` prints it)",
            barrier.anchored_audit_seq.clone(),
        );
        r.register(
            "store_anchored_commit_seq",
            "Committed batches the witness promises (the high-water mark outside the data directory)",
            barrier.anchored_commit_seq.clone(),
        );
        r.register_with_unit(
            "barrier_duration",
            "Durability barriers (sled flush and fdatasyncs), one per group commit",
            Unit::Seconds,
            barrier.seconds.clone(),
        );
        r.register(
            "barrier_commands",
            "Messages per barrier: commands one group commit made durable",
            barrier.commands.clone(),
        );
        r.register(
            "barrier_submits",
            "Accepted submits per barrier",
            barrier.submits.clone(),
        );
        barrier
    }
}

impl MailboxGauges {
    /// The per-mailbox gauges, registered in `r`.
    fn registered(r: &mut Registry) -> Self {
        let mailboxes = MailboxGauges::default();
        r.register(
            "mailbox_depth",
            "Deliveries waiting or on lease in the mailbox",
            mailboxes.depth.clone(),
        );
        r.register(
            "mailbox_leased",
            "Deliveries out on lease",
            mailboxes.leased.clone(),
        );
        r.register_with_unit(
            "mailbox_oldest_age",
            "Age of the oldest unacknowledged delivery",
            Unit::Seconds,
            mailboxes.oldest_age_seconds.clone(),
        );
        r.register(
            "mailbox_overdue",
            "Unacknowledged deliveries past their deadline",
            mailboxes.overdue.clone(),
        );
        r.register(
            "mailbox_quarantined",
            "Quarantined deliveries awaiting an operator",
            mailboxes.quarantined.clone(),
        );
        r.register(
            "mailbox_parked",
            "Parked releases (no known GP) awaiting a claim",
            mailboxes.parked.clone(),
        );
        mailboxes
    }
}

impl RetentionGauges {
    /// The retention gauges, registered in `r`.
    fn registered(r: &mut Registry) -> Self {
        let retention = RetentionGauges::default();
        for (name, help, gauge) in [
            (
                "retention_payloads_held",
                "Payloads not yet shredded (in transit, parked, quarantined or in their grace period)",
                &retention.payloads_held,
            ),
            (
                "retention_payloads_in_grace",
                "Finished handovers whose payload is waiting out its grace period",
                &retention.payloads_in_grace,
            ),
            (
                "retention_payloads_shredded",
                "Payloads shredded under the retention policy since the store was created",
                &retention.payloads_shredded,
            ),
            (
                "retention_metadata_expiring",
                "Finished handovers whose tracking metadata is scheduled for removal",
                &retention.metadata_expiring,
            ),
            (
                "retention_metadata_removed",
                "Handovers whose tracking metadata was removed since the store was created",
                &retention.metadata_removed,
            ),
            (
                "retention_tombstones",
                "Removed handovers Track still answers for",
                &retention.tombstones,
            ),
            (
                "retention_key_epochs",
                "Key epochs on disk (each wraps one period's data keys)",
                &retention.key_epochs,
            ),
            (
                "retention_audit_entries_held",
                "Audit entries held (the trail verifies from the first of them)",
                &retention.audit_entries_held,
            ),
            (
                "retention_audit_entries_removed",
                "Audit entries removed after the audit period since the store was created",
                &retention.audit_entries_removed,
            ),
            (
                "retention_identity_records_held",
                "Entries of the identity trees held (identity links, patients, lineage, refused links)",
                &retention.identity_records_held,
            ),
            (
                "retention_identity_records_removed",
                "Entries of the identity trees removed under the retention policy since the store was created",
                &retention.identity_records_removed,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        retention
    }
}

/// Every series the gateway exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    submits: Family<SubmitLabels, Counter>,
    submit_seconds: Histogram,
    pulls: Family<OutcomeLabels, Counter>,
    pulled: Family<DeliveryLabels, Counter>,
    acks: Family<OutcomeLabels, Counter>,
    nacks: Family<NackLabels, Counter>,
    barrier: Arc<BarrierMetrics>,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    grpc_handled: Family<GrpcCallLabels, Counter>,
    grpc_seconds: HistogramFamily<GrpcMethodLabels>,
    claim_failures: Counter,
    claim_lockouts: Family<ScopeLabels, Counter>,
    claims_locked: Family<ScopeLabels, Counter>,
    pds: PdsMetrics,
    mllp: MllpMetrics,
    mesh: MeshMetrics,
    certificates: Vec<(&'static str, PathBuf)>,
    mailboxes: MailboxGauges,
    retention: RetentionGauges,
    continuity: ContinuityGauges,
    /// Held while the mailbox gauges are replaced and while encoding, so a
    /// scrape never sees them half replaced.
    consistent: Mutex<()>,
    /// New submits accepted and deliveries acknowledged since start-up, for
    /// the dashboard's trends ([`Metrics::totals`]).
    accepted: AtomicU64,
    delivered: AtomicU64,
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Every series, registered and at zero. `server_cert` and `ca_cert` are
    /// PEM files read at each scrape for `certificate_expiry_timestamp_seconds`.
    pub fn new(server_cert: PathBuf, ca_cert: PathBuf) -> Self {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("throughcare");
        let submits = Family::default();
        r.register(
            "submits",
            "Submit calls by journey event, document format as sent, and outcome",
            submits.clone(),
        );
        let submit_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 14));
        r.register_with_unit(
            "submit_duration",
            "Accepted submits: from request to durable receipt",
            Unit::Seconds,
            submit_seconds.clone(),
        );
        let pulls = Family::default();
        r.register("pulls", "Pull calls by outcome", pulls.clone());
        let pulled = Family::default();
        r.register(
            "pulled_deliveries",
            "Deliveries handed out on lease, by journey event and format as rendered",
            pulled.clone(),
        );
        let acks = Family::default();
        r.register("acks", "Ack calls by outcome", acks.clone());
        let nacks = Family::default();
        r.register(
            "nacks",
            "Nack calls by permanence and outcome (requeued, quarantined or refused)",
            nacks.clone(),
        );
        let barrier = BarrierMetrics::registered(r);
        let certificate_expiry = Family::default();
        r.register_with_unit(
            "certificate_expiry_timestamp",
            "When the certificate expires (its notAfter), Unix time",
            Unit::Seconds,
            certificate_expiry.clone(),
        );
        register_build_info(r);
        let (grpc_handled, grpc_seconds) = grpc_families(r);
        let claim_failures = Counter::default();
        r.register(
            "claim_failures",
            "Claims by a practice that matched no parked release",
            claim_failures.clone(),
        );
        let claim_lockouts = Family::default();
        r.register(
            "claim_lockouts",
            "Failed-claim counters that reached their limit (claims locked), by scope",
            claim_lockouts.clone(),
        );
        let claims_locked = Family::default();
        r.register(
            "claims_refused_locked",
            "Claims refused because a failed-claim counter is at its limit, by scope",
            claims_locked.clone(),
        );
        let mailboxes = MailboxGauges::registered(r);
        let retention = RetentionGauges::registered(r);
        let mllp = MllpMetrics::registered(r);
        let mesh = MeshMetrics::registered(r);
        let pds = PdsMetrics::registered(r);
        let continuity = ContinuityGauges::registered(r);
        Self {
            registry: root,
            submits,
            submit_seconds,
            pulls,
            pulled,
            acks,
            nacks,
            barrier,
            certificate_expiry,
            grpc_handled,
            grpc_seconds,
            claim_failures,
            claim_lockouts,
            claims_locked,
            pds,
            mllp,
            mesh,
            certificates: vec![("server", server_cert), ("ca", ca_cert)],
            mailboxes,
            retention,
            continuity,
            consistent: Mutex::new(()),
            accepted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
        .at_zero(crate::grpc::call_metrics::served_methods())
    }

    /// Puts every series that has only fixed-word labels at zero, so each
    /// family is in the exposition from start-up. `methods` are the gRPC
    /// methods served (`grpc_service`, `grpc_method`).
    fn at_zero(self, methods: &[(&'static str, &'static str)]) -> Self {
        const FORMATS: [Format; 3] = [Format::Native, Format::Fhir, Format::Hl7v2];
        for event in JourneyEvent::ALL {
            for format in FORMATS {
                let (event, format) = (event_label(Some(event)), format_label(Some(format)));
                self.submits.get_or_create_owned(&SubmitLabels {
                    event,
                    format,
                    outcome: Outcome::OK.as_str(),
                });
                self.pulled
                    .get_or_create_owned(&DeliveryLabels { event, format });
            }
        }
        let ok = OutcomeLabels {
            outcome: Outcome::OK.as_str(),
        };
        self.pulls.get_or_create_owned(&ok);
        self.acks.get_or_create_owned(&ok);
        for (permanent, outcome) in [
            (false, Outcome::REQUEUED),
            (false, Outcome::QUARANTINED),
            (true, Outcome::QUARANTINED),
        ] {
            self.nacks.get_or_create_owned(&NackLabels {
                permanent,
                outcome: outcome.as_str(),
            });
        }
        let pds_outcomes = crate::store::PdsStatus::ALL.map(crate::store::PdsStatus::label);
        for outcome in pds_outcomes.into_iter().chain(["failed"]) {
            self.pds
                .lookups
                .get_or_create_owned(&OutcomeLabels { outcome });
        }
        for (direction, outcome) in MESH_OUTCOMES {
            self.mesh
                .messages
                .get_or_create_owned(&MeshLabels { direction, outcome });
        }
        for scope in ["practice_and_patient", "practice", "patient"] {
            self.claim_lockouts
                .get_or_create_owned(&ScopeLabels { scope });
            self.claims_locked
                .get_or_create_owned(&ScopeLabels { scope });
        }
        for &(grpc_service, grpc_method) in methods {
            self.grpc_handled.get_or_create_owned(&GrpcCallLabels {
                grpc_service,
                grpc_method,
                grpc_code: "OK",
            });
            self.grpc_seconds.get_or_create_owned(&GrpcMethodLabels {
                grpc_service,
                grpc_method,
            });
        }
        self
    }

    /// A call on the mutual-TLS listener finished with `grpc_code` (the
    /// code's name, `OK`, `InvalidArgument`, ...) after `elapsed`.
    pub fn grpc_handled(
        &self,
        (grpc_service, grpc_method): (&'static str, &'static str),
        grpc_code: &'static str,
        elapsed: Duration,
    ) {
        self.grpc_handled
            .get_or_create(&GrpcCallLabels {
                grpc_service,
                grpc_method,
                grpc_code,
            })
            .inc();
        self.grpc_seconds
            .get_or_create(&GrpcMethodLabels {
                grpc_service,
                grpc_method,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// New submits accepted and deliveries acknowledged since start-up.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
        )
    }

    /// The store's barrier observer that feeds the barrier histograms.
    pub fn barrier_observer(&self) -> Arc<dyn BarrierObserver> {
        self.barrier.clone()
    }

    /// A submit ended: `event` and `format` as the request named them.
    pub fn submitted(
        &self,
        event: Option<JourneyEvent>,
        format: Option<Format>,
        outcome: Outcome,
        elapsed: Duration,
    ) {
        self.submits
            .get_or_create(&SubmitLabels {
                event: event_label(event),
                format: format_label(format),
                outcome: outcome.as_str(),
            })
            .inc();
        if outcome.accepted() {
            self.submit_seconds.observe(elapsed.as_secs_f64());
        }
        if outcome == Outcome::OK {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A pull ended, handing out `deliveries` (event, format as rendered).
    pub fn pulled(
        &self,
        outcome: Outcome,
        deliveries: impl IntoIterator<Item = (Option<JourneyEvent>, Option<Format>)>,
    ) {
        self.pulls
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        for (event, format) in deliveries {
            self.pulled
                .get_or_create(&DeliveryLabels {
                    event: event_label(event),
                    format: format_label(format),
                })
                .inc();
        }
    }

    /// An ack ended.
    pub fn acked(&self, outcome: Outcome) {
        if outcome == Outcome::OK {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        self.acks
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A nack ended.
    pub fn nacked(&self, permanent: bool, outcome: Outcome) {
        self.nacks
            .get_or_create(&NackLabels {
                permanent,
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A claim by a practice matched nothing; `now_locked` names the
    /// counters it filled.
    pub fn claim_failed(&self, now_locked: &[&'static str]) {
        self.claim_failures.inc();
        for scope in now_locked {
            self.claim_lockouts
                .get_or_create(&ScopeLabels { scope })
                .inc();
        }
    }

    /// A PDS lookup ended with `outcome` (a fixed word).
    pub fn pds_looked_up(&self, outcome: &'static str) {
        self.pds
            .lookups
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A MESH message ended with `outcome` (a fixed word) in `direction`
    /// (`out` or `in`).
    pub fn mesh_message(&self, direction: &'static str, outcome: &'static str) {
        self.mesh
            .messages
            .get_or_create(&MeshLabels { direction, outcome })
            .inc();
    }

    /// The last exchange with MESH succeeded (`true`) or failed.
    pub fn set_mesh_reachable(&self, up: bool) {
        self.mesh.reachable.set(i64::from(up));
    }

    /// The PDS circuit breaker opened or closed.
    pub fn set_pds_breaker_open(&self, open: bool) {
        self.pds.breaker_open.set(i64::from(open));
    }

    /// An ACK with code `ack` (`AA`, `AE`, `AR`) was written on the MLLP listener.
    pub fn mllp_acked(&self, ack: &'static str) {
        self.mllp.acks.get_or_create(&AckLabels { ack }).inc();
    }

    /// The MLLP listener refused or closed a connection for `reason` (a fixed word).
    pub fn mllp_refused(&self, reason: &'static str) {
        self.mllp
            .refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// `open` MLLP connections are open now.
    pub fn set_mllp_connections(&self, open: usize) {
        self.mllp.connections.set(gauge_i64(open as u64));
    }

    /// A claim was refused because the `scope` counter is at its limit.
    pub fn claim_refused_while_locked(&self, scope: &'static str) {
        self.claims_locked
            .get_or_create(&ScopeLabels { scope })
            .inc();
    }

    /// Replaces every per-mailbox gauge with `rows`: a mailbox absent from
    /// `rows` disappears from the exposition.
    pub fn set_mailboxes(&self, rows: Vec<MailboxRow>) {
        let _consistent = self.consistent.lock().unwrap_or_else(|e| e.into_inner());
        let m = &self.mailboxes;
        m.depth.clear();
        m.leased.clear();
        m.oldest_age_seconds.clear();
        m.overdue.clear();
        m.quarantined.clear();
        m.parked.clear();
        for row in rows {
            let labels = MailboxLabels {
                mailbox: row.mailbox,
            };
            m.depth.get_or_create(&labels).set(gauge_i64(row.depth));
            m.leased.get_or_create(&labels).set(gauge_i64(row.leased));
            m.oldest_age_seconds
                .get_or_create(&labels)
                .set(row.oldest_age_seconds);
            m.overdue.get_or_create(&labels).set(gauge_i64(row.overdue));
            m.quarantined
                .get_or_create(&labels)
                .set(gauge_i64(row.quarantined));
            m.parked.get_or_create(&labels).set(gauge_i64(row.parked));
        }
    }

    /// Replaces the continuity gauges with the first period of each prison
    /// in `c` (the metrics ask for one period: [`super::continuity::window`]).
    pub fn set_continuity(&self, c: &crate::handover::Continuity) {
        use crate::handover::Share;
        let _consistent = self.consistent.lock().unwrap_or_else(|e| e.into_inner());
        let g = &self.continuity;
        g.releases.clear();
        g.ratio.clear();
        g.median_to_gp_seconds.clear();
        for row in &c.rows {
            let prison = PrisonLabels {
                prison: row.prison.clone(),
            };
            if let Some(n) = row.releases {
                g.releases.get_or_create(&prison).set(gauge_i64(n));
            }
            #[allow(clippy::cast_precision_loss)]
            if let Some(ms) = row.median_to_gp_ms {
                g.median_to_gp_seconds
                    .get_or_create(&prison)
                    .set(ms as f64 / 1_000.0);
            }
            for (indicator, share) in [
                ("gp_within_deadline", row.gp_within_deadline),
                ("parked_over_three_days", row.parked_over_three_days),
                ("parked_over_seven_days", row.parked_over_seven_days),
                ("ost_before_next_dose", row.ost_before_next_dose),
                ("mental_health_within_72h", row.mental_health_within_72h),
            ] {
                if let Share::Of(n, d) = share
                    && d > 0
                {
                    #[allow(clippy::cast_precision_loss)]
                    let ratio = n as f64 / d as f64;
                    let labels = IndicatorLabels {
                        prison: row.prison.clone(),
                        indicator,
                    };
                    g.ratio.get_or_create(&labels).set(ratio);
                }
            }
        }
    }

    /// Sets the retention gauges from the last pass.
    pub fn set_retention(&self, s: &RetentionStats) {
        let r = &self.retention;
        r.payloads_held.set(gauge_i64(s.payloads_held));
        r.payloads_in_grace.set(gauge_i64(s.payloads_in_grace));
        r.payloads_shredded.set(gauge_i64(s.payloads_shredded));
        r.metadata_expiring.set(gauge_i64(s.metadata_expiring));
        r.metadata_removed.set(gauge_i64(s.metadata_removed));
        r.tombstones.set(gauge_i64(s.tombstones));
        r.key_epochs.set(gauge_i64(s.key_epochs));
        r.audit_entries_held.set(gauge_i64(s.audit_entries_held));
        r.audit_entries_removed
            .set(gauge_i64(s.audit_entries_removed));
        r.identity_records_held
            .set(gauge_i64(s.identity_records_held));
        r.identity_records_removed
            .set(gauge_i64(s.identity_records_removed));
    }

    /// Also reports the CRL's `nextUpdate` (as `certificate="crl"`), read
    /// at each scrape like the certificates: a CRL publisher that stops is
    /// seen before the list in force goes stale.
    #[must_use]
    pub fn with_crl(mut self, crl: Option<PathBuf>) -> Self {
        if let Some(path) = crl {
            self.certificates.push(("crl", path));
        }
        self
    }

    /// Reads the certificates' expiry dates; an unreadable one loses its series.
    fn refresh_certificates(&self) {
        for (name, path) in &self.certificates {
            let labels = CertificateLabels { certificate: name };
            // The CRL "expires" at its nextUpdate: past it, revocations
            // published since are not enforced.
            let read = if *name == "crl" {
                crate::tls::crl_next_update
            } else {
                crate::tls::expiry_timestamp
            };
            let expiry = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| read(&pem).map_err(|e| e.to_string()));
            match expiry {
                Ok(expiry) => {
                    self.certificate_expiry.get_or_create(&labels).set(expiry);
                }
                Err(error) => {
                    tracing::warn!(certificate = name, path = %path.display(), %error, "cannot read certificate expiry");
                    self.certificate_expiry.remove(&labels);
                }
            }
        }
    }

    /// The OpenMetrics text exposition of every series. Reads the
    /// certificate files: call it off the async runtime.
    pub fn encode(&self) -> String {
        self.refresh_certificates();
        let _consistent = self.consistent.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Serves `GET /metrics` and the dashboard (`GET /`, see
/// [`super::dashboard`]) on `listener` (plain HTTP) until `shutdown` completes.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    dashboard: super::dashboard::Dashboard,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use axum::http::{StatusCode, header};
    async fn scrape(
        axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
        headers: axum::http::HeaderMap,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let openmetrics = wants_openmetrics(headers.get(header::ACCEPT));
        match tokio::task::spawn_blocking(move || metrics.encode()).await {
            Ok(text) if openmetrics => {
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
            }
            Ok(text) => (
                [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
                to_prometheus_text(&text),
            )
                .into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(metrics)
        .merge(super::dashboard::routes(dashboard));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// `build_info`: always 1, the version and commit in its labels.
fn register_build_info(r: &mut Registry) {
    let build_info = Family::<BuildLabels, Gauge>::default();
    build_info
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            commit: env!("THROUGHCARE_COMMIT"),
        })
        .set(1);
    r.register(
        "build_info",
        "The running build: always 1, its version and commit in the labels",
        build_info,
    );
}

/// The per-method gRPC series: calls handled by code, and their latency.
fn grpc_families(
    r: &mut Registry,
) -> (
    Family<GrpcCallLabels, Counter>,
    HistogramFamily<GrpcMethodLabels>,
) {
    let grpc_handled = Family::default();
    r.register(
        "grpc_server_handled",
        "Calls on the mutual-TLS listener that finished, by service, method and gRPC status code",
        grpc_handled.clone(),
    );
    let grpc_seconds: HistogramFamily<GrpcMethodLabels> =
        Family::new_with_constructor(grpc_seconds_histogram);
    r.register_with_unit(
        "grpc_server_handling",
        "Calls on the mutual-TLS listener: from request in to the call's last frame",
        Unit::Seconds,
        grpc_seconds.clone(),
    );
    (grpc_handled, grpc_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(
            "/nonexistent/server.pem".into(),
            "/nonexistent/ca.pem".into(),
        )
    }

    #[test]
    fn continuity_gauges_leave_out_what_is_suppressed_or_unmeasured() {
        use crate::handover::{Continuity, ContinuityRow, Share};
        let m = metrics();
        let row = |prison: &str, releases| ContinuityRow {
            prison: prison.into(),
            period_start_ms: 0,
            period_end_ms: 1,
            releases,
            gp_within_deadline: Share::Of(15, 20),
            parked_over_three_days: Share::Suppressed,
            parked_over_seven_days: Share::Of(0, 20),
            median_to_gp_ms: Some(5_400_000),
            ost_before_next_dose: Share::Of(0, 0),
            mental_health_within_72h: Share::Of(5, 5),
        };
        m.set_continuity(&Continuity {
            rows: vec![row("YP001", Some(20)), row("YP002", None)],
            now_ms: 1,
            covered_from_ms: 0,
        });
        let text = m.encode();
        assert!(
            text.contains("throughcare_continuity_releases{prison=\"YP001\"} 20"),
            "{text}"
        );
        assert!(!text.contains("throughcare_continuity_releases{prison=\"YP002\"}"));
        assert!(text.contains(
            "throughcare_continuity_ratio{prison=\"YP001\",indicator=\"gp_within_deadline\"} 0.75"
        ));
        assert!(
            !text.contains("indicator=\"parked_over_three_days\""),
            "suppressed"
        );
        assert!(
            !text.contains("indicator=\"ost_before_next_dose\""),
            "nothing measured"
        );
        assert!(
            text.contains("throughcare_continuity_median_to_gp_seconds{prison=\"YP001\"} 5400")
        );
        // The next computation replaces every series.
        m.set_continuity(&Continuity {
            rows: Vec::new(),
            now_ms: 2,
            covered_from_ms: 0,
        });
        assert!(!m.encode().contains("prison=\"YP001\""));
    }

    #[test]
    fn labels_are_fixed_words_and_ods_codes() {
        let m = metrics();
        m.submitted(
            Some(JourneyEvent::Release),
            Some(Format::Fhir),
            Outcome::OK,
            Duration::from_millis(3),
        );
        m.submitted(
            None,
            None,
            Outcome::refused("invalid_argument"),
            Duration::ZERO,
        );
        m.nacked(true, Outcome::QUARANTINED);
        m.set_mailboxes(vec![MailboxRow {
            mailbox: "YG001".parse().unwrap(),
            depth: 3,
            leased: 1,
            oldest_age_seconds: 90.5,
            overdue: 2,
            quarantined: 1,
            parked: 0,
        }]);
        let text = m.encode();
        assert!(text.contains(
            "throughcare_submits_total{event=\"release\",format=\"fhir_json\",outcome=\"ok\"} 1"
        ));
        assert!(text.contains(
            "throughcare_submits_total{event=\"unknown\",format=\"unknown\",outcome=\"invalid_argument\"} 1"
        ));
        // Only the accepted submit is timed.
        assert!(text.contains("throughcare_submit_duration_seconds_count 1"));
        assert!(
            text.contains("throughcare_nacks_total{permanent=\"true\",outcome=\"quarantined\"} 1")
        );
        assert!(text.contains("throughcare_mailbox_depth{mailbox=\"YG001\"} 3"));
        m.set_retention(&RetentionStats {
            payloads_held: 4,
            payloads_shredded: 9,
            audit_entries_held: 12,
            audit_entries_removed: 30,
            identity_records_held: 5,
            identity_records_removed: 7,
            ..RetentionStats::default()
        });
        let text = m.encode();
        assert!(
            text.contains("throughcare_retention_payloads_held 4"),
            "{text}"
        );
        assert!(text.contains("throughcare_retention_payloads_shredded 9"));
        for series in [
            "audit_entries_held 12",
            "audit_entries_removed 30",
            "identity_records_held 5",
            "identity_records_removed 7",
        ] {
            assert!(
                text.contains(&format!("throughcare_retention_{series}\n")),
                "{series}"
            );
        }
        assert!(text.contains("throughcare_mailbox_oldest_age_seconds{mailbox=\"YG001\"} 90.5"));
        // Unreadable certificate files lose their series rather than report nonsense.
        assert!(!text.contains("throughcare_certificate_expiry_timestamp_seconds{"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn every_family_is_present_at_zero_from_start_up() {
        let text = metrics().encode();
        for family in [
            "throughcare_submits_total{event=\"release\",format=\"fhir_json\",outcome=\"ok\"} 0",
            "throughcare_pulls_total{outcome=\"ok\"} 0",
            "throughcare_pulled_deliveries_total{event=\"admission\",format=\"hl7v2\"} 0",
            "throughcare_acks_total{outcome=\"ok\"} 0",
            "throughcare_nacks_total{permanent=\"true\",outcome=\"quarantined\"} 0",
            "throughcare_claim_failures_total 0",
            "throughcare_claim_lockouts_total{scope=\"practice\"} 0",
            "throughcare_claims_refused_locked_total{scope=\"patient\"} 0",
            "throughcare_grpc_server_handled_total{grpc_service=\"throughcare.v1.HandoverService\",grpc_method=\"Submit\",grpc_code=\"OK\"} 0",
            "throughcare_grpc_server_handling_seconds_count{grpc_service=\"grpc.health.v1.Health\",grpc_method=\"Check\"} 0",
            "throughcare_retention_payloads_held 0",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        let build = format!(
            "throughcare_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("THROUGHCARE_COMMIT")
        );
        assert!(text.contains(&build), "{text}");
    }

    #[test]
    fn the_prometheus_text_format_names_counters_with_total_and_has_no_eof() {
        let m = metrics();
        m.acked(Outcome::OK);
        let text = to_prometheus_text(&m.encode());
        assert!(
            text.contains("# TYPE throughcare_acks_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP throughcare_acks_total Ack calls by outcome.\n"));
        assert!(text.contains("throughcare_acks_total{outcome=\"ok\"} 1\n"));
        assert!(text.contains("# TYPE throughcare_submit_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE throughcare_build_info gauge\n"));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let accept = |v: &'static str| axum::http::HeaderValue::from_static(v);
        assert!(wants_openmetrics(Some(&accept(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        ))));
        assert!(!wants_openmetrics(Some(&accept("*/*"))));
        assert!(!wants_openmetrics(None));
    }

    /// The CRL in force is watched like the certificates: its nextUpdate
    /// is exported, so a publisher that stops is seen before it goes stale.
    #[test]
    fn the_crls_next_update_is_exported_beside_the_certificates_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::certs::CertAuthority::generate("metrics test").unwrap();
        let crl = dir.path().join("revoked.pem");
        std::fs::write(&crl, ca.crl(&[]).unwrap()).unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, ca.cert_pem()).unwrap();
        let m = Metrics::new(pem.clone(), pem).with_crl(Some(crl));
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(
                    "throughcare_certificate_expiry_timestamp_seconds{certificate=\"crl\"}",
                )
            })
            .unwrap_or_else(|| panic!("{text}"));
        let next: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let in_a_week = time::OffsetDateTime::now_utc().unix_timestamp() + 7 * 86_400;
        assert!((in_a_week - next).abs() < 120, "{line}");
    }

    /// Every series docs/grafana-dashboard.json queries is one the gateway
    /// exports (a renamed metric would leave a panel silently empty).
    #[test]
    fn the_grafana_dashboard_queries_only_exported_series() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana-dashboard.json")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::certs::init_dev_pki(dir.path()).unwrap();
        let m = Metrics::new(pki.server_cert(), pki.ca_cert());
        m.set_mailboxes(vec![MailboxRow {
            mailbox: "YG001".into(),
            depth: 1,
            leased: 0,
            oldest_age_seconds: 1.0,
            overdue: 0,
            quarantined: 0,
            parked: 0,
        }]);
        // The continuity gauges exist only once computed (and unsuppressed).
        m.set_continuity(&crate::handover::Continuity {
            rows: vec![crate::handover::ContinuityRow {
                prison: "YP001".into(),
                period_start_ms: 0,
                period_end_ms: 1,
                releases: Some(20),
                gp_within_deadline: crate::handover::Share::Of(15, 20),
                parked_over_three_days: crate::handover::Share::Of(0, 20),
                parked_over_seven_days: crate::handover::Share::Of(0, 20),
                median_to_gp_ms: Some(1),
                ost_before_next_dose: crate::handover::Share::Of(0, 0),
                mental_health_within_72h: crate::handover::Share::Of(0, 0),
            }],
            now_ms: 1,
            covered_from_ms: 0,
        });
        let exported = to_prometheus_text(&m.encode());
        let names = regex::Regex::new(r"throughcare_[a-z_]+").unwrap();
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for name in names.find_iter(expr) {
                    let name = name.as_str();
                    assert!(exported.contains(&format!("\n{name}")), "{name} in {expr}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 22, "{checked}");
    }

    #[test]
    fn replacing_mailboxes_drops_the_ones_gone() {
        let m = metrics();
        let row = |code: &str, depth| MailboxRow {
            mailbox: code.parse().unwrap(),
            depth,
            leased: 0,
            oldest_age_seconds: 0.0,
            overdue: 0,
            quarantined: 0,
            parked: 0,
        };
        m.set_mailboxes(vec![row("YG001", 1), row("YG002", 2)]);
        m.set_mailboxes(vec![row("YG002", 5)]);
        let text = m.encode();
        assert!(!text.contains("mailbox=\"YG001\""));
        assert!(text.contains("throughcare_mailbox_depth{mailbox=\"YG002\"} 5"));
    }

    #[test]
    fn barrier_reports_feed_the_histograms() {
        let m = metrics();
        let observer = m.barrier_observer();
        for (commands, submits) in [(1, 1), (7, 5)] {
            observer.committed(&BarrierReport {
                elapsed: Duration::from_micros(200),
                commands,
                submits,
            });
        }
        let text = m.encode();
        assert!(
            text.contains("throughcare_barrier_commands_sum 8.0"),
            "{text}"
        );
        assert!(text.contains("throughcare_barrier_submits_sum 6.0"));
        assert!(text.contains("throughcare_barrier_duration_seconds_count 2"));
    }
}
