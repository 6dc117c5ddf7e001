//! Local tier: parent image downloads against a real HTTP server on 127.0.0.1 (a std
//! `TcpListener` thread started by each test) that can cut a body short, ignore Range,
//! corrupt a body or fail; and local parent images hashed once through the index.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use builder::store::{DownloadProgress, FetchOptions, NoDownloadProgress, Store, StoreError};
use sha2::{Digest, Sha256};

/// What the server does for one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// The body (honouring Range).
    Full,
    /// Promise the whole body, send only this many bytes, and hang up.
    CutAfter(usize),
    /// Ignore Range: 200 with the whole body.
    IgnoreRange,
    /// The body with one byte flipped.
    Corrupt,
    /// Only a status line.
    Status(u16),
}

struct Server {
    url: String,
    /// The Range header of each request (None: no Range).
    requests: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serve `body`; request i gets `script[i]`, later ones `Full`.
    fn start(body: Vec<u8>, script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let reply = script.get(i).copied().unwrap_or(Reply::Full);
                handle(conn, &body, reply, &reqs);
            }
        });
        Self {
            url: format!("http://{addr}/images/base.qcow2"),
            requests,
            stop,
            addr,
            thread: Some(thread),
        }
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread ends.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(conn: TcpStream, body: &[u8], reply: Reply, requests: &Mutex<Vec<Option<String>>>) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
            range = Some(v.trim().to_string());
        }
    }
    requests.lock().expect("lock").push(range.clone());
    let mut conn = conn;
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let total = body.len();
    let (status, from) = match (reply, range.is_some()) {
        (Reply::Status(code), _) => {
            let _ = write!(
                conn,
                "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        (Reply::IgnoreRange, _) | (_, false) => ("200 OK".to_string(), 0),
        (_, true) => ("206 Partial Content".to_string(), start),
    };
    let mut payload = body[from..].to_vec();
    if let Reply::Corrupt = reply {
        payload[0] ^= 0xff;
    }
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        payload.len()
    );
    if from > 0 {
        head.push_str(&format!(
            "Content-Range: bytes {from}-{}/{total}\r\n",
            total - 1
        ));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let send = match reply {
        Reply::CutAfter(n) => &payload[..n.min(payload.len())],
        _ => &payload[..],
    };
    let _ = conn.write_all(send);
    let _ = conn.flush();
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

fn body() -> Vec<u8> {
    (0..300_000u32)
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn fast() -> FetchOptions {
    FetchOptions {
        attempts: 4,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        read_timeout: Duration::from_secs(10),
    }
}

fn cache_files(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = fs_err::read_dir(store.root().join("cache/base"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[derive(Default)]
struct Seen {
    retries: Mutex<Vec<String>>,
    offsets: Mutex<Vec<u64>>,
    last: Mutex<u64>,
}

impl DownloadProgress for Seen {
    fn started(&self, _total: Option<u64>, offset: u64) {
        self.offsets.lock().expect("lock").push(offset);
    }
    fn advanced(&self, done: u64) {
        *self.last.lock().expect("lock") = done;
    }
    fn retrying(&self, _attempt: u32, error: &str, _wait: Duration) {
        self.retries.lock().expect("lock").push(error.to_string());
    }
}

#[tokio::test]
async fn a_cut_download_resumes_with_range_and_lands_verified() {
    let body = body();
    let server = Server::start(body.clone(), vec![Reply::CutAfter(500_000)]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let seen = Seen::default();
    let got = store
        .fetch_base(&server.url, &sha(&body), &fast(), &seen)
        .await
        .expect("download");
    assert_eq!(got.sha256, sha(&body));
    assert_eq!(
        got.path,
        tmp.path().join(format!("cache/base/{}.qcow2", sha(&body)))
    );
    assert_eq!(fs_err::read(&got.path).expect("read"), body);
    assert_eq!(
        server.ranges(),
        vec![None, Some("bytes=500000-".to_string())],
        "the second request resumes"
    );
    assert_eq!(*seen.offsets.lock().expect("lock"), vec![0, 500_000]);
    assert_eq!(*seen.last.lock().expect("lock"), body.len() as u64);
    assert_eq!(seen.retries.lock().expect("lock").len(), 1);
    assert_eq!(cache_files(&store), vec![format!("{}.qcow2", sha(&body))]);

    // Already cached: no request at all.
    let again = store
        .fetch_base(
            &server.url,
            &sha(&body).to_uppercase(),
            &fast(),
            &NoDownloadProgress,
        )
        .await
        .expect("cached");
    assert_eq!(again.path, got.path);
    assert_eq!(server.ranges().len(), 2);
}

#[tokio::test]
async fn a_server_that_ignores_range_restarts_from_zero() {
    let body = body();
    let server = Server::start(
        body.clone(),
        vec![Reply::CutAfter(100_000), Reply::IgnoreRange],
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let got = store
        .fetch_base(&server.url, &sha(&body), &fast(), &NoDownloadProgress)
        .await
        .expect("download");
    assert_eq!(fs_err::read(&got.path).expect("read"), body);
    assert_eq!(server.ranges()[1].as_deref(), Some("bytes=100000-"));
}

#[tokio::test]
async fn a_corrupted_body_is_refetched_and_a_persistent_one_fails_leaving_nothing() {
    let body = body();
    // Corrupted once, then right: the digest check catches it and the retry starts over.
    let server = Server::start(body.clone(), vec![Reply::Corrupt]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let seen = Seen::default();
    let got = store
        .fetch_base(&server.url, &sha(&body), &fast(), &seen)
        .await
        .expect("second attempt is right");
    assert_eq!(fs_err::read(&got.path).expect("read"), body);
    assert_eq!(
        server.ranges(),
        vec![None, None],
        "no resume after a bad digest"
    );
    let retries = seen.retries.lock().expect("lock").clone();
    assert!(retries[0].contains("expected"), "{retries:?}");
    drop(server);

    // Always corrupted: a digest error, and neither the final file nor the .part remains.
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let server = Server::start(body.clone(), vec![Reply::Corrupt; 10]);
    let e = store
        .fetch_base(&server.url, &sha(&body), &fast(), &NoDownloadProgress)
        .await
        .expect_err("never right");
    assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&sha(&body)), "{e}");
    assert_eq!(server.ranges().len(), 4, "every attempt was used");
    assert!(cache_files(&store).is_empty(), "{:?}", cache_files(&store));
}

#[tokio::test]
async fn not_found_is_not_retried_and_bad_arguments_are_refused() {
    let server = Server::start(body(), vec![Reply::Status(404)]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let e = store
        .fetch_base(&server.url, &"ab".repeat(32), &fast(), &NoDownloadProgress)
        .await
        .expect_err("404");
    let text = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(text.contains("404"), "{text}");
    assert_eq!(server.ranges().len(), 1, "a 404 is final");

    let e = store
        .fetch_base(&server.url, "abc", &fast(), &NoDownloadProgress)
        .await
        .expect_err("digest");
    assert!(matches!(e, StoreError::BadDigest { .. }));
    let e = store
        .fetch_base(
            "ftp://example.invalid/x",
            &"ab".repeat(32),
            &fast(),
            &NoDownloadProgress,
        )
        .await
        .expect_err("scheme");
    assert!(matches!(e, StoreError::BadUrl { .. }));
}

#[tokio::test]
async fn a_server_error_is_retried_and_a_dead_port_keeps_the_part_to_resume() {
    let body = body();
    let server = Server::start(body.clone(), vec![Reply::Status(503), Reply::Status(500)]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    store
        .fetch_base(&server.url, &sha(&body), &fast(), &NoDownloadProgress)
        .await
        .expect("third attempt");
    assert_eq!(server.ranges().len(), 3);

    // A download cut short by a server that then goes away keeps what it has; the next
    // run resumes from there.
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let server = Server::start(body.clone(), vec![Reply::CutAfter(200_000)]);
    let url = server.url.clone();
    let one = FetchOptions {
        attempts: 1,
        ..fast()
    };
    let e = store
        .fetch_base(&url, &sha(&body), &one, &NoDownloadProgress)
        .await
        .expect_err("cut");
    assert!(matches!(e, StoreError::Download { attempts: 1, .. }), "{e}");
    assert_eq!(cache_files(&store), vec![format!("{}.part", sha(&body))]);
    drop(server);
    let server = Server::start(body.clone(), vec![]);
    store
        .fetch_base(&server.url, &sha(&body), &one, &NoDownloadProgress)
        .await
        .expect("resumed");
    assert_eq!(server.ranges(), vec![Some("bytes=200000-".to_string())]);
    assert_eq!(cache_files(&store), vec![format!("{}.qcow2", sha(&body))]);
}

#[tokio::test]
async fn a_local_parent_is_hashed_once_per_size_and_mtime() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let file = tmp.path().join("base.qcow2");
    fs_err::write(&file, b"first content").expect("write");
    let mtime = fs_err::metadata(&file)
        .expect("stat")
        .modified()
        .expect("mtime");
    let first = store.import_base(&file, None).await.expect("import");
    assert_eq!(first.sha256, sha(b"first content"));
    assert_eq!(first.path, fs_err::canonicalize(&file).expect("canonical"));
    assert!(store.root().join("cache/hashes.json").is_file());

    // Same size, same mtime: the index answers without reading the file (this is the
    // trade-off that saves re-hashing a 1 GiB base at every build).
    fs_err::write(&file, b"other content").expect("write");
    set_mtime(&file, mtime);
    let cached = store.import_base(&file, None).await.expect("import");
    assert_eq!(cached.sha256, first.sha256);

    // A new mtime: hashed again.
    set_mtime(&file, mtime + Duration::from_secs(5));
    let fresh = store
        .import_base(&file, Some(&sha(b"other content")))
        .await
        .expect("import");
    assert_eq!(fresh.sha256, sha(b"other content"));

    let e = store
        .import_base(&file, Some(&sha(b"first content")))
        .await
        .expect_err("wrong digest");
    assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
    let e = store
        .import_base(&tmp.path().join("nope"), None)
        .await
        .expect_err("missing");
    assert!(e.to_string().contains("nope"), "{e}");
}

fn set_mtime(path: &Path, t: std::time::SystemTime) {
    let f = fs_err::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.set_modified(t).expect("set mtime");
}

#[tokio::test]
async fn two_builders_fetching_one_digest_download_it_once() {
    let body = body();
    let server = Server::start(body.clone(), vec![]);
    let tmp = tempfile::tempdir().expect("temp dir");
    // Two stores on one folder, as two builder processes would open it.
    let a = Store::open(tmp.path()).expect("store");
    let b = Store::open(tmp.path()).expect("store");
    let digest = sha(&body);
    let options = fast();
    let (x, y) = tokio::join!(
        a.fetch_base(&server.url, &digest, &options, &NoDownloadProgress),
        b.fetch_base(&server.url, &digest, &options, &NoDownloadProgress),
    );
    let (x, y) = (x.expect("first"), y.expect("second"));
    assert_eq!(x.path, y.path);
    assert_eq!(server.ranges().len(), 1, "one download for both");
    assert_eq!(
        cache_files(&a),
        vec![format!("{digest}.qcow2")],
        "no stray .part"
    );
}
