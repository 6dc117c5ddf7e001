//! What a run leaves behind, in AWSTOE's layout (reference 4): the result tree that becomes
//! `detailedoutput.json`, the summary printed at the end, and the run folder
//! `<log-directory>/TOE_<YYYY-MM-DD>_<HH-MM-SS>_UTC-0_<execution-id>/` with `console.log`
//! (every byte the steps printed), `application.log` (the executor's own timestamped log),
//! `detailedoutput.json`, `chaining.json` and a copy of each document.
//!
//! The two JSON files are written under a temporary name and renamed; the two logs are
//! appended as the run goes and flushed after every step, so a killed run still leaves them.

use fs_err::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Local, SecondsFormat, Utc};
use serde::Serialize;

/// How a step, phase, document or run ended. Serialized lower-case as in
/// `detailedoutput.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    Failed,
    /// A step that failed with `onFailure: Ignore`.
    IgnoredFailure,
    /// Skipped by its `if` (counts as success).
    Skipped,
    /// The step (all its loop iterations together) ran longer than `timeoutSeconds`.
    TimedOut,
    /// The run was interrupted (Ctrl-C, SIGTERM) before or while this ran.
    Cancelled,
    /// A phase, document or run that succeeded apart from ignored failures.
    SuccessWithIgnoredFailure,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Failed => "failed",
            Status::IgnoredFailure => "ignoredfailure",
            Status::Skipped => "skipped",
            Status::TimedOut => "timedout",
            Status::Cancelled => "cancelled",
            Status::SuccessWithIgnoredFailure => "successwithignoredfailure",
        }
    }

    /// Success, skipped, ignored failures: the run goes on and counts it as good.
    pub fn is_ok(self) -> bool {
        matches!(
            self,
            Status::Success
                | Status::Skipped
                | Status::IgnoredFailure
                | Status::SuccessWithIgnoredFailure
        )
    }

    /// The status of a group (phase, document, run) from the statuses of its members.
    pub fn combine(statuses: impl IntoIterator<Item = Status>) -> Status {
        let mut result = Status::Success;
        for s in statuses {
            result = match (result, s) {
                (Status::Cancelled, _) | (_, Status::Cancelled) => Status::Cancelled,
                (Status::Failed, _) | (_, Status::Failed | Status::TimedOut) => Status::Failed,
                (_, Status::IgnoredFailure | Status::SuccessWithIgnoredFailure) => {
                    Status::SuccessWithIgnoredFailure
                }
                (r, _) => r,
            };
        }
        result
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Now, RFC 3339 with the local offset (`2021-08-26T17:20:31-07:00`), as AWSTOE writes times.
pub fn timestamp() -> String {
    Local::now().to_rfc3339_opts(SecondsFormat::Millis, false)
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionReport {
    pub execution_id: String,
    pub status: Status,
    pub start_time: String,
    pub end_time: String,
    pub failure_message: String,
    pub documents: Vec<DocumentReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentReport {
    pub name: String,
    pub file_path: String,
    pub status: Status,
    pub description: String,
    pub start_time: String,
    pub end_time: String,
    pub failure_message: String,
    pub phases: Vec<PhaseReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseReport {
    pub name: String,
    pub status: Status,
    pub start_time: String,
    pub end_time: String,
    pub failure_message: String,
    pub steps: Vec<StepReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub name: String,
    pub status: Status,
    pub failure_message: String,
    /// `-1` for no timeout.
    pub timeout_seconds: i64,
    pub on_failure: String,
    pub max_attempts: u32,
    /// Attempts made (0 when skipped or cancelled before it started). Not in AWSTOE's output.
    pub attempts: u32,
    pub action: String,
    pub start_time: String,
    pub end_time: String,
    /// JSON text of an array of input maps, after templating.
    pub inputs: String,
    /// JSON text of an array of output maps.
    pub outputs: String,
    #[serde(rename = "loop")]
    pub loop_report: Option<LoopReport>,
    /// The nested runs of `ExecuteDocument`.
    pub detailed_output: Option<Vec<ExecutionReport>>,
    /// The last lines the step printed (both streams), for error messages. Not in the JSON:
    /// `console.log` has everything.
    #[serde(skip)]
    pub output_tail: Vec<String>,
}

/// Per-iteration results of a looping step (AWSTOE does not publish its shape).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoopReport {
    pub name: Option<String>,
    pub iterations: Vec<IterationReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IterationReport {
    pub index: i64,
    pub value: String,
    pub status: Status,
    pub failure_message: String,
}

/// Where a run failed: the first failed step, followed into nested documents.
#[derive(Debug, Clone, Copy)]
pub struct FailedStep<'a> {
    pub document: &'a DocumentReport,
    pub phase: &'a PhaseReport,
    pub step: &'a StepReport,
}

impl ExecutionReport {
    /// The first step that failed or timed out (not ignored, not cancelled). When it is an
    /// `ExecuteDocument`, the failed step inside the nested document is returned instead.
    pub fn failed_step(&self) -> Option<FailedStep<'_>> {
        for document in &self.documents {
            for phase in &document.phases {
                for step in &phase.steps {
                    if matches!(step.status, Status::Failed | Status::TimedOut) {
                        let nested = step
                            .detailed_output
                            .iter()
                            .flatten()
                            .find_map(ExecutionReport::failed_step);
                        return Some(nested.unwrap_or(FailedStep {
                            document,
                            phase,
                            step,
                        }));
                    }
                }
            }
        }
        None
    }
}

/// The object `awstoe run` prints at the end, also `ExecuteDocument`'s outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub executed_step_count: u32,
    pub execution_id: String,
    pub failed_step_count: u32,
    pub failure_message: String,
    pub ignored_failed_step_count: u32,
    pub log_url: String,
    pub status: Status,
}

impl Summary {
    /// Count the steps of `report` (nested documents count inside their own summary only).
    pub fn of(report: &ExecutionReport, log_url: String) -> Summary {
        let mut executed = 0;
        let mut failed = 0;
        let mut ignored = 0;
        for step in report
            .documents
            .iter()
            .flat_map(|d| &d.phases)
            .flat_map(|p| &p.steps)
        {
            match step.status {
                Status::Skipped | Status::Cancelled if step.attempts == 0 => {}
                Status::Failed | Status::TimedOut => {
                    executed += 1;
                    failed += 1;
                }
                Status::IgnoredFailure => {
                    executed += 1;
                    ignored += 1;
                }
                _ => executed += 1,
            }
        }
        Summary {
            executed_step_count: executed,
            execution_id: report.execution_id.clone(),
            failed_step_count: failed,
            failure_message: report.failure_message.clone(),
            ignored_failed_step_count: ignored,
            log_url,
            status: report.status,
        }
    }
}

/// One reference resolution, for `chaining.json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resolution {
    pub document: String,
    pub phase: String,
    pub step: String,
    pub reference: String,
    /// `None` when it could not be resolved.
    pub value: Option<String>,
    pub error: Option<String>,
}

