//! File transfers (streamed, credit-based flow control, sha256 on both ends) and stat/list.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use sha2::{Digest, Sha256};

use crate::protocol::{self, Message, PutSpec, StatInfo, StatKind, code};
use crate::{Job, Jobs, Tx, lock, sys};

pub enum PutEvent {
    Data(Vec<u8>),
    End { size: u64, sha256: [u8; 32] },
    Cancel,
}

/// Chunks the host allowed us to send for a `GetFile`, or cancelled.
pub struct Credits {
    state: Mutex<(u32, bool)>,
    cv: Condvar,
}

impl Credits {
    fn new() -> Self {
        Credits {
            state: Mutex::new((0, false)),
            cv: Condvar::new(),
        }
    }
    pub fn grant(&self, n: u32) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = s.0.saturating_add(n);
            self.cv.notify_all();
        }
    }
    pub fn cancel(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
            self.cv.notify_all();
        }
    }
    /// Takes one credit, waiting for it; false when cancelled.
    fn take(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        loop {
            if s.1 {
                return false;
            }
            if s.0 > 0 {
                s.0 -= 1;
                return true;
            }
            s = match self.cv.wait(s) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
    }
}

/// Chunk buffers reused from one data frame to the next. A fresh 256 KiB buffer per chunk
/// costs the allocator's page faults and a memset each time, which an emulated guest (TCG)
/// pays dearly for; a transfer only ever has a window's worth of chunks alive.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 2 * protocol::WINDOW_CHUNKS as usize + 4;

/// A buffer of `len` bytes, from the pool when one is there. Its content is stale: the caller
/// overwrites all of it (zeroes are written only where the buffer grows).
pub fn buffer(len: usize) -> Vec<u8> {
    let mut b = POOL
        .lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_default();
    b.resize(len, 0);
    b
}

/// Gives a buffer back for [`buffer`] to hand out again.
pub fn recycle(b: Vec<u8>) {
    if let Ok(mut p) = POOL.lock()
        && p.len() < POOL_MAX
    {
        p.push(b);
    }
}

fn io_code(e: &io::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::NotFound => code::NOT_FOUND,
        io::ErrorKind::PermissionDenied => code::PERMISSION,
        _ => code::IO,
    }
}

