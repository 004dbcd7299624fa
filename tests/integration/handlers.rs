//! The application layer called directly (no sockets, no TLS): the
//! authorisation matrix of docs/authorisation.md cell by cell, the order of
//! checks (who before what), field-level validation, and pages that walk a
//! listing. The end-to-end tests keep sockets, restarts and crashes.

use std::sync::Arc;
use std::time::Duration;

use throughcare::app::Prepared;
use throughcare::clinical::synthetic::release_summary;
use throughcare::config::Config;
use throughcare::handover::{
    AuditSubject, Caller, ClaimCommand, ClaimParkedCommand, Error, Gateway, IncomingDocument, Kind,
    NackCommand, PageRequest, PullCommand, RedriveTarget, SubmitCommand,
};
use throughcare::journey::JourneyEvent;
use throughcare::store::{ManualClock, TrackKey};

use super::support::{T0, nhs};

/// A gateway's use cases over a fresh store, without serving.
struct Layer {
    prepared: Prepared,
    _dir: tempfile::TempDir,
}

impl Layer {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            certs_dir: dir.path().join("certs"),
            dev_certs: true,
            ..Config::default()
        };
        let prepared = Prepared::new(config, Arc::new(ManualClock::new(T0))).unwrap();
        Self {
            prepared,
            _dir: dir,
        }
    }

    fn gw(&self) -> &Gateway {
        self.prepared.gateway()
    }
}

fn org(code: &str) -> Caller {
    Caller::Organisation(code.parse().unwrap())
}

fn operator() -> Caller {
    Caller::Operator("oncall".into())
}

/// A release of synthetic patient `i` from YP001, with no GP: parked.
fn parked_release(i: u32, message_id: &str) -> SubmitCommand {
    let summary = release_summary(
        nhs(i).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        None,
        "handler test",
    );
    SubmitCommand {
        message_id: message_id.into(),
        event: JourneyEvent::Release,
        patient: None,
        destinations: Vec::new(),
        document: IncomingDocument::Native(Box::new(Ok(summary))),
    }
}

fn kind<T>(r: Result<T, Error>) -> Option<Kind> {
    r.err().map(|e| e.kind())
}

fn fields<T: std::fmt::Debug>(r: Result<T, Error>) -> Vec<String> {
    match r.unwrap_err() {
        Error::Invalid(v) => v.into_iter().map(|v| v.field).collect(),
        other => panic!("not a validation error: {other:?}"),
    }
}

/// Every organisation-facing use case, as `caller`: the kind of refusal,
/// or `None` when allowed (a NOT_FOUND for an id that is not the caller's
/// counts as allowed: the caller was let in and learnt nothing).
async fn handover_cells(gw: &Gateway, caller: &Caller) -> Vec<(&'static str, Option<Kind>)> {
    let page = PageRequest::default();
    let not_found = |k: Option<Kind>| k.filter(|k| *k != Kind::NotFound);
    vec![
        (
            "submit release",
            kind(gw.submit(caller, Ok(parked_release(1, "cell"))).await),
        ),
        (
            "pull",
            kind(gw.pull(caller, Ok(PullCommand::default())).await),
        ),
        ("ack", not_found(kind(gw.ack(caller, 999, 1).await))),
        (
            "track",
            not_found(kind(
                gw.track(caller, Ok(TrackKey::MessageId("none".into())))
                    .await,
            )),
        ),
        (
            "claim",
            not_found(kind(
                gw.claim(
                    caller,
                    ClaimCommand {
                        patient: Ok(Some(throughcare::handover::PatientRef {
                            nhs_number: nhs(2).parse().ok(),
                            prison_number: None,
                            date_of_birth: Some("1985-06-15".into()),
                        })),
                        registration_date: None,
                    },
                )
                .await,
            )),
        ),
        (
            "list mailboxes",
            kind(gw.list_mailboxes(caller, &page).await),
        ),
        ("list parked", kind(gw.list_parked(caller, &page).await)),
        ("retention", kind(gw.retention_status(caller).await)),
        (
            "break glass",
            not_found(kind(
                gw.break_glass_read(caller, 999, "a clinician asked for it urgently")
                    .await,
            )),
        ),
    ]
}

