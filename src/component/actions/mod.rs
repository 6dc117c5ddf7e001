//! The action modules that run on Linux, written against [`Machine`] only: a file action is
//! a few target primitives (`put_file`, `stat`, `list`, an argv such as
//! `["mkdir", "-p", "--", path]`), so it runs unchanged on this machine and in a guest.
//!
//! An action gets its inputs after templating (the executor expands them) and returns its
//! outputs; loops, retries, timeouts, `if` and chaining are the executor's business.
//! `ExecuteDocument` is run by the executor itself (it recurses into documents).

mod encoding;
mod exec;
mod files;
mod system;
pub mod transfer;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::condition::{self, EvalContext};
use super::document::Action;
use crate::machine::{Capture, ExecRequest, Machine, MachineError, OutputSink};

pub use transfer::{Transfer, s3_client};

/// The outputs of one action run: one map per input item (`outputs[i]` in chaining; map-style
/// inputs give one map, actions without outputs none).
pub type Outputs = Vec<Map<String, Value>>;

/// What the executor should do after a successful action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Exit code 194: reboot the target, then run the same step again from its start.
    RebootThenRerun,
    /// The `Reboot` action: reboot the target, then go on with the next step.
    RebootThenContinue,
}

#[derive(Debug)]
pub struct Completed {
    pub outputs: Outputs,
    pub next: Next,
}

impl Completed {
    fn done(outputs: Outputs) -> Self {
        Self {
            outputs,
            next: Next::Continue,
        }
    }
}

