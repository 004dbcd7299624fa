//! No value a caller supplies comes back in an error, a log line or an audit
//! entry unless it is a known organisation: hostile values in every
//! caller-supplied field of every call, against the real binary at
//! `RUST_LOG=debug`; then its errors, its whole log and its whole audit trail
//! are searched for them. Errors still say what is wrong and where.

use crate::support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{BIN, Server};
use support::*;
use throughcare::clinical::ClinicalSummary;
use throughcare::grpc::pb;
use throughcare::store::{Store, StoreOptions, SystemClock};
use tonic::Code;

/// A valid synthetic NHS number that is also a well-formed (unknown) ODS code.
fn hostile_nhs() -> String {
    nhs(4242)
}

/// The same with a wrong check digit.
fn hostile_bad_nhs() -> String {
    let mut n = hostile_nhs();
    let last = n.pop().unwrap().to_digit(10).unwrap();
    n.push(char::from_digit((last + 1) % 10, 10).unwrap());
    n
}

const NAME: &str = "Hostilename";
const DATE: &str = "1971-03-04";
const PRISON: &str = "Q7777QQ";

fn markers() -> Vec<String> {
    vec![
        hostile_nhs(),
        hostile_bad_nhs(),
        NAME.into(),
        DATE.into(),
        "19710304".into(),
        PRISON.into(),
    ]
}

fn assert_clean(what: &str, status: &tonic::Status) {
    let text = format!(
        "{} {}",
        status.message(),
        String::from_utf8_lossy(status.details())
    );
    for m in markers() {
        assert!(!text.contains(&m), "{what}: the error echoes {m}: {text}");
    }
}

fn native(summary: &throughcare::clinical::ClinicalSummary) -> pb::submit_request::Document {
    pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(summary))
}

fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

fn submit(
    message_id: &str,
    event: pb::JourneyEvent,
    patient: Option<pb::PatientRef>,
    destinations: Vec<String>,
    document: pb::submit_request::Document,
) -> pb::SubmitRequest {
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: event.into(),
        patient,
        destinations,
        document: Some(document),
    }
}

fn hostile_patient() -> pb::PatientRef {
    pb::PatientRef {
        nhs_number: hostile_bad_nhs(),
        prison_number: format!("{PRISON}{NAME}"),
        date_of_birth: format!("{DATE}x"),
    }
}

/// The refused calls, each with what it must name.
#[derive(Default)]
struct Refused(Vec<(String, tonic::Status)>);

impl Refused {
    /// Records a refused call; a call accepted fails the test.
    fn expect(&mut self, what: &str, r: Result<(), tonic::Status>) {
        match r {
            Ok(()) => panic!("{what}: accepted"),
            Err(s) => self.0.push((what.to_owned(), s)),
        }
    }
}

type Handover = pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>;
type Operator = pb::operator_service_client::OperatorServiceClient<tonic::transport::Channel>;

/// Every refused call, with what it must name.
async fn hostile_calls(endpoint: &str, certs: &std::path::Path) -> Vec<(String, tonic::Status)> {
    let mut prison = throughcare::cli::client::handover(endpoint, certs, "YP001")
        .await
        .unwrap();
    let mut practice = throughcare::cli::client::handover(endpoint, certs, "YG001")
        .await
        .unwrap();
    let mut op = throughcare::cli::client::operator(endpoint, certs, "operator-oncall")
        .await
        .unwrap();
    let release = throughcare::clinical::synthetic::release_summary(
        nhs(1).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        None,
        "hostile",
    );
    let mut refused = Refused::default();
    hostile_submit_fields(&mut prison, &release, &mut refused).await;
    hostile_documents(&mut prison, &mut practice, &release, &mut refused).await;
    hostile_delivery_calls(&mut prison, &mut practice, &mut refused).await;
    hostile_operator_calls(&mut op, &mut refused).await;
    refused.0
}

