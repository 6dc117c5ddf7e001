//! A small asynchronous QMP client on a tokio unix socket.
//!
//! Why our own and not the `qapi` crate's stream: `qapi` decodes every message into typed
//! enums inside the stream, and one message it cannot decode (an event or reply shape added by
//! a newer QEMU) ends the whole connection (arcnmx/qapi-rs#23). A build must never lose its
//! control channel that way, so this client owns the stream: it reads raw JSON lines, and a
//! line it cannot parse or classify is logged and skipped, never fatal. Typed structs exist only
//! for the handful of commands and events builder uses (below); adding `qapi-qmp` for them
//! would cost about a minute of compile time on our 2-core machines for ~10 structs.
//!
//! Requests carry an `"id"`; replies are routed to the waiting caller by that id, so commands
//! may be issued from several tasks at once. Events go to a broadcast channel.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, oneshot, watch};

/// Longest line we accept from QEMU; anything longer is skipped (QEMU's replies to the
/// commands we send are a few hundred bytes).
const MAX_LINE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("could not connect to the QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP greeting not received: {0}")]
    Greeting(String),
    #[error("the QMP connection closed (QEMU exited or closed its monitor)")]
    Closed,
    #[error("could not send a QMP command")]
    Send(#[source] std::io::Error),
    /// QEMU answered the command with an error.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("QMP command `{command}` returned something unexpected: {detail}")]
    Decode {
        command: &'static str,
        detail: String,
    },
    #[error("QMP command `{command}` got no answer within {secs} s")]
    Timeout { command: &'static str, secs: u64 },
}

/// A QMP command: its wire name, its arguments (the struct itself) and its typed return.
pub trait Command: Serialize {
    const NAME: &'static str;
    type Returns: DeserializeOwned;
}

/// Empty `{}` return of most commands.
#[derive(Debug, Deserialize)]
pub struct Empty {}

macro_rules! command {
    ($ty:ident, $name:literal, $ret:ty) => {
        #[derive(Debug, Serialize)]
        pub struct $ty {}
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Returns = $ret;
        }
    };
}

command!(QmpCapabilities, "qmp_capabilities", Empty);
command!(QueryStatus, "query-status", StatusInfo);
command!(QueryKvm, "query-kvm", KvmInfo);
command!(SystemPowerdown, "system_powerdown", Empty);
command!(SystemReset, "system_reset", Empty);
command!(Quit, "quit", Empty);
command!(Cont, "cont", Empty);

/// HMP through QMP; used only by the KVM probe (`info registers`).
#[derive(Debug, Serialize)]
pub struct HumanMonitorCommand {
    #[serde(rename = "command-line")]
    pub command_line: String,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Returns = String;
}

#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KvmInfo {
    pub enabled: bool,
    pub present: bool,
}

/// An event as QEMU sent it; [`QmpEvent::kind`] decodes the ones builder reacts to.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// The events builder reacts to, decoded leniently: a field we cannot read becomes its
/// default rather than an error, and every other event is [`EventKind::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The guest or the host shut the VM down (`guest: true` when the guest did).
    Shutdown {
        guest: bool,
        reason: String,
    },
    /// ACPI power button pressed (our `system_powerdown`).
    Powerdown,
    Reset {
        guest: bool,
    },
    Stop,
    Resume,
    /// A virtio-serial port was opened or closed by the guest.
    VserportChange {
        id: String,
        open: bool,
    },
    /// The guest kernel panicked (through pvpanic).
    GuestPanicked {
        action: String,
    },
    Other(String),
}

