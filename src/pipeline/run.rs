//! One execution of a pipeline: recorded in the history before anything happens, the start
//! condition evaluated (a skip is recorded with what did not change), the recipe planned
//! with the pipeline's overrides and built (`crate::build::build`), its statuses recorded as
//! the build goes (building → testing → distributing → available, or failed), hooks notified,
//! and the lifecycle applied after a success.
//!
//! Cancelling is dropping the future [`execute`] returns: the build unwinds (its VM stopped,
//! its files removed, its logs kept in the store's `failed/`), and the caller records the
//! execution as cancelled with [`cancelled`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::conditions::{self, Inputs, Verdict};
use super::history::{ExecStatus, ExecutionId, History, HistoryError, Outcome, Trigger};
use super::model::{Pipeline, StartCondition};
use super::parse::{self, ParseError, Validated};
use crate::build::plan::{self, Plan, Stage};
use crate::build::{self, BuildEvent, BuildObserver, BuildOptions};
use crate::component::executor::{Event, Observer};
use crate::distribute::destination::Destination;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The history could not be written: nothing was built.
    #[error("could not record the execution in the pipeline history")]
    History(#[from] HistoryError),
    /// The pipeline or its recipe is not valid (recorded as a failed execution when one had
    /// begun).
    #[error(transparent)]
    Invalid(#[from] ParseError),
}

/// What one execution came to.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub pipeline: String,
    pub execution: ExecutionId,
    pub status: ExecStatus,
    /// Why it ran, or why it was skipped.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Problems that did not change the outcome (a notification that failed, lifecycle).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What the lifecycle did after a success (`name/1.0.0/2: deprecated`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lifecycle: Vec<String>,
    /// What pruning the layer cache to its cap removed after a success, when it removed
    /// something (`layer cache: removed 2 least recently used layers (1.2 GiB) …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_cache: Option<String>,
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Build even when the start condition says nothing changed.
    pub force: bool,
    pub build: BuildOptions,
    /// Store references other pipelines' recipes build on (`base/1.x.x`): the lifecycle never
    /// deletes what they resolve to.
    pub protected_refs: Vec<String>,
}

/// The reason recorded when an execution begins.
pub fn trigger_reason(trigger: &Trigger, missed: u32) -> String {
    match trigger {
        Trigger::Manual => "started by hand (`builder pipeline run`)".into(),
        Trigger::Schedule { due } if missed > 0 => format!(
            "scheduled for {} (catching up after downtime: {missed} earlier run{} not made)",
            due.format("%Y-%m-%d %H:%M UTC"),
            if missed == 1 { " was" } else { "s were" }
        ),
        Trigger::Schedule { due } => format!("scheduled for {}", due.format("%Y-%m-%d %H:%M UTC")),
    }
}

/// Record that the execution `id` was cancelled (its future was dropped).
pub fn cancelled(history: &History, id: ExecutionId, why: &str) -> Result<(), HistoryError> {
    history.finish(id, &Outcome::cancelled(why))
}

/// Validate the pipeline file at `path` with its recipe, then run execution `id` (already
/// begun). A pipeline that is no longer valid is recorded as a failed execution.
pub async fn execute_file(
    path: &Path,
    id: ExecutionId,
    store: &Store,
    history: &History,
    options: &RunOptions,
    observer: &dyn BuildObserver,
    now: DateTime<Utc>,
) -> Result<Report, RunError> {
    let env = |name: &str| std::env::var(name).ok();
    match parse::validate(path, now, &env) {
        Ok(validated) => execute(validated, id, store, history, options, observer).await,
        Err(e) => {
            let message = e.to_string();
            history.finish(id, &Outcome::failed(message.clone()))?;
            Ok(Report {
                pipeline: path.display().to_string(),
                execution: id,
                status: ExecStatus::Failed,
                reason: "the pipeline could not be read".into(),
                image: None,
                manifest: None,
                logs: None,
                error: Some(message),
                warnings: Vec::new(),
                lifecycle: Vec::new(),
                layer_cache: None,
            })
        }
    }
}

