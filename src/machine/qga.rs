//! A guest reached through qemu-guest-agent (QGA), for images that carry it and need no
//! cloud-init: its JSON protocol over the virtio-serial chardev socket.
//!
//! QGA answers one request at a time, in order, so calls are serialised behind one lock. A
//! call that is abandoned half-way (timeout, dropped future) leaves its answer in the stream:
//! the next call first resynchronises with `guest-sync-delimited` (a 0xFF byte resets QGA's
//! parser; its answer starts with 0xFF, everything before it is discarded).
//!
//! Limits that come from QGA itself, not from us:
//! - `guest-exec` returns a command's output only once it has exited (base64 in the status),
//!   capped at 16 MiB per stream: no live streaming. The sink gets it all at the end.
//! - `guest-exec` has no cwd, user, timeout or process group: each command runs through
//!   `/bin/sh -c` that changes directory and `exec setsid` (so its pid is its process group,
//!   which a timeout or a dropped future kills with `kill -KILL -- -pgid`), with `runuser -u`
//!   for another user. Environment given to `guest-exec` replaces the whole environment, so a
//!   default `PATH` and `HOME` are added.
//! - Files travel as base64 in JSON (1 MiB per call), so transfers are slower than our agent.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};

use super::agent::{AgentStream, Connector};
use super::{
    DirEntry, ExecOutcome, ExecRequest, ExitStatus, FileInfo, FileKind, FileSource, FileStat,
    LocalTemp, Machine, MachineError, MachineInfo, OutputSink, OutputStream, Program, PutOptions,
    REBOOT_TIMEOUT,
};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bytes per guest-file-read/-write call (1.33 MiB of base64 in one JSON line).
const FILE_CHUNK: usize = 1024 * 1024;
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_POLL: Duration = Duration::from_millis(200);

/// Run by `setsid /bin/sh -c` (so the shell's pid, which QGA reports, is the process group
/// that a timeout kills): `cd`, then run the command, as another user if asked. A script body
/// arrives on stdin (one `guest-exec` instead of four file calls); the shell writes it to a
/// private file, runs it with stdin on /dev/null, removes it, and passes on the exit status
/// (re-raising a signal that killed the script). Arguments: dir, user, script path, argv…
const EXEC_WRAPPER: &str = r#"dir=$1 user=$2 script=$3; shift 3
if [ -n "$script" ]; then
  (umask 077 && cat > "$script") || exit 127
  if [ -n "$user" ]; then chown -- "$user" "$script" || { rm -f -- "$script"; exit 127; }; fi
fi
cd -- "$dir" || { [ -z "$script" ] || rm -f -- "$script"; exit 127; }
if [ -z "$script" ]; then
  if [ -n "$user" ]; then exec runuser -u "$user" -- "$@"; fi
  exec "$@"
fi
if [ -n "$user" ]; then runuser -u "$user" -- "$@" </dev/null; else "$@" </dev/null; fi
rc=$?
rm -f -- "$script"
if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then kill -s "$(kill -l "$rc")" $$; fi
exit "$rc""#;

/// Verifies an uploaded temporary file and moves it into place. Arguments: tmp, target,
/// mode, owner, group, append, sha256.
const PUT_FINISH: &str = r#"tmp=$1 target=$2 mode=$3 owner=$4 group=$5 append=$6 want=$7
fail() { rm -f -- "$tmp"; echo "$*" >&2; exit 1; }
got=$(sha256sum -- "$tmp" | cut -d' ' -f1) || fail "cannot hash $tmp"
[ "$got" = "$want" ] || fail "sha256 mismatch: the guest has $got, the host sent $want; nothing was written"
if [ -n "$append" ]; then
  cat -- "$tmp" >> "$target" || fail "cannot append to $target"
  rm -f -- "$tmp"; f=$target
else
  if [ -e "$target" ]; then
    chmod --reference="$target" -- "$tmp" && chown --reference="$target" -- "$tmp" || fail "cannot copy the mode of $target"
  else
    chmod 644 -- "$tmp" || fail "cannot chmod $tmp"
  fi
  f=$tmp
