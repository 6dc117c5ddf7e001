//! `builder serve`: runs the pipelines of a folder on their schedules.
//!
//! Every tick (at the next due time, at most [`TICK`] apart, and at once on SIGHUP) the
//! folder is read again, so edited, added and removed pipeline files take effect without a
//! restart. For each enabled pipeline with a schedule:
//!
//! 1. its next run time comes from the history (persisted; `None` for a new pipeline, which
//!    waits for its first match);
//! 2. when it is due, the execution is recorded first (`History::begin`, unique per
//!    `(pipeline, due)`: a slot already taken, by this scheduler before a restart or by
//!    another one, is not run again), then the next run time is persisted, then the build
//!    starts. After downtime only the latest missed occurrence runs.
//!
//! At most `concurrency` builds run at once (one by default); due executions wait as
//! `pending`. On startup, executions left unfinished by a scheduler that died (SIGKILL, power
//! loss) are recorded as failed ("scheduler stopped") and their build's folders in the store
//! removed (the logs are kept with the store's failed builds). On stop, running builds are
//! cancelled cleanly (their VMs stopped, files removed) or, with [`OnStop::Finish`], allowed
//! to finish; executions still pending are recorded as cancelled.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::Clock;
use super::history::{ExecStatus, ExecutionId, History, HistoryError, Outcome, Trigger};
use super::model::Pipeline;
use super::parse;
use super::run::{self, Report, RunOptions};
use super::schedule::{Due, When};
use crate::build::{BuildEvent, BuildObserver};
use crate::component::executor::{Event, Observer};
use crate::store::Store;

/// The longest the scheduler sleeps before it looks at the folder again.
pub const TICK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The io error names the folder.
    #[error("could not read the pipelines folder")]
    Folder(#[source] std::io::Error),
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// What to do with running builds when the scheduler is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStop {
    /// Cancel them cleanly (VMs stopped, files removed, logs kept); recorded as cancelled.
    #[default]
    Cancel,
    /// Let them finish, then stop.
    Finish,
}

/// What the scheduler is told from outside (signals, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Stop (the signal's name, for the records).
    Stop(String),
    /// Read the folder again now (SIGHUP).
    Reload,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// Builds at once; at least 1.
    pub concurrency: usize,
    pub on_stop: OnStop,
    pub run: RunOptions,
}

/// What a build task returns: its execution, pipeline, and report (or why none).
type Done = (ExecutionId, String, Result<Report, String>);

