//! The QEMU process: spawned in its own process group with a parent-death signal, watched for
//! exit at all times, and stopped by SIGKILL to its whole group as the last resort.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("`{program}` was not found on PATH")]
    NotFound { program: String },
    /// The io error names the file.
    #[error("could not open the log file")]
    Log(#[source] std::io::Error),
    #[error("could not start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} out of range")]
    PidRange { pid: u32 },
    #[error("could not kill process group {pid}")]
    Kill {
        pid: u32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("processes {left:?} of group {pid} are still running after SIGKILL")]
    StillRunning { pid: u32, left: Vec<u32> },
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Reaped by someone else (our last-resort kill); the status is unknown.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with status {c}"),
            Exit::Signal(s) => write!(f, "was killed by signal {s}"),
            Exit::Unknown => write!(f, "exited"),
        }
    }
}

/// Find `program` on `PATH` (or take it as is when it contains a slash).
pub fn find_program(program: &str) -> Result<PathBuf, ProcessError> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| ProcessError::NotFound {
            program: program.to_string(),
        })
}

/// A running child in its own process group. Dropping it does not kill it: the owner
/// registers [`kill_group`] as an undo right after [`spawn`] returns.
#[derive(Debug)]
pub struct Child {
    pid: Pid,
    exit: watch::Receiver<Option<Exit>>,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// `Some` once the process has exited.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// A receiver that changes to `Some` when the process exits.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// Wait for the exit, at most `timeout`.
    pub async fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        let mut rx = self.exit.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(exit)) => *exit,
            _ => self.exit(),
        }
    }
}

/// Start `program` with `args` in a new process group, stdin and stdout from/to nowhere and
/// stderr appended to `stderr_log`. The child gets SIGKILL when the thread that spawned it
/// dies (so spawn from a long-lived thread: a tokio worker or the main thread, never a
/// `spawn_blocking` thread that may retire).
pub fn spawn(program: &Path, args: &[String], stderr_log: &Path) -> Result<Child, ProcessError> {
    spawn_with_death_signal(program, args, stderr_log, Signal::SIGKILL)
}

/// A command for `program` that runs in its own process group and gets `death_signal` when
/// the thread that spawns it dies (spawn from a long-lived thread, as for [`spawn`]). Its stdio
/// is the caller's to set. QEMU's launch uses it; so does the container engine for buildah.
#[allow(unsafe_code)] // `pre_exec`: the parent-death signal must be set in the forked child
pub fn command_dying_with_parent(program: &Path, death_signal: Signal) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    // Its own group: a Ctrl-C in the terminal reaches builder, which stops the child in order,
    // instead of killing it under builder; and teardown can kill the whole group.
    cmd.process_group(0).kill_on_drop(false);
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(death_signal).map_err(std::io::Error::from)?;
            // The parent may have died between fork and prctl: then no signal would ever come.
            if nix::unistd::getppid().as_raw().unsigned_abs() != parent {
                return Err(std::io::Error::other("builder exited while starting it"));
            }
            Ok(())
        });
    }
    cmd
}

fn spawn_with_death_signal(
    program: &Path,
    args: &[String],
    stderr_log: &Path,
    death_signal: Signal,
) -> Result<Child, ProcessError> {
    let log = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_log)
        .map_err(ProcessError::Log)?;
    let mut cmd = command_dying_with_parent(program, death_signal);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log.into_file()));
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    #[expect(
        clippy::expect_used,
        reason = "a child just spawned and not yet waited for has a pid, and Linux pids fit in i32"
    )]
    let pid = Pid::from_raw(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .expect("a freshly spawned child has a pid"),
    );
    let (tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let status = child.wait().await;
        let exit = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(sig)) => Exit::Signal(sig),
                    _ => Exit::Unknown,
                }
            }
            Err(_) => Exit::Unknown,
        };
        let _ = tx.send(Some(exit));
    });
    Ok(Child { pid, exit })
}

/// Start a watcher that removes `dir` if builder dies without unwinding (SIGKILL, a crash):
/// a shell whose parent-death signal is SIGTERM, on which it runs `rm -rf`.
/// The normal path kills the watcher's group with [`kill_group`] first (SIGKILL, no trap), so
/// it never races the undo list or keep-on-failure.
pub fn spawn_dir_watcher(dir: &Path) -> Result<Child, ProcessError> {
    let sh = find_program("sh")?;
    // `sleep & wait`: a trapped signal interrupts `wait` at once, never a foreground sleep.
    let script =
        r#"trap 'kill $! 2>/dev/null; rm -rf -- "$0"; exit 0' TERM; sleep 2147483647 & wait"#;
    spawn_with_death_signal(
        &sh,
        &[
            "-c".into(),
            script.into(),
            dir.to_string_lossy().into_owned(),
        ],
        Path::new("/dev/null"),
        Signal::SIGTERM,
    )
}

