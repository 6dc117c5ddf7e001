//! apt's sources as the image wrote them: one-line `.list` files (`deb [options] uri suite
//! components…`) and deb822 `.sources` files (`Types:`, `URIs:`, `Suites:`, …), read into the
//! repositories apt fetches binary packages from. Every mistake of every file is collected
//! and reported at `path:line:col` (the path in the image). `deb-src` entries and disabled
//! ones (`Enabled: no`) are not repositories of binaries and are left out.

use crate::diagnostic::{Diagnostics, Problem, Span};
use crate::packages::deb822;
use crate::store::manifest::SourceFile;

/// The noun of the diagnostics' heading.
pub const NOUN: &str = "apt sources file";

/// One repository apt fetches binary packages from: one URI and one suite of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    /// Where the entry is in the image: `/etc/apt/sources.list.d/debian.sources:3`.
    pub declared: String,
    /// As written (`http://deb.debian.org/debian`).
    pub uri: String,
    /// As written (`bookworm-security`, or a flat repository's directory `./`, `sub/`).
    pub suite: String,
    /// Empty for a flat repository.
    pub components: Vec<String>,
    /// `arch=` / `Architectures:` when the entry sets them; empty: the image's own.
    pub architectures: Vec<String>,
    /// `signed-by=` / `Signed-By:`; empty: apt's global keys.
    pub signed_by: Vec<KeySpec>,
    /// `trusted=yes` / `Trusted: yes`: apt accepts the repository unsigned.
    pub trusted: bool,
    /// `check-valid-until=no` / `Check-Valid-Until: no` turns it off: apt refuses a Release
    /// file past its `Valid-Until` (a stale mirror, or old files served again).
    pub check_valid_until: bool,
}

impl Repository {
    /// A flat repository: a directory holding `Packages` and `Release` (`deb uri ./`).
    pub fn is_flat(&self) -> bool {
        self.suite.ends_with('/')
    }

    /// `uri suite` as a person recognises the entry.
    pub fn name(&self) -> String {
        format!("{} {}", self.uri, self.suite)
    }
}

/// A key the repository trusts, as `Signed-By` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// A keyring file of the image (`/usr/share/keyrings/debian-archive-keyring.gpg`).
    File(String),
    /// A key's fingerprint, looked up in apt's global keyrings.
    Fingerprint(String),
    /// An armored key block written in the `.sources` file itself.
    Inline(String),
}

/// The repositories of every file apt reads (`/etc/apt/sources.list`, `*.list` and `*.sources`
/// in `sources.list.d`; other files are ignored, as apt ignores `*.save`, `*.disabled`).
/// In file order, then entry order.
pub fn repositories(files: &[SourceFile]) -> Result<Vec<Repository>, Vec<Diagnostics>> {
    let mut out = Vec::new();
    let mut invalid = Vec::new();
    for file in files {
        let mut diagnostics = Diagnostics::new(&file.path, file.text.as_str(), NOUN);
        if file.path.ends_with(".sources") {
            deb822_file(file, &mut out, &mut diagnostics);
        } else if file.path.ends_with(".list") {
            one_line_file(file, &mut out, &mut diagnostics);
        }
        if diagnostics.has_errors() {
            diagnostics.sort();
            invalid.push(diagnostics);
        }
    }
    if invalid.is_empty() {
        Ok(out)
    } else {
        Err(invalid)
    }
}

/// Byte offset of 1-based `line`, `col` (characters) in `text`.
fn offset(text: &str, line: usize, col: usize) -> usize {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let rest = &text[start.min(text.len())..];
    start
        + rest
            .char_indices()
            .nth(col.saturating_sub(1))
            .map_or(rest.len(), |(i, _)| i)
}

fn span(text: &str, line: usize, col: usize, len: usize) -> Span {
    let start = offset(text, line, col);
    Span::from_offsets(text, start, start + len)
}