/// A line for the scheduler's log (stderr in `builder serve`).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Run the scheduler until `control` says stop (or is closed). Must run inside a
/// `tokio::task::LocalSet` (builds are local tasks).
pub async fn serve(
    store: Store,
    history: Arc<History>,
    clock: Arc<dyn Clock>,
    options: Options,
    mut control: UnboundedReceiver<Control>,
    log: Log,
) -> Result<(), SchedulerError> {
    recover(&store, &history, &log)?;
    let concurrency = options.concurrency.max(1);
    let mut running: JoinSet<Done> = JoinSet::new();
    let mut running_ids: HashMap<tokio::task::Id, (ExecutionId, String)> = HashMap::new();
    let mut queue: VecDeque<(ExecutionId, String, PathBuf)> = VecDeque::new();
    let mut reported: HashMap<PathBuf, String> = HashMap::new();
    let stop_reason: String;
    log(&format!(
        "serving pipelines in {} (at most {concurrency} build{} at once)",
        options.dir.display(),
        if concurrency == 1 { "" } else { "s" }
    ));

    loop {
        let now = clock.now();
        let pipelines = load_folder(&options.dir, now, &mut reported, &log)?;
        let mut wake = now + chrono::Duration::from_std(TICK).unwrap_or_default();
        for (path, pipeline) in &pipelines {
            let Some(schedule) = pipeline.schedule.as_ref().filter(|_| pipeline.enabled) else {
                continue;
            };
            let when = When {
                expression: &schedule.expression.value,
                zone: schedule.timezone,
            };
            let stored = history.next_run(&pipeline.name)?;
            match when.due(stored, now) {
                Due::Wait { next } => {
                    if stored != Some(next) {
                        history.set_next_run(&pipeline.name, next)?;
                        log(&format!(
                            "{}: next run at {} ({})",
                            pipeline.name,
                            next.format("%Y-%m-%d %H:%M UTC"),
                            schedule.expression.value.describe()
                        ));
                    }
                    wake = wake.min(next);
                }
                Due::Never => {
                    if stored.is_some() {
                        history.clear_next_run(&pipeline.name)?;
                        log(&format!(
                            "{}: its schedule matches no time from now on",
                            pipeline.name
                        ));
                    }
                }
                Due::Run { due, missed, next } => {
                    let trigger = Trigger::Schedule { due };
                    let reason = run::trigger_reason(&trigger, missed);
                    let busy = queue.iter().any(|(_, n, _)| *n == pipeline.name)
                        || running_ids.values().any(|(_, n)| *n == pipeline.name);
                    if busy {
                        // One execution of a pipeline at a time: the slot is recorded as
                        // skipped (and so never run later) rather than queued behind it.
                        history.skip(
                            &pipeline.name,
                            trigger,
                            &format!("{reason}; skipped: the previous execution is still running"),
                        )?;
                        log(&format!(
                            "{}: the run for {} is skipped: the previous execution is still running",
                            pipeline.name,
                            due.format("%Y-%m-%d %H:%M UTC")
                        ));
                    } else {
                        // Recorded before anything else: the slot is taken even if we die now.
                        match history.begin(&pipeline.name, trigger, &reason)? {
                            Some(id) => {
                                log(&format!("{}: execution {id}: {reason}", pipeline.name));
                                queue.push_back((id, pipeline.name.clone(), path.clone()));
                            }
                            None => log(&format!(
                                "{}: the run for {} was already recorded; not running it again",
                                pipeline.name,
                                due.format("%Y-%m-%d %H:%M UTC")
                            )),
                        }
                    }
                    match next {
                        Some(next) => {
                            history.set_next_run(&pipeline.name, next)?;
                            wake = wake.min(next);
                        }
                        None => history.clear_next_run(&pipeline.name)?,
                    }
                }
            }
        }

        let protected = if queue.is_empty() {
            Vec::new()
        } else {
            protected_refs(&pipelines)
        };
        while running.len() < concurrency
            && let Some((id, name, path)) = queue.pop_front()
        {
            let store = store.clone();
            let history = history.clone();
            let mut run_options = options.run.clone();
            run_options.protected_refs = protected.clone();
            let observer = LogLines {
                name: name.clone(),
                log: log.clone(),
            };
            let task_name = name.clone();
            // The build future is not `Send` (it borrows the VM's undo list across awaits): the
            // builds run on the scheduler's own thread, as tasks of a `LocalSet`.
            let handle = running.spawn_local(async move {
                let result = run::execute_file(
                    &path,
                    id,
                    &store,
                    &history,
                    &run_options,
                    &observer,
                    Utc::now(),
                )
                .await
                .map_err(|e| crate::diagnostic::error_chain(&e));
                (id, task_name, result)
            });
            running_ids.insert(handle.id(), (id, name));
        }

        let sleep = (wake - clock.now()).to_std().unwrap_or(Duration::ZERO);
        // A due time just passed: look again right after it (croner matches whole minutes).
        let sleep = sleep.max(Duration::from_millis(200)).min(TICK);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                finished(done, &mut running_ids, &log);
            }
            message = control.recv() => match message {
                Some(Control::Reload) => log("reloading the pipelines folder"),
                Some(Control::Stop(why)) => { stop_reason = why; break; }
                None => { stop_reason = "the control channel closed".into(); break; }
            },
        }
    }

    // Stopping.
    for (id, name, _) in queue.drain(..) {
        log(&format!(
            "{name}: execution {id} cancelled before it started"
        ));
        let _ = run::cancelled(
            &history,
            id,
            &format!("scheduler stopped ({stop_reason}) before the build started"),
        );
    }
    match options.on_stop {
        OnStop::Finish if !running.is_empty() => {
            log(&format!(
                "{stop_reason}: waiting for {} running build(s) to finish",
                running.len()
            ));
            while let Some(done) = running.join_next_with_id().await {
                finished(done, &mut running_ids, &log);
            }
        }
        _ => {
            if !running.is_empty() {
                log(&format!(
                    "{stop_reason}: cancelling {} running build(s)",
                    running.len()
                ));
            }
            running.abort_all();
            // Each aborted build unwinds as its future is dropped (VM stopped, files
            // removed); wait for that before saying so.
            while let Some(done) = running.join_next_with_id().await {
                if let Err(e) = &done
                    && e.is_cancelled()
                    && let Some((id, name)) = running_ids.remove(&e.id())
                {
                    let _ =
                        run::cancelled(&history, id, &format!("scheduler stopped ({stop_reason})"));
                    log(&format!(
                        "{name}: execution {id} cancelled; its build was stopped and removed"
                    ));
                } else {
                    finished(done, &mut running_ids, &log);
                }
            }
            // What their undo lists could not remove, or kept (every execution's options
            // share these leftovers).
            let left = options.run.build.leftovers.take();
            for w in left.warnings() {
                log(&format!("warning: {w}"));
            }
            for k in &left.kept {
                log(&format!("note: {k}"));
            }
        }
    }
    log("stopped");
    Ok(())
}

