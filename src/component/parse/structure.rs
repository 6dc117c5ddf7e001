//! The document's structure: top level, parameters and constants, phases, steps, loops.
//! Inputs, expressions and references have their own modules.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::refs::{self, LoopCtx, StepCtx, StepInfo};
use super::{DocumentReader, expr, inputs};
use crate::component::document::{
    Action, Branch, Condition, Constant, DEFAULT_TIMEOUT_SECS, Document, Loop, LoopKind, OnFailure,
    Parameter, ParameterType, Phase, SourceInfo, Step, operator,
};
use crate::diagnostic::{Span, did_you_mean_hint, one_of};
use crate::yaml::Node;

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "schemaVersion",
    "parameters",
    "constants",
    "phases",
];
const PHASE_KEYS: &[&str] = &["name", "steps"];
const STEP_KEYS: &[&str] = &[
    "name",
    "action",
    "inputs",
    "onFailure",
    "maxAttempts",
    "timeoutSeconds",
    "loop",
    "if",
];
const PARAMETER_KEYS: &[&str] = &["type", "default", "description", "allowedValues"];
const CONSTANT_KEYS: &[&str] = &["type", "value"];
const LOOP_KEYS: &[&str] = &["name", "for", "forEach"];
const FOR_KEYS: &[&str] = &["start", "end", "updateBy"];
const FOR_EACH_KEYS: &[&str] = &["list", "delimiter"];
const STANDARD_PHASES: &[&str] = &["build", "validate", "test"];
const ON_FAILURE: &[(&str, OnFailure)] = &[
    ("Abort", OnFailure::Abort),
    ("Continue", OnFailure::Continue),
    ("Ignore", OnFailure::Ignore),
];
const BRANCHES: &[(&str, Branch)] = &[
    ("Abort", Branch::Abort),
    ("Execute", Branch::Execute),
    ("Skip", Branch::Skip),
];
/// `forEach` delimiters AWSTOE allows.
const DELIMITERS: &[char] = &['.', ',', ';', ':', '\n', '\t', ' ', '-', '_'];

pub(super) fn document(cx: &mut DocumentReader<'_>, root: &Node, path: &Path) -> Option<Document> {
    cx.mapping(root, "a component document", TOP_KEYS)?;
    let start = cx.start_of(root);
    let name = root
        .get("name")
        .and_then(|v| cx.optional_string(v, "`name`"));
    let description = root
        .get("description")
        .and_then(|v| cx.optional_string(v, "`description`"));
    match root.get("schemaVersion") {
        None => cx.error(
            start,
            "missing `schemaVersion`",
            Some("add `schemaVersion: 1.0` at the top level".into()),
        ),
        Some(v) => schema_version(cx, v),
    }

    let mut names: HashMap<String, Span> = HashMap::new();
    let parameters = root.get("parameters").map_or_else(Vec::new, |v| {
        variables(cx, v, &mut names, "parameter", PARAMETER_KEYS, parameter)
    });
    let constants = root.get("constants").map_or_else(Vec::new, |v| {
        variables(cx, v, &mut names, "constant", CONSTANT_KEYS, constant)
    });

    let phases = match root.entry("phases") {
        None => {
            cx.error(
                start,
                "missing `phases`",
                Some("add `phases:` with at least a `build`, `validate` or `test` phase".into()),
            );
            None
        }
        Some((key, v)) => phases(cx, key, v),
    };

    // Names whose declaration was reported as malformed count as declared: one mistake, one
    // problem.
    let mut variables: Vec<String> = names.into_keys().collect();
    variables.append(&mut cx.declared_elsewhere);
    variables.sort();
    let variables: Vec<&str> = variables.iter().map(String::as_str).collect();
    let (phases, infos) = phases?;
    refs::check_all(cx, &variables, &infos);
    let phases = phases?;

    Some(Document {
        name,
        description,
        parameters,
        constants,
        phases,
        source: SourceInfo {
            path: path.to_path_buf(),
            sha256: hex::encode(Sha256::digest(cx.source.as_bytes())),
        },
    })
}

/// The value of `key` in the mapping `node`, or "{what} has no `key`" at `at`, with `hint`.
fn required<'n>(
    cx: &mut DocumentReader<'_>,
    node: &'n Node,
    key: &str,
    what: &str,
    at: Span,
    hint: &str,
) -> Option<&'n Node> {
    let value = node.get(key);
    if value.is_none() {
        cx.error(at, format!("{what} has no `{key}`"), Some(hint.into()));
    }
    value
}

