//! The context every file walker (recipes, pipelines, component documents) carries: the
//! problems found so far and the readers of the values all file kinds share, so a mistake gets
//! the same message in every file. Only the table of Image Builder spellings differs from one
//! file kind to the next, and component documents speak AWSTOE's words ([`Reader::awstoe`]).

use crate::diagnostic::{Problem, Span, did_you_mean_hint, one_of};
use crate::yaml::Node;

/// Image Builder's spelling of a setting → how to write it here. Users coming from AWS write
/// these first; a plain "unknown key" would leave them guessing.
pub type ImageBuilderKeys = &'static [(&'static str, &'static str)];

/// The problems of one file as they are found.
pub struct Reader<'s> {
    pub source: &'s str,
    pub problems: Vec<Problem>,
    image_builder_keys: ImageBuilderKeys,
    /// A component document: a scalar is "a string" (AWSTOE's word, "text" elsewhere), and an
    /// unquoted `{{ name }}`, which YAML reads as a mapping, is explained as that.
    awstoe: bool,
}

impl<'s> Reader<'s> {
    pub fn new(source: &'s str, image_builder_keys: ImageBuilderKeys) -> Reader<'s> {
        Reader {
            source,
            problems: Vec::new(),
            image_builder_keys,
            awstoe: false,
        }
    }

    /// A reader for a component document (no Image Builder spellings; see `awstoe`).
    pub fn awstoe(source: &'s str) -> Reader<'s> {
        Reader {
            awstoe: true,
            ..Reader::new(source, &[])
        }
    }

    pub fn error(&mut self, span: Span, message: impl Into<String>, hint: Option<String>) {
        self.problems
            .push(Problem::error(span, message).with_hint_opt(hint));
    }

    pub fn warning(&mut self, span: Span, message: impl Into<String>, hint: Option<String>) {
        self.problems
            .push(Problem::warning(span, message).with_hint_opt(hint));
    }

    /// Whether an error was found since `before` (a length of `problems`).
    pub fn errors_since(&self, before: usize) -> bool {
        self.problems
            .iter()
            .skip(before)
            .any(|p| p.severity == crate::diagnostic::Severity::Error)
    }

    /// The span of the start of `node`, for "missing key" problems (in a file that may be
    /// empty).
    pub fn start_of(&self, node: &Node) -> Span {
        Span::from_offsets(self.source, node.span.start, node.span.start)
    }

    /// The entries of a mapping, with a problem for every key not in `allowed` (the hint
    /// translates an Image Builder spelling when it is one).
    pub fn mapping<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<&'n [(Node, Node)]> {
        let Some(entries) = node.as_mapping() else {
            self.not_a(node, what, "a mapping");
            return None;
        };
        let table = self.image_builder_keys;
        self.problems
            .extend(crate::yaml::unknown_keys(entries, allowed, what, |k| {
                table
                    .iter()
                    .find(|(ib, _)| *ib == k)
                    .map(|(_, how)| format!("`{k}` is Image Builder's; here, {how}"))
            }));
        Some(entries)
    }

    /// Report that `node` is not the kind of value `what` must be.
    pub fn not_a(&mut self, node: &Node, what: &str, expected: &str) {
        if let Some(written) = self.unquoted_template(node) {
            self.error(
                node.span,
                format!("this `{written}` is read by YAML as a mapping, not as text"),
                Some(format!("quote it: `\"{written}\"`")),
            );
            return;
        }
        self.error(
            node.span,
            format!("{what} must be {expected}, found {}", node.describe()),
            None,
        );
    }

    /// In a component document, `{{ name }}` as written when `node` is an unquoted template
    /// that YAML read as a flow mapping (the AWSTOE trap).
    pub fn unquoted_template(&self, node: &Node) -> Option<String> {
        if !self.awstoe || !node.flow || node.as_mapping().is_none() {
            return None;
        }
        let rest = self.source.get(node.span.start..)?;
        if !rest.starts_with("{{") {
            return None;
        }
        let line = rest.lines().next().unwrap_or(rest);
        let end = line.find("}}").map_or(line.len(), |i| i + 2);
        Some(line[..end].to_string())
    }

    /// A non-empty scalar's text (numbers and booleans as written).
    pub fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        if node.is_null() {
            self.error(node.span, format!("{what} is empty"), None);
            return None;
        }
        match node.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let expected = if self.awstoe { "a string" } else { "text" };
                self.not_a(node, what, expected);
                None
            }
        }
    }

    /// [`Reader::string`], or `None` without a problem when the value is empty.
    pub fn optional_string(&mut self, node: &Node, what: &str) -> Option<String> {
        if node.is_null() {
            return None;
        }
        self.string(node, what)
    }

    pub fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.as_bool() {
            Some(b) => Some(b),
            None => {
                // YAML 1.1 read these as booleans; YAML 1.2 (and this parser) reads text.
                let hint = node
                    .as_str()
                    .filter(|s| {
                        matches!(
                            s.to_ascii_lowercase().as_str(),
                            "yes" | "no" | "on" | "off" | "y" | "n"
                        )
                    })
                    .map(|s| {
                        let yes = matches!(s.to_ascii_lowercase().as_str(), "yes" | "on" | "y");
                        format!("YAML 1.2 reads `{s}` as text; write `{yes}`")
                    });
                self.error(
                    node.span,
                    format!(
                        "{what} must be `true` or `false`, found {}",
                        node.describe()
                    ),
                    hint,
                );
                None
            }
        }
    }

    /// A whole number in `min..=max`, with the value and the limit in the message.
    pub fn number(&mut self, node: &Node, what: &str, min: u64, max: u64) -> Option<u64> {
        let Some(n) = node.as_int() else {
            self.not_a(node, what, "a whole number");
            return None;
        };
        if n < min as i64 {
            self.error(
                node.span,
                format!("{what} ({n}) is below the minimum ({min})"),
                None,
            );
            return None;
        }
        if n > max as i64 {
            self.error(
                node.span,
                format!("{what} ({n}) is above the maximum ({max})"),
                None,
            );
            return None;
        }
        Some(n as u64)
    }

    /// One of a closed set of words, with a suggestion for a near miss.
    pub fn word<T: Copy>(
        &mut self,
        node: &Node,
        noun: &str,
        names: &[&str],
        from_name: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let text = self.string(node, noun)?;
        if let Some(value) = from_name(&text) {
            return Some(value);
        }
        let hint = did_you_mean_hint(&text, names.iter().copied());
        self.error(
            node.span,
            format!("unknown {noun} `{text}`; expected {}", one_of(names)),
            hint,
        );
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    const KEYS: ImageBuilderKeys = &[("semanticVersion", "write `version: 1.0.0`")];

    fn with<T>(text: &str, f: impl FnOnce(&mut Reader<'_>, &Node) -> T) -> (T, Vec<Problem>) {
        let (root, problems) = crate::yaml::parse(text);
        assert!(problems.is_empty(), "{problems:?}");
        let root = root.unwrap();
        let mut cx = Reader::new(text, KEYS);
        let out = f(&mut cx, &root);
        (out, cx.problems)
    }

    #[test]
    fn unknown_keys_use_the_file_kinds_table() {
        let (entries, problems) = with("semanticVersion: 1\nnam: x\n", |cx, n| {
            cx.mapping(n, "a recipe", &["name"]).map(<[_]>::len)
        });
        assert_eq!(entries, Some(2));
        let hints: Vec<_> = problems.iter().map(|p| p.hint.clone().unwrap()).collect();
        assert_eq!(
            hints,
            [
                "`semanticVersion` is Image Builder's; here, write `version: 1.0.0`",
                "did you mean `name`?"
            ]
        );
    }

    #[test]
    fn yaml_1_1_booleans_get_a_hint() {
        let (b, problems) = with("on", |cx, n| cx.boolean(n, "`x`"));
        assert_eq!(b, None);
        assert_eq!(
            problems[0].message,
            "`x` must be `true` or `false`, found a string"
        );
        assert_eq!(
            problems[0].hint.as_deref(),
            Some("YAML 1.2 reads `on` as text; write `true`")
        );
    }

    #[test]
    fn numbers_are_bounded_and_words_suggested() {
        let (n, problems) = with("0", |cx, n| cx.number(n, "cpus", 1, 4));
        assert_eq!(n, None);
        assert_eq!(problems[0].message, "cpus (0) is below the minimum (1)");
        let (w, problems) = with("kvmm", |cx, n| {
            cx.word(n, "accelerator", &["kvm", "tcg"], |s| {
                (s == "kvm").then_some(1)
            })
        });
        assert_eq!(w, None);
        assert_eq!(problems[0].hint.as_deref(), Some("did you mean `kvm`?"));
    }
}
