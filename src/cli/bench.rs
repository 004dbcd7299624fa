//! `throughcare bench`: starts a fresh gateway (this binary, `serve`) on a
//! temporary directory and drives it over mutual TLS: many concurrent
//! submitters, then pull + ack of everything. Prints durable submits/s,
//! submit latency p50/p99, messages per fsync, pull+ack/s and peak RSS.
//! `--soak` instead runs submit, pull and ack at a fixed rate for some
//! minutes with a short retention policy and prints the data directory's
//! size and the server's RSS over time: both must level off.

use std::fmt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncBufReadExt;

use crate::grpc::pb;

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Handovers to submit (all stay queued until the pull phase).
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Size of each document, bytes.
    #[arg(long, default_value_t = 4096)]
    pub doc_bytes: usize,
    /// TLS connections the clients share.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Measure translation throughput (FHIR ⇄ model ⇄ HL7 v2) instead, on one core.
    #[arg(long)]
    pub translation: bool,
    /// The releasing prison. `YP001`'s region routes every release to the GP
    /// and to probation (two deliveries); `YP002` has no region (one delivery).
    #[arg(long, default_value = "YP001")]
    pub sender: String,
    /// Steady state instead: submit, pull and ack at `--rate` for
    /// `--minutes`, with a short retention policy.
    #[arg(long)]
    pub soak: bool,
    /// Soak length, minutes.
    #[arg(long, default_value_t = 5)]
    pub minutes: u64,
    /// Soak submits per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Soak retention: payload grace, seconds (metadata and tombstones
    /// are kept twice this, audit entries three times, key epochs last half
    /// of it).
    #[arg(long, default_value_t = 30)]
    pub grace_seconds: u64,
    /// First measure a null handler (stores nothing) on the same listener,
    /// TLS stack, limit layers and clients, and print the gateway's
    /// throughput as a share of it.
    #[arg(long)]
    pub baseline: bool,
    /// The gateway's `[store] pipeline_depth` (0: the writer waits for each
    /// barrier), to compare with the default in one build.
    #[arg(long)]
    pub pipeline_depth: Option<u32>,
    /// The store engine to measure (docs/store-engines.md).
    #[arg(long, value_enum, default_value_t = BenchEngine::Sled)]
    pub engine: BenchEngine,
    /// With `--engine postgres`: the connection string of an empty
    /// database the bench may fill.
    #[arg(long, env = "THROUGHCARE_BENCH_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// The gateway's `[store] cache_bytes`, in MiB (sled's page cache), to
    /// compare memory and throughput with the default in one build.
    #[arg(long, hide = true)]
    pub cache_mib: Option<u64>,
    /// Keep the certificates, the config and the store in this new
    /// directory, and stop once everything is queued (no restart, nothing
    /// pulled): a queue at rest to copy and profile restarts on
    /// (`serve --config DIR/bench.toml --data-dir DIR/data --certs-dir DIR/certs`).
    #[arg(long, hide = true)]
    pub keep_dir: Option<std::path::PathBuf>,
    /// Consumers pulling (100 at a time) and acknowledging concurrently in
    /// the pull phase.
    #[arg(long, default_value_t = 4)]
    pub pullers: usize,
    /// Acknowledge each delivery with its own Ack (concurrently) instead of
    /// one AckBatch per pull, to compare the two in one build.
    #[arg(long, hide = true)]
    pub single_acks: bool,
}

/// The engines `bench` can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchEngine {
    /// Embedded sled (the default).
    Sled,
    /// PostgreSQL at `--postgres-url`.
    Postgres,
}

impl BenchOptions {
    /// The gateway's `[store]` section for these options.
    fn store_section(&self) -> anyhow::Result<String> {
        let mut section = String::from("[store]\n");
        if let Some(d) = self.pipeline_depth {
            section.push_str(&format!("pipeline_depth = {d}\n"));
        }
        if let Some(mib) = self.cache_mib {
            section.push_str(&format!("cache_bytes = {}\n", mib * 1024 * 1024));
        }
        if self.engine == BenchEngine::Postgres {
            let url = self
                .postgres_url
                .as_deref()
                .context("--postgres-url: required with --engine postgres")?;
            section.push_str(&format!(
                "engine = \"postgres\"\npostgres_url = {}\n",
                toml::Value::String(url.to_owned())
            ));
        }
        Ok(section)
    }
}