fi
if [ -n "$mode" ]; then chmod "$mode" -- "$f" || fail "cannot chmod $target"; fi
if [ -n "$owner$group" ]; then chown "$owner${group:+:$group}" -- "$f" || fail "cannot chown $target"; fi
if [ -z "$append" ]; then
  sync -- "$f" 2>/dev/null
  mv -f -- "$tmp" "$target" || fail "cannot rename into $target"
fi
sync"#;

const STAT: &str = r#"if [ -e "$1" ] || [ -L "$1" ]; then exec find "$1" -maxdepth 0 -printf '%y %s %m\n'; else exit 3; fi"#;
const LIST: &str = r#"[ -d "$1" ] || { echo "cannot list $1: not a folder" >&2; exit 3; }
exec find "$1" -mindepth 1 -maxdepth 1 -printf '%y %s %m %f\0'"#;

type Stream = Box<dyn AgentStream>;

struct Io {
    r: BufReader<ReadHalf<Stream>>,
    w: WriteHalf<Stream>,
    /// A call was abandoned half-way: its answer may still be in the stream.
    dirty: bool,
    next_sync: u32,
}

impl Io {
    fn new(stream: Stream) -> Io {
        let (r, w) = tokio::io::split(stream);
        Io {
            r: BufReader::with_capacity(4 * FILE_CHUNK, r),
            w,
            dirty: true,
            next_sync: std::process::id().wrapping_mul(7919),
        }
    }

    async fn write_line(&mut self, v: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.w.write_all(&line).await?;
        self.w.flush().await
    }

    async fn read_line(&mut self) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        let n = self.r.read_until(b'\n', &mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "qemu-guest-agent closed the connection",
            ));
        }
        Ok(buf)
    }

    /// `guest-sync-delimited`: discard everything up to the 0xFF that starts its answer.
    async fn sync(&mut self) -> std::io::Result<()> {
        self.next_sync = self.next_sync.wrapping_add(1);
        let id = self.next_sync;
        let mut req = vec![0xff];
        req.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        req.push(b'\n');
        self.w.write_all(&req).await?;
        self.w.flush().await?;
        loop {
            loop {
                if self.r.read_u8().await? == 0xff {
                    break;
                }
            }
            let line = self.read_line().await?;
            if let Ok(v) = serde_json::from_slice::<Value>(&line)
                && v.get("return").and_then(Value::as_u64) == Some(u64::from(id))
            {
                self.dirty = false;
                return Ok(());
            }
        }
    }
}

struct Inner {
    describe: String,
    io: tokio::sync::Mutex<Io>,
    call_timeout: Duration,
}

enum CallError {
    /// QGA answered with an error.
    Agent {
        desc: String,
    },
    Target(MachineError),
}

impl CallError {
    fn into_target(self, cmd: &str) -> MachineError {
        match self {
            CallError::Agent { desc, .. } => MachineError::Remote {
                op: format!("qemu-guest-agent `{cmd}` failed"),
                message: desc,
            },
            CallError::Target(e) => e,
        }
    }
}

impl Inner {
    fn io_error(&self, e: std::io::Error) -> CallError {
        CallError::Target(MachineError::Disconnected {
            target: self.describe.clone(),
            detail: e.to_string(),
        })
    }

