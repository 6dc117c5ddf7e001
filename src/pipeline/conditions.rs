//! "Only when a dependency changed": the inputs of a build as the plan pins them (the parent
//! image's digest and what it resolved to, each component document's digest, every parameter
//! value, the recipe file's digest), compared with the inputs recorded by the pipeline's last
//! successful execution. No VM: the plan hashes a local parent (through the store's hash
//! index) and resolves `name/1.x.x` to the newest stored build.
//!
//! A parent from an OCI registry named by its tag (`oci://host/repo:tag`) is pinned by the plan
//! to the manifest digest the tag points at now (pipelines always resolve tags), so a newer push
//! to the tag is a change, named with its new digest.
//!
//! With `packageUpdates: true`, a run whose inputs did not change still builds when the
//! repositories of the last image offer newer versions of its installed packages
//! ([`package_updates`]): the check runs on the host against the package list and sources
//! the image's manifest records (`crate::packages`), without a VM.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::history::Execution;
use super::model::{OnCheckFailure, StartCondition};
use crate::build::plan::{Plan, PlannedComponent, PlannedParent, ReachedDocument};
use crate::store::manifest::DocumentInput;

/// What a build is made from, as recorded with each execution (`inputs` in the history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inputs {
    /// sha256 of the recipe file.
    pub recipe: String,
    pub parent: ParentInput,
    pub components: Vec<ComponentInput>,
    #[serde(default)]
    pub test_components: Vec<ComponentInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentInput {
    /// As written in the recipe (a path, a URL, `name/1.x.x`).
    pub written: String,
    /// The stored build a `name/1.x.x` parent resolved to (`name/1.2.0/3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentInput {
    /// As written in the recipe.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub sha256: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// The documents it runs through `ExecuteDocument`, at any depth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<DocumentInput>,
}

impl ComponentInput {
    fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.path)
    }
}

impl Inputs {
    /// The inputs `plan` pins.
    pub fn of(plan: &Plan) -> Inputs {
        let parent = match &plan.parent {
            PlannedParent::File { path, sha256, .. } => ParentInput {
                written: path.clone(),
                resolved: None,
                sha256: sha256.to_string(),
            },
            PlannedParent::Url { url, sha256 } => ParentInput {
                written: url.clone(),
                resolved: None,
                sha256: sha256.to_string(),
            },
            PlannedParent::Store {
                reference,
                resolved,
                sha256,
                ..
            } => ParentInput {
                written: reference.clone(),
                resolved: Some(resolved.clone()),
                sha256: sha256.to_string(),
            },
            PlannedParent::Archive { path, sha256, .. } => ParentInput {
                written: path.clone(),
                resolved: None,
                sha256: sha256.to_string(),
            },
            // A rebuilt parent has a new image digest.
            PlannedParent::StoredContainer {
                reference,
                resolved,
                manifest_digest,
                ..
            } => ParentInput {
                written: reference.clone(),
                resolved: Some(resolved.clone()),
                sha256: manifest_digest.to_string(),
            },
            // The plan asked the registry what the tag points at now: a pushed image moves
            // the manifest digest.
            PlannedParent::Oci {
                reference,
                manifest_digest,
            } => ParentInput {
                written: format!("oci://{reference}"),
                resolved: None,
                sha256: manifest_digest.to_string(),
            },
        };
        let component = |c: &PlannedComponent| ComponentInput {
            path: c.path.clone(),
            name: c.name.clone(),
            sha256: c.sha256.to_string(),
            parameters: c.parameters.clone(),
            documents: c.documents.iter().map(ReachedDocument::input).collect(),
        };
        Inputs {
            recipe: plan.recipe.sha256.to_string(),
            parent,
            components: plan.components.iter().map(component).collect(),
            test_components: plan.tests.components.iter().map(component).collect(),
        }
    }

