//! The authorisation matrix (docs/authorisation.md), cell by cell, over real
//! mutual TLS: each kind of caller against each operation on whose data.

// Callers are indexed across parallel tables (names, clients, expectations).
#![allow(clippy::needless_range_loop)]

use crate::support;

use support::*;
use throughcare::clinical::ClinicalSummary;
use throughcare::clinical::translate::{self, TextFormat};
use throughcare::clinical::views::View;
use throughcare::grpc::pb;
use throughcare::journey::JourneyEvent;
use tonic::Code;
use tonic::transport::Channel;

use std::sync::Arc;
use throughcare::store::SystemClock;

type Handover = pb::handover_service_client::HandoverServiceClient<Channel>;
type Operator = pb::operator_service_client::OperatorServiceClient<Channel>;

/// The callers: the four kinds, an unregistered code and a disabled practice.
const CALLERS: [&str; 6] = [
    "YP001",
    "YG001",
    "YPR01",
    "operator-oncall",
    "YX999",
    "YG002",
];

struct Callers {
    handover: Vec<Handover>,
    operator: Vec<Operator>,
}

async fn callers(gw: &TestGateway) -> Callers {
    let unregistered = gw.ca().issue_client_now("urn:ods:YX999").unwrap();
    let mut handover = Vec::new();
    let mut operator = Vec::new();
    for name in CALLERS {
        let channel = if name == "YX999" {
            throughcare::tls::client_channel(
                &gw.endpoint,
                &gw.ca_pem(),
                unregistered.cert_pem.as_bytes(),
                unregistered.key_pem.as_bytes(),
            )
            .await
            .unwrap()
        } else {
            throughcare::cli::client::channel(&gw.endpoint, &gw.certs(), name)
                .await
                .unwrap()
        };
        handover.push(pb::handover_service_client::HandoverServiceClient::new(
            channel.clone(),
        ));
        operator.push(pb::operator_service_client::OperatorServiceClient::new(
            channel,
        ));
    }
    Callers { handover, operator }
}

/// What a cell expects: allowed, or refused with this code.
fn code_of<T>(r: &Result<tonic::Response<T>, tonic::Status>) -> Option<Code> {
    r.as_ref().err().map(tonic::Status::code)
}

fn admission_to(patient: u32) -> pb::SubmitRequest {
    admission(&format!("adm-{patient}"), patient)
}

fn community(id: &str) -> pb::SubmitRequest {
    let mut r = admission(id, 500);
    r.event = pb::JourneyEvent::CommunitySummary.into();
    // The practice's own summary, about the patient's custody at YP001.
    if let Some(pb::submit_request::Document::Native(s)) = &mut r.document {
        s.author.as_mut().unwrap().organisation = CALLERS[GP].into();
    }
    r
}

