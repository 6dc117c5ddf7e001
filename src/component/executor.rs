//! Runs component documents on a [`Machine`]: phases in document order (filtered by the
//! requested phase names), documents in the order given, steps one after another with
//! `if`, loops, `maxAttempts`, `timeoutSeconds`, `onFailure`, chaining and reboots.
//!
//! The executor runs on the host and only talks to the target through the trait, so the same
//! code drives this machine and a VM. A reboot (the `Reboot` action, or exit code 194) is
//! `target.reboot()` followed by going on where the run was: the run's state lives here on the
//! host, so a target that can reboot only has to come back.
//!
//! Before anything runs, [`run`] checks what can be checked: required parameters, allowed
//! values, Windows-only actions. Cancellation (a [`CancellationToken`]) stops the running
//! command (its process tree is killed by the target), marks what is left `cancelled` and
//! still writes every log.

mod events;
mod scope;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use events::{Event, Observer, Silent};
pub use scope::{Given, bind_parameters, parse_parameter_overrides};

use super::actions::{self, ActionContext, ActionError, Completed, Next, Outputs};
use super::condition::{self, EvalContext};
use super::document::{Action, Branch, Document, OnFailure, Phase, Step};
use super::report::{
    Chaining, DocumentReport, ExecutionReport, IterationReport, LoopReport, PhaseReport,
    ReportError, Resolution, RunLog, Status, StepReport, StoredStep, Summary, timestamp,
};
use super::template;
use crate::machine::{ExitStatus, Machine};
use events::StepSink;
use scope::{Iteration, StepScope, Stored, Values, as_input_array, expand_json, iterations};

pub use super::actions::{Transfer, s3_client};

/// `ExecuteDocument` may nest this many levels below the documents given to the run.
pub const MAX_NESTING: usize = 3;
/// Reboots allowed in one run: a script that always exits 194 must not loop forever.
pub const DEFAULT_MAX_REBOOTS: u32 = 10;
/// The outer deadline of a step leaves the target this long to stop a timed-out command
/// gracefully (SIGTERM, then SIGKILL) before the executor drops it.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Run in this order.
    pub documents: Vec<Document>,
    /// Only phases with these names (order does not matter); all when `None`.
    pub phases: Option<Vec<String>>,
    /// Parameter values (`name`, `value`); names no document declares are ignored.
    pub parameters: Vec<(String, String)>,
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Names the run and its log folder; a new UUID when `None`.
    pub execution_id: Option<String>,
    /// Parent of the `TOE_…` run folder; no log folder when `None`.
    pub log_directory: Option<PathBuf>,
    /// Where steps run and relative paths point (`WORKING_DIRECTORY` for scripts). When
    /// `None`, a fresh temporary folder on the host that is removed after the run (right for
    /// the local target; a VM target passes a guest path).
    pub working_directory: Option<PathBuf>,
    /// The S3-compatible endpoint for `S3Download`/`S3Upload`.
    pub s3: Option<crate::aws::S3Client>,
    pub max_reboots: u32,
    /// Extra environment for scripts and binaries.
    pub env: Vec<(String, String)>,
    /// When set, the only documents `ExecuteDocument` may run: canonical path → sha256 of the
    /// bytes (a build passes what its plan pinned). Another document, or one whose bytes
    /// changed since, fails the step. `None` (`builder component run`): any document.
    pub pinned_documents: Option<BTreeMap<PathBuf, String>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            execution_id: None,
            log_directory: None,
            working_directory: None,
            s3: None,
            max_reboots: DEFAULT_MAX_REBOOTS,
            env: Vec::new(),
            pinned_documents: None,
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: ExecutionReport,
    pub summary: Summary,
    /// The `TOE_…` folder, when logs were written.
    pub log_dir: Option<PathBuf>,
    /// Advice for the user from the first failure that had some (e.g. "use a VM target").
    pub hint: Option<String>,
    /// Things worth saying that did not stop the run (ignored parameters, log write errors).
    /// Each was also sent to the observer as an [`Event::Note`] when it came up.
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The parameters do not fit the documents; nothing ran.
    #[error("the parameters do not fit the documents; nothing was run:\n  - {}", .0.join("\n  - "))]
    Parameters(Vec<String>),
    /// Steps use Windows-only actions; nothing ran.
    #[error("these steps use Windows-only actions, which do not run on Linux; nothing was run:\n  - {}", .0.join("\n  - "))]
    WindowsOnly(Vec<String>),
    #[error(transparent)]
    Log(#[from] ReportError),
    #[error("could not create a working directory")]
    WorkingDirectory(#[source] std::io::Error),
    /// The working directory could not be created on the target.
    #[error("could not create the working directory on the target: {0}")]
    WorkingDirectoryOnTarget(String),
}

/// A short name for a document in messages: its `name`, else its file name.
pub fn document_label(document: &Document) -> String {
    match &document.name {
        Some(n) if !n.is_empty() => n.clone(),
        _ => document
            .source
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| document.source.path.display().to_string()),
    }
}

/// The phases an `ExecuteDocument` step's `phases` input selects (`build, test`): the
/// comma-separated names, trimmed; `None` (every phase) when it names none.
pub fn selected_phases(phases: &str) -> Option<Vec<String>> {
    let names: Vec<String> = phases
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    (!names.is_empty()).then_some(names)
}

