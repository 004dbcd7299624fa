//! The built-in client's handover verbs: `submit`, `pull` and `track`, for a
//! person trying the gateway by hand with the dev PKI.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::clinical::ClinicalSummary;
use crate::clinical::model::{Date, DateTime};
use crate::grpc::pb;

/// Who to call, and as whom.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Act as this dev organisation (its ODS code) or `operator-oncall`.
    #[arg(long = "as")]
    pub as_: String,
    /// Gateway address.
    #[arg(
        long,
        default_value = "https://localhost:7443",
        env = "THROUGHCARE_SERVER"
    )]
    pub server: String,
    /// Directory of the dev PKI.
    #[arg(long, default_value = "certs", env = "THROUGHCARE_CERTS_DIR")]
    pub certs_dir: PathBuf,
}

/// `throughcare submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Who to call, and as whom.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Idempotency key.
    #[arg(long)]
    pub message_id: String,
    /// admission, transfer, release or community-summary.
    #[arg(long)]
    pub event: String,
    /// Destination ODS code (repeatable; optional: the journey rules route it,
    /// and check any you name; for a release, a named GP practice is the
    /// nominated GP; for a transfer, the first is the receiving prison).
    #[arg(long = "to")]
    pub to: Vec<String>,
    /// The invented patient's NHS number (999 test range, e.g. 9990000018).
    #[arg(long, default_value = "")]
    pub nhs: String,
    /// The invented patient's prison number (e.g. A1234BC).
    #[arg(long, default_value = "")]
    pub prison_number: String,
    /// The invented patient's date of birth, YYYY-MM-DD.
    #[arg(long, default_value = "1985-06-15")]
    pub dob: String,
    /// The patient's registered GP practice (ODS code), when known.
    #[arg(long, default_value = "")]
    pub gp: String,
    /// A note on the invented patient's summary (its follow-up).
    #[arg(long, default_value = "")]
    pub text: String,
    /// Send this document instead: `.json` FHIR Bundle, `.hl7` ADT message, or
    /// a canonical-model JSON (see tests/fixtures/patients) with --model.
    #[arg(long)]
    pub document: Option<PathBuf>,
    /// The --document file is a canonical-model JSON (sent as the native summary).
    #[arg(long)]
    pub model: bool,
}

/// The format to pull in.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PullFormat {
    /// The mailbox's registered format.
    Registered,
    /// The native protobuf summary.
    Native,
    /// FHIR R4 document Bundle (JSON).
    Fhir,
    /// HL7 v2.5.1 ADT.
    Hl7v2,
}

/// `throughcare pull`.
#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// Who to call, and as whom.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Most deliveries to lease.
    #[arg(long, default_value_t = 10)]
    pub max: u32,
    /// Wait up to this long for something to arrive.
    #[arg(long, default_value_t = 0)]
    pub wait_ms: u32,
    /// Acknowledge what was pulled.
    #[arg(long)]
    pub ack: bool,
    /// Print each summary under its headings (medicines first).
    #[arg(long)]
    pub show: bool,
    /// Print each document as delivered instead (pretty JSON; HL7 one segment a line).
    #[arg(long)]
    pub raw: bool,
    /// Render in this format instead of the mailbox's registered one.
    #[arg(long, value_enum, default_value = "registered")]
    pub format: PullFormat,
}

/// `throughcare track`.
#[derive(Debug, Clone, Args)]
pub struct TrackArgs {
    /// Who to call, and as whom.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The message id it was submitted with.
    #[arg(long)]
    pub message_id: String,
}

async fn connect(
    c: &ClientArgs,
) -> anyhow::Result<pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>> {
    crate::cli::client::handover(&c.server, &c.certs_dir, &c.as_)
        .await
        .with_context(|| {
            format!(
                "cannot reach the gateway at {} as {}: is it running (`cargo run --release -- serve`), \
                 and does {} hold the dev PKI?",
                c.server,
                c.as_,
                c.certs_dir.display()
            )
        })
}

