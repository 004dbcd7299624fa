//! PDS end to end: the real gateway with `[pds]` pointing at the PDS test
//! double (`tests/python/pds_double.py`, written from the published PDS
//! FHIR API and the NHS API platform's signed-JWT pattern), started here on
//! 127.0.0.1 with the venv's python (`tests/run` makes the venv).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use throughcare::config::Config;
use throughcare::grpc::pb;
use throughcare::pds::PdsConfig;
use throughcare::store::{PARKED_MAILBOX, SystemClock};

use crate::support::{Engine, TestGateway, nhs, pull};

const API_KEY: &str = "test-api-key-not-a-secret";
const KID: &str = "throughcare-test-1";

/// The double, killed (by its pid) when dropped.
struct Double {
    child: Child,
    port: u16,
    key: PathBuf,
    scenarios: Value,
}

impl Drop for Double {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python")
}

impl Double {
    fn start(dir: &Path) -> Double {
        let key = dir.join("pds-private-key.pem");
        let mut child = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/pds_double.py"))
            .args(["--api-key", API_KEY, "--kid", KID, "--key-out"])
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the PDS double starts (run tests/run once to make target/venv)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line).expect("the double says where it listens");
        Double {
            child,
            port: u16::try_from(ready["port"].as_u64().unwrap()).unwrap(),
            key,
            scenarios: ready["scenarios"].clone(),
        }
    }

    /// Patients `first..first + n` of the test support's, registered at `practice`.
    fn registered(&self, first: u32, n: u32, practice: &str) -> Vec<String> {
        let patients: Vec<String> = (first..first + n).map(nhs).collect();
        let table: serde_json::Map<String, Value> = patients
            .iter()
            .map(|p| (p.clone(), json!({"practice": practice})))
            .collect();
        self.control(&json!({ "patients": table }));
        patients
    }

    fn scenario(&self, scenario: &str) -> String {
        self.scenarios[scenario].as_str().unwrap().to_owned()
    }

    fn http(&self, method: &str, body: &str) -> Value {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "{method} /_control HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap()
    }

    fn control(&self, change: &Value) {
        self.http("POST", &change.to_string());
    }

    fn seen(&self) -> Value {
        self.http("GET", "")
    }

    /// Lookups of patients the double has answered or refused.
    fn patient_requests(&self) -> usize {
        requests(&self.seen(), "/Patient/").len()
    }

    /// `[pds]` pointing at this double, fast enough for a test.
    fn config(&self, dir: &Path) -> PdsConfig {
        let api_key = dir.join("pds-api-key");
        std::fs::write(&api_key, API_KEY).unwrap();
        let base = format!("http://127.0.0.1:{}", self.port);
        PdsConfig {
            enabled: true,
            base_url: format!("{base}/personal-demographics/FHIR/R4"),
            token_url: format!("{base}/oauth2/token"),
            api_key_file: Some(api_key),
            private_key_file: Some(self.key.clone()),
            key_id: KID.into(),
            timeout_ms: 2_000,
            max_retries: 1,
            retry_backoff_ms: 50,
            poll_interval_ms: 100,
            recheck_after_seconds: 1,
            max_recheck_after_seconds: 2,
            breaker_failures: 3,
            breaker_open_ms: 500,
            ..PdsConfig::default()
        }
    }
}

fn requests(seen: &Value, containing: &str) -> Vec<Value> {
    seen["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r[1].as_str().unwrap().contains(containing))
        .cloned()
        .collect()
}

async fn gateway(double: &Double, tweak: impl FnOnce(&mut PdsConfig)) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mut pds = double.config(dir.path());
    tweak(&mut pds);
    let config = Config {
        data_dir: dir.path().join("data"),
        certs_dir: dir.path().join("certs"),
        shutdown_grace_ms: 2_000,
        dev_certs: true,
        metrics: throughcare::config::MetricsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        pds,
        ..Config::default()
    };
    TestGateway::start_in(dir, config, Arc::new(SystemClock)).await
}

/// A release from YP001 of the patient with NHS number `nhs`, born `dob`,
/// with no GP known: parked.
fn release(message_id: &str, nhs: &str, dob: &str) -> pb::SubmitRequest {
    let mut summary = throughcare::clinical::synthetic::release_summary(
        Some(nhs.parse().unwrap()),
        None,
        "YP001".parse().unwrap(),
        None,
        message_id,
    );
    summary.patient.date_of_birth = dob.parse().unwrap();
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: pb::JourneyEvent::Release.into(),
        patient: None,
        destinations: Vec::new(),
        document: Some(pb::submit_request::Document::Native(
            throughcare::grpc::summary::to_wire(&summary),
        )),
    }
}