/// Run execution `id` (begun in `history`) of a validated pipeline.
pub async fn execute(
    validated: Validated,
    id: ExecutionId,
    store: &Store,
    history: &History,
    options: &RunOptions,
    observer: &dyn BuildObserver,
) -> Result<Report, RunError> {
    let Validated {
        pipeline, recipe, ..
    } = validated;
    let mut report = Report {
        pipeline: pipeline.name.clone(),
        execution: id,
        status: ExecStatus::Pending,
        reason: String::new(),
        image: None,
        manifest: None,
        logs: None,
        error: None,
        warnings: Vec::new(),
        lifecycle: Vec::new(),
        layer_cache: None,
    };
    let notifier = Notifier::new(&pipeline, history, id);

    // 1. Pin the inputs (hashing a large parent is blocking work). A tag-only OCI parent is
    //    pinned to what its tag points to now, so a push to the tag is a changed dependency.
    let resolver = store.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let env = |name: &str| std::env::var(name).ok();
        plan::plan(recipe, &plan::ResolveTags(&resolver), &env, &mut |_| {})
    })
    .await;
    let plan = match planned {
        Ok(Ok(plan)) => with_overrides(plan, &pipeline),
        Ok(Err(e)) => {
            let message = match e.hint() {
                Some(hint) => format!("{e}\nhint: {hint}"),
                None => e.to_string(),
            };
            report.reason = "the recipe could not be planned".into();
            return fail(history, &notifier, report, message, None, None).await;
        }
        Err(e) => {
            report.reason = "the recipe could not be planned".into();
            return fail(history, &notifier, report, e.to_string(), None, None).await;
        }
    };
    let inputs = Inputs::of(&plan);

    // 2. The start condition.
    let condition = pipeline
        .schedule
        .as_ref()
        .map_or(StartCondition::Always, |s| s.start_condition);
    let last = history.last_success(&pipeline.name)?;
    let mut verdict = conditions::evaluate(condition, options.force, last.as_ref(), &inputs);
    let mut check_failed = false;
    // A build for package updates runs every layer again: its inputs did not change, so the
    // layer cache would hand back the old packages.
    let mut fresh_layers = false;
    // `packageUpdates`: nothing else changed, so the last image's packages decide.
    if let (Verdict::Skip { reason }, Some(schedule), Some(last)) =
        (&verdict, &pipeline.schedule, &last)
        && schedule.package_updates
    {
        let decided =
            conditions::package_updates(store, last, reason.clone(), schedule.on_check_failure)
                .await;
        verdict = decided.verdict;
        check_failed = decided.check_failed;
        fresh_layers = matches!(verdict, Verdict::Run { .. });
    }
    match verdict {
        Verdict::Skip { reason } => {
            // The reason is the skipped transition's detail (it is not an error).
            history.set_status(id, ExecStatus::Skipped, Some(&reason))?;
            report.status = ExecStatus::Skipped;
            report.reason = reason;
            // A check that failed is told whatever `notifications.on` says: nobody would
            // otherwise learn that the image is no longer checked.
            report.warnings = if check_failed {
                notifier.send_always(ExecStatus::Skipped, &report).await
            } else {
                notifier.send(ExecStatus::Skipped, &report).await
            };
            return Ok(report);
        }
        Verdict::Run { reason } => {
            history.set_status(id, ExecStatus::Building, Some(&reason))?;
            report.status = ExecStatus::Building;
            report.reason = reason;
            report
                .warnings
                .extend(notifier.send(ExecStatus::Building, &report).await);
        }
    }

    // 3. Build, with each stage mapped to a status.
    let tracker = Tracker {
        inner: observer,
        history,
        id,
        seen: Mutex::new(Seen::default()),
    };
    let mut build_options = options.build.clone();
    build_options.no_cache |= fresh_layers;
    let built = build::build(&plan, store, &build_options, &tracker).await;
    let (testing, distributing) = tracker
        .seen
        .lock()
        .map(|s| (s.testing, s.distributing))
        .unwrap_or_default();
    if testing {
        report
            .warnings
            .extend(notifier.send(ExecStatus::Testing, &report).await);
    }
    if distributing {
        report
            .warnings
            .extend(notifier.send(ExecStatus::Distributing, &report).await);
    }
    match built {
        Ok(built) => {
            report.image = Some(built.image.reference());
            report.manifest = Some(built.image.dir.join(crate::store::manifest::MANIFEST_FILE));
            report.logs = Some(built.image.logs_dir());
            report.warnings.extend(built.warnings.iter().cloned());
            if !built.distribution_failures.is_empty() {
                // Image Builder fails the image when a distribution fails; the image stays
                // in the store and the history names it.
                let message = built
                    .distribution_failures
                    .iter()
                    .map(|(target, error)| format!("distributing to {target} failed: {error}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let logs = report.logs.clone();
                return fail(
                    history,
                    &notifier,
                    report,
                    message,
                    logs,
                    Some(inputs.to_json()),
                )
                .await;
            }
            history.finish(
                id,
                &Outcome {
                    status: Some(ExecStatus::Available),
                    image: report.image.clone(),
                    manifest: report.manifest.clone(),
                    logs: report.logs.clone(),
                    error: None,
                    inputs: Some(inputs.to_json()),
                },
            )?;
            report.status = ExecStatus::Available;
            report
                .warnings
                .extend(notifier.send(ExecStatus::Available, &report).await);
            let (done, warnings) =
                apply_lifecycle(&pipeline, store, history, &options.protected_refs);
            report.lifecycle = done;
            report.warnings.extend(warnings);
            // Once the build is done (its layers no longer in use), as `builder build` does.
            match store.prune_layers_to_cap() {
                Ok(pruned) => report.layer_cache = pruned.summary(),
                Err(e) => report.warnings.push(format!(
                    "the layer cache was not pruned to its cap: {}",
                    crate::diagnostic::error_chain(&e)
                )),
            }
            Ok(report)
        }
        Err(failed) => {
            report.image = failed.image.clone();
            // The whole chain: "the build VM failed: KVM is not usable: …".
            let mut message = crate::diagnostic::error_chain(&failed.error);
            if let build::BuildError::Component(f) = &failed.error {
                message = format!("{message}: {}", f.cause);
            }
            fail(
                history,
                &notifier,
                report,
                message,
                failed.logs,
                Some(inputs.to_json()),
            )
            .await
        }
    }
}

async fn fail(
    history: &History,
    notifier: &Notifier<'_>,
    mut report: Report,
    message: String,
    logs: Option<PathBuf>,
    inputs: Option<serde_json::Value>,
) -> Result<Report, RunError> {
    history.finish(
        report.execution,
        &Outcome {
            status: Some(ExecStatus::Failed),
            image: report.image.clone(),
            logs: logs.clone(),
            error: Some(message.clone()),
            inputs,
            ..Outcome::default()
        },
    )?;
    report.status = ExecStatus::Failed;
    report.error = Some(message);
    report.logs = logs;
    report
        .warnings
        .extend(notifier.send(ExecStatus::Failed, &report).await);
    Ok(report)
}

/// The plan with the pipeline's infrastructure, tests, distribution and cache settings in
/// place of the recipe's, and the layer keys computed again (the network setting is part of
/// them).
pub fn with_overrides(mut plan: Plan, pipeline: &Pipeline) -> Plan {
    plan.infrastructure = pipeline.infrastructure.apply(&plan.infrastructure);
    if let Some(targets) = &pipeline.distribution {
        // Where an image goes is not part of its digest, so the layer keys stay the same.
        plan.distribution = targets
            .iter()
            .map(|d| Destination::from_recipe(&d.value, &pipeline.source.path))
            .collect();
    }
    if let Some(cache) = &pipeline.cache {
        // Where layers are shared is not part of their keys either.
        plan.shared_cache = cache.clone();
    }
    plan.tests = pipeline.tests.apply(&plan.tests);
    plan.set_layer_keys();
    plan
}

/// The pipeline's lifecycle after a success; its report's lines become warnings only when
/// something went wrong, the rest is logged by the caller through the report.
fn apply_lifecycle(
    pipeline: &Pipeline,
    store: &Store,
    history: &History,
    protected_refs: &[String],
) -> (Vec<String>, Vec<String>) {
    if pipeline.lifecycle.is_none() {
        return (Vec::new(), Vec::new());
    }
    match super::lifecycle::apply_pipeline(
        store,
        history,
        pipeline,
        &super::SystemClock,
        protected_refs,
    ) {
        Ok(report) => {
            let done = report
                .actions
                .iter()
                .filter(|a| !a.done.starts_with("kept"))
                .map(|a| format!("{}: {}", a.verdict.image, a.done))
                .collect();
            (done, report.warnings)
        }
        Err(e) => (Vec::new(), vec![format!("lifecycle: {e}")]),
    }
}

/// What the build has shown so far.
#[derive(Default)]
struct Seen {
    testing: bool,
    distributing: bool,
}

/// Passes every event on, and records the statuses the build's stages mean.
struct Tracker<'a> {
    inner: &'a dyn BuildObserver,
    history: &'a History,
    id: ExecutionId,
    seen: Mutex<Seen>,
}

