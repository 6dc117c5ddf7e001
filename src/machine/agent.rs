//! A guest reached through our agent ([`crate::agent::protocol`]) over a byte stream: QEMU's
//! chardev socket for the virtio-serial port in a VM, a unix socket in tests.
//!
//! One reader task demultiplexes frames by request id into per-request channels, and one
//! writer task owns the write half, so many requests run at once and a dropped future can
//! never leave half a frame on the wire. Dropping an exec (or transfer) future sends `Kill`
//! for its id: the agent kills the command's process group or abandons the transfer.
//!
//! The stream may carry stale bytes (a frame torn by a guest reboot): the reader skips ahead
//! to the next plausible header and asks for a fresh `Hello`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::{
    Capture, DirEntry, ExecOutcome, ExecRequest, ExitStatus, FileInfo, FileKind, FileSource,
    FileStat, LocalTemp, Machine, MachineError, MachineInfo, OutputSink, OutputStream, Program,
    PutOptions, REBOOT_TIMEOUT,
};
use crate::agent::protocol::{
    self, ExecSpec, ExitKind, HelloInfo, Message, OutStream, ProgramSpec, PutSpec, StatInfo,
    StatKind,
};

/// A byte stream to the agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentStream for T {}

/// Opens a fresh stream to the guest's agent port, e.g. a new connection to QEMU's chardev
/// socket. Needed for [`AgentMachine::reboot`] when the old stream ends during the reboot.
#[async_trait]
pub trait Connector: Send + Sync {
    async fn connect(&self) -> Result<Box<dyn AgentStream>, MachineError>;
}

/// How often to ask for a `Hello` while waiting for one: an agent that is not up yet never
/// sees our first request if the guest port was reset, and a torn frame may swallow one.
const HELLO_RETRY: Duration = Duration::from_secs(2);
/// Script bodies above this go as a file instead of inside the `Exec` frame.
const LARGE_SCRIPT: usize = protocol::MAX_PAYLOAD - 64 * 1024;

type Incoming = Result<Message, String>;

/// What the reader, the writer and the requests share for one stream.
struct Shared {
    target: String,
    routes: Mutex<HashMap<u32, mpsc::UnboundedSender<Incoming>>>,
    /// Why the stream ended, once it has.
    dead: Mutex<Option<String>>,
    hello: watch::Sender<Option<HelloInfo>>,
    closed: watch::Sender<bool>,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u32, mpsc::UnboundedSender<Incoming>>> {
        // Only inserts and removes happen under this lock: a poisoned map is still consistent.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self, reason: String) {
        {
            let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
            if dead.is_none() {
                *dead = Some(reason);
            }
        }
        // Dropping every sender wakes every waiting request with "disconnected".
        self.routes().clear();
        self.closed.send_replace(true);
    }

    fn dead_reason(&self) -> String {
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the connection was closed".into())
    }

    fn route(&self, id: u32, incoming: Incoming) {
        if let Ok(Message::Hello(h)) = &incoming {
            // A Hello from another agent process (new pid or boot id) means the one that held
            // our requests is gone (killed, crashed): fail them now, they would wait forever.
            // Failed before the new Hello is published: a task woken by it (a reboot that
            // waited for the new boot) may send its next request at once, on another thread,
            // and that one goes to the new agent.
            let previous = self.hello.borrow().clone();
            if let Some(prev) = previous
                && (prev.pid != h.pid || prev.boot_id != h.boot_id)
            {
                self.fail_in_flight(&format!(
                    "the agent in the guest restarted (pid {} is now {}); what it was doing was lost",
                    prev.pid, h.pid
                ));
            }
            self.hello.send_replace(Some(h.clone()));
        }
        if id == 0 {
            return; // unsolicited Hello, or the agent complaining about a frame of ours
        }
        if let Some(tx) = self.routes().get(&id) {
            let _ = tx.send(incoming);
        }
        // Frames for requests nobody waits for any more (cancelled) are dropped.
    }

    /// The stream lost step: whatever was in flight cannot be trusted.
    fn fail_in_flight(&self, detail: &str) {
        for (_, tx) in self.routes().drain() {
            let _ = tx.send(Err(detail.to_owned()));
        }
    }
}

