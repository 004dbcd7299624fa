//! A clinical summary as a person at a terminal reads it: the summary's
//! headings in clinical order, medicines first, and what was not carried.

use std::fmt::Write;

use crate::clinical::ClinicalSummary;
use crate::clinical::model::{ConsentDecision, Medication};

/// The summary as text under its headings, then what was not carried.
pub fn summary_text(s: &ClinicalSummary, not_carried: &[String]) -> String {
    let mut out = String::new();
    patient(&mut out, s);
    medicines(&mut out, &s.medications);
    list(
        &mut out,
        "Prescriptions (take-out and discharge)",
        s.prescriptions.iter().map(|p| {
            let dosage = p
                .dosage
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            let days = p
                .days_supplied
                .map(|d| format!(", {d} days supplied"))
                .unwrap_or_default();
            format!("{} ({}){dosage}{days}", p.code.display, p.status)
        }),
    );
    list(
        &mut out,
        "Allergies",
        s.allergies.iter().map(|a| {
            let severity = a
                .severity
                .map(|v| format!(", {v:?}").to_lowercase())
                .unwrap_or_default();
            let reaction = a
                .reaction
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            format!("{}{severity}{reaction}", a.substance.display)
        }),
    );
    list(
        &mut out,
        "Risks",
        s.risks.iter().map(|r| {
            let state = if r.active { "active" } else { "inactive" };
            let note = r
                .note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default();
            let code = r
                .code
                .as_ref()
                .map(|c| format!(" [{} {}]", c.code, c.display))
                .unwrap_or_default();
            format!("{:?}{code} ({state}){note}", r.kind)
        }),
    );
    list(
        &mut out,
        "Diagnoses",
        s.diagnoses.iter().map(|d| {
            let state = if d.active { "active" } else { "resolved" };
            let onset = d
                .onset
                .as_ref()
                .map(|o| format!(", since {o}"))
                .unwrap_or_default();
            format!("{} ({state}{onset})", d.code.display)
        }),
    );
    mental_health_and_substance_misuse(&mut out, s);
    list(
        &mut out,
        "Infections",
        s.infections
            .iter()
            .map(|i| format!("{}: {}", i.code.display, i.status)),
    );
    list(
        &mut out,
        "Vaccinations",
        s.vaccinations
            .iter()
            .map(|v| format!("{} on {}", v.code.display, v.date)),
    );
    list(
        &mut out,
        "Follow-ups",
        s.follow_ups.iter().map(|f| {
            let date = f
                .date
                .as_ref()
                .map(|d| format!(" on {d}"))
                .unwrap_or_default();
            format!("{:?}: {}{date}", f.kind, f.service)
        }),
    );
    consent_and_author(&mut out, s);
    list(
        &mut out,
        "Not carried (ask the sender for these)",
        not_carried.iter().cloned(),
    );
    out
}

fn heading(out: &mut String, title: &str) {
    let _ = writeln!(out, "\n{title}");
}

fn patient(out: &mut String, s: &ClinicalSummary) {
    let p = &s.patient;
    heading(out, "Patient");
    let _ = writeln!(out, "  {}, {}", p.family_name, p.given_names.join(" "));
    let _ = writeln!(out, "  born {}", p.date_of_birth);
    if let Some(n) = &p.nhs_number {
        let _ = writeln!(out, "  NHS number {n}");
    }
    if let Some(n) = &p.prison_number {
        let _ = writeln!(out, "  prison number {}", n.as_str());
    }
    let c = &s.custody;
    heading(out, "Custody");
    let _ = writeln!(out, "  establishment {}", c.establishment);
    if let Some(d) = c.reception_date {
        let _ = writeln!(out, "  received {d}");
    }
    if let (Some(to), Some(at)) = (&c.transfer_to, c.transfer_at) {
        let _ = writeln!(out, "  transfer to {to} at {at}");
    }
    if let Some(d) = c.release_date {
        let _ = writeln!(out, "  released {d}");
    }
    if let Some(a) = &c.release_address {
        let _ = writeln!(
            out,
            "  release address {}, {}, {}",
            a.lines.join(", "),
            a.city,
            a.postcode
        );
    } else if c.no_fixed_abode {
        let _ = writeln!(out, "  no fixed abode");
    }
    match &s.registered_gp {
        Some(gp) => writeln!(out, "  registered GP {gp}"),
        None => writeln!(out, "  registered GP not known"),
    }
    .ok();
}