/// Submits the invented patient's summary (or `--document`) and prints the receipt.
///
/// # Errors
/// Bad options, an unreachable gateway, or a refusal, each with what to do next.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let event = parse_event(&args.event)?;
    let document = submit_document(&args, event)?;
    let mut client = connect(&args.client).await?;
    let receipt = client
        .submit(pb::SubmitRequest {
            message_id: args.message_id.clone(),
            event: event.into(),
            patient: None,
            destinations: args.to,
            document: Some(document),
        })
        .await
        .map_err(|s| explain(&s, &format!("submit {}", args.message_id)))?
        .into_inner();
    let duplicate = if receipt.duplicate {
        " (duplicate of an accepted submit)"
    } else {
        ""
    };
    crate::outln!("handover {}{duplicate}", receipt.handover_id)?;
    if receipt.superseded_by_handover_id != 0 {
        crate::outln!(
            "superseded on arrival by handover {} (written later): it will not be delivered",
            receipt.superseded_by_handover_id
        )?;
    }
    for d in receipt.deliveries {
        let due = d
            .due_at
            .as_ref()
            .map(|t| format!(", due {}", crate::uk_time::display_timestamp(t)))
            .unwrap_or_default();
        let urgent = if d.urgent { ", urgent" } else { "" };
        crate::outln!(
            "  delivery {} -> {}{due}{urgent}",
            d.delivery_id,
            d.destination
        )?;
    }
    Ok(())
}

/// Pulls from the caller's mailbox, prints each delivery, and acks on request.
///
/// # Errors
/// An unreachable gateway or a refusal, with what to do next.
pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let format = match args.format {
        PullFormat::Registered => pb::DocumentFormat::Unspecified,
        PullFormat::Native => pb::DocumentFormat::Native,
        PullFormat::Fhir => pb::DocumentFormat::FhirJson,
        PullFormat::Hl7v2 => pb::DocumentFormat::Hl7v2,
    };
    let pulled = client
        .pull(pb::PullRequest {
            max_deliveries: args.max,
            lease: None,
            wait: Some(crate::grpc::wire::duration(
                std::time::Duration::from_millis(u64::from(args.wait_ms)),
            )),
            format: format.into(),
        })
        .await
        .map_err(|s| explain(&s, "pull"))?
        .into_inner();
    if pulled.deliveries.is_empty() {
        crate::outln!("nothing to deliver to {}", args.client.as_)?;
    }
    for d in pulled.deliveries {
        print_delivery(&d, &args)?;
        if args.ack {
            client
                .ack(pb::AckRequest {
                    delivery_id: d.delivery_id,
                    attempt: d.attempt,
                })
                .await
                .map_err(|s| explain(&s, &format!("ack of delivery {}", d.delivery_id)))?;
            crate::outln!("  acknowledged")?;
        }
    }
    Ok(())
}

fn print_delivery(d: &pb::Delivery, args: &PullArgs) -> anyhow::Result<()> {
    let urgent = if d.urgent { ", URGENT" } else { "" };
    crate::outln!(
        "delivery {} attempt {} handover {} from {} ({}){urgent}",
        d.delivery_id,
        d.attempt,
        d.handover_id,
        d.sender,
        crate::grpc::enum_label(d.event().as_str_name())
    )?;
    if d.supersedes_handover_id != 0 {
        crate::outln!(
            "  replaces handover {}: use this one instead",
            d.supersedes_handover_id
        )?;
    }
    if args.raw {
        crate::outln!("{}", raw_document(d.document.as_ref())?)?;
    } else if args.show {
        let summary = readable_summary(d.document.as_ref())?;
        crate::outln!(
            "{}",
            super::readable::summary_text(&summary, &d.not_carried)
        )?;
    } else {
        for what in &d.not_carried {
            crate::outln!("  not carried: {what}")?;
        }
    }
    Ok(())
}