/// A prison submits only in its own name: a document naming another
/// organisation of the network as its author or its establishment is
/// refused, in every format, and nothing is stored.
#[tokio::test]
async fn a_prison_cannot_send_a_document_in_another_prisons_name() {
    let gw = TestGateway::start().await;
    let before = gw.store.content_digest().unwrap();
    let mut prison = gw.client("YP001").await;
    for (what, edit) in [
        (
            "both",
            Box::new(|s: &mut ClinicalSummary| crate::support::written_by(s, "YP002"))
                as Box<dyn Fn(&mut ClinicalSummary)>,
        ),
        (
            "author",
            Box::new(|s: &mut ClinicalSummary| {
                s.author.organisation = "YP002".parse().unwrap();
            }),
        ),
        (
            "establishment",
            Box::new(|s: &mut ClinicalSummary| {
                s.custody.establishment = "YP002".parse().unwrap();
            }),
        ),
    ] {
        let mut s = throughcare::clinical::synthetic::release_summary(
            crate::support::nhs(601).parse().ok(),
            None,
            "YP001".parse().unwrap(),
            Some("YG001".parse().unwrap()),
            "not ours",
        );
        edit(&mut s);
        for format in [TextFormat::Fhir, TextFormat::Hl7v2] {
            let text = String::from_utf8(
                translate::write(format, &s, View::Full, JourneyEvent::Release).bytes,
            )
            .unwrap();
            let document = match format {
                TextFormat::Fhir => pb::submit_request::Document::FhirJson(text),
                _ => pb::submit_request::Document::Hl7v2(text),
            };
            let err = prison
                .submit(pb::SubmitRequest {
                    message_id: format!("spoof-{what}-{format:?}"),
                    event: pb::JourneyEvent::Release.into(),
                    patient: None,
                    destinations: Vec::new(),
                    document: Some(document),
                })
                .await
                .unwrap_err();
            assert_eq!(
                err.code(),
                Code::PermissionDenied,
                "{what} {format:?}: {err:?}"
            );
            assert!(err.message().contains("YP002"), "{}", err.message());
        }
    }
    assert_eq!(gw.store.content_digest().unwrap(), before);
    // An author outside the network (the provider that runs the prison's
    // healthcare) is the prison's to name.
    let mut s = throughcare::clinical::synthetic::release_summary(
        crate::support::nhs(602).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        "provider",
    );
    s.author.organisation = "RR8".parse().unwrap();
    prison
        .submit(throughcare::cli::client::native_submit(
            "provider-authored",
            pb::JourneyEvent::Release,
            &[],
            &s,
        ))
        .await
        .unwrap();
    gw.stop().await;
}

// The callers' places in `CALLERS`.
const PRISON: usize = 0;
const GP: usize = 1;
const PROBATION: usize = 2;
const OPERATOR: usize = 3;
const UNREGISTERED: usize = 4;
const DISABLED: usize = 5;

const PD: Option<Code> = Some(Code::PermissionDenied);
const UNAUTH: Option<Code> = Some(Code::Unauthenticated);

/// What a handover call expects from `who`: an unregistered code is
/// unauthenticated, an operator or a disabled practice refused, anyone else
/// `allowed`.
fn expect(who: usize, allowed: Option<Code>) -> Option<Code> {
    match who {
        UNREGISTERED => UNAUTH,
        DISABLED | OPERATOR => PD,
        _ => allowed,
    }
}

/// What an operator call expects from `who`: operators `ok`, everyone else refused.
fn operator_only(who: usize, ok: Option<Code>) -> Option<Code> {
    match who {
        OPERATOR => ok,
        UNREGISTERED => UNAUTH,
        _ => PD,
    }
}

#[tokio::test]
async fn every_cell_of_the_matrix() {
    let gw = TestGateway::start().await;
    let mut op = gw.operator().await;
    op.set_organisation_active(pb::SetOrganisationActiveRequest {
        ods_code: "YG002".into(),
        active: false,
    })
    .await
    .unwrap();
    let mut c = callers(&gw).await;
    submit_cells(&mut c).await;
    let gp_delivery = pull_ack_nack_cells(&mut c).await;
    track_cells(&mut c).await;
    let patient = claim_cells(&mut c).await;
    for who in 0..CALLERS.len() {
        operator_list_cells(&mut c.operator[who], who).await;
        operator_change_cells(&mut c.operator[who], who, &gp_delivery, &patient).await;
    }
    gw.stop().await;
}

/// Submit: prison events from prisons only, community summaries from practices only.
async fn submit_cells(c: &mut Callers) {
    for who in 0..CALLERS.len() {
        let r = c.handover[who].submit(admission_to(10 + who as u32)).await;
        let allowed = if who == PRISON { None } else { PD };
        assert_eq!(
            code_of(&r),
            expect(who, allowed),
            "{} submit ADMISSION",
            CALLERS[who]
        );
        let r = c.handover[who]
            .submit(community(&format!("cs-{who}")))
            .await;
        let allowed = if who == GP { None } else { PD };
        assert_eq!(
            code_of(&r),
            expect(who, allowed),
            "{} submit COMMUNITY_SUMMARY",
            CALLERS[who]
        );
    }
}

