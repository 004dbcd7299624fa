//! Claim brute force, through the real server over mutual TLS: a practice
//! that knows an NHS number cannot try dates of birth until one opens the
//! parked release. Failed claims are limited per practice and patient, the
//! lock holds for the right date of birth too, survives a restart, is
//! audited without patient data in clear, counted in the metrics; an
//! operator's claim with a reason is the way out.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use throughcare::grpc::pb;
use throughcare::store::SystemClock;
use tonic::Code;
use tonic_types::StatusExt;

const DOB: &str = "1985-06-15";

fn claim(patient: u32, dob: &str, registered: Option<&str>) -> pb::ClaimRequest {
    pb::ClaimRequest {
        patient: Some(pb::PatientRef {
            nhs_number: nhs(patient),
            prison_number: String::new(),
            date_of_birth: dob.into(),
        }),
        evidence: registered.map(|d| pb::ClaimEvidence {
            registration_date: d.into(),
        }),
    }
}

/// A wrong date of birth, one per try.
fn guess(i: u32) -> String {
    format!("1970-{:02}-{:02}", i / 28 + 1, i % 28 + 1)
}

async fn park(gw: &TestGateway, patient: u32) {
    let mut prison = gw.client("YP001").await;
    let r = prison
        .submit(release(&format!("park-{patient}"), patient, &[], "parked"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deliveries[0].destination, "@parked");
}

#[tokio::test]
async fn guessing_dates_of_birth_locks_the_pair_even_for_the_right_one_across_a_restart() {
    let gw = TestGateway::start().await;
    park(&gw, 41).await;
    let mut practice = gw.client("YG001").await;
    for i in 0..5 {
        let evidence = (i == 0).then_some("2026-01-05");
        let err = practice
            .claim(claim(41, &guess(i), evidence))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "try {i}: {err:?}");
    }
    // Locked: the right date of birth is refused too, with a delay and the way out.
    let locked = practice.claim(claim(41, DOB, None)).await.unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted, "{locked:?}");
    assert!(
        locked.message().contains("OperatorService.ClaimParked"),
        "{locked:?}"
    );
    let delay = locked
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo delay");
    assert!(delay > Duration::from_secs(23 * 3_600), "{delay:?}");

    // Every failure audited under its own action, with the patient keyed
    // and the evidence keyed; nothing of the patient in clear.
    let failures: Vec<_> = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "claim_failure")
        .collect();
    assert_eq!(failures.len(), 5);
    assert!(failures.iter().all(|e| e.actor == "urn:ods:YG001"));
    assert!(failures.iter().all(|e| e.patient_key.is_some()));
    assert!(
        failures[0]
            .outcome
            .contains("evidence: registration date (keyed ")
    );
    assert!(failures[1].outcome.contains("no evidence given"));
    assert!(
        failures[4]
            .outcome
            .contains("claims now locked: practice_and_patient")
    );
    // The claim refused while locked is on the same patient's trail: a
    // guesser who goes on guessing is seen there.
    let entries = gw.store.audit_entries().unwrap();
    let refused = entries
        .iter()
        .rfind(|e| e.action == "claim" && e.outcome.starts_with("refused: ResourceExhausted"))
        .expect("the locked claim audited");
    assert_eq!(refused.patient_key, failures[0].patient_key, "{refused:?}");
    let trail = serde_json::to_string(&gw.store.audit_entries().unwrap()).unwrap();
    for secret in [nhs(41).as_str(), DOB, "2026-01-05", "1970-01-01"] {
        assert!(!trail.contains(secret), "{secret} in the audit trail");
    }
    let metrics = gw.metrics.encode();
    assert!(
        metrics.contains("throughcare_claim_failures_total 5"),
        "{metrics}"
    );
    assert!(metrics.contains("throughcare_claim_lockouts_total{scope=\"practice_and_patient\"} 1"));
    assert!(
        metrics
            .contains("throughcare_claims_refused_locked_total{scope=\"practice_and_patient\"} 1")
    );

    // A restart does not reset the counters.
    let (dir, config) = gw.stop().await;
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let mut practice = gw.client("YG001").await;
    let err = practice.claim(claim(41, DOB, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // The way out: an operator claims it for the practice, with a reason.
    let mut op = gw.operator().await;
    let claimed = op
        .claim_parked(pb::ClaimParkedRequest {
            patient: claim(41, DOB, None).patient,
            practice: "YG001".into(),
            reason: "registration confirmed with the practice manager by phone".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .claimed;
    assert_eq!(claimed.len(), 1);
    let got = practice
        .pull(pull(10))
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(got.len(), 1);
    let audit = gw.store.audit_entries().unwrap();
    assert!(
        audit.iter().any(|e| e.action == "claim_parked"
            && e.actor == "urn:operator:oncall"
            && e.outcome.contains("registration confirmed")),
        "the operator's reason is audited"
    );
    gw.stop().await;
}

#[tokio::test]
async fn parallel_guesses_get_no_more_tries_than_sequential_ones() {
    let gw = TestGateway::start().await;
    park(&gw, 42).await;
    let practice = gw.client("YG002").await;
    let tries = (0..40).map(|i| {
        let mut c = practice.clone();
        async move { c.claim(claim(42, &guess(i), None)).await }
    });
    let results = futures_join_all(tries).await;
    let not_found = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::NotFound))
        .count();
    let locked = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    assert_eq!(not_found, 5, "{results:?}");
    assert_eq!(locked, 35, "{results:?}");
    // The patient is not locked for a practice that never failed.
    let mut other = gw.client("YG001").await;
    let claimed = other
        .claim(claim(42, DOB, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.claimed.len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn evidence_is_checked_and_never_echoed() {
    let gw = TestGateway::start().await;
    let mut practice = gw.client("YG001").await;
    for bad in ["2026-13-01", "tomorrow", "2999-01-01", "1970-01-01"] {
        let err = practice.claim(claim(43, DOB, Some(bad))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert_eq!(
            violations(&err),
            ["evidence.registration_date"],
            "{bad}: {err:?}"
        );
        assert!(!err.message().contains(bad), "{err:?}");
    }
    // A claim that wins records its evidence too, keyed: it is the one an
    // investigation needs (before, only failed claims recorded it).
    park(&gw, 43).await;
    let claimed = practice
        .claim(claim(43, DOB, Some("2026-01-05")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.claimed.len(), 1);
    let won: Vec<_> = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "claim" && e.outcome.starts_with("ok"))
        .collect();
    assert_eq!(won.len(), 1, "{won:?}");
    assert!(
        won[0]
            .outcome
            .contains("evidence: registration date (keyed "),
        "{}",
        won[0].outcome
    );
    assert!(!won[0].outcome.contains("2026-01-05"));
    gw.stop().await;
}

async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

/// The real binary on `port` over `dir`; killed (SIGKILL) when dropped.
struct Binary(std::process::Child);

impl Binary {
    async fn start(dir: &std::path::Path, port: u16) -> Self {
        let child = std::process::Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let gateway = Self(child);
        let endpoint = format!("https://127.0.0.1:{port}");
        for _ in 0..150 {
            if throughcare::cli::client::handover(&endpoint, &dir.join("certs"), "YP001")
                .await
                .is_ok()
            {
                return gateway;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the gateway did not start");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn against_the_binary_the_lock_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let certs = dir.path().join("certs");
    let gateway = Binary::start(dir.path(), port).await;
    let mut prison = throughcare::cli::client::handover(&endpoint, &certs, "YP001")
        .await
        .unwrap();
    prison
        .submit(release("park-44", 44, &[], "parked"))
        .await
        .unwrap();
    let mut practice = throughcare::cli::client::handover(&endpoint, &certs, "YG001")
        .await
        .unwrap();
    // Guess as fast as the gateway answers: five tries, then locked.
    let mut answers = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..200 {
        let code = match practice.claim(claim(44, &guess(i), None)).await {
            Ok(_) => "ok".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        *answers.entry(code).or_default() += 1;
    }
    assert_eq!(
        answers,
        [
            ("NotFound".to_owned(), 5),
            ("ResourceExhausted".to_owned(), 195)
        ]
        .into()
    );
    drop(gateway); // SIGKILL: no graceful shutdown
    let _gateway = Binary::start(dir.path(), port).await;
    let mut practice = throughcare::cli::client::handover(&endpoint, &certs, "YG001")
        .await
        .unwrap();
    let err = practice.claim(claim(44, DOB, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Another practice, which never failed, still can.
    let mut other = throughcare::cli::client::handover(&endpoint, &certs, "YG002")
        .await
        .unwrap();
    let claimed = other.claim(claim(44, DOB, None)).await.unwrap();
    assert_eq!(claimed.into_inner().claimed.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_claims_count_across_nodes_on_postgres() {
    let Some(a) = TestGateway::on(Engine::Postgres).await else {
        return;
    };
    // A second node on the same database and key files.
    let b = TestGateway::start_in(
        tempfile::tempdir().unwrap(),
        a.config.clone(),
        Arc::new(SystemClock),
    )
    .await;
    park(&a, 47).await;
    let (mut on_a, mut on_b) = (a.client("YG001").await, b.client("YG001").await);
    // Five wrong dates of birth, spread over the two nodes.
    for i in 0..5 {
        let node = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let err = node.claim(claim(47, &guess(i), None)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "try {i}: {err:?}");
    }
    // The pair is locked on both, as if every try had gone to one node.
    for node in [&mut on_a, &mut on_b] {
        let locked = node.claim(claim(47, DOB, None)).await.unwrap_err();
        assert_eq!(locked.code(), Code::ResourceExhausted, "{locked:?}");
    }
    b.stop().await;
    a.stop().await;
}

/// A guesser who knows both of a patient's numbers gets no more tries by
/// asking with one, then the other: failures count against the patient
/// the identifier resolves to.
#[tokio::test]
async fn both_numbers_of_one_patient_share_one_count_of_failures() {
    let gw = TestGateway::start().await;
    let summary = throughcare::clinical::synthetic::release_summary(
        nhs(43).parse().ok(),
        "A4321BC".parse().ok(),
        "YP001".parse().unwrap(),
        None,
        "parked",
    );
    let mut prison = gw.client("YP001").await;
    let r = prison
        .submit(throughcare::cli::client::native_submit(
            "park-43",
            pb::JourneyEvent::Release,
            &[],
            &summary,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deliveries[0].destination, "@parked");
    let by = |nhs_number: String, prison_number: &str, dob: &str| pb::ClaimRequest {
        patient: Some(pb::PatientRef {
            nhs_number,
            prison_number: prison_number.into(),
            date_of_birth: dob.into(),
        }),
        evidence: None,
    };
    let mut practice = gw.client("YG001").await;
    for i in 0..5 {
        let ask = if i < 3 {
            by(nhs(43), "", &guess(i))
        } else {
            by(String::new(), "A4321BC", &guess(i))
        };
        let err = practice.claim(ask).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "try {i}: {err:?}");
    }
    for ask in [by(String::new(), "A4321BC", DOB), by(nhs(43), "", DOB)] {
        let err = practice.claim(ask).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    }
    gw.stop().await;
}

/// A claim whose caller gives up before the answer (its deadline passes, it
/// resets the stream) still counts when it matched nothing: five given up
/// lock the pair, and the right date of birth is then refused. A claim
/// given up counted nothing, while the store still applied it, so with the
/// outcome read by a Pull dates of birth could be guessed without limit
/// (found by an API review). Each claim here is given up at its first wait
/// (the store's answer), by calling the service directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_given_up_before_its_answer_still_counts() {
    use throughcare::grpc::pb::handover_service_server::HandoverService;
    use throughcare::tls::{ConnInfo, PeerIdentity};
    let gw = TestGateway::start().await;
    park(&gw, 43).await;
    // A second gateway over the same store, its handover service called
    // without a transport, as tonic calls it.
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let gateway = gateway_over(gw.store.clone(), Arc::new(SystemClock), stopping);
    let service = throughcare::grpc::HandoverGrpc::new(gateway);
    let as_practice = |dob: &str| {
        let mut request = tonic::Request::new(claim(43, dob, None));
        request.extensions_mut().insert(ConnInfo {
            identity: PeerIdentity::Organisation("YG002".parse().unwrap()),
            remote: "127.0.0.1:1".parse().unwrap(),
        });
        request
    };
    for i in 0..5 {
        let given_up =
            tokio::time::timeout(Duration::ZERO, service.claim(as_practice(&guess(i)))).await;
        assert!(given_up.is_err(), "answered at once: {given_up:?}");
    }
    let failures = || {
        gw.store
            .audit_entries()
            .unwrap()
            .iter()
            .filter(|e| e.action == "claim_failure")
            .count()
    };
    for _ in 0..200 {
        if failures() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failures(), 5, "each claim given up is counted");
    let err = service.claim(as_practice(DOB)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    gw.stop().await;
}
