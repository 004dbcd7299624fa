//! Wire ⇄ domain conversions. Incoming messages are destructured field by
//! field (no `..`), so a new proto field fails the build until someone
//! decides what it means; every problem becomes a field violation.

use prost::Message;

use super::pb;
use crate::clinical::{NhsNumber, OdsCode, PrisonNumber};
use crate::handover::{
    Decoded, IncomingDocument, PatientRef, SubmitCommand, calendar_date, is_iso_date,
};
use crate::journey::JourneyEvent;
use crate::store::{DeliveryRecord, DeliveryState, HandoverRecord};

/// Most destinations one submit may name.
pub const MAX_DESTINATIONS: usize = 16;

/// Collects violations while a message is read: the domain's one
/// violation type, turned into `BadRequest` field violations in `error`.
pub type Violations = crate::clinical::ValidationErrors;

/// A journey event from the wire.
pub fn event_from_wire(value: i32) -> Option<JourneyEvent> {
    match pb::JourneyEvent::try_from(value).ok()? {
        pb::JourneyEvent::Unspecified => None,
        pb::JourneyEvent::Admission => Some(JourneyEvent::Admission),
        pb::JourneyEvent::Transfer => Some(JourneyEvent::Transfer),
        pb::JourneyEvent::Release => Some(JourneyEvent::Release),
        pb::JourneyEvent::CommunitySummary => Some(JourneyEvent::CommunitySummary),
    }
}

/// A journey event for the wire.
pub fn event_to_wire(event: JourneyEvent) -> pb::JourneyEvent {
    match event {
        JourneyEvent::Admission => pb::JourneyEvent::Admission,
        JourneyEvent::Transfer => pb::JourneyEvent::Transfer,
        JourneyEvent::Release => pb::JourneyEvent::Release,
        JourneyEvent::CommunitySummary => pb::JourneyEvent::CommunitySummary,
    }
}

/// Reads a patient reference; identifiers must be valid when present and at
/// least one must be present. Violations never quote the values.
pub fn patient_from_wire(
    p: Option<pb::PatientRef>,
    field: &str,
    v: &mut Violations,
) -> Option<PatientRef> {
    let pb::PatientRef {
        nhs_number,
        prison_number,
        date_of_birth,
    } = p?;
    let nhs = if nhs_number.is_empty() {
        None
    } else {
        nhs_number
            .parse::<NhsNumber>()
            .map_err(|e| v.add(format!("{field}.nhs_number"), e.to_string()))
            .ok()
    };
    let prison = if prison_number.is_empty() {
        None
    } else {
        prison_number
            .parse::<PrisonNumber>()
            .map_err(|e| v.add(format!("{field}.prison_number"), e.to_string()))
            .ok()
    };
    if nhs_number.is_empty() && prison_number.is_empty() {
        v.add(
            field,
            "at least one of nhs_number or prison_number is required",
        );
    }
    let dob = if date_of_birth.is_empty() {
        None
    } else if is_iso_date(&date_of_birth) {
        Some(date_of_birth)
    } else {
        v.add(
            format!("{field}.date_of_birth"),
            if calendar_date(&date_of_birth).is_some() {
                "must be a plausible date of birth: from 1900, not in the future"
            } else {
                "must be a calendar date written YYYY-MM-DD"
            },
        );
        None
    };
    Some(PatientRef {
        nhs_number: nhs,
        prison_number: prison,
        date_of_birth: dob,
    })
}

/// A patient reference as a command carries it: the reference (if any),
/// or the violations found reading it.
pub fn patient_decoded(p: Option<pb::PatientRef>, field: &str) -> Decoded<Option<PatientRef>> {
    let mut v = Violations::default();
    let patient = patient_from_wire(p, field, &mut v);
    v.into_result()?;
    Ok(patient)
}

