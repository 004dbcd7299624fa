//! HL7 v2.5.1 ADT: `A01` admission, `A02` transfer, `A03` release (and `A08`,
//! with the `ADT_A01` structure, for a GP's community summary), in and out,
//! plus the `ACK` for a submission.
//!
//! Demographics and the episode use PID, PD1, PV1 and EVN; allergies and
//! diagnoses use AL1 and DG1 where the message structure has them (A01, A03,
//! A08). Everything ADT has no segment for is carried in OBX groups: OBX-3
//! names the item and field (`MED-DOSE^Dose^THROUGHCARE`), OBX-4 numbers the
//! item, so one medicine is the OBX segments that share a sub-ID. The full
//! table is in `docs/clinical-formats.md`.
//!
//! Parsing splits segments, then fields, then components, and unescapes
//! last, so an escaped delimiter can never split anything. Only the standard
//! delimiters `|^~\&` are accepted, and segment, field and repetition counts
//! are capped.
//!
//! Files: `escape` (escape sequences), `segment` (the tokenizer and its caps),
//! `read` (message to summary), `coded` (a CE's code, from whichever of its
//! two identifiers the heading needs), `write` (summary to message), `header`
//! (the MSH alone), `ack` (the answer to a submission), `unread` (what a
//! message holds that is not read).

mod ack;
mod annotate;
mod charset;
mod coded;
mod escape;
mod header;
mod read;
mod segment;
mod unread;
mod write;

pub use ack::{AckCode, AckError, ErrorCode, ack, ack_as};
pub use annotate::{Annotations, annotated};
pub use charset::decoded;
pub use escape::{escape, unescape};
pub use header::{MessageHeader, event_of, header};
pub use read::{Parsed, authored_at_field, parse};
pub use segment::batch_refusal;
pub use write::render;

/// The coding system of every OBX item this gateway writes and reads.
const LOCAL: &str = "THROUGHCARE";

#[cfg(test)]
mod tests {
    use super::ack::error_location;
    use super::read::parse_ts;
    use super::write::ts;
    use super::*;
    use crate::clinical::JourneyEvent;
    use crate::clinical::Limits;
    use crate::clinical::model::DateTime;

    /// An invented patient's release summary from YP001, with no GP.
    fn release() -> crate::clinical::ClinicalSummary {
        crate::clinical::synthetic::release_summary(
            "9990000018".parse().ok(),
            None,
            "YP001".parse().unwrap(),
            None,
            "x",
        )
    }

    #[test]
    fn timestamps() {
        let t: DateTime = "2026-11-24T08:10:00+01:00".parse().unwrap();
        assert_eq!(ts(&t), "20261124081000+0100");
        assert_eq!(parse_ts("20261124081000+0100"), Some(t));
        assert_eq!(
            parse_ts("202611240810"),
            "2026-11-24T08:10:00Z".parse().ok()
        );
        // TS allows every precision down to the hour, and four fraction digits.
        assert_eq!(parse_ts("2026112408"), "2026-11-24T08:00:00Z".parse().ok());
        assert_eq!(
            parse_ts("20261124081000.1234-0500"),
            "2026-11-24T08:10:00.1234-05:00".parse().ok()
        );
        assert_eq!(parse_ts("20261124"), None);
        assert_eq!(parse_ts("20261124081000.12345"), None);
        assert_eq!(error_location("PID-3[1].1"), "PID^1^3^1^1");
        assert_eq!(error_location("PID-3.1"), "PID^1^3^1^1");
        assert_eq!(error_location("PID-3"), "PID^1^3");
        assert_eq!(error_location("OBX(4)-5"), "OBX^4^5");
        assert_eq!(error_location("OBX MED-DOSE"), "");
        assert_eq!(error_location("summary.patient.family_name"), "");
        assert_eq!(error_location("PID(2)"), "PID^2");
        assert_eq!(error_location("PV1"), "PV1^1");
        assert_eq!(error_location("segment 7"), "");
        assert_eq!(error_location("message"), "");
    }

