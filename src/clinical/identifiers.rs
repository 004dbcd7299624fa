//! Identifiers as types that can only be built valid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier was refused. Never carries the refused value, which may
/// identify a patient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    /// Wrong length or characters.
    #[error("{0}")]
    Format(&'static str),
    /// The NHS number's Modulus 11 check digit does not match.
    #[error("NHS number check digit does not match (Modulus 11)")]
    CheckDigit,
    /// All ten digits the same (passes Modulus 11 for some digits, never issued).
    #[error("NHS number has all digits the same")]
    AllSame,
}

/// A ten-digit NHS number that passed the Modulus 11 check.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber(String);

impl NhsNumber {
    /// The ten digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug output ends up in logs; a patient identifier must not.
        f.write_str("NhsNumber(..)")
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NhsNumber {
    type Err = IdentifierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
        if s.len() != 10 || digits.len() != 10 {
            return Err(IdentifierError::Format(
                "NHS number must be exactly ten digits",
            ));
        }
        if digits.iter().all(|d| *d == digits[0]) {
            return Err(IdentifierError::AllSame);
        }
        let sum: u32 = digits[..9]
            .iter()
            .zip((2..=10).rev())
            .map(|(d, w)| d * w)
            .sum();
        let check = match 11 - sum % 11 {
            11 => 0,
            10 => return Err(IdentifierError::CheckDigit),
            c => c,
        };
        if check != digits[9] {
            return Err(IdentifierError::CheckDigit);
        }
        Ok(Self(s.to_owned()))
    }
}

/// An Organisation Data Service code: 3 to 10 upper-case letters and digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OdsCode(String);

impl OdsCode {
    /// The code.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for OdsCode {
    type Err = IdentifierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(3..=10).contains(&s.len())
            || !s
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err(IdentifierError::Format(
                "ODS code must be 3 to 10 upper-case letters or digits",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A prison number: a letter, four digits, two letters (`A1234BC`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrisonNumber(String);

impl PrisonNumber {
    /// The prison number.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrisonNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrisonNumber(..)")
    }
}

impl FromStr for PrisonNumber {
    type Err = IdentifierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = b.len() == 7
            && b[0].is_ascii_uppercase()
            && b[1..5].iter().all(u8::is_ascii_digit)
            && b[5..].iter().all(u8::is_ascii_uppercase);
        if !ok {
            return Err(IdentifierError::Format(
                "prison number must be a letter, four digits and two letters (A1234BC)",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A probation case reference number: a letter and six digits (`X123456`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Crn(String);

impl Crn {
    /// The reference.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Crn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Crn(..)")
    }
}

impl FromStr for Crn {
    type Err = IdentifierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.len() != 7 || !b[0].is_ascii_uppercase() || !b[1..].iter().all(u8::is_ascii_digit) {
            return Err(IdentifierError::Format(
                "CRN must be a letter and six digits (X123456)",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_via_str!(NhsNumber, OdsCode, PrisonNumber, Crn);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhs_numbers_follow_modulus_11() {
        assert!("9990000018".parse::<NhsNumber>().is_ok());
        assert_eq!(
            "9990000017".parse::<NhsNumber>(),
            Err(IdentifierError::CheckDigit)
        );
        assert_eq!(
            "0000000000".parse::<NhsNumber>(),
            Err(IdentifierError::AllSame)
        );
        assert!("999000001".parse::<NhsNumber>().is_err());
        assert!("99900000a8".parse::<NhsNumber>().is_err());
        assert!(" 990000018".parse::<NhsNumber>().is_err());
        assert_eq!(
            format!("{:?}", "9990000018".parse::<NhsNumber>().unwrap()),
            "NhsNumber(..)"
        );
    }

    #[test]
    fn ods_and_prison_numbers() {
        assert!("YP001".parse::<OdsCode>().is_ok());
        assert!("yp001".parse::<OdsCode>().is_err());
        assert!("A1234BC".parse::<PrisonNumber>().is_ok());
        assert!("A1234B".parse::<PrisonNumber>().is_err());
        assert!("X123456".parse::<Crn>().is_ok());
        assert!("X12345".parse::<Crn>().is_err());
    }
}
