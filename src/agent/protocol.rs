//! The host↔guest agent protocol: framed binary messages over one byte stream (a virtio-serial
//! port in the guest, QEMU's chardev unix socket on the host).
//!
//! Shared by the host (`builder::agent::protocol`) and the guest agent (`agent/`, which
//! includes this file by path), so it is std-only: no serde, no tokio, no allocation tricks.
//!
//! # Frames
//!
//! ```text
//! offset size
//!  0     2    magic "BA"
//!  2     1    frame format version (1)
//!  3     1    message type (see `Message::type_code`)
//!  4     4    request id, u32 little-endian
//!  8     4    payload length, u32 little-endian, at most MAX_PAYLOAD (1 MiB + 4 KiB)
//! 12     n    payload
//! ```
//!
//! The payload is the message's fields in order, encoded by hand: `u8`, `u16`, `u32`, `u64`,
//! `i32` little-endian; `bytes` = u32 length + bytes; `string` = bytes that must be UTF-8;
//! `option<T>` = u8 0/1 then T; `list<T>` = u32 count then T…; `pairs` = list of
//! (string, string). A decoder never panics: garbage yields a [`ProtocolError`].
//!
//! # Requests and replies
//!
//! The host picks a request id (non-zero) per request; every frame that belongs to that
//! request, in either direction, carries it, so many requests may be in flight at once. Id 0 is
//! the agent's unsolicited `Hello`, sent each time it (re)opens the port.
//!
//! | request (host→agent)   | replies (agent→host)                                         |
//! |------------------------|--------------------------------------------------------------|
//! | `HelloRequest`         | `Hello`                                                      |
//! | `Exec`                 | `Output`… then `Exited` (or `Error` if it could not start)   |
//! |   + `Stdin`, `Resize`, `Kill` (same id) while it runs                                 |
//! | `PutFile`              | `Credit(n)` (opened; send n chunks), more `Credit`s as chunks |
//! |   + `Data`… `End`      | are written, then `Done{size,sha256}` after verify+fsync+rename |
//! | `GetFile`              | `FileStart{size,mode}`, then `Data`… as the host grants      |
//! |   + `Credit(n)`        | `Credit`s, then `End{size,sha256}`                           |
//! | `Stat`                 | `StatReply`        | `List` | `ListReply`                    |
//! | `Sync`, `Ping`         | `Ok`               | `Reboot`, `Poweroff` | `Ok`, then the agent goes away |
//! | anything               | `Error{code,message}` instead, when it fails                 |
//!
//! Flow control: the receiver of a transfer grants credit in chunks of at most
//! [`CHUNK_SIZE`] bytes; the sender never has more ungranted chunks in flight. With a window of
//! [`WINDOW_CHUNKS`] chunks the pipe never idles, and a slow disk on either end never makes
//! the other end buffer without bound or stall unrelated requests.
//!
//! A transfer's content is hashed incrementally on both ends; the receiver compares its
//! sha256 with the sender's `End` and only then renames its temporary file into place.
//! `Data` frames can be built in place ([`finish_data_frame`]) and read without the generic
//! decoder, so a chunk is copied as little as possible (the guest may be emulated).
//!
//! # Getting back in step
//!
//! A frame whose header is fine but whose payload is not is answered with `Error` for its id;
//! the stream is still in step. A bad header (stale bytes after a guest reboot, a torn frame)
//! makes the reader slide forward byte by byte to the next plausible header; the host then asks
//! for a fresh `Hello`. Requests in flight at that moment fail.

use std::fmt;
use std::io::{self, Read};