/// Reads and checks a submit request. A native document is read into the
/// summary here (its violations are reported by the use case, after
/// authorisation); text documents are read by the use case.
///
/// # Errors
/// Every field violation found.
pub fn submit_from_wire(
    req: pb::SubmitRequest,
    max_document_bytes: usize,
) -> Decoded<SubmitCommand> {
    let pb::SubmitRequest {
        message_id,
        event,
        patient,
        destinations,
        document,
    } = req;
    let mut v = Violations::default();
    if message_id.is_empty() {
        v.add("message_id", "required: a sender-chosen idempotency key");
    } else if !is_message_id(&message_id) {
        v.add("message_id", MESSAGE_ID_RULE);
    }
    let known = event_from_wire(event);
    if known.is_none() {
        let why = if pb::JourneyEvent::try_from(event).is_ok() {
            "required: one of ADMISSION, TRANSFER, RELEASE, COMMUNITY_SUMMARY".to_owned()
        } else {
            format!(
                "unknown value {event}: not one this contract defines (ADMISSION, TRANSFER, \
                 RELEASE, COMMUNITY_SUMMARY)"
            )
        };
        v.add("event", why);
    }
    let event = known;
    let patient = patient_from_wire(patient, "patient", &mut v);
    // A longer list is refused whole, before any entry is read: reading
    // (and comparing) every entry of a list as long as the message allows
    // would cost quadratic time before the caller is even authorised.
    let named = if destinations.len() > MAX_DESTINATIONS {
        v.add(
            "destinations",
            format!(
                "at most {MAX_DESTINATIONS} destinations ({} given)",
                destinations.len()
            ),
        );
        &destinations[..0]
    } else {
        &destinations[..]
    };
    let mut codes = Vec::with_capacity(named.len());
    for (i, d) in named.iter().enumerate() {
        match d.parse::<OdsCode>() {
            Ok(code) if codes.contains(&code) => {
                v.add(format!("destinations[{i}]"), "named more than once");
            }
            Ok(code) => codes.push(code),
            Err(e) => v.add(format!("destinations[{i}]"), e.to_string()),
        }
    }
    let document = match document {
        None => {
            v.add("document", "required: native, fhir_json or hl7v2");
            None
        }
        Some(pb::submit_request::Document::Native(summary)) => {
            // Like the document's own violations, reported after the
            // caller is authorised to send this event at all.
            let mut sv = Violations::default();
            let len = summary.encoded_len();
            let read = if len == 0 {
                sv.add("document.native", "the document is empty");
                None
            } else {
                if len > max_document_bytes {
                    sv.add(
                        "document.native",
                        format!("the document is {len} bytes; the limit is {max_document_bytes}"),
                    );
                }
                super::summary::from_wire(summary, "document.native", &mut sv)
            };
            let read = match read {
                Some(s) if sv.0.is_empty() => Ok(s),
                _ => Err(sv),
            };
            Some(IncomingDocument::Native(Box::new(read)))
        }
        Some(pb::submit_request::Document::FhirJson(text)) => {
            check_size("document.fhir_json", text.len(), max_document_bytes, &mut v);
            Some(IncomingDocument::FhirJson(text))
        }
        Some(pb::submit_request::Document::Hl7v2(text)) => {
            check_size("document.hl7v2", text.len(), max_document_bytes, &mut v);
            Some(IncomingDocument::Hl7v2(text))
        }
    };
    match (v.0.is_empty(), event, document) {
        (true, Some(event), Some(document)) => Ok(SubmitCommand {
            message_id,
            event,
            patient,
            destinations: codes,
            document,
        }),
        _ => Err(v),
    }
}

/// What a message id may be (the sender's idempotency key).
pub const MESSAGE_ID_RULE: &str = "must be 1 to 128 printable ASCII characters without spaces";

/// Whether `m` is a well-formed message id (see [`MESSAGE_ID_RULE`]).
#[must_use]
pub fn is_message_id(m: &str) -> bool {
    !m.is_empty() && m.len() <= 128 && m.bytes().all(|b| b.is_ascii_graphic())
}

fn check_size(field: &str, len: usize, max: usize, v: &mut Violations) {
    if len == 0 {
        v.add(field, "the document is empty");
    } else if len > max {
        v.add(
            field,
            format!("the document is {len} bytes; the limit is {max}"),
        );
    }
}

/// A duration for the wire.
#[must_use]
pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A duration of `ms` milliseconds for the wire (negative reads as zero).
#[must_use]
pub fn duration_ms(ms: i64) -> prost_types::Duration {
    duration(std::time::Duration::from_millis(
        u64::try_from(ms).unwrap_or(0),
    ))
}

