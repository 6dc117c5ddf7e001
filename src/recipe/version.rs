//! Semantic versions as Image Builder uses them: a recipe's `major.minor.patch`, and version
//! patterns with `x` wildcards for picking a previous build from the store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Image Builder's limit for each version node: 2³⁰ − 1.
pub const MAX_NODE: u32 = (1 << 30) - 1;

/// `major.minor.patch`, each 0 … 1073741823, written without leading zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// Not three dot-separated parts.
    #[error("version `{0}` must have three numbers: major.minor.patch")]
    Shape(String),
    /// A part that is not a number (or `x` where wildcards are allowed).
    #[error("`{part}` in version `{text}` is not a number")]
    NotANumber { text: String, part: String },
    /// `01`: two spellings of one version would be two store entries.
    #[error("`{part}` in version `{text}` has a leading zero")]
    LeadingZero { text: String, part: String },
    /// Larger than [`MAX_NODE`].
    #[error("`{part}` in version `{text}` is larger than {MAX_NODE}")]
    TooLarge { text: String, part: String },
    /// `x.2.x`, `1.x.8`: Image Builder's rule is that once a node is `x`, all to its right are.
    #[error("wildcard version `{0}` has a number after an `x`")]
    WildcardOrder(String),
    /// A `/build` suffix after a wildcard.
    #[error("version `{0}` names a build number of a wildcard version")]
    WildcardBuild(String),
}

impl VersionError {
    pub fn hint(&self) -> Option<String> {
        match self {
            VersionError::Shape(text) => {
                let parts: Vec<&str> = text.split('.').filter(|p| !p.is_empty()).collect();
                let mut fixed: Vec<&str> = parts.iter().take(3).copied().collect();
                while fixed.len() < 3 {
                    fixed.push("0");
                }
                Some(format!(
                    "write all three parts, e.g. `{}` (quote it if YAML reads it as a number)",
                    fixed.join(".")
                ))
            }
            VersionError::LeadingZero { text, .. } => Some(format!(
                "write `{}`",
                text.split('.')
                    .map(|p| p.trim_start_matches('0'))
                    .map(|p| if p.is_empty() { "0" } else { p })
                    .collect::<Vec<_>>()
                    .join(".")
            )),
            VersionError::WildcardOrder(_) => Some(
                "once a part is `x`, every part after it must be `x` too: `1.x.x`, `1.2.x` or `x.x.x`"
                    .to_string(),
            ),
            VersionError::WildcardBuild(_) => {
                Some("a build number (`/3`) needs an exact version: `1.2.0/3`".to_string())
            }
            _ => None,
        }
    }
}