/// Records `name` (written at `node`) in `seen`, or reports it as used before (`twice`, with
/// a hint that ends in `rule`). Whether it was new.
fn first_use(
    cx: &mut DocumentReader<'_>,
    seen: &mut HashMap<String, usize>,
    name: &str,
    node: &Node,
    twice: String,
    rule: &str,
) -> bool {
    if let Some(line) = seen.get(name) {
        let hint = format!("the first is on line {line}; {rule}");
        cx.error(node.span, twice, Some(hint));
        return false;
    }
    seen.insert(name.to_string(), node.span.line);
    true
}

/// The items of the list `key: node` (of `what`, e.g. "phases"): a problem when it is not a
/// list or is empty (with `hint`).
fn non_empty_list<'n>(
    cx: &mut DocumentReader<'_>,
    key: &Node,
    node: &'n Node,
    what: &str,
    hint: &str,
) -> Option<&'n [Node]> {
    let Some(items) = node.as_sequence() else {
        cx.not_a(node, &format!("`{what}`"), &format!("a list of {what}"));
        return None;
    };
    if items.is_empty() {
        cx.error(key.span, format!("`{what}` is empty"), Some(hint.into()));
        return None;
    }
    Some(items)
}

/// One of the words in `options`, spelled exactly (`what` names the value, `unknown` the
/// word in "unknown {unknown} `x`; expected …"), with a suggestion for a near miss.
fn word<T: Copy>(
    cx: &mut DocumentReader<'_>,
    node: &Node,
    what: &str,
    unknown: &str,
    options: &[(&str, T)],
) -> Option<T> {
    let text = cx.string(node, what)?;
    if let Some(value) = operator(options, &text) {
        return Some(value);
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let hint = did_you_mean_hint(&text, names.iter().copied());
    let message = format!("unknown {unknown} `{text}`; expected {}", one_of(&names));
    cx.error(node.span, message, hint);
    None
}

/// Report that `node` breaks a rule (`message`, with `hint`): no value.
fn refuse<T>(
    cx: &mut DocumentReader<'_>,
    node: &Node,
    message: impl Into<String>,
    hint: &str,
) -> Option<T> {
    cx.error(node.span, message, Some(hint.into()));
    None
}

/// [`Reader::not_a`](crate::yaml::reader::Reader::not_a): no value.
fn refuse_not_a<T>(
    cx: &mut DocumentReader<'_>,
    node: &Node,
    what: &str,
    expected: &str,
) -> Option<T> {
    cx.not_a(node, what, expected);
    None
}

/// `1.0` (a YAML float), `"1.0"` and `1` all occur in real documents.
fn schema_version(cx: &mut DocumentReader<'_>, node: &Node) {
    match node.as_str() {
        Some("1.0" | "1") => {}
        Some(other) => cx.error(
            node.span,
            format!("unsupported schemaVersion `{other}`; expected `1.0`"),
            Some("only schemaVersion 1.0 exists: write `schemaVersion: 1.0`".to_string()),
        ),
        None => cx.not_a(node, "`schemaVersion`", "`1.0`"),
    }
}

/// The single-key-map items of `parameters` / `constants`: `- Name: {...}`.
fn variable_items<'n>(
    cx: &mut DocumentReader<'_>,
    node: &'n Node,
    list: &str,
) -> Vec<(&'n Node, &'n Node)> {
    let Some(items) = node.as_sequence() else {
        if !node.is_null() {
            cx.not_a(
                node,
                &format!("`{list}`"),
                "a list of `- Name: {...}` items",
            );
        }
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        match item.as_mapping() {
            Some([(key, value)]) => out.push((key, value)),
            Some(entries) if entries.len() > 1 => {
                // The usual mistake: `- Name:` followed by `type:` at the same indentation.
                let key = &entries[0].0;
                if let Some(name) = key.as_str() {
                    cx.declared_elsewhere.push(name.to_string());
                }
                cx.error(
                    item.span,
                    format!("each item of `{list}` must be a single-key map `- Name: {{...}}`, this one has {} keys", entries.len()),
                    Some(format!(
                        "indent `{}`'s settings (`type:`, `default:` …) two spaces deeper than its name",
                        key.as_str().unwrap_or("Name")
                    )),
                );
            }
            _ => cx.error(
                item.span,
                format!("each item of `{list}` must be a single-key map `- Name: {{...}}`"),
                Some("write it as `- Name:` followed by its settings, indented".to_string()),
            ),
        }
    }
    out
}