/// Measured figures.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    /// Options used.
    pub clients: usize,
    /// Handovers submitted.
    pub messages: usize,
    /// Document size.
    pub doc_bytes: usize,
    /// Durable submits per second.
    pub submits_per_s: f64,
    /// Submit latency, median.
    pub p50: Duration,
    /// Submit latency, 99th percentile.
    pub p99: Duration,
    /// Server RSS with every message queued, MiB.
    pub rss_queued_mib: f64,
    /// The same, after two quiet seconds (the queue at rest).
    pub rss_rest_mib: f64,
    /// Pull + ack per second.
    pub pull_ack_per_s: f64,
    /// How the pull phase ran: consumers, and AckBatch or one Ack each.
    pub pull_shape: String,
    /// Server peak RSS, MiB.
    pub peak_rss_mib: f64,
    /// Durability barriers during the submit phase.
    pub barriers: u64,
    /// fdatasync calls during the submit phase.
    pub fdatasyncs: u64,
    /// Submits the server answered OK after a barrier.
    pub durable_submits: u64,
    /// Time to restart with everything queued, until serving.
    pub restart: Duration,
    /// The null handler's figures in the same run (`--baseline`).
    pub baseline: Option<Phase>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_barrier = self.durable_submits as f64 / self.barriers.max(1) as f64;
        writeln!(
            f,
            "throughcare bench: {} handovers of {} bytes, {} concurrent clients, mutual TLS on 127.0.0.1",
            self.messages, self.doc_bytes, self.clients
        )?;
        writeln!(f, "  durable submits/s      {:>10.0}", self.submits_per_s)?;
        if let Some(b) = &self.baseline {
            writeln!(
                f,
                "  null handler submits/s {:>10.0}   (p99 {:.2} ms; same listener, TLS, limits and clients)",
                b.per_s,
                ms(b.p99)
            )?;
            writeln!(
                f,
                "  gateway / null handler {:>10.1} %",
                100.0 * self.submits_per_s / b.per_s.max(f64::MIN_POSITIVE)
            )?;
        }
        writeln!(f, "  submit latency p50     {:>10.2} ms", ms(self.p50))?;
        writeln!(f, "  submit latency p99     {:>10.2} ms", ms(self.p99))?;
        if self.barriers == 0 {
            // The PostgreSQL engine: no group commit to count.
            writeln!(
                f,
                "  messages per barrier          n/a   (no group commit: each submit is one database COMMIT)"
            )?;
        } else {
            writeln!(f, "  messages per barrier   {per_barrier:>10.1}")?;
            writeln!(
                f,
                "    ({} barriers, {} fdatasyncs; the server answered {} submits OK, each after its barrier)",
                self.barriers, self.fdatasyncs, self.durable_submits
            )?;
        }
        writeln!(
            f,
            "  RSS with all queued    {:>10.1} MiB   (at rest 2 s later: {:.1} MiB)",
            self.rss_queued_mib, self.rss_rest_mib
        )?;
        writeln!(
            f,
            "  restart, all queued    {:>10.2} s",
            self.restart.as_secs_f64()
        )?;
        writeln!(
            f,
            "  pull+ack/s             {:>10.0}   ({})",
            self.pull_ack_per_s, self.pull_shape
        )?;
        writeln!(
            f,
            "  peak RSS               {:>10.1} MiB",
            self.peak_rss_mib
        )
    }
}

