//! Problems found in input files, collected (never stop at the first) and rendered as
//! `error: … --> file:line:col` with the source line, a caret and a hint.
//!
//! Generic over what the file is (component document, recipe, pipeline): the caller names the
//! noun (`"component document"`) and, optionally, what the failure means for the command
//! (`"nothing was started"`). Nothing here reads files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anstyle::{AnsiColor, Style};
use serde::Serialize;

/// A byte range in a source file with the 1-based line and column (in characters) of its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    /// 1-based line and column of `start`.
    pub line: usize,
    pub col: usize,
}

impl Span {
    /// The span of `source[start..end]`, with line and column computed from the text.
    pub fn from_offsets(source: &str, start: usize, end: usize) -> Span {
        let start = source.floor_char_boundary(start);
        let end = source.floor_char_boundary(end.clamp(start, source.len()));
        let before = &source[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = source[line_start..start].chars().count() + 1;
        Span {
            start,
            end,
            line,
            col,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file is invalid.
    Error,
    /// Worth knowing; the file is still valid.
    Warning,
}

/// One thing wrong in a file: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub span: Span,
    /// What is wrong, with the offending value (`unknown action `ExecBash``).
    pub message: String,
    /// How to fix it (`did you mean `ExecuteBash`?`).
    pub hint: Option<String>,
    pub severity: Severity,
}

impl Problem {
    pub fn error(span: Span, message: impl Into<String>) -> Problem {
        Problem {
            span,
            message: message.into(),
            hint: None,
            severity: Severity::Error,
        }
    }

    pub fn warning(span: Span, message: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Warning,
            ..Problem::error(span, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Problem {
        self.hint = Some(hint.into());
        self
    }

    /// Set the hint only when there is one (e.g. a "did you mean" that found nothing close).
    pub fn with_hint_opt(mut self, hint: Option<String>) -> Problem {
        self.hint = hint;
        self
    }
}

/// All problems of one file, with the file's text so they can be shown in context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    path: PathBuf,
    source: String,
    /// What the file should have been: "component document", "recipe".
    noun: String,
    /// What the failure means for the command, appended to the heading ("nothing was started").
    consequence: Option<String>,
    problems: Vec<Problem>,
}

impl Diagnostics {
    pub fn new(
        path: impl Into<PathBuf>,
        source: impl Into<String>,
        noun: impl Into<String>,
    ) -> Self {
        Diagnostics {
            path: path.into(),
            source: source.into(),
            noun: noun.into(),
            consequence: None,
            problems: Vec::new(),
        }
    }

    pub fn with_consequence(mut self, consequence: impl Into<String>) -> Self {
        self.consequence = Some(consequence.into());
        self
    }

    pub fn push(&mut self, problem: Problem) {
        self.problems.push(problem);
    }

    pub fn extend(&mut self, problems: impl IntoIterator<Item = Problem>) {
        self.problems.extend(problems);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Problems in file order (errors and warnings).
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn len(&self) -> usize {
        self.problems.len()
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn error_count(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }

    pub fn has_errors(&self) -> bool {
        self.error_count() > 0
    }

    /// Each problem on one line, for logs: `path:line:col: warning: message (hint: …)`.
    pub fn lines(&self) -> Vec<String> {
        self.problems
            .iter()
            .map(|p| {
                let severity = match p.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                };
                let hint = p
                    .hint
                    .as_ref()
                    .map(|h| format!(" (hint: {h})"))
                    .unwrap_or_default();
                format!(
                    "{}:{}:{}: {severity}: {}{hint}",
                    self.path.display(),
                    p.span.line,
                    p.span.col,
                    p.message
                )
            })
            .collect()
    }

    /// Sort by position (stable, so problems at one place keep the order they were found in).
    pub fn sort(&mut self) {
        self.problems
            .sort_by_key(|p| (p.span.start, p.span.line, p.span.col));
    }

    /// The STYLE.md rendering: a heading, then each problem with its source line and a caret.
    /// Errors first, then warnings. Empty when there are no problems.
    pub fn render(&self, color: bool) -> String {
        if self.problems.is_empty() {
            return String::new();
        }
        let styles = Styles::new(color);
        let errors = self.error_count();
        let warnings = self.problems.len() - errors;
        let (path, noun) = (self.path.display(), &self.noun);
        let mut out = if errors > 0 {
            let error = styles.error.render_text("error");
            let problems = plural(errors, "problem", "problems");
            let then = (self.consequence.as_ref()).map_or(String::new(), |c| format!("; {c}"));
            format!("{error}: `{path}` is not a valid {noun} ({errors} {problems}){then}")
        } else {
            let warning = styles.warning.render_text("warning");
            let plural = plural(warnings, "warning", "warnings");
            format!("{warning}: `{path}` is a valid {noun} with {warnings} {plural}")
        };
        out.push('\n');
        let width = self
            .problems
            .iter()
            .map(|p| p.span.line.to_string().len())
            .max()
            .unwrap_or(1);
        let ordered = self
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .chain(
                self.problems
                    .iter()
                    .filter(|p| p.severity == Severity::Warning),
            );
        for (i, problem) in ordered.enumerate() {
            if i > 0 {
                out.push('\n');
            }
            self.render_problem(&mut out, problem, width, &styles);
        }
        out
    }

    fn render_problem(&self, out: &mut String, problem: &Problem, width: usize, styles: &Styles) {
        let span = problem.span;
        let pad = " ".repeat(width);
        let gutter = styles.gutter.render_text("|");
        let _ = writeln!(
            out,
            "{pad} {} {}:{}:{}",
            styles.gutter.render_text("-->"),
            self.path.display(),
            span.line,
            span.col
        );
        let line_text = self.source.lines().nth(span.line.saturating_sub(1));
        let message = match problem.severity {
            Severity::Error => problem.message.clone(),
            Severity::Warning => format!("warning: {}", problem.message),
        };
        match line_text {
            Some(text) => {
                let shown = text.replace('\t', "    ");
                let prefix: usize = text
                    .chars()
                    .take(span.col.saturating_sub(1))
                    .map(|c| if c == '\t' { 4 } else { 1 })
                    .sum();
                // The caret covers the span on its first line, at least one column.
                // `get`: a span made by hand (not by our readers) may not sit on a character
                // boundary; rendering must not panic for it.
                let line_start = self
                    .source
                    .get(..span.start.min(self.source.len()))
                    .unwrap_or("")
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                let line_end = line_start + text.len();
                let hi = span.end.min(line_end);
                let covered = self
                    .source
                    .get(span.start.min(hi)..hi)
                    .map_or(0, |s| s.chars().count());
                let carets = "^".repeat(covered.max(1));
                let _ = writeln!(out, " {pad} {gutter}");
                let line_no = styles.gutter.render_text(&format!("{:>width$}", span.line));
                let _ = writeln!(out, " {line_no} {gutter} {}", shown.trim_end());
                let marker = match problem.severity {
                    Severity::Error => &styles.error,
                    Severity::Warning => &styles.warning,
                };
                let _ = writeln!(
                    out,
                    " {pad} {gutter} {}{} {message}",
                    " ".repeat(prefix),
                    marker.render_text(&carets)
                );
            }
            // End of file (e.g. a syntax error after the last line): no line to show.
            None => {
                let _ = writeln!(out, " {pad} {gutter}");
                let _ = writeln!(out, " {pad} {gutter} {message}");
            }
        }
        if let Some(hint) = &problem.hint {
            let _ = writeln!(out, " {pad} = {}: {hint}", styles.hint.render_text("hint"));
        }
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostics {}

/// `one` when `n` is 1, else `many`: `format!("{n} {}", plural(n, "file", "files"))`.
pub fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

struct Styles {
    error: Painter,
    warning: Painter,
    gutter: Painter,
    hint: Painter,
}

impl Styles {
    fn new(color: bool) -> Styles {
        let paint = |style: Style| Painter(color.then_some(style));
        Styles {
            error: paint(Style::new().bold().fg_color(Some(AnsiColor::Red.into()))),
            warning: paint(Style::new().bold().fg_color(Some(AnsiColor::Yellow.into()))),
            gutter: paint(Style::new().bold().fg_color(Some(AnsiColor::Blue.into()))),
            hint: paint(Style::new().bold().fg_color(Some(AnsiColor::Cyan.into()))),
        }
    }
}

struct Painter(Option<Style>);

impl Painter {
    fn render_text(&self, text: &str) -> String {
        match self.0 {
            Some(style) => format!("{style}{text}{style:#}"),
            None => text.to_string(),
        }
    }
}

/// "did you mean" among the files next to a missing one: the hint for a path that does not
/// exist (`None` when no sibling is close).
pub fn close_file_hint(missing: &std::path::Path) -> Option<String> {
    let dir = missing
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = missing.file_name()?.to_str()?;
    let siblings: Vec<String> = fs_err::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let close = did_you_mean(name, siblings.iter().map(String::as_str))?;
    Some(format!("did you mean `{close}`?"))
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            // Case-only differences are the most likely typo of all.
            let score = if c.to_lowercase() == lower {
                1.0
            } else {
                strsim::jaro_winkler(&lower, &c.to_lowercase())
            };
            (score, c)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// "did you mean `x`?" for the closest of `candidates` to `word` (see [`did_you_mean`]).
pub fn did_you_mean_hint<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    did_you_mean(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// `` `a`, `b` or `c` `` for messages listing what is expected.
pub fn one_of<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("`{}`", s.as_ref())).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The causes of `error`, outermost first, without `error` itself: what a printer shows as
/// `Caused by:` lines.
pub fn causes<'a>(
    error: &'a dyn std::error::Error,
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(error.source(), |e| e.source())
}

/// `error` and its causes on one line, `outer: inner: innermost`, for logs, lists and JSON. A
/// cause whose text the line already holds is left out (some libraries repeat their source in
/// their own message).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    for cause in causes(error) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    const RECIPE: &str =
        "name: web\nversion: 1.0.0\nvm:\n  cpus: 2\n  memory: 2G\n  accelerator: kvmm\n";

    #[test]
    fn renders_the_style_guide_example_exactly() {
        let start = RECIPE.find("kvmm").unwrap();
        let mut d = Diagnostics::new("images/web/recipe.yml", RECIPE, "recipe")
            .with_consequence("nothing was started");
        d.push(
            Problem::error(
                Span::from_offsets(RECIPE, start, start + 4),
                "unknown accelerator `kvmm`; expected `auto`, `kvm` or `tcg`",
            )
            .with_hint("did you mean `kvm`?"),
        );
        assert_eq!(
            d.render(false),
            "error: `images/web/recipe.yml` is not a valid recipe (1 problem); nothing was started
  --> images/web/recipe.yml:6:16
   |
 6 |   accelerator: kvmm
   |                ^^^^ unknown accelerator `kvmm`; expected `auto`, `kvm` or `tcg`
   = hint: did you mean `kvm`?
"
        );
        assert_eq!(d.to_string(), d.render(false));
        assert!(d.render(true).contains("\u{1b}["));
    }

    #[test]
    fn span_from_offsets_counts_characters_not_bytes() {
        let text = "a: é\nbé: x\n";
        let x = text.find('x').unwrap();
        let span = Span::from_offsets(text, x, x + 1);
        assert_eq!((span.line, span.col), (2, 5));
    }

    #[test]
    fn gutter_widens_for_two_digit_lines_and_warnings_follow_errors() {
        let text = (1..=12).map(|i| format!("k{i}: v\n")).collect::<String>();
        let mut d = Diagnostics::new("x.yml", text.clone(), "component document");
        let at = |line: usize| {
            let start = text
                .match_indices('\n')
                .nth(line - 2)
                .map_or(0, |(i, _)| i + 1);
            Span::from_offsets(&text, start, start + 2)
        };
        d.push(Problem::warning(at(2), "just so you know"));
        d.push(Problem::error(at(12), "bad key"));
        let out = d.render(false);
        assert!(out.starts_with("error: `x.yml` is not a valid component document (1 problem)\n"));
        let bad = out.find("bad key").unwrap();
        let warn = out.find("warning: just so you know").unwrap();
        assert!(bad < warn, "{out}");
        assert!(out.contains("\n 12 | k12: v\n"), "{out}");
        assert!(out.contains("\n  2 | k2: v\n"), "{out}");
        assert_eq!(
            d.lines(),
            [
                "x.yml:2:1: warning: just so you know",
                "x.yml:12:1: error: bad key"
            ]
        );
    }

    #[test]
    fn hand_made_spans_never_panic() {
        let text = "é\nab\n";
        for span in [
            Span {
                start: 1,
                end: 0,
                line: 1,
                col: 1,
            },
            Span {
                start: 50,
                end: 60,
                line: 1,
                col: 3,
            },
            Span {
                start: 0,
                end: 0,
                line: 0,
                col: 0,
            },
            Span {
                start: 4,
                end: 2,
                line: 9,
                col: 9,
            },
        ] {
            let mut d = Diagnostics::new("x.yml", text, "recipe");
            d.push(Problem::error(span, "m").with_hint("h"));
            assert!(d.render(false).contains(" m"));
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("ExecBash", ["ExecuteBash", "Reboot"]),
            Some("ExecuteBash")
        );
        assert_eq!(
            did_you_mean("onfailure", ["onFailure", "name"]),
            Some("onFailure")
        );
        assert_eq!(did_you_mean("zzz", ["ExecuteBash"]), None);
        assert_eq!(one_of(&["auto", "kvm", "tcg"]), "`auto`, `kvm` or `tcg`");
    }

    #[test]
    fn an_error_chain_is_one_line_without_repeats() {
        #[derive(Debug, thiserror::Error)]
        #[error("could not write `out.json`")]
        struct Outer(#[source] std::io::Error);
        let inner = std::io::Error::other("disk full");
        assert_eq!(
            error_chain(&Outer(inner)),
            "could not write `out.json`: disk full"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("request failed: disk full")]
        struct Repeats(#[source] std::io::Error);
        let repeats = Repeats(std::io::Error::other("disk full"));
        assert_eq!(error_chain(&repeats), "request failed: disk full");
        assert_eq!(causes(&repeats).count(), 1);
    }
}
