//! A repository's `Release` file (the text `InRelease` signs): who it is (`Suite`,
//! `Codename`, `Label`, `Origin`), whether apt upgrades from it on its own (`NotAutomatic`,
//! `ButAutomaticUpgrades`), and the sha256 and size of every index it lists. Pure.

use std::collections::BTreeMap;

use crate::packages::deb822;

/// What a `Release` file says that the check uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Release {
    pub suite: Option<String>,
    pub codename: Option<String>,
    pub label: Option<String>,
    pub origin: Option<String>,
    /// `NotAutomatic: yes`: apt installs from it only when asked (experimental, backports).
    pub not_automatic: bool,
    /// `ButAutomaticUpgrades: yes`: …but upgrades what was installed from it.
    pub but_automatic_upgrades: bool,
    /// `Architectures:` lists `all` and no `No-Support-for-Architecture-all: Packages` says
    /// those are in each architecture's index too: apt reads `binary-all` as well.
    pub separate_all_index: bool,
    /// `Acquire-By-Hash: yes`: each index is also at `<its dir>/by-hash/SHA256/<sha256>`, which
    /// a mirror updates before it moves the canonical names, so apt asks there first.
    pub acquire_by_hash: bool,
    /// `Valid-Until`: apt refuses the file after this.
    pub valid_until: Option<chrono::DateTime<chrono::Utc>>,
    /// `SHA256:` path (relative to the Release file's directory) → (sha256 hex, size).
    pub sha256: BTreeMap<String, (String, u64)>,
}

impl Release {
    /// Read the text of a `Release` file (or of an `InRelease` once its signature is removed).
    pub fn parse(text: &str) -> Result<Release, String> {
        let paragraph = match deb822::paragraphs(text).next() {
            Some(Ok(p)) => p,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("it is empty".into()),
        };
        let owned = |name: &str| paragraph.get(name).map(String::from);
        let yes = |name: &str| {
            paragraph
                .get(name)
                .is_some_and(|v| v.eq_ignore_ascii_case("yes"))
        };
        let mut sha256 = BTreeMap::new();
        if let Some(field) = paragraph.field("SHA256") {
            for (i, line) in field.value.lines().enumerate() {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words[..] {
                    [] => {}
                    [hash, size, path]
                        if hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()) =>
                    {
                        let size = size.parse().map_err(|_| {
                            format!(
                                "line {}: size `{size}` of `{path}` is not a number",
                                field.line + i
                            )
                        })?;
                        sha256.insert(path.to_string(), (hash.to_ascii_lowercase(), size));
                    }
                    _ => {
                        return Err(format!(
                            "line {}: expected `<sha256> <size> <path>` in `SHA256`, found `{line}`",
                            field.line + i
                        ));
                    }
                }
            }
        }
        let valid_until = paragraph
            .field("Valid-Until")
            .map(|field| {
                date(&field.value).ok_or_else(|| {
                    format!(
                        "line {}: `Valid-Until: {}` is not a date such as `Sun, 13 Dec 2026 02:54:29 UTC`",
                        field.line, field.value
                    )
                })
            })
            .transpose()?;
        Ok(Release {
            valid_until,
            suite: owned("Suite"),
            codename: owned("Codename"),
            label: owned("Label"),
            origin: owned("Origin"),
            not_automatic: yes("NotAutomatic"),
            but_automatic_upgrades: yes("ButAutomaticUpgrades"),
            acquire_by_hash: yes("Acquire-By-Hash"),
            separate_all_index: paragraph
                .get("Architectures")
                .is_some_and(|v| v.split_whitespace().any(|a| a == "all"))
                && paragraph
                    .get("No-Support-for-Architecture-all")
                    .is_none_or(|v| v != "Packages"),
            sha256,
        })
    }

    /// The `Packages` indices of `dir` (`main/binary-amd64/`, or `""` for a flat repository)
    /// the Release file lists, the smallest download first: `.xz`, `.gz`, then plain. A
    /// Release file lists the plain one even where the mirror keeps only compressed ones.
    pub fn packages_indices(&self, dir: &str) -> Vec<(&str, &str, u64)> {
        ["Packages.xz", "Packages.gz", "Packages"]
            .iter()
            .filter_map(|name| self.sha256.get_key_value(&format!("{dir}{name}")))
            .map(|(path, (hash, size))| (path.as_str(), hash.as_str(), *size))
            .collect()
    }
}