    async fn call_raw(&self, cmd: &str, args: Option<Value>) -> Result<Value, CallError> {
        let work = async {
            let mut io = self.io.lock().await;
            if io.dirty {
                io.sync().await.map_err(|e| self.io_error(e))?;
            }
            io.dirty = true;
            let mut req = json!({"execute": cmd});
            if let Some(a) = args {
                req["arguments"] = a;
            }
            io.write_line(&req).await.map_err(|e| self.io_error(e))?;
            let line = io.read_line().await.map_err(|e| self.io_error(e))?;
            io.dirty = false;
            drop(io);
            let v: Value = serde_json::from_slice(&line).map_err(|e| {
                CallError::Target(MachineError::Protocol {
                    target: self.describe.clone(),
                    detail: format!("`{cmd}` answer is not JSON: {e}"),
                })
            })?;
            if let Some(err) = v.get("error") {
                return Err(CallError::Agent {
                    desc: err["desc"].as_str().unwrap_or("no description").to_owned(),
                });
            }
            v.get("return").cloned().ok_or_else(|| {
                CallError::Target(MachineError::Protocol {
                    target: self.describe.clone(),
                    detail: format!("`{cmd}` answer has neither `return` nor `error`"),
                })
            })
        };
        match tokio::time::timeout(self.call_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Target(MachineError::NoAnswer {
                target: self.describe.clone(),
                command: cmd.to_owned(),
                secs: self.call_timeout.as_secs(),
            })),
        }
    }

    async fn call(&self, cmd: &str, args: Value) -> Result<Value, MachineError> {
        self.call_raw(cmd, Some(args))
            .await
            .map_err(|e| e.into_target(cmd))
    }

    async fn spawn(
        &self,
        argv: &[String],
        env: Vec<String>,
        capture: bool,
    ) -> Result<i64, MachineError> {
        self.spawn_with_input(argv, env, capture, None).await
    }

    async fn spawn_with_input(
        &self,
        argv: &[String],
        env: Vec<String>,
        capture: bool,
        input: Option<&[u8]>,
    ) -> Result<i64, MachineError> {
        let (path, args) = argv.split_first().ok_or(MachineError::EmptyCommand)?;
        let mut request = json!({"path": path, "arg": args, "env": env, "capture-output": capture});
        if let Some(data) = input {
            request["input-data"] = Value::String(B64.encode(data));
        }
        let ret = self.call("guest-exec", request).await?;
        ret["pid"].as_i64().ok_or_else(|| MachineError::Protocol {
            target: self.describe.clone(),
            detail: "guest-exec returned no pid".into(),
        })
    }

    /// Polls `guest-exec-status` until the process exited (which also frees QGA's record).
    async fn wait(&self, pid: i64) -> Result<Value, MachineError> {
        let mut delay = Duration::from_millis(2);
        loop {
            let st = self.call("guest-exec-status", json!({"pid": pid})).await?;
            if st["exited"].as_bool() == Some(true) {
                return Ok(st);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_POLL);
        }
    }

    /// Kills the process group `pgid` (our commands run under `setsid`, so pid = pgid).
    async fn kill_group(&self, pgid: i64) -> Result<(), MachineError> {
        let argv = [
            "kill".to_owned(),
            "-KILL".into(),
            "--".into(),
            format!("-{pgid}"),
        ];
        let pid = self.spawn(&argv, default_env(), false).await?;
        self.wait(pid).await.map(|_| ())
    }

    /// Runs a short helper command and returns its status, stdout and stderr.
    async fn run(&self, argv: &[String]) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), MachineError> {
        let pid = self.spawn(argv, default_env(), true).await?;
        let st = self.wait(pid).await?;
        Ok((
            status_of(&st),
            b64_field(&st, "out-data")?,
            b64_field(&st, "err-data")?,
        ))
    }

    async fn remove(&self, path: &str) {
        let _ = self
            .run(&["rm".into(), "-f".into(), "--".into(), path.into()])
            .await;
    }
}

fn default_env() -> Vec<String> {
    vec![format!("PATH={DEFAULT_PATH}"), "HOME=/root".into()]
}

fn b64_field(st: &Value, key: &str) -> Result<Vec<u8>, MachineError> {
    match st.get(key).and_then(Value::as_str) {
        None => Ok(Vec::new()),
        Some(s) => B64.decode(s).map_err(|e| MachineError::Protocol {
            target: "qemu-guest-agent".into(),
            detail: format!("`{key}` is not base64: {e}"),
        }),
    }
}

fn status_of(st: &Value) -> ExitStatus {
    if let Some(sig) = st.get("signal").and_then(Value::as_i64) {
        return ExitStatus::Signaled(sig as i32);
    }
    ExitStatus::Exited(st.get("exitcode").and_then(Value::as_i64).unwrap_or(-1) as i32)
}

