//! What a message's MSH says about it, read on its own: an ACK answers even
//! a message whose body is broken, so the header is read apart from the rest
//! (and from at most its first line, so a huge or truncated message still
//! has one).

use super::escape::unescape;
use crate::clinical::JourneyEvent;

/// The longest field echoed back from an inbound MSH (HD is at most 227).
const MAX_ECHOED: usize = 227;

/// The HL7 v2 versions (HL7 table 0104).
pub(super) const VERSIONS: [&str; 15] = [
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1",
    "2.8.2", "2.9", "2.9.1",
];

/// The inbound MSH fields an ACK echoes or a listener checks. The
/// application and facility fields are kept as written (escaped, with their
/// components), ready to be echoed; the rest are unescaped first components.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageHeader {
    /// MSH-3, as written.
    pub sending_application: String,
    /// MSH-4, as written.
    pub sending_facility: String,
    /// MSH-5, as written.
    pub receiving_application: String,
    /// MSH-6, as written.
    pub receiving_facility: String,
    /// MSH-9.1 (`ADT`).
    pub message_type: String,
    /// MSH-9.2 (`A01`).
    pub trigger: String,
    /// MSH-10, the message control id.
    pub control_id: String,
    /// Whether MSH-10 holds more than one component or repetition: it is a
    /// plain string (ST), and the first part alone would merge messages
    /// whose ids differ only after a `^` or `~`.
    pub control_id_has_components: bool,
    /// MSH-11.1, the processing id (`P`).
    pub processing_id: String,
    /// MSH-12.1, the version (`2.5.1`).
    pub version: String,
    /// MSH-15.1, the accept acknowledgement type (`AL`, `NE`, `ER`, `SU`):
    /// with MSH-16, valued only in enhanced acknowledgement mode.
    pub accept_ack: String,
    /// MSH-16.1, the application acknowledgement type.
    pub application_ack: String,
    /// Whether MSH-1 and MSH-2 are the standard `|^~\&` (the only
    /// delimiters the parser reads). A header with others is still read, by
    /// its own delimiters, so its refusal can name the message.
    pub standard_delimiters: bool,
}

impl MessageHeader {
    /// The journey event MSH-9 names, when it is one we carry.
    #[must_use]
    pub fn event(&self) -> Option<JourneyEvent> {
        event_of(&self.message_type, &self.trigger)
    }

    /// Whether the message asks for enhanced acknowledgement (MSH-15 or
    /// MSH-16 valued): then its ACK is a commit acknowledgement (CA, CE,
    /// CR), sent as MSH-15 asks.
    #[must_use]
    pub fn enhanced(&self) -> bool {
        !self.accept_ack.is_empty() || !self.application_ack.is_empty()
    }

    /// Whether an acknowledgement of `accepted` is sent: always in original
    /// mode; in enhanced mode as MSH-15 says (`AL` or empty always, `NE`
    /// never, `ER` only for a refusal, `SU` only for an acceptance).
    #[must_use]
    pub fn wants_ack(&self, accepted: bool) -> bool {
        match self.accept_ack.as_str() {
            "NE" => false,
            "ER" => !accepted,
            "SU" => accepted,
            _ => true,
        }
    }

    /// Whether MSH-16 asks for an application acknowledgement of
    /// `accepted` (`AL` always, `ER` only for a refusal, `SU` only for an
    /// acceptance; `NE` or empty never).
    #[must_use]
    pub fn wants_application_ack(&self, accepted: bool) -> bool {
        match self.application_ack.as_str() {
            "AL" => true,
            "ER" => !accepted,
            "SU" => accepted,
            _ => false,
        }
    }

    /// The one acknowledgement a message of this outcome gets: `Some(true)`
    /// the commit acknowledgement (enhanced mode, as MSH-15 asks), or else
    /// `Some(false)` the application acknowledgement (original mode; or
    /// enhanced mode when MSH-15 asks for no commit acknowledgement of this
    /// outcome and MSH-16 asks for an application one: the gateway's work
    /// ends when the message is durable, so both would say the same, and a
    /// sender asking `NE`/`ER` is told of a refusal rather than left to
    /// read silence as success); `None` when neither is asked for.
    #[must_use]
    pub fn acknowledgement(&self, accepted: bool) -> Option<bool> {
        if !self.enhanced() {
            Some(false)
        } else if self.wants_ack(accepted) {
            Some(true)
        } else if self.wants_application_ack(accepted) {
            Some(false)
        } else {
            None
        }
    }
}

/// The journey event of an ADT trigger: A01 admission, A02 transfer, A03
/// release, A08 (an update) a GP's community summary.
#[must_use]
pub fn event_of(message_type: &str, trigger: &str) -> Option<JourneyEvent> {
    match (message_type, trigger) {
        ("ADT", "A01") => Some(JourneyEvent::Admission),
        ("ADT", "A02") => Some(JourneyEvent::Transfer),
        ("ADT", "A03") => Some(JourneyEvent::Release),
        ("ADT", "A08") => Some(JourneyEvent::CommunitySummary),
        _ => None,
    }
}