/// Release summary `i`, of invented patient `i` (one patient per message, so
/// no summary supersedes another).
fn document(i: usize, padding: &str, sender: &str) -> pb::ClinicalSummary {
    let letter = |n: usize| char::from(b'A' + u8::try_from(n % 26).unwrap_or(0));
    let summary = crate::clinical::synthetic::release_summary(
        None,
        format!(
            "A{:04}{}{}",
            i % 10_000,
            letter(i / 10_000),
            letter(i / 260_000)
        )
        .parse()
        .ok(),
        sender
            .parse()
            .unwrap_or_else(|_| "YP001".parse().expect("valid ODS code")),
        Some("YG001".parse().expect("valid ODS code")),
        &format!("bench {i} {padding}"),
    );
    // Released a week from now: a deadline ahead, as for a summary sent before
    // release (a past one would make every delivery an overdue alert).
    let mut summary = summary;
    summary.custody.release_date = Some(crate::clinical::model::Date(
        (time::OffsetDateTime::now_utc() + time::Duration::days(7)).date(),
    ));
    crate::grpc::summary::to_wire(&summary)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_until_serving(endpoint: &str, certs: &Path) -> anyhow::Result<()> {
    for _ in 0..200 {
        if crate::cli::client::handover(endpoint, certs, "YP001")
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the gateway did not start serving within 10 s")
}

/// Translation throughput on one core.
#[derive(Debug, Clone)]
pub struct TranslationReport {
    /// Size of the FHIR document, bytes.
    pub fhir_bytes: usize,
    /// Size of the HL7 message, bytes.
    pub hl7_bytes: usize,
    /// Documents translated each way.
    pub documents: usize,
    /// FHIR → model → HL7 v2, documents per second.
    pub fhir_to_hl7_per_s: f64,
    /// HL7 v2 → model → FHIR, documents per second.
    pub hl7_to_fhir_per_s: f64,
    /// FHIR → model → HL7 v2, documents per second of CPU time the thread
    /// actually ran (Linux only): the figure a core of its own would give.
    pub fhir_to_hl7_per_cpu_s: Option<f64>,
    /// HL7 v2 → model → FHIR, documents per CPU-second (Linux only).
    pub hl7_to_fhir_per_cpu_s: Option<f64>,
}

impl fmt::Display for TranslationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "throughcare bench --translation: {} documents each way on one core",
            self.documents
        )?;
        writeln!(
            f,
            "  FHIR bundle {} bytes, HL7 message {} bytes",
            self.fhir_bytes, self.hl7_bytes
        )?;
        for (name, wall, cpu) in [
            (
                "FHIR -> model -> HL7 v2",
                self.fhir_to_hl7_per_s,
                self.fhir_to_hl7_per_cpu_s,
            ),
            (
                "HL7 v2 -> model -> FHIR",
                self.hl7_to_fhir_per_s,
                self.hl7_to_fhir_per_cpu_s,
            ),
        ] {
            write!(f, "  {name} {wall:>10.0} documents/s")?;
            if let Some(cpu) = cpu {
                write!(
                    f,
                    "  ({cpu:.0} per CPU-second; the thread ran {:.0}% of the time)",
                    100.0 * wall / cpu
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// CPU time the calling thread has run, from Linux's schedstat (ns).
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(Duration::from_nanos(
        stat.split_whitespace().next()?.parse().ok()?,
    ))
}

/// A typical release summary, about 8 KiB as FHIR JSON: an invented patient
/// released on supervised methadone with two other medicines, one allergy,
/// one risk flag and a follow-up appointment.
pub fn typical_summary() -> crate::clinical::ClinicalSummary {
    use crate::clinical::model::{
        Allergy, Code, DMD, Medication, RiskFlag, RiskKind, SNOMED, Severity,
    };
    let mut s = crate::clinical::synthetic::release_summary(
        "9990001014".parse().ok(),
        "A1234BC".parse().ok(),
        "YP001".parse().expect("valid"),
        Some("YG001".parse().expect("valid")),
        "Community pharmacy supervised consumption",
    );
    let code = |system: &str, code: &str, display: &str| Code {
        system: system.into(),
        code: code.into(),
        display: display.into(),
    };
    s.medications.insert(
        0,
        Medication {
            code: code(
                DMD,
                "3321611000001103",
                "Methadone 1mg/ml oral solution sugar free",
            ),
            dose: "60 mg".into(),
            route: "oral".into(),
            frequency: "once daily".into(),
            supervised: true,
            as_needed: false,
            opioid_substitution: true,
            last_dose_given: "2026-11-24T08:10:00Z".parse().ok(),
            days_supplied: Some(1),
        },
    );
    s.medications.push(Medication {
        code: code(DMD, "3969711000001108", "Mirtazapine 15mg tablets"),
        dose: "15 mg".into(),
        route: "oral".into(),
        frequency: "at night".into(),
        supervised: false,
        as_needed: false,
        opioid_substitution: false,
        last_dose_given: None,
        days_supplied: Some(28),
    });
    s.allergies.push(Allergy {
        substance: code(SNOMED, "764146007", "Penicillin"),
        reaction: Some("Urticaria".into()),
        severity: Some(Severity::Moderate),
    });
    s.risks.push(RiskFlag {
        kind: RiskKind::SelfHarm,
        active: true,
        note: Some("ACCT closed two weeks before release".into()),
        code: None,
    });
    s
}

/// Measures translation both ways over `documents` documents.
///
/// # Errors
/// A translation failed (it never should).
pub fn translation(documents: usize) -> anyhow::Result<TranslationReport> {
    use crate::clinical::{Limits, fhir, hl7v2};
    use crate::journey::JourneyEvent;
    let s = typical_summary();
    let limits = Limits::default();
    let fhir_doc = fhir::render(&s, JourneyEvent::Release).bytes;
    let hl7_doc = hl7v2::render(&s, JourneyEvent::Release).bytes;
    let per_s = |d: Duration| documents as f64 / d.as_secs_f64();
    let cpu = thread_cpu_time();
    let started = Instant::now();
    let mut sink = 0usize;
    for _ in 0..documents {
        let parsed = fhir::parse(&fhir_doc, &limits).map_err(|e| anyhow::anyhow!("{e}"))?;
        sink += hl7v2::render(&parsed.summary, JourneyEvent::Release)
            .bytes
            .len();
    }
    let one = started.elapsed();
    let cpu_between = thread_cpu_time();
    let started = Instant::now();
    for _ in 0..documents {
        let parsed = hl7v2::parse(&hl7_doc, &limits).map_err(|e| anyhow::anyhow!("{e}"))?;
        sink += fhir::render(&parsed.summary, JourneyEvent::Release)
            .bytes
            .len();
    }
    let other = started.elapsed();
    let cpu_end = thread_cpu_time();
    anyhow::ensure!(sink > 0, "nothing rendered");
    let cpu_per_s = |from: Option<Duration>, to: Option<Duration>| {
        Some(per_s(to?.checked_sub(from?)?)).filter(|r| r.is_finite())
    };
    Ok(TranslationReport {
        fhir_bytes: fhir_doc.len(),
        hl7_bytes: hl7_doc.len(),
        documents,
        fhir_to_hl7_per_s: per_s(one),
        hl7_to_fhir_per_s: per_s(other),
        fhir_to_hl7_per_cpu_s: cpu_per_s(cpu, cpu_between),
        hl7_to_fhir_per_cpu_s: cpu_per_s(cpu_between, cpu_end),
    })
}

/// A gateway child process and the barrier-statistics line it logs on stop.
struct Gateway {
    child: tokio::process::Child,
    pid: u32,
    stats: tokio::task::JoinHandle<String>,
}

impl Gateway {
    async fn start(dir: &Path, port: u16, extra_config: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, dir, port, extra_config, &[]).await
    }

    /// Certificates from `dir`, data in `data`, extra `serve` arguments.
    async fn start_with(
        dir: &Path,
        data: &Path,
        port: u16,
        extra_config: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        // The bench measures the store and the transport, not the abuse
        // limits: one identity drives all the load, so lift its limits.
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "[limits]\nrequests_per_second = 1000000\nrequest_burst = 1000000\nmax_connections_per_identity = 10000\nmax_in_flight = 100000\n{extra_config}"
            ),
        )?;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data.join("data"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .args(extra_args)
            .env("RUST_LOG", "warn,throughcare::app=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the gateway")?;
        let pid = child.id().context("gateway pid")?;
        let stderr = child.stderr.take().context("gateway stderr")?;
        let stats = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut last = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("barrier statistics") {
                    last = line;
                } else if line.contains("retention pass") {
                    last_retention_line(Some(line));
                }
            }
            last
        });
        wait_until_serving(&format!("https://localhost:{port}"), &dir.join("certs")).await?;
        Ok(Self { child, pid, stats })
    }

    /// Stops it with SIGTERM; returns (barriers, fdatasyncs, commands, submits).
    async fn stop(mut self) -> anyhow::Result<[u64; 4]> {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("gateway did not stop")??;
        let line = self.stats.await?;
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok([
            field("barriers"),
            field("fdatasyncs"),
            field("commands"),
            field("submits"),
        ])
    }
}

