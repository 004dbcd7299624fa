//! `throughcare demo`: one invented patient's journey through a real gateway.
//!
//! Starts a gateway on a temporary directory with a fresh dev PKI, on
//! 127.0.0.1 with mutual TLS, then plays each party in turn over real
//! connections and prints what each one sees. Everything is removed at the end.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use tonic::transport::Channel;

use crate::app::Prepared;
use crate::clinical::ClinicalSummary;
use crate::clinical::model::{
    Code, ConsentDecision, DMD, DateTime, Medication, RiskFlag, RiskKind, SubstanceMisuse,
};
use crate::config::Config;
use crate::grpc::pb;
use crate::grpc::pb::handover_service_client::HandoverServiceClient;

/// The invented patient's NHS number (999 test range, valid check digit).
const NHS: &str = "9990000018";
const DOB: &str = "1985-06-15";

type Client = HandoverServiceClient<Channel>;

/// Plays the journey, writing each step to `out`.
///
/// # Errors
/// Any step the gateway refused: the demo must run clean.
pub async fn run(out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = Config {
        data_dir: dir.path().join("data"),
        certs_dir: dir.path().join("certs"),
        // A fresh development PKI for the story (the README's second command).
        dev_certs: true,
        shutdown_grace_ms: 2_000,
        // Any free port: the demo must not collide with a gateway already running.
        metrics: crate::config::MetricsConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        },
        mllp: crate::mllp::MllpConfig {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            ..crate::mllp::MllpConfig::default()
        },
        ..Config::default()
    };
    let mut prepared = Prepared::with_system_clock(config.clone())?;
    let mllp = prepared.bind_mllp()?.context("MLLP is enabled")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(prepared.serve(listener, async {
        let _ = stopped.await;
    }));
    writeln!(
        out,
        "Throughcare demo: a gateway on {endpoint} (mutual TLS, store in a temporary directory).\n\
         One invented patient, NHS number {NHS} (test range), born {DOB}.\n"
    )?;
    let mut played = play(out, &endpoint, &config.certs_dir).await;
    if played.is_ok() {
        played = over_mllp(out, mllp, &config.certs_dir).await;
    }
    let _ = stop.send(());
    server.await?.context("the gateway stopped badly")?;
    played?;
    writeln!(
        out,
        "\nThe gateway drained and stopped; the temporary directory is removed."
    )?;
    Ok(())
}

/// An integration engine sends an admission as HL7 v2 over MLLP, and
/// resends it as one would after a lost ACK.
async fn over_mllp(
    out: &mut dyn std::io::Write,
    addr: std::net::SocketAddr,
    certs: &Path,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n8. HL7 v2 OVER MLLP: Ashdown's patient administration system sends another invented patient's ADT^A01 (mutual TLS, {addr})"
    )?;
    let mut s = crate::clinical::synthetic::release_summary(
        "9990000026".parse().ok(),
        None,
        "YP001".parse().expect("dev ODS code"),
        Some("YG001".parse().expect("dev ODS code")),
        "admission",
    );
    s.custody.release_date = None;
    s.custody.release_address = None;
    let event = crate::clinical::JourneyEvent::Admission;
    let text = String::from_utf8(crate::clinical::hl7v2::render(&s, event).bytes)?;
    let (msh, rest) = text.split_once('\r').context("an MSH segment")?;
    let mut fields: Vec<&str> = msh.split('|').collect();
    fields[9] = "demo-mllp-1";
    let message = format!("{}\r{rest}", fields.join("|"));
    let acks = crate::cli::mllp::send(addr, certs, "YP001", &[&message, &message]).await?;
    let msa = |ack: &str| {
        ack.split('\r')
            .find(|s| s.starts_with("MSA|"))
            .unwrap_or_default()
            .to_owned()
    };
    writeln!(
        out,
        "   ACK once the admission is durable: {} (MSH-10 is the message id)",
        msa(&acks[0])
    )?;
    writeln!(
        out,
        "   resent after a lost ACK: {} again, nothing stored twice",
        msa(&acks[1])
    )?;
    Ok(())
}