/// A duration from the wire: unset is `None`; negative or malformed is a
/// violation of `field`.
pub fn duration_from_wire(
    d: Option<prost_types::Duration>,
    field: &str,
    v: &mut Violations,
) -> Option<std::time::Duration> {
    let prost_types::Duration { seconds, nanos } = d?;
    if !(-999_999_999..=999_999_999).contains(&nanos) {
        v.add(field, "nanos must be -999,999,999 to 999,999,999");
        return None;
    }
    // google.protobuf.Duration spans about 10,000 years either way.
    if !(-315_576_000_000..=315_576_000_000).contains(&seconds) {
        v.add(
            field,
            "seconds must be -315,576,000,000 to 315,576,000,000 (google.protobuf.Duration)",
        );
        return None;
    }
    match (u64::try_from(seconds), u32::try_from(nanos)) {
        (Ok(s), Ok(n)) => Some(std::time::Duration::new(s, n)),
        _ => {
            v.add(field, "must be a non-negative duration");
            None
        }
    }
}

/// The first and last millisecond a `google.protobuf.Timestamp` may name:
/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z.
const TIMESTAMP_MS: std::ops::RangeInclusive<i64> = -62_135_596_800_000..=253_402_300_799_999;

/// A time from the wire, in ms: unset is `None`; nanos out of range or a
/// time outside years 1 to 9999 (what `google.protobuf.Timestamp` allows)
/// is a violation of `field`.
pub fn timestamp_from_wire(
    t: Option<prost_types::Timestamp>,
    field: &str,
    v: &mut Violations,
) -> Option<i64> {
    let prost_types::Timestamp { seconds, nanos } = t?;
    if !(0..=999_999_999).contains(&nanos) {
        v.add(field, "nanos must be 0 to 999,999,999");
        return None;
    }
    let ms = seconds
        .checked_mul(1_000)
        .and_then(|ms| ms.checked_add(i64::from(nanos) / 1_000_000))
        .filter(|ms| TIMESTAMP_MS.contains(ms));
    if ms.is_none() {
        v.add(field, "must be between years 1 and 9999 (UTC)");
    }
    ms
}

/// A time for the wire.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1_000),
        nanos: i32::try_from(ms.rem_euclid(1_000) * 1_000_000).unwrap_or(0),
    }
}

/// A delivery state for the wire.
pub fn state_to_wire(state: DeliveryState) -> pb::DeliveryState {
    match state {
        DeliveryState::Queued => pb::DeliveryState::Queued,
        DeliveryState::Leased => pb::DeliveryState::Leased,
        DeliveryState::Delivered => pb::DeliveryState::Delivered,
        DeliveryState::Quarantined => pb::DeliveryState::Quarantined,
        DeliveryState::Superseded => pb::DeliveryState::Superseded,
        DeliveryState::Parked => pb::DeliveryState::Parked,
    }
}

/// A patient reference for the wire.
pub fn patient_to_wire(p: &PatientRef) -> pb::PatientRef {
    pb::PatientRef {
        nhs_number: p
            .nhs_number
            .as_ref()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        prison_number: p
            .prison_number
            .as_ref()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        date_of_birth: p.date_of_birth.clone().unwrap_or_default(),
    }
}