fn phase_selected(filter: Option<&[String]>, phase: &Phase) -> bool {
    filter.is_none_or(|names| names.contains(&phase.name))
}

/// Steps with Windows-only actions in the selected phases, as `file:line:col: …` lines.
fn windows_only_steps(document: &Document, filter: Option<&[String]>) -> Vec<String> {
    document
        .phases
        .iter()
        .filter(|p| phase_selected(filter, p))
        .flat_map(|p| p.steps.iter().map(move |s| (p, s)))
        .filter(|(_, s)| s.action.windows_only())
        .map(|(p, s)| {
            format!(
                "{}:{}:{}: step `{}` in phase `{}` uses {}",
                document.source.path.display(),
                s.span.line,
                s.span.col,
                s.name,
                p.name,
                s.action
            )
        })
        .collect()
}

/// Run `request` on `target`. `Err` only when nothing could be run (bad parameters, Windows
/// actions, no log folder); a run whose steps failed is an `Ok` with that status.
pub async fn run(
    target: &dyn Machine,
    request: RunRequest,
    options: RunOptions,
    observer: &dyn Observer,
    cancel: CancellationToken,
) -> Result<RunOutcome, RunError> {
    let filter = request.phases.as_deref();
    let windows: Vec<String> = request
        .documents
        .iter()
        .flat_map(|d| windows_only_steps(d, filter))
        .collect();
    if !windows.is_empty() {
        return Err(RunError::WindowsOnly(windows));
    }
    let mut bound = Vec::new();
    let mut errors = Vec::new();
    for document in &request.documents {
        match bind_parameters(
            document,
            &document_label(document),
            &request.parameters,
            Given::CommandLine,
        ) {
            Ok(vars) => bound.push(vars),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(RunError::Parameters(errors));
    }
    let mut notes = Vec::new();
    let declared: HashSet<&str> = request
        .documents
        .iter()
        .flat_map(|d| d.parameters.iter().map(|p| p.name.as_str()))
        .collect();
    for (name, _) in &request.parameters {
        if !declared.contains(name.as_str()) {
            notes.push(format!(
                "parameter `{name}` is not declared by any document; it is ignored"
            ));
        }
    }
    if let Some(names) = filter {
        for name in names {
            let known = request
                .documents
                .iter()
                .any(|d| d.phases.iter().any(|p| p.name == *name));
            if !known {
                notes.push(format!("no document has a phase named `{name}`"));
            }
        }
    }

    let execution_id = options
        .execution_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let log = match &options.log_directory {
        Some(dir) => Some(RunLog::create(dir, &execution_id)?),
        None => None,
    };
    if let Some(log) = &log {
        let several = request.documents.len() > 1;
        for (i, document) in request.documents.iter().enumerate() {
            let name = if several {
                format!("document-{}.yaml", i + 1)
            } else {
                "document.yaml".to_string()
            };
            if let Err(e) = log.copy_document(&document.source.path, &name) {
                log.app("WARN", &format!("{e}"));
            }
        }
    }
    // Kept alive for the whole run; removed when dropped.
    let mut _temp_work = None;
    let working_directory = match &options.working_directory {
        Some(dir) => dir.clone(),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("builder-work-")
                .tempdir()
                .map_err(RunError::WorkingDirectory)?;
            let path = dir.path().to_path_buf();
            _temp_work = Some(dir);
            path
        }
    };
    if options.working_directory.is_some() {
        // Created on the target, so a guest path works as well as a local one.
        let dir = working_directory.to_string_lossy().into_owned();
        let capture = crate::machine::Capture::default();
        let made = target
            .exec(
                &crate::machine::ExecRequest::argv(["mkdir", "-p", "--", dir.as_str()]),
                &capture,
            )
            .await;
        match made {
            Ok(outcome) if outcome.status.success() => {}
            Ok(outcome) => {
                return Err(RunError::WorkingDirectoryOnTarget(format!(
                    "`mkdir -p {dir}` {}: {}",
                    outcome.status,
                    String::from_utf8_lossy(&capture.stderr()).trim()
                )));
            }
            Err(e) => {
                return Err(RunError::WorkingDirectoryOnTarget(format!(
                    "`mkdir -p {dir}`: {e}"
                )));
            }
        }
    }
    let mut env = vec![(
        "WORKING_DIRECTORY".to_string(),
        working_directory.to_string_lossy().into_owned(),
    )];
    env.extend(options.env.iter().cloned());

    let engine = Engine {
        target,
        observer,
        cancel,
        log,
        working_directory,
        env,
        transfer: Transfer::new(options.s3.clone()),
        max_reboots: options.max_reboots,
        pinned_documents: options.pinned_documents.clone(),
        reboots: AtomicU32::new(0),
        resolutions: Mutex::new(Vec::new()),
        stored_steps: Mutex::new(Vec::new()),
        hint: Mutex::new(None),
    };
    let target_name = target.describe();
    observer.event(&Event::RunStarted {
        execution_id: &execution_id,
        log_directory: engine.log.as_ref().map(RunLog::dir),
        target: &target_name,
    });
    engine.app(
        "INFO",
        &format!(
            "run {execution_id} on {target_name}: {} document(s), phases {}",
            request.documents.len(),
            filter.map_or("all".to_string(), |f| f.join(","))
        ),
    );
    for note in &notes {
        observer.event(&Event::Note { message: note });
        engine.app("INFO", note);
    }

    let started = timestamp();
    let mut documents = Vec::new();
    let mut flow = Flow::Continue;
    for (document, variables) in request.documents.iter().zip(bound) {
        if flow == Flow::Abort {
            break;
        }
        let label = document_label(document);
        let run = DocRun {
            document,
            label,
            values: Values::new(document, variables),
            depth: 0,
            ancestry: vec![canonical(&document.source.path)],
            phases: request.phases.clone(),
        };
        if flow == Flow::Cancelled || engine.cancel.is_cancelled() {
            documents.push(cancelled_document(&run));
            flow = Flow::Cancelled;
            continue;
        }
        let (report, f) = engine.run_document(&run).await;
        documents.push(report);
        flow = f;
    }
    let status = Status::combine(documents.iter().map(|d| d.status));
    let failure_message = documents
        .iter()
        .find(|d| !d.status.is_ok())
        .map(|d| format!("document {}: {}", d.name, d.failure_message))
        .unwrap_or_default();
    let report = ExecutionReport {
        execution_id: execution_id.clone(),
        status,
        start_time: started,
        end_time: timestamp(),
        failure_message,
        documents,
    };
    let log_url = engine
        .log
        .as_ref()
        .map(|l| l.dir().display().to_string())
        .unwrap_or_default();
    let summary = Summary::of(&report, log_url);
    engine.app(
        "INFO",
        &format!(
            "run {execution_id} finished: {status}, {} step(s) executed, {} failed, {} ignored",
            summary.executed_step_count,
            summary.failed_step_count,
            summary.ignored_failed_step_count
        ),
    );
    if let Some(log) = &engine.log {
        let chaining = Chaining {
            steps: engine
                .stored_steps
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            resolutions: engine
                .resolutions
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default(),
        };
        for (name, result) in [
            (
                "detailedoutput.json",
                log.write_json("detailedoutput.json", &report),
            ),
            ("chaining.json", log.write_json("chaining.json", &chaining)),
        ] {
            if let Err(e) = result {
                let message = crate::diagnostic::error_chain(&e);
                log.app("ERROR", &message);
                let note = format!("{name} was not written: {message}");
                observer.event(&Event::Note { message: &note });
                notes.push(note);
            }
        }
        log.flush();
    }
    observer.event(&Event::Summary { summary: &summary });
    let hint = engine.hint.lock().ok().and_then(|h| h.clone());
    Ok(RunOutcome {
        report,
        summary,
        log_dir: engine.log.as_ref().map(|l| l.dir().to_path_buf()),
        hint,
        notes,
    })
}

