//! Configuration: a TOML file, then `THROUGHCARE_*` environment variables and
//! command-line flags on top, validated before any port is bound. A bad value
//! names its field (and the variable, when one set it); `main` exits with
//! [`EXIT_CONFIG`].
//!
//! Every field has a variable: `THROUGHCARE_` and its dotted path in capitals
//! with `_` for the dot (`queue.max_attempts` is
//! `THROUGHCARE_QUEUE_MAX_ATTEMPTS`, `listen` is `THROUGHCARE_LISTEN`); see
//! [`env_var`]. An empty variable counts as unset.
//!
//! Without a file the development defaults apply: [`Config::default`] with
//! `dev_certs` on, so `throughcare serve` works from a fresh clone. With a
//! file, `dev_certs` is off unless the file, `THROUGHCARE_DEV_CERTS` or
//! `--dev-certs` turns it on: a deployment never makes its own PKI by accident.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Exit code for an invalid configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;
/// Exit code for a store that cannot be trusted: it has lost acknowledged
/// data, or is damaged (`EX_DATAERR`). A person must decide.
pub const EXIT_STORE_BEHIND: i32 = 65;

/// A configuration field that is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {reason}")]
pub struct ConfigError {
    /// Dotted path of the field (`queue.max_attempts`), or the file.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// `v` within `lo..=hi`, or the error naming `field` and the range.
fn within(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("must be between {lo} and {hi}"),
        ))
    }
}

/// The gateway's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the mutual-TLS gRPC listener.
    pub listen: SocketAddr,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// Where the development PKI lives (created by `serve` when absent if
    /// `dev_certs` is on).
    pub certs_dir: PathBuf,
    /// Create the development PKI in `certs_dir` when it is missing (off by
    /// default; on when `serve` runs without a configuration file).
    pub dev_certs: bool,
    /// The registry of organisations (TOML); default `<certs_dir>/registry.toml`.
    pub registry: Option<PathBuf>,
    /// The keyed-hash secret for patient identifiers; default
    /// `<data_dir>/patient-key`, created when absent.
    pub patient_key_file: Option<PathBuf>,
    /// The master key that wraps every payload's data key; default
    /// `<data_dir>/master-key`, created (0600) when absent.
    pub master_key_file: Option<PathBuf>,
    /// TLS material.
    pub tls: TlsConfig,
    /// Queue behaviour.
    pub queue: QueueConfig,
    /// Input limits.
    pub limits: LimitsConfig,
    /// How long each event may take to reach its recipient.
    pub deadlines: DeadlinesConfig,
    /// The Prometheus metrics listener.
    pub metrics: MetricsConfig,
    /// The store engine.
    pub store: StoreConfig,
    /// How long payloads, tracking metadata and the audit trail are kept.
    pub retention: RetentionConfig,
    /// How long in-flight calls may take to finish on shutdown, ms.
    pub shutdown_grace_ms: u64,
    /// The witness and the audit key, outside the data directory.
    pub integrity: IntegrityConfig,
    /// The Personal Demographics Service (off by default).
    pub pds: crate::pds::PdsConfig,
    /// Traces over OTLP (off by default).
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The HL7 v2 over MLLP listener (off by default).
    pub mllp: crate::mllp::MllpConfig,
    /// MESH, the NHS mailbox service (off by default; docs/mesh.md).
    pub mesh: crate::mesh::MeshConfig,
}

/// What proves the store whole, kept where a restore of the data directory
/// cannot reach (docs/store.md, docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegrityConfig {
    /// The witness directory (high-water mark, audit anchor, journal of
    /// acknowledged handovers); default `<data_dir>.witness`. Put it on
    /// another volume than `data_dir`.
    pub witness_dir: Option<PathBuf>,
    /// The audit key (chain HMAC and checkpoint signatures); default
    /// `<witness_dir>/audit-key`, created (0600) for a new store.
    pub audit_key_file: Option<PathBuf>,
}

/// TLS material; paths default to the development PKI in `certs_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA that issues client certificates.
    pub ca: Option<PathBuf>,
    /// Server certificate chain.
    pub cert: Option<PathBuf>,
    /// Server key.
    pub key: Option<PathBuf>,
    /// Certificate revocation list, PEM.
    pub crl: Option<PathBuf>,
    /// Handshake deadline, ms.
    pub handshake_timeout_ms: Option<u64>,
    /// The operators the gateway accepts, by the name their certificate
    /// carries (`urn:operator:<name>`). Unset: every operator certificate
    /// the CA issues (warned of at start unless on the development PKI).
    /// A TOML array, or (as its variable) names separated by commas.
    #[serde(deserialize_with = "list_or_commas")]
    pub operators: Option<Vec<String>>,
}

/// A list given as an array, or as one string of comma-separated items (how
/// an environment variable gives it).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        List(Vec<String>),
        Text(String),
    }
    Ok(Option::<Given>::deserialize(d)?.map(|given| match given {
        Given::List(items) => items,
        Given::Text(text) => text.split(',').map(|s| s.trim().to_owned()).collect(),
    }))
}

/// Queue behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Leases before an unacknowledged delivery is quarantined.
    pub max_attempts: u32,
    /// Lease when the puller asks for none, seconds.
    pub default_lease_seconds: u32,
    /// Longest lease a puller may ask for, seconds.
    pub max_lease_seconds: u32,
    /// First retry back-off after a retryable nack, ms (doubles each attempt).
    pub retry_backoff_ms: u64,
    /// Most deliveries one pull returns.
    pub max_pull: u32,
    /// Most bytes one gRPC pull answer holds (always at least one
    /// delivery): what does not fit stays queued, its attempt not counted.
    /// The default stays under the 4 MiB gRPC clients accept by default.
    pub max_pull_bytes: usize,
    /// Longest long-poll wait, ms.
    pub max_wait_ms: u32,
    /// How often leases are checked for exhaustion, ms.
    pub sweep_interval_ms: u64,
}

