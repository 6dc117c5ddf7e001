//! A real S3-compatible server for tests: `s3s-fs` (installed by scripts/install-deps) on
//! 127.0.0.1, keeping its buckets as folders under a temporary folder and checking every SigV4
//! signature against [`KEY`]/[`SECRET`]. Killed on drop.
//!
//! The S3 tier: a test that needs s3s-fs (or moto) is compiled as ignored unless
//! `BUILDER_S3_TESTS=1` (set by scripts/test, so CI, after scripts/install-deps installed
//! them): `build.rs` then sets `cfg(s3_tier)`. Each such test carries
//!
//! ```text
//! #[cfg_attr(
//!     not(s3_tier),
//!     ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
//! )]
//! ```
//!
//! so without the tier cargo counts it as ignored, with the reason; with it, a missing
//! server program fails the test and says how to install it.

// Each test file that includes this uses part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

pub const KEY: &str = "builder-test-key";
pub const SECRET: &str = "builder-test-secret";

/// `s3s-fs` on PATH, else in cargo's bin folder (where `scripts/install-deps` puts it).
fn s3s_fs_program() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("s3s-fs"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    on_path
        .chain(cargo_home.map(|c| c.join("bin/s3s-fs")))
        .find(|p| p.is_file())
}

/// A port nothing listens on now (port 0 gives a free one; it is released on return).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub struct S3Server {
    child: std::process::Child,
    pub port: u16,
    root: tempfile::TempDir,
}

impl S3Server {
    /// Starts s3s-fs with `bucket` created. Panics, saying how to install it, when s3s-fs is
    /// missing: a test that uses it carries the S3 tier's `ignore` (see the module docs).
    pub fn start(bucket: &str) -> S3Server {
        let Some(program) = s3s_fs_program() else {
            panic!(
                "the program `s3s-fs` was not found on PATH nor in ~/.cargo/bin: run \
                 scripts/install-deps (or `cargo install s3s-fs --version 0.14.1 --locked \
                 --features binary`)"
            );
        };
        let root = tempfile::tempdir().expect("temp dir");
        let data = root.path().join("data");
        // s3s-fs keeps a bucket as a folder under its root: this creates the bucket.
        fs_err::create_dir_all(data.join(bucket)).expect("bucket folder");
        let log = fs_err::File::create(root.path().join("s3s-fs.log"))
            .expect("log file")
            .into_file();
        let port = free_port();
        let child = std::process::Command::new(&program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", program.display()));
        let mut server = S3Server { child, port, root };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = server.child.try_wait().expect("s3s-fs status");
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "s3s-fs did not start listening on port {port} ({exited:?}): {}",
                    fs_err::read_to_string(server.root.path().join("s3s-fs.log"))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's folder: one folder per bucket.
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// What the server stored for `bucket/key`, read from its folder (not through S3).
    pub fn stored(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        fs_err::read(self.data().join(bucket).join(key)).ok()
    }

    /// Multipart uploads the server still holds (its `.upload-<id>.json` files and parts).
    pub fn pending_uploads(&self) -> Vec<String> {
        fs_err::read_dir(self.data())
            .expect("data folder")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload"))
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
