//! Moving a sled store to PostgreSQL (docs/store-engines.md, "Moving a sled
//! store to PostgreSQL"): a sled gateway filled over gRPC, stopped, exported
//! and imported with the real binary (`admin store export` / `import`), then
//! a gateway on PostgreSQL serves the same queues: the same pulls in the same
//! order as sled gives them, a lease taken on sled acknowledged, a repeated
//! submit answered with its original receipt, the audit chain verified, and
//! a second import refused with nothing changed.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use support::*;
use throughcare::grpc::pb;
use throughcare::store::{Clock, SystemClock};

use crate::support;

/// The key files both engines share, outside either's data directory.
fn keys(c: &mut throughcare::config::Config, keys: &Path) {
    c.master_key_file = Some(keys.join("master-key"));
    c.integrity.audit_key_file = Some(keys.join("audit-key"));
    c.patient_key_file = Some(keys.join("patient-key"));
}

/// A sled gateway whose key files live in `work/keys` (where `sled_admin`
/// and the PostgreSQL nodes find them too), and that directory.
async fn keyed_sled(work: &Path) -> (TestGateway, std::path::PathBuf) {
    let key_dir = work.join("keys");
    let k = key_dir.clone();
    let gw = TestGateway::start_with(move |c| keys(c, &k), Arc::new(SystemClock)).await;
    (gw, key_dir)
}

/// One release from YP001 for YG001, message id `r-1`, marked `marker`.
async fn submit_one(gw: &TestGateway, marker: &str) {
    gw.client("YP001")
        .await
        .submit(release("r-1", 1, &["YG001"], marker))
        .await
        .unwrap();
}