#[tokio::test]
async fn the_authorisation_matrix_cell_by_cell() {
    let layer = Layer::new();
    let gw = layer.gw();
    gw.set_organisation_active(&operator(), "YG002", false)
        .await
        .unwrap();
    // The organisation the call acts on is its resource: one the registry
    // does not hold is NOT_FOUND, a malformed code INVALID_ARGUMENT.
    let unknown = gw
        .set_organisation_active(&operator(), "YG999", false)
        .await;
    assert_eq!(
        unknown.map(|_| ()).unwrap_err().reason(),
        "UNKNOWN_ORGANISATION"
    );
    let malformed = gw.set_organisation_active(&operator(), "", false).await;
    assert_eq!(
        malformed.map(|_| ()).unwrap_err().kind(),
        Kind::InvalidArgument
    );
    let denied = Some(Kind::PermissionDenied);
    let unauthenticated = Some(Kind::Unauthenticated);
    let expect = |who: &str| -> Vec<Option<Kind>> {
        match who {
            // submit, pull, ack, track, claim, mailboxes, parked, retention, break glass
            "prison" => vec![
                None, None, None, None, denied, denied, denied, denied, denied,
            ],
            "gp" => vec![
                denied, None, None, None, None, denied, denied, denied, denied,
            ],
            "probation" => vec![
                denied, None, None, None, denied, denied, denied, denied, denied,
            ],
            "operator" => vec![
                denied, denied, denied, denied, denied, None, None, None, None,
            ],
            "disabled" => vec![denied; 9],
            _ => vec![unauthenticated; 9],
        }
    };
    for (who, caller) in [
        ("prison", org("YP001")),
        ("gp", org("YG001")),
        ("probation", org("YPR01")),
        ("operator", operator()),
        ("disabled", org("YG002")),
        ("unregistered", org("ZZ999")),
        ("unidentified", Caller::Unidentified),
    ] {
        let cells = handover_cells(gw, &caller).await;
        let got: Vec<Option<Kind>> = cells.iter().map(|(_, k)| *k).collect();
        assert_eq!(got, expect(who), "{who}: {cells:?}");
    }
}

#[tokio::test]
async fn who_is_checked_before_what() {
    let layer = Layer::new();
    let gw = layer.gw();
    let garbage = || {
        let mut v = throughcare::clinical::ValidationErrors::default();
        v.add("message_id", "required");
        v
    };
    // An operator's malformed submit is refused for who it is, not for its input.
    let e = gw.submit(&operator(), Err(garbage())).await.unwrap_err();
    assert_eq!(e.kind(), Kind::PermissionDenied);
    let e = gw.submit(&org("YP001"), Err(garbage())).await.unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidArgument);
    // A practice's redrive with too many ids is refused for who it is.
    let many = RedriveTarget::Deliveries((1..=2_000).collect());
    let e = gw
        .redrive(&org("YG001"), Ok(many.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::PermissionDenied);
    assert_eq!(
        fields(gw.redrive(&operator(), Ok(many)).await),
        ["deliveries.ids"]
    );
}

#[tokio::test]
async fn validation_names_the_fields() {
    let layer = Layer::new();
    let gw = layer.gw();
    let prison = org("YP001");
    let gp = org("YG001");
    let pull = PullCommand {
        lease: Some(Duration::from_secs(86_400 * 365)),
        ..PullCommand::default()
    };
    assert_eq!(fields(gw.pull(&gp, Ok(pull)).await), ["lease"]);
    assert_eq!(fields(gw.ack(&gp, 0, 0).await), ["delivery_id", "attempt"]);
    let nack = NackCommand {
        delivery_id: 1,
        attempt: 1,
        permanent: true,
        reason: "patient 999 000 0018 is wrong".into(),
    };
    assert_eq!(fields(gw.nack(&gp, nack).await), ["reason"]);
    // A submit naming a patient other than the document's.
    let mut cmd = parked_release(3, "mismatch");
    cmd.patient = Some(throughcare::handover::PatientRef {
        nhs_number: nhs(4).parse().ok(),
        prison_number: None,
        date_of_birth: None,
    });
    assert_eq!(fields(gw.submit(&prison, Ok(cmd)).await), ["patient"]);
    let op = operator();
    assert_eq!(
        fields(gw.audit_trail(&op, None, "", &PageRequest::default()).await),
        ["reason", "subject"]
    );
    let bad_nhs = Some(AuditSubject::NhsNumber("9990000017".into()));
    let first = PageRequest::default();
    let trail = gw.audit_trail(&op, bad_nhs, "checking", &first);
    assert_eq!(fields(trail.await), ["nhs_number"]);
    assert_eq!(
        fields(gw.break_glass_read(&op, 0, "short").await),
        ["handover_id", "reason"]
    );
    let claim = ClaimParkedCommand {
        patient: Ok(None),
        practice: "YP001".into(),
        reason: "the practice phoned".into(),
    };
    assert_eq!(fields(gw.claim_parked(&op, claim).await), ["practice"]);
    let page = PageRequest {
        size: 2,
        token: "not-a-token".into(),
    };
    assert_eq!(fields(gw.list_parked(&op, &page).await), ["page_token"]);
    assert_eq!(
        fields(gw.list_parked(&op, &PageRequest::first(-1)).await),
        ["page_size"]
    );
}