/// Where the document of `ExecuteDocument` (`document: written`) is: relative paths are
/// relative to the folder of the calling document (`calling`, its path). `Err` says why a
/// document cannot be run: S3 and ARN documents need AWS.
pub fn nested_document_path(calling: &Path, written: &str) -> Result<PathBuf, String> {
    if written.starts_with("s3://") || written.starts_with("arn:") {
        return Err(format!(
            "`document: {written}`: only local paths are supported (builder works \
             offline); copy the document next to this one and give its path"
        ));
    }
    let base = calling.parent().unwrap_or(Path::new(""));
    Ok(base.join(written))
}

/// The path with symbolic links and `..` resolved when it exists (as written otherwise): how
/// nested documents are compared, for cycles and with a plan's pins.
pub fn canonical(path: &Path) -> PathBuf {
    fs_err::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What the rest of the run does after a step, phase or document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// A step failed with `onFailure: Abort`: nothing more runs.
    Abort,
    /// Interrupted: what is left is reported `cancelled`.
    Cancelled,
}

/// One document being run (top level or nested).
struct DocRun<'d> {
    document: &'d Document,
    label: String,
    values: Values,
    depth: usize,
    /// Canonical paths from the top document down to this one, for cycle detection.
    ancestry: Vec<PathBuf>,
    phases: Option<Vec<String>>,
}

struct Engine<'a> {
    target: &'a dyn Machine,
    observer: &'a dyn Observer,
    cancel: CancellationToken,
    log: Option<RunLog>,
    working_directory: PathBuf,
    env: Vec<(String, String)>,
    transfer: Transfer,
    max_reboots: u32,
    pinned_documents: Option<BTreeMap<PathBuf, String>>,
    reboots: AtomicU32,
    resolutions: Mutex<Vec<Resolution>>,
    stored_steps: Mutex<Vec<StoredStep>>,
    hint: Mutex<Option<String>>,
}

/// How one attempt of a step ended.
enum AttemptEnd {
    Done(Next),
    Failed(String),
    TimedOut(String),
    Cancelled,
}

