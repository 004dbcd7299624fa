//! The `throughcare` command: serve the gateway, make dev certificates, try
//! it by hand (submit, pull, track), measure it (bench), and administer it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use throughcare::config::{Config, Overrides};
use throughcare::grpc::pb;

#[derive(Parser)]
#[command(
    name = "throughcare",
    version,
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
    /// Submit a handover (test client).
    Submit(SubmitArgs),
    /// Pull (and optionally ack) deliveries from your mailbox (test client).
    Pull(PullArgs),
    /// Ask what became of a handover you submitted (test client).
    Track(TrackArgs),
    /// Translate a clinical document between formats (reads FILE, writes stdout;
    /// what the target format cannot carry goes to stderr).
    Convert(ConvertArgs),
    /// Play one invented patient's whole journey through a fresh gateway
    /// (temporary directory, dev certificates, mutual TLS) and print what each party sees.
    Demo,
    /// Measure durable submits/s, latency, messages per fsync, pull+ack/s and RSS.
    Bench(throughcare::bench::BenchOptions),
    /// Operator calls to a running gateway (tables, or --json); checks and
    /// decisions on a stopped gateway's store (`admin audit verify`,
    /// `admin store accept-rollback`).
    Admin {
        #[command(flatten)]
        operator: throughcare::admin::OperatorArgs,
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

#[derive(Args)]
struct ClientArgs {
    /// Act as this dev organisation (its ODS code) or `operator-oncall`.
    #[arg(long = "as")]
    as_: String,
    /// Gateway address.
    #[arg(
        long,
        default_value = "https://localhost:7443",
        env = "THROUGHCARE_SERVER"
    )]
    server: String,
    /// Directory of the dev PKI.
    #[arg(long, default_value = "certs", env = "THROUGHCARE_CERTS_DIR")]
    certs_dir: PathBuf,
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Idempotency key.
    #[arg(long)]
    message_id: String,
    /// admission, transfer, release or community-summary.
    #[arg(long)]
    event: String,
    /// Destination ODS code (repeatable; optional: the journey rules route it,
    /// and check any you name; for a release, a named GP practice is the nominated GP).
    #[arg(long = "to")]
    to: Vec<String>,
    /// NHS number (999 test range for dev).
    #[arg(long, default_value = "")]
    nhs: String,
    /// Prison number.
    #[arg(long, default_value = "")]
    prison_number: String,
    /// Date of birth, YYYY-MM-DD.
    #[arg(long, default_value = "")]
    dob: String,
    /// A note on the invented patient's summary (when no document is given).
    #[arg(long, default_value = "")]
    text: String,
    /// Send this document instead: `.json` FHIR Bundle, `.hl7` ADT message, or
    /// a canonical-model JSON (see tests/fixtures/patients) with --model.
    #[arg(long)]
    document: Option<PathBuf>,
    /// The --document file is a canonical-model JSON (sent as the native summary).
    #[arg(long)]
    model: bool,
}

#[derive(Args)]
struct PullArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Most deliveries to lease.
    #[arg(long, default_value_t = 10)]
    max: u32,
    /// Wait up to this long for something to arrive.
    #[arg(long, default_value_t = 0)]
    wait_ms: u32,
    /// Acknowledge what was pulled.
    #[arg(long)]
    ack: bool,
    /// Print each document.
    #[arg(long)]
    show: bool,
}

#[derive(Args)]
struct TrackArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The message id it was submitted with.
    #[arg(long)]
    message_id: String,
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
        command: throughcare::admin::AuditCommand,
    },
    /// Decisions about a stopped gateway's store (after a restore).
    Store {
        #[command(subcommand)]
        command: throughcare::admin::StoreCommand,
    },
    #[command(flatten)]
    Operator(throughcare::admin::OperatorCommand),
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            other => match run_tool(other).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

async fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        certs_dir: args.certs_dir,
        registry: args.registry,
        crl: args.crl,
        metrics_listen: args.metrics_listen,
        witness_dir: args.witness_dir,
    };
    let fail = |e: throughcare::app::AppError| {
        tracing::error!(error = %e, "gateway stopped");
        eprintln!("error: {e}");
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let listen = config.listen;
    let prepared = match throughcare::app::Prepared::with_system_clock(config) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => return fail(e.into()),
    };
    match prepared.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

fn parse_event(s: &str) -> anyhow::Result<pb::JourneyEvent> {
    Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "admission" => pb::JourneyEvent::Admission,
        "transfer" => pb::JourneyEvent::Transfer,
        "release" => pb::JourneyEvent::Release,
        "community-summary" => pb::JourneyEvent::CommunitySummary,
        other => anyhow::bail!(
            "unknown event {other}: admission, transfer, release or community-summary"
        ),
    })
}