/// Runs the benchmark.
///
/// # Errors
/// The server would not start, or a call failed.
pub async fn run(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    let temp = tempfile::tempdir()?;
    let dir = bench_dir(&opts, temp.path())?;
    let certs = dir.join("certs");
    crate::certs::init_dev_pki(&certs)?;
    let port = free_port()?;
    let endpoint = format!("https://localhost:{port}");
    // The RPC stack's own limit first, on the same listener, TLS and limit
    // layers, with the same clients: the figure the gateway is a share of.
    let baseline = if opts.baseline {
        let null_dir = tempfile::tempdir()?;
        std::fs::create_dir_all(null_dir.path())?;
        let null = Gateway::start_with(
            dir.as_path(),
            null_dir.path(),
            port,
            "",
            &["--null-handover"],
        )
        .await?;
        let phase = submit_load(&endpoint, &certs, &opts, "baseline").await?;
        null.stop().await?;
        Some(phase)
    } else {
        None
    };
    let store = opts.store_section()?;
    let server = Gateway::start(dir.as_path(), port, &store).await?;
    let pid = server.pid;
    let submitted = submit_load(&endpoint, &certs, &opts, "bench").await?;
    let rss_queued = rss_kib(pid, "VmRSS:").unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_rest = rss_kib(pid, "VmRSS:").unwrap_or(0);
    let peak_submit = rss_kib(pid, "VmHWM:").unwrap_or(0);
    let [barriers, fdatasyncs, _, submits] = server.stop().await?;

    let report = BenchReport {
        clients: opts.clients,
        messages: opts.messages,
        doc_bytes: opts.doc_bytes,
        submits_per_s: submitted.per_s,
        p50: submitted.p50,
        p99: submitted.p99,
        baseline,
        rss_queued_mib: rss_queued as f64 / 1024.0,
        rss_rest_mib: rss_rest as f64 / 1024.0,
        barriers,
        fdatasyncs,
        durable_submits: submits,
        ..BenchReport::default()
    };
    if opts.keep_dir.is_some() {
        return Ok(report);
    }
    // Restart on the same data: the queue index is rebuilt from disk.
    let restart = Instant::now();
    let server = Gateway::start(dir.as_path(), port, &store).await?;
    let restart_elapsed = restart.elapsed();
    let pid = server.pid;
    let started = Instant::now();
    let consumer = crate::cli::client::handover(&endpoint, &certs, "YG001").await?;
    drain(&consumer, opts.messages, opts.pullers, opts.single_acks).await?;
    let pull_elapsed = started.elapsed();
    let peak = rss_kib(pid, "VmHWM:").unwrap_or(0).max(peak_submit);
    drop(consumer);
    server.stop().await?;
    Ok(BenchReport {
        pull_ack_per_s: opts.messages as f64 / pull_elapsed.as_secs_f64(),
        pull_shape: format!(
            "{} pullers of 100, {}",
            opts.pullers.max(1),
            if opts.single_acks {
                "one Ack per delivery"
            } else {
                "one AckBatch per pull"
            }
        ),
        peak_rss_mib: peak as f64 / 1024.0,
        restart: restart_elapsed,
        ..report
    })
}