/// Submits and returns the parked delivery's id.
async fn park(gw: &TestGateway, message_id: &str, nhs: &str, dob: &str) -> u64 {
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(release(message_id, nhs, dob))
        .await
        .unwrap()
        .into_inner();
    receipt
        .deliveries
        .iter()
        .find(|d| d.destination == PARKED_MAILBOX)
        .expect("parked")
        .delivery_id
}

async fn parked(gw: &TestGateway) -> pb::ListParkedResponse {
    gw.operator()
        .await
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// Waits for PDS's finding on delivery `id` (it stays parked).
async fn finding(gw: &TestGateway, id: u64) -> pb::list_parked_response::PdsFinding {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = parked(gw).await;
        if let Some(f) = list.pds_findings.iter().find(|f| f.delivery_id == id) {
            assert!(list.deliveries.iter().any(|d| d.delivery_id == id));
            return f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no PDS finding for {id}: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pulls from `practice` until `n` deliveries arrived (acked), or fails.
async fn arrivals(
    gw: &TestGateway,
    practice: &str,
    n: usize,
    within: Duration,
) -> Vec<pb::Delivery> {
    let mut client = gw.client(practice).await;
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "{practice} got {} of {n}",
            got.len()
        );
        let batch = client.pull(pull(10)).await.unwrap().into_inner().deliveries;
        for d in batch {
            client
                .ack(pb::AckRequest {
                    delivery_id: d.delivery_id,
                    attempt: d.attempt,
                })
                .await
                .unwrap();
            got.push(d);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

/// A release PDS routes gives the practice, as a claim does, the transfer
/// summary the releasing prison (YP001) never acknowledged: the patient
/// came from YP002 on methadone titrated there (hazard log H01 #9a).
#[tokio::test]
async fn a_release_pds_routes_gives_the_practice_what_the_prison_never_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let patient = double.scenario("registered");
    let gw = gateway(&double, |_| {}).await;
    let mut s = throughcare::clinical::synthetic::release_summary(
        Some(patient.parse().unwrap()),
        None,
        "YP002".parse().unwrap(),
        None,
        "titrated at Ashdown",
    );
    s.patient.date_of_birth = "1985-06-15".parse().unwrap();
    s.custody.transfer_to = Some("YP001".parse().unwrap());
    s.custody.transfer_at = Some("2030-01-01T09:00:00Z".parse().unwrap());
    s.custody.release_date = None;
    let transfer =
        throughcare::cli::client::native_submit("t-pds", pb::JourneyEvent::Transfer, &[], &s);
    gw.client("YP002").await.submit(transfer).await.unwrap();
    park(&gw, "pds-routed-2", &patient, "1985-06-15").await;

    let got = arrivals(&gw, "YG002", 2, Duration::from_secs(15)).await;
    let mut events: Vec<pb::JourneyEvent> = got.iter().map(pb::Delivery::event).collect();
    events.sort_unstable();
    assert_eq!(
        events,
        [pb::JourneyEvent::Transfer, pb::JourneyEvent::Release],
        "{got:?}"
    );
    let trail = gw.store.audit_entries().unwrap();
    let forward = trail
        .iter()
        .find(|e| e.action == "forward")
        .expect("the transfer summary went on, audited");
    assert_eq!(forward.actor, "urn:gateway:routing");
    let mut prison = gw.client("YP001").await;
    let left = prison.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert!(left.is_empty(), "nothing left at the prison: {left:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_parked_release_reaches_the_practice_pds_names_with_no_claim() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    // The first call (the token request) is throttled and the first read
    // of the patient fails: both retried within the one lookup, not lost.
    let patient = double.scenario("registered");
    double.control(&json!({"throttle": 1, "flaky": {patient.clone(): 1}}));
    let gw = gateway(&double, |pds| pds.max_retries = 3).await;
    let id = park(&gw, "pds-routed-1", &patient, "1985-06-15").await;

    let got = arrivals(&gw, "YG002", 1, Duration::from_secs(15)).await;
    assert_eq!(got[0].delivery_id, id);
    assert!(parked(&gw).await.deliveries.is_empty());

    let record = gw.store.delivery(id).unwrap().unwrap();
    assert_eq!(record.claimed_by.as_deref(), Some("service:pds"));
    // What a view rendered now may say of the GP registration.
    let handover = gw.store.handover(record.handover_id).unwrap().unwrap();
    let found = throughcare::pds::registration::registration_found(&gw.store, &handover).unwrap();
    assert_eq!(
        found.map(|c| c.as_str().to_owned()).as_deref(),
        Some("YG002")
    );
    // Probation's view, rendered after PDS routed the release, says the GP
    // registration is in place (the prison sent none).
    let probation = arrivals(&gw, "YPR01", 1, Duration::from_secs(5)).await;
    let Some(pb::delivery::Document::Native(view)) = &probation[0].document else {
        panic!("probation's registered format is native");
    };
    assert_eq!(view.registered_gp, "YG002");
    let audit = gw.store.audit_entries().unwrap();
    let claim = audit
        .iter()
        .find(|e| e.action == "claim" && e.delivery_id == Some(id))
        .expect("the automatic claim is audited");
    assert_eq!(claim.actor, "service:pds");
    assert!(claim.outcome.contains("source: PDS"), "{:?}", claim);
    // The NHS number left for PDS only after that was audited, with the
    // patient: the request comes before the finding in the trail.
    let request = audit
        .iter()
        .find(|e| e.action == "pds_request" && e.delivery_id == Some(id))
        .expect("the request to PDS is audited");
    assert_eq!(
        request.patient_key.as_deref(),
        Some(record.patient_key.as_str())
    );
    assert!(request.seq < claim.seq, "{request:?} {claim:?}");
    assert!(
        !audit
            .iter()
            .any(|e| e.action == "claim" && e.actor != "service:pds"),
        "nobody claimed it by hand"
    );

    // The real API's shape: a signed JWT bought a token (the double checked
    // its claims and signature), and every lookup carried a UUID X-Request-ID
    // and the organisation it serves.
    let seen = double.seen();
    assert!(seen["token_requests"].as_u64().unwrap() >= 2, "{seen}");
    assert!(seen["refusals"].as_array().unwrap().is_empty(), "{seen}");
    let lookups = requests(&seen, "/Patient/");
    assert_eq!(lookups.len(), 2, "a failed read and its retry: {seen}");
    for r in &lookups {
        assert!(uuid::Uuid::parse_str(r[2].as_str().unwrap()).is_ok(), "{r}");
        // A client serving many organisations names the one served: the
        // prison that sent the release.
        assert_eq!(r[3], "YP001", "NHSD-End-User-Organisation-ODS: {r}");
    }
    assert_eq!(
        lookups[0][2], lookups[1][2],
        "a retry re-sends its X-Request-ID"
    );
    let metrics = gw.metrics.encode();
    assert!(
        metrics.contains(r#"throughcare_pds_lookups_total{outcome="routed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "throughcare_pds_breaker_open 0"),
        "{metrics}"
    );
}

/// Releases whose identity PDS does not confirm: (message id, NHS number,
/// date of birth, finding, practice named).
fn unverified_cases(
    double: &Double,
) -> [(
    &'static str,
    String,
    &'static str,
    &'static str,
    &'static str,
); 7] {
    [
        (
            "pds-dob",
            double.scenario("registered"),
            "1985-06-16",
            "DOB_MISMATCH",
            "",
        ),
        (
            "pds-old",
            double.scenario("old_number"),
            "1985-06-15",
            "SUPERSEDED_NHS_NUMBER",
            "",
        ),
        (
            "pds-dead",
            double.scenario("deceased"),
            "1985-06-15",
            "DECEASED",
            "",
        ),
        (
            "pds-away",
            double.scenario("not_connected"),
            "1985-06-15",
            "NOT_CONNECTED",
            "Y12345",
        ),
        (
            "pds-none",
            double.scenario("no_practice"),
            "1985-06-15",
            "NO_PRACTICE",
            "",
        ),
        (
            "pds-gone",
            double.scenario("invalidated"),
            "1985-06-15",
            "NOT_FOUND",
            "",
        ),
        // PDS refuses the number itself (400 INVALID_RESOURCE_ID): it was
        // looked up again and again, with no finding an operator could see.
        (
            "pds-refused",
            double.scenario("refused_id"),
            "1985-06-15",
            "NOT_FOUND",
            "",
        ),
    ]
}

#[tokio::test]
async fn an_unverified_identity_stays_parked_and_visible_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let gw = gateway(&double, |_| {}).await;
    let cases = unverified_cases(&double);
    let mut ids = Vec::new();
    for (message_id, nhs, dob, _, _) in &cases {
        ids.push(park(&gw, message_id, nhs, dob).await);
    }
    for (id, (_, _, _, status, practice)) in ids.iter().zip(&cases) {
        let f = finding(&gw, *id).await;
        assert_eq!(
            (f.status.as_str(), f.practice.as_str()),
            (*status, *practice),
            "{f:?}"
        );
    }
    let away = finding(&gw, ids[3]).await;
    assert_eq!(away.reason, "registered at Y12345, not connected");
    let registered_elsewhere = |id: u64| {
        let d = gw.store.delivery(id).unwrap().unwrap();
        let h = gw.store.handover(d.handover_id).unwrap().unwrap();
        throughcare::pds::registration::registration_found(&gw.store, &h)
            .unwrap()
            .map(|c| c.as_str().to_owned())
    };
    assert_eq!(registered_elsewhere(ids[3]).as_deref(), Some("Y12345"));
    assert_eq!(
        registered_elsewhere(ids[0]),
        None,
        "a doubtful identity says nothing"
    );
    assert!(away.next_check_at.is_some(), "looked up again later");
    assert!(
        finding(&gw, ids[0]).await.next_check_at.is_none(),
        "a person decides"
    );
    // Nothing reached the practice PDS names for the mismatched date of birth.
    let mut gp = gw.client("YG002").await;
    assert!(
        gp.pull(pull(10))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );
    assert_eq!(parked(&gw).await.deliveries.len(), cases.len());
    // The dashboard shows the reason too, but not the practice: it is
    // neither authenticated nor audited (ListParked, audited, names it).
    let page = dashboard(&gw).await;
    assert!(
        page.contains("registered at a practice, not connected"),
        "{page}"
    );
    assert!(!page.contains("Y12345"), "{page}");
}

async fn dashboard(gw: &TestGateway) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.metrics_addr)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).await.unwrap();
    page
}

#[tokio::test]
async fn a_restricted_record_never_reveals_its_practice() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let nhs = double.scenario("restricted");
    // Even were PDS to leave the practice in (it removes it), and the
    // practice on the network, a restricted record never routes or shows it.
    double.control(&json!({"patients": {nhs.clone(): {"practice": "YG002", "security": "R"}}}));
    let gw = gateway(&double, |_| {}).await;
    let id = park(&gw, "pds-restricted", &nhs, "1985-06-15").await;
    let f = finding(&gw, id).await;
    assert_eq!(f.status, "RESTRICTED");
    assert_eq!(f.practice, "");
    assert!(!f.reason.contains("YG002"), "{f:?}");
    let record = gw.store.delivery(id).unwrap().unwrap();
    let handover = gw.store.handover(record.handover_id).unwrap().unwrap();
    assert_eq!(
        throughcare::pds::registration::registration_found(&gw.store, &handover).unwrap(),
        None
    );
    assert_eq!(record.pds.unwrap().practice, None);
    for e in gw.store.audit_entries().unwrap() {
        assert!(!e.outcome.contains("YG002"), "{:?}", e);
    }
    assert!(!dashboard(&gw).await.contains("YG002"));
    let mut gp = gw.client("YG002").await;
    assert!(
        gp.pull(pull(10))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );
}

