//! The AWSTOE `{{ … }}` reference language: parsing a string into text and references, and
//! expanding it against a [`Scope`]. Pure: no I/O.
//!
//! Forms (see the reference, 1.5): `Name` (parameter or constant), `loop.index`/`loop.value`,
//! `<loopName>.index`/`.value`, `<phase>.<step>.inputs.<key>` / `.inputs[<i>].<key>`,
//! `<phase>.<step>.outputs.<key>` / `.outputs[<i>].<key>`, `aws:ssm:…`.
//!
//! Text between `{{` and `}}` that cannot be a reference at all (a Go template such as
//! `docker inspect -f '{{ .State.Running }}'`, or `{{ json . }}`: it starts with a dot or holds
//! characters no reference has) is kept as literal text, because real component scripts
//! contain such text and AWSTOE does not touch it. Text that has the *shape* of a reference
//! but a bad form (`{{ a.b.c }}`, `{{ build.step.outputs }}`) is an error.
//!
//! A `{{` without its own `}}` (none follows, or another `{{` comes first) is literal text too:
//! AWSTOE runs such scripts as written (an AWS-managed component has
//! `if [ '{{ build.X.outputs.stdout' == 'install' ]`), and a later reference in the same
//! script is still a reference. Validation warns about it ([`unclosed`]).

/// One parsed reference inside `{{ }}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A parameter or constant.
    Variable(String),
    /// `loop.value` (name `None`) or `<name>.value`.
    Loop {
        name: Option<String>,
        field: LoopField,
    },
    /// `<phase>.<step>.inputs…` or `<phase>.<step>.outputs…`.
    Chain(Chain),
    /// `aws:ssm:<name>` or `aws:ssm:resolve(<ref>)`: not available offline.
    Ssm(String),
}

/// `<phase>.<step>.<kind>[<index>].<key>`: an input or output of another step.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    pub phase: String,
    pub step: String,
    pub kind: ChainKind,
    pub index: Option<usize>,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoopField {
    Index,
    Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainKind {
    Inputs,
    Outputs,
}

impl ChainKind {
    /// The word as written in a reference (`inputs`, `outputs`).
    pub fn name(self) -> &'static str {
        match self {
            ChainKind::Inputs => "inputs",
            ChainKind::Outputs => "outputs",
        }
    }
}

/// A piece of a template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// A reference and the byte range of the whole `{{ … }}` in the source string.
    Ref {
        reference: Reference,
        range: std::ops::Range<usize>,
        source: String,
    },
}

/// Why a string could not be parsed as a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
    /// Byte range in the string the error is about.
    pub range: std::ops::Range<usize>,
}

/// What a reference resolves to at run time.
pub trait Scope {
    /// `Ok(None)` means "leave the reference in the text unchanged" (e.g. a loop reference in a
    /// step without a loop, as AWSTOE does). `Err` is a run-time error with a message.
    fn resolve(&self, reference: &Reference) -> Result<Option<String>, String>;
}

impl std::fmt::Display for Reference {
    /// The reference as it is written between the braces (canonical form, no spaces).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Variable(name) => f.write_str(name),
            Reference::Loop { name, field } => {
                let field = match field {
                    LoopField::Index => "index",
                    LoopField::Value => "value",
                };
                write!(f, "{}.{field}", name.as_deref().unwrap_or("loop"))
            }
            Reference::Chain(c) => {
                write!(f, "{}.{}.{}", c.phase, c.step, c.kind.name())?;
                match c.index {
                    Some(i) => write!(f, "[{i}].{}", c.key),
                    None => write!(f, ".{}", c.key),
                }
            }
            Reference::Ssm(rest) => write!(f, "aws:ssm:{rest}"),
        }
    }
}

/// Split `text` into literal text and references. Adjacent literal text is merged into one
/// [`Piece::Text`]; a string without `{{` gives one `Text` piece (or none when empty).
pub fn parse(text: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest_start = 0;
    let mut from = 0;
    while let Some((open, close)) = next_open(text, from) {
        let Some(inner_end) = close else {
            // Unclosed: the `{{` is text; look for the next one after it.
            from = open + 2;
            continue;
        };
        let inner_start = open + 2;
        // `{{{ imagebuilder:x }}}` (Dockerfile placeholders) reads as `{{` + `{ imagebuilder:x `,
        // which is not a reference, so it stays text without special handling.
        let end = inner_end + 2;
        let inner = &text[inner_start..inner_end];
        literal.push_str(&text[rest_start..open]);
        match parse_expression(inner.trim()) {
            Parsed::Reference(reference) => {
                if !literal.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Ref {
                    reference,
                    range: open..end,
                    source: text[open..end].to_string(),
                });
            }
            Parsed::NotAReference => {
                literal.push_str(&text[open..end]);
            }
            Parsed::Invalid(message) => {
                return Err(TemplateError {
                    message,
                    range: open..end,
                });
            }
        }
        rest_start = end;
        from = end;
    }
    literal.push_str(&text[rest_start..]);
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