/// The document as delivered, made readable without changing it.
fn raw_document(document: Option<&pb::delivery::Document>) -> anyhow::Result<String> {
    use pb::delivery::Document;
    Ok(match document {
        Some(Document::FhirJson(t)) => {
            serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(t)?)?
        }
        Some(Document::Hl7v2(t)) => t.trim_end_matches('\r').replace('\r', "\n"),
        Some(Document::Native(n)) => format!("{n:#?}"),
        None => String::new(),
    })
}

/// The delivered document read back into the summary, for the headings.
fn readable_summary(document: Option<&pb::delivery::Document>) -> anyhow::Result<ClinicalSummary> {
    use crate::clinical::translate::{self, TextFormat};
    use pb::delivery::Document;
    let limits = crate::clinical::Limits::default();
    let read = |format, text: &str| {
        translate::read(format, text.as_bytes(), &limits)
            .map(|r| r.summary)
            .map_err(|e| anyhow::anyhow!("the delivered document does not read back: {e}"))
    };
    match document {
        Some(Document::FhirJson(t)) => read(TextFormat::Fhir, t),
        Some(Document::Hl7v2(t)) => read(TextFormat::Hl7v2, t),
        Some(Document::Native(n)) => {
            crate::grpc::summary::from_wire(n.clone(), "document", &mut Default::default())
                .ok_or_else(|| anyhow::anyhow!("the delivered summary does not read back"))
        }
        None => anyhow::bail!("the delivery has no document"),
    }
}

/// Prints each destination's state of a handover the caller submitted.
///
/// # Errors
/// An unreachable gateway or a refusal, with what to do next.
pub async fn track(args: TrackArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let t = client
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId(
                args.message_id.clone(),
            )),
        })
        .await
        .map_err(|s| {
            explain(
                &s,
                &format!(
                    "track of message id {} sent by {}",
                    args.message_id, args.client.as_
                ),
            )
        })?
        .into_inner();
    crate::outln!(
        "handover {} ({})",
        t.handover_id,
        crate::grpc::enum_label(t.event().as_str_name())
    )?;
    if t.supersedes_handover_id != 0 {
        crate::outln!("  supersedes handover {}", t.supersedes_handover_id)?;
    }
    for d in t.deliveries {
        let due = d
            .due_at
            .as_ref()
            .map(|t| format!("  due {}", crate::uk_time::display_timestamp(t)))
            .unwrap_or_default();
        let reason = if d.quarantine_reason.is_empty() {
            String::new()
        } else {
            format!("  ({})", d.quarantine_reason)
        };
        let mesh = if d.mesh_state.is_empty() {
            String::new()
        } else {
            format!("  mesh {} {}", d.mesh_state, d.mesh_message_id)
        };
        crate::outln!(
            "  {:<8} delivery {:<6} {:<12} attempts {}{due}{}{}{mesh}{reason}",
            d.destination,
            d.delivery_id,
            crate::grpc::enum_label(d.state().as_str_name()),
            d.attempts,
            if d.overdue { "  OVERDUE" } else { "" },
            if d.urgent { "  urgent" } else { "" },
        )?;
    }
    Ok(())
}

/// A journey event from its command-line name.
///
/// # Errors
/// An unknown name, listing the known ones.
pub fn parse_event(s: &str) -> anyhow::Result<pb::JourneyEvent> {
    Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "admission" => pb::JourneyEvent::Admission,
        "transfer" => pb::JourneyEvent::Transfer,
        "release" => pb::JourneyEvent::Release,
        "community-summary" => pb::JourneyEvent::CommunitySummary,
        _ => anyhow::bail!(
            "unknown --event {s:?}: use admission, transfer, release or community-summary"
        ),
    })
}