/// Pull: each organisation its own mailbox. Ack and nack: another mailbox's
/// delivery is NOT_FOUND, refusals as for pull. Returns the practice's delivery.
async fn pull_ack_nack_cells(c: &mut Callers) -> pb::Delivery {
    let mut leased = Vec::new();
    for who in 0..CALLERS.len() {
        let r = c.handover[who].pull(pull(10)).await;
        assert_eq!(code_of(&r), expect(who, None), "{} pull", CALLERS[who]);
        leased.push(r.map(|r| r.into_inner().deliveries).unwrap_or_default());
    }
    // The practice got the prison's admission notice; the prison the community summary.
    let gp_delivery = leased[GP].first().expect("the admission notice").clone();
    let prison_delivery = leased[PRISON]
        .first()
        .expect("the community summary")
        .clone();
    let ack = |d: &pb::Delivery| pb::AckRequest {
        delivery_id: d.delivery_id,
        attempt: d.attempt,
    };
    let nack = |d: &pb::Delivery| pb::NackRequest {
        delivery_id: d.delivery_id,
        attempt: d.attempt,
        permanent: false,
        reason: "matrix".into(),
    };
    for who in [PRISON, PROBATION, OPERATOR, UNREGISTERED, DISABLED] {
        let r = c.handover[who].ack(ack(&gp_delivery)).await;
        assert_eq!(
            code_of(&r),
            expect(who, Some(Code::NotFound)),
            "{} ack another's",
            CALLERS[who]
        );
        let r = c.handover[who].nack(nack(&gp_delivery)).await;
        assert_eq!(
            code_of(&r),
            expect(who, Some(Code::NotFound)),
            "{} nack another's",
            CALLERS[who]
        );
    }
    assert_eq!(code_of(&c.handover[GP].ack(ack(&gp_delivery)).await), None);
    assert_eq!(
        code_of(&c.handover[PRISON].nack(nack(&prison_delivery)).await),
        None
    );
    gp_delivery
}

/// Track: a sender's own handovers only.
async fn track_cells(c: &mut Callers) {
    let track = |id: &str| pb::TrackRequest {
        handover: Some(pb::track_request::Handover::MessageId(id.into())),
    };
    for who in 0..CALLERS.len() {
        let r = c.handover[who].track(track("adm-10")).await;
        let allowed = if who == PRISON {
            None
        } else {
            Some(Code::NotFound)
        };
        assert_eq!(
            code_of(&r),
            expect(who, allowed),
            "{} track the prison's",
            CALLERS[who]
        );
    }
}

/// Claim: GP practices only. Returns the patient claimed.
async fn claim_cells(c: &mut Callers) -> Option<pb::PatientRef> {
    let claim = pb::ClaimRequest {
        patient: Some(pb::PatientRef {
            nhs_number: nhs(999),
            prison_number: String::new(),
            date_of_birth: "1985-06-15".into(),
        }),
        evidence: None,
    };
    for who in 0..CALLERS.len() {
        let r = c.handover[who].claim(claim.clone()).await;
        // Nothing is parked for this patient: the practice is allowed, and told so.
        let allowed = if who == GP { Some(Code::NotFound) } else { PD };
        assert_eq!(code_of(&r), expect(who, allowed), "{} claim", CALLERS[who]);
    }
    claim.patient
}

/// The operator's read-only calls: operators only.
async fn operator_list_cells(o: &mut Operator, who: usize) {
    let name = CALLERS[who];
    assert_eq!(
        code_of(&o.list_mailboxes(pb::ListMailboxesRequest::default()).await),
        operator_only(who, None),
        "{name} list_mailboxes"
    );
    assert_eq!(
        code_of(
            &o.list_quarantine(pb::ListQuarantineRequest::default())
                .await
        ),
        operator_only(who, None),
        "{name} list_quarantine"
    );
    assert_eq!(
        code_of(&o.list_parked(pb::ListParkedRequest::default()).await),
        operator_only(who, None),
        "{name} list_parked"
    );
    assert_eq!(
        code_of(
            &o.list_organisations(pb::ListOrganisationsRequest::default())
                .await
        ),
        operator_only(who, None),
        "{name} list_organisations"
    );
    assert_eq!(
        code_of(
            &o.list_identity_conflicts(pb::ListIdentityConflictsRequest::default())
                .await
        ),
        operator_only(who, None),
        "{name} list_identity_conflicts"
    );
    assert_eq!(
        code_of(&o.retention_status(pb::RetentionStatusRequest {}).await),
        operator_only(who, None),
        "{name} retention_status"
    );
    assert_eq!(
        code_of(&o.get_continuity(pb::GetContinuityRequest::default()).await),
        operator_only(who, None),
        "{name} get_continuity"
    );
}