fn today() -> time::Date {
    time::OffsetDateTime::now_utc().date()
}

fn patient_summary(establishment: &str, gp: Option<&str>) -> ClinicalSummary {
    let mut s = crate::clinical::synthetic::release_summary(
        NHS.parse().ok(),
        "A1234BC".parse().ok(),
        establishment.parse().expect("dev ODS code"),
        gp.map(|g| g.parse().expect("dev ODS code")),
        "Community drug and alcohol team: first appointment within 2 days",
    );
    s.custody.release_date = None;
    s.custody.release_address = None;
    s.custody.reception_date = Some(crate::clinical::model::Date(today()));
    s
}

fn with_methadone(s: &mut ClinicalSummary) {
    // The morning dose last given: today's at 08:10, or yesterday's before
    // then (a dose given in the future is refused, and the demo ran only
    // after 08:05 UTC).
    let now = time::OffsetDateTime::now_utc();
    let today = now.replace_time(time::macros::time!(08:10));
    let last_dose = if today <= now {
        today
    } else {
        today - time::Duration::days(1)
    };
    s.medications.insert(
        0,
        Medication {
            code: Code {
                system: DMD.into(),
                code: "322816007".into(),
                display: "Methadone 1mg/ml oral solution".into(),
            },
            dose: "60 mg".into(),
            route: "oral".into(),
            frequency: "once daily, supervised".into(),
            supervised: true,
            as_needed: false,
            opioid_substitution: true,
            last_dose_given: Some(DateTime(last_dose)),
            days_supplied: None,
        },
    );
    s.substance_misuse = Some(SubstanceMisuse {
        in_treatment: true,
        community_service: Some("Northam Recovery Service (invented)".into()),
    });
    s.risks.push(RiskFlag {
        kind: RiskKind::Vulnerability,
        active: true,
        note: Some("Reduced opioid tolerance after custody: overdose risk".into()),
        code: None,
    });
}

fn receipt_line(r: &pb::SubmitResponse) -> String {
    let mut line = format!("accepted as handover {}:", r.handover_id);
    for d in &r.deliveries {
        let due = d
            .due_at
            .as_ref()
            .map(crate::uk_time::display_timestamp)
            .unwrap_or_else(|| "no deadline".into());
        let _ = write!(
            line,
            " -> {}{} (due {due})",
            d.destination,
            if d.urgent { " URGENT" } else { "" }
        );
    }
    line
}

async fn pull_one(client: &mut Client, format: pb::DocumentFormat) -> anyhow::Result<pb::Delivery> {
    let mut got = client
        .pull(pb::PullRequest {
            max_deliveries: 1,
            lease: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            wait: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            format: format.into(),
        })
        .await?
        .into_inner()
        .deliveries;
    let d = got.pop().context("nothing arrived")?;
    client
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await?;
    Ok(d)
}

fn native(d: &pb::Delivery) -> anyhow::Result<&pb::ClinicalSummary> {
    match &d.document {
        Some(pb::delivery::Document::Native(s)) => Ok(s),
        _ => anyhow::bail!("expected a native document"),
    }
}

async fn play(out: &mut dyn std::io::Write, endpoint: &str, certs: &Path) -> anyhow::Result<()> {
    let connect = |name: &'static str| async move {
        crate::cli::client::handover(endpoint, certs, name)
            .await
            .with_context(|| format!("connect as {name}"))
    };
    let mut p = Parties {
        ashdown: connect("YP001").await?,
        riverside: connect("YG001").await?,
        brackenfield: connect("YP002").await?,
        hillview: connect("YG002").await?,
        probation: connect("YPR01").await?,
    };
    admission(out, &mut p).await?;
    community_summary(out, &mut p).await?;
    transfer(out, &mut p).await?;
    release(out, &mut p).await?;
    claim(out, &mut p).await?;
    probation_view(out, &mut p).await?;
    track(out, &mut p).await
}

