//! Where steps run. One trait, [`Machine`], with an implementation per place: this machine
//! ([`host`]), a guest through our agent, a guest through qemu-guest-agent.
//!
//! The component executor and every action are written against this trait only, so the same
//! document runs unchanged on each target. A target knows primitives (exec, files, reboot),
//! never actions, loops or templates: those live in the executor on the host.

pub mod agent;
pub mod host;
pub mod qga;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// Run `argv[0]` (looked up on `PATH` when it has no slash) with the rest as arguments.
    Argv(Vec<String>),
    /// Write `body` to a script file on the target and run it with `interpreter` (e.g. `bash`).
    Script { interpreter: String, body: String },
}

/// One command to run on a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub program: Program,
    /// Extra environment variables, added to the target's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the target's default (usually `/`) when `None`.
    pub cwd: Option<PathBuf>,
    /// Run as this user (name or uid); the target's own user (root in a guest) when `None`.
    pub user: Option<String>,
    /// Kill the whole process tree and report [`ExitStatus::TimedOut`] after this long.
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            program: Program::Argv(argv.into_iter().map(Into::into).collect()),
            env: Vec::new(),
            cwd: None,
            user: None,
            timeout: None,
        }
    }

    pub fn bash(body: impl Into<String>) -> Self {
        Self {
            program: Program::Script {
                interpreter: "bash".into(),
                body: body.into(),
            },
            env: Vec::new(),
            cwd: None,
            user: None,
            timeout: None,
        }
    }

    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Receives a command's output as it is produced. Must not block: it is called from the
/// target's reader tasks.
pub trait OutputSink: Send + Sync {
    fn output(&self, stream: OutputStream, data: &[u8]);
}

/// A sink that drops everything, for commands whose output nobody needs.
pub struct Discard;

impl OutputSink for Discard {
    fn output(&self, _: OutputStream, _: &[u8]) {}
}

/// A sink that keeps everything in memory, for short commands whose output is parsed.
#[derive(Default)]
pub struct Capture {
    stdout: std::sync::Mutex<Vec<u8>>,
    stderr: std::sync::Mutex<Vec<u8>>,
}

impl Capture {
    pub fn stdout(&self) -> Vec<u8> {
        self.stdout.lock().map(|b| b.clone()).unwrap_or_default()
    }
    pub fn stderr(&self) -> Vec<u8> {
        self.stderr.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl OutputSink for Capture {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        let buf = match stream {
            OutputStream::Stdout => &self.stdout,
            OutputStream::Stderr => &self.stderr,
        };
        if let Ok(mut b) = buf.lock() {
            b.extend_from_slice(data);
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    /// Killed by this signal number (not by us).
    Signaled(i32),
    /// The request's timeout passed; the whole process tree was killed.
    TimedOut,
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signaled(sig) => write!(f, "was killed by signal {sig}"),
            ExitStatus::TimedOut => write!(f, "timed out"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOutcome {
    pub status: ExitStatus,
    pub duration: Duration,
}

/// Content for [`Machine::put_file`].
#[derive(Debug, Clone)]
pub enum FileSource {
    Bytes(Vec<u8>),
    /// A file on the host, streamed.
    Path(PathBuf),
}

/// Options for [`Machine::put_file`]. `None` keeps the target's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Permission bits, e.g. `0o644`.
    pub mode: Option<u32>,
    pub owner: Option<String>,
    pub group: Option<String>,
    /// Create missing parent folders.
    pub create_parents: bool,
    /// Append instead of replacing.
    pub append: bool,
}

/// What a transfer delivered, checked on both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub size: u64,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
}

/// `12 bytes with sha256 ab…`, for messages.
impl std::fmt::Display for FileInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes with sha256 {}", self.size, self.sha256)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

/// Facts about the machine a target runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineInfo {
    /// `ID` from os-release, e.g. `debian`.
    pub os_id: String,
    /// `PRETTY_NAME` from os-release.
    pub os_pretty: String,
    pub arch: String,
    /// Changes on every boot (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Something other than a file call failed (a socket, a child process, a user lookup):
    /// `context` says what was being done.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A file call on this machine failed; fs-err's error names the file and the operation.
    #[error(transparent)]
    File(#[from] std::io::Error),
    /// The target cannot do this at all (e.g. reboot this machine).
    #[error("{what} is not possible on {target}")]
    Unsupported {
        what: String,
        target: String,
        hint: String,
    },
    /// The connection to the target was lost.
    #[error("lost the connection to {target}: {detail}")]
    Disconnected { target: String, detail: String },
    /// The other end said something we did not expect.
    #[error("protocol error talking to {target}: {detail}")]
    Protocol { target: String, detail: String },
    /// The guest refused a request: `message` is the agent's own reply, which names what it
    /// was doing and why it failed.
    #[error("{message}")]
    Refused { message: String },
    /// A request through qemu-guest-agent, or a helper command it ran in the guest, failed:
    /// `message` is the guest's answer (QGA's `desc` or the command's stderr).
    #[error("{op}: {message}")]
    Remote { op: String, message: String },
    /// A command we ran in the guest for ourselves (not a step's) failed.
    #[error("`{command}` {status}: {stderr}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    /// A request with nothing to run.
    #[error("the command is empty")]
    EmptyCommand,
    #[error("user `{0}` does not exist on this machine")]
    NoSuchUser(String),
    #[error("group `{0}` does not exist on this machine")]
    NoSuchGroup(String),
    #[error("`{program}` exited before its pid could be read")]
    NoPid { program: String },
    #[error("pid {0} is out of range")]
    PidOutOfRange(u32),
    /// A guest path that the protocol (`carrier`) cannot carry.
    #[error("the guest path {} is not UTF-8, which {carrier} cannot carry", path.display())]
    NonUtf8Path {
        path: PathBuf,
        carrier: &'static str,
    },
    #[error("`{0}` names no file")]
    NoFileName(String),
    /// A blocking file operation's task ended without finishing (panic or shutdown).
    #[error("a file operation was interrupted")]
    Interrupted(#[source] tokio::task::JoinError),
    /// A request could not be encoded for the agent.
    #[error("cannot send `{message}` to the agent")]
    Encode {
        message: &'static str,
        #[source]
        source: crate::agent::protocol::ProtocolError,
    },
    #[error("the agent in {target} did not say hello within {secs}s")]
    NoHello { target: String, secs: f32 },
    #[error("qemu-guest-agent in {target} did not answer `{command}` within {secs}s")]
    NoAnswer {
        target: String,
        command: String,
        secs: u64,
    },
    #[error("qemu-guest-agent in {target} did not answer")]
    Unreachable { target: String },
    /// The guest did not come back after a reboot; `why` is the last problem seen.
    #[error("{target} did not come back within {secs}s after the reboot ({why})")]
    NotBack {
        target: String,
        secs: u64,
        why: String,
    },
    /// The guest is up but not ready for steps; `report` is the readiness check's output.
    #[error("{what}\n{report}")]
    NotReady { what: String, report: String },
    /// cloud-init did not finish well; `log_tail` is the end of its output log in the guest.
    #[error("{what}\n{report}\nlast lines of /var/log/cloud-init-output.log:\n{log_tail}")]
    CloudInit {
        what: String,
        report: String,
        log_tail: String,
    },
    // The digests are boxed to keep the error small: it travels in every `Result` of a step.
    /// A file written to the guest is not what was sent.
    #[error("{path} on {target}: the agent wrote {written}, we sent {sent}")]
    PutMismatch {
        path: String,
        target: String,
        sent: Box<FileInfo>,
        written: Box<FileInfo>,
    },
    /// A file read from the guest is not what the guest has; nothing was written.
    #[error("{path} from {target}: received {received}, {reported}; nothing was written")]
    GetMismatch {
        path: String,
        target: String,
        received: Box<FileInfo>,
        /// What the guest says the file is.
        reported: Box<str>,
    },
    /// The build VM was started without the builder agent.
    #[error("the build VM has no builder agent to sync with")]
    NoAgent,
    #[error("cancelled")]
    Cancelled,
}

impl MachineError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        MachineError::Io {
            context: context.into(),
            source,
        }
    }

    /// A hint for the user, where the error has one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            MachineError::Unsupported { hint, .. } if !hint.is_empty() => Some(hint),
            _ => None,
        }
    }
}