/// One stream to the agent, with its reader and writer tasks (stopped when dropped).
struct Connection {
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Connection {
    fn start(stream: Box<dyn AgentStream>, target: String) -> Arc<Connection> {
        let (hello, _) = watch::channel(None);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            target,
            routes: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            hello,
            closed,
        });
        let (read_half, write_half) = tokio::io::split(stream);
        let (out, out_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(read_half, shared.clone(), out.clone()));
        let writer = tokio::spawn(write_loop(write_half, out_rx, shared.clone()));
        Arc::new(Connection {
            shared,
            out,
            tasks: vec![reader.abort_handle(), writer.abort_handle()],
        })
    }

    fn send_raw(&self, bytes: Vec<u8>) -> Result<(), MachineError> {
        self.out
            .send(bytes)
            .map_err(|_| MachineError::Disconnected {
                target: self.shared.target.clone(),
                detail: self.shared.dead_reason(),
            })
    }

    fn send(&self, id: u32, msg: &Message) -> Result<(), MachineError> {
        let bytes = protocol::encode(id, msg).map_err(|source| MachineError::Encode {
            message: msg.name(),
            source,
        })?;
        self.send_raw(bytes)
    }

    fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Waits for a `Hello` that `accept` likes, asking again now and then; fails when the
    /// stream ends or `deadline` passes.
    async fn wait_hello(
        &self,
        deadline: Instant,
        accept: impl Fn(&HelloInfo) -> bool,
    ) -> Result<HelloInfo, WaitHello> {
        let mut hello = self.shared.hello.subscribe();
        let mut closed = self.shared.closed.subscribe();
        // Only Hellos that arrive from now on count.
        hello.mark_unchanged();
        loop {
            if *closed.borrow() {
                return Err(WaitHello::Closed(self.shared.dead_reason()));
            }
            let _ = self.send(0, &Message::HelloRequest);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WaitHello::TimedOut);
            }
            let tick = tokio::time::sleep(left.min(HELLO_RETRY));
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    changed = hello.changed() => {
                        if changed.is_err() {
                            return Err(WaitHello::Closed(self.shared.dead_reason()));
                        }
                        let seen = hello.borrow_and_update().clone();
                        if let Some(h) = seen && accept(&h) {
                            return Ok(h);
                        }
                    }
                    _ = closed.changed() => break,
                    _ = &mut tick => break,
                }
            }
        }
    }
}

