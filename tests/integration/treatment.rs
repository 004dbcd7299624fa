//! Community treatment services as recipients, end to end over real mutual
//! TLS: a release on opioid substitution therapy reaches the substance
//! misuse service before the next dose, one with a mental health care plan
//! or an active suicide/self-harm risk reaches the mental health team, each
//! in its own view, only with consent or a legal basis; no service for the
//! release area holds the copy where operators see it.

use crate::support;

use std::time::Duration;

use support::*;
use throughcare::clinical::ClinicalSummary;
use throughcare::clinical::model::{
    ConsentDecision, MentalHealth, RiskFlag, RiskKind, TREATMENT_SHARING_NOT_CARRIED,
};
use throughcare::grpc::pb;
use tonic::transport::Channel;

type Handover = pb::handover_service_client::HandoverServiceClient<Channel>;

/// The last OST dose given in prison: two hours before the manual clock's start.
const LAST_DOSE_MS: i64 = T0 - 2 * 3_600_000;

/// Invented patient `patient` from YP001 (region north) to GP YG001, on
/// methadone last dosed at [`LAST_DOSE_MS`], under the care programme
/// approach, with the treatment-sharing decision `consent`.
fn ost_and_care_plan(patient: u32, consent: ConsentDecision) -> ClinicalSummary {
    let mut s = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        "treatment",
    );
    let m = &mut s.medications[0];
    m.code.display = "Methadone 1mg/ml oral solution sugar free".into();
    m.code.code = "3321611000001103".into();
    m.dose = "60 mg".into();
    m.opioid_substitution = true;
    m.supervised = true;
    m.last_dose_given = Some(
        jiff::Timestamp::from_millisecond(LAST_DOSE_MS)
            .unwrap()
            .to_string()
            .parse()
            .unwrap(),
    );
    s.mental_health = Some(MentalHealth {
        care_programme_approach: true,
        care_coordinator: Some("Sam Whitlow (invented)".into()),
    });
    s.risks.push(RiskFlag {
        kind: RiskKind::Violence,
        active: true,
        note: Some("invented note".into()),
    });
    s.consent.treatment_sharing = consent;
    s
}

fn release_of(id: &str, s: &ClinicalSummary, to: &[&str]) -> pb::SubmitRequest {
    throughcare::cli::client::native_submit(id, pb::JourneyEvent::Release, to, s)
}

/// Registers a substance misuse service and a mental health team for the
/// north (YP001's region), and one substance misuse service in the south.
async fn register_services(gw: &TestGateway) {
    let mut op = gw.operator().await;
    for (code, kind, region) in [
        (
            "YS001",
            pb::OrganisationKind::SubstanceMisuseService,
            "north",
        ),
        (
            "YS002",
            pb::OrganisationKind::SubstanceMisuseService,
            "south",
        ),
        ("YM001", pb::OrganisationKind::MentalHealthTeam, "north"),
    ] {
        op.put_organisation(pb::PutOrganisationRequest {
            organisation: Some(pb::Organisation {
                ods_code: code.into(),
                kind: kind.into(),
                name: format!("{code} (invented)"),
                format: pb::DocumentFormat::Native.into(),
                region: region.into(),
                active: true,
            }),
        })
        .await
        .unwrap();
    }
}