fn finished(
    done: Result<(tokio::task::Id, Done), tokio::task::JoinError>,
    running_ids: &mut HashMap<tokio::task::Id, (ExecutionId, String)>,
    log: &Log,
) {
    match done {
        Ok((task, (id, name, result))) => {
            running_ids.remove(&task);
            match result {
                Ok(report) => {
                    let what = report
                        .image
                        .as_deref()
                        .map(|i| format!(" {i}"))
                        .unwrap_or_default();
                    let why = match report.status {
                        ExecStatus::Failed => report.error.clone().unwrap_or_default(),
                        _ => report.reason.clone(),
                    };
                    log(&format!(
                        "{name}: execution {id} {}{what}: {why}",
                        report.status
                    ));
                    for w in &report.warnings {
                        log(&format!("{name}: warning: {w}"));
                    }
                    for l in &report.lifecycle {
                        log(&format!("{name}: lifecycle: {l}"));
                    }
                    if let Some(pruned) = &report.layer_cache {
                        log(&format!("{name}: {pruned}"));
                    }
                }
                Err(e) => log(&format!(
                    "{name}: execution {id} could not be recorded: {e}"
                )),
            }
        }
        Err(e) => {
            if let Some((id, name)) = running_ids.remove(&e.id()) {
                log(&format!("{name}: execution {id} stopped unexpectedly: {e}"));
            }
        }
    }
}

/// The valid pipelines of `dir` (`*.yml`, `*.yaml`), sorted by file name. An invalid file is
/// reported once per content (and again when it changes); a second file with a name already
/// taken is reported and left out.
pub fn load_folder(
    dir: &Path,
    now: DateTime<Utc>,
    reported: &mut HashMap<PathBuf, String>,
    log: &Log,
) -> Result<Vec<(PathBuf, Pipeline)>, SchedulerError> {
    let entries = fs_err::read_dir(dir).map_err(SchedulerError::Folder)?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml"))
        })
        .collect();
    paths.sort();
    let mut out: Vec<(PathBuf, Pipeline)> = Vec::new();
    for path in paths {
        let Ok(text) = fs_err::read_to_string(&path) else {
            continue;
        };
        let checked = parse::check(&path, &text, now);
        let key = format!("{:x}", text.len()) + &text;
        match checked.pipeline {
            Some(p) => {
                if out.iter().any(|(_, q)| q.name == p.name) {
                    if reported.get(&path) != Some(&key) {
                        log(&format!(
                            "{}: another pipeline file is already named `{}`; this one is ignored",
                            path.display(),
                            p.name
                        ));
                        reported.insert(path.clone(), key);
                    }
                    continue;
                }
                reported.remove(&path);
                out.push((path, p));
            }
            None => {
                if reported.get(&path) != Some(&key) {
                    log(&format!(
                        "ignoring an invalid pipeline file (fix it; it is read again at each tick):\n{}",
                        checked.diagnostics.render(false)
                    ));
                    reported.insert(path.clone(), key);
                }
            }
        }
    }
    Ok(out)
}

/// The store references (`base/1.x.x`) the recipes of `pipelines` build on: the lifecycle
/// of one pipeline never deletes the parent of another.
pub fn protected_refs(pipelines: &[(PathBuf, Pipeline)]) -> Vec<String> {
    let mut refs: Vec<String> = pipelines
        .iter()
        .filter_map(|(_, p)| crate::recipe::load(&p.recipe.value).ok())
        .filter_map(|r| match r.parent.value {
            crate::recipe::ParentImage::Store { name, version } => {
                Some(format!("{name}/{version}"))
            }
            _ => None,
        })
        .collect();
    refs.sort();
    refs.dedup();
    refs
}