/// Only letters, digits, `_` and `-`: a name references can use.
fn plain_name(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A parameter or constant name: 3–128 characters of `[A-Za-z0-9_-]`, unique across both.
fn variable_name(
    cx: &mut DocumentReader<'_>,
    key: &Node,
    names: &mut HashMap<String, Span>,
) -> Option<String> {
    let name = cx.string(key, "a parameter or constant name")?;
    let wrong = if !(3..=128).contains(&name.chars().count()) {
        Some(format!("name `{name}` must be 3 to 128 characters long"))
    } else {
        (!plain_name(&name))
            .then(|| format!("name `{name}` may only hold letters, digits, `_` and `-`"))
    };
    if let Some(message) = wrong {
        let hint = "parameter and constant names are 3 to 128 letters, digits, `_` or `-`";
        cx.error(key.span, message, Some(hint.into()));
        cx.declared_elsewhere.push(name);
        return None;
    }
    if let Some(first) = names.get(&name) {
        cx.error(
            key.span,
            format!("`{name}` is declared twice"),
            Some(format!(
                "parameter and constant names are shared; the first is on line {}",
                first.line
            )),
        );
        return None;
    }
    names.insert(name.clone(), key.span);
    Some(name)
}

/// Parameter types: the documentation names only `string`; the service API also lists
/// `Integer`, `Boolean` and `StringList` (SSM uses `stringList`). Accept those four in any
/// letter case so documents written against either source validate.
fn parameter_type(cx: &mut DocumentReader<'_>, node: &Node) -> Option<ParameterType> {
    let text = cx.string(node, "`type`")?;
    match text.to_ascii_lowercase().as_str() {
        "string" => Some(ParameterType::String),
        "integer" => Some(ParameterType::Integer),
        "boolean" => Some(ParameterType::Boolean),
        "stringlist" => Some(ParameterType::StringList),
        _ => {
            let expected = "`string`, `integer`, `boolean` or `stringList`";
            let message = format!("unknown parameter type `{text}`; expected {expected}");
            cx.error(
                node.span,
                message,
                Some("almost every document uses `type: string`".into()),
            );
            None
        }
    }
}

/// Every `- Name: {...}` item of `parameters` or `constants` (a `noun` each), read by `read`
/// from its name (when valid), its `what` ("parameter `Name`"), its key and its mapping `body`.
fn variables<T>(
    cx: &mut DocumentReader<'_>,
    node: &Node,
    names: &mut HashMap<String, Span>,
    noun: &str,
    keys: &[&str],
    read: fn(&mut DocumentReader<'_>, Option<String>, &str, &Node, &Node) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (key, body) in variable_items(cx, node, &format!("{noun}s")) {
        let name = variable_name(cx, key, names);
        let what = format!("{noun} `{}`", key.as_str().unwrap_or("?"));
        if cx.mapping(body, &what, keys).is_some() {
            out.extend(read(cx, name, &what, key, body));
        }
    }
    out
}

fn parameter(
    cx: &mut DocumentReader<'_>,
    name: Option<String>,
    what: &str,
    key: &Node,
    body: &Node,
) -> Option<Parameter> {
    let kind = required(cx, body, "type", what, key.span, "add `type: string`")
        .and_then(|t| parameter_type(cx, t));
    let default_node = body.get("default");
    let default = default_node.and_then(|d| cx.optional_string(d, "`default`"));
    let description =
        (body.get("description")).and_then(|d| cx.optional_string(d, "`description`"));
    // A default must be a value of the declared type (only checked when it holds no
    // reference).
    if let (Some(d), Some(kind), Some(dn)) = (&default, kind, default_node)
        && !d.contains("{{")
    {
        let fits = match kind {
            ParameterType::Integer => d.trim().parse::<i64>().is_ok(),
            ParameterType::Boolean => {
                matches!(d.to_ascii_lowercase().as_str(), "true" | "false")
            }
            ParameterType::String | ParameterType::StringList => true,
        };
        if !fits {
            cx.error(
                dn.span,
                format!(
                    "default `{d}` is not {}",
                    if kind == ParameterType::Integer {
                        "a whole number"
                    } else {
                        "`true` or `false`"
                    }
                ),
                Some("the default must fit the parameter's `type`".into()),
            );
        }
    }
    let mut allowed_values = Vec::new();
    if let Some(av) = body.get("allowedValues") {
        match av.as_sequence() {
            Some(items) => {
                for item in items {
                    if let Some(v) = cx.string(item, "an allowed value") {
                        allowed_values.push(v);
                    }
                }
            }
            None => cx.not_a(av, "`allowedValues`", "a list of strings"),
        }
        if let (Some(d), Some(dn)) = (&default, default_node)
            && !allowed_values.is_empty()
            && !allowed_values.contains(d)
        {
            cx.error(
                dn.span,
                format!("default `{d}` is not one of the allowed values"),
                Some(format!("allowed: {}", one_of(&allowed_values))),
            );
        }
    }
    Some(Parameter {
        name: name?,
        kind: kind?,
        default,
        description,
        allowed_values,
    })
}

fn constant(
    cx: &mut DocumentReader<'_>,
    name: Option<String>,
    what: &str,
    key: &Node,
    body: &Node,
) -> Option<Constant> {
    if let Some(t) = required(cx, body, "type", what, key.span, "add `type: string`")
        && let Some(text) = cx.string(t, "`type`")
        && !text.eq_ignore_ascii_case("string")
    {
        let message = format!("constant type `{text}` is not supported; constants are `string`");
        cx.error(t.span, message, None);
    }
    let hint = "a constant needs `value: <text>`";
    let value =
        required(cx, body, "value", what, key.span, hint).and_then(|v| cx.string(v, "`value`"));
    Some(Constant {
        name: name?,
        value: value?,
    })
}

/// The phases when all are valid, and what is known of every step either way (references are
/// checked even in a document with other problems).
type Phases = (Option<Vec<Phase>>, Vec<(String, Vec<StepInfo>)>);

fn phases(cx: &mut DocumentReader<'_>, key: &Node, node: &Node) -> Option<Phases> {
    let hint = "add a `build`, `validate` or `test` phase with steps";
    let items = non_empty_list(cx, key, node, "phases", hint)?;
    let mut phases = Vec::new();
    let mut infos = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut complete = true;
    for item in items {
        if cx.mapping(item, "a phase", PHASE_KEYS).is_none() {
            complete = false;
            continue;
        }
        let hint = "add `name: build` (or `validate`, `test`)";
        let name_node = required(cx, item, "name", "a phase", item.span, hint);
        let name = name_node.and_then(|n| cx.string(n, "a phase `name`"));
        if let (Some(name), Some(n)) = (&name, name_node) {
            let twice = format!("phase `{name}` is defined twice");
            first_use(
                cx,
                &mut seen,
                name,
                n,
                twice,
                "put all its steps in one phase",
            );
        }
        let phase_index = infos.len();
        let mut step_infos = Vec::new();
        let steps = match item.entry("steps") {
            None => {
                cx.error(
                    item.span,
                    format!("phase `{}` has no `steps`", name.as_deref().unwrap_or("?")),
                    None,
                );
                None
            }
            Some((k, v)) => steps(cx, phase_index, k, v, &mut step_infos),
        };
        infos.push((name.clone().unwrap_or_default(), step_infos));
        match (name, steps) {
            (Some(name), Some(steps)) => phases.push(Phase { name, steps }),
            _ => complete = false,
        }
    }
    // A document with only non-standard phases (AWS's own SSM example has just `verify`) is
    // accepted with a warning: Image Builder would run none of its phases, but
    // `builder component run --phases <name>` can, like `awstoe run`.
    if !seen.keys().any(|n| STANDARD_PHASES.contains(&n.as_str())) && !seen.is_empty() {
        cx.warning(
            key.span,
            "no `build`, `validate` or `test` phase: an image build runs none of these phases",
            Some("rename a phase to `build`, or run it explicitly with `--phases`".to_string()),
        );
    }
    Some((complete.then_some(phases), infos))
}

fn steps(
    cx: &mut DocumentReader<'_>,
    phase: usize,
    key: &Node,
    node: &Node,
    infos: &mut Vec<StepInfo>,
) -> Option<Vec<Step>> {
    let hint = "add at least one step, or remove the phase";
    let items = non_empty_list(cx, key, node, "steps", hint)?;
    let mut out = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut loop_names: HashMap<String, usize> = HashMap::new();
    let mut complete = true;
    for (index, item) in items.iter().enumerate() {
        match step(cx, phase, index, item, &mut names, &mut loop_names, infos) {
            Some(s) => out.push(s),
            None => complete = false,
        }
    }
    complete.then_some(out)
}

#[allow(clippy::too_many_arguments)]
fn step(
    cx: &mut DocumentReader<'_>,
    phase: usize,
    index: usize,
    item: &Node,
    names: &mut HashMap<String, usize>,
    loop_names: &mut HashMap<String, usize>,
    infos: &mut Vec<StepInfo>,
) -> Option<Step> {
    if cx.mapping(item, "a step", STEP_KEYS).is_none() {
        infos.push(StepInfo::default());
        return None;
    }
    let get = |k: &str| item.get(k);
    let name_node = required(
        cx,
        item,
        "name",
        "a step",
        item.span,
        "add `name: <StepName>`",
    );
    let name = name_node.and_then(|n| cx.string(n, "a step `name`"));
    if let (Some(name), Some(n)) = (&name, name_node) {
        let twice = format!("step name `{name}` is used twice in this phase");
        first_use(
            cx,
            names,
            name,
            n,
            twice,
            "step names must be unique within a phase",
        );
    }
    let what = match &name {
        Some(n) => format!("step `{n}`"),
        None => "this step".to_string(),
    };
    let hint = "add `action: ExecuteBash` (or another action module)";
    let action = required(cx, item, "action", &what, item.span, hint).and_then(|a| action(cx, a));

    // The loop first: references in inputs depend on whether the step loops.
    let looping = get("loop").and_then(|l| step_loop(cx, l, loop_names));
    let loop_ctx = match (get("loop"), &looping) {
        (None, _) => LoopCtx::None,
        (Some(_), Some(l)) => LoopCtx::Named(l.name.clone()),
        (Some(_), None) => LoopCtx::Unknown,
    };
    cx.current = Some(StepCtx {
        phase,
        step: index,
        looping: loop_ctx,
    });
    // Re-read the loop's strings now that the context is known (they may hold references).
    if let Some(l) = get("loop") {
        loop_texts(cx, l);
    }

    let (inputs, info) = match action {
        Some(action) => inputs::step_inputs(cx, action, item, get("inputs"), &what),
        None => (None, refs::InputsInfo::Unknown),
    };
    infos.push(StepInfo {
        name: name.clone().unwrap_or_default(),
        action,
        inputs: info,
    });

    let on_failure = match get("onFailure") {
        None => Some(OnFailure::Abort),
        Some(v) => word(cx, v, "`onFailure`", "onFailure", ON_FAILURE),
    };
    let fixed = action == Some(Action::ExecuteDocument);
    let max_attempts = match get("maxAttempts") {
        None => Some(1),
        Some(v) => match v.as_int() {
            Some(n) if n >= 1 && fixed && n != 1 => refuse(
                cx,
                v,
                "`maxAttempts` of an `ExecuteDocument` step must be 1",
                "remove `maxAttempts`; nested documents are never retried",
            ),
            Some(n) if n >= 1 => u32::try_from(n).ok().or_else(|| {
                cx.error(v.span, format!("`maxAttempts` {n} is too large"), None);
                None
            }),
            Some(n) => refuse(
                cx,
                v,
                format!("`maxAttempts` must be at least 1, found {n}"),
                "`maxAttempts` counts all attempts; 1 means no retry",
            ),
            None => refuse_not_a(cx, v, "`maxAttempts`", "a whole number"),
        },
    };
    let timeout_secs = match get("timeoutSeconds") {
        None if fixed => Some(None),
        None => Some(Some(DEFAULT_TIMEOUT_SECS)),
        Some(v) => match v.as_int() {
            Some(-1) => Some(None),
            Some(n) if fixed => refuse(
                cx,
                v,
                format!("`timeoutSeconds` of an `ExecuteDocument` step must be -1, found {n}"),
                "remove `timeoutSeconds`; nested documents run without a step timeout",
            ),
            Some(0) => refuse(
                cx,
                v,
                "`timeoutSeconds` is 0",
                "use a number of seconds greater than 0, or -1 for no timeout",
            ),
            Some(n) if n > 0 => Some(Some(n as u64)),
            Some(n) => refuse(
                cx,
                v,
                format!("`timeoutSeconds` must be greater than 0 or -1, found {n}"),
                "use -1 for no timeout",
            ),
            None => refuse_not_a(cx, v, "`timeoutSeconds`", "a whole number of seconds"),
        },
    };
    let condition = match get("if") {
        None => Some(None),
        Some(v) => condition(cx, v).map(Some),
    };
    cx.current = None;

    Some(Step {
        name: name?,
        action: action?,
        inputs: inputs?,
        on_failure: on_failure?,
        max_attempts: max_attempts?,
        timeout_secs: timeout_secs?,
        looping: match get("loop") {
            Some(_) => Some(looping?),
            None => None,
        },
        condition: condition?,
        span: item.span,
    })
}

fn action(cx: &mut DocumentReader<'_>, node: &Node) -> Option<Action> {
    let name = cx.string(node, "`action`")?;
    if let Some(a) = Action::from_name(&name) {
        return Some(a);
    }
    let names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
    let hint = did_you_mean_hint(&name, names.iter().copied()).unwrap_or_else(|| {
        "see the list of action modules in the AWSTOE documentation (ExecuteBash, CreateFile, \
         WebDownload, …)"
            .to_string()
    });
    cx.error(node.span, format!("unknown action `{name}`"), Some(hint));
    None
}

fn step_loop(
    cx: &mut DocumentReader<'_>,
    node: &Node,
    loop_names: &mut HashMap<String, usize>,
) -> Option<Loop> {
    cx.mapping(node, "`loop`", LOOP_KEYS)?;
    let get = |k: &str| node.get(k);
    let mut ok = true;
    let name = match get("name") {
        None => None,
        Some(n) => match cx.string(n, "a loop `name`") {
            Some(name) => {
                if name == "loop" || !plain_name(&name) {
                    cx.error(
                        n.span,
                        format!("loop name `{name}` cannot be used in references"),
                        Some("use letters, digits, `_` and `-`, and not the word `loop`".into()),
                    );
                    ok = false;
                } else {
                    let twice = format!("loop name `{name}` is used twice in this phase");
                    let rule = "loop names must be unique within a phase";
                    ok = first_use(cx, loop_names, &name, n, twice, rule);
                }
                Some(name)
            }
            None => {
                ok = false;
                None
            }
        },
    };
    let kind = match (get("for"), get("forEach")) {
        (Some(_), Some(fe)) => refuse(
            cx,
            fe,
            "a loop has both `for` and `forEach`",
            "keep one of them; use two steps for two loops",
        ),
        (None, None) => refuse(
            cx,
            node,
            "a loop needs `for` or `forEach`",
            "e.g. `forEach: [a, b]` or `for: {start: 1, end: 3, updateBy: 1}`",
        ),
        (Some(f), None) => for_loop(cx, f),
        (None, Some(fe)) => for_each(cx, fe),
    };
    let kind = kind?;
    ok.then_some(Loop { name, kind })
}

fn for_loop(cx: &mut DocumentReader<'_>, node: &Node) -> Option<LoopKind> {
    cx.mapping(node, "`for`", FOR_KEYS)?;
    let mut value = |key: &str| -> Option<i64> {
        let hint = "`for` needs `start`, `end` and `updateBy`";
        let v = required(cx, node, key, "`for`", node.span, hint)?;
        match v.as_int() {
            Some(n) => Some(n),
            None => {
                cx.error(
                    v.span,
                    format!("`{key}` must be a whole number, found {}", v.describe()),
                    v.as_str()
                        .filter(|s| s.contains("{{"))
                        .map(|_| "`for` bounds cannot hold references".to_string()),
                );
                None
            }
        }
    };
    let (start, end, update_by) = (value("start"), value("end"), value("updateBy"));
    let (start, end, update_by) = (start?, end?, update_by?);
    let at = node.get("updateBy").map_or(node.span, |v| v.span);
    if update_by == 0 {
        cx.error(
            at,
            "`updateBy` is 0, so the loop never ends",
            Some("use a positive step to count up or a negative one to count down".into()),
        );
        return None;
    }
    if (start < end && update_by < 0) || (start > end && update_by > 0) {
        cx.error(
            at,
            format!(
                "this loop never ends: `updateBy: {update_by}` moves from {start} away from `end: {end}`"
            ),
            Some(format!("use `updateBy: {}`", -update_by)),
        );
        return None;
    }
    Some(LoopKind::For {
        start,
        end,
        update_by,
    })
}

fn for_each(cx: &mut DocumentReader<'_>, node: &Node) -> Option<LoopKind> {
    if let Some(items) = node.as_sequence() {
        if items.is_empty() {
            return refuse(
                cx,
                node,
                "`forEach` is an empty list",
                "list the values to loop over",
            );
        }
        let mut values = Vec::new();
        let mut ok = true;
        for item in items {
            match cx.string(item, "a `forEach` item") {
                Some(v) => values.push(v),
                None => ok = false,
            }
        }
        return ok.then_some(LoopKind::ForEach(values));
    }
    if node.as_mapping().is_none() || cx.unquoted_template(node).is_some() {
        cx.not_a(
            node,
            "`forEach`",
            "a list or a mapping with `list` and `delimiter`",
        );
        return None;
    }
    cx.mapping(node, "`forEach`", FOR_EACH_KEYS)?;
    let list = required(
        cx,
        node,
        "list",
        "`forEach`",
        node.span,
        "add `list: a,b,c`",
    )
    .and_then(|l| cx.string(l, "`list`"));
    let delimiter = match node.get("delimiter") {
        None => Some(','),
        Some(d) => delimiter(cx, d),
    };
    Some(LoopKind::ForEachDelimited {
        list: list?,
        delimiter: delimiter?,
    })
}

fn delimiter(cx: &mut DocumentReader<'_>, node: &Node) -> Option<char> {
    let text = cx.string(node, "`delimiter`")?;
    // Single-quoted or plain `\n` / `\t` are the two characters backslash and letter; the
    // documentation writes them that way, so read them as the control characters.
    let c = match text.as_str() {
        "\\n" => Some('\n'),
        "\\t" => Some('\t'),
        t => {
            let mut chars = t.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Some(c),
                _ => None,
            }
        }
    };
    match c {
        Some(c) if DELIMITERS.contains(&c) => Some(c),
        _ => {
            let shown = text.escape_debug();
            let why = if text.contains("{{") {
                "a delimiter cannot hold references".to_string()
            } else if c.is_none() {
                format!("delimiter `{shown}` must be exactly one character")
            } else {
                format!("delimiter `{shown}` is not allowed")
            };
            cx.error(
                node.span,
                why,
                Some(
                    r"use one of `.` `,` `;` `:` `-` `_`, a space `' '`, `\n` or `\t`".to_string(),
                ),
            );
            None
        }
    }
}