/// The next `{{` at or after `from`, with the start of its `}}` when it has one of its own:
/// `None` when no `}}` follows, or when another `{{` comes before it (the first `{{` is then
/// literal text and the second may open a reference).
fn next_open(text: &str, from: usize) -> Option<(usize, Option<usize>)> {
    let open = from + text.get(from..)?.find("{{")?;
    let inner = open + 2;
    let close = text[inner..].find("}}").map(|i| inner + i);
    let reopened = close.is_some_and(|c| text[inner..c].contains("{{"));
    Some((open, close.filter(|_| !reopened)))
}

/// Where `text` has a `{{` that [`parse`] keeps as literal text because it has no `}}` of its
/// own: each range covers the `{{` and what reads as a reference after it (`{{ Name`).
pub fn unclosed(text: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some((open, close)) = next_open(text, from) {
        match close {
            Some(c) => from = c + 2,
            None => {
                let rest = &text[open + 2..];
                let spaces = rest.len() - rest.trim_start_matches([' ', '\t']).len();
                let word = rest[spaces..]
                    .find(|c: char| !reference_char(c) && c != ':')
                    .unwrap_or(rest.len() - spaces);
                let end = open + 2 + if word == 0 { 0 } else { spaces + word };
                out.push(open..end);
                from = open + 2;
            }
        }
    }
    out
}

/// Expand every reference in `text` with `scope`. A reference the scope answers `Ok(None)`
/// for stays as written. Values are inserted as they are: they are not expanded again.
pub fn expand(text: &str, scope: &dyn Scope) -> Result<String, String> {
    if !text.contains("{{") {
        return Ok(text.to_string());
    }
    let pieces = parse(text).map_err(|e| e.message)?;
    let mut out = String::with_capacity(text.len());
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(&t),
            Piece::Ref {
                reference, source, ..
            } => match scope.resolve(&reference)? {
                Some(value) => out.push_str(&value),
                None => out.push_str(&source),
            },
        }
    }
    Ok(out)
}

