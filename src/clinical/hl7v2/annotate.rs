//! What a gRPC recipient reads beside an HL7 v2 message (the handover it
//! replaces, that it is a withdrawal notice, what the format or view does
//! not carry), written into the message for a channel that has no
//! "beside": MESH, whose subject line a receiving system may never show.
//! OBX segments under our local coding system, where each message
//! structure has its OBX group, so the message stays valid v2.5.1.

use super::LOCAL;
use super::escape::{push_escaped, push_formatted};

/// What the message must say of itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Annotations<'a> {
    /// The handover this one replaces.
    pub replaces: Option<u64>,
    /// A withdrawal notice: the summary it replaces no longer applies to
    /// this recipient.
    pub withdrawn: bool,
    /// What the format or view does not carry (paths and reasons, never
    /// values).
    pub not_carried: &'a [String],
}

/// `message` (ER7, segments ended by carriage returns) with `a` written as
/// OBX segments coded `DOC-WITHDRAWN`, `DOC-REPLACES` and
/// `DOC-NOT-CARRIED` (ST, NM and FT), set IDs going on from the message's
/// own: after its last OBX; with none, before its first AL1 or DG1 where
/// the structure puts OBX first (ADT_A01), else at the end (ADT_A02,
/// ADT_A03). Unchanged when there is nothing to say or no MSH to read.
#[must_use]
pub fn annotated(message: &str, a: &Annotations<'_>) -> String {
    let segments: Vec<&str> = message.split('\r').filter(|s| !s.is_empty()).collect();
    let structure = segments
        .first()
        .filter(|msh| msh.starts_with("MSH|"))
        .and_then(|msh| msh.split('|').nth(8))
        .and_then(|msh9| msh9.split('^').nth(2));
    let Some(structure) = structure else {
        return message.to_owned();
    };
    let extra = segments_for(a, segments.iter().filter(|s| s.starts_with("OBX|")).count());
    if extra.is_empty() {
        return message.to_owned();
    }
    let at = match segments.iter().rposition(|s| s.starts_with("OBX|")) {
        Some(last) => last + 1,
        None if structure == "ADT_A01" => segments
            .iter()
            .position(|s| s.starts_with("AL1|") || s.starts_with("DG1|"))
            .unwrap_or(segments.len()),
        None => segments.len(),
    };
    let mut out =
        String::with_capacity(message.len() + extra.iter().map(String::len).sum::<usize>());
    for s in &segments[..at] {
        out.push_str(s);
        out.push('\r');
    }
    for s in &extra {
        out.push_str(s);
        out.push('\r');
    }
    for s in &segments[at..] {
        out.push_str(s);
        out.push('\r');
    }
    out
}