impl Observer for Tracker<'_> {
    fn event(&self, event: &Event<'_>) {
        self.inner.event(event);
    }
}

impl BuildObserver for Tracker<'_> {
    fn build_event(&self, event: &BuildEvent<'_>) {
        match event {
            BuildEvent::BuildStarted {
                image, build_id, ..
            } => {
                // The build id names the build's folders in the store (`staging/<id>`,
                // `work/<id>`): a scheduler restarted after a crash removes what they hold.
                let detail = format!("{BUILD_DETAIL_PREFIX}{image} {build_id}");
                let _ = self
                    .history
                    .set_status(self.id, ExecStatus::Building, Some(&detail));
            }
            BuildEvent::StageStarted {
                stage: Stage::Distribute,
                ..
            } => {
                if let Ok(mut seen) = self.seen.lock() {
                    seen.distributing = true;
                }
                let _ = self
                    .history
                    .set_status(self.id, ExecStatus::Distributing, None);
            }
            BuildEvent::StageStarted {
                stage: Stage::Test, ..
            } => {
                if let Ok(mut seen) = self.seen.lock() {
                    seen.testing = true;
                }
                let _ = self.history.set_status(self.id, ExecStatus::Testing, None);
            }
            _ => {}
        }
        self.inner.build_event(event);
    }
}

