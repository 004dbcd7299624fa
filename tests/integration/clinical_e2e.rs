//! Clinical content end to end over mutual TLS: one submission, each
//! recipient in its own format and view.

use crate::support;

use support::*;
use throughcare::clinical::model::ClinicalSummary;
use throughcare::clinical::{Limits, fhir, hl7v2};
use throughcare::grpc::pb;
use throughcare::journey::JourneyEvent;
use tonic::Code;

fn fixture(name: &str) -> ClinicalSummary {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/patients")
        .join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn as_fhir(s: &ClinicalSummary, event: JourneyEvent) -> pb::submit_request::Document {
    pb::submit_request::Document::FhirJson(String::from_utf8(fhir::render(s, event).bytes).unwrap())
}

fn submit(
    id: &str,
    event: pb::JourneyEvent,
    to: &[&str],
    doc: pb::submit_request::Document,
) -> pb::SubmitRequest {
    pb::SubmitRequest {
        message_id: id.into(),
        event: event.into(),
        patient: None,
        destinations: to.iter().map(|s| (*s).to_owned()).collect(),
        document: Some(doc),
    }
}

fn default_format(max: u32) -> pb::PullRequest {
    pb::PullRequest {
        max_deliveries: max,
        lease: None,
        wait: None,
        format: 0,
    }
}

#[tokio::test]
async fn one_fhir_submission_reaches_each_recipient_in_its_own_format_and_view() {
    let gw = TestGateway::start().await;
    let s = fixture("01-ost-released-today");
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(submit(
            "rel-ost",
            pb::JourneyEvent::Release,
            &["YG001", "YG002", "YPR01"],
            as_fhir(&s, JourneyEvent::Release),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.deliveries.len(), 3);

    // Riverside speaks FHIR.
    let d = &gw
        .client("YG001")
        .await
        .pull(default_format(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0];
    assert!(d.urgent);
    let Some(pb::delivery::Document::FhirJson(bundle)) = &d.document else {
        panic!("expected FHIR, got {:?}", d.document)
    };
    let back = fhir::parse(bundle.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(back.summary, s);
    assert_eq!(back.event, Some(JourneyEvent::Release));

    // Hillview speaks HL7 v2: the same patient, with the last methadone dose.
    let d = &gw
        .client("YG002")
        .await
        .pull(default_format(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0];
    let Some(pb::delivery::Document::Hl7v2(message)) = &d.document else {
        panic!("expected HL7 v2, got {:?}", d.document)
    };
    assert!(message.starts_with("MSH|^~\\&|") && message.contains("ADT^A03^ADT_A03"));
    let back = hl7v2::parse(message.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(back.summary, s);

    // Probation gets only its view.
    let d = &gw
        .client("YPR01")
        .await
        .pull(default_format(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0];
    let Some(pb::delivery::Document::Native(view)) = &d.document else {
        panic!("expected native, got {:?}", d.document)
    };
    assert!(view.medications.is_empty() && view.diagnoses.is_empty() && view.allergies.is_empty());
    assert!(view.mental_health.is_none() && view.infections.is_empty());
    assert_eq!(view.custody.as_ref().unwrap().release_date, "2026-11-24");
    assert_eq!(view.registered_gp, "YG001");
    assert_eq!(
        view.risks.len(),
        1,
        "consent given: active risk flags are shared"
    );
    assert!(
        view.risks[0].note.is_empty(),
        "clinical notes never reach probation"
    );
    assert!(
        view.follow_ups
            .iter()
            .all(|f| f.service == "treatment referral in place")
    );
    gw.stop().await;
}

#[tokio::test]
async fn refused_consent_means_no_risk_flags_reach_probation() {
    let gw = TestGateway::start().await;
    let s = fixture("07-refused-probation-consent");
    let mut prison = gw.client("YP001").await;
    prison
        .submit(submit(
            "rel-refused",
            pb::JourneyEvent::Release,
            &["YG002", "YPR01"],
            pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(&s)),
        ))
        .await
        .unwrap();
    let mut probation = gw.client("YPR01").await;
    let d = &probation
        .pull(default_format(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0];
    let Some(pb::delivery::Document::Native(view)) = &d.document else {
        panic!()
    };
    assert!(view.risks.is_empty());
    // Asking for FHIR does not widen the view.
    probation
        .nack(pb::NackRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
            permanent: false,
            reason: "retry as FHIR".into(),
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let mut as_fhir_req = default_format(5);
    as_fhir_req.format = pb::DocumentFormat::FhirJson.into();
    let d = &probation
        .pull(as_fhir_req)
        .await
        .unwrap()
        .into_inner()
        .deliveries[0];
    let Some(pb::delivery::Document::FhirJson(text)) = &d.document else {
        panic!()
    };
    assert!(
        !text.contains("\"Flag\""),
        "a risk flag reached probation without consent"
    );
    assert!(
        !text.contains("Depressive"),
        "a diagnosis reached probation"
    );

    // The GP still sees the violence risk.
    let d = &gw
        .client("YG002")
        .await
        .pull(default_format(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0];
    let Some(pb::delivery::Document::Hl7v2(message)) = &d.document else {
        panic!()
    };
    assert!(message.contains("RISK-KIND^Risk^THROUGHCARE|1|violence"));
    gw.stop().await;
}

#[tokio::test]
async fn what_a_format_cannot_carry_is_listed_on_the_delivery_and_on_track() {
    let gw = TestGateway::start().await;
    let s = fixture("06-many-medicines-and-allergies");
    let mut prison = gw.client("YP002").await;
    prison
        .submit(submit(
            "rel-many",
            pb::JourneyEvent::Release,
            &["YG001", "YG002"],
            pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(&s)),
        ))
        .await
        .unwrap();
    let track = prison
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId("rel-many".into())),
        })
        .await
        .unwrap()
        .into_inner();
    // FHIR (YG001) cannot carry a severity without a reaction; HL7 AL1 can.
    assert_eq!(track.deliveries[0].not_carried.len(), 1);
    assert!(track.deliveries[0].not_carried[0].starts_with("allergies[4].severity"));
    assert!(track.deliveries[1].not_carried.is_empty());
    let d = &gw
        .client("YG001")
        .await
        .pull(default_format(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries[0];
    assert_eq!(d.not_carried, track.deliveries[0].not_carried);
    gw.stop().await;
}

#[tokio::test]
async fn urgent_releases_are_served_before_earlier_routine_ones() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    for i in 0..3 {
        prison
            .submit(release(
                &format!("routine-{i}"),
                20 + i,
                &["YG001"],
                "routine",
            ))
            .await
            .unwrap();
    }
    let s = fixture("01-ost-released-today");
    prison
        .submit(submit(
            "urgent",
            pb::JourneyEvent::Release,
            &["YG001"],
            as_fhir(&s, JourneyEvent::Release),
        ))
        .await
        .unwrap();
    let got = gw
        .client("YG001")
        .await
        .pull(pull(10))
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(got.len(), 4);
    assert!(got[0].urgent && got[0].patient.as_ref().unwrap().nhs_number == "9990001014");
    assert!(got[1..].iter().all(|d| !d.urgent));
    gw.stop().await;
}

#[tokio::test]
async fn a_document_that_states_another_event_or_is_incomplete_is_refused() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    let s = fixture("05-no-nhs-number");
    let hl7 = String::from_utf8(hl7v2::render(&s, JourneyEvent::Admission).bytes).unwrap();
    let before = gw.store.content_digest().unwrap();
    let err = prison
        .submit(submit(
            "wrong-event",
            pb::JourneyEvent::Release,
            &["YG001"],
            pb::submit_request::Document::Hl7v2(hl7),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields = violations(&err);
    assert!(fields.contains(&"event".to_owned()), "{fields:?}");
    assert!(
        fields.contains(&"summary.custody.release_date".to_owned()),
        "{fields:?}"
    );

    // Methadone without the last dose given is not a safe handover.
    let mut ost = fixture("01-ost-released-today");
    ost.medications[0].last_dose_given = None;
    let err = prison
        .submit(submit(
            "no-last-dose",
            pb::JourneyEvent::Release,
            &["YG001"],
            as_fhir(&ost, JourneyEvent::Release),
        ))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["summary.medications[0].last_dose_given"]);
    assert_eq!(gw.store.content_digest().unwrap(), before);
    gw.stop().await;
}