/// Submit: each caller-supplied field.
async fn hostile_submit_fields(
    prison: &mut Handover,
    release: &ClinicalSummary,
    refused: &mut Refused,
) {
    let doc = native(release);
    refused.expect(
        "destinations: an unknown, NHS-number-shaped code",
        ok(prison
            .submit(submit(
                "h-1",
                pb::JourneyEvent::Release,
                None,
                vec![hostile_nhs()],
                doc.clone(),
            ))
            .await),
    );
    refused.expect(
        "destinations: free text",
        ok(prison
            .submit(submit(
                "h-2",
                pb::JourneyEvent::Release,
                None,
                vec![format!("{NAME} {DATE}")],
                doc.clone(),
            ))
            .await),
    );
    refused.expect(
        "message_id and patient",
        ok(prison
            .submit(submit(
                &format!("{NAME} {DATE}"),
                pb::JourneyEvent::Release,
                Some(hostile_patient()),
                vec![],
                doc.clone(),
            ))
            .await),
    );
}

/// Documents naming unknown prisons, and FHIR and HL7 v2 with hostile keys,
/// segments and values.
async fn hostile_documents(
    prison: &mut Handover,
    practice: &mut Handover,
    release: &ClinicalSummary,
    refused: &mut Refused,
) {
    let mut transfer = release.clone();
    transfer.custody.release_date = None;
    transfer.custody.transfer_to = Some(hostile_nhs().parse().unwrap());
    transfer.custody.transfer_at = Some("2030-01-01T09:00:00Z".parse().unwrap());
    refused.expect(
        "document: an unknown receiving prison",
        ok(prison
            .submit(submit(
                "h-4",
                pb::JourneyEvent::Transfer,
                None,
                vec![],
                native(&transfer),
            ))
            .await),
    );
    let mut community = release.clone();
    community.custody.establishment = hostile_nhs().parse().unwrap();
    refused.expect(
        "document: an unknown admitting prison",
        ok(practice
            .submit(submit(
                "h-5",
                pb::JourneyEvent::CommunitySummary,
                None,
                vec![],
                native(&community),
            ))
            .await),
    );
    let fhir = format!(
        r#"{{"resourceType":"Bundle","type":"document","{}":"{NAME}","entry":[{{"resource":{{"resourceType":"Patient","birthDate":"{DATE}x","identifier":[{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{}"}}]}}}}]}}"#,
        hostile_nhs(),
        hostile_bad_nhs()
    );
    refused.expect(
        "document: FHIR with hostile keys and values",
        ok(prison
            .submit(submit(
                "h-6",
                pb::JourneyEvent::Release,
                None,
                vec![],
                pb::submit_request::Document::FhirJson(fhir),
            ))
            .await),
    );
    let hl7 = format!(
        "MSH|^~\\&|X|YP001|Y|Z|20260101000000||ADT^A03|1|P|2.5.1\r{}|{NAME}\rPID|||{}^^^NHS^NH||{NAME}^{NAME}||{DATE}x\r",
        hostile_nhs(),
        hostile_bad_nhs()
    );
    refused.expect(
        "document: HL7 v2 with hostile segments and values",
        ok(prison
            .submit(submit(
                "h-7",
                pb::JourneyEvent::Release,
                None,
                vec![],
                pb::submit_request::Document::Hl7v2(hl7),
            ))
            .await),
    );
}

/// Pull, ack, nack, track, claim.
async fn hostile_delivery_calls(
    prison: &mut Handover,
    practice: &mut Handover,
    refused: &mut Refused,
) {
    refused.expect(
        "pull: unknown format",
        ok(practice
            .pull(pb::PullRequest {
                format: 4242,
                ..pull(1)
            })
            .await),
    );
    let delivery_id: u64 = hostile_nhs().parse().unwrap();
    refused.expect(
        "ack: unknown delivery",
        ok(practice
            .ack(pb::AckRequest {
                delivery_id,
                attempt: 1,
            })
            .await),
    );
    refused.expect(
        "nack: patient data in the reason",
        ok(practice
            .nack(pb::NackRequest {
                delivery_id,
                attempt: 1,
                permanent: true,
                reason: format!("{NAME} {} born {DATE}", hostile_nhs()),
            })
            .await),
    );
    refused.expect(
        "track: unknown message id",
        ok(prison
            .track(pb::TrackRequest {
                handover: Some(pb::track_request::Handover::MessageId(hostile_nhs())),
            })
            .await),
    );
    refused.expect(
        "claim: hostile patient and evidence",
        ok(practice
            .claim(pb::ClaimRequest {
                patient: Some(hostile_patient()),
                evidence: Some(pb::ClaimEvidence {
                    registration_date: format!("{DATE}x"),
                }),
            })
            .await),
    );
    refused.expect(
        "claim: no such patient",
        ok(practice
            .claim(pb::ClaimRequest {
                patient: Some(pb::PatientRef {
                    nhs_number: hostile_nhs(),
                    prison_number: String::new(),
                    date_of_birth: DATE.into(),
                }),
                evidence: None,
            })
            .await),
    );
}