#[tokio::test]
async fn pages_walk_a_listing_in_a_stable_order_whatever_changes_between_them() {
    let layer = Layer::new();
    let gw = layer.gw();
    let prison = org("YP001");
    for i in 0..7 {
        gw.submit(&prison, Ok(parked_release(10 + i, &format!("park-{i}"))))
            .await
            .unwrap();
    }
    let op = operator();
    let all = gw.list_parked(&op, &PageRequest::default()).await.unwrap();
    assert_eq!(all.items.len(), 7);
    assert!(all.next_token.is_empty());
    let order: Vec<u64> = all.items.iter().map(|d| d.record.id).collect();
    let mut walked = Vec::new();
    let mut asked = PageRequest::first(3);
    loop {
        let page = gw.list_parked(&op, &asked).await.unwrap();
        assert!(page.items.len() <= 3);
        walked.extend(page.items.iter().map(|d| d.record.id));
        if walked.len() == 3 {
            // A release parked between pages comes at the end, not twice.
            gw.submit(&prison, Ok(parked_release(30, "late")))
                .await
                .unwrap();
        }
        if page.next_token.is_empty() {
            break;
        }
        asked.token = page.next_token;
    }
    assert_eq!(walked[..7], order[..]);
    assert_eq!(walked.len(), 8);
    // A token is good for its own listing only.
    let first = gw.list_parked(&op, &PageRequest::first(1)).await.unwrap();
    let replayed = PageRequest {
        size: 1,
        token: first.next_token,
    };
    assert_eq!(
        fields(gw.list_organisations(&op, &replayed).await),
        ["page_token"]
    );
    // The registry pages by ODS code.
    let mut codes = Vec::new();
    let mut asked = PageRequest::first(2);
    loop {
        let page = gw.list_organisations(&op, &asked).await.unwrap();
        codes.extend(page.items.iter().map(|o| o.ods.as_str().to_owned()));
        if page.next_token.is_empty() {
            break;
        }
        asked.token = page.next_token;
    }
    let mut sorted = codes.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(codes, sorted);
    assert!(codes.len() > 2, "{codes:?}");
}

/// A pull whose caller leaves before it is answered (its deadline passes,
/// its connection closes) leaves nothing leased: the writer leases nothing
/// for a caller already gone, and what was leased but not yet answered is
/// given back. Before, the delivery waited out its lease unseen, spent an
/// attempt, and held its patient's later deliveries until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_abandoned_before_its_answer_leaves_nothing_leased() {
    let layer = Layer::new();
    let gw = layer.gw();
    let mut cmd = parked_release(31, "abandoned-pull");
    let summary = release_summary(
        nhs(31).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        "handler test",
    );
    cmd.document = IncomingDocument::Native(Box::new(Ok(summary)));
    let receipt = gw.submit(&org("YP001"), Ok(cmd)).await.unwrap();
    let delivery = receipt.deliveries[0].delivery_id;
    assert_eq!(receipt.deliveries[0].destination, "YG001");
    let gp = org("YG001");
    // Polled once (the writer has the pull) and dropped before its answer,
    // as a caller whose deadline passes is; the writer leases regardless.
    let abandoned = futures_util::FutureExt::now_or_never(gw.pull(&gp, Ok(PullCommand::default())));
    assert!(abandoned.is_none(), "the pull was answered at once");
    // Given back unsent: the next pull has it as its first attempt. (Left
    // leased, it would wait out its lease, and this pull would get nothing.)
    let got = gw
        .pull(
            &gp,
            Ok(PullCommand {
                wait: Duration::from_secs(5),
                ..PullCommand::default()
            }),
        )
        .await
        .unwrap();
    assert_eq!((got[0].delivery_id, got[0].attempt), (delivery, 1));
}

