//! Enumerated hardware fields: a field of a register, table entry or descriptor that holds a
//! small integer of which only some values are defined, each with a meaning (a delivery
//! mode, a translation type, a fault reason code).
//!
//! [`field_enum!`] declares such a field once, as a list of named values with their
//! encodings, and derives the encoder, the decoder (which refuses the encodings the spec
//! reserves) and the list of every value, so no value is written twice. The field's bit
//! position stays with the format that holds it.

/// Declares an enum whose discriminants are a hardware field's encodings.
///
/// ```ignore
/// field_enum! {
///     /// Delivery mode (IRTE `DLM[7:5]`).
///     pub enum DeliveryMode(u8; to_bits, from_bits) {
///         /// 000b: deliver the vector to the destination.
///         Fixed = 0,
///         /// 001b: ...
///         LowestPriority = 1,
///     }
/// }
/// ```
///
/// The enum derives `Clone, Copy, PartialEq, Eq, Hash, Debug` (add more with `#[derive]`) and is
/// `repr(u8)`. The parenthesis names the field's raw type (what its decoder reads) and the
/// encoder and decoder, so each field keeps the spec's vocabulary (`FaultReason::code`):
/// - `ALL`: every value, in declaration order;
/// - `to_bits(self) -> raw`: the encoding;
/// - `from_bits(raw) -> Option<Self>`: the value, or `None` for a reserved encoding.
///
/// With `=> "name"` after every value it also derives `name(self) -> &'static str`: a short,
/// stable, lowercase name (metric label values, logs).
macro_rules! field_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($raw:ty; $to:ident, $from:ident) {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal ),+ $(,)?
        }
    ) => {
        $crate::unit::field::field_enum! {
            $(#[$meta])*
            $vis enum $name($raw; $to, $from) {
                $( $(#[$vmeta])* $variant = $value ),+
            }
        }

        impl $name {
            /// Short, stable, lowercase name (metric label values, logs).
            $vis const fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $label ),+
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($raw:ty; $to:ident, $from:ident) {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        #[repr(u8)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value ),+
        }

        impl $name {
            /// Every value, in declaration order.
            $vis const ALL: [Self; [$(stringify!($variant)),+].len()] = [$(Self::$variant),+];

            /// The encoding.
            #[inline]
            $vis const fn $to(self) -> $raw {
                self as $raw
            }

            /// The value `bits` encodes, or `None` for an encoding the spec reserves.
            #[inline]
            $vis const fn $from(bits: $raw) -> Option<Self> {
                match bits {
                    $( $value => Some(Self::$variant), )+
                    _ => None,
                }
            }
        }
    };
}

pub(crate) use field_enum;

#[cfg(test)]
mod tests {
    field_enum! {
        /// A test field.
        enum Sample(u64; to_bits, from_bits) {
            /// One.
            One = 1,
            /// Five.
            Five = 5,
        }
    }

    field_enum! {
        /// A named test field.
        enum Named(u8; code, from_code) {
            /// Two.
            Two = 2 => "two",
        }
    }

    #[test]
    fn encodings_round_trip_and_reserved_ones_decode_to_none() {
        for v in Sample::ALL {
            assert_eq!(Sample::from_bits(v.to_bits()), Some(v));
        }
        assert_eq!(Sample::ALL, [Sample::One, Sample::Five]);
        assert_eq!(Sample::from_bits(0), None);
        assert_eq!(Sample::from_bits(2), None);
        assert_eq!(Named::from_code(2).map(Named::name), Some("two"));
        assert_eq!(Named::Two.code(), 2);
        assert_eq!(Named::ALL, [Named::Two]);
    }
}