impl QmpEvent {
    pub fn kind(&self) -> EventKind {
        let s = |k: &str| {
            self.data
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let b = |k: &str| self.data.get(k).and_then(Value::as_bool).unwrap_or(false);
        match self.name.as_str() {
            "SHUTDOWN" => EventKind::Shutdown {
                guest: b("guest"),
                reason: s("reason"),
            },
            "POWERDOWN" => EventKind::Powerdown,
            "RESET" => EventKind::Reset { guest: b("guest") },
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "VSERPORT_CHANGE" => EventKind::VserportChange {
                id: s("id"),
                open: b("open"),
            },
            "GUEST_PANICKED" => EventKind::GuestPanicked {
                action: s("action"),
            },
            other => EventKind::Other(other.to_string()),
        }
    }
}

type Reply = Result<Value, (String, String)>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// A connected, negotiated QMP session. Cheap to share behind an `Arc`.
pub struct Qmp {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    log: Option<Arc<Mutex<std::fs::File>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What a line from QEMU turned out to be.
#[derive(Debug, PartialEq)]
enum Message {
    Greeting,
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(String, Value),
    /// Valid JSON of a shape we do not know, or not JSON at all: skipped.
    Unknown(String),
}

fn classify(line: &[u8]) -> Message {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Message::Unknown(format!("not JSON ({e})")),
    };
    let id = value.get("id").and_then(Value::as_u64);
    if value.get("QMP").is_some() {
        Message::Greeting
    } else if let Some(ret) = value.get("return") {
        Message::Return {
            id,
            value: ret.clone(),
        }
    } else if let Some(err) = value.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        }
    } else if let Some(name) = value.get("event").and_then(Value::as_str) {
        Message::Event(
            name.to_string(),
            value.get("data").cloned().unwrap_or(Value::Null),
        )
    } else {
        Message::Unknown("JSON of an unknown shape".into())
    }
}

impl Qmp {
    /// Connect to QEMU's QMP socket, read the greeting and leave capabilities negotiation.
    /// `log`: every line in and out, and every skipped message, is appended there.
    pub async fn connect(path: &Path, log: Option<std::fs::File>) -> Result<Qmp, QmpError> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        Self::handshake(read, write, log).await
    }

    /// The session over any byte stream (tests use an in-memory duplex).
    pub async fn handshake<R, W>(
        read: R,
        write: W,
        log: Option<std::fs::File>,
    ) -> Result<Qmp, QmpError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let log = log.map(|f| Arc::new(Mutex::new(f)));
        let mut reader = BufReader::new(read);
        // The greeting is the first message QEMU sends; skip anything that is not one.
        let greeting = async {
            loop {
                match read_line(&mut reader).await {
                    Ok(Some(line)) => {
                        log_line(&log, "<", &line);
                        if classify(&line) == Message::Greeting {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Err("the socket closed".to_string()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), greeting)
            .await
            .map_err(|_| QmpError::Greeting("nothing within 10 s".into()))?
            .map_err(QmpError::Greeting)?;

        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            closed_tx,
            log.clone(),
        ));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(Box::new(write)),
            pending,
            next_id: AtomicU64::new(1),
            events,
            closed,
            log,
            reader,
        };
        qmp.execute(&QmpCapabilities {}).await?;
        Ok(qmp)
    }

    /// Events from now on. A receiver that falls behind by more than 256 events loses the
    /// oldest (see [`broadcast`]).
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Resolves when the connection has closed (QEMU exited or crashed).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Run `command` and decode its return value.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Returns, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        #[derive(Serialize)]
        struct Request<'a, A> {
            execute: &'static str,
            arguments: &'a A,
            id: u64,
        }
        let mut line = serde_json::to_vec(&Request {
            execute: C::NAME,
            arguments: command,
            id,
        })
        .map_err(|e| QmpError::Decode {
            command: C::NAME,
            detail: format!("could not encode the arguments: {e}"),
        })?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id, tx);
        }
        if self.is_closed() {
            if let Ok(mut pending) = self.pending.lock() {
                pending.remove(&id);
            }
            return Err(QmpError::Closed);
        }
        log_line(&self.log, ">", &line);
        {
            let mut writer = self.writer.lock().await;
            let sent = async {
                writer.write_all(&line).await?;
                writer.flush().await
            };
            if let Err(e) = sent.await {
                if let Ok(mut pending) = self.pending.lock() {
                    pending.remove(&id);
                }
                return Err(QmpError::Send(e));
            }
        }
        let value = match rx.await {
            Ok(Ok(value)) => value,
            Ok(Err((class, desc))) => {
                return Err(QmpError::Command {
                    command: C::NAME,
                    class,
                    desc,
                });
            }
            // The reader dropped our sender: the connection closed before the reply.
            Err(_) => return Err(QmpError::Closed),
        };
        serde_json::from_value(value.clone()).map_err(|e| QmpError::Decode {
            command: C::NAME,
            detail: format!("{e} in {value}"),
        })
    }

    /// [`Qmp::execute`] bounded by `timeout`.
    pub async fn execute_within<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> Result<C::Returns, QmpError> {
        tokio::time::timeout(timeout, self.execute(command))
            .await
            .map_err(|_| QmpError::Timeout {
                command: C::NAME,
                secs: timeout.as_secs(),
            })?
    }
}