/// Operator calls.
async fn hostile_operator_calls(op: &mut Operator, refused: &mut Refused) {
    refused.expect(
        "claim_parked: unknown practice, patient data in the reason",
        ok(op
            .claim_parked(pb::ClaimParkedRequest {
                patient: Some(hostile_patient()),
                practice: hostile_nhs(),
                reason: format!("{NAME} born {DATE}"),
            })
            .await),
    );
    refused.expect(
        "set_organisation_active: unknown code",
        ok(op
            .set_organisation_active(pb::SetOrganisationActiveRequest {
                ods_code: hostile_nhs(),
                active: false,
            })
            .await),
    );
    refused.expect(
        "audit_trail: bad NHS number, patient data in the reason",
        ok(op
            .audit_trail(pb::AuditTrailRequest {
                subject: Some(pb::audit_trail_request::Subject::NhsNumber(
                    hostile_bad_nhs(),
                )),
                reason: format!("asked by {NAME}"),
                ..Default::default()
            })
            .await),
    );
    refused.expect(
        "break_glass_read: patient data in the reason",
        ok(op
            .break_glass_read(pb::BreakGlassReadRequest {
                handover_id: 1,
                reason: format!("reviewing {NAME}, NHS {}", hostile_nhs()),
            })
            .await),
    );
    refused.expect(
        "put_organisation: a code that is free text",
        ok(op
            .put_organisation(pb::PutOrganisationRequest {
                organisation: Some(pb::Organisation {
                    ods_code: format!("{NAME} {}", hostile_nhs()),
                    kind: pb::OrganisationKind::GpPractice.into(),
                    name: "x".into(),
                    format: 0,
                    region: String::new(),
                    mesh_mailbox: String::new(),
                    active: true,
                }),
            })
            .await),
    );
}

#[tokio::test]
async fn hostile_values_in_every_field_never_come_back_in_errors_logs_or_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let log_path = dir.path().join("gateway.log");
    let certs = dir.path().join("certs");
    let data = dir.path().join("data");
    let server = Server(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--certs-dir")
            .arg(&certs)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
            .spawn()
            .unwrap(),
    );
    let endpoint = format!("https://127.0.0.1:{port}");
    for _ in 0..300 {
        if throughcare::cli::client::handover(&endpoint, &certs, "YP001")
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = hostile_calls(&endpoint, &certs).await;
    assert_eq!(refused.len(), 18);
    for (what, status) in &refused {
        assert_clean(what, status);
        assert!(!status.message().is_empty(), "{what}: says what is wrong");
    }
    // Errors still say what and where.
    let named = |what: &str| &refused.iter().find(|(w, _)| w == what).unwrap().1;
    let s = named("destinations: an unknown, NHS-number-shaped code");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(violations(s), ["destinations[0]"]);
    assert!(
        s.message()
            .contains("no registered organisation has this ODS code")
    );
    assert_eq!(
        violations(named("document: an unknown receiving prison")),
        ["document.native.custody.transfer_to"]
    );
    assert_eq!(
        violations(named(
            "claim_parked: unknown practice, patient data in the reason"
        )),
        [
            "reason",
            "practice",
            "patient.nhs_number",
            "patient.prison_number",
            "patient.date_of_birth"
        ]
    );
    assert_eq!(
        violations(named("nack: patient data in the reason")),
        ["reason"]
    );
    drop(server);

    // The whole log, at debug, every crate.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("refused"), "the log holds the refusals");
    for m in markers() {
        assert!(
            !log.contains(&m),
            "the log holds {m}: {}",
            log.lines()
                .filter(|l| l.contains(&m))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The whole audit trail.
    let store = Store::open(&data, StoreOptions::default(), Arc::new(SystemClock)).unwrap();
    let trail = store.audit_entries().unwrap();
    assert!(trail.len() >= 18, "every refusal audited: {}", trail.len());
    let text = serde_json::to_string(&trail).unwrap();
    for m in markers() {
        assert!(!text.contains(&m), "the audit trail holds {m}");
    }
    store.close().await.unwrap();
}
