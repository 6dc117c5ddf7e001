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
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp_path)
        .map_err(|e| fail("cannot write next to", e))?;

    if tx
        .send(id, &Message::Credit(protocol::WINDOW_CHUNKS))
        .is_err()
    {
        return Ok(None);
    }
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let (size, sha256) = loop {
        match events.recv() {
            Ok(PutEvent::Data(d)) => {
                hasher.update(&d);
                file.write_all(&d).map_err(|e| fail("cannot write", e))?;
                written += d.len() as u64;
                if tx.send(id, &Message::Credit(1)).is_err() {
                    return Ok(None);
                }
            }
            Ok(PutEvent::End { size, sha256 }) => break (size, sha256),
            Ok(PutEvent::Cancel) | Err(_) => return Ok(None),
        }
    };
    let digest: [u8; 32] = hasher.finalize().into();
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
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; protocol::CHUNK_SIZE];
    loop {
        // Fill a whole chunk (short reads happen on pipes and /proc) before sending.
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((code::IO, format!("cannot read {path}: {e}"))),
            }
        }
        if n == 0 {
            break;
        }
        if !credits.take() {
            return Ok(()); // cancelled by the host, or the host went away
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        if tx.send(id, &Message::Data(buf[..n].to_vec())).is_err() {
            return Ok(());
        }
        if n < buf.len() {
            break;
        }
    }
    let digest: [u8; 32] = hasher.finalize().into();
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