/// Record the loop's strings for the reference check (with the step context set).
fn loop_texts(cx: &mut DocumentReader<'_>, node: &Node) {
    let Some(fe) = node.get("forEach") else {
        return;
    };
    if let Some(items) = fe.as_sequence() {
        for item in items {
            cx.text(item);
        }
    } else if let Some(list) = fe.get("list") {
        cx.text(list);
    }
}

const IF_BRANCH_KEYS: &[&str] = &["then", "else"];

fn condition(cx: &mut DocumentReader<'_>, node: &Node) -> Option<Condition> {
    if node.as_sequence().is_some() {
        let hint =
            "write it as `if:` followed by e.g. `fileExists: /path` and optional `then:`/`else:`";
        cx.error(
            node.span,
            "`if` must be a mapping with one operator",
            Some(hint.into()),
        );
        return None;
    }
    if node.as_mapping().is_none() {
        cx.not_a(node, "`if`", "a mapping with one operator");
        return None;
    }
    let expr = expr::expression(cx, node, IF_BRANCH_KEYS, 1, "`if`");
    let branch = |cx: &mut DocumentReader<'_>, key: &str, default: Branch| match node.get(key) {
        None => Some(default),
        Some(v) => word(
            cx,
            v,
            &format!("`{key}`"),
            &format!("`{key}` action"),
            BRANCHES,
        ),
    };
    let then = branch(cx, "then", Branch::Execute);
    let otherwise = branch(cx, "else", Branch::Skip);
    Some(Condition {
        expr: expr?,
        then: then?,
        otherwise: otherwise?,
    })
}
