//! Comparison and logical expressions, shared by a step's `if` and by `Assert` inputs
//! (reference 1.8–1.10).

use super::DocumentReader;
use crate::component::document::{
    COMPARISONS, CompareOp, EXISTS, Expr, HASHES, STRING_TESTS, operator,
};
use crate::diagnostic::did_you_mean_hint;
use crate::yaml::Node;

/// Logical operators may be nested at most this deep.
pub const MAX_LOGICAL_NESTING: usize = 4;

const LOGICAL: &[&str] = &["and", "or", "not"];

fn operator_names() -> impl Iterator<Item = &'static str> {
    COMPARISONS
        .iter()
        .map(|(n, _)| *n)
        .chain(STRING_TESTS.iter().map(|(n, _)| *n))
        .chain(EXISTS.iter().map(|(n, _)| *n))
        .chain(HASHES.iter().map(|(n, _)| *n))
        .chain(LOGICAL.iter().copied())
}

fn is_operator(name: &str) -> bool {
    operator_names().any(|n| n == name)
}

/// One expression: a mapping holding exactly one operator, its `value`/`path` operand, and
/// the `extra` keys the caller handles (`then`/`else` for `if`). `logical` is the number of
/// logical operators around it.
pub(super) fn expression(
    cx: &mut DocumentReader<'_>,
    node: &Node,
    extra: &[&'static str],
    logical: usize,
    what: &str,
) -> Option<Expr> {
    let Some(entries) = node
        .as_mapping()
        .filter(|_| cx.unquoted_template(node).is_none())
    else {
        cx.not_a(node, what, "a mapping with one operator");
        return None;
    };
    let mut operators: Vec<(&Node, &str, &Node)> = Vec::new();
    let mut value = None;
    let mut path = None;
    let mut ok = true;
    for (key, v) in entries {
        match key.as_str() {
            Some("value") => value = Some((key, v)),
            Some("path") => path = Some((key, v)),
            Some(k) if extra.contains(&k) => {}
            Some(k) if is_operator(k) => operators.push((key, k, v)),
            Some(k) => {
                let candidates = operator_names()
                    .chain(["value", "path"])
                    .chain(extra.iter().copied());
                let hint = did_you_mean_hint(k, candidates);
                cx.error(key.span, format!("unknown operator `{k}` in {what}"), hint);
                ok = false;
            }
            None => {
                cx.error(
                    key.span,
                    format!("a key in {what} must be a plain name"),
                    None,
                );
                ok = false;
            }
        }
    }
    let (key, op, operand) = match operators.as_slice() {
        [] => {
            if ok {
                cx.error(
                    node.span,
                    format!("{what} has no operator"),
                    Some(
                        "e.g. `stringEquals: x` with `value: y`, or `fileExists: /etc/motd`".into(),
                    ),
                );
            }
            return None;
        }
        [one] => *one,
        [first, second, ..] => {
            cx.error(
                second.0.span,
                format!(
                    "{what} has more than one operator: `{}` and `{}`",
                    first.1, second.1
                ),
                Some("combine them with `and:` or `or:`, one expression per item".to_string()),
            );
            return None;
        }
    };
    let takes_value = operator(COMPARISONS, op).is_some();
    let takes_path = operator(HASHES, op).is_some();
    if let (false, Some((k, _))) = (takes_value, value) {
        cx.error(
            k.span,
            format!("`{op}` takes no `value`"),
            Some("its operand is written after the operator".into()),
        );
        ok = false;
    }
    if let (false, Some((k, _))) = (takes_path, path) {
        cx.error(
            k.span,
            format!("`{op}` takes no `path`"),
            Some("`path` belongs to the file hash operators".into()),
        );
        ok = false;
    }
    let expr = if let Some(cmp) = operator(COMPARISONS, op) {
        let baseline = operand_text(cx, operand, op);
        let value_node = value.map(|(_, v)| v);
        let value = match value {
            Some((_, v)) => operand_text(cx, v, "value"),
            None => {
                cx.error(
                    key.span,
                    format!("`{op}` needs a `value` to compare with"),
                    Some("add `value: <text>` next to it".into()),
                );
                None
            }
        };
        let baseline = baseline?;
        if cmp == CompareOp::PatternMatches
            && !baseline.contains("{{")
            && let Err(e) = regex::Regex::new(&baseline)
        {
            let first = e.to_string();
            let reason = first
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .trim_start_matches("error: ");
            cx.error(
                operand.span,
                format!("`{baseline}` is not a valid regular expression: {reason}"),
                Some("patterns use RE2 syntax (as Go's regexp)".into()),
            );
            return None;
        }
        let value = value?;
        if op.starts_with("number") {
            // AWSTOE makes a number comparison false (not an error) when an operand is not a
            // number; written out literally, that is surely a mistake worth a warning.
            let operands = [
                (&baseline, operand),
                (&value, value_node.unwrap_or(operand)),
            ];
            for (text, node) in operands {
                if !text.contains("{{") && !is_number(text) {
                    cx.warning(
                        node.span,
                        format!("`{text}` is not a number, so `{op}` is always false"),
                        Some("number operators compare numbers such as `3` or `-1.5`".to_string()),
                    );
                }
            }
        }
        Expr::Compare {
            op: cmp,
            baseline,
            value,
        }
    } else if let Some(test) = operator(STRING_TESTS, op) {
        Expr::StringTest {
            op: test,
            value: operand_text(cx, operand, op)?,
        }
    } else if let Some(exists) = operator(EXISTS, op) {
        Expr::Exists {
            op: exists,
            path: operand_text(cx, operand, op)?,
        }
    } else if let Some(algorithm) = operator(HASHES, op) {
        let digest = operand_text(cx, operand, op);
        let path = match path {
            Some((_, p)) => operand_text(cx, p, "path"),
            None => {
                cx.error(
                    key.span,
                    format!("`{op}` needs a `path` to the file to hash"),
                    Some("add `path: /the/file` next to it".into()),
                );
                None
            }
        };
        Expr::FileHash {
            algorithm,
            digest: digest?,
            path: path?,
        }
    } else {
        let level = logical + 1;
        if level > MAX_LOGICAL_NESTING {
            cx.error(
                key.span,
                format!("logical operators are nested {level} levels deep; at most {MAX_LOGICAL_NESTING} are allowed"),
                Some("split the condition over several steps".into()));
            return None;
        }
        match op {
            "not" => {
                let inner = match (operand.as_sequence(), operand.as_mapping()) {
                    (Some([one]), _) => Some(one),
                    (_, Some(_)) => Some(operand),
                    _ => None,
                };
                let Some(inner) = inner else {
                    cx.error(
                        operand.span,
                        "`not` takes one expression (a mapping, or a list with one item)",
                        None,
                    );
                    return None;
                };
                Expr::Not(Box::new(expression(
                    cx,
                    inner,
                    &[],
                    level,
                    "the `not` expression",
                )?))
            }
            _ => {
                let Some(items) = operand.as_sequence().filter(|i| !i.is_empty()) else {
                    cx.error(
                        operand.span,
                        format!("`{op}` takes a list of expressions"),
                        Some("write each expression as a `- ` item".into()),
                    );
                    return None;
                };
                let what = format!("an `{op}` item");
                let mut exprs = Vec::new();
                let mut all = true;
                for item in items {
                    match expression(cx, item, &[], level, &what) {
                        Some(e) => exprs.push(e),
                        None => all = false,
                    }
                }
                if !all {
                    return None;
                }
                if op == "and" {
                    Expr::And(exprs)
                } else {
                    Expr::Or(exprs)
                }
            }
        }
    };
    ok.then_some(expr)
}

/// An operand as text (numbers as written; empty is the empty string), remembered for the
/// reference check.
fn operand_text(cx: &mut DocumentReader<'_>, node: &Node, what: &str) -> Option<String> {
    if node.is_null() {
        return Some(String::new());
    }
    match node.as_str() {
        Some(s) => {
            cx.text(node);
            Some(s.to_string())
        }
        None => {
            cx.not_a(node, &format!("`{what}`"), "a string");
            None
        }
    }
}

/// The number form AWSTOE accepts: `^[-+]?([0-9]+[.])?[0-9]+$`.
fn is_number(text: &str) -> bool {
    let t = text.trim();
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (t, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(int) && frac.is_none_or(digits)
}
