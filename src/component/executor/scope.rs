//! What references resolve to while a document runs: its parameters and constants, the current
//! loop iteration, and the inputs/outputs that earlier steps stored. Also the binding of
//! run-time parameter values to a document, and loop iteration lists.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use crate::component::document::{Document, Loop, LoopKind, ParameterType};
use crate::component::report::Resolution;
use crate::component::template::{self, Chain, ChainKind, LoopField, Reference, Scope};

/// A loop can have at most this many iterations: a guard against a typo such as
/// `end: 100000000`, which would otherwise run for days.
pub const MAX_ITERATIONS: usize = 100_000;

/// Inputs and outputs a step stored for chaining: both are arrays of maps.
#[derive(Debug, Clone)]
pub struct Stored {
    pub inputs: Value,
    pub outputs: Value,
}

/// The values one document run resolves references against.
pub struct Values {
    /// Parameters (bound) and constants.
    pub variables: HashMap<String, String>,
    /// `(phase, step)` → what it stored, for steps that ran.
    pub stored: Mutex<HashMap<(String, String), Stored>>,
    /// `(phase, step)` pairs that exist in the document, to tell "not run" from "no such step".
    pub steps: Vec<(String, String)>,
}

impl Values {
    pub fn new(document: &Document, variables: HashMap<String, String>) -> Self {
        let steps = document
            .phases
            .iter()
            .flat_map(|p| p.steps.iter().map(|s| (p.name.clone(), s.name.clone())))
            .collect();
        Self {
            variables,
            stored: Mutex::new(HashMap::new()),
            steps,
        }
    }

    pub fn store(&self, phase: &str, step: &str, stored: Stored) {
        if let Ok(mut map) = self.stored.lock() {
            map.insert((phase.to_string(), step.to_string()), stored);
        }
    }
}

/// The current iteration of the step's loop.
#[derive(Debug, Clone, Copy)]
pub struct Iteration<'a> {
    pub name: Option<&'a str>,
    pub index: i64,
    pub value: &'a str,
}

/// Resolves references for one step (and one iteration of its loop).
pub struct StepScope<'a> {
    pub values: &'a Values,
    pub document: &'a str,
    pub phase: &'a str,
    pub step: &'a str,
    pub iteration: Option<Iteration<'a>>,
    /// Every resolution is recorded here for `chaining.json`.
    pub record: &'a Mutex<Vec<Resolution>>,
}

impl StepScope<'_> {
    fn lookup(&self, reference: &Reference) -> Result<Option<String>, String> {
        match reference {
            Reference::Variable(name) => match self.values.variables.get(name) {
                Some(v) => Ok(Some(v.clone())),
                None => Err(format!(
                    "`{name}` is not a parameter or constant of this document"
                )),
            },
            Reference::Loop { name, field } => {
                // A loop reference in a step without a loop stays as written (reference 1.5).
                let Some(it) = self.iteration else {
                    return Ok(None);
                };
                if let Some(wanted) = name
                    && it.name != Some(wanted.as_str())
                {
                    return Err(format!(
                        "`{reference}`: this step's loop is {}",
                        it.name
                            .map(|n| format!("named `{n}`"))
                            .unwrap_or_else(|| "not named (use `loop.…`)".into())
                    ));
                }
                Ok(Some(match field {
                    LoopField::Index => it.index.to_string(),
                    LoopField::Value => it.value.to_string(),
                }))
            }
            Reference::Chain(chain) => self.chained(chain).map(Some),
            Reference::Ssm(_) => Err(format!(
                "`{reference}` needs AWS Systems Manager Parameter Store, which builder does not \
                 use (it works offline); pass the value as a parameter instead"
            )),
        }
    }

    fn chained(&self, chain: &Chain) -> Result<String, String> {
        let (phase, step, key) = (&chain.phase, &chain.step, &chain.key);
        let what = chain.kind.name();
        let stored = self
            .values
            .stored
            .lock()
            .map_err(|_| "the chaining store is unusable".to_string())?
            .get(&(phase.to_string(), step.to_string()))
            .cloned();
        let Some(stored) = stored else {
            let exists = self
                .values
                .steps
                .iter()
                .any(|(p, s)| p == phase && s == step);
            return Err(if exists {
                format!(
                    "step `{phase}.{step}` has not run (yet), so its {what} are not known; \
                     a step can use the {what} of steps that ran before it"
                )
            } else {
                format!("there is no step `{step}` in phase `{phase}` of this document")
            });
        };
        let list = match chain.kind {
            ChainKind::Inputs => stored.inputs,
            ChainKind::Outputs => stored.outputs,
        };
        let items = list.as_array().cloned().unwrap_or_default();
        let i = chain.index.unwrap_or(0);
        let Some(item) = items.get(i) else {
            return Err(format!(
                "step `{phase}.{step}` has {} {what} item(s); there is no [{i}]",
                items.len()
            ));
        };
        match item.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Null) => Ok(String::new()),
            Some(other) => Ok(other.to_string()),
            None => {
                let keys: Vec<String> = item
                    .as_object()
                    .map(|m| m.keys().map(|k| format!("`{k}`")).collect())
                    .unwrap_or_default();
                Err(format!(
                    "step `{phase}.{step}` has no {what} `{key}`{}",
                    if keys.is_empty() {
                        String::new()
                    } else {
                        format!(" (it has {})", keys.join(", "))
                    }
                ))
            }
        }
    }
}

