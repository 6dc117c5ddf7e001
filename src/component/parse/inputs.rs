//! A step's `inputs`, checked against the action's [`input_spec`] and turned into JSON as
//! written (strings unexpanded; numbers kept as their source text where a string is wanted).

use serde_json::{Map, Value};

use super::refs::InputsInfo;
use super::spec::{InputShape, InputSpec, InputType, input_shape, input_spec, inputs_optional};
use super::{DocumentReader, expr};
use crate::component::document::Action;
use crate::diagnostic::{did_you_mean, did_you_mean_hint, one_of};
use crate::yaml::Node;

pub(super) fn step_inputs(
    cx: &mut DocumentReader<'_>,
    action: Action,
    step: &Node,
    node: Option<&Node>,
    what: &str,
) -> (Option<Value>, InputsInfo) {
    let Some(node) = node.filter(|n| !n.is_null()) else {
        if inputs_optional(action) {
            return (Some(Value::Null), InputsInfo::Absent);
        }
        let required: Vec<&str> = input_spec(action)
            .iter()
            .filter(|s| s.required)
            .map(|s| s.key)
            .collect();
        let hint = match (input_shape(action), required.as_slice()) {
            (InputShape::Expression, _) => {
                "add `inputs:` with one operator, e.g. `fileExists: /etc/motd`".to_string()
            }
            (_, []) => format!("add `inputs:` for `{action}`"),
            (_, keys) => format!("`{action}` needs {}", one_of(keys)),
        };
        cx.error(
            node.map_or(step.span, |n| n.span),
            format!("{what} (`{action}`) has no `inputs`"),
            Some(hint),
        );
        return (None, InputsInfo::Unknown);
    };
    match input_shape(action) {
        InputShape::Map => {
            if node.as_sequence().is_some() {
                cx.error(
                    node.span,
                    format!("the inputs of `{action}` are a mapping, not a list"),
                    Some("remove the `- ` in front of the first input".to_string()),
                );
                return (None, InputsInfo::Unknown);
            }
            let Some((map, keys)) = item(cx, action, node) else {
                return (None, InputsInfo::Unknown);
            };
            if action == Action::ExecutePowerShell {
                let count = ["commands", "file"]
                    .iter()
                    .filter(|k| map.contains_key(**k))
                    .count();
                if count != 1 {
                    cx.error(
                        node.span,
                        "`ExecutePowerShell` needs exactly one of `commands` and `file`",
                        None,
                    );
                    return (None, InputsInfo::Unknown);
                }
            }
            (Some(Value::Object(map)), InputsInfo::Map(keys))
        }
        InputShape::List => {
            let Some(items) = node.as_sequence() else {
                if node.as_mapping().is_some() && cx.unquoted_template(node).is_none() {
                    cx.error(
                        node.span,
                        format!("the inputs of `{action}` are a list of mappings, not a mapping"),
                        Some("start the inputs with `- `, one item per operation".to_string()),
                    );
                } else {
                    cx.not_a(
                        node,
                        &format!("the inputs of `{action}`"),
                        "a list of mappings",
                    );
                }
                return (None, InputsInfo::Unknown);
            };
            if items.is_empty() {
                cx.error(
                    node.span,
                    format!("the inputs of `{action}` are an empty list"),
                    None,
                );
                return (None, InputsInfo::Unknown);
            }
            let mut values = Vec::new();
            let mut infos = Vec::new();
            let mut ok = true;
            for it in items {
                match item(cx, action, it) {
                    Some((map, keys)) => {
                        values.push(Value::Object(map));
                        infos.push(keys);
                    }
                    None => {
                        ok = false;
                        infos.push(Vec::new());
                    }
                }
            }
            (ok.then_some(Value::Array(values)), InputsInfo::List(infos))
        }
        InputShape::Expression => {
            let parsed = expr::expression(cx, node, &[], 0, "the inputs of `Assert`");
            (parsed.map(|_| as_json(node)), InputsInfo::Expression)
        }
    }
}

