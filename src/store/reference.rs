//! Image names, versions and references: `name`, `name/1.x.x`, `name/1.2.0`, `name/1.2.0/3`.
//! Pure: parsing and matching only.

use std::fmt;

use super::StoreError;

/// A semantic version `major.minor.patch`, compared numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn new(major: u64, minor: u64, patch: u64) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl std::str::FromStr for Version {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::BadVersion {
            version: s.to_string(),
            reason: reason.to_string(),
        };
        let nodes: Vec<&str> = s.split('.').collect();
        if nodes.len() != 3 {
            return Err(bad(
                "expected three numbers `major.minor.patch`, like 1.2.0",
            ));
        }
        let mut n = [0u64; 3];
        for (slot, node) in n.iter_mut().zip(&nodes) {
            *slot = parse_number(node).ok_or_else(|| {
                bad(&format!(
                    "`{node}` is not a number (digits only, no leading zeros)"
                ))
            })?;
        }
        Ok(Version::new(n[0], n[1], n[2]))
    }
}

fn parse_number(node: &str) -> Option<u64> {
    if node.is_empty() || !node.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if node.len() > 1 && node.starts_with('0') {
        return None;
    }
    node.parse().ok()
}

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

/// A version with `x` wildcards: `1.x.x` matches every 1.y.z. Once a node is `x`, every node
/// to its right is `x` too (`1.x.2` means nothing useful and is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionPattern {
    pub major: Option<u64>,
    pub minor: Option<u64>,
    pub patch: Option<u64>,
}

impl VersionPattern {
    pub const ANY: VersionPattern = VersionPattern {
        major: None,
        minor: None,
        patch: None,
    };

    pub fn matches(&self, v: &Version) -> bool {
        self.major.is_none_or(|m| m == v.major)
            && self.minor.is_none_or(|m| m == v.minor)
            && self.patch.is_none_or(|p| p == v.patch)
    }

    /// The exact version, when there is no wildcard.
    pub fn exact(&self) -> Option<Version> {
        Some(Version::new(self.major?, self.minor?, self.patch?))
    }
}

impl fmt::Display for VersionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = |n: Option<u64>| n.map_or("x".to_string(), |n| n.to_string());
        write!(
            f,
            "{}.{}.{}",
            node(self.major),
            node(self.minor),
            node(self.patch)
        )
    }
}

/// A reference to stored builds: `name`, `name/1.x.x`, `name/1.2.0`, `name/1.2.0/3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub version: VersionPattern,
    /// Only with an exact version.
    pub build: Option<u32>,
}

impl ImageRef {
    /// Whether the reference names exactly one build (`name/x.y.z/n`).
    pub fn is_exact(&self) -> bool {
        self.build.is_some()
    }

    pub fn matches(&self, name: &str, version: &Version, build: u32) -> bool {
        self.name == name && self.version.matches(version) && self.build.is_none_or(|b| b == build)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if self.version != VersionPattern::ANY || self.build.is_some() {
            write!(f, "/{}", self.version)?;
        }
        if let Some(b) = self.build {
            write!(f, "/{b}")?;
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
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > 3 {
            return Err(bad(
                "expected `name`, `name/x.y.z` (with `x` wildcards) or `name/x.y.z/build`".into(),
            ));
        }
        check_name(parts[0]).map_err(|e| bad(e.to_string()))?;
        let version = match parts.get(1) {
            None => VersionPattern::ANY,
            Some(v) => {
                let nodes: Vec<&str> = v.split('.').collect();
                if nodes.len() != 3 {
                    return Err(bad(format!(
                        "the version `{v}` needs three nodes, like 1.2.0 or 1.x.x"
                    )));
                }
                let mut out = [None; 3];
                let mut wild = false;
                for (slot, node) in out.iter_mut().zip(&nodes) {
                    if *node == "x" {
                        wild = true;
                        continue;
                    }
                    if wild {
                        return Err(bad(format!(
                            "in `{v}`, every node after an `x` must be `x` too"
                        )));
                    }
                    *slot = Some(parse_number(node).ok_or_else(|| {
                        bad(format!("`{node}` in `{v}` is neither a number nor `x`"))
                    })?);
                }
                VersionPattern {
                    major: out[0],
                    minor: out[1],
                    patch: out[2],
                }
            }
        };
        let build = match parts.get(2) {
            None => None,
            Some(b) => {
                if version.exact().is_none() {
                    return Err(bad(
                        "a build number needs an exact version (no `x`), like name/1.2.0/3".into(),
                    ));
                }
                let n = parse_number(b)
                    .filter(|n| *n > 0)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        bad(format!("the build number `{b}` is not a positive number"))
                    })?;
                Some(n)
            }
        };
        Ok(ImageRef {
            name: parts[0].to_string(),
            version,
            build,
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
    fn versions_parse_and_order_numerically() {
        let a: Version = "1.10.0".parse().expect("ok");
        let b: Version = "1.9.3".parse().expect("ok");
        assert!(a > b);
        for bad in ["1.2", "1.2.3.4", "1.02.3", "a.b.c", "1..2", "-1.0.0"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    #[test]
    fn references_parse_with_wildcards_only_to_the_right() {
        assert_eq!(r("web").version, VersionPattern::ANY);
        let p = r("web/1.x.x");
        assert_eq!(p.version.major, Some(1));
        assert!(p.version.matches(&Version::new(1, 7, 2)));
        assert!(!p.version.matches(&Version::new(2, 0, 0)));
        assert_eq!(r("web/1.2.0/3").build, Some(3));
        assert_eq!(r("web/1.2.0/3").to_string(), "web/1.2.0/3");
        assert_eq!(r("web/1.x.x").to_string(), "web/1.x.x");
        assert_eq!(r("web/x.x.x").to_string(), "web");

        for (bad, says) in [
            ("web/1.x.2", "after an `x`"),
            ("web/1.x.x/3", "exact version"),
            ("web/1.2", "three nodes"),
            ("web/1.2.0/0", "positive"),
            ("web/1.2.0/3/4", "expected"),
            ("-web", "start with"),
            ("we b", "not allowed"),
            ("", "empty"),
        ] {
            let e = bad.parse::<ImageRef>().expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