impl Scope for StepScope<'_> {
    fn resolve(&self, reference: &Reference) -> Result<Option<String>, String> {
        let result = self.lookup(reference);
        if let Ok(mut record) = self.record.lock() {
            let (value, error) = match &result {
                Ok(Some(v)) => (Some(v.clone()), None),
                Ok(None) => (None, None),
                Err(e) => (None, Some(e.clone())),
            };
            record.push(Resolution {
                document: self.document.to_string(),
                phase: self.phase.to_string(),
                step: self.step.to_string(),
                reference: reference.to_string(),
                value,
                error,
            });
        }
        result
    }
}

/// Expand every string inside `value` (keys stay as written).
pub fn expand_json(value: &Value, scope: &dyn Scope) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(template::expand(s, scope)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| expand_json(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), expand_json(v, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Inputs as the array `detailedoutput.json` and chaining use: a map becomes one element.
pub fn as_input_array(inputs: &Value) -> Value {
    match inputs {
        Value::Array(_) => inputs.clone(),
        Value::Null => Value::Array(Vec::new()),
        other => Value::Array(vec![other.clone()]),
    }
}

/// The (index, value) pairs of a loop; `forEach` items and the delimited list are expanded
/// with `scope` first.
pub fn iterations(looping: &Loop, scope: &dyn Scope) -> Result<Vec<(i64, String)>, String> {
    let values: Vec<String> = match &looping.kind {
        LoopKind::For {
            start,
            end,
            update_by,
        } => {
            let mut values = Vec::new();
            let mut current = *start;
            while (*update_by > 0 && current <= *end) || (*update_by < 0 && current >= *end) {
                if values.len() >= MAX_ITERATIONS {
                    return Err(format!(
                        "the loop would run more than {MAX_ITERATIONS} iterations"
                    ));
                }
                values.push(current.to_string());
                match current.checked_add(*update_by) {
                    Some(next) => current = next,
                    None => break,
                }
            }
            values
        }
        LoopKind::ForEach(items) => items
            .iter()
            .map(|item| template::expand(item, scope))
            .collect::<Result<_, _>>()?,
        LoopKind::ForEachDelimited { list, delimiter } => {
            let list = template::expand(list, scope)?;
            if list.is_empty() {
                Vec::new()
            } else {
                list.split(*delimiter).map(str::to_string).collect()
            }
        }
    };
    if values.len() > MAX_ITERATIONS {
        return Err(format!(
            "the loop has {} iterations; at most {MAX_ITERATIONS} are allowed",
            values.len()
        ));
    }
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as i64, v))
        .collect())
}

/// `--parameters` values: `n=v,n=v`, possibly given several times. A piece without `=`
/// continues the previous value (so `list=a,b,c` keeps its commas). Empty values and empty
/// names are errors.
pub fn parse_parameter_overrides(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for arg in args {
        let mut in_this_arg = false;
        for piece in arg.split(',') {
            match piece.split_once('=') {
                Some((name, value)) => {
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(format!("`{piece}` has no parameter name; write name=value"));
                    }
                    out.push((name.to_string(), value.to_string()));
                    in_this_arg = true;
                }
                None if in_this_arg => {
                    if let Some((_, value)) = out.last_mut() {
                        value.push(',');
                        value.push_str(piece);
                    }
                }
                None => {
                    return Err(format!(
                        "`{piece}` is not name=value; write --parameters name=value,name2=value2"
                    ));
                }
            }
        }
    }
    for (name, value) in &out {
        if value.is_empty() {
            return Err(format!(
                "parameter `{name}` has an empty value; give a value or leave it out to use its default"
            ));
        }
    }
    Ok(out)
}

