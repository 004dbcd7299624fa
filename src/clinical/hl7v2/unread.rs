//! What a message holds beyond what the parser reads: every segment, field,
//! repetition and component outside the table below is listed by its HL7
//! path, so a delivery can say what it does not carry.

use super::LOCAL;
use super::segment::Segment;
use crate::clinical::JourneyEvent;

/// A field the parser reads: which components (empty: the whole field) and
/// whether every repetition is read or only the first.
struct Read {
    field: usize,
    components: &'static [usize],
    every_repetition: bool,
}

const fn first(field: usize, components: &'static [usize]) -> Read {
    Read {
        field,
        components,
        every_repetition: false,
    }
}

/// The fields read in segment `id` of a message for `event`; `None` when
/// the segment is not read at all.
fn table(id: &str, event: Option<JourneyEvent>) -> Option<Vec<Read>> {
    let transfer = event == Some(JourneyEvent::Transfer);
    let fields = match id {
        "EVN" => {
            let mut f = vec![first(1, &[]), first(2, &[1])];
            if transfer {
                f.push(first(6, &[1]));
            }
            f
        }
        "PID" => vec![
            first(1, &[]),
            Read {
                field: 3,
                components: &[1, 4, 5],
                every_repetition: true,
            },
            first(5, &[1, 2, 3]),
            first(7, &[1]),
            first(8, &[]),
            first(11, &[1, 2, 3, 5, 7]),
            first(29, &[]),
            first(30, &[]),
        ],
        "PD1" => vec![first(3, &[10])],
        "PV1" => {
            let mut f = vec![first(1, &[]), first(2, &[1]), first(3, &[4])];
            if transfer {
                f.push(first(6, &[4]));
            }
            f.extend([first(36, &[1]), first(44, &[1]), first(45, &[1])]);
            f
        }
        "AL1" => vec![
            first(1, &[]),
            first(2, &[1]),
            first(3, &[1, 2, 3, 4, 5, 6]),
            first(4, &[1]),
            first(5, &[]),
        ],
        "DG1" => vec![
            first(1, &[]),
            first(3, &[1, 2, 3, 4, 5, 6]),
            first(5, &[1]),
            first(6, &[]),
            first(21, &[1]),
        ],
        "OBX" => vec![
            first(1, &[]),
            first(2, &[]),
            first(3, &[1, 2, 3]),
            first(4, &[]),
            first(5, &[]),
            first(11, &[]),
        ],
        _ => return None,
    };
    Some(fields)
}

/// The OBX items and fields the parser reads (`MED-DOSE`).
const OBX_ITEMS: [(&str, &[&str]); 13] = [
    (
        "MED",
        &[
            "CODE",
            "DOSE",
            "ROUTE",
            "FREQ",
            "SUPERVISED",
            "PRN",
            "OST",
            "LASTDOSE",
            "DAYS",
        ],
    ),
    (
        "RX",
        &[
            "CODE", "STATUS", "INTENT", "AUTHORED", "DOSAGE", "QTY", "UNIT", "DAYS",
        ],
    ),
    ("ALG", &["CODE", "REACTION", "SEV"]),
    ("DX", &["CODE", "ACTIVE", "ONSET"]),
    ("RISK", &["KIND", "CODE", "ACTIVE", "NOTE"]),
    ("MH", &["CPA", "COORD"]),
    ("SM", &["TREAT", "SERVICE"]),
    ("INF", &["CODE", "STATUS", "TREATED"]),
    ("VAC", &["CODE", "DATE"]),
    ("FU", &["KIND", "SERVICE", "DATE"]),
    ("CUSTODY", &["NFA"]),
    ("CONSENT", &["PROBATION", "BASIS"]),
    ("AUTHOR", &["NAME", "ROLE"]),
];

/// Whether an OBX segment is one of ours that the parser reads.
fn obx_read(s: &Segment<'_>) -> bool {
    if s.comp(3, 3) != LOCAL {
        return false;
    }
    let id = s.comp(3, 1);
    id.split_once('-').is_some_and(|(item, field)| {
        OBX_ITEMS
            .iter()
            .any(|(i, fields)| *i == item && fields.contains(&field))
    })
}

/// Everything in `segments` the parser does not read, by HL7 path.
pub(super) fn unread(segments: &[Segment<'_>], event: Option<JourneyEvent>) -> Vec<String> {
    let mut notes = Vec::new();
    for s in segments {
        if s.id == "MSH" {
            // The header: sender, receiver, time, type, control id, processing
            // id and version are the envelope; the rest is listed.
            for n in (8..=s.fields.len()).filter(|n| !(9..=12).contains(n) && *n != 18) {
                if !s.field(n).is_empty() {
                    notes.push(format!("MSH-{n}: not read by the gateway"));
                }
            }
            continue;
        }
        // Segment ids were checked when the message was split: never free text.
        let Some(table) = table(s.id, event).filter(|_| s.id != "OBX" || obx_read(s)) else {
            let at = if s.nth > 1 {
                format!("{}({})", s.id, s.nth)
            } else {
                s.id.to_owned()
            };
            notes.push(format!("{at}: a segment the gateway does not read here"));
            continue;
        };
        for n in 1..s.fields.len() {
            let field = s.field(n);
            if field.is_empty() || field == "\"\"" {
                continue;
            }
            match table.iter().find(|r| r.field == n) {
                None => notes.push(format!("{}: not read by the gateway", s.name(n))),
                Some(read) if s.id == "OBX" && n == 5 => {
                    // A coded value (CE) is read to its sixth component,
                    // any other (ST, NM, DTM) has one.
                    let coded = s.comp(3, 1).ends_with("-CODE");
                    let components: &[usize] = if coded { &[1, 2, 3, 4, 5, 6] } else { &[1] };
                    let read = Read {
                        components,
                        ..*read
                    };
                    fields_unread(s, n, field, &read, &mut notes);
                }
                Some(read) => fields_unread(s, n, field, read, &mut notes),
            }
        }
    }
    notes
}

fn fields_unread(s: &Segment<'_>, n: usize, field: &str, read: &Read, notes: &mut Vec<String>) {
    for (r, rep) in field.split('~').enumerate() {
        if rep.is_empty() {
            continue;
        }
        if r > 0 && !read.every_repetition {
            notes.push(format!(
                "{}[{}]: only the first repetition is read",
                s.name(n),
                r + 1
            ));
            continue;
        }
        if read.components.is_empty() {
            continue;
        }
        for (c, comp) in rep.split('^').enumerate() {
            if !comp.is_empty() && comp != "\"\"" && !read.components.contains(&(c + 1)) {
                let rep_at = if read.every_repetition {
                    format!("[{}]", r + 1)
                } else {
                    String::new()
                };
                notes.push(format!(
                    "{}{rep_at}.{}: not read by the gateway",
                    s.name(n),
                    c + 1
                ));
            }
        }
    }
}