/// SIGKILL the child's whole process group and wait (up to 5 s) until no member is alive.
/// Synchronous, so it can run from an undo during unwinding or `Drop`. Returns an error
/// naming what is left.
pub fn kill_group(pid: u32, exit: &watch::Receiver<Option<Exit>>) -> Result<(), ProcessError> {
    let raw = i32::try_from(pid).map_err(|_| ProcessError::PidRange { pid })?;
    let group = Pid::from_raw(raw);
    // An exited leader with no live member left: nothing to do, and its pid may belong to
    // someone else by now, so no signal is sent.
    if exit.borrow().is_some() && live_group_members(pid).is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut leader_gone = exit.borrow().is_some();
    loop {
        match killpg(group, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => return Err(ProcessError::Kill { pid, source }),
        }
        if !leader_gone {
            // Reap it ourselves: the runtime's reaper may not get to run while we block here.
            leader_gone = exit.borrow().is_some()
                || !matches!(
                    waitpid(group, Some(WaitPidFlag::WNOHANG)),
                    Ok(WaitStatus::StillAlive)
                );
        }
        let left = live_group_members(pid);
        if leader_gone && left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ProcessError::StillRunning { pid, left });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live (not zombie) processes whose process group is `pgid`, from `/proc`.
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = fs_err::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = fs_err::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let group = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
            group == Some(pgid) && !matches!(state, Some("Z" | "X"))
        })
        .collect()
}

/// The last `lines` lines of a text file (lossy UTF-8), or nothing if it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = fs_err::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    // Serial consoles emit \r\n and escape sequences; keep it readable.
    let all: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_child_is_watched_and_killed_with_its_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("stderr.log");
        let sh = find_program("sh").expect("sh on PATH");
        // The shell starts a grandchild in the same group: kill_group must take both.
        let child = spawn(
            &sh,
            &["-c".into(), "sleep 300 & echo started >&2; wait".into()],
            &log,
        )
        .expect("spawn");
        let pid = child.pid();
        assert_eq!(child.exit(), None);
        // The child leads its own group.
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid as i32))).expect("pgid");
        assert_eq!(pgid.as_raw() as u32, pid);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(live_group_members(pid).len(), 2, "sh and sleep");
        kill_group(pid, &child.exit_watch()).expect("killed");
        // Nothing of the group is left alive (an orphaned grandchild may linger as a zombie
        // until init reaps it, which is harmless).
        assert_eq!(live_group_members(pid), Vec::<u32>::new());
        assert!(
            fs_err::read_to_string(&log)
                .expect("log")
                .contains("started")
        );
    }

    #[tokio::test]
    async fn exit_status_is_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sh = find_program("sh").expect("sh on PATH");
        let child = spawn(
            &sh,
            &["-c".into(), "exit 7".into()],
            &dir.path().join("e.log"),
        )
        .expect("spawn");
        assert_eq!(
            child.wait_timeout(Duration::from_secs(10)).await,
            Some(Exit::Code(7))
        );
        // Killing an exited child is a no-op, never a signal to a recycled pid.
        kill_group(child.pid(), &child.exit_watch()).expect("no-op");
    }

    #[test]
    fn dir_watcher_removes_the_folder_when_its_parent_dies_and_not_when_killed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kept = dir.path().join("kept");
        let doomed = dir.path().join("doomed");
        fs_err::create_dir(&kept).expect("mkdir");
        fs_err::create_dir(&doomed).expect("mkdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The normal path: the undo list kills the watcher; the folder stays for the undo list.
        rt.block_on(async {
            let w = spawn_dir_watcher(&kept).expect("watcher");
            tokio::time::sleep(Duration::from_millis(100)).await;
            kill_group(w.pid(), &w.exit_watch()).expect("killed");
        });
        assert!(kept.exists());
        // The parent (here a thread standing in for builder) dies without unwinding.
        let d = doomed.clone();
        let pid = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let w = spawn_dir_watcher(&d).expect("watcher");
                tokio::time::sleep(Duration::from_millis(100)).await;
                w.pid()
            })
        })
        .join()
        .expect("thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        while doomed.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!doomed.exists(), "the watcher removed the folder");
        while !live_group_members(pid).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(live_group_members(pid), Vec::<u32>::new());
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("c.log");
        fs_err::write(&p, "a\r\nb\r\n\r\nc\r\nd\r\n").expect("write");
        assert_eq!(tail(&p, 2), "c\nd");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }
}
