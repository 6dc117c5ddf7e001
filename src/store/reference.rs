//! Image names and references: `name`, `name/1.x.x`, `name/1.2.0`, `name/1.2.0/3`. The
//! versions in them are the recipe's [`Version`] and [`VersionPattern`]. Pure: parsing and
//! matching only.

use std::fmt;

use super::StoreError;
use crate::recipe::{Version, VersionError, VersionPattern};

/// Check an image name: letters, digits, `.`, `_`, `-`; starts with a letter or digit; at
/// most 128 bytes. It becomes a folder name in the store and part of file names.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::BadName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > 128 {
        return Err(bad("it is longer than 128 bytes"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("it must start with a letter or a digit"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(bad(&format!(
            "`{c}` is not allowed (letters, digits, `.`, `_` and `-` are)"
        )));
    }
    Ok(())
}

/// A reference to stored builds: `name`, `name/1.x.x`, `name/1.2.0`, `name/1.2.0/3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    /// `x.x.x` for a bare name; carries the build number of `name/x.y.z/n`.
    pub version: VersionPattern,
}

impl ImageRef {
    /// Whether the reference names exactly one build (`name/x.y.z/n`).
    pub fn is_exact(&self) -> bool {
        self.version.build.is_some()
    }

    pub fn matches(&self, name: &str, version: &Version, build: u32) -> bool {
        self.name == name && self.version.matches(*version, build)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if self.version != VersionPattern::ANY {
            write!(f, "/{}", self.version)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadReference {
            reference: s.to_string(),
            reason,
        };
        let (name, version) = match s.split_once('/') {
            Some((name, version)) => (name, Some(version)),
            None => (s, None),
        };
        check_name(name).map_err(|e| bad(e.to_string()))?;
        let version = match version {
            None => VersionPattern::ANY,
            Some(v) => v.parse().map_err(|e: VersionError| bad(e.to_string()))?,
        };
        Ok(ImageRef {
            name: name.to_string(),
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        s.parse().expect(s)
    }

    #[test]
    fn references_parse_with_wildcards_only_to_the_right() {
        assert_eq!(r("web").version, VersionPattern::ANY);
        let p = r("web/1.x.x");
        assert_eq!(p.version.major, Some(1));
        assert!(p.matches("web", &"1.7.2".parse().expect("ok"), 1));
        assert!(!p.matches("web", &"2.0.0".parse().expect("ok"), 1));
        assert_eq!(r("web/1.2.0/3").version.build, Some(3));
        assert_eq!(r("web/1.2.0/3").to_string(), "web/1.2.0/3");
        assert_eq!(r("web/1.x.x").to_string(), "web/1.x.x");
        assert_eq!(r("web/x.x.x").to_string(), "web");

        for (bad, says) in [
            ("web/1.x.2", "after an `x`"),
            ("web/1.x.x/3", "build number of a wildcard"),
            ("web/1.2", "three numbers"),
            ("web/1.2.0/0", "`0` in version `1.2.0/0` is not a number"),
            ("web/1.2.0/3/4", "not a number"),
            ("-web", "start with"),
            ("we b", "not allowed"),
            ("", "empty"),
        ] {
            let e = bad.parse::<ImageRef>().expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