fn path_str(p: &Path) -> Result<String, MachineError> {
    super::guest_path(p, "qemu-guest-agent's JSON")
}

fn kind_of(letter: &str) -> FileKind {
    match letter {
        "f" => FileKind::File,
        "d" => FileKind::Dir,
        "l" => FileKind::Symlink,
        _ => FileKind::Other,
    }
}

/// Parses `%y %s %m` from find(1).
fn parse_stat(fields: &[&str]) -> Option<FileStat> {
    match fields {
        [kind, size, mode, ..] => Some(FileStat {
            kind: kind_of(kind),
            size: size.parse().ok()?,
            mode: u32::from_str_radix(mode, 8).ok()?,
        }),
        _ => None,
    }
}

/// Kills a command (and removes its script) if its exec future is dropped before the end.
struct ExecGuard {
    inner: Arc<Inner>,
    pid: Option<i64>,
    script: Option<String>,
}

impl Drop for ExecGuard {
    fn drop(&mut self) {
        let (pid, script) = (self.pid.take(), self.script.take());
        if pid.is_none() && script.is_none() {
            return;
        }
        let inner = self.inner.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some(pid) = pid {
                    let _ = inner.kill_group(pid).await;
                    let _ = inner.wait(pid).await;
                }
                if let Some(s) = script {
                    inner.remove(&s).await;
                }
            });
        }
    }
}

/// A guest reached through qemu-guest-agent.
pub struct QgaMachine {
    inner: Arc<Inner>,
    connector: Option<Arc<dyn Connector>>,
}

impl QgaMachine {
    /// Takes over `stream` and waits (at most `timeout`) until qemu-guest-agent answers
    /// `guest-sync-delimited`; QGA may start long after the stream is open.
    pub async fn connect(
        stream: impl AgentStream,
        describe: String,
        timeout: Duration,
    ) -> Result<QgaMachine, MachineError> {
        let inner = Arc::new(Inner {
            describe: describe.clone(),
            io: tokio::sync::Mutex::new(Io::new(Box::new(stream))),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        });
        wait_sync(&inner, Instant::now() + timeout).await?;
        Ok(QgaMachine {
            inner,
            connector: None,
        })
    }

    /// Lets [`reboot`](Machine::reboot) open a new stream when the old one ends.
    pub fn with_connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = Some(connector);
        self
    }

    async fn boot_id(&self) -> Result<String, MachineError> {
        let (status, out, err) = self
            .inner
            .run(&["cat".into(), "/proc/sys/kernel/random/boot_id".into()])
            .await?;
        if !status.success() {
            return Err(MachineError::Remote {
                op: "cannot read the boot id".into(),
                message: String::from_utf8_lossy(&err).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }

    async fn upload(
        &self,
        tmp: &str,
        content: FileSource,
    ) -> Result<(u64, [u8; 32]), MachineError> {
        let handle = self
            .inner
            .call("guest-file-open", json!({"path": tmp, "mode": "w"}))
            .await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let result = async {
            let mut send = |chunk: Vec<u8>| {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                let inner = self.inner.clone();
                let handle = handle.clone();
                async move {
                    inner
                        .call(
                            "guest-file-write",
                            json!({"handle": handle, "buf-b64": B64.encode(&chunk)}),
                        )
                        .await
                }
            };
            match content {
                FileSource::Bytes(b) => {
                    for c in b.chunks(FILE_CHUNK) {
                        send(c.to_vec()).await?;
                    }
                }
                FileSource::Path(p) => {
                    let mut f = fs_err::tokio::File::open(&p).await?;
                    loop {
                        let mut buf = vec![0u8; FILE_CHUNK];
                        let n = super::read_full(&mut f, &mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        buf.truncate(n);
                        send(buf).await?;
                    }
                }
            }
            Ok::<(), MachineError>(())
        }
        .await;
        let closed = self
            .inner
            .call("guest-file-close", json!({"handle": handle}))
            .await;
        result?;
        closed?;
        Ok((size, hasher.finalize().into()))
    }
}

async fn wait_sync(inner: &Inner, deadline: Instant) -> Result<(), MachineError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MachineError::Unreachable {
                target: inner.describe.clone(),
            });
        }
        // Ask again every few seconds: requests sent before QGA opened its port may be lost.
        let attempt = async {
            let mut io = inner.io.lock().await;
            io.sync().await
        };
        match tokio::time::timeout(left.min(Duration::from_secs(3)), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                return Err(MachineError::Disconnected {
                    target: inner.describe.clone(),
                    detail: e.to_string(),
                });
            }
            Err(_) => {}
        }
    }
}

