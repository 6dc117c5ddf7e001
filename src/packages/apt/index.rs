//! A `Packages` index read as a stream: the versions it offers of the packages the check is
//! asked about. Never held whole (Debian's main is ~100 MB uncompressed).

use std::collections::HashSet;
use std::io::BufRead;

use crate::packages::deb822::Paragraphs;

/// One binary package version an index offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    pub name: String,
    pub arch: String,
    pub version: String,
}

/// A `Packages` index that is not one, with the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad index at line {line}: {message}")]
pub struct BadIndex {
    pub line: usize,
    pub message: String,
}

/// The versions `reader` offers of the (name, arch) pairs in `wanted`.
pub fn offered(
    reader: impl BufRead,
    wanted: &HashSet<(String, String)>,
) -> Result<Vec<Offered>, BadIndex> {
    let mut out = Vec::new();
    for paragraph in Paragraphs::new(reader) {
        let paragraph = paragraph.map_err(|e| BadIndex {
            line: e.line,
            message: e.message,
        })?;
        let field = |name: &str| {
            paragraph.get(name).ok_or_else(|| BadIndex {
                line: paragraph.line,
                message: format!("a paragraph without `{name}`"),
            })
        };
        let (name, version, arch) = (field("Package")?, field("Version")?, field("Architecture")?);
        // A HashSet of owned pairs: the lookup needs owned keys; only wanted names pay it.
        let key = (name.to_string(), arch.to_string());
        if wanted.contains(&key) {
            out.push(Offered {
                name: key.0,
                arch: key.1,
                version: version.to_string(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn wanted(pairs: &[(&str, &str)]) -> HashSet<(String, String)> {
        pairs
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect()
    }

    #[test]
    fn only_wanted_pairs() {
        let text = "Package: hello\nVersion: 2.10-3\nArchitecture: amd64\nDescription: hi\n there\n\n\
                    Package: hello\nVersion: 2.10-3\nArchitecture: i386\n\n\
                    Package: tzdata\nVersion: 2025b-0+deb12u1\nArchitecture: all\n\n\
                    Package: other\nVersion: 1\nArchitecture: amd64\n";
        let got = offered(
            text.as_bytes(),
            &wanted(&[("hello", "amd64"), ("tzdata", "all")]),
        )
        .unwrap();
        let got: Vec<_> = got
            .iter()
            .map(|o| format!("{} {} {}", o.name, o.arch, o.version))
            .collect();
        assert_eq!(got, ["hello amd64 2.10-3", "tzdata all 2025b-0+deb12u1"]);
    }

    #[test]
    fn a_bad_paragraph_names_its_line() {
        let e = offered(
            "Package: a\nVersion: 1\nArchitecture: all\n\nPackage: b\nArchitecture: all\n"
                .as_bytes(),
            &wanted(&[]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad index at line 5: a paragraph without `Version`"
        );
        let e = offered("<html>\n".as_bytes(), &wanted(&[])).unwrap_err();
        assert_eq!(e.line, 1);
    }
}
