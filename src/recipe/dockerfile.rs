//! A container recipe's `dockerfileTemplate`: a Containerfile with Image Builder's three
//! placeholders, checked when the recipe is read and rendered when the build runs.
//!
//! - `{{{ imagebuilder:parentImage }}}` becomes the pinned parent (in a `FROM` line, which
//!   the template must have; it may be used elsewhere too, e.g. in a `LABEL`);
//! - `{{{ imagebuilder:environments }}}` becomes what the components need in the image
//!   (a line of its own, at most once);
//! - `{{{ imagebuilder:components }}}` becomes the instructions that run the components (a
//!   line of its own, exactly once, after the `FROM` line).
//!
//! Everything else is the user's and is left to buildah: `ENV`, `LABEL`, `USER`, stages after
//! the placeholders. Pure: positions are offsets in the template's text; the recipe walker
//! translates them to the file.

use std::ops::Range;

use crate::diagnostic::{did_you_mean, one_of};

/// The template of a container recipe without `dockerfileTemplate` (Image Builder's).
pub const DEFAULT_TEMPLATE: &str = "FROM {{{ imagebuilder:parentImage }}}\n{{{ imagebuilder:environments }}}\n{{{ imagebuilder:components }}}\n";

/// One of the template's placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placeholder {
    ParentImage,
    Environments,
    Components,
}

impl Placeholder {
    pub const ALL: [Placeholder; 3] = [
        Placeholder::ParentImage,
        Placeholder::Environments,
        Placeholder::Components,
    ];

    /// The name after `imagebuilder:`.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::ParentImage => "parentImage",
            Placeholder::Environments => "environments",
            Placeholder::Components => "components",
        }
    }

    fn from_name(name: &str) -> Option<Placeholder> {
        Placeholder::ALL.into_iter().find(|p| p.name() == name)
    }

    /// As written in a template: `{{{ imagebuilder:components }}}`.
    pub fn written(self) -> String {
        format!("{{{{{{ imagebuilder:{} }}}}}}", self.name())
    }
}

/// A checked template: its text and where each placeholder is (in text order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct DockerfileTemplate {
    text: String,
    placeholders: Vec<(Placeholder, Range<usize>)>,
}

/// A mistake in a template: where (`None`: the template as a whole, e.g. a missing line),
/// what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateProblem {
    /// Byte offsets in the template's text.
    pub at: Option<Range<usize>>,
    pub message: String,
    pub hint: Option<String>,
}

impl TemplateProblem {
    fn new(at: Option<Range<usize>>, message: impl Into<String>, hint: impl Into<String>) -> Self {
        TemplateProblem {
            at,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

/// A template that is not valid, for serde (a plan read back).
#[derive(Debug, thiserror::Error)]
#[error("not a valid dockerfile template: {}", .0.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; "))]
pub struct InvalidTemplate(pub Vec<TemplateProblem>);

/// One line of the template: its byte range (without the newline).
struct Line {
    range: Range<usize>,
    /// It continues the instruction of an earlier line (which ended in `\`).
    continued: bool,
}

fn lines(text: &str) -> Vec<Line> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut continuing = false;
    for piece in text.split_inclusive('\n') {
        let body = piece.strip_suffix('\n').unwrap_or(piece);
        let body = body.strip_suffix('\r').unwrap_or(body);
        out.push(Line {
            range: start..start + body.len(),
            continued: continuing,
        });
        let trimmed = body.trim_end();
        // A comment inside a continued instruction does not end it (as in Dockerfiles).
        if !(continuing && trimmed.trim_start().starts_with('#')) {
            continuing = trimmed.ends_with('\\');
        }
        start += piece.len();
    }
    out
}

impl DockerfileTemplate {
    /// The default template (`DEFAULT_TEMPLATE`).
    pub fn default_template() -> DockerfileTemplate {
        #[expect(
            clippy::expect_used,
            reason = "the default template is a constant, checked by a test"
        )]
        DockerfileTemplate::parse(DEFAULT_TEMPLATE).expect("the default template is valid")
    }

