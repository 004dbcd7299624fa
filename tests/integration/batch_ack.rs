//! AckBatch through the real server: each attempt judged and audited as one
//! Ack would be, its own outcome in request order, the caller's mailbox
//! only, idempotent on retry; a malformed call refused whole.

use crate::support;

use support::*;
use throughcare::grpc::pb;
use tonic::Code;

fn attempt(delivery_id: u64, attempt: u32) -> pb::DeliveryAttempt {
    pb::DeliveryAttempt {
        delivery_id,
        attempt,
    }
}

fn of(d: &pb::Delivery) -> pb::DeliveryAttempt {
    attempt(d.delivery_id, d.attempt)
}

fn pull_leased(max: u32, lease_seconds: i64) -> pb::PullRequest {
    pb::PullRequest {
        lease: Some(prost_types::Duration {
            seconds: lease_seconds,
            nanos: 0,
        }),
        ..pull(max)
    }
}

/// Delivered or not, as its sender sees it.
async fn state_of(gw: &TestGateway, message_id: &str) -> pb::DeliveryState {
    let mut prison = gw.client("YP001").await;
    track_message(&mut prison, message_id).await.deliveries[0].state()
}

#[tokio::test]
async fn a_batch_ack_answers_each_attempt_on_its_own() {
    a_batch_ack_answers_each_attempt_on_its_own_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_batch_ack_answers_each_attempt_on_its_own_on_postgres() {
    a_batch_ack_answers_each_attempt_on_its_own_on(Engine::Postgres).await;
}

/// Riverside's leased deliveries a, b, c (its lease runs out first) and
/// d; Hillview's h.
struct Leased {
    gw: TestGateway,
    clock: throughcare::store::ManualClock,
    gp: pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>,
    hillview: pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>,
    a: pb::Delivery,
    b: pb::Delivery,
    c: pb::Delivery,
    d: pb::Delivery,
    h: pb::Delivery,
}

async fn leased(engine: Engine) -> Option<Leased> {
    let (gw, clock) = TestGateway::manual_on(engine, |_| {}).await?;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("c", 3, &["YG001"], "short lease"))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    let c = gp
        .pull(pull_leased(1, 30))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0]
        .clone();
    for (id, patient) in [("a", 1), ("b", 2), ("d", 4)] {
        prison
            .submit(release(id, patient, &["YG001"], id))
            .await
            .unwrap();
    }
    prison
        .submit(release("h", 5, &["YG002"], "hillview's"))
        .await
        .unwrap();
    clock.advance(20_000);
    let mine = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    let [a, b, d] = [0, 1, 2].map(|i| mine[i].clone());
    let mut hillview = gw.client("YG002").await;
    let h = hillview
        .pull(pull(10))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0]
        .clone();
    Some(Leased {
        gw,
        clock,
        gp,
        hillview,
        a,
        b,
        c,
        d,
        h,
    })
}

/// Each attempt audited as one Ack is: one entry each, under "ack", by
/// Riverside; the made-up id never named, Hillview's delivery named as
/// another organisation's (Riverside is answered as for an unknown id).
fn assert_audited_as_acks(entries: &[throughcare::audit::AuditEntry], l: &Leased) {
    let mut audited: Vec<(Option<u64>, String)> = entries
        .iter()
        .map(|e| {
            assert_eq!(
                (e.action.as_str(), e.actor.as_str()),
                ("ack", "urn:ods:YG001")
            );
            (e.delivery_id, e.outcome.clone())
        })
        .collect();
    audited.sort();
    let (a, d) = (l.a.delivery_id, l.d.delivery_id);
    let mut expected = vec![
        (Some(a), "ok: delivered".to_owned()),
        (
            Some(a),
            "ok: repeated ack of a delivered attempt".to_owned(),
        ),
        (Some(d), "ok: delivered".to_owned()),
    ];
    expected.sort();
    let (oks, refusals): (Vec<_>, Vec<_>) =
        audited.into_iter().partition(|(_, o)| o.starts_with("ok"));
    assert_eq!(oks, expected);
    let refused: Vec<_> = refusals.iter().map(|(id, _)| *id).collect();
    assert_eq!(refused.len(), 4);
    assert!(refused.contains(&Some(l.b.delivery_id)) && refused.contains(&Some(l.c.delivery_id)));
    assert_eq!(refused.iter().filter(|id| id.is_none()).count(), 1);
    assert!(
        refusals
            .iter()
            .any(|(id, o)| *id == Some(l.h.delivery_id) && o.contains("another organisation's")),
        "{refusals:?}"
    );
    assert!(refusals.iter().all(|(_, o)| o.starts_with("refused: ")));
}