fn one_line_file(file: &SourceFile, out: &mut Vec<Repository>, d: &mut Diagnostics) {
    let text = file.text.as_str();
    let mut line_start = 0;
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let at = line_start;
        line_start += raw.len();
        // apt reads everything after a `#` as a comment.
        let line = raw.split('#').next().unwrap_or_default().trim_end();
        let words = words(line);
        if words.is_empty() {
            continue;
        }
        let problem = |start: usize, len: usize, message: String| {
            Problem::error(
                Span::from_offsets(text, at + start, at + start + len),
                message,
            )
        };
        let (kind_at, kind) = words[0];
        match kind {
            "deb-src" => continue,
            "deb" => {}
            other => {
                d.push(
                    problem(kind_at, other.len(), format!("unknown type `{other}`"))
                        .with_hint("a line starts with `deb` or `deb-src`"),
                );
                continue;
            }
        }
        let mut rest = &words[1..];
        let mut repository = Repository {
            declared: format!("{}:{}", file.path, index + 1),
            uri: String::new(),
            suite: String::new(),
            components: Vec::new(),
            architectures: Vec::new(),
            signed_by: Vec::new(),
            trusted: false,
            check_valid_until: true,
        };
        if let Some(&(open, first)) = rest.first()
            && first.starts_with('[')
        {
            // Options: `[` up to `]`, which may be glued to a word or stand alone.
            let Some(close) = line[open..].find(']').map(|i| open + i) else {
                d.push(problem(
                    open,
                    1,
                    "`[` opens options that no `]` closes".into(),
                ));
                continue;
            };
            for option in line[open + 1..close].split_whitespace() {
                let option_at = open + 1 + line[open + 1..close].find(option).unwrap_or_default();
                if let Err(message) = one_line_option(option, &mut repository) {
                    d.push(problem(option_at, option.len(), message));
                }
            }
            rest = &rest[rest.iter().take_while(|(at, _)| *at <= close).count()..];
        }
        let Some(&(_, uri)) = rest.first() else {
            d.push(
                problem(kind_at, line.len() - kind_at, "no URI after `deb`".into())
                    .with_hint("write `deb http://deb.debian.org/debian bookworm main`"),
            );
            continue;
        };
        let Some(&(suite_at, suite)) = rest.get(1) else {
            d.push(
                problem(rest[0].0, uri.len(), format!("no suite after `{uri}`")).with_hint(
                    "write the suite (`bookworm`) or a flat repository's directory (`./`)",
                ),
            );
            continue;
        };
        if let Err(message) = check_uri(uri) {
            d.push(problem(rest[0].0, uri.len(), message));
            continue;
        }
        repository.uri = uri.to_string();
        repository.suite = suite.to_string();
        repository.components = rest[2..].iter().map(|(_, c)| c.to_string()).collect();
        if let Err(message) = check_components(&repository) {
            d.push(problem(suite_at, suite.len(), message));
            continue;
        }
        out.push(repository);
    }
}

/// Words of a line with their byte offsets.
fn words(line: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                out.push((s, &line[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &line[s..]));
    }
    out
}

/// One `name=value` (or `name+=value`, `name-=value`) of a one-line entry's `[…]`.
fn one_line_option(option: &str, repository: &mut Repository) -> Result<(), String> {
    let Some((name, value)) = option.split_once('=') else {
        return Err(format!(
            "option `{option}` has no value; options are written `name=value`"
        ));
    };
    let (name, op) = match name.strip_suffix(['+', '-']) {
        Some(stem) => (stem, &name[stem.len()..]),
        None => (name, ""),
    };
    let values = value.split(',').filter(|v| !v.is_empty()).map(String::from);
    match (name, op) {
        ("arch", "") => repository.architectures = values.collect(),
        ("arch", "+") => repository.architectures.extend(values),
        ("arch", "-") => {
            let remove: Vec<String> = values.collect();
            repository.architectures.retain(|a| !remove.contains(a));
        }
        ("signed-by", _) => repository.signed_by = value.split(',').map(key_spec).collect(),
        ("trusted", _) => repository.trusted = yes(value)?,
        ("check-valid-until", _) => repository.check_valid_until = yes(value)?,
        // The rest (lang, target, pdiffs, by-hash, check-valid-until…) do not change which
        // packages apt may install.
        _ => {}
    }
    Ok(())
}

