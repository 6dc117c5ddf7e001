//! Running commands for the host: each in its own process group (or its own session on a
//! pseudo-terminal), output streamed as it comes, killed as a whole on timeout or request.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::protocol::{self, ExecSpec, ExitKind, Message, OutStream, ProgramSpec};
use crate::{Job, Jobs, Tx, lock, sys};

/// How long to keep reading output after the command exited: a background process that
/// inherited its stdout may hold the pipe open forever, and must not hold the step up.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct ExecHandle {
    pgid: Arc<AtomicI32>,
    killed: Arc<AtomicBool>,
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    pty: Option<Arc<File>>,
}

impl ExecHandle {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        sys::kill_group(self.pgid.load(Ordering::SeqCst), sys::SIGKILL);
    }

    pub fn stdin(&self, data: Vec<u8>) {
        if let Some(s) = &self.stdin {
            let _ = s.send(data);
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) {
        if let Some(m) = &self.pty {
            let _ = sys::set_window_size(m, rows, cols);
        }
    }
}

pub fn start(id: u32, spec: ExecSpec, tx: Tx, jobs: Jobs) {
    if lock(&jobs).contains_key(&id) {
        tx.error(
            id,
            protocol::code::BAD_REQUEST,
            format!("request id {id} is already in use"),
        );
        return;
    }
    let pty = match spec.pty {
        Some((rows, cols)) => match sys::open_pty(rows, cols) {
            Ok((master, slave)) => Some((Arc::new(master), slave)),
            Err(e) => {
                tx.error(
                    id,
                    protocol::code::SPAWN,
                    format!("cannot open a pseudo-terminal: {e}"),
                );
                return;
            }
        },
        None => None,
    };
    let (stdin_tx, stdin_rx) = if spec.stdin || pty.is_some() {
        let (s, r) = mpsc::channel();
        (Some(s), Some(r))
    } else {
        (None, None)
    };
    let handle = ExecHandle {
        pgid: Arc::new(AtomicI32::new(0)),
        killed: Arc::new(AtomicBool::new(false)),
        stdin: stdin_tx,
        pty: pty.as_ref().map(|(m, _)| m.clone()),
    };
    let pgid = handle.pgid.clone();
    let killed = handle.killed.clone();
    lock(&jobs).insert(id, Job::Exec(handle));
    std::thread::spawn(move || {
        run(id, spec, pty, stdin_rx, pgid, killed, &tx);
        lock(&jobs).remove(&id);
    });
}

/// Removes the script file when the exec ends, whichever way.
struct ScriptFile(Option<PathBuf>);

impl Drop for ScriptFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn run(
    id: u32,
    spec: ExecSpec,
    pty: Option<(Arc<File>, File)>,
    stdin_rx: Option<mpsc::Receiver<Vec<u8>>>,
    pgid: Arc<AtomicI32>,
    killed: Arc<AtomicBool>,
    tx: &Tx,
) {
    let started = Instant::now();
    let mut script = ScriptFile(None);
    let (master, slave) = match pty {
        Some((m, s)) => (Some(m), Some(s)),
        None => (None, None),
    };
    let mut child = match spawn(id, &spec, slave, &mut script) {
        Ok(c) => c,
        Err(message) => {
            tx.error(id, protocol::code::SPAWN, message);
            return;
        }
    };
    pgid.store(child.id() as i32, Ordering::SeqCst);
    if killed.load(Ordering::SeqCst) {
        // A Kill arrived while we were starting it.
        sys::kill_group(child.id() as i32, sys::SIGKILL);
    }

    // stdin: fed from the host's Stdin frames; an empty frame closes it.
    if let Some(rx) = stdin_rx {
        let sink: Option<Box<dyn Write + Send>> = match &master {
            Some(m) => m
                .try_clone()
                .ok()
                .map(|f| Box::new(f) as Box<dyn Write + Send>),
            None => child
                .stdin
                .take()
                .map(|s| Box::new(s) as Box<dyn Write + Send>),
        };
        if let Some(mut sink) = sink {
            std::thread::spawn(move || {
                for data in rx {
                    if data.is_empty() || sink.write_all(&data).is_err() {
                        break;
                    }
                    let _ = sink.flush();
                }
            });
        }
    }

    // Output readers; each reports on `done` when its stream ends.
    let finished = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    let mut sources: Vec<(OutStream, Box<dyn Read + Send>)> = Vec::new();
    if let Some(m) = &master {
        if let Ok(f) = m.try_clone() {
            sources.push((OutStream::Stdout, Box::new(f)));
        }
    } else {
        if let Some(o) = child.stdout.take() {
            sources.push((OutStream::Stdout, Box::new(o)));
        }
        if let Some(e) = child.stderr.take() {
            sources.push((OutStream::Stderr, Box::new(e)));
        }
    }
    for (stream, mut src) in sources {
        readers += 1;
        let tx = tx.clone();
        let done = done_tx.clone();
        let finished = finished.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match src.read(&mut buf) {
                    // A pty master reads EIO once every slave fd is closed: that is its EOF.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if finished.load(Ordering::SeqCst) {
                            break;
                        }
                        let msg = Message::Output {
                            stream,
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(id, &msg).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);

    // The timeout watchdog: woken early (by a closed channel) when the command ends.
    let timed_out = Arc::new(AtomicBool::new(false));
    let (exited_tx, exited_rx) = mpsc::channel::<()>();
    if let Some(ms) = spec.timeout_ms {
        let timed_out = timed_out.clone();
        let group = child.id() as i32;
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                exited_rx.recv_timeout(Duration::from_millis(ms))
            {
                timed_out.store(true, Ordering::SeqCst);
                sys::kill_group(group, sys::SIGKILL);
            }
        });
    }

    let status = child.wait();
    drop(exited_tx);
    let deadline = Instant::now() + OUTPUT_GRACE;
    for _ in 0..readers {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    finished.store(true, Ordering::SeqCst);
    drop(master);

    let kind = match status {
        _ if timed_out.load(Ordering::SeqCst) => ExitKind::TimedOut,
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => ExitKind::Code(c),
            (None, Some(sig)) => ExitKind::Signal(sig),
            (None, None) => ExitKind::Code(-1),
        },
        Err(e) => {
            tx.error(
                id,
                protocol::code::IO,
                format!("waiting for the command failed: {e}"),
            );
            return;
        }
    };
    // Gone before the host hears the end, so it never sees a leftover script.
    drop(script);
    let _ = tx.send(
        id,
        &Message::Exited {
            kind,
            duration_ms: started.elapsed().as_millis() as u64,
        },
    );
}