/// The bench's directory: `--keep-dir` (made here, so never an existing
/// one), else `temp`.
fn bench_dir(opts: &BenchOptions, temp: &Path) -> anyhow::Result<std::path::PathBuf> {
    match &opts.keep_dir {
        Some(kept) => {
            std::fs::create_dir(kept)
                .with_context(|| format!("creating {} (it must not exist)", kept.display()))?;
            Ok(kept.clone())
        }
        None => Ok(temp.to_path_buf()),
    }
}

/// One load phase's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phase {
    /// Answered submits per second.
    pub per_s: f64,
    /// Submit latency, median.
    pub p50: Duration,
    /// Submit latency, 99th percentile.
    pub p99: Duration,
}

/// `opts.messages` submits from `opts.clients` clients over
/// `opts.connections` TLS connections; message ids start with `prefix`.
async fn submit_load(
    endpoint: &str,
    certs: &Path,
    opts: &BenchOptions,
    prefix: &str,
) -> anyhow::Result<Phase> {
    let mut channels = Vec::new();
    for _ in 0..opts.connections.max(1) {
        channels.push(crate::cli::client::handover(endpoint, certs, &opts.sender).await?);
    }
    // Pad the summary's free text so each document is about `doc_bytes`.
    let base = prost::Message::encoded_len(&document(0, "", &opts.sender));
    let padding = "x".repeat(opts.doc_bytes.saturating_sub(base));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..opts.clients {
        let mut client = channels[c % channels.len()].clone();
        let next = next.clone();
        let padding = padding.clone();
        let sender = opts.sender.clone();
        let prefix = prefix.to_owned();
        let total = opts.messages;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let request = pb::SubmitRequest {
                    message_id: format!("{prefix}-{i}"),
                    event: pb::JourneyEvent::Release.into(),
                    patient: None,
                    destinations: vec!["YG001".into()],
                    document: Some(pb::submit_request::Document::Native(document(
                        i, &padding, &sender,
                    ))),
                };
                let t = Instant::now();
                client.submit(request).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(opts.messages);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Phase {
        per_s: opts.messages as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

/// Durations of the retention passes the gateway logged, µs (soak only).
fn last_retention_line(line: Option<String>) -> Vec<u64> {
    static PASSES: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
    let mut passes = PASSES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(line) = line {
        if let Some(us) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("elapsed_us="))
            .and_then(|v| v.parse().ok())
        {
            passes.push(us);
        }
        return Vec::new();
    }
    std::mem::take(&mut passes)
}

/// Bytes of every file under `dir` (apparent size) and of the blocks they
/// take on disk.
fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            let (a, b) = dir_size(&e.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    total
}

/// One soak sample.
#[derive(Debug, Clone, Default)]
pub struct SoakSample {
    /// Since the start.
    pub elapsed: Duration,
    /// Submits acknowledged so far.
    pub submitted: u64,
    /// Deliveries acknowledged so far.
    pub acked: u64,
    /// Data directory, apparent bytes.
    pub data_bytes: u64,
    /// Data directory, bytes on disk.
    pub data_disk_bytes: u64,
    /// Server RSS, KiB.
    pub rss_kib: u64,
    /// Payloads held / shredded, tracking records removed (operator view).
    pub held: u64,
    /// Payloads shredded so far.
    pub shredded: u64,
    /// Handovers whose tracking data was removed so far.
    pub removed: u64,
    /// Audit entries held.
    pub audit_held: u64,
    /// Audit entries removed so far.
    pub audit_removed: u64,
    /// Entries of the identity trees held.
    pub identity_held: u64,
    /// Submit latency p99 over the sample's window.
    pub p99: Duration,
}

/// What a soak measured.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// Submits per second asked for.
    pub rate: u32,
    /// Payload grace, s.
    pub grace_seconds: u64,
    /// The samples.
    pub samples: Vec<SoakSample>,
    /// Retention passes that did work, and their durations (µs): median, max.
    pub passes: usize,
    /// Median pass, µs.
    pub pass_p50_us: u64,
    /// Longest pass, µs.
    pub pass_max_us: u64,
    /// After the run: each sled tree's entries and live bytes (keys + values).
    pub trees: Vec<(String, u64, u64)>,
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "throughcare bench --soak: {} submits/s, each pulled and acked; payload grace {} s, metadata and tombstones {} s, audit {} s",
            self.rate,
            self.grace_seconds,
            self.grace_seconds * 2,
            self.grace_seconds * 3
        )?;
        writeln!(
            f,
            "  {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8}",
            "min",
            "submitted",
            "acked",
            "held",
            "shredded",
            "removed",
            "audit",
            "audit rm",
            "identity",
            "data MiB",
            "disk MiB",
            "RSS MiB",
            "p99 ms"
        )?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        for s in &self.samples {
            writeln!(
                f,
                "  {:>6.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>10.1} {:>8.1} {:>8.1}",
                s.elapsed.as_secs_f64() / 60.0,
                s.submitted,
                s.acked,
                s.held,
                s.shredded,
                s.removed,
                s.audit_held,
                s.audit_removed,
                s.identity_held,
                mib(s.data_bytes),
                mib(s.data_disk_bytes),
                s.rss_kib as f64 / 1024.0,
                ms(s.p99)
            )?;
        }
        writeln!(
            f,
            "  retention passes that did work: {}, median {:.1} ms, longest {:.1} ms",
            self.passes,
            self.pass_p50_us as f64 / 1_000.0,
            self.pass_max_us as f64 / 1_000.0
        )?;
        writeln!(
            f,
            "  live data at the end, by tree (entries, MiB of keys + values):"
        )?;
        for (name, entries, bytes) in &self.trees {
            writeln!(f, "    {name:<12} {entries:>9} {:>9.2}", mib(*bytes))?;
        }
        Ok(())
    }
}