    #[test]
    fn an_unreadable_date_is_a_violation_not_a_silent_drop() {
        use crate::clinical::model::{Code, Diagnosis, SNOMED};
        let mut s = release();
        s.diagnoses.push(Diagnosis {
            code: Code {
                system: SNOMED.into(),
                code: "235856003".into(),
                display: "Hepatitis C (invented case)".into(),
            },
            active: true,
            onset: "2014-06-01".parse().ok(),
        });
        let text = String::from_utf8(render(&s, JourneyEvent::Release).bytes).unwrap();
        assert!(parse(text.as_bytes(), &Limits::default()).is_ok());
        let broken = text.replace("20140601", "2014XX01");
        let err = parse(broken.as_bytes(), &Limits::default()).unwrap_err();
        let dates: Vec<&str> = err
            .0
            .iter()
            .filter(|v| v.description.starts_with("must be a date written YYYYMMDD"))
            .map(|v| v.field.as_str())
            .collect();
        assert!(!dates.is_empty(), "{err:?}");
        assert!(
            dates
                .iter()
                .all(|f| f.starts_with("DG1") || f.starts_with("OBX")),
            "{dates:?}"
        );
    }

    #[test]
    fn long_or_multi_line_text_goes_as_ft_and_reads_back_exactly() {
        use crate::clinical::model::{RiskFlag, RiskKind};
        let mut s = release();
        let long = format!("Ligature found on landing; {}", "under review. ".repeat(20));
        let notes = [
            "Low mood; on watch".to_owned(),
            "Self-harm on 3 Nov.\nCut arm; dressed.\r\nReviewed daily".to_owned(),
            long.clone(),
            "x".repeat(199),
        ];
        for note in &notes {
            s.risks.push(RiskFlag {
                kind: RiskKind::SelfHarm,
                active: true,
                note: Some(note.clone()),
                code: None,
            });
        }
        let text = String::from_utf8(render(&s, JourneyEvent::Release).bytes).unwrap();
        let types: Vec<&str> = text
            .split('\r')
            .filter(|seg| seg.contains("|RISK-NOTE^"))
            .map(|seg| seg.split('|').nth(2).unwrap())
            .collect();
        // Short single lines stay ST (199 characters is still short).
        assert_eq!(types, ["ST", "FT", "FT", "ST"], "{text}");
        assert!(text.contains("Self-harm on 3 Nov.\\.br\\Cut arm; dressed.\\X0D\\\\.br\\Reviewed"));
        assert!(!text.contains("\\X0A\\"), "{text}");
        assert!(text.contains(long.trim_end()), "written whole");
        let back = parse(text.as_bytes(), &Limits::default()).unwrap().summary;
        let read: Vec<_> = back.risks.iter().filter_map(|r| r.note.clone()).collect();
        assert_eq!(read, notes);
    }

    #[test]
    fn a_value_cut_short_by_the_truncation_character_is_read_and_listed() {
        let text = String::from_utf8(render(&release(), JourneyEvent::Release).bytes).unwrap();
        assert!(text.contains("|Example (invented)^Alex|"), "{text}");
        let cut = text
            .replacen("MSH|^~\\&|", "MSH|^~\\&#|", 1)
            .replace("|Example (invented)^Alex|", "|Exam#^Alex|")
            .replace("|1 g|", "|1 g \\P\\2|");
        let read = parse(cut.as_bytes(), &Limits::default()).unwrap().summary;
        assert_eq!(read.patient.family_name, "Exam");
        // An escaped backslash beside a `P` is no `\P\`.
        let escaped = cut.replace("|Exam#^Alex|", "|Mar\\E\\P\\E\\sh^Alex|");
        let unescaped = parse(escaped.as_bytes(), &Limits::default())
            .unwrap()
            .summary;
        assert_eq!(unescaped.patient.family_name, "Mar\\P\\sh");
        assert_eq!(unescaped.medications[0].dose, "1 g #2");
        assert_eq!(read.patient.given_names, ["Alex"]);
        assert_eq!(read.medications[0].dose, "1 g #2");
        assert!(
            read.not_read
                .iter()
                .any(|n| n.starts_with("PID-5: cut short")),
            "{:?}",
            read.not_read
        );
        // A longer MSH-2 is still refused there, never "untruncated".
        let six = text.replacen("MSH|^~\\&|", "MSH|^~\\&##|", 1);
        let err = parse(six.as_bytes(), &Limits::default()).unwrap_err();
        assert_eq!(err.0[0].field, "MSH-2");
        // Without the truncation character declared, `#` is data.
        let plain = text.replace("|Example (invented)^Alex|", "|Exam#^Alex|");
        let read = parse(plain.as_bytes(), &Limits::default()).unwrap().summary;
        assert_eq!(read.patient.family_name, "Exam#");
    }

