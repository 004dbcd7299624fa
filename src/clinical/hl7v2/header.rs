//! What a message's MSH says about it, read on its own: an ACK answers even
//! a message whose body is broken, so the header is read apart from the rest
//! (and from at most its first line, so a huge or truncated message still
//! has one).

use super::escape::unescape;
use crate::clinical::JourneyEvent;

/// The longest field echoed back from an inbound MSH (HD is at most 227).
const MAX_ECHOED: usize = 227;

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
    /// MSH-11.1, the processing id (`P`).
    pub processing_id: String,
    /// MSH-12.1, the version (`2.5.1`).
    pub version: String,
}

impl MessageHeader {
    /// The journey event MSH-9 names, when it is one we carry.
    #[must_use]
    pub fn event(&self) -> Option<JourneyEvent> {
        event_of(&self.message_type, &self.trigger)
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

/// The MSH of `bytes`, or `None` when they do not start with an MSH segment
/// using the standard delimiters `|^~\&` (or its line is not UTF-8).
#[must_use]
pub fn header(bytes: &[u8]) -> Option<MessageHeader> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let line_end = memchr::memchr2(b'\r', b'\n', bytes).unwrap_or(bytes.len());
    let line = std::str::from_utf8(&bytes[..line_end]).ok()?;
    let rest = line.strip_prefix("MSH|^~\\&")?;
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
    Some(MessageHeader {
        sending_application: raw(3).to_owned(),
        sending_facility: raw(4).to_owned(),
        receiving_application: raw(5).to_owned(),
        receiving_facility: raw(6).to_owned(),
        message_type: comp(9, 1),
        trigger: comp(9, 2),
        control_id: comp(10, 1),
        processing_id: comp(11, 1),
        version: comp(12, 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(header(b"MSH#^~\\&#"), None);
        assert_eq!(event_of("ORU", "R01"), None);
    }
}
