//! Checking `{{ … }}` references once the whole document has been read (chaining may point
//! at any step of any phase, including later ones).

use std::collections::HashMap;

use super::DocumentReader;
use super::spec::outputs_of;
use crate::component::document::Action;
use crate::component::template::{self, Chain, ChainKind, Piece, Reference};
use crate::diagnostic::{Span, did_you_mean_hint, one_of};
use crate::yaml::Node;

/// Whether the step being read loops, and the loop's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LoopCtx {
    None,
    Named(Option<String>),
    /// The step has a `loop` that is itself invalid: do not add problems about references.
    Unknown,
}

#[derive(Debug, Clone)]
pub(super) struct StepCtx {
    pub phase: usize,
    pub step: usize,
    pub looping: LoopCtx,
}

/// What a chaining reference may point at in a step.
#[derive(Debug, Clone, Default)]
pub(super) enum InputsInfo {
    /// The step is invalid in a way that makes its inputs unknown.
    #[default]
    Unknown,
    /// No `inputs` at all.
    Absent,
    Map(Vec<String>),
    List(Vec<Vec<String>>),
    Expression,
}

#[derive(Debug, Clone, Default)]
pub(super) struct StepInfo {
    pub name: String,
    pub action: Option<Action>,
    pub inputs: InputsInfo,
}

/// A string that may hold references, with where it is and which step it belongs to.
#[derive(Debug)]
pub(super) struct Text {
    span: Span,
    raw: String,
    value: String,
    ctx: StepCtx,
}

impl DocumentReader<'_> {
    /// Remember a scalar for the reference check at the end (only strings with `{{`).
    pub(super) fn text(&mut self, node: &Node) {
        let (Some(scalar), Some(ctx)) = (node.as_scalar(), &self.current) else {
            return;
        };
        if !scalar.value.contains("{{") {
            return;
        }
        self.texts.push(Text {
            span: node.span,
            raw: scalar.raw.clone(),
            value: scalar.value.clone(),
            ctx: ctx.clone(),
        });
    }

    /// The span of `part` inside a scalar, or the scalar's span when it cannot be found as
    /// written (escapes, folding).
    fn locate(&self, text: &Text, part: &str) -> Span {
        let Some(i) = text.raw.find(part) else {
            return text.span;
        };
        // Line and column from the scalar's own position: counting from the start of the file
        // for every reference would make validation quadratic in the file size.
        let before = &text.raw[..i];
        let (line, col) = match before.rfind('\n') {
            Some(nl) => (
                text.span.line + before.matches('\n').count(),
                before[nl + 1..].chars().count() + 1,
            ),
            None => (text.span.line, text.span.col + before.chars().count()),
        };
        Span {
            start: text.span.start + i,
            end: text.span.start + i + part.len(),
            line,
            col,
        }
    }
}

pub(super) fn check_all(
    cx: &mut DocumentReader<'_>,
    variables: &[&str],
    phases: &[(String, Vec<StepInfo>)],
) {
    let texts = std::mem::take(&mut cx.texts);
    let index = Index::new(phases);
    for text in &texts {
        let pieces = match template::parse(&text.value) {
            Ok(pieces) => pieces,
            Err(e) => {
                let part = text.value.get(e.range.clone()).unwrap_or(&text.value);
                let at = cx.locate(text, part.lines().next().unwrap_or(part));
                // A malformed reference is a typo whose message already lists the valid forms.
                match e.message.split_once("; expected ") {
                    Some((what, forms)) => {
                        cx.error(
                            at,
                            what.to_string(),
                            Some(format!("references look like {forms}")),
                        );
                    }
                    None => cx.error(at, e.message.clone(), None),
                }
                continue;
            }
        };
        // AWSTOE runs an unclosed `{{` as written (AWS's own scripts have them); it is worth
        // a word only because it may be a reference with its `}}` forgotten.
        for range in template::unclosed(&text.value) {
            let part = &text.value[range];
            let at = cx.locate(text, part);
            cx.warning(
                at,
                "`{{` is not closed by `}}`, so it is kept as text",
                Some(
                    "AWSTOE runs it as written; if it is meant as a reference, close it with `}}`"
                        .to_string(),
                ),
            );
        }
        for piece in pieces {
            if let Piece::Ref {
                reference, source, ..
            } = piece
            {
                let at = cx.locate(text, &source);
                check(cx, &text.ctx, at, &source, &reference, variables, &index);
            }
        }
    }
}