pub const MAGIC: [u8; 2] = *b"BA";
/// Frame format version, in every frame header.
pub const FRAME_VERSION: u8 = 1;
/// Protocol version announced in `Hello`; bumped when messages change meaning.
pub const PROTOCOL_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 12;
/// Data chunk size for transfers: large, so per-frame overhead is negligible.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Largest payload accepted: one chunk plus room for fields, never more.
pub const MAX_PAYLOAD: usize = 1024 * 1024 + 4096;
/// Chunks a transfer's receiver grants up front (4 MiB).
pub const WINDOW_CHUNKS: u32 = 16;
/// Type code of `Data` frames, for code that builds or reads them without copying.
pub const TYPE_DATA: u8 = 0x20;
/// Bytes in front of a `Data` frame's content: the header and the content's u32 length.
pub const DATA_PREFIX: usize = HEADER_LEN + 4;
/// The default virtio-serial port name (`/dev/virtio-ports/<name>` in the guest).
pub const DEFAULT_PORT_NAME: &str = "org.builder.agent.0";

/// Error codes carried by `Message::Error`.
pub mod code {
    pub const NOT_FOUND: u32 = 1;
    pub const PERMISSION: u32 = 2;
    pub const BAD_REQUEST: u32 = 3;
    pub const IO: u32 = 4;
    pub const CHECKSUM: u32 = 5;
    pub const SPAWN: u32 = 6;
    pub const UNSUPPORTED: u32 = 7;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    BadMagic([u8; 2]),
    BadVersion(u8),
    UnknownType(u8),
    TooLarge(u32),
    /// The payload ended before this field.
    Truncated(&'static str),
    /// The payload has bytes after the last field.
    Trailing(usize),
    BadUtf8(&'static str),
    Invalid(&'static str),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadMagic(m) => write!(f, "bad frame magic {:02x}{:02x}", m[0], m[1]),
            ProtocolError::BadVersion(v) => write!(f, "unsupported frame version {v}"),
            ProtocolError::UnknownType(t) => write!(f, "unknown message type {t:#04x}"),
            ProtocolError::TooLarge(n) => {
                write!(f, "frame payload of {n} bytes exceeds {MAX_PAYLOAD}")
            }
            ProtocolError::Truncated(what) => write!(f, "payload ends inside field `{what}`"),
            ProtocolError::Trailing(n) => write!(f, "{n} unexpected bytes after the payload"),
            ProtocolError::BadUtf8(what) => write!(f, "field `{what}` is not UTF-8"),
            ProtocolError::Invalid(what) => write!(f, "invalid value in field `{what}`"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// What an `Exec` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgramSpec {
    Argv(Vec<String>),
    /// The agent writes `body` to a private temporary file and runs `interpreter <file>`.
    Script {
        interpreter: String,
        body: String,
    },
}

/// An `Exec` request. `Debug` never shows `secret_env` values.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ExecSpec {
    pub program: Option<ProgramSpec>,
    pub env: Vec<(String, String)>,
    /// Like `env`, but the values are never printed or logged by either side.
    pub secret_env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// A user name or numeric uid, looked up in the guest's /etc/passwd.
    pub user: Option<String>,
    pub timeout_ms: Option<u64>,
    /// The host sends `Stdin` frames; otherwise stdin is /dev/null.
    pub stdin: bool,
    /// Run on a new pseudo-terminal of this size (rows, cols); stdout carries everything.
    pub pty: Option<(u16, u16)>,
}

impl fmt::Debug for ExecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret_names: Vec<&str> = self.secret_env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ExecSpec")
            .field("program", &self.program)
            .field("env", &self.env)
            .field(
                "secret_env",
                &format_args!("{secret_names:?} (values redacted)"),
            )
            .field("cwd", &self.cwd)
            .field("user", &self.user)
            .field("timeout_ms", &self.timeout_ms)
            .field("stdin", &self.stdin)
            .field("pty", &self.pty)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutSpec {
    pub path: String,
    pub mode: Option<u32>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub create_parents: bool,
    pub append: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HelloInfo {
    pub protocol: u32,
    pub agent_version: String,
    pub os_id: String,
    pub os_pretty: String,
    pub arch: String,
    pub boot_id: String,
    pub pid: u32,
    /// `absent`, `running`, `done`, `error` or `unknown`: a quick look, not a wait.
    pub cloud_init: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatInfo {
    pub kind: StatKind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // host → agent
    HelloRequest,
    Exec(ExecSpec),
    /// Bytes for a running exec's stdin; empty closes it.
    Stdin(Vec<u8>),
    Resize {
        rows: u16,
        cols: u16,
    },
    /// Kill the exec's whole process group.
    Kill,
    PutFile(PutSpec),
    GetFile {
        path: String,
    },
    Stat {
        path: String,
    },
    List {
        path: String,
    },
    Sync,
    Reboot,
    Poweroff,
    Ping,
    // either direction
    Data(Vec<u8>),
    Credit(u32),
    End {
        size: u64,
        sha256: [u8; 32],
    },
    // agent → host
    Hello(HelloInfo),
    Output {
        stream: OutStream,
        data: Vec<u8>,
    },
    Exited {
        kind: ExitKind,
        duration_ms: u64,
    },
    FileStart {
        size: u64,
        mode: u32,
    },
    Done {
        size: u64,
        sha256: [u8; 32],
    },
    StatReply(Option<StatInfo>),
    ListReply(Vec<(String, StatInfo)>),
    Ok,
    Error {
        code: u32,
        message: String,
    },
}

impl Message {
    pub fn type_code(&self) -> u8 {
        match self {
            Message::HelloRequest => 0x01,
            Message::Exec(_) => 0x02,
            Message::Stdin(_) => 0x03,
            Message::Resize { .. } => 0x04,
            Message::Kill => 0x05,
            Message::PutFile(_) => 0x06,
            Message::GetFile { .. } => 0x07,
            Message::Stat { .. } => 0x08,
            Message::List { .. } => 0x09,
            Message::Sync => 0x0a,
            Message::Reboot => 0x0b,
            Message::Poweroff => 0x0c,
            Message::Ping => 0x0d,
            Message::Data(_) => TYPE_DATA,
            Message::Credit(_) => 0x21,
            Message::End { .. } => 0x22,
            Message::Hello(_) => 0x40,
            Message::Output { .. } => 0x41,
            Message::Exited { .. } => 0x42,
            Message::FileStart { .. } => 0x43,
            Message::Done { .. } => 0x44,
            Message::StatReply(_) => 0x45,
            Message::ListReply(_) => 0x46,
            Message::Ok => 0x47,
            Message::Error { .. } => 0x4f,
        }
    }

    /// A short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Message::HelloRequest => "HelloRequest",
            Message::Exec(_) => "Exec",
            Message::Stdin(_) => "Stdin",
            Message::Resize { .. } => "Resize",
            Message::Kill => "Kill",
            Message::PutFile(_) => "PutFile",
            Message::GetFile { .. } => "GetFile",
            Message::Stat { .. } => "Stat",
            Message::List { .. } => "List",
            Message::Sync => "Sync",
            Message::Reboot => "Reboot",
            Message::Poweroff => "Poweroff",
            Message::Ping => "Ping",
            Message::Data(_) => "Data",
            Message::Credit(_) => "Credit",
            Message::End { .. } => "End",
            Message::Hello(_) => "Hello",
            Message::Output { .. } => "Output",
            Message::Exited { .. } => "Exited",
            Message::FileStart { .. } => "FileStart",
            Message::Done { .. } => "Done",
            Message::StatReply(_) => "StatReply",
            Message::ListReply(_) => "ListReply",
            Message::Ok => "Ok",
            Message::Error { .. } => "Error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: u32,
    pub msg: Message,
}

// ---------------------------------------------------------------------------------------------
// Encoding

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    fn bytes(&mut self, v: &[u8]) {
        // Lengths above u32 cannot occur: the frame is checked against MAX_PAYLOAD.
        self.u32(v.len().min(u32::MAX as usize) as u32);
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn opt_str(&mut self, v: &Option<String>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    fn pairs(&mut self, v: &[(String, String)]) {
        self.u32(v.len() as u32);
        for (k, val) in v {
            self.str(k);
            self.str(val);
        }
    }
    fn stat(&mut self, s: &StatInfo) {
        self.u8(match s.kind {
            StatKind::File => 0,
            StatKind::Dir => 1,
            StatKind::Symlink => 2,
            StatKind::Other => 3,
        });
        self.u64(s.size);
        self.u32(s.mode);
        self.u32(s.uid);
        self.u32(s.gid);
    }
}

/// Encodes a frame (header and payload). Fails only when the payload exceeds [`MAX_PAYLOAD`],
/// e.g. a script body or a path list too big for one frame.
pub fn encode(id: u32, msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut e = Enc(Vec::with_capacity(HEADER_LEN + 64));
    e.0.extend_from_slice(&MAGIC);
    e.u8(FRAME_VERSION);
    e.u8(msg.type_code());
    e.u32(id);
    e.u32(0); // length, patched below
    match msg {
        Message::HelloRequest
        | Message::Kill
        | Message::Sync
        | Message::Reboot
        | Message::Poweroff
        | Message::Ping
        | Message::Ok => {}
        Message::Exec(x) => {
            match &x.program {
                None => e.u8(0),
                Some(ProgramSpec::Argv(argv)) => {
                    e.u8(1);
                    e.u32(argv.len() as u32);
                    for a in argv {
                        e.str(a);
                    }
                }
                Some(ProgramSpec::Script { interpreter, body }) => {
                    e.u8(2);
                    e.str(interpreter);
                    e.str(body);
                }
            }
            e.pairs(&x.env);
            e.pairs(&x.secret_env);
            e.opt_str(&x.cwd);
            e.opt_str(&x.user);
            match x.timeout_ms {
                None => e.u8(0),
                Some(t) => {
                    e.u8(1);
                    e.u64(t);
                }
            }
            e.bool(x.stdin);
            match x.pty {
                None => e.u8(0),
                Some((r, c)) => {
                    e.u8(1);
                    e.u16(r);
                    e.u16(c);
                }
            }
        }
        Message::Stdin(d) | Message::Data(d) => e.bytes(d),
        Message::Resize { rows, cols } => {
            e.u16(*rows);
            e.u16(*cols);
        }
        Message::PutFile(p) => {
            e.str(&p.path);
            match p.mode {
                None => e.u8(0),
                Some(m) => {
                    e.u8(1);
                    e.u32(m);
                }
            }
            e.opt_str(&p.owner);
            e.opt_str(&p.group);
            e.bool(p.create_parents);
            e.bool(p.append);
        }
        Message::GetFile { path } | Message::Stat { path } | Message::List { path } => e.str(path),
        Message::Credit(n) => e.u32(*n),
        Message::End { size, sha256 } | Message::Done { size, sha256 } => {
            e.u64(*size);
            e.0.extend_from_slice(sha256);
        }
        Message::Hello(h) => {
            e.u32(h.protocol);
            e.str(&h.agent_version);
            e.str(&h.os_id);
            e.str(&h.os_pretty);
            e.str(&h.arch);
            e.str(&h.boot_id);
            e.u32(h.pid);
            e.str(&h.cloud_init);
        }
        Message::Output { stream, data } => {
            e.u8(match stream {
                OutStream::Stdout => 1,
                OutStream::Stderr => 2,
            });
            e.bytes(data);
        }
        Message::Exited { kind, duration_ms } => {
            match kind {
                ExitKind::Code(c) => {
                    e.u8(0);
                    e.i32(*c);
                }
                ExitKind::Signal(s) => {
                    e.u8(1);
                    e.i32(*s);
                }
                ExitKind::TimedOut => {
                    e.u8(2);
                    e.i32(0);
                }
            }
            e.u64(*duration_ms);
        }
        Message::FileStart { size, mode } => {
            e.u64(*size);
            e.u32(*mode);
        }
        Message::StatReply(s) => match s {
            None => e.u8(0),
            Some(s) => {
                e.u8(1);
                e.stat(s);
            }
        },
        Message::ListReply(entries) => {
            e.u32(entries.len() as u32);
            for (name, s) in entries {
                e.str(name);
                e.stat(s);
            }
        }
        Message::Error { code, message } => {
            e.u32(*code);
            e.str(message);
        }
    }
    let len = e.0.len() - HEADER_LEN;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len.min(u32::MAX as usize) as u32));
    }
    e.0[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(e.0)
}

/// Turns `frame` into a `Data` frame in place: its first [`DATA_PREFIX`] bytes are
/// overwritten with the header, the rest is the content. Lets a sender read file content
/// straight into the frame it sends (no copy, which matters in a slow guest).
pub fn finish_data_frame(id: u32, frame: &mut [u8]) -> Result<(), ProtocolError> {
    let Some(content) = frame.len().checked_sub(DATA_PREFIX) else {
        return Err(ProtocolError::Invalid("data frame shorter than its prefix"));
    };
    let payload = content + 4;
    if payload > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(
            payload.min(u32::MAX as usize) as u32
        ));
    }
    frame[0..2].copy_from_slice(&MAGIC);
    frame[2] = FRAME_VERSION;
    frame[3] = TYPE_DATA;
    frame[4..8].copy_from_slice(&id.to_le_bytes());
    frame[8..12].copy_from_slice(&(payload as u32).to_le_bytes());
    frame[12..16].copy_from_slice(&(content as u32).to_le_bytes());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: u8,
    pub id: u32,
    pub len: usize,
}

/// Checks a header; the payload length is bounded before anyone allocates for it.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
    if h[0..2] != MAGIC {
        return Err(ProtocolError::BadMagic([h[0], h[1]]));
    }
    if h[2] != FRAME_VERSION {
        return Err(ProtocolError::BadVersion(h[2]));
    }
    let ty = h[3];
    let id = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len as usize > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok(Header {
        ty,
        id,
        len: len as usize,
    })
}

struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(ProtocolError::Truncated(what))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        Ok(i32::from_le_bytes(self.arr(what)?))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtocolError::Invalid(what)),
        }
    }
    fn flag(&mut self, what: &'static str) -> Result<bool, ProtocolError> {
        self.bool(what)
    }
    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, ProtocolError> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    fn string(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes(what)?).map_err(|_| ProtocolError::BadUtf8(what))
    }
    fn opt_string(&mut self, what: &'static str) -> Result<Option<String>, ProtocolError> {
        if self.flag(what)? {
            Ok(Some(self.string(what)?))
        } else {
            Ok(None)
        }
    }
    /// A count of items that each take at least `min_item` bytes: checked against what is
    /// left, so a forged count cannot make us reserve gigabytes.
    fn count(&mut self, min_item: usize, what: &'static str) -> Result<usize, ProtocolError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item) > self.b.len() - self.pos {
            return Err(ProtocolError::Truncated(what));
        }
        Ok(n)
    }
    fn pairs(&mut self, what: &'static str) -> Result<Vec<(String, String)>, ProtocolError> {
        let n = self.count(8, what)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push((self.string(what)?, self.string(what)?));
        }
        Ok(v)
    }
    fn stat(&mut self) -> Result<StatInfo, ProtocolError> {
        let kind = match self.u8("stat.kind")? {
            0 => StatKind::File,
            1 => StatKind::Dir,
            2 => StatKind::Symlink,
            3 => StatKind::Other,
            _ => return Err(ProtocolError::Invalid("stat.kind")),
        };
        Ok(StatInfo {
            kind,
            size: self.u64("stat.size")?,
            mode: self.u32("stat.mode")?,
            uid: self.u32("stat.uid")?,
            gid: self.u32("stat.gid")?,
        })
    }
}