/// The operator's calls that change or read a record: operators only.
async fn operator_change_cells(
    o: &mut Operator,
    who: usize,
    gp_delivery: &pb::Delivery,
    patient: &Option<pb::PatientRef>,
) {
    let name = CALLERS[who];
    let redrive = o
        .redrive(pb::RedriveRequest {
            target: Some(pb::redrive_request::Target::Deliveries(pb::DeliveryIds {
                ids: vec![gp_delivery.delivery_id],
            })),
        })
        .await;
    assert_eq!(
        code_of(&redrive),
        operator_only(who, None),
        "{name} redrive"
    );
    let claim_parked = o
        .claim_parked(pb::ClaimParkedRequest {
            patient: patient.clone(),
            practice: "YG001".into(),
            reason: "matrix test".into(),
        })
        .await;
    assert_eq!(
        code_of(&claim_parked),
        operator_only(who, Some(Code::NotFound)),
        "{name} claim_parked"
    );
    operator_registry_cells(o, who).await;
    let trail = o
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::HandoverId(1)),
            reason: "matrix test".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code_of(&trail),
        operator_only(who, None),
        "{name} audit_trail"
    );
    let read = o
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: 1,
            reason: "clinical incident review requested by the caldicott guardian".into(),
        })
        .await;
    assert_eq!(
        code_of(&read),
        operator_only(who, None),
        "{name} break_glass_read"
    );
}

/// The registry's changes: operators only.
async fn operator_registry_cells(o: &mut Operator, who: usize) {
    let name = CALLERS[who];
    let put = o
        .put_organisation(pb::PutOrganisationRequest {
            organisation: Some(pb::Organisation {
                ods_code: "YG009".into(),
                kind: pb::OrganisationKind::GpPractice.into(),
                name: "Matrix Practice (invented)".into(),
                format: 0,
                region: String::new(),
                mesh_mailbox: String::new(),
                active: true,
            }),
        })
        .await;
    assert_eq!(
        code_of(&put),
        operator_only(who, None),
        "{name} put_organisation"
    );
    let set = o
        .set_organisation_active(pb::SetOrganisationActiveRequest {
            ods_code: "YG009".into(),
            active: true,
        })
        .await;
    assert_eq!(
        code_of(&set),
        operator_only(who, None),
        "{name} set_organisation_active"
    );
}