#[tokio::test]
async fn pds_down_for_a_while_loses_nothing_and_routes_once_back() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    double.control(&json!({"down": true}));
    let gw = gateway(&double, |_| {}).await;
    let mut ids = Vec::new();
    for (i, patient) in double.registered(700, 3, "YG002").iter().enumerate() {
        ids.push(park(&gw, &format!("pds-down-{i}"), patient, "1985-06-15").await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = parked(&gw).await;
    assert_eq!(still.deliveries.len(), 3, "all wait while PDS is down");
    assert!(still.pds_findings.is_empty(), "an outage is not a finding");

    double.control(&json!({"down": false}));
    let back = Instant::now();
    let got = arrivals(&gw, "YG002", 3, Duration::from_secs(15)).await;
    eprintln!(
        "3 parked releases routed {:?} after PDS came back",
        back.elapsed()
    );
    let mut arrived: Vec<u64> = got.iter().map(|d| d.delivery_id).collect();
    arrived.sort_unstable();
    assert_eq!(arrived, ids);
    assert!(parked(&gw).await.deliveries.is_empty());
}

/// A 404 or 400 that is not PDS's answer about the patient (here a wrong
/// `base_url`: the platform's "Invalid URL") fails every lookup alike. It
/// opens the breaker; it marked every parked release "PDS has no patient
/// with this NHS number" and alerted nobody.
#[tokio::test]
async fn a_wrong_base_url_is_an_outage_not_a_patient_pds_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let gw = gateway(&double, |pds| {
        pds.base_url = pds.base_url.replace("/FHIR/R4", "/FHIR/R3");
        pds.breaker_failures = 2;
        pds.breaker_open_ms = 60_000;
    })
    .await;
    let patients = double.registered(820, 3, "YG002");
    for (i, patient) in patients.iter().enumerate() {
        park(&gw, &format!("pds-wrong-url-{i}"), patient, "1985-06-15").await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !breaker_open(&gw) {
        assert!(Instant::now() < deadline, "{}", gw.metrics.encode());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let list = parked(&gw).await;
    assert_eq!(list.deliveries.len(), 3);
    for f in &list.pds_findings {
        assert_ne!(
            f.status, "NOT_FOUND",
            "a platform 404 read as no such patient"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn the_breaker_opens_and_submits_are_not_slowed() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    // Every answer takes longer than the client waits.
    double.control(&json!({"delay_ms": 1_500}));
    let gw = gateway(&double, |pds| {
        pds.timeout_ms = 300;
        pds.breaker_failures = 3;
        pds.breaker_open_ms = 60_000;
    })
    .await;
    let mut slowest = Duration::ZERO;
    for (i, patient) in double.registered(800, 12, "YG002").iter().enumerate() {
        let started = Instant::now();
        park(&gw, &format!("pds-breaker-{i}"), patient, "1985-06-15").await;
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eprintln!("slowest of 12 submits while every PDS answer took 1.5 s: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "a submit took {slowest:?} while PDS was slow"
    );
    // Three failed lookups (a try and a retry each) opened the breaker:
    // twelve parked releases due, and PDS is left alone.
    let opened = double.seen()["requests"].as_array().unwrap().len();
    assert!(opened <= 6, "{opened} requests reached PDS");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(double.seen()["requests"].as_array().unwrap().len(), opened);
    assert_eq!(
        double.patient_requests(),
        0,
        "the token never came back in time"
    );
    assert!(breaker_open(&gw), "{}", gw.metrics.encode());
    let metrics = gw.metrics.encode();
    assert!(
        metrics.contains(r#"throughcare_pds_lookups_total{outcome="failed"} 3"#),
        "{metrics}"
    );
    assert_eq!(parked(&gw).await.deliveries.len(), 12, "nothing lost");
}

#[tokio::test]
async fn a_pds_section_without_its_key_refuses_to_start_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let mut pds = double.config(dir.path());
    pds.private_key_file = Some(dir.path().join("absent.pem"));
    let config = Config {
        data_dir: dir.path().join("data"),
        certs_dir: dir.path().join("certs"),
        dev_certs: true,
        pds,
        ..Config::default()
    };
    let err = throughcare::app::Prepared::new(config.clone(), Arc::new(SystemClock))
        .err()
        .expect("refused");
    assert_eq!(err.exit_code(), throughcare::config::EXIT_CONFIG);
    assert!(err.to_string().contains("pds.private_key_file"), "{err}");
    // A key that is not an RSA key: refused, and its content never echoed.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "SECRET-MATERIAL-XYZ").unwrap();
    let mut config = config;
    config.pds.private_key_file = Some(junk);
    let err = throughcare::app::Prepared::new(config, Arc::new(SystemClock))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("pds.private_key_file"), "{err}");
    assert!(!err.to_string().contains("SECRET-MATERIAL-XYZ"), "{err}");
}

/// An admission at YP001 of the patient with NHS number `nhs`, born
/// `dob`, whose summary names no GP: it goes to nobody at submit.
fn admission(message_id: &str, nhs: &str, dob: &str) -> pb::SubmitRequest {
    let mut summary = throughcare::clinical::synthetic::release_summary(
        Some(nhs.parse().unwrap()),
        None,
        "YP001".parse().unwrap(),
        None,
        "admission",
    );
    summary.patient.date_of_birth = dob.parse().unwrap();
    summary.custody.release_date = None;
    summary.custody.release_address = None;
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: pb::JourneyEvent::Admission.into(),
        patient: None,
        destinations: Vec::new(),
        document: Some(pb::submit_request::Document::Native(
            throughcare::grpc::summary::to_wire(&summary),
        )),
    }
}

#[tokio::test]
async fn an_admission_with_no_gp_notifies_the_practice_pds_names() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let gw = gateway(&double, |_| {}).await;
    let mut prison = gw.client("YP001").await;
    let checked = double.registered(900, 2, "YG002");
    let sent = prison
        .submit(admission("pds-adm-1", &checked[0], "1985-06-15"))
        .await
        .unwrap()
        .into_inner();
    assert!(sent.deliveries.is_empty(), "no GP known at submit");
    // Another patient whose date of birth differs from PDS's: no notice.
    prison
        .submit(admission("pds-adm-2", &checked[1], "1985-06-16"))
        .await
        .unwrap();
    let got = arrivals(&gw, "YG002", 1, Duration::from_secs(15)).await;
    assert_eq!(got[0].handover_id, sent.handover_id);
    assert_eq!(got[0].event(), pb::JourneyEvent::Admission);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut gp = gw.client("YG002").await;
    assert!(
        gp.pull(pull(10))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );
    let audit = gw.store.audit_entries().unwrap();
    assert!(audit.iter().any(|e| e.action == "route"
        && e.actor == "service:pds"
        && e.handover_id == Some(sent.handover_id)));
    assert!(
        audit
            .iter()
            .any(|e| e.action == "pds_lookup" && e.outcome.contains("date of birth differs"))
    );
    assert!(
        audit
            .iter()
            .any(|e| e.action == "pds_request" && e.handover_id == Some(sent.handover_id)),
        "the admission's request to PDS is audited"
    );
}

/// A store with one parked release (claim key `ck-<message_id>`); its delivery id.
async fn parked_in(store: &throughcare::store::Store, message_id: &str) -> u64 {
    use throughcare::store::{NewDelivery, NewHandover, PatientIds};
    let outcome = store
        .submit(NewHandover {
            actor: "urn:ods:YP001".into(),
            sender: "YP001".into(),
            message_id: message_id.into(),
            event: throughcare::journey::JourneyEvent::Release,
            patient: PatientIds {
                nhs: Some(format!("nhs-{message_id}")),
                prison: None,
                dob: None,
            },
            claim_keys: vec![format!("ck-{message_id}")],
            requested_destinations: Vec::new(),
            destinations: vec![NewDelivery {
                mailbox: PARKED_MAILBOX.into(),
                view: "full".into(),
                ..NewDelivery::default()
            }],
            payload: message_id.as_bytes().to_vec(),
            supersede: true,
            trace_parent: None,
            authored_at_ms: None,
            withdrawal: None,
            episode: None,
            movement: None,
            movement_as_written: None,
        })
        .await
        .unwrap();
    outcome.deliveries[0].1
}

#[tokio::test]
async fn a_pds_answer_never_undoes_a_claim_nor_stores_a_restricted_practice() {
    use throughcare::store::{PdsFinding, PdsResult, PdsStatus, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("data"),
        StoreOptions::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let finding = |status, practice: &str| PdsFinding {
        status,
        practice: Some(practice.into()),
        checked_at_ms: 0,
        next_check_ms: None,
        lookups: 1,
    };
    // An operator claimed it while PDS was being asked: PDS's answer is dropped.
    let claimed = parked_in(&store, "m1").await;
    let moved = store
        .claim(
            "urn:operator:oncall",
            vec!["ck-m1".into()],
            ("YG001", "no evidence given"),
        )
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    let late = store
        .pds_result(PdsResult {
            delivery_id: claimed,
            finding: finding(PdsStatus::Routed, "YG002"),
            route_to: Some("YG002".into()),
        })
        .await
        .unwrap();
    assert!(late.is_none());
    let d = store.delivery(claimed).unwrap().unwrap();
    assert_eq!((d.mailbox.as_str(), d.pds), ("YG001", None));
    // A restricted finding never keeps a practice, whatever the caller passes.
    let restricted = parked_in(&store, "m2").await;
    store
        .pds_result(PdsResult {
            delivery_id: restricted,
            finding: finding(PdsStatus::Restricted, "YG002"),
            route_to: None,
        })
        .await
        .unwrap()
        .expect("still parked");
    let d = store.delivery(restricted).unwrap().unwrap();
    assert_eq!(d.mailbox, PARKED_MAILBOX);
    assert_eq!(d.pds.unwrap().practice, None);
    store.close().await.unwrap();
}

/// The real binary with `[pds]` on and debug logs: the alert for a practice
/// not on the network is logged; no NHS number, date of birth, key, JWT or
/// token is, whatever the level.
#[tokio::test]
async fn the_binary_logs_pds_alerts_and_never_patient_data_or_keys() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let pds = double.config(dir.path());
    let mut config = toml::Table::new();
    config.insert(
        "pds".into(),
        toml::Value::try_from(&pds).expect("the [pds] section serialises"),
    );
    let config_path = dir.path().join("throughcare.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let port = crate::support::free_port();
    let log_path = dir.path().join("gateway.log");
    let certs = dir.path().join("certs");
    let mut server = Command::new(env!("CARGO_BIN_EXE_throughcare"))
        .args(["--log-json", "serve", "--dev-certs", "--config"])
        .arg(&config_path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(&certs)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .spawn()
        .unwrap();
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
    let patients = [
        double.scenario("not_connected"),
        double.scenario("registered"),
    ];
    for (i, p) in patients.iter().enumerate() {
        prison
            .submit(release(&format!("pds-log-{i}"), p, "1985-06-15"))
            .await
            .unwrap();
    }
    let mut op = throughcare::cli::client::operator(&endpoint, &certs, "operator-oncall")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = op
            .list_parked(pb::ListParkedRequest::default())
            .await
            .unwrap()
            .into_inner();
        if list.deliveries.len() == 1 && list.pds_findings.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = server.kill();
    let _ = server.wait();

    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| l["fields"]["alert"] == "pds_practice_not_connected"),
        "the alert is logged"
    );
    for p in &patients {
        assert!(!text.contains(p.as_str()), "an NHS number in the log");
    }
    let key = std::fs::read_to_string(&double.key).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    for secret in [API_KEY, key_line, "1985-06-15", "Bearer ", "eyJ"] {
        assert!(!text.contains(secret), "{secret} in the log");
    }
}

/// A gateway node with `[pds]` on PostgreSQL database `url`, with the key
/// files in `keys` (the same for every node).
async fn pg_gateway(double: &Double, url: &str, keys: &Path, recheck_seconds: u64) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let pds = PdsConfig {
        recheck_after_seconds: recheck_seconds,
        max_recheck_after_seconds: recheck_seconds * 2,
        ..double.config(dir.path())
    };
    let mut config = Config {
        data_dir: dir.path().join("data"),
        certs_dir: dir.path().join("certs"),
        shutdown_grace_ms: 2_000,
        dev_certs: true,
        metrics: throughcare::config::MetricsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        pds,
        master_key_file: Some(keys.join("master-key")),
        patient_key_file: Some(keys.join("patient-key")),
        ..Config::default()
    };
    config.integrity.audit_key_file = Some(keys.join("audit-key"));
    crate::support::use_postgres(&mut config, url);
    TestGateway::start_in(dir, config, Arc::new(SystemClock)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pds_on_postgres_routes_a_parked_release_and_an_admission_to_the_practice() {
    let Some(url) = crate::support::postgres_database("PDS on PostgreSQL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let gw = pg_gateway(&double, &url, &dir.path().join("keys"), 1).await;
    let patient = double.scenario("registered");
    let id = park(&gw, "pds-pg-rel", &patient, "1985-06-15").await;
    let checked = double.registered(930, 1, "YG002");
    let admitted = gw
        .client("YP001")
        .await
        .submit(admission("pds-pg-adm", &checked[0], "1985-06-15"))
        .await
        .unwrap()
        .into_inner();
    assert!(admitted.deliveries.is_empty(), "no GP known at submit");
    let got = arrivals(&gw, "YG002", 2, Duration::from_secs(20)).await;
    let release = got
        .iter()
        .find(|d| d.delivery_id == id)
        .expect("the parked release");
    assert_eq!(release.event(), pb::JourneyEvent::Release);
    assert!(
        got.iter().any(|d| d.handover_id == admitted.handover_id),
        "the admission notice"
    );
    let record = gw.store.delivery(id).unwrap().unwrap();
    assert_eq!(record.claimed_by.as_deref(), Some("service:pds"));
    // The admission waited for its notice, and finished with it.
    let h = gw.store.handover(admitted.handover_id).unwrap().unwrap();
    assert_eq!(h.deliveries.len(), 1);
    assert!(h.finished_at_ms.is_some());
    let audit = gw.store.audit_entries().unwrap();
    for action in ["claim", "route"] {
        assert!(
            audit
                .iter()
                .any(|e| e.action == action && e.actor == "service:pds"),
            "{action}"
        );
    }
    gw.store.verify_audit().unwrap();
    gw.stop().await;
}

/// Two nodes with `[pds]` on one database: each parked release is looked
/// up (and its lookup audited) once, by one node or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pds_on_postgres_two_nodes_look_up_each_parked_release_once() {
    let Some(url) = crate::support::postgres_database("PDS on two nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let keys = dir.path().join("keys");
    // No recheck within the test: one lookup each is all there should be.
    let a = pg_gateway(&double, &url, &keys, 600).await;
    let b = pg_gateway(&double, &url, &keys, 600).await;
    let away = double.registered(940, 4, "Y12345");
    let mut ids = Vec::new();
    for (i, patient) in away.iter().enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        ids.push(park(node, &format!("pds-two-{i}"), patient, "1985-06-15").await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ids
        .iter()
        .any(|id| a.store.delivery(*id).unwrap().unwrap().pds.is_none())
    {
        assert!(Instant::now() < deadline, "every release looked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More rounds on both nodes: nothing is due again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let audit = a.store.audit_entries().unwrap();
    for id in &ids {
        let d = b.store.delivery(*id).unwrap().unwrap();
        let finding = d.pds.expect("looked up");
        assert_eq!(finding.status, throughcare::store::PdsStatus::NotConnected);
        let recorded = audit
            .iter()
            .filter(|e| e.action == "pds_lookup" && e.delivery_id == Some(*id))
            .count();
        assert_eq!((finding.lookups, recorded), (1, 1), "delivery {id}");
    }
    assert_eq!(double.patient_requests(), away.len(), "one PDS read each");
    a.store.verify_audit().unwrap();
    a.stop().await;
    b.stop().await;
}

/// One record whose answer cannot be read (a fault about that patient,
/// while PDS answers) must not open the breaker for every other parked
/// release: it was due again every round and each failure counted, so the
/// breaker opened within a second and kept the others waiting. Now only
/// PDS-wide failures (time-outs, no connection, 429, 5xx) count, and a
/// release whose lookup failed waits longer each time.
#[tokio::test]
async fn one_record_pds_cannot_answer_holds_up_no_other_release() {
    let dir = tempfile::tempdir().unwrap();
    let double = Double::start(dir.path());
    let unreadable = double.scenario("unreadable");
    let gw = gateway(&double, |pds| {
        pds.max_retries = 0;
        pds.breaker_failures = 3;
        pds.breaker_open_ms = 60_000;
    })
    .await;
    let asked = || requests(&double.seen(), &unreadable).len();
    park(&gw, "pds-unreadable-1", &unreadable, "1985-06-15").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked() == 0 {
        assert!(Instant::now() < deadline, "never looked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!breaker_open(&gw), "{}", gw.metrics.encode());
    assert!(asked() <= 2, "asked {} times in 1.5 s", asked());
    let registered = double.registered(900, 1, "YG002");
    let id = park(&gw, "pds-after-unreadable", &registered[0], "1985-06-15").await;
    let got = arrivals(&gw, "YG002", 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].delivery_id, id);
    assert_eq!(
        parked(&gw).await.deliveries.len(),
        1,
        "the unreadable one waits"
    );
}

/// Whether the breaker gauge reads 1 (its own line: the gauge's HELP text
/// says "1 while the PDS circuit breaker is open" too).
fn breaker_open(gw: &TestGateway) -> bool {
    gw.metrics
        .encode()
        .lines()
        .any(|l| l == "throughcare_pds_breaker_open 1")
}

#[tokio::test]
async fn admissions_already_answered_never_hide_older_ones_waiting() {
    admissions_already_answered_never_hide_older_ones_on(Engine::Sled).await;
}

#[tokio::test]
async fn admissions_already_answered_never_hide_older_ones_waiting_on_postgres() {
    admissions_already_answered_never_hide_older_ones_on(Engine::Postgres).await;
}

/// The lookups ask the store for admissions that went to nobody, passing
/// over those PDS already answered before the limit: before, the newest
/// `4 × batch` were read and the answered dropped afterwards, so a day
/// with more answered admissions than that hid every older one for good.
async fn admissions_already_answered_never_hide_older_ones_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let mut ids = Vec::new();
    for i in 0..4u32 {
        let r = prison
            .submit(admission(
                &format!("adm-skip-{i}"),
                &nhs(60 + i),
                "1985-06-15",
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(r.deliveries.is_empty());
        ids.push(r.handover_id);
    }
    let answered: std::collections::HashSet<u64> = ids[2..].iter().copied().collect();
    let waiting: Vec<u64> = gw
        .store
        .unrouted_admissions(0, &answered, 2)
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(waiting, [ids[1], ids[0]]);
    gw.stop().await;
}

#[tokio::test]
async fn an_admission_notice_is_never_sent_once_the_patient_is_released() {
    an_admission_notice_is_never_sent_once_released_on(Engine::Sled).await;
}

#[tokio::test]
async fn an_admission_notice_is_never_sent_once_the_patient_is_released_on_postgres() {
    an_admission_notice_is_never_sent_once_released_on(Engine::Postgres).await;
}

/// An admission that named no GP waits for PDS to name the practice. A
/// patient serving days is released before that answer comes: the notice,
/// sent then, told the practice its patient was in prison after the
/// release (and reached it after the release summary). Whoever released
/// them, and on either engine, no notice goes once a release (or a newer
/// admission) is known; one for a patient still inside does.
async fn an_admission_notice_is_never_sent_once_released_on(engine: Engine) {
    use throughcare::store::{NewDelivery, PdsNotice};
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let prison = gw.client("YP001").await;
    let mut releasing = prison.clone();
    let admitted = |message_id: &'static str, patient: u32| {
        let request = admission(message_id, &nhs(patient), "1985-06-15");
        let mut prison = prison.clone();
        async move {
            let r = prison.submit(request).await.unwrap().into_inner();
            assert!(r.deliveries.is_empty(), "no GP known at submit");
            r.handover_id
        }
    };
    let released = admitted("adm-then-out", 80).await;
    let still_inside = admitted("adm-inside", 81).await;
    releasing
        .submit(release("out-after-3-days", &nhs(80), "1985-06-15"))
        .await
        .unwrap();
    // Patient 82 was released before this admission; the release corrected
    // since is no release after it.
    releasing
        .submit(release("out-before", &nhs(82), "1985-06-15"))
        .await
        .unwrap();
    let back_inside = admitted("adm-back-inside", 82).await;
    releasing
        .submit(release("out-before-corrected", &nhs(82), "1985-06-15"))
        .await
        .unwrap();
    let notice = |handover_id| PdsNotice {
        handover_id,
        delivery: NewDelivery {
            mailbox: "YG002".into(),
            view: "admission_notice".into(),
            ..NewDelivery::default()
        },
    };
    assert_eq!(gw.store.pds_notify(notice(released)).await.unwrap(), None);
    for inside in [still_inside, back_inside] {
        let sent = gw.store.pds_notify(notice(inside)).await.unwrap();
        assert!(sent.is_some(), "handover {inside}");
    }
    let mut gp = gw.client("YG002").await;
    let got = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(
        got.iter().map(|d| d.handover_id).collect::<Vec<_>>(),
        [still_inside, back_inside]
    );
    gw.stop().await;
}