fn yes(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "yes" | "true" | "with" | "on" | "enable" => Ok(true),
        "no" | "false" | "without" | "off" | "disable" => Ok(false),
        _ => Err(format!("`{value}` is not `yes` or `no`")),
    }
}

/// A path, or a fingerprint (hex, blanks allowed, `!` for "this subkey").
fn key_spec(value: &str) -> KeySpec {
    let hex: String = value
        .trim_end_matches('!')
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if !value.contains('/') && hex.len() >= 16 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        KeySpec::Fingerprint(hex.to_ascii_uppercase())
    } else {
        KeySpec::File(value.trim().to_string())
    }
}

fn check_uri(uri: &str) -> Result<(), String> {
    match uri.split_once(':') {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "`{uri}` is not a URI; expected one such as `http://deb.debian.org/debian`"
        )),
    }
}

fn check_components(repository: &Repository) -> Result<(), String> {
    match (repository.is_flat(), repository.components.is_empty()) {
        (true, false) => Err(format!(
            "`{}` is a flat repository's directory (it ends with `/`), which takes no components",
            repository.suite
        )),
        (false, true) => Err(format!(
            "suite `{}` has no components; write them (`main`) or, for a flat repository, end the directory with `/`",
            repository.suite
        )),
        _ => Ok(()),
    }
}