#[tokio::test]
async fn break_glass_needs_a_reason_and_is_audited_before_content_is_returned() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    let r = prison
        .submit(release("bg", 77, &["YG001"], "the follow-up marker"))
        .await
        .unwrap()
        .into_inner();
    let mut op = gw.operator().await;
    let before = gw.store.audit_entries().unwrap().len();
    let err = op
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: r.handover_id,
            reason: "because".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["reason"]);
    let read = op
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: r.handover_id,
            reason: "GP practice reports an unreadable summary; checking content".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let summary = read.summary.unwrap();
    assert_eq!(summary.follow_ups[0].service, "the follow-up marker");
    assert_eq!(read.patient.unwrap().nhs_number, nhs(77));
    let entries = gw.store.audit_entries().unwrap();
    let last = entries.last().unwrap();
    // The refused attempt and the read itself.
    assert_eq!(entries.len(), before + 2);
    assert!(
        entries[before]
            .outcome
            .starts_with("refused: InvalidArgument")
    );
    // The refusal is on the patient's trail: it names the handover and the
    // patient the operator reached for, as the read does.
    assert_eq!(entries[before].handover_id, Some(r.handover_id));
    assert!(entries[before].patient_key.is_some());
    assert_eq!(entries[before].patient_key, last.patient_key);
    assert_eq!(last.action, "break_glass_read");
    assert_eq!(last.actor, "urn:operator:oncall");
    assert_eq!(last.handover_id, Some(r.handover_id));
    assert!(last.outcome.contains("unreadable summary"));
    // Asking for a handover that is not there is on the trail under the id
    // asked for, with the reason given: probing ids leaves a trace.
    let missing = r.handover_id + 1_000;
    let err = op
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: missing,
            reason: "GP practice reports an unreadable summary; checking content".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let entries = gw.store.audit_entries().unwrap();
    let probe = entries.last().unwrap();
    assert_eq!(
        (probe.action.as_str(), probe.handover_id),
        ("break_glass_read", Some(missing)),
        "{probe:?}"
    );
    assert!(probe.outcome.starts_with("refused: "), "{probe:?}");
    assert!(probe.outcome.contains("unreadable summary"), "{probe:?}");
    // An organisation's certificate reaching for it: refused, and on the
    // patient's trail too.
    let err = gw
        .operator_as("YP001")
        .await
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: r.handover_id,
            reason: "GP practice reports an unreadable summary; checking content".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let entries = gw.store.audit_entries().unwrap();
    let reached = entries.last().unwrap();
    assert_eq!(reached.actor, "urn:ods:YP001");
    assert_eq!(reached.handover_id, Some(r.handover_id), "{reached:?}");
    assert_eq!(reached.patient_key, last.patient_key, "{reached:?}");
    gw.stop().await;
}

/// An organisation acknowledging another's delivery is answered exactly as
/// for an id that does not exist (nothing leaks), and the trail records the
/// attempt against that delivery and its patient, so reaching for another
/// organisation's records is seen on the patient's trail.
#[tokio::test]
async fn acking_another_organisations_delivery_is_not_found_and_on_its_patients_trail() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("probe", 78, &["YG001"], "probe marker"))
        .await
        .unwrap();
    let d = gw
        .client("YG001")
        .await
        .pull(pull(1))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0]
        .clone();
    let mut other = gw.client("YG002").await;
    let theirs = other
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await
        .unwrap_err();
    let missing = other
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id + 1_000,
            attempt: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (theirs.code(), theirs.message()),
        (missing.code(), missing.message()),
        "another's delivery must read as no delivery"
    );
    assert_eq!(theirs.code(), tonic::Code::NotFound);
    let entries = gw.store.audit_entries().unwrap();
    let probe = entries
        .iter()
        .find(|e| e.action == "ack" && e.actor == "urn:ods:YG002" && e.delivery_id.is_some())
        .expect("the attempt on another's delivery is recorded against it");
    assert_eq!(probe.delivery_id, Some(d.delivery_id), "{probe:?}");
    assert_eq!(probe.handover_id, Some(d.handover_id), "{probe:?}");
    assert!(probe.patient_key.is_some(), "{probe:?}");
    assert!(
        probe.outcome.contains("another organisation's"),
        "{probe:?}"
    );
    // The made-up id names nothing.
    let made_up = entries
        .iter()
        .rev()
        .find(|e| e.action == "ack" && e.actor == "urn:ods:YG002")
        .unwrap();
    assert_eq!(made_up.delivery_id, None, "{made_up:?}");
    // Refused before the store (no attempt 0 is ever leased): on the
    // patient's trail, saying whose delivery it is.
    let err = other
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let entries = gw.store.audit_entries().unwrap();
    let early = entries.last().unwrap();
    assert_eq!(early.delivery_id, Some(d.delivery_id), "{early:?}");
    assert!(
        early.outcome.ends_with("(another organisation's delivery)"),
        "{early:?}"
    );
    // An operator's certificate is no mailbox: refused before the store,
    // and still on the patient's trail.
    let err = gw
        .client("operator-oncall")
        .await
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let entries = gw.store.audit_entries().unwrap();
    let reached = entries.last().unwrap();
    assert_eq!(reached.actor, "urn:operator:oncall", "{reached:?}");
    assert_eq!(reached.delivery_id, Some(d.delivery_id), "{reached:?}");
    assert_eq!(reached.patient_key, probe.patient_key, "{reached:?}");
    gw.stop().await;
}

