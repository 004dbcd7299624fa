//! `throughcare admin …` against a real gateway: aligned tables for people,
//! JSON for scripts, and the operator's changes taking effect.

use crate::support;

use std::process::Command;

use support::*;
use throughcare::grpc::pb;

fn admin(gw: &TestGateway, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_throughcare"))
        .arg("admin")
        .args(args)
        .arg("--server")
        .arg(&gw.endpoint)
        .arg("--certs-dir")
        .arg(gw.certs())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(gw: &TestGateway, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = admin(gw, &all);
    assert!(ok, "admin {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_and_fix_queues_from_the_command_line() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    for i in 0..3 {
        prison
            .submit(release(&format!("r-{i}"), 40 + i, &["YG001"], "m"))
            .await
            .unwrap();
    }
    let mut gp = gw.client("YG001").await;
    let first = gp.pull(pull(1)).await.unwrap().into_inner().deliveries;
    gp.nack(pb::NackRequest {
        delivery_id: first[0].delivery_id,
        attempt: first[0].attempt,
        permanent: true,
        reason: "unreadable by the practice system".into(),
    })
    .await
    .unwrap();

    // Mailboxes as JSON: the practice has two live and one quarantined.
    let boxes = json(&gw, &["mailboxes"]);
    let yg = boxes
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mailbox"] == "YG001")
        .unwrap();
    assert_eq!(
        (yg["depth"].as_u64(), yg["quarantined"].as_u64()),
        (Some(2), Some(1))
    );
    // ... and as an aligned table for people.
    let (ok, table, _) = admin(&gw, &["mailboxes"]);
    assert!(ok);
    let lines: Vec<&str> = table.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines[0].contains("MAILBOX") && lines[0].contains("QUARANTINED"),
        "{table}"
    );
    let col = lines[0].find("DEPTH").unwrap();
    for line in &lines[1..] {
        assert!(line.len() > col, "aligned columns: {table}");
    }
    assert!(lines.iter().any(|l| l.contains("YG001")));

    let q = json(&gw, &["quarantine", "--mailbox", "YG001"]);
    assert_eq!(
        q[0]["reason"],
        "permanent nack: unreadable by the practice system"
    );
    let id = q[0]["delivery"].as_u64().unwrap().to_string();
    let r = json(&gw, &["redrive", &id]);
    assert_eq!(r[0]["outcome"], "REQUEUED");
    assert_eq!(json(&gw, &["quarantine"]).as_array().unwrap().len(), 0);

    // Registry management.
    let orgs = json(&gw, &["org-disable", "YG002"]);
    assert_eq!(orgs[0]["active"], false);
    let orgs = json(&gw, &["orgs"]);
    assert_eq!(orgs.as_array().unwrap().len(), 5);
    let put = json(
        &gw,
        &[
            "org-put",
            "--ods",
            "YG003",
            "--kind",
            "gp_practice",
            "--name",
            "Meadow Lane Practice (invented)",
            "--format",
            "fhir",
        ],
    );
    assert_eq!(put[0]["format"], "DOCUMENT_FORMAT_FHIR_JSON");

    // The audit trail of one handover.
    let trail = json(
        &gw,
        &["trail", "--handover", "1", "--reason", "incident review 42"],
    );
    let actions: Vec<&str> = trail
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"submit") && actions.contains(&"audit_query"),
        "{actions:?}"
    );

    // A refusal is an error exit with the gateway's reason.
    let (ok, _, err) = admin(&gw, &["redrive"]);
    assert!(!ok);
    assert!(err.contains("target"), "{err}");
    let (ok, _, err) = admin(&gw, &["mailboxes", "--as", "YG001"]);
    assert!(!ok);
    assert!(err.contains("operator certificate"), "{err}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_what_is_held_under_the_retention_policy() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("held-1", 60, &["YG001"], "m"))
        .await
        .unwrap();
    prison
        .submit(release("held-2", 61, &["YG001"], "m"))
        .await
        .unwrap();
    for who in ["YG001", "YPR01"] {
        let mut c = gw.client(who).await;
        let got = c.pull(pull(1)).await.unwrap().into_inner().deliveries;
        for d in got {
            c.ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
        }
    }
    clock.advance(3 * 86_400_000 + 1);
    gw.store.retention().await.unwrap();
    let rows = json(&gw, &["retention"]);
    let count = |what: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["what"] == what)
            .unwrap_or_else(|| panic!("{what} in {rows}"))["count"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(count("payloads held"), 1, "{rows}");
    assert_eq!(count("payloads shredded"), 1, "{rows}");
    assert_eq!(count("metadata expiring"), 1, "{rows}");
    let entries = gw.store.audit_entries().unwrap().len() as u64;
    assert_eq!(count("audit entries held"), entries, "{rows}");
    assert_eq!(count("audit entries removed"), 0, "{rows}");
    // Two patients: a lineage entry each, nothing removed yet.
    assert_eq!(count("identity records held"), 2, "{rows}");
    assert_eq!(count("identity records removed"), 0, "{rows}");
    let (ok, table, err) = admin(&gw, &["retention"]);
    assert!(ok, "{err}");
    assert!(
        table.contains("PAYLOADS HELD") || table.contains("payloads held"),
        "{table}"
    );
    assert!(table.contains("84d"), "the policy is shown: {table}");
    assert!(
        table.contains("2928d"),
        "the audit period is shown: {table}"
    );
    gw.stop().await;
}