enum WaitHello {
    Closed(String),
    TimedOut,
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(frame) = rx.recv().await {
        if let Err(e) = w.write_all(&frame).await {
            shared.end(format!("writing to the agent failed: {e}"));
            return;
        }
        // Batch what is already queued before flushing (flush is a no-op on sockets anyway).
        if rx.is_empty()
            && let Err(e) = w.flush().await
        {
            shared.end(format!("writing to the agent failed: {e}"));
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(4 * protocol::MAX_PAYLOAD);
    let mut start = 0usize;
    let mut skipped = 0usize;
    loop {
        // Take every complete frame out of the buffer.
        loop {
            let avail = &buf[start..];
            let Some(head) = avail.get(..protocol::HEADER_LEN) else {
                break;
            };
            let mut h = [0u8; protocol::HEADER_LEN];
            h.copy_from_slice(head);
            let header = match protocol::decode_header(&h) {
                Ok(header) => header,
                Err(e) => {
                    if skipped == 0 {
                        shared.fail_in_flight(&format!("the stream from the agent lost step: {e}"));
                    }
                    start += 1;
                    skipped += 1;
                    continue;
                }
            };
            let Some(payload) = avail.get(protocol::HEADER_LEN..protocol::HEADER_LEN + header.len)
            else {
                break;
            };
            if skipped > 0 {
                // Back in step: ask for a Hello so a waiter that lost one gets another.
                skipped = 0;
                if let Ok(b) = protocol::encode(0, &Message::HelloRequest) {
                    let _ = out.send(b);
                }
            }
            let incoming = protocol::decode_body(header.ty, payload)
                .map_err(|e| format!("the agent sent a frame we cannot read: {e}"));
            start += protocol::HEADER_LEN + header.len;
            shared.route(header.id, incoming);
        }
        if start > 0 {
            buf.drain(..start);
            start = 0;
        }
        if buf.capacity() - buf.len() < protocol::MAX_PAYLOAD {
            buf.reserve(protocol::MAX_PAYLOAD);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => {
                shared.end("the agent closed the connection".into());
                return;
            }
            Ok(_) => {}
            Err(e) => {
                shared.end(format!("reading from the agent failed: {e}"));
                return;
            }
        }
    }
}

/// One request in flight: its id, its reply channel. Dropped unfinished, it sends `Kill` so
/// the agent stops whatever it was doing for it.
struct Request {
    conn: Arc<Connection>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Incoming>,
    finished: bool,
}

impl Request {
    fn send(&self, msg: &Message) -> Result<(), MachineError> {
        self.conn.send(self.id, msg)
    }

    async fn recv(&mut self) -> Result<Message, MachineError> {
        match self.rx.recv().await {
            Some(Ok(m)) => Ok(m),
            Some(Err(detail)) => Err(MachineError::Protocol {
                target: self.conn.shared.target.clone(),
                detail,
            }),
            None => Err(MachineError::Disconnected {
                target: self.conn.shared.target.clone(),
                detail: self.conn.shared.dead_reason(),
            }),
        }
    }

    /// A reply that is not there, if one is.
    fn try_recv(&mut self) -> Option<Incoming> {
        self.rx.try_recv().ok()
    }

    fn unexpected(&self, msg: &Message, waiting_for: &str) -> MachineError {
        MachineError::Protocol {
            target: self.conn.shared.target.clone(),
            detail: format!("got `{}` while waiting for {waiting_for}", msg.name()),
        }
    }

    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.conn.shared.routes().remove(&self.id);
        if !self.finished {
            let _ = self.conn.send(self.id, &Message::Kill);
        }
    }
}

/// What [`AgentMachine::wait_ready`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub hello: HelloInfo,
    /// `None` when cloud-init was not waited for; otherwise its final status (`done`, or
    /// `absent` when the guest has no cloud-init).
    pub cloud_init: Option<String>,
    /// How the guest's boot ended, when it was waited for (the VM session waits): the
    /// boot check's `system: running` (or `degraded` with a `failed: …` line, or `none`
    /// without systemd).
    pub system: Option<String>,
}

/// An interactive command started by [`AgentMachine::start_interactive`].
pub struct Interactive {
    req: Request,
}

/// What an interactive command produced next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InteractiveEvent {
    Output(OutputStream, Vec<u8>),
    Exited(ExitStatus),
}

impl Interactive {
    /// Feeds its stdin; an empty slice closes it.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), MachineError> {
        for chunk in data.chunks(protocol::CHUNK_SIZE) {
            self.req.send(&Message::Stdin(chunk.to_vec()))?;
        }
        if data.is_empty() {
            self.req.send(&Message::Stdin(Vec::new()))?;
        }
        Ok(())
    }

    /// Tells its pseudo-terminal the new window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), MachineError> {
        self.req.send(&Message::Resize { rows, cols })
    }

    pub async fn next(&mut self) -> Result<InteractiveEvent, MachineError> {
        match self.req.recv().await? {
            Message::Output { stream, data } => {
                Ok(InteractiveEvent::Output(stream_of(stream), data))
            }
            Message::Exited { kind, .. } => {
                self.req.finish();
                Ok(InteractiveEvent::Exited(status_of(kind)))
            }
            Message::Error { message, .. } => {
                self.req.finish();
                Err(MachineError::Refused { message })
            }
            other => Err(self.req.unexpected(&other, "output")),
        }
    }
}

fn stream_of(s: OutStream) -> OutputStream {
    match s {
        OutStream::Stdout => OutputStream::Stdout,
        OutStream::Stderr => OutputStream::Stderr,
    }
}

fn status_of(kind: ExitKind) -> ExitStatus {
    match kind {
        ExitKind::Code(c) => ExitStatus::Exited(c),
        ExitKind::Signal(s) => ExitStatus::Signaled(s),
        ExitKind::TimedOut => ExitStatus::TimedOut,
    }
}

fn stat_of(s: &StatInfo) -> FileStat {
    FileStat {
        kind: match s.kind {
            StatKind::File => FileKind::File,
            StatKind::Dir => FileKind::Dir,
            StatKind::Symlink => FileKind::Symlink,
            StatKind::Other => FileKind::Other,
        },
        size: s.size,
        mode: s.mode,
    }
}

