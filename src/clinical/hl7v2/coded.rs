//! Coded elements (CE, CWE: HL7 v2.5.1 §2.A.8) read into a model code.
//!
//! A CE holds up to two identifiers of one concept: CE.1-3 and its
//! alternate, CE.4-6, with the same standing. The one in the terminology the
//! heading is kept in (SNOMED CT for a diagnosis, dm+d for a medicine) is
//! read wherever it stands, as the FHIR reader picks among a concept's
//! codings; the other is listed as not carried, never dropped unsaid: a
//! local or ICD-10 code first must not hide the SNOMED CT code the treatment
//! views match on.

use std::borrow::Cow;

use super::segment::component;
use crate::clinical::model::{Code, DMD, SNOMED};

/// The terminology a heading's codes are kept in: what the model, the views
/// and the treatment rules match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Terminology {
    /// SNOMED CT: diagnoses, allergies, risks, infections, vaccinations.
    SnomedCt,
    /// dm+d: medicines and prescriptions.
    Dmd,
}

impl Terminology {
    fn system(self) -> &'static str {
        match self {
            Self::SnomedCt => SNOMED,
            Self::Dmd => DMD,
        }
    }
}

/// One identifier of a CE: CE.1-3 (`at` 1) or the alternate CE.4-6 (`at` 4).
struct Triplet<'a> {
    at: usize,
    code: Cow<'a, str>,
    text: Cow<'a, str>,
    /// The model's system (a URL for SNOMED CT and dm+d).
    system: String,
}

impl<'a> Triplet<'a> {
    fn of(field: &'a str, at: usize) -> Self {
        let code = component(field, at);
        let system = system_of(&component(field, at + 2), &code);
        Self {
            at,
            code,
            text: component(field, at + 1),
            system,
        }
    }

    /// 0 for the terminology wanted, 1 for the other national one (SNOMED
    /// CT or dm+d), 2 for anything else.
    fn rank(&self, wanted: Terminology) -> u8 {
        if self.system == wanted.system() {
            0
        } else if self.system == SNOMED || self.system == DMD {
            1
        } else {
            2
        }
    }

    /// `CE.1-3` or `CE.4-6`, with the terminology named when it is national.
    fn described(&self) -> String {
        let name = match self.system.as_str() {
            SNOMED => " (SNOMED CT)",
            DMD => " (dm+d)",
            _ => "",
        };
        format!("CE.{}-{}{name}", self.at, self.at + 2)
    }
}

/// HL7 table 0396: `SCT` is SNOMED CT; `SNM` is the older SNOMED (II/3),
/// read as SNOMED CT only when its code has an SCTID's shape (6 to 18
/// digits) as senders that mean SNOMED CT write it, never `D3-12345`.
fn system_of(name: &str, code: &str) -> String {
    let sctid = |c: &str| (6..=18).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_digit());
    match name {
        "SCT" | "SNOMEDCT" => SNOMED.to_owned(),
        "SNM" if sctid(code) => SNOMED.to_owned(),
        "DMD" => DMD.to_owned(),
        other => other.to_owned(),
    }
}

/// The code of the CE `field` at HL7 path `at` (`DG1-3`, `OBX(7)-5`), for a
/// heading kept in `wanted`; `None` when neither CE.1 nor CE.4 holds one.
///
/// With both coded, the one in `wanted` is read, else the one in the other
/// national terminology, else CE.1-3; the other is listed in `notes`. The
/// text is the identifier's own, else the other's (the same concept).
pub(super) fn code_from_ce(
    field: &str,
    wanted: Terminology,
    at: &str,
    notes: &mut Vec<String>,
) -> Option<Code> {
    let (primary, alternate) = (Triplet::of(field, 1), Triplet::of(field, 4));
    let (read, other) = match (primary.code.is_empty(), alternate.code.is_empty()) {
        (true, true) => return None,
        (true, false) => (alternate, primary),
        (false, false) if alternate.rank(wanted) < primary.rank(wanted) => (alternate, primary),
        (false, _) => (primary, alternate),
    };
    if !other.code.is_empty() {
        notes.push(format!(
            "{at}.{}: not carried: another code for the same concept ({}); the code in {} is read",
            other.at,
            other.described(),
            read.described()
        ));
    } else {
        second_text(&read.text, &other.text, at, other.at + 1, notes);
    }
    let text = if read.text.is_empty() {
        other.text
    } else {
        read.text
    };
    Some(Code {
        system: read.system,
        code: read.code.into_owned(),
        display: text.into_owned(),
    })
}

/// As [`code_from_ce`], for a diagnosis or an allergy, which may be
/// recorded in words only: CE.2 (else CE.5) with no identifier in CE.1 or
/// CE.4; a coding system named for no code (CE.3, CE.6) says nothing and is
/// not carried.
pub(super) fn code_or_words_from_ce(
    field: &str,
    wanted: Terminology,
    at: &str,
    notes: &mut Vec<String>,
) -> Option<Code> {
    if let Some(code) = code_from_ce(field, wanted, at, notes) {
        return Some(code);
    }
    let (first, alternate) = (component(field, 2), component(field, 5));
    let words = if first.trim().is_empty() {
        alternate
    } else {
        second_text(&first, &alternate, at, 5, notes);
        first
    };
    (!words.trim().is_empty()).then(|| Code::words(words))
}