/// One value to write: its type, code, display, sub-ID and encoded value.
type Said = (&'static str, &'static str, &'static str, usize, String);

/// The OBX segments saying `a`, numbered on from `obx_before`.
fn segments_for(a: &Annotations<'_>, obx_before: usize) -> Vec<String> {
    let mut values: Vec<Said> = Vec::new();
    if let Some(earlier) = a.replaces {
        if a.withdrawn {
            let mut v = String::new();
            push_escaped(
                &mut v,
                &format!(
                    "The summary of handover {earlier} no longer applies to your service; do not \
                     act on it"
                ),
            );
            values.push(("ST", "DOC-WITHDRAWN", "Withdrawal notice", 1, v));
        }
        let replaces = earlier.to_string();
        values.push(("NM", "DOC-REPLACES", "Replaces handover", 1, replaces));
    }
    // One entry to a segment: ST while it fits (strict readers cut a longer
    // one), FT beyond, as the message's own text.
    for (i, entry) in a.not_carried.iter().enumerate() {
        let long = entry.contains('\n') || entry.chars().count() > super::write::ST_MAX_CHARS;
        let mut v = String::new();
        if long {
            push_formatted(&mut v, entry);
        } else {
            push_escaped(&mut v, entry);
        }
        let value_type = if long { "FT" } else { "ST" };
        let display = "Not carried by this format or view";
        values.push((value_type, "DOC-NOT-CARRIED", display, i + 1, v));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, (value_type, code, display, sub, value))| {
            format!(
                "OBX|{}|{value_type}|{code}^{display}^{LOCAL}|{sub}|{value}||||||F",
                obx_before + i + 1
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clinical::JourneyEvent;
    use crate::clinical::Limits;
    use crate::clinical::model::{Allergy, Code};

    fn summary() -> crate::clinical::ClinicalSummary {
        crate::clinical::synthetic::release_summary(
            "9990000018".parse().ok(),
            None,
            "YP001".parse().unwrap(),
            Some("YG002".parse().unwrap()),
            "annotated",
        )
    }

    fn rendered(s: &crate::clinical::ClinicalSummary, event: JourneyEvent) -> String {
        String::from_utf8(super::super::render(s, event).bytes).unwrap()
    }

    fn names(message: &str) -> Vec<String> {
        message
            .split('\r')
            .filter(|s| !s.is_empty())
            .map(|s| s.split('|').take(2).collect::<Vec<_>>().join("|"))
            .collect()
    }

    #[test]
    fn a_message_says_what_it_replaces_and_what_it_does_not_carry_in_its_obx_group() {
        let s = summary();
        let message = rendered(&s, JourneyEvent::Release);
        let obx = message.matches("\rOBX|").count();
        let not_carried = vec![
            "entry[3].resource.dosage[0].asNeededCodeableConcept: not carried | a reason"
                .to_owned(),
            "line one\nline two".to_owned(),
        ];
        let a = Annotations {
            replaces: Some(9),
            withdrawn: true,
            not_carried: &not_carried,
        };
        let out = annotated(&message, &a);
        let tail: Vec<&str> = out
            .split('\r')
            .filter(|s| !s.is_empty())
            .rev()
            .take(4)
            .collect();
        assert_eq!(
            tail[3],
            format!(
                "OBX|{}|ST|DOC-WITHDRAWN^Withdrawal notice^THROUGHCARE|1|The summary of handover \
                 9 no longer applies to your service; do not act on it||||||F",
                obx + 1
            )
        );
        assert_eq!(
            tail[2],
            format!(
                "OBX|{}|NM|DOC-REPLACES^Replaces handover^THROUGHCARE|1|9||||||F",
                obx + 2
            )
        );
        // One entry to a segment, escaped: ST while under 200 characters
        // on one line, FT (with its line break) otherwise.
        assert_eq!(
            tail[1],
            format!(
                "OBX|{}|ST|DOC-NOT-CARRIED^Not carried by this format or view^THROUGHCARE|1|\
                 entry[3].resource.dosage[0].asNeededCodeableConcept: not carried \\F\\ a \
                 reason||||||F",
                obx + 3
            )
        );
        assert_eq!(
            tail[0],
            format!(
                "OBX|{}|FT|DOC-NOT-CARRIED^Not carried by this format or view^THROUGHCARE|2|\
                 line one\\.br\\line two||||||F",
                obx + 4
            )
        );
        assert!(out.ends_with('\r'));
        // Still the same summary to an HL7 reader, ours included.
        let limits = Limits::default();
        let read = |m: &str| super::super::parse(m.as_bytes(), &limits).unwrap().summary;
        let (before, after) = (read(&message), read(&out));
        assert_eq!(before.medications, after.medications);
        assert_eq!(before.patient, after.patient);
    }

    #[test]
    fn an_admission_puts_them_in_its_obx_group_before_its_allergies() {
        let mut s = summary();
        s.allergies = vec![Allergy {
            substance: Code {
                system: "http://snomed.info/sct".into(),
                code: "764146007".into(),
                display: "Penicillin".into(),
            },
            reaction: None,
            severity: None,
        }];
        let message = rendered(&s, JourneyEvent::Admission);
        let not_carried = vec!["a path: a reason".to_owned()];
        let a = Annotations {
            not_carried: &not_carried,
            ..Annotations::default()
        };
        let out = annotated(&message, &a);
        let order = names(&out);
        let ours = out
            .split('\r')
            .position(|s| s.contains("|DOC-NOT-CARRIED^"))
            .unwrap();
        let last_obx = order.iter().rposition(|n| n.starts_with("OBX|")).unwrap();
        let al1 = order.iter().position(|n| n.starts_with("AL1|")).unwrap();
        assert_eq!(ours, last_obx, "{order:?}");
        assert!(ours < al1, "{order:?}");
        assert_eq!(
            order[ours],
            format!(
                "OBX|{}",
                ours - order.iter().position(|n| n.starts_with("OBX|")).unwrap() + 1
            )
        );
        // Nothing to say: the message as it was.
        assert_eq!(annotated(&message, &Annotations::default()), message);
        assert_eq!(annotated("not hl7", &a), "not hl7");
    }
}