/// Where a run's parameter values come from, for the fix a "required" error suggests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Given {
    /// `--parameters name=value` (or a recipe, which checks its own values first).
    CommandLine,
    /// The `parameters` input of an `ExecuteDocument` step.
    Step,
}

/// The variables of `document` for a run: constants, then each parameter from `overrides`
/// (the last given wins) or its default. Errors name the document, parameter and fix.
pub fn bind_parameters(
    document: &Document,
    label: &str,
    overrides: &[(String, String)],
    from: Given,
) -> Result<HashMap<String, String>, Vec<String>> {
    let mut variables = HashMap::new();
    let mut errors = Vec::new();
    for constant in &document.constants {
        variables.insert(constant.name.clone(), constant.value.clone());
    }
    for parameter in &document.parameters {
        let given = overrides
            .iter()
            .rev()
            .find(|(n, _)| *n == parameter.name)
            .map(|(_, v)| v.clone());
        let Some(value) = given.or_else(|| parameter.default.clone()) else {
            let n = &parameter.name;
            errors.push(match from {
                Given::CommandLine => format!(
                    "{label}: parameter `{n}` is required (it has no default); pass it with \
                     --parameters {n}=VALUE"
                ),
                Given::Step => format!(
                    "{label}: parameter `{n}` is required (it has no default); give it in the \
                     step's `parameters`: `- name: {n}` with its `value`"
                ),
            });
            continue;
        };
        if !parameter.allowed_values.is_empty() && !parameter.allowed_values.contains(&value) {
            errors.push(format!(
                "{label}: `{value}` is not an allowed value of parameter `{}`; allowed: {}",
                parameter.name,
                parameter
                    .allowed_values
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        }
        let type_ok = match parameter.kind {
            ParameterType::Integer => value.trim().parse::<i64>().is_ok(),
            ParameterType::Boolean => matches!(value.as_str(), "true" | "false"),
            ParameterType::String | ParameterType::StringList => true,
        };
        if !type_ok {
            errors.push(format!(
                "{label}: `{value}` is not a valid {:?} for parameter `{}`",
                parameter.kind, parameter.name
            ));
            continue;
        }
        variables.insert(parameter.name.clone(), value);
    }
    if errors.is_empty() {
        Ok(variables)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parameter_overrides() {
        assert_eq!(
            parse_parameter_overrides(&s(&["a=1,b=x,y", "c=="])).expect("valid"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "=".into())
            ]
        );
        assert!(parse_parameter_overrides(&s(&["a="])).is_err());
        assert!(parse_parameter_overrides(&s(&["=1"])).is_err());
        assert!(parse_parameter_overrides(&s(&["novalue"])).is_err());
        assert_eq!(parse_parameter_overrides(&[]).expect("valid"), vec![]);
    }

    #[test]
    fn for_loops_count_up_and_down_inclusively() {
        struct NoRefs;
        impl Scope for NoRefs {
            fn resolve(&self, _: &Reference) -> Result<Option<String>, String> {
                Err("no references here".into())
            }
        }
        let make = |start, end, update_by| Loop {
            name: None,
            kind: LoopKind::For {
                start,
                end,
                update_by,
            },
        };
        let values = |l: &Loop| -> Vec<String> {
            iterations(l, &NoRefs)
                .expect("valid")
                .into_iter()
                .map(|(_, v)| v)
                .collect()
        };
        assert_eq!(values(&make(1, 3, 1)), ["1", "2", "3"]);
        assert_eq!(values(&make(10, 0, -5)), ["10", "5", "0"]);
        assert_eq!(values(&make(0, 5, 2)), ["0", "2", "4"]);
        assert!(values(&make(i64::MAX - 1, i64::MAX, 5)).len() == 1);
        assert!(iterations(&make(0, 10_000_000, 1), &NoRefs).is_err());
        let delimited = Loop {
            name: None,
            kind: LoopKind::ForEachDelimited {
                list: "a;b;;c".into(),
                delimiter: ';',
            },
        };
        assert_eq!(values(&delimited), ["a", "b", "", "c"]);
    }
}