/// The entries of one mapping inside `inputs` whose keys should be `keys` (`required` among
/// them). A key AWSTOE does not know is a warning: AWSTOE's decoders drop it, and documents
/// AWS publishes carry such keys. It stays an error when it is the likely misspelling of a
/// required key that is missing (AWSTOE rejects the missing key): said once, at the
/// misspelled key. Every missing required key is reported. `None` (and a problem) when
/// `node` is not a mapping, or when a key is not a plain name or a required key is missing.
fn input_entries<'n>(
    cx: &mut DocumentReader<'_>,
    node: &'n Node,
    what: &str,
    needs: &str,
    keys: &[&str],
    required: &[&str],
) -> Option<&'n [(Node, Node)]> {
    let Some(entries) = node.as_mapping() else {
        cx.not_a(node, what, "a mapping");
        return None;
    };
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|key| {
            !entries
                .iter()
                .any(|(k, v)| k.as_str() == Some(*key) && !v.is_null())
        })
        .collect();
    let mut explained = Vec::new();
    let mut ok = missing.is_empty();
    for (key, _) in entries {
        let Some(k) = key.as_str() else {
            cx.error(
                key.span,
                format!("a key in {what} must be a plain name"),
                None,
            );
            ok = false;
            continue;
        };
        if keys.contains(&k) {
            continue;
        }
        match did_you_mean(k, keys.iter().copied()) {
            Some(close) if missing.contains(&close) && !explained.contains(&close) => {
                explained.push(close);
                cx.error(
                    key.span,
                    format!("{needs} `{close}`; `{k}` is not one of its keys"),
                    Some(format!("did you mean `{close}`?")),
                );
            }
            _ => {
                let hint = crate::yaml::unknown_key_hint(k, keys, what, |_| {
                    Some(format!("expected {}", one_of(keys)))
                });
                cx.warning(
                    key.span,
                    format!("unknown key `{k}` in {what} is ignored (AWSTOE ignores it too)"),
                    Some(hint),
                );
            }
        }
    }
    for key in missing.iter().filter(|k| !explained.contains(k)) {
        cx.error(
            node.span,
            format!("{needs} `{key}`"),
            Some(format!("add `{key}: …`")),
        );
    }
    ok.then_some(entries)
}

/// One map of inputs: unknown keys, missing required keys, value types.
fn item(
    cx: &mut DocumentReader<'_>,
    action: Action,
    node: &Node,
) -> Option<(Map<String, Value>, Vec<String>)> {
    let specs = input_spec(action);
    let keys: Vec<&str> = specs.iter().map(|s| s.key).collect();
    let required: Vec<&str> = specs.iter().filter(|s| s.required).map(|s| s.key).collect();
    let what = format!("the inputs of `{action}`");
    let needs = format!("`{action}` needs the input");
    let entries = input_entries(cx, node, &what, &needs, &keys, &required);
    let mut map = Map::new();
    let mut ok = entries.is_some();
    // The values are checked even when a key is missing, so every problem is reported at once.
    let entries = entries.or_else(|| node.as_mapping())?;
    for (key, value) in entries {
        let Some(spec) = key.as_str().and_then(|k| specs.iter().find(|s| s.key == k)) else {
            continue; // an unknown key: reported by `input_entries`, and not passed on
        };
        if value.is_null() {
            continue; // an empty optional input is the same as leaving it out
        }
        match convert(cx, spec, value) {
            Some(v) => {
                map.insert(spec.key.to_string(), v);
            }
            None => ok = false,
        }
    }
    // A checksum is only verified with its algorithm; one without the other is a mistake
    // that would silently skip the check.
    if action == Action::WebDownload
        && ok
        && map.contains_key("checksum") != map.contains_key("algorithm")
    {
        let (given, missing) = if map.contains_key("checksum") {
            ("checksum", "algorithm")
        } else {
            ("algorithm", "checksum")
        };
        let at = entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(given))
            .map_or(node.span, |(k, _)| k.span);
        cx.error(
            at,
            format!("`{given}` without `{missing}`: the download would not be verified"),
            Some(format!(
                "add `{missing}: …` (algorithms: `MD5`, `SHA1`, `SHA256`, `SHA512`)"
            )),
        );
        ok = false;
    }
    let present = map.keys().cloned().collect();
    ok.then_some((map, present))
}

