//! End to end through the real server on 127.0.0.1 with real mutual TLS.

use crate::support;

use std::sync::Arc;

use support::*;
use throughcare::grpc::pb;
use throughcare::store::SystemClock;
use tonic::Code;

#[tokio::test]
async fn submit_pull_ack_then_track_shows_delivered() {
    submit_pull_ack_then_track_shows_delivered_on(Engine::Sled).await;
}

#[tokio::test]
async fn submit_pull_ack_then_track_shows_delivered_on_postgres() {
    submit_pull_ack_then_track_shows_delivered_on(Engine::Postgres).await;
}

async fn submit_pull_ack_then_track_shows_delivered_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(release("rel-1", 1, &["YG001", "YPR01"], "summary one"))
        .await
        .unwrap()
        .into_inner();
    assert!(!receipt.duplicate);
    assert_eq!(receipt.deliveries.len(), 2);
    assert_eq!(receipt.deliveries[0].destination, "YG001");

    let mut gp = gw.client("YG001").await;
    let pulled = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(pulled.len(), 1);
    let d = &pulled[0];
    assert_eq!(d.handover_id, receipt.handover_id);
    assert_eq!(d.delivery_id, receipt.deliveries[0].delivery_id);
    assert_eq!((d.attempt, d.sender.as_str()), (1, "YP001"));
    assert_eq!(d.event(), pb::JourneyEvent::Release);
    assert_eq!(d.patient.as_ref().unwrap().nhs_number, nhs(1));
    assert_eq!(text_of(d), "summary one");
    assert!(d.lease_expires_at.is_some());
    gp.ack(pb::AckRequest {
        delivery_id: d.delivery_id,
        attempt: 1,
    })
    .await
    .unwrap();
    // A repeated ack of the same attempt (lost reply) succeeds again.
    gp.ack(pb::AckRequest {
        delivery_id: d.delivery_id,
        attempt: 1,
    })
    .await
    .unwrap();
    assert!(
        gp.pull(pull(10))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );

    let track = prison
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId("rel-1".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(track.handover_id, receipt.handover_id);
    let gp_status = &track.deliveries[0];
    assert_eq!(gp_status.state(), pb::DeliveryState::Delivered);
    assert_eq!(gp_status.attempts, 1);
    assert!(gp_status.queued_at.is_some());
    assert!(gp_status.last_leased_at.is_some());
    assert!(gp_status.delivered_at.is_some());
    assert_eq!(track.deliveries[1].state(), pb::DeliveryState::Queued);

    // Another prison cannot track it.
    let mut other = gw.client("YP002").await;
    let err = other
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::HandoverId(receipt.handover_id)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    gw.store.verify_audit().unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn callers_without_a_registered_certificate_are_refused() {
    let gw = TestGateway::start().await;
    let paths = gw.paths();
    let (cert, key) = paths.client("YG001");
    // A certificate from another CA.
    let other_ca = throughcare::certs::CertAuthority::generate("someone else").unwrap();
    let stranger = other_ca.issue_client_now("urn:ods:YG001").unwrap();
    let refused = match gw
        .client_with(
            &gw.ca_pem(),
            stranger.cert_pem.as_bytes(),
            stranger.key_pem.as_bytes(),
        )
        .await
    {
        Err(_) => true,
        Ok(mut c) => c.pull(pull(1)).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must be refused");

    // No client certificate at all.
    let tls = tonic::transport::ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(tonic::transport::Certificate::from_pem(gw.ca_pem()));
    let anonymous = tonic::transport::Endpoint::from_shared(gw.endpoint.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    let refused = match anonymous {
        Err(_) => true,
        Ok(ch) => pb::handover_service_client::HandoverServiceClient::new(ch)
            .pull(pull(1))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");

    // A valid certificate for an organisation that is not registered.
    let unregistered = gw.ca().issue_client_now("urn:ods:YX999").unwrap();
    let mut c = gw
        .client_with(
            &gw.ca_pem(),
            unregistered.cert_pem.as_bytes(),
            unregistered.key_pem.as_bytes(),
        )
        .await
        .unwrap();
    let err = c.pull(pull(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("YX999"), "{}", err.message());

    // The genuine certificate still works.
    let mut ok = gw
        .client_with(&gw.ca_pem(), &read(&cert), &read(&key))
        .await
        .unwrap();
    ok.pull(pull(1)).await.unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn operators_and_wrong_senders_cannot_submit() {
    let gw = TestGateway::start().await;
    let mut op = gw.client("operator-oncall").await;
    let err = op
        .submit(release("op-1", 1, &["YG001"], "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        op.pull(pull(1)).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A GP practice cannot send a release; probation cannot send anything.
    let mut gp = gw.client("YG001").await;
    let err = gp
        .submit(release("gp-1", 1, &["YG002"], "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut probation = gw.client("YPR01").await;
    let err = probation
        .submit(release("p-1", 1, &["YG001"], "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Refused for who it is before what it sent: an empty document too.
    let mut empty = release("gp-2", 1, &["YG002"], "x");
    empty.document = Some(pb::submit_request::Document::Native(Default::default()));
    let err = gp.submit(empty).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Probation, which may send nothing, learns nothing of a malformed
    // request's faults either.
    let mut malformed = release("", 1, &["not an ods code"], "x");
    malformed.event = 0;
    let err = probation.submit(malformed).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_practice_sees_only_its_own_mailbox() {
    a_practice_sees_only_its_own_mailbox_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_practice_sees_only_its_own_mailbox_on_postgres() {
    a_practice_sees_only_its_own_mailbox_on(Engine::Postgres).await;
}

async fn a_practice_sees_only_its_own_mailbox_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("r-1", 1, &["YG001"], "for riverside"))
        .await
        .unwrap();
    let mut hillview = gw.client("YG002").await;
    assert!(
        hillview
            .pull(pull(10))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );
    let mut riverside = gw.client("YG001").await;
    let d = riverside
        .pull(pull(10))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0]
        .clone();
    let err = hillview
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = hillview
        .nack(pb::NackRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
            permanent: true,
            reason: "not mine".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    riverside
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn duplicate_submit_returns_the_original_receipt_and_conflicts_are_refused() {
    duplicate_submit_returns_the_original_receipt_and_conflicts_are_refused_on(Engine::Sled).await;
}

#[tokio::test]
async fn duplicate_submit_returns_the_original_receipt_and_conflicts_are_refused_on_postgres() {
    duplicate_submit_returns_the_original_receipt_and_conflicts_are_refused_on(Engine::Postgres)
        .await;
}

async fn duplicate_submit_returns_the_original_receipt_and_conflicts_are_refused_on(
    engine: Engine,
) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let first = prison
        .submit(release("dup-1", 1, &["YG001"], "same"))
        .await
        .unwrap()
        .into_inner();
    let again = prison
        .submit(release("dup-1", 1, &["YG001"], "same"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.handover_id, first.handover_id);
    assert_eq!(again.deliveries, first.deliveries);
    let before = gw.store.content_digest().unwrap();
    let err = prison
        .submit(release("dup-1", 1, &["YG001"], "different"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(gw.store.content_digest().unwrap(), before);
    // The same message id from another sender is a different handover.
    let mut other = gw.client("YP002").await;
    let theirs = other
        .submit(crate::support::sent_by(
            release("dup-1", 2, &["YG001"], "different"),
            "YP002",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(theirs.handover_id, first.handover_id);
    // Only one delivery per accepted handover reaches the practice.
    let mut gp = gw.client("YG001").await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        for d in gp.pull(pull(10)).await.unwrap().into_inner().deliveries {
            seen.push(d.handover_id);
            gp.ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![first.handover_id, theirs.handover_id]);
    gw.stop().await;
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_and_the_stale_ack_refused() {
    an_expired_lease_is_redelivered_and_the_stale_ack_refused_on(Engine::Sled).await;
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_and_the_stale_ack_refused_on_postgres() {
    an_expired_lease_is_redelivered_and_the_stale_ack_refused_on(Engine::Postgres).await;
}

async fn an_expired_lease_is_redelivered_and_the_stale_ack_refused_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(release("l-1", 1, &["YG001"], "lease me"))
        .await
        .unwrap()
        .into_inner();
    let mut gp = gw.client("YG001").await;
    // Never leased: NOT_LEASED, not a stale attempt.
    let early = gp
        .ack(pb::AckRequest {
            delivery_id: receipt.deliveries[0].delivery_id,
            attempt: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    use tonic_types::StatusExt as _;
    let reason = early.get_details_error_info().map(|i| i.reason);
    assert_eq!(reason.as_deref(), Some("NOT_LEASED"), "{early:?}");
    let first = gp.pull(pull(1)).await.unwrap().into_inner().deliveries[0].clone();
    assert_eq!(first.attempt, 1);
    // While leased, nobody else gets it.
    assert!(
        gp.pull(pull(1))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );
    clock.advance(61_000);
    let second = gp.pull(pull(1)).await.unwrap().into_inner().deliveries[0].clone();
    assert_eq!(second.delivery_id, first.delivery_id);
    assert_eq!(second.attempt, 2);
    let stale = gp
        .ack(pb::AckRequest {
            delivery_id: first.delivery_id,
            attempt: first.attempt,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    // The stale ack did not acknowledge the redelivery: it can still be acked.
    gp.ack(pb::AckRequest {
        delivery_id: second.delivery_id,
        attempt: second.attempt,
    })
    .await
    .unwrap();
    // An ack after the lease ran out is refused too.
    prison
        .submit(release("l-2", 2, &["YG001"], "late"))
        .await
        .unwrap();
    let late = gp.pull(pull(1)).await.unwrap().into_inner().deliveries[0].clone();
    clock.advance(60_000);
    let err = gp
        .ack(pb::AckRequest {
            delivery_id: late.delivery_id,
            attempt: late.attempt,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    gw.stop().await;
}

#[tokio::test]
async fn a_nack_retried_after_its_answer_was_lost_is_answered_as_the_first() {
    a_nack_retried_after_its_answer_was_lost_is_answered_as_the_first_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_nack_retried_after_its_answer_was_lost_is_answered_as_the_first_on_postgres() {
    a_nack_retried_after_its_answer_was_lost_is_answered_as_the_first_on(Engine::Postgres).await;
}

async fn a_nack_retried_after_its_answer_was_lost_is_answered_as_the_first_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    for (id, nhs) in [("n-1", 1), ("n-2", 2)] {
        prison
            .submit(release(id, nhs, &["YG001"], "nack me"))
            .await
            .unwrap();
    }
    let mut gp = gw.client("YG001").await;
    let nack = |d: &pb::Delivery, permanent: bool| pb::NackRequest {
        delivery_id: d.delivery_id,
        attempt: d.attempt,
        permanent,
        reason: "store full".into(),
    };
    let leased = gp.pull(pull(2)).await.unwrap().into_inner().deliveries;
    let (retry, poison) = (&leased[0], &leased[1]);
    // Each nack twice, as a client whose first answer was lost would.
    for (d, permanent, state) in [
        (retry, false, pb::DeliveryState::Queued),
        (poison, true, pb::DeliveryState::Quarantined),
    ] {
        for _ in 0..2 {
            let answer = gp.nack(nack(d, permanent)).await.unwrap().into_inner();
            assert_eq!(answer.state, state as i32, "{d:?}");
        }
    }
    let before = gw.store.audit_entries().unwrap().len();
    // The repeat changed nothing: the back-off still runs from the first
    // nack, and the attempt is not spent twice.
    clock.advance(1_100);
    let again = gp.pull(pull(2)).await.unwrap().into_inner().deliveries;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        (again[0].delivery_id, again[0].attempt),
        (retry.delivery_id, 2)
    );
    // Once pulled again, the old attempt's nack is stale, not a repeat.
    let stale = gp.nack(nack(retry, false)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let entries = gw.store.audit_entries().unwrap();
    let repeats: Vec<_> = entries[..before]
        .iter()
        .filter(|e| e.action == "nack")
        .map(|e| (e.delivery_id, e.outcome.as_str()))
        .collect();
    assert_eq!(
        repeats,
        vec![
            (Some(retry.delivery_id), "ok: queued for retry"),
            (
                Some(retry.delivery_id),
                "ok: repeated nack of an attempt already given back"
            ),
            (Some(poison.delivery_id), "ok: quarantined"),
            (
                Some(poison.delivery_id),
                "ok: repeated nack of an attempt already given back"
            ),
        ]
    );
    assert!(
        entries[before..]
            .iter()
            .any(|e| e.action == "nack" && e.outcome.starts_with("refused: ")),
        "the stale nack is audited as refused"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_poison_delivery_is_quarantined_while_other_patients_flow() {
    a_poison_delivery_is_quarantined_while_other_patients_flow_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_poison_delivery_is_quarantined_while_other_patients_flow_on_postgres() {
    a_poison_delivery_is_quarantined_while_other_patients_flow_on(Engine::Postgres).await;
}

async fn a_poison_delivery_is_quarantined_while_other_patients_flow_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |c| {
        c.queue.max_attempts = 3;
        c.queue.retry_backoff_ms = 1;
    })
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    // The poison is patient 1's admission notice.
    prison.submit(admission("poison", 1)).await.unwrap();
    for i in 0..3 {
        prison
            .submit(release(&format!("ok-{i}"), 10 + i, &["YG001"], "fine"))
            .await
            .unwrap();
    }
    // Patient 1 has a second handover that must wait behind the first.
    prison
        .submit(release("poison-later", 1, &["YG001"], "after poison"))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    let mut delivered = Vec::new();
    for round in 0..3 {
        let batch = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
        for d in batch {
            if text_of(&d) == "admission" {
                let state = gp
                    .nack(pb::NackRequest {
                        delivery_id: d.delivery_id,
                        attempt: d.attempt,
                        permanent: false,
                        reason: "cannot file this".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .state();
                let expected = if round == 2 {
                    pb::DeliveryState::Quarantined
                } else {
                    pb::DeliveryState::Queued
                };
                assert_eq!(state, expected, "round {round}");
            } else {
                assert_ne!(text_of(&d), "after poison", "patient order broken");
                delivered.push(text_of(&d));
                gp.ack(pb::AckRequest {
                    delivery_id: d.delivery_id,
                    attempt: d.attempt,
                })
                .await
                .unwrap();
            }
        }
        clock.advance(10);
    }
    assert_eq!(delivered, vec!["fine", "fine", "fine"]);
    // With the poison quarantined, the patient's later handover flows.
    let next = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(
        next.iter().map(text_of).collect::<Vec<_>>(),
        ["after poison"]
    );
    let track = prison
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId("poison".into())),
        })
        .await
        .unwrap()
        .into_inner();
    let status = &track.deliveries[0];
    assert_eq!(status.state(), pb::DeliveryState::Quarantined);
    assert_eq!(status.attempts, 3);
    assert!(status.quarantine_reason.contains("cannot file this"));
    assert!(status.quarantined_at.is_some());
    gw.stop().await;
}

#[tokio::test]
async fn leases_that_run_out_of_attempts_are_quarantined_by_the_sweeper() {
    leases_that_run_out_of_attempts_are_quarantined_by_the_sweeper_on(Engine::Sled).await;
}

#[tokio::test]
async fn leases_that_run_out_of_attempts_are_quarantined_by_the_sweeper_on_postgres() {
    leases_that_run_out_of_attempts_are_quarantined_by_the_sweeper_on(Engine::Postgres).await;
}

async fn leases_that_run_out_of_attempts_are_quarantined_by_the_sweeper_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |c| {
        c.queue.max_attempts = 2;
        c.queue.sweep_interval_ms = 20;
    })
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("never-acked", 1, &["YG001"], "x"))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    for attempt in 1..=2 {
        let d = gp
            .pull(pull_waiting(1, 5))
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        assert_eq!(d[0].attempt, attempt);
        clock.advance(61_000);
    }
    // No pull needed: the sweeper finds it within a few intervals.
    let mut state = pb::DeliveryState::Leased;
    for _ in 0..100 {
        let t = prison
            .track(pb::TrackRequest {
                handover: Some(pb::track_request::Handover::MessageId("never-acked".into())),
            })
            .await
            .unwrap()
            .into_inner();
        state = t.deliveries[0].state();
        if state == pb::DeliveryState::Quarantined {
            assert!(t.deliveries[0].quarantine_reason.contains("lease expired"));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(state, pb::DeliveryState::Quarantined);
    gw.stop().await;
}

#[tokio::test]
async fn per_patient_order_holds_and_long_poll_wakes_on_arrival() {
    per_patient_order_holds_and_long_poll_wakes_on_arrival_on(Engine::Sled).await;
}

#[tokio::test]
async fn per_patient_order_holds_and_long_poll_wakes_on_arrival_on_postgres() {
    per_patient_order_holds_and_long_poll_wakes_on_arrival_on(Engine::Postgres).await;
}

async fn per_patient_order_holds_and_long_poll_wakes_on_arrival_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let mut gp = gw.client("YG001").await;
    let waiter = tokio::spawn(async move {
        let r = gp
            .pull(pb::PullRequest {
                max_deliveries: 10,
                lease: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                wait: Some(prost_types::Duration {
                    seconds: 20,
                    nanos: 0,
                }),
                format: pb::DocumentFormat::Native.into(),
            })
            .await
            .unwrap()
            .into_inner();
        (gp, r.deliveries)
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    prison.submit(admission("a-1", 1)).await.unwrap();
    prison
        .submit(release("a-2", 1, &["YG001"], "second"))
        .await
        .unwrap();
    let (mut gp, got) = waiter.await.unwrap();
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["admission"]);
    let more = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert!(more.is_empty(), "second waits behind the unacked first");
    gp.ack(pb::AckRequest {
        delivery_id: got[0].delivery_id,
        attempt: got[0].attempt,
    })
    .await
    .unwrap();
    let more = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(more.iter().map(text_of).collect::<Vec<_>>(), ["second"]);
    gw.stop().await;
}

/// One bad submit: what it is, the request, the status code and the field
/// its violation names (empty: none).
type BadSubmit = (&'static str, pb::SubmitRequest, Code, &'static str);

/// Bad submits in the request's own fields: the document's presence and
/// size, the message id, destinations, the patient, the event.
fn envelope_cases() -> Vec<BadSubmit> {
    let mut cases: Vec<BadSubmit> = Vec::new();
    let mut r = release("b-1", 1, &["YG001"], "x");
    r.document = Some(pb::submit_request::Document::Native(Default::default()));
    cases.push((
        "empty document",
        r,
        Code::InvalidArgument,
        "document.native",
    ));
    let r = release("b-2", 1, &["YG001"], &"x".repeat(8193));
    cases.push((
        "oversized document",
        r,
        Code::InvalidArgument,
        "document.native",
    ));
    let mut r = release("b-3", 1, &["YG001"], "x");
    r.document = None;
    cases.push(("no document", r, Code::InvalidArgument, "document"));
    let r = release("", 1, &["YG001"], "x");
    cases.push(("missing message id", r, Code::InvalidArgument, "message_id"));
    let r = release("b-4", 1, &["YZ404"], "x");
    cases.push((
        "unknown destination",
        r,
        Code::InvalidArgument,
        "destinations[0]",
    ));
    let mut r = release("b-5", 1, &["YP002"], "x");
    r.event = pb::JourneyEvent::Admission.into();
    cases.push((
        "destination of the wrong kind",
        r,
        Code::InvalidArgument,
        "destinations[0]",
    ));
    let mut r = release("b-6", 1, &["YG001"], "x");
    r.patient.as_mut().unwrap().nhs_number = "9990000017".into();
    cases.push((
        "bad NHS check digit",
        r,
        Code::InvalidArgument,
        "patient.nhs_number",
    ));
    let mut r = release("b-7", 1, &["YG001"], "x");
    r.patient.as_mut().unwrap().nhs_number = "0000000000".into();
    cases.push((
        "all-zero NHS number",
        r,
        Code::InvalidArgument,
        "patient.nhs_number",
    ));
    let mut r = release("b-8", 1, &["YG001"], "x");
    r.patient.as_mut().unwrap().nhs_number = nhs(2);
    cases.push((
        "a patient other than the document's",
        r,
        Code::InvalidArgument,
        "patient",
    ));
    let mut r = release("b-9", 1, &["YG001"], "x");
    r.event = 0;
    cases.push(("no event", r, Code::InvalidArgument, "event"));
    let mut r = release("b-10", 1, &["YP002"], "x");
    r.event = pb::JourneyEvent::CommunitySummary.into();
    cases.push((
        "a prison sending a GP's event",
        r,
        Code::PermissionDenied,
        "",
    ));

    cases
}

/// Bad submits inside the document: a FHIR bundle with a bad NHS number, an
/// HL7 message with a carriage return inside a field.
fn document_cases() -> Vec<BadSubmit> {
    let mut cases: Vec<BadSubmit> = Vec::new();
    let mut r = release("b-11", 1, &["YG001"], "x");
    let mut fhir = String::from_utf8(
        throughcare::clinical::fhir::render(
            &throughcare::clinical::synthetic::release_summary(
                nhs(1).parse().ok(),
                None,
                "YP001".parse().unwrap(),
                None,
                "x",
            ),
            throughcare::journey::JourneyEvent::Release,
        )
        .bytes,
    )
    .unwrap();
    fhir = fhir.replace(&nhs(1), "9990000017");
    r.patient = None;
    r.document = Some(pb::submit_request::Document::FhirJson(fhir));
    cases.push((
        "FHIR with a bad NHS number",
        r,
        Code::InvalidArgument,
        "entry[1].resource.identifier[0].value",
    ));
    let mut r = release("b-12", 1, &["YG001"], "x");
    r.patient = None;
    r.document = Some(pb::submit_request::Document::Hl7v2(
        "MSH|^~\\&|X|YP001|||20261124080000||ADT^A03^ADT_A03|1|P|2.5.1\rEVN|A03|20261124080000\r\
         PID|1||9990000018^^^NHS^NH||Ex\rample^Alex||19850615|U\rPV1|1|N|^^^YP001\r"
            .into(),
    ));
    cases.push((
        "HL7 with a carriage return inside a field",
        r,
        Code::InvalidArgument,
        "segment 4",
    ));
    cases.extend(native_value_cases());
    cases
}

/// A native summary changed by `change`, as release `id`.
fn native_release(id: &str, change: impl FnOnce(&mut pb::ClinicalSummary)) -> pb::SubmitRequest {
    let mut r = release(id, 1, &["YG001"], "x");
    let Some(pb::submit_request::Document::Native(s)) = &mut r.document else {
        unreachable!("release() is native");
    };
    change(s);
    r
}

/// Values outside what the contract defines, and dates outside the
/// patient's life or the gateway's calendar: each refused at its field,
/// none read as some default.
fn native_value_cases() -> Vec<BadSubmit> {
    vec![
        (
            "an unknown follow-up kind",
            native_release("b-20", |s| s.follow_ups[0].kind = 57),
            Code::InvalidArgument,
            "document.native.follow_ups[0].kind",
        ),
        (
            "no follow-up kind",
            native_release("b-21", |s| s.follow_ups[0].kind = 0),
            Code::InvalidArgument,
            "document.native.follow_ups[0].kind",
        ),
        (
            "an unknown allergy severity",
            native_release("b-22", |s| {
                s.allergies.push(pb::Allergy {
                    substance: Some(pb::Code {
                        system: "http://snomed.info/sct".into(),
                        code: "91936005".into(),
                        display: "Penicillin".into(),
                    }),
                    reaction: "rash".into(),
                    severity: 42,
                });
            }),
            Code::InvalidArgument,
            "document.native.allergies[0].severity",
        ),
        (
            "an unknown sex",
            native_release("b-23", |s| s.patient.as_mut().unwrap().sex = 77),
            Code::InvalidArgument,
            "document.native.patient.sex",
        ),
        (
            "an unknown consent decision",
            native_release("b-24", |s| {
                s.consent.get_or_insert_default().probation_sharing = 9;
            }),
            Code::InvalidArgument,
            "document.native.consent.probation_sharing",
        ),
        (
            "a release beyond the gateway's calendar",
            native_release("b-25", |s| {
                s.custody.as_mut().unwrap().release_date = "9999-12-31".into();
            }),
            Code::InvalidArgument,
            "document.native.custody.release_date",
        ),
        (
            "a release before the reception",
            native_release("b-26", |s| {
                s.custody.as_mut().unwrap().reception_date = "2026-12-01".into();
            }),
            Code::InvalidArgument,
            "document.native.custody.release_date",
        ),
        (
            "a last dose given in the future",
            native_release("b-27", |s| {
                s.medications[0].last_dose_given = "2099-01-01T08:00:00Z".into();
            }),
            Code::InvalidArgument,
            "document.native.medications[0].last_dose_given",
        ),
    ]
}

#[tokio::test]
async fn bad_input_gets_a_field_level_error_and_changes_nothing() {
    bad_input_gets_a_field_level_error_and_changes_nothing_on(Engine::Sled).await;
}

#[tokio::test]
async fn bad_input_gets_a_field_level_error_and_changes_nothing_on_postgres() {
    bad_input_gets_a_field_level_error_and_changes_nothing_on(Engine::Postgres).await;
}

async fn bad_input_gets_a_field_level_error_and_changes_nothing_on(engine: Engine) {
    let Some(gw) = TestGateway::on_with(
        engine,
        |c| c.limits.max_document_bytes = 8192,
        Arc::new(SystemClock),
    )
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let before = gw.store.content_digest().unwrap();
    // A message id no submit could have used is refused as such, not
    // looked up and reported missing.
    for bad in ["\0".repeat(300), "two words".into()] {
        let err = prison
            .track(pb::TrackRequest {
                handover: Some(pb::track_request::Handover::MessageId(bad)),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violations(&err), ["message_id"]);
    }
    let mut cases = envelope_cases();
    cases.extend(document_cases());
    for (what, request, code, field) in cases {
        let err = prison.submit(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        if !field.is_empty() {
            assert_eq!(violations(&err), vec![field.to_owned()], "{what}");
            assert!(err.message().contains(field), "{what}: {}", err.message());
        }
        assert!(
            !err.message().contains(&nhs(1)),
            "{what} echoes patient data"
        );
        assert_eq!(
            gw.store.content_digest().unwrap(),
            before,
            "{what} changed the store"
        );
    }

    let mut gp = gw.client("YG001").await;
    let err = gp
        .ack(pb::AckRequest {
            delivery_id: 0,
            attempt: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["delivery_id", "attempt"]);
    let err = gp
        .pull(pb::PullRequest {
            max_deliveries: 1,
            lease: Some(prost_types::Duration {
                seconds: 999_999,
                nanos: 0,
            }),
            wait: None,
            format: pb::DocumentFormat::Native.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["lease"]);
    assert_eq!(gw.store.content_digest().unwrap(), before);
    gw.stop().await;
}

#[tokio::test]
async fn everything_acknowledged_survives_a_restart() {
    everything_acknowledged_survives_a_restart_on(Engine::Sled).await;
}

#[tokio::test]
async fn everything_acknowledged_survives_a_restart_on_postgres() {
    everything_acknowledged_survives_a_restart_on(Engine::Postgres).await;
}

async fn everything_acknowledged_survives_a_restart_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let ids = releases_to_yg001(&mut prison, "s", 100, 20).await;
    let mut gp = gw.client("YG001").await;
    let leased = gp
        .pull(pull_waiting(5, 5))
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    for d in &leased[..2] {
        gp.ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await
        .unwrap();
    }
    drop((prison, gp));
    let (dir, config) = gw.stop().await;

    let (gw, clock) = {
        let clock = throughcare::store::ManualClock::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64,
        );
        (
            TestGateway::start_in(dir, config, Arc::new(clock.clone())).await,
            clock,
        )
    };
    let mut gp = gw.client("YG001").await;
    // The three leased but unacked deliveries come back after their lease.
    clock.advance(61_000);
    let mut got = Vec::new();
    loop {
        let batch = gp
            .pull(pull_waiting(50, 2))
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        if batch.is_empty() {
            break;
        }
        for d in batch {
            got.push(d.handover_id);
            gp.ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
        }
    }
    got.sort_unstable();
    assert_eq!(got, ids[2..].to_vec());
    // Idempotency survives the restart too.
    let mut prison = gw.client("YP001").await;
    let again = prison
        .submit(release("s-0", 100, &["YG001"], "doc 0"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.handover_id, ids[0]);
    gw.store.verify_audit().unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_ends_long_polls_and_drains() {
    shutdown_ends_long_polls_and_drains_on(Engine::Sled).await;
}

#[tokio::test]
async fn shutdown_ends_long_polls_and_drains_on_postgres() {
    shutdown_ends_long_polls_and_drains_on(Engine::Postgres).await;
}

async fn shutdown_ends_long_polls_and_drains_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut gp = gw.client("YG001").await;
    let waiter = tokio::spawn(async move {
        gp.pull(pb::PullRequest {
            max_deliveries: 1,
            lease: None,
            wait: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            format: pb::DocumentFormat::Native.into(),
        })
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    gw.stop().await;
    // The long poll was answered (empty) instead of being cut off.
    let answered = waiter.await.unwrap();
    assert!(answered.unwrap().into_inner().deliveries.is_empty());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// A pull reads its payloads together; one that fails its checks on the way
/// out of the store (a flipped byte on disk) is quarantined with the reason,
/// and the others read in the same pull are delivered.
#[tokio::test]
async fn a_payload_that_fails_its_check_is_quarantined_and_the_rest_of_its_pull_delivered() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    let ids = releases_to_yg001(&mut prison, "read", 300, 3).await;
    drop(prison);
    let (dir, config) = gw.stop().await;
    flip_a_payload_byte(&config, ids[1]);
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let mut gp = gw.client("YG001").await;
    let got = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["doc 0", "doc 2"]
    );
    let mut prison = gw.client("YP001").await;
    let track = track_message(&mut prison, "read-1").await;
    let status = &track.deliveries[0];
    assert_eq!(status.state(), pb::DeliveryState::Quarantined);
    assert!(
        status.quarantine_reason.contains("integrity check"),
        "{}",
        status.quarantine_reason
    );
    // The gateway quarantined it, not the practice: the trail says who.
    let nacks: Vec<_> = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "nack" && e.delivery_id == Some(status.delivery_id))
        .map(|e| e.actor)
        .collect();
    assert_eq!(nacks, ["service:delivery"]);
    gw.stop().await;
}

/// A live delivery whose handover record is gone (one corrupt sled segment
/// can drop records while the rest of the store opens): it is quarantined
/// with the reason, the rest of the pull is delivered, and the store goes
/// on taking changes. It stopped the whole store, for every mailbox, and
/// again after every restart.
#[tokio::test]
async fn a_delivery_whose_handover_record_is_gone_is_quarantined_and_the_store_goes_on() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    let ids = releases_to_yg001(&mut prison, "gone", 300, 3).await;
    drop(prison);
    let (dir, config) = gw.stop().await;
    {
        let db = support::open_sled(&config.data_dir.join("sled"));
        let handovers = db.open_tree("handovers").unwrap();
        assert!(handovers.remove(ids[1].to_be_bytes()).unwrap().is_some());
        db.flush().unwrap();
    }
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let mut gp = gw.client("YG001").await;
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["doc 0", "doc 2"]
    );
    let parked = gw.store.quarantined(Some("YG001"), 10).unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].handover_id, ids[1]);
    let reason = parked[0].reason.as_deref().unwrap_or_default();
    assert!(reason.contains("handover record is missing"), "{reason}");
    let mut prison = gw.client("YP001").await;
    releases_to_yg001(&mut prison, "after", 310, 1).await;
    assert_eq!(pull_and_ack(&mut gp).await.len(), 1);
    gw.stop().await;
}

/// The same on PostgreSQL: a sealed payload changed in the database fails
/// its check and is quarantined alone; the rest of the pull is delivered in
/// the one query that reads them.
#[tokio::test]
async fn a_payload_that_fails_its_check_is_quarantined_and_the_rest_of_its_pull_delivered_on_postgres()
 {
    let Some(gw) = TestGateway::on(Engine::Postgres).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let ids = releases_to_yg001(&mut prison, "read", 300, 3).await;
    let url = gw.config.store.postgres_url.clone().unwrap();
    let (sql, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let changed = sql
        .execute(
            "UPDATE payloads SET sealed = set_byte(sealed, length(sealed) - 1, \
             get_byte(sealed, length(sealed) - 1) # 1) WHERE handover_id = $1",
            &[&i64::try_from(ids[1]).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let mut gp = gw.client("YG001").await;
    let got = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["doc 0", "doc 2"]
    );
    let track = track_message(&mut prison, "read-1").await;
    assert_eq!(track.deliveries[0].state(), pb::DeliveryState::Quarantined);
    gw.stop().await;
}

/// Flips the last byte of a stopped sled store's sealed payload of `handover`.
fn flip_a_payload_byte(config: &throughcare::config::Config, handover: u64) {
    let db = support::open_sled(&config.data_dir.join("sled"));
    let payloads = db.open_tree("payloads").unwrap();
    let (key, chunk) = payloads
        .scan_prefix(handover.to_be_bytes())
        .next()
        .expect("a queued handover has its payload")
        .unwrap();
    let mut flipped = chunk.to_vec();
    *flipped.last_mut().unwrap() ^= 0x01;
    payloads.insert(key, flipped).unwrap();
    db.flush().unwrap();
}

/// A pull whose whole lease was quarantined leases again instead of
/// answering empty while good deliveries wait behind it.
#[tokio::test]
async fn a_pull_whose_every_lease_was_quarantined_leases_again() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    let ids = releases_to_yg001(&mut prison, "again", 320, 4).await;
    drop(prison);
    let (dir, config) = gw.stop().await;
    flip_a_payload_byte(&config, ids[0]);
    flip_a_payload_byte(&config, ids[1]);
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let mut gp = gw.client("YG001").await;
    // One at a time: the first two leases find only bad payloads.
    let got = gp.pull(pull(1)).await.unwrap().into_inner().deliveries;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["doc 2"]);
    let mut prison = gw.client("YP001").await;
    for bad in ["again-0", "again-1"] {
        let track = track_message(&mut prison, bad).await;
        assert_eq!(
            track.deliveries[0].state(),
            pb::DeliveryState::Quarantined,
            "{bad}"
        );
    }
    gw.stop().await;
}

/// A payload that cannot be read for a moment (the database failing, not
/// the data) is a failed attempt, offered again after the backoff; it is not
/// quarantined as if its content were corrupt.
#[tokio::test]
async fn a_payload_the_database_cannot_serve_for_a_moment_is_retried_not_quarantined() {
    let Some(gw) = TestGateway::on_with(
        Engine::Postgres,
        |c| c.queue.retry_backoff_ms = 100,
        Arc::new(SystemClock),
    )
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    releases_to_yg001(&mut prison, "moment", 340, 2).await;
    let url = gw.config.store.postgres_url.clone().unwrap();
    let (sql, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    sql.batch_execute("ALTER TABLE payloads RENAME TO payloads_away")
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    let refused = gp.pull(pull(10)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    for id in ["moment-0", "moment-1"] {
        let track = track_message(&mut prison, id).await;
        assert_eq!(
            track.deliveries[0].state(),
            pb::DeliveryState::Queued,
            "{id}: a failed attempt, not quarantined"
        );
    }
    sql.batch_execute("ALTER TABLE payloads_away RENAME TO payloads")
        .await
        .unwrap();
    // Both come back after the back-off, not necessarily in one pull.
    let mut got = Vec::new();
    for _ in 0..50 {
        got.extend(
            gp.pull(pull_waiting(10, 1))
                .await
                .unwrap()
                .into_inner()
                .deliveries,
        );
        if got.len() >= 2 {
            break;
        }
    }
    let mut texts: Vec<String> = got.iter().map(text_of).collect();
    texts.sort();
    assert_eq!(texts, ["doc 0", "doc 1"]);
    assert!(
        got.iter().all(|d| d.attempt == 2),
        "the failed attempt counted"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_pull_answer_stays_within_its_byte_budget_and_the_rest_waits_uncounted() {
    a_pull_answer_stays_within_its_byte_budget_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_pull_answer_stays_within_its_byte_budget_and_the_rest_waits_uncounted_on_postgres() {
    a_pull_answer_stays_within_its_byte_budget_on(Engine::Postgres).await;
}

/// A pull leases at most `queue.max_pull_bytes` of stored payloads, always
/// at least one delivery: the rest stay queued, untouched, first in line
/// for the next pull.
async fn a_pull_answer_stays_within_its_byte_budget_on(engine: Engine) {
    let Some(gw) = TestGateway::on_with(
        engine,
        |c| {
            c.limits.max_document_bytes = 256 * 1024;
            c.queue.max_pull_bytes = 150_000;
        },
        Arc::new(SystemClock),
    )
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    // Four patients, in order: 100 kB, 100 kB, 30 kB, 200 kB of text.
    for (i, (tag, bytes)) in [
        ('A', 100_000),
        ('B', 100_000),
        ('C', 30_000),
        ('D', 200_000),
    ]
    .into_iter()
    .enumerate()
    {
        let marker = format!("{tag}{}", "x".repeat(bytes));
        prison
            .submit(release(
                &format!("budget-{i}"),
                500 + i as u32,
                &["YG001"],
                &marker,
            ))
            .await
            .unwrap();
    }
    let audited = gw.store.audit_entries().unwrap().len();
    let mut gp = gw.client("YG001").await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        let deliveries = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
        for d in &deliveries {
            gp.ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
        }
        answers.push(
            deliveries
                .iter()
                .map(|d| (text_of(d).chars().next().unwrap(), d.attempt))
                .collect::<Vec<_>>(),
        );
    }
    // A alone (A and B are over 150 kB); then B and C; then D alone, over
    // the budget by itself; then nothing. No attempt counted for waiting.
    assert_eq!(
        answers,
        [
            vec![('A', 1)],
            vec![('B', 1), ('C', 1)],
            vec![('D', 1)],
            vec![]
        ]
    );
    // Cut by stored size when leasing: nothing was leased only to be given
    // back (each delivery leased once, audited once).
    let pulls = gw.store.audit_entries().unwrap()[audited..]
        .iter()
        .filter(|e| e.action == "pull" && e.delivery_id.is_some())
        .count();
    assert_eq!(pulls, 4);
    gw.stop().await;
}

/// A release whose summary lists `n` medicines: small as stored, several
/// times larger as FHIR (a resource per medicine).
fn release_with_medicines(message_id: &str, patient: u32, n: usize) -> pb::SubmitRequest {
    let mut r = release(message_id, patient, &["YG001"], message_id);
    let Some(pb::submit_request::Document::Native(s)) = &mut r.document else {
        unreachable!("release() is native");
    };
    let one = s.medications[0].clone();
    s.medications = vec![one; n];
    r
}

#[tokio::test]
async fn a_pull_answer_larger_rendered_than_stored_gives_the_rest_back_uncounted() {
    a_pull_answer_larger_rendered_than_stored_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_pull_answer_larger_rendered_than_stored_gives_the_rest_back_uncounted_on_postgres() {
    a_pull_answer_larger_rendered_than_stored_on(Engine::Postgres).await;
}

/// The answer is cut again by its encoded size: FHIR renderings can be
/// larger than what the store measured when leasing, and what does not fit
/// is given back unsent (audited), its attempt not counted.
async fn a_pull_answer_larger_rendered_than_stored_on(engine: Engine) {
    const BUDGET: usize = 150_000;
    let Some(gw) = TestGateway::on_with(
        engine,
        |c| c.queue.max_pull_bytes = BUDGET,
        Arc::new(SystemClock),
    )
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    for i in 0..3 {
        prison
            .submit(release_with_medicines(&format!("meds-{i}"), 600 + i, 100))
            .await
            .unwrap();
    }
    let audited = gw.store.audit_entries().unwrap().len();
    let mut gp = gw.client("YG001").await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        let answer = gp
            .pull(pb::PullRequest {
                max_deliveries: 10,
                format: pb::DocumentFormat::FhirJson.into(),
                ..pull(10)
            })
            .await
            .unwrap()
            .into_inner();
        let size = prost::Message::encoded_len(&answer);
        assert!(
            answer.deliveries.len() <= 1 || size <= BUDGET,
            "{size} bytes in {} deliveries",
            answer.deliveries.len()
        );
        for d in &answer.deliveries {
            assert_eq!(d.attempt, 1, "a delivery given back is not counted");
            gp.ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
        }
        answers.push(answer.deliveries.len());
    }
    assert_eq!(answers.iter().sum::<usize>(), 3, "{answers:?}");
    assert!(answers[0] < 3, "{answers:?}: the first answer was not cut");
    let returned = gw.store.audit_entries().unwrap()[audited..]
        .iter()
        .filter(|e| e.action == "pull" && e.outcome.contains("returned unsent"))
        .count();
    assert!(returned > 0);
    gw.stop().await;
}

/// `n` releases to YG001, message ids `{prefix}-{i}`, patients from
/// `first_patient`, documents `"doc {i}"`; their handover ids.
async fn releases_to_yg001(
    prison: &mut throughcare::grpc::pb::handover_service_client::HandoverServiceClient<
        tonic::transport::Channel,
    >,
    prefix: &str,
    first_patient: u32,
    n: u32,
) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = prison
            .submit(release(
                &format!("{prefix}-{i}"),
                first_patient + i,
                &["YG001"],
                &format!("doc {i}"),
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.handover_id);
    }
    ids
}

/// A native summary near the document limit listing tens of thousands of
/// medicines (a few bytes each as protobuf) is refused at submit, the list
/// named: rendered as FHIR it would be many times the limit for every
/// recipient. A summary at the list limit is delivered as FHIR, alone in
/// its answer if need be.
#[tokio::test]
async fn a_list_heavy_summary_is_refused_at_submit_and_one_at_the_limit_delivered_as_fhir() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    let request = release_with_medicines("long-list", 700, 30_000);
    let sent = prost::Message::encoded_len(&request);
    assert!((3_000_000..4 * 1024 * 1024).contains(&sent), "{sent} bytes");
    let err = prison.submit(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), ["document.native.medications"]);
    // The patient's given names and the release address's lines too: a
    // million empty names (two bytes each) were taken and stored, as FHIR
    // refuses them (found by an API review).
    let mut request = release_with_medicines("long-names", 702, 1);
    if let Some(pb::submit_request::Document::Native(s)) = &mut request.document {
        s.patient.as_mut().unwrap().given_names = vec![String::new(); 1_000_000];
        let custody = s.custody.get_or_insert_with(Default::default);
        custody
            .release_address
            .get_or_insert_with(Default::default)
            .lines = vec!["1 Any Street".into(); 201];
    }
    let err = prison.submit(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&err),
        [
            "document.native.patient.given_names",
            "document.native.custody.release_address.lines"
        ]
    );
    let request = release_with_medicines("at-the-limit", 701, throughcare::clinical::MAX_ITEMS);
    prison.submit(request).await.unwrap();
    let mut gp = gw.client("YG001").await;
    let answer = gp
        .pull(pb::PullRequest {
            format: pb::DocumentFormat::FhirJson.into(),
            ..pull(10)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.deliveries.len(), 1);
    gw.stop().await;
}

/// A lease is whole seconds (the contract's unit): a fraction is refused
/// with the field named, before anything is leased, and a period past
/// what `google.protobuf.Timestamp` allows is refused by name too.
#[tokio::test]
async fn a_fractional_lease_and_timestamps_out_of_range_are_refused_by_field() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("frac-1", 800, &["YG001"], "doc"))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    let status = gp
        .pull(pb::PullRequest {
            lease: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
            ..pull(10)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violations(&status), ["lease"]);
    // A wait past what google.protobuf.Duration allows (about 10,000
    // years) is refused by name; it was read as the longest wait.
    let status = gp
        .pull(pb::PullRequest {
            wait: Some(prost_types::Duration {
                seconds: 1_000_000_000_000_000,
                nanos: 0,
            }),
            ..pull(10)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violations(&status), ["wait"]);
    let got = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(got[0].attempt, 1, "the refused pulls leased nothing");
    let mut operator = gw.operator().await;
    for (from, to) in [
        (
            None,
            Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -1,
            }),
        ),
        (
            Some(prost_types::Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            }),
            None,
        ),
    ] {
        let status = operator
            .get_continuity(pb::GetContinuityRequest {
                from,
                to,
                period: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let status = operator
        .get_continuity(pb::GetContinuityRequest {
            from: None,
            to: None,
            period: Some(prost_types::Duration {
                seconds: i64::MAX,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["period"]);
    gw.stop().await;
}
