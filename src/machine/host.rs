//! This machine as a step target: what `builder component run` uses by default.
//!
//! Every command runs in its own process group, so the whole tree it starts can be stopped at
//! once: on timeout (SIGTERM to the group, then SIGKILL after a grace period), when the exec
//! future is dropped (SIGKILL, by a guard), and when the command's main process has exited
//! (stragglers it left in its group are killed, so nothing outlives a step; a daemon that
//! detached itself with `setsid` has left the group and is not touched).
//! Script programs are written to a temporary file that is removed afterwards.

use fs_err::os::unix::fs::OpenOptionsExt;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{
    DirEntry, ExecOutcome, ExecRequest, ExitStatus, FileInfo, FileKind, FileSource, FileStat,
    Machine, MachineError, MachineInfo, OutputSink, OutputStream, Program, PutOptions,
};

/// How long a timed-out command's process group gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// After the main process exited (and its group was killed), how long to wait for the output
/// pipes to close: a detached grandchild may hold them open forever.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The machine builder runs on.
#[derive(Debug, Clone, Default)]
pub struct HostMachine {
    /// Where script files are written; the system temporary folder when `None`.
    scratch: Option<PathBuf>,
    /// Set for every command, under a request's own environment.
    env: Vec<(String, String)>,
}

impl HostMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write script files under `dir` instead of the system temporary folder.
    pub fn with_scratch_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            scratch: Some(dir.into()),
            env: Vec::new(),
        }
    }

    /// Sets `key` for every command this machine runs (a request's own `env` wins).
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Kills a process group when dropped, unless disarmed: dropping an exec future (cancellation)
/// must not leave the command running.
struct GroupGuard {
    pgid: Pid,
    armed: bool,
}

