//! YAML read into a node tree that keeps the span, style and source text of every value.
//!
//! Built on `saphyr-parser`'s event API, which gives a position for every event; serde-based
//! YAML crates lose positions of values or keys, and our errors must point at
//! `file:line:col`. Values are not typed here: scalars keep their text and style, and
//! callers interpret them (a plain `0644` is a file mode to one caller, a number to another).
//! Generic: component documents, recipes and pipelines all read YAML through this.
//!
//! Defences against hostile input: aliases are expanded with a node budget (no "billion
//! laughs"), nesting depth is capped (no stack overflow when the tree is dropped or walked),
//! and only the first document of a stream is read.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle as SaphyrStyle};

use crate::diagnostic::{Problem, Span};

pub mod reader;

/// Maximum nesting of sequences and mappings.
pub const MAX_DEPTH: usize = 64;

/// Maximum number of nodes created by expanding aliases, on top of the nodes written.
pub const ALIAS_BUDGET: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarStyle {
    Plain,
    SingleQuoted,
    DoubleQuoted,
    /// `|`
    Literal,
    /// `>`
    Folded,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// The value after YAML unquoting, escapes and folding.
    pub value: String,
    pub style: ScalarStyle,
    /// The scalar as written in the file (with its quotes; block scalars: their content lines).
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Scalar(Scalar),
    Sequence(Vec<Node>),
    /// Keys in file order; duplicate keys are reported as problems and only the first is kept.
    Mapping(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub kind: NodeKind,
    /// An explicit tag (`!!str`), as `handle` + `suffix`.
    pub tag: Option<String>,
    /// Written in flow style (`{…}` / `[…]`) rather than block style.
    pub flow: bool,
}

impl Node {
    pub fn as_scalar(&self) -> Option<&Scalar> {
        match &self.kind {
            NodeKind::Scalar(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_sequence(&self) -> Option<&[Node]> {
        match &self.kind {
            NodeKind::Sequence(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_mapping(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            NodeKind::Mapping(entries) => Some(entries),
            _ => None,
        }
    }

    /// A plain scalar that YAML's core schema reads as null (`~`, `null`, nothing at all).
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar(s) if s.style == ScalarStyle::Plain
            && self.tag.is_none()
            && matches!(s.value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The string value of a scalar of any style (numbers and booleans as written).
    pub fn as_str(&self) -> Option<&str> {
        self.as_scalar().map(|s| s.value.as_str())
    }

    /// A plain scalar the core schema reads as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self.plain()? {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => None,
        }
    }

    /// A plain scalar the core schema reads as an integer (decimal, `0o` octal, `0x` hex).
    pub fn as_int(&self) -> Option<i64> {
        let text = self.plain()?;
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let magnitude = if let Some(oct) = digits.strip_prefix("0o") {
            i64::from_str_radix(oct, 8).ok()?
        } else if let Some(hex) = digits.strip_prefix("0x") {
            i64::from_str_radix(hex, 16).ok()?
        } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse::<i64>().ok()?
        } else {
            return None;
        };
        Some(if negative { -magnitude } else { magnitude })
    }

    /// A plain scalar the core schema reads as a number (integer or float, not `.inf`/`.nan`).
    pub fn as_number(&self) -> Option<f64> {
        if let Some(i) = self.as_int() {
            return Some(i as f64);
        }
        let text = self.plain()?;
        let looks_numeric = text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
            && text.bytes().any(|b| b.is_ascii_digit());
        if looks_numeric {
            text.parse().ok()
        } else {
            None
        }
    }

    /// The text of an untagged plain scalar (the only style YAML gives a non-string type).
    fn plain(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar(s) if s.style == ScalarStyle::Plain && self.tag.is_none() => {
                Some(s.value.as_str())
            }
            _ => None,
        }
    }

    /// The value of `key` in a mapping whose keys are scalars.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key node and value of `key`.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        self.as_mapping()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, v)| (k, v))
    }

    /// What kind of value this is, for messages ("a list", "a mapping", "a string").
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            NodeKind::Sequence(_) => "a list",
            NodeKind::Mapping(_) => "a mapping",
            NodeKind::Scalar(_) if self.is_null() => "empty",
            NodeKind::Scalar(_) if self.as_bool().is_some() => "a boolean",
            NodeKind::Scalar(_) if self.as_int().is_some() => "an integer",
            NodeKind::Scalar(_) if self.as_number().is_some() => "a number",
            NodeKind::Scalar(_) => "a string",
        }
    }
}

