//! Deserialization helpers that keep file contents out of error messages.
//!
//! serde's stock messages quote the offending value (`invalid type: string "hunter2",
//! expected u32`); a policy file pointed at the wrong path (a private key, say) must not have
//! its contents copied into logs that way. This module owns the visitor used for text leaves
//! (names, roles, requester ids) and the scrubber applied to every message the TOML
//! deserializer returns. It does not know the policy schema.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Visitor};

/// Visits a string leaf with `parse`, and answers every other type with a message that names
/// the type but not the value.
pub(crate) struct TextVisitor<T, F> {
    expecting: &'static str,
    parse: F,
    _out: PhantomData<fn() -> T>,
}

impl<T, F> TextVisitor<T, F>
where
    F: FnOnce(&str) -> Result<T, String>,
{
    /// `expecting` completes "expected ..."; `parse` returns a message free of the input.
    pub(crate) fn new(expecting: &'static str, parse: F) -> Self {
        Self { expecting, parse, _out: PhantomData }
    }

    fn wrong<E: de::Error>(self, kind: &str) -> Result<T, E> {
        Err(E::custom(format_args!("invalid type: {kind}, expected {}", self.expecting)))
    }
}

impl<'de, T, F> Visitor<'de> for TextVisitor<T, F>
where
    F: FnOnce(&str) -> Result<T, String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        self.wrong("boolean")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        self.wrong("integer")
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        self.wrong("integer")
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<T, E> {
        self.wrong("integer")
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<T, E> {
        self.wrong("integer")
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        self.wrong("floating point")
    }
}

/// The kinds serde's `Unexpected` prints before the quoted value, longest first so that
/// "unit variant" wins over "unit value".
const UNEXPECTED_KINDS: &[&str] = &[
    "floating point",
    "newtype variant",
    "newtype struct",
    "struct variant",
    "tuple variant",
    "unit variant",
    "unit value",
    "Option value",
    "byte array",
    "character",
    "boolean",
    "integer",
    "sequence",
    "string",
    "enum",
    "map",
];

/// Rewrites serde's standard messages so they name the kind of a bad value but not the value:
/// `invalid type: string "x", expected u32` becomes `invalid type: string, expected u32`,
/// `unknown variant `x`, expected ...` becomes `unknown variant, expected ...`. Keys
/// (`unknown field `x``) are kept: the key is what the reader must fix. Messages of any
/// other shape come from the TOML parser or this crate and carry no values.
pub(crate) fn scrub(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let kind = UNEXPECTED_KINDS.iter().find(|k| rest.starts_with(*k)).copied().unwrap_or("value");
            // The expectation comes from our types, never from input, so the last
            // ", expected " is the real separator even if the value contained one.
            return match rest.rsplit_once(", expected ") {
                Some((_, expected)) => format!("{prefix}{kind}, expected {expected}"),
                None => format!("{prefix}{kind}"),
            };
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return match rest.rsplit_once(", expected ") {
            Some((_, expected)) => format!("unknown variant, expected {expected}"),
            None => "unknown variant".to_owned(),
        };
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_drops_values_and_keeps_keys() {
        assert_eq!(scrub(r#"invalid type: string "hunter2", expected u32"#), "invalid type: string, expected u32");
        assert_eq!(scrub("invalid value: integer `-1`, expected u32"), "invalid value: integer, expected u32");
        assert_eq!(
            scrub(r#"invalid type: string "a, expected b", expected a sequence"#),
            "invalid type: string, expected a sequence"
        );
        assert_eq!(
            scrub("unknown variant `root`, expected one of `a`, `b`"),
            "unknown variant, expected one of `a`, `b`"
        );
        assert_eq!(scrub("unknown field `maxx`, expected `max`"), "unknown field `maxx`, expected `max`");
        assert_eq!(scrub("missing field `name`"), "missing field `name`");
    }
}