/// The document to send: `--document`, or the invented patient's summary
/// carrying the patient options, shaped for the event.
fn submit_document(
    args: &SubmitArgs,
    event: pb::JourneyEvent,
) -> anyhow::Result<pb::submit_request::Document> {
    use pb::submit_request::Document;
    let Some(path) = &args.document else {
        let summary = invented_summary(args, event)?;
        return Ok(Document::Native(crate::grpc::summary::to_wire(&summary)));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if args.model {
        let summary: ClinicalSummary = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a canonical-model JSON", path.display()))?;
        return Ok(Document::Native(crate::grpc::summary::to_wire(&summary)));
    }
    Ok(if text.starts_with("MSH") {
        Document::Hl7v2(text)
    } else {
        Document::FhirJson(text)
    })
}

/// The built-in invented patient, with the identifiers and date of birth
/// given on the command line, and what the event needs.
fn invented_summary(args: &SubmitArgs, event: pb::JourneyEvent) -> anyhow::Result<ClinicalSummary> {
    if args.nhs.is_empty() && args.prison_number.is_empty() {
        anyhow::bail!(
            "the patient needs an NHS number or a prison number: add --nhs 9990000018 \
             (an invented, test-range number) or --prison-number A1234BC"
        );
    }
    let nhs = (!args.nhs.is_empty())
        .then(|| args.nhs.parse())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--nhs {}: {e}", args.nhs))?;
    let prison = (!args.prison_number.is_empty())
        .then(|| args.prison_number.parse())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--prison-number {}: {e}", args.prison_number))?;
    let gp = (!args.gp.is_empty())
        .then(|| args.gp.parse())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--gp {}: {e}", args.gp))?;
    let me = args
        .client
        .as_
        .parse()
        .map_err(|e| anyhow::anyhow!("--as {}: {e}", args.client.as_))?;
    let mut s = crate::clinical::synthetic::release_summary(nhs, prison, me, gp, &args.text);
    s.patient.date_of_birth = args
        .dob
        .parse()
        .map_err(|e| anyhow::anyhow!("--dob {}: {e} (use YYYY-MM-DD)", args.dob))?;
    let now = time::OffsetDateTime::now_utc();
    let today = Date(now.date());
    s.custody.release_date = None;
    match event {
        pb::JourneyEvent::Admission => s.custody.reception_date = Some(today),
        pb::JourneyEvent::Transfer => {
            let to = args.to.first().ok_or_else(|| {
                anyhow::anyhow!("a transfer needs the receiving prison: add --to YP002")
            })?;
            s.custody.transfer_to =
                Some(to.parse().map_err(|e| anyhow::anyhow!("--to {to}: {e}"))?);
            s.custody.transfer_at = Some(DateTime(now + time::Duration::hours(2)));
        }
        // Released today, so its deadline (the end of the release day) lies ahead.
        _ => s.custody.release_date = Some(today),
    }
    Ok(s)
}

/// A refusal as an error that says what failed and what to do next.
pub fn explain(s: &tonic::Status, what: &str) -> anyhow::Error {
    use tonic::Code;
    let next = match s.code() {
        Code::InvalidArgument => "fix what the message names and send again",
        Code::AlreadyExists => "this message id was used for other content: use a new --message-id",
        Code::NotFound => {
            "check the id: an organisation sees only its own mailbox, and tracks only what it sent itself"
        }
        Code::FailedPrecondition => "pull again and act on the attempt you now hold",
        Code::PermissionDenied => "this organisation may not do that (see docs/authorisation.md)",
        Code::Unauthenticated => {
            "the certificate's organisation is not in the registry: check --as and --certs-dir"
        }
        Code::ResourceExhausted => "slow down, then try again",
        Code::Unavailable | Code::DeadlineExceeded => {
            "is the gateway running and reachable? try again in a moment (a submit is safe to repeat)"
        }
        _ => "see the gateway's log",
    };
    anyhow::anyhow!(
        "{what} refused ({:?}): {}\nnext: {next}",
        s.code(),
        s.message()
    )
}