impl GroupGuard {
    fn signal(&self, signal: Signal) {
        // ESRCH (the group is already empty) is the normal case after a clean exit.
        let _ = killpg(self.pgid, signal);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Read from an optional pipe; a closed pipe never becomes ready, so `select!` can keep
/// polling the other branches.
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn resolve_user(user: &str) -> Result<(u32, u32), MachineError> {
    let found = if let Ok(uid) = user.parse::<u32>() {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
    } else {
        nix::unistd::User::from_name(user)
    };
    match found {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(MachineError::NoSuchUser(user.to_owned())),
        Err(e) => Err(MachineError::io(
            format!("could not look up user `{user}`"),
            e.into(),
        )),
    }
}

fn resolve_group(group: &str) -> Result<u32, MachineError> {
    let found = if let Ok(gid) = group.parse::<u32>() {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
    } else {
        nix::unistd::Group::from_name(group)
    };
    match found {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(MachineError::NoSuchGroup(group.to_owned())),
        Err(e) => Err(MachineError::io(
            format!("could not look up group `{group}`"),
            e.into(),
        )),
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> MachineError {
    let context = context.into();
    move |e| MachineError::io(context, e)
}

fn file_stat(meta: &std::fs::Metadata) -> FileStat {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MachineError> + Send + 'static,
) -> Result<T, MachineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(MachineError::Interrupted)?
}

/// Copy `reader` into `writer`, returning the size and sha256 of what went through.
fn copy_hashing(reader: &mut dyn Read, writer: &mut dyn Write) -> std::io::Result<FileInfo> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok(FileInfo {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.builder-{}", uuid::Uuid::new_v4().simple()))
}

fn put_file_blocking(
    remote: &Path,
    content: FileSource,
    options: &PutOptions,
) -> Result<FileInfo, MachineError> {
    if options.create_parents
        && let Some(parent) = remote.parent()
        && !parent.as_os_str().is_empty()
    {
        fs_err::create_dir_all(parent)?;
    }
    let mut reader: Box<dyn Read> = match content {
        FileSource::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
        FileSource::Path(path) => Box::new(fs_err::File::open(&path)?),
    };
    let owner = options.owner.as_deref().map(resolve_user).transpose()?;
    let group = options.group.as_deref().map(resolve_group).transpose()?;
    let finish = |path: &Path| -> Result<(), MachineError> {
        if let Some(mode) = options.mode {
            fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        if owner.is_some() || group.is_some() {
            let uid = owner.map(|(uid, _)| nix::unistd::Uid::from_raw(uid));
            let gid = group.map(nix::unistd::Gid::from_raw);
            nix::unistd::chown(path, uid, gid).map_err(|e| {
                MachineError::io(
                    format!("could not change the owner of {}", remote.display()),
                    e.into(),
                )
            })?;
        }
        Ok(())
    };
    if options.append {
        let mut file = fs_err::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o666)
            .open(remote)?;
        let info = copy_hashing(&mut reader, &mut file)?;
        finish(remote)?;
        return Ok(info);
    }
    // Written under a temporary name and renamed, so a reader never sees half a file.
    let temp = temp_sibling(remote);
    let result = (|| {
        let mut file = fs_err::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&temp)?;
        let info = copy_hashing(&mut reader, &mut file)?;
        file.sync_all()?;
        drop(file);
        finish(&temp)?;
        fs_err::rename(&temp, remote)?;
        Ok(info)
    })();
    if result.is_err() {
        let _ = fs_err::remove_file(&temp);
    }
    result
}

fn get_file_blocking(remote: &Path, local: &Path) -> Result<FileInfo, MachineError> {
    let mut source = fs_err::File::open(remote)?;
    let temp = temp_sibling(local);
    let result = (|| {
        let mut file = fs_err::File::create(&temp)?;
        let info = copy_hashing(&mut source, &mut file)?;
        fs_err::rename(&temp, local)?;
        Ok(info)
    })();
    if result.is_err() {
        let _ = fs_err::remove_file(&temp);
    }
    result
}

fn os_release_value(text: &str, key: &str) -> String {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .unwrap_or_default()
}

#[async_trait]
impl Machine for HostMachine {
    fn describe(&self) -> String {
        "this machine".to_string()
    }

    async fn info(&self) -> Result<MachineInfo, MachineError> {
        let os_release = fs_err::tokio::read_to_string("/etc/os-release")
            .await
            .unwrap_or_default();
        let boot_id = fs_err::tokio::read_to_string("/proc/sys/kernel/random/boot_id").await?;
        Ok(MachineInfo {
            os_id: os_release_value(&os_release, "ID"),
            os_pretty: os_release_value(&os_release, "PRETTY_NAME"),
            arch: std::env::consts::ARCH.to_string(),
            boot_id: boot_id.trim().to_string(),
        })
    }

    async fn exec(
        &self,
        request: &ExecRequest,
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, MachineError> {
        let started = Instant::now();
        // Kept alive until the command has finished; removed on drop.
        let mut _script = None;
        let (program, args): (String, Vec<String>) = match &request.program {
            Program::Argv(argv) => match argv.split_first() {
                Some((first, rest)) => (first.clone(), rest.to_vec()),
                None => return Err(MachineError::EmptyCommand),
            },
            Program::Script { interpreter, body } => {
                let dir = self.scratch.clone().unwrap_or_else(std::env::temp_dir);
                let mut file = tempfile::Builder::new()
                    .prefix("builder-script-")
                    .suffix(".sh")
                    .tempfile_in(&dir)
                    // tempfile's error names the file it tried.
                    .map_err(io_err("could not create a script file"))?;
                file.write_all(body.as_bytes())
                    .and_then(|()| file.flush())
                    .map_err(io_err("could not write the script file"))?;
                let path = file.into_temp_path();
                let arg = path.to_string_lossy().into_owned();
                _script = Some(path);
                (interpreter.clone(), vec![arg])
            }
        };
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &request.cwd {
            command.current_dir(cwd);
        }
        if let Some(user) = &request.user {
            let (uid, gid) = resolve_user(user)?;
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(|e| {
            let what = match &request.cwd {
                Some(cwd) if !cwd.is_dir() => {
                    format!(
                        "could not start `{program}`: working directory {} does not exist",
                        cwd.display()
                    )
                }
                _ => format!("could not start `{program}`"),
            };
            MachineError::io(what, e)
        })?;
        let Some(pid) = child.id() else {
            return Err(MachineError::NoPid { program });
        };
        let pid = i32::try_from(pid).map_err(|_| MachineError::PidOutOfRange(pid))?;
        let mut group = GroupGuard {
            pgid: Pid::from_raw(pid),
            armed: true,
        };
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let deadline = request.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut timed_out = false;
        let mut status: Option<std::process::ExitStatus> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            if status.is_some() && stdout.is_none() && stderr.is_none() {
                break;
            }
            tokio::select! {
                r = read_some(&mut stdout, &mut out_buf) => match r {
                    Ok(n) if n > 0 => sink.output(OutputStream::Stdout, &out_buf[..n]),
                    _ => stdout = None,
                },
                r = read_some(&mut stderr, &mut err_buf) => match r {
                    Ok(n) if n > 0 => sink.output(OutputStream::Stderr, &err_buf[..n]),
                    _ => stderr = None,
                },
                s = child.wait(), if status.is_none() => {
                    let s = s.map_err(io_err(format!("could not wait for `{program}`")))?;
                    status = Some(s);
                    // Stragglers left in the group (background jobs) go with the step.
                    group.signal(Signal::SIGKILL);
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                },
                () = sleep_until_opt(deadline), if status.is_none() && !timed_out => {
                    timed_out = true;
                    group.signal(Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + TERM_GRACE);
                },
                () = sleep_until_opt(kill_at), if status.is_none() && kill_at.is_some() => {
                    group.signal(Signal::SIGKILL);
                    kill_at = None;
                },
                () = sleep_until_opt(drain_until), if drain_until.is_some() => break,
            }
        }
        group.armed = false;
        #[expect(
            clippy::expect_used,
            reason = "the select loop breaks only after the child's status was stored"
        )]
        let status = status.expect("the loop only ends after the child was waited for");
        let status = if timed_out {
            ExitStatus::TimedOut
        } else if let Some(code) = status.code() {
            ExitStatus::Exited(code)
        } else {
            ExitStatus::Signaled(status.signal().unwrap_or(0))
        };
        Ok(ExecOutcome {
            status,
            duration: started.elapsed(),
        })
    }

    async fn put_file(
        &self,
        remote: &Path,
        content: FileSource,
        options: &PutOptions,
    ) -> Result<FileInfo, MachineError> {
        let remote = remote.to_path_buf();
        let options = options.clone();
        blocking(move || put_file_blocking(&remote, content, &options)).await
    }

    async fn get_file(&self, remote: &Path, local: &Path) -> Result<FileInfo, MachineError> {
        let remote = remote.to_path_buf();
        let local = local.to_path_buf();
        blocking(move || get_file_blocking(&remote, &local)).await
    }

    async fn stat(&self, remote: &Path) -> Result<Option<FileStat>, MachineError> {
        match fs_err::tokio::symlink_metadata(remote).await {
            Ok(meta) => Ok(Some(file_stat(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self, remote: &Path) -> Result<Vec<DirEntry>, MachineError> {
        let remote = remote.to_path_buf();
        blocking(move || {
            let mut entries = Vec::new();
            for entry in fs_err::read_dir(&remote)? {
                let entry = entry?;
                let meta = match fs_err::symlink_metadata(entry.path()) {
                    Ok(m) => m,
                    // Removed between listing and looking: it is not there any more.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                entries.push(DirEntry {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    stat: file_stat(&meta),
                });
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(entries)
        })
        .await
    }

    async fn reboot(&self) -> Result<(), MachineError> {
        Err(MachineError::Unsupported {
            what: "rebooting".into(),
            target: self.describe(),
            hint: "a reboot needs a VM target: run the document with `--target vm:IMAGE`".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Capture;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a test runtime")
    }

    #[test]
    fn exec_streams_both_streams_and_reports_the_exit_code() {
        rt().block_on(async {
            let target = HostMachine::new();
            let sink = Capture::default();
            let outcome = target
                .exec(&ExecRequest::bash("echo out; echo err >&2; exit 3"), &sink)
                .await
                .expect("bash runs");
            assert_eq!(outcome.status, ExitStatus::Exited(3));
            assert_eq!(sink.stdout(), b"out\n");
            assert_eq!(sink.stderr(), b"err\n");
        });
    }

    #[test]
    fn exec_timeout_kills_the_whole_group() {
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let pidfile = dir.path().join("pid");
            let script = format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display());
            let target = HostMachine::new();
            let outcome = target
                .exec(
                    &ExecRequest::bash(script).with_timeout(Some(Duration::from_millis(300))),
                    &crate::machine::Discard,
                )
                .await
                .expect("bash runs");
            assert_eq!(outcome.status, ExitStatus::TimedOut);
            let pid: i32 = fs_err::read_to_string(&pidfile)
                .expect("pid written")
                .trim()
                .parse()
                .expect("a pid");
            // Gone, or a zombie nobody reaped yet (another test in this process may have made
            // it a child subreaper): either way it no longer runs.
            let running = || {
                fs_err::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| !rest.starts_with('Z'))
                })
            };
            let mut gone = false;
            for _ in 0..100 {
                if !running() {
                    gone = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(gone, "background child {pid} survived the timeout");
        });
    }

    #[test]
    fn put_stat_list_get_round_trip() {
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let target = HostMachine::new();
            let file = dir.path().join("a/b/c.txt");
            let info = target
                .put_file(
                    &file,
                    FileSource::Bytes(b"hello".to_vec()),
                    &PutOptions {
                        mode: Some(0o640),
                        create_parents: true,
                        ..PutOptions::default()
                    },
                )
                .await
                .expect("put");
            assert_eq!(info.size, 5);
            let stat = target.stat(&file).await.expect("stat").expect("exists");
            assert_eq!((stat.kind, stat.mode), (FileKind::File, 0o640));
            let list = target.list(&dir.path().join("a/b")).await.expect("list");
            assert_eq!(list.len(), 1);
            assert_eq!(list[0].name, "c.txt");
            let back = dir.path().join("back");
            let got = target.get_file(&file, &back).await.expect("get");
            assert_eq!(got, info);
            assert_eq!(fs_err::read(&back).expect("read"), b"hello");
            assert!(
                target
                    .stat(&dir.path().join("nope"))
                    .await
                    .expect("stat")
                    .is_none()
            );
        });
    }

    #[test]
    fn reboot_is_unsupported_with_a_hint() {
        rt().block_on(async {
            let err = HostMachine::new()
                .reboot()
                .await
                .expect_err("cannot reboot");
            assert!(err.hint().is_some_and(|h| h.contains("vm:IMAGE")));
        });
    }
}
