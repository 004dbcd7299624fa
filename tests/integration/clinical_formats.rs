//! The synthetic patients through FHIR and HL7 v2 and back: each format is
//! the identity on what it carries, and says what it does not carry.

use std::path::PathBuf;

use proptest::prelude::*;
use throughcare::clinical::model::ClinicalSummary;
use throughcare::clinical::views::{self, View};
use throughcare::clinical::{Limits, fhir, hl7v2, validate};
use throughcare::journey::JourneyEvent;

fn fixtures() -> Vec<(String, ClinicalSummary)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/patients");
    let mut out: Vec<(String, ClinicalSummary)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let s = serde_json::from_slice(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_stem().unwrap().to_string_lossy().into_owned(), s)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 6);
    out
}

fn event_of(s: &ClinicalSummary) -> JourneyEvent {
    let c = &s.custody;
    if c.transfer_to.is_some() {
        JourneyEvent::Transfer
    } else if c.release_date.is_some() {
        JourneyEvent::Release
    } else {
        JourneyEvent::Admission
    }
}

/// What FHIR cannot carry, removed (each removal is reported as not carried).
fn fhir_carried(mut s: ClinicalSummary) -> ClinicalSummary {
    for a in &mut s.allergies {
        if a.reaction.is_none() {
            a.severity = None;
        }
    }
    if s.custody.transfer_at.is_some() {
        s.custody.release_date = None;
    }
    s
}

/// What HL7 v2 cannot carry, removed.
fn hl7_carried(mut s: ClinicalSummary, event: JourneyEvent) -> ClinicalSummary {
    if let Some(a) = &mut s.custody.release_address {
        a.lines.truncate(2);
    }
    if event != JourneyEvent::Transfer {
        s.custody.transfer_to = None;
    }
    if s.custody.transfer_at.is_some() {
        s.custody.release_date = None;
    }
    if s.patient.given_names.len() > 2 {
        let rest = s.patient.given_names[1..].join(" ");
        s.patient.given_names.truncate(1);
        s.patient.given_names.push(rest);
    }
    s
}

#[test]
fn every_fixture_is_clinically_complete_for_its_event() {
    for (name, s) in fixtures() {
        validate(&s, event_of(&s)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn fixtures_round_trip_through_fhir() {
    for (name, s) in fixtures() {
        let event = event_of(&s);
        let rendered = fhir::render(&s, event);
        let parsed = fhir::parse(&rendered.bytes, &Limits::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.event, Some(event), "{name}");
        assert_eq!(parsed.summary, fhir_carried(s.clone()), "{name}");
        let dropped = fhir_carried(s.clone()) != s;
        assert_eq!(
            dropped,
            !rendered.not_carried.is_empty(),
            "{name}: {:?}",
            rendered.not_carried
        );
    }
}

#[test]
fn fixtures_round_trip_through_hl7v2() {
    for (name, s) in fixtures() {
        let event = event_of(&s);
        let rendered = hl7v2::render(&s, event);
        let parsed = hl7v2::parse(&rendered.bytes, &Limits::default()).unwrap_or_else(|e| {
            panic!("{name}: {e}\n{}", String::from_utf8_lossy(&rendered.bytes))
        });
        assert_eq!(parsed.event, event, "{name}");
        assert_eq!(parsed.summary, hl7_carried(s.clone(), event), "{name}");
    }
}

#[test]
fn the_probation_view_carries_only_what_is_theirs() {
    for (name, s) in fixtures() {
        let v = views::apply(&s, View::Probation);
        assert!(
            v.medications.is_empty() && v.diagnoses.is_empty() && v.allergies.is_empty(),
            "{name}"
        );
        assert!(
            v.infections.is_empty() && v.vaccinations.is_empty() && v.mental_health.is_none(),
            "{name}"
        );
        assert!(v.risks.iter().all(|r| r.note.is_none()), "{name}");
        if !s.may_share_risk_with_probation() {
            assert!(
                v.risks.is_empty(),
                "{name}: risks without consent or legal basis"
            );
        }
        let text = String::from_utf8(fhir::render(&v, event_of(&s)).bytes).unwrap();
        for m in &s.medications {
            assert!(!text.contains(&m.code.display), "{name}: medicine leaked");
        }
    }
}

fn mutate(bytes: &[u8], at: usize, by: u8) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if !b.is_empty() {
        let i = at % b.len();
        b[i] = b[i].wrapping_add(by);
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = fhir::parse(&bytes, &Limits::default());
        let _ = hl7v2::parse(&bytes, &Limits::default());
        let mut msh = b"MSH|^~\\&|".to_vec();
        msh.extend_from_slice(&bytes);
        let _ = hl7v2::parse(&msh, &Limits::default());
    }

    #[test]
    fn parsers_never_panic_on_mutated_messages(which in 0usize..7, at in any::<usize>(), by in 1u8..=255, cut in any::<usize>()) {
        let all = fixtures();
        let (_, s) = &all[which % all.len()];
        let event = event_of(s);
        for bytes in [fhir::render(s, event).bytes, hl7v2::render(s, event).bytes] {
            let mutated = mutate(&bytes, at, by);
            let _ = fhir::parse(&mutated, &Limits::default());
            let _ = hl7v2::parse(&mutated, &Limits::default());
            let truncated = &bytes[..cut % (bytes.len() + 1)];
            let _ = fhir::parse(truncated, &Limits::default());
            let _ = hl7v2::parse(truncated, &Limits::default());
        }
    }
}