/// A sender tracking another sender's handover is answered exactly as for
/// an id that does not exist, and the trail records the attempt against
/// that handover and its patient (it recorded neither), on both engines.
/// An operator's audit query by handover id is itself on that patient's
/// trail (it was on no patient's).
#[tokio::test]
async fn tracking_another_senders_handover_is_on_its_patients_trail() {
    tracking_another_senders_handover_is_on_its_patients_trail_on(Engine::Sled).await;
}

#[tokio::test]
async fn tracking_another_senders_handover_is_on_its_patients_trail_on_postgres() {
    tracking_another_senders_handover_is_on_its_patients_trail_on(Engine::Postgres).await;
}

async fn tracking_another_senders_handover_is_on_its_patients_trail_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let id = prison
        .submit(release("tracked", 79, &["YG001"], "marker"))
        .await
        .unwrap()
        .into_inner()
        .handover_id;
    let track = |id: u64| pb::TrackRequest {
        handover: Some(pb::track_request::Handover::HandoverId(id)),
    };
    let mut other = gw.client("YP002").await;
    let theirs = other.track(track(id)).await.unwrap_err();
    let missing = other.track(track(id + 1_000)).await.unwrap_err();
    assert_eq!(
        (theirs.code(), theirs.message()),
        (missing.code(), missing.message())
    );
    let mut op = gw.operator().await;
    let trail = op
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(79))),
            reason: "investigating a probe".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let probe = trail
        .iter()
        .find(|e| e.action == "track" && e.actor == "urn:ods:YP002")
        .expect("the probe is on the patient's trail");
    assert_eq!(probe.handover_id, id);
    assert!(probe.outcome.contains("another sender's"), "{probe:?}");
    // A query by handover id, then by the patient: the first is on the trail.
    op.audit_trail(pb::AuditTrailRequest {
        subject: Some(pb::audit_trail_request::Subject::HandoverId(id)),
        reason: "checking one handover".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let trail = op
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(79))),
            reason: "who looked".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        trail
            .iter()
            .any(|e| e.action == "audit_query" && e.outcome.contains("checking one handover")),
        "{trail:?}"
    );
    gw.stop().await;
}

/// `tls.operators` lists the operators a gateway accepts: an operator
/// certificate the CA issued for anyone else is refused on every operator
/// call, break-glass included, and the refusal is audited.
#[tokio::test]
async fn an_operator_not_listed_in_tls_operators_is_refused() {
    let listed = TestGateway::start_with(
        |c| c.tls.operators = Some(vec!["oncall".into()]),
        Arc::new(SystemClock),
    )
    .await;
    let mut op = listed.operator().await;
    op.list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap();
    listed.stop().await;

    let gw = TestGateway::start_with(
        |c| c.tls.operators = Some(vec!["caldicott-guardian".into()]),
        Arc::new(SystemClock),
    )
    .await;
    let mut op = gw.operator().await;
    let err = op
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = op
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: 1,
            reason: "clinical incident review requested by the caldicott guardian".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let refused = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.actor == "urn:operator:oncall" && e.outcome.starts_with("refused"))
        .count();
    assert_eq!(refused, 2);
    gw.stop().await;
}

#[test]
fn an_operator_name_in_tls_operators_must_be_one_a_certificate_can_carry() {
    let mut config = throughcare::config::Config::default();
    config.tls.operators = Some(vec!["oncall".into(), "on call".into()]);
    let err = config.validate().unwrap_err();
    assert_eq!(err.field, "tls.operators[1]");
}
