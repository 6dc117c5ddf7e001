//! Sizes with their unit in the type: [`ByteSize`] parses and prints `512MiB`, `2GiB`, `2G`,
//! or a plain number of bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::yaml::Node;
use crate::yaml::reader::Reader;

/// A number of bytes. Written in recipes as `2GiB`, `512MiB`, `2G` (QEMU's convention:
/// `K`, `M`, `G`, `T` are powers of 1024, as in `qemu-system -m 2G` and `qemu-img create … 8G`),
/// or a plain integer (bytes). Shown as the largest unit that divides it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Units as written, lower-cased, and their size. `b` is for `512B`-style byte counts.
const UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("k", KIB),
    ("kib", KIB),
    ("m", MIB),
    ("mib", MIB),
    ("g", GIB),
    ("gib", GIB),
    ("t", TIB),
    ("tib", TIB),
];

/// Spellings shown in messages.
pub const UNIT_NAMES: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB", "K", "M", "G", "T"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    /// The text is empty.
    #[error("a size cannot be empty")]
    Empty,
    /// No digits in front of the unit.
    #[error("`{0}` is not a size; expected a number with a unit such as `2GiB` or `512MiB`")]
    NotANumber(String),
    /// A decimal fraction (`1.5GiB`): sizes are whole numbers of their unit.
    #[error("`{0}` is not a whole number of its unit")]
    Fraction(String),
    /// `KB`, `MB`, `GB`, `TB`: could mean powers of 1000 or of 1024.
    #[error("unit `{unit}` in `{text}` is ambiguous (powers of 1000 or of 1024?)")]
    Ambiguous { text: String, unit: String },
    /// A unit that is not one of [`UNIT_NAMES`].
    #[error("unknown unit `{unit}` in `{text}`")]
    UnknownUnit { text: String, unit: String },
    /// More than 2⁶⁴ − 1 bytes.
    #[error("`{0}` is too large")]
    Overflow(String),
}

impl ByteSizeError {
    /// How to write it instead.
    pub fn hint(&self) -> Option<String> {
        match self {
            ByteSizeError::Fraction(_) => {
                Some("use a smaller unit, e.g. `1536MiB` instead of `1.5GiB`".to_string())
            }
            ByteSizeError::Ambiguous { text, unit } => {
                let number = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                let binary = format!("{}iB", &unit[..1]);
                Some(format!(
                    "write `{number}{binary}` for {number} × 1024^n bytes, or the exact number of bytes"
                ))
            }
            ByteSizeError::UnknownUnit { .. } | ByteSizeError::NotANumber(_) => Some(format!(
                "units: {}",
                crate::diagnostic::one_of(&UNIT_NAMES[..5])
            )),
            _ => None,
        }
    }
}

impl ByteSize {
    pub const fn b(bytes: u64) -> ByteSize {
        ByteSize(bytes)
    }
    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n * MIB)
    }
    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n * GIB)
    }
    pub const fn bytes(self) -> u64 {
        self.0
    }
    /// Whole MiB, rounded down (QEMU's `-m` takes MiB).
    pub const fn whole_mib(self) -> u64 {
        self.0 / MIB
    }

    /// The size a YAML value writes (recipes, the store's configuration): the parser's
    /// message and hint at the value when it is not one.
    pub fn read(cx: &mut Reader<'_>, node: &Node, what: &str) -> Option<ByteSize> {
        let text = cx.string(node, what)?;
        match text.parse::<ByteSize>() {
            Ok(size) => Some(size),
            Err(e) => {
                cx.error(node.span, format!("{what}: {e}"), e.hint());
                None
            }
        }
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(text: &str) -> Result<ByteSize, ByteSizeError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(ByteSizeError::Empty);
        }
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let unit = unit.trim();
        let number = number.replace('_', "");
        if number.is_empty() || !number.bytes().any(|b| b.is_ascii_digit()) {
            return Err(ByteSizeError::NotANumber(text.to_string()));
        }
        if number.contains('.') {
            return Err(ByteSizeError::Fraction(text.to_string()));
        }
        let lower = unit.to_ascii_lowercase();
        let multiplier = if unit.is_empty() {
            1
        } else if let Some((_, m)) = UNITS.iter().find(|(u, _)| *u == lower) {
            *m
        } else if matches!(lower.as_str(), "kb" | "mb" | "gb" | "tb") {
            return Err(ByteSizeError::Ambiguous {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        } else {
            return Err(ByteSizeError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        };
        let value: u64 = number
            .parse()
            .map_err(|_| ByteSizeError::Overflow(text.to_string()))?;
        value
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| ByteSizeError::Overflow(text.to_string()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n != 0 && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    #[test]
    fn parses_binary_units_and_bytes() {
        assert_eq!("2GiB".parse(), Ok(ByteSize::gib(2)));
        assert_eq!("2G".parse(), Ok(ByteSize::gib(2)));
        assert_eq!("2g".parse(), Ok(ByteSize::gib(2)));
        assert_eq!("512MiB".parse(), Ok(ByteSize::mib(512)));
        assert_eq!("512 MiB".parse(), Ok(ByteSize::mib(512)));
        assert_eq!("1048576".parse(), Ok(ByteSize::mib(1)));
        assert_eq!("1_048_576".parse(), Ok(ByteSize::mib(1)));
        assert_eq!("100B".parse(), Ok(ByteSize::b(100)));
        assert_eq!("1T".parse::<ByteSize>().unwrap().bytes(), 1 << 40);
        assert_eq!("4KiB".parse::<ByteSize>().unwrap().bytes(), 4096);
    }

    #[test]
    fn rejects_what_it_cannot_read_exactly() {
        assert_eq!("".parse::<ByteSize>(), Err(ByteSizeError::Empty));
        assert!(matches!(
            "1.5GiB".parse::<ByteSize>(),
            Err(ByteSizeError::Fraction(_))
        ));
        let err = "8GB".parse::<ByteSize>().unwrap_err();
        assert!(matches!(err, ByteSizeError::Ambiguous { .. }));
        assert_eq!(
            err.hint().unwrap(),
            "write `8GiB` for 8 × 1024^n bytes, or the exact number of bytes"
        );
        assert!(matches!(
            "2 pints".parse::<ByteSize>(),
            Err(ByteSizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "GiB".parse::<ByteSize>(),
            Err(ByteSizeError::NotANumber(_))
        ));
        assert!(matches!(
            "99999999999999999999".parse::<ByteSize>(),
            Err(ByteSizeError::Overflow(_))
        ));
        assert!(matches!(
            "16777216T".parse::<ByteSize>(),
            Err(ByteSizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_the_largest_exact_unit_and_round_trips() {
        assert_eq!(ByteSize::gib(2).to_string(), "2GiB");
        assert_eq!(ByteSize::mib(1536).to_string(), "1536MiB");
        assert_eq!(ByteSize::b(1000).to_string(), "1000B");
        assert_eq!(ByteSize::b(0).to_string(), "0B");
        for text in ["2GiB", "1536MiB", "1000B", "3KiB", "5TiB", "0B"] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.to_string(), text);
        }
        let json = serde_json::to_string(&ByteSize::gib(8)).unwrap();
        assert_eq!(json, "\"8GiB\"");
        assert_eq!(
            serde_json::from_str::<ByteSize>(&json).unwrap(),
            ByteSize::gib(8)
        );
    }

    proptest::proptest! {
        #[test]
        fn display_then_parse_is_identity(n in 0u64..(1 << 50)) {
            let size = ByteSize::b(n);
            proptest::prop_assert_eq!(size.to_string().parse::<ByteSize>(), Ok(size));
        }
    }
}