/// Why an action failed. The message is what lands in `failureMessage`.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// An input is missing or has the wrong form after templating.
    #[error("{0}")]
    Input(String),
    /// `inputs[i]` of an action given several failed.
    #[error("inputs[{index}]")]
    Item {
        index: usize,
        #[source]
        source: Box<ActionError>,
    },
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} already exists and `overwrite` is false")]
    Exists(PathBuf),
    #[error("{path} is not a {kind}")]
    NotA { path: PathBuf, kind: &'static str },
    /// A folder where a file is needed; `hint` says how to use the folder instead.
    #[error("{path} is a folder{hint}")]
    IsAFolder { path: PathBuf, hint: &'static str },
    #[error("{path} exists and is not a {kind}")]
    ExistsAsOther { path: PathBuf, kind: &'static str },
    #[error("no {kind} matches `{}`", pattern.display())]
    NoMatch {
        pattern: PathBuf,
        kind: &'static str,
    },
    #[error("{0} does not exist (AppendFile only appends; use CreateFile first)")]
    AppendToMissing(PathBuf),
    #[error("the link target {0} does not exist")]
    LinkTargetMissing(PathBuf),
    #[error("the link {0} already exists; set `force: true` to replace it")]
    LinkExists(PathBuf),
    #[error("source and destination are the same: {0}")]
    SameFile(PathBuf),
    #[error(
        "{path} is not empty ({entries} entries); set `force: true` to delete it with its content"
    )]
    NotEmpty { path: PathBuf, entries: usize },
    #[error("the destination folder {0} does not exist")]
    NoDestinationFolder(PathBuf),
    #[error("{path} is not valid {encoding} text")]
    NotText { path: PathBuf, encoding: String },
    /// A helper command the action ran (mkdir, cp, chown, …) failed.
    #[error("`{command}` {status}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Helper {
        command: String,
        status: crate::machine::ExitStatus,
        stderr: String,
    },
    /// A file on the host (a download or upload on its way) could not be used; the error
    /// (from `fs_err`) names the file.
    #[error(transparent)]
    HostFile(std::io::Error),
    /// Something on the host other than a named file (a temporary folder) could not be made.
    #[error("{what}")]
    Host {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An HTTP request failed before an answer; the cause has its URL removed (a presigned
    /// URL carries a signature).
    #[error("{what}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered, and not with what was asked.
    #[error("{what}: the endpoint answered {answer}{hint}")]
    Answered {
        what: String,
        answer: String,
        hint: &'static str,
    },
    /// A download answered with an error status.
    #[error("{shown} answered {answer}; expected 200 OK{hint}")]
    NotOk {
        shown: String,
        answer: String,
        hint: &'static str,
    },
    /// A download that failed in a way that may pass failed every attempt.
    #[error("gave up after {attempts} attempts")]
    GaveUp {
        attempts: u32,
        #[source]
        source: Box<ActionError>,
    },
    #[error("the listing of {what} is not S3 XML")]
    NotS3Xml {
        what: String,
        #[source]
        source: Box<crate::aws::client::RequestError>,
    },
    /// An S3 request or upload failed other than by S3's refusal or the network.
    #[error("{what}")]
    S3 {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the {algorithm} checksum of the download does not match: expected {expected}, got {actual}; {} was not written",
        dest.display()
    )]
    ChecksumMismatch {
        algorithm: String,
        expected: String,
        actual: String,
        dest: PathBuf,
    },
    #[error(
        "{action} needs an S3-compatible endpoint and none is configured: set {env} (e.g. http://127.0.0.1:9000) with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION, or pass --s3-endpoint"
    )]
    NoS3Endpoint { action: String, env: &'static str },
    /// An `Assert` step's condition could not be evaluated.
    #[error(transparent)]
    Condition(#[from] condition::ConditionError),
    #[error("the assertion is false: {0}")]
    AssertionFalse(String),
    #[error(
        "no supported package manager on the target (looked for apt-get, dnf, yum, zypper, apk)"
    )]
    NoPackageManager,
    #[error("ExecuteDocument is run by the executor")]
    NotHere,
    #[error(
        "ExecuteDocument may nest at most {max} levels below the documents given to the run; {} would be level {depth}",
        path.display()
    )]
    TooDeep {
        max: usize,
        path: PathBuf,
        depth: usize,
    },
    #[error("documents call each other in a cycle: {0}")]
    Cycle(String),
    /// A nested document with problems, rendered as `builder validate` shows them.
    #[error("{}", .0.render(false))]
    InvalidDocument(Box<crate::diagnostic::Diagnostics>),
    #[error(
        "{} changed since the build was planned (sha256 {sha256}, planned {planned}); plan the build again",
        path.display()
    )]
    DocumentChanged {
        path: PathBuf,
        sha256: String,
        planned: String,
    },
    #[error(
        "{} is not one of the documents the build's plan pinned; the plan pins every document a component reaches through ExecuteDocument (`builder plan` lists them)",
        .0.display()
    )]
    NotPinned(PathBuf),
    #[error("the document uses Windows-only actions, which do not run on Linux: {0}")]
    WindowsOnlyDocument(String),
    /// A nested document's run failed; `message` is its failure message.
    #[error("{} ended with status {status}: {message}", path.display())]
    NestedFailed {
        path: PathBuf,
        status: String,
        message: String,
    },
    /// A command the action ran did not succeed. Its stdout is kept for the step's outputs.
    #[error("{what} {status}")]
    Command {
        what: String,
        status: crate::machine::ExitStatus,
        outputs: Outputs,
    },
    /// The target could not do what was asked.
    #[error("{what}")]
    Target {
        what: String,
        #[source]
        source: MachineError,
    },
    /// The action does not run on Linux.
    #[error("{0} is a Windows-only action and does not run on Linux")]
    WindowsOnly(Action),
}

impl ActionError {
    pub fn target(what: impl Into<String>) -> impl FnOnce(MachineError) -> ActionError {
        let what = what.into();
        move |source| ActionError::Target { what, source }
    }

    /// A hint for the user, where the cause has one (e.g. rebooting needs a VM target).
    pub fn hint(&self) -> Option<&str> {
        match self {
            ActionError::Target { source, .. } => source.hint(),
            _ => None,
        }
    }

    /// Outputs produced before the failure (a failing script's stdout).
    pub fn outputs(&self) -> Outputs {
        match self {
            ActionError::Command { outputs, .. } => outputs.clone(),
            _ => Vec::new(),
        }
    }
}

/// Everything an action needs besides its inputs.
pub struct ActionContext<'a> {
    pub target: &'a dyn Machine,
    /// Receives the output of commands the step runs (console log, terminal).
    pub sink: &'a dyn OutputSink,
    /// Relative paths are resolved against it; commands run in it.
    pub working_directory: &'a Path,
    /// Environment for scripts and binaries (`WORKING_DIRECTORY`, …).
    pub env: &'a [(String, String)],
    /// When the step's time is up; commands get the time that is left.
    pub deadline: Option<tokio::time::Instant>,
    pub transfer: &'a Transfer,
}