fn absolute(path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(format!("`{path}` is not an absolute path"));
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Put

pub fn start_put(id: u32, spec: PutSpec, tx: Tx, jobs: Jobs) {
    if lock(&jobs).contains_key(&id) {
        tx.error(
            id,
            code::BAD_REQUEST,
            format!("request id {id} is already in use"),
        );
        return;
    }
    let (etx, erx) = mpsc::channel();
    lock(&jobs).insert(id, Job::Put(etx));
    std::thread::spawn(move || {
        let result = put(id, &spec, &erx, &tx);
        lock(&jobs).remove(&id);
        match result {
            Ok(Some(msg)) => {
                let _ = tx.send(id, &msg);
            }
            Ok(None) => {} // cancelled: nobody waits for an answer
            Err((c, m)) => tx.error(id, c, m),
        }
    });
}

/// Removes the temporary file unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn put(
    id: u32,
    spec: &PutSpec,
    events: &mpsc::Receiver<PutEvent>,
    tx: &Tx,
) -> Result<Option<Message>, (u32, String)> {
    let target = absolute(&spec.path).map_err(|m| (code::BAD_REQUEST, m))?;
    let shown = target.display().to_string();
    let fail = |what: &str, e: io::Error| (io_code(&e), format!("{what} {shown}: {e}"));
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err((code::BAD_REQUEST, format!("`{shown}` names no file")));
    };
    if spec.create_parents {
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot create the folder of", e))?;
    }
    let uid = match &spec.owner {
        Some(o) => Some(
            sys::lookup_user(o)
                .map_err(|e| (code::BAD_REQUEST, e.to_string()))?
                .uid,
        ),
        None => None,
    };
    let gid = match &spec.group {
        Some(g) => Some(sys::lookup_group(g).map_err(|e| (code::BAD_REQUEST, e.to_string()))?),
        None => None,
    };
    let existing = std::fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err((code::BAD_REQUEST, format!("{shown} is a folder")));
    }

    let tmp_path = dir.join(format!(
        ".{}.builder-tmp-{}-{id}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut tmp_guard = TempFile(Some(tmp_path.clone()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp_path)
        .map_err(|e| fail("cannot write next to", e))?;

    // Three stages so a guest with several CPUs hashes one chunk while it reads the next and
    // writes the one before: this thread receives, one hashes, one writes and grants credit.
    let (hash_tx, hash_rx) = mpsc::channel::<Vec<u8>>();
    let (write_tx, write_rx) = mpsc::channel::<Vec<u8>>();
    let hasher = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        for chunk in hash_rx {
            hasher.update(&chunk);
            let _ = write_tx.send(chunk);
        }
        <[u8; 32]>::from(hasher.finalize())
    });
    let writer_tx = tx.clone();
    let writer = std::thread::spawn(move || {
        let mut file = file;
        let mut written: u64 = 0;
        let mut failed: Option<io::Error> = None;
        for chunk in write_rx {
            if failed.is_some() {
                continue; // drain; the host stops sending when credit stops coming
            }
            match file.write_all(&chunk) {
                Ok(()) => {
                    written += chunk.len() as u64;
                    let _ = writer_tx.send(id, &Message::Credit(1));
                }
                Err(e) => failed = Some(e),
            }
            recycle(chunk);
        }
        (file, written, failed)
    });
    let end = if tx
        .send(id, &Message::Credit(protocol::WINDOW_CHUNKS))
        .is_err()
    {
        None
    } else {
        loop {
            match events.recv() {
                Ok(PutEvent::Data(d)) => {
                    let _ = hash_tx.send(d);
                }
                Ok(PutEvent::End { size, sha256 }) => break Some((size, sha256)),
                Ok(PutEvent::Cancel) | Err(_) => break None,
            }
        }
    };
    drop(hash_tx);
    let digest = hasher
        .join()
        .map_err(|_| (code::IO, format!("hashing {shown} failed")))?;
    let (mut file, written, failed) = writer
        .join()
        .map_err(|_| (code::IO, format!("writing {shown} failed")))?;
    let Some((size, sha256)) = end else {
        return Ok(None);
    };
    if let Some(e) = failed {
        return Err(fail("cannot write", e));
    }
    if size != written || sha256 != digest {
        return Err((
            code::CHECKSUM,
            format!(
                "{shown}: received {written} bytes with sha256 {}, the host sent {size} bytes with sha256 {}; nothing was written",
                protocol::hex(&digest),
                protocol::hex(&sha256)
            ),
        ));
    }
    file.flush().map_err(|e| fail("cannot write", e))?;

    if spec.append {
        // Verified: now add it to the end of the real file.
        drop(file);
        let mut src = File::open(&tmp_path).map_err(|e| fail("cannot reopen the copy of", e))?;
        let mut dst = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(spec.mode.unwrap_or(0o644))
            .open(&target)
            .map_err(|e| fail("cannot append to", e))?;
        io::copy(&mut src, &mut dst).map_err(|e| fail("cannot append to", e))?;
        if let Some(m) = spec.mode {
            dst.set_permissions(std::fs::Permissions::from_mode(m))
                .map_err(|e| fail("cannot set the mode of", e))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&dst, uid, gid).map_err(|e| fail("cannot chown", e))?;
        }
        dst.sync_all().map_err(|e| fail("cannot flush", e))?;
    } else {
        // Like `cp` onto an existing file: keep its mode and owner unless told otherwise.
        let mode = spec
            .mode
            .or(existing.as_ref().map(|m| m.mode() & 0o7777))
            .unwrap_or(0o644);
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail("cannot set the mode of", e))?;
        let uid = uid.or(existing.as_ref().map(|m| m.uid()));
        let gid = gid.or(existing.as_ref().map(|m| m.gid()));
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&file, uid, gid).map_err(|e| fail("cannot chown", e))?;
        }
        file.sync_all().map_err(|e| fail("cannot flush", e))?;
        drop(file);
        std::fs::rename(&tmp_path, &target).map_err(|e| fail("cannot rename into", e))?;
        tmp_guard.0 = None;
        // The rename is durable only once the folder is flushed too.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(Some(Message::Done {
        size: written,
        sha256: digest,
    }))
}

// ---------------------------------------------------------------------------------------------
// Get

pub fn start_get(id: u32, path: String, tx: Tx, jobs: Jobs) {
    if lock(&jobs).contains_key(&id) {
        tx.error(
            id,
            code::BAD_REQUEST,
            format!("request id {id} is already in use"),
        );
        return;
    }
    let credits = Arc::new(Credits::new());
    lock(&jobs).insert(id, Job::Get(credits.clone()));
    std::thread::spawn(move || {
        if let Err((c, m)) = get(id, &path, &credits, &tx) {
            tx.error(id, c, m);
        }
        lock(&jobs).remove(&id);
    });
}