#[async_trait]
impl Machine for QgaMachine {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    async fn info(&self) -> Result<MachineInfo, MachineError> {
        let os = self.inner.call_raw("guest-get-osinfo", None).await;
        let os = os.map_err(|e| e.into_target("guest-get-osinfo"))?;
        let field = |k: &str| {
            os.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok(MachineInfo {
            os_id: field("id"),
            os_pretty: field("pretty-name"),
            arch: field("machine"),
            boot_id: self.boot_id().await?,
        })
    }

    /// Output arrives only when the command has exited (a QGA limit, see the module docs).
    async fn exec(
        &self,
        request: &ExecRequest,
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, MachineError> {
        let started = Instant::now();
        let mut guard = ExecGuard {
            inner: self.inner.clone(),
            pid: None,
            script: None,
        };
        let (command, input): (Vec<String>, Option<&[u8]>) = match &request.program {
            Program::Argv(argv) => (argv.clone(), None),
            Program::Script { interpreter, body } => {
                let path = format!("/tmp/.builder-script-{}", uuid::Uuid::new_v4().simple());
                guard.script = Some(path.clone());
                (vec![interpreter.clone(), path], Some(body.as_bytes()))
            }
        };
        if command.is_empty() {
            return Err(MachineError::EmptyCommand);
        }
        let cwd = match &request.cwd {
            Some(c) => path_str(c)?,
            None => "/".into(),
        };
        let mut argv = vec![
            "setsid".to_owned(),
            "/bin/sh".into(),
            "-c".into(),
            EXEC_WRAPPER.into(),
            "sh".into(),
            cwd,
            request.user.clone().unwrap_or_default(),
            guard.script.clone().unwrap_or_default(),
        ];
        argv.extend(command);
        let mut env = default_env();
        env.extend(request.env.iter().map(|(k, v)| format!("{k}={v}")));
        let pid = self.inner.spawn_with_input(&argv, env, true, input).await?;
        guard.pid = Some(pid);
        let deadline = request.timeout.map(|t| started + t);
        let mut timed_out = false;
        let mut delay = Duration::from_millis(2);
        let st = loop {
            let st = self
                .inner
                .call("guest-exec-status", json!({"pid": pid}))
                .await?;
            if st["exited"].as_bool() == Some(true) {
                break st;
            }
            if let Some(d) = deadline
                && !timed_out
                && Instant::now() >= d
            {
                self.inner.kill_group(pid).await?;
                timed_out = true;
            }
            let mut wait = delay;
            if let Some(d) = deadline
                && !timed_out
            {
                wait = wait.min(d.saturating_duration_since(Instant::now()));
            }
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(MAX_POLL);
        };
        guard.pid = None;
        let out = b64_field(&st, "out-data")?;
        let err = b64_field(&st, "err-data")?;
        if !out.is_empty() {
            sink.output(OutputStream::Stdout, &out);
        }
        if !err.is_empty() {
            sink.output(OutputStream::Stderr, &err);
        }
        for (key, name) in [("out-truncated", "stdout"), ("err-truncated", "stderr")] {
            if st[key].as_bool() == Some(true) {
                sink.output(
                    OutputStream::Stderr,
                    format!("\n[builder: qemu-guest-agent cut {name} short at its 16 MiB limit]\n")
                        .as_bytes(),
                );
            }
        }
        // The wrapper removed the script unless the command was killed (timeout).
        if let Some(s) = guard.script.take()
            && timed_out
        {
            self.inner.remove(&s).await;
        }
        Ok(ExecOutcome {
            status: if timed_out {
                ExitStatus::TimedOut
            } else {
                status_of(&st)
            },
            duration: started.elapsed(),
        })
    }

    async fn put_file(
        &self,
        remote: &Path,
        content: FileSource,
        options: &PutOptions,
    ) -> Result<FileInfo, MachineError> {
        let target = path_str(remote)?;
        let (Some(dir), Some(name)) = (remote.parent(), remote.file_name()) else {
            return Err(MachineError::NoFileName(target));
        };
        let dir = path_str(dir)?;
        if options.create_parents {
            let (st, _, err) = self
                .inner
                .run(&["mkdir".into(), "-p".into(), "--".into(), dir.clone()])
                .await?;
            if !st.success() {
                return Err(MachineError::Remote {
                    op: format!("cannot create {dir}"),
                    message: String::from_utf8_lossy(&err).trim().to_owned(),
                });
            }
        }
        let tmp = format!(
            "{dir}/.{}.builder-tmp-{}",
            name.to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        );
        let (size, sha) = match self.upload(&tmp, content).await {
            Ok(r) => r,
            Err(e) => {
                self.inner.remove(&tmp).await;
                return Err(e);
            }
        };
        let sha_hex = hex::encode(sha);
        let argv = vec![
            "/bin/sh".to_owned(),
            "-c".into(),
            PUT_FINISH.into(),
            "sh".into(),
            tmp.clone(),
            target.clone(),
            options.mode.map(|m| format!("{m:o}")).unwrap_or_default(),
            options.owner.clone().unwrap_or_default(),
            options.group.clone().unwrap_or_default(),
            if options.append {
                "1".into()
            } else {
                String::new()
            },
            sha_hex.clone(),
        ];
        let (st, _, err) = self.inner.run(&argv).await?;
        if !st.success() {
            self.inner.remove(&tmp).await;
            return Err(MachineError::Remote {
                op: format!("writing {target} in {}", self.inner.describe),
                message: String::from_utf8_lossy(&err).trim().to_owned(),
            });
        }
        Ok(FileInfo {
            size,
            sha256: sha_hex,
        })
    }

    async fn get_file(&self, remote: &Path, local: &Path) -> Result<FileInfo, MachineError> {
        let path = path_str(remote)?;
        let handle = self
            .inner
            .call("guest-file-open", json!({"path": path, "mode": "r"}))
            .await?;
        let tmp = LocalTemp::next_to(local);
        let result = async {
            let mut file = fs_err::tokio::File::create(tmp.path()).await?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            loop {
                let r = self
                    .inner
                    .call(
                        "guest-file-read",
                        json!({"handle": handle, "count": FILE_CHUNK}),
                    )
                    .await?;
                let data = b64_field(&r, "buf-b64")?;
                hasher.update(&data);
                size += data.len() as u64;
                file.write_all(&data).await?;
                if r["eof"].as_bool() == Some(true) || data.is_empty() {
                    break;
                }
            }
            file.flush().await?;
            file.sync_all().await?;
            let sha: [u8; 32] = hasher.finalize().into();
            Ok::<_, MachineError>((size, hex::encode(sha)))
        }
        .await;
        let _ = self
            .inner
            .call("guest-file-close", json!({"handle": handle}))
            .await;
        let (size, sha) = result?;
        // The guest's own digest of the file, so a transfer that lost bytes is caught.
        let (st, out, err) = self
            .inner
            .run(&["sha256sum".into(), "--".into(), path.clone()])
            .await?;
        let theirs = String::from_utf8_lossy(&out)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        if !st.success() || theirs != sha {
            return Err(MachineError::GetMismatch {
                path,
                target: self.inner.describe.clone(),
                received: Box::new(FileInfo { size, sha256: sha }),
                reported: format!(
                    "the guest reports {theirs} {}",
                    String::from_utf8_lossy(&err).trim()
                )
                .into(),
            });
        }
        tmp.rename_to(local)?;
        Ok(FileInfo { size, sha256: sha })
    }

    async fn stat(&self, remote: &Path) -> Result<Option<FileStat>, MachineError> {
        let path = path_str(remote)?;
        let argv = ["/bin/sh", "-c", STAT, "sh", &path].map(str::to_owned);
        let (st, out, err) = self.inner.run(&argv).await?;
        if st == ExitStatus::Exited(3) {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&out);
        let fields: Vec<&str> = text.split_whitespace().collect();
        match (st.success(), parse_stat(&fields)) {
            (true, Some(s)) => Ok(Some(s)),
            _ => Err(MachineError::Remote {
                op: format!("cannot stat {path}"),
                message: String::from_utf8_lossy(&err).trim().to_owned(),
            }),
        }
    }

    async fn list(&self, remote: &Path) -> Result<Vec<DirEntry>, MachineError> {
        let path = path_str(remote)?;
        let argv = ["/bin/sh", "-c", LIST, "sh", &path].map(str::to_owned);
        let (st, out, err) = self.inner.run(&argv).await?;
        if !st.success() {
            return Err(MachineError::Remote {
                op: format!("cannot list {path}"),
                message: String::from_utf8_lossy(&err).trim().to_owned(),
            });
        }
        let mut entries = Vec::new();
        for rec in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let rec = String::from_utf8_lossy(rec);
            let mut parts = rec.splitn(4, ' ');
            let fields: Vec<&str> = parts.by_ref().take(3).collect();
            let (Some(stat), Some(name)) = (parse_stat(&fields), parts.next()) else {
                return Err(MachineError::Protocol {
                    target: self.inner.describe.clone(),
                    detail: format!("unexpected find(1) output `{rec}`"),
                });
            };
            entries.push(DirEntry {
                name: name.to_owned(),
                stat,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// `guest-shutdown {"mode": "reboot"}` (which answers nothing when it works), then
    /// `guest-sync` until QGA answers again with a new boot id.
    async fn reboot(&self) -> Result<(), MachineError> {
        let before = self.boot_id().await?;
        let deadline = Instant::now() + REBOOT_TIMEOUT;
        {
            let mut io = self.inner.io.lock().await;
            if io.dirty {
                io.sync().await.map_err(|e| MachineError::Disconnected {
                    target: self.inner.describe.clone(),
                    detail: e.to_string(),
                })?;
            }
            io.dirty = true;
            let req = json!({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}});
            io.write_line(&req)
                .await
                .map_err(|e| MachineError::Disconnected {
                    target: self.inner.describe.clone(),
                    detail: e.to_string(),
                })?;
            // Only a refusal gets an answer; give it a moment to arrive.
            if let Ok(Ok(line)) = tokio::time::timeout(Duration::from_secs(3), io.read_line()).await
                && let Ok(v) = serde_json::from_slice::<Value>(&line)
                && let Some(err) = v.get("error")
            {
                io.dirty = false;
                return Err(MachineError::Remote {
                    op: format!(
                        "qemu-guest-agent in {} refused to reboot",
                        self.inner.describe
                    ),
                    message: err["desc"].as_str().unwrap_or("no description").to_owned(),
                });
            }
        }
        let mut last_problem = String::from("no answer");
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.min(Duration::from_secs(10)), self.boot_id()).await {
                Ok(Ok(id)) if id != before && !id.is_empty() => return Ok(()),
                Ok(Ok(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
                Ok(Err(MachineError::Disconnected { detail, .. })) => {
                    last_problem = detail;
                    let Some(connector) = &self.connector else {
                        return Err(MachineError::Disconnected {
                            target: self.inner.describe.clone(),
                            detail: format!(
                                "{last_problem} during the reboot, and this target has no way to reconnect"
                            ),
                        });
                    };
                    match connector.connect().await {
                        Ok(stream) => *self.inner.io.lock().await = Io::new(stream),
                        Err(e) => {
                            last_problem = e.to_string();
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                Ok(Err(e)) => {
                    last_problem = e.to_string();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => {}
            }
        }
        Err(MachineError::NotBack {
            target: self.inner.describe.clone(),
            secs: REBOOT_TIMEOUT.as_secs(),
            why: format!("last problem: {last_problem}"),
        })
    }
}