fn node(text: &str, part: &str) -> Result<u32, VersionError> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VersionError::NotANumber {
            text: text.to_string(),
            part: part.to_string(),
        });
    }
    if part.len() > 1 && part.starts_with('0') {
        return Err(VersionError::LeadingZero {
            text: text.to_string(),
            part: part.to_string(),
        });
    }
    match part.parse::<u32>() {
        Ok(n) if n <= MAX_NODE => Ok(n),
        _ => Err(VersionError::TooLarge {
            text: text.to_string(),
            part: part.to_string(),
        }),
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<Version, VersionError> {
        let parts: Vec<&str> = text.split('.').collect();
        let [major, minor, patch] = parts.as_slice() else {
            return Err(VersionError::Shape(text.to_string()));
        };
        Ok(Version {
            major: node(text, major)?,
            minor: node(text, minor)?,
            patch: node(text, patch)?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Version, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which versions of a stored image a reference accepts: `1.2.3`, `1.2.x`, `1.x.x`, `x.x.x`
/// (`None` is `x`), optionally an exact build `1.2.3/4`. Invariant: a `None` node is followed
/// only by `None` nodes, and `build` is set only when all three nodes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionPattern {
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub patch: Option<u32>,
    pub build: Option<u32>,
}

impl VersionPattern {
    /// `x.x.x`: every version.
    pub const ANY: VersionPattern = VersionPattern {
        major: None,
        minor: None,
        patch: None,
        build: None,
    };

    /// Whether `version` (with its build number) is selected by this pattern.
    pub fn matches(&self, version: Version, build: u32) -> bool {
        self.major.is_none_or(|m| m == version.major)
            && self.minor.is_none_or(|m| m == version.minor)
            && self.patch.is_none_or(|p| p == version.patch)
            && self.build.is_none_or(|b| b == build)
    }

    /// The exact version, when there is no wildcard.
    pub fn exact(&self) -> Option<Version> {
        Some(Version {
            major: self.major?,
            minor: self.minor?,
            patch: self.patch?,
        })
    }
}

impl FromStr for VersionPattern {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<VersionPattern, VersionError> {
        let (version, build) = match text.split_once('/') {
            Some((v, b)) => (v, Some(b)),
            None => (text, None),
        };
        let parts: Vec<&str> = version.split('.').collect();
        if parts.len() != 3 {
            return Err(VersionError::Shape(text.to_string()));
        }
        let mut nodes = [None; 3];
        let mut seen_wildcard = false;
        for (slot, part) in nodes.iter_mut().zip(&parts) {
            if part.eq_ignore_ascii_case("x") || *part == "*" {
                seen_wildcard = true;
                continue;
            }
            let n = node(text, part)?;
            if seen_wildcard {
                return Err(VersionError::WildcardOrder(text.to_string()));
            }
            *slot = Some(n);
        }
        let build = match build {
            None => None,
            Some(_) if seen_wildcard => return Err(VersionError::WildcardBuild(text.to_string())),
            Some(b) => {
                let n = node(text, b)?;
                if n == 0 {
                    return Err(VersionError::NotANumber {
                        text: text.to_string(),
                        part: b.to_string(),
                    });
                }
                Some(n)
            }
        };
        Ok(VersionPattern {
            major: nodes[0],
            minor: nodes[1],
            patch: nodes[2],
            build,
        })
    }
}

impl fmt::Display for VersionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |n: Option<u32>| n.map_or_else(|| "x".to_string(), |n| n.to_string());
        write!(
            f,
            "{}.{}.{}",
            show(self.major),
            show(self.minor),
            show(self.patch)
        )?;
        if let Some(build) = self.build {
            write!(f, "/{build}")?;
        }
        Ok(())
    }
}

impl Serialize for VersionPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VersionPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<VersionPattern, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        text.parse().unwrap()
    }

    #[test]
    fn versions_parse_order_and_print() {
        assert_eq!(
            v("1.2.3"),
            Version {
                major: 1,
                minor: 2,
                patch: 3
            }
        );
        assert!(v("1.10.0") > v("1.9.9"));
        assert_eq!(v("0.0.0").to_string(), "0.0.0");
        assert_eq!(v("1073741823.0.0").major, MAX_NODE);
    }

    #[test]
    fn bad_versions_say_why() {
        assert!(matches!(
            "1.2".parse::<Version>(),
            Err(VersionError::Shape(_))
        ));
        assert_eq!(
            VersionError::Shape("1.2".into()).hint().unwrap(),
            "write all three parts, e.g. `1.2.0` (quote it if YAML reads it as a number)"
        );
        assert!(matches!(
            "1.x.0".parse::<Version>(),
            Err(VersionError::NotANumber { .. })
        ));
        let zero = "1.02.0".parse::<Version>().unwrap_err();
        assert_eq!(zero.hint().unwrap(), "write `1.2.0`");
        assert!(matches!(
            "1073741824.0.0".parse::<Version>(),
            Err(VersionError::TooLarge { .. })
        ));
        assert!(matches!(
            "-1.0.0".parse::<Version>(),
            Err(VersionError::NotANumber { .. })
        ));
    }

    #[test]
    fn wildcards_follow_image_builders_rule() {
        for ok in ["1.2.3", "1.2.x", "1.x.x", "x.x.x", "1.2.3/4", "1.X.X"] {
            assert!(ok.parse::<VersionPattern>().is_ok(), "{ok}");
        }
        for bad in ["x.2.x", "1.x.8", "x.x.1"] {
            assert!(
                matches!(
                    bad.parse::<VersionPattern>(),
                    Err(VersionError::WildcardOrder(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            "1.x.x/2".parse::<VersionPattern>(),
            Err(VersionError::WildcardBuild(_))
        ));
        assert!("1.2.3/0".parse::<VersionPattern>().is_err());
        assert!("1.x".parse::<VersionPattern>().is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips(text in "[0-9x./]{0,14}") {
            if let Ok(v) = text.parse::<Version>() {
                proptest::prop_assert_eq!(v.to_string(), text.clone());
            }
            if let Ok(p) = text.parse::<VersionPattern>() {
                proptest::prop_assert_eq!(p.to_string().parse::<VersionPattern>(), Ok(p));
            }
        }
    }

    #[test]
    fn patterns_select_versions() {
        let p: VersionPattern = "1.x.x".parse().unwrap();
        assert!(p.matches(v("1.0.0"), 1));
        assert!(p.matches(v("1.9.3"), 7));
        assert!(!p.matches(v("2.0.0"), 1));
        let exact: VersionPattern = "1.2.3/4".parse().unwrap();
        assert!(exact.matches(v("1.2.3"), 4));
        assert!(!exact.matches(v("1.2.3"), 3));
        assert_eq!(exact.exact(), Some(v("1.2.3")));
        assert_eq!(p.exact(), None);
        assert_eq!(p.to_string(), "1.x.x");
        assert_eq!(exact.to_string(), "1.2.3/4");
        let all: VersionPattern = "x.x.x".parse().unwrap();
        assert!(all.matches(v("7.7.7"), 1));
    }
}
