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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let certs = dir.path().join("certs");
    let mut server = Server(
        Command::new(BIN)
            .args([
                "--log-json",
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
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
    let mut prison = prison.expect("the gateway starts");
    let mut gp = throughcare::cli::client::handover(&endpoint, &certs, "YG001")
        .await
        .unwrap();

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

    let pid = server.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let mut stopped = false;
    for _ in 0..300 {
        if server.0.try_wait().unwrap().is_some() {
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
    let in_span = |line: &Value, name: &str| spans(line).iter().any(|s| s["name"] == name);

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
        accepted, submitted,
        "each accepted submit logged with its id"
    );
    assert_eq!(refusals, 1);

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
    assert_eq!(leased, submitted);
}