/// Submits at a fixed rate from `sender` to YG001 until `until`; returns
/// each submit's latency with the time it finished.
async fn soak_submitter(
    client: crate::grpc::pb::handover_service_client::HandoverServiceClient<
        tonic::transport::Channel,
    >,
    sender: String,
    rate: u32,
    until: Instant,
    latencies: Arc<std::sync::Mutex<Vec<Duration>>>,
    submitted: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0usize.. {
        tick.tick().await;
        if Instant::now() >= until {
            break;
        }
        let mut c = client.clone();
        let request = pb::SubmitRequest {
            message_id: format!("soak-{i}"),
            event: pb::JourneyEvent::Release.into(),
            patient: None,
            destinations: vec!["YG001".into()],
            document: Some(pb::submit_request::Document::Native(document(
                i, "", &sender,
            ))),
        };
        let (latencies, submitted) = (latencies.clone(), submitted.clone());
        inflight.spawn(async move {
            let t = Instant::now();
            c.submit(request).await?;
            latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(t.elapsed());
            submitted.fetch_add(1, Ordering::Relaxed);
            Ok::<_, tonic::Status>(())
        });
        while let Some(done) = inflight.try_join_next() {
            done??;
        }
    }
    while let Some(done) = inflight.join_next().await {
        done??;
    }
    Ok(())
}