/// A release of a patient who carries both identifiers, to `to`.
fn linked_release(message_id: &str, patient: u32, prison_number: &str) -> pb::SubmitRequest {
    let summary = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        prison_number.parse().ok(),
        "YP001".parse().unwrap(),
        None,
        "linked",
    );
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: pb::JourneyEvent::Release.into(),
        patient: None,
        destinations: vec!["YG001".into()],
        document: Some(pb::submit_request::Document::Native(
            throughcare::grpc::summary::to_wire(&summary),
        )),
    }
}

/// Quarantined, parked and refused deliveries and extra organisations, so
/// each table is longer than a page of two.
async fn rows_for_every_table(gw: &TestGateway) {
    let mut prison = gw.client("YP001").await;
    for i in 0..3 {
        let to_gp = release(&format!("q-{i}"), 70 + i, &["YG001"], "m");
        prison.submit(to_gp).await.unwrap();
        let no_gp = release(&format!("p-{i}"), 73 + i, &[], "m");
        let r = prison.submit(no_gp).await.unwrap().into_inner();
        assert_eq!(r.deliveries[0].destination, "@parked");
    }
    // One prison number, linked to the first patient: three refused links.
    prison
        .submit(linked_release("c-0", 80, "A1234BC"))
        .await
        .unwrap();
    for i in 1..=3 {
        let err = prison
            .submit(linked_release(&format!("c-{i}"), 80 + i, "A1234BC"))
            .await
            .unwrap_err();
        assert_eq!(violations(&err), ["patient.prison_number"]);
    }
    let mut gp = gw.client("YG001").await;
    for d in gp.pull(pull(10)).await.unwrap().into_inner().deliveries {
        gp.nack(pb::NackRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
            permanent: true,
            reason: "unreadable by the practice system".into(),
        })
        .await
        .unwrap();
    }
    for ods in ["YG005", "YG006"] {
        let name = format!("Practice {ods} (invented)");
        let (ok, _, err) = admin(
            gw,
            &[
                "org-put",
                "--ods",
                ods,
                "--kind",
                "gp_practice",
                "--name",
                &name,
            ],
        );
        assert!(ok, "{err}");
    }
}

/// The values of `column` in a JSON table, in order.
fn column(table: &serde_json::Value, column: &str) -> Vec<String> {
    table
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[column].to_string())
        .collect()
}

