//! A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) run as a plain
//! process on 127.0.0.1 with its own config and storage in a temp dir, killed on drop. It can
//! be stopped and started again on the same port with the same storage and upload-state
//! secret, so an upload session survives a restart (as it would a registry upgrade).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "/usr/bin/docker-registry";

pub struct TestRegistry {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Start a registry without authentication.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Start a registry with htpasswd basic auth for `user`/`password` (bcrypt, `htpasswd -B`).
    pub fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_with(Some((user, password)))
    }

    fn start_with(auth: Option<(&str, &str)>) -> Self {
        assert!(
            Path::new(BINARY).is_file(),
            "{BINARY} is missing: run scripts/install-deps (it installs Debian's docker-registry \
             and apache2-utils for the OCI distribution tests)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: builder-tests-upload-state\n",
            data = dir.path().join("data").display(),
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.path().join("htpasswd");
            let status = Command::new("htpasswd")
                .args(["-B", "-b", "-c"])
                .arg(&htpasswd)
                .args([user, password])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("htpasswd is missing: run scripts/install-deps (apache2-utils)");
            assert!(status.success(), "htpasswd failed: {status}");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: builder-tests\n    path: {}\n",
                htpasswd.display()
            ));
        }
        fs_err::write(dir.path().join("config.yml"), config).expect("write config");
        let mut registry = Self {
            child: None,
            port,
            dir,
        };
        registry.restart();
        registry
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage (`docker/registry/v2/blobs/sha256/<2>/<hex>/data` holds a blob),
    /// for tests that damage what it serves.
    #[allow(dead_code)] // tests/cache_registry.rs damages a blob; the others do not
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Kill the registry process (SIGKILL, like a crash) and reap it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it (again) on the same port with the same storage; wait until it accepts
    /// connections.
    pub fn restart(&mut self) {
        self.stop();
        let log = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file")
            .into_file();
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "docker-registry exited with {status}:\n{}",
                    fs_err::read_to_string(self.log()).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on port {} within 20 s:\n{}",
                self.port,
                fs_err::read_to_string(self.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Open a blob upload session in `repo` with a plain request (as another tool would) and
/// return the absolute URL to PUT the blob to (the registry may answer with a path only).
#[allow(dead_code)] // distribute_local includes this file but uploads through builder only
pub async fn start_upload(client: &reqwest::Client, host: &str, repo: &str) -> String {
    let response = client
        .post(format!("http://{host}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("location")
        .to_string();
    if location.starts_with('/') {
        format!("http://{host}{location}")
    } else {
        location
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