/// Executions left unfinished by a scheduler that is gone: recorded as failed. Their builds
/// were abandoned like any killed builder's: [`Store::recover_abandoned`] (the one place
/// that cleans those up, for every command) removes their disk chains and staging folders
/// and keeps their logs under `failed/`. Executions another live process runs are left alone.
pub fn recover(
    store: &Store,
    history: &History,
    log: &Log,
) -> Result<Vec<ExecutionId>, SchedulerError> {
    match store.recover_abandoned() {
        Ok(abandoned) => {
            for a in abandoned {
                log(&a.to_string());
            }
        }
        Err(e) => log(&format!(
            "could not check the store for abandoned builds: {e}"
        )),
    }
    let me = std::process::id();
    let mut recovered = Vec::new();
    for execution in history.unfinished()? {
        if let Some(runner) = &execution.runner
            && runner.pid != me
            && runner.is_alive() != Some(false)
        {
            continue;
        }
        history.adopt(execution.id)?;
        let mut message = format!(
            "scheduler stopped while the execution was {} (the process running it is gone)",
            execution.status
        );
        if let Some((image, build_id)) = run::recorded_build(&execution) {
            let failed = store.root().join("failed").join(&build_id);
            if failed.is_dir() {
                message.push_str(&format!(
                    "; build {image}'s logs are in {}",
                    failed.display()
                ));
            }
        }
        history.finish(
            execution.id,
            &Outcome {
                status: Some(ExecStatus::Failed),
                image: run::recorded_build(&execution).map(|(image, _)| image),
                error: Some(message.clone()),
                ..Outcome::default()
            },
        )?;
        log(&format!(
            "{}: execution {}: {message}",
            execution.pipeline, execution.id
        ));
        recovered.push(execution.id);
    }
    Ok(recovered)
}

/// The build's stages as log lines, prefixed with the pipeline's name.
struct LogLines {
    name: String,
    log: Log,
}

impl Observer for LogLines {
    fn event(&self, _: &Event<'_>) {}
}

impl BuildObserver for LogLines {
    fn build_event(&self, event: &BuildEvent<'_>) {
        let line = match event {
            BuildEvent::BuildStarted { image, logs, .. } => {
                format!("building {image} (logs: {})", logs.display())
            }
            BuildEvent::StageStarted { stage, detail } => {
                format!(
                    "▶ {stage}{}",
                    detail.map(|d| format!(" {d}")).unwrap_or_default()
                )
            }
            BuildEvent::StageFinished {
                stage,
                status,
                duration_ms,
                ..
            } => format!("{stage} {status} ({:.1} s)", *duration_ms as f64 / 1000.0),
            BuildEvent::BuildFinished { status, image, .. } => format!("build {image} {status}"),
            _ => return,
        };
        (self.log)(&format!("{}: {line}", self.name));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_folder_is_read_with_invalid_files_reported_once_and_duplicates_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs_err::write(dir.path().join(name), text).unwrap();
        write("a.yml", "name: web\nrecipe: r.yml\n");
        write("b.yaml", "name: web\nrecipe: other.yml\n");
        write(
            "c.yml",
            "name: broken\nrecipe: r.yml\nschedule: {expression: '0 0 31 2 *'}\n",
        );
        write("notes.txt", "not a pipeline");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let log: Log = Arc::new(move |l: &str| sink.lock().unwrap().push(l.to_string()));
        let mut reported = HashMap::new();
        let now = Utc::now();
        for _ in 0..3 {
            let found = load_folder(dir.path(), now, &mut reported, &log).unwrap();
            let names: Vec<_> = found
                .iter()
                .map(|(p, q)| (p.file_name().unwrap().to_owned(), q.name.clone()))
                .collect();
            assert_eq!(
                names,
                [(std::ffi::OsString::from("a.yml"), "web".to_string())]
            );
        }
        let lines = lines.lock().unwrap().clone();
        assert_eq!(lines.len(), 2, "each problem once: {lines:?}");
        assert!(lines[0].contains("already named `web`"), "{lines:?}");
        assert!(lines[1].contains("never matches"), "{lines:?}");
        // Fixed: read again, no longer reported.
        write("c.yml", "name: fixed\nrecipe: r.yml\n");
        let found = load_folder(dir.path(), now, &mut reported, &log).unwrap();
        assert_eq!(found.len(), 2);
    }
}