    /// Check `text`, returning every mistake in it.
    pub fn parse(text: &str) -> Result<DockerfileTemplate, Vec<TemplateProblem>> {
        let mut problems = Vec::new();
        let mut placeholders = Vec::new();
        let lines = lines(text);
        for line in &lines {
            scan_line(text, line.range.clone(), &mut placeholders, &mut problems);
        }
        let line_of = |at: usize| {
            lines
                .iter()
                .find(|l| l.range.start <= at && at <= l.range.end)
        };

        // The FROM line that starts from the parent.
        let from_parent = lines.iter().find(|l| {
            !l.continued
                && from_image(&text[l.range.clone()]).is_some_and(|(at, _)| {
                    placeholders.iter().any(|(p, r)| {
                        *p == Placeholder::ParentImage && r.start == l.range.start + at
                    })
                })
        });
        let from_parent_start = from_parent.map(|l| l.range.start);
        if from_parent.is_none() {
            let first_from = lines.iter().find_map(|l| {
                (!l.continued)
                    .then(|| from_image(&text[l.range.clone()]))
                    .flatten()
                    .map(|(at, image)| (l.range.start + at, image))
            });
            let hint = format!(
                "start from the recipe's `parentImage`: `FROM {}`",
                Placeholder::ParentImage.written()
            );
            match first_from {
                Some((at, image)) => problems.push(TemplateProblem::new(
                    Some(at..at + image.len()),
                    format!(
                        "`FROM {image}` does not start from the parent image; the template has no `FROM {}` line",
                        Placeholder::ParentImage.written()
                    ),
                    hint,
                )),
                None => problems.push(TemplateProblem::new(
                    None,
                    format!(
                        "the template has no `FROM {}` line",
                        Placeholder::ParentImage.written()
                    ),
                    hint,
                )),
            }
        }

        // Environments and components: each a line of its own, after the FROM line; the
        // components exactly once, the environments at most once.
        for which in [Placeholder::Environments, Placeholder::Components] {
            let mut seen = 0;
            for (_, range) in placeholders.iter().filter(|(p, _)| *p == which) {
                seen += 1;
                let written = which.written();
                let alone = line_of(range.start).is_some_and(|l| {
                    !l.continued
                        && text[l.range.clone()].trim() == &text[range.clone()]
                        && !text[..l.range.start].trim_end().ends_with('\\')
                });
                if !alone {
                    problems.push(TemplateProblem::new(
                        Some(range.clone()),
                        format!("`{written}` must be alone on its line"),
                        match which {
                            Placeholder::Components => "it becomes one `RUN` instruction per component: put it on a line of its own",
                            _ => "it becomes lines of its own: put it on a line of its own",
                        },
                    ));
                } else if seen > 1 {
                    problems.push(TemplateProblem::new(
                        Some(range.clone()),
                        format!("`{written}` is written more than once"),
                        "each is used once: remove this line",
                    ));
                } else if from_parent_start.is_some_and(|from| range.start < from) {
                    problems.push(TemplateProblem::new(
                        Some(range.clone()),
                        format!(
                            "`{written}` comes before `FROM {}`",
                            Placeholder::ParentImage.written()
                        ),
                        "move it after the `FROM` line: it works in the image built from the parent",
                    ));
                }
            }
            if which == Placeholder::Components && seen == 0 {
                problems.push(TemplateProblem::new(
                    None,
                    format!("the template has no `{}` line", which.written()),
                    format!(
                        "add the line `{}` after the `FROM` line: it runs the recipe's components",
                        which.written()
                    ),
                ));
            }
        }

        if problems.is_empty() {
            Ok(DockerfileTemplate {
                text: text.to_string(),
                placeholders,
            })
        } else {
            problems.sort_by_key(|p| p.at.as_ref().map_or(usize::MAX, |r| r.start));
            Err(problems)
        }
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The Containerfile: each placeholder replaced by its value (values may span lines).
    pub fn render(&self, parent_image: &str, environments: &str, components: &str) -> String {
        let mut out = String::with_capacity(self.text.len() + components.len());
        let mut rest = 0;
        for (placeholder, range) in &self.placeholders {
            out.push_str(&self.text[rest..range.start]);
            out.push_str(match placeholder {
                Placeholder::ParentImage => parent_image,
                Placeholder::Environments => environments,
                Placeholder::Components => components,
            });
            rest = range.end;
        }
        out.push_str(&self.text[rest..]);
        out
    }
}

impl From<DockerfileTemplate> for String {
    fn from(template: DockerfileTemplate) -> String {
        template.text
    }
}

impl TryFrom<String> for DockerfileTemplate {
    type Error = InvalidTemplate;
    fn try_from(text: String) -> Result<DockerfileTemplate, InvalidTemplate> {
        DockerfileTemplate::parse(&text).map_err(InvalidTemplate)
    }
}

const OPEN: &str = "{{{";
const CLOSE: &str = "}}}";

/// The placeholders of one line (a placeholder never spans lines).
fn scan_line(
    text: &str,
    line: Range<usize>,
    placeholders: &mut Vec<(Placeholder, Range<usize>)>,
    problems: &mut Vec<TemplateProblem>,
) {
    let body = &text[line.clone()];
    let mut rest = 0;
    while let Some(open) = body[rest..].find(OPEN).map(|i| i + rest) {
        let Some(close) = body[open + OPEN.len()..]
            .find(CLOSE)
            .map(|i| i + open + OPEN.len())
        else {
            problems.push(TemplateProblem::new(
                Some(line.start + open..line.end),
                "`{{{` is never closed on its line",
                "write a placeholder as `{{{ imagebuilder:components }}}`, on one line",
            ));
            return;
        };
        let end = close + CLOSE.len();
        let range = line.start + open..line.start + end;
        let inner = body[open + OPEN.len()..close].trim();
        let name = inner.strip_prefix("imagebuilder:").map(str::trim);
        match name.and_then(Placeholder::from_name) {
            Some(p) => placeholders.push((p, range)),
            None => {
                let known: Vec<String> = Placeholder::ALL.iter().map(|p| p.written()).collect();
                let hint = match did_you_mean(
                    name.unwrap_or(inner),
                    Placeholder::ALL.iter().map(|p| p.name()),
                ) {
                    Some(close) => format!(
                        "did you mean `{}`?",
                        Placeholder::from_name(close)
                            .map_or_else(String::new, Placeholder::written)
                    ),
                    None => format!("the placeholders are {}", one_of(&known)),
                };
                problems.push(TemplateProblem {
                    at: Some(range),
                    message: format!("unknown placeholder `{}`", &body[open..end]),
                    hint: Some(hint),
                });
            }
        }
        rest = end;
    }
}

/// In a `FROM [--flag=value …] image [AS name]` line: where the image starts in the line and
/// the image as written.
fn from_image(line: &str) -> Option<(usize, &str)> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    let (word, _) = trimmed.split_once(char::is_whitespace)?;
    if !word.eq_ignore_ascii_case("FROM") {
        return None;
    }
    let mut at = indent + word.len();
    loop {
        let rest = &line[at..];
        let token_start = at + (rest.len() - rest.trim_start().len());
        let token_rest = &line[token_start..];
        let token_len = token_rest
            .find(char::is_whitespace)
            .unwrap_or(token_rest.len());
        let token = &token_rest[..token_len];
        if token.is_empty() {
            return None;
        }
        if token.starts_with("--") {
            at = token_start + token_len;
            continue;
        }
        // A placeholder written with its inner spaces is one token.
        if token.starts_with(OPEN)
            && let Some(close) = token_rest.find(CLOSE)
        {
            return Some((token_start, &token_rest[..close + CLOSE.len()]));
        }
        return Some((token_start, token));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(Option<String>, String)> {
        DockerfileTemplate::parse(text)
            .unwrap_err()
            .into_iter()
            .map(|p| (p.at.map(|r| text[r].to_string()), p.message))
            .collect()
    }

    #[test]
    fn the_default_template_is_valid_and_renders_each_value() {
        let t = DockerfileTemplate::default_template();
        assert_eq!(t.text(), DEFAULT_TEMPLATE);
        assert_eq!(
            t.render("oci:/x@sha256:1", "# env", "RUN a\nRUN b"),
            "FROM oci:/x@sha256:1\n# env\nRUN a\nRUN b\n"
        );
    }

    #[test]
    fn a_custom_template_keeps_the_users_lines() {
        let text = "# syntax\nFROM --platform=linux/amd64 {{{imagebuilder:parentImage}}} AS base\nENV A=1\nLABEL from={{{ imagebuilder:parentImage }}}\n  {{{ imagebuilder:components }}}  \nUSER nobody\nFROM base AS final\n";
        let t = DockerfileTemplate::parse(text).unwrap();
        assert_eq!(
            t.render("P", "", "RUN c"),
            "# syntax\nFROM --platform=linux/amd64 P AS base\nENV A=1\nLABEL from=P\n  RUN c  \nUSER nobody\nFROM base AS final\n"
        );
        // Serialized as its text, read back checked.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            serde_json::from_str::<DockerfileTemplate>(&json).unwrap(),
            t
        );
        assert!(serde_json::from_str::<DockerfileTemplate>("\"FROM x\"").is_err());
    }