    #[expect(
        clippy::expect_used,
        reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
    )]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("inputs serialise to JSON")
    }

    /// What did not change, for a skip reason: "parent image `x` (sha256 abcd…), 2 component
    /// documents and their parameters, the recipe".
    fn summary(&self) -> String {
        let n = self.components.len() + self.test_components.len();
        let mut reached: Vec<&str> = self
            .components
            .iter()
            .chain(&self.test_components)
            .flat_map(|c| c.documents.iter().map(|d| d.path.as_str()))
            .collect();
        reached.sort_unstable();
        reached.dedup();
        let reached = match reached.len() {
            0 => String::new(),
            1 => ", the document they run through ExecuteDocument".to_string(),
            r => format!(", the {r} documents they run through ExecuteDocument"),
        };
        format!(
            "parent image `{}`{} (sha256 {}), {n} component document{} and {} parameters{reached}, the recipe file",
            self.parent.written,
            self.parent
                .resolved
                .as_ref()
                .map(|r| format!(" = {r}"))
                .unwrap_or_default(),
            short(&self.parent.sha256),
            if n == 1 { "" } else { "s" },
            if n == 1 { "its" } else { "their" },
        )
    }
}

fn short(digest: &str) -> &str {
    &digest[..12.min(digest.len())]
}

/// Each difference between `before` and `now`, in words.
pub fn changes(before: &Inputs, now: &Inputs) -> Vec<String> {
    let mut out = Vec::new();
    let (b, n) = (&before.parent, &now.parent);
    if b.written != n.written {
        out.push(format!(
            "the parent image is now `{}` (was `{}`)",
            n.written, b.written
        ));
    } else if b.sha256 != n.sha256 && n.written.starts_with("oci://") {
        // A moved tag: the new digest in full, so it can be pinned or pulled.
        out.push(format!(
            "parent image `{}` now points to sha256:{} (was sha256:{})",
            n.written,
            n.sha256,
            short(&b.sha256)
        ));
    } else if b.sha256 != n.sha256 || b.resolved != n.resolved {
        let resolved = match (&b.resolved, &n.resolved) {
            (Some(old), Some(new)) if old != new => format!(": {old} → {new}"),
            _ => String::new(),
        };
        out.push(format!(
            "parent image `{}` changed{resolved} (sha256 {} → {})",
            n.written,
            short(&b.sha256),
            short(&n.sha256)
        ));
    }
    for (kind, old, new) in [
        ("component", &before.components, &now.components),
        (
            "test component",
            &before.test_components,
            &now.test_components,
        ),
    ] {
        for c in new {
            match old.iter().find(|o| o.path == c.path) {
                None => out.push(format!("{kind} `{}` was added", c.label())),
                Some(o) => {
                    if o.sha256 != c.sha256 {
                        out.push(format!(
                            "{kind} `{}` document changed (sha256 {} → {})",
                            c.label(),
                            short(&o.sha256),
                            short(&c.sha256)
                        ));
                    }
                    for d in &c.documents {
                        match o.documents.iter().find(|od| od.path == d.path) {
                            None => out.push(format!(
                                "{kind} `{}` now runs `{}` (ExecuteDocument)",
                                c.label(),
                                d.path
                            )),
                            Some(od) if od.sha256 != d.sha256 => out.push(format!(
                                "`{}`, which {kind} `{}` runs through ExecuteDocument, changed (sha256 {} → {})",
                                d.path,
                                c.label(),
                                short(&od.sha256),
                                short(&d.sha256)
                            )),
                            Some(_) => {}
                        }
                    }
                    for od in &o.documents {
                        if !c.documents.iter().any(|d| d.path == od.path) {
                            out.push(format!(
                                "{kind} `{}` no longer runs `{}` (ExecuteDocument)",
                                c.label(),
                                od.path
                            ));
                        }
                    }
                    let mut names: Vec<&String> =
                        o.parameters.keys().chain(c.parameters.keys()).collect();
                    names.sort();
                    names.dedup();
                    for p in names {
                        let (was, is) = (o.parameters.get(p), c.parameters.get(p));
                        if was != is {
                            out.push(format!(
                                "{kind} `{}` parameter `{p}` is now {} (was {})",
                                c.label(),
                                shown(is),
                                shown(was)
                            ));
                        }
                    }
                }
            }
        }
        for o in old {
            if !new.iter().any(|c| c.path == o.path) {
                out.push(format!("{kind} `{}` was removed", o.label()));
            }
        }
    }
    let order_old: Vec<&str> = before.components.iter().map(|c| c.path.as_str()).collect();
    let order_new: Vec<&str> = now.components.iter().map(|c| c.path.as_str()).collect();
    if out.is_empty() && order_old != order_new {
        out.push("the components are in a different order".into());
    }
    if before.recipe != now.recipe && out.is_empty() {
        out.push(format!(
            "the recipe file changed (sha256 {} → {})",
            short(&before.recipe),
            short(&now.recipe)
        ));
    }
    out
}