/// The MSH of `bytes`, or `None` when they do not start with an MSH segment.
/// A line that is not UTF-8 is read byte for byte as ISO 8859-1 (what a
/// sender declaring `8859/1` writes; a control id is ASCII either way), so
/// its ACK still names the message in MSA-2. A header whose delimiters are not the
/// standard `|^~\&` is read by its own MSH-1 and MSH-2 (echoed fields keep
/// only their first component), with `standard_delimiters` false.
#[must_use]
pub fn header(bytes: &[u8]) -> Option<MessageHeader> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let line_end = memchr::memchr2(b'\r', b'\n', bytes).unwrap_or(bytes.len());
    let line: std::borrow::Cow<'_, str> = match std::str::from_utf8(&bytes[..line_end]) {
        Ok(line) => line.into(),
        Err(_) => bytes[..line_end].iter().map(|&b| char::from(b)).collect(),
    };
    let Some(rest) = line.strip_prefix("MSH|^~\\&") else {
        return other_delimiters(&line);
    };
    // fields[0] is MSH-2's tail (empty), so MSH-n is fields[n - 2].
    let fields: Vec<&str> = rest.split('|').collect();
    let raw = |n: usize| -> &str {
        let f = fields.get(n - 2).copied().unwrap_or_default();
        let f = f.split('~').next().unwrap_or_default();
        let mut end = f.len().min(MAX_ECHOED);
        while !f.is_char_boundary(end) {
            end -= 1;
        }
        &f[..end]
    };
    let comp = |n: usize, c: usize| unescape(raw(n).split('^').nth(c - 1).unwrap_or_default());
    // On the whole field: `raw` stops at the first repetition.
    let split_id = fields.get(8).is_some_and(|f| f.contains(['^', '~']));
    Some(read_fields(|n| raw(n).to_owned(), comp, (true, split_id)))
}

/// A header from its echoed fields (MSH-3 to MSH-6) and components.
fn read_fields(
    echoed: impl Fn(usize) -> String,
    comp: impl Fn(usize, usize) -> String,
    (standard_delimiters, control_id_has_components): (bool, bool),
) -> MessageHeader {
    MessageHeader {
        sending_application: echoed(3),
        sending_facility: echoed(4),
        receiving_application: echoed(5),
        receiving_facility: echoed(6),
        message_type: comp(9, 1),
        trigger: comp(9, 2),
        control_id: comp(10, 1),
        control_id_has_components,
        processing_id: comp(11, 1),
        version: comp(12, 1),
        accept_ack: comp(15, 1),
        application_ack: comp(16, 1),
        standard_delimiters,
    }
}

/// An MSH with delimiters of its own (`MSH#^~\&#…`, `MSH|$~\&|…`): read by
/// them, so that the refusal names the message; `None` when MSH-1 and MSH-2
/// are not five distinct punctuation characters.
fn other_delimiters(line: &str) -> Option<MessageHeader> {
    let rest = line.strip_prefix("MSH")?;
    let delimiters: Vec<char> = rest.chars().take(5).collect();
    let distinct = delimiters
        .iter()
        .enumerate()
        .all(|(i, c)| !delimiters[..i].contains(c));
    if delimiters.len() < 5 || !distinct || !delimiters.iter().all(char::is_ascii_punctuation) {
        return None;
    }
    let (field, component) = (delimiters[0], delimiters[1]);
    let fields: Vec<&str> = rest[5..].split(field).collect();
    // fields[0] is MSH-2's tail (empty), so MSH-n is fields[n - 2].
    let comp = |n: usize, c: usize| -> String {
        let first = fields
            .get(n - 2)
            .copied()
            .unwrap_or_default()
            .split(delimiters[2])
            .next()
            .unwrap_or_default();
        let value = first.split(component).nth(c - 1).unwrap_or_default();
        value.chars().take(MAX_ECHOED).collect()
    };
    let echoed = |n: usize| super::escape::escape(&comp(n, 1));
    let split_id = fields
        .get(8)
        .is_some_and(|f| f.contains([component, delimiters[2]]));
    Some(read_fields(echoed, comp, (false, split_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_line_that_is_not_utf_8_still_names_its_message() {
        let h = header(b"MSH|^~\\&|PAS\xe9|YP001|TC|GW|20261124080000||ADT^A01^ADT_A01|ctl-9|P|2.5.1|||||8859/1\r")
            .expect("read as ISO 8859-1");
        assert_eq!(h.control_id, "ctl-9");
        assert_eq!(h.sending_application, "PAS\u{e9}");
    }

    #[test]
    fn the_header_is_read_without_the_body() {
        let h = header(
            b"MSH|^~\\&|PAS^1.2^ISO|YP001|TC|GW|20261124080000||ADT^A03^ADT_A03|c-1\\T\\2|P|2.5.1\rPID|broken",
        )
        .unwrap();
        assert_eq!(h.sending_application, "PAS^1.2^ISO");
        assert_eq!(h.sending_facility, "YP001");
        assert_eq!(h.receiving_application, "TC");
        assert_eq!(h.receiving_facility, "GW");
        assert_eq!(h.event(), Some(JourneyEvent::Release));
        assert_eq!(h.control_id, "c-1&2");
        assert_eq!((&*h.processing_id, &*h.version), ("P", "2.5.1"));
        let short = header(b"MSH|^~\\&|A").unwrap();
        assert_eq!(short.control_id, "");
        assert_eq!(header(b"PID|1"), None);
        let other = header(b"MSH#^~\\&#PAS^1#YP001#TC#GW#20261124##ADT^A03#c-2#P#2.5.1").unwrap();
        assert!(!other.standard_delimiters);
        assert_eq!((&*other.control_id, &*other.trigger), ("c-2", "A03"));
        assert_eq!(other.sending_application, "PAS");
        let dollar =
            header(b"MSH|$~\\&|PAS|YP001|TC|GW|20261124||ADT$A01$ADT_A01|E-2|P|2.5.1").unwrap();
        assert_eq!((&*dollar.control_id, &*dollar.trigger), ("E-2", "A01"));
        assert_eq!(header(b"MSHA^~\\&A"), None);
        assert_eq!(event_of("ORU", "R01"), None);
    }
}
