//! HL7 v2 escaping: the delimiters, the escape character and line breaks
//! as escape sequences (`\F\`, `\X0D\`), and back.

use std::borrow::Cow;

/// Escapes text for a field: delimiters, the escape character, and line breaks.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_escaped(&mut out, text);
    out
}

fn needs_escape(b: u8) -> bool {
    matches!(b, b'|' | b'^' | b'&' | b'~' | b'\\' | b'\r' | b'\n')
}

/// Appends `text` to `out`, escaped as [`escape`] does.
pub(super) fn push_escaped(out: &mut String, text: &str) {
    if !text.bytes().any(needs_escape) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            '\\' => out.push_str("\\E\\"),
            '\r' => out.push_str("\\X0D\\"),
            '\n' => out.push_str("\\X0A\\"),
            c => out.push(c),
        }
    }
}

/// Writes free text as an FT value: escaped as by [`push_escaped`], with
/// each line feed as FT's line break `\.br\` (HL7 v2 §2.7.6), which
/// receivers show as one; a carriage return stays `\X0D\`, so the text
/// reads back exactly.
pub(super) fn push_formatted(out: &mut String, text: &str) {
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push_str("\\.br\\");
        }
        push_escaped(out, line);
    }
}

/// Reverses [`escape`]; an unknown escape is kept as written.
pub fn unescape(text: &str) -> String {
    unescaped(text).into_owned()
}

/// [`unescape`], borrowing `text` when it holds no escape.
pub(super) fn unescaped(text: &str) -> Cow<'_, str> {
    if !text.as_bytes().contains(&b'\\') {
        return Cow::Borrowed(text);
    }
    Cow::Owned(rewrite_escapes(text, &[], |seq, out| match seq {
        "F" => out.push('|'),
        "S" => out.push('^'),
        "T" => out.push('&'),
        "R" => out.push('~'),
        "E" => out.push('\\'),
        // Formatting (HL7 v2 §2.7): a line break, and the highlighting the
        // model has no place for.
        ".br" => out.push('\n'),
        "H" | "N" => {}
        hex => match hex_text(hex) {
            Some(text) => out.push_str(&text),
            None => push_as_written(out, hex),
        },
    }))
}

/// `text` with each escape sequence (from one escape character to the
/// next, never past one of `ends`) given to `each` with the output, which
/// receives the rest as written; an escape character with no end is kept
/// as written. The one scan the readers share: unescaping, v2.7's `\P\`,
/// and Latin-1 hexadecimal data.
pub(super) fn rewrite_escapes(
    text: &str,
    ends: &[char],
    mut each: impl FnMut(&str, &mut String),
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = if ends.is_empty() {
            after.find('\\')
        } else {
            after
                .find(|c| c == '\\' || ends.contains(&c))
                .filter(|&j| after.as_bytes()[j] == b'\\')
        };
        match end {
            Some(j) => {
                each(&after[..j], &mut out);
                rest = &after[j + 1..];
            }
            None => {
                out.push('\\');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// An escape sequence kept as written.
pub(super) fn push_as_written(out: &mut String, seq: &str) {
    out.push('\\');
    out.push_str(seq);
    out.push('\\');
}

/// The bytes of a hexadecimal escape's body (`X0D0A`, `XC3A9`), or `None`
/// when it is not one.
pub(super) fn hex_bytes(seq: &str) -> Option<Vec<u8>> {
    let digits = seq.strip_prefix('X')?;
    if digits.is_empty() || digits.len() % 2 != 0 {
        return None;
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(digits.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The text of a hexadecimal escape's body: its bytes as UTF-8, or `None`
/// when it is not one (kept as written).
fn hex_text(seq: &str) -> Option<String> {
    String::from_utf8(hex_bytes(seq)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_covers_every_delimiter() {
        let text = "a|b^c&d~e\\f\rg\nh";
        let escaped = escape(text);
        assert!(!escaped.contains(['|', '^', '&', '~', '\r', '\n']));
        assert_eq!(unescape(&escaped), text);
        assert_eq!(unescape("x\\Q\\y"), "x\\Q\\y");
        assert_eq!(unescape("trailing\\"), "trailing\\");
        // Hexadecimal data and formatting (HL7 v2 §2.7).
        assert_eq!(unescape("Zo\\XC3AB\\"), "Zoë");
        assert_eq!(unescape("a\\X0D0A\\b"), "a\r\nb");
        assert_eq!(unescape("one\\.br\\two"), "one\ntwo");
        assert_eq!(unescape("\\H\\Urgent\\N\\"), "Urgent");
        assert_eq!(unescape("x\\XZZ\\y"), "x\\XZZ\\y");
        assert_eq!(
            unescape("x\\XFF\\y"),
            "x\\XFF\\y",
            "not UTF-8: kept as written"
        );
    }
}
