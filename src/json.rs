//! Strict JSON serialization of event payloads.
//!
//! `serde_json` quietly writes `NaN` and infinities as `null` and turns integer
//! map keys into strings. An outbox must never change what the app meant to
//! send, so payloads first go through [`Check`], a serializer that produces
//! nothing and fails on anything JSON cannot represent faithfully; only then are
//! they written by `serde_json`.

use std::fmt::{self, Display};

use serde::ser::{self, Serialize};

/// Serialize `value` to JSON text, refusing non-finite floats and non-string
/// map keys, and passing on any error raised by the value's `Serialize` impl.
pub(crate) fn to_json_strict<T: Serialize + ?Sized>(value: &T) -> Result<String, String> {
    value.serialize(Check).map_err(|e| e.0)?;
    serde_json::to_string(value).map_err(|e| e.to_string())
}

/// Why a value was refused.
#[derive(Debug)]
struct Refused(String);

impl Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl ser::Error for Refused {
    fn custom<T: Display>(msg: T) -> Self {
        Refused(msg.to_string())
    }
}

type R = Result<(), Refused>;

/// The checking serializer: walks the value, writes nothing.
struct Check;

fn finite(v: f64) -> R {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Refused(format!(
            "the number {v} has no JSON representation"
        )))
    }
}

impl ser::Serializer for Check {
    type Ok = ();
    type Error = Refused;
    type SerializeSeq = Check;
    type SerializeTuple = Check;
    type SerializeTupleStruct = Check;
    type SerializeTupleVariant = Check;
    type SerializeMap = Check;
    type SerializeStruct = Check;
    type SerializeStructVariant = Check;

    fn serialize_bool(self, _: bool) -> R {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> R {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> R {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> R {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> R {
        Ok(())
    }
    fn serialize_i128(self, _: i128) -> R {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> R {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> R {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> R {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> R {
        Ok(())
    }
    fn serialize_u128(self, _: u128) -> R {
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> R {
        finite(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> R {
        finite(v)
    }
    fn serialize_char(self, _: char) -> R {
        Ok(())
    }
    fn serialize_str(self, _: &str) -> R {
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> R {
        Ok(())
    }
    fn serialize_none(self) -> R {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> R {
        v.serialize(Check)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R {
        v.serialize(Check)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> R {
        v.serialize(Check)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Check, Refused> {
        Ok(Check)
    }
    fn serialize_tuple(self, _: usize) -> Result<Check, Refused> {
        Ok(Check)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Check, Refused> {
        Ok(Check)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Check, Refused> {
        Ok(Check)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Check, Refused> {
        Ok(Check)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Check, Refused> {
        Ok(Check)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Check, Refused> {
        Ok(Check)
    }
}

impl ser::SerializeSeq for Check {
    type Ok = ();
    type Error = Refused;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Check)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTuple for Check {
    type Ok = ();
    type Error = Refused;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Check)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for Check {
    type Ok = ();
    type Error = Refused;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Check)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for Check {
    type Ok = ();
    type Error = Refused;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Check)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeMap for Check {
    type Ok = ();
    type Error = Refused;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> R {
        k.serialize(KeyCheck)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Check)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStruct for Check {
    type Ok = ();
    type Error = Refused;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(Check)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Check {
    type Ok = ();
    type Error = Refused;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(Check)
    }
    fn end(self) -> R {
        Ok(())
    }
}

/// Map keys must be strings (or things serde writes as strings: chars, unit
/// variants, newtypes around those).
struct KeyCheck;

fn not_a_string_key(what: &str) -> R {
    Err(Refused(format!(
        "a map key is {what}; JSON object keys must be strings"
    )))
}

impl ser::Serializer for KeyCheck {
    type Ok = ();
    type Error = Refused;
    type SerializeSeq = ser::Impossible<(), Refused>;
    type SerializeTuple = ser::Impossible<(), Refused>;
    type SerializeTupleStruct = ser::Impossible<(), Refused>;
    type SerializeTupleVariant = ser::Impossible<(), Refused>;
    type SerializeMap = ser::Impossible<(), Refused>;
    type SerializeStruct = ser::Impossible<(), Refused>;
    type SerializeStructVariant = ser::Impossible<(), Refused>;

    fn serialize_str(self, _: &str) -> R {
        Ok(())
    }
    fn serialize_char(self, _: char) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R {
        v.serialize(KeyCheck)
    }
    fn serialize_bool(self, _: bool) -> R {
        not_a_string_key("a bool")
    }
    fn serialize_i8(self, _: i8) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_i16(self, _: i16) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_i32(self, _: i32) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_i64(self, _: i64) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_u8(self, _: u8) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_u16(self, _: u16) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_u32(self, _: u32) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_u64(self, _: u64) -> R {
        not_a_string_key("an integer")
    }
    fn serialize_f32(self, _: f32) -> R {
        not_a_string_key("a float")
    }
    fn serialize_f64(self, _: f64) -> R {
        not_a_string_key("a float")
    }
    fn serialize_bytes(self, _: &[u8]) -> R {
        not_a_string_key("a byte string")
    }
    fn serialize_none(self) -> R {
        not_a_string_key("None")
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> R {
        not_a_string_key("an Option")
    }
    fn serialize_unit(self) -> R {
        not_a_string_key("()")
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        not_a_string_key("a unit struct")
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> R {
        not_a_string_key("an enum with data")
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Refused> {
        Err(Refused(
            "a map key is a sequence; JSON object keys must be strings".into(),
        ))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Refused> {
        Err(Refused(
            "a map key is a tuple; JSON object keys must be strings".into(),
        ))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Refused> {
        Err(Refused(
            "a map key is a tuple struct; JSON object keys must be strings".into(),
        ))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Refused> {
        Err(Refused(
            "a map key is an enum with data; JSON object keys must be strings".into(),
        ))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Refused> {
        Err(Refused(
            "a map key is a map; JSON object keys must be strings".into(),
        ))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Refused> {
        Err(Refused(
            "a map key is a struct; JSON object keys must be strings".into(),
        ))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Refused> {
        Err(Refused(
            "a map key is an enum with data; JSON object keys must be strings".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::to_json_strict;

    #[test]
    fn accepts_ordinary_values() {
        let mut m = BTreeMap::new();
        m.insert("a", vec![1.5, 2.0]);
        assert_eq!(to_json_strict(&m).unwrap(), r#"{"a":[1.5,2.0]}"#);
    }

    #[test]
    fn refuses_nan_infinity_and_non_string_keys() {
        assert!(to_json_strict(&f64::NAN).unwrap_err().contains("NaN"));
        assert!(to_json_strict(&vec![f32::INFINITY]).is_err());
        let m: HashMap<i32, &str> = [(1, "x")].into();
        assert!(
            to_json_strict(&m)
                .unwrap_err()
                .contains("keys must be strings")
        );
    }
}