    #[test]
    fn an_error_names_the_repetition_the_sender_wrote() {
        let s = release();
        let text = String::from_utf8(render(&s, JourneyEvent::Release).bytes).unwrap();
        // An empty first repetition, then an NHS number with a bad check digit.
        let edited = text.replace("9990000018^^^NHS^NH", "~9990000019^^^NHS^NH");
        let err = parse(edited.as_bytes(), &Limits::default()).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|v| v.field.as_str()).collect();
        assert!(fields.contains(&"PID-3[2].1"), "{fields:?}");
        assert_eq!(error_location("PID-3[2].1"), "PID^1^3^2^1");
    }

    #[test]
    fn an_nhs_number_is_one_the_nhs_assigned() {
        let s = crate::clinical::synthetic::release_summary(
            "9990000018".parse().ok(),
            "A1234BC".parse().ok(),
            "YP001".parse().unwrap(),
            None,
            "x",
        );
        let text = String::from_utf8(render(&s, JourneyEvent::Release).bytes).unwrap();
        assert!(text.contains("9990000018^^^NHS^NH"), "{text}");
        let with = |pid3: &str| {
            let edited = text.replace("9990000018^^^NHS^NH", pid3);
            parse(edited.as_bytes(), &Limits::default()).map(|p| p.summary)
        };
        // The NHS named as the authority, by namespace or by OID, with or
        // without the type; or the type alone, as English senders write it.
        for pid3 in [
            "9990000018^^^NHS^NH",
            "9990000018^^^NHS",
            "9990000018^^^nhs^NH",
            "9990000018^^^&2.16.840.1.113883.2.1.4.1&ISO^NH",
            "9990000018^^^2.16.840.1.113883.2.1.4.1^NH",
            "9990000018^^^^NH",
            // A trust naming itself as the authority still sends the NHS number.
            "9990000018^^^RX1^NH",
        ] {
            let read = with(pid3).unwrap_or_else(|e| panic!("{pid3}: {e:?}"));
            assert_eq!(
                read.patient.nhs_number.map(|n| n.as_str().to_owned()),
                Some("9990000018".to_owned()),
                "{pid3}"
            );
        }
        // Another authority's national health number passes the same check
        // digit (Scotland's CHI), and is not the patient's NHS number.
        for pid3 in ["0101901232^^^CHI^NH", "9990000018^^^HSCNI^NH"] {
            let read = with(pid3).unwrap_or_else(|e| panic!("{pid3}: {e:?}"));
            assert_eq!(read.patient.nhs_number, None, "{pid3}");
            assert!(
                read.not_read
                    .iter()
                    .any(|n| n.contains("another authority")),
                "{pid3}: {:?}",
                read.not_read
            );
        }
    }

    /// `text` with field `n` of its `id` segment (not MSH) set to `value`.
    fn with_field(text: &str, id: &str, n: usize, value: &str) -> String {
        let prefix = format!("{id}|");
        text.split('\r')
            .map(|seg| {
                if !seg.starts_with(&prefix) {
                    return seg.to_owned();
                }
                let mut fields: Vec<&str> = seg.split('|').collect();
                if fields.len() <= n {
                    fields.resize(n + 1, "");
                }
                fields[n] = value;
                fields.join("|")
            })
            .collect::<Vec<_>>()
            .join("\r")
    }

    /// The fields of every violation parsing `text` gives (none when read).
    fn refused_at(text: &str) -> Vec<String> {
        match parse(text.as_bytes(), &Limits::default()) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|v| v.field).collect(),
        }
    }

    #[test]
    fn a_patient_recorded_as_dead_is_refused_never_routed_as_a_release() {
        let text = String::from_utf8(render(&release(), JourneyEvent::Release).bytes).unwrap();
        // PID-30 (table 0136) `Y`, a death date in PID-29, or a discharge
        // disposition of expired (table 0112; NHS Data Dictionary 79).
        for (id, n, value, at) in [
            ("PID", 30, "Y", "PID-30"),
            ("PID", 29, "202611240630+0000", "PID-29"),
            ("PID", 29, "20261124", "PID-29"),
            ("PV1", 36, "20", "PV1-36"),
            ("PV1", 36, "41", "PV1-36"),
            ("PV1", 36, "79", "PV1-36"),
            ("PV1", 36, "01~20", "PV1-36"),
        ] {
            let edited = with_field(&text, id, n, value);
            let err = parse(edited.as_bytes(), &Limits::default()).unwrap_err();
            let v = err.0.iter().find(|v| v.field == at).unwrap_or_else(|| {
                panic!("{id}-{n} {value}: {err:?}");
            });
            assert!(
                v.description.contains("deceased") || v.description.contains("died"),
                "{v:?}"
            );
        }
        // Outside table 0136 is refused, never read as "no".
        for value in ["y", "YES", "1", "n"] {
            let edited = with_field(&text, "PID", 30, value);
            let err = parse(edited.as_bytes(), &Limits::default()).unwrap_err();
            assert_eq!(err.0[0].field, "PID-30", "{value}");
            assert!(err.0[0].description.contains("table 0136"), "{value}");
        }
        // Alive: `N`, empty or the explicit null; home; PID-30 is read.
        for (id, n, value) in [
            ("PID", 30, "N"),
            ("PID", 30, ""),
            ("PID", 30, "\"\""),
            ("PID", 29, "\"\""),
            ("PV1", 36, "01"),
        ] {
            let edited = with_field(&text, id, n, value);
            let read = parse(edited.as_bytes(), &Limits::default())
                .unwrap_or_else(|e| panic!("{id}-{n} {value}: {e:?}"));
            assert!(
                !read.summary.not_read.iter().any(|n| n.starts_with(id)),
                "{:?}",
                read.summary.not_read
            );
        }
        // Another disposition is carried as a release, and listed; `29` is
        // the NHS Data Dictionary's temporary place of residence (a hostel).
        for code in ["04", "29"] {
            let edited = with_field(&text, "PV1", 36, code);
            let read = parse(edited.as_bytes(), &Limits::default()).unwrap();
            let note = format!("PV1-36: not carried: a discharge disposition of {code}");
            assert!(
                read.summary.not_read.contains(&note),
                "{:?}",
                read.summary.not_read
            );
        }
    }

    #[test]
    fn evn2_is_read_at_its_own_precision_or_refused_never_replaced_by_msh7() {
        let s = release();
        let text = String::from_utf8(render(&s, JourneyEvent::Release).bytes).unwrap();
        let authored = |evn2: &str| {
            let edited = with_field(&text, "EVN", 2, evn2);
            parse(edited.as_bytes(), &Limits::default()).map(|p| p.summary.authored_at)
        };
        // Unreadable, or a date alone: refused where written.
        for evn2 in [
            "garbage",
            "20261120",
            "202611",
            "2026-11-20T10:00:00Z",
            "2026112010+01",
        ] {
            let err = authored(evn2).unwrap_err();
            let fields: Vec<&str> = err.0.iter().map(|v| v.field.as_str()).collect();
            assert_eq!(fields, ["EVN-2"], "{evn2}");
        }
        // Every precision from the hour is read, not MSH-7's time.
        assert_eq!(
            authored("2026112010").ok(),
            "2026-11-20T10:00:00Z".parse().ok()
        );
        assert_eq!(
            authored("202611201000+0100").ok(),
            "2026-11-20T10:00:00+01:00".parse().ok()
        );
        // Empty (or the explicit null): MSH-7, and a rule on the time read
        // is answered there.
        assert_eq!(authored("").ok(), Some(s.authored_at));
        assert_eq!(authored("\"\"").ok(), Some(s.authored_at));
        for (evn2, place) in [("", "MSH-7"), ("\"\"", "MSH-7"), ("2026112010", "EVN-2")] {
            let edited = with_field(&text, "EVN", 2, evn2);
            assert_eq!(authored_at_field(edited.as_bytes()), place, "{evn2}");
        }
        let no_evn: Vec<&str> = text.split('\r').filter(|s| !s.starts_with("EVN")).collect();
        assert_eq!(authored_at_field(no_evn.join("\r").as_bytes()), "MSH-7");
        // With EVN-2 empty, an unreadable MSH-7 is refused at MSH-7.
        let msh7 = ts(&s.authored_at);
        let edited = with_field(&text, "EVN", 2, "").replacen(&msh7, "20261124", 1);
        assert_eq!(refused_at(&edited), ["MSH-7"]);
        let edited = with_field(&text, "EVN", 2, "").replacen(&msh7, "", 1);
        assert_eq!(refused_at(&edited), ["EVN-2"]);
    }

    #[test]
    fn a_coded_element_is_read_in_the_terminology_its_heading_needs() {
        use crate::clinical::model::{Allergy, Code, DMD, Diagnosis, SNOMED};
        let mut s = release();
        let code = |system: &str, code: &str, display: &str| Code {
            system: system.into(),
            code: code.into(),
            display: display.into(),
        };
        s.diagnoses.push(Diagnosis {
            code: code(SNOMED, "58214004", "Schizophrenia"),
            active: true,
            onset: None,
        });
        s.allergies.push(Allergy {
            substance: code(SNOMED, "764146007", "Penicillin"),
            reaction: None,
            severity: None,
        });
        let text = String::from_utf8(render(&s, JourneyEvent::Release).bytes).unwrap();
        // ICD-10, a local code, a practice code first; the national code as
        // the alternate (CE.4-6), HL7 v2.5.1 §2.A.8.
        let edited = text
            .replace(
                "|58214004^Schizophrenia^SCT|",
                "|F20.0^Paranoid schizophrenia^I10^58214004^Schizophrenia^SCT|",
            )
            .replace(
                "|764146007^Penicillin^SCT|",
                "|PEN01^Penicillin^99LOC^764146007^Penicillin^SCT|",
            )
            .replace(
                "|39695411000001103^Paracetamol 500mg tablets^DMD|",
                "|PARA1^Paracetamol^99PRS^39695411000001103^Paracetamol 500mg tablets^DMD|",
            );
        assert_eq!(edited.matches("^SCT|").count(), 2, "{edited}");
        let read = parse(edited.as_bytes(), &Limits::default())
            .unwrap()
            .summary;
        assert_eq!(read.diagnoses[0].code, s.diagnoses[0].code);
        assert_eq!(read.allergies[0].substance, s.allergies[0].substance);
        assert_eq!(read.medications[0].code, s.medications[0].code);
        assert_eq!(read.medications[0].code.system, DMD);
        // The code set aside is listed, by path; what was read is not.
        for at in ["DG1-3.1", "AL1-3.1", "OBX-5.1"] {
            assert!(
                read.not_read
                    .iter()
                    .any(|n| n.starts_with(&format!("{at}: not carried: another code"))),
                "{at}: {:?}",
                read.not_read
            );
        }
        assert!(
            !read.not_read.iter().any(|n| n.contains("3.4")),
            "{:?}",
            read.not_read
        );
    }

    #[test]
    fn non_standard_delimiters_are_refused() {
        let err = parse(b"MSH#^~\\&#X", &Limits::default()).unwrap_err();
        assert_eq!(err.0[0].field, "MSH-2");
    }
}