/// How long a guest may take to come back from a reboot.
const REBOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A guest path as text, for a protocol (`carrier`) that carries only UTF-8.
fn guest_path(path: &Path, carrier: &'static str) -> Result<String, MachineError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| MachineError::NonUtf8Path {
            path: path.to_path_buf(),
            carrier,
        })
}

/// Reads into `buf` until it is full or `file` ends: the number of bytes read.
async fn read_full(file: &mut fs_err::tokio::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut n = 0;
    while n < buf.len() {
        let k = file.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// A file copied from a guest while it arrives: hidden next to its destination, removed when
/// dropped unless [`rename_to`](LocalTemp::rename_to) moved it into place.
struct LocalTemp {
    path: PathBuf,
    renamed: bool,
}

impl LocalTemp {
    fn next_to(local: &Path) -> LocalTemp {
        let name = local
            .file_name()
            .map_or("download".into(), |n| n.to_string_lossy());
        let dir = (local.parent())
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let id = uuid::Uuid::new_v4().simple();
        LocalTemp {
            path: dir.join(format!(".{name}.builder-tmp-{id}")),
            renamed: false,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn rename_to(mut self, local: &Path) -> Result<(), MachineError> {
        fs_err::rename(&self.path, local)?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for LocalTemp {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs_err::remove_file(&self.path);
        }
    }
}

/// A place where steps run. Dropping a future returned by [`Machine::exec`] must kill the
/// command's whole process tree: that is how the executor cancels.
#[async_trait]
pub trait Machine: Send + Sync {
    /// A short description for messages: "this machine", "vm debian-12 (pid 4242)".
    fn describe(&self) -> String;

    /// os-release, architecture and boot id of the target.
    async fn info(&self) -> Result<MachineInfo, MachineError>;

    /// Run a command, streaming its output to `sink` as it comes.
    async fn exec(
        &self,
        request: &ExecRequest,
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, MachineError>;

    /// Write a file on the target. The content's sha256 is checked on the target's side.
    async fn put_file(
        &self,
        remote: &Path,
        content: FileSource,
        options: &PutOptions,
    ) -> Result<FileInfo, MachineError>;

    /// Copy a file from the target to `local` on the host (written under a temporary name and
    /// renamed when its sha256 matched).
    async fn get_file(&self, remote: &Path, local: &Path) -> Result<FileInfo, MachineError>;

    /// `None` when nothing exists at `remote`. Does not follow a final symlink.
    async fn stat(&self, remote: &Path) -> Result<Option<FileStat>, MachineError>;

    /// The entries of a folder, sorted by name, without `.` and `..`.
    async fn list(&self, remote: &Path) -> Result<Vec<DirEntry>, MachineError>;

    /// Reboot the target and return once it is back (a new boot id). Targets that cannot
    /// reboot return [`MachineError::Unsupported`] with a hint.
    async fn reboot(&self) -> Result<(), MachineError>;
}
