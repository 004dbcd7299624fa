//! The segment tokenizer: a message split into segments and fields (with
//! the segment, field and repetition caps); components are split and
//! unescaped only when read, so an escaped delimiter can never split
//! anything.

use std::borrow::Cow;

use super::escape::unescaped;
use crate::clinical::Limits;
use crate::clinical::violation::ValidationErrors;

/// One parsed segment: fields, each a list of repetitions, each a list of
/// components, all still escaped.
pub(super) struct Segment<'a> {
    pub(super) id: &'a str,
    /// The segment's position among segments of its type, from 1.
    pub(super) nth: usize,
    pub(super) fields: Vec<&'a str>,
}

impl<'a> Segment<'a> {
    pub(super) fn name(&self, field: usize) -> String {
        if self.nth > 1 {
            format!("{}({})-{field}", self.id, self.nth)
        } else {
            format!("{}-{field}", self.id)
        }
    }

    /// Field `n` (HL7 numbering; MSH-1 is the field separator). The
    /// explicit null `""` reads as absent: nothing we carry is a deletion.
    pub(super) fn field(&self, n: usize) -> &'a str {
        let i = if self.id == "MSH" { n - 1 } else { n };
        match self.fields.get(i).copied() {
            Some("\"\"") | None => "",
            Some(f) => f,
        }
    }

    /// Field `n`'s non-empty repetitions, each with its place among all
    /// of them (from 0): an error names the repetition the sender wrote,
    /// counting empty ones (`~123` is the second).
    pub(super) fn reps(&self, n: usize) -> impl Iterator<Item = (usize, &'a str)> {
        self.field(n)
            .split('~')
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
    }

    pub(super) fn comp(&self, n: usize, c: usize) -> Cow<'a, str> {
        component(self.field(n), c)
    }

    /// See [`first_subcomponent`].
    pub(super) fn sub1(&self, n: usize, c: usize) -> Cow<'a, str> {
        first_subcomponent(self.field(n), c)
    }
}

/// Component `c` (from 1) of `field`'s first repetition, unescaped
/// (borrowed when it holds no escape); the explicit null `""` reads as
/// absent. Later repetitions are read only through [`Segment::reps`] (and
/// listed as not read otherwise): a second name must never run into the
/// first one's given name.
pub(super) fn component(field: &str, c: usize) -> Cow<'_, str> {
    let first = field.split('~').next().unwrap_or_default();
    match first.split('^').nth(c - 1) {
        Some("\"\"") | None => Cow::Borrowed(""),
        Some(v) => unescaped(v),
    }
}

/// The first subcomponent of component `c` of `field`'s first repetition,
/// unescaped: for a component whose HL7 type has subcomponents (FN, HD,
/// SAD), whose first is the value (`SMITH&&`, `HMPPS&2.16.840…&ISO`). The
/// split comes before unescaping, so `\T\` stays an ampersand.
pub(super) fn first_subcomponent(field: &str, c: usize) -> Cow<'_, str> {
    let first = field.split('~').next().unwrap_or_default();
    match first
        .split('^')
        .nth(c - 1)
        .and_then(|v| v.split('&').next())
    {
        Some("\"\"") | None => Cow::Borrowed(""),
        Some(v) => unescaped(v),
    }
}

/// Whether `id` is a segment id: three upper-case letters or digits, the
/// first a letter.
pub(super) fn is_segment_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 3
        && b[0].is_ascii_uppercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

fn count(text: &str, b: u8) -> usize {
    memchr::memchr_iter(b, text.as_bytes()).count()
}

/// Why a batch (FHS or BHS first) is refused; `None` for anything else.
#[must_use]
pub fn batch_refusal(message: &[u8]) -> Option<&'static str> {
    (message.starts_with(b"FHS") || message.starts_with(b"BHS"))
        .then_some("batches (FHS, BHS) are not accepted: send each message in its own MLLP frame")
}

pub(super) fn split<'a>(
    text: &'a str,
    limits: &Limits,
) -> Result<Vec<Segment<'a>>, ValidationErrors> {
    if let Some(why) = batch_refusal(text.as_bytes()) {
        return Err(ValidationErrors::one("MSH", why));
    }
    if !text.starts_with("MSH") {
        return Err(ValidationErrors::one(
            "MSH",
            "the message must start with an MSH segment",
        ));
    }
    // MSH-2 is four characters, or five with the truncation character `#`
    // (v2.7 on); anything longer would be read as MSH-3.
    let after = text.get(8..).unwrap_or_default();
    let tail = after.strip_prefix('#').unwrap_or(after);
    if text.get(3..8) != Some("|^~\\&") || !(tail.is_empty() || tail.starts_with(['|', '\r', '\n']))
    {
        return Err(ValidationErrors::one(
            "MSH-2",
            "only the standard delimiters |^~\\& are accepted",
        ));
    }
    let mut errors = ValidationErrors::default();
    let mut segments = Vec::with_capacity(count(text, b'\r') + 1);
    let mut counts: Vec<(&str, usize)> = Vec::new();
    // The segment terminator is CR (HL7 v2.5.1 §2.5.1, not negotiable): in
    // a message with CRs an LF is only the tail of a CRLF, never a segment
    // break of its own, so a raw LF in a note cannot start a segment. A
    // message with no CR at all (a file saved with LF line ends) is split
    // at its LFs.
    let lines: Box<dyn Iterator<Item = &str>> = if text.contains('\r') {
        Box::new(text.split('\r').map(|l| l.strip_prefix('\n').unwrap_or(l)))
    } else {
        Box::new(text.split('\n'))
    };
    for (i, raw) in lines.filter(|l| !l.is_empty()).enumerate() {
        if i >= limits.max_hl7_segments {
            return Err(ValidationErrors::one(
                "message",
                format!("more than {} segments", limits.max_hl7_segments),
            ));
        }
        let id = raw.get(..3).unwrap_or("");
        // Any segment id is taken (HL7 v2 ch. 2: a receiver ignores the
        // segments it does not expect; `unread` lists them on the delivery),
        // but a line that is not a segment is refused: it is a line break
        // inside a field, which would otherwise cut that field short.
        let well_formed = raw.len() == 3 || raw.as_bytes().get(3) == Some(&b'|');
        if !well_formed || !is_segment_id(id) {
            errors.add(
                format!("segment {}", i + 1),
                "not a segment: a segment starts with its three-character id and `|` (a line \
                 break inside a field splits it)",
            );
            continue;
        }
        let field_count = count(raw, b'|') + 1;
        if field_count > limits.max_hl7_repetitions + 1 {
            errors.add(
                id.to_string(),
                format!("more than {} fields", limits.max_hl7_repetitions),
            );
            continue;
        }
        let mut fields = Vec::with_capacity(field_count);
        let mut start = 0;
        for bar in memchr::memchr_iter(b'|', raw.as_bytes()) {
            fields.push(&raw[start..bar]);
            start = bar + 1;
        }
        fields.push(&raw[start..]);
        // No field can reach the limit unless the whole segment does.
        if count(raw, b'~') >= limits.max_hl7_repetitions
            && fields
                .iter()
                .any(|f| count(f, b'~') >= limits.max_hl7_repetitions)
        {
            errors.add(
                id.to_string(),
                format!(
                    "more than {} repetitions in a field",
                    limits.max_hl7_repetitions
                ),
            );
            continue;
        }
        let nth = match counts.iter_mut().find(|(seen, _)| *seen == id) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                counts.push((id, 1));
                1
            }
        };
        segments.push(Segment { id, nth, fields });
    }
    errors.into_result().map(|()| segments)
}