async fn run_tool(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("handled by serve"),
        Command::Certs {
            command: CertsCommand::Init { dir, force },
        } => {
            if throughcare::certs::dev_pki_present(&dir) && !force {
                println!(
                    "{} already holds a dev PKI (use --force to replace it)",
                    dir.display()
                );
                return Ok(());
            }
            throughcare::certs::init_dev_pki(&dir)?;
            println!(
                "created a DEVELOPMENT PKI in {} (never for production):",
                dir.display()
            );
            for org in throughcare::certs::dev_organisations() {
                println!(
                    "  {:<6} {:<12} {}",
                    org.ods.as_str(),
                    org.kind.as_str(),
                    org.name
                );
            }
            println!("  operator-{}", throughcare::certs::DEV_OPERATOR);
            Ok(())
        }
        Command::Submit(args) => {
            let mut client = throughcare::client::handover(
                &args.client.server,
                &args.client.certs_dir,
                &args.client.as_,
            )
            .await?;
            let document = submit_document(&args)?;
            let patient =
                (!args.nhs.is_empty() || !args.prison_number.is_empty() || !args.dob.is_empty())
                    .then_some(pb::PatientRef {
                        nhs_number: args.nhs,
                        prison_number: args.prison_number,
                        date_of_birth: args.dob,
                    });
            let receipt = client
                .submit(pb::SubmitRequest {
                    message_id: args.message_id,
                    event: parse_event(&args.event)?.into(),
                    patient,
                    destinations: args.to,
                    document: Some(document),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "handover {}{}",
                receipt.handover_id,
                if receipt.duplicate {
                    " (duplicate of an accepted submit)"
                } else {
                    ""
                }
            );
            for d in receipt.deliveries {
                println!("  delivery {} -> {}", d.delivery_id, d.destination);
            }
            Ok(())
        }
        Command::Pull(args) => {
            let mut client = throughcare::client::handover(
                &args.client.server,
                &args.client.certs_dir,
                &args.client.as_,
            )
            .await?;
            let pulled = client
                .pull(pb::PullRequest {
                    max_deliveries: args.max,
                    lease_seconds: 0,
                    wait_millis: args.wait_ms,
                    format: 0,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if pulled.deliveries.is_empty() {
                println!("nothing to deliver");
            }
            for d in pulled.deliveries {
                println!(
                    "delivery {} attempt {} handover {} from {} ({:?})",
                    d.delivery_id,
                    d.attempt,
                    d.handover_id,
                    d.sender,
                    d.event()
                );
                for what in &d.not_carried {
                    println!("  not carried: {what}");
                }
                if args.show {
                    match &d.document {
                        Some(pb::delivery::Document::FhirJson(t)) => println!("{t}"),
                        Some(pb::delivery::Document::Hl7v2(t)) => {
                            println!("{}", t.replace('\r', "\n"))
                        }
                        Some(pb::delivery::Document::Native(n)) => println!("{n:#?}"),
                        None => {}
                    }
                }
                if args.ack {
                    client
                        .ack(pb::AckRequest {
                            delivery_id: d.delivery_id,
                            attempt: d.attempt,
                        })
                        .await
                        .map_err(status_error)?;
                    println!("  acknowledged");
                }
            }
            Ok(())
        }
        Command::Track(args) => {
            let mut client = throughcare::client::handover(
                &args.client.server,
                &args.client.certs_dir,
                &args.client.as_,
            )
            .await?;
            let t = client
                .track(pb::TrackRequest {
                    handover: Some(pb::track_request::Handover::MessageId(args.message_id)),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("handover {} ({:?})", t.handover_id, t.event());
            for d in t.deliveries {
                let due = d
                    .due_at
                    .as_ref()
                    .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
                    .map(|t| format!("  due {} {:02}:{:02} UTC", t.date(), t.hour(), t.minute()))
                    .unwrap_or_default();
                println!(
                    "  {:<8} delivery {:<6} {:<12} attempts {}{due}{}{}{}",
                    d.destination,
                    d.delivery_id,
                    format!("{:?}", d.state()),
                    d.attempts,
                    if d.overdue { "  OVERDUE" } else { "" },
                    if d.urgent { "  urgent" } else { "" },
                    if d.quarantine_reason.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", d.quarantine_reason)
                    }
                );
            }
            Ok(())
        }
        Command::Convert(args) => convert(args),
        Command::Demo => throughcare::demo::run(&mut std::io::stdout()).await,
        Command::Admin {
            operator,
            command: AdminCommand::Operator(command),
        } => throughcare::admin::run(operator, command).await,
        Command::Bench(opts) if opts.translation => {
            let report =
                tokio::task::spawn_blocking(|| throughcare::bench::translation(20_000)).await??;
            print!("{report}");
            Ok(())
        }
        Command::Bench(opts) => {
            let report = throughcare::bench::run(opts).await?;
            print!("{report}");
            Ok(())
        }
        Command::Admin {
            command: AdminCommand::Audit { command },
            ..
        } => throughcare::admin::audit(command).await,
        Command::Admin {
            operator,
            command: AdminCommand::Store { command },
        } => throughcare::admin::store(command, operator.json).await,
    }
}

fn submit_document(args: &SubmitArgs) -> anyhow::Result<pb::submit_request::Document> {
    use pb::submit_request::Document;
    let Some(path) = &args.document else {
        let summary = throughcare::clinical::synthetic::release_summary(
            args.nhs.parse().ok(),
            args.prison_number.parse().ok(),
            args.client
                .as_
                .parse()
                .unwrap_or_else(|_| "YP001".parse().expect("valid")),
            None,
            &args.text,
        );
        // Released today, so its deadline (the end of the release day) lies ahead.
        let mut summary = summary;
        summary.custody.release_date = Some(throughcare::clinical::model::Date(
            time::OffsetDateTime::now_utc().date(),
        ));
        return Ok(Document::Native(throughcare::grpc::summary::to_wire(
            &summary,
        )));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if args.model {
        let summary: throughcare::clinical::ClinicalSummary = serde_json::from_str(&text)?;
        return Ok(Document::Native(throughcare::grpc::summary::to_wire(
            &summary,
        )));
    }
    Ok(if text.starts_with("MSH") {
        Document::Hl7v2(text)
    } else {
        Document::FhirJson(text)
    })
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
        (Some(e), _) => match parse_event(e)? {
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
    };
    let rendered = translate::write(format(args.to), &read.summary, view, event);
    for what in &rendered.not_carried {
        eprintln!("not carried: {what}");
    }
    use std::io::Write;
    std::io::stdout().write_all(&rendered.bytes)?;
    Ok(())
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    // The message already lists any field violations.
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
