//! The `throughcare` command: serve the gateway, make dev certificates, try
//! it by hand (submit, pull, track), measure it (bench), and administer it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use throughcare::config::{Config, Overrides};
use throughcare::telemetry::Traces;

/// mimalloc instead of glibc's malloc: the store writer, sled and the
/// handlers allocate on different threads, and glibc's per-thread arenas held
/// that memory (see docs/benchmarks.md, Performance round).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use throughcare::grpc::pb;

#[derive(Parser)]
#[command(
    name = "throughcare",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("THROUGHCARE_COMMIT"), ")"),
    about = "Health records that follow patients through custody"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "THROUGHCARE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (mutual TLS only).
    Serve(ServeArgs),
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Submit a handover of an invented patient, or a document (test client).
    Submit(throughcare::cli::handover::SubmitArgs),
    /// Pull (and optionally ack) deliveries from your mailbox (test client).
    Pull(throughcare::cli::handover::PullArgs),
    /// Ask what became of a handover you submitted (test client).
    Track(throughcare::cli::handover::TrackArgs),
    /// Ask a running gateway's gRPC health service over mutual TLS; exit 0
    /// when it is SERVING, 1 otherwise (container health checks).
    Health(throughcare::cli::health::HealthArgs),
    /// Translate a clinical document between formats (reads FILE, writes stdout;
    /// what the target format cannot carry goes to stderr).
    Convert(ConvertArgs),
    /// Play one invented patient's whole journey through a fresh gateway
    /// (temporary directory, dev certificates, mutual TLS) and print what each party sees.
    Demo {
        /// Show the gateway's own log lines (on standard error) as well.
        #[arg(long)]
        verbose: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) of `throughcare`.
    Man,
    /// Measure durable submits/s, latency, messages per fsync, pull+ack/s and RSS.
    Bench(throughcare::cli::bench::BenchOptions),
    /// Operator calls to a running gateway (tables, or --json); checks and
    /// decisions on a stopped gateway's store (`admin audit verify`,
    /// `admin store accept-rollback`).
    Admin {
        #[command(flatten)]
        operator: throughcare::cli::admin::OperatorArgs,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "THROUGHCARE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:7443.
    #[arg(long, env = "THROUGHCARE_LISTEN")]
    listen: Option<String>,
    /// Data directory of the store.
    #[arg(long, env = "THROUGHCARE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Directory of the (development) PKI.
    #[arg(long, env = "THROUGHCARE_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
    /// Registry file of organisations.
    #[arg(long, env = "THROUGHCARE_REGISTRY")]
    registry: Option<PathBuf>,
    /// Certificate revocation list (PEM).
    #[arg(long, env = "THROUGHCARE_CRL")]
    crl: Option<PathBuf>,
    /// Prometheus metrics listen address (plain HTTP), e.g. 127.0.0.1:9464.
    #[arg(long, env = "THROUGHCARE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Witness directory, outside the data directory (default `<data-dir>.witness`).
    #[arg(long, env = "THROUGHCARE_WITNESS_DIR")]
    witness_dir: Option<PathBuf>,
    /// Create the development PKI in the certs directory when it is missing
    /// (`--dev-certs=false` to refuse). On by default only without --config.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    dev_certs: Option<bool>,
    /// `bench --baseline` only: answer submits without storing anything.
    #[arg(long, hide = true)]
    null_handover: bool,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA, server and client certificates and a matching registry.
    Init {
        /// Where to write them.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Replace an existing PKI.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    /// The canonical model as JSON.
    ModelJson,
    /// FHIR R4 document Bundle.
    Fhir,
    /// HL7 v2.5.1 ADT.
    Hl7v2,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ViewArg {
    Full,
    Probation,
    Admission,
    /// The community substance misuse service's view.
    SubstanceMisuse,
    /// The community mental health team's view.
    MentalHealth,
}

#[derive(Args)]
struct ConvertArgs {
    /// Format of FILE.
    #[arg(long)]
    from: FormatArg,
    /// Format to write.
    #[arg(long)]
    to: FormatArg,
    /// What the recipient may see.
    #[arg(long, value_enum, default_value = "full")]
    view: ViewArg,
    /// The journey event (needed when FILE does not state one).
    #[arg(long)]
    event: Option<String>,
    /// The document.
    file: PathBuf,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// The audit trail: verify, list, and the signed anchor to record elsewhere.
    Audit {
        #[command(subcommand)]
        command: throughcare::cli::admin::AuditCommand,
    },
    /// Decisions about a stopped gateway's store (after a restore).
    Store {
        #[command(subcommand)]
        command: throughcare::cli::admin::StoreCommand,
    },
    #[command(flatten)]
    Operator(throughcare::cli::admin::OperatorCommand),
}

/// Logs go to standard error; `default` is the level unless `RUST_LOG` says
/// otherwise. Colours only on a terminal (never into a file, a pipe or a
/// journal) and never with `NO_COLOR` set. With `traces`, the same spans
/// also go to the OTLP collector.
fn init_logging(json: bool, default: &str, traces: Option<&Traces>) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let logs = if json {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(traces.map(Traces::layer))
        .with(logs)
        .init();
}

/// What `serve` reads before logging starts: its configuration, checked,
/// and the trace pipeline its `[telemetry]` section asks for (started in
/// `runtime`, where the exporter's channel lives).
type Loaded = Result<(Config, Option<Traces>), throughcare::config::ConfigError>;

fn load_serve(args: &ServeArgs, runtime: &tokio::runtime::Runtime) -> Loaded {
    let overrides = Overrides {
        listen: args.listen.clone(),
        data_dir: args.data_dir.clone(),
        certs_dir: args.certs_dir.clone(),
        registry: args.registry.clone(),
        crl: args.crl.clone(),
        metrics_listen: args.metrics_listen.clone(),
        witness_dir: args.witness_dir.clone(),
        dev_certs: args.dev_certs,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let _inside = runtime.enter();
    let traces = Traces::start(&config.telemetry)?;
    Ok((config, traces))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        allocator_settings_then_exec();
    }
    // The demo tells a story on standard output: the gateway inside it keeps
    // quiet unless asked.
    let level = match cli.command {
        Command::Demo { verbose: false } => "warn",
        _ => "info",
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match &cli.command {
        Command::Serve(args) => Some(load_serve(args, &runtime)),
        _ => None,
    };
    let traces = match &loaded {
        Some(Ok((_, traces))) => traces.as_ref(),
        _ => None,
    };
    init_logging(cli.log_json, level, traces);
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => match loaded {
                Some(loaded) => serve(args.null_handover, loaded).await,
                None => unreachable!("loaded above"),
            },
            Command::Health(args) => throughcare::cli::health::run(args).await,
            other => match run_tool(other).await {
                Ok(()) => ExitCode::SUCCESS,
                // A reader that stopped early (`| head`) took what it wanted.
                Err(e) if stdout_closed(&e) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

/// mimalloc's settings for a long-running gateway (docs/operations.md,
/// "Memory"). They are read from the environment when the process starts,
/// and `unsafe_code = "forbid"` rules out setting them from inside, so
/// `serve` replaces itself once (same process id, arguments and streams) with
/// them set. An operator's own `MIMALLOC_PURGE_DELAY` or
/// `MIMALLOC_GENERIC_COLLECT` is kept and no replacement happens. If the
/// replacement fails, the gateway serves with mimalloc's defaults.
fn allocator_settings_then_exec() {
    use std::os::unix::process::CommandExt;
    const SETTINGS: [(&str, &str); 2] = [
        ("MIMALLOC_PURGE_DELAY", "100"),
        ("MIMALLOC_GENERIC_COLLECT", "1000"),
    ];
    if SETTINGS
        .iter()
        .any(|(name, _)| std::env::var_os(name).is_some())
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let error = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .envs(SETTINGS)
        .exec();
    eprintln!("warning: serving with mimalloc's default settings: {error}");
}

/// Whether `e` is a write to a standard output whose reader has gone.
fn stdout_closed(e: &anyhow::Error) -> bool {
    use throughcare::cli::StdoutError;
    e.chain().any(|cause| {
        let wrapped = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<StdoutError>());
        cause
            .downcast_ref::<StdoutError>()
            .or(wrapped)
            .is_some_and(StdoutError::reader_gone)
    })
}

/// Writes `bytes` to stdout.
fn to_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout()
        .lock()
        .write_all(bytes)
        .map_err(throughcare::cli::StdoutError)?;
    Ok(())
}

/// Serves until a signal, then exports the traces still queued.
async fn serve(null_handover: bool, loaded: Loaded) -> ExitCode {
    let (config, traces) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return failed(e.into()),
    };
    let code = serve_config(config, null_handover).await;
    if let Some(traces) = traces {
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    code
}

fn failed(e: throughcare::app::AppError) -> ExitCode {
    tracing::error!(error = %e, "gateway stopped");
    eprintln!("error: {e}");
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
}

async fn serve_config(config: Config, null_handover: bool) -> ExitCode {
    // Before the store opens and the port is bound: from here on a SIGTERM
    // or SIGINT is a drain, never the default kill. (Registered when first
    // polled, as it was, a SIGTERM just after the port opened killed the
    // gateway without its final barrier.)
    let stop = shutdown_signal();
    let listen = config.listen;
    let sled = (config.store.engine == throughcare::store::EngineKind::Sled)
        .then(|| (config.data_dir.clone(), config.store.cache_bytes));
    let prepared = match throughcare::app::Prepared::with_system_clock(config) {
        Ok(p) if null_handover => p.with_null_handover(),
        Ok(p) => p,
        Err(e) => return failed(e),
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(source) => {
            return failed(throughcare::app::AppError::Listen {
                addr: listen,
                source,
            });
        }
    };
    // Whether the store stopped taking changes (a failed barrier): its
    // close had no final barrier, and its disk is not to be written again.
    let store_stats = prepared.store().stats().clone();
    if let Err(e) = prepared.serve(listener, stop).await {
        return failed(e);
    }
    let halted = store_stats.halted.load(std::sync::atomic::Ordering::SeqCst);
    if let Some((data_dir, cache_bytes)) = sled.filter(|_| !halted) {
        leave_sled_snapshot(data_dir, cache_bytes).await;
    }
    ExitCode::SUCCESS
}

/// After a clean close (a final barrier), has sled write the snapshot the
/// next start reads (`store::leave_sled_snapshot`). A failure costs the
/// next start time, not data, so it is a warning and the exit stays a
/// success.
async fn leave_sled_snapshot(data_dir: std::path::PathBuf, cache_bytes: u64) {
    let wait = std::time::Duration::from_secs(2);
    match tokio::task::spawn_blocking(move || {
        throughcare::store::leave_sled_snapshot(&data_dir, cache_bytes, wait)
    })
    .await
    {
        Ok(Ok(took)) => tracing::info!(
            took_ms = took.as_millis(),
            "sled wrote a snapshot for the next start"
        ),
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            "sled could not write a snapshot at close: the next start reads its whole log"
        ),
        Err(e) => tracing::warn!(error = %e, "the snapshot at close did not finish"),
    }
}

/// Registers the SIGTERM and SIGINT handlers at once; the future ends when
/// either arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
}

async fn run_tool(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) | Command::Health(_) => unreachable!("handled in main"),
        Command::Certs {
            command: CertsCommand::Init { dir, force },
        } => {
            if throughcare::certs::dev_pki_present(&dir) && !force {
                throughcare::outln!(
                    "{} already holds a dev PKI (use --force to replace it)",
                    dir.display()
                )?;
                return Ok(());
            }
            throughcare::certs::init_dev_pki(&dir)?;
            throughcare::outln!(
                "created a DEVELOPMENT PKI in {} (never for production):",
                dir.display()
            )?;
            for org in throughcare::certs::dev_organisations() {
                throughcare::outln!(
                    "  {:<6} {:<12} {}",
                    org.ods.as_str(),
                    org.kind.as_str(),
                    org.name
                )?;
            }
            throughcare::outln!("  operator-{}", throughcare::certs::DEV_OPERATOR)?;
            Ok(())
        }
        Command::Submit(args) => throughcare::cli::handover::submit(args).await,
        Command::Pull(args) => throughcare::cli::handover::pull(args).await,
        Command::Track(args) => throughcare::cli::handover::track(args).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "throughcare", &mut script);
            to_stdout(&script)
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            to_stdout(&page)
        }
        Command::Convert(args) => convert(args),
        Command::Demo { .. } => throughcare::cli::demo::run(&mut throughcare::cli::Stdout).await,
        Command::Admin {
            operator,
            command: AdminCommand::Operator(command),
        } => throughcare::cli::admin::run(operator, command).await,
        Command::Bench(opts) if opts.translation => {
            let report =
                tokio::task::spawn_blocking(|| throughcare::cli::bench::translation(20_000))
                    .await??;
            throughcare::out!("{report}")?;
            Ok(())
        }
        Command::Bench(opts) if opts.soak => {
            let report = throughcare::cli::bench::soak(&opts).await?;
            throughcare::out!("{report}")?;
            Ok(())
        }
        Command::Bench(opts) => {
            let report = throughcare::cli::bench::run(opts).await?;
            throughcare::out!("{report}")?;
            Ok(())
        }
        Command::Admin {
            command: AdminCommand::Audit { command },
            ..
        } => throughcare::cli::admin::audit(command).await,
        Command::Admin {
            operator,
            command: AdminCommand::Store { command },
        } => throughcare::cli::admin::store(command, operator.json).await,
    }
}

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    use throughcare::clinical::translate::{self, TextFormat};
    use throughcare::clinical::{Limits, View};
    use throughcare::journey::JourneyEvent;
    let format = |f: FormatArg| match f {
        FormatArg::ModelJson => TextFormat::ModelJson,
        FormatArg::Fhir => TextFormat::Fhir,
        FormatArg::Hl7v2 => TextFormat::Hl7v2,
    };
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let read = translate::read(format(args.from), &bytes, &Limits::default())
        .map_err(|e| anyhow::anyhow!("invalid document: {e}"))?;
    let event = match (&args.event, read.event) {
        (Some(e), _) => match throughcare::cli::handover::parse_event(e)? {
            pb::JourneyEvent::Admission => JourneyEvent::Admission,
            pb::JourneyEvent::Transfer => JourneyEvent::Transfer,
            pb::JourneyEvent::CommunitySummary => JourneyEvent::CommunitySummary,
            _ => JourneyEvent::Release,
        },
        (None, Some(e)) => e,
        (None, None) => anyhow::bail!("--event is required: the document does not state one"),
    };
    let view = match args.view {
        ViewArg::Full => View::Full,
        ViewArg::Probation => View::Probation,
        ViewArg::Admission => View::AdmissionNotice,
        ViewArg::SubstanceMisuse => View::SubstanceMisuseService,
        ViewArg::MentalHealth => View::MentalHealthTeam,
    };
    let rendered = translate::write(format(args.to), &read.summary, view, event);
    for what in &rendered.not_carried {
        eprintln!("not carried: {what}");
    }
    use std::io::Write;
    std::io::stdout().write_all(&rendered.bytes)?;
    Ok(())
}