/// Inputs and outputs a step stored for chaining, for `chaining.json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredStep {
    pub document: String,
    pub phase: String,
    pub step: String,
    pub inputs: serde_json::Value,
    pub outputs: serde_json::Value,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Chaining {
    pub steps: Vec<StoredStep>,
    pub resolutions: Vec<Resolution>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The run folder or a file in it could not be written; the io error names which.
    #[error("could not write the run's logs")]
    Io(#[from] std::io::Error),
}

/// `TOE_<YYYY-MM-DD>_<HH-MM-SS>_UTC-0_<execution-id>`.
pub fn run_folder_name(started: DateTime<Utc>, execution_id: &str) -> String {
    format!(
        "TOE_{}_UTC-0_{execution_id}",
        started.format("%Y-%m-%d_%H-%M-%S")
    )
}

/// The run folder and its two growing logs.
pub struct RunLog {
    dir: PathBuf,
    console: Mutex<BufWriter<File>>,
    application: Mutex<BufWriter<File>>,
}

impl RunLog {
    /// Create `<parent>/TOE_…/` with empty `console.log` and `application.log`.
    pub fn create(parent: &Path, execution_id: &str) -> Result<RunLog, ReportError> {
        let dir = parent.join(run_folder_name(Utc::now(), execution_id));
        fs_err::create_dir_all(&dir)?;
        let open = |name: &str| File::create(dir.join(name)).map(BufWriter::new);
        Ok(RunLog {
            console: Mutex::new(open("console.log")?),
            application: Mutex::new(open("application.log")?),
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append raw step output to `console.log`. Write errors are dropped: a full disk must not
    /// turn a passing step into a failing one (the final JSON write reports it).
    pub fn console(&self, data: &[u8]) {
        if let Ok(mut c) = self.console.lock() {
            let _ = c.write_all(data);
        }
    }

    /// A timestamped line in `application.log`.
    pub fn app(&self, level: &str, message: &str) {
        if let Ok(mut a) = self.application.lock() {
            let now = Local::now().format("%Y-%m-%d %H:%M:%S%.3f %:z");
            let _ = writeln!(a, "{now} {level:<5} {message}");
        }
    }

    pub fn flush(&self) {
        if let Ok(mut c) = self.console.lock() {
            let _ = c.flush();
        }
        if let Ok(mut a) = self.application.lock() {
            let _ = a.flush();
        }
    }

    /// Write `value` as pretty JSON to `name` in the run folder (temporary name, then rename).
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> Result<PathBuf, ReportError> {
        let path = self.dir.join(name);
        let temp = self.dir.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = BufWriter::new(File::create(&temp)?);
            serde_json::to_writer_pretty(&mut file, value)?;
            file.write_all(b"\n")?;
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            fs_err::rename(&temp, &path)
        };
        write().inspect_err(|_| {
            let _ = fs_err::remove_file(&temp);
        })?;
        Ok(path)
    }

    /// Keep a copy of an input document (`document.yaml`, or `document-<n>.yaml` with several).
    pub fn copy_document(&self, source: &Path, name: &str) -> Result<(), ReportError> {
        fs_err::copy(source, self.dir.join(name))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_serialize_lower_case_and_combine() {
        assert_eq!(
            serde_json::to_string(&Status::IgnoredFailure).expect("json"),
            "\"ignoredfailure\""
        );
        assert_eq!(
            serde_json::to_string(&Status::TimedOut).expect("json"),
            "\"timedout\""
        );
        use Status::*;
        assert_eq!(Status::combine([Success, Skipped]), Success);
        assert_eq!(
            Status::combine([Success, IgnoredFailure]),
            SuccessWithIgnoredFailure
        );
        assert_eq!(Status::combine([IgnoredFailure, TimedOut]), Failed);
        assert_eq!(Status::combine([Failed, Cancelled]), Cancelled);
        assert_eq!(Status::combine([]), Success);
    }

    #[test]
    fn run_folder_is_named_like_awstoe() {
        let t = DateTime::parse_from_rfc3339("2021-07-01T12:34:56Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            run_folder_name(t, "abc"),
            "TOE_2021-07-01_12-34-56_UTC-0_abc"
        );
    }
}