fn convert(cx: &mut DocumentReader<'_>, spec: &InputSpec, node: &Node) -> Option<Value> {
    let key = spec.key;
    let what = format!("`{key}`");
    match spec.kind {
        InputType::String => string(cx, node, &what).map(Value::String),
        InputType::OneOf(options) => {
            let text = string(cx, node, &what)?;
            if !text.contains("{{") && !options.iter().any(|o| o.eq_ignore_ascii_case(&text)) {
                let hint = did_you_mean_hint(&text, options.iter().copied())
                    .unwrap_or_else(|| format!("expected {}", one_of(options)));
                cx.error(node.span, format!("unknown {what} `{text}`"), Some(hint));
                return None;
            }
            Some(Value::String(text))
        }
        InputType::Bool => match node.as_bool() {
            Some(b) => Some(Value::Bool(b)),
            None => {
                let hint = match node.as_str() {
                    Some(s) if s.contains("{{") => Some(format!(
                        "{what} cannot hold references; write `true` or `false`"
                    )),
                    Some(s)
                        if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false") =>
                    {
                        Some(format!("write `{}` without quotes", s.to_ascii_lowercase()))
                    }
                    _ => Some("write `true` or `false`".to_string()),
                };
                if node.as_scalar().is_none() && cx.unquoted_template(node).is_some() {
                    cx.not_a(node, &what, "true or false");
                } else {
                    cx.error(
                        node.span,
                        format!("{what} must be true or false, found {}", shown(node)),
                        hint,
                    );
                }
                None
            }
        },
        InputType::Int => match node.as_int() {
            Some(n) => Some(Value::from(n)),
            None => {
                if node.as_scalar().is_some() {
                    cx.error(
                        node.span,
                        format!("{what} must be a whole number, found {}", shown(node)),
                        None,
                    );
                } else {
                    cx.not_a(node, &what, "a whole number");
                }
                None
            }
        },
        InputType::StringList => string_list(cx, node, &what).map(Value::from),
        InputType::Mode => {
            let text = string(cx, node, &what)?;
            let octal =
                (1..=4).contains(&text.len()) && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
            if !text.contains("{{") && !octal {
                cx.error(
                    node.span,
                    format!("{what} `{text}` is not an octal file mode"),
                    Some("write the mode in octal, e.g. `'0644'` or `'0755'`".into()),
                );
                return None;
            }
            Some(Value::String(text))
        }
        InputType::NameValueList => {
            let Some(items) = node.as_sequence() else {
                cx.not_a(node, &what, "a list of `name`/`value` mappings");
                return None;
            };
            let mut out = Vec::new();
            let mut ok = true;
            for item in items {
                let fields = ["name", "value"];
                let Some(entries) = input_entries(
                    cx,
                    item,
                    "a `parameters` item",
                    "a `parameters` item needs",
                    &fields,
                    &fields,
                ) else {
                    ok = false;
                    continue;
                };
                let mut map = Map::new();
                for field in fields {
                    if let Some((_, v)) = entries.iter().find(|(k, _)| k.as_str() == Some(field)) {
                        match string(cx, v, &format!("`{field}`")) {
                            Some(s) => {
                                map.insert(field.to_string(), Value::String(s));
                            }
                            None => ok = false,
                        }
                    }
                }
                out.push(Value::Object(map));
            }
            ok.then_some(Value::Array(out))
        }
        InputType::StringMap => {
            let Some(entries) = node
                .as_mapping()
                .filter(|_| cx.unquoted_template(node).is_none())
            else {
                cx.not_a(node, &what, "a mapping of names to values");
                return None;
            };
            let mut map = Map::new();
            let mut ok = true;
            for (k, v) in entries {
                match (
                    string(cx, k, "a property name"),
                    string(cx, v, "a property value"),
                ) {
                    (Some(k), Some(v)) => {
                        map.insert(k, Value::String(v));
                    }
                    _ => ok = false,
                }
            }
            ok.then_some(Value::Object(map))
        }
        InputType::Scalar => {
            if node.as_sequence().is_some() {
                string_list(cx, node, &what).map(Value::from)
            } else {
                string(cx, node, &what).map(Value::String)
            }
        }
    }
}

/// A scalar as text, remembered for the reference check.
fn string(cx: &mut DocumentReader<'_>, node: &Node, what: &str) -> Option<String> {
    let s = cx.string(node, what)?;
    cx.text(node);
    Some(s)
}

fn string_list(cx: &mut DocumentReader<'_>, node: &Node, what: &str) -> Option<Vec<String>> {
    let Some(items) = node.as_sequence() else {
        if node.as_scalar().is_some() {
            cx.error(
                node.span,
                format!(
                    "{what} must be a list of strings, found {}",
                    node.describe()
                ),
                Some("write each item on its own line, starting with `- `".into()),
            );
        } else {
            cx.not_a(node, what, "a list of strings");
        }
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for item in items {
        match string(cx, item, &format!("an item of {what}")) {
            Some(s) => out.push(s),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn shown(node: &Node) -> String {
    match node.as_str() {
        Some(s) => format!("{} `{s}`", node.describe()),
        None => node.describe().to_string(),
    }
}

/// The node as JSON with every scalar as its text (numbers keep their source form).
fn as_json(node: &Node) -> Value {
    if node.is_null() {
        return Value::Null;
    }
    match (node.as_str(), node.as_sequence(), node.as_mapping()) {
        (Some(s), _, _) => Value::String(s.to_string()),
        (_, Some(items), _) => Value::Array(items.iter().map(as_json).collect()),
        (_, _, Some(entries)) => Value::Object(
            entries
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), as_json(v))))
                .collect(),
        ),
        _ => Value::Null,
    }
}