fn medicines(out: &mut String, medications: &[Medication]) {
    heading(out, "Medicines");
    if medications.is_empty() {
        let _ = writeln!(out, "  none recorded");
    }
    // Opioid substitution first: the dose that must not be missed.
    let (ost, others): (Vec<&Medication>, Vec<&Medication>) =
        medications.iter().partition(|m| m.opioid_substitution);
    for m in ost.into_iter().chain(others) {
        let _ = write!(
            out,
            "  {} {} {} {}",
            m.code.display, m.dose, m.route, m.frequency
        );
        if m.opioid_substitution {
            let _ = write!(out, " [OPIOID SUBSTITUTION]");
        }
        if m.supervised {
            let _ = write!(out, " [supervised]");
        }
        if m.as_needed {
            let _ = write!(out, " [as needed]");
        }
        if let Some(t) = m.last_dose_given {
            let _ = write!(out, ", last dose given {t}");
        }
        if let Some(days) = m.days_supplied {
            let _ = write!(out, ", {days} days supplied");
        }
        let _ = writeln!(out);
    }
}

fn mental_health_and_substance_misuse(out: &mut String, s: &ClinicalSummary) {
    if let Some(m) = &s.mental_health {
        heading(out, "Mental health");
        let cpa = if m.care_programme_approach {
            "on"
        } else {
            "not on"
        };
        let _ = writeln!(out, "  {cpa} the care programme approach");
        if let Some(c) = &m.care_coordinator {
            let _ = writeln!(out, "  care coordinator {c}");
        }
    }
    if let Some(m) = &s.substance_misuse {
        heading(out, "Substance misuse");
        let treatment = if m.in_treatment {
            "in treatment"
        } else {
            "not in treatment"
        };
        let _ = writeln!(out, "  {treatment}");
        if let Some(c) = &m.community_service {
            let _ = writeln!(out, "  community service {c}");
        }
    }
}

fn consent_and_author(out: &mut String, s: &ClinicalSummary) {
    heading(out, "Consent");
    let words = |d: ConsentDecision| match d {
        ConsentDecision::Given => "given",
        ConsentDecision::Refused => "refused",
        ConsentDecision::NotRecorded => "not recorded",
    };
    let decision = words(s.consent.probation_sharing);
    let _ = writeln!(out, "  sharing with probation: {decision}");
    if s.consent.treatment_sharing != ConsentDecision::NotRecorded {
        let treatment = words(s.consent.treatment_sharing);
        let _ = writeln!(out, "  sharing with treatment services: {treatment}");
    }
    if let Some(basis) = &s.consent.legal_basis {
        let _ = writeln!(out, "  legal basis: {basis}");
    }
    heading(out, "Author");
    let a = &s.author;
    let _ = writeln!(
        out,
        "  {} ({}), {}, at {}",
        a.name, a.role, a.organisation, s.authored_at
    );
}

fn list(out: &mut String, title: &str, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        return;
    }
    heading(out, title);
    for item in items {
        let _ = writeln!(out, "  {item}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_in_clinical_order_with_opioid_substitution_first() {
        let mut s = crate::clinical::synthetic::release_summary(
            "9990000018".parse().ok(),
            None,
            "YP001".parse().unwrap(),
            None,
            "community drug service",
        );
        let mut ost = s.medications[0].clone();
        ost.code.display = "Methadone 1mg/ml oral solution".into();
        ost.opioid_substitution = true;
        s.medications.push(ost);
        let text = summary_text(&s, &["Bundle.entry[3] (Procedure): not read".into()]);
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {text}"))
        };
        assert!(at("\nPatient") < at("\nMedicines"));
        assert!(at("Methadone") < at("Paracetamol"), "OST first:\n{text}");
        assert!(at("\nMedicines") < at("\nFollow-ups"));
        assert!(text.contains("[OPIOID SUBSTITUTION]"));
        assert!(text.contains("registered GP not known"));
        assert!(at("\nNot carried") > at("\nAuthor"));
        assert!(text.contains("Bundle.entry[3] (Procedure): not read"));
    }
}