fn path_str(p: &Path) -> Result<String, MachineError> {
    super::guest_path(p, "the agent protocol")
}

/// A guest reached through builder's agent.
pub struct AgentMachine {
    describe: String,
    conn: Mutex<Arc<Connection>>,
    connector: Option<Arc<dyn Connector>>,
    /// Why this target cannot reboot (a container), when it cannot: the hint of the
    /// [`MachineError::Unsupported`] that [`Machine::reboot`] then returns.
    no_reboot: Option<String>,
    next_id: AtomicU32,
}

impl AgentMachine {
    /// Takes over `stream` and waits (at most `hello_timeout`) for the agent's `Hello`. The
    /// agent may start long after the stream is open (a VM still booting): the timeout is the
    /// boot budget. `describe` names the guest in messages ("vm debian-12 (pid 4242)").
    pub async fn connect(
        stream: impl AgentStream,
        describe: String,
        hello_timeout: Duration,
    ) -> Result<AgentMachine, MachineError> {
        let conn = Connection::start(Box::new(stream), describe.clone());
        let deadline = Instant::now() + hello_timeout;
        match conn.wait_hello(deadline, |_| true).await {
            Ok(hello) => check_protocol(&describe, &hello)?,
            Err(WaitHello::Closed(detail)) => {
                return Err(MachineError::Disconnected {
                    target: describe,
                    detail: format!("{detail} before the agent said hello"),
                });
            }
            Err(WaitHello::TimedOut) => {
                return Err(MachineError::NoHello {
                    target: describe,
                    secs: hello_timeout.as_secs_f32(),
                });
            }
        }
        Ok(AgentMachine {
            describe,
            conn: Mutex::new(conn),
            connector: None,
            no_reboot: None,
            next_id: AtomicU32::new(1),
        })
    }

