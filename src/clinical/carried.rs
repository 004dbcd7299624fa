//! What a rendering would not carry, decided from the summary alone, without
//! rendering it: submit records `not_carried` on every delivery, and
//! rendering each destination's document only to learn that cost a whole
//! FHIR Bundle or HL7 message per destination per submit.
//!
//! The rules mirror the writers (`fhir::render`, `hl7v2::render`), which
//! stay the authority on what they write: the tests below compare this with
//! what rendering reports, for every fixture, view, event and format, and
//! for summaries made to hit each rule. A writer that learns to drop
//! something new fails them until it is listed here too.

use super::JourneyEvent;
use super::model::{ClinicalSummary, ConsentDecision, DMD, SNOMED, TREATMENT_SHARING_NOT_CARRIED};
use super::translate::{TextFormat, notes};
use super::views::{self, View};

/// What the `view` of `summary` rendered in `format` for `event` does not
/// carry: the same list, in the same order, as [`super::translate::write`]
/// gives in `Rendered::not_carried`.
#[must_use]
pub fn not_carried(
    format: TextFormat,
    summary: &ClinicalSummary,
    view: View,
    event: JourneyEvent,
) -> Vec<String> {
    let shown = views::apply(summary, view);
    let mut out = match format {
        TextFormat::Fhir => fhir(&shown),
        TextFormat::Hl7v2 => hl7v2(&shown, event),
        TextFormat::ModelJson => Vec::new(),
    };
    out.extend(notes(summary, view));
    out
}

const TRANSFER_ENDS_EPISODE: &str =
    "custody.release_date: a transfer's episode ends at the transfer";

fn fhir(s: &ClinicalSummary) -> Vec<String> {
    let mut out = Vec::new();
    let c = &s.custody;
    if c.transfer_at.is_some() && c.release_date.is_some() {
        out.push(TRANSFER_ENDS_EPISODE.to_owned());
    }
    for (i, a) in s.allergies.iter().enumerate() {
        let no_reaction = a.reaction.as_deref().is_none_or(|r| r.trim().is_empty());
        if no_reaction && a.severity.is_some() {
            out.push(format!(
                "allergies[{i}].severity: FHIR carries severity only with a reaction"
            ));
        }
    }
    treatment_sharing(s, &mut out);
    out
}

/// What HL7 v2 says of a code outside SNOMED CT and dm+d (its CE.3 is `L`).
pub(crate) const LOCAL_CODE_NOT_CARRIED: &str =
    "a code system other than SNOMED CT or dm+d (sent as local, L)";

/// Whether any coded item HL7 v2 writes as a CE (a medicine, supply,
/// allergy, diagnosis, infection, vaccination or risk) is coded outside
/// SNOMED CT and dm+d (words only are no code, and travel as words).
pub(crate) fn has_local_code(s: &ClinicalSummary) -> bool {
    s.medications
        .iter()
        .map(|m| &m.code)
        .chain(s.prescriptions.iter().map(|p| &p.code))
        .chain(s.allergies.iter().map(|a| &a.substance))
        .chain(s.diagnoses.iter().map(|d| &d.code))
        .chain(s.infections.iter().map(|i| &i.code))
        .chain(s.vaccinations.iter().map(|v| &v.code))
        .chain(s.risks.iter().filter_map(|r| r.code.as_ref()))
        .any(|code| code.system != SNOMED && code.system != DMD && !code.is_words_only())
}

/// The treatment-sharing decision, which neither text format carries.
fn treatment_sharing(s: &ClinicalSummary, out: &mut Vec<String>) {
    if s.consent.treatment_sharing != ConsentDecision::NotRecorded {
        out.push(TREATMENT_SHARING_NOT_CARRIED.to_owned());
    }
}