/// What an attempt produced so far; kept outside the attempt's future so a timeout or a
/// cancellation (which drop that future) still leaves it readable.
#[derive(Default)]
struct Progress {
    inputs: Value,
    outputs: Outputs,
    iterations: Vec<IterationReport>,
    nested: Option<Vec<ExecutionReport>>,
    current_iteration: Option<(i64, String)>,
    hint: Option<String>,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn cancelled_step(step: &Step) -> StepReport {
    let now = timestamp();
    StepReport {
        name: step.name.clone(),
        status: Status::Cancelled,
        failure_message: "the run was cancelled before this step started".into(),
        timeout_seconds: step.timeout_secs.map_or(-1, |t| t as i64),
        on_failure: format!("{:?}", step.on_failure),
        max_attempts: step.max_attempts,
        attempts: 0,
        action: step.action.name().into(),
        start_time: now.clone(),
        end_time: now,
        inputs: "[]".into(),
        outputs: "[]".into(),
        loop_report: None,
        detailed_output: None,
        output_tail: Vec::new(),
    }
}

fn cancelled_phase(phase: &Phase) -> PhaseReport {
    let now = timestamp();
    PhaseReport {
        name: phase.name.clone(),
        status: Status::Cancelled,
        start_time: now.clone(),
        end_time: now,
        failure_message: "the run was cancelled".into(),
        steps: phase.steps.iter().map(cancelled_step).collect(),
    }
}

fn cancelled_document(run: &DocRun<'_>) -> DocumentReport {
    let now = timestamp();
    DocumentReport {
        name: run.label.clone(),
        file_path: run.document.source.path.display().to_string(),
        status: Status::Cancelled,
        description: run.document.description.clone().unwrap_or_default(),
        start_time: now.clone(),
        end_time: now,
        failure_message: "the run was cancelled".into(),
        phases: run
            .document
            .phases
            .iter()
            .filter(|p| phase_selected(run.phases.as_deref(), p))
            .map(cancelled_phase)
            .collect(),
    }
}

/// Outputs of several loop iterations as one: per item and key, the string values of the
/// successful iterations joined with `\n` (reference 1.6).
fn collate(per_iteration: &[Outputs]) -> Outputs {
    if per_iteration.len() == 1 {
        return per_iteration[0].clone();
    }
    let items = per_iteration.iter().map(Vec::len).max().unwrap_or(0);
    (0..items)
        .map(|i| {
            let mut merged: Map<String, Value> = Map::new();
            let mut keys: Vec<String> = Vec::new();
            for outputs in per_iteration {
                if let Some(map) = outputs.get(i) {
                    for k in map.keys() {
                        if !keys.contains(k) {
                            keys.push(k.clone());
                        }
                    }
                }
            }
            for key in keys {
                let values: Vec<String> = per_iteration
                    .iter()
                    .filter_map(|o| o.get(i).and_then(|m| m.get(&key)))
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                merged.insert(key, Value::String(values.join("\n")));
            }
            merged
        })
        .collect()
}

impl<'a> Engine<'a> {
    fn app(&self, level: &str, message: &str) {
        if let Some(log) = &self.log {
            log.app(level, message);
        }
    }

    fn note(&self, message: &str) {
        self.observer.event(&Event::Note { message });
        self.app("INFO", message);
    }

