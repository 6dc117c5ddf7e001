//! A recipe's component entries checked against the documents they name: every parameter
//! passed is declared, every required one is given, values are allowed. Pure: the caller
//! reads the documents (with `component::parse`) and passes them in; problems point into the
//! recipe, with the declaration's `file:line:col` in the hint.

use std::collections::BTreeMap;
use std::path::Path;

use super::model::ComponentUse;
use crate::component::document::Document;
use crate::diagnostic::{Problem, did_you_mean, one_of};

/// The values `usage` gives `document`'s parameters: every declared parameter, with the value
/// from the recipe or the document's default, and the problems found. `document_path` is
/// how messages name the document; `document_text` is its source (to find declarations).
pub fn bind_parameters(
    usage: &ComponentUse,
    document: &Document,
    document_path: &Path,
    document_text: &str,
) -> (BTreeMap<String, String>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut values = BTreeMap::new();
    let declared: Vec<&str> = document
        .parameters
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let label = label(document, document_path);
    let at = |name: &str| declaration(document_path, document_text, name);

    for given in &usage.parameters {
        let Some(parameter) = document.parameters.iter().find(|p| p.name == given.name) else {
            let hint = if declared.is_empty() {
                format!("{label} declares no parameters")
            } else if let Some(close) = did_you_mean(&given.name, declared.iter().copied()) {
                match at(close) {
                    Some(place) => format!("did you mean `{close}` (declared at {place})?"),
                    None => format!("did you mean `{close}`?"),
                }
            } else {
                format!("{label} declares {}", one_of(&declared))
            };
            problems.push(
                Problem::error(
                    given.span,
                    format!("{label} has no parameter `{}`", given.name),
                )
                .with_hint(hint),
            );
            continue;
        };
        if !parameter.allowed_values.is_empty() && !parameter.allowed_values.contains(&given.value)
        {
            let mut hint = format!("allowed: {}", one_of(&parameter.allowed_values));
            if let Some(place) = at(&parameter.name) {
                hint.push_str(&format!(" (declared at {place})"));
            }
            problems.push(
                Problem::error(
                    given.span,
                    format!(
                        "`{}` is not an allowed value of parameter `{}`",
                        given.value, given.name
                    ),
                )
                .with_hint(hint),
            );
            continue;
        }
        values.insert(given.name.clone(), given.value.clone());
    }

    for parameter in &document.parameters {
        if values.contains_key(&parameter.name)
            || usage.parameters.iter().any(|g| g.name == parameter.name)
        {
            continue;
        }
        match &parameter.default {
            Some(default) => {
                values.insert(parameter.name.clone(), default.clone());
            }
            None => {
                let mut hint = format!(
                    "add `parameters: {{{}: <value>}}` to this component entry",
                    parameter.name
                );
                if let Some(place) = at(&parameter.name) {
                    hint.push_str(&format!("; it is declared at {place} without a `default`"));
                }
                problems.push(
                    Problem::error(
                        usage.path.span,
                        format!(
                            "{label} needs parameter `{}`, which has no default",
                            parameter.name
                        ),
                    )
                    .with_hint(hint),
                );
            }
        }
    }
    (values, problems)
}

/// A problem when a test component has no `test` phase (nothing of it would run).
pub fn check_test_component(
    usage: &ComponentUse,
    document: &Document,
    document_path: &Path,
) -> Option<Problem> {
    if document.phases.iter().any(|p| p.name == "test") {
        return None;
    }
    let phases: Vec<&str> = document.phases.iter().map(|p| p.name.as_str()).collect();
    Some(
        Problem::error(
            usage.path.span,
            format!(
                "test component {} has no `test` phase; the test stage runs only `test` phases",
                label(document, document_path)
            ),
        )
        .with_hint(format!(
            "it has {}; rename the phase to `test`, or list the component under `components`",
            one_of(&phases)
        )),
    )
}

/// A problem when a build component has none of the phases a build runs.
pub fn check_build_component(
    usage: &ComponentUse,
    document: &Document,
    document_path: &Path,
) -> Option<Problem> {
    let runs = ["build", "validate", "test"];
    if document
        .phases
        .iter()
        .any(|p| runs.contains(&p.name.as_str()))
    {
        return None;
    }
    Some(
        Problem::error(
            usage.path.span,
            format!(
                "component {} has no `build`, `validate` or `test` phase; a build would run none of it",
                label(document, document_path)
            ),
        )
        .with_hint("rename its phase to `build`".to_string()),
    )
}