/// A Release file's date: RFC 2822 as Debian's archive writes it (`Sun, 13 Dec 2026
/// 02:54:29 UTC`; `UTC`, `GMT` or `+0000`).
fn date(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = text.trim();
    let utc = text
        .strip_suffix(" UTC")
        .or_else(|| text.strip_suffix(" GMT"))
        .or_else(|| text.strip_suffix(" Z"));
    match utc {
        Some(naive) => chrono::NaiveDateTime::parse_from_str(naive, "%a, %d %b %Y %H:%M:%S")
            .ok()
            .map(|n| n.and_utc()),
        None => chrono::DateTime::parse_from_rfc2822(text)
            .ok()
            .map(|d| d.with_timezone(&chrono::Utc)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    const SECURITY: &str = "Origin: Debian\n\
        Label: Debian-Security\n\
        Suite: stable-security\n\
        Version: 12\n\
        Codename: bookworm-security\n\
        Date: Sat, 05 Dec 2026 10:00:00 UTC\n\
        Architectures: amd64 arm64\n\
        Components: updates/main\n\
        No-Support-for-Architecture-all: Packages\n\
        MD5Sum:\n 0123456789abcdef0123456789abcdef 10 main/binary-amd64/Packages\n\
        SHA256:\n \
        1111111111111111111111111111111111111111111111111111111111111111 1000 main/binary-amd64/Packages\n \
        2222222222222222222222222222222222222222222222222222222222222222 200 main/binary-amd64/Packages.xz\n \
        3333333333333333333333333333333333333333333333333333333333333333 300 main/binary-arm64/Packages.gz\n";

    #[test]
    fn fields_and_indices() {
        let r = Release::parse(SECURITY).unwrap();
        assert_eq!(r.suite.as_deref(), Some("stable-security"));
        assert_eq!(r.codename.as_deref(), Some("bookworm-security"));
        assert_eq!(r.label.as_deref(), Some("Debian-Security"));
        assert_eq!(r.origin.as_deref(), Some("Debian"));
        assert!(!r.not_automatic && !r.separate_all_index);
        let all = Release::parse("Architectures: all amd64\n").unwrap();
        assert!(all.separate_all_index);
        let merged =
            Release::parse("Architectures: all amd64\nNo-Support-for-Architecture-all: Packages\n")
                .unwrap();
        assert!(!merged.separate_all_index);
        let names = |dir: &str| -> Vec<String> {
            r.packages_indices(dir)
                .iter()
                .map(|i| i.0.to_string())
                .collect()
        };
        assert_eq!(
            names("main/binary-amd64/"),
            [
                "main/binary-amd64/Packages.xz",
                "main/binary-amd64/Packages"
            ]
        );
        let xz = r.packages_indices("main/binary-amd64/")[0];
        assert_eq!(
            (xz.1, xz.2),
            (
                "2222222222222222222222222222222222222222222222222222222222222222",
                200
            )
        );
        assert_eq!(
            names("main/binary-arm64/"),
            ["main/binary-arm64/Packages.gz"]
        );
        assert!(names("main/binary-i386/").is_empty());
    }

    #[test]
    fn valid_until_dates() {
        let r = Release::parse("Valid-Until: Sun, 13 Dec 2026 02:54:29 UTC\n").unwrap();
        assert_eq!(
            r.valid_until.unwrap().to_rfc3339(),
            "2026-12-13T02:54:29+00:00"
        );
        let r = Release::parse("Valid-Until: Sun, 13 Dec 2026 03:54:29 +0100\n").unwrap();
        assert_eq!(
            r.valid_until.unwrap().to_rfc3339(),
            "2026-12-13T02:54:29+00:00"
        );
        assert_eq!(Release::parse("Suite: x\n").unwrap().valid_until, None);
        let e = Release::parse("Suite: x\nValid-Until: next week\n").unwrap_err();
        assert!(
            e.starts_with("line 2: `Valid-Until: next week` is not a date"),
            "{e}"
        );
    }

    #[test]
    fn not_automatic_and_mistakes() {
        let r =
            Release::parse("Suite: experimental\nNotAutomatic: yes\nButAutomaticUpgrades: yes\n")
                .unwrap();
        assert!(r.not_automatic && r.but_automatic_upgrades);
        assert!(!r.acquire_by_hash);
        assert!(
            Release::parse("Acquire-By-Hash: yes\nSuite: x\n")
                .unwrap()
                .acquire_by_hash
        );
        let e = Release::parse("Suite: x\nSHA256:\n abc 1 Packages\n").unwrap_err();
        assert!(
            e.contains("line 3") && e.contains("expected `<sha256> <size> <path>`"),
            "{e}"
        );
        assert!(Release::parse("").is_err());
    }
}