/// Lists the text at component `n` when it is not `read` and says something
/// else: a second wording of the concept, which is not carried.
fn second_text(read: &str, other: &str, at: &str, n: usize, notes: &mut Vec<String>) {
    if !read.is_empty() && !other.trim().is_empty() && other != read {
        notes.push(format!(
            "{at}.{n}: not carried: a second text for the same concept"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(field: &str, wanted: Terminology) -> (Option<Code>, Vec<String>) {
        let mut notes = Vec::new();
        let code = code_from_ce(field, wanted, "DG1-3", &mut notes);
        (code, notes)
    }

    fn code(system: &str, code: &str, display: &str) -> Option<Code> {
        Some(Code {
            system: system.into(),
            code: code.into(),
            display: display.into(),
        })
    }

    #[test]
    fn the_terminology_a_heading_needs_is_read_from_either_triplet() {
        // ICD-10 first, SNOMED CT as the alternate: the diagnosis is SNOMED CT.
        let (dx, notes) = read(
            "F20.0^Paranoid schizophrenia^I10^58214004^Schizophrenia^SCT",
            Terminology::SnomedCt,
        );
        assert_eq!(dx, code(SNOMED, "58214004", "Schizophrenia"));
        assert_eq!(
            notes,
            [
                "DG1-3.1: not carried: another code for the same concept (CE.1-3); the code in \
              CE.4-6 (SNOMED CT) is read"
            ]
        );
        // A local medicine code first, dm+d as the alternate.
        let (med, notes) = read(
            "MTH1^Methadone oral solution^99PRS^3321611000001103^Methadone 1mg/ml^DMD",
            Terminology::Dmd,
        );
        assert_eq!(med, code(DMD, "3321611000001103", "Methadone 1mg/ml"));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("DG1-3.1: not carried"), "{notes:?}");
        // The wanted terminology first: the alternate is listed, not read.
        let (dx, notes) = read(
            "58214004^Schizophrenia^SCT^F20.0^Paranoid schizophrenia^I10",
            Terminology::SnomedCt,
        );
        assert_eq!(dx, code(SNOMED, "58214004", "Schizophrenia"));
        assert_eq!(
            notes,
            [
                "DG1-3.4: not carried: another code for the same concept (CE.4-6); the code in \
              CE.1-3 (SNOMED CT) is read"
            ]
        );
        // Both national: the heading's own wins, wherever it stands.
        let both = "322237000^Paracetamol 500mg tablet^SCT^42109611000001109^Paracetamol 500mg \
                    tablets^DMD";
        assert_eq!(read(both, Terminology::Dmd).0.unwrap().system, DMD);
        assert_eq!(read(both, Terminology::SnomedCt).0.unwrap().system, SNOMED);
        // SNM counts as SNOMED CT only for an SCTID-shaped code.
        let (dx, _) = read(
            "F20.0^Sz^I10^58214004^Schizophrenia^SNM",
            Terminology::SnomedCt,
        );
        assert_eq!(dx.unwrap().system, SNOMED);
        let (dx, _) = read(
            "F20.0^Sz^I10^D3-12345^Schizophrenia^SNM",
            Terminology::SnomedCt,
        );
        assert_eq!(dx.unwrap().system, "I10");
        // Neither national: CE.1-3, as before, the alternate listed.
        let (dx, notes) = read("A1^Local^99A^B2^Other local^99B", Terminology::SnomedCt);
        assert_eq!(dx, code("99A", "A1", "Local"));
        assert!(notes[0].starts_with("DG1-3.4: not carried"), "{notes:?}");
    }

    #[test]
    fn one_identifier_reads_as_before_and_a_second_text_is_listed() {
        assert_eq!(
            read("764146007^Penicillin^SCT", Terminology::SnomedCt),
            (code(SNOMED, "764146007", "Penicillin"), Vec::new())
        );
        // Only the alternate: read, CE.2 its text when CE.5 has none.
        assert_eq!(
            read("^Penicillin^^764146007^^SCT", Terminology::SnomedCt),
            (code(SNOMED, "764146007", "Penicillin"), Vec::new())
        );
        assert_eq!(read("^Penicillin^L", Terminology::SnomedCt).0, None);
        let (_, notes) = read("764146007^Penicillin^SCT^^Pen V^", Terminology::SnomedCt);
        assert_eq!(
            notes,
            ["DG1-3.5: not carried: a second text for the same concept"]
        );
        // Words only, from CE.2 or else CE.5.
        let mut notes = Vec::new();
        let words = code_or_words_from_ce(
            "^^^^Penicillin^",
            Terminology::SnomedCt,
            "AL1-3",
            &mut notes,
        );
        assert_eq!(words, Some(Code::words("Penicillin")));
        assert!(notes.is_empty());
    }
}