fn shown(value: Option<&String>) -> String {
    match value {
        Some(v) => format!("`{v}`"),
        None => "unset".into(),
    }
}

/// Whether to build, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Run { reason: String },
    Skip { reason: String },
}

/// The start condition applied: build or skip, with the reason recorded in the history.
/// `force` builds whatever changed (`builder pipeline run --force`).
pub fn evaluate(
    condition: StartCondition,
    force: bool,
    last_success: Option<&Execution>,
    now: &Inputs,
) -> Verdict {
    if force {
        return Verdict::Run {
            reason: "forced (--force)".into(),
        };
    }
    if condition == StartCondition::Always {
        return Verdict::Run {
            reason: "start condition `always`".into(),
        };
    }
    let Some(last) = last_success else {
        return Verdict::Run {
            reason: "dependencyChanged: no successful execution yet".into(),
        };
    };
    let before = last
        .inputs
        .as_ref()
        .and_then(|v| serde_json::from_value::<Inputs>(v.clone()).ok());
    let Some(before) = before else {
        return Verdict::Run {
            reason: format!(
                "dependencyChanged: execution {} recorded no inputs to compare with",
                last.id
            ),
        };
    };
    let changed = changes(&before, now);
    let image = last
        .image
        .as_ref()
        .map(|i| format!(" ({i})"))
        .unwrap_or_default();
    if changed.is_empty() {
        Verdict::Skip {
            reason: format!(
                "nothing changed since execution {}{image}: {}",
                last.id,
                now.summary()
            ),
        }
    } else {
        Verdict::Run {
            reason: format!(
                "dependency changed since execution {}{image}: {}",
                last.id,
                changed.join("; ")
            ),
        }
    }
}

/// A skip that `packageUpdates` turned around, or confirmed, or could not decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageVerdict {
    pub verdict: Verdict,
    /// The check failed: the reason says why; `onCheckFailure: skip` notifies whatever
    /// `notifications.on` says.
    pub check_failed: bool,
}

/// `packageUpdates`: `skipped` is the reason nothing else changed since `last`; the last
/// image's manifest is checked against its repositories now.
pub async fn package_updates(
    store: &crate::store::Store,
    last: &Execution,
    skipped: String,
    on_failure: OnCheckFailure,
) -> PackageVerdict {
    let result = match last_image(store, last) {
        Ok((image, manifest)) => crate::packages::image::check_image(store, &image, &manifest)
            .await
            .map_err(|e| {
                let text = crate::diagnostic::error_chain(&e);
                match e.hint() {
                    Some(hint) => format!("{text} (hint: {hint})"),
                    None => text,
                }
            }),
        Err(e) => Err(e),
    };
    package_verdict(last, skipped, result, on_failure)
}