impl ActionContext<'_> {
    /// `path` made absolute against the working directory.
    pub fn path(&self, path: &str) -> PathBuf {
        self.working_directory.join(path)
    }

    fn remaining(&self) -> Option<std::time::Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
    }

    /// Run a helper command quietly; a failure carries the command's stderr.
    async fn run_quiet(&self, argv: &[String]) -> Result<(), ActionError> {
        let capture = Capture::default();
        let mut request = ExecRequest::argv(argv.iter().cloned());
        request.cwd = Some(self.working_directory.to_path_buf());
        request.timeout = self.remaining();
        let outcome = self
            .target
            .exec(&request, &capture)
            .await
            .map_err(ActionError::target(format!(
                "could not run `{}`",
                argv.join(" ")
            )))?;
        if outcome.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&capture.stderr())
            .trim()
            .to_string();
        let shown = shell_words(argv);
        Err(ActionError::Helper {
            command: shown,
            status: outcome.status,
            stderr,
        })
    }
}

/// An argv as a person would type it, for messages.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Typed access to one input map (after templating).
pub(crate) struct Inputs<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Inputs<'a> {
    fn of(value: &'a Value) -> Result<Self, ActionError> {
        match value {
            Value::Object(map) => Ok(Self { map }),
            _ => Err(ActionError::Input("expected a map of inputs".into())),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ActionError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(_) => Err(ActionError::Input(format!("`{key}` must be a string"))),
        }
    }

    fn required(&self, key: &str) -> Result<String, ActionError> {
        match self.string(key)? {
            Some(s) if !s.is_empty() => Ok(s),
            Some(_) => Err(ActionError::Input(format!("`{key}` is empty"))),
            None => Err(ActionError::Input(format!("`{key}` is required"))),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, ActionError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
            Some(_) => Err(ActionError::Input(format!("`{key}` must be true or false"))),
        }
    }

    fn int(&self, key: &str, default: i64) -> Result<i64, ActionError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| ActionError::Input(format!("`{key}` must be an integer"))),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map_err(|_| ActionError::Input(format!("`{key}` must be an integer, not `{s}`"))),
            Some(_) => Err(ActionError::Input(format!("`{key}` must be an integer"))),
        }
    }

    fn list(&self, key: &str) -> Result<Vec<String>, ActionError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    Value::Bool(b) => Ok(b.to_string()),
                    _ => Err(ActionError::Input(format!(
                        "`{key}` must be a list of strings"
                    ))),
                })
                .collect(),
            Some(_) => Err(ActionError::Input(format!("`{key}` must be a list"))),
        }
    }

    /// A permission mode written as octal text (`0644`, `755`).
    fn mode(&self, key: &str) -> Result<Option<u32>, ActionError> {
        let Some(text) = self.string(key)? else {
            return Ok(None);
        };
        parse_mode(&text).map(Some).ok_or_else(|| {
            ActionError::Input(format!(
                "`{key}: {text}` is not a permission mode; write octal digits such as `0644`"
            ))
        })
    }
}

/// Octal mode text → bits. AWSTOE documents write `0777` and `766` unquoted; both are octal.
pub fn parse_mode(text: &str) -> Option<u32> {
    let t = text.trim();
    if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o7777)
}

/// The items of list-style inputs (a single map is accepted as one item).
fn items(inputs: &Value) -> Result<Vec<&Value>, ActionError> {
    match inputs {
        Value::Array(items) => Ok(items.iter().collect()),
        Value::Object(_) => Ok(vec![inputs]),
        _ => Err(ActionError::Input("expected a list of input maps".into())),
    }
}