/// Decodes the payload of a frame whose header was accepted by [`decode_header`].
pub fn decode_body(ty: u8, payload: &[u8]) -> Result<Message, ProtocolError> {
    let mut d = Dec { b: payload, pos: 0 };
    let msg = match ty {
        0x01 => Message::HelloRequest,
        0x02 => {
            let program = match d.u8("exec.program")? {
                0 => None,
                1 => {
                    let n = d.count(4, "exec.argv")?;
                    let mut argv = Vec::with_capacity(n);
                    for _ in 0..n {
                        argv.push(d.string("exec.argv")?);
                    }
                    Some(ProgramSpec::Argv(argv))
                }
                2 => Some(ProgramSpec::Script {
                    interpreter: d.string("exec.interpreter")?,
                    body: d.string("exec.body")?,
                }),
                _ => return Err(ProtocolError::Invalid("exec.program")),
            };
            let env = d.pairs("exec.env")?;
            let secret_env = d.pairs("exec.secret_env")?;
            let cwd = d.opt_string("exec.cwd")?;
            let user = d.opt_string("exec.user")?;
            let timeout_ms = if d.flag("exec.timeout")? {
                Some(d.u64("exec.timeout")?)
            } else {
                None
            };
            let stdin = d.bool("exec.stdin")?;
            let pty = if d.flag("exec.pty")? {
                Some((d.u16("exec.pty")?, d.u16("exec.pty")?))
            } else {
                None
            };
            Message::Exec(ExecSpec {
                program,
                env,
                secret_env,
                cwd,
                user,
                timeout_ms,
                stdin,
                pty,
            })
        }
        0x03 => Message::Stdin(d.bytes("stdin")?),
        0x04 => Message::Resize {
            rows: d.u16("rows")?,
            cols: d.u16("cols")?,
        },
        0x05 => Message::Kill,
        0x06 => {
            let path = d.string("put.path")?;
            let mode = if d.flag("put.mode")? {
                Some(d.u32("put.mode")?)
            } else {
                None
            };
            Message::PutFile(PutSpec {
                path,
                mode,
                owner: d.opt_string("put.owner")?,
                group: d.opt_string("put.group")?,
                create_parents: d.bool("put.create_parents")?,
                append: d.bool("put.append")?,
            })
        }
        0x07 => Message::GetFile {
            path: d.string("path")?,
        },
        0x08 => Message::Stat {
            path: d.string("path")?,
        },
        0x09 => Message::List {
            path: d.string("path")?,
        },
        0x0a => Message::Sync,
        0x0b => Message::Reboot,
        0x0c => Message::Poweroff,
        0x0d => Message::Ping,
        TYPE_DATA => Message::Data(d.bytes("data")?),
        0x21 => Message::Credit(d.u32("credit")?),
        0x22 => Message::End {
            size: d.u64("end.size")?,
            sha256: d.arr("end.sha256")?,
        },
        0x40 => Message::Hello(HelloInfo {
            protocol: d.u32("hello.protocol")?,
            agent_version: d.string("hello.agent_version")?,
            os_id: d.string("hello.os_id")?,
            os_pretty: d.string("hello.os_pretty")?,
            arch: d.string("hello.arch")?,
            boot_id: d.string("hello.boot_id")?,
            pid: d.u32("hello.pid")?,
            cloud_init: d.string("hello.cloud_init")?,
        }),
        0x41 => {
            let stream = match d.u8("output.stream")? {
                1 => OutStream::Stdout,
                2 => OutStream::Stderr,
                _ => return Err(ProtocolError::Invalid("output.stream")),
            };
            Message::Output {
                stream,
                data: d.bytes("output.data")?,
            }
        }
        0x42 => {
            let tag = d.u8("exited.kind")?;
            let value = d.i32("exited.value")?;
            let kind = match tag {
                0 => ExitKind::Code(value),
                1 => ExitKind::Signal(value),
                2 => ExitKind::TimedOut,
                _ => return Err(ProtocolError::Invalid("exited.kind")),
            };
            Message::Exited {
                kind,
                duration_ms: d.u64("exited.duration")?,
            }
        }
        0x43 => Message::FileStart {
            size: d.u64("filestart.size")?,
            mode: d.u32("filestart.mode")?,
        },
        0x44 => Message::Done {
            size: d.u64("done.size")?,
            sha256: d.arr("done.sha256")?,
        },
        0x45 => {
            if d.flag("stat")? {
                Message::StatReply(Some(d.stat()?))
            } else {
                Message::StatReply(None)
            }
        }
        0x46 => {
            let n = d.count(4 + 21, "list")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let name = d.string("list.name")?;
                v.push((name, d.stat()?));
            }
            Message::ListReply(v)
        }
        0x47 => Message::Ok,
        0x4f => Message::Error {
            code: d.u32("error.code")?,
            message: d.string("error.message")?,
        },
        other => return Err(ProtocolError::UnknownType(other)),
    };
    if d.pos != payload.len() {
        return Err(ProtocolError::Trailing(payload.len() - d.pos));
    }
    Ok(msg)
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((frame, consumed)))` when one is complete.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        // Reject bad magic early, even from a partial header, so garbage is noticed at once.
        if !buf.is_empty() && buf[0] != MAGIC[0] {
            return Err(ProtocolError::BadMagic([
                buf[0],
                buf.get(1).copied().unwrap_or(0),
            ]));
        }
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(head);
    let header = decode_header(&h)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + header.len) else {
        return Ok(None);
    };
    let msg = decode_body(header.ty, payload)?;
    Ok(Some((
        Frame { id: header.id, msg },
        HEADER_LEN + header.len,
    )))
}

/// Why [`read_frame`] failed: the stream, or the bytes on it.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Protocol(ProtocolError),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Protocol(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Reads one frame from a blocking reader: `Ok(None)` on a clean end of stream between
/// frames; an end inside a frame is an error.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ReadError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended inside a frame header",
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let header = decode_header(&h).map_err(ReadError::Protocol)?;
    let mut payload = vec![0u8; header.len];
    r.read_exact(&mut payload).map_err(ReadError::Io)?;
    let msg = decode_body(header.ty, &payload).map_err(ReadError::Protocol)?;
    Ok(Some(Frame { id: header.id, msg }))
}

/// Lower-case hex of a digest, without pulling a hex crate into the agent.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: Message) {
        let bytes = encode(7, &msg).expect("small message");
        let (frame, used) = decode_frame(&bytes).expect("decodes").expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(frame, Frame { id: 7, msg });
        // Every strict prefix is "need more", never an error or a panic.
        for cut in 0..bytes.len() {
            assert_eq!(decode_frame(&bytes[..cut]), Ok(None), "prefix {cut}");
        }
    }

    fn stat() -> StatInfo {
        StatInfo {
            kind: StatKind::Symlink,
            size: 9,
            mode: 0o755,
            uid: 1,
            gid: 2,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let all = vec![
            Message::HelloRequest,
            Message::Exec(ExecSpec {
                program: Some(ProgramSpec::Argv(vec!["echo".into(), "hé".into()])),
                env: vec![("A".into(), "1".into())],
                secret_env: vec![("TOKEN".into(), "s3cr3t".into())],
                cwd: Some("/tmp".into()),
                user: Some("nobody".into()),
                timeout_ms: Some(5000),
                stdin: true,
                pty: Some((24, 80)),
            }),
            Message::Exec(ExecSpec {
                program: Some(ProgramSpec::Script {
                    interpreter: "bash".into(),
                    body: "echo hi\n".into(),
                }),
                ..ExecSpec::default()
            }),
            Message::Stdin(b"ls\n".to_vec()),
            Message::Resize {
                rows: 50,
                cols: 132,
            },
            Message::Kill,
            Message::PutFile(PutSpec {
                path: "/etc/x".into(),
                mode: Some(0o600),
                owner: Some("root".into()),
                group: None,
                create_parents: true,
                append: false,
            }),
            Message::GetFile { path: "/a".into() },
            Message::Stat { path: "/b".into() },
            Message::List { path: "/c".into() },
            Message::Sync,
            Message::Reboot,
            Message::Poweroff,
            Message::Ping,
            Message::Data(vec![1, 2, 3]),
            Message::Credit(16),
            Message::End {
                size: 3,
                sha256: [7; 32],
            },
            Message::Hello(HelloInfo {
                protocol: 1,
                agent_version: "0.1.0".into(),
                os_id: "debian".into(),
                os_pretty: "Debian GNU/Linux 12 (bookworm)".into(),
                arch: "x86_64".into(),
                boot_id: "abc".into(),
                pid: 42,
                cloud_init: "done".into(),
            }),
            Message::Output {
                stream: OutStream::Stderr,
                data: b"oops".to_vec(),
            },
            Message::Exited {
                kind: ExitKind::Code(-1),
                duration_ms: 12,
            },
            Message::Exited {
                kind: ExitKind::Signal(9),
                duration_ms: 0,
            },
            Message::Exited {
                kind: ExitKind::TimedOut,
                duration_ms: 1,
            },
            Message::FileStart {
                size: 1,
                mode: 0o644,
            },
            Message::Done {
                size: 5,
                sha256: [1; 32],
            },
            Message::StatReply(None),
            Message::StatReply(Some(stat())),
            Message::ListReply(vec![("a".into(), stat()), ("b".into(), stat())]),
            Message::Ok,
            Message::Error {
                code: code::NOT_FOUND,
                message: "no such file".into(),
            },
        ];
        for m in all {
            round_trip(m);
        }
    }

    #[test]
    fn data_frames_built_in_place_decode_like_encoded_ones() {
        let mut frame = vec![0u8; DATA_PREFIX];
        frame.extend_from_slice(b"chunk");
        finish_data_frame(9, &mut frame).expect("small");
        assert_eq!(
            frame,
            encode(9, &Message::Data(b"chunk".to_vec())).expect("small")
        );
        assert!(finish_data_frame(9, &mut [0u8; 3]).is_err());
    }

    #[test]
    fn debug_never_shows_secret_values() {
        let spec = ExecSpec {
            secret_env: vec![("TOKEN".into(), "s3cr3t-value".into())],
            ..ExecSpec::default()
        };
        let shown = format!("{spec:?}");
        assert!(shown.contains("TOKEN"), "{shown}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut h = [0u8; HEADER_LEN];
        h[..2].copy_from_slice(&MAGIC);
        h[2] = FRAME_VERSION;
        h[3] = 0x20;
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_header(&h), Err(ProtocolError::TooLarge(u32::MAX)));
        let too_big = Message::Data(vec![0; MAX_PAYLOAD]);
        assert!(matches!(
            encode(1, &too_big),
            Err(ProtocolError::TooLarge(_))
        ));
    }

    #[test]
    fn forged_counts_do_not_allocate() {
        // A ListReply claiming 4 billion entries in a 4-byte payload.
        let mut frame = encode(1, &Message::ListReply(vec![])).expect("small");
        frame[HEADER_LEN..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&frame),
            Err(ProtocolError::Truncated("list"))
        ));
    }

    #[test]
    fn trailing_bytes_and_bad_enums_are_errors() {
        let mut frame = encode(1, &Message::Credit(1)).expect("small");
        frame.push(0);
        frame[8] += 1;
        assert_eq!(decode_frame(&frame), Err(ProtocolError::Trailing(1)));
        let mut out = encode(
            1,
            &Message::Output {
                stream: OutStream::Stdout,
                data: vec![],
            },
        )
        .expect("small");
        out[HEADER_LEN] = 9;
        assert_eq!(
            decode_frame(&out),
            Err(ProtocolError::Invalid("output.stream"))
        );
    }

    #[test]
    fn read_frame_distinguishes_clean_end_from_torn_frame() {
        let bytes = encode(3, &Message::Ping).expect("small");
        let mut whole = &bytes[..];
        assert_eq!(
            read_frame(&mut whole).expect("ok"),
            Some(Frame {
                id: 3,
                msg: Message::Ping
            })
        );
        assert!(read_frame(&mut whole).expect("clean end").is_none());
        let mut torn = &bytes[..5];
        assert!(matches!(read_frame(&mut torn), Err(ReadError::Io(_))));
    }
}