/// [`QueueConfig::max_pull_bytes`] by default: 4 MiB (gRPC's usual
/// receive limit) less room for the answer's framing.
pub const DEFAULT_MAX_PULL_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            default_lease_seconds: 60,
            max_lease_seconds: 3_600,
            retry_backoff_ms: 1_000,
            max_pull: 100,
            max_pull_bytes: DEFAULT_MAX_PULL_BYTES,
            max_wait_ms: 30_000,
            sweep_interval_ms: 1_000,
        }
    }
}

/// Deadlines. A transfer is due by its transfer time and a release by the end
/// of its release day in England (Europe/London); the others by submission plus their window. An
/// urgent delivery is due within `urgent_hours`, or its event's deadline if sooner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadlinesConfig {
    /// An admission notice to the registered GP, hours.
    pub admission_hours: u32,
    /// A community summary back to the admitting prison, hours.
    pub community_summary_hours: u32,
    /// Any urgent delivery, hours.
    pub urgent_hours: u32,
}

impl Default for DeadlinesConfig {
    fn default() -> Self {
        Self {
            admission_hours: 24,
            community_summary_hours: 72,
            urgent_hours: 4,
        }
    }
}

impl DeadlinesConfig {
    /// The routing deadlines.
    pub fn to_deadlines(&self) -> crate::journey::Deadlines {
        let ms = |h: u32| i64::from(h) * 3_600_000;
        crate::journey::Deadlines {
            admission_ms: ms(self.admission_hours),
            community_summary_ms: ms(self.community_summary_hours),
            urgent_ms: ms(self.urgent_hours),
        }
    }
}

/// Limits against oversized input and abuse (see `docs/security.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest document accepted, bytes.
    pub max_document_bytes: usize,
    /// Largest HTTP/2 header list a client may send, bytes.
    pub max_header_list_bytes: u32,
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// Open connections per certificate identity.
    pub max_connections_per_identity: usize,
    /// TLS handshakes in progress at once; beyond it a newcomer evicts a
    /// stalled handshake or one of the heaviest source, or is closed.
    pub max_handshakes: usize,
    /// TLS handshakes in progress from one network (IPv4 /24, IPv6 /48).
    pub max_handshakes_per_network: usize,
    /// New TLS handshakes one address (IPv6: /64) may start per second,
    /// sustained (token bucket) ...
    pub handshakes_per_address_per_second: u32,
    /// ... and at once: a whole start of day behind one NAT address.
    pub handshake_burst_per_address: u32,
    /// A handshake in progress this long has stalled: when the table is full
    /// it makes room for a newcomer (the handshake timeout under pressure), ms.
    pub handshake_stall_ms: u64,
    /// Sustained calls per second per certificate identity (token bucket).
    pub requests_per_second: u32,
    /// Calls one identity may make in a burst above the sustained rate.
    pub request_burst: u32,
    /// Calls in flight across the gateway; beyond it calls are shed with
    /// `UNAVAILABLE`.
    pub max_in_flight: usize,
    /// A connection is closed gracefully after this long, so every client
    /// re-handshakes (and meets the current CRL) at least this often, s.
    pub max_connection_age_seconds: u64,
    /// Failed claims one practice may make for one patient within
    /// `claim_failure_window_hours`; then that pair is locked.
    pub claim_failures_per_pair: u32,
    /// Failed claims one practice may make within the window, all patients.
    pub claim_failures_per_practice: u32,
    /// Failed claims against one patient within the window, all practices.
    pub claim_failures_per_patient: u32,
    /// The window the failed-claim limits count over, hours.
    pub claim_failure_window_hours: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_document_bytes: 4 * 1024 * 1024,
            max_header_list_bytes: 16 * 1024,
            max_concurrent_streams: 64,
            max_connections_per_identity: 32,
            max_handshakes: 256,
            max_handshakes_per_network: 128,
            handshakes_per_address_per_second: 8,
            handshake_burst_per_address: 256,
            handshake_stall_ms: 2_000,
            requests_per_second: 1_000,
            request_burst: 2_000,
            max_in_flight: 1_024,
            max_connection_age_seconds: 3_600,
            claim_failures_per_pair: 5,
            claim_failures_per_practice: 20,
            claim_failures_per_patient: 10,
            claim_failure_window_hours: 24,
        }
    }
}

impl LimitsConfig {
    /// The failed-claim limits in force.
    pub fn claim_limits(&self) -> crate::handover::ClaimLimits {
        crate::handover::ClaimLimits {
            per_pair: self.claim_failures_per_pair,
            per_practice: self.claim_failures_per_practice,
            per_patient: self.claim_failures_per_patient,
            window_ms: i64::from(self.claim_failure_window_hours) * 3_600_000,
        }
    }
}

/// The store engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sled's page cache, bytes: the bulk of the gateway's memory (sled's
    /// own default is 1 GiB).
    pub cache_bytes: u64,
    /// Batches the store writer may apply while earlier ones wait for their
    /// barrier (0: wait for each barrier before the next batch). Nothing is
    /// answered before its barrier either way.
    pub pipeline_depth: u32,
    /// `sled` (embedded, one machine; the default) or `postgres` (one
    /// database several gateway nodes share; docs/store-engines.md).
    pub engine: crate::store::EngineKind,
    /// The PostgreSQL connection string (libpq form, key=value or URL),
    /// several hosts allowed with `target_session_attrs=read-write`.
    pub postgres_url: Option<String>,
    /// The CA (PEM) of the database servers' certificates: TLS is then
    /// required and verified. Required unless every host is on loopback.
    pub postgres_ca: Option<PathBuf>,
    /// Most database connections this node holds.
    pub postgres_pool_size: u32,
    /// Refuse to start unless the primary names a synchronous standby
    /// (`synchronous_standby_names`), so that an OK means the commit is on
    /// two machines. `false` accepts one machine's durability, as on sled.
    pub postgres_require_synchronous_standby: bool,
    /// Health answers `NOT_SERVING` once the store has passed no probe (a
    /// call through the writer and the durability barrier, or a commit on
    /// PostgreSQL) for this long: a hung `fdatasync`, a lost synchronous
    /// standby, every database connection stuck. `SERVING` again when one
    /// passes.
    pub stall_seconds: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            // 16 MiB: the same throughput as 64 here, 32-38 MiB less RSS with a
            // deep queue (docs/benchmarks.md, 2026-11-30, cache size).
            cache_bytes: 16 * 1024 * 1024,
            pipeline_depth: 8,
            engine: crate::store::EngineKind::Sled,
            postgres_url: None,
            postgres_ca: None,
            postgres_pool_size: 16,
            postgres_require_synchronous_standby: true,
            stall_seconds: 30,
        }
    }
}