/// One line without its terminator; `None` at end of file. Over-long lines are consumed and
/// returned truncated (they will fail to parse and be skipped).
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(pos) => (&buf[..pos + 1], true),
            None => (buf, false),
        };
        let take = chunk.len();
        if line.len() < MAX_LINE {
            line.extend_from_slice(&chunk[..take.min(MAX_LINE - line.len())]);
        }
        reader.consume(take);
        if done {
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

fn log_line(log: &Option<Arc<Mutex<std::fs::File>>>, dir: &str, line: &[u8]) {
    if let Some(log) = log
        && let Ok(mut f) = log.lock()
    {
        let text = String::from_utf8_lossy(line);
        let _ = writeln!(f, "{dir} {}", text.trim_end());
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
    log: Option<Arc<Mutex<std::fs::File>>>,
) {
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        log_line(&log, "<", &line);
        match classify(&line) {
            Message::Return {
                id: Some(id),
                value,
            } => deliver(&pending, id, Ok(value), &log),
            Message::Error {
                id: Some(id),
                class,
                desc,
            } => deliver(&pending, id, Err((class, desc)), &log),
            Message::Event(name, data) => {
                // No receiver is fine: nobody is waiting for events right now.
                let _ = events.send(QmpEvent { name, data });
            }
            Message::Return { id: None, .. } | Message::Error { id: None, .. } => {
                log_line(&log, "!", b"skipped: a reply without an id");
            }
            Message::Greeting => log_line(&log, "!", b"skipped: a second greeting"),
            Message::Unknown(why) => log_line(&log, "!", format!("skipped: {why}").as_bytes()),
        }
    }
    // Mark closed first, then fail every caller still waiting: `execute` registers its
    // request and then re-checks `closed`, so no caller can wait on a reply that never comes.
    let _ = closed.send(true);
    if let Ok(mut pending) = pending.lock() {
        pending.clear();
    }
}

fn deliver(pending: &Pending, id: u64, reply: Reply, log: &Option<Arc<Mutex<std::fs::File>>>) {
    let sender = pending.lock().ok().and_then(|mut p| p.remove(&id));
    match sender {
        Some(tx) => {
            let _ = tx.send(reply);
        }
        None => log_line(
            log,
            "!",
            format!("skipped: a reply to unknown id {id}").as_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    /// A scripted QMP server on one end of an in-memory pipe: answers each request with its
    /// id echoed, after sending the given noise lines first.
    async fn fake_server(
        server: tokio::io::DuplexStream,
        noise: Vec<&'static [u8]>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (read, mut write) = tokio::io::split(server);
            write
                .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7}}, \"capabilities\": [\"oob\"]}}\r\n")
                .await
                .expect("pipe open");
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: Value = serde_json::from_str(&line).expect("client sends JSON");
                let id = req["id"].clone();
                for n in &noise {
                    write.write_all(n).await.expect("pipe open");
                    write.write_all(b"\r\n").await.expect("pipe open");
                }
                let reply = match req["execute"].as_str() {
                    Some("query-status") => {
                        serde_json::json!({"return": {"running": true, "status": "running", "singlestep": false}, "id": id})
                    }
                    Some("quit") => {
                        serde_json::json!({"error": {"class": "GenericError", "desc": "nope"}, "id": id})
                    }
                    _ => serde_json::json!({"return": {}, "id": id}),
                };
                let mut out = serde_json::to_vec(&reply).expect("json");
                out.extend_from_slice(b"\r\n");
                write.write_all(&out).await.expect("pipe open");
                if req["execute"] == "system_powerdown" {
                    write
                        .write_all(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"POWERDOWN\"}\r\n")
                        .await
                        .expect("pipe open");
                    write
                        .write_all(b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\r\n")
                        .await
                        .expect("pipe open");
                    return;
                }
            }
        })
    }

    #[tokio::test]
    async fn garbage_and_unknown_messages_are_skipped_not_fatal() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let noise: Vec<&'static [u8]> = vec![
            b"this is not json",
            b"\xff\xfe invalid utf-8 \xc3",
            b"{\"something\": \"new in QEMU 12\"}",
            b"{\"event\": \"BRAND_NEW_EVENT\", \"data\": {\"weird\": [1,2,{\"x\":null}]}}",
            b"{\"return\": {}, \"id\": 999999}",
            b"{\"return\": 5}",
            b"[1,2,3]",
            b"",
        ];
        let _server = fake_server(server, noise).await;
        let (read, write) = tokio::io::split(client);
        let log = tempfile::tempfile().expect("temp file");
        let qmp = Qmp::handshake(read, write, Some(log))
            .await
            .expect("handshake");
        let mut events = qmp.events();

        let status = qmp.execute(&QueryStatus {}).await.expect("query-status");
        assert!(status.running);
        assert_eq!(status.status, "running");
        // The stream survived all the noise: a second command still works.
        let err = qmp.execute(&Quit {}).await.expect_err("scripted error");
        assert!(
            matches!(&err, QmpError::Command { class, desc, .. } if class == "GenericError" && desc == "nope"),
            "{err:?}"
        );
        qmp.execute(&SystemPowerdown {}).await.expect("powerdown");

        let mut kinds = Vec::new();
        while kinds.len() < 5 {
            let ev = events.recv().await.expect("events flow");
            kinds.push(ev.kind());
        }
        assert!(kinds.contains(&EventKind::Other("BRAND_NEW_EVENT".into())));
        let tail: Vec<_> = kinds.iter().rev().take(2).cloned().collect();
        assert_eq!(
            tail,
            vec![
                EventKind::Shutdown {
                    guest: true,
                    reason: "guest-shutdown".into()
                },
                EventKind::Powerdown
            ]
        );
        // The server hung up after the shutdown: the client notices and fails new commands.
        qmp.closed().await;
        assert!(matches!(
            qmp.execute(&QueryStatus {}).await,
            Err(QmpError::Closed)
        ));
    }

    #[test]
    fn classify_lines() {
        assert_eq!(classify(b"{\"QMP\": {}}"), Message::Greeting);
        assert_eq!(
            classify(b"{\"return\": {}, \"id\": 3}"),
            Message::Return {
                id: Some(3),
                value: serde_json::json!({})
            }
        );
        assert!(matches!(classify(b"nonsense"), Message::Unknown(_)));
        assert!(matches!(classify(b"{\"a\": 1}"), Message::Unknown(_)));
        assert_eq!(
            classify(
                b"{\"event\": \"VSERPORT_CHANGE\", \"data\": {\"id\": \"port0\", \"open\": true}}"
            ),
            Message::Event(
                "VSERPORT_CHANGE".into(),
                serde_json::json!({"id": "port0", "open": true})
            )
        );
    }

    #[test]
    fn event_kinds_decode_leniently() {
        let ev = |name: &str, data: Value| QmpEvent {
            name: name.into(),
            data,
        };
        assert_eq!(
            ev(
                "VSERPORT_CHANGE",
                serde_json::json!({"id": "port0", "open": true})
            )
            .kind(),
            EventKind::VserportChange {
                id: "port0".into(),
                open: true
            }
        );
        assert_eq!(
            ev(
                "GUEST_PANICKED",
                serde_json::json!({"action": "pause", "info": {}})
            )
            .kind(),
            EventKind::GuestPanicked {
                action: "pause".into()
            }
        );
        // A field of the wrong type does not make the event undecodable.
        assert_eq!(
            ev("SHUTDOWN", serde_json::json!({"guest": "yes"})).kind(),
            EventKind::Shutdown {
                guest: false,
                reason: String::new()
            }
        );
    }
}