/// The first document of `source` and the problems found (syntax error, duplicate keys,
/// too many aliases, too deep). `None` when the stream holds no document or could not be read.
pub fn parse(source: &str) -> (Option<Node>, Vec<Problem>) {
    let mut builder = Builder {
        source,
        positions: Positions::new(source),
        stack: Vec::new(),
        anchors: HashMap::new(),
        problems: Vec::new(),
        alias_budget: ALIAS_BUDGET,
        root: None,
        documents: 0,
    };
    let mut parser = Parser::new_from_str(source);
    loop {
        match parser.next_event() {
            None => break,
            Some(Ok((event, span))) => {
                if !builder.event(event, span) {
                    break;
                }
            }
            Some(Err(error)) => {
                let mark = error.marker();
                let at = builder
                    .positions
                    .byte(mark.index(), mark.line(), mark.col());
                let span = Span::from_offsets(source, at, at + 1);
                builder.problems.push(
                    Problem::error(span, format!("YAML syntax error: {}", error.info())).with_hint(
                        "check the indentation and quoting on this line and the line before",
                    ),
                );
                return (None, builder.problems);
            }
        }
    }
    (builder.root, builder.problems)
}

/// Converts the parser's positions (character index, 1-based line, 0-based column in
/// characters) into byte offsets.
struct Positions<'s> {
    source: &'s str,
    ascii: bool,
    line_starts: Vec<usize>,
}

impl<'s> Positions<'s> {
    fn new(source: &'s str) -> Positions<'s> {
        let ascii = source.is_ascii();
        let line_starts = if ascii {
            Vec::new()
        } else {
            std::iter::once(0)
                .chain(source.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        };
        Positions {
            source,
            ascii,
            line_starts,
        }
    }

    fn byte(&self, char_index: usize, line: usize, col: usize) -> usize {
        if self.ascii {
            return char_index;
        }
        // The parser counts lines by `\n`, like `line_starts`.
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return self.line_starts.last().copied().unwrap_or(0);
        };
        self.source[start..]
            .char_indices()
            .nth(col)
            .map_or(self.source.len(), |(i, _)| start + i)
    }
}

enum Open {
    Sequence {
        start: Span,
        items: Vec<Node>,
        anchor: usize,
        tag: Option<String>,
        flow: bool,
    },
    Mapping {
        start: Span,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
        /// Entries from `<<` merge keys; explicit keys win over them wherever they appear.
        merged: Vec<(Node, Node)>,
        anchor: usize,
        tag: Option<String>,
        flow: bool,
    },
}

struct Builder<'s> {
    source: &'s str,
    positions: Positions<'s>,
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    problems: Vec<Problem>,
    alias_budget: usize,
    root: Option<Node>,
    documents: usize,
}