fn check(
    cx: &mut DocumentReader<'_>,
    ctx: &StepCtx,
    at: Span,
    source: &str,
    reference: &Reference,
    variables: &[&str],
    index: &Index<'_>,
) {
    match reference {
        Reference::Variable(name) => {
            if !variables.contains(&name.as_str()) {
                let hint =
                    did_you_mean_hint(name, variables.iter().copied()).unwrap_or_else(|| {
                        format!(
                            "declare it under `parameters:` (`- {name}: {{type: string}}`) or \
                             `constants:`"
                        )
                    });
                let message = format!("`{name}` is not a declared parameter or constant");
                cx.error(at, message, Some(hint));
            }
        }
        Reference::Loop { name, .. } => match (&ctx.looping, name) {
            (LoopCtx::Unknown, _) | (LoopCtx::Named(_), None) => {}
            (LoopCtx::None, _) => cx.warning(
                at,
                format!("`{source}` is in a step without a `loop`, so it stays as written"),
                Some("add a `loop` to this step, or remove the reference".to_string()),
            ),
            (LoopCtx::Named(Some(actual)), Some(name)) if actual == name => {}
            (LoopCtx::Named(Some(actual)), Some(name)) => cx.error(
                at,
                format!("this step's loop is named `{actual}`, not `{name}`"),
                Some(format!(
                    "use `{{{{ {actual}.value }}}}` or `{{{{ loop.value }}}}`"
                )),
            ),
            (LoopCtx::Named(None), Some(name)) => cx.error(
                at,
                format!("this step's loop has no name, so `{name}` refers to nothing"),
                Some(format!(
                    "add `name: {name}` to the loop, or use `loop.value` / `loop.index`"
                )),
            ),
        },
        Reference::Chain(c) => chain(cx, ctx, at, c, index),
        // Resolved at run time (and refused offline by the executor).
        Reference::Ssm(_) => {}
    }
}

