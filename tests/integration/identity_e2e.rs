//! One patient across identifiers, and corrections that retire every stale
//! copy, end to end over real mutual TLS (issue 9's three cases and the
//! rules around them), on both store engines.

use crate::support;

use support::*;
use throughcare::clinical::ClinicalSummary;
use throughcare::grpc::pb;
use tonic::Code;

const PRISON_NUMBER: &str = "A1234BC";
const DOB: &str = "1985-06-15";

/// Invented patient `patient` from YP001: NHS number and prison number as asked.
fn summary(patient: u32, with_nhs: bool, prison: Option<&str>, marker: &str) -> ClinicalSummary {
    throughcare::clinical::synthetic::release_summary(
        with_nhs.then(|| nhs(patient).parse().unwrap()),
        prison.map(|p| p.parse().unwrap()),
        "YP001".parse().unwrap(),
        None,
        marker,
    )
}

fn submit(
    id: &str,
    event: pb::JourneyEvent,
    to: &[&str],
    s: &ClinicalSummary,
) -> pb::SubmitRequest {
    throughcare::cli::client::native_submit(id, event, to, s)
}

fn states(t: &pb::TrackResponse) -> Vec<(String, pb::DeliveryState)> {
    t.deliveries
        .iter()
        .map(|d| (d.destination.clone(), d.state()))
        .collect()
}

fn claim(nhs_number: &str, prison_number: &str) -> pb::ClaimRequest {
    pb::ClaimRequest {
        patient: Some(pb::PatientRef {
            nhs_number: nhs_number.into(),
            prison_number: prison_number.into(),
            date_of_birth: DOB.into(),
        }),
        evidence: None,
    }
}