impl Builder<'_> {
    fn offset(&self, marker: saphyr_parser::Marker) -> usize {
        let byte = self
            .positions
            .byte(marker.index(), marker.line(), marker.col());
        // Positions of a valid parse are always on character boundaries; clamp defensively.
        self.source.floor_char_boundary(byte)
    }

    fn span(&self, span: saphyr_parser::Span) -> Span {
        let start = self.offset(span.start);
        let end = self.offset(span.end).max(start);
        Span {
            start,
            end,
            line: span.start.line(),
            col: span.start.col() + 1,
        }
    }

    /// Handle one event; `false` stops reading (after the first document, or a fatal problem).
    fn event(&mut self, event: Event<'_>, span: saphyr_parser::Span) -> bool {
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => true,
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    let at = self.span(span);
                    self.problems.push(
                        Problem::error(at, "a second YAML document in the same file").with_hint(
                            "put each document in its own file, or remove the `---` line",
                        ),
                    );
                    return false;
                }
                true
            }
            Event::Scalar(value, style, anchor, tag) => {
                let span = self.span(span);
                let style = match style {
                    SaphyrStyle::Plain => ScalarStyle::Plain,
                    SaphyrStyle::SingleQuoted => ScalarStyle::SingleQuoted,
                    SaphyrStyle::DoubleQuoted => ScalarStyle::DoubleQuoted,
                    SaphyrStyle::Literal => ScalarStyle::Literal,
                    SaphyrStyle::Folded => ScalarStyle::Folded,
                };
                let raw = self.source[span.start..span.end].to_string();
                let node = Node {
                    span,
                    kind: NodeKind::Scalar(Scalar {
                        value: value.into_owned(),
                        style,
                        raw,
                    }),
                    tag: tag_text(tag),
                    flow: false,
                };
                self.finish(node, anchor)
            }
            Event::SequenceStart(anchor, tag) => {
                let start = self.span(span);
                let flow = self.source[start.start..start.end.max(start.start)].contains('[');
                self.open(
                    Open::Sequence {
                        start,
                        items: Vec::new(),
                        anchor,
                        tag: tag_text(tag),
                        flow,
                    },
                    start,
                )
            }
            Event::MappingStart(anchor, tag) => {
                let start = self.span(span);
                let flow = self.source[start.start..start.end.max(start.start)].contains('{');
                self.open(
                    Open::Mapping {
                        start,
                        entries: Vec::new(),
                        pending_key: None,
                        merged: Vec::new(),
                        anchor,
                        tag: tag_text(tag),
                        flow,
                    },
                    start,
                )
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let end_span = self.span(span);
                let Some(open) = self.stack.pop() else {
                    return true;
                };
                let (node, anchor) = match open {
                    Open::Sequence {
                        start,
                        items,
                        anchor,
                        tag,
                        flow,
                    } => {
                        let last = items.last().map(|n| n.span.end);
                        let end = close_end(flow, end_span, last, start.start);
                        let node = Node {
                            span: Span { end, ..start },
                            kind: NodeKind::Sequence(items),
                            tag,
                            flow,
                        };
                        (node, anchor)
                    }
                    Open::Mapping {
                        start,
                        mut entries,
                        merged,
                        anchor,
                        tag,
                        flow,
                        ..
                    } => {
                        for (key, value) in merged {
                            let explicit = key.as_str().is_some_and(|k| {
                                entries.iter().any(|(other, _)| other.as_str() == Some(k))
                            });
                            if !explicit {
                                entries.push((key, value));
                            }
                        }
                        let last = entries.last().map(|(_, v)| v.span.end);
                        let end = close_end(flow, end_span, last, start.start);
                        let node = Node {
                            span: Span { end, ..start },
                            kind: NodeKind::Mapping(entries),
                            tag,
                            flow,
                        };
                        (node, anchor)
                    }
                };
                self.finish(node, anchor)
            }
            Event::Alias(id) => {
                let at = self.span(span);
                let Some(target) = self.anchors.get(&id) else {
                    self.problems
                        .push(Problem::error(at, "alias to an anchor that is not defined"));
                    return false;
                };
                let cost = count_nodes(target);
                if cost > self.alias_budget {
                    self.problems.push(
                        Problem::error(at, "aliases expand to too many values")
                            .with_hint(format!(
                                "at most {ALIAS_BUDGET} values may come from aliases; write the values out"
                            )),
                    );
                    return false;
                }
                self.alias_budget -= cost;
                let node = target.clone();
                self.finish(node, 0)
            }
        }
    }

    fn open(&mut self, open: Open, at: Span) -> bool {
        if self.stack.len() >= MAX_DEPTH {
            self.problems.push(
                Problem::error(at, format!("nested deeper than {MAX_DEPTH} levels"))
                    .with_hint("flatten the structure"),
            );
            return false;
        }
        self.stack.push(open);
        true
    }

    /// A complete node: record its anchor and attach it to its parent (or make it the root).
    fn finish(&mut self, node: Node, anchor: usize) -> bool {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
            }
            Some(Open::Sequence { items, .. }) => items.push(node),
            Some(Open::Mapping {
                entries,
                pending_key,
                merged,
                ..
            }) => match pending_key.take() {
                None => *pending_key = Some(node),
                // `<<: *base` (YAML merge key, which Go's YAML readers honour).
                Some(key) if is_merge_key(&key) => {
                    let sources: Vec<Node> = match node.kind {
                        NodeKind::Mapping(_) => vec![node],
                        NodeKind::Sequence(items) => items,
                        NodeKind::Scalar(_) => vec![node],
                    };
                    for source in sources {
                        let NodeKind::Mapping(source_entries) = source.kind else {
                            self.problems.push(
                                Problem::error(source.span, "`<<` can only merge mappings")
                                    .with_hint("write `<<: *anchor` where the anchor is a mapping"),
                            );
                            continue;
                        };
                        for (k, v) in source_entries {
                            // Earlier sources win over later ones.
                            let seen = k.as_str().is_some_and(|name| {
                                merged.iter().any(|(other, _)| other.as_str() == Some(name))
                            });
                            if !seen {
                                merged.push((k, v));
                            }
                        }
                    }
                }
                Some(key) => {
                    let duplicate = key.as_str().and_then(|k| {
                        entries
                            .iter()
                            .find(|(other, _)| other.as_str() == Some(k))
                            .map(|(other, _)| (k.to_string(), other.span.line))
                    });
                    match duplicate {
                        Some((name, first_line)) => self.problems.push(
                            Problem::error(key.span, format!("duplicate key `{name}`")).with_hint(
                                format!(
                                    "`{name}` is already set on line {first_line}; keep one of them"
                                ),
                            ),
                        ),
                        None => entries.push((key, node)),
                    }
                }
            },
        }
        true
    }
}

