//! OCI references, `host[:port]/repository[:tag][@sha256:…]`, written without a scheme: how
//! one splits into registry, repository and tag (the recipe checks each part with its own
//! message and span; a tag there may be a name template), and the parsed, checked value
//! registries are spoken to with.

use std::fmt;
use std::str::FromStr;

/// The tag a pushed image gets when the reference names none.
pub const DEFAULT_OCI_TAG: &str = "{{imagebuilder:version}}-{{imagebuilder:buildVersion}}";

/// Where the parts of an OCI reference `registry/repository[:tag]` are: (registry end,
/// tag start) as byte offsets; the tag starts after a `:` that follows the last `/`.
pub fn split_oci_reference(text: &str) -> Option<(usize, Option<usize>)> {
    let slash = text.find('/')?;
    let last_slash = text.rfind('/')?;
    let tag = text[last_slash..].find(':').map(|i| last_slash + i + 1);
    Some((slash, tag))
}

/// `host[:port]/repository[:tag][@sha256:…]`, without a scheme.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OciReference {
    /// `host[:port]`.
    pub registry: String,
    /// `path/to/repo` (lower case).
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// The reference cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{reference}` is not a valid OCI reference: {reason}")]
pub struct OciReferenceError {
    pub reference: String,
    pub reason: String,
}

impl OciReferenceError {
    pub fn hint(&self) -> Option<String> {
        Some("write it as `host[:port]/repository[:tag][@sha256:<64 hex digits>]`".into())
    }
}

impl FromStr for OciReference {
    type Err = OciReferenceError;

    fn from_str(text: &str) -> Result<Self, OciReferenceError> {
        let bad = |reason: String| OciReferenceError {
            reference: text.to_string(),
            reason,
        };
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(bad(format!(
                "leave out the scheme `{scheme}://` (write `host[:port]/repository:tag`)"
            )));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad(format!("the digest `{d}` must start with `sha256:`")))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(format!(
                        "the digest `{d}` must be `sha256:` and 64 hex digits"
                    )));
                }
                (rest, Some(format!("sha256:{}", hex.to_ascii_lowercase())))
            }
            None => (text, None),
        };
        let (slash, tag) = split_oci_reference(rest)
            .ok_or_else(|| bad("name the registry host first: `host[:port]/repository`".into()))?;
        let registry = &rest[..slash];
        if registry.is_empty() {
            return Err(bad("the registry host is empty".into()));
        }
        let (host, port) = match registry.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return Err(bad(format!("`{registry}` is not a host name or address")));
        }
        if let Some(p) = port
            && p.parse::<u16>().is_err()
        {
            return Err(bad(format!("`{p}` is not a port number")));
        }
        let repository = &rest[slash + 1..tag.map_or(rest.len(), |t| t - 1)];
        let tag = tag.map(|t| &rest[t..]);
        if repository.is_empty() {
            return Err(bad("the repository is empty".into()));
        }
        for component in repository.split('/') {
            let ok = !component.is_empty()
                && component
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && component
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
                && component
                    .bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_alphanumeric());
            if !ok {
                return Err(bad(format!(
                    "repository component `{component}`: use lower-case letters, digits and \
                     `.`, `_`, `-` between them"
                )));
            }
        }
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad(format!(
                    "tag `{t}`: up to 128 letters, digits, `.`, `_`, `-`, not starting with `.` or `-`"
                )));
            }
        }
        Ok(OciReference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

impl fmt::Display for OciReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl OciReference {
    /// `oci://registry[:port]/repository`, without a tag or digest: a shared layer cache
    /// (`cache.from`, `--cache-from`), whose layers are each tagged with their key.
    pub fn parse_repository(text: &str) -> Result<OciReference, OciReferenceError> {
        let bad = |reason: String| OciReferenceError {
            reference: text.to_string(),
            reason,
        };
        let rest = text
            .strip_prefix("oci://")
            .ok_or_else(|| bad("a shared layer cache is named with its scheme, `oci://`".into()))?;
        let reference: OciReference = rest.parse().map_err(|e: OciReferenceError| bad(e.reason))?;
        if reference.tag.is_some() || reference.digest.is_some() {
            return Err(bad(
                "a shared layer cache is a repository: leave out the tag or digest (each layer \
                 is tagged with its key)"
                    .into(),
            ));
        }
        Ok(reference)
    }
}

/// As its text (`host[:port]/repository[:tag][@sha256:…]`), in plans.
impl serde::Serialize for OciReference {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for OciReference {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<OciReference, OciReferenceError> {
        s.parse()
    }

    #[test]
    fn a_shared_cache_is_an_oci_repository_without_tag_or_digest() {
        let r = OciReference::parse_repository("oci://127.0.0.1:5000/cache/web").expect("ok");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "cache/web")
        );
        assert_eq!((r.tag, r.digest), (None, None));
        for (text, says) in [
            ("127.0.0.1:5000/cache/web", "`oci://`"),
            ("oci://127.0.0.1:5000/cache/web:1", "leave out the tag"),
            ("oci://127.0.0.1:5000/Cache", "lower-case"),
        ] {
            let e = OciReference::parse_repository(text).expect_err(text);
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn references_parse_with_port_path_tag_and_digest() {
        let d = "a".repeat(64);
        let r = parse(&format!("127.0.0.1:5000/images/web:1.2.0@sha256:{d}")).expect("ok");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "images/web");
        assert_eq!(r.tag.as_deref(), Some("1.2.0"));
        assert_eq!(r.digest, Some(format!("sha256:{d}")));
        assert_eq!(
            r.to_string(),
            format!("127.0.0.1:5000/images/web:1.2.0@sha256:{d}")
        );
        let r = parse("registry.local/web").expect("ok");
        assert_eq!((r.tag, r.digest), (None, None));
        let r = parse("registry.local/a/b/c:latest").expect("ok");
        assert_eq!(r.repository, "a/b/c");
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (text, needle) in [
            ("oci://host/repo:1", "leave out the scheme"),
            ("repo:1", "name the registry host"),
            ("host/Repo:1", "lower-case"),
            ("host/repo:-x", "tag `-x`"),
            ("host/repo@sha256:abc", "64 hex digits"),
            ("host/repo@md5:abc", "must start with `sha256:`"),
            ("host:99999/repo", "not a port"),
            ("host/", "repository is empty"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }
}
