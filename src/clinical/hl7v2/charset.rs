//! The character set a message declares in MSH-18 (HL7 table 0211), for
//! bytes that arrive as bytes (MLLP). The parser reads UTF-8; a message
//! declared `8859/1` is decoded from Latin-1 first, so a name such as
//! "Zoë" from an older system is read as written, not refused or garbled.

use std::borrow::Cow;

use crate::clinical::violation::ValidationErrors;

/// `bytes` as UTF-8, decoded by the character set MSH-18 declares: none or
/// `UNICODE UTF-8` (UTF-8, checked by the parser), `ASCII` (checked here),
/// `8859/1` (Latin-1, decoded). Any other is refused at MSH-18.
///
/// # Errors
/// MSH-18 names a set the gateway does not read, or ASCII holds a byte over 127.
pub fn decoded(bytes: &[u8]) -> Result<Cow<'_, [u8]>, ValidationErrors> {
    let line_end = memchr::memchr2(b'\r', b'\n', bytes).unwrap_or(bytes.len());
    // MSH-1 is the separator itself, so MSH-18 is the 18th piece when split.
    let declared = bytes[..line_end]
        .split(|b| *b == b'|')
        .nth(17)
        .and_then(|f| f.split(|b| *b == b'~').next())
        .unwrap_or_default();
    match declared {
        b"" | b"UNICODE UTF-8" => Ok(Cow::Borrowed(bytes)),
        b"ASCII" => match bytes.iter().position(|b| !b.is_ascii()) {
            None => Ok(Cow::Borrowed(bytes)),
            Some(at) => Err(ValidationErrors::one(
                "MSH-18",
                format!("declares ASCII, but byte {at} is not ASCII"),
            )),
        },
        b"8859/1" => Ok(Cow::Owned(
            latin_hex_as_utf8(&bytes.iter().map(|b| char::from(*b)).collect::<String>())
                .into_bytes(),
        )),
        _ => Err(ValidationErrors::one(
            "MSH-18",
            "a character set the gateway does not read: send UNICODE UTF-8, 8859/1 or ASCII \
             (HL7 table 0211)",
        )),
    }
}

/// `text` (decoded from Latin-1) with each hexadecimal escape (`\XEB\`)
/// re-expressed in UTF-8 (`\XC3AB\`): HL7 v2 §2.7.3 gives hexadecimal data
/// in the message's character set, and the parser reads UTF-8.
///
/// Escapes are read as the parser reads them, from one escape character to
/// the next within a component; an escaped escape character (`\E\`) then
/// `XEB\E\` is text, not hexadecimal data, and is left as written. The scan
/// starts after MSH-2, which holds the escape character itself.
fn latin_hex_as_utf8(text: &str) -> String {
    let msh_2_end = text
        .find('|')
        .and_then(|p| text[p + 1..].find('|').map(|q| p + 1 + q))
        .unwrap_or(0);
    let (head, rest) = text.split_at(msh_2_end);
    let ends = ['|', '^', '&', '~', '\r', '\n'];
    let body = super::escape::rewrite_escapes(rest, &ends, |seq, out| {
        let Some(bytes) = super::escape::hex_bytes(seq) else {
            super::escape::push_as_written(out, seq);
            return;
        };
        out.push_str("\\X");
        for byte in bytes {
            let mut buf = [0; 4];
            for b in char::from(byte).encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("{b:02X}"));
            }
        }
        out.push('\\');
    });
    format!("{head}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msh(charset: &str) -> Vec<u8> {
        format!("MSH|^~\\&|A|YP001|B|C|20261124||ADT^A01^ADT_A01|X|P|2.5.1||||||{charset}\rPID|")
            .into_bytes()
    }

    #[test]
    fn latin_1_is_decoded_and_the_rest_refused_by_msh_18() {
        let mut latin = msh("8859/1");
        latin.extend_from_slice(b"Zo\xEB");
        let text = String::from_utf8(decoded(&latin).unwrap().into_owned()).unwrap();
        assert!(text.ends_with("PID|Zoë"), "{text}");
        // Hexadecimal data is in the declared set too (HL7 v2 §2.7.3).
        let mut hex = msh("8859/1");
        hex.extend_from_slice(b"Zo\\XEB\\|\\X0D0A\\|\\Xnot\\");
        let text = String::from_utf8(decoded(&hex).unwrap().into_owned()).unwrap();
        assert!(
            text.ends_with("PID|Zo\\XC3AB\\|\\X0D0A\\|\\Xnot\\"),
            "{text}"
        );
        assert_eq!(super::super::escape::unescape("Zo\\XC3AB\\"), "Zoë");
        // An escaped escape character before `XEB\` is text: left as written
        // (it was read as hexadecimal data, and the text changed).
        let mut text = msh("8859/1");
        text.extend_from_slice(b"No\\E\\XEB\\E\\l|\\H\\Bold\\N\\|a\\b");
        let text = String::from_utf8(decoded(&text).unwrap().into_owned()).unwrap();
        assert!(
            text.ends_with("PID|No\\E\\XEB\\E\\l|\\H\\Bold\\N\\|a\\b"),
            "{text}"
        );
        assert!(text.starts_with("MSH|^~\\&|"), "{text}");
        for utf8 in ["", "UNICODE UTF-8"] {
            let m = msh(utf8);
            assert!(matches!(decoded(&m).unwrap(), Cow::Borrowed(_)));
        }
        let mut ascii = msh("ASCII");
        assert!(decoded(&ascii).is_ok());
        ascii.push(0xE9);
        assert_eq!(decoded(&ascii).unwrap_err().0[0].field, "MSH-18");
        assert_eq!(decoded(&msh("ISO IR87")).unwrap_err().0[0].field, "MSH-18");
    }
}
