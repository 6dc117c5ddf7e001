//! An HTTP server on the host's loopback for guests and benchmarks: guests on QEMU's user
//! network reach the host's 127.0.0.1 as 10.0.2.2. It serves a set of files (`GET` of a
//! path it holds → 200 with the bytes, anything else → 404), which [`HostHttp::put`] and
//! [`HostHttp::remove`] change while it runs, or a directory read at each request
//! ([`HostHttp::serve_dir`]: a test repository republished on disk is served as it is now),
//! one connection at a time, each
//! answered with `Connection: close` (HTTP/1.0 clients, bash's `/dev/tcp`, apt and builder's
//! WebDownload all read to the end). It records each request line; stopped (and its thread
//! joined) on drop.
//!
//! Shared by tests/build_e2e.rs, tests/appliance_e2e.rs, tests/support/apt_repo.rs and
//! examples/bench_packer.rs.

// Each file that includes this uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct HostHttp {
    pub port: u16,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostHttp {
    /// Serves `files` (absolute URL path → body). A request path's `/./` segments are
    /// dropped before the lookup (apt asks a flat repository `deb … ./` for `/./Packages`).
    pub fn start<P: Into<String>>(files: impl IntoIterator<Item = (P, Vec<u8>)>) -> Self {
        let files: BTreeMap<String, Vec<u8>> =
            files.into_iter().map(|(p, b)| (p.into(), b)).collect();
        Self::run(files, None)
    }

    /// Serves the files under `root` as they are at each request (`GET /a/b` → `root/a/b`;
    /// a path with `..` → 404).
    pub fn serve_dir(root: impl Into<PathBuf>) -> Self {
        Self::run(BTreeMap::new(), Some(root.into()))
    }

    /// Serve `body` at `path` from now on (replacing what was there).
    pub fn put(&self, path: impl Into<String>, body: Vec<u8>) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.into(), body);
    }

    /// Answer 404 for `path` from now on.
    pub fn remove(&self, path: &str) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(path);
    }

    fn run(files: BTreeMap<String, Vec<u8>>, root: Option<PathBuf>) -> Self {
        let files = Arc::new(Mutex::new(files));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the loopback");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("local address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (files, requests, stop) = (files.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        Err(e) => panic!("accept: {e}"),
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        continue;
                    }
                    let request = line.trim_end().to_string();
                    // The rest of the header, up to the empty line.
                    loop {
                        let mut header = String::new();
                        match reader.read_line(&mut header) {
                            Ok(0) | Err(_) => break,
                            Ok(_) if header.trim_end().is_empty() => break,
                            Ok(_) => {}
                        }
                    }
                    let mut words = request.split(' ');
                    let body = match (words.next(), words.next()) {
                        (Some("GET"), Some(path)) => {
                            let path = path.replace("/./", "/");
                            let held = files
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(&path)
                                .cloned();
                            held.or_else(|| root.as_deref().and_then(|r| from_dir(r, &path)))
                        }
                        _ => None,
                    };
                    requests
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(request);
                    let (status, body) = match &body {
                        Some(body) => ("200 OK", body.as_slice()),
                        None => ("404 Not Found", b"not found\n".as_slice()),
                    };
                    let head = format!(
                        "HTTP/1.0 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = (&stream).write_all(head.as_bytes());
                    let _ = (&stream).write_all(body);
                }
            })
        };
        Self {
            port,
            files,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// The request lines so far (`GET /path HTTP/1.1`), in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The bytes of `root` + `path` (`/a/b`), if it is a file under `root`.
fn from_dir(root: &Path, path: &str) -> Option<Vec<u8>> {
    let relative = Path::new(path.split('?').next()?.trim_start_matches('/'));
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return None;
    }
    let full = root.join(relative);
    if !full.is_file() {
        return None;
    }
    fs_err::read(full).ok()
}

impl Drop for HostHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