    #[test]
    fn every_mistake_is_reported_at_its_place() {
        assert_eq!(
            problems("FROM debian:12\n{{{ imagebuilder:component }}}\n"),
            [
                (
                    Some("debian:12".into()),
                    "`FROM debian:12` does not start from the parent image; the template has no `FROM {{{ imagebuilder:parentImage }}}` line".into()
                ),
                (
                    Some("{{{ imagebuilder:component }}}".into()),
                    "unknown placeholder `{{{ imagebuilder:component }}}`".into()
                ),
                (
                    None,
                    "the template has no `{{{ imagebuilder:components }}}` line".into()
                ),
            ]
        );
        assert_eq!(
            problems(
                "{{{ imagebuilder:environments }}}\nFROM {{{ imagebuilder:parentImage }}}\nRUN x {{{ imagebuilder:components }}}\n{{{ imagebuilder:components }}}\n{{{ imagebuilder:components }}}\nRUN {{{ oops\n"
            ),
            [
                (
                    Some("{{{ imagebuilder:environments }}}".into()),
                    "`{{{ imagebuilder:environments }}}` comes before `FROM {{{ imagebuilder:parentImage }}}`".into()
                ),
                (
                    Some("{{{ imagebuilder:components }}}".into()),
                    "`{{{ imagebuilder:components }}}` must be alone on its line".into()
                ),
                (
                    Some("{{{ imagebuilder:components }}}".into()),
                    "`{{{ imagebuilder:components }}}` is written more than once".into()
                ),
                (
                    Some("{{{ imagebuilder:components }}}".into()),
                    "`{{{ imagebuilder:components }}}` is written more than once".into()
                ),
                (
                    Some("{{{ oops".into()),
                    "`{{{` is never closed on its line".into()
                ),
            ]
        );
        assert_eq!(
            problems("RUN true\n{{{ imagebuilder:components }}}\n"),
            [(
                None,
                "the template has no `FROM {{{ imagebuilder:parentImage }}}` line".into()
            )]
        );
        // A placeholder inside a continued instruction is not alone on its line.
        let continued =
            "FROM {{{ imagebuilder:parentImage }}}\nRUN a \\\n{{{ imagebuilder:components }}}\n";
        assert_eq!(problems(continued).len(), 1);
    }

