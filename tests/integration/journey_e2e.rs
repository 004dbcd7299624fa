//! The offender journey end to end over real mutual TLS: routing rules,
//! supersession, urgency, parked releases and claims, deadlines, the
//! registry, and the operator calls that manage them.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use throughcare::clinical::ClinicalSummary;
use throughcare::clinical::model::{RiskFlag, RiskKind};
use throughcare::grpc::pb;
use throughcare::store::SystemClock;
use tonic::Code;

/// Invented patient `patient`'s summary from YP001 with registered GP `gp`.
fn summary(patient: u32, gp: Option<&str>, marker: &str) -> ClinicalSummary {
    throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        gp.map(|g| g.parse().unwrap()),
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

/// The GP YG001's record of `patient`, for the prison it names.
fn gp_record(patient: u32, prison: &str) -> ClinicalSummary {
    let mut record = summary(patient, Some("YG001"), "from the GP");
    record.author.organisation = "YG001".parse().unwrap();
    record.custody.establishment = prison.parse().unwrap();
    record
}

fn transfer(patient: u32, marker: &str) -> ClinicalSummary {
    let mut s = summary(patient, Some("YG001"), marker);
    s.custody.transfer_to = Some("YP002".parse().unwrap());
    s.custody.transfer_at = Some("2030-01-01T09:00:00Z".parse().unwrap());
    s.custody.release_date = None;
    s
}

fn patient_ref(patient: u32) -> pb::PatientRef {
    pb::PatientRef {
        nhs_number: nhs(patient),
        prison_number: String::new(),
        date_of_birth: "1985-06-15".into(),
    }
}

#[tokio::test]
async fn the_rules_choose_the_recipients_and_check_named_ones() {
    the_rules_choose_the_recipients_and_check_named_ones_on(Engine::Sled).await;
}

#[tokio::test]
async fn the_rules_choose_the_recipients_and_check_named_ones_on_postgres() {
    the_rules_choose_the_recipients_and_check_named_ones_on(Engine::Postgres).await;
}

async fn the_rules_choose_the_recipients_and_check_named_ones_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    // A release with no destinations: the registered GP and the prison's region.
    let r = prison
        .submit(submit(
            "rel",
            pb::JourneyEvent::Release,
            &[],
            &summary(1, Some("YG002"), "m"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YG002", "YPR01"]);
    // An admission goes to the registered GP as a notice.
    let r = prison
        .submit(submit(
            "adm",
            pb::JourneyEvent::Admission,
            &[],
            &summary(2, Some("YG001"), "m"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deliveries[0].destination, "YG001");
    // The GP's community summary goes back to the admitting prison.
    let mut gp = gw.client("YG001").await;
    let r = gp
        .submit(submit("cs", pb::JourneyEvent::CommunitySummary, &[], &{
            let mut s = summary(2, Some("YG001"), "community");
            s.author.organisation = "YG001".parse().unwrap();
            s
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deliveries[0].destination, "YP001");
    // A named destination the rules do not choose is refused, naming it, and
    // nothing is stored.
    let before = gw.store.content_digest().unwrap();
    let err = prison
        .submit(submit(
            "bad-transfer",
            pb::JourneyEvent::Transfer,
            &["YP001"],
            &transfer(3, "t"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), ["destinations[0]"]);
    assert!(
        err.message().contains("receiving prison"),
        "{}",
        err.message()
    );
    assert_eq!(gw.store.content_digest().unwrap(), before);
    gw.stop().await;
}

#[tokio::test]
async fn a_community_summary_follows_the_patient_to_the_prison_they_were_transferred_to() {
    a_community_summary_follows_the_patient_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_community_summary_follows_the_patient_to_the_prison_they_were_transferred_to_on_postgres()
 {
    a_community_summary_follows_the_patient_on(Engine::Postgres).await;
}

/// The practice answers an admission notice with its record, naming the
/// admitting prison (what the notice told it). The patient was moved on
/// meanwhile: the record went to the prison they left, and the one that
/// holds them (prescribing, on reception) never had it. It goes where the
/// patient is now, found by either identifier.
async fn a_community_summary_follows_the_patient_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let numbered = |mut s: ClinicalSummary| {
        s.patient.prison_number = Some("A4141AA".parse().unwrap());
        s
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "in",
            pb::JourneyEvent::Admission,
            &[],
            &numbered(summary(41, Some("YG001"), "in")),
        ))
        .await
        .unwrap();
    prison
        .submit(submit(
            "moved",
            pb::JourneyEvent::Transfer,
            &[],
            &numbered(transfer(41, "moved")),
        ))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    let community = |message_id: &str, prison_number_only: bool| {
        let mut s = numbered(summary(41, Some("YG001"), "community record"));
        s.author.organisation = "YG001".parse().unwrap();
        if prison_number_only {
            s.patient.nhs_number = None;
        }
        submit(message_id, pb::JourneyEvent::CommunitySummary, &[], &s)
    };
    for (message_id, prison_number_only) in [("cs-1", false), ("cs-2", true)] {
        let r = gp
            .submit(community(message_id, prison_number_only))
            .await
            .unwrap()
            .into_inner();
        let to: Vec<_> = r
            .deliveries
            .iter()
            .map(|d| d.destination.as_str())
            .collect();
        assert_eq!(to, ["YP002"], "{message_id}");
    }
    let mut now_at = gw.client("YP002").await;
    // One of a patient's deliveries at a time, in order.
    let mut events = Vec::new();
    for _ in 0..4 {
        events.extend(pull_and_ack(&mut now_at).await.iter().map(|d| d.event()));
    }
    // The second replaced the first, undelivered (one lineage).
    assert_eq!(
        events,
        [
            pb::JourneyEvent::Transfer,
            pb::JourneyEvent::CommunitySummary
        ]
    );
    assert!(
        pull_and_ack(&mut prison).await.is_empty(),
        "nothing to the prison they left"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_community_summary_waits_for_a_disabled_prison_that_holds_the_patient() {
    a_community_summary_waits_for_a_disabled_prison_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_community_summary_waits_for_a_disabled_prison_that_holds_the_patient_on_postgres() {
    a_community_summary_waits_for_a_disabled_prison_on(Engine::Postgres).await;
}

/// The prison that holds the patient is disabled (a registry error, a
/// system being replaced) when the GP's record arrives: it waits for that
/// prison, which pulls it once enabled again; it went to the prison the
/// patient had left.
async fn a_community_summary_waits_for_a_disabled_prison_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut first = gw.client("YP001").await;
    first.submit(admission("adm-64", 64)).await.unwrap();
    let moved = submit(
        "t-64",
        pb::JourneyEvent::Transfer,
        &[],
        &transfer(64, "moved"),
    );
    first.submit(moved).await.unwrap();
    let mut second = gw.client("YP002").await;
    assert_eq!(pull_and_ack(&mut second).await.len(), 1);
    let mut op = gw.operator().await;
    let active = |active: bool| pb::SetOrganisationActiveRequest {
        ods_code: "YP002".into(),
        active,
    };
    op.set_organisation_active(active(false)).await.unwrap();
    let mut c = summary(64, Some("YG001"), "from the GP");
    c.author.organisation = "YG001".parse().unwrap();
    let cs = submit("cs-64", pb::JourneyEvent::CommunitySummary, &[], &c);
    let r = gw
        .client("YG001")
        .await
        .submit(cs)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YP002"]);
    assert!(
        pull_and_ack(&mut first).await.is_empty(),
        "not the prison left"
    );
    op.set_organisation_active(active(true)).await.unwrap();
    let got = pull_and_ack(&mut second).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["from the GP"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_corrected_custody_event_is_no_move_for_a_community_summary() {
    a_corrected_custody_event_is_no_move_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_corrected_custody_event_is_no_move_for_a_community_summary_on_postgres() {
    a_corrected_custody_event_is_no_move_on(Engine::Postgres).await;
}

/// Where the patient is now is the movement reported last, not the latest
/// correction: an admission corrected after a transfer, or a first transfer
/// corrected after the patient came back, sent the GP's record to a prison
/// the patient had left.
async fn a_corrected_custody_event_is_no_move_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    let community = |patient: u32, id: &str| {
        let mut c = summary(patient, Some("YG001"), id);
        c.author.organisation = "YG001".parse().unwrap();
        submit(id, pb::JourneyEvent::CommunitySummary, &[], &c)
    };
    // Patient 62: admitted at YP001, moved to YP002, then YP001 corrects
    // the admission.
    first.submit(admission("adm-62", 62)).await.unwrap();
    let moved = submit("t-62", t, &[], &transfer(62, "moved"));
    first.submit(moved).await.unwrap();
    first.submit(admission("adm-62b", 62)).await.unwrap();
    let r = gp
        .submit(community(62, "cs-62"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        destinations(&r),
        ["YP002"],
        "the correction is no re-admission"
    );
    // Patient 63: YP001 -> YP002 -> YP001, then YP001 corrects its transfer.
    first
        .submit(submit("t-63", t, &[], &transfer(63, "out")))
        .await
        .unwrap();
    let mut back = transfer(63, "back");
    written_by(&mut back, "YP002");
    back.custody.transfer_to = Some("YP001".parse().unwrap());
    back.custody.transfer_at = Some("2030-01-02T09:00:00Z".parse().unwrap());
    second
        .submit(submit("t-63-back", t, &[], &back))
        .await
        .unwrap();
    first
        .submit(submit("t-63b", t, &[], &transfer(63, "out, corrected")))
        .await
        .unwrap();
    let r = gp
        .submit(community(63, "cs-63"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YP001"], "back at the first prison");
    // Patient 64: the same, but the correction writes the transfer's time
    // with another offset: the same moment is the same movement.
    first
        .submit(submit("t-64", t, &[], &transfer(64, "out")))
        .await
        .unwrap();
    let mut back = transfer(64, "back");
    written_by(&mut back, "YP002");
    back.custody.transfer_to = Some("YP001".parse().unwrap());
    back.custody.transfer_at = Some("2030-01-02T09:00:00Z".parse().unwrap());
    second
        .submit(submit("t-64-back", t, &[], &back))
        .await
        .unwrap();
    let mut corrected = transfer(64, "out, corrected");
    corrected.custody.transfer_at = Some("2030-01-01T10:00:00+01:00".parse().unwrap());
    first
        .submit(submit("t-64b", t, &[], &corrected))
        .await
        .unwrap();
    let r = gp
        .submit(community(64, "cs-64"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        destinations(&r),
        ["YP001"],
        "09:00Z and 10:00+01:00 are one transfer"
    );
    gw.stop().await;
}

#[tokio::test]
async fn summaries_a_prison_never_pulled_go_on_with_the_patient_it_transfers() {
    summaries_go_on_with_the_patient_on(Engine::Sled).await;
}

#[tokio::test]
async fn summaries_a_prison_never_pulled_go_on_with_the_patient_it_transfers_on_postgres() {
    summaries_go_on_with_the_patient_on(Engine::Postgres).await;
}

type Client = pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>;

/// A client of prison `ods`, added to the registry by an operator and
/// given a certificate by the dev CA.
async fn prison_added(gw: &TestGateway, ods: &str) -> Client {
    let name = format!("HMP {ods} (invented)");
    let prison = organisation(ods, pb::OrganisationKind::Prison, &name);
    gw.operator().await.put_organisation(prison).await.unwrap();
    let issued = gw.ca().issue_client_now(&format!("urn:ods:{ods}")).unwrap();
    let (cert, key) = (issued.cert_pem.as_bytes(), issued.key_pem.as_bytes());
    gw.client_with(&gw.ca_pem(), cert, key).await.unwrap()
}

/// (NHS number, marker) of what `client` pulls and acknowledges in
/// `rounds` pulls (one delivery per patient at a time).
async fn markers_pulled(client: &mut Client, rounds: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..rounds {
        for d in pull_and_ack(client).await {
            let marker = text_of(&d);
            got.push((d.patient.unwrap_or_default().nhs_number, marker));
        }
    }
    got
}

/// The markers alone of what `client` pulls and acknowledges in `rounds`
/// pulls ([`markers_pulled`]).
async fn markers_of(client: &mut Client, rounds: usize) -> Vec<String> {
    let got = markers_pulled(client, rounds).await;
    got.into_iter().map(|(_, m)| m).collect()
}

/// `client` acks `d`, leased to it before the patient (and `d`) went on.
async fn a_late_ack_is_not_found(client: &mut Client, d: &pb::Delivery) {
    let late = client
        .ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await
        .expect_err("its lease went with the patient");
    assert_eq!(late.code(), tonic::Code::NotFound, "{late:?}");
}

/// YP001 corrects the transfer summary it sent YP002 for patient 53, sent
/// on to YP003: the patient, and the summary it corrects, are there.
async fn a_correction_follows_where_its_summary_went(
    first: &mut Client,
    second: &mut Client,
    third: &mut Client,
) {
    let r = first
        .submit(submit(
            "t-53b",
            pb::JourneyEvent::Transfer,
            &[],
            &transfer(53, "corrected at Ashdown"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YP003"]);
    let d = pull_and_ack(third).await;
    assert_eq!(
        d.iter().map(text_of).collect::<Vec<_>>(),
        ["corrected at Ashdown"]
    );
    assert!(
        pull_and_ack(second).await.is_empty(),
        "no withdrawal to YP002, never given it"
    );
}

/// A prison that transfers a patient on before acknowledging what was sent
/// to it for them (the previous prison's transfer summary, the GP's record)
/// may never have had it: its own transfer summary does not carry it, and
/// the prison that holds the patient now must get it. What it acknowledged
/// stays with it; a correction of a summary sent on follows it.
async fn summaries_go_on_with_the_patient_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    let onward = |patient: u32, marker: &str| {
        let mut s = transfer(patient, marker);
        written_by(&mut s, "YP002");
        s.custody.transfer_to = Some("YP003".parse().unwrap());
        s
    };
    let community = |patient: u32| {
        let mut c = summary(patient, Some("YG001"), "from the GP");
        c.author.organisation = "YG001".parse().unwrap();
        c.custody.establishment = "YP002".parse().unwrap();
        submit(
            &format!("cs-{patient}"),
            pb::JourneyEvent::CommunitySummary,
            &[],
            &c,
        )
    };
    // Patient 52: YP002 pulled its transfer summary before sending them on.
    first
        .submit(submit(
            "t-52",
            t,
            &[],
            &transfer(52, "pulled at Brackenfield"),
        ))
        .await
        .unwrap();
    assert_eq!(pull_and_ack(&mut second).await.len(), 1);
    // Patient 54: YP002 pulled its transfer summary and never acknowledged
    // it (its system stopped): it may never have read it.
    first
        .submit(submit(
            "t-54",
            t,
            &[],
            &transfer(54, "leased at Brackenfield"),
        ))
        .await
        .unwrap();
    let leased = second.pull(pull(50)).await.unwrap().into_inner().deliveries;
    assert_eq!(leased.len(), 1);
    // Patient 53: nothing pulled at YP002 before it sends them on.
    first
        .submit(submit("t-53", t, &[], &transfer(53, "from Ashdown")))
        .await
        .unwrap();
    gp.submit(community(53)).await.unwrap();
    for patient in [52, 53, 54] {
        second
            .submit(submit(
                &format!("on-{patient}"),
                t,
                &[],
                &onward(patient, "from Brackenfield"),
            ))
            .await
            .unwrap();
    }
    let got = markers_pulled(&mut third, 5).await;
    let of = |patient: u32| -> Vec<&str> {
        got.iter()
            .filter(|(n, _)| *n == nhs(patient))
            .map(|(_, m)| m.as_str())
            .collect()
    };
    assert_eq!(
        of(53),
        ["from Ashdown", "from the GP", "from Brackenfield"],
        "in the order sent"
    );
    assert_eq!(
        of(52),
        ["from Brackenfield"],
        "what YP002 acknowledged stays with it"
    );
    assert_eq!(
        of(54),
        ["leased at Brackenfield", "from Brackenfield"],
        "what YP002 leased and never acknowledged goes on"
    );
    a_late_ack_is_not_found(&mut second, &leased[0]).await;
    assert!(
        pull_and_ack(&mut second).await.is_empty(),
        "nothing left at YP002"
    );
    let trail = gw.store.audit_entries().unwrap();
    let forwards = trail.iter().filter(|e| e.action == "forward").count();
    assert_eq!(forwards, 3, "three summaries sent on, each audited");
    a_correction_follows_where_its_summary_went(&mut first, &mut second, &mut third).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_transfer_corrected_to_another_prison_takes_on_what_waited_at_the_first() {
    corrected_transfer_takes_on_what_waited_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_transfer_corrected_to_another_prison_takes_on_what_waited_at_the_first_on_postgres() {
    corrected_transfer_takes_on_what_waited_on(Engine::Postgres).await;
}

/// YP001 sends patient 61 to YP002 by mistake; the GP's record follows them
/// there, unpulled; YP001 corrects the transfer to YP003. The patient, and
/// the record, must be at YP003; YP002 never had them.
async fn corrected_transfer_takes_on_what_waited_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    first
        .submit(submit(
            "t-61",
            t,
            &[],
            &transfer(61, "sent to Brackenfield"),
        ))
        .await
        .unwrap();
    let record = gp_record(61, "YP002");
    let cs = pb::JourneyEvent::CommunitySummary;
    let r = gp
        .submit(submit("cs-61", cs, &[], &record))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YP002"]);
    let mut corrected = transfer(61, "corrected to Ashdown");
    corrected.custody.transfer_to = Some("YP003".parse().unwrap());
    let r = first
        .submit(submit("t-61b", t, &[], &corrected))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YP003"]);
    let markers = markers_of(&mut third, 3).await;
    assert_eq!(markers, ["from the GP", "corrected to Ashdown"]);
    one_sent_on_nothing_left(&gw, &mut second).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_transfer_corrected_to_another_prison_gives_it_what_the_first_acknowledged() {
    corrected_transfer_resends_what_was_acknowledged_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_transfer_corrected_to_another_prison_gives_it_what_the_first_acknowledged_on_postgres() {
    corrected_transfer_resends_what_was_acknowledged_on(Engine::Postgres).await;
}

/// YP001 sends patient 63 to YP002 by mistake; the GP's record follows them
/// there, and YP002 pulls and acknowledges both; YP001 corrects the transfer
/// to YP003. YP003, where the patient is, must get the GP's record too: a
/// new copy of it, since YP002 keeps what it acknowledged. A record YP002
/// acknowledged before the mistaken transfer is not sent.
async fn corrected_transfer_resends_what_was_acknowledged_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    let cs = pb::JourneyEvent::CommunitySummary;
    // An earlier stay at YP002: the GP's record then, acknowledged there.
    let mut earlier = summary(63, Some("YG002"), "from the other GP, an earlier stay");
    earlier.author.organisation = "YG002".parse().unwrap();
    earlier.custody.establishment = "YP002".parse().unwrap();
    let mut other_gp = gw.client("YG002").await;
    other_gp
        .submit(submit("cs-63-old", cs, &[], &earlier))
        .await
        .unwrap();
    assert_eq!(markers_pulled(&mut second, 1).await.len(), 1);
    first
        .submit(submit(
            "t-63",
            t,
            &[],
            &transfer(63, "sent to Brackenfield"),
        ))
        .await
        .unwrap();
    let record = gp_record(63, "YP002");
    let r = gp
        .submit(submit("cs-63", cs, &[], &record))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YP002"]);
    let markers = markers_of(&mut second, 2).await;
    assert_eq!(markers, ["sent to Brackenfield", "from the GP"]);
    let mut corrected = transfer(63, "corrected to Ashdown");
    corrected.custody.transfer_to = Some("YP003".parse().unwrap());
    let r = first
        .submit(submit("t-63b", t, &[], &corrected))
        .await
        .unwrap()
        .into_inner();
    // YP002, which had the mistaken transfer, is told it is withdrawn.
    assert_eq!(destinations(&r), ["YP003", "YP002"]);
    let markers = markers_of(&mut third, 3).await;
    assert_eq!(markers, ["corrected to Ashdown", "from the GP"]);
    let trail = gw.store.audit_entries().unwrap();
    let sent: Vec<_> = trail.iter().filter(|e| e.action == "forward").collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0].outcome.contains("sent again to YP003"),
        "{:?}",
        sent[0].outcome
    );
    // Sent once: a second correction to the same prison sends nothing more.
    let mut again = transfer(63, "corrected again, still Ashdown");
    again.custody.transfer_to = Some("YP003".parse().unwrap());
    first.submit(submit("t-63c", t, &[], &again)).await.unwrap();
    let markers = markers_of(&mut third, 3).await;
    assert_eq!(markers, ["corrected again, still Ashdown"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_copy_sent_again_and_moved_back_does_not_reach_the_first_prison_twice() {
    sent_again_and_moved_back_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_copy_sent_again_and_moved_back_does_not_reach_the_first_prison_twice_on_postgres() {
    sent_again_and_moved_back_on(Engine::Postgres).await;
}

/// YP001 sends patient 65 to YP002, which acknowledges the GP's record;
/// a correction names YP003, which is sent a new copy; a second correction
/// names YP002 again. The copy waiting at YP003 is not moved back: YP002
/// holds that record already.
async fn sent_again_and_moved_back_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    let cs = pb::JourneyEvent::CommunitySummary;
    first
        .submit(submit(
            "t-65",
            t,
            &[],
            &transfer(65, "sent to Brackenfield"),
        ))
        .await
        .unwrap();
    let record = gp_record(65, "YP002");
    gp.submit(submit("cs-65", cs, &[], &record)).await.unwrap();
    let markers = markers_of(&mut second, 2).await;
    assert_eq!(markers, ["sent to Brackenfield", "from the GP"]);
    let mut corrected = transfer(65, "corrected to Ashdown");
    corrected.custody.transfer_to = Some("YP003".parse().unwrap());
    first
        .submit(submit("t-65b", t, &[], &corrected))
        .await
        .unwrap();
    let back = transfer(65, "Brackenfield after all");
    first.submit(submit("t-65c", t, &[], &back)).await.unwrap();
    let markers = markers_of(&mut second, 3).await;
    assert_eq!(markers, ["Brackenfield after all"], "the GP's record once");
    let markers = markers_of(&mut third, 3).await;
    assert!(!markers.iter().any(|m| m == "from the GP"), "{markers:?}");
    let trail = gw.store.audit_entries().unwrap();
    let held: Vec<_> = trail
        .iter()
        .filter(|e| e.action == "forward" && e.outcome.contains("holds this summary already"))
        .collect();
    assert_eq!(held.len(), 1, "{trail:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_release_corrected_to_another_gp_gives_it_the_transfer_summary_the_first_acknowledged() {
    corrected_release_resends_what_was_acknowledged_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_release_corrected_to_another_gp_gives_it_the_transfer_summary_the_first_acknowledged_on_postgres()
 {
    corrected_release_resends_what_was_acknowledged_on(Engine::Postgres).await;
}

/// YP002 releases patient 64, who came from YP001 with a methadone record
/// it never acknowledged, naming the wrong GP: that practice gets both and
/// acknowledges them. The corrected release names YG002, which must get
/// the previous prison's transfer summary too.
async fn corrected_release_resends_what_was_acknowledged_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut wrong_gp = gw.client("YG001").await;
    let mut right_gp = gw.client("YG002").await;
    let release = pb::JourneyEvent::Release;
    first
        .submit(submit(
            "t-64",
            pb::JourneyEvent::Transfer,
            &[],
            &transfer(64, "titrated at Ashdown"),
        ))
        .await
        .unwrap();
    let mut mistaken = summary(64, Some("YG001"), "released, the wrong GP");
    written_by(&mut mistaken, "YP002");
    let r = second
        .submit(submit("r-64", release, &[], &mistaken))
        .await
        .unwrap()
        .into_inner();
    assert!(destinations(&r).contains(&"YG001"), "{r:?}");
    let markers = markers_of(&mut wrong_gp, 3).await;
    assert_eq!(markers, ["titrated at Ashdown", "released, the wrong GP"]);
    let mut corrected = summary(64, Some("YG002"), "released, the right GP");
    written_by(&mut corrected, "YP002");
    let r = second
        .submit(submit("r-64b", release, &[], &corrected))
        .await
        .unwrap()
        .into_inner();
    assert!(destinations(&r).contains(&"YG002"), "{r:?}");
    let markers = markers_of(&mut right_gp, 3).await;
    assert_eq!(markers, ["released, the right GP", "titrated at Ashdown"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_correction_of_a_summary_sent_again_goes_where_the_patient_is() {
    correction_of_a_resent_summary_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_of_a_summary_sent_again_goes_where_the_patient_is_on_postgres() {
    correction_of_a_resent_summary_on(Engine::Postgres).await;
}

/// YP001's transfer summary for patient 65 waits unpulled at YP002, which
/// transfers the patient to YP003 by mistake: it goes on there and YP003
/// acknowledges it. YP002 corrects the transfer to YP004, which gets it
/// again. YP001 then corrects its summary: the correction goes to YP004,
/// where the patient is, not to YP003, which kept the first copy.
async fn correction_of_a_resent_summary_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut fourth = prison_added(&gw, "YP004").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let t = pb::JourneyEvent::Transfer;
    first
        .submit(submit("t-65", t, &[], &transfer(65, "from Ashdown")))
        .await
        .unwrap();
    let onward = |marker: &str, to: &str| {
        let mut s = transfer(65, marker);
        written_by(&mut s, "YP002");
        s.custody.transfer_to = Some(to.parse().unwrap());
        s.custody.transfer_at = Some("2030-02-01T09:00:00Z".parse().unwrap());
        s
    };
    second
        .submit(submit(
            "t-65-on",
            t,
            &[],
            &onward("to Brackenfield", "YP003"),
        ))
        .await
        .unwrap();
    let markers = markers_of(&mut third, 3).await;
    assert_eq!(markers, ["from Ashdown", "to Brackenfield"]);
    second
        .submit(submit(
            "t-65-on-b",
            t,
            &[],
            &onward("to Corrib, corrected", "YP004"),
        ))
        .await
        .unwrap();
    let markers = markers_of(&mut fourth, 3).await;
    assert_eq!(markers, ["to Corrib, corrected", "from Ashdown"]);
    let r = first
        .submit(submit(
            "t-65b",
            t,
            &[],
            &transfer(65, "from Ashdown, corrected"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r)[0], "YP004", "{r:?}");
    let markers = markers_of(&mut fourth, 3).await;
    assert_eq!(markers, ["from Ashdown, corrected"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_late_correction_sends_nothing_to_a_prison_the_patient_has_left() {
    late_correction_after_a_move_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_late_correction_sends_nothing_to_a_prison_the_patient_has_left_on_postgres() {
    late_correction_after_a_move_on(Engine::Postgres).await;
}

/// YP001 sends patient 66 to YP002 by mistake; they were at YP003, which
/// later transfers them to YP002 for real; the GP's record follows them
/// there and is acknowledged. YP001's correction to YP003, weeks late, must
/// not send YP003 the GP's record: the patient has left it.
async fn late_correction_after_a_move_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    first
        .submit(submit(
            "t-66",
            t,
            &[],
            &transfer(66, "sent to Brackenfield"),
        ))
        .await
        .unwrap();
    let mut real = transfer(66, "from Ashdown, for real");
    written_by(&mut real, "YP003");
    real.custody.transfer_at = Some("2030-03-01T09:00:00Z".parse().unwrap());
    third
        .submit(submit("t-66-real", t, &[], &real))
        .await
        .unwrap();
    let record = gp_record(66, "YP002");
    let cs = pb::JourneyEvent::CommunitySummary;
    gp.submit(submit("cs-66", cs, &[], &record)).await.unwrap();
    let markers = markers_of(&mut second, 4).await;
    assert_eq!(
        markers,
        [
            "sent to Brackenfield",
            "from Ashdown, for real",
            "from the GP"
        ]
    );
    let mut corrected = transfer(66, "corrected to Ashdown");
    corrected.custody.transfer_to = Some("YP003".parse().unwrap());
    first
        .submit(submit("t-66b", t, &[], &corrected))
        .await
        .unwrap();
    let markers = markers_of(&mut third, 3).await;
    assert_eq!(markers, ["corrected to Ashdown"]);
    let trail = gw.store.audit_entries().unwrap();
    assert!(
        !trail.iter().any(|e| e.action == "forward"),
        "nothing sent on"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_release_corrected_twice_gives_the_right_gp_what_the_wrong_one_acknowledged() {
    release_corrected_twice_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_release_corrected_twice_gives_the_right_gp_what_the_wrong_one_acknowledged_on_postgres()
{
    release_corrected_twice_on(Engine::Postgres).await;
}

/// As [`corrected_release_resends_what_was_acknowledged_on`], but YP002
/// first corrects the release's content only, still to the wrong GP: the
/// transfer summary went there with the first release, and still goes to
/// the right GP when the second correction names them.
async fn release_corrected_twice_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut wrong_gp = gw.client("YG001").await;
    let mut right_gp = gw.client("YG002").await;
    let release = pb::JourneyEvent::Release;
    first
        .submit(submit(
            "t-67",
            pb::JourneyEvent::Transfer,
            &[],
            &transfer(67, "titrated at Ashdown"),
        ))
        .await
        .unwrap();
    let released = |gp: &str, marker: &str| {
        let mut s = summary(67, Some(gp), marker);
        written_by(&mut s, "YP002");
        s
    };
    for (id, marker) in [("r-67", "released"), ("r-67b", "released, dose added")] {
        second
            .submit(submit(id, release, &[], &released("YG001", marker)))
            .await
            .unwrap();
    }
    let markers = markers_of(&mut wrong_gp, 4).await;
    assert_eq!(markers, ["titrated at Ashdown", "released, dose added"]);
    second
        .submit(submit(
            "r-67c",
            release,
            &[],
            &released("YG002", "released, the right GP"),
        ))
        .await
        .unwrap();
    let markers = markers_of(&mut right_gp, 3).await;
    assert_eq!(markers, ["released, the right GP", "titrated at Ashdown"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_summary_whose_payload_is_gone_is_not_sent_again() {
    payload_gone_is_not_sent_again_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_summary_whose_payload_is_gone_is_not_sent_again_on_postgres() {
    payload_gone_is_not_sent_again_on(Engine::Postgres).await;
}

/// As [`corrected_transfer_resends_what_was_acknowledged_on`], but the
/// correction comes after the retention policy removed the GP record's
/// payload: nothing can be sent again, and nothing is half done (its
/// handover stays finished with its one copy; nothing is audited as sent).
async fn payload_gone_is_not_sent_again_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    first
        .submit(submit(
            "t-68",
            t,
            &[],
            &transfer(68, "sent to Brackenfield"),
        ))
        .await
        .unwrap();
    let record = gp_record(68, "YP002");
    let cs = pb::JourneyEvent::CommunitySummary;
    let r = gp
        .submit(submit("cs-68", cs, &[], &record))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(markers_pulled(&mut second, 2).await.len(), 2);
    clock.advance(4 * 86_400_000);
    assert!(gw.store.retention().await.unwrap().shredded >= 1);
    let held = gw.store.handover(r.handover_id).unwrap().unwrap();
    assert!(held.shredded_at_ms.is_some(), "{held:?}");
    let mut corrected = transfer(68, "corrected to Ashdown");
    corrected.custody.transfer_to = Some("YP003".parse().unwrap());
    first
        .submit(submit("t-68b", t, &[], &corrected))
        .await
        .unwrap();
    let markers = markers_of(&mut third, 2).await;
    assert_eq!(markers, ["corrected to Ashdown"]);
    let after = gw.store.handover(r.handover_id).unwrap().unwrap();
    assert_eq!(after.deliveries, held.deliveries);
    assert_eq!(after.finished_at_ms, held.finished_at_ms);
    let trail = gw.store.audit_entries().unwrap();
    assert!(!trail.iter().any(|e| e.action == "forward"), "nothing sent");
    gw.stop().await;
}

#[tokio::test]
async fn an_earlier_real_transfer_to_the_same_prison_is_not_part_of_the_mistake() {
    earlier_real_transfer_on(Engine::Sled).await;
}

#[tokio::test]
async fn an_earlier_real_transfer_to_the_same_prison_is_not_part_of_the_mistake_on_postgres() {
    earlier_real_transfer_on(Engine::Postgres).await;
}

/// Patient 69 really went from YP001 to YP002 in January and back in
/// February. In June YP001 sends them to YP002 by mistake; the GP's record
/// follows them there and is acknowledged. The correction to YP003 sends it
/// on: the January stay and its return are not the mistake.
async fn earlier_real_transfer_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let t = pb::JourneyEvent::Transfer;
    let at = |marker: &str, when: &str, to: &str| {
        let mut s = transfer(69, marker);
        s.custody.transfer_at = Some(when.parse().unwrap());
        s.custody.transfer_to = Some(to.parse().unwrap());
        s
    };
    let january = at("January, for real", "2030-01-10T09:00:00Z", "YP002");
    first
        .submit(submit("t-69-jan", t, &[], &january))
        .await
        .unwrap();
    assert_eq!(markers_pulled(&mut second, 1).await.len(), 1);
    let mut back = at("February, back", "2030-02-10T09:00:00Z", "YP001");
    written_by(&mut back, "YP002");
    second
        .submit(submit("t-69-feb", t, &[], &back))
        .await
        .unwrap();
    assert_eq!(markers_pulled(&mut first, 1).await.len(), 1);
    let june = "2030-06-10T09:00:00Z";
    let mistaken = at("June, to Brackenfield", june, "YP002");
    first
        .submit(submit("t-69-jun", t, &[], &mistaken))
        .await
        .unwrap();
    let cs = pb::JourneyEvent::CommunitySummary;
    let r = gp
        .submit(submit("cs-69", cs, &[], &gp_record(69, "YP002")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YP002"]);
    assert_eq!(markers_pulled(&mut second, 2).await.len(), 2);
    let corrected = at("June, corrected to Ashdown", june, "YP003");
    first
        .submit(submit("t-69-jun-b", t, &[], &corrected))
        .await
        .unwrap();
    let markers = markers_of(&mut third, 3).await;
    assert_eq!(markers, ["June, corrected to Ashdown", "from the GP"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_transfer_corrected_in_prison_and_time_still_gives_the_right_prison_everything() {
    corrected_in_prison_and_time_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_transfer_corrected_in_prison_and_time_still_gives_the_right_prison_everything_on_postgres()
 {
    corrected_in_prison_and_time_on(Engine::Postgres).await;
}

/// YP001 sends patient 70 to YP002 by mistake, at the wrong time too. One
/// GP's record follows them there and is acknowledged; another's waits
/// unpulled. The correction names YP003 and another transfer time: YP003
/// still gets both records.
async fn corrected_in_prison_and_time_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    let mut other_gp = gw.client("YG002").await;
    let t = pb::JourneyEvent::Transfer;
    let cs = pb::JourneyEvent::CommunitySummary;
    first
        .submit(submit(
            "t-70",
            t,
            &[],
            &transfer(70, "sent to Brackenfield"),
        ))
        .await
        .unwrap();
    gp.submit(submit("cs-70", cs, &[], &gp_record(70, "YP002")))
        .await
        .unwrap();
    assert_eq!(markers_pulled(&mut second, 2).await.len(), 2);
    let mut other = summary(70, Some("YG002"), "from the other GP");
    other.author.organisation = "YG002".parse().unwrap();
    other.custody.establishment = "YP002".parse().unwrap();
    other_gp
        .submit(submit("cs-70-other", cs, &[], &other))
        .await
        .unwrap();
    let mut corrected = transfer(70, "corrected to Ashdown, at noon");
    corrected.custody.transfer_to = Some("YP003".parse().unwrap());
    corrected.custody.transfer_at = Some("2030-01-01T12:00:00Z".parse().unwrap());
    first
        .submit(submit("t-70b", t, &[], &corrected))
        .await
        .unwrap();
    let markers = markers_of(&mut third, 4).await;
    assert_eq!(
        markers,
        [
            "from the other GP",
            "corrected to Ashdown, at noon",
            "from the GP"
        ]
    );
    gw.stop().await;
}

/// Nothing waits at `left` (the prison the patient never reached, or left),
/// and one summary was sent on, audited.
async fn one_sent_on_nothing_left(gw: &TestGateway, left: &mut Client) {
    assert!(pull_and_ack(left).await.is_empty(), "nothing left behind");
    let trail = gw.store.audit_entries().unwrap();
    assert_eq!(trail.iter().filter(|e| e.action == "forward").count(), 1);
}

#[tokio::test]
async fn a_transfer_summary_the_releasing_prison_never_acknowledged_goes_to_the_gp() {
    transfer_summary_goes_to_the_gp_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_transfer_summary_the_releasing_prison_never_acknowledged_goes_to_the_gp_on_postgres() {
    transfer_summary_goes_to_the_gp_on(Engine::Postgres).await;
}

/// YP001 transfers patient 62 to YP002 with their methadone record; YP002
/// releases them before acknowledging it, so its release summary may not
/// carry what YP001 knew. The GP gets both, the previous prison's first.
async fn transfer_summary_goes_to_the_gp_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut gp = gw.client("YG001").await;
    first
        .submit(submit(
            "t-62",
            pb::JourneyEvent::Transfer,
            &[],
            &transfer(62, "titrated at Ashdown"),
        ))
        .await
        .unwrap();
    // YP002 pulls it and its system stops before the ack.
    assert_eq!(
        second
            .pull(pull(50))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .len(),
        1
    );
    let mut release = summary(62, Some("YG001"), "released from Brackenfield");
    written_by(&mut release, "YP002");
    let r = second
        .submit(submit("r-62", pb::JourneyEvent::Release, &[], &release))
        .await
        .unwrap()
        .into_inner();
    assert!(destinations(&r).contains(&"YG001"), "{r:?}");
    let markers = markers_of(&mut gp, 3).await;
    assert_eq!(
        markers,
        ["titrated at Ashdown", "released from Brackenfield"]
    );
    one_sent_on_nothing_left(&gw, &mut second).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_claimed_release_gives_the_gp_what_the_prison_never_acknowledged() {
    claimed_release_takes_on_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_claimed_release_gives_the_gp_what_the_prison_never_acknowledged_on_postgres() {
    claimed_release_takes_on_on(Engine::Postgres).await;
}

/// YP001 transfers patient 64 to YP002, which releases them with no GP
/// known before pulling it: the release is parked, and what YP002 never
/// had waits at YP002 meanwhile. The practice that claims the release gets
/// the previous prison's transfer summary with it, first.
async fn claimed_release_takes_on_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let t = transfer(64, "titrated at Ashdown");
    let r = pb::JourneyEvent::Release;
    first
        .submit(submit("t-64", pb::JourneyEvent::Transfer, &[], &t))
        .await
        .unwrap();
    let mut release = summary(64, None, "released from Brackenfield");
    written_by(&mut release, "YP002");
    let parked = second
        .submit(submit("r-64", r, &[], &release))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&parked), ["@parked"], "{parked:?}");
    let mut gp = gw.client("YG002").await;
    let claimed = gp
        .claim(pb::ClaimRequest {
            patient: Some(patient_ref(64)),
            evidence: None,
        })
        .await
        .unwrap()
        .into_inner()
        .claimed;
    assert_eq!(claimed.len(), 1);
    let markers = markers_of(&mut gp, 3).await;
    assert_eq!(
        markers,
        ["titrated at Ashdown", "released from Brackenfield"]
    );
    one_sent_on_nothing_left(&gw, &mut second).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_release_claimed_after_a_recall_leaves_what_waits_with_the_prison() {
    claimed_after_a_recall_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_release_claimed_after_a_recall_leaves_what_waits_with_the_prison_on_postgres() {
    claimed_after_a_recall_on(Engine::Postgres).await;
}

/// YP002 releases patient 69 with no GP known, before pulling YP001's
/// transfer summary; the release is parked. The patient is recalled and
/// admitted to YP002 again, and YP001 sends another summary there. A
/// practice claiming the old release then gets the release alone: the
/// prison holding the patient keeps what waits for them.
async fn claimed_after_a_recall_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let t = pb::JourneyEvent::Transfer;
    first
        .submit(submit("t-69", t, &[], &transfer(69, "titrated at Ashdown")))
        .await
        .unwrap();
    let mut release = summary(69, None, "released from Brackenfield");
    written_by(&mut release, "YP002");
    let parked = second
        .submit(submit("r-69", pb::JourneyEvent::Release, &[], &release))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&parked), ["@parked"], "{parked:?}");
    second
        .submit(sent_by(admission("recall-69", 69), "YP002"))
        .await
        .unwrap();
    let mut gp = gw.client("YG002").await;
    let claimed = gp
        .claim(pb::ClaimRequest {
            patient: Some(patient_ref(69)),
            evidence: None,
        })
        .await
        .unwrap()
        .into_inner()
        .claimed;
    assert_eq!(claimed.len(), 1);
    let got: Vec<String> = pull_and_ack(&mut gp).await.iter().map(text_of).collect();
    assert_eq!(got, ["released from Brackenfield"]);
    let kept: Vec<String> = pull_and_ack(&mut second)
        .await
        .iter()
        .map(text_of)
        .collect();
    assert_eq!(kept, ["titrated at Ashdown"]);
    let trail = gw.store.audit_entries().unwrap();
    assert!(!trail.iter().any(|e| e.action == "forward"), "{trail:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_transfer_superseded_on_arrival_sends_nothing_on() {
    superseded_on_arrival_sends_nothing_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_transfer_superseded_on_arrival_sends_nothing_on_on_postgres() {
    superseded_on_arrival_sends_nothing_on(Engine::Postgres).await;
}

/// YP002 transfers patient 66 to YP003 (written 12:00). Its earlier draft,
/// naming YP004 (written 11:00), arrives after, while YP001's transfer
/// summary waits unpulled at YP002: the draft is superseded on arrival and
/// says nothing of where the patient is, so it sends nothing to YP004.
async fn superseded_on_arrival_sends_nothing_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let _third = prison_added(&gw, "YP003").await;
    let mut fourth = prison_added(&gw, "YP004").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let t = pb::JourneyEvent::Transfer;
    let onward = |to: &str, at: &str| {
        let mut s = transfer(66, &format!("to {to}"));
        written_by(&mut s, "YP002");
        s.custody.transfer_to = Some(to.parse().unwrap());
        s.authored_at = at.parse().unwrap();
        s
    };
    let head = second
        .submit(submit(
            "on-66",
            t,
            &[],
            &onward("YP003", "2026-11-24T12:00:00Z"),
        ))
        .await
        .unwrap()
        .into_inner();
    first
        .submit(submit("t-66", t, &[], &transfer(66, "titrated at Ashdown")))
        .await
        .unwrap();
    let draft = second
        .submit(submit(
            "draft-66",
            t,
            &[],
            &onward("YP004", "2026-11-24T11:00:00Z"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(draft.superseded_by_handover_id, head.handover_id);
    assert!(
        pull_and_ack(&mut fourth).await.is_empty(),
        "nothing for YP004"
    );
    let trail = gw.store.audit_entries().unwrap();
    assert!(!trail.iter().any(|e| e.action == "forward"), "{trail:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_summary_sent_on_is_due_when_the_transfer_that_moved_it_is() {
    sent_on_deadline_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_summary_sent_on_is_due_when_the_transfer_that_moved_it_is_on_postgres() {
    sent_on_deadline_on(Engine::Postgres).await;
}

/// A transfer summary due at a transfer long past waits unpulled at YP002,
/// which transfers the patient on to YP003 next year: YP003's copy is due
/// then, not overdue on arrival (the deadline YP002 missed is not YP003's).
async fn sent_on_deadline_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let _third = prison_added(&gw, "YP003").await;
    let mut first = gw.client("YP001").await;
    let mut second = gw.client("YP002").await;
    let mut late = transfer(63, "long ago");
    late.custody.transfer_at = Some("2026-11-20T09:00:00Z".parse().unwrap());
    let t = pb::JourneyEvent::Transfer;
    first.submit(submit("t-63", t, &[], &late)).await.unwrap();
    let mut onward = transfer(63, "next year");
    written_by(&mut onward, "YP002");
    onward.custody.transfer_to = Some("YP003".parse().unwrap());
    second
        .submit(submit("on-63", t, &[], &onward))
        .await
        .unwrap();
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
        .find(|m| m.mailbox == "YP003")
        .expect("YP003's mailbox");
    assert_eq!((row.depth, row.overdue), (2, 0), "{row:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_corrected_transfer_supersedes_the_undelivered_one() {
    a_corrected_transfer_supersedes_the_undelivered_one_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_corrected_transfer_supersedes_the_undelivered_one_on_postgres() {
    a_corrected_transfer_supersedes_the_undelivered_one_on(Engine::Postgres).await;
}

async fn a_corrected_transfer_supersedes_the_undelivered_one_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let t = pb::JourneyEvent::Transfer;
    prison
        .submit(submit("t-1", t, &[], &transfer(1, "first")))
        .await
        .unwrap();
    prison
        .submit(submit("t-2", t, &[], &transfer(1, "corrected")))
        .await
        .unwrap();
    let mut receiving = gw.client("YP002").await;
    let got = pull_and_ack(&mut receiving).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["corrected"]);
    assert!(
        pull_and_ack(&mut receiving).await.is_empty(),
        "never the older one"
    );
    let old = track_message(&mut prison, "t-1").await;
    let new = track_message(&mut prison, "t-2").await;
    assert_eq!(old.deliveries[0].state(), pb::DeliveryState::Superseded);
    assert_eq!(
        old.deliveries[0].superseded_by,
        new.deliveries[0].delivery_id
    );
    assert!(old.deliveries[0].superseded_at.is_some());
    assert_eq!(new.deliveries[0].state(), pb::DeliveryState::Delivered);
    // A leased summary is in the recipient's hands: a newer one waits behind it.
    prison
        .submit(submit("t-3", t, &[], &transfer(1, "third")))
        .await
        .unwrap();
    let leased = receiving
        .pull(pull(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(leased.iter().map(text_of).collect::<Vec<_>>(), ["third"]);
    prison
        .submit(submit("t-4", t, &[], &transfer(1, "fourth")))
        .await
        .unwrap();
    assert_eq!(
        track_message(&mut prison, "t-3").await.deliveries[0].state(),
        pb::DeliveryState::Leased
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_urgent_release_is_pulled_before_earlier_routine_ones() {
    an_urgent_release_is_pulled_before_earlier_routine_ones_on(Engine::Sled).await;
}

#[tokio::test]
async fn an_urgent_release_is_pulled_before_earlier_routine_ones_on_postgres() {
    an_urgent_release_is_pulled_before_earlier_routine_ones_on(Engine::Postgres).await;
}

async fn an_urgent_release_is_pulled_before_earlier_routine_ones_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    for i in 0..3 {
        prison
            .submit(submit(
                &format!("routine-{i}"),
                pb::JourneyEvent::Release,
                &["YG001"],
                &summary(10 + i, None, &format!("routine {i}")),
            ))
            .await
            .unwrap();
    }
    let mut urgent = summary(20, None, "urgent");
    urgent.risks.push(RiskFlag {
        kind: RiskKind::Suicide,
        active: true,
        note: None,
        code: None,
    });
    let r = prison
        .submit(submit(
            "urgent",
            pb::JourneyEvent::Release,
            &["YG001"],
            &urgent,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.deliveries[0].urgent);
    let mut gp = gw.client("YG001").await;
    let got = gp.pull(pull(10)).await.unwrap().into_inner().deliveries;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["urgent", "routine 0", "routine 1", "routine 2"]
    );
    assert!(got[0].urgent && !got[1].urgent);
    gw.stop().await;
}

#[tokio::test]
async fn a_parked_release_is_claimed_and_delivered_exactly_once_when_practices_race() {
    a_parked_release_is_claimed_and_delivered_exactly_once_when_practices_race_on(Engine::Sled)
        .await;
}

#[tokio::test]
async fn a_parked_release_is_claimed_and_delivered_exactly_once_when_practices_race_on_postgres() {
    a_parked_release_is_claimed_and_delivered_exactly_once_when_practices_race_on(Engine::Postgres)
        .await;
}

async fn a_parked_release_is_claimed_and_delivered_exactly_once_when_practices_race_on(
    engine: Engine,
) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let r = prison
        .submit(submit(
            "no-gp",
            pb::JourneyEvent::Release,
            &[],
            &summary(7, None, "parked summary"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deliveries[0].destination, "@parked");
    assert_eq!(
        track_message(&mut prison, "no-gp").await.deliveries[0].state(),
        pb::DeliveryState::Parked
    );
    let mut op = gw.operator().await;
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].sender, "YP001");
    // The wrong date of birth claims nothing.
    let mut a = gw.client("YG001").await;
    let mut wrong = patient_ref(7);
    wrong.date_of_birth = "1985-06-16".into();
    let err = a
        .claim(pb::ClaimRequest {
            patient: Some(wrong),
            evidence: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Two practices race to claim it.
    let mut b = gw.client("YG002").await;
    let claim = pb::ClaimRequest {
        patient: Some(patient_ref(7)),
        evidence: None,
    };
    let (ra, rb) = tokio::join!(a.claim(claim.clone()), b.claim(claim));
    let (winner, mut winner_client, mut loser_client) = match (&ra, &rb) {
        (Ok(_), Err(e)) => {
            assert_eq!(e.code(), Code::NotFound);
            ("YG001", a, b)
        }
        (Err(e), Ok(_)) => {
            assert_eq!(e.code(), Code::NotFound);
            ("YG002", b, a)
        }
        other => panic!("exactly one claim must win: {other:?}"),
    };
    let claimed = ra.or(rb).unwrap().into_inner().claimed;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].handover_id, r.handover_id);
    assert!(pull_and_ack(&mut loser_client).await.is_empty());
    let got = winner_client
        .pull(pull(10))
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(got.len(), 1);
    assert_ne!(got[0].document, None);
    let t = track_message(&mut prison, "no-gp").await;
    assert_eq!(t.deliveries[0].destination, winner);
    assert_eq!(t.deliveries[0].claimed_by, format!("urn:ods:{winner}"));
    assert!(
        op.list_parked(pb::ListParkedRequest::default())
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .is_empty()
    );
    // Claims are audited, the losing one as a refusal.
    let claims: Vec<_> = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "claim")
        .map(|e| e.outcome)
        .collect();
    assert_eq!(claims.iter().filter(|o| o.starts_with("ok")).count(), 1);
    assert_eq!(
        claims.iter().filter(|o| o.starts_with("refused")).count(),
        2
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_operator_claims_by_prison_number_for_a_practice() {
    an_operator_claims_by_prison_number_for_a_practice_on(Engine::Sled).await;
}

#[tokio::test]
async fn an_operator_claims_by_prison_number_for_a_practice_on_postgres() {
    an_operator_claims_by_prison_number_for_a_practice_on(Engine::Postgres).await;
}

async fn an_operator_claims_by_prison_number_for_a_practice_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let mut s = summary(8, None, "no nhs number");
    s.patient.nhs_number = None;
    s.patient.prison_number = Some("A1234BC".parse().unwrap());
    prison
        .submit(submit("pn", pb::JourneyEvent::Release, &[], &s))
        .await
        .unwrap();
    let mut op = gw.operator().await;
    let who = pb::PatientRef {
        nhs_number: String::new(),
        prison_number: "A1234BC".into(),
        date_of_birth: "1985-06-15".into(),
    };
    let err = op
        .claim_parked(pb::ClaimParkedRequest {
            patient: Some(who.clone()),
            practice: "YG002".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["reason"]);
    let claimed = op
        .claim_parked(pb::ClaimParkedRequest {
            patient: Some(who),
            practice: "YG002".into(),
            reason: "patient registered at Hillview, confirmed by phone".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .claimed;
    assert_eq!(claimed.len(), 1);
    let mut gp = gw.client("YG002").await;
    assert_eq!(pull_and_ack(&mut gp).await.len(), 1);
    gw.stop().await;
}

/// A correction of a claimed release that still names no practice (the
/// prison does not know the claim) goes to the practice that claimed it,
/// whether it has pulled the earlier one or not. It is neither parked again
/// (which undid the claim, the practice receiving nothing) nor answered
/// with a withdrawal notice telling the practice not to act on the summary
/// it holds.
#[tokio::test]
async fn a_correction_of_a_claimed_release_goes_to_the_practice_that_claimed_it() {
    a_correction_of_a_claimed_release_goes_to_the_practice_that_claimed_it_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_of_a_claimed_release_goes_to_the_practice_that_claimed_it_on_postgres() {
    a_correction_of_a_claimed_release_goes_to_the_practice_that_claimed_it_on(Engine::Postgres)
        .await;
}

async fn a_correction_of_a_claimed_release_goes_to_the_practice_that_claimed_it_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    prison
        .submit(submit("r-1", release, &[], &summary(31, None, "first")))
        .await
        .unwrap();
    let mut op = gw.operator().await;
    let claim = pb::ClaimParkedRequest {
        patient: Some(patient_ref(31)),
        practice: "YG002".into(),
        reason: "registered at Hillview, confirmed by phone".into(),
    };
    assert_eq!(
        op.claim_parked(claim)
            .await
            .unwrap()
            .into_inner()
            .claimed
            .len(),
        1
    );
    // Corrected before the practice pulled: the correction replaces it there.
    prison
        .submit(submit("r-2", release, &[], &summary(31, None, "second")))
        .await
        .unwrap();
    let mut gp = gw.client("YG002").await;
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["second"]);
    // Corrected after it pulled: the correction follows, no withdrawal.
    prison
        .submit(submit("r-3", release, &[], &summary(31, None, "third")))
        .await
        .unwrap();
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["third"]);
    assert_eq!(got[0].supersedes_handover_id, {
        let t = track_message(&mut prison, "r-2").await;
        t.handover_id
    });
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert!(parked.is_empty(), "nothing parked again: {parked:?}");
    let t = track_message(&mut prison, "r-3").await;
    let practice: Vec<_> = t
        .deliveries
        .iter()
        .filter(|d| d.destination.starts_with("YG") || d.destination.starts_with('@'))
        .map(|d| (d.destination.as_str(), d.state(), !d.claimed_by.is_empty()))
        .collect();
    assert_eq!(practice, [("YG002", pb::DeliveryState::Delivered, true)]);
    // The practice copy of the latest release decides: one the prison
    // names for another practice is not followed, and the claimant is told.
    prison
        .submit(submit(
            "r-4",
            release,
            &[],
            &summary(31, Some("YG001"), "fourth"),
        ))
        .await
        .unwrap();
    let got = pull_and_ack(&mut gp).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        [""],
        "a withdrawal notice"
    );
    gw.stop().await;
}

/// A release from a later custody episode (a recall, a new reception) is
/// no correction of the earlier episode's: the practice given the earlier
/// release gets no withdrawal notice (which told it not to act on a summary
/// that was right for its time, and carried the new episode's custody and
/// release address to a former carer). Within one episode a correction
/// that goes elsewhere still withdraws.
#[tokio::test]
async fn a_release_from_a_later_custody_episode_withdraws_nothing() {
    a_release_from_a_later_custody_episode_withdraws_nothing_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_release_from_a_later_custody_episode_withdraws_nothing_on_postgres() {
    a_release_from_a_later_custody_episode_withdraws_nothing_on(Engine::Postgres).await;
}

async fn a_release_from_a_later_custody_episode_withdraws_nothing_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    let episode = |reception: &str, gp: &str, marker: &str| {
        let mut s = summary(32, Some(gp), marker);
        s.custody.reception_date = Some(reception.parse().unwrap());
        s
    };
    prison
        .submit(submit(
            "e1",
            release,
            &[],
            &episode("2026-03-02", "YG001", "first"),
        ))
        .await
        .unwrap();
    let mut first_gp = gw.client("YG001").await;
    assert_eq!(pull_and_ack(&mut first_gp).await.len(), 1);
    // Recalled, received again, released to another practice.
    prison
        .submit(submit(
            "e2",
            release,
            &[],
            &episode("2026-09-01", "YG002", "second"),
        ))
        .await
        .unwrap();
    let mut second_gp = gw.client("YG002").await;
    let got = pull_and_ack(&mut second_gp).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["second"]);
    assert!(
        pull_and_ack(&mut first_gp).await.is_empty(),
        "no withdrawal notice across custody episodes"
    );
    // The same episode corrected to the first practice: the second is told.
    prison
        .submit(submit(
            "e3",
            release,
            &[],
            &episode("2026-09-01", "YG001", "third"),
        ))
        .await
        .unwrap();
    assert_eq!(
        pull_and_ack(&mut second_gp)
            .await
            .iter()
            .map(text_of)
            .collect::<Vec<_>>(),
        [""],
        "a withdrawal notice within the episode"
    );
    gw.stop().await;
}

/// Patient 33's release `id` (its marker too) of the custody episode
/// received on `reception`, to practice `gp`.
async fn episode_release(
    prison: &mut Client,
    id: &str,
    reception: &str,
    gp: &str,
) -> pb::SubmitResponse {
    let mut s = summary(33, Some(gp), id);
    s.custody.reception_date = Some(reception.parse().unwrap());
    let r = submit(id, pb::JourneyEvent::Release, &[], &s);
    prison.submit(r).await.unwrap().into_inner()
}

/// A correction of an earlier custody episode's release, arriving after a
/// later episode's release, corrects its own episode: it retired the later
/// release before the new practice had it (on release day), and became
/// the lineage's latest, so the later episode's own correction found no
/// one to withdraw from.
#[tokio::test]
async fn a_late_correction_of_an_earlier_episode_leaves_the_later_release_alone() {
    a_late_correction_of_an_earlier_episode_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_late_correction_of_an_earlier_episode_leaves_the_later_release_alone_on_postgres() {
    a_late_correction_of_an_earlier_episode_on(Engine::Postgres).await;
}

async fn a_late_correction_of_an_earlier_episode_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let (mut first_gp, mut second_gp) = (gw.client("YG001").await, gw.client("YG002").await);
    let (spring, autumn) = ("2026-03-02", "2026-09-01");
    let e1 = episode_release(&mut prison, "e1", spring, "YG001").await;
    assert_eq!(pull_and_ack(&mut first_gp).await.len(), 1);
    let e2 = episode_release(&mut prison, "e2", autumn, "YG002").await;
    // The spring release corrected after the autumn one was sent.
    let e1b = episode_release(&mut prison, "e1b", spring, "YG001").await;
    assert_eq!(destinations(&e1b), ["YG001", "YPR01"]);
    assert_eq!(e1b.superseded_by_handover_id, 0);
    let pulled = |got: Vec<pb::Delivery>| got.iter().map(text_of).collect::<Vec<_>>();
    assert_eq!(pulled(pull_and_ack(&mut second_gp).await), ["e2"]);
    assert_eq!(pulled(pull_and_ack(&mut first_gp).await), ["e1b"]);
    let t = track_message(&mut prison, "e1b").await;
    assert_eq!(t.supersedes_handover_id, e1.handover_id);
    // The autumn release corrected to the first practice: its practice is
    // told, the spring one's is not, and nothing is superseded on arrival.
    let e2b = episode_release(&mut prison, "e2b", autumn, "YG001").await;
    assert_eq!(e2b.superseded_by_handover_id, 0);
    assert_eq!(
        pulled(pull_and_ack(&mut second_gp).await),
        [""],
        "a withdrawal notice for the autumn release"
    );
    assert_eq!(pulled(pull_and_ack(&mut first_gp).await), ["e2b"]);
    let t = track_message(&mut prison, "e2b").await;
    assert_eq!(t.supersedes_handover_id, e2.handover_id);
    // The spring release corrected again, to the second practice: the
    // first, given the spring correction, is told.
    episode_release(&mut prison, "e1c", spring, "YG002").await;
    assert_eq!(pulled(pull_and_ack(&mut first_gp).await), [""]);
    assert_eq!(pulled(pull_and_ack(&mut second_gp).await), ["e1c"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_withdrawal_notice_is_due_alike_whatever_the_summary_withholds() {
    a_withdrawal_notice_is_due_alike_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_withdrawal_notice_is_due_alike_whatever_the_summary_withholds_on_postgres() {
    a_withdrawal_notice_is_due_alike_on(Engine::Postgres).await;
}

/// A probation service without the patient's consent sees no risks, and
/// must not learn of one from a deadline: a withdrawal notice's was the
/// soonest of the correction's routes, so an active suicide risk made the
/// probation notice due in 4 hours instead of at the end of the release day.
async fn a_withdrawal_notice_is_due_alike_on(engine: Engine) {
    let Some((gw, _clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    let south = organisation("YPR02", pb::OrganisationKind::Probation, "South (invented)");
    gw.operator().await.put_organisation(south).await.unwrap();
    let mut prison = gw.client("YP001").await;
    let mut probation = gw.client("YPR01").await;
    let mut due = Vec::new();
    for (patient, at_risk) in [(65, false), (66, true)] {
        let mut s = summary(patient, Some("YG001"), "release");
        // Released in five days' time (T0 is 2027-01-15).
        s.custody.release_date = Some("2027-01-20".parse().unwrap());
        s.consent.probation_sharing = throughcare::clinical::model::ConsentDecision::Refused;
        let first = submit(&format!("r-{patient}"), pb::JourneyEvent::Release, &[], &s);
        prison.submit(first).await.unwrap();
        assert_eq!(pull_and_ack(&mut probation).await.len(), 1);
        if at_risk {
            s.risks.push(RiskFlag {
                kind: RiskKind::Suicide,
                active: true,
                note: None,
                code: None,
            });
        }
        let id = format!("r-{patient}-south");
        let moved = submit(&id, pb::JourneyEvent::Release, &["YG001", "YPR02"], &s);
        prison.submit(moved).await.unwrap();
        let notice = pull_and_ack(&mut probation).await;
        assert_eq!(notice.len(), 1, "a withdrawal notice");
        due.push(notice[0].due_at.unwrap().seconds);
    }
    assert_eq!(due, [(T0 + 4 * 3_600_000) / 1_000; 2]);
    gw.stop().await;
}

#[tokio::test]
async fn an_admission_notice_is_not_redriven_once_the_patient_is_released() {
    an_admission_notice_is_not_redriven_once_released_on(Engine::Sled).await;
}

#[tokio::test]
async fn an_admission_notice_is_not_redriven_once_the_patient_is_released_on_postgres() {
    an_admission_notice_is_not_redriven_once_released_on(Engine::Postgres).await;
}

/// A practice refused an admission notice; the patient was released and
/// the practice had the release summary; an operator then redrives the
/// notice: it would tell the practice the patient is in prison after the
/// release. It stays quarantined, and the operator is told why.
async fn an_admission_notice_is_not_redriven_once_released_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let mut gp = gw.client("YG001").await;
    let redrive = |id: u64| pb::RedriveRequest {
        target: Some(pb::redrive_request::Target::Deliveries(pb::DeliveryIds {
            ids: vec![id],
        })),
    };
    let mut op = gw.operator().await;
    let mut refused = Vec::new();
    for patient in [67, 68] {
        prison
            .submit(admission(&format!("adm-{patient}"), patient))
            .await
            .unwrap();
        let d = gp
            .pull(pull(1))
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .remove(0);
        let nack = pb::NackRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
            permanent: true,
            reason: "cannot file it".into(),
        };
        gp.nack(nack).await.unwrap();
        refused.push(d.delivery_id);
    }
    // Patient 67 is released and the practice files the release summary.
    let out = submit(
        "rel-67",
        pb::JourneyEvent::Release,
        &[],
        &summary(67, Some("YG001"), "out"),
    );
    prison.submit(out).await.unwrap();
    assert_eq!(
        pull_and_ack(&mut gp)
            .await
            .iter()
            .map(text_of)
            .collect::<Vec<_>>(),
        ["out"]
    );
    let r = op.redrive(redrive(refused[0])).await.unwrap().into_inner();
    assert_eq!(r.results[0].outcome(), pb::RedriveOutcome::Outdated);
    assert_eq!(r.results[0].state(), pb::DeliveryState::Quarantined);
    // Patient 68 is still inside: the notice goes again.
    let r = op.redrive(redrive(refused[1])).await.unwrap().into_inner();
    assert_eq!(r.results[0].outcome(), pb::RedriveOutcome::Requeued);
    let again = pull_and_ack(&mut gp).await;
    assert_eq!(
        again.iter().map(|d| d.delivery_id).collect::<Vec<_>>(),
        [refused[1]]
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_overdue_delivery_is_reported_within_one_scan_interval() {
    an_overdue_delivery_is_reported_within_one_scan_interval_on(Engine::Sled).await;
}

#[tokio::test]
async fn an_overdue_delivery_is_reported_within_one_scan_interval_on_postgres() {
    an_overdue_delivery_is_reported_within_one_scan_interval_on(Engine::Postgres).await;
}

async fn an_overdue_delivery_is_reported_within_one_scan_interval_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |c| {
        c.queue.sweep_interval_ms = 50;
        c.deadlines.admission_hours = 1;
    })
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison.submit(admission("late", 5)).await.unwrap();
    let t = track_message(&mut prison, "late").await;
    assert!(!t.deliveries[0].overdue);
    assert_eq!(
        t.deliveries[0].due_at.as_ref().unwrap().seconds,
        (T0 + 3_600_000) / 1_000
    );
    clock.advance(3_600_001);
    // Within one scan interval (50 ms), with slack for a loaded machine.
    let mut reported = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = track_message(&mut prison, "late").await;
        if t.deliveries[0].overdue_since.is_some() {
            reported = Some(t);
            break;
        }
    }
    let t = reported.expect("overdue reported");
    assert!(t.deliveries[0].overdue);
    let mut op = gw.operator().await;
    let boxes = op
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .mailboxes;
    let gp = boxes.iter().find(|m| m.mailbox == "YG001").unwrap();
    assert_eq!((gp.depth, gp.overdue), (1, 1));
    // Quarantined, it has still missed its deadline: Track says so.
    let mut gp = gw.client("YG001").await;
    let d = gp.pull(pull(1)).await.unwrap().into_inner().deliveries[0].clone();
    gp.nack(pb::NackRequest {
        delivery_id: d.delivery_id,
        attempt: d.attempt,
        permanent: true,
        reason: "cannot file it".into(),
    })
    .await
    .unwrap();
    let t = track_message(&mut prison, "late").await;
    assert_eq!(t.deliveries[0].state(), pb::DeliveryState::Quarantined);
    assert!(
        t.deliveries[0].overdue,
        "a quarantined copy past its deadline"
    );
    // Once delivered it is no longer overdue.
    op.redrive(pb::RedriveRequest {
        target: Some(pb::redrive_request::Target::Deliveries(pb::DeliveryIds {
            ids: vec![d.delivery_id],
        })),
    })
    .await
    .unwrap();
    // The redrive is on the handover's and the patient's trail.
    let entries = gw.store.audit_entries().unwrap();
    let redrive = entries
        .iter()
        .rev()
        .find(|e| e.action == "redrive")
        .unwrap();
    assert_eq!(redrive.handover_id, Some(d.handover_id), "{redrive:?}");
    assert!(redrive.patient_key.is_some(), "{redrive:?}");
    pull_and_ack(&mut gp).await;
    assert!(!track_message(&mut prison, "late").await.deliveries[0].overdue);
    gw.stop().await;
}

/// Pulls (without acknowledging) until `n` deliveries are leased, at most
/// twenty waiting pulls; in handover order.
async fn pull_all(client: &mut Client, n: usize) -> Vec<pb::Delivery> {
    let mut got = Vec::new();
    for _ in 0..20 {
        if got.len() >= n {
            break;
        }
        let want = u32::try_from(n - got.len()).unwrap();
        got.extend(
            client
                .pull(pull_waiting(want, 2))
                .await
                .unwrap()
                .into_inner()
                .deliveries,
        );
    }
    got.sort_by_key(|d| d.handover_id);
    got
}

/// The two copies of each release (GP and probation) acknowledged at the
/// same time on two connections: every handover is finished once both are,
/// so retention can remove it. On PostgreSQL each acknowledgement used to
/// read the other copy as unfinished and neither finished the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_acknowledged_at_once_finish_their_handover() {
    copies_acknowledged_at_once_finish_their_handover_on(Engine::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_acknowledged_at_once_finish_their_handover_on_postgres() {
    copies_acknowledged_at_once_finish_their_handover_on(Engine::Postgres).await;
}

async fn copies_acknowledged_at_once_finish_their_handover_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let mut handovers = Vec::new();
    for i in 0..40 {
        let r = prison
            .submit(release(&format!("both-{i}"), 300 + i, &["YG001"], "m"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.deliveries.len(), 2, "{r:?}");
        handovers.push(r.handover_id);
    }
    let mut gp = gw.client("YG001").await;
    let mut probation = gw.client("YPR01").await;
    // Pulled until all are in hand: on PostgreSQL a row the sweeper holds
    // for a moment (marking these releases, due already, overdue) is
    // skipped, not waited for, so one pull may come back short.
    let gp_got = pull_all(&mut gp, 40).await;
    let probation_got = pull_all(&mut probation, 40).await;
    assert_eq!((gp_got.len(), probation_got.len()), (40, 40));
    // One ack of each copy of a handover at once, handover by handover.
    for (a, b) in gp_got.iter().zip(&probation_got) {
        let (mut gp, mut probation) = (gp.clone(), probation.clone());
        let ack = |d: &pb::Delivery| pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        };
        let (x, y) = tokio::join!(gp.ack(ack(a)), probation.ack(ack(b)));
        x.unwrap();
        y.unwrap();
    }
    for id in handovers {
        let h = gw.store.handover(id).unwrap().unwrap();
        assert!(h.finished_at_ms.is_some(), "handover {id} not finished");
    }
    gw.stop().await;
}

/// A correction that goes to no one (the patient has no GP any more)
/// still replaces the copy it corrects, and that copy is finished for
/// retention at once: before, it was retired without a replacement and
/// never finished, so its payload was kept for ever.
#[tokio::test]
async fn a_correction_routed_to_no_one_retires_the_old_copy_and_finishes_it() {
    a_correction_routed_to_no_one_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_routed_to_no_one_retires_the_old_copy_and_finishes_it_on_postgres() {
    a_correction_routed_to_no_one_on(Engine::Postgres).await;
}

async fn a_correction_routed_to_no_one_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let first = prison
        .submit(admission("adm-v1", 33))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.deliveries.len(), 1);
    let mut corrected = admission("adm-v2", 33);
    let Some(pb::submit_request::Document::Native(s)) = &mut corrected.document else {
        unreachable!("admission() is native");
    };
    s.registered_gp = String::new();
    let second = prison.submit(corrected).await.unwrap().into_inner();
    assert!(second.deliveries.is_empty(), "{second:?}");
    let old = track_message(&mut prison, "adm-v1").await;
    assert_eq!(old.deliveries[0].state(), pb::DeliveryState::Superseded);
    let record = gw
        .store
        .delivery(first.deliveries[0].delivery_id)
        .unwrap()
        .unwrap();
    assert!(record.finished_at_ms.is_some(), "{record:?}");
    // The practice is offered nothing.
    let mut gp = gw.client("YG001").await;
    assert!(pull_and_ack(&mut gp).await.is_empty());
    gw.stop().await;
}

/// A retry of an accepted submit gets its receipt even when the registry
/// has changed since: its GP disabled, routing would now refuse it. Before,
/// the retry was INVALID_ARGUMENT ("do not retry unchanged"), and a sender
/// that resent under a new id made a second handover.
#[tokio::test]
async fn a_retry_is_answered_by_its_receipt_whatever_the_registry_says_since() {
    a_retry_is_answered_by_its_receipt_whatever_the_registry_says_since_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_retry_is_answered_by_its_receipt_whatever_the_registry_says_since_on_postgres() {
    a_retry_is_answered_by_its_receipt_whatever_the_registry_says_since_on(Engine::Postgres).await;
}

async fn a_retry_is_answered_by_its_receipt_whatever_the_registry_says_since_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let s = summary(31, Some("YG002"), "retry");
    let request = submit("retry-1", pb::JourneyEvent::Release, &["YG002"], &s);
    let first = prison.submit(request.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let mut op = gw.operator().await;
    op.set_organisation_active(pb::SetOrganisationActiveRequest {
        ods_code: "YG002".into(),
        active: false,
    })
    .await
    .unwrap();
    let again = prison.submit(request).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.handover_id, first.handover_id);
    let ids = |r: &pb::SubmitResponse| -> Vec<u64> {
        r.deliveries.iter().map(|d| d.delivery_id).collect()
    };
    assert_eq!(ids(&again), ids(&first));
    // Other content under the same id is still a conflict, not a routing
    // refusal; a new id naming the disabled practice is refused as before.
    let other = summary(31, Some("YG002"), "retry, edited");
    let err = prison
        .submit(submit(
            "retry-1",
            pb::JourneyEvent::Release,
            &["YG002"],
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = prison
        .submit(submit("retry-2", pb::JourneyEvent::Release, &["YG002"], &s))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    gw.stop().await;
}

#[tokio::test]
async fn registry_changes_are_audited_take_effect_at_once_and_survive_a_restart() {
    registry_changes_are_audited_take_effect_at_once_and_survive_a_restart_on(Engine::Sled).await;
}

#[tokio::test]
async fn registry_changes_are_audited_take_effect_at_once_and_survive_a_restart_on_postgres() {
    registry_changes_are_audited_take_effect_at_once_and_survive_a_restart_on(Engine::Postgres)
        .await;
}

async fn registry_changes_are_audited_take_effect_at_once_and_survive_a_restart_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut op = gw.operator().await;
    let disabled = op
        .set_organisation_active(pb::SetOrganisationActiveRequest {
            ods_code: "YG002".into(),
            active: false,
        })
        .await
        .unwrap()
        .into_inner()
        .organisation
        .unwrap();
    assert!(!disabled.active);
    // A disabled practice cannot call, and its patients' releases are parked.
    let mut hillview = gw.client("YG002").await;
    let err = hillview.pull(pull(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut prison = gw.client("YP001").await;
    let r = prison
        .submit(submit(
            "to-disabled",
            pb::JourneyEvent::Release,
            &[],
            &summary(9, Some("YG002"), "m"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deliveries[0].destination, "@parked");
    // A new practice, added while running.
    op.put_organisation(pb::PutOrganisationRequest {
        organisation: Some(pb::Organisation {
            ods_code: "YG003".into(),
            kind: pb::OrganisationKind::GpPractice.into(),
            name: "Meadow Lane Practice (invented)".into(),
            format: pb::DocumentFormat::Hl7v2.into(),
            region: String::new(),
            mesh_mailbox: String::new(),
            active: true,
        }),
    })
    .await
    .unwrap();
    let err = op
        .put_organisation(pb::PutOrganisationRequest {
            organisation: Some(pb::Organisation {
                ods_code: "not an ods code".into(),
                kind: 0,
                name: String::new(),
                format: 0,
                region: String::new(),
                mesh_mailbox: String::new(),
                active: true,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violations(&err),
        [
            "organisation.ods_code",
            "organisation.kind",
            "organisation.name"
        ]
    );
    let changes = gw
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "registry_change")
        .count();
    assert_eq!(changes, 2);
    drop((op, hillview, prison));
    let (dir, config) = gw.stop().await;
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let orgs = gw
        .operator()
        .await
        .list_organisations(pb::ListOrganisationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .organisations;
    let find = |code: &str| orgs.iter().find(|o| o.ods_code == code).unwrap();
    assert!(!find("YG002").active);
    assert_eq!(find("YG003").format(), pb::DocumentFormat::Hl7v2);
    gw.stop().await;
}

#[tokio::test]
async fn every_operator_call_refuses_a_non_operator_certificate() {
    let gw = TestGateway::start().await;
    for who in ["YP001", "YG001", "YPR01"] {
        let mut c = gw.operator_as(who).await;
        let codes = [
            c.list_mailboxes(pb::ListMailboxesRequest::default())
                .await
                .err(),
            c.list_quarantine(pb::ListQuarantineRequest::default())
                .await
                .err(),
            c.redrive(pb::RedriveRequest {
                target: Some(pb::redrive_request::Target::Deliveries(pb::DeliveryIds {
                    ids: vec![1],
                })),
            })
            .await
            .err(),
            c.list_parked(pb::ListParkedRequest::default()).await.err(),
            c.claim_parked(pb::ClaimParkedRequest::default())
                .await
                .err(),
            c.list_organisations(pb::ListOrganisationsRequest::default())
                .await
                .err(),
            c.put_organisation(pb::PutOrganisationRequest::default())
                .await
                .err(),
            c.set_organisation_active(pb::SetOrganisationActiveRequest::default())
                .await
                .err(),
            c.audit_trail(pb::AuditTrailRequest::default()).await.err(),
        ];
        for (i, status) in codes.into_iter().enumerate() {
            let status = status.unwrap_or_else(|| panic!("{who}: call {i} was allowed"));
            assert_eq!(status.code(), Code::PermissionDenied, "{who}: call {i}");
        }
    }
    gw.stop().await;
}

/// Twenty releases to YG001, each nacked permanently into quarantine, as
/// the operator's lists show. Returns the operator's client and their ids.
async fn quarantine_twenty(
    gw: &TestGateway,
) -> (
    pb::operator_service_client::OperatorServiceClient<tonic::transport::Channel>,
    Vec<u64>,
) {
    let mut prison = gw.client("YP001").await;
    for i in 0..20 {
        prison
            .submit(submit(
                &format!("q-{i}"),
                pb::JourneyEvent::Release,
                &["YG001"],
                &summary(100 + i, None, &format!("q {i}")),
            ))
            .await
            .unwrap();
    }
    // Every delivery is nacked permanently into quarantine.
    let mut gp = gw.client("YG001").await;
    for d in gp.pull(pull(50)).await.unwrap().into_inner().deliveries {
        gp.nack(pb::NackRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
            permanent: true,
            reason: "practice system rejected it".into(),
        })
        .await
        .unwrap();
    }
    let mut op = gw.operator().await;
    let q = op
        .list_quarantine(pb::ListQuarantineRequest {
            mailbox: "YG001".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(q.len(), 20);
    assert!(
        q.iter()
            .all(|d| d.reason.contains("practice system rejected it"))
    );
    let stats = op
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .mailboxes;
    assert_eq!(
        stats
            .iter()
            .find(|m| m.mailbox == "YG001")
            .unwrap()
            .quarantined,
        20
    );
    (op, q.iter().map(|d| d.delivery_id).collect())
}

/// A puller that acks what it gets until it has seen twenty deliveries (or
/// tried a hundred times); returns their ids.
fn spawn_puller(gw: &TestGateway) -> tokio::task::JoinHandle<Vec<u64>> {
    let endpoint = gw.endpoint.clone();
    let certs = gw.certs();
    tokio::spawn(async move {
        let mut c = throughcare::cli::client::handover(&endpoint, &certs, "YG001")
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..100 {
            for d in c.pull(pull(5)).await.unwrap().into_inner().deliveries {
                c.ack(pb::AckRequest {
                    delivery_id: d.delivery_id,
                    attempt: d.attempt,
                })
                .await
                .unwrap();
                seen.push(d.delivery_id);
            }
            if seen.len() >= 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    })
}

#[tokio::test]
async fn redrive_under_concurrent_pulls_loses_nothing_and_doubles_nothing() {
    redrive_under_concurrent_pulls_loses_nothing_and_doubles_nothing_on(Engine::Sled).await;
}

#[tokio::test]
async fn redrive_under_concurrent_pulls_loses_nothing_and_doubles_nothing_on_postgres() {
    redrive_under_concurrent_pulls_loses_nothing_and_doubles_nothing_on(Engine::Postgres).await;
}

async fn redrive_under_concurrent_pulls_loses_nothing_and_doubles_nothing_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |c| {
        c.queue.max_attempts = 1;
    })
    .await
    else {
        return;
    };
    let (mut op, ids) = quarantine_twenty(&gw).await;
    // Pullers run while two operators redrive the same deliveries.
    let puller = spawn_puller(&gw);
    let mut op2 = gw.operator().await;
    let (a, b) = tokio::join!(
        op.redrive(pb::RedriveRequest {
            target: Some(pb::redrive_request::Target::Deliveries(pb::DeliveryIds {
                ids: ids.clone()
            })),
        }),
        op2.redrive(pb::RedriveRequest {
            target: Some(pb::redrive_request::Target::Mailbox("YG001".into())),
        })
    );
    let requeued = a
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .chain(b.unwrap().into_inner().results)
        .filter(|r| r.outcome() == pb::RedriveOutcome::Requeued)
        .count();
    assert_eq!(requeued, 20, "each delivery redriven exactly once");
    clock.advance(1);
    let mut seen = puller.await.unwrap();
    seen.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(seen, expected, "every redriven delivery delivered once");
    // Redriving again is harmless.
    let again = op
        .redrive(pb::RedriveRequest {
            target: Some(pb::redrive_request::Target::Deliveries(pb::DeliveryIds {
                ids,
            })),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        again
            .iter()
            .all(|r| r.outcome() == pb::RedriveOutcome::NotQuarantined
                && r.state() == pb::DeliveryState::Delivered)
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_audit_trail_answers_who_saw_a_patients_record() {
    the_audit_trail_answers_who_saw_a_patients_record_on(Engine::Sled).await;
}

#[tokio::test]
async fn the_audit_trail_answers_who_saw_a_patients_record_on_postgres() {
    the_audit_trail_answers_who_saw_a_patients_record_on(Engine::Postgres).await;
}

async fn the_audit_trail_answers_who_saw_a_patients_record_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "seen",
            pb::JourneyEvent::Release,
            &["YG001"],
            &summary(30, None, "m"),
        ))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    pull_and_ack(&mut gp).await;
    let mut op = gw.operator().await;
    let trail = op
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(30))),
            reason: "subject access request 2026-117".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(trail.chain_verified);
    let actions: Vec<(&str, &str)> = trail
        .entries
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str()))
        .collect();
    for expected in [
        ("urn:ods:YP001", "submit"),
        ("urn:ods:YG001", "pull"),
        ("urn:ods:YG001", "ack"),
        ("urn:operator:oncall", "audit_query"),
    ] {
        assert!(actions.contains(&expected), "{expected:?} in {actions:?}");
    }
    // Nobody else's entries.
    assert!(trail.entries.iter().all(|e| !e.outcome.contains(&nhs(30))));
    gw.stop().await;
}

#[tokio::test]
async fn a_bad_operator_request_is_a_field_error() {
    let gw = TestGateway::start_with(|_| {}, Arc::new(SystemClock)).await;
    let mut op = gw.operator().await;
    let err = op
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(
                "9990000017".into(),
            )),
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["nhs_number"]);
    assert!(!err.message().contains("9990000017"));
    let err = op.redrive(pb::RedriveRequest::default()).await.unwrap_err();
    assert_eq!(violations(&err), ["target"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_summary_superseded_before_it_is_given_back_unsent_is_retired() {
    a_summary_superseded_before_it_is_given_back_unsent_is_retired_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_summary_superseded_before_it_is_given_back_unsent_is_retired_on_postgres() {
    a_summary_superseded_before_it_is_given_back_unsent_is_retired_on(Engine::Postgres).await;
}

/// A pull leases a transfer; a correction arrives before the pull's answer
/// is sent, and the lease is given back unsent (the answer was full). The
/// older summary is retired, not queued again: never sent, and not in the
/// way of the correction.
async fn a_summary_superseded_before_it_is_given_back_unsent_is_retired_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let t = pb::JourneyEvent::Transfer;
    prison
        .submit(submit("g-1", t, &[], &transfer(1, "first")))
        .await
        .unwrap();
    let leased = gw
        .store
        .pull_within("urn:ods:YP002", "YP002", (5, None), 60_000)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    prison
        .submit(submit("g-2", t, &[], &transfer(1, "corrected")))
        .await
        .unwrap();
    let d = &leased[0].delivery;
    gw.store
        .return_unsent("urn:ods:YP002", "YP002", vec![(d.id, d.attempt)])
        .await
        .unwrap();
    let mut receiving = gw.client("YP002").await;
    let got = pull_and_ack(&mut receiving).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["corrected"]);
    assert!(pull_and_ack(&mut receiving).await.is_empty());
    let old = track_message(&mut prison, "g-1").await;
    assert_eq!(old.deliveries[0].state(), pb::DeliveryState::Superseded);
    gw.stop().await;
}

#[tokio::test]
async fn a_correction_names_the_summary_its_recipient_was_given() {
    a_correction_names_the_summary_its_recipient_was_given_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_names_the_summary_its_recipient_was_given_on_postgres() {
    a_correction_names_the_summary_its_recipient_was_given_on(Engine::Postgres).await;
}

/// The receiving prison acknowledged t-1; t-2 was retired before it reached
/// them; t-3 must say it replaces t-1 (what they hold), not t-2 (which they
/// never saw), or the older summary stays filed beside the newer one.
async fn a_correction_names_the_summary_its_recipient_was_given_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let t = pb::JourneyEvent::Transfer;
    let first = prison
        .submit(submit("n-1", t, &[], &transfer(2, "first")))
        .await
        .unwrap()
        .into_inner()
        .handover_id;
    let mut receiving = gw.client("YP002").await;
    assert_eq!(pull_and_ack(&mut receiving).await.len(), 1);
    let second = prison
        .submit(submit("n-2", t, &[], &transfer(2, "second")))
        .await
        .unwrap()
        .into_inner()
        .handover_id;
    prison
        .submit(submit("n-3", t, &[], &transfer(2, "third")))
        .await
        .unwrap();
    let got = pull_and_ack(&mut receiving).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["third"]);
    assert_eq!(
        got[0].supersedes_handover_id, first,
        "not {second}, never given"
    );
    // The sender's own view keeps the chain as sent.
    let track = track_message(&mut prison, "n-3").await;
    assert_eq!(track.supersedes_handover_id, second);
    gw.stop().await;
}

#[tokio::test]
async fn a_summary_written_before_its_correction_arrives_superseded() {
    a_summary_written_before_its_correction_arrives_superseded_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_summary_written_before_its_correction_arrives_superseded_on_postgres() {
    a_summary_written_before_its_correction_arrives_superseded_on(Engine::Postgres).await;
}

/// The prison's transfer summary written at 08:00 is lost in transit and
/// retried after its correction written at 09:00 was accepted. "Newer" is
/// the later written: the retry is kept but superseded on arrival, so the
/// receiving prison gets only the correction; a correction written later
/// still replaces it as usual.
async fn a_summary_written_before_its_correction_arrives_superseded_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let written = |marker: &str, at: &str| {
        let mut s = transfer(4, marker);
        s.authored_at = at.parse().unwrap();
        s
    };
    let mut prison = gw.client("YP001").await;
    let t = pb::JourneyEvent::Transfer;
    let correction = prison
        .submit(submit(
            "w-2",
            t,
            &[],
            &written("corrected", "2026-11-24T09:00:00Z"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(correction.superseded_by_handover_id, 0);
    let stale = written("first", "2026-11-24T08:00:00Z");
    let late = prison
        .submit(submit("w-1", t, &[], &stale))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.superseded_by_handover_id, correction.handover_id);
    // A retry of the retry gets the same answer.
    let again = prison
        .submit(submit("w-1", t, &[], &stale))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.superseded_by_handover_id, correction.handover_id);

    let mut receiving = gw.client("YP002").await;
    let got = pull_and_ack(&mut receiving).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["corrected"]);
    assert_eq!(got[0].supersedes_handover_id, 0);
    assert!(pull_and_ack(&mut receiving).await.is_empty());
    let track = track_message(&mut prison, "w-1").await;
    assert_eq!(track.deliveries[0].state(), pb::DeliveryState::Superseded);
    assert_eq!(
        track.deliveries[0].superseded_by_handover,
        correction.handover_id
    );
    assert_eq!(track.supersedes_handover_id, 0);

    let third = prison
        .submit(submit(
            "w-3",
            t,
            &[],
            &written("third", "2026-11-24T10:00:00Z"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(third.superseded_by_handover_id, 0);
    let got = pull_and_ack(&mut receiving).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["third"]);
    assert_eq!(got[0].supersedes_handover_id, correction.handover_id);
    gw.stop().await;
}

/// A document dated ahead of the gateway's clock would stay newer than
/// every correction written before that time: it is refused at its field,
/// and nothing is stored.
#[tokio::test]
async fn a_summary_written_in_the_future_is_refused() {
    let Some(gw) = TestGateway::on(Engine::Sled).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let mut s = transfer(5, "future");
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    s.authored_at = throughcare::clinical::model::DateTime(now + time::Duration::minutes(6));
    let status = prison
        .submit(submit("f-1", pb::JourneyEvent::Transfer, &[], &s))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("authored_at"),
        "{}",
        status.message()
    );
    let status = prison
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId("f-1".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Within the five minutes clocks may differ by, it is taken.
    s.authored_at = throughcare::clinical::model::DateTime(now + time::Duration::minutes(4));
    prison
        .submit(submit("f-2", pb::JourneyEvent::Transfer, &[], &s))
        .await
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn a_release_queued_for_a_practice_disabled_before_it_pulled_waits_parked_to_be_claimed() {
    a_release_for_a_disabled_practice_waits_parked_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_release_queued_for_a_practice_disabled_before_it_pulled_waits_parked_to_be_claimed_on_postgres()
 {
    a_release_for_a_disabled_practice_waits_parked_on(Engine::Postgres).await;
}

/// A release queued for the patient's practice, which is disabled before
/// it pulls (it left the network): the release waited where nobody may
/// pull it. Now it waits in `@parked`, like a release whose GP was disabled
/// at submit, and the practice that registers the patient claims it.
async fn a_release_for_a_disabled_practice_waits_parked_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "gp-gone-1",
            pb::JourneyEvent::Release,
            &[],
            &summary(11, Some("YG001"), "gp gone"),
        ))
        .await
        .unwrap();
    gw.operator()
        .await
        .set_organisation_active(pb::SetOrganisationActiveRequest {
            ods_code: "YG001".into(),
            active: false,
        })
        .await
        .unwrap();
    let track = track_message(&mut prison, "gp-gone-1").await;
    let copy = track
        .deliveries
        .iter()
        .find(|d| d.destination == "@parked")
        .expect("parked");
    assert_eq!(copy.state(), pb::DeliveryState::Parked);
    let mut practice = gw.client("YG002").await;
    let claimed = practice
        .claim(pb::ClaimRequest {
            patient: Some(patient_ref(11)),
            evidence: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.claimed.len(), 1);
    let got = pull_and_ack(&mut practice).await;
    assert_eq!(got.iter().map(text_of).collect::<Vec<_>>(), ["gp gone"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_parked_release_past_its_deadline_is_reported_overdue() {
    a_parked_release_past_its_deadline_is_reported_overdue_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_parked_release_past_its_deadline_is_reported_overdue_on_postgres() {
    a_parked_release_past_its_deadline_is_reported_overdue_on(Engine::Postgres).await;
}

/// A release waiting in `@parked` for a practice has the deadline its GP
/// copy would have had: past it, it is reported overdue like any delivery
/// (Track, ListMailboxes), so nobody takes "parked" for "in hand".
async fn a_parked_release_past_its_deadline_is_reported_overdue_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |c| {
        c.queue.sweep_interval_ms = 50;
    })
    .await
    else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "parked-late",
            pb::JourneyEvent::Release,
            &[],
            &summary(62, None, "waiting"),
        ))
        .await
        .unwrap();
    let parked = |t: &pb::TrackResponse| {
        t.deliveries
            .iter()
            .find(|d| d.destination == "@parked")
            .cloned()
            .expect("parked")
    };
    let due = parked(&track_message(&mut prison, "parked-late").await)
        .due_at
        .expect("a parked release has a deadline");
    let due_ms = due.seconds * 1_000 + i64::from(due.nanos) / 1_000_000;
    clock.advance((due_ms - T0 + 1).max(0));
    let mut reported = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let d = parked(&track_message(&mut prison, "parked-late").await);
        if d.overdue_since.is_some() {
            reported = Some(d);
            break;
        }
    }
    let d = reported.expect("overdue reported within the scans");
    assert!(d.overdue);
    assert_eq!(d.state(), pb::DeliveryState::Parked);
    let boxes = gw
        .operator()
        .await
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .mailboxes;
    let waiting = boxes.iter().find(|m| m.mailbox == "@parked").unwrap();
    assert_eq!((waiting.depth, waiting.overdue), (1, 1));
    gw.stop().await;
}

#[tokio::test]
async fn a_withdrawal_notice_for_a_disabled_practice_waits_for_it_and_is_never_parked() {
    a_withdrawal_notice_for_a_disabled_practice_is_never_parked_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_withdrawal_notice_for_a_disabled_practice_waits_for_it_and_is_never_parked_on_postgres()
{
    a_withdrawal_notice_for_a_disabled_practice_is_never_parked_on(Engine::Postgres).await;
}

/// A practice given a release, then told by a withdrawal notice that a
/// correction went elsewhere, is disabled before it pulls the notice. The
/// notice used to be parked like a release: listed for operators as a
/// release waiting for a GP, there to be claimed or routed by PDS to a
/// practice that never had the earlier summary. It stays for the practice
/// it is about, which gets it once enabled again.
async fn a_withdrawal_notice_for_a_disabled_practice_is_never_parked_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    prison
        .submit(submit(
            "wd-1",
            release,
            &[],
            &summary(52, Some("YG001"), "first"),
        ))
        .await
        .unwrap();
    let mut first = gw.client("YG001").await;
    assert_eq!(pull_and_ack(&mut first).await.len(), 1);
    prison
        .submit(submit(
            "wd-2",
            release,
            &[],
            &summary(52, Some("YG002"), "second"),
        ))
        .await
        .unwrap();
    let mut op = gw.operator().await;
    let active = |active: bool| pb::SetOrganisationActiveRequest {
        ods_code: "YG001".into(),
        active,
    };
    op.set_organisation_active(active(false)).await.unwrap();
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert!(
        parked.is_empty(),
        "a withdrawal notice is no release waiting for a GP: {parked:?}"
    );
    let t = track_message(&mut prison, "wd-2").await;
    let mut to: Vec<_> = t
        .deliveries
        .iter()
        .filter(|d| d.destination.starts_with("YG") || d.destination.starts_with('@'))
        .map(|d| (d.destination.as_str(), d.state()))
        .collect();
    to.sort_unstable();
    assert_eq!(
        to,
        [
            ("YG001", pb::DeliveryState::Queued),
            ("YG002", pb::DeliveryState::Queued)
        ]
    );
    op.set_organisation_active(active(true)).await.unwrap();
    let got = pull_and_ack(&mut first).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        [""],
        "the notice"
    );
    gw.stop().await;
}

#[tokio::test]
async fn listing_parked_and_quarantined_deliveries_is_on_each_patients_trail() {
    listing_is_on_each_patients_trail_on(Engine::Sled).await;
}

#[tokio::test]
async fn listing_parked_and_quarantined_deliveries_is_on_each_patients_trail_on_postgres() {
    listing_is_on_each_patients_trail_on(Engine::Postgres).await;
}

/// What a listing shows (a release waiting for a GP, what PDS said of the
/// patient, a copy the practice refused) is about a patient, so each
/// handover shown is audited under its patient; the one not shown is not.
async fn listing_is_on_each_patients_trail_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let parked = prison
        .submit(submit(
            "parked",
            pb::JourneyEvent::Release,
            &[],
            &summary(21, None, "waiting for a practice"),
        ))
        .await
        .unwrap()
        .into_inner();
    let refused = prison
        .submit(submit(
            "refused",
            pb::JourneyEvent::Release,
            &[],
            &summary(22, Some("YG001"), "refused by the practice"),
        ))
        .await
        .unwrap()
        .into_inner();
    let untouched = prison
        .submit(submit(
            "untouched",
            pb::JourneyEvent::Release,
            &[],
            &summary(23, Some("YG002"), "still queued"),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut gp = gw.client("YG001").await;
    let d = gp.pull(pull(1)).await.unwrap().into_inner().deliveries;
    gp.nack(pb::NackRequest {
        delivery_id: d[0].delivery_id,
        attempt: d[0].attempt,
        permanent: true,
        reason: "unreadable by the practice system".into(),
    })
    .await
    .unwrap();

    let mut op = gw.operator().await;
    let listed = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.deliveries[0].handover_id, parked.handover_id);
    let q = op
        .list_quarantine(pb::ListQuarantineRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.deliveries[0].handover_id, refused.handover_id);
    for (patient, handover, action) in [
        (21, parked.handover_id, Some("list_parked")),
        (22, refused.handover_id, Some("list_quarantine")),
        (23, untouched.handover_id, None),
    ] {
        let trail = op
            .audit_trail(pb::AuditTrailRequest {
                subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(patient))),
                reason: "checking who listed this patient".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let listings: Vec<_> = trail
            .entries
            .iter()
            .filter(|e| e.action.starts_with("list_"))
            .map(|e| (e.action.as_str(), e.handover_id, e.actor.as_str()))
            .collect();
        let want: Vec<_> = action
            .map(|a| (a, handover, "urn:operator:oncall"))
            .into_iter()
            .collect();
        assert_eq!(listings, want, "patient {patient}");
    }
}