/// Where a collection ends: after its closing bracket in flow style, after its last value in
/// block style (the parser reports block ends at the next token, which may be lines later).
fn close_end(flow: bool, end: Span, last_child: Option<usize>, start: usize) -> usize {
    if flow {
        end.end
    } else {
        last_child.unwrap_or(start)
    }
}

fn is_merge_key(key: &Node) -> bool {
    matches!(&key.kind, NodeKind::Scalar(s) if s.style == ScalarStyle::Plain && s.value == "<<")
        && key.tag.is_none()
}

fn count_nodes(node: &Node) -> usize {
    match &node.kind {
        NodeKind::Scalar(_) => 1,
        NodeKind::Sequence(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        NodeKind::Mapping(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count_nodes(k) + count_nodes(v))
                .sum::<usize>()
        }
    }
}

fn tag_text(tag: Option<Cow<'_, saphyr_parser::Tag>>) -> Option<String> {
    tag.map(|t| format!("{}{}", t.handle, t.suffix))
}

/// The hint for the unknown key `key` in {what}: "did you mean" the closest of `allowed`, else
/// `fallback(key)`, else the keys `what` accepts.
pub fn unknown_key_hint(
    key: &str,
    allowed: &[&str],
    what: &str,
    fallback: impl Fn(&str) -> Option<String>,
) -> String {
    use crate::diagnostic::{did_you_mean, one_of};
    match did_you_mean(key, allowed.iter().copied()) {
        Some(close) => format!("did you mean `{close}`?"),
        None => fallback(key).unwrap_or_else(|| format!("{what} accepts {}", one_of(allowed))),
    }
}

/// A problem for every key of `entries` that is not in `allowed`: "unknown key `k` in
/// {what}", with a "did you mean" hint, else `fallback(k)`, else the keys `what` accepts.
/// Component documents, recipes and every later file kind share this rule.
pub fn unknown_keys(
    entries: &[(Node, Node)],
    allowed: &[&str],
    what: &str,
    fallback: impl Fn(&str) -> Option<String>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (key, _) in entries {
        match key.as_str() {
            Some(k) if allowed.contains(&k) => {}
            Some(k) => {
                let hint = unknown_key_hint(k, allowed, what, &fallback);
                problems.push(
                    Problem::error(key.span, format!("unknown key `{k}` in {what}"))
                        .with_hint(hint),
                );
            }
            None => problems.push(Problem::error(
                key.span,
                format!("a key in {what} must be a plain name"),
            )),
        }
    }
    problems
}

