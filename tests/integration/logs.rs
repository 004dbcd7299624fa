//! The real binary's `--log-json` output: every line is JSON; every line a
//! submit or pull writes about a handover carries its id (from the request's
//! span, recorded once known); none carries patient data.

use crate::support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{BIN, Server};
use serde_json::Value;
use support::{nhs, pull, release};
use throughcare::grpc::pb;

/// The spans a line was written in, outermost first.
fn spans(line: &Value) -> Vec<&Value> {
    line["spans"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// The handover id a line carries, from its fields or any of its spans.
fn handover_id(line: &Value) -> Option<u64> {
    std::iter::once(&line["fields"])
        .chain(spans(line))
        .find_map(|v| v["handover_id"].as_u64())
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn json_lines_of_submits_and_pulls_carry_handover_ids_and_no_patient_data() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gateway.log");
    let (mut server, mut prison, mut gp) = start_logging_gateway(dir.path(), &log_path).await;
    let submitted = submit_pull_and_ack(&mut prison, &mut gp).await;
    // An operator call, refused to a prison: its span names the caller too.
    let port = server.1;
    let mut as_operator = throughcare::cli::client::operator(
        &format!("https://127.0.0.1:{port}"),
        &dir.path().join("certs"),
        "YP001",
    )
    .await
    .unwrap();
    assert!(
        as_operator
            .list_mailboxes(pb::ListMailboxesRequest::default())
            .await
            .is_err()
    );
    let pid = server.0.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let mut stopped = false;
    for _ in 0..300 {
        if server.0.0.try_wait().unwrap().is_some() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stopped, "the gateway stops on SIGTERM");

    let text = std::fs::read_to_string(&log_path).unwrap();
    for i in 1..=4 {
        assert!(!text.contains(&nhs(i)), "an NHS number in the log");
    }
    for secret in ["1985-06-15", "Alex", "Example (invented)", "log marker"] {
        assert!(!text.contains(secret), "patient data ({secret}) in the log");
    }

    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();

    submit_lines_carry_their_ids(&lines, &submitted);
    pull_lines_carry_their_ids(&lines, &submitted);
    let refused = lines
        .iter()
        .find(|l| in_span(l, "list_mailboxes") && message(l) == "refused")
        .expect("the refused operator call is logged");
    assert!(
        spans(refused)
            .iter()
            .any(|s| s["caller"] == "urn:ods:YP001"),
        "{refused}"
    );
    assert_eq!(refused["fields"]["caller_kind"], "prison", "{refused}");
}

fn in_span(line: &Value, name: &str) -> bool {
    spans(line).iter().any(|s| s["name"] == name)
}

type Client = pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>;

/// The real binary with `--log-json` (its stderr to `log_path`), and a
/// prison's and a practice's clients once it serves.
async fn start_logging_gateway(
    dir: &std::path::Path,
    log_path: &std::path::Path,
) -> ((Server, u16), Client, Client) {
    let port = support::free_port();
    let log = std::fs::File::create(log_path).unwrap();
    let certs = dir.join("certs");
    let server = Server(
        Command::new(BIN)
            .args([
                "--log-json",
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--certs-dir")
            .arg(&certs)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut prison = None;
    for _ in 0..300 {
        if let Ok(c) = throughcare::cli::client::handover(&endpoint, &certs, "YP001").await {
            prison = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prison = prison.expect("the gateway starts");
    let gp = throughcare::cli::client::handover(&endpoint, &certs, "YG001")
        .await
        .unwrap();

    ((server, port), prison, gp)
}

/// Three releases (and one refusal) to YG001, pulled and acked; returns the
/// handover ids submitted.
async fn submit_pull_and_ack(prison: &mut Client, gp: &mut Client) -> BTreeSet<u64> {
    let mut submitted = BTreeSet::new();
    for i in 1..=3 {
        let receipt = prison
            .submit(release(&format!("log-{i}"), i, &["YG001"], "log marker"))
            .await
            .unwrap()
            .into_inner();
        submitted.insert(receipt.handover_id);
    }
    // A refusal: nothing was stored, so there is no handover id to carry.
    let refused = prison
        .submit(release("log-refused", 4, &["ZZ999"], "log marker"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let mut delivered = BTreeSet::new();
    for max in [2, 10, 10] {
        for d in gp.pull(pull(max)).await.unwrap().into_inner().deliveries {
            delivered.insert(d.handover_id);
            gp.ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
        }
    }
    assert_eq!(delivered, submitted);

    submitted
}

/// Every line of a submit names the caller and carries the handover id,
/// except the refusal's (nothing was stored).
fn submit_lines_carry_their_ids(lines: &[Value], submitted: &BTreeSet<u64>) {
    let mut accepted = BTreeSet::new();
    let mut refusals = 0;
    for line in lines.iter().filter(|l| in_span(l, "submit")) {
        assert!(
            spans(line).iter().any(|s| s["caller"] == "urn:ods:YP001"),
            "{line}"
        );
        match (message(line), handover_id(line)) {
            ("refused", None) => refusals += 1,
            (_, Some(id)) => {
                assert!(submitted.contains(&id), "{line}");
                if message(line) == "submit accepted" {
                    accepted.insert(id);
                }
            }
            (_, None) => panic!("a submit line without a handover id: {line}"),
        }
    }
    assert_eq!(
        &accepted, submitted,
        "each accepted submit logged with its id"
    );
    assert_eq!(refusals, 1);
}

/// Every line of a pull carries the handover id it is about; each pull's
/// summary lists ids logged before it.
fn pull_lines_carry_their_ids(lines: &[Value], submitted: &BTreeSet<u64>) {
    let mut leased = BTreeSet::new();
    let mut summaries = 0;
    for line in lines.iter().filter(|l| in_span(l, "pull")) {
        if message(line) == "pull answered" {
            // A pull may hand out several handovers: its summary lists them,
            // and each was logged on its own line before, with its id.
            summaries += 1;
            let listed: Vec<u64> =
                serde_json::from_str(line["fields"]["handover_ids"].as_str().unwrap()).unwrap();
            assert!(listed.iter().all(|id| leased.contains(id)), "{line}");
            continue;
        }
        let id = handover_id(line)
            .unwrap_or_else(|| panic!("a pull line without a handover id: {line}"));
        assert!(in_span(line, "deliver"), "{line}");
        if message(line) == "delivery leased" {
            leased.insert(id);
        }
    }
    assert_eq!(summaries, 3);
    assert_eq!(&leased, submitted);
}

/// A release on opioid substitution whose area has no substance misuse
/// service (the dev registry has none) is held, and operators are alerted
/// at once, with ids only: the deadline alert would come when the next
/// dose is already missed.
#[tokio::test]
async fn a_held_substitution_copy_is_alerted_at_submit_with_ids_only() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gateway.log");
    let (mut server, mut prison, _gp) = start_logging_gateway(dir.path(), &log_path).await;
    let mut s = throughcare::clinical::synthetic::release_summary(
        nhs(9).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        "log marker",
    );
    let m = &mut s.medications[0];
    m.code.display = "Methadone 1mg/ml oral solution sugar free".into();
    m.code.code = "3321611000001103".into();
    m.opioid_substitution = true;
    m.last_dose_given = Some(
        (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2))
            .to_string()
            .parse()
            .unwrap(),
    );
    s.consent.treatment_sharing = throughcare::clinical::model::ConsentDecision::Given;
    let receipt = prison
        .submit(throughcare::cli::client::native_submit(
            "log-ost",
            pb::JourneyEvent::Release,
            &[],
            &s,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        receipt
            .deliveries
            .iter()
            .any(|d| d.destination == "@parked-substance-misuse"),
        "{receipt:?}"
    );
    let _ = server.0.0.kill();
    let _ = server.0.0.wait();
    let text = std::fs::read_to_string(&log_path).unwrap();
    let alert = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["alert"] == "treatment_copy_held")
        .expect("the held copy is alerted");
    assert_eq!(handover_id(&alert), Some(receipt.handover_id), "{alert}");
    assert_eq!(
        alert["fields"]["kind"], "substance_misuse_service",
        "{alert}"
    );
    assert!(!text.contains(&nhs(9)), "an NHS number in the log");
}

#[tokio::test]
async fn a_missed_deadline_is_alerted_once_with_ids_only_parked_releases_too() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gateway.log");
    let (mut server, mut prison, _gp) = start_logging_gateway(dir.path(), &log_path).await;
    // Released three days ago: due by the end of that day, already missed.
    let released = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(72))
        .strftime("%Y-%m-%d")
        .to_string();
    let mut receipts = Vec::new();
    for (patient, gp) in [(11, Some("YG001")), (12, None)] {
        let mut s = throughcare::clinical::synthetic::release_summary(
            nhs(patient).parse().ok(),
            None,
            "YP001".parse().unwrap(),
            gp.map(|g| g.parse().unwrap()),
            "late",
        );
        s.custody.release_date = Some(released.parse().unwrap());
        let r = prison
            .submit(throughcare::cli::client::native_submit(
                &format!("late-{patient}"),
                pb::JourneyEvent::Release,
                &[],
                &s,
            ))
            .await
            .unwrap()
            .into_inner();
        receipts.push(r);
    }
    let late: BTreeSet<(u64, String)> = receipts
        .iter()
        .flat_map(|r| {
            r.deliveries
                .iter()
                .map(|d| (d.delivery_id, d.destination.clone()))
        })
        .collect();
    assert!(late.iter().any(|(_, to)| to == "YG001"), "{late:?}");
    assert!(late.iter().any(|(_, to)| to == "@parked"), "{late:?}");
    // The sweep runs every second; a few more of them, so a repeat would show.
    for _ in 0..100 {
        if deadline_alerts(&log_path).len() >= late.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let _ = server.0.0.kill();
    let _ = server.0.0.wait();
    let alerted = deadline_alerts(&log_path);
    let once: BTreeSet<(u64, String)> = alerted.iter().cloned().collect();
    assert_eq!(
        once, late,
        "every late delivery alerted, the parked one too"
    );
    assert_eq!(alerted.len(), late.len(), "each once: {alerted:?}");
    let text = std::fs::read_to_string(&log_path).unwrap();
    for patient in [11, 12] {
        assert!(!text.contains(&nhs(patient)), "an NHS number in the log");
    }
}

/// (delivery id, mailbox) of each `deadline_missed` alert in the log.
fn deadline_alerts(log_path: &std::path::Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(log_path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["alert"] == "deadline_missed")
        .map(|l| {
            let id = l["fields"]["delivery_id"].as_u64().unwrap_or_default();
            let mailbox = l["fields"]["mailbox"].as_str().unwrap_or_default();
            (id, mailbox.to_owned())
        })
        .collect()
}

/// A recipient's permanent nack quarantines the delivery: an alert line
/// names the delivery and mailbox, never the patient nor the recipient's
/// free-text reason.
#[tokio::test]
async fn a_quarantine_by_nack_is_alerted_with_ids_only() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gateway.log");
    let (mut server, mut prison, mut gp) = start_logging_gateway(dir.path(), &log_path).await;
    prison
        .submit(release("poison", 13, &["YG001"], "unreadable here"))
        .await
        .unwrap();
    let d = gp.pull(pull(1)).await.unwrap().into_inner().deliveries[0].clone();
    let reason = "our importer rejects this summary";
    let state = gp
        .nack(pb::NackRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
            permanent: true,
            reason: reason.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state;
    assert_eq!(state, pb::DeliveryState::Quarantined as i32);
    let alert = |text: &str| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["fields"]["alert"] == "delivery_quarantined")
    };
    for _ in 0..100 {
        if alert(&std::fs::read_to_string(&log_path).unwrap()).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = server.0.0.kill();
    let _ = server.0.0.wait();
    let text = std::fs::read_to_string(&log_path).unwrap();
    let line = alert(&text).expect("the quarantine is alerted");
    assert_eq!(line["fields"]["delivery_id"], d.delivery_id, "{line}");
    assert_eq!(line["fields"]["mailbox"], "YG001", "{line}");
    assert!(
        !line.to_string().contains(reason),
        "the reason in the alert: {line}"
    );
    assert!(!text.contains(&nhs(13)), "an NHS number in the log");
}