/// The demo's organisations, each with its own certificate.
struct Parties {
    ashdown: Client,
    riverside: Client,
    brackenfield: Client,
    hillview: Client,
    probation: Client,
}

/// The prison admits the patient; the GP gets an admission notice.
async fn admission(out: &mut dyn std::io::Write, p: &mut Parties) -> anyhow::Result<()> {
    writeln!(
        out,
        "1. ADMISSION at HMP Ashdown (YP001); the patient's GP is Riverside Surgery (YG001)"
    )?;
    let s = patient_summary("YP001", Some("YG001"));
    let r = p
        .ashdown
        .submit(crate::cli::client::native_submit(
            "demo-adm",
            pb::JourneyEvent::Admission,
            &[],
            &s,
        ))
        .await?
        .into_inner();
    writeln!(out, "   prison: {}", receipt_line(&r))?;
    let d = pull_one(&mut p.riverside, pb::DocumentFormat::Native).await?;
    let notice = native(&d)?;
    writeln!(
        out,
        "   Riverside receives an admission notice: {} {}, in custody at {} since {}; medicines {} (a notice carries no clinical detail)",
        notice
            .patient
            .as_ref()
            .map_or("", |p| p.given_names.first().map_or("", String::as_str)),
        notice
            .patient
            .as_ref()
            .map_or("", |p| p.family_name.as_str()),
        notice
            .custody
            .as_ref()
            .map_or("", |c| c.establishment.as_str()),
        notice
            .custody
            .as_ref()
            .map_or("", |c| c.reception_date.as_str()),
        notice.medications.len()
    )?;
    Ok(())
}

/// The GP sends the community record back to the prison.
async fn community_summary(out: &mut dyn std::io::Write, p: &mut Parties) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n2. COMMUNITY_SUMMARY: Riverside sends the community record back"
    )?;
    let mut community = patient_summary("YP001", Some("YG001"));
    with_methadone(&mut community);
    community.author.organisation = "YG001".parse().expect("dev ODS code");
    let r = p
        .riverside
        .submit(crate::cli::client::native_submit(
            "demo-cs",
            pb::JourneyEvent::CommunitySummary,
            &[],
            &community,
        ))
        .await?
        .into_inner();
    writeln!(out, "   practice: {}", receipt_line(&r))?;
    let d = pull_one(&mut p.ashdown, pb::DocumentFormat::Native).await?;
    let got = native(&d)?;
    writeln!(
        out,
        "   Ashdown receives it{}: {} medicines, first {}",
        if d.urgent {
            " (URGENT: opioid substitution therapy)"
        } else {
            ""
        },
        got.medications.len(),
        got.medications
            .first()
            .and_then(|m| m.code.as_ref())
            .map_or("", |c| c.display.as_str())
    )?;
    Ok(())
}

/// The prison transfers the patient, with opioid substitution therapy.
async fn transfer(out: &mut dyn std::io::Write, p: &mut Parties) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n3. TRANSFER from Ashdown to HMP Brackenfield (YP002), with opioid substitution therapy"
    )?;
    let mut transfer = patient_summary("YP001", Some("YG001"));
    with_methadone(&mut transfer);
    transfer.custody.transfer_to = Some("YP002".parse().expect("dev ODS code"));
    transfer.custody.transfer_at = Some(DateTime(
        time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
            + time::Duration::hours(6),
    ));
    let r = p
        .ashdown
        .submit(crate::cli::client::native_submit(
            "demo-tr",
            pb::JourneyEvent::Transfer,
            &[],
            &transfer,
        ))
        .await?
        .into_inner();
    writeln!(out, "   prison: {}", receipt_line(&r))?;
    let d = pull_one(&mut p.brackenfield, pb::DocumentFormat::Native).await?;
    let got = native(&d)?;
    let ost = got.medications.first().context("medicines first")?;
    writeln!(
        out,
        "   Brackenfield receives the full summary{}, medicines first: {} {} {}, last dose given {}",
        if d.urgent { " (URGENT)" } else { "" },
        ost.code.as_ref().map_or("", |c| c.display.as_str()),
        ost.dose,
        ost.frequency,
        ost.last_dose_given
    )?;
    Ok(())
}