/// What the gateway lists in one page of its largest size, per table: the
/// table's name and its rows' keys.
async fn whole_tables(gw: &TestGateway) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let mut op = gw.operator().await;
    let mailboxes = op
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let quarantine = op
        .list_quarantine(pb::ListQuarantineRequest::default())
        .await
        .unwrap()
        .into_inner();
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner();
    let conflicts = op
        .list_identity_conflicts(pb::ListIdentityConflictsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let orgs = op
        .list_organisations(pb::ListOrganisationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    vec![
        (
            "mailboxes",
            "mailbox",
            mailboxes
                .mailboxes
                .iter()
                .map(|m| quoted(&m.mailbox))
                .collect(),
        ),
        (
            "quarantine",
            "delivery",
            quarantine
                .deliveries
                .iter()
                .map(|d| d.delivery_id.to_string())
                .collect(),
        ),
        (
            "parked",
            "delivery",
            parked
                .deliveries
                .iter()
                .map(|d| d.delivery_id.to_string())
                .collect(),
        ),
        (
            "conflicts",
            "message_id",
            conflicts
                .conflicts
                .iter()
                .map(|c| quoted(&c.message_id))
                .collect(),
        ),
        (
            "orgs",
            "ods",
            orgs.organisations
                .iter()
                .map(|o| quoted(&o.ods_code))
                .collect(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_is_read_to_its_end_page_by_page() {
    let gw = TestGateway::start().await;
    rows_for_every_table(&gw).await;
    // The gateway answers a list of more than a page in pages.
    let first = gw
        .operator()
        .await
        .list_organisations(pb::ListOrganisationsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.organisations.len(), 2);
    assert!(!first.next_page_token.is_empty());

    for (table, key, whole) in whole_tables(&gw).await {
        assert!(
            whole.len() >= 3,
            "{table}: more than a page of two: {whole:?}"
        );
        for size in ["1", "2"] {
            let paged = json(&gw, &[table, "--page-size", size]);
            assert_eq!(column(&paged, key), whole, "{table} {size} a page");
        }
        // ... and as a table for people, every row too.
        let (ok, text, err) = admin(&gw, &[table, "--page-size", "1"]);
        assert!(ok, "{err}");
        let rows = text.lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(
            rows,
            whole.len() + 1,
            "{table}: a header and every row: {text}"
        );
    }

    // The audit trail grows by one entry a page (each read is audited), and
    // is still read to its end, each entry once, oldest first.
    let trail = json(
        &gw,
        &[
            "trail",
            "--handover",
            "1",
            "--reason",
            "incident review 43",
            "--page-size",
            "1",
        ],
    );
    let seqs: Vec<u64> = column(&trail, "seq")
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let actions = column(&trail, "action");
    for action in ["submit", "pull", "nack", "audit_query"] {
        assert!(actions.contains(&format!("\"{action}\"")), "{actions:?}");
    }
    let (ok, _, err) = admin(&gw, &["orgs", "--page-size", "1001"]);
    assert!(!ok && err.contains("1001"), "{err}");
    gw.stop().await;
}

/// A refusal is said as the other commands say one: what, the code and the
/// gateway's message (it was tonic's own "Some requested entity was not
/// found" wording).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_operator_call_says_what_was_refused_and_why() {
    let gw = TestGateway::start().await;
    let (ok, _, err) = admin(
        &gw,
        &[
            "claim",
            "--nhs",
            &nhs(77),
            "--dob",
            "1985-06-15",
            "--practice",
            "YG002",
            "--reason",
            "registered at the practice on the patient's release",
        ],
    );
    assert!(!ok);
    assert!(err.contains("claim refused (NotFound): "), "{err}");
    assert!(err.contains("no parked release matches"), "{err}");
    assert!(!err.contains("Some requested entity"), "{err}");
    gw.stop().await;
}