    proptest::proptest! {
        /// Any text is a template or problems whose places are in the text, never a panic.
        #[test]
        fn any_text_is_checked_without_panic(
            text in "(FROM |RUN |\\{\\{\\{ ?|imagebuilder:|parentImage|components|environments| ?\\}\\}\\}|\\\\|\n|#|\u{3000}|é|x){0,40}"
        ) {
            match DockerfileTemplate::parse(&text) {
                Ok(t) => {
                    let _ = t.render("p", "e", "c");
                }
                Err(problems) => {
                    proptest::prop_assert!(!problems.is_empty());
                    for p in problems {
                        if let Some(r) = p.at {
                            proptest::prop_assert!(text.get(r).is_some());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_unknown_placeholder_suggests_the_closest() {
        let err = DockerfileTemplate::parse(
            "FROM {{{ imagebuilder:parentimage }}}\n{{{ imagebuilder:components }}}\n",
        )
        .unwrap_err();
        assert_eq!(
            err[0].hint.as_deref(),
            Some("did you mean `{{{ imagebuilder:parentImage }}}`?")
        );
        let err = DockerfileTemplate::parse(
            "FROM {{{ imagebuilder:parentImage }}}\n{{{ x }}}\n{{{ imagebuilder:components }}}\n",
        )
        .unwrap_err();
        assert_eq!(
            err[0].hint.as_deref(),
            Some(
                "the placeholders are `{{{ imagebuilder:parentImage }}}`, `{{{ imagebuilder:environments }}}` or `{{{ imagebuilder:components }}}`"
            )
        );
    }
}