/// `text` with the bytes from `at` (`len` of them) replaced by `insert`, both ends moved to char
/// boundaries: the edit of the file walkers' "never panic" property tests.
#[cfg(test)]
pub(crate) fn edited(text: &str, at: usize, len: usize, insert: &str) -> String {
    let start = text.floor_char_boundary(at);
    let end = text.ceil_char_boundary(start + len);
    let mut text = text.to_string();
    text.replace_range(start..end, insert);
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        let (node, problems) = parse(text);
        assert!(problems.is_empty(), "{problems:?}");
        node.unwrap()
    }

    #[test]
    fn spans_styles_and_order() {
        let text = "b: 1\na: 'x'\nc: |\n  line\nd: [1, 2]\n";
        let node = root(text);
        let entries = node.as_mapping().unwrap();
        let keys: Vec<_> = entries.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["b", "a", "c", "d"]);
        let a = node.get("a").unwrap();
        assert_eq!((a.span.line, a.span.col), (2, 4));
        assert_eq!(a.as_scalar().unwrap().style, ScalarStyle::SingleQuoted);
        assert_eq!(a.as_scalar().unwrap().raw, "'x'");
        assert_eq!(node.get("c").unwrap().as_str(), Some("line\n"));
        let d = node.get("d").unwrap();
        assert!(d.flow);
        assert_eq!(&text[d.span.start..d.span.end], "[1, 2]");
        assert_eq!(node.get("b").unwrap().as_int(), Some(1));
    }

    #[test]
    fn typed_reading_of_plain_scalars_only() {
        let node = root("a: 0777\nb: '5'\nc: true\nd: 1.0\ne:\nf: 0o17\n");
        let a = node.get("a").unwrap();
        assert_eq!(a.as_scalar().unwrap().raw, "0777");
        assert_eq!(a.as_int(), Some(777));
        assert_eq!(node.get("b").unwrap().as_int(), None);
        assert_eq!(node.get("c").unwrap().as_bool(), Some(true));
        assert_eq!(node.get("d").unwrap().as_number(), Some(1.0));
        assert_eq!(node.get("d").unwrap().as_int(), None);
        assert!(node.get("e").unwrap().is_null());
        assert_eq!(node.get("f").unwrap().as_int(), Some(15));
    }

    #[test]
    fn non_ascii_offsets_are_bytes() {
        let text = "é: ü\nkey: value\n";
        let node = root(text);
        let v = node.get("key").unwrap();
        assert_eq!(&text[v.span.start..v.span.end], "value");
        assert_eq!((v.span.line, v.span.col), (2, 6));
    }

    #[test]
    fn duplicate_keys_are_problems_at_the_second_key() {
        let (node, problems) = parse("a: 1\nb: 2\na: 3\n");
        assert_eq!(problems.len(), 1);
        assert_eq!((problems[0].span.line, problems[0].span.col), (3, 1));
        assert!(problems[0].message.contains("duplicate key `a`"));
        assert_eq!(node.unwrap().get("a").unwrap().as_int(), Some(1));
    }

    #[test]
    fn syntax_error_has_a_position() {
        let (node, problems) = parse("a: 1\nb: [1, 2\nc: 3\n");
        assert!(node.is_none());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.starts_with("YAML syntax error"));
        assert!(problems[0].span.line >= 2);
    }

    #[test]
    fn aliases_expand_within_budget_and_bombs_are_stopped() {
        let node = root("a: &x [1, 2]\nb: *x\n");
        assert_eq!(node.get("b").unwrap().as_sequence().unwrap().len(), 2);
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let (_, problems) = parse(&bomb);
        assert!(
            problems.iter().any(|p| p.message.contains("too many")),
            "{problems:?}"
        );
    }

    #[test]
    fn merge_keys_fill_in_without_overriding() {
        let node = root("base: &b {a: 1, b: 2}\nx:\n  c: 3\n  <<: *b\n  a: 9\n");
        let x = node.get("x").unwrap();
        let keys: Vec<_> = x
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, ["c", "a", "b"]);
        assert_eq!(x.get("a").unwrap().as_int(), Some(9));
        assert_eq!(x.get("b").unwrap().as_int(), Some(2));
        let (_, problems) = parse("x:\n  <<: 5\n");
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn deep_nesting_is_a_problem_not_a_crash() {
        let text = "[".repeat(100_000);
        let (node, problems) = parse(&text);
        assert!(node.is_none());
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn unquoted_template_is_a_flow_mapping() {
        let text = "v: {{ name }}\n";
        let node = root(text);
        let v = node.get("v").unwrap();
        assert!(v.flow);
        assert!(text[v.span.start..].starts_with("{{"));
        assert!(v.as_mapping().unwrap()[0].0.as_mapping().is_some());
    }
}