    /// Lets [`reboot`](Machine::reboot) open a new stream when the old one ends.
    pub fn with_connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = Some(connector);
        self
    }

    /// Makes [`reboot`](Machine::reboot) refuse (a container cannot reboot): `hint` says why
    /// and what to do instead.
    pub fn without_reboot(mut self, hint: String) -> Self {
        self.no_reboot = Some(hint);
        self
    }

    /// The agent's latest `Hello` (os-release, arch, boot id, cloud-init state), as received.
    pub fn hello(&self) -> Option<HelloInfo> {
        self.conn().shared.hello.borrow().clone()
    }

    /// Tells the target that the guest closed its end of the port (QMP `VSERPORT_CHANGE` with
    /// `open: false`) while the host side stays connected: requests in flight fail at once
    /// instead of waiting for an agent that is gone. The stream stays usable: an agent that
    /// comes back says hello on it again.
    pub fn guest_port_closed(&self) {
        self.conn().shared.fail_in_flight(
            "the guest closed the agent's port (the agent stopped, or the guest is going down)",
        );
    }

    fn conn(&self) -> Arc<Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn request(&self) -> Result<Request, MachineError> {
        let conn = self.conn();
        if conn.is_closed() {
            return Err(MachineError::Disconnected {
                target: self.describe.clone(),
                detail: conn.shared.dead_reason(),
            });
        }
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            id = self.next_id.fetch_add(1, Ordering::Relaxed);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        conn.shared.routes().insert(id, tx);
        Ok(Request {
            conn,
            id,
            rx,
            finished: false,
        })
    }

    /// A request with one reply.
    async fn call(&self, msg: &Message) -> Result<Message, MachineError> {
        let mut req = self.request()?;
        req.send(msg)?;
        let reply = req.recv().await?;
        req.finish();
        match reply {
            Message::Error { message, .. } => Err(MachineError::Refused { message }),
            other => Ok(other),
        }
    }

    /// Like [`Machine::exec`], with environment variables whose values are secret: they
    /// travel only over the agent channel and are never printed by either side.
    pub async fn exec_with_secrets(
        &self,
        request: &ExecRequest,
        secret_env: &[(String, String)],
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, MachineError> {
        if let Program::Script { interpreter, body } = &request.program
            && body.len() > LARGE_SCRIPT
        {
            return self
                .exec_large_script(request, interpreter, body, secret_env, sink)
                .await;
        }
        let started = Instant::now();
        let spec = exec_spec(request, secret_env)?;
        let mut req = self.request()?;
        req.send(&Message::Exec(spec))?;
        loop {
            match req.recv().await? {
                Message::Output { stream, data } => sink.output(stream_of(stream), &data),
                Message::Exited { kind, .. } => {
                    req.finish();
                    return Ok(ExecOutcome {
                        status: status_of(kind),
                        duration: started.elapsed(),
                    });
                }
                Message::Error { message, .. } => {
                    req.finish();
                    return Err(MachineError::Refused { message });
                }
                other => return Err(req.unexpected(&other, "command output")),
            }
        }
    }

    /// A script too big for one frame: uploaded as a file (private to the user that runs
    /// it), run, then removed.
    async fn exec_large_script(
        &self,
        request: &ExecRequest,
        interpreter: &str,
        body: &str,
        secret_env: &[(String, String)],
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, MachineError> {
        let path = PathBuf::from(format!(
            "/tmp/.builder-script-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let options = PutOptions {
            mode: Some(0o700),
            owner: request.user.clone(),
            ..PutOptions::default()
        };
        self.put_file(&path, FileSource::Bytes(body.as_bytes().to_vec()), &options)
            .await?;
        let mut run = request.clone();
        run.program = Program::Argv(vec![interpreter.to_owned(), path_str(&path)?]);
        let outcome = Box::pin(self.exec_with_secrets(&run, secret_env, sink)).await;
        let cleanup = ExecRequest::argv(["rm", "-f", "--", &path_str(&path)?]);
        let _ = Box::pin(self.exec_with_secrets(&cleanup, &[], &Capture::default())).await;
        outcome
    }

    /// Starts a command whose stdin the caller feeds, on a pseudo-terminal of `pty` (rows,
    /// cols) when given: what `builder vm shell` uses. Dropping the handle kills it.
    pub async fn start_interactive(
        &self,
        request: &ExecRequest,
        pty: Option<(u16, u16)>,
    ) -> Result<Interactive, MachineError> {
        let mut spec = exec_spec(request, &[])?;
        spec.stdin = true;
        spec.pty = pty;
        let req = self.request()?;
        req.send(&Message::Exec(spec))?;
        Ok(Interactive { req })
    }

    /// Two-stage readiness. The agent is up once `connect` returned; with `cloud_init`, this
    /// then waits (at most `timeout`) for `cloud-init status --wait --long` and fails on an
    /// `error` or `degraded` result with the tail of /var/log/cloud-init-output.log, so steps
    /// never race cloud-init for the package manager.
    pub async fn wait_ready(
        &self,
        cloud_init: bool,
        timeout: Duration,
    ) -> Result<Readiness, MachineError> {
        let hello = match self.hello() {
            Some(h) => h,
            None => hello_of(self.call(&Message::HelloRequest).await?, &self.describe)?,
        };
        if !cloud_init {
            return Ok(Readiness {
                hello,
                cloud_init: None,
                system: None,
            });
        }
        if hello.cloud_init == "absent" {
            return Ok(Readiness {
                hello,
                cloud_init: Some("absent".into()),
                system: None,
            });
        }
        let capture = Capture::default();
        let outcome = self
            .exec(
                &ExecRequest::argv(["cloud-init", "status", "--wait", "--long"])
                    .with_timeout(Some(timeout)),
                &capture,
            )
            .await?;
        let report = String::from_utf8_lossy(&capture.stdout()).into_owned();
        let status = report
            .lines()
            .find_map(|l| l.trim().strip_prefix("status:"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let good = outcome.status.success() && (status == "done" || status.is_empty());
        if good {
            return Ok(Readiness {
                hello,
                cloud_init: Some(if status.is_empty() {
                    "done".into()
                } else {
                    status
                }),
                system: None,
            });
        }
        let what = if outcome.status == ExitStatus::TimedOut {
            format!(
                "cloud-init did not finish within {}s in {}",
                timeout.as_secs(),
                self.describe
            )
        } else {
            format!(
                "cloud-init finished with status `{}` in {} (`cloud-init status` {})",
                if status.is_empty() {
                    "unknown"
                } else {
                    &status
                },
                self.describe,
                outcome.status
            )
        };
        Err(self.cloud_init_failure(what, &report).await)
    }

    /// The error for cloud-init that did not finish: `what` went wrong, the readiness
    /// check's `report`, and the last lines of cloud-init's output log read from the guest.
    pub async fn cloud_init_failure(&self, what: String, report: &str) -> MachineError {
        let tail = Capture::default();
        let _ = self
            .exec(
                &ExecRequest::argv(["tail", "-n", "25", "/var/log/cloud-init-output.log"])
                    .with_timeout(Some(Duration::from_secs(30))),
                &tail,
            )
            .await;
        MachineError::CloudInit {
            what,
            report: report.trim_end().to_owned(),
            log_tail: String::from_utf8_lossy(&tail.stdout())
                .trim_end()
                .to_owned(),
        }
    }

    /// Asks the agent to power the guest off; returns once the agent acknowledged (the
    /// caller watches QEMU exit).
    pub async fn poweroff(&self) -> Result<(), MachineError> {
        match self.call(&Message::Poweroff).await? {
            Message::Ok => Ok(()),
            other => Err(self.protocol_error(&other, "Ok")),
        }
    }

    /// Flushes the guest's file systems.
    pub async fn sync(&self) -> Result<(), MachineError> {
        match self.call(&Message::Sync).await? {
            Message::Ok => Ok(()),
            other => Err(self.protocol_error(&other, "Ok")),
        }
    }

    /// A round trip through the agent.
    pub async fn ping(&self) -> Result<(), MachineError> {
        match self.call(&Message::Ping).await? {
            Message::Ok => Ok(()),
            other => Err(self.protocol_error(&other, "Ok")),
        }
    }

    fn protocol_error(&self, got: &Message, wanted: &str) -> MachineError {
        MachineError::Protocol {
            target: self.describe.clone(),
            detail: format!("got `{}` while waiting for `{wanted}`", got.name()),
        }
    }
}

fn check_protocol(describe: &str, hello: &HelloInfo) -> Result<(), MachineError> {
    if hello.protocol != protocol::PROTOCOL_VERSION {
        return Err(MachineError::Protocol {
            target: describe.to_owned(),
            detail: format!(
                "the agent speaks protocol {} (agent {}), this builder speaks {}",
                hello.protocol,
                hello.agent_version,
                protocol::PROTOCOL_VERSION
            ),
        });
    }
    Ok(())
}

fn hello_of(msg: Message, describe: &str) -> Result<HelloInfo, MachineError> {
    match msg {
        Message::Hello(h) => Ok(h),
        other => Err(MachineError::Protocol {
            target: describe.to_owned(),
            detail: format!("got `{}` while waiting for `Hello`", other.name()),
        }),
    }
}

fn exec_spec(
    request: &ExecRequest,
    secret_env: &[(String, String)],
) -> Result<ExecSpec, MachineError> {
    let program = match &request.program {
        Program::Argv(argv) => ProgramSpec::Argv(argv.clone()),
        Program::Script { interpreter, body } => ProgramSpec::Script {
            interpreter: interpreter.clone(),
            body: body.clone(),
        },
    };
    let cwd = match &request.cwd {
        Some(c) => Some(path_str(c)?),
        None => None,
    };
    Ok(ExecSpec {
        program: Some(program),
        env: request.env.clone(),
        secret_env: secret_env.to_vec(),
        cwd,
        user: request.user.clone(),
        timeout_ms: request
            .timeout
            .map(|t| t.as_millis().min(u128::from(u64::MAX)) as u64),
        stdin: false,
        pty: None,
    })
}

/// The content of a put: bytes in memory or a host file read as it goes.
enum Source {
    Bytes(Vec<u8>, usize),
    File(fs_err::tokio::File),
}

impl Source {
    async fn open(content: FileSource) -> Result<Source, MachineError> {
        Ok(match content {
            FileSource::Bytes(b) => Source::Bytes(b, 0),
            FileSource::Path(p) => Source::File(fs_err::tokio::File::open(&p).await?),
        })
    }

    /// Fills `buf` as far as the content goes; 0 at the end.
    async fn fill(&mut self, buf: &mut [u8]) -> Result<usize, MachineError> {
        match self {
            Source::Bytes(b, pos) => {
                let n = (b.len() - *pos).min(buf.len());
                buf[..n].copy_from_slice(&b[*pos..*pos + n]);
                *pos += n;
                Ok(n)
            }
            Source::File(f) => Ok(super::read_full(f, buf).await?),
        }
    }
}

#[async_trait]
impl Machine for AgentMachine {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn info(&self) -> Result<MachineInfo, MachineError> {
        let h = hello_of(self.call(&Message::HelloRequest).await?, &self.describe)?;
        Ok(MachineInfo {
            os_id: h.os_id,
            os_pretty: h.os_pretty,
            arch: h.arch,
            boot_id: h.boot_id,
        })
    }

    async fn exec(
        &self,
        request: &ExecRequest,
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, MachineError> {
        self.exec_with_secrets(request, &[], sink).await
    }

    async fn put_file(
        &self,
        remote: &Path,
        content: FileSource,
        options: &PutOptions,
    ) -> Result<FileInfo, MachineError> {
        let path = path_str(remote)?;
        let spec = PutSpec {
            path: path.clone(),
            mode: options.mode,
            owner: options.owner.clone(),
            group: options.group.clone(),
            create_parents: options.create_parents,
            append: options.append,
        };
        let mut source = Source::open(content).await?;
        let mut req = self.request()?;
        req.send(&Message::PutFile(spec))?;
        let mut credits: u64 = 0;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut chunk = vec![0u8; protocol::CHUNK_SIZE];
        loop {
            // Take what arrived meanwhile without waiting; wait only when out of credit.
            while let Some(incoming) = req.try_recv() {
                match incoming.map_err(|d| MachineError::Protocol {
                    target: self.describe.clone(),
                    detail: d,
                })? {
                    Message::Credit(n) => credits += u64::from(n),
                    Message::Error { message, .. } => {
                        req.finish();
                        return Err(MachineError::Refused { message });
                    }
                    other => return Err(req.unexpected(&other, "credit")),
                }
            }
            if credits == 0 {
                match req.recv().await? {
                    Message::Credit(n) => credits += u64::from(n),
                    Message::Error { message, .. } => {
                        req.finish();
                        return Err(MachineError::Refused { message });
                    }
                    other => return Err(req.unexpected(&other, "credit")),
                }
                continue;
            }
            let n = source.fill(&mut chunk).await?;
            if n == 0 {
                break;
            }
            hasher.update(&chunk[..n]);
            size += n as u64;
            req.send(&Message::Data(chunk[..n].to_vec()))?;
            credits -= 1;
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        req.send(&Message::End { size, sha256 })?;
        loop {
            match req.recv().await? {
                Message::Credit(_) => {}
                Message::Done {
                    size: their_size,
                    sha256: theirs,
                } => {
                    req.finish();
                    if theirs != sha256 || their_size != size {
                        return Err(MachineError::PutMismatch {
                            path,
                            target: self.describe.clone(),
                            sent: Box::new(FileInfo {
                                size,
                                sha256: protocol::hex(&sha256),
                            }),
                            written: Box::new(FileInfo {
                                size: their_size,
                                sha256: protocol::hex(&theirs),
                            }),
                        });
                    }
                    return Ok(FileInfo {
                        size,
                        sha256: protocol::hex(&sha256),
                    });
                }
                Message::Error { message, .. } => {
                    req.finish();
                    return Err(MachineError::Refused { message });
                }
                other => return Err(req.unexpected(&other, "the agent's confirmation")),
            }
        }
    }

    async fn get_file(&self, remote: &Path, local: &Path) -> Result<FileInfo, MachineError> {
        let path = path_str(remote)?;
        let mut req = self.request()?;
        req.send(&Message::GetFile { path: path.clone() })?;
        let mode = match req.recv().await? {
            Message::FileStart { mode, .. } => mode,
            Message::Error { message, .. } => {
                req.finish();
                return Err(MachineError::Refused { message });
            }
            other => return Err(req.unexpected(&other, "FileStart")),
        };
        let tmp = LocalTemp::next_to(local);
        let mut file = fs_err::tokio::File::create(tmp.path()).await?;
        req.send(&Message::Credit(protocol::WINDOW_CHUNKS))?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        loop {
            match req.recv().await? {
                Message::Data(d) => {
                    // Grant the next chunk first, so the agent reads while we write.
                    req.send(&Message::Credit(1))?;
                    hasher.update(&d);
                    size += d.len() as u64;
                    file.write_all(&d).await?;
                }
                Message::End {
                    size: their_size,
                    sha256: theirs,
                } => {
                    req.finish();
                    let ours: [u8; 32] = hasher.finalize().into();
                    if ours != theirs || their_size != size {
                        return Err(MachineError::GetMismatch {
                            path,
                            target: self.describe.clone(),
                            received: Box::new(FileInfo {
                                size,
                                sha256: protocol::hex(&ours),
                            }),
                            reported: format!(
                                "the agent sent {}",
                                FileInfo {
                                    size: their_size,
                                    sha256: protocol::hex(&theirs),
                                }
                            )
                            .into(),
                        });
                    }
                    file.flush().await?;
                    file.sync_all().await?;
                    drop(file);
                    use std::os::unix::fs::PermissionsExt;
                    // The guest's permission bits, without set-id bits that mean nothing here.
                    let _ = fs_err::set_permissions(
                        tmp.path(),
                        std::fs::Permissions::from_mode(mode & 0o777),
                    );
                    tmp.rename_to(local)?;
                    return Ok(FileInfo {
                        size,
                        sha256: protocol::hex(&ours),
                    });
                }
                Message::Error { message, .. } => {
                    req.finish();
                    return Err(MachineError::Refused { message });
                }
                other => return Err(req.unexpected(&other, "file data")),
            }
        }
    }

    async fn stat(&self, remote: &Path) -> Result<Option<FileStat>, MachineError> {
        let path = path_str(remote)?;
        match self.call(&Message::Stat { path }).await? {
            Message::StatReply(s) => Ok(s.as_ref().map(stat_of)),
            other => Err(self.protocol_error(&other, "StatReply")),
        }
    }

    async fn list(&self, remote: &Path) -> Result<Vec<DirEntry>, MachineError> {
        let path = path_str(remote)?;
        match self.call(&Message::List { path }).await? {
            Message::ListReply(entries) => Ok(entries
                .iter()
                .map(|(name, s)| DirEntry {
                    name: name.clone(),
                    stat: stat_of(s),
                })
                .collect()),
            other => Err(self.protocol_error(&other, "ListReply")),
        }
    }

    /// Sends `Reboot`, then waits for a `Hello` with a new boot id: on the same stream (QEMU
    /// keeps its chardev socket open across a guest reboot) or, when that stream ends, on new
    /// ones from the [`Connector`], retried until the reboot timeout.
    async fn reboot(&self) -> Result<(), MachineError> {
        if let Some(hint) = &self.no_reboot {
            return Err(MachineError::Unsupported {
                what: "rebooting".into(),
                target: self.describe.clone(),
                hint: hint.clone(),
            });
        }
        let before = match self.hello() {
            Some(h) => h.boot_id,
            None => self.info().await?.boot_id,
        };
        let deadline = Instant::now() + REBOOT_TIMEOUT;
        match self.call(&Message::Reboot).await {
            Ok(Message::Ok) => {}
            Ok(other) => return Err(self.protocol_error(&other, "Ok")),
            // The agent may go down before its answer gets out; the boot id decides.
            Err(MachineError::Disconnected { .. }) | Err(MachineError::Protocol { .. }) => {}
            Err(e) => return Err(e),
        }
        let new_boot = |h: &HelloInfo| !h.boot_id.is_empty() && h.boot_id != before;
        let mut last_problem = String::from("no answer");
        loop {
            let conn = self.conn();
            match conn.wait_hello(deadline, new_boot).await {
                Ok(hello) => return check_protocol(&self.describe, &hello),
                Err(WaitHello::TimedOut) => break,
                Err(WaitHello::Closed(detail)) => last_problem = detail,
            }
            let Some(connector) = &self.connector else {
                return Err(MachineError::Disconnected {
                    target: self.describe.clone(),
                    detail: format!(
                        "{last_problem} during the reboot, and this target has no way to reconnect"
                    ),
                });
            };
            // Reconnect until a stream stays up; wait_hello above decides about the boot id.
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                match connector.connect().await {
                    Ok(stream) => {
                        let fresh = Connection::start(stream, self.describe.clone());
                        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
                        break;
                    }
                    Err(e) => {
                        last_problem = e.to_string();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(MachineError::NotBack {
            target: self.describe.clone(),
            secs: REBOOT_TIMEOUT.as_secs(),
            why: format!("no agent hello with a new boot id; last problem: {last_problem}"),
        })
    }
}
