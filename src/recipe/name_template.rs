//! Output file names from templates such as `{{imagebuilder:name}}-{{imagebuilder:buildVersion}}`,
//! with Image Builder's placeholders. Spaces inside the braces are allowed, as in Image
//! Builder. `{{imagebuilder:buildDate}}` takes an optional format suffix
//! (`{{imagebuilder:buildDate:yyyyMMddHHmm}}`); Image Builder does not publish its default
//! format, ours is [`DEFAULT_DATE_FORMAT`] (sortable and safe in file names).

use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};

use super::version::Version;

/// The placeholders a name template knows, without braces.
pub const PLACEHOLDERS: &[&str] = &[
    "imagebuilder:name",
    "imagebuilder:version",
    "imagebuilder:buildVersion",
    "imagebuilder:buildDate",
];

/// The format of `{{imagebuilder:buildDate}}` without a suffix.
pub const DEFAULT_DATE_FORMAT: &str = "yyyyMMddHHmmss";

/// Tokens of a date format, longest first so `yyyy` wins over `yy`.
const DATE_TOKENS: &[&str] = &["yyyy", "yy", "MM", "dd", "HH", "mm", "ss"];

/// The default output name: unique per build of a recipe version.
pub const DEFAULT_NAME_TEMPLATE: &str =
    "{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}";

/// A parsed name template. Renders to a file stem (no `/`, never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Name,
    Version,
    BuildVersion,
    BuildDate(Vec<DatePart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DatePart {
    Token(&'static str),
    Literal(char),
}

/// What a template is rendered with.
#[derive(Debug, Clone)]
pub struct NameValues<'a> {
    /// The recipe's name.
    pub name: &'a str,
    /// The recipe's version.
    pub version: Version,
    /// The build number of this version in the store (`name/x.y.z/<n>`).
    pub build_version: u32,
    pub build_date: DateTime<Utc>,
}

/// One mistake in a template: where in the template text (byte offsets), what, and a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub start: usize,
    pub end: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl NameTemplate {
    /// Parse `text`, returning every mistake in it.
    pub fn parse(text: &str) -> Result<NameTemplate, Vec<TemplateError>> {
        let mut parts = Vec::new();
        let mut errors = Vec::new();
        let mut rest = 0;
        while rest < text.len() {
            let Some(open) = text[rest..].find("{{").map(|i| i + rest) else {
                literal(text, rest, text.len(), &mut parts, &mut errors);
                break;
            };
            literal(text, rest, open, &mut parts, &mut errors);
            let Some(close) = text[open + 2..].find("}}").map(|i| i + open + 2) else {
                errors.push(TemplateError {
                    start: open,
                    end: text.len(),
                    message: "`{{` is never closed".to_string(),
                    hint: Some("close the placeholder with `}}`".to_string()),
                });
                break;
            };
            match placeholder(&text[open + 2..close]) {
                Ok(part) => parts.push(part),
                Err((message, hint)) => errors.push(TemplateError {
                    start: open,
                    end: close + 2,
                    message,
                    hint,
                }),
            }
            rest = close + 2;
        }
        if text.trim().is_empty() {
            errors.push(TemplateError {
                start: 0,
                end: text.len(),
                message: "the output name is empty".to_string(),
                hint: Some(format!("for example `{DEFAULT_NAME_TEMPLATE}`")),
            });
        }
        if errors.is_empty() {
            Ok(NameTemplate {
                text: text.to_string(),
                parts,
            })
        } else {
            Err(errors)
        }
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The file stem for one build.
    pub fn render(&self, values: &NameValues<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Name => out.push_str(values.name),
                Part::Version => out.push_str(&values.version.to_string()),
                Part::BuildVersion => out.push_str(&values.build_version.to_string()),
                Part::BuildDate(format) => render_date(&mut out, format, values.build_date),
            }
        }
        out
    }
}