/// a (fine), b (named with the wrong attempt), c (its lease ran out),
/// Hillview's h, an id nobody has, a again, d (fine).
async fn a_batch_ack_answers_each_attempt_on_its_own_on(engine: Engine) {
    let Some(l) = leased(engine).await else {
        return;
    };
    l.clock.advance(15_000);
    let (gw, mut gp, mut hillview) = (&l.gw, l.gp.clone(), l.hillview.clone());
    let (a, b, c, d, h) = (&l.a, &l.b, &l.c, &l.d, &l.h);
    let before = gw.store.audit_entries().unwrap().len();
    let batch = pb::AckBatchRequest {
        attempts: vec![
            of(a),
            attempt(b.delivery_id, b.attempt + 1),
            of(c),
            of(h),
            attempt(987_654, 1),
            of(a),
            of(d),
        ],
    };
    let results = gp
        .ack_batch(batch.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::AckOutcome::*;
    let outcomes: Vec<_> = results
        .iter()
        .map(|r| (r.delivery_id, r.outcome()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (a.delivery_id, Acknowledged),
            (b.delivery_id, StaleAttempt),
            (c.delivery_id, LeaseExpired),
            (h.delivery_id, UnknownDelivery),
            (987_654, UnknownDelivery),
            (a.delivery_id, AlreadyAcknowledged),
            (d.delivery_id, Acknowledged),
        ]
    );
    assert_eq!(
        (results[1].current_attempt, results[1].state()),
        (1, pb::DeliveryState::Leased)
    );
    assert_eq!(results[0].state(), pb::DeliveryState::Delivered);
    // Another mailbox's delivery is not described: not found, like a made-up id.
    assert_eq!(
        (
            results[3].state(),
            results[3].current_attempt,
            results[3].detail.as_str()
        ),
        (
            pb::DeliveryState::Unspecified,
            0,
            results[4].detail.as_str()
        )
    );

    assert_audited_as_acks(&gw.store.audit_entries().unwrap()[before..], &l);

    // The refusals changed nothing: Hillview acks its own, Riverside b's
    // real attempt; c comes round again.
    assert_eq!(state_of(gw, "h").await, pb::DeliveryState::Leased);
    hillview
        .ack(pb::AckRequest {
            delivery_id: h.delivery_id,
            attempt: h.attempt,
        })
        .await
        .unwrap();
    assert_eq!(state_of(gw, "a").await, pb::DeliveryState::Delivered);
    assert_eq!(state_of(gw, "b").await, pb::DeliveryState::Leased);

    // The same batch again (a lost reply, retried): nothing acknowledged twice.
    let again = gp.ack_batch(batch).await.unwrap().into_inner().results;
    let again: Vec<_> = again.iter().map(pb::AckResult::outcome).collect();
    assert_eq!(
        again,
        [
            AlreadyAcknowledged,
            StaleAttempt,
            LeaseExpired,
            UnknownDelivery,
            UnknownDelivery,
            AlreadyAcknowledged,
            AlreadyAcknowledged,
        ]
    );
    gp.ack(pb::AckRequest {
        delivery_id: b.delivery_id,
        attempt: b.attempt,
    })
    .await
    .unwrap();
    let redelivered = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(redelivered.len(), 1);
    assert_eq!(
        (redelivered[0].delivery_id, redelivered[0].attempt),
        (c.delivery_id, 2)
    );
    gw.store.verify_audit().unwrap();
    l.gw.stop().await;
}

#[tokio::test]
async fn a_malformed_batch_ack_is_refused_whole_with_field_errors() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("m", 1, &["YG001"], "kept leased"))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    let leased = gp.pull(pull(1)).await.unwrap().into_inner().deliveries[0].clone();
    let too_many: Vec<_> = (1..=501).map(|i| attempt(i, 1)).collect();
    for (attempts, fields) in [
        (vec![], vec!["attempts"]),
        (too_many, vec!["attempts"]),
        (
            vec![of(&leased), attempt(0, 1), attempt(leased.delivery_id, 0)],
            vec!["attempts[1].delivery_id", "attempts[2].attempt"],
        ),
    ] {
        let before = gw.store.audit_entries().unwrap().len();
        let err = gp
            .ack_batch(pb::AckBatchRequest { attempts })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violations(&err), fields);
        let entries = gw.store.audit_entries().unwrap();
        assert_eq!(entries.len(), before + 1, "the refusal is audited, once");
        let refusal = entries.last().unwrap();
        assert_eq!(refusal.action, "ack_batch");
        assert!(refusal.outcome.starts_with("refused: InvalidArgument"));
    }
    // The good item in the refused call was not acknowledged.
    assert_eq!(state_of(&gw, "m").await, pb::DeliveryState::Leased);
    // Operators have no mailbox to acknowledge from.
    let mut op = gw.client("operator-oncall").await;
    let err = op
        .ack_batch(pb::AckBatchRequest {
            attempts: vec![of(&leased)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let results = gp
        .ack_batch(pb::AckBatchRequest {
            attempts: vec![of(&leased)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].outcome(), pb::AckOutcome::Acknowledged);
    gw.stop().await;
}