/// The receiving prison releases the patient with no GP: parked.
async fn release(out: &mut dyn std::io::Write, p: &mut Parties) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n4. RELEASE from Brackenfield today: the patient has no GP, so the summary is PARKED"
    )?;
    let mut release = patient_summary("YP002", None);
    with_methadone(&mut release);
    release.consent.probation_sharing = ConsentDecision::Refused;
    release.custody.reception_date = None;
    release.custody.release_date = Some(crate::clinical::model::Date(today()));
    release.custody.no_fixed_abode = true;
    release.patient.crn = "X123456".parse().ok();
    let r = p
        .brackenfield
        .submit(crate::cli::client::native_submit(
            "demo-rel",
            pb::JourneyEvent::Release,
            &["YPR01"],
            &release,
        ))
        .await?
        .into_inner();
    writeln!(out, "   prison: {}", receipt_line(&r))?;
    Ok(())
}

/// A practice registers the patient and claims the parked release.
async fn claim(out: &mut dyn std::io::Write, p: &mut Parties) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n5. Hillview Medical Centre (YG002) registers the patient and claims the parked release"
    )?;
    let claimed = p
        .hillview
        .claim(pb::ClaimRequest {
            patient: Some(pb::PatientRef {
                nhs_number: NHS.into(),
                prison_number: String::new(),
                date_of_birth: DOB.into(),
            }),
            evidence: None,
        })
        .await?
        .into_inner()
        .claimed;
    writeln!(
        out,
        "   claimed {} release(s) into Hillview's mailbox",
        claimed.len()
    )?;
    let d = pull_one(&mut p.hillview, pb::DocumentFormat::Unspecified).await?;
    let Some(pb::delivery::Document::Hl7v2(hl7)) = &d.document else {
        anyhow::bail!("Hillview is registered for HL7 v2");
    };
    writeln!(
        out,
        "   Hillview receives the release summary as HL7 v2 (its registered format):"
    )?;
    for segment in hl7.split('\r').filter(|s| !s.is_empty()).take(6) {
        let shown: String = segment.chars().take(100).collect();
        writeln!(out, "     {shown}")?;
    }
    writeln!(
        out,
        "     ... {} segments in all",
        hl7.split('\r').filter(|s| !s.is_empty()).count()
    )?;
    Ok(())
}

/// Probation receives only its view.
async fn probation_view(out: &mut dyn std::io::Write, p: &mut Parties) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n6. Probation (YPR01) receives only its view; the patient refused consent, so no risk flags"
    )?;
    let d = pull_one(&mut p.probation, pb::DocumentFormat::Native).await?;
    let view = native(&d)?;
    writeln!(
        out,
        "   probation sees: release date {}, no fixed abode {}, GP registration in place {}, medicines {}, risk flags {}",
        view.custody
            .as_ref()
            .map_or("", |c| c.release_date.as_str()),
        view.custody.as_ref().is_some_and(|c| c.no_fixed_abode),
        !view.registered_gp.is_empty(),
        view.medications.len(),
        view.risks.len()
    )?;
    Ok(())
}

/// The releasing prison tracks its release.
async fn track(out: &mut dyn std::io::Write, p: &mut Parties) -> anyhow::Result<()> {
    writeln!(out, "\n7. TRACK: what Brackenfield sees of its release")?;
    let t = p
        .brackenfield
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId("demo-rel".into())),
        })
        .await?
        .into_inner();
    for d in &t.deliveries {
        writeln!(
            out,
            "   delivery {} to {:<6} {:?}{}",
            d.delivery_id,
            d.destination,
            d.state(),
            if d.claimed_by.is_empty() {
                String::new()
            } else {
                format!(" (claimed by {})", d.claimed_by)
            }
        )?;
    }
    Ok(())
}