/// A handover's status for the wire, as of `now_ms`.
pub fn track_to_wire(
    h: &HandoverRecord,
    deliveries: &[DeliveryRecord],
    mesh: &std::collections::BTreeMap<u64, crate::store::MeshRecord>,
    now_ms: i64,
) -> pb::TrackResponse {
    pb::TrackResponse {
        handover_id: h.id,
        message_id: h.message_id.clone(),
        event: event_to_wire(h.event).into(),
        submitted_at: Some(timestamp(h.submitted_at_ms)),
        finished_at: h.finished_at_ms.map(timestamp),
        content_removed_at: h.shredded_at_ms.map(timestamp),
        deliveries: deliveries
            .iter()
            .map(|d| pb::DeliveryStatus {
                delivery_id: d.id,
                destination: d.mailbox.clone(),
                state: state_to_wire(d.state).into(),
                attempts: d.attempt,
                queued_at: Some(timestamp(d.queued_at_ms)),
                last_leased_at: d.last_leased_at_ms.map(timestamp),
                delivered_at: d.delivered_at_ms.map(timestamp),
                quarantined_at: d.quarantined_at_ms.map(timestamp),
                quarantine_reason: if d.state == DeliveryState::Quarantined {
                    d.reason.clone().unwrap_or_default()
                } else {
                    String::new()
                },
                not_carried: d.not_carried.clone(),
                urgent: d.urgent,
                due_at: d.due_ms.map(timestamp),
                overdue: d.is_overdue(now_ms),
                overdue_since: d.overdue_at_ms.map(timestamp),
                superseded_by: d.superseded_by.unwrap_or(0),
                superseded_by_handover: d.superseded_by_handover.unwrap_or(0),
                superseded_at: d.superseded_at_ms.map(timestamp),
                claimed_by: d.claimed_by.clone().unwrap_or_default(),
                claimed_at: d.claimed_at_ms.map(timestamp),
                mesh_state: mesh
                    .get(&d.id)
                    .map(|r| r.state.as_str().to_owned())
                    .unwrap_or_default(),
                mesh_message_id: mesh
                    .get(&d.id)
                    .and_then(|r| r.message_id.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        supersedes_handover_id: h.supersedes.unwrap_or(0),
    }
}

/// The caller's deadline, from its `grpc-timeout` header (gRPC over HTTP/2:
/// at most 8 digits and a unit, `H` `M` `S` `m` `u` `n`); `None` when absent
/// or malformed.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3_600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a long poll may wait within a caller's `deadline`: a tenth of
/// it (50 ms to 1 s) is kept back for the answer to reach the caller.
pub fn before_deadline(deadline: std::time::Duration) -> std::time::Duration {
    use std::time::Duration;
    let margin = (deadline / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    deadline.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::SubmitRequest {
        pb::SubmitRequest {
            message_id: "m-1".into(),
            event: pb::JourneyEvent::Release.into(),
            patient: Some(pb::PatientRef {
                nhs_number: "9990000018".into(),
                prison_number: String::new(),
                date_of_birth: "1980-02-29".into(),
            }),
            destinations: vec!["YG001".into()],
            document: Some(pb::submit_request::Document::Native(
                crate::grpc::summary::to_wire(&crate::clinical::synthetic::release_summary(
                    "9990000018".parse().ok(),
                    None,
                    "YP001".parse().unwrap(),
                    None,
                    "summary",
                )),
            )),
        }
    }

    fn fields(req: pb::SubmitRequest) -> Vec<String> {
        submit_from_wire(req, 1024)
            .unwrap_err()
            .0
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    /// An event missing is "required"; one this contract does not define
    /// is named as unknown (proto3 enums are open: any number arrives).
    #[test]
    fn an_unknown_event_is_named_as_unknown_not_missing() {
        let why = |event: i32| {
            let req = pb::SubmitRequest { event, ..request() };
            let v = submit_from_wire(req, 1 << 20).unwrap_err().0;
            assert_eq!(v.len(), 1, "{v:?}");
            assert_eq!(v[0].field, "event");
            v[0].description.clone()
        };
        assert!(why(0).starts_with("required"), "{}", why(0));
        assert!(why(99).starts_with("unknown value 99"), "{}", why(99));
    }

    #[test]
    fn a_good_request_converts() {
        let cmd = submit_from_wire(request(), 1024).unwrap();
        assert_eq!(cmd.event, JourneyEvent::Release);
        assert_eq!(cmd.destinations[0].as_str(), "YG001");
    }

    #[test]
    fn every_problem_is_named_by_field() {
        let mut r = request();
        r.message_id.clear();
        r.event = 0;
        r.destinations = vec!["YG001".into(), "bad".into(), "YG001".into()];
        r.patient.as_mut().unwrap().nhs_number = "9990000017".into();
        r.patient.as_mut().unwrap().date_of_birth = "1980-02-30".into();
        assert_eq!(
            fields(r),
            [
                "message_id",
                "event",
                "patient.nhs_number",
                "patient.date_of_birth",
                "destinations[1]",
                "destinations[2]"
            ]
        );
        let mut r = request();
        r.document = Some(pb::submit_request::Document::FhirJson("x".repeat(1025)));
        assert_eq!(fields(r), ["document.fhir_json"]);
        // An empty native document is the document's own fault, reported
        // (like its other faults) once the caller may send the event.
        let mut r = request();
        r.document = Some(pb::submit_request::Document::Native(Default::default()));
        let cmd = submit_from_wire(r, 1024).unwrap();
        let IncomingDocument::Native(read) = cmd.document else {
            panic!("a native document")
        };
        let faults = read.unwrap_err().0;
        assert_eq!(faults[0].field, "document.native");
    }

    #[test]
    fn a_destination_list_over_the_limit_is_refused_whole_without_reading_its_entries() {
        let mut r = request();
        // As many as a message holds: each entry read and compared with the
        // others would be quadratic work before the caller is authorised.
        r.destinations = (0..200_000).map(|i| format!("Y{i:05}")).collect();
        assert_eq!(fields(r), ["destinations"]);
        let mut r = request();
        r.destinations = vec!["bad".into(); MAX_DESTINATIONS + 1];
        assert_eq!(fields(r), ["destinations"]);
        let mut r = request();
        r.destinations = (0..MAX_DESTINATIONS).map(|i| format!("YG{i:03}")).collect();
        assert!(submit_from_wire(r, 1024).is_ok());
    }

    #[test]
    fn violations_do_not_echo_patient_data() {
        let mut r = request();
        r.patient.as_mut().unwrap().nhs_number = "9990000017".into();
        let all = submit_from_wire(r, 1024).unwrap_err();
        assert!(all.0.iter().all(|v| !v.description.contains("9990000017")));
    }

    #[test]
    fn a_grpc_timeout_header_is_read_in_each_unit_and_a_bad_one_ignored() {
        use std::time::Duration;
        let of = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(of("2H"), Some(Duration::from_secs(7_200)));
        assert_eq!(of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(of("10S"), Some(Duration::from_secs(10)));
        assert_eq!(of("1500m"), Some(Duration::from_millis(1_500)));
        assert_eq!(of("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(of("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S", "10 S"] {
            assert_eq!(of(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn a_long_poll_keeps_a_tenth_of_the_deadline_back_within_bounds() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        assert_eq!(before_deadline(ms(1_500)), ms(1_350));
        assert_eq!(before_deadline(ms(100)), ms(50));
        assert_eq!(before_deadline(ms(30)), ms(0));
        assert_eq!(
            before_deadline(Duration::from_secs(60)),
            Duration::from_secs(59)
        );
    }

    #[test]
    fn durations_and_timestamps_out_of_range_name_the_field_and_the_fault() {
        let mut v = Violations::default();
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(
            duration_from_wire(d(1, 1_000_000_000), "lease", &mut v),
            None
        );
        assert_eq!(duration_from_wire(d(-1, 0), "wait", &mut v), None);
        assert_eq!(
            duration_from_wire(d(2, 5), "wait", &mut v),
            Some(std::time::Duration::new(2, 5))
        );
        let t = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        assert_eq!(timestamp_from_wire(t(0, -1), "to", &mut v), None);
        assert_eq!(timestamp_from_wire(t(i64::MIN, 0), "from", &mut v), None);
        assert_eq!(
            timestamp_from_wire(t(253_402_300_800, 0), "to", &mut v),
            None
        );
        assert_eq!(
            timestamp_from_wire(t(253_402_300_799, 999_999_999), "to", &mut v),
            Some(253_402_300_799_999)
        );
        assert_eq!(
            timestamp_from_wire(t(-62_135_596_800, 0), "from", &mut v),
            Some(-62_135_596_800_000)
        );
        let faults: Vec<(String, String)> =
            v.0.iter()
                .map(|f| (f.field.clone(), f.description.clone()))
                .collect();
        assert_eq!(
            faults,
            [
                (
                    "lease".into(),
                    "nanos must be -999,999,999 to 999,999,999".into()
                ),
                ("wait".into(), "must be a non-negative duration".into()),
                ("to".into(), "nanos must be 0 to 999,999,999".into()),
                (
                    "from".into(),
                    "must be between years 1 and 9999 (UTC)".into()
                ),
                ("to".into(), "must be between years 1 and 9999 (UTC)".into()),
            ]
        );
    }
}