impl StoreConfig {
    /// The PostgreSQL engine's settings, when it is the engine.
    pub fn postgres(&self) -> Option<crate::store::pg::PgOptions> {
        (self.engine == crate::store::EngineKind::Postgres).then(|| crate::store::pg::PgOptions {
            url: self.postgres_url.clone().unwrap_or_default(),
            ca_file: self.postgres_ca.clone(),
            pool_size: self.postgres_pool_size as usize,
            require_synchronous_standby: self.postgres_require_synchronous_standby,
        })
    }
}

/// The retention policy (see `docs/store.md`, Retention). Periods count from
/// when a handover's last delivery finished (delivered, or superseded and
/// its replacement finished); parked and quarantined handovers never expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// The payload is shredded this long after the handover finished, s.
    pub payload_grace_seconds: u64,
    /// Tracking metadata is removed this long after it finished, s.
    pub metadata_seconds: u64,
    /// Track answers "removed under the retention policy" this long after, s.
    pub tombstone_seconds: u64,
    /// Each key epoch wraps new data keys this long; a shredded payload is
    /// unreadable from any leftover copy within about this long, s.
    pub key_epoch_seconds: u64,
    /// An audit entry is removed this long after it was written, days (at
    /// least the metadata period: the trail outlives what it vouches for).
    /// Entries go from the head of the chain behind a signed cut, so the rest
    /// still verifies (docs/store.md, "The audit period").
    pub audit_days: u64,
    /// The same period in seconds, replacing `audit_days` when given (for
    /// tests and soaks with short periods); at least `metadata_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_seconds: Option<u64>,
    /// How often the retention pass runs, ms.
    pub interval_ms: u64,
    /// Most handovers one pass shreds or removes (each), and keys it rewraps.
    pub batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            payload_grace_seconds: 3 * 86_400,
            metadata_seconds: 84 * 86_400,
            tombstone_seconds: 365 * 86_400,
            key_epoch_seconds: 3_600,
            audit_days: 8 * 366,
            audit_seconds: None,
            interval_ms: 60_000,
            batch: 500,
        }
    }
}

impl RetentionConfig {
    /// The store's policy.
    pub fn to_policy(&self) -> crate::store::RetentionPolicy {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1_000)).unwrap_or(i64::MAX);
        crate::store::RetentionPolicy {
            payload_grace_ms: ms(self.payload_grace_seconds),
            metadata_ms: ms(self.metadata_seconds),
            tombstone_ms: ms(self.tombstone_seconds),
            key_epoch_ms: ms(self.key_epoch_seconds),
            audit_ms: ms(self.audit_period_seconds()),
            batch: self.batch as usize,
        }
    }

    /// The audit period in force, seconds.
    pub fn audit_period_seconds(&self) -> u64 {
        self.audit_seconds
            .unwrap_or_else(|| self.audit_days.saturating_mul(86_400))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        const TEN_YEARS: u64 = 3_653 * 86_400;
        let within = |field: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    field,
                    format!("must be between {lo} and {hi}"),
                ))
            }
        };
        within(
            "retention.payload_grace_seconds",
            self.payload_grace_seconds,
            0,
            TEN_YEARS,
        )?;
        within(
            "retention.metadata_seconds",
            self.metadata_seconds,
            self.payload_grace_seconds.max(1),
            TEN_YEARS,
        )
        .map_err(|e| {
            ConfigError::new(
                &e.field,
                format!(
                    "{} (and at least retention.payload_grace_seconds)",
                    e.reason
                ),
            )
        })?;
        within(
            "retention.tombstone_seconds",
            self.tombstone_seconds,
            0,
            TEN_YEARS,
        )?;
        within(
            "retention.key_epoch_seconds",
            self.key_epoch_seconds,
            1,
            7 * 86_400,
        )?;
        let audit = match self.audit_seconds {
            Some(seconds) => within(
                "retention.audit_seconds",
                seconds,
                self.metadata_seconds.max(1),
                100 * 366 * 86_400,
            ),
            None => within(
                "retention.audit_days",
                self.audit_days,
                self.metadata_seconds.div_ceil(86_400).max(1),
                100 * 366,
            ),
        };
        audit.map_err(|e| {
            ConfigError::new(
                &e.field,
                format!(
                    "{} (the audit trail outlives the metadata it vouches for)",
                    e.reason
                ),
            )
        })?;
        within("retention.interval_ms", self.interval_ms, 100, 86_400_000)?;
        within("retention.batch", self.batch.into(), 1, 100_000)?;
        Ok(())
    }
}

/// The Prometheus metrics listener: plain HTTP, so loopback unless a scraper
/// elsewhere needs it (see docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address serving `GET /metrics`; port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            data_dir: PathBuf::from("data"),
            certs_dir: PathBuf::from("certs"),
            dev_certs: false,
            registry: None,
            patient_key_file: None,
            master_key_file: None,
            tls: TlsConfig::default(),
            queue: QueueConfig::default(),
            limits: LimitsConfig::default(),
            deadlines: DeadlinesConfig::default(),
            metrics: MetricsConfig::default(),
            store: StoreConfig::default(),
            retention: RetentionConfig::default(),
            shutdown_grace_ms: 10_000,
            integrity: IntegrityConfig::default(),
            pds: crate::pds::PdsConfig::default(),
            telemetry: crate::telemetry::TelemetryConfig::default(),
            mllp: crate::mllp::MllpConfig::default(),
            mesh: crate::mesh::MeshConfig::default(),
        }
    }
}