fn get(id: u32, path: &str, credits: &Credits, tx: &Tx) -> Result<(), (u32, String)> {
    let p = absolute(path).map_err(|m| (code::BAD_REQUEST, m))?;
    let mut f = File::open(&p).map_err(|e| (io_code(&e), format!("cannot open {path}: {e}")))?;
    let meta = f
        .metadata()
        .map_err(|e| (io_code(&e), format!("cannot stat {path}: {e}")))?;
    if meta.is_dir() {
        return Err((code::BAD_REQUEST, format!("{path} is a folder")));
    }
    let start = Message::FileStart {
        size: meta.len(),
        mode: meta.mode() & 0o7777,
    };
    if tx.send(id, &start).is_err() {
        return Ok(());
    }
    // Three stages, as for put: one thread reads the file straight into frames, one hashes,
    // this one waits for credit and sends. Small bounded queues keep memory in check.
    let (frames_tx, frames_rx) = mpsc::sync_channel::<Vec<u8>>(2);
    let (hashed_tx, hashed_rx) = mpsc::sync_channel::<Vec<u8>>(2);
    let shown = path.to_owned();
    let reader = std::thread::spawn(move || -> Result<(), String> {
        loop {
            let mut frame = buffer(protocol::DATA_PREFIX + protocol::CHUNK_SIZE);
            // Fill a whole chunk (short reads happen on pipes and /proc) before sending.
            let mut n = protocol::DATA_PREFIX;
            while n < frame.len() {
                match f.read(&mut frame[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("cannot read {shown}: {e}")),
                }
            }
            if n == protocol::DATA_PREFIX {
                return Ok(());
            }
            let full = n == frame.len();
            frame.truncate(n);
            if frames_tx.send(frame).is_err() || !full {
                return Ok(());
            }
        }
    });
    let hasher = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        for frame in frames_rx {
            hasher.update(&frame[protocol::DATA_PREFIX..]);
            total += (frame.len() - protocol::DATA_PREFIX) as u64;
            if hashed_tx.send(frame).is_err() {
                break;
            }
        }
        (total, <[u8; 32]>::from(hasher.finalize()))
    });
    let mut abandoned = false;
    for mut frame in hashed_rx.iter() {
        if !credits.take() {
            abandoned = true; // cancelled by the host, or the host went away
            break;
        }
        let sent = protocol::finish_data_frame(id, &mut frame)
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|()| tx.send_raw(&frame));
        recycle(frame);
        if sent.is_err() {
            abandoned = true;
            break;
        }
    }
    // Dropping the receiving end stops the other stages.
    drop(hashed_rx);
    let read = reader
        .join()
        .unwrap_or_else(|_| Err(format!("reading {path} failed")));
    let (total, digest) = hasher
        .join()
        .map_err(|_| (code::IO, format!("hashing {path} failed")))?;
    if abandoned {
        return Ok(());
    }
    read.map_err(|m| (code::IO, m))?;
    let _ = tx.send(
        id,
        &Message::End {
            size: total,
            sha256: digest,
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Stat and list

fn stat_info(m: &std::fs::Metadata) -> StatInfo {
    let ft = m.file_type();
    StatInfo {
        kind: if ft.is_symlink() {
            StatKind::Symlink
        } else if ft.is_dir() {
            StatKind::Dir
        } else if ft.is_file() {
            StatKind::File
        } else {
            StatKind::Other
        },
        size: m.len(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
    }
}

pub fn stat(path: &str) -> Message {
    let p = match absolute(path) {
        Ok(p) => p,
        Err(m) => {
            return Message::Error {
                code: code::BAD_REQUEST,
                message: m,
            };
        }
    };
    match std::fs::symlink_metadata(&p) {
        Ok(m) => Message::StatReply(Some(stat_info(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Message::StatReply(None),
        Err(e) => Message::Error {
            code: io_code(&e),
            message: format!("cannot stat {path}: {e}"),
        },
    }
}

pub fn list(path: &str) -> Message {
    let result = (|| -> Result<Vec<(String, StatInfo)>, (u32, String)> {
        let p = absolute(path).map_err(|m| (code::BAD_REQUEST, m))?;
        let rd =
            std::fs::read_dir(&p).map_err(|e| (io_code(&e), format!("cannot list {path}: {e}")))?;
        let mut out = Vec::new();
        let mut size = 0usize;
        for entry in rd {
            let entry = entry.map_err(|e| (io_code(&e), format!("cannot list {path}: {e}")))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // An entry can vanish between readdir and lstat: skip it, as `ls` would.
            let Ok(m) = std::fs::symlink_metadata(Path::new(&p).join(entry.file_name())) else {
                continue;
            };
            size += name.len() + 32;
            if size > protocol::MAX_PAYLOAD - 64 {
                return Err((
                    code::UNSUPPORTED,
                    format!("{path} has too many entries to list in one reply"),
                ));
            }
            out.push((name, stat_info(&m)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    })();
    match result {
        Ok(v) => Message::ListReply(v),
        Err((code, message)) => Message::Error { code, message },
    }
}
