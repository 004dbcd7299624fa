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
//! `read` (message to summary), `write` (summary to message), `header` (the
//! MSH alone), `ack` (the answer to a submission), `unread` (what a message holds that is not read).

mod ack;
mod charset;
mod escape;
mod header;
mod read;
mod segment;
mod unread;
mod write;

pub use ack::{AckCode, AckError, ErrorCode, ack, ack_as};
pub use charset::decoded;
pub use escape::{escape, unescape};
pub use header::{MessageHeader, event_of, header};
pub use read::{Parsed, parse};
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

    #[test]
    fn non_standard_delimiters_are_refused() {
        let err = parse(b"MSH#^~\\&#X", &Limits::default()).unwrap_err();
        assert_eq!(err.0[0].field, "MSH-2");
    }
}