/// Values from flags or the environment that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `THROUGHCARE_LISTEN`.
    pub listen: Option<String>,
    /// `--data-dir` / `THROUGHCARE_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--certs-dir` / `THROUGHCARE_CERTS_DIR`.
    pub certs_dir: Option<PathBuf>,
    /// `--registry` / `THROUGHCARE_REGISTRY`.
    pub registry: Option<PathBuf>,
    /// `--crl` / `THROUGHCARE_CRL`.
    pub crl: Option<PathBuf>,
    /// `--metrics-listen` / `THROUGHCARE_METRICS_LISTEN`.
    pub metrics_listen: Option<String>,
    /// `--witness-dir` / `THROUGHCARE_WITNESS_DIR`.
    pub witness_dir: Option<PathBuf>,
    /// `--dev-certs`.
    pub dev_certs: Option<bool>,
}

/// The prefix of every configuration variable.
pub const ENV_PREFIX: &str = "THROUGHCARE_";

/// The environment variable that sets the field at dotted path `field`:
/// `queue.max_attempts` is `THROUGHCARE_QUEUE_MAX_ATTEMPTS`.
pub fn env_var(field: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        field.replace('.', "_").to_ascii_uppercase()
    )
}

/// The JSON value of an environment variable's text for a field whose
/// current value is `current` (its type: a number stays a number, a path or
/// address a string; an unset optional field takes a number or a boolean
/// when the text is one). Text of the wrong type stays text, so the
/// deserializer names the field.
fn env_value(raw: &str, current: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let number = || {
        raw.parse::<u64>()
            .map(Value::from)
            .or_else(|_| raw.parse::<i64>().map(Value::from))
            .ok()
            .or_else(|| raw.parse::<f64>().ok().map(Value::from))
    };
    let boolean = || match raw.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(Value::Bool(true)),
        "false" | "0" | "no" | "off" => Some(Value::Bool(false)),
        _ => None,
    };
    let text = || Value::String(raw.to_owned());
    match current {
        Value::Number(_) => number().unwrap_or_else(text),
        Value::Bool(_) => boolean().unwrap_or_else(text),
        Value::Null => number()
            .or_else(|| (raw == "true" || raw == "false").then(|| Value::Bool(raw == "true")))
            .unwrap_or_else(text),
        _ => text(),
    }
}