/// Paging a patient's trail one entry at a time ends: each page's own
/// `audit_query` entry (about that patient) is not listed on later pages,
/// which stop at the newest entry of the first; and a page token of one
/// subject's trail does not page another's.
#[tokio::test]
async fn a_trail_paged_one_entry_at_a_time_ends_and_its_tokens_stay_with_it() {
    let layer = Layer::new();
    let gw = layer.gw();
    for i in 0..3 {
        gw.submit(&org("YP001"), Ok(parked_release(41, &format!("trail-{i}"))))
            .await
            .unwrap();
    }
    let op = operator();
    let subject = || Some(AuditSubject::NhsNumber(nhs(41)));
    let mut page = PageRequest {
        size: 1,
        token: String::new(),
    };
    let mut seen = Vec::new();
    for _ in 0..50 {
        let trail = gw
            .audit_trail(&op, subject(), "subject access request", &page)
            .await
            .unwrap();
        seen.extend(
            trail
                .entries
                .items
                .iter()
                .map(|e| (e.seq, e.action.clone())),
        );
        if trail.entries.next_token.is_empty() {
            break;
        }
        page.token = trail.entries.next_token;
    }
    // Three submits (each later one superseding) and the first page's
    // query; the queries of the later pages come after the first's newest.
    let actions: Vec<&str> = seen.iter().map(|(_, a)| a.as_str()).collect();
    let count = |what: &str| actions.iter().filter(|a| **a == what).count();
    assert_eq!((count("submit"), count("audit_query")), (3, 1), "{seen:?}");
    assert_eq!(actions.last(), Some(&"audit_query"), "{seen:?}");

    let first = gw
        .audit_trail(
            &op,
            subject(),
            "subject access request",
            &PageRequest {
                size: 1,
                token: String::new(),
            },
        )
        .await
        .unwrap();
    let other = PageRequest {
        size: 1,
        token: first.entries.next_token,
    };
    let elsewhere = gw
        .audit_trail(
            &op,
            Some(AuditSubject::NhsNumber(nhs(42))),
            "checking",
            &other,
        )
        .await;
    assert_eq!(fields(elsewhere), ["page_token"]);
}

/// The same on both engines at the store's seam: a pull dropped while the
/// store serves it (the sled writer, or a PostgreSQL transaction, which
/// runs to its end) gives its leases back, unsent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_pull_dropped_while_served_gives_its_leases_back() {
    a_store_pull_dropped_while_served_on(super::support::Engine::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_pull_dropped_while_served_gives_its_leases_back_on_postgres() {
    a_store_pull_dropped_while_served_on(super::support::Engine::Postgres).await;
}

async fn a_store_pull_dropped_while_served_on(engine: super::support::Engine) {
    let Some(gw) = super::support::TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let r = prison
        .submit(super::support::release("dropped-pull", 32, &["YG001"], "m"))
        .await
        .unwrap()
        .into_inner();
    let delivery = r
        .deliveries
        .iter()
        .find(|d| d.destination == "YG001")
        .unwrap()
        .delivery_id;
    let pull = gw
        .store
        .pull_within("urn:ods:YG001", "YG001", (10, None), 60_000);
    assert!(futures_util::FutureExt::now_or_never(pull).is_none());
    let mut gp = gw.client("YG001").await;
    let got = gp
        .pull(throughcare::grpc::pb::PullRequest {
            max_deliveries: 10,
            wait: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    let mine = got
        .iter()
        .find(|d| d.delivery_id == delivery)
        .expect("given back");
    assert_eq!(mine.attempt, 1);
    gw.stop().await;
}
