//! A document as a tree of JSON values that borrow their text from it:
//! what the unread walk, the status checks and the typed reads look at.
//!
//! `serde_json::Value` would do, but it copies every key and string and
//! keeps each object in a hashed map (the crate's `preserve_order` feature):
//! for a resource read once and looked at a few times, that was most of the
//! cost of reading a FHIR document. Objects here keep their members in
//! document order, so what is listed is listed in the order it was written.

use std::borrow::Cow;
use std::fmt;

#[cfg(test)]
use serde::de::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    Object(Map<'a>),
}

/// A number as `serde_json` read it: a non-negative integer, a negative
/// one, or any other (kept so that a typed read of the tree takes it
/// exactly as a typed read of the text would).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Number {
    PosInt(u64),
    NegInt(i64),
    Float(f64),
}

/// An object's members in document order. FHIR JSON names each member once
/// (the document is refused otherwise); should a key repeat, the last wins,
/// as in `serde_json`.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Map<'a>(pub(super) Vec<(Cow<'a, str>, Value<'a>)>);

impl<'a> Map<'a> {
    pub(super) fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Value<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_ref())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> Value<'a> {
    /// The resource (or any JSON value) `json` holds, or `None` when it is
    /// not JSON (the FHIR JSON rules unchecked: for tests).
    #[cfg(test)]
    pub(super) fn parse(json: &'a str) -> Option<Self> {
        serde_json::from_str(json).ok()
    }

    /// Member `key` of an object.
    pub(super) fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.as_object()?.get(key)
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn as_array(&self) -> Option<&[Value<'a>]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }

    pub(super) fn as_object(&self) -> Option<&Map<'a>> {
        match self {
            Self::Object(map) => Some(map),
            _ => None,
        }
    }

    pub(super) fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }
}

/// The resource of each entry of the Bundle `bundle`, in order (None for an
/// entry without one).
pub(super) fn resources<'t, 'a>(
    bundle: &'t Value<'a>,
) -> impl Iterator<Item = Option<&'t Value<'a>>> {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .map(|e| e.get("resource"))
}

#[cfg(test)]
impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
struct ValueVisitor;

#[cfg(test)]
impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Value::Number(Number::int(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Value::Number(Number::PosInt(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Value::Number(Number::Float(v)))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Value::String(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Value::String(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Value::String(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(key) = map.next_key_seed(Key)? {
            members.push((key, map.next_value()?));
        }
        Ok(Value::Object(Map(members)))
    }
}

/// An object's key, borrowed from the document unless it holds an escape.
pub(super) struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

impl Number {
    /// An integer `serde_json` handed over as `i64` (it does so only for a
    /// negative one).
    pub(super) fn int(v: i64) -> Self {
        u64::try_from(v).map_or(Self::NegInt(v), Self::PosInt)
    }
}

/// A typed read of a tree: the same visits, in the same order, that
/// `serde_json` makes reading the text the tree was built from (a struct
/// written as an array is read by position, as `serde_json` does; an
/// array or object with members left over is an error, as there), so a
/// type reads the same from either. Errors carry serde's own messages.
impl<'de> Deserializer<'de> for &Value<'de> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(Number::PosInt(n)) => visitor.visit_u64(*n),
            Value::Number(Number::NegInt(n)) => visitor.visit_i64(*n),
            Value::Number(Number::Float(n)) => visitor.visit_f64(*n),
            Value::String(Cow::Borrowed(s)) => visitor.visit_borrowed_str(s),
            Value::String(Cow::Owned(s)) => visitor.visit_str(s),
            Value::Array(items) => {
                let mut seq = Items(items.iter());
                let v = visitor.visit_seq(&mut seq)?;
                match seq.0.len() {
                    0 => Ok(v),
                    _ => Err(de::Error::invalid_length(items.len(), &"fewer items")),
                }
            }
            Value::Object(map) => {
                let mut members = Members {
                    iter: map.0.iter(),
                    value: None,
                };
                let v = visitor.visit_map(&mut members)?;
                match members.iter.len() {
                    0 => Ok(v),
                    _ => Err(de::Error::invalid_length(map.0.len(), &"fewer members")),
                }
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self {
            Value::String(Cow::Borrowed(s)) => {
                visitor.visit_enum(de::value::BorrowedStrDeserializer::new(s))
            }
            Value::String(Cow::Owned(s)) => visitor.visit_enum(de::value::StrDeserializer::new(s)),
            _ => Err(de::Error::invalid_type(
                self.unexpected(),
                &"a variant name",
            )),
        }
    }

    /// What is not read is not walked (the text had to be).
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

impl Value<'_> {
    fn unexpected(&self) -> de::Unexpected<'_> {
        match self {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Number(Number::PosInt(n)) => de::Unexpected::Unsigned(*n),
            Value::Number(Number::NegInt(n)) => de::Unexpected::Signed(*n),
            Value::Number(Number::Float(n)) => de::Unexpected::Float(*n),
            Value::String(s) => de::Unexpected::Str(s),
            Value::Array(_) => de::Unexpected::Seq,
            Value::Object(_) => de::Unexpected::Map,
        }
    }
}

struct Items<'t, 'de>(std::slice::Iter<'t, Value<'de>>);

impl<'de> SeqAccess<'de> for &mut Items<'_, 'de> {
    type Error = de::value::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0.next().map(|v| seed.deserialize(v)).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Members<'t, 'de> {
    iter: std::slice::Iter<'t, (Cow<'de, str>, Value<'de>)>,
    value: Option<&'t Value<'de>>,
}

impl<'de> MapAccess<'de> for &mut Members<'_, 'de> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        match key {
            Cow::Borrowed(k) => seed.deserialize(de::value::BorrowedStrDeserializer::new(k)),
            Cow::Owned(k) => seed.deserialize(de::value::StrDeserializer::new(k)),
        }
        .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value.take() {
            Some(v) => seed.deserialize(v),
            None => Err(de::Error::custom("a value asked for before its key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_and_strings_borrow_unless_escaped() {
        let json = r#"{"b":"x","a":[1,true,null,"y\n"],"c":{"d":"e"}}"#;
        let v = Value::parse(json).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["b", "a", "c"]);
        assert!(matches!(
            v.get("b"),
            Some(Value::String(Cow::Borrowed("x")))
        ));
        let a = v.get("a").and_then(Value::as_array).unwrap();
        assert_eq!(
            a,
            [
                Value::Number(Number::PosInt(1)),
                Value::Bool(true),
                Value::Null,
                Value::String(Cow::Owned("y\n".into()))
            ]
        );
        assert_eq!(
            v.get("c").and_then(|c| c.get("d")).and_then(Value::as_str),
            Some("e")
        );
        assert!(Value::parse("{").is_none());
    }
}