/// Run each item of list-style inputs in order; the first failure stops the step and names
/// the item when there are several.
async fn each_item<'a, F, Fut>(inputs: &'a Value, mut run: F) -> Result<Outputs, ActionError>
where
    F: FnMut(Inputs<'a>) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Map<String, Value>>, ActionError>>,
{
    let items = items(inputs)?;
    let several = items.len() > 1;
    let mut outputs = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let result = match Inputs::of(item) {
            Ok(inputs) => run(inputs).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(out)) => outputs.push(out),
            Ok(None) => {}
            Err(e) if several => {
                return Err(match e {
                    ActionError::Input(m) => ActionError::Input(format!("inputs[{i}]: {m}")),
                    e @ (ActionError::Command { .. }
                    | ActionError::Target { .. }
                    | ActionError::WindowsOnly(_)) => e,
                    e => ActionError::Item {
                        index: i,
                        source: Box::new(e),
                    },
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(outputs)
}

/// Run one action with its expanded inputs. `ExecuteDocument` is not handled here (the
/// executor runs nested documents).
pub async fn run(
    action: Action,
    inputs: &Value,
    cx: &ActionContext<'_>,
) -> Result<Completed, ActionError> {
    if action.windows_only() {
        return Err(ActionError::WindowsOnly(action));
    }
    let outputs = match action {
        Action::ExecuteBash => return exec::execute_bash(inputs, cx).await,
        Action::ExecuteBinary => return exec::execute_binary(inputs, cx).await,
        Action::Reboot => return system::reboot(inputs).await,
        Action::UpdateOS => {
            system::update_os(inputs, cx).await?;
            Vec::new()
        }
        Action::Assert => {
            let expr = condition::expr_from_json(inputs).map_err(ActionError::Input)?;
            let no_templates = |s: &str| Ok(s.to_string());
            let ecx = EvalContext {
                target: cx.target,
                working_directory: cx.working_directory,
                expand: &no_templates,
            };
            let holds = condition::evaluate(&expr, &ecx)
                .await
                .map_err(ActionError::Condition)?;
            if !holds {
                return Err(ActionError::AssertionFalse(
                    serde_json::to_string(inputs).unwrap_or_default(),
                ));
            }
            Vec::new()
        }
        Action::WebDownload => transfer::web_download(inputs, cx).await?,
        Action::S3Download => transfer::s3_download(inputs, cx).await?,
        Action::S3Upload => transfer::s3_upload(inputs, cx).await?,
        Action::CreateFile => files::create_file(inputs, cx).await?,
        Action::CreateFolder => files::create_folder(inputs, cx).await?,
        Action::CreateSymlink => files::create_symlink(inputs, cx).await?,
        Action::AppendFile => files::append_file(inputs, cx).await?,
        Action::CopyFile => files::copy_or_move(inputs, cx, files::Transfer::CopyFile).await?,
        Action::CopyFolder => files::copy_or_move(inputs, cx, files::Transfer::CopyFolder).await?,
        Action::MoveFile => files::copy_or_move(inputs, cx, files::Transfer::MoveFile).await?,
        Action::MoveFolder => files::copy_or_move(inputs, cx, files::Transfer::MoveFolder).await?,
        Action::DeleteFile => files::delete_file(inputs, cx).await?,
        Action::DeleteFolder => files::delete_folder(inputs, cx).await?,
        Action::ListFiles => files::list_files(inputs, cx).await?,
        Action::ReadFile => files::read_file(inputs, cx).await?,
        Action::SetFileOwner => files::set_owner(inputs, cx, false).await?,
        Action::SetFolderOwner => files::set_owner(inputs, cx, true).await?,
        Action::SetFilePermissions => files::set_permissions(inputs, cx, false).await?,
        Action::SetFolderPermissions => files::set_permissions(inputs, cx, true).await?,
        Action::ExecuteDocument => {
            return Err(ActionError::NotHere);
        }
        Action::ExecutePowerShell
        | Action::InstallMSI
        | Action::UninstallMSI
        | Action::SetRegistry
        | Action::SetFileEncoding => return Err(ActionError::WindowsOnly(action)),
    };
    Ok(Completed::done(outputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_text() {
        assert_eq!(parse_mode("0777"), Some(0o777));
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("4755"), Some(0o4755));
        assert_eq!(parse_mode("789"), None);
        assert_eq!(parse_mode(""), None);
        assert_eq!(parse_mode("u+x"), None);
    }

    #[test]
    fn argv_is_shown_quoted() {
        let argv = ["rm".to_string(), "-f".into(), "a b".into(), "it's".into()];
        assert_eq!(shell_words(&argv), r"rm -f 'a b' 'it'\''s'");
    }
}