/// `throughcare admin store <verb>` on the sled store in `data`.
fn sled_admin(data: &Path, keys: &Path, args: &[&str]) -> Output {
    Command::new(support::BIN)
        .args(["admin", "store"])
        .args(args)
        .env("THROUGHCARE_DATA_DIR", data)
        .env("THROUGHCARE_MASTER_KEY_FILE", keys.join("master-key"))
        .env(
            "THROUGHCARE_INTEGRITY_AUDIT_KEY_FILE",
            keys.join("audit-key"),
        )
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// `throughcare admin <args>` configured for the database `url`.
fn pg_admin(url: &str, dir: &Path, keys: &Path, args: &[&str]) -> Output {
    Command::new(support::BIN)
        .arg("admin")
        .args(args)
        .env("THROUGHCARE_STORE_ENGINE", "postgres")
        .env("THROUGHCARE_STORE_POSTGRES_URL", url)
        .env("THROUGHCARE_STORE_POSTGRES_KEEPS_EVERYTHING", "true")
        .env(
            "THROUGHCARE_STORE_POSTGRES_REQUIRE_SYNCHRONOUS_STANDBY",
            "false",
        )
        .env("THROUGHCARE_DATA_DIR", dir.join("pg-node"))
        .env("THROUGHCARE_MASTER_KEY_FILE", keys.join("master-key"))
        .env(
            "THROUGHCARE_INTEGRITY_AUDIT_KEY_FILE",
            keys.join("audit-key"),
        )
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn lease(seconds: i64) -> pb::PullRequest {
    pb::PullRequest {
        lease: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..pull(1)
    }
}

/// A release of invented patient `patient` from YP001 to YG001, naming
/// the patient by NHS number, prison number or both.
fn named(
    id: &str,
    patient: u32,
    with_nhs: bool,
    prison: Option<&str>,
    marker: &str,
) -> pb::SubmitRequest {
    let summary = throughcare::clinical::synthetic::release_summary(
        with_nhs.then(|| nhs(patient).parse().unwrap()),
        prison.map(|p| p.parse().unwrap()),
        "YP001".parse().unwrap(),
        None,
        marker,
    );
    throughcare::cli::client::native_submit(id, pb::JourneyEvent::Release, &["YG001"], &summary)
}

/// A client of `mailbox`; the practice the fill adds to the registry has
/// no dev certificate, so one is issued.
async fn client(
    gw: &TestGateway,
    mailbox: &str,
) -> pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel> {
    if mailbox != "YG003" {
        return gw.client(mailbox).await;
    }
    let issued = gw.ca().issue_client_now("urn:ods:YG003").unwrap();
    gw.client_with(
        &gw.ca_pem(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .await
    .unwrap()
}

/// A pulled delivery as compared across engines.
type Pulled = (u64, u64, u32, String);

/// Pulls `mailbox` dry, acknowledging each delivery (per-patient order lets
/// a patient's next one out only then); bounded.
async fn drain(gw: &TestGateway, mailbox: &str) -> Vec<Pulled> {
    let mut c = client(gw, mailbox).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        let batch = pull_and_ack(&mut c).await;
        if batch.is_empty() {
            return got;
        }
        got.extend(
            batch
                .iter()
                .map(|d| (d.delivery_id, d.handover_id, d.attempt, text_of(d))),
        );
    }
    panic!("{mailbox} never ran dry");
}

/// What every mailbox of the fill holds, pulled in order, and the parked
/// and quarantined ids.
async fn everything(gw: &TestGateway) -> (Vec<Vec<Pulled>>, Vec<u64>, Vec<u64>) {
    let mut op = gw.operator().await;
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries
        .iter()
        .map(|d| d.delivery_id)
        .collect();
    let quarantined = op
        .list_quarantine(pb::ListQuarantineRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries
        .iter()
        .map(|d| d.delivery_id)
        .collect();
    let mut pulled = Vec::new();
    for mailbox in ["YG001", "YG002", "YG003", "YPR01"] {
        pulled.push(drain(gw, mailbox).await);
    }
    (pulled, parked, quarantined)
}

/// The sled gateway's traffic: every delivery state, several patients, a
/// registry change. Returns the repeated submit, its receipt, and the
/// delivery left on lease (id, attempt).
async fn fill(gw: &TestGateway) -> (pb::SubmitRequest, pb::SubmitResponse, (u64, u32)) {
    let mut op = gw.operator().await;
    let practice = "Meadow Lane Practice (invented)";
    op.put_organisation(organisation(
        "YG003",
        pb::OrganisationKind::GpPractice,
        practice,
    ))
    .await
    .unwrap();
    let mut prison = gw.client("YP001").await;
    let mut receipts = Vec::new();
    for request in [
        release("r-1", 1, &["YG001"], "p1 first"),
        release("r-2", 1, &["YG001"], "p1 corrected"),
        release("r-3", 2, &["YG001"], "p2"),
        release("r-4", 3, &["YG001"], "p3"),
        admission("a-5", 5),
        release("r-5", 5, &["YG001"], "p5 after admission"),
        release("r-6", 6, &["YG002"], "poison"),
        release("r-7", 7, &["YG002"], "p7"),
        release("r-9", 9, &[], "parked"),
        release("r-10", 10, &["YG003"], "p10"),
        release("r-11", 11, &["YG003"], "p11"),
        named("r-12", 12, true, Some("A1234BC"), "p12 both numbers"),
    ] {
        receipts.push((
            request.clone(),
            prison.submit(request).await.unwrap().into_inner(),
        ));
    }
    let mut gp = gw.client("YG001").await;
    let kept = gp.pull(lease(600)).await.unwrap().into_inner().deliveries;
    assert_eq!(text_of(&kept[0]), "p1 corrected", "r-1 was superseded");
    let one = gp.pull(pull(1)).await.unwrap().into_inner().deliveries;
    assert_eq!(text_of(&one[0]), "p2");
    gp.ack(pb::AckRequest {
        delivery_id: one[0].delivery_id,
        attempt: one[0].attempt,
    })
    .await
    .unwrap();
    let mut other = gw.client("YG002").await;
    let poison = other.pull(pull(1)).await.unwrap().into_inner().deliveries;
    assert_eq!(text_of(&poison[0]), "poison");
    other
        .nack(pb::NackRequest {
            delivery_id: poison[0].delivery_id,
            attempt: poison[0].attempt,
            permanent: true,
            reason: "cannot file this".into(),
        })
        .await
        .unwrap();
    let (request, receipt) = receipts.swap_remove(3);
    (request, receipt, (kept[0].delivery_id, kept[0].attempt))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sled_store_moves_to_postgres_whole_and_serves_on() {
    let Some(url) = support::postgres_database("store_export") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (sled, key_dir) = keyed_sled(work.path()).await;
    let (repeat, original, (leased, attempt)) = fill(&sled).await;
    let data = sled.config.data_dir.clone();
    let file = work.path().join("store.export");
    let file_arg = file.to_str().unwrap();
    let (dir, config) = sled.stop().await;
    let exported = sled_admin(&data, &key_dir, &["export", "--out", file_arg]);
    assert!(exported.status.success(), "{}", text(&exported));
    let said = text(&exported);
    eprintln!("{said}");
    for count in [
        "deliveries_superseded",
        "deliveries_leased",
        "deliveries_delivered",
        "deliveries_parked",
        "deliveries_quarantined",
        "deliveries_queued",
    ] {
        assert!(said.contains(count), "{count}: {said}");
    }
    let raw = std::fs::read_to_string(&file).unwrap();
    assert!(!raw.contains("p1 corrected"), "payloads stay sealed");
    assert!(!raw.contains(&nhs(1)), "no NHS number in the file");

    // What sled itself serves from the state that was exported.
    let sled = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let on_sled = everything(&sled).await;
    sled.stop().await;
    assert_eq!(
        on_sled.0.iter().map(Vec::len).sum::<usize>(),
        17,
        "{on_sled:?}"
    );

    let imported = pg_admin(
        &url,
        work.path(),
        &key_dir,
        &["store", "import", "--from", file_arg],
    );
    assert!(imported.status.success(), "{}", text(&imported));
    eprintln!("{}", text(&imported));
    assert!(text(&imported).contains("handovers"), "{}", text(&imported));

    let pg = {
        let (k, url) = (key_dir.clone(), url.clone());
        TestGateway::start_with(
            move |c| {
                use_postgres(c, &url);
                keys(c, &k);
            },
            Arc::new(SystemClock),
        )
        .await
    };
    // The lease taken on sled is still the recipient's, and its ack counts.
    let mut gp = pg.client("YG001").await;
    gp.ack(pb::AckRequest {
        delivery_id: leased,
        attempt,
    })
    .await
    .unwrap();
    let on_pg = everything(&pg).await;
    assert_eq!(on_pg, on_sled, "the same deliveries in the same order");
    after_the_move(&pg, repeat, original).await;

    let verify = pg_admin(&url, work.path(), &key_dir, &["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    let digest = settled_digest(&pg).await;
    let entries = pg.store.audit_entries().unwrap().len();
    let again = pg_admin(
        &url,
        work.path(),
        &key_dir,
        &["store", "import", "--from", file_arg],
    );
    assert!(!again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("not empty"), "{}", text(&again));
    assert_eq!(
        pg.store.content_digest().unwrap(),
        digest,
        "nothing changed"
    );
    let trail = pg.store.audit_entries().unwrap();
    assert_eq!(trail.len(), entries + 1, "the refusal is audited");
    assert!(trail.last().unwrap().outcome.starts_with("refused"));
    let verify = pg_admin(&url, work.path(), &key_dir, &["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    pg.stop().await;
}

/// Idempotency, ids and supersession carry on from the sled store.
/// The store's digest once the gateway's own sweep has nothing left to
/// change: the releases just submitted are past their release day, and the
/// sweep (every second) marks each overdue once. Bounded.
async fn settled_digest(gw: &TestGateway) -> String {
    let mut digest = gw.store.content_digest().unwrap();
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        let now = gw.store.content_digest().unwrap();
        if now == digest {
            return now;
        }
        digest = now;
    }
    panic!("the store kept changing with nothing asked of it");
}

async fn after_the_move(pg: &TestGateway, repeat: pb::SubmitRequest, original: pb::SubmitResponse) {
    let mut prison = pg.client("YP001").await;
    let again = prison.submit(repeat).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.handover_id, original.handover_id);
    assert_eq!(again.deliveries, original.deliveries);
    let corrected = track_message(&mut prison, "r-2").await;
    let newer = prison
        .submit(release("r-13", 1, &["YG001"], "p1 third"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        newer.handover_id > corrected.handover_id,
        "ids never reused"
    );
    let record = pg.store.handover(newer.handover_id).unwrap().unwrap();
    assert_eq!(
        record.supersedes,
        Some(corrected.handover_id),
        "the lineage came across with the patient's identity"
    );
    // Known on sled by both numbers, named now by the prison number alone:
    // the same patient, so its earlier release is superseded.
    let by_prison_number = prison
        .submit(named(
            "r-14",
            12,
            false,
            Some("A1234BC"),
            "p12 prison number",
        ))
        .await
        .unwrap()
        .into_inner();
    let both = track_message(&mut prison, "r-12").await;
    let record = pg
        .store
        .handover(by_prison_number.handover_id)
        .unwrap()
        .unwrap();
    assert_eq!(
        record.supersedes,
        Some(both.handover_id),
        "one patient across identifiers"
    );
    let mut gp = pg.client("YG001").await;
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["p1 third", "p12 prison number"]
    );
}

/// Writes `dir`'s key files: `master`'s master key (or random bytes) and
/// `audit`'s audit key (or random bytes).
fn key_set(dir: &Path, master: Option<&Path>, audit: Option<&Path>) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, from) in [("master-key", master), ("audit-key", audit)] {
        let bytes = match from {
            Some(keys) => std::fs::read(keys.join(name)).unwrap(),
            None => uuid::Uuid::new_v4().as_bytes().repeat(2),
        };
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_is_refused_whole_and_leaves_the_database_empty() {
    let Some(url) = support::postgres_database("store_export") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (sled, key_dir) = keyed_sled(work.path()).await;
    submit_one(&sled, "one").await;
    let data = sled.config.data_dir.clone();
    let (_kept, _) = sled.stop().await;
    let file = work.path().join("store.export");
    let file_arg = file.to_str().unwrap();
    let refused = |out: Output, why: &str| {
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(why), "{why}: {}", text(&out));
    };
    // Each verb refuses the other engine's configuration.
    let pg_dir = work.path();
    refused(
        pg_admin(
            &url,
            pg_dir,
            &key_dir,
            &["store", "export", "--out", file_arg],
        ),
        "names the PostgreSQL engine",
    );
    let exported = sled_admin(&data, &key_dir, &["export", "--out", file_arg]);
    assert!(exported.status.success(), "{}", text(&exported));
    refused(
        sled_admin(&data, &key_dir, &["import", "--from", file_arg]),
        "names sled",
    );
    refused(
        sled_admin(&data, &key_dir, &["export", "--out", file_arg]),
        "never replaces a file",
    );
    // Key files that are not there are never made up.
    let none = work.path().join("no-keys");
    refused(
        pg_admin(
            &url,
            pg_dir,
            &none,
            &["store", "import", "--from", file_arg],
        ),
        "does not exist",
    );
    assert!(!none.join("master-key").exists());
    // Another master key, another audit key, a changed file.
    let other_master = work.path().join("other-master");
    key_set(&other_master, None, Some(&key_dir));
    refused(
        pg_admin(
            &url,
            pg_dir,
            &other_master,
            &["store", "import", "--from", file_arg],
        ),
        "master key must be the sled gateway's",
    );
    let other_audit = work.path().join("other-audit");
    key_set(&other_audit, Some(&key_dir), None);
    refused(
        pg_admin(
            &url,
            pg_dir,
            &other_audit,
            &["store", "import", "--from", file_arg],
        ),
        "not signed by this configuration's audit key",
    );
    let changed = work.path().join("changed.export");
    let raw = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&changed, raw.replace("\"attempt\":0", "\"attempt\":1")).unwrap();
    refused(
        pg_admin(
            &url,
            pg_dir,
            &key_dir,
            &["store", "import", "--from", changed.to_str().unwrap()],
        ),
        "does not match the SHA-256",
    );
    // None of that wrote a row: the right file goes into the database.
    let imported = pg_admin(
        &url,
        pg_dir,
        &key_dir,
        &["store", "import", "--from", file_arg],
    );
    assert!(imported.status.success(), "{}", text(&imported));
    refused_once_retention_ran(pg_dir, &key_dir, file_arg).await;
}

/// A database whose retention has run (its counters set, nothing else)
/// is not empty either.
async fn refused_once_retention_ran(pg_dir: &Path, key_dir: &Path, file_arg: &str) {
    let url = support::postgres_database("store_export").unwrap();
    let opened = pg_admin(&url, pg_dir, key_dir, &["audit", "verify"]);
    assert!(opened.status.success(), "{}", text(&opened));
    let (sql, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    sql.batch_execute("UPDATE retention_state SET payloads_shredded = 1")
        .await
        .unwrap();
    let out = pg_admin(
        &url,
        pg_dir,
        key_dir,
        &["store", "import", "--from", file_arg],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("retention has already run"),
        "{}",
        text(&out)
    );
}

/// On sled alone (no database needed): a running gateway's store is refused,
/// a stopped one is exported with its payloads sealed, the export is the
/// last entry of a chain that still verifies, and the gateway starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_reads_a_stopped_sled_store_only_and_keeps_payloads_sealed() {
    let work = tempfile::tempdir().unwrap();
    let (sled, key_dir) = keyed_sled(work.path()).await;
    submit_one(&sled, "sealed marker").await;
    let never_held = trail_of(&sled, 77).await;
    assert!(!never_held.is_empty(), "the query is on its own trail");
    let data = sled.config.data_dir.clone();
    let file = work.path().join("store.export");
    let file_arg = file.to_str().unwrap();
    let busy = sled_admin(&data, &key_dir, &["export", "--out", file_arg]);
    assert!(!busy.status.success(), "{}", text(&busy));
    assert!(text(&busy).contains("in use"), "{}", text(&busy));
    assert!(
        std::fs::read_dir(work.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("store.export")),
        "nothing written while the gateway runs"
    );
    let (dir, config) = sled.stop().await;
    let exported = sled_admin(&data, &key_dir, &["export", "--out", file_arg]);
    assert!(exported.status.success(), "{}", text(&exported));
    let raw = std::fs::read_to_string(&file).unwrap();
    assert!(raw.contains("\"kind\":\"handover\""));
    assert!(!raw.contains("sealed marker"), "payloads stay sealed");
    assert!(!raw.contains(&nhs(1)), "no NHS number in the file");
    let audit = |verb: &str| {
        Command::new(support::BIN)
            .args(["admin", "audit", verb])
            .env("THROUGHCARE_DATA_DIR", &data)
            .env("THROUGHCARE_MASTER_KEY_FILE", key_dir.join("master-key"))
            .env(
                "THROUGHCARE_INTEGRITY_AUDIT_KEY_FILE",
                key_dir.join("audit-key"),
            )
            .output()
            .unwrap()
    };
    let verify = audit("verify");
    assert!(verify.status.success(), "{}", text(&verify));
    let list = String::from_utf8(audit("list").stdout).unwrap();
    let last = list.lines().last().unwrap_or_default();
    assert!(last.contains("\"action\":\"store_export\""), "{last}");
    // The sled store is untouched otherwise: the way back is open.
    let sled = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let mut prison = sled.client("YP001").await;
    let t = track_message(&mut prison, "r-1").await;
    assert_eq!(t.deliveries[0].state(), pb::DeliveryState::Queued);
    // The export read every patient's record: it is on each one's trail,
    // not on that of a patient the store never held (queried before).
    let trail = trail_of(&sled, 1).await;
    assert!(
        trail.iter().any(|e| e.action == "store_export"),
        "{trail:?}"
    );
    let trail = trail_of(&sled, 77).await;
    assert!(
        trail.iter().all(|e| e.action != "store_export"),
        "{trail:?}"
    );
    sled.stop().await;
}

/// Patient `n`'s audit trail, as an operator asks for it.
async fn trail_of(gw: &TestGateway, n: u32) -> Vec<pb::AuditEntry> {
    gw.operator()
        .await
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(n))),
            reason: "who has read this record".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The state a sled gateway's retention pass, MESH edge and PDS lookups
/// leave: a handover removed under the retention policy (its tombstone and
/// its patient's identity check), an audit trail cut behind a signed cut, a
/// MESH send in flight and a parked release with a PDS finding.
struct Kept {
    gone: u64,
    mesh: throughcare::store::MeshRecord,
    parked: u64,
    finding: throughcare::store::PdsFinding,
}

/// Retention periods short enough to pass with the manual clock.
fn short_retention(c: &mut throughcare::config::Config) {
    c.retention.payload_grace_seconds = 60;
    c.retention.metadata_seconds = 600;
    c.retention.audit_seconds = Some(600);
}

fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Makes every piece of [`Kept`] through the store's own seams.
async fn leave_state(gw: &TestGateway, clock: &throughcare::store::ManualClock) -> Kept {
    use throughcare::store::{MeshRecord, MeshState, PdsFinding, PdsResult, PdsStatus};
    let mut prison = gw.client("YP001").await;
    let gone = prison
        .submit(release("gone-1", 1, &["YG001"], "delivered long ago"))
        .await
        .unwrap()
        .into_inner()
        .handover_id;
    // The GP's copy and probation's: then the handover is finished.
    for who in ["YG001", "YPR01"] {
        assert_eq!(pull_and_ack(&mut gw.client(who).await).await.len(), 1);
    }
    prison
        .submit(release("mesh-1", 2, &["YG002"], "in flight on MESH"))
        .await
        .unwrap();
    let delivery = track_message(&mut prison, "mesh-1").await.deliveries[0].delivery_id;
    let handover = track_message(&mut prison, "mesh-1").await.handover_id;
    let mesh = MeshRecord {
        delivery_id: delivery,
        handover_id: handover,
        mailbox: "YG002".into(),
        mesh_mailbox: "YG002OT001".into(),
        local_id: format!("tc-{delivery}-local"),
        message_id: None,
        state: MeshState::Sending,
        attempt: 1,
        sends: 1,
        reason: None,
        updated_ms: clock.now_ms(),
    };
    gw.store
        .mesh_put("urn:gateway:mesh", mesh.clone())
        .await
        .unwrap();
    prison
        .submit(release("parked-1", 3, &[], "no GP known"))
        .await
        .unwrap();
    let parked = gw.store.parked(10).unwrap()[0].id;
    let finding = PdsFinding {
        status: PdsStatus::NoPractice,
        practice: None,
        checked_at_ms: clock.now_ms(),
        next_check_ms: Some(clock.now_ms() + 3_600_000),
        lookups: 1,
    };
    let kept = gw
        .store
        .pds_result(PdsResult {
            delivery_id: parked,
            finding: finding.clone(),
            route_to: None,
        })
        .await
        .unwrap();
    assert!(
        kept.is_some(),
        "the finding is written on the parked release"
    );
    // Past the metadata and audit periods: the delivered handover goes,
    // and so do the oldest audit entries, behind a signed cut.
    clock.advance(700_000);
    prison
        .submit(release("fresh-1", 4, &["YG001"], "after the pass"))
        .await
        .unwrap();
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.metadata_removed, 1, "{pass:?}");
    assert!(pass.audit_removed > 0, "{pass:?}");
    Kept {
        gone,
        mesh,
        parked,
        finding,
    }
}

/// Retention state, MESH records and PDS findings move with the store:
/// Track answers a removed handover from its tombstone, `admin audit
/// verify` verifies from the signed cut sled made, the MESH send in flight
/// and the PDS finding are there, and the retention counters and identity
/// check read as on sled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_mesh_and_pds_state_move_with_the_store() {
    let Some(url) = support::postgres_database("store_export") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let key_dir = work.path().join("keys");
    let (sled, clock) = {
        let k = key_dir.clone();
        TestGateway::start_manual(move |c| {
            keys(c, &k);
            short_retention(c);
        })
        .await
    };
    let kept = leave_state(&sled, &clock).await;
    let mut prison = sled.client("YP001").await;
    let err = prison
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId("gone-1".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "REMOVED_UNDER_RETENTION", "on sled first");
    let on_sled = sled.store.retention_stats().await.unwrap();
    assert!(on_sled.audit_cut.is_some(), "{on_sled:?}");
    assert_eq!(on_sled.identities_expiring, 1, "{on_sled:?}");
    let data = sled.config.data_dir.clone();
    let (_kept_dir, _) = sled.stop().await;
    let file = work.path().join("store.export");
    let file_arg = file.to_str().unwrap();
    let exported = sled_admin(&data, &key_dir, &["export", "--out", file_arg]);
    assert!(exported.status.success(), "{}", text(&exported));
    let imported = pg_admin(
        &url,
        work.path(),
        &key_dir,
        &["store", "import", "--from", file_arg],
    );
    assert!(imported.status.success(), "{}", text(&imported));
    let said = text(&imported);
    for kind in [
        "tombstones",
        "audit_cut",
        "identity_expiry",
        "mesh_records",
        "retention_counters",
    ] {
        assert!(said.contains(kind), "{kind}: {said}");
    }

    let cut = on_sled.audit_cut.clone().unwrap();
    let verify = pg_admin(&url, work.path(), &key_dir, &["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        text(&verify).contains(&format!(" from entry {} ", cut.first_kept)),
        "verified from the signed cut: {}",
        text(&verify)
    );
    let pg = {
        let (k, url) = (key_dir.clone(), url.clone());
        TestGateway::start_with(
            move |c| {
                use_postgres(c, &url);
                keys(c, &k);
                short_retention(c);
            },
            Arc::new(clock.clone()),
        )
        .await
    };
    moved_whole(&pg, &kept, &on_sled).await;
    retention_carries_on(&pg, &clock, kept.gone).await;
    let verify = pg_admin(&url, work.path(), &key_dir, &["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    pg.stop().await;
}

/// PostgreSQL's own pass takes over where sled left off: the identity
/// check carried comes due a metadata period after the removal, and the
/// tombstone goes after the tombstone period, when Track answers as for a
/// handover never issued.
async fn retention_carries_on(
    pg: &TestGateway,
    clock: &throughcare::store::ManualClock,
    gone: u64,
) {
    const DAY_MS: i64 = 86_400_000;
    clock.advance(600_000);
    let pass = pg.store.retention().await.unwrap();
    assert_eq!(pass.identities_removed, 1, "{pass:?}");
    assert_eq!(pass.tombstones_removed, 0, "{pass:?}");
    clock.advance(366 * DAY_MS);
    let pass = pg.store.retention().await.unwrap();
    assert_eq!(pass.tombstones_removed, 1, "{pass:?}");
    let err = pg
        .client("YP001")
        .await
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::HandoverId(gone)),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "UNKNOWN_HANDOVER");
}

/// On PostgreSQL after the move: Track answers from the tombstone, the
/// MESH record and the PDS finding are there, and the retention counters,
/// identity checks and audit cut read as on sled.
async fn moved_whole(pg: &TestGateway, kept: &Kept, on_sled: &throughcare::store::RetentionStats) {
    let cut = on_sled.audit_cut.clone().unwrap();
    let mut prison = pg.client("YP001").await;
    for key in [
        pb::track_request::Handover::MessageId("gone-1".into()),
        pb::track_request::Handover::HandoverId(kept.gone),
    ] {
        let err = prison
            .track(pb::TrackRequest {
                handover: Some(key),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), reason(&err)),
            (tonic::Code::NotFound, "REMOVED_UNDER_RETENTION".to_owned())
        );
    }
    assert_eq!(
        pg.store.mesh_record(kept.mesh.delivery_id).unwrap(),
        Some(kept.mesh.clone()),
        "the MESH send in flight: the edge asks MESH by its local id"
    );
    let parked = pg.store.delivery(kept.parked).unwrap().unwrap();
    assert_eq!(parked.pds, Some(kept.finding.clone()));
    let on_pg = pg.store.retention_stats().await.unwrap();
    assert_eq!(
        (
            on_pg.payloads_shredded,
            on_pg.metadata_removed,
            on_pg.tombstones,
            on_pg.identities_expiring,
            on_pg.identity_records_removed,
            on_pg.audit_entries_removed,
            on_pg.audit_cut.as_ref(),
        ),
        (
            on_sled.payloads_shredded,
            on_sled.metadata_removed,
            on_sled.tombstones,
            on_sled.identities_expiring,
            on_sled.identity_records_removed,
            on_sled.audit_entries_removed,
            Some(&cut),
        ),
        "{on_pg:?} against {on_sled:?}"
    );
}

/// A sled store from before retention and identity expiry existed, whose
/// one-off looks are still under way (made so here by removing what they
/// wrote from the stopped store): the export does what those looks would
/// have done, since PostgreSQL finds due work from the records only. Each
/// finished handover carries when it finished, and a patient left with
/// nothing tracked gets an identity check. No database needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_finishes_sleds_one_off_retention_looks() {
    let work = tempfile::tempdir().unwrap();
    let key_dir = work.path().join("keys");
    let (sled, clock) = {
        let k = key_dir.clone();
        TestGateway::start_manual(move |c| {
            keys(c, &k);
            short_retention(c);
        })
        .await
    };
    leave_state(&sled, &clock).await;
    // Delivered after the pass: finished, and held.
    for who in ["YG001", "YPR01"] {
        assert!(!pull_and_ack(&mut sled.client(who).await).await.is_empty());
    }
    let data = sled.config.data_dir.clone();
    let (_kept_dir, _) = sled.stop().await;
    let (finished, orphan) = {
        let db = crate::support::open_sled(&data.join("sled"));
        let handovers = db.open_tree("handovers").unwrap();
        let mut finished = std::collections::BTreeMap::new();
        for kv in handovers.iter() {
            let (k, v) = kv.unwrap();
            let mut h: serde_json::Value = serde_json::from_slice(&v).unwrap();
            let id = h["id"].as_u64().unwrap();
            finished.insert(id, h["finished_at_ms"].as_i64());
            h["finished_at_ms"] = serde_json::Value::Null;
            handovers
                .insert(k, serde_json::to_vec(&h).unwrap())
                .unwrap();
        }
        let retention = db.open_tree("retention").unwrap();
        let mut orphan = None;
        for kv in retention.iter() {
            let (k, v) = kv.unwrap();
            if k[8] == b'i' {
                orphan = Some(String::from_utf8(v.to_vec()).unwrap());
                retention.remove(k).unwrap();
            }
        }
        let meta = db.open_tree("meta").unwrap();
        meta.remove("retention_backfill").unwrap();
        meta.remove("identity_backfill").unwrap();
        db.flush().unwrap();
        (finished, orphan.expect("sled scheduled an identity check"))
    };
    assert!(finished.values().any(Option::is_some), "{finished:?}");
    assert!(finished.values().any(Option::is_none), "{finished:?}");
    let file = work.path().join("store.export");
    let exported = sled_admin(
        &data,
        &key_dir,
        &["export", "--out", file.to_str().unwrap()],
    );
    assert!(exported.status.success(), "{}", text(&exported));
    let mut carried = std::collections::BTreeMap::new();
    let mut checks = Vec::new();
    for line in std::fs::read_to_string(&file).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["kind"].as_str() {
            Some("handover") => {
                let r = &v["record"];
                carried.insert(r["id"].as_u64().unwrap(), r["finished_at_ms"].as_i64());
            }
            Some("identity_expiry") => checks.push(v["patient_key"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
    assert_eq!(carried, finished, "when each finished, as sled recorded it");
    assert_eq!(checks, [orphan], "the patient left with nothing tracked");
}