/// A handover client for a registered organisation without a dev certificate.
async fn client_for(gw: &TestGateway, code: &str) -> Handover {
    let issued = gw
        .ca()
        .issue_client_now(&format!("urn:ods:{code}"))
        .unwrap();
    gw.client_with(
        &gw.ca_pem(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .await
    .unwrap()
}

fn destinations(r: &pb::SubmitResponse) -> Vec<&str> {
    r.deliveries
        .iter()
        .map(|d| d.destination.as_str())
        .collect()
}

fn due_ms(r: &pb::SubmitResponse, to: &str) -> i64 {
    let d = r.deliveries.iter().find(|d| d.destination == to).unwrap();
    let t = d.due_at.as_ref().unwrap();
    t.seconds * 1_000 + i64::from(t.nanos) / 1_000_000
}

fn native(d: &pb::Delivery) -> &pb::ClinicalSummary {
    match &d.document {
        Some(pb::delivery::Document::Native(s)) => s,
        other => panic!("expected a native document, got {other:?}"),
    }
}

#[tokio::test]
async fn an_ost_release_reaches_the_area_substance_misuse_service_before_the_next_dose() {
    let (gw, _clock) = TestGateway::start_manual(|_| {}).await;
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let s = ost_and_care_plan(1, ConsentDecision::Given);
    let r = prison
        .submit(release_of("ost", &s, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YG001", "YPR01", "YS001", "YM001"]);
    assert_eq!(
        due_ms(&r, "YS001"),
        LAST_DOSE_MS + 24 * 3_600_000,
        "before the next dose, not the end of the release day"
    );
    assert_ne!(due_ms(&r, "YG001"), due_ms(&r, "YS001"));
    let mut sms = client_for(&gw, "YS001").await;
    let got = pull_and_ack(&mut sms).await;
    assert_eq!(got.len(), 1);
    let doc = native(&got[0]);
    assert_eq!(doc.medications.len(), 1);
    assert!(doc.medications[0].opioid_substitution);
    assert_eq!(doc.medications[0].dose, "60 mg");
    assert!(!doc.medications[0].last_dose_given.is_empty());
    assert!(doc.mental_health.is_none(), "not the mental health team's");
    assert!(doc.risks.is_empty(), "a violence risk is not drug-related");
    assert!(got[0].urgent);
    assert!(
        got[0]
            .not_carried
            .iter()
            .any(|n| n.starts_with("medications: only opioid substitution")),
        "{:?}",
        got[0].not_carried
    );
    let mut mht = client_for(&gw, "YM001").await;
    let got = pull_and_ack(&mut mht).await;
    assert_eq!(got.len(), 1);
    let doc = native(&got[0]);
    assert!(
        doc.medications.is_empty(),
        "methadone is not psychotropic here"
    );
    assert!(doc.mental_health.as_ref().unwrap().care_programme_approach);
    assert!(doc.substance_misuse.is_none());
    assert!(
        got[0]
            .not_carried
            .iter()
            .any(|n| n.starts_with("risks: only suicide and self-harm")),
        "{:?}",
        got[0].not_carried
    );
    // The prison may name the service: the named one wins over the area's.
    let r = prison
        .submit(release_of(
            "named",
            &ost_and_care_plan(2, ConsentDecision::Given),
            &["YS002"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(destinations(&r).contains(&"YS002"));
    assert!(!destinations(&r).contains(&"YS001"));
    gw.stop().await;
}

#[tokio::test]
async fn treatment_services_receive_nothing_when_consent_is_refused() {
    let (gw, _clock) = TestGateway::start_manual(|_| {}).await;
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let refused = ost_and_care_plan(3, ConsentDecision::Refused);
    let r = prison
        .submit(release_of("refused", &refused, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YG001", "YPR01"]);
    // Naming a service does not override the refusal: refused, field-level.
    let err = prison
        .submit(release_of("refused-named", &refused, &["YS001"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(violations(&err), ["destinations[0]"]);
    // A recorded legal basis allows it, as it does for probation.
    let mut basis = ost_and_care_plan(4, ConsentDecision::Refused);
    basis.consent.legal_basis = Some("invented legal basis".into());
    let r = prison
        .submit(release_of("basis", &basis, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destinations(&r), ["YG001", "YPR01", "YS001", "YM001"]);
    let mut sms = client_for(&gw, "YS001").await;
    assert_eq!(
        pull_and_ack(&mut sms).await.len(),
        1,
        "only the consented one"
    );
    gw.stop().await;
}

#[tokio::test]
async fn no_service_for_the_release_area_parks_the_copy_visibly() {
    let (gw, clock) = TestGateway::start_manual(|c| c.queue.sweep_interval_ms = 50).await;
    let mut prison = gw.client("YP001").await;
    let mut s = ost_and_care_plan(5, ConsentDecision::Given);
    s.mental_health = None;
    s.risks = vec![RiskFlag {
        kind: RiskKind::SelfHarm,
        active: true,
        note: None,
    }];
    let r = prison
        .submit(release_of("nowhere", &s, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        destinations(&r),
        [
            "YG001",
            "YPR01",
            "@parked-substance-misuse",
            "@parked-mental-health"
        ]
    );
    let t = track_message(&mut prison, "nowhere").await;
    for d in &t.deliveries[2..] {
        assert_eq!(d.state(), pb::DeliveryState::Parked, "{}", d.destination);
    }
    let mut op = gw.operator().await;
    let boxes = op
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .mailboxes;
    for held in ["@parked-substance-misuse", "@parked-mental-health"] {
        let m = boxes.iter().find(|m| m.mailbox == held).unwrap();
        assert_eq!((m.depth, m.urgent), (1, 1), "{held}");
    }
    // Past the next dose, the held OST copy is reported overdue.
    clock.advance(LAST_DOSE_MS + 24 * 3_600_000 + 1 - T0);
    let mut reported = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = track_message(&mut prison, "nowhere").await;
        if t.deliveries[2].overdue_since.is_some() {
            reported = true;
            break;
        }
    }
    assert!(reported, "the missed dose deadline is reported");
    // A GP practice's claim of parked releases leaves the held copies alone.
    let mut gp = gw.client("YG002").await;
    let _ = gp
        .claim(pb::ClaimRequest {
            patient: Some(pb::PatientRef {
                nhs_number: nhs(5),
                prison_number: String::new(),
                date_of_birth: "1985-06-15".into(),
            }),
            evidence: None,
        })
        .await;
    let t = track_message(&mut prison, "nowhere").await;
    assert_eq!(t.deliveries[2].destination, "@parked-substance-misuse");
    assert_eq!(t.deliveries[3].destination, "@parked-mental-health");
    gw.stop().await;
}

#[tokio::test]
async fn a_fhir_recipient_is_told_the_treatment_decision_is_not_carried() {
    let (gw, _clock) = TestGateway::start_manual(|_| {}).await;
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let s = ost_and_care_plan(6, ConsentDecision::Given);
    prison.submit(release_of("fhir", &s, &[])).await.unwrap();
    let mut mht = client_for(&gw, "YM001").await;
    let mut request = pull(10);
    request.format = pb::DocumentFormat::FhirJson.into();
    let got = mht.pull(request).await.unwrap().into_inner().deliveries;
    assert_eq!(got.len(), 1);
    assert!(
        got[0]
            .not_carried
            .iter()
            .any(|n| n == TREATMENT_SHARING_NOT_CARRIED)
    );
    gw.stop().await;
}