fn deb822_file(file: &SourceFile, out: &mut Vec<Repository>, d: &mut Diagnostics) {
    let text = file.text.as_str();
    for paragraph in deb822::paragraphs(text) {
        let paragraph = match paragraph {
            Ok(p) => p,
            Err(e) => {
                d.push(Problem::error(span(text, e.line, e.col, 1), e.message));
                return;
            }
        };
        let at = |field: &deb822::Field| {
            span(
                text,
                field.line,
                field.value_col,
                field.value.lines().next().unwrap_or_default().len(),
            )
        };
        let list = |name: &str| -> Vec<String> {
            paragraph
                .get(name)
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        if let Some(field) = paragraph.field("Enabled") {
            match yes(field.value.trim()) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(message) => {
                    d.push(Problem::error(at(field), format!("`Enabled`: {message}")));
                    continue;
                }
            }
        }
        let whole = span(text, paragraph.line, 1, 1);
        let mut missing = false;
        for required in ["Types", "URIs", "Suites"] {
            if paragraph.get(required).is_none_or(str::is_empty) {
                d.push(Problem::error(
                    whole,
                    format!("this entry has no `{required}`"),
                ).with_hint("an entry needs `Types`, `URIs`, `Suites` and, unless a suite ends with `/`, `Components`"));
                missing = true;
            }
        }
        if missing {
            continue;
        }
        let types = list("Types");
        if let Some(bad) = types
            .iter()
            .find(|t| !matches!(t.as_str(), "deb" | "deb-src"))
            && let Some(field) = paragraph.field("Types")
        {
            d.push(
                Problem::error(at(field), format!("unknown type `{bad}`"))
                    .with_hint("`Types` lists `deb` and/or `deb-src`"),
            );
            continue;
        }
        if !types.iter().any(|t| t == "deb") {
            continue;
        }
        let mut template = Repository {
            declared: format!("{}:{}", file.path, paragraph.line),
            uri: String::new(),
            suite: String::new(),
            components: list("Components"),
            architectures: list("Architectures"),
            signed_by: Vec::new(),
            trusted: false,
            check_valid_until: true,
        };
        template.architectures.extend(list("Architectures-Add"));
        let remove = list("Architectures-Remove");
        template.architectures.retain(|a| !remove.contains(a));
        let mut bad = false;
        for (name, flag) in [
            ("Trusted", &mut template.trusted),
            ("Check-Valid-Until", &mut template.check_valid_until),
        ] {
            if let Some(field) = paragraph.field(name) {
                match yes(field.value.trim()) {
                    Ok(value) => *flag = value,
                    Err(message) => {
                        d.push(Problem::error(at(field), format!("`{name}`: {message}")));
                        bad = true;
                    }
                }
            }
        }
        if bad {
            continue;
        }
        if let Some(value) = paragraph.get("Signed-By") {
            template.signed_by = if value.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----") {
                vec![KeySpec::Inline(value.to_string())]
            } else {
                value
                    .split([',', ' ', '\n', '\t'])
                    .filter(|v| !v.is_empty())
                    .map(key_spec)
                    .collect()
            };
        }
        if let Some(field) = paragraph.field("URIs") {
            for uri in field.value.split_whitespace() {
                if let Err(message) = check_uri(uri) {
                    d.push(Problem::error(at(field), message));
                    bad = true;
                }
            }
        }
        for uri in list("URIs") {
            for suite in list("Suites") {
                let repository = Repository {
                    uri: uri.clone(),
                    suite,
                    ..template.clone()
                };
                if let Err(message) = check_components(&repository)
                    && let Some(field) = paragraph.field("Suites")
                {
                    d.push(Problem::error(at(field), message));
                    bad = true;
                    break;
                }
                if !bad {
                    out.push(repository);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn file(path: &str, text: &str) -> SourceFile {
        SourceFile {
            path: path.into(),
            text: text.into(),
        }
    }

    fn read(path: &str, text: &str) -> Vec<Repository> {
        repositories(&[file(path, text)]).unwrap()
    }

    fn errors(path: &str, text: &str) -> Vec<String> {
        let d = repositories(&[file(path, text)]).unwrap_err();
        assert_eq!(d.len(), 1);
        d[0].lines()
    }

    #[test]
    fn one_line_entries_with_options_comments_and_deb_src() {
        let text = "# the distribution\n\
            deb http://deb.debian.org/debian bookworm main contrib # a comment\n\
            deb-src http://deb.debian.org/debian bookworm main\n\
            \n\
            deb [arch=amd64,arm64 signed-by=/usr/share/keyrings/x.gpg] https://x.example/apt stable main\n\
            deb [ trusted=yes check-valid-until=no ] file:/srv/repo ./\n\
            #deb http://disabled/ bookworm main\n";
        let all = read("/etc/apt/sources.list", text);
        assert_eq!(all.len(), 3, "{all:#?}");
        assert_eq!(all[0].declared, "/etc/apt/sources.list:2");
        assert_eq!(all[0].uri, "http://deb.debian.org/debian");
        assert_eq!(all[0].suite, "bookworm");
        assert_eq!(all[0].components, ["main", "contrib"]);
        assert!(all[0].signed_by.is_empty() && !all[0].trusted);
        assert_eq!(all[1].architectures, ["amd64", "arm64"]);
        assert_eq!(
            all[1].signed_by,
            [KeySpec::File("/usr/share/keyrings/x.gpg".into())]
        );
        assert_eq!(all[1].declared, "/etc/apt/sources.list:5");
        assert!(all[2].trusted && all[2].is_flat() && all[2].components.is_empty());
        assert!(all[0].check_valid_until && !all[2].check_valid_until);
        assert_eq!(all[2].uri, "file:/srv/repo");
    }

    #[test]
    fn deb822_entries_expand_uris_and_suites() {
        let text = "Types: deb deb-src\n\
            URIs: http://deb.debian.org/debian\n\
            Suites: bookworm bookworm-updates\n\
            Components: main\n\
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
            \n\
            # security\n\
            Types: deb\n\
            URIs: http://deb.debian.org/debian-security\n\
            Suites: bookworm-security\n\
            Components: main\n\
            Signed-By: 4CB50190207B4758A3F73A796ED0E7B82643E131 \n\
            \n\
            Types: deb\n\
            URIs: http://off/\n\
            Suites: x\n\
            Components: main\n\
            Enabled: no\n\
            \n\
            Types: deb-src\n\
            URIs: http://src/\n\
            Suites: x\n\
            Components: main\n";
        let all = read("/etc/apt/sources.list.d/debian.sources", text);
        assert_eq!(all.len(), 3, "{all:#?}");
        assert_eq!(all[0].suite, "bookworm");
        assert_eq!(all[1].suite, "bookworm-updates");
        assert_eq!(all[0].declared, "/etc/apt/sources.list.d/debian.sources:1");
        assert_eq!(all[2].declared, "/etc/apt/sources.list.d/debian.sources:8");
        assert_eq!(
            all[2].signed_by,
            [KeySpec::Fingerprint(
                "4CB50190207B4758A3F73A796ED0E7B82643E131".into()
            )]
        );
    }

    #[test]
    fn deb822_inline_key_and_flat_repository() {
        let text = "Types: deb\n\
            URIs: http://127.0.0.1:8080/repo\n\
            Suites: ./\n\
            Trusted: no\n\
            Architectures: amd64\n\
            Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQENBGV\n =abcd\n -----END PGP PUBLIC KEY BLOCK-----\n";
        let all = read("/etc/apt/sources.list.d/local.sources", text);
        assert_eq!(all.len(), 1);
        assert!(all[0].is_flat());
        let KeySpec::Inline(key) = &all[0].signed_by[0] else {
            panic!("{:?}", all[0].signed_by)
        };
        assert!(key.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQENBGV\n"));
        assert_eq!(all[0].architectures, ["amd64"]);
    }

    #[test]
    fn other_files_are_ignored() {
        let all = repositories(&[file("/etc/apt/sources.list.d/x.list.save", "garbage")]).unwrap();
        assert!(all.is_empty());
    }

    #[test]
    fn one_line_mistakes_at_line_and_column() {
        let lines = errors(
            "/etc/apt/sources.list",
            "deb http://a/debian bookworm main\n\
             rpm http://a/ x main\n\
             deb [arch=amd64 http://a/ x main\n\
             deb [trusted] http://a/ x main\n\
             deb http://a/debian\n\
             deb http://a/debian bookworm\n\
             deb http://a/debian ./ main\n\
             deb not-a-uri bookworm main\n",
        );
        assert_eq!(
            lines,
            [
                "/etc/apt/sources.list:2:1: error: unknown type `rpm` (hint: a line starts with `deb` or `deb-src`)",
                "/etc/apt/sources.list:3:5: error: `[` opens options that no `]` closes",
                "/etc/apt/sources.list:4:6: error: option `trusted` has no value; options are written `name=value`",
                "/etc/apt/sources.list:5:5: error: no suite after `http://a/debian` (hint: write the suite (`bookworm`) or a flat repository's directory (`./`))",
                "/etc/apt/sources.list:6:21: error: suite `bookworm` has no components; write them (`main`) or, for a flat repository, end the directory with `/`",
                "/etc/apt/sources.list:7:21: error: `./` is a flat repository's directory (it ends with `/`), which takes no components",
                "/etc/apt/sources.list:8:5: error: `not-a-uri` is not a URI; expected one such as `http://deb.debian.org/debian`",
            ]
        );
    }

    #[test]
    fn deb822_mistakes_at_line_and_column() {
        let lines = errors(
            "/etc/apt/sources.list.d/x.sources",
            "Types: deb\nURIs: http://a/\nComponents: main\n\nTypes: deb rpm\nURIs: http://a/\nSuites: x\nComponents: main\n\nTypes: deb\nURIs: http://a/\nSuites: x\nComponents: main\nEnabled: maybe\n\nnot a field\n",
        );
        assert_eq!(
            lines,
            [
                "/etc/apt/sources.list.d/x.sources:1:1: error: this entry has no `Suites` (hint: an entry needs `Types`, `URIs`, `Suites` and, unless a suite ends with `/`, `Components`)",
                "/etc/apt/sources.list.d/x.sources:5:8: error: unknown type `rpm` (hint: `Types` lists `deb` and/or `deb-src`)",
                "/etc/apt/sources.list.d/x.sources:14:10: error: `Enabled`: `maybe` is not `yes` or `no`",
                "/etc/apt/sources.list.d/x.sources:16:1: error: expected `Field: value`, found `not a field`",
            ]
        );
    }

    #[test]
    fn every_file_with_mistakes_is_reported() {
        let d = repositories(&[
            file("/a.list", "deb x\n"),
            file("/b.list", "deb http://ok/ s main\n"),
            file("/c.sources", "Types: deb\n"),
        ])
        .unwrap_err();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].path(), std::path::Path::new("/a.list"));
        assert_eq!(d[1].path(), std::path::Path::new("/c.sources"));
    }
}