/// Pulls and acks YG001's mailbox until `until` and the mailbox is empty.
async fn soak_consumer(
    mut consumer: crate::grpc::pb::handover_service_client::HandoverServiceClient<
        tonic::transport::Channel,
    >,
    until: Instant,
    acked: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<()> {
    loop {
        let pulled = consumer
            .pull(pb::PullRequest {
                max_deliveries: 100,
                lease: None,
                wait: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500000000,
                }),
                format: pb::DocumentFormat::Native.into(),
            })
            .await?
            .into_inner();
        if pulled.deliveries.is_empty() && Instant::now() >= until {
            return Ok(());
        }
        let n = ack_batch(&mut consumer, pulled.deliveries).await?;
        acked.fetch_add(n as u64, Ordering::Relaxed);
    }
}

type Consumer = pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>;

/// Pulls and acknowledges `total` deliveries of the consumer's mailbox with
/// `pullers` concurrent consumers (sharing its connection), each
/// acknowledging what it pulled with one AckBatch (or, `single_acks`, one
/// Ack per delivery). Fails if the mailbox runs dry before `total`.
async fn drain(
    consumer: &Consumer,
    total: usize,
    pullers: usize,
    single_acks: bool,
) -> anyhow::Result<()> {
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..pullers.max(1) {
        let (mut c, acked) = (consumer.clone(), acked.clone());
        workers.spawn(async move {
            while acked.load(Ordering::Relaxed) < total {
                let pulled = c
                    .pull(pb::PullRequest {
                        max_deliveries: 100,
                        lease: None,
                        // No wait: the mailbox is full until the end, and a
                        // puller finding it empty (the rest leased to the
                        // others) stops.
                        wait: None,
                        format: pb::DocumentFormat::Native.into(),
                    })
                    .await?
                    .into_inner();
                if pulled.deliveries.is_empty() {
                    break;
                }
                let n = if single_acks {
                    ack_all(&c, pulled.deliveries).await?
                } else {
                    ack_batch(&mut c, pulled.deliveries).await?
                };
                acked.fetch_add(n, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let acked = acked.load(Ordering::Relaxed);
    anyhow::ensure!(
        acked >= total,
        "mailbox ran dry after {acked} of {total} deliveries"
    );
    Ok(())
}

/// Acknowledges `deliveries` with one AckBatch; how many. Every one must be
/// acknowledged now.
async fn ack_batch(
    consumer: &mut Consumer,
    deliveries: Vec<pb::Delivery>,
) -> anyhow::Result<usize> {
    if deliveries.is_empty() {
        return Ok(0);
    }
    let attempts = deliveries
        .iter()
        .map(|d| pb::DeliveryAttempt {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .collect();
    let results = consumer
        .ack_batch(pb::AckBatchRequest { attempts })
        .await?
        .into_inner()
        .results;
    let refused = results
        .iter()
        .filter(|r| r.outcome() != pb::AckOutcome::Acknowledged)
        .count();
    anyhow::ensure!(refused == 0, "{refused} of {} acks refused", results.len());
    Ok(results.len())
}

/// Acks `deliveries` concurrently on clones of `consumer`; how many.
async fn ack_all(
    consumer: &pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>,
    deliveries: Vec<pb::Delivery>,
) -> anyhow::Result<usize> {
    let mut acks = tokio::task::JoinSet::new();
    for d in deliveries {
        let mut c = consumer.clone();
        acks.spawn(async move {
            c.ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
        });
    }
    let mut n = 0;
    while let Some(r) = acks.join_next().await {
        r??;
        n += 1;
    }
    Ok(n)
}

/// Runs the soak (see the module docs).
///
/// # Errors
/// The server would not start, or a call failed.
pub async fn soak(opts: &BenchOptions) -> anyhow::Result<SoakReport> {
    if opts.engine != BenchEngine::Sled {
        anyhow::bail!(
            "--soak measures the sled store's file and memory under retention; it has no PostgreSQL figures yet (docs/store-engines.md)"
        );
    }
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    crate::certs::init_dev_pki(&certs)?;
    let port = free_port()?;
    let endpoint = format!("https://localhost:{port}");
    let grace = opts.grace_seconds.max(1);
    let retention = format!(
        "[retention]\npayload_grace_seconds = {grace}\nmetadata_seconds = {}\ntombstone_seconds = {}\naudit_seconds = {}\nkey_epoch_seconds = {}\ninterval_ms = 1000\n",
        grace * 2,
        grace * 2,
        grace * 3,
        (grace / 2).max(1),
    );
    let server = Gateway::start(dir.path(), port, &retention).await?;
    let sender = if opts.sender == "YP001" {
        "YP002".to_owned()
    } else {
        opts.sender.clone()
    };
    let started = Instant::now();
    let until = started + Duration::from_secs(opts.minutes * 60);
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let submitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer = tokio::spawn(soak_submitter(
        crate::cli::client::handover(&endpoint, &certs, &sender).await?,
        sender.clone(),
        opts.rate,
        until,
        latencies.clone(),
        submitted.clone(),
    ));
    let consumer = tokio::spawn(soak_consumer(
        crate::cli::client::handover(&endpoint, &certs, "YG001").await?,
        until,
        acked.clone(),
    ));
    let mut op = crate::cli::client::operator(&endpoint, &certs, "operator-oncall").await?;
    let every = Duration::from_secs((opts.minutes * 60 / 20).clamp(5, 60));
    let mut samples = Vec::new();
    while Instant::now() < until + every {
        tokio::time::sleep(every).await;
        let status = op
            .retention_status(pb::RetentionStatusRequest {})
            .await?
            .into_inner();
        let (data_bytes, data_disk_bytes) = dir_size(&dir.path().join("data"));
        let mut window = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
        window.sort_unstable();
        samples.push(SoakSample {
            elapsed: started.elapsed(),
            submitted: submitted.load(Ordering::Relaxed),
            acked: acked.load(Ordering::Relaxed),
            data_bytes,
            data_disk_bytes,
            rss_kib: rss_kib(server.pid, "VmRSS:").unwrap_or(0),
            held: status.payloads_held,
            shredded: status.payloads_shredded,
            removed: status.metadata_removed,
            audit_held: status.audit_entries_held,
            audit_removed: status.audit_entries_removed,
            identity_held: status.identity_records_held,
            p99: window
                .get((window.len() * 99 / 100).min(window.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default(),
        });
    }
    producer.await??;
    consumer.await??;
    drop(op);
    server.stop().await?;
    let trees = tree_sizes(&dir.path().join("data").join("sled"))?;
    let mut passes = last_retention_line(None);
    passes.sort_unstable();
    Ok(SoakReport {
        rate: opts.rate,
        grace_seconds: grace,
        samples,
        passes: passes.len(),
        pass_p50_us: passes.get(passes.len() / 2).copied().unwrap_or(0),
        pass_max_us: passes.last().copied().unwrap_or(0),
        trees,
    })
}

/// Entries and live bytes of each tree of the (stopped) store at `sled_dir`,
/// opened as the offline tools open it (a snapshot a kill cut short is
/// cleared first: `store::open_sled_offline`).
fn tree_sizes(sled_dir: &Path) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let db = crate::store::open_sled_offline(sled_dir)?;
    let mut out = Vec::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        let (mut entries, mut bytes) = (0u64, 0u64);
        for kv in tree.iter() {
            let (k, v) = kv?;
            entries += 1;
            bytes += (k.len() + v.len()) as u64;
        }
        if entries > 0 {
            out.push((String::from_utf8_lossy(&name).into_owned(), entries, bytes));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clinical::{Limits, fhir, hl7v2};
    use crate::journey::JourneyEvent;

    /// The benchmark's document is what the issue names: a valid release
    /// summary of about 8 KiB as FHIR, which both formats carry whole.
    #[test]
    fn the_typical_summary_is_about_8_kib_and_round_trips() {
        let s = typical_summary();
        crate::clinical::validate(&s, JourneyEvent::Release).unwrap();
        let fhir_doc = fhir::render(&s, JourneyEvent::Release);
        assert!(
            // ~8 KiB of content; UK Core meta.profile on every resource adds
            // ~1.1 KiB, each medicine's whole instruction and dose extension
            // ~120 bytes.
            (8_704..=10_752).contains(&fhir_doc.bytes.len()),
            "{} bytes",
            fhir_doc.bytes.len()
        );
        assert!(fhir_doc.not_carried.is_empty());
        let back = fhir::parse(&fhir_doc.bytes, &Limits::default()).unwrap();
        assert_eq!(back.summary, s);
        let hl7_doc = hl7v2::render(&s, JourneyEvent::Release);
        assert!(hl7_doc.not_carried.is_empty());
        let back = hl7v2::parse(&hl7_doc.bytes, &Limits::default()).unwrap();
        assert_eq!(back.summary, s);
    }
}