impl Config {
    /// Reads `path` (when given), applies `overrides`, and validates.
    ///
    /// # Errors
    /// The first field that is wrong.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with_env(path, overrides, &|name| std::env::var(name).ok())
    }

    /// As [`Config::load`], reading variables through `env`.
    ///
    /// # Errors
    /// The first field that is wrong, with the variable that set it.
    pub fn load_with_env(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(&path.display().to_string(), format!("cannot read: {e}"))
                })?;
                Config::from_toml(&text)?
            }
            None => Config {
                dev_certs: true,
                ..Config::default()
            },
        };
        let (config, from_env) = config.with_env(env)?;
        config.with_overrides(overrides).map_err(|mut e| {
            if from_env.contains(&e.field) {
                e.reason = format!("{} (set by {})", e.reason, env_var(&e.field));
            }
            e
        })
    }

    /// Every field whose variable is set takes its value; returns the new
    /// configuration and the fields set.
    fn with_env(
        self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut tree = serde_json::to_value(&self).expect("a Config is JSON");
        let mut set = Vec::new();
        let serde_json::Value::Object(top) = &mut tree else {
            unreachable!("a Config is a JSON object")
        };
        for (name, value) in top.iter_mut() {
            let leaves: Vec<(String, &mut serde_json::Value)> = match value {
                serde_json::Value::Object(section) => section
                    .iter_mut()
                    .map(|(field, leaf)| (format!("{name}.{field}"), leaf))
                    .collect(),
                leaf => vec![(name.clone(), leaf)],
            };
            for (path, leaf) in leaves {
                if let Some(raw) = env(&env_var(&path)).filter(|v| !v.is_empty()) {
                    *leaf = env_value(&raw, leaf);
                    set.push(path);
                }
            }
        }
        if set.is_empty() {
            return Ok((self, set));
        }
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::new(
                &field,
                format!("{} (set by {})", e.into_inner(), env_var(&field)),
            )
        })?;
        Ok((config, set))
    }

    /// Applies the command line's values and validates.
    fn with_overrides(mut self, overrides: &Overrides) -> Result<Config, ConfigError> {
        let config = &mut self;
        if let Some(listen) = &overrides.listen {
            config.listen = listen.parse().map_err(|_| {
                ConfigError::new(
                    "listen",
                    format!("`{listen}` is not an address like 127.0.0.1:7443"),
                )
            })?;
        }
        if let Some(listen) = &overrides.metrics_listen {
            config.metrics.listen = listen.parse().map_err(|_| {
                ConfigError::new(
                    "metrics.listen",
                    format!("`{listen}` is not an address like 127.0.0.1:9464"),
                )
            })?;
        }
        if let Some(dir) = &overrides.data_dir {
            config.data_dir.clone_from(dir);
        }
        if let Some(dir) = &overrides.certs_dir {
            config.certs_dir.clone_from(dir);
        }
        if overrides.registry.is_some() {
            config.registry.clone_from(&overrides.registry);
        }
        if overrides.crl.is_some() {
            config.tls.crl.clone_from(&overrides.crl);
        }
        if overrides.witness_dir.is_some() {
            config
                .integrity
                .witness_dir
                .clone_from(&overrides.witness_dir);
        }
        if let Some(dev_certs) = overrides.dev_certs {
            config.dev_certs = dev_certs;
        }
        self.validate()?;
        Ok(self)
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// Syntax errors and unknown or mistyped fields, named.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|span| field_at(text, span.start))
                .unwrap_or_else(|| "config file".into());
            let place = e.span().map_or_else(String::new, |span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" (line {line}, column {column})")
            });
            ConfigError::new(&field, format!("{}{place}", e.message()))
        })
    }

    /// Checks every value's range.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_queue_and_deadlines()?;
        self.validate_limits()?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        let metrics = self.metrics.listen;
        if metrics.port() != 0
            && metrics.port() == self.listen.port()
            && (metrics.ip() == self.listen.ip()
                || metrics.ip().is_unspecified()
                || self.listen.ip().is_unspecified())
        {
            return Err(ConfigError::new(
                "metrics.listen",
                "must not be the gRPC listener's address",
            ));
        }
        within(
            "store.cache_bytes",
            self.store.cache_bytes,
            1024 * 1024,
            64 * 1024 * 1024 * 1024,
        )?;
        within(
            "store.pipeline_depth",
            u64::from(self.store.pipeline_depth),
            0,
            crate::store::MAX_PIPELINE_DEPTH as u64,
        )?;
        within("store.stall_seconds", self.store.stall_seconds, 1, 3_600)?;
        self.retention.validate()?;
        self.validate_postgres()?;
        self.validate_integrity()?;
        self.pds.validate()?;
        self.telemetry.validate()?;
        self.mllp.validate(
            self.limits.max_document_bytes,
            &[
                ("gRPC listener", self.listen),
                ("metrics listener", self.metrics.listen),
            ],
        )?;
        self.mesh.validate(self.queue.max_lease_seconds)?;
        for (i, name) in self.tls.operators.iter().flatten().enumerate() {
            if !crate::tls::is_operator_name(name) {
                return Err(ConfigError::new(
                    &format!("tls.operators[{i}]"),
                    "an operator's name as its certificate carries it after `urn:operator:`: \
                     letters, digits and `-`",
                ));
            }
        }
        if self.tls.handshake_timeout_ms == Some(0) {
            return Err(ConfigError::new(
                "tls.handshake_timeout_ms",
                "must be greater than 0",
            ));
        }
        Ok(())
    }

    /// The PostgreSQL engine: a usable connection string, TLS unless every
    /// host is on loopback, and a pool size in range.
    fn validate_postgres(&self) -> Result<(), ConfigError> {
        let store = &self.store;
        if store.engine != crate::store::EngineKind::Postgres {
            return Ok(());
        }
        let url = store.postgres_url.as_deref().unwrap_or_default();
        if url.trim().is_empty() {
            return Err(ConfigError::new(
                "store.postgres_url",
                "is required when store.engine is \"postgres\"",
            ));
        }
        crate::store::pg::check_target(url, store.postgres_ca.is_some()).map_err(
            |(about_ca, why)| {
                let field = if about_ca {
                    "store.postgres_ca"
                } else {
                    "store.postgres_url"
                };
                ConfigError::new(field, why)
            },
        )?;
        if let Some(ca) = &store.postgres_ca
            && !ca.is_file()
        {
            return Err(ConfigError::new(
                "store.postgres_ca",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        within(
            "store.postgres_pool_size",
            store.postgres_pool_size.into(),
            1,
            256,
        )?;
        Ok(())
    }

    /// The queue's counts and times, and the deadlines.
    fn validate_queue_and_deadlines(&self) -> Result<(), ConfigError> {
        let q = &self.queue;
        let positive = |field: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::new(field, "must be greater than 0"))
            } else {
                Ok(())
            }
        };
        positive("queue.max_attempts", q.max_attempts.into())?;
        positive(
            "queue.default_lease_seconds",
            q.default_lease_seconds.into(),
        )?;
        positive("queue.max_pull", q.max_pull.into())?;
        positive("queue.sweep_interval_ms", q.sweep_interval_ms)?;
        let d = &self.deadlines;
        for (field, hours) in [
            ("deadlines.admission_hours", d.admission_hours),
            (
                "deadlines.community_summary_hours",
                d.community_summary_hours,
            ),
            ("deadlines.urgent_hours", d.urgent_hours),
        ] {
            if !(1..=24 * 365).contains(&hours) {
                return Err(ConfigError::new(field, "must be 1 to 8760 hours"));
            }
        }
        if q.max_attempts > 100 {
            return Err(ConfigError::new(
                "queue.max_attempts",
                "must be at most 100",
            ));
        }
        if q.max_lease_seconds < q.default_lease_seconds {
            return Err(ConfigError::new(
                "queue.max_lease_seconds",
                "must be at least queue.default_lease_seconds",
            ));
        }
        if q.max_pull > 1_000 {
            return Err(ConfigError::new("queue.max_pull", "must be at most 1000"));
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&q.max_pull_bytes) {
            return Err(ConfigError::new(
                "queue.max_pull_bytes",
                "must be 65536 to 67108864 (64 KiB to 64 MiB)",
            ));
        }
        Ok(())
    }

    /// The edge limits, each within its range (checked in this order).
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let max_doc = self.limits.max_document_bytes;
        if !(1_024..=64 * 1024 * 1024).contains(&max_doc) {
            return Err(ConfigError::new(
                "limits.max_document_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        let l = &self.limits;
        let pair = u64::from(l.claim_failures_per_pair);
        let ranges: [(&str, u64, u64, u64); 16] = [
            (
                "limits.max_header_list_bytes",
                l.max_header_list_bytes.into(),
                1_024,
                1024 * 1024,
            ),
            (
                "limits.max_concurrent_streams",
                l.max_concurrent_streams.into(),
                1,
                10_000,
            ),
            (
                "limits.max_connections_per_identity",
                l.max_connections_per_identity as u64,
                1,
                10_000,
            ),
            ("limits.max_handshakes", l.max_handshakes as u64, 1, 100_000),
            (
                "limits.max_handshakes_per_network",
                l.max_handshakes_per_network as u64,
                1,
                l.max_handshakes as u64,
            ),
            (
                "limits.handshakes_per_address_per_second",
                l.handshakes_per_address_per_second.into(),
                1,
                100_000,
            ),
            (
                "limits.handshake_burst_per_address",
                l.handshake_burst_per_address.into(),
                1,
                1_000_000,
            ),
            (
                "limits.handshake_stall_ms",
                l.handshake_stall_ms,
                100,
                600_000,
            ),
            (
                "limits.requests_per_second",
                l.requests_per_second.into(),
                1,
                1_000_000,
            ),
            ("limits.request_burst", l.request_burst.into(), 1, 1_000_000),
            ("limits.max_in_flight", l.max_in_flight as u64, 1, 1_000_000),
            (
                "limits.max_connection_age_seconds",
                l.max_connection_age_seconds,
                1,
                7 * 24 * 3_600,
            ),
            ("limits.claim_failures_per_pair", pair, 1, 100),
            (
                "limits.claim_failures_per_practice",
                l.claim_failures_per_practice.into(),
                pair,
                10_000,
            ),
            (
                "limits.claim_failures_per_patient",
                l.claim_failures_per_patient.into(),
                pair,
                10_000,
            ),
            (
                "limits.claim_failure_window_hours",
                l.claim_failure_window_hours.into(),
                1,
                24 * 31,
            ),
        ];
        for (field, v, lo, hi) in ranges {
            within(field, v, lo, hi)?;
        }
        Ok(())
    }

    /// The witness and the audit key must be where a restore or copy of the
    /// data directory cannot take them along.
    fn validate_integrity(&self) -> Result<(), ConfigError> {
        use crate::store::high_water::is_within;
        let witness = self.witness_dir();
        if is_within(&witness, &self.data_dir) {
            return Err(ConfigError::new(
                "integrity.witness_dir",
                "must be outside data_dir: a restored data directory would bring its witness back with it",
            ));
        }
        if is_within(&self.data_dir, &witness) {
            return Err(ConfigError::new(
                "integrity.witness_dir",
                "must not contain data_dir",
            ));
        }
        if is_within(&self.audit_key_file(), &self.data_dir) {
            return Err(ConfigError::new(
                "integrity.audit_key_file",
                "must be outside data_dir: whoever can write the store must not hold the key that proves it",
            ));
        }
        Ok(())
    }

    /// The witness directory in force.
    pub fn witness_dir(&self) -> PathBuf {
        self.integrity
            .witness_dir
            .clone()
            .unwrap_or_else(|| crate::store::high_water::default_dir(&self.data_dir))
    }

    /// The audit key file in force.
    pub fn audit_key_file(&self) -> PathBuf {
        self.integrity
            .audit_key_file
            .clone()
            .unwrap_or_else(|| self.witness_dir().join("audit-key"))
    }

    /// The store's options for its witness and audit key.
    pub fn store_witness(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            witness_dir: Some(self.witness_dir()),
            audit_key_file: Some(self.audit_key_file()),
            master_key_file: self.master_key_file.clone(),
            ..crate::store::StoreOptions::default()
        }
    }

    /// The TLS files in force (explicit, or the dev PKI's).
    pub fn tls_files(&self) -> crate::tls::TlsFiles {
        let dev = crate::certs::DevPaths {
            dir: self.certs_dir.clone(),
        };
        crate::tls::TlsFiles {
            ca: self.tls.ca.clone().unwrap_or_else(|| dev.ca_cert()),
            cert: self.tls.cert.clone().unwrap_or_else(|| dev.server_cert()),
            key: self.tls.key.clone().unwrap_or_else(|| dev.server_key()),
            crl: self.tls.crl.clone(),
        }
    }

    /// The registry file in force.
    pub fn registry_path(&self) -> PathBuf {
        self.registry.clone().unwrap_or_else(|| {
            crate::certs::DevPaths {
                dir: self.certs_dir.clone(),
            }
            .registry()
        })
    }
}

