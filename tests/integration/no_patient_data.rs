//! Patient data stays inside the encrypted store and the recipient's answer:
//! - at rest, no file of the data directory holds any fixture's names, NHS
//!   number, date of birth or clinical text in clear, and removing a
//!   handover's wrapped data key destroys its content;
//! - the real binary at `RUST_LOG=debug`, through every format, pull, ack and
//!   a set of provoked errors, never prints them.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use throughcare::clinical::translate::{self, TextFormat};
use throughcare::clinical::{ClinicalSummary, View};
use throughcare::grpc::pb;
use throughcare::journey::JourneyEvent;
use throughcare::store::SystemClock;

fn fixtures() -> Vec<(String, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/patients");
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (
                name,
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 7);
    out
}

/// What must never appear: names, NHS numbers and dates of birth, and (for
/// the data directory) every other string of clinical text.
fn needles(with_clinical_text: bool) -> Vec<String> {
    fn leaves(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| leaves(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| leaves(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (_, f) in fixtures() {
        let p = &f["patient"];
        for key in ["family_name", "nhs_number", "date_of_birth"] {
            if let Some(s) = p[key].as_str() {
                out.push(s.to_owned());
            }
        }
        for g in p["given_names"].as_array().into_iter().flatten() {
            out.push(g.as_str().unwrap().to_owned());
        }
        if with_clinical_text {
            for key in [
                "diagnoses",
                "medications",
                "allergies",
                "risks",
                "mental_health",
                "substance_misuse",
                "infections",
                "follow_ups",
            ] {
                leaves(&f[key], &mut out);
            }
        }
    }
    // Short strings (codes like "oral") would match by chance; URLs and
    // code systems are not clinical text.
    out.retain(|s| s.len() >= 6 && !s.starts_with("http"));
    out.sort();
    out.dedup();
    out
}

fn event_of(json: &serde_json::Value) -> (pb::JourneyEvent, JourneyEvent, &'static [&'static str]) {
    let custody = &json["custody"];
    if custody["transfer_to"].is_string() {
        (
            pb::JourneyEvent::Transfer,
            JourneyEvent::Transfer,
            &["YP002"],
        )
    } else if custody["release_date"].is_string() {
        (
            pb::JourneyEvent::Release,
            JourneyEvent::Release,
            &["YG001", "YG002", "YPR01"],
        )
    } else {
        (
            pb::JourneyEvent::Admission,
            JourneyEvent::Admission,
            // Routed by the rules to the registered GP named in the fixture.
            &[],
        )
    }
}

type Client = pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>;

/// Every fixture in every format, pulled and acked by every recipient, then
/// the provoked errors. Returns how many submits were accepted.
async fn workload(endpoint: &str, certs: &Path) -> usize {
    let mut prison = throughcare::cli::client::handover(endpoint, certs, "YP001")
        .await
        .unwrap();
    let accepted = submit_every_fixture_in_every_format(&mut prison).await;
    pull_and_ack_everything(endpoint, certs).await;
    provoke_errors(&mut prison).await;
    accepted
}

/// Each fixture as native, FHIR and HL7 v2; returns how many were accepted.
async fn submit_every_fixture_in_every_format(prison: &mut Client) -> usize {
    let mut accepted = 0;
    for (i, (name, json)) in fixtures().into_iter().enumerate() {
        let (wire_event, event, to) = event_of(&json);
        let mut summary: ClinicalSummary = serde_json::from_value(json).unwrap();
        // Sent by the one prison this test connects as.
        crate::support::written_by(&mut summary, "YP001");
        let text =
            |f| String::from_utf8(translate::write(f, &summary, View::Full, event).bytes).unwrap();
        let documents = [
            (
                "native",
                pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(&summary)),
            ),
            (
                "fhir",
                pb::submit_request::Document::FhirJson(text(TextFormat::Fhir)),
            ),
            (
                "hl7",
                pb::submit_request::Document::Hl7v2(text(TextFormat::Hl7v2)),
            ),
        ];
        for (format, document) in documents {
            let req = pb::SubmitRequest {
                // Message ids are the sender's; fixture names would match.
                message_id: format!("m{i}-{format}"),
                event: wire_event.into(),
                patient: None,
                destinations: to.iter().map(|s| (*s).to_owned()).collect(),
                document: Some(document),
            };
            match prison.submit(req).await {
                Ok(_) => accepted += 1,
                Err(s) => panic!("{name} as {format} refused: {s:?}"),
            }
        }
    }
    accepted
}

/// Every recipient pulls and acks until its mailbox is empty.
async fn pull_and_ack_everything(endpoint: &str, certs: &Path) {
    for who in ["YG001", "YG002", "YPR01", "YP002"] {
        let mut c = throughcare::cli::client::handover(endpoint, certs, who)
            .await
            .unwrap();
        for _ in 0..10 {
            let got = c
                .pull(pb::PullRequest {
                    max_deliveries: 100,
                    ..pull(100)
                })
                .await
                .unwrap()
                .into_inner()
                .deliveries;
            if got.is_empty() {
                break;
            }
            for d in got {
                c.ack(pb::AckRequest {
                    delivery_id: d.delivery_id,
                    attempt: d.attempt,
                })
                .await
                .unwrap();
            }
        }
    }
}

/// Provoked errors, each carrying a fixture's patient: none names the patient.
async fn provoke_errors(prison: &mut Client) {
    let first: ClinicalSummary = serde_json::from_value(fixtures()[0].1.clone()).unwrap();
    let native = || {
        Some(pb::submit_request::Document::Native(
            throughcare::grpc::summary::to_wire(&first),
        ))
    };
    let nhs = first
        .patient
        .nhs_number
        .as_ref()
        .unwrap()
        .as_str()
        .to_owned();
    let mut bad_digit = nhs.clone().into_bytes();
    bad_digit[9] = if bad_digit[9] == b'9' {
        b'0'
    } else {
        bad_digit[9] + 1
    };
    let errors = [
        pb::SubmitRequest {
            message_id: "err-check-digit".into(),
            event: pb::JourneyEvent::Release.into(),
            patient: Some(pb::PatientRef {
                nhs_number: String::from_utf8(bad_digit).unwrap(),
                prison_number: String::new(),
                date_of_birth: first.patient.date_of_birth.to_string(),
            }),
            destinations: vec!["YG001".into()],
            document: native(),
        },
        pb::SubmitRequest {
            message_id: "m0-native".into(),
            event: pb::JourneyEvent::Release.into(),
            patient: None,
            destinations: vec!["YG002".into()],
            document: native(),
        },
        pb::SubmitRequest {
            message_id: "err-destination".into(),
            event: pb::JourneyEvent::Release.into(),
            patient: None,
            destinations: vec!["YZ404".into(), "YP002".into()],
            document: native(),
        },
    ];
    for req in errors {
        let id = req.message_id.clone();
        let status = prison.submit(req).await.expect_err(&id);
        for n in needles(false) {
            assert!(
                !status.message().contains(&n),
                "{id}: error names the patient"
            );
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn hits(haystack: &[u8], needles: &[String]) -> Vec<String> {
    needles
        .iter()
        .filter(|n| haystack.windows(n.len()).any(|w| w == n.as_bytes()))
        .cloned()
        .collect()
}

#[tokio::test]
async fn the_data_directory_holds_no_patient_data_in_clear() {
    let gw = TestGateway::start().await;
    assert_eq!(workload(&gw.endpoint, &gw.certs()).await, 21);
    let data = gw.config.data_dir.clone();
    let (dir, _) = gw.stop().await;
    let needles = needles(true);
    assert!(needles.len() > 40, "{needles:?}");
    let files = files_under(&data);
    let mut bytes = 0;
    for f in &files {
        let raw = std::fs::read(f).unwrap();
        bytes += raw.len();
        let found = hits(&raw, &needles);
        assert!(found.is_empty(), "{} holds {found:?} in clear", f.display());
    }
    assert!(bytes > 100_000, "the store was written ({bytes} bytes)");
    drop(dir);
}

#[tokio::test]
async fn removing_a_wrapped_data_key_destroys_the_payload() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("shred-1", 1, &["YG001"], "to be shredded"))
        .await
        .unwrap();
    let (dir, config) = gw.stop().await;
    // Remove handover 1's wrapped key with sled directly.
    {
        let db = support::open_sled(&config.data_dir.join("sled"));
        let keys = db.open_tree("data_keys").unwrap();
        assert!(keys.remove(1u64.to_be_bytes()).unwrap().is_some());
        db.flush().unwrap();
    }
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let mut riverside = gw.client("YG001").await;
    let got = riverside.pull(pull(5)).await.unwrap().into_inner();
    assert!(got.deliveries.is_empty(), "nothing readable is delivered");
    let quarantined = gw.store.audit_entries().unwrap().into_iter().any(|e| {
        e.action == "nack" && e.handover_id == Some(1) && e.outcome.contains("quarantined")
    });
    assert!(quarantined, "the unreadable delivery is quarantined");
    gw.stop().await;
}

// ---- the real binary's output --------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

struct Binary(Option<Child>);

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_of_the_real_binary_name_no_patient() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    throughcare::certs::init_dev_pki(&certs).unwrap();
    let port = support::free_port();
    let out = dir.path().join("stdout.log");
    let err = dir.path().join("stderr.log");
    let child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(&certs)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let mut gateway = Binary(Some(child));
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..150 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "gateway listens");
    assert_eq!(workload(&endpoint, &certs).await, 21);

    let mut child = gateway.0.take().unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success(), "graceful stop");

    let mut log = std::fs::read(&out).unwrap();
    log.extend(std::fs::read(&err).unwrap());
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("DEBUG") && text.contains("submit accepted") && text.contains("refused"),
        "the log is at debug and covers the workload ({} bytes)",
        log.len()
    );
    let found = hits(&log, &needles(false));
    assert!(found.is_empty(), "the log names patients: {found:?}");
}