    /// Boxed so that `ExecuteDocument` can recurse into it.
    fn run_document_boxed<'s>(
        &'s self,
        run: &'s DocRun<'s>,
    ) -> BoxFuture<'s, (DocumentReport, Flow)> {
        Box::pin(self.run_document(run))
    }

    async fn run_document(&self, run: &DocRun<'_>) -> (DocumentReport, Flow) {
        let started = timestamp();
        self.observer.event(&Event::DocumentStarted {
            document: &run.label,
            path: &run.document.source.path,
            depth: run.depth,
        });
        self.app(
            "INFO",
            &format!(
                "document {} ({}) started",
                run.label,
                run.document.source.path.display()
            ),
        );
        let mut phases = Vec::new();
        let mut flow = Flow::Continue;
        for phase in run
            .document
            .phases
            .iter()
            .filter(|p| phase_selected(run.phases.as_deref(), p))
        {
            match flow {
                Flow::Abort => break,
                Flow::Cancelled => {
                    phases.push(cancelled_phase(phase));
                    continue;
                }
                Flow::Continue => {}
            }
            let (report, f) = self.run_phase(run, phase).await;
            phases.push(report);
            flow = f;
        }
        let status = Status::combine(phases.iter().map(|p| p.status));
        let failure_message = phases
            .iter()
            .find(|p| !p.status.is_ok())
            .map(|p| format!("phase {}: {}", p.name, p.failure_message))
            .unwrap_or_default();
        self.observer.event(&Event::DocumentFinished {
            document: &run.label,
            status,
            depth: run.depth,
        });
        self.app(
            "INFO",
            &format!("document {} finished: {status}", run.label),
        );
        let report = DocumentReport {
            name: run.label.clone(),
            file_path: run.document.source.path.display().to_string(),
            status,
            description: run.document.description.clone().unwrap_or_default(),
            start_time: started,
            end_time: timestamp(),
            failure_message,
            phases,
        };
        (report, flow)
    }

    async fn run_phase(&self, run: &DocRun<'_>, phase: &Phase) -> (PhaseReport, Flow) {
        let started = timestamp();
        self.observer.event(&Event::PhaseStarted {
            document: &run.label,
            phase: &phase.name,
            depth: run.depth,
        });
        self.app(
            "INFO",
            &format!("phase {} of {} started", phase.name, run.label),
        );
        let mut steps = Vec::new();
        let mut flow = Flow::Continue;
        for step in &phase.steps {
            if flow == Flow::Cancelled || self.cancel.is_cancelled() {
                steps.push(cancelled_step(step));
                flow = Flow::Cancelled;
                continue;
            }
            if flow == Flow::Abort {
                break;
            }
            let report = self.run_step(run, phase, step).await;
            flow = match report.status {
                Status::Cancelled => Flow::Cancelled,
                Status::Failed | Status::TimedOut if step.on_failure == OnFailure::Abort => {
                    Flow::Abort
                }
                _ => Flow::Continue,
            };
            steps.push(report);
        }
        let status = Status::combine(steps.iter().map(|s| s.status));
        let failure_message = steps
            .iter()
            .find(|s| !s.status.is_ok() && s.status != Status::Cancelled)
            .or_else(|| steps.iter().find(|s| !s.status.is_ok()))
            .map(|s| format!("step {}: {}", s.name, s.failure_message))
            .unwrap_or_default();
        let report = PhaseReport {
            name: phase.name.clone(),
            status,
            start_time: started,
            end_time: timestamp(),
            failure_message,
            steps,
        };
        (report, flow)
    }

    fn scope<'s>(
        &'s self,
        run: &'s DocRun<'_>,
        phase: &'s Phase,
        step: &'s Step,
        iteration: Option<Iteration<'s>>,
    ) -> StepScope<'s> {
        StepScope {
            values: &run.values,
            document: &run.label,
            phase: &phase.name,
            step: &step.name,
            iteration,
            record: &self.resolutions,
        }
    }

    async fn run_step(&self, run: &DocRun<'_>, phase: &Phase, step: &Step) -> StepReport {
        let started = timestamp();
        let clock = Instant::now();
        let sink = StepSink::new(
            self.log.as_ref(),
            self.observer,
            &run.label,
            &phase.name,
            &step.name,
            run.depth,
        );
        let mut report = StepReport {
            name: step.name.clone(),
            status: Status::Success,
            failure_message: String::new(),
            timeout_seconds: step.timeout_secs.map_or(-1, |t| t as i64),
            on_failure: format!("{:?}", step.on_failure),
            max_attempts: step.max_attempts,
            attempts: 0,
            action: step.action.name().into(),
            start_time: started,
            end_time: String::new(),
            inputs: "[]".into(),
            outputs: "[]".into(),
            loop_report: None,
            detailed_output: None,
            output_tail: Vec::new(),
        };

        let mut failure: Option<(Status, String)> = None;
        let mut run_it = true;
        if let Some(condition) = &step.condition {
            let scope = self.scope(run, phase, step, None);
            let expand = |s: &str| template::expand(s, &scope);
            let cx = EvalContext {
                target: self.target,
                working_directory: &self.working_directory,
                expand: &expand,
            };
            let decided = tokio::select! {
                biased;
                () = self.cancel.cancelled() => None,
                r = condition::evaluate(&condition.expr, &cx) => Some(r),
            };
            match decided {
                None => {
                    failure = Some((Status::Cancelled, "the run was cancelled".into()));
                    run_it = false;
                }
                Some(Err(e)) => {
                    failure = Some((
                        Status::Failed,
                        format!("the `if` condition could not be evaluated: {e}"),
                    ));
                    run_it = false;
                }
                Some(Ok(holds)) => {
                    let branch = if holds {
                        condition.then
                    } else {
                        condition.otherwise
                    };
                    self.app(
                        "INFO",
                        &format!("step {}: condition is {holds}, so {branch:?}", step.name),
                    );
                    match branch {
                        Branch::Execute => {}
                        Branch::Skip => {
                            failure = Some((Status::Skipped, String::new()));
                            run_it = false;
                        }
                        Branch::Abort => {
                            failure = Some((
                                Status::Failed,
                                format!(
                                    "the `if` condition is {holds} and says Abort for that case"
                                ),
                            ));
                            run_it = false;
                        }
                    }
                }
            }
        }

        if run_it {
            let (outcome, progress, attempts) = self.attempts(run, phase, step, &sink).await;
            report.attempts = attempts;
            report.inputs = progress.inputs.to_string();
            let outputs = Value::Array(progress.outputs.into_iter().map(Value::Object).collect());
            report.outputs = outputs.to_string();
            report.detailed_output = progress.nested;
            if step.looping.is_some() {
                report.loop_report = Some(LoopReport {
                    name: step.looping.as_ref().and_then(|l| l.name.clone()),
                    iterations: progress.iterations,
                });
            }
            if let (Some(h), Ok(mut slot)) = (progress.hint, self.hint.lock())
                && slot.is_none()
            {
                *slot = Some(h);
            }
            // Chaining sees what the step did, also when it failed (onFailure Continue/Ignore).
            let stored = Stored {
                inputs: progress.inputs.clone(),
                outputs: outputs.clone(),
            };
            run.values.store(&phase.name, &step.name, stored);
            if let Ok(mut all) = self.stored_steps.lock() {
                all.push(StoredStep {
                    document: run.label.clone(),
                    phase: phase.name.clone(),
                    step: step.name.clone(),
                    inputs: progress.inputs,
                    outputs,
                });
            }
            failure = match outcome {
                AttemptEnd::Done(_) => None,
                AttemptEnd::Failed(m) => Some((Status::Failed, m)),
                AttemptEnd::TimedOut(m) => Some((Status::TimedOut, m)),
                AttemptEnd::Cancelled => Some((Status::Cancelled, "the run was cancelled".into())),
            };
        }
        sink.finish();
        report.output_tail = sink.tail();

        if let Some((status, message)) = failure {
            report.status = match status {
                Status::Failed | Status::TimedOut if step.on_failure == OnFailure::Ignore => {
                    Status::IgnoredFailure
                }
                s => s,
            };
            report.failure_message = message;
        }
        report.end_time = timestamp();
        let duration = clock.elapsed();
        self.observer.event(&Event::StepFinished {
            document: &run.label,
            phase: &phase.name,
            step: &step.name,
            action: step.action.name(),
            status: report.status,
            attempts: report.attempts,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            failure_message: &report.failure_message,
            depth: run.depth,
        });
        self.app(
            if report.status.is_ok() {
                "INFO"
            } else {
                "ERROR"
            },
            &format!(
                "step {}.{} ({}) finished: {} in {:.3}s{}",
                phase.name,
                step.name,
                step.action,
                report.status,
                duration.as_secs_f64(),
                if report.failure_message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", report.failure_message)
                }
            ),
        );
        if let Some(log) = &self.log {
            log.flush();
        }
        report
    }

    /// Run a step's attempts (each with its own deadline) and reboots; returns how the last
    /// attempt ended, what it produced, and the number of attempts made.
    async fn attempts(
        &self,
        run: &DocRun<'_>,
        phase: &Phase,
        step: &Step,
        sink: &StepSink<'_>,
    ) -> (AttemptEnd, Progress, u32) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            sink.clear_tail();
            self.observer.event(&Event::StepStarted {
                document: &run.label,
                phase: &phase.name,
                step: &step.name,
                action: step.action.name(),
                attempt,
                max_attempts: step.max_attempts,
                depth: run.depth,
            });
            self.app(
                "INFO",
                &format!(
                    "step {}.{} ({}) attempt {attempt} of {} started",
                    phase.name, step.name, step.action, step.max_attempts
                ),
            );
            if let Some(log) = &self.log {
                log.console(
                    format!(
                        "==> {} / {} / {} ({}, attempt {attempt} of {})\n",
                        run.label, phase.name, step.name, step.action, step.max_attempts
                    )
                    .as_bytes(),
                );
            }
            // `timeoutSeconds` does not apply to Reboot; ExecuteDocument has none.
            let timeout = match step.action {
                Action::Reboot | Action::ExecuteDocument => None,
                _ => step.timeout_secs.map(Duration::from_secs),
            };
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let progress = Mutex::new(Progress {
                // Until the inputs are expanded, report them as written.
                inputs: as_input_array(&step.inputs),
                ..Progress::default()
            });
            let attempt_future = self.attempt(run, phase, step, deadline, sink, &progress);
            let end = tokio::select! {
                biased;
                () = self.cancel.cancelled() => AttemptEnd::Cancelled,
                r = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d + TIMEOUT_SLACK, attempt_future)
                            .await
                            .unwrap_or_else(|_| AttemptEnd::TimedOut(String::new())),
                        None => attempt_future.await,
                    }
                } => r,
            };
            let mut progress = progress.into_inner().unwrap_or_default();
            let end = match end {
                AttemptEnd::TimedOut(_) => {
                    let secs = timeout.map_or(0, |t| t.as_secs());
                    let place = match &progress.current_iteration {
                        Some((i, v)) if step.looping.is_some() => {
                            format!(" (in iteration {i}, value `{v}`)")
                        }
                        _ => String::new(),
                    };
                    AttemptEnd::TimedOut(format!(
                        "timed out after {secs} s{place}; the step's processes were stopped"
                    ))
                }
                other => other,
            };
            match end {
                AttemptEnd::Done(Next::Continue) => {
                    return (AttemptEnd::Done(Next::Continue), progress, attempt);
                }
                AttemptEnd::Done(next @ (Next::RebootThenRerun | Next::RebootThenContinue)) => {
                    match self.reboot(run, step).await {
                        Ok(()) if next == Next::RebootThenRerun => {
                            // The same step runs again from its start; a reboot is not a
                            // failed attempt.
                            attempt -= 1;
                            continue;
                        }
                        Ok(()) => return (AttemptEnd::Done(Next::Continue), progress, attempt),
                        Err((message, hint)) => {
                            progress.hint = hint;
                            let end = if self.cancel.is_cancelled() {
                                AttemptEnd::Cancelled
                            } else {
                                AttemptEnd::Failed(message)
                            };
                            return (end, progress, attempt);
                        }
                    }
                }
                AttemptEnd::Cancelled => return (AttemptEnd::Cancelled, progress, attempt),
                AttemptEnd::Failed(ref message) | AttemptEnd::TimedOut(ref message) => {
                    if attempt >= step.max_attempts {
                        return (end, progress, attempt);
                    }
                    let note = format!(
                        "step {}.{} attempt {attempt} of {} failed ({message}); trying again",
                        phase.name, step.name, step.max_attempts
                    );
                    self.app("WARN", &note);
                }
            }
        }
    }

    async fn reboot(&self, run: &DocRun<'_>, step: &Step) -> Result<(), (String, Option<String>)> {
        let n = self.reboots.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.max_reboots {
            return Err((
                format!(
                    "the run asked for more than {} reboots; stopping (does the step exit 194 \
                     every time? a step that reboots must notice on its next run that it is done)",
                    self.max_reboots
                ),
                None,
            ));
        }
        self.note(&format!(
            "step {} of {} asks for a reboot of {} (reboot {n} of at most {})",
            step.name,
            run.label,
            self.target.describe(),
            self.max_reboots
        ));
        let result = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return Err(("the run was cancelled".into(), None)),
            r = self.target.reboot() => r,
        };
        result.map_err(|e| {
            let hint = e.hint().map(str::to_string);
            (format!("could not reboot: {e}"), hint)
        })
    }

    /// One attempt: every iteration of the loop (or the single run), in order, stopping at the
    /// first failure.
    async fn attempt(
        &self,
        run: &DocRun<'_>,
        phase: &Phase,
        step: &Step,
        deadline: Option<tokio::time::Instant>,
        sink: &StepSink<'_>,
        progress: &Mutex<Progress>,
    ) -> AttemptEnd {
        let update = |f: &mut dyn FnMut(&mut Progress)| {
            if let Ok(mut p) = progress.lock() {
                f(&mut p);
            }
        };
        let Some(looping) = &step.looping else {
            let scope = self.scope(run, phase, step, None);
            let inputs = match expand_json(&step.inputs, &scope) {
                Ok(v) => v,
                Err(e) => {
                    update(&mut |p| p.inputs = as_input_array(&step.inputs));
                    return AttemptEnd::Failed(format!("could not expand the inputs: {e}"));
                }
            };
            update(&mut |p| p.inputs = as_input_array(&inputs));
            return match self
                .action(run, step, &inputs, deadline, sink, progress)
                .await
            {
                Ok(done) => {
                    update(&mut |p| p.outputs = done.outputs.clone());
                    AttemptEnd::Done(done.next)
                }
                Err(e) => {
                    let outputs = e.outputs();
                    let hint = e.hint().map(str::to_string);
                    update(&mut |p| {
                        if !outputs.is_empty() {
                            p.outputs = outputs.clone();
                        }
                        p.hint = hint.clone();
                    });
                    failure_end(&e)
                }
            };
        };

        let scope = self.scope(run, phase, step, None);
        let list = match iterations(looping, &scope) {
            Ok(list) => list,
            Err(e) => return AttemptEnd::Failed(format!("could not build the loop: {e}")),
        };
        let mut successful: Vec<Outputs> = Vec::new();
        for (index, value) in &list {
            update(&mut |p| p.current_iteration = Some((*index, value.clone())));
            let scope = self.scope(
                run,
                phase,
                step,
                Some(Iteration {
                    name: looping.name.as_deref(),
                    index: *index,
                    value,
                }),
            );
            let record = |status: Status, message: String| {
                if let Ok(mut p) = progress.lock() {
                    p.iterations.push(IterationReport {
                        index: *index,
                        value: value.clone(),
                        status,
                        failure_message: message,
                    });
                }
            };
            let inputs = match expand_json(&step.inputs, &scope) {
                Ok(v) => v,
                Err(e) => {
                    let message = format!("could not expand the inputs: {e}");
                    record(Status::Failed, message.clone());
                    return AttemptEnd::Failed(format!(
                        "iteration {index} (value `{value}`) failed: {message}"
                    ));
                }
            };
            update(&mut |p| p.inputs = as_input_array(&inputs));
            match self
                .action(run, step, &inputs, deadline, sink, progress)
                .await
            {
                Ok(done) => {
                    record(Status::Success, String::new());
                    successful.push(done.outputs);
                    let collated = collate(&successful);
                    update(&mut |p| p.outputs = collated.clone());
                    if done.next != Next::Continue {
                        // A reboot request ends the attempt; after the reboot the step runs
                        // again from its first iteration (reference 1.12).
                        return AttemptEnd::Done(done.next);
                    }
                }
                Err(e) => {
                    let end = failure_end(&e);
                    let (status, message) = match &end {
                        AttemptEnd::TimedOut(m) => (Status::TimedOut, m.clone()),
                        AttemptEnd::Failed(m) => (Status::Failed, m.clone()),
                        _ => (Status::Failed, e.to_string()),
                    };
                    record(status, message.clone());
                    let hint = e.hint().map(str::to_string);
                    update(&mut |p| p.hint = hint.clone());
                    let message = format!("iteration {index} (value `{value}`) failed: {message}");
                    return match end {
                        AttemptEnd::TimedOut(_) => AttemptEnd::TimedOut(message),
                        _ => AttemptEnd::Failed(message),
                    };
                }
            }
        }
        update(&mut |p| p.current_iteration = None);
        AttemptEnd::Done(Next::Continue)
    }

    async fn action(
        &self,
        run: &DocRun<'_>,
        step: &Step,
        inputs: &Value,
        deadline: Option<tokio::time::Instant>,
        sink: &StepSink<'_>,
        progress: &Mutex<Progress>,
    ) -> Result<Completed, ActionError> {
        if step.action == Action::ExecuteDocument {
            return self.execute_document(run, inputs, progress).await;
        }
        let cx = ActionContext {
            target: self.target,
            sink,
            working_directory: &self.working_directory,
            env: &self.env,
            deadline,
            transfer: &self.transfer,
        };
        actions::run(step.action, inputs, &cx).await
    }

    /// `ExecuteDocument`: load the document (relative paths are relative to the calling
    /// document's folder), check nesting and cycles, run it, and return its summary.
    async fn execute_document(
        &self,
        run: &DocRun<'_>,
        inputs: &Value,
        progress: &Mutex<Progress>,
    ) -> Result<Completed, ActionError> {
        let Value::Object(map) = inputs else {
            return Err(ActionError::Input("expected a map of inputs".into()));
        };
        let text = |key: &str| match map.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let Some(path_text) = text("document").filter(|d| !d.is_empty()) else {
            return Err(ActionError::Input("`document` is required".into()));
        };
        let path = nested_document_path(&run.document.source.path, &path_text)
            .map_err(ActionError::Input)?;
        let depth = run.depth + 1;
        if depth > MAX_NESTING {
            return Err(ActionError::TooDeep {
                max: MAX_NESTING,
                path,
                depth,
            });
        }
        let canonical_path = canonical(&path);
        if run.ancestry.contains(&canonical_path) {
            let chain: Vec<String> = run
                .ancestry
                .iter()
                .chain(std::iter::once(&canonical_path))
                .map(|p| p.display().to_string())
                .collect();
            return Err(ActionError::Cycle(chain.join(" → ")));
        }
        let document = super::parse::load(&path).map_err(|e| match e {
            super::parse::LoadError::Io { source, .. } => ActionError::HostFile(source),
            super::parse::LoadError::Invalid(diagnostics) => {
                ActionError::InvalidDocument(Box::new(diagnostics))
            }
        })?;
        if let Some(pinned) = &self.pinned_documents {
            match pinned.get(&canonical_path) {
                Some(sha256) if *sha256 == document.source.sha256 => {}
                Some(sha256) => {
                    return Err(ActionError::DocumentChanged {
                        path,
                        sha256: document.source.sha256.clone(),
                        planned: sha256.clone(),
                    });
                }
                None => {
                    return Err(ActionError::NotPinned(path));
                }
            }
        }
        let phases = text("phases").and_then(|p| selected_phases(&p));
        let windows = windows_only_steps(&document, phases.as_deref());
        if !windows.is_empty() {
            return Err(ActionError::WindowsOnlyDocument(windows.join("; ")));
        }
        let mut parameters = Vec::new();
        if let Some(Value::Array(items)) = map.get("parameters") {
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let value = item.get("value").map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                match (name, value) {
                    (Some(n), Some(v)) if !v.is_empty() => parameters.push((n.to_string(), v)),
                    (Some(n), _) => {
                        return Err(ActionError::Input(format!("parameter `{n}` has no value")));
                    }
                    _ => {
                        return Err(ActionError::Input(
                            "each of `parameters` needs `name` and `value`".into(),
                        ));
                    }
                }
            }
        }
        let label = document_label(&document);
        let variables = bind_parameters(&document, &label, &parameters, Given::Step)
            .map_err(|errors| ActionError::Input(errors.join("; ")))?;
        let mut ancestry = run.ancestry.clone();
        ancestry.push(canonical_path);
        let nested = DocRun {
            document: &document,
            label,
            values: Values::new(&document, variables),
            depth,
            ancestry,
            phases,
        };
        let started = timestamp();
        let (report, _) = self.run_document_boxed(&nested).await;
        let execution = ExecutionReport {
            execution_id: uuid::Uuid::new_v4().to_string(),
            status: report.status,
            start_time: started,
            end_time: timestamp(),
            failure_message: if report.failure_message.is_empty() {
                String::new()
            } else {
                format!("document {}: {}", report.name, report.failure_message)
            },
            documents: vec![report],
        };
        let log_url = self
            .log
            .as_ref()
            .map(|l| l.dir().display().to_string())
            .unwrap_or_default();
        let summary = Summary::of(&execution, log_url);
        let outputs: Outputs = match serde_json::to_value(&summary) {
            Ok(Value::Object(m)) => vec![m],
            _ => Vec::new(),
        };
        let status = execution.status;
        let failure_message = execution.failure_message.clone();
        if let Ok(mut p) = progress.lock() {
            p.nested = Some(vec![execution]);
            p.outputs = outputs.clone();
        }
        if status.is_ok() {
            Ok(Completed {
                outputs,
                next: Next::Continue,
            })
        } else {
            Err(ActionError::NestedFailed {
                path,
                status: status.to_string(),
                message: failure_message,
            })
        }
    }
}

/// How a failed action ends the attempt: timed out or failed.
fn failure_end(e: &ActionError) -> AttemptEnd {
    match e {
        ActionError::Command {
            status: ExitStatus::TimedOut,
            ..
        } => AttemptEnd::TimedOut(e.to_string()),
        _ => AttemptEnd::Failed(crate::diagnostic::error_chain(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_outputs_are_joined_per_key() {
        let one = |s: &str| {
            let mut m = Map::new();
            m.insert("stdout".into(), Value::String(s.into()));
            vec![m]
        };
        let collated = collate(&[one("a"), one("b"), one("c")]);
        assert_eq!(collated[0]["stdout"], "a\nb\nc");
        assert_eq!(collate(&[one("x")])[0]["stdout"], "x");
        assert!(collate(&[]).is_empty());
    }
}