/// Problems for steps that can never run in a Linux guest (Windows-only actions such as
/// `ExecutePowerShell`) in the phases a build runs (`phases`): found now rather than after
/// the VM has booted.
pub fn check_linux_actions(
    usage: &ComponentUse,
    document: &Document,
    document_path: &Path,
    phases: &[&str],
) -> Vec<Problem> {
    let label = label(document, document_path);
    document
        .phases
        .iter()
        .filter(|phase| phases.contains(&phase.name.as_str()))
        .flat_map(|phase| phase.steps.iter().map(move |step| (phase, step)))
        .filter(|(_, step)| step.action.windows_only())
        .map(|(phase, step)| {
            Problem::error(
                usage.path.span,
                format!(
                    "{label} uses `{}` (step `{}` of phase `{}`), which runs only on Windows",
                    step.action, step.name, phase.name
                ),
            )
            .with_hint(format!(
                "builder builds Linux guests; the step is at {}:{}:{}",
                document_path.display(),
                step.span.line,
                step.span.col
            ))
        })
        .collect()
}

/// `` `install-nginx` (components/install-nginx.yml) `` or the path alone.
fn label(document: &Document, path: &Path) -> String {
    match &document.name {
        Some(name) => format!("`{name}` ({})", path.display()),
        None => format!("`{}`", path.display()),
    }
}

/// `file:line:col` of parameter `name`'s declaration in the document's text.
fn declaration(path: &Path, text: &str, name: &str) -> Option<String> {
    let (root, _) = crate::yaml::parse(text);
    let root = root?;
    let items = root.get("parameters")?.as_sequence()?;
    items.iter().find_map(|item| {
        let (key, _) = item.as_mapping()?.first()?;
        (key.as_str() == Some(name))
            .then(|| format!("{}:{}:{}", path.display(), key.span.line, key.span.col))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use crate::diagnostic::Span;
    use crate::recipe::model::{Located, ParameterValue};

    const DOC: &str = "name: install\nschemaVersion: 1.0\nparameters:\n  - packages:\n      type: string\n  - mode:\n      type: string\n      default: fast\n      allowedValues: [fast, slow]\nphases:\n  - name: build\n    steps:\n      - name: a\n        action: ExecuteBash\n        inputs:\n          commands: [\"echo {{ packages }} {{ mode }}\"]\n";

    fn usage(params: &[(&str, &str)]) -> ComponentUse {
        ComponentUse {
            path: Located {
                value: "c.yml".into(),
                span: Span::default(),
            },
            parameters: params
                .iter()
                .map(|(n, v)| ParameterValue {
                    name: n.to_string(),
                    value: v.to_string(),
                    span: Span::default(),
                })
                .collect(),
            cache: true,
            span: Span::default(),
        }
    }

    fn doc() -> Document {
        crate::component::parse::parse_str(Path::new("c.yml"), DOC).unwrap()
    }

    #[test]
    fn fills_defaults_and_takes_given_values() {
        let (values, problems) = bind_parameters(
            &usage(&[("packages", "nginx")]),
            &doc(),
            Path::new("c.yml"),
            DOC,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(values["packages"], "nginx");
        assert_eq!(values["mode"], "fast");
    }

    #[test]
    fn undeclared_missing_and_disallowed_are_problems() {
        let (_, problems) = bind_parameters(
            &usage(&[("pakages", "x"), ("mode", "medium")]),
            &doc(),
            Path::new("c.yml"),
            DOC,
        );
        let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "`install` (c.yml) has no parameter `pakages`",
                "`medium` is not an allowed value of parameter `mode`",
                "`install` (c.yml) needs parameter `packages`, which has no default",
            ]
        );
        assert_eq!(
            problems[0].hint.as_deref(),
            Some("did you mean `packages` (declared at c.yml:4:5)?")
        );
        assert!(problems[2].hint.as_deref().unwrap().contains("c.yml:4:5"));
    }

    #[test]
    fn windows_only_actions_are_refused_in_the_phases_that_run() {
        let text = "name: win\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Ps\n        action: ExecutePowerShell\n        inputs:\n          commands: [dir]\n  - name: other\n    steps:\n      - name: Ps2\n        action: ExecutePowerShell\n        inputs:\n          commands: [dir]\n";
        let windows = crate::component::parse::parse_str(Path::new("w.yml"), text).unwrap();
        let problems = check_linux_actions(
            &usage(&[]),
            &windows,
            Path::new("w.yml"),
            &["build", "validate"],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .message
                .contains("`ExecutePowerShell` (step `Ps` of phase `build`)")
        );
        assert_eq!(
            problems[0].hint.as_deref(),
            Some("builder builds Linux guests; the step is at w.yml:6:9")
        );
        assert!(
            check_linux_actions(&usage(&[]), &doc(), Path::new("c.yml"), &["build"]).is_empty()
        );
    }

    #[test]
    fn test_components_need_a_test_phase() {
        assert!(check_test_component(&usage(&[]), &doc(), Path::new("c.yml")).is_some());
        assert!(check_build_component(&usage(&[]), &doc(), Path::new("c.yml")).is_none());
    }
}