fn hl7v2(s: &ClinicalSummary, event: JourneyEvent) -> Vec<String> {
    let mut out = Vec::new();
    let c = &s.custody;
    let transfer = event == JourneyEvent::Transfer;
    if c.transfer_at.is_some() && !transfer {
        out.push("custody.transfer_at: carried only by an A02 transfer".to_owned());
    }
    if c.release_address
        .as_ref()
        .is_some_and(|a| a.lines.len() > 2)
    {
        out.push("custody.release_address.lines: PID-11 carries two street lines".to_owned());
    }
    if c.transfer_to.is_some() && !transfer {
        out.push("custody.transfer_to: carried only by an A02 transfer".to_owned());
    }
    if c.transfer_at.is_some() && c.release_date.is_some() {
        out.push(TRANSFER_ENDS_EPISODE.to_owned());
    }
    if has_local_code(s) {
        out.push(LOCAL_CODE_NOT_CARRIED.to_owned());
    }
    treatment_sharing(s, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clinical::translate::write;

    const EVENTS: [JourneyEvent; 4] = [
        JourneyEvent::Admission,
        JourneyEvent::Transfer,
        JourneyEvent::Release,
        JourneyEvent::CommunitySummary,
    ];
    const VIEWS: [View; 6] = crate::clinical::views::ALL_VIEWS;

    fn fixtures() -> Vec<(String, ClinicalSummary)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/patients");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let summary = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                out.push((path.display().to_string(), summary));
            }
        }
        assert!(out.len() >= 7, "the patient fixtures are found");
        out
    }

    /// Each fixture, and each fixture changed to hit every rule at once.
    fn cases() -> Vec<(String, ClinicalSummary)> {
        let mut out = fixtures();
        for (name, s) in fixtures() {
            let mut hit = s.clone();
            let c = &mut hit.custody;
            c.transfer_at = Some(hit.authored_at);
            c.transfer_to = Some(c.establishment.clone());
            c.release_date = c.release_date.or(Some(hit.patient.date_of_birth));
            if let Some(a) = c.release_address.as_mut() {
                a.lines = vec!["1".into(), "2".into(), "3".into()];
            }
            for a in &mut hit.allergies {
                a.reaction = Some("  ".into());
                a.severity = a
                    .severity
                    .or(Some(crate::clinical::model::Severity::Severe));
            }
            for m in &mut hit.medications {
                m.code.system = "http://example.org/local".into();
            }
            out.push((format!("{name} (every rule)"), hit));
        }
        out
    }

    #[test]
    fn it_lists_what_rendering_lists_for_every_fixture_view_event_and_format() {
        let mut compared = 0;
        for (name, s) in cases() {
            for view in VIEWS {
                for event in EVENTS {
                    for format in [TextFormat::Fhir, TextFormat::Hl7v2] {
                        let rendered = write(format, &s, view, event).not_carried;
                        let decided = not_carried(format, &s, view, event);
                        assert_eq!(decided, rendered, "{name}, {view:?}, {event:?}, {format:?}");
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared >= 7 * 2 * 5 * 4 * 2);
    }

    /// Every coded item HL7 v2 writes as a CE counts, not only medicines,
    /// allergies and diagnoses: a supply or risk coded locally went as `L`
    /// unsaid.
    #[test]
    fn a_local_code_anywhere_is_listed_for_hl7() {
        let (_, base) = fixtures()
            .into_iter()
            .find(|(_, s)| !s.prescriptions.is_empty() || !s.risks.is_empty())
            .expect("a fixture with a supply or a risk");
        assert!(!has_local_code(&base));
        let local = crate::clinical::model::Code {
            system: "http://example.org/local".into(),
            code: "X1".into(),
            display: "Local item".into(),
        };
        let mut s = base.clone();
        if let Some(p) = s.prescriptions.first_mut() {
            p.code = local.clone();
        } else {
            s.risks[0].code = Some(local.clone());
        }
        let hl7 = not_carried(TextFormat::Hl7v2, &s, View::Full, JourneyEvent::Release);
        assert!(hl7.iter().any(|n| n == LOCAL_CODE_NOT_CARRIED), "{hl7:?}");
    }

    #[test]
    fn the_rules_are_hit() {
        let (_, s) = cases().pop().unwrap();
        let fhir = not_carried(TextFormat::Fhir, &s, View::Full, JourneyEvent::Release);
        let hl7 = not_carried(TextFormat::Hl7v2, &s, View::Full, JourneyEvent::Release);
        assert!(
            fhir.iter().any(|n| n.starts_with("custody.release_date")),
            "{fhir:?}"
        );
        assert!(
            hl7.iter().any(|n| n.starts_with("custody.transfer_at")),
            "{hl7:?}"
        );
        assert!(
            hl7.iter().any(|n| n.starts_with("a code system")),
            "{hl7:?}"
        );
    }
}