/// The dotted name of the key on the line holding byte `at` of a TOML text.
fn field_at(text: &str, at: usize) -> String {
    let before = text.get(..at).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    let table = before[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .map(str::to_owned)
    });
    match (table, key.is_empty() || key.starts_with('[')) {
        (_, true) => "config file".into(),
        (Some(t), false) => format!("{t}.{key}"),
        (None, false) => key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_is_the_default() {
        let text = include_str!("../docs/throughcare.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn defaults_are_valid_and_fields_are_named() {
        Config::default().validate().unwrap();
        let err = Config::from_toml("[queue]\nmax_attempts = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "queue.max_attempts");
        let err = Config::from_toml("[queue]\nmax_atempts = 3\n").unwrap_err();
        assert_eq!(err.field, "queue.max_atempts", "{err}");
        assert!(err.to_string().contains("line 2, column 1"), "{err}");
        let err = Config::from_toml("data_dir = \"d\"\n[queue\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = Config::from_toml("data_dir = \"d\"\nlisten = \"nowhere\"\n").unwrap_err();
        assert_eq!(err.field, "listen", "{err}");
        let err = Config::load(
            None,
            &Overrides {
                listen: Some("bad".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.field, "listen");
    }

    #[test]
    fn retention_periods_are_checked() {
        let check = |text: &str| Config::from_toml(text).unwrap().validate();
        let err =
            check("[retention]\npayload_grace_seconds = 100\nmetadata_seconds = 99\n").unwrap_err();
        assert_eq!(err.field, "retention.metadata_seconds", "{err}");
        let err = check("[retention]\naudit_days = 30\n").unwrap_err();
        assert_eq!(err.field, "retention.audit_days", "{err}");
        let err = check("[retention]\npayload_grace_seconds = 60\nmetadata_seconds = 600\naudit_seconds = 599\n").unwrap_err();
        assert_eq!(err.field, "retention.audit_seconds", "{err}");
        let short =
            Config::from_toml("[retention]\npayload_grace_seconds = 60\nmetadata_seconds = 600\naudit_seconds = 600\n")
                .unwrap();
        short.validate().unwrap();
        assert_eq!(short.retention.to_policy().audit_ms, 600_000);
        let err = check("[retention]\nkey_epoch_seconds = 0\n").unwrap_err();
        assert_eq!(err.field, "retention.key_epoch_seconds", "{err}");
        let err = check("[store]\ncache_bytes = 1000\n").unwrap_err();
        assert_eq!(err.field, "store.cache_bytes", "{err}");
        for bytes in [1_000, 64 * 1024 * 1024 + 1] {
            let err = check(&format!("[queue]\nmax_pull_bytes = {bytes}\n")).unwrap_err();
            assert_eq!(err.field, "queue.max_pull_bytes", "{err}");
        }
        // A small document limit does not narrow the pull budget.
        check("[limits]\nmax_document_bytes = 8192\n[queue]\nmax_pull_bytes = 65536\n").unwrap();
        check("[retention]\npayload_grace_seconds = 0\nmetadata_seconds = 1\n").unwrap();
        let policy = RetentionConfig::default().to_policy();
        assert_eq!(policy.payload_grace_ms, 3 * 86_400_000);
        assert_eq!(policy.metadata_ms, 84 * 86_400_000);
    }

    #[test]
    fn the_witness_and_audit_key_stay_out_of_the_data_directory() {
        let config = Config::default();
        assert!(config.witness_dir().ends_with("data.witness"));
        config.validate().unwrap();
        for (toml, field) in [
            (
                "data_dir = \"d\"\n[integrity]\nwitness_dir = \"d/w\"\n",
                "integrity.witness_dir",
            ),
            (
                "data_dir = \"d/w\"\n[integrity]\nwitness_dir = \"d\"\n",
                "integrity.witness_dir",
            ),
            (
                "data_dir = \"d\"\n[integrity]\nwitness_dir = \"./d/../d\"\n",
                "integrity.witness_dir",
            ),
            (
                "data_dir = \"d\"\n[integrity]\naudit_key_file = \"d/audit-key\"\n",
                "integrity.audit_key_file",
            ),
        ] {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            assert_eq!(err.field, field, "{toml}");
        }
        let ok =
            Config::from_toml("data_dir = \"d\"\n[integrity]\nwitness_dir = \"dw\"\n").unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.audit_key_file(), PathBuf::from("dw/audit-key"));
    }

    #[test]
    fn edge_limits_are_checked_and_named() {
        for (toml, field) in [
            (
                "claim_failures_per_pair = 0",
                "limits.claim_failures_per_pair",
            ),
            (
                "claim_failures_per_pair = 6\nclaim_failures_per_practice = 5",
                "limits.claim_failures_per_practice",
            ),
            (
                "claim_failures_per_patient = 2",
                "limits.claim_failures_per_patient",
            ),
            (
                "claim_failure_window_hours = 0",
                "limits.claim_failure_window_hours",
            ),
            (
                "max_handshakes_per_network = 300",
                "limits.max_handshakes_per_network",
            ),
            (
                "handshakes_per_address_per_second = 0",
                "limits.handshakes_per_address_per_second",
            ),
            (
                "handshake_burst_per_address = 0",
                "limits.handshake_burst_per_address",
            ),
            ("handshake_stall_ms = 10", "limits.handshake_stall_ms"),
        ] {
            let err = Config::from_toml(&format!("[limits]\n{toml}\n"))
                .unwrap()
                .validate()
                .unwrap_err();
            assert_eq!(err.field, field, "{toml}: {err}");
        }
        // The old per-address cap is gone, and says so by name.
        let err = Config::from_toml("[limits]\nmax_handshakes_per_address = 16\n").unwrap_err();
        assert_eq!(err.field, "limits.max_handshakes_per_address", "{err}");
    }

    fn with_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load_with_env(None, &Overrides::default(), &|name| vars.get(name).cloned())
    }

    /// Every field's dotted path, from the JSON form of the defaults.
    fn every_field() -> Vec<String> {
        let tree = serde_json::to_value(Config::default()).unwrap();
        let mut fields = Vec::new();
        for (name, value) in tree.as_object().unwrap() {
            match value.as_object() {
                Some(section) => fields.extend(section.keys().map(|f| format!("{name}.{f}"))),
                None => fields.push(name.clone()),
            }
        }
        fields
    }

    #[test]
    fn environment_variables_set_fields_of_every_kind() {
        let config = with_env(&[
            ("THROUGHCARE_QUEUE_MAX_ATTEMPTS", "7"),
            ("THROUGHCARE_LISTEN", "127.0.0.1:8443"),
            ("THROUGHCARE_METRICS_LISTEN", "127.0.0.1:0"),
            ("THROUGHCARE_TLS_HANDSHAKE_TIMEOUT_MS", "2500"),
            ("THROUGHCARE_TLS_CA", "/etc/throughcare/ca.pem"),
            ("THROUGHCARE_INTEGRITY_WITNESS_DIR", "/srv/witness"),
            ("THROUGHCARE_DEV_CERTS", "false"),
            ("THROUGHCARE_RETENTION_BATCH", "42"),
            ("THROUGHCARE_REGISTRY", ""),
            ("THROUGHCARE_TELEMETRY_ENABLED", "true"),
            ("THROUGHCARE_TELEMETRY_SAMPLING_RATIO", "0.25"),
        ])
        .unwrap();
        assert!(config.telemetry.enabled);
        assert!((config.telemetry.sampling_ratio - 0.25).abs() < f64::EPSILON);
        assert_eq!(config.queue.max_attempts, 7);
        assert_eq!(config.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(config.metrics.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(config.tls.handshake_timeout_ms, Some(2_500));
        assert_eq!(
            config.tls.ca,
            Some(PathBuf::from("/etc/throughcare/ca.pem"))
        );
        assert_eq!(
            config.integrity.witness_dir,
            Some(PathBuf::from("/srv/witness"))
        );
        assert!(!config.dev_certs);
        assert_eq!(config.retention.batch, 42);
        // Empty is unset.
        assert_eq!(config.registry, None);
        // Without a file or a variable: the development defaults.
        assert!(with_env(&[]).unwrap().dev_certs);
        assert_eq!(with_env(&[]).unwrap().queue, QueueConfig::default());
    }

    #[test]
    fn a_bad_environment_value_names_the_field_and_the_variable() {
        let err = with_env(&[("THROUGHCARE_QUEUE_MAX_ATTEMPTS", "0")]).unwrap_err();
        assert_eq!(err.field, "queue.max_attempts");
        assert!(
            err.to_string().contains("THROUGHCARE_QUEUE_MAX_ATTEMPTS"),
            "{err}"
        );
        let err = with_env(&[("THROUGHCARE_QUEUE_MAX_ATTEMPTS", "many")]).unwrap_err();
        assert_eq!(err.field, "queue.max_attempts");
        assert!(
            err.reason.contains("THROUGHCARE_QUEUE_MAX_ATTEMPTS"),
            "{err}"
        );
        let err =
            with_env(&[("THROUGHCARE_LIMITS_MAX_HANDSHAKES_PER_NETWORK", "100000")]).unwrap_err();
        assert_eq!(err.field, "limits.max_handshakes_per_network");
        assert!(
            err.reason
                .contains("THROUGHCARE_LIMITS_MAX_HANDSHAKES_PER_NETWORK")
        );
        let err = with_env(&[("THROUGHCARE_TELEMETRY_SAMPLING_RATIO", "2")]).unwrap_err();
        assert_eq!(err.field, "telemetry.sampling_ratio");
        assert!(
            err.reason.contains("THROUGHCARE_TELEMETRY_SAMPLING_RATIO"),
            "{err}"
        );
        let err = with_env(&[("THROUGHCARE_LISTEN", "nowhere")]).unwrap_err();
        assert_eq!(err.field, "listen");
        assert!(err.reason.contains("THROUGHCARE_LISTEN"), "{err}");
        // A field the variable did not set is named without one.
        let err = with_env(&[
            ("THROUGHCARE_DATA_DIR", "d"),
            ("THROUGHCARE_INTEGRITY_WITNESS_DIR", "d/w"),
        ])
        .unwrap_err();
        assert_eq!(err.field, "integrity.witness_dir");
    }

    #[test]
    fn the_operators_list_is_an_array_or_a_variable_of_names_and_commas() {
        let config =
            with_env(&[("THROUGHCARE_TLS_OPERATORS", "oncall, caldicott-guardian")]).unwrap();
        assert_eq!(
            config.tls.operators,
            Some(vec!["oncall".to_owned(), "caldicott-guardian".to_owned()])
        );
        let config: Config = toml::from_str("[tls]\noperators = [\"oncall\"]").unwrap();
        assert_eq!(config.tls.operators, Some(vec!["oncall".to_owned()]));
        let err = with_env(&[("THROUGHCARE_TLS_OPERATORS", "oncall,,x")]).unwrap_err();
        assert_eq!(err.field, "tls.operators[1]");
    }

    #[test]
    fn every_field_has_a_variable_and_docs_name_it() {
        let docs = include_str!("../docs/operations.md");
        let fields = every_field();
        assert!(fields.len() > 50, "{}", fields.len());
        for field in &fields {
            let var = env_var(field);
            assert!(
                docs.contains(&format!("`{var}`")),
                "{var} is not in docs/operations.md"
            );
            // Each variable reaches its field: set it to the field's own
            // default text and the configuration still loads.
            let value = serde_json::to_value(Config::default()).unwrap();
            let leaf = field.split('.').fold(&value, |v, part| &v[part]);
            let text = match leaf {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            with_env(&[(var.as_str(), text.as_str())])
                .unwrap_or_else(|e| panic!("{var}={text}: {e}"));
        }
    }

    #[test]
    fn the_postgres_engine_is_checked_before_it_is_used() {
        let pg = |store: StoreConfig| {
            Config {
                store: StoreConfig {
                    engine: crate::store::EngineKind::Postgres,
                    ..store
                },
                ..Config::default()
            }
            .validate()
        };
        let url = |u: &str| StoreConfig {
            postgres_url: Some(u.into()),
            ..StoreConfig::default()
        };
        assert_eq!(
            pg(StoreConfig::default()).unwrap_err().field,
            "store.postgres_url"
        );
        assert!(pg(url("host=127.0.0.1 port=5432 user=tc dbname=tc")).is_ok());
        assert!(pg(url("postgresql://tc@localhost/tc")).is_ok());
        // Not loopback: TLS is required, so the CA must be named.
        let err = pg(url("host=db.example.nhs.uk user=tc")).unwrap_err();
        assert_eq!(err.field, "store.postgres_ca");
        assert!(err.reason.contains("loopback"), "{err}");
        // Several hosts: only the writable one may be used.
        let err = pg(url("host=127.0.0.1,127.0.0.2 user=tc")).unwrap_err();
        assert_eq!(err.field, "store.postgres_url");
        assert!(
            err.reason.contains("target_session_attrs=read-write"),
            "{err}"
        );
        assert!(
            pg(url(
                "host=127.0.0.1,127.0.0.2 user=tc target_session_attrs=read-write"
            ))
            .is_ok()
        );
        let err = pg(url("host=127.0.0.1 sslmode=bogus")).unwrap_err();
        assert_eq!(err.field, "store.postgres_url");
        let err = pg(StoreConfig {
            postgres_ca: Some("/nonexistent/ca.pem".into()),
            ..url("host=db.example.nhs.uk user=tc")
        })
        .unwrap_err();
        assert_eq!(err.field, "store.postgres_ca");
        let err = pg(StoreConfig {
            postgres_pool_size: 0,
            ..url("host=127.0.0.1")
        })
        .unwrap_err();
        assert_eq!(err.field, "store.postgres_pool_size");
    }

    #[test]
    fn the_postgres_engine_and_its_settings_come_from_the_environment_too() {
        let c = with_env(&[
            ("THROUGHCARE_STORE_ENGINE", "postgres"),
            ("THROUGHCARE_STORE_POSTGRES_URL", "host=127.0.0.1 dbname=tc"),
            ("THROUGHCARE_STORE_POSTGRES_POOL_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!(c.store.engine, crate::store::EngineKind::Postgres);
        assert_eq!(c.store.postgres_pool_size, 4);
        let err = with_env(&[("THROUGHCARE_STORE_ENGINE", "oracle")]).unwrap_err();
        assert_eq!(err.field, "store.engine");
        assert!(err.reason.contains("THROUGHCARE_STORE_ENGINE"), "{err}");
    }

    #[test]
    fn the_metrics_listener_is_checked() {
        let err = Config::from_toml("[metrics]\nlisten = \"9464\"\n").unwrap_err();
        assert_eq!(err.field, "metrics.listen", "{err}");
        let clash = Config::from_toml(
            "listen = \"127.0.0.1:7000\"\n[metrics]\nlisten = \"0.0.0.0:7000\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert_eq!(clash.field, "metrics.listen");
        let err = Config::load(
            None,
            &Overrides {
                metrics_listen: Some("loopback".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.field, "metrics.listen");
        let ok = Config::load(
            None,
            &Overrides {
                metrics_listen: Some("127.0.0.1:0".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(ok.metrics.listen, "127.0.0.1:0".parse().unwrap());
    }
}