/// The detail of the `building` transition that names the build: `build <image> <build-id>`.
pub const BUILD_DETAIL_PREFIX: &str = "build ";

/// The image and build id an execution's transitions recorded, if its build had started.
pub fn recorded_build(execution: &super::history::Execution) -> Option<(String, String)> {
    execution.transitions.iter().rev().find_map(|t| {
        let rest = t.detail.as_deref()?.strip_prefix(BUILD_DETAIL_PREFIX)?;
        let (image, build_id) = rest.split_once(' ')?;
        Some((image.to_string(), build_id.to_string()))
    })
}

/// Sends the pipeline's notifications for the statuses it asks for.
struct Notifier<'a> {
    pipeline: &'a Pipeline,
    history: &'a History,
    id: ExecutionId,
}

impl<'a> Notifier<'a> {
    fn new(pipeline: &'a Pipeline, history: &'a History, id: ExecutionId) -> Notifier<'a> {
        Notifier {
            pipeline,
            history,
            id,
        }
    }

    /// Warnings for hooks that failed; a failed hook never fails the execution. The event
    /// is the execution as recorded, at `status`.
    async fn send(&self, status: ExecStatus, report: &Report) -> Vec<String> {
        if !self.pipeline.notifications.on.contains(&status) {
            return Vec::new();
        }
        self.send_always(status, report).await
    }

    /// [`Notifier::send`] even when `notifications.on` does not list `status`.
    async fn send_always(&self, status: ExecStatus, report: &Report) -> Vec<String> {
        let mut notifications = self.pipeline.notifications.clone();
        if notifications.webhook.is_none() && notifications.command.is_none() {
            return Vec::new();
        }
        if !notifications.on.contains(&status) {
            notifications.on.push(status);
        }
        let mut event = match self.history.execution(self.id) {
            Ok(execution) => super::notify::Event::from_execution(&execution),
            Err(e) => {
                return vec![format!(
                    "could not read execution {} to notify: {e}",
                    self.id
                )];
            }
        };
        event.status = status;
        if event.reason.is_empty() || status == ExecStatus::Skipped {
            event.reason = report.reason.clone();
        }
        event.image = event.image.or_else(|| report.image.clone());
        event.error = event.error.or_else(|| report.error.clone());
        super::notify::send(&notifications, &event).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use crate::pipeline::Clock;
    use crate::pipeline::SystemClock;

    /// The pipeline at `name` (in a temporary folder next to the pipeline case recipes) and
    /// the plan of its recipe before the overrides.
    fn planned(dir: &Path, text: &str) -> (Pipeline, Plan) {
        let path = dir.join("p.yml");
        fs_err::write(&path, text).unwrap();
        let env = |_: &str| None;
        let v = parse::validate(&path, SystemClock.now(), &env).unwrap();
        let plan = plan::plan(v.recipe, &plan::NoStore, &env, &mut |_| {}).unwrap();
        (v.pipeline, plan)
    }

    #[test]
    fn overrides_replace_the_recipes_infrastructure_keys_and_distribution() {
        let dir = tempfile::tempdir().unwrap();
        let recipe =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/pipeline/recipes/hello.yml");
        let head = format!("name: p\nrecipe: {}\n", recipe.display());
        let (pipeline, plan) = planned(dir.path(), &head);
        let unchanged = with_overrides(plan.clone(), &pipeline);
        assert_eq!(unchanged.infrastructure, plan.infrastructure);
        assert_eq!(unchanged.distribution.len(), plan.distribution.len());

        let text = format!(
            "{head}infrastructure: {{cpus: 3}}\ndistribution:\n  - directory: {{path: out/}}\n"
        );
        let (pipeline, plan) = planned(dir.path(), &text);
        let overridden = with_overrides(plan.clone(), &pipeline);
        assert_eq!(overridden.infrastructure.cpus, 3);
        assert_eq!(overridden.infrastructure.memory, plan.infrastructure.memory);
        match overridden.distribution.as_slice() {
            [Destination::Directory { path, .. }] => {
                assert_eq!(
                    path,
                    &dir.path().join("out/"),
                    "relative to the pipeline file"
                )
            }
            other => panic!("{other:?}"),
        }
        // What an image is does not depend on where it goes.
        assert_eq!(
            overridden.components.last().unwrap().layer_key,
            with_overrides(
                plan,
                &Pipeline {
                    distribution: None,
                    ..pipeline
                }
            )
            .components
            .last()
            .unwrap()
            .layer_key
        );
    }

    #[test]
    fn a_pipelines_cache_replaces_the_recipes_and_keeps_the_layer_keys() {
        let dir = tempfile::tempdir().unwrap();
        let recipe =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/pipeline/recipes/hello.yml");
        let head = format!("name: p\nrecipe: {}\n", recipe.display());
        let (pipeline, plan) = planned(dir.path(), &head);
        assert!(with_overrides(plan, &pipeline).shared_cache.is_empty());
        let text = format!("{head}cache: {{from: [oci://127.0.0.1:5000/cache/web]}}\n");
        let (pipeline, plan) = planned(dir.path(), &text);
        let overridden = with_overrides(plan.clone(), &pipeline);
        assert_eq!(overridden.shared_cache.from[0].repository, "cache/web");
        assert_eq!(overridden.shared_cache.to, None);
        assert_eq!(overridden.components, plan.components);
        let bad = dir.path().join("bad.yml");
        fs_err::write(
            &bad,
            format!("{head}cache: {{to: oci://127.0.0.1:5000/cache/web:v1}}\n"),
        )
        .unwrap();
        let env = |_: &str| None;
        let e = parse::validate(&bad, SystemClock.now(), &env).unwrap_err();
        assert!(
            e.to_string()
                .contains("a shared layer cache is a repository"),
            "{e}"
        );
    }

    /// Every setting a pipeline may set (its declaration in `recipe::settings` says so)
    /// reaches the plan the build runs, set to a value other than its default.
    #[test]
    fn every_pipeline_setting_changes_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let recipe =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/pipeline/recipes/hello.yml");
        let head = format!("name: p\nrecipe: {}\n", recipe.display());
        let settings = crate::recipe::settings::SETTINGS.iter();
        for s in settings.filter(|s| s.pipeline && !s.parent().is_empty()) {
            let value = s
                .other_value()
                .unwrap_or_else(|| panic!("{}: no other value", s.path));
            let text = format!("{head}{}: {{{}: {value}}}\n", s.parent(), s.key());
            let (pipeline, plan) = planned(dir.path(), &text);
            let after = serde_json::to_value(with_overrides(plan.clone(), &pipeline)).unwrap();
            assert_ne!(after, serde_json::to_value(plan).unwrap(), "{}", s.path);
        }
    }
}