impl fmt::Display for NameTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Default for NameTemplate {
    #[expect(
        clippy::expect_used,
        reason = "the default template is a constant, parsed by the unit tests"
    )]
    fn default() -> NameTemplate {
        NameTemplate::parse(DEFAULT_NAME_TEMPLATE).expect("the default template is valid")
    }
}

/// Literal text between placeholders: it becomes part of a file name.
fn literal(
    text: &str,
    start: usize,
    end: usize,
    parts: &mut Vec<Part>,
    errors: &mut Vec<TemplateError>,
) {
    if start >= end {
        return;
    }
    let s = &text[start..end];
    for (i, c) in s.char_indices() {
        if c == '/' || c == '\\' || c.is_control() {
            errors.push(TemplateError {
                start: start + i,
                end: start + i + c.len_utf8(),
                message: format!("`{}` cannot be part of a file name", c.escape_default()),
                hint: Some("output names are file names: use `-` or `_` instead".to_string()),
            });
        }
    }
    if let Some(close) = s.find("}}") {
        errors.push(TemplateError {
            start: start + close,
            end: start + close + 2,
            message: "`}}` without a matching `{{`".to_string(),
            hint: None,
        });
    }
    parts.push(Part::Literal(s.to_string()));
}

type Mistake = (String, Option<String>);

fn placeholder(inner: &str) -> Result<Part, Mistake> {
    let name = inner.trim();
    let (key, format) = match name.strip_prefix("imagebuilder:buildDate:") {
        Some(format) => ("imagebuilder:buildDate", Some(format)),
        None => (name, None),
    };
    match key {
        "imagebuilder:name" => Ok(Part::Name),
        "imagebuilder:version" => Ok(Part::Version),
        "imagebuilder:buildVersion" => Ok(Part::BuildVersion),
        "imagebuilder:buildDate" => {
            date_format(format.unwrap_or(DEFAULT_DATE_FORMAT)).map(Part::BuildDate)
        }
        _ => {
            // Compare without a date-format suffix, so `imagebuilder:buildDat:yyyy` finds buildDate.
            let stem = match name.match_indices(':').nth(1) {
                Some((i, _)) => &name[..i],
                None => name,
            };
            let hint = match crate::diagnostic::did_you_mean(stem, PLACEHOLDERS.iter().copied()) {
                Some(close) => format!("did you mean `{{{{{close}}}}}`?"),
                None => format!(
                    "name templates know {}",
                    crate::diagnostic::one_of(
                        &PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{{{p}}}}}"))
                            .collect::<Vec<_>>()
                    )
                ),
            };
            Err((format!("unknown placeholder `{{{{{name}}}}}`"), Some(hint)))
        }
    }
}

fn date_format(format: &str) -> Result<Vec<DatePart>, Mistake> {
    let mut parts = Vec::new();
    let mut rest = format;
    'outer: while let Some(c) = rest.chars().next() {
        for token in DATE_TOKENS {
            if let Some(after) = rest.strip_prefix(token) {
                parts.push(DatePart::Token(token));
                rest = after;
                continue 'outer;
            }
        }
        if matches!(c, '-' | '_' | '.') {
            parts.push(DatePart::Literal(c));
            rest = &rest[c.len_utf8()..];
            continue;
        }
        return Err((
            format!("`{rest}` in date format `{format}` is not a date field"),
            Some(
                "date formats use `yyyy`, `yy`, `MM`, `dd`, `HH`, `mm`, `ss` and the separators `-`, `_`, `.`"
                    .to_string(),
            ),
        ));
    }
    if parts.is_empty() {
        return Err((
            "the date format is empty".to_string(),
            Some(format!(
                "for example `{{{{imagebuilder:buildDate:{DEFAULT_DATE_FORMAT}}}}}`"
            )),
        ));
    }
    Ok(parts)
}