#[allow(unsafe_code)] // `pre_exec`: session, terminal and user are set in the forked child
fn spawn(
    id: u32,
    spec: &ExecSpec,
    pty_slave: Option<File>,
    script: &mut ScriptFile,
) -> Result<Child, String> {
    let user = match &spec.user {
        Some(u) => Some(sys::lookup_user(u).map_err(|e| format!("cannot run as `{u}`: {e}"))?),
        None => None,
    };
    let mut cmd = match &spec.program {
        Some(ProgramSpec::Argv(argv)) => {
            let Some((program, args)) = argv.split_first() else {
                return Err("the command is empty".into());
            };
            let mut c = Command::new(program);
            c.args(args);
            c
        }
        Some(ProgramSpec::Script { interpreter, body }) => {
            let path = write_script(id, body, user.as_ref())?;
            script.0 = Some(path.clone());
            let mut c = Command::new(interpreter);
            c.arg(&path);
            c
        }
        None => return Err("the request names no program".into()),
    };
    let shown = match &spec.program {
        Some(ProgramSpec::Argv(argv)) => argv.first().cloned().unwrap_or_default(),
        Some(ProgramSpec::Script { interpreter, .. }) => interpreter.clone(),
        None => String::new(),
    };

    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    match &user {
        Some(u) => {
            cmd.env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name)
                .env("SHELL", &u.shell);
        }
        None => {
            if std::env::var_os("HOME").is_none() {
                cmd.env("HOME", "/root");
            }
        }
    }
    for (k, v) in spec.env.iter().chain(spec.secret_env.iter()) {
        cmd.env(k, v);
    }
    let cwd = spec.cwd.as_deref().unwrap_or("/");
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("working directory `{cwd}` is not a directory")),
        Err(e) => return Err(format!("working directory `{cwd}`: {e}")),
    }
    cmd.current_dir(cwd);

    match pty_slave {
        Some(slave) => {
            let out = slave.try_clone().map_err(|e| format!("pty: {e}"))?;
            let err = slave.try_clone().map_err(|e| format!("pty: {e}"))?;
            cmd.stdin(Stdio::from(slave))
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err));
            // SAFETY: only async-signal-safe calls (setsid, ioctl) run in the child.
            unsafe {
                cmd.pre_exec(sys::become_session_leader_with_tty);
            }
        }
        None => {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        }
    }
    if let Some(u) = user {
        let groups = u.groups.clone();
        // SAFETY: setgroups/setgid/setuid are async-signal-safe; `groups` was allocated
        // before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || sys::drop_privileges(u.uid, u.gid, &groups));
        }
    }
    cmd.spawn()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))
}

/// Writes a script body to a private file that only the user running it can read.
fn write_script(id: u32, body: &str, user: Option<&sys::User>) -> Result<PathBuf, String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = std::env::temp_dir().join(format!(
        ".builder-script-{}-{id}-{nanos}",
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&path)
        .map_err(|e| format!("cannot write the script to {}: {e}", path.display()))?;
    let result = (|| {
        f.write_all(body.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o700))?;
        if let Some(u) = user {
            std::os::unix::fs::fchown(&f, Some(u.uid), Some(u.gid))?;
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "cannot write the script to {}: {e}",
            path.display()
        ));
    }
    Ok(path)
}