/// The references in `text`, in order; parse errors are ignored (no references then).
pub fn references(text: &str) -> Vec<Reference> {
    if !text.contains("{{") {
        return Vec::new();
    }
    parse(text)
        .map(|pieces| {
            pieces
                .into_iter()
                .filter_map(|p| match p {
                    Piece::Ref { reference, .. } => Some(reference),
                    Piece::Text(_) => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

enum Parsed {
    Reference(Reference),
    /// Not our language at all (Go/Jinja templates in scripts): keep as text.
    NotAReference,
    Invalid(String),
}

/// Characters that can appear in a reference (besides the `aws:ssm:` form).
fn reference_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']')
}

fn parse_expression(expr: &str) -> Parsed {
    if expr.is_empty() {
        return Parsed::Invalid("empty reference `{{ }}`".to_string());
    }
    if let Some(rest) = expr.strip_prefix("aws:ssm:") {
        if rest.trim().is_empty() {
            return Parsed::Invalid(
                "`aws:ssm:` needs a parameter name or ARN after it".to_string(),
            );
        }
        return Parsed::Reference(Reference::Ssm(rest.trim().to_string()));
    }
    if expr.starts_with('.') || !expr.chars().all(reference_char) {
        return Parsed::NotAReference;
    }
    let segments: Vec<&str> = expr.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Parsed::Invalid(format!(
            "`{expr}` is not a valid reference: it has an empty part between dots"
        ));
    }
    match segments.as_slice() {
        [name] => {
            if name.contains(['[', ']']) {
                return Parsed::Invalid(format!(
                    "`{expr}` is not a valid reference: `[` and `]` only follow `inputs` or `outputs`"
                ));
            }
            Parsed::Reference(Reference::Variable((*name).to_string()))
        }
        [name, field] if matches!(*field, "index" | "value") => {
            let field = if *field == "index" {
                LoopField::Index
            } else {
                LoopField::Value
            };
            if name.contains(['[', ']']) {
                return Parsed::Invalid(format!("`{expr}` is not a valid loop reference"));
            }
            let name = (*name != "loop").then(|| (*name).to_string());
            Parsed::Reference(Reference::Loop { name, field })
        }
        _ => parse_chain(expr, &segments),
    }
}

/// `<phase>.<step>.(inputs|outputs)[<i>]?.<key>`. The step name may itself hold dots: the
/// first `inputs`/`outputs` segment after the step ends it.
fn parse_chain(expr: &str, segments: &[&str]) -> Parsed {
    let usage = "expected `<phase>.<step>.inputs.<key>`, `<phase>.<step>.outputs.<key>` \
                 (or `outputs[<i>].<key>`), `loop.value`, `loop.index` or a parameter name";
    let found = segments
        .iter()
        .enumerate()
        .skip(2)
        .find_map(|(i, s)| chain_kind(s).map(|k| (i, k)));
    let Some((at, kind_index)) = found else {
        return Parsed::Invalid(format!("`{expr}` is not a valid reference; {usage}"));
    };
    let (kind, index) = match kind_index {
        Ok(k) => k,
        Err(message) => return Parsed::Invalid(format!("`{expr}`: {message}")),
    };
    let key = segments[at + 1..].join(".");
    if key.is_empty() {
        return Parsed::Invalid(format!(
            "`{expr}` names no key after `{}`; {usage}",
            segments[at]
        ));
    }
    if key.contains(['[', ']']) || segments[..at].iter().any(|s| s.contains(['[', ']'])) {
        return Parsed::Invalid(format!("`{expr}` is not a valid reference; {usage}"));
    }
    Parsed::Reference(Reference::Chain(Chain {
        phase: segments[0].to_string(),
        step: segments[1..at].join("."),
        kind,
        index,
        key,
    }))
}

/// `inputs`, `outputs`, `inputs[3]`, `outputs[0]` → kind and index; `None` for other
/// segments; `Some(Err)` for `outputs[x]`-like mistakes.
#[allow(clippy::type_complexity)]
fn chain_kind(segment: &str) -> Option<Result<(ChainKind, Option<usize>), String>> {
    let (word, bracket) = match segment.find('[') {
        Some(i) => (&segment[..i], Some(&segment[i..])),
        None => (segment, None),
    };
    let kind = [ChainKind::Inputs, ChainKind::Outputs]
        .into_iter()
        .find(|k| k.name() == word)?;
    let Some(bracket) = bracket else {
        return Some(Ok((kind, None)));
    };
    let digits = bracket
        .strip_prefix('[')
        .and_then(|b| b.strip_suffix(']'))
        .filter(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
    match digits.map(str::parse::<usize>) {
        Some(Ok(i)) => Some(Ok((kind, Some(i)))),
        _ => Some(Err(format!(
            "`{segment}` needs a non-negative index in brackets, like `{word}[0]`"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn refs(text: &str) -> Vec<Reference> {
        parse(text)
            .expect("test input is valid")
            .into_iter()
            .filter_map(|p| match p {
                Piece::Ref { reference, .. } => Some(reference),
                Piece::Text(_) => None,
            })
            .collect()
    }

    fn chain(
        phase: &str,
        step: &str,
        kind: ChainKind,
        index: Option<usize>,
        key: &str,
    ) -> Reference {
        Reference::Chain(Chain {
            phase: phase.into(),
            step: step.into(),
            kind,
            index,
            key: key.into(),
        })
    }

    #[test]
    fn plain_text_is_one_piece() {
        assert_eq!(
            parse("echo hi").unwrap(),
            vec![Piece::Text("echo hi".into())]
        );
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn variable_with_and_without_spaces() {
        let pieces = parse("a {{Name}} b {{   Other-Name_2 }}").unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Text("a ".into()),
                Piece::Ref {
                    reference: Reference::Variable("Name".into()),
                    range: 2..10,
                    source: "{{Name}}".into()
                },
                Piece::Text(" b ".into()),
                Piece::Ref {
                    reference: Reference::Variable("Other-Name_2".into()),
                    range: 13..33,
                    source: "{{   Other-Name_2 }}".into()
                },
            ]
        );
    }

    #[test]
    fn loop_references_plain_and_named() {
        assert_eq!(
            refs("{{ loop.value }}{{loop.index}}{{ myLoop.value }}"),
            vec![
                Reference::Loop {
                    name: None,
                    field: LoopField::Value
                },
                Reference::Loop {
                    name: None,
                    field: LoopField::Index
                },
                Reference::Loop {
                    name: Some("myLoop".into()),
                    field: LoopField::Value
                },
            ]
        );
    }

    #[test]
    fn chaining_both_output_forms_and_indexed_inputs() {
        assert_eq!(
            refs("{{ build.Download.outputs.stdout }} {{ build.Download.outputs[0].stdout }}"),
            vec![
                chain("build", "Download", ChainKind::Outputs, None, "stdout"),
                chain("build", "Download", ChainKind::Outputs, Some(0), "stdout"),
            ]
        );
        assert_eq!(
            refs("{{ build.Make.inputs[2].path }}{{ validate.X.inputs.commands }}"),
            vec![
                chain("build", "Make", ChainKind::Inputs, Some(2), "path"),
                chain("validate", "X", ChainKind::Inputs, None, "commands"),
            ]
        );
    }

    #[test]
    fn ssm_references() {
        assert_eq!(
            refs("{{ aws:ssm:/my/param }} {{aws:ssm:resolve(Name)}}"),
            vec![
                Reference::Ssm("/my/param".into()),
                Reference::Ssm("resolve(Name)".into())
            ]
        );
    }

    #[test]
    fn unclosed_braces_are_literal_text() {
        let text = "echo {{ Name";
        assert_eq!(parse(text).unwrap(), vec![Piece::Text(text.into())]);
        assert!(references(text).is_empty());
        assert_eq!(unclosed(text), vec![5..12]);
        // As in an AWS-managed component: the quote ends before any `}}`, and a reference
        // later in the same script is still a reference.
        let script = "if [ '{{ build.Check.outputs.stdout' == 'install' ]; then\n  \
                      echo {{ build.Version.outputs.stdout }}\nfi";
        assert_eq!(
            references(script),
            vec![chain(
                "build",
                "Version",
                ChainKind::Outputs,
                None,
                "stdout"
            )]
        );
        assert_eq!(unclosed(script), vec![6..35]);
        let pieces = parse(script).unwrap();
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        assert_eq!(
            pieces[0],
            Piece::Text(
                "if [ '{{ build.Check.outputs.stdout' == 'install' ]; then\n  echo ".into()
            )
        );
        let scope = Map(HashMap::from([(
            "build.Version.outputs.stdout".to_string(),
            "2".to_string(),
        )]));
        assert_eq!(
            expand(script, &scope).unwrap(),
            "if [ '{{ build.Check.outputs.stdout' == 'install' ]; then\n  echo 2\nfi"
        );
        // Closed references have no unclosed part; `{{{ x }}}` stays as it always was.
        assert!(unclosed("{{ A }} and {{ B }}").is_empty());
        assert!(unclosed("{{{ imagebuilder:buildDate }}}").is_empty());
        assert_eq!(unclosed("a {{ b\nc {{ d"), vec![2..6, 9..13]);
        assert_eq!(unclosed("x {{ \"y\" {{"), vec![2..4, 9..11]);
    }

    #[test]
    fn malformed_references_are_errors() {
        for bad in [
            "{{ }}",
            "{{ a.b.c }}",
            "{{ build.step.outputs }}",
            "{{ build.step.outputs[x].stdout }}",
            "{{ build.step.outputs[].stdout }}",
            "{{ a..b }}",
            "{{ aws:ssm: }}",
            "{{ name[0] }}",
        ] {
            assert!(parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn go_templates_in_scripts_stay_text() {
        let text = "docker inspect -f '{{ .State.Running }}' x; echo '{{json .}}'";
        assert_eq!(parse(text).unwrap(), vec![Piece::Text(text.into())]);
    }

    #[test]
    fn canonical_display_round_trips() {
        for r in [
            "Name",
            "loop.value",
            "named.index",
            "build.s.outputs[0].stdout",
            "build.s.inputs.path",
            "aws:ssm:/x",
        ] {
            let parsed = refs(&format!("{{{{ {r} }}}}"));
            assert_eq!(parsed.len(), 1);
            assert_eq!(parsed[0].to_string(), r);
        }
    }

    struct Map(HashMap<String, String>);
    impl Scope for Map {
        fn resolve(&self, reference: &Reference) -> Result<Option<String>, String> {
            match reference {
                Reference::Loop { .. } => Ok(None),
                Reference::Ssm(_) => Err("no SSM offline".into()),
                r => Ok(self.0.get(&r.to_string()).cloned()),
            }
        }
    }

    #[test]
    fn expand_substitutes_leaves_unknown_and_reports_errors() {
        let scope = Map(HashMap::from([
            ("Name".to_string(), "nginx".to_string()),
            (
                "build.s.outputs.stdout".to_string(),
                "{{ Name }}".to_string(),
            ),
        ]));
        assert_eq!(
            expand("install {{ Name }} {{loop.value}}", &scope).unwrap(),
            "install nginx {{loop.value}}"
        );
        // Values are not expanded again.
        assert_eq!(
            expand("{{build.s.outputs.stdout}}", &scope).unwrap(),
            "{{ Name }}"
        );
        assert_eq!(expand("no braces {", &scope).unwrap(), "no braces {");
        assert_eq!(
            expand("{{ aws:ssm:/x }}", &scope).unwrap_err(),
            "no SSM offline"
        );
        assert_eq!(expand("{{ Name", &scope).unwrap(), "{{ Name");
    }
}