/// The last successful execution's image and its manifest.
fn last_image(
    store: &crate::store::Store,
    last: &Execution,
) -> Result<(String, crate::store::manifest::Manifest), String> {
    let image = last.image.clone().ok_or_else(|| {
        format!(
            "could not check updates: execution {} recorded no image",
            last.id
        )
    })?;
    let reference = image
        .parse::<crate::store::reference::ImageRef>()
        .map_err(|e| {
            format!(
                "could not check updates: execution {}'s image `{image}`: {e}",
                last.id
            )
        })?;
    let stored = store.resolve(&reference).map_err(|e| {
        format!(
            "could not check updates: execution {}'s image {image} is no longer in the store ({e})",
            last.id
        )
    })?;
    Ok((image, stored.manifest))
}

/// The decision from the check's result (pure, for tests).
pub fn package_verdict(
    last: &Execution,
    skipped: String,
    checked: Result<crate::packages::Outdated, String>,
    on_failure: OnCheckFailure,
) -> PackageVerdict {
    let image = last
        .image
        .as_ref()
        .map(|i| format!(" ({i})"))
        .unwrap_or_default();
    match checked {
        Ok(outdated) if outdated.updates.is_empty() => PackageVerdict {
            verdict: Verdict::Skip {
                reason: format!("{skipped}; package updates checked: {}", outdated.summary()),
            },
            check_failed: false,
        },
        Ok(outdated) => PackageVerdict {
            verdict: Verdict::Run {
                reason: format!(
                    "package updates since execution {}{image}: {}",
                    last.id,
                    outdated.summary()
                ),
            },
            check_failed: false,
        },
        Err(why) => PackageVerdict {
            verdict: match on_failure {
                OnCheckFailure::Skip => Verdict::Skip {
                    reason: format!("{why}\n{skipped}"),
                },
                OnCheckFailure::Build => Verdict::Run {
                    reason: format!("{why}; building anyway (onCheckFailure: build)"),
                },
            },
            check_failed: true,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            recipe: "r".repeat(64),
            parent: ParentInput {
                written: "base/1.x.x".into(),
                resolved: Some("base/1.0.0/2".into()),
                sha256: "a".repeat(64),
            },
            components: vec![ComponentInput {
                path: "c.yml".into(),
                name: Some("hello".into()),
                sha256: "c".repeat(64),
                parameters: [("greeting".to_string(), "hi".to_string())].into(),
                documents: vec![DocumentInput {
                    path: "lib/common.yml".into(),
                    sha256: "e".repeat(64),
                }],
            }],
            test_components: Vec::new(),
        }
    }

    #[test]
    fn equal_inputs_have_no_changes() {
        assert!(changes(&inputs(), &inputs()).is_empty());
        let json = inputs().to_json();
        assert_eq!(serde_json::from_value::<Inputs>(json).unwrap(), inputs());
    }

    #[test]
    fn each_change_is_named() {
        let before = inputs();
        let mut now = inputs();
        now.parent.resolved = Some("base/1.0.0/3".into());
        now.parent.sha256 = "b".repeat(64);
        now.components[0].sha256 = "d".repeat(64);
        now.components[0]
            .parameters
            .insert("greeting".into(), "hello".into());
        let c = changes(&before, &now);
        assert_eq!(
            c,
            [
                "parent image `base/1.x.x` changed: base/1.0.0/2 → base/1.0.0/3 (sha256 aaaaaaaaaaaa → bbbbbbbbbbbb)",
                "component `hello` document changed (sha256 cccccccccccc → dddddddddddd)",
                "component `hello` parameter `greeting` is now `hello` (was `hi`)",
            ]
        );
        let mut oci_before = inputs();
        oci_before.parent = ParentInput {
            written: "oci://127.0.0.1:5000/base:1".into(),
            resolved: None,
            sha256: "a".repeat(64),
        };
        let mut oci_now = oci_before.clone();
        oci_now.parent.sha256 = "b".repeat(64);
        assert_eq!(
            changes(&oci_before, &oci_now),
            [format!(
                "parent image `oci://127.0.0.1:5000/base:1` now points to sha256:{} (was sha256:aaaaaaaaaaaa)",
                "b".repeat(64)
            )]
        );
        let mut recipe_only = inputs();
        recipe_only.recipe = "s".repeat(64);
        assert_eq!(
            changes(&before, &recipe_only),
            ["the recipe file changed (sha256 rrrrrrrrrrrr → ssssssssssss)"]
        );
    }

    fn last_execution() -> Execution {
        Execution {
            id: crate::pipeline::history::ExecutionId(4),
            pipeline: "web".into(),
            trigger: crate::pipeline::history::Trigger::Manual,
            reason: String::new(),
            status: crate::pipeline::history::ExecStatus::Available,
            created: chrono::Utc::now(),
            started: None,
            finished: None,
            image: Some("web/1.0.0/4".into()),
            build_id: None,
            manifest: None,
            logs: None,
            error: None,
            inputs: Some(inputs().to_json()),
            runner: None,
            transitions: Vec::new(),
        }
    }

    fn outdated(updates: &[(&str, &str, &str, bool)]) -> crate::packages::Outdated {
        crate::packages::Outdated {
            packages_checked: 312,
            repositories: Vec::new(),
            updates: updates
                .iter()
                .map(|(name, from, to, security)| crate::packages::Update {
                    name: (*name).into(),
                    arch: "amd64".into(),
                    installed: (*from).into(),
                    candidate: (*to).into(),
                    repository: if *security {
                        "bookworm-security".into()
                    } else {
                        "bookworm".into()
                    },
                    security: *security,
                })
                .collect(),
        }
    }

    #[test]
    fn package_updates_turn_a_skip_into_a_build_naming_them() {
        let last = last_execution();
        let found = outdated(&[("nginx", "1.22.1-9+deb12u12", "1.22.1-9+deb12u13", true)]);
        let v = package_verdict(
            &last,
            "nothing changed".into(),
            Ok(found),
            OnCheckFailure::Skip,
        );
        assert!(!v.check_failed);
        let Verdict::Run { reason } = v.verdict else {
            panic!("updates must build: {v:?}")
        };
        assert!(
            reason.starts_with(
                "package updates since execution 4 (web/1.0.0/4): 1 update (1 security)"
            ),
            "{reason}"
        );
        assert!(
            reason.contains("nginx 1.22.1-9+deb12u12 → 1.22.1-9+deb12u13 (bookworm-security)"),
            "{reason}"
        );
    }

    #[test]
    fn no_package_updates_keep_the_skip_and_say_so() {
        let v = package_verdict(
            &last_execution(),
            "nothing changed since execution 4".into(),
            Ok(outdated(&[])),
            OnCheckFailure::Build,
        );
        assert_eq!(
            v,
            PackageVerdict {
                verdict: Verdict::Skip {
                    reason: "nothing changed since execution 4; package updates checked: no updates among 312 packages from 0 repositories".into()
                },
                check_failed: false,
            }
        );
    }

    #[test]
    fn a_failed_check_skips_or_builds_as_configured_and_says_why() {
        let why = || {
            Err(
                "could not check updates: http://10.0.2.2:8080/debian bookworm: bad signature"
                    .to_string(),
            )
        };
        let skip = package_verdict(
            &last_execution(),
            "nothing changed".into(),
            why(),
            OnCheckFailure::Skip,
        );
        assert!(skip.check_failed);
        assert_eq!(
            skip.verdict,
            Verdict::Skip {
                reason: "could not check updates: http://10.0.2.2:8080/debian bookworm: bad signature\nnothing changed".into()
            }
        );
        let build = package_verdict(
            &last_execution(),
            "nothing changed".into(),
            why(),
            OnCheckFailure::Build,
        );
        assert!(build.check_failed);
        assert_eq!(
            build.verdict,
            Verdict::Run {
                reason: "could not check updates: http://10.0.2.2:8080/debian bookworm: bad signature; building anyway (onCheckFailure: build)".into()
            }
        );
    }
}