fn render_date(out: &mut String, format: &[DatePart], date: DateTime<Utc>) {
    use std::fmt::Write as _;
    for part in format {
        let _ = match part {
            DatePart::Literal(c) => write!(out, "{c}"),
            DatePart::Token("yyyy") => write!(out, "{:04}", date.year()),
            DatePart::Token("yy") => write!(out, "{:02}", date.year().rem_euclid(100)),
            DatePart::Token("MM") => write!(out, "{:02}", date.month()),
            DatePart::Token("dd") => write!(out, "{:02}", date.day()),
            DatePart::Token("HH") => write!(out, "{:02}", date.hour()),
            DatePart::Token("mm") => write!(out, "{:02}", date.minute()),
            DatePart::Token("ss") => write!(out, "{:02}", date.second()),
            DatePart::Token(_) => Ok(()),
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn values() -> NameValues<'static> {
        NameValues {
            name: "debian-12-web",
            version: "1.2.0".parse().unwrap(),
            build_version: 3,
            build_date: Utc.with_ymd_and_hms(2026, 11, 21, 9, 5, 7).unwrap(),
        }
    }

    fn render(text: &str) -> String {
        NameTemplate::parse(text).unwrap().render(&values())
    }

    #[test]
    fn renders_every_placeholder() {
        assert_eq!(
            render("{{imagebuilder:name}}-{{imagebuilder:buildVersion}}"),
            "debian-12-web-3"
        );
        assert_eq!(
            render("{{ imagebuilder:name }}_{{imagebuilder:version}}"),
            "debian-12-web_1.2.0"
        );
        assert_eq!(
            render("img-{{imagebuilder:buildDate}}"),
            "img-20261121090507"
        );
        assert_eq!(
            render("{{imagebuilder:buildDate:yyyyMMddHHmm}}"),
            "202611210905"
        );
        assert_eq!(
            render("{{ imagebuilder:buildDate:yy-MM-dd_HH.mm.ss }}"),
            "26-11-21_09.05.07"
        );
        assert_eq!(
            NameTemplate::default().render(&values()),
            "debian-12-web-1.2.0-3"
        );
        assert_eq!(render("plain"), "plain");
    }

    #[test]
    fn unknown_placeholders_get_suggestions_with_positions() {
        let text = "x-{{imagebuilder:buildDat}}";
        let errors = NameTemplate::parse(text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            &text[errors[0].start..errors[0].end],
            "{{imagebuilder:buildDat}}"
        );
        assert_eq!(
            errors[0].hint.as_deref(),
            Some("did you mean `{{imagebuilder:buildDate}}`?")
        );
        let errors = NameTemplate::parse("{{imagebuilder:buildversion}}").unwrap_err();
        assert_eq!(
            errors[0].hint.as_deref(),
            Some("did you mean `{{imagebuilder:buildVersion}}`?")
        );
        let errors = NameTemplate::parse("{{ foo }}").unwrap_err();
        assert!(
            errors[0]
                .hint
                .as_deref()
                .unwrap()
                .starts_with("name templates know")
        );
    }

    proptest::proptest! {
        /// Any text parses or gives errors whose ranges lie inside it; rendering a template
        /// that parsed never yields a `/`.
        #[test]
        fn parsing_never_panics(text in "[a-z{}: /_.-]{0,40}|.{0,20}") {
            match NameTemplate::parse(&text) {
                Ok(t) => proptest::prop_assert!(!t.render(&values()).contains('/')),
                Err(errors) => {
                    for e in errors {
                        proptest::prop_assert!(e.start <= e.end && e.end <= text.len());
                        proptest::prop_assert!(text.is_char_boundary(e.start) && text.is_char_boundary(e.end));
                    }
                }
            }
        }
    }

    #[test]
    fn every_mistake_is_reported() {
        let errors = NameTemplate::parse("a/b-{{imagebuilder:buildDate:yyyyQQ}}-{{x").unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].message.contains("file name"));
        assert!(errors[1].message.contains("`QQ`"));
        assert!(errors[2].message.contains("never closed"));
        assert!(NameTemplate::parse("").is_err());
        assert!(NameTemplate::parse("a}}b").is_err());
    }
}