fn chain(
    cx: &mut DocumentReader<'_>,
    ctx: &StepCtx,
    at: Span,
    chain: &Chain,
    index_of: &Index<'_>,
) {
    let (phase, step, key, index) = (&*chain.phase, &*chain.step, &*chain.key, chain.index);
    let phases = index_of.phases;
    let Some(&phase_index) = index_of.phase.get(phase) else {
        let names: Vec<&str> = phases.iter().map(|(n, _)| n.as_str()).collect();
        let hint = did_you_mean_hint(phase, names.iter().copied())
            .unwrap_or_else(|| format!("phases in this document: {}", one_of(&names)));
        cx.error(
            at,
            format!("there is no phase `{phase}` in this document"),
            Some(hint),
        );
        return;
    };
    let steps = &phases[phase_index].1;
    let Some(&step_index) = index_of.step.get(&(phase_index, step)) else {
        let mut names: Vec<&str> = Vec::new();
        for name in steps.iter().map(|s| s.name.as_str()) {
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
        let hint = did_you_mean_hint(step, names.iter().copied())
            .unwrap_or_else(|| format!("steps in phase `{phase}`: {}", one_of(&names)));
        cx.error(
            at,
            format!("phase `{phase}` has no step `{step}`"),
            Some(hint),
        );
        return;
    };
    let info = &steps[step_index];
    let Some(action) = info.action else {
        return;
    };
    match chain.kind {
        ChainKind::Outputs if (phase_index, step_index) >= (ctx.phase, ctx.step) => {
            let when = if (phase_index, step_index) == (ctx.phase, ctx.step) {
                "this step's own outputs do not exist while it runs".to_string()
            } else {
                format!(
                    "step `{phase}.{step}` runs after this one, so its outputs do not exist yet"
                )
            };
            cx.error(
                at,
                when,
                Some("chain only to the outputs of steps that run earlier".into()),
            );
        }
        ChainKind::Outputs => {
            if let Some(i) = index.filter(|i| *i > 0) {
                cx.error(
                    at,
                    format!("`outputs[{i}]` is out of range: a step's outputs have only index 0"),
                    Some("use `outputs.<key>` or `outputs[0].<key>`".into()),
                );
                return;
            }
            let Some(outputs) = outputs_of(action) else {
                return;
            };
            if outputs.is_empty() {
                cx.error(
                    at,
                    format!("step `{step}` (`{action}`) produces no outputs"),
                    None,
                );
            } else if !outputs.contains(&key) {
                let hint = did_you_mean_hint(key, outputs.iter().copied())
                    .unwrap_or_else(|| format!("`{action}` outputs: {}", one_of(outputs)));
                cx.error(at, format!("`{action}` has no output `{key}`"), Some(hint));
            }
        }
        ChainKind::Inputs => match (&info.inputs, index) {
            (InputsInfo::Unknown | InputsInfo::Expression, _) => {}
            (InputsInfo::Absent, _) => {
                cx.error(at, format!("step `{step}` has no inputs"), None);
            }
            (InputsInfo::Map(_), Some(i)) => cx.error(
                at,
                format!("`inputs[{i}]`: the inputs of `{action}` are a mapping, not a list"),
                Some(format!("use `{phase}.{step}.inputs.{key}`")),
            ),
            (InputsInfo::Map(keys), None) => input_key(cx, at, step, key, keys),
            (InputsInfo::List(_), None) => {
                cx.error(
                    at,
                    format!("the inputs of `{action}` are a list, so the reference needs an index"),
                    Some(format!("use `{phase}.{step}.inputs[0].{key}`")),
                );
            }
            (InputsInfo::List(items), Some(i)) => match items.get(i) {
                Some(keys) => input_key(cx, at, step, key, keys),
                None => cx.error(
                    at,
                    format!(
                        "`inputs[{i}]` is out of range: step `{step}` has {} input item{}",
                        items.len(),
                        if items.len() == 1 { "" } else { "s" }
                    ),
                    Some("indexes start at 0".into()),
                ),
            },
        },
    }
}

fn input_key(cx: &mut DocumentReader<'_>, at: Span, step: &str, key: &str, keys: &[String]) {
    if keys.iter().any(|k| k == key) {
        return;
    }
    let hint = did_you_mean_hint(key, keys.iter().map(String::as_str))
        .unwrap_or_else(|| format!("its inputs: {}", one_of(keys)));
    cx.error(
        at,
        format!("step `{step}` has no input `{key}`"),
        Some(hint),
    );
}

/// Phases and steps by name (first occurrence wins, as duplicates are already reported).
struct Index<'a> {
    phases: &'a [(String, Vec<StepInfo>)],
    phase: HashMap<&'a str, usize>,
    step: HashMap<(usize, &'a str), usize>,
}

impl<'a> Index<'a> {
    fn new(phases: &'a [(String, Vec<StepInfo>)]) -> Self {
        let mut phase = HashMap::new();
        let mut step = HashMap::new();
        for (p, (name, steps)) in phases.iter().enumerate() {
            phase.entry(name.as_str()).or_insert(p);
            for (s, info) in steps.iter().enumerate() {
                step.entry((p, info.name.as_str())).or_insert(s);
            }
        }
        Index {
            phases,
            phase,
            step,
        }
    }
}