#[tokio::test]
async fn a_correction_that_names_a_gp_retires_the_parked_original() {
    a_correction_that_names_a_gp_retires_the_parked_original_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_that_names_a_gp_retires_the_parked_original_on_postgres() {
    a_correction_that_names_a_gp_retires_the_parked_original_on(Engine::Postgres).await;
}

async fn a_correction_that_names_a_gp_retires_the_parked_original_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    let original = prison
        .submit(submit(
            "r-1",
            release,
            &[],
            &summary(1, true, None, "methadone 60 mg"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(original.deliveries[0].destination, "@parked");
    prison
        .submit(submit(
            "r-2",
            release,
            &["YG001"],
            &summary(1, true, None, "methadone 30 mg"),
        ))
        .await
        .unwrap();
    let old = track_message(&mut prison, "r-1").await;
    assert_eq!(
        states(&old),
        [
            ("@parked".to_owned(), pb::DeliveryState::Superseded),
            ("YPR01".to_owned(), pb::DeliveryState::Superseded),
        ]
    );
    assert!(old.deliveries.iter().all(|d| d.superseded_by_handover > 0));
    // Nothing stale is left to claim, by a practice or by an operator.
    let mut other = gw.client("YG002").await;
    let err = other.claim(claim(&nhs(1), "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut op = gw.operator().await;
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(parked.deliveries.is_empty(), "{parked:?}");
    // The named practice gets only the correction. It was never given the
    // parked original, so the correction names nothing it replaces there;
    // the sender's Track keeps the chain as sent.
    let mut gp = gw.client("YG001").await;
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["methadone 30 mg"]
    );
    assert_eq!(got[0].supersedes_handover_id, 0);
    assert_eq!(
        track_message(&mut prison, "r-2")
            .await
            .supersedes_handover_id,
        original.handover_id
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_prison_number_and_an_nhs_number_on_one_summary_are_one_patient() {
    a_prison_number_and_an_nhs_number_on_one_summary_are_one_patient_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_prison_number_and_an_nhs_number_on_one_summary_are_one_patient_on_postgres() {
    a_prison_number_and_an_nhs_number_on_one_summary_are_one_patient_on(Engine::Postgres).await;
}

async fn a_prison_number_and_an_nhs_number_on_one_summary_are_one_patient_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    // Admission with only the prison number (GP known); release later with
    // both numbers, urgent (opioid substitution), to the same practice.
    let mut admitted = summary(2, false, Some(PRISON_NUMBER), "admission");
    admitted.registered_gp = Some("YG001".parse().unwrap());
    prison
        .submit(submit("a-1", pb::JourneyEvent::Admission, &[], &admitted))
        .await
        .unwrap();
    let mut released = summary(2, true, Some(PRISON_NUMBER), "release");
    released.medications[0].opioid_substitution = true;
    released.medications[0].last_dose_given = Some("2026-11-24T08:10:00Z".parse().unwrap());
    let r = prison
        .submit(submit(
            "r-1",
            pb::JourneyEvent::Release,
            &["YG001"],
            &released,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.deliveries[0].urgent, "the release is urgent");
    // Per-patient order holds: the admission notice first, although the
    // release is urgent, and nothing of this patient's overtakes it.
    let mut gp = gw.client("YG001").await;
    let first = gp.pull(pull(50)).await.unwrap().into_inner().deliveries;
    assert_eq!(first.iter().map(text_of).collect::<Vec<_>>(), ["admission"]);
    gp.ack(pb::AckRequest {
        delivery_id: first[0].delivery_id,
        attempt: first[0].attempt,
    })
    .await
    .unwrap();
    let second = pull_and_ack(&mut gp).await;
    assert_eq!(second.iter().map(text_of).collect::<Vec<_>>(), ["release"]);
    // The audit trail by either identifier finds both handovers.
    for subject in [
        pb::audit_trail_request::Subject::PrisonNumber(PRISON_NUMBER.into()),
        pb::audit_trail_request::Subject::NhsNumber(nhs(2)),
    ] {
        let trail = gw
            .operator()
            .await
            .audit_trail(pb::AuditTrailRequest {
                subject: Some(subject),
                reason: "identity test: both handovers found".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let submitted: std::collections::BTreeSet<u64> = trail
            .entries
            .iter()
            .filter(|e| e.action == "submit")
            .map(|e| e.handover_id)
            .collect();
        assert_eq!(submitted.len(), 2, "{trail:?}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_correction_that_adds_the_nhs_number_supersedes_the_parked_original() {
    a_correction_that_adds_the_nhs_number_supersedes_the_parked_original_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_that_adds_the_nhs_number_supersedes_the_parked_original_on_postgres() {
    a_correction_that_adds_the_nhs_number_supersedes_the_parked_original_on(Engine::Postgres).await;
}

async fn a_correction_that_adds_the_nhs_number_supersedes_the_parked_original_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    prison
        .submit(submit(
            "r-1",
            release,
            &[],
            &summary(3, false, Some(PRISON_NUMBER), "stale"),
        ))
        .await
        .unwrap();
    prison
        .submit(submit(
            "r-2",
            release,
            &[],
            &summary(3, true, Some(PRISON_NUMBER), "current"),
        ))
        .await
        .unwrap();
    assert_eq!(
        track_message(&mut prison, "r-1").await.deliveries[0].state(),
        pb::DeliveryState::Superseded
    );
    let mut gp = gw.client("YG002").await;
    let claimed = gp.claim(claim(&nhs(3), "")).await.unwrap().into_inner();
    assert_eq!(claimed.claimed.len(), 1);
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["current"]);
    // Nothing stale stays parked to go overdue.
    let parked = gw
        .operator()
        .await
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(parked.deliveries.is_empty(), "{parked:?}");
    gw.stop().await;
}

#[tokio::test]
async fn claims_find_a_patients_parked_releases_by_either_identifier() {
    claims_find_a_patients_parked_releases_by_either_identifier_on(Engine::Sled).await;
}

#[tokio::test]
async fn claims_find_a_patients_parked_releases_by_either_identifier_on_postgres() {
    claims_find_a_patients_parked_releases_by_either_identifier_on(Engine::Postgres).await;
}

async fn claims_find_a_patients_parked_releases_by_either_identifier_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    // YP001 parks a release known only by NHS number; YP002 later admits the
    // same person with both numbers, linking them.
    let mut first = gw.client("YP001").await;
    first
        .submit(submit(
            "r-1",
            pb::JourneyEvent::Release,
            &[],
            &summary(4, true, None, "from YP001"),
        ))
        .await
        .unwrap();
    let mut second = gw.client("YP002").await;
    let mut admitted = throughcare::clinical::synthetic::release_summary(
        nhs(4).parse().ok(),
        PRISON_NUMBER.parse().ok(),
        "YP002".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        "admission",
    );
    admitted.custody.release_date = None;
    second
        .submit(submit("a-1", pb::JourneyEvent::Admission, &[], &admitted))
        .await
        .unwrap();
    // A wrong date of birth finds nothing, whichever identifier.
    let mut gp = gw.client("YG002").await;
    let mut wrong = claim("", PRISON_NUMBER);
    wrong.patient.as_mut().unwrap().date_of_birth = "1985-06-16".into();
    assert_eq!(gp.claim(wrong).await.unwrap_err().code(), Code::NotFound);
    // The prison number and date of birth claim the release parked by NHS number.
    let claimed = gp
        .claim(claim("", PRISON_NUMBER))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.claimed.len(), 1);
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["from YP001"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_claim_whose_other_identifier_contradicts_the_release_is_refused_and_audited() {
    a_claim_whose_other_identifier_contradicts_the_release_is_refused_and_audited_on(Engine::Sled)
        .await;
}

#[tokio::test]
async fn a_claim_whose_other_identifier_contradicts_the_release_is_refused_and_audited_on_postgres()
{
    a_claim_whose_other_identifier_contradicts_the_release_is_refused_and_audited_on(
        Engine::Postgres,
    )
    .await;
}

async fn a_claim_whose_other_identifier_contradicts_the_release_is_refused_and_audited_on(
    engine: Engine,
) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "r-1",
            pb::JourneyEvent::Release,
            &[],
            &summary(7, true, Some(PRISON_NUMBER), "both numbers"),
        ))
        .await
        .unwrap();
    let mut gp = gw.client("YG002").await;
    // The NHS number and date of birth match; the prison number given is
    // another person's. Either way round, the claim is refused as no match.
    for (nhs_number, prison_number) in [(nhs(7), "B7654CD"), (nhs(8), PRISON_NUMBER)] {
        let err = gp
            .claim(claim(&nhs_number, prison_number))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(!err.message().contains("contradict"), "{err:?}");
    }
    let contradicted = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "claim" && e.outcome.contains("contradicts"))
        .count();
    assert_eq!(
        contradicted, 2,
        "each contradiction is audited at the release"
    );
    // Omitting the prison number, or giving the right one, claims it.
    let claimed = gp
        .claim(claim(&nhs(7), PRISON_NUMBER))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.claimed.len(), 1);
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["both numbers"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_prison_number_linked_to_another_nhs_number_is_refused_and_shown() {
    a_prison_number_linked_to_another_nhs_number_is_refused_and_shown_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_prison_number_linked_to_another_nhs_number_is_refused_and_shown_on_postgres() {
    a_prison_number_linked_to_another_nhs_number_is_refused_and_shown_on(Engine::Postgres).await;
}

async fn a_prison_number_linked_to_another_nhs_number_is_refused_and_shown_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    prison
        .submit(submit(
            "r-1",
            release,
            &["YG001"],
            &summary(5, true, Some(PRISON_NUMBER), "a"),
        ))
        .await
        .unwrap();
    let before = gw.store.content_digest().unwrap();
    let conflicting = submit(
        "r-2",
        release,
        &["YG001"],
        &summary(6, true, Some(PRISON_NUMBER), "b"),
    );
    let err = prison.submit(conflicting.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(violations(&err), ["patient.prison_number"]);
    // FAILED_PRECONDITION's own detail too (google.rpc.PreconditionFailure).
    let failed = {
        use tonic_types::StatusExt;
        err.get_details_precondition_failure()
            .expect("PreconditionFailure")
            .violations
    };
    assert_eq!(
        failed
            .iter()
            .map(|v| (v.r#type.as_str(), v.subject.as_str()))
            .collect::<Vec<_>>(),
        [("IDENTITY_CONFLICT", "patient.prison_number")]
    );
    assert!(!err.message().contains(PRISON_NUMBER) && !err.message().contains(&nhs(6)));
    assert_eq!(
        gw.store.content_digest().unwrap(),
        before,
        "nothing changed"
    );
    let conflicts = gw
        .operator()
        .await
        .list_identity_conflicts(pb::ListIdentityConflictsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .conflicts;
    assert_eq!(conflicts.len(), 1);
    assert_eq!(
        (
            conflicts[0].sender.as_str(),
            conflicts[0].message_id.as_str()
        ),
        ("YP001", "r-2")
    );
    assert_eq!(conflicts[0].field, "patient.prison_number");
    // An NHS number already linked to another prison number likewise.
    let err = prison
        .submit(submit(
            "r-3",
            release,
            &["YG001"],
            &summary(5, true, Some("B1234CD"), "c"),
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["patient.prison_number"]);
    // Until an operator can unlink an identifier, the way through is the
    // sender's (docs/journey.md): unchanged it is refused again; without
    // the identifier in conflict, under a new message id, it is accepted.
    let again = prison.submit(conflicting).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let through = prison
        .submit(submit(
            "r-2b",
            release,
            &["YG001"],
            &summary(6, true, None, "b"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(through.deliveries[0].destination, "YG001");
    gw.stop().await;
}

#[tokio::test]
async fn a_leased_copy_stays_with_its_recipient_and_is_never_offered_again() {
    a_leased_copy_stays_with_its_recipient_and_is_never_offered_again_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_leased_copy_stays_with_its_recipient_and_is_never_offered_again_on_postgres() {
    a_leased_copy_stays_with_its_recipient_and_is_never_offered_again_on(Engine::Postgres).await;
}

async fn a_leased_copy_stays_with_its_recipient_and_is_never_offered_again_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    let original = prison
        .submit(submit(
            "r-1",
            release,
            &["YG001"],
            &summary(7, true, None, "first"),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut gp = gw.client("YG001").await;
    let leased = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(leased.iter().map(text_of).collect::<Vec<_>>(), ["first"]);
    prison
        .submit(submit(
            "r-2",
            release,
            &["YG001"],
            &summary(7, true, None, "second"),
        ))
        .await
        .unwrap();
    let old = track_message(&mut prison, "r-1").await;
    assert_eq!(old.deliveries[0].state(), pb::DeliveryState::Leased);
    assert!(old.deliveries[0].superseded_by > 0, "marked while leased");
    // The recipient gives it back: retired, not queued again nor quarantined.
    let state = gp
        .nack(pb::NackRequest {
            delivery_id: leased[0].delivery_id,
            attempt: leased[0].attempt,
            permanent: false,
            reason: "system busy".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state();
    assert_eq!(state, pb::DeliveryState::Superseded);
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["second"]);
    assert_eq!(got[0].supersedes_handover_id, original.handover_id);
    assert!(pull_and_ack(&mut gp).await.is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn a_summary_that_a_late_link_makes_newer_names_the_one_it_replaces() {
    a_summary_that_a_late_link_makes_newer_names_the_one_it_replaces_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_summary_that_a_late_link_makes_newer_names_the_one_it_replaces_on_postgres() {
    a_summary_that_a_late_link_makes_newer_names_the_one_it_replaces_on(Engine::Postgres).await;
}

/// Two releases known apart (one by prison number, one by NHS number) are
/// found to be one patient by a later admission carrying both: the later
/// release retires the earlier's copies and says it replaces it, so the GP
/// who was given the earlier one knows.
async fn a_summary_that_a_late_link_makes_newer_names_the_one_it_replaces_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    let first = prison
        .submit(submit(
            "late-1",
            release,
            &["YG001"],
            &summary(11, false, Some("A7777AA"), "by prison number"),
        ))
        .await
        .unwrap()
        .into_inner()
        .handover_id;
    let mut gp = gw.client("YG001").await;
    let leased = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(leased.len(), 1);
    prison
        .submit(submit(
            "late-2",
            release,
            &["YG001"],
            &summary(11, true, None, "by NHS number"),
        ))
        .await
        .unwrap();
    // The link: an admission elsewhere with both numbers.
    let mut both = summary(11, true, Some("A7777AA"), "admission");
    both.custody.release_date = None;
    both.custody.release_address = None;
    prison
        .submit(submit("late-adm", pb::JourneyEvent::Admission, &[], &both))
        .await
        .unwrap();
    assert_eq!(
        track_message(&mut prison, "late-2")
            .await
            .supersedes_handover_id,
        first
    );
    gp.ack(pb::AckRequest {
        delivery_id: leased[0].delivery_id,
        attempt: leased[0].attempt,
    })
    .await
    .unwrap();
    let got = pull_and_ack(&mut gp).await;
    let newer: Vec<_> = got
        .iter()
        .filter(|d| text_of(d) == "by NHS number")
        .collect();
    assert_eq!(
        newer.len(),
        1,
        "{:?}",
        got.iter().map(text_of).collect::<Vec<_>>()
    );
    assert_eq!(newer[0].supersedes_handover_id, first);
    gw.stop().await;
}

#[tokio::test]
async fn a_prison_number_found_again_with_another_date_of_birth_is_refused() {
    a_prison_number_found_again_with_another_date_of_birth_is_refused_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_prison_number_found_again_with_another_date_of_birth_is_refused_on_postgres() {
    a_prison_number_found_again_with_another_date_of_birth_is_refused_on(Engine::Postgres).await;
}

/// A prison number has no check digit: one mistyped is another prisoner's.
/// A summary whose prison number is known with another date of birth is
/// refused, naming the date of birth, and changes nothing: before, it was
/// filed as that other patient, retired that patient's undelivered copies
/// and (given an NHS number) merged the two for good. The same prison
/// number with its own date of birth is the same patient, as before.
async fn a_prison_number_found_again_with_another_date_of_birth_is_refused_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    prison
        .submit(submit(
            "x-1",
            release,
            &["YG001"],
            &summary(11, false, Some(PRISON_NUMBER), "x"),
        ))
        .await
        .unwrap();
    let before = gw.store.content_digest().unwrap();
    let someone_else = |with_nhs: bool, marker: &str| {
        let mut s = summary(12, with_nhs, Some(PRISON_NUMBER), marker);
        s.patient.date_of_birth = "1991-02-03".parse().unwrap();
        s
    };
    for (id, with_nhs) in [("y-1", false), ("y-2", true)] {
        let err = prison
            .submit(submit(
                id,
                release,
                &["YG001"],
                &someone_else(with_nhs, "y"),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{id}: {err:?}");
        assert_eq!(violations(&err), ["patient.date_of_birth"], "{id}");
        assert_eq!(
            gw.store.content_digest().unwrap(),
            before,
            "{id}: nothing changed"
        );
    }
    let x = track_message(&mut prison, "x-1").await;
    assert_eq!(
        states(&x)[0],
        ("YG001".to_owned(), pb::DeliveryState::Queued)
    );
    // The patient's own correction (same prison number, same date of birth).
    prison
        .submit(submit(
            "x-2",
            release,
            &["YG001"],
            &summary(11, false, Some(PRISON_NUMBER), "x corrected"),
        ))
        .await
        .unwrap();
    let x = track_message(&mut prison, "x-1").await;
    assert_eq!(
        states(&x)[0],
        ("YG001".to_owned(), pb::DeliveryState::Superseded)
    );
    gw.stop().await;
}

#[tokio::test]
async fn only_a_prison_links_a_prison_number_to_a_patient() {
    only_a_prison_links_a_prison_number_to_a_patient_on(Engine::Sled).await;
}

#[tokio::test]
async fn only_a_prison_links_a_prison_number_to_a_patient_on_postgres() {
    only_a_prison_links_a_prison_number_to_a_patient_on(Engine::Postgres).await;
}

/// A practice's community summary that names a prison number beside the
/// NHS number is checked against the links but links nothing: a practice
/// (or anyone who can send one) naming an invented prison number would
/// otherwise bind it to the patient and have the prison's own summaries
/// with the real number refused after.
async fn only_a_prison_links_a_prison_number_to_a_patient_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut gp = gw.client("YG001").await;
    let mut s = summary(13, true, Some("Z9999ZZ"), "community");
    s.author.organisation = "YG001".parse().unwrap();
    gp.submit(submit("cs-1", pb::JourneyEvent::CommunitySummary, &[], &s))
        .await
        .unwrap();
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "r-1",
            pb::JourneyEvent::Release,
            &["YG001"],
            &summary(13, true, Some(PRISON_NUMBER), "release"),
        ))
        .await
        .expect("the prison's own prison number is not refused");
    // The prison's link holds, and a practice contradicting it is refused.
    let mut s = summary(13, true, Some("Z9999ZZ"), "community 2");
    s.author.organisation = "YG001".parse().unwrap();
    let err = gp
        .submit(submit("cs-2", pb::JourneyEvent::CommunitySummary, &[], &s))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["patient.prison_number"]);
    // The refusal is on the patient's trail.
    let trail = gw
        .operator()
        .await
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(13))),
            reason: "review of a refused summary".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        trail.iter().any(|e| e.actor.ends_with("YG001")
            && e.outcome
                .starts_with("refused: identity conflict on patient.prison_number")),
        "{trail:?}"
    );
    gw.stop().await;
}

/// An operator's claim by prison number, for a patient whose summary
/// carried both numbers, puts its recorded reason on that patient's trail
/// (found by NHS number): it was written under the prison number's own
/// hash, which is no patient's once linked, so it was on no trail at all.
#[tokio::test]
async fn an_operators_claim_by_one_number_is_on_the_patients_trail() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "p-1",
            pb::JourneyEvent::Release,
            &[],
            &summary(14, true, Some(PRISON_NUMBER), "parked"),
        ))
        .await
        .unwrap();
    let mut op = gw.operator().await;
    op.claim_parked(pb::ClaimParkedRequest {
        patient: Some(pb::PatientRef {
            nhs_number: String::new(),
            prison_number: PRISON_NUMBER.into(),
            date_of_birth: DOB.into(),
        }),
        practice: "YG002".into(),
        reason: "registered at Hillview, confirmed by phone".into(),
    })
    .await
    .unwrap();
    let trail = op
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(14))),
            reason: "review of a claim".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let reason = trail
        .iter()
        .find(|e| e.action == "claim_parked")
        .expect("the operator's reason is on the patient's trail");
    assert!(reason.outcome.starts_with("requested: "), "{reason:?}");
    assert!(
        trail
            .iter()
            .any(|e| e.action == "claim" && e.outcome.starts_with("ok")),
        "{trail:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn after_a_merge_a_correction_tells_the_recipients_of_both_patients_summaries() {
    after_a_merge_a_correction_tells_both_on(Engine::Sled).await;
}

#[tokio::test]
async fn after_a_merge_a_correction_tells_the_recipients_of_both_patients_summaries_on_postgres() {
    after_a_merge_a_correction_tells_both_on(Engine::Postgres).await;
}

/// One person known as two patients: by prison number (a release to one
/// practice) and by NHS number (a release and its correction to another).
/// The submit that carries both merges them. Only the newer summary was
/// linked to the older one when it named none; here it named its own
/// correction, so the first practice's summary fell out of the chain and
/// that practice was never told the release it holds no longer applies.
async fn after_a_merge_a_correction_tells_both_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    let s = |with_nhs: bool, with_prison: bool, gp: &str, marker: &str| {
        throughcare::clinical::synthetic::release_summary(
            with_nhs.then(|| nhs(71).parse().unwrap()),
            with_prison.then(|| "A7171AA".parse().unwrap()),
            "YP001".parse().unwrap(),
            Some(gp.parse().unwrap()),
            marker,
        )
    };
    let mut first_gp = gw.client("YG001").await;
    let mut second_gp = gw.client("YG002").await;
    prison
        .submit(submit(
            "mg-1",
            release,
            &[],
            &s(false, true, "YG001", "first"),
        ))
        .await
        .unwrap();
    assert_eq!(pull_and_ack(&mut first_gp).await.len(), 1);
    for (id, marker) in [("mg-2", "second"), ("mg-3", "third")] {
        prison
            .submit(submit(id, release, &[], &s(true, false, "YG002", marker)))
            .await
            .unwrap();
        assert_eq!(pull_and_ack(&mut second_gp).await.len(), 1, "{id}");
    }
    // Both numbers: one patient, whose release goes to the second practice.
    prison
        .submit(submit(
            "mg-4",
            release,
            &[],
            &s(true, true, "YG002", "fourth"),
        ))
        .await
        .unwrap();
    let told = pull_and_ack(&mut first_gp).await;
    assert_eq!(
        told.iter().map(text_of).collect::<Vec<_>>(),
        [""],
        "a withdrawal notice for the first practice's summary"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_practice_guessing_a_date_of_birth_by_summary_is_counted_as_a_claim() {
    guessing_by_summary_is_counted_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_practice_guessing_a_date_of_birth_by_summary_is_counted_as_a_claim_on_postgres() {
    guessing_by_summary_is_counted_on(Engine::Postgres).await;
}

/// A practice's community summary naming its patient by prison number
/// alone is refused when the date of birth is not the one the number came
/// with. Each such refusal counts as a failed claim: the fifth locks the
/// practice out for that patient, by summary and by claim, so that it
/// cannot learn the date of birth that opens the patient's parked release.
async fn guessing_by_summary_is_counted_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "r-1",
            pb::JourneyEvent::Release,
            &[],
            &summary(21, false, Some(PRISON_NUMBER), "parked"),
        ))
        .await
        .unwrap();
    let mut gp = gw.client("YG002").await;
    let guess = |n: u32, dob: &str| {
        let mut s = summary(21, false, Some(PRISON_NUMBER), "community");
        s.author.organisation = "YG002".parse().unwrap();
        s.patient.date_of_birth = dob.parse().unwrap();
        submit(
            &format!("cs-{n}"),
            pb::JourneyEvent::CommunitySummary,
            &[],
            &s,
        )
    };
    // A summary with the right date of birth is taken, and not counted.
    gp.submit(guess(0, DOB)).await.unwrap();
    for n in 1..=5 {
        let err = gp
            .submit(guess(n, &format!("1970-01-0{n}")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(violations(&err), ["patient.date_of_birth"]);
        // The same summary again (a retry, a MESH message polled again) is
        // refused again but tries nothing new: not counted.
        if n == 1 {
            for _ in 0..3 {
                let err = gp.submit(guess(1, "1970-01-01")).await.unwrap_err();
                assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            }
        }
    }
    // Locked: the right date of birth is refused too, and stores nothing.
    let err = gp.submit(guess(6, DOB)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // A retry of the summary taken before is answered as it was.
    let again = gp.submit(guess(0, DOB)).await.unwrap().into_inner();
    assert!(again.duplicate);
    let err = gp
        .claim(pb::ClaimRequest {
            patient: Some(pb::PatientRef {
                nhs_number: String::new(),
                prison_number: PRISON_NUMBER.into(),
                date_of_birth: DOB.into(),
            }),
            evidence: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let failures = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "claim_failure")
        .count();
    assert_eq!(failures, 5);
    gw.stop().await;
}
