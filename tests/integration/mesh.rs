//! MESH end to end: the real gateway with `[mesh]` pointing at NHS
//! England's MESH sandbox (PyPI `mesh-sandbox`, started here on 127.0.0.1
//! by `tests/python/run_mesh_sandbox.py` with mutual TLS and full `NHSMESH`
//! authentication), read and written as the other mailboxes with the
//! gateway's own MESH client. `tests/python/test_mesh.py` does the same with
//! the independent `mesh-client`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use throughcare::config::Config;
use throughcare::grpc::pb;
use throughcare::mesh::client::{Incoming, Outgoing};
use throughcare::mesh::{MeshClient, MeshConfig};
use throughcare::store::SystemClock;

use crate::support::{TestGateway, free_port, nhs, pull_and_ack, release, track_message};

/// The sandbox's canned mailboxes: the gateway's, a practice's, a prison's.
const GATEWAY_MB: &str = "X26ABC1";
const PRACTICE_MB: &str = "X26ABC2";
const PRISON_MB: &str = "X26ABC3";
const SHARED_KEY: &str = "TestKey";

/// The sandbox, stopped when dropped (and by itself when the test's end
/// closes its standard input).
struct Sandbox {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python")
}

impl Sandbox {
    fn start() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        throughcare::certs::init_dev_pki(&dir.path().join("pki")).unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let mut s = Sandbox {
            child: None,
            port: free_port(),
            dir,
        };
        s.run();
        s
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// Starts it (again, on the same port and store), waiting until it answers.
    fn run(&mut self) {
        let pki = self.pki();
        // The sandbox logs every request: kept beside its store, not in the test's output.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sandbox.log"))
            .unwrap();
        let child = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/run_mesh_sandbox.py"))
            .args(["--port", &self.port.to_string(), "--shared-key", SHARED_KEY])
            .arg("--cert")
            .arg(pki.join("server.pem"))
            .arg("--key")
            .arg(pki.join("server.key"))
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--store")
            .arg(self.dir.path().join("store"))
            .args(["--lifetime", "600"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the MESH sandbox starts (run tests/run once to make target/venv)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the MESH sandbox did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `[mesh]` as the gateway's mailbox, fast enough for a test.
    fn config(&self, dir: &Path) -> MeshConfig {
        let (cert, key) = throughcare::certs::DevPaths { dir: self.pki() }.client("YG001");
        std::fs::write(dir.join("mesh-password"), "password\n").unwrap();
        std::fs::write(dir.join("mesh-shared-key"), SHARED_KEY).unwrap();
        MeshConfig {
            enabled: true,
            url: self.url(),
            mailbox: GATEWAY_MB.into(),
            password_file: Some(dir.join("mesh-password")),
            shared_key_file: Some(dir.join("mesh-shared-key")),
            client_cert_file: Some(cert),
            client_key_file: Some(key),
            ca_file: Some(self.pki().join("ca.pem")),
            poll_interval_ms: 150,
            timeout_ms: 5_000,
            chunk_bytes: 2_048,
            lease_seconds: 30,
            retry_backoff_ms: 100,
            max_backoff_ms: 500,
            batch: 20,
        }
    }

    /// A client of one of the sandbox's mailboxes.
    fn client(&self, mailbox: &str) -> MeshClient {
        let dir = tempfile::tempdir().unwrap();
        let config = MeshConfig {
            mailbox: mailbox.into(),
            ..self.config(dir.path())
        };
        let client = throughcare::mesh::client_from_config(&config, 4 * 1024 * 1024)
            .unwrap()
            .unwrap();
        Arc::try_unwrap(client).unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn gateway_with(sandbox: &Sandbox) -> TestGateway {
    gateway_leasing(sandbox, 30).await
}

/// A gateway whose MESH edge holds each delivery for `lease_seconds`.
async fn gateway_leasing(sandbox: &Sandbox, lease_seconds: u32) -> TestGateway {
    gateway_leasing_with(sandbox, lease_seconds, |_| {}).await
}

/// [`gateway_leasing`], its configuration otherwise changed by `tweak`.
async fn gateway_leasing_with(
    sandbox: &Sandbox,
    lease_seconds: u32,
    tweak: impl FnOnce(&mut Config),
) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mesh = MeshConfig {
        lease_seconds,
        ..sandbox.config(dir.path())
    };
    let gw = TestGateway::start_with(
        |c: &mut Config| {
            c.mesh = mesh;
            tweak(c);
        },
        Arc::new(SystemClock),
    )
    .await;
    std::mem::forget(dir);
    gw
}

/// A gateway on `sandbox` that reaches both the practice (YG001) and the
/// prison (YP001) through their MESH mailboxes.
async fn prison_and_practice_on_mesh(sandbox: &Sandbox) -> TestGateway {
    let gw = gateway_with(sandbox).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    reach_through_mesh(&gw, "YP001", pb::OrganisationKind::Prison, PRISON_MB).await;
    gw
}

/// Registers `ods` (kind, format) as reached through MESH mailbox `mb`.
async fn reach_through_mesh(gw: &TestGateway, ods: &str, kind: pb::OrganisationKind, mb: &str) {
    gw.operator()
        .await
        .put_organisation(pb::PutOrganisationRequest {
            organisation: Some(pb::Organisation {
                ods_code: ods.into(),
                kind: kind.into(),
                name: format!("{ods} (invented)"),
                format: pb::DocumentFormat::FhirJson.into(),
                region: if kind == pb::OrganisationKind::Prison {
                    "North".into()
                } else {
                    String::new()
                },
                active: true,
                mesh_mailbox: mb.into(),
            }),
        })
        .await
        .unwrap();
}

/// Waits up to `secs` for `f` to give `Some`.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every inbox message of `client`, read in full (not acknowledged).
async fn inbox(client: &MeshClient) -> Vec<Incoming> {
    let mut out = Vec::new();
    for id in client.inbox(100).await.unwrap() {
        out.push(client.retrieve(&id).await.unwrap());
    }
    out
}

async fn delivery_of(gw: &TestGateway, message_id: &str) -> pb::DeliveryStatus {
    let mut prison = gw.client("YP001").await;
    track_message(&mut prison, message_id).await.deliveries[0].clone()
}

/// The sandbox's log lines about its handshake route (`begin` and `end`).
fn handshake_lines(sandbox: &Sandbox) -> Vec<String> {
    std::fs::read_to_string(sandbox.dir.path().join("sandbox.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" handshake "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_the_gateway_validates_its_mailbox_with_a_handshake_mesh_accepts() {
    let sandbox = Sandbox::start();
    let gw = gateway_with(&sandbox).await;
    // MESH's own route decides: every header it requires (mex-ClientVersion,
    // mex-OSName, mex-OSVersion) present, our credentials accepted.
    let done = eventually(20, "the sandbox to answer a handshake", || async {
        handshake_lines(&sandbox)
            .into_iter()
            .find(|l| l.contains("end handshake"))
    })
    .await;
    assert!(
        done.contains(&format!("/messageexchange/{GATEWAY_MB} 200 ")),
        "{done}"
    );
    // Once a day, not every round: rounds run every 150 ms here.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let ends = handshake_lines(&sandbox)
        .iter()
        .filter(|l| l.contains("end handshake"))
        .count();
    assert_eq!(ends, 1, "{:?}", handshake_lines(&sandbox));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_delivers_a_release_in_chunks_and_marks_it_delivered_on_the_recipients_ack() {
    let sandbox = Sandbox::start();
    let gw = gateway_with(&sandbox).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(release("mesh-rel-1", 41, &["YG001"], "mesh-marker-41"))
        .await
        .unwrap()
        .into_inner();
    let delivery_id = receipt.deliveries[0].delivery_id;

    let practice = sandbox.client(PRACTICE_MB);
    let msg = eventually(20, "the release in the practice's MESH inbox", || async {
        inbox(&practice).await.into_iter().next()
    })
    .await;
    assert_eq!(msg.from, GATEWAY_MB);
    assert_eq!(msg.workflow_id, "THROUGHCARE_RELEASE");
    assert_eq!(msg.local_id, format!("throughcare-{delivery_id}"));
    assert!(
        msg.subject
            .contains(&format!("handover {}", receipt.handover_id)),
        "{}",
        msg.subject
    );
    assert!(
        msg.body.len() > 2_048,
        "a document larger than a chunk ({} bytes)",
        msg.body.len()
    );
    let text = String::from_utf8(msg.body.clone()).unwrap();
    let bundle: serde_json::Value =
        serde_json::from_str(&text).expect("one FHIR JSON document from its chunks");
    assert_eq!(bundle["resourceType"], "Bundle");
    assert!(text.contains("mesh-marker-41") && text.contains(&nhs(41)));

    // Sent but not yet acknowledged: Track shows MESH's state and id.
    let d = delivery_of(&gw, "mesh-rel-1").await;
    assert_eq!(d.state(), pb::DeliveryState::Leased);
    assert_eq!(d.mesh_state, "SENT");
    assert_eq!(d.mesh_message_id, msg.message_id);

    // Operators see the mailbox is reached through MESH, one waiting on its ack.
    let stats = gw
        .operator()
        .await
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let row = stats
        .mailboxes
        .iter()
        .find(|m| m.mailbox == "YG001")
        .unwrap();
    assert_eq!(
        (row.mesh_mailbox.as_str(), row.mesh_awaiting_ack),
        (PRACTICE_MB, 1)
    );

    practice.acknowledge(&msg.message_id).await.unwrap();
    // The ack and the MESH record's ACKNOWLEDGED are two writes: wait for both.
    eventually(
        20,
        "DELIVERED and ACKNOWLEDGED after MESH's acknowledgement",
        || async {
            let d = delivery_of(&gw, "mesh-rel-1").await;
            (d.state() == pb::DeliveryState::Delivered && d.mesh_state == "ACKNOWLEDGED")
                .then_some(d)
        },
    )
    .await;
    assert!(inbox(&practice).await.is_empty(), "sent once");
    // The patient's trail shows where their record went through MESH, not
    // only the lease: each MESH step is recorded with the patient.
    let trail = gw
        .operator()
        .await
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(41))),
            reason: "subject access request from the patient".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<&str> = trail.entries.iter().map(|e| e.action.as_str()).collect();
    for step in ["mesh_sending", "mesh_sent", "mesh_acknowledged"] {
        assert!(actions.contains(&step), "{step} not in {actions:?}");
    }
    // The gateway's MESH edge pulled and acknowledged for the practice,
    // which never called: the trail names both, not the practice alone.
    let by: Vec<(&str, &str)> = trail
        .entries
        .iter()
        .filter(|e| ["pull", "ack"].contains(&e.action.as_str()))
        .map(|e| (e.action.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        by,
        [
            ("pull", "service:mesh for urn:ods:YG001"),
            ("ack", "service:mesh for urn:ods:YG001")
        ]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_error_report_quarantines_the_delivery_with_meshs_reason() {
    let sandbox = Sandbox::start();
    let gw = gateway_with(&sandbox).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("mesh-ndr-1", 42, &["YG001"], "ndr"))
        .await
        .unwrap();
    let sent = eventually(20, "the release sent", || async {
        let d = delivery_of(&gw, "mesh-ndr-1").await;
        (!d.mesh_message_id.is_empty()).then_some(d)
    })
    .await;
    // MESH's non-delivery report in the gateway's inbox (the sandbox's test
    // hook for what MESH does when a recipient never collects a message).
    let body = serde_json::json!({
        "mailbox_id": GATEWAY_MB,
        "code": "14",
        "description": "Message not collected by recipient",
        "workflow_id": "THROUGHCARE_RELEASE",
        "local_id": format!("throughcare-{}", sent.delivery_id),
        "status": "undeliverable",
        "linked_message_id": sent.mesh_message_id,
    });
    admin_post(&sandbox, "/messageexchange/admin/report", &body.to_string()).await;
    // The quarantine and the MESH record's FAILED are two writes, in that
    // order: wait for both.
    let d = eventually(20, "QUARANTINED and FAILED after MESH's error", || async {
        let d = delivery_of(&gw, "mesh-ndr-1").await;
        (d.state() == pb::DeliveryState::Quarantined && d.mesh_state == "FAILED").then_some(d)
    })
    .await;
    assert!(
        d.quarantine_reason.contains("14") && d.quarantine_reason.contains("not collected"),
        "{}",
        d.quarantine_reason
    );

    // MESH's words that look like patient data (a date) never become the
    // reason: the delivery is still quarantined, with MESH's words withheld.
    prison
        .submit(release("mesh-ndr-2", 45, &["YG001"], "ndr"))
        .await
        .unwrap();
    let sent = eventually(20, "the second release sent", || async {
        let d = delivery_of(&gw, "mesh-ndr-2").await;
        (!d.mesh_message_id.is_empty()).then_some(d)
    })
    .await;
    // A report about an earlier copy under the same local id (MESH's
    // LinkedMsgId names another message) says nothing of this one.
    let stale = serde_json::json!({
        "mailbox_id": GATEWAY_MB,
        "code": "07",
        "description": "About an earlier copy",
        "workflow_id": "THROUGHCARE_RELEASE",
        "local_id": format!("throughcare-{}", sent.delivery_id),
        "status": "error",
        "linked_message_id": "20261101000000000000_EARLIER",
    });
    admin_post(
        &sandbox,
        "/messageexchange/admin/report",
        &stale.to_string(),
    )
    .await;
    let body = serde_json::json!({
        "mailbox_id": GATEWAY_MB,
        // An error report carries MESH's own words (an NDR's are canned).
        "code": "99",
        "description": "Not collected by 2026-12-04",
        "workflow_id": "THROUGHCARE_RELEASE",
        "local_id": format!("throughcare-{}", sent.delivery_id),
        "status": "error",
        "linked_message_id": sent.mesh_message_id,
    });
    admin_post(&sandbox, "/messageexchange/admin/report", &body.to_string()).await;
    let d = eventually(20, "the second QUARANTINED", || async {
        let d = delivery_of(&gw, "mesh-ndr-2").await;
        (d.state() == pb::DeliveryState::Quarantined).then_some(d)
    })
    .await;
    assert!(
        !d.quarantine_reason.contains("2026-12-04") && d.quarantine_reason.contains("withheld"),
        "{}",
        d.quarantine_reason
    );
    assert!(
        !d.quarantine_reason.contains("earlier copy"),
        "quarantined by the report about this copy: {}",
        d.quarantine_reason
    );
    gw.stop().await;
}

/// A POST to the sandbox's admin API (no MESH authentication there), over
/// mutual TLS with the gateway's HTTPS client.
async fn admin_post(sandbox: &Sandbox, path: &str, body: &str) {
    let pki = sandbox.pki();
    let (cert, key) = throughcare::certs::DevPaths { dir: pki.clone() }.client("YG001");
    let (cert, key) = (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
    let transport = throughcare::https::Transport::with_identity(
        &std::fs::read(pki.join("ca.pem")).unwrap(),
        Some(throughcare::https::ClientIdentity {
            cert_pem: &cert,
            key_pem: &key,
        }),
        Duration::from_secs(10),
        true,
    )
    .unwrap();
    let request = http::Request::post(format!("{}{path}", sandbox.url()))
        .header(http::header::HOST, format!("127.0.0.1:{}", sandbox.port))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    let answer = transport.send(request).await.unwrap();
    assert_eq!(answer.status, 200, "{path}");
}

fn admission_fhir(patient: u32) -> Vec<u8> {
    let mut summary = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG002".parse().unwrap()),
        "admission",
    );
    summary.custody.release_date = None;
    summary.custody.release_address = None;
    throughcare::clinical::fhir::render(&summary, throughcare::journey::JourneyEvent::Admission)
        .bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_submit_from_a_prison_is_acknowledged_after_it_is_durable_and_a_bad_one_is_refused_back()
 {
    let sandbox = Sandbox::start();
    let gw = gateway_with(&sandbox).await;
    reach_through_mesh(&gw, "YP001", pb::OrganisationKind::Prison, PRISON_MB).await;
    let prison_mb = sandbox.client(PRISON_MB);
    let doc = admission_fhir(43);
    let good = prison_mb
        .send(&Outgoing {
            to: GATEWAY_MB,
            workflow_id: "THROUGHCARE_ADMISSION",
            subject: "admission",
            local_id: "mesh-adm-43",
            file_name: "adm.json",
            content_type: "application/fhir+json",
            body: &doc,
        })
        .await
        .unwrap();
    let bad = prison_mb
        .send(&Outgoing {
            to: GATEWAY_MB,
            workflow_id: "THROUGHCARE_ADMISSION",
            subject: "admission",
            local_id: "mesh-adm-bad",
            file_name: "adm.json",
            content_type: "application/fhir+json",
            body: br#"{"resourceType": "Bundle", "type": "document", "entry": []}"#,
        })
        .await
        .unwrap();
    // A refusal from elsewhere is never refused back (no ping-pong).
    let refusal = prison_mb
        .send(&Outgoing {
            to: GATEWAY_MB,
            workflow_id: "THROUGHCARE_REFUSAL",
            subject: "refused",
            local_id: "refusal-x",
            file_name: "refusal.json",
            content_type: "application/json",
            body: b"{}",
        })
        .await
        .unwrap();
    eventually(20, "all three acknowledged by the gateway", || async {
        for id in [&good, &bad, &refusal] {
            let s = prison_mb
                .track(id)
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            if s != "acknowledged" {
                return None;
            }
        }
        Some(())
    })
    .await;
    // The good one is a handover of the prison's, routed to its patient's GP.
    let mut prison = gw.client("YP001").await;
    let t = track_message(&mut prison, "mesh-adm-43").await;
    assert_eq!(t.event(), pb::JourneyEvent::Admission);
    assert_eq!(t.deliveries[0].destination, "YG002");
    // The trail names who submitted: the MESH edge, for the prison whose
    // mailbox MESH authenticated (the prison never called the gateway).
    let submitted = gw.store.audit_entries().unwrap();
    let actors: Vec<&str> = submitted
        .iter()
        .filter(|e| e.action == "submit" && e.handover_id == Some(t.handover_id))
        .map(|e| e.actor.as_str())
        .collect();
    assert_eq!(actors, ["service:mesh for urn:ods:YP001"]);
    // The bad one came back as a refusal report naming the problem, no data.
    let reports = eventually(20, "the refusal report", || async {
        let r = inbox(&prison_mb).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(reports.len(), 1, "one report, for the bad message only");
    let report = &reports[0];
    assert_eq!(report.workflow_id, "THROUGHCARE_REFUSAL");
    let body: serde_json::Value = serde_json::from_slice(&report.body).unwrap();
    assert_eq!(body["refused_message_id"], bad);
    assert_eq!(body["local_id"], "mesh-adm-bad");
    assert_eq!(body["reason"], "INVALID_ARGUMENT");
    assert!(
        !body["field_violations"].as_array().unwrap().is_empty(),
        "{body}"
    );
    // Refused: never a handover.
    let err = prison
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId(
                "mesh-adm-bad".into(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_down_mid_send_then_back_loses_nothing_and_repeats_only_with_the_same_local_id() {
    let mut sandbox = Sandbox::start();
    let gw = gateway_with(&sandbox).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    let mut prison = gw.client("YP001").await;
    let mut ids = Vec::new();
    for i in 0..6u32 {
        let r = prison
            .submit(release(
                &format!("mesh-fault-{i}"),
                50 + i,
                &["YG001"],
                "fault",
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.deliveries[0].delivery_id);
        if i == 2 {
            // Down while the first ones are being sent.
            sandbox.stop();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        gw.metrics.encode().contains("throughcare_mesh_reachable 0"),
        "MESH down shows"
    );
    sandbox.run();
    let practice = sandbox.client(PRACTICE_MB);
    let got = eventually(40, "every delivery in the practice's inbox", || async {
        let got = inbox(&practice).await;
        let ids_seen: std::collections::BTreeSet<String> =
            got.iter().map(|m| m.local_id.clone()).collect();
        (ids.iter()
            .all(|d| ids_seen.contains(&format!("throughcare-{d}"))))
        .then_some(got)
    })
    .await;
    for m in &got {
        assert!(
            ids.iter().any(|d| m.local_id == format!("throughcare-{d}")),
            "only our deliveries, each under its own local id: {}",
            m.local_id
        );
        practice.acknowledge(&m.message_id).await.unwrap();
    }
    for i in 0..6u32 {
        delivered(&gw, &format!("mesh-fault-{i}")).await;
    }
    gw.stop().await;
}

/// MESH answers 300 to a lookup by a local id it holds several messages
/// under, and names none. The delivery is sent again under the same local id
/// and that copy tracked; the lookup had failed every round until the lease
/// ran out, every lease, until the delivery was quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_holding_two_copies_under_a_local_id_gets_a_third_that_is_tracked() {
    let sandbox = Sandbox::start();
    // A second complete copy under the same local id (an earlier crash
    // mid-send), then the crash window again: only "sending" is recorded.
    let gateway_mailbox = sandbox.client(GATEWAY_MB);
    let (gw, sent) =
        sent_then_restarted_unrecorded(&sandbox, "mesh-300-1", 45, |sent| async move {
            gateway_mailbox
                .send(&Outgoing {
                    to: PRACTICE_MB,
                    workflow_id: throughcare::mesh::workflow_id(
                        throughcare::journey::JourneyEvent::Release,
                    ),
                    subject: "an earlier copy",
                    local_id: &format!("throughcare-{}", sent.delivery_id),
                    file_name: "copy.json",
                    content_type: "application/json",
                    body: b"{}",
                })
                .await
                .unwrap();
        })
        .await;
    let d = eventually(30, "sent again and tracked", || async {
        let d = delivery_of(&gw, "mesh-300-1").await;
        (d.mesh_state == "SENT").then_some(d)
    })
    .await;
    assert_ne!(d.mesh_message_id, sent.mesh_message_id);
    let practice = sandbox.client(PRACTICE_MB);
    let got = inbox(&practice).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let local_id = format!("throughcare-{}", sent.delivery_id);
    assert!(
        got.iter().all(|m| m.local_id == local_id),
        "one local id: the recipient discards repeats"
    );
    practice.acknowledge(&d.mesh_message_id).await.unwrap();
    delivered(&gw, "mesh-300-1").await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_restart_after_an_unrecorded_send_asks_mesh_by_local_id_and_sends_no_second_copy() {
    let sandbox = Sandbox::start();
    let (gw, sent) =
        sent_then_restarted_unrecorded(&sandbox, "mesh-restart-1", 44, |_| async {}).await;
    // Once its lease runs out the delivery comes back; MESH is asked by
    // local id and has it: recorded as sent, not sent again.
    let d = eventually(30, "the send recorded again from MESH", || async {
        let d = delivery_of(&gw, "mesh-restart-1").await;
        (d.mesh_state == "SENT").then_some(d)
    })
    .await;
    assert_eq!(d.mesh_message_id, sent.mesh_message_id);
    let practice = sandbox.client(PRACTICE_MB);
    let got = inbox(&practice).await;
    assert_eq!(got.len(), 1, "one copy in MESH");
    practice.acknowledge(&got[0].message_id).await.unwrap();
    delivered(&gw, "mesh-restart-1").await;
    gw.stop().await;
}

/// A release `message_id` sent through MESH (leases of 2 s), then the crash
/// window: MESH took the message, the gateway died before recording MESH's
/// id, so its record says only that a send began. `meanwhile` runs before
/// the restart. The restarted gateway, and the delivery as first sent.
async fn sent_then_restarted_unrecorded<F: std::future::Future<Output = ()>>(
    sandbox: &Sandbox,
    message_id: &str,
    patient: u32,
    meanwhile: impl FnOnce(pb::DeliveryStatus) -> F,
) -> (TestGateway, pb::DeliveryStatus) {
    let gw = gateway_leasing(sandbox, 2).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release(message_id, patient, &["YG001"], "restart"))
        .await
        .unwrap();
    let sent = eventually(20, "the release sent", || async {
        let d = delivery_of(&gw, message_id).await;
        (!d.mesh_message_id.is_empty()).then_some(d)
    })
    .await;
    meanwhile(sent.clone()).await;
    let mut record = gw.store.mesh_record(sent.delivery_id).unwrap().unwrap();
    record.state = throughcare::store::MeshState::Sending;
    record.message_id = None;
    gw.store.mesh_put("test", record).await.unwrap();
    let (dir, config) = gw.stop().await;
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    (gw, sent)
}

/// Waits (up to 30 s) until the gateway has the delivery of `message_id`
/// DELIVERED.
async fn delivered(gw: &TestGateway, message_id: &str) {
    eventually(30, "DELIVERED", || async {
        let d = delivery_of(gw, message_id).await;
        (d.state() == pb::DeliveryState::Delivered).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_that_hangs_times_out_backs_off_and_delivers_everything_once_it_answers() {
    let sandbox = Sandbox::start();
    let dir = tempfile::tempdir().unwrap();
    let mesh = MeshConfig {
        timeout_ms: 500,
        ..sandbox.config(dir.path())
    };
    let gw = TestGateway::start_with(|c: &mut Config| c.mesh = mesh, Arc::new(SystemClock)).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    // MESH stops answering (the process frozen: connections open, no answers).
    let pid = sandbox.child.as_ref().unwrap().id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut prison = gw.client("YP001").await;
    let mut ids = Vec::new();
    for i in 0..3u32 {
        let r = prison
            .submit(release(
                &format!("mesh-slow-{i}"),
                60 + i,
                &["YG001"],
                "slow",
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.deliveries[0].delivery_id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        gw.metrics.encode().contains("throughcare_mesh_reachable 0"),
        "a hung MESH shows"
    );
    for i in 0..3u32 {
        // Nothing was leased while MESH did not answer.
        let d = delivery_of(&gw, &format!("mesh-slow-{i}")).await;
        assert_eq!(
            (d.state(), d.mesh_state.as_str()),
            (pb::DeliveryState::Queued, "")
        );
    }
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let practice = sandbox.client(PRACTICE_MB);
    let got = eventually(30, "every delivery once MESH answers", || async {
        let got = inbox(&practice).await;
        (got.len() >= ids.len()).then_some(got)
    })
    .await;
    let mut local: Vec<String> = got.iter().map(|m| m.local_id.clone()).collect();
    local.sort();
    let mut want: Vec<String> = ids.iter().map(|d| format!("throughcare-{d}")).collect();
    want.sort();
    assert_eq!(local, want, "each once");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_message_larger_than_the_gateway_accepts_is_refused_back_not_retried_forever() {
    let sandbox = Sandbox::start();
    let dir = tempfile::tempdir().unwrap();
    let mesh = sandbox.config(dir.path());
    let gw = TestGateway::start_with(
        |c: &mut Config| {
            c.mesh = mesh;
            c.limits.max_document_bytes = 64 * 1024;
        },
        Arc::new(SystemClock),
    )
    .await;
    reach_through_mesh(&gw, "YP001", pb::OrganisationKind::Prison, PRISON_MB).await;
    let prison_mb = sandbox.client(PRISON_MB);
    let big = vec![b'x'; 200 * 1024];
    let send = |local_id: &'static str, body: Vec<u8>| {
        let prison_mb = &prison_mb;
        async move {
            prison_mb
                .send(&Outgoing {
                    to: GATEWAY_MB,
                    workflow_id: "THROUGHCARE_ADMISSION",
                    subject: "admission",
                    local_id,
                    file_name: "adm.json",
                    content_type: "application/fhir+json",
                    body: &body,
                })
                .await
                .unwrap()
        }
    };
    // Too large (in chunks of 2 KiB), then a good one behind it: the big one
    // must not hold the inbox up.
    let too_big = send("mesh-big", big).await;
    let good = send("mesh-after-big", admission_fhir(46)).await;
    eventually(30, "both acknowledged", || async {
        let a = prison_mb
            .track(&too_big)
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let b = prison_mb
            .track(&good)
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        (a == "acknowledged" && b == "acknowledged").then_some(())
    })
    .await;
    let reports = inbox(&prison_mb).await;
    assert_eq!(reports.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&reports[0].body).unwrap();
    assert_eq!(body["refused_message_id"], too_big);
    assert_eq!(body["field_violations"][0]["field"], "content");
    let mut prison = gw.client("YP001").await;
    assert_eq!(
        track_message(&mut prison, "mesh-after-big").await.event(),
        pb::JourneyEvent::Admission
    );
    gw.stop().await;
}

/// The compose `parties` profile points `[mesh]` at files of the dev PKI that
/// the gateway makes on its first start: the PKI must exist before the MESH
/// client reads them (it did not: the gateway refused to start).
#[tokio::test]
async fn a_development_mesh_set_up_may_name_files_of_the_pki_made_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::write(dir.path().join("password"), "password\n").unwrap();
    std::fs::write(dir.path().join("shared-key"), SHARED_KEY).unwrap();
    let (cert, key) = throughcare::certs::DevPaths { dir: certs.clone() }.client("YG002");
    let config = Config {
        data_dir: dir.path().join("data"),
        certs_dir: certs.clone(),
        dev_certs: true,
        mesh: MeshConfig {
            enabled: true,
            url: "https://mesh-sandbox:8700".into(),
            mailbox: GATEWAY_MB.into(),
            password_file: Some(dir.path().join("password")),
            shared_key_file: Some(dir.path().join("shared-key")),
            client_cert_file: Some(cert),
            client_key_file: Some(key),
            ca_file: Some(certs.join("ca.pem")),
            ..MeshConfig::default()
        },
        ..Config::default()
    };
    assert!(!certs.exists());
    let prepared = throughcare::app::Prepared::new(config, Arc::new(SystemClock));
    assert!(prepared.is_ok(), "{:?}", prepared.err());
}

/// A gateway node on database `url` with the key files in `keys` and
/// `[mesh]` on the sandbox's gateway mailbox.
async fn mesh_node(sandbox: &Sandbox, url: &str, keys: &Path) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mesh = sandbox.config(dir.path());
    let (url, keys) = (url.to_owned(), keys.to_owned());
    let gw = TestGateway::start_with(
        move |c: &mut Config| {
            crate::support::use_postgres(c, &url);
            c.master_key_file = Some(keys.join("master-key"));
            c.integrity.audit_key_file = Some(keys.join("audit-key"));
            c.patient_key_file = Some(keys.join("patient-key"));
            c.mesh = mesh;
        },
        Arc::new(SystemClock),
    )
    .await;
    std::mem::forget(dir);
    // Each node's registry is its own until restarted: tell both.
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    reach_through_mesh(&gw, "YP001", pb::OrganisationKind::Prison, PRISON_MB).await;
    gw
}

/// Two gateway nodes on one PostgreSQL database, both with `[mesh]` on the
/// same MESH mailbox (docs/store-engines.md): one node at a time takes a
/// MESH round, so each delivery is sent once, each acknowledgement
/// recorded once, and each inbox message submitted or refused back once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_on_postgres_two_nodes_send_receive_and_refuse_each_message_once() {
    let Some(url) = crate::support::postgres_database("mesh on two nodes") else {
        return;
    };
    let sandbox = Sandbox::start();
    let keys = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(mesh_node(&sandbox, &url, keys.path()).await);
    }
    let mut prison = nodes[0].client("YP001").await;
    for i in 0..6 {
        prison
            .submit(release(
                &format!("mesh-two-{i}"),
                50 + i,
                &["YG001"],
                "two nodes",
            ))
            .await
            .unwrap();
    }
    let prison_mb = sandbox.client(PRISON_MB);
    let bad = prison_mb
        .send(&Outgoing {
            to: GATEWAY_MB,
            workflow_id: "THROUGHCARE_ADMISSION",
            subject: "admission",
            local_id: "mesh-two-bad",
            file_name: "adm.json",
            content_type: "application/fhir+json",
            body: br#"{"resourceType": "Bundle", "type": "document", "entry": []}"#,
        })
        .await
        .unwrap();
    let practice = sandbox.client(PRACTICE_MB);
    let sent = eventually(30, "six releases in the practice's MESH inbox", || async {
        let got = inbox(&practice).await;
        (got.len() >= 6).then_some(got)
    })
    .await;
    // Several more rounds on both nodes: still one copy of each.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let again = inbox(&practice).await;
    assert_eq!(again.len(), 6, "each delivery sent once");
    let locals: std::collections::BTreeSet<_> = again.iter().map(|m| m.local_id.clone()).collect();
    assert_eq!(locals.len(), 6);
    for m in &sent {
        practice.acknowledge(&m.message_id).await.unwrap();
    }
    for i in 0..6 {
        delivered(&nodes[1], &format!("mesh-two-{i}")).await;
    }
    let reports = eventually(30, "the refusal report", || async {
        let r = inbox(&prison_mb).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let reports_now = inbox(&prison_mb).await;
    assert_eq!(
        (reports.len(), reports_now.len()),
        (1, 1),
        "the bad message refused back once"
    );
    let body: serde_json::Value = serde_json::from_slice(&reports_now[0].body).unwrap();
    assert_eq!(body["refused_message_id"], bad);
    // One chain across both nodes: each MESH step recorded once.
    let audit = nodes[0].store.audit_entries().unwrap();
    let count = |action: &str| audit.iter().filter(|e| e.action == action).count();
    assert_eq!(
        (
            count("mesh_sending"),
            count("mesh_sent"),
            count("mesh_acknowledged")
        ),
        (6, 6, 6)
    );
    nodes[1].store.verify_audit().unwrap();
    for gw in nodes {
        gw.stop().await;
    }
}

/// One message MESH cannot answer for (here: tracking a message MESH does
/// not know answers 404) must not hold up the rest of the edge. It stopped
/// every round: the prison's admission waited in the inbox unread, and
/// later releases were never tracked. Now that delivery is quarantined
/// with the reason, and everything else flows. A refusal decided before
/// the submit (a workflow id that is not ours) is audited like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_one_message_mesh_cannot_answer_for_holds_up_nothing_else() {
    let sandbox = Sandbox::start();
    let gw = prison_and_practice_on_mesh(&sandbox).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("mesh-hol-1", 46, &["YG001"], "hol"))
        .await
        .unwrap();
    let sent = eventually(20, "the release sent", || async {
        let d = delivery_of(&gw, "mesh-hol-1").await;
        (!d.mesh_message_id.is_empty()).then_some(d)
    })
    .await;
    // MESH forgets it (its store lost, its retention passed).
    let mut record = gw.store.mesh_record(sent.delivery_id).unwrap().unwrap();
    record.message_id = Some("20261130000000000000_UNKNOWN".into());
    gw.store.mesh_put("test", record).await.unwrap();

    let prison_mb = sandbox.client(PRISON_MB);
    let admission = prison_mb
        .send(&Outgoing {
            to: GATEWAY_MB,
            workflow_id: "THROUGHCARE_ADMISSION",
            subject: "admission",
            local_id: "mesh-hol-adm",
            file_name: "adm.json",
            content_type: "application/fhir+json",
            body: &admission_fhir(47),
        })
        .await
        .unwrap();
    let foreign = prison_mb
        .send(&Outgoing {
            to: GATEWAY_MB,
            workflow_id: "GPFED_SOMETHING",
            subject: "not ours",
            local_id: "mesh-hol-foreign",
            file_name: "x.json",
            content_type: "application/json",
            body: b"{}",
        })
        .await
        .unwrap();
    eventually(30, "the inbox read past the stuck message", || async {
        for id in [&admission, &foreign] {
            let s = prison_mb
                .track(id)
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            if s != "acknowledged" {
                return None;
            }
        }
        Some(())
    })
    .await;
    let d = eventually(20, "the forgotten one quarantined", || async {
        let d = delivery_of(&gw, "mesh-hol-1").await;
        (d.state() == pb::DeliveryState::Quarantined).then_some(d)
    })
    .await;
    assert!(
        d.quarantine_reason.contains("404"),
        "{}",
        d.quarantine_reason
    );
    track_message(&mut prison, "mesh-hol-adm").await;
    let audited = gw.store.audit_entries().unwrap();
    assert!(
        audited.iter().any(|e| e.action == "submit"
            && e.actor == "service:mesh for urn:ods:YP001"
            && e.outcome.contains("mex-WorkflowID")),
        "the refused workflow id is audited"
    );
    gw.stop().await;
}

/// A practice that collects its MESH mailbox after the delivery was
/// quarantined (its leases ran out meanwhile) has the document: the
/// acknowledgement makes the delivery DELIVERED, and nothing is sent again.
/// It was ignored (the delivery stayed quarantined and overdue), and a
/// redrive sent the practice a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_an_acknowledgement_after_quarantine_delivers_and_sends_nothing_twice() {
    let sandbox = Sandbox::start();
    let gw = gateway_leasing_with(&sandbox, 1, |c| c.queue.max_attempts = 1).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("mesh-late-1", 48, &["YG001"], "late"))
        .await
        .unwrap();
    eventually(30, "quarantined after its one lease ran out", || async {
        let d = delivery_of(&gw, "mesh-late-1").await;
        (d.state() == pb::DeliveryState::Quarantined && !d.mesh_message_id.is_empty()).then_some(())
    })
    .await;
    let practice = sandbox.client(PRACTICE_MB);
    let ids = practice.inbox(100).await.unwrap();
    assert_eq!(ids.len(), 1);
    practice.acknowledge(&ids[0]).await.unwrap();
    delivered(&gw, "mesh-late-1").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        practice.inbox(100).await.unwrap().is_empty(),
        "no second copy was sent"
    );
    gw.stop().await;
}

/// MESH asks that its inbox be polled at most every five minutes and
/// emptied each time: a backlog larger than one page (`batch`, at least
/// MESH's 10) is read in one round, and a new delivery is sent at once, not at the next poll.
/// Here the poll is a minute, so anything done within the test's waits was
/// done by the round that started the gateway, or by a delivery's wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_reads_a_backlog_in_one_poll_and_sends_a_new_delivery_at_once() {
    let sandbox = Sandbox::start();
    let slow = |c: &mut Config| {
        c.mesh.poll_interval_ms = 60_000;
        c.mesh.batch = 4;
    };
    let gw = gateway_leasing_with(&sandbox, 30, slow).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    reach_through_mesh(&gw, "YP001", pb::OrganisationKind::Prison, PRISON_MB).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("mesh-wake-1", 71, &["YG001"], "wake"))
        .await
        .unwrap();
    eventually(
        15,
        "the new release sent without waiting for the poll",
        || async {
            let d = delivery_of(&gw, "mesh-wake-1").await;
            (!d.mesh_message_id.is_empty()).then_some(())
        },
    )
    .await;
    let (dir, config) = gw.stop().await;

    // Twelve admissions wait in the gateway's inbox: two pages of ten.
    let prison_mb = sandbox.client(PRISON_MB);
    let mut sent = Vec::new();
    for i in 0..12u32 {
        let local_id = format!("mesh-page-{i}");
        let id = prison_mb
            .send(&Outgoing {
                to: GATEWAY_MB,
                workflow_id: "THROUGHCARE_ADMISSION",
                subject: "admission",
                local_id: &local_id,
                file_name: "adm.json",
                content_type: "application/fhir+json",
                body: &admission_fhir(80 + i),
            })
            .await
            .unwrap();
        sent.push(id);
    }
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    eventually(20, "the whole backlog read in the first poll", || async {
        for id in &sent {
            let status = prison_mb.track(id).await.unwrap().status;
            if status.as_deref() != Some("acknowledged") {
                return None;
            }
        }
        Some(())
    })
    .await;
    gw.stop().await;
}

/// The practice's system is another Throughcare gateway, which refuses our
/// release (a `THROUGHCARE_REFUSAL` message naming it) and then
/// acknowledges it, as a gateway does. The refusal quarantines the
/// delivery with the peer's reason; the acknowledgement does not make it
/// delivered. Before, the refusal was only logged and the delivery showed
/// DELIVERED. A refusal from another mailbox, or naming another message,
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_a_peer_gateways_refusal_quarantines_the_delivery_it_names() {
    let sandbox = Sandbox::start();
    let gw = prison_and_practice_on_mesh(&sandbox).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("mesh-peer-1", 48, &["YG001"], "peer"))
        .await
        .unwrap();
    let practice = sandbox.client(PRACTICE_MB);
    let msg = eventually(20, "the release in the practice's MESH inbox", || async {
        inbox(&practice).await.into_iter().next()
    })
    .await;
    let refusal = |refused: &str, local: &str, reason: &str| {
        serde_json::json!({
            "refused_message_id": refused,
            "local_id": local,
            "workflow_id": "THROUGHCARE_RELEASE",
            "reason": reason,
            "message": "invalid request: entry[0]: the first entry must be a Composition",
            "field_violations": [],
        })
        .to_string()
    };
    // The prison's mailbox cannot refuse what was sent to the practice, and
    // a refusal naming another message is about nothing in flight.
    let prison_mb = sandbox.client(PRISON_MB);
    send_refusal(
        &prison_mb,
        refusal(&msg.message_id, &msg.local_id, "WRONG_MAILBOX"),
        "r-wrong-mailbox",
    )
    .await;
    send_refusal(
        &practice,
        refusal("20261101000000000000_OTHER", &msg.local_id, "OTHER_MESSAGE"),
        "r-other",
    )
    .await;
    send_refusal(
        &practice,
        refusal(&msg.message_id, &msg.local_id, "INVALID_ARGUMENT"),
        "r-real",
    )
    .await;
    let d = eventually(30, "QUARANTINED by the peer's refusal", || async {
        let d = delivery_of(&gw, "mesh-peer-1").await;
        (d.state() == pb::DeliveryState::Quarantined && d.mesh_state == "FAILED").then_some(d)
    })
    .await;
    assert!(
        d.quarantine_reason
            .contains("refused by the recipient's gateway (INVALID_ARGUMENT)"),
        "{}",
        d.quarantine_reason
    );
    // The peer acknowledges what it refused: still not delivered.
    practice.acknowledge(&msg.message_id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = delivery_of(&gw, "mesh-peer-1").await;
    assert_eq!(d.state(), pb::DeliveryState::Quarantined);
    gw.stop().await;
}

/// Sends a `THROUGHCARE_REFUSAL` message with `body` to the gateway's mailbox.
async fn send_refusal(from: &MeshClient, body: String, local_id: &str) {
    from.send(&Outgoing {
        to: GATEWAY_MB,
        workflow_id: "THROUGHCARE_REFUSAL",
        subject: "refused",
        local_id,
        file_name: "refusal.json",
        content_type: "application/json",
        body: body.as_bytes(),
    })
    .await
    .unwrap();
}

/// `summary` rendered as an HL7 v2 release whose MSH-18 is `charset`, with
/// every `Q` of the family name written as Latin-1's one byte for `Ë`, and
/// `NoJl` (a given name) as `No\XEB\l`, Latin-1's `ë` as hexadecimal data.
fn latin_release(summary: &throughcare::clinical::ClinicalSummary, charset: &str) -> Vec<u8> {
    let rendered =
        throughcare::clinical::hl7v2::render(summary, throughcare::journey::JourneyEvent::Release);
    let text = String::from_utf8(rendered.bytes).unwrap();
    let (msh, rest) = text.split_once('\r').unwrap();
    let mut fields: Vec<String> = msh.split('|').map(str::to_owned).collect();
    fields.resize(fields.len().max(18), String::new());
    fields[17] = charset.into();
    let text = format!("{}\r{rest}", fields.join("|"));
    let family = summary.patient.family_name.as_str();
    let (before, after) = text.split_once(family).unwrap();
    let mut bytes = before.as_bytes().to_vec();
    bytes.extend(family.bytes().map(|b| if b == b'Q' { 0xCB } else { b }));
    let (before, after) = after.split_once("NoJl").unwrap();
    bytes.extend_from_slice(before.as_bytes());
    bytes.extend_from_slice(b"No\\XEB\\l");
    bytes.extend_from_slice(after.as_bytes());
    bytes
}

/// An HL7 v2 message through MESH is read in the character set its MSH-18
/// declares, as over MLLP: a Latin-1 name arrives as written (it was
/// refused as "not UTF-8 text"), a hexadecimal escape in Latin-1 is the
/// character it names (it was kept as `\XEB\`), and a set the gateway does
/// not read is refused back naming MSH-18.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_reads_an_hl7_message_in_the_character_set_its_msh_18_declares() {
    let sandbox = Sandbox::start();
    let gw = gateway_with(&sandbox).await;
    reach_through_mesh(&gw, "YP001", pb::OrganisationKind::Prison, PRISON_MB).await;
    let prison_mb = sandbox.client(PRISON_MB);
    let mut summary = throughcare::clinical::synthetic::release_summary(
        nhs(48).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG002".parse().unwrap()),
        "latin",
    );
    summary.patient.family_name = "ZOQ".into();
    summary.patient.given_names = vec!["NoJl".into()];
    let mut sent = Vec::new();
    for (local_id, charset) in [("mesh-latin-1", "8859/1"), ("mesh-latin-15", "8859/15")] {
        let id = prison_mb
            .send(&Outgoing {
                to: GATEWAY_MB,
                workflow_id: "THROUGHCARE_RELEASE",
                subject: "release",
                local_id,
                file_name: "rel.hl7",
                content_type: "application/hl7-v2",
                body: &latin_release(&summary, charset),
            })
            .await
            .unwrap();
        sent.push(id);
    }
    eventually(20, "both acknowledged by the gateway", || async {
        for id in &sent {
            let s = prison_mb
                .track(id)
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            if s != "acknowledged" {
                return None;
            }
        }
        Some(())
    })
    .await;
    let mut practice = gw.client("YG002").await;
    let got = pull_and_ack(&mut practice).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let Some(pb::delivery::Document::Native(s)) = &got[0].document else {
        panic!("{:?}", got[0].document);
    };
    let patient = s.patient.as_ref().unwrap();
    assert_eq!(patient.family_name, "ZOË");
    assert_eq!(patient.given_names, ["Noël"]);
    let reports = eventually(20, "the refusal report", || async {
        let r = inbox(&prison_mb).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    let body: serde_json::Value = serde_json::from_slice(&reports[0].body).unwrap();
    assert_eq!(body["local_id"], "mesh-latin-15", "{body}");
    assert!(body.to_string().contains("MSH-18"), "{body}");
    gw.stop().await;
}

/// A release of patient `patient` to YG001 written at `authored`, with 200
/// follow-ups: large enough to go to MESH in many chunks, so MESH can go
/// down while it is being uploaded.
fn long_release(message_id: &str, patient: u32, marker: &str, authored: &str) -> pb::SubmitRequest {
    let mut s = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        marker,
    );
    let first = s.follow_ups[0].clone();
    s.follow_ups = (0..200)
        .map(|i| {
            let mut f = first.clone();
            f.service = format!("{marker} community service number {i} of the release plan");
            f
        })
        .collect();
    s.authored_at = authored.parse().unwrap();
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: pb::JourneyEvent::Release.into(),
        patient: Some(pb::PatientRef {
            nhs_number: nhs(patient),
            prison_number: String::new(),
            date_of_birth: "1985-06-15".into(),
        }),
        destinations: vec!["YG001".into()],
        document: Some(pb::submit_request::Document::Native(
            throughcare::grpc::summary::to_wire(&s),
        )),
    }
}

/// MESH goes down while a release is being uploaded; the edge holds it to
/// retry within its lease. A correction arrives meanwhile. When MESH is
/// back, only the correction is sent: the held copy, superseded while
/// held, is not sent after it (it was, and the practice filed the old
/// summary as the newest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sends_no_held_copy_that_was_superseded_while_mesh_was_down() {
    let mut sandbox = Sandbox::start();
    let gw = gateway_with(&sandbox).await;
    reach_through_mesh(&gw, "YG001", pb::OrganisationKind::GpPractice, PRACTICE_MB).await;
    let mut prison = gw.client("YP001").await;
    let first = prison
        .submit(long_release(
            "mesh-held-1",
            49,
            "first",
            "2026-11-24T08:00:00Z",
        ))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0]
        .delivery_id;
    // Down once its upload has begun (its `sending` record is durable
    // before the first chunk goes).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let record = gw.store.mesh_record(first).unwrap();
        if record.is_some_and(|r| r.state == throughcare::store::MeshState::Sending) {
            break;
        }
        assert!(Instant::now() < deadline, "the upload never began");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sandbox.stop();
    eventually(20, "the round failed", || async {
        gw.metrics
            .encode()
            .contains("throughcare_mesh_reachable 0")
            .then_some(())
    })
    .await;
    let state = gw.store.mesh_record(first).unwrap().unwrap().state;
    assert_eq!(
        state,
        throughcare::store::MeshState::Sending,
        "sent whole before MESH went down"
    );
    let second = prison
        .submit(long_release(
            "mesh-held-2",
            49,
            "corrected",
            "2026-11-24T09:00:00Z",
        ))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0]
        .delivery_id;
    assert_ne!(
        gw.store.delivery(first).unwrap().unwrap().superseded_by,
        None
    );
    sandbox.run();
    let practice = sandbox.client(PRACTICE_MB);
    let got = eventually(60, "the correction in the practice's inbox", || async {
        let got = inbox(&practice).await;
        got.iter()
            .any(|m| m.local_id == format!("throughcare-{second}"))
            .then_some(got)
    })
    .await;
    assert!(
        got.iter()
            .all(|m| m.local_id != format!("throughcare-{first}")),
        "the superseded copy was sent: {:?}",
        got.iter().map(|m| &m.local_id).collect::<Vec<_>>()
    );
    gw.stop().await;
}
