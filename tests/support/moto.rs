//! moto, a Python implementation of the AWS APIs (S3, IAM, EC2's image calls) that no one here
//! wrote, on 127.0.0.1, with a shim for the VM Import calls moto lacks
//! (`tests/support/moto_vmimport.py`). moto checks every request's SigV4 signature with
//! botocore's signer, against the access key of an IAM user it made. Killed on drop.
//!
//! moto is installed by `scripts/install-deps` into its own venv:
//! `$BUILDER_MOTO_VENV`, else `$XDG_CACHE_HOME/builder/moto-venv`, else
//! `~/.cache/builder/moto-venv`. A test that uses it carries the S3 tier's `ignore`
//! (tests/support/s3s.rs); with the tier on, a missing moto fails the test, saying how to
//! install it.

// Each test file that includes this uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The venv scripts/install-deps makes.
fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("BUILDER_MOTO_VENV") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME is set");
    cache.join("builder/moto-venv")
}

/// The venv's python, with moto importable; panics with how to install it.
fn python() -> PathBuf {
    let venv = venv();
    let python = venv.join("bin/python");
    assert!(
        venv.join("bin/moto_server").is_file() && python.is_file(),
        "moto is not installed in {}: run scripts/install-deps (it makes that venv with \
         moto[s3], flask and flask-cors), or set BUILDER_MOTO_VENV to a venv that has them",
        venv.display()
    );
    python
}

/// What moto holds before the test starts (made before moto checks signatures).
#[derive(Debug, Clone)]
pub struct Setup {
    pub buckets: Vec<String>,
    /// Create the VM Import service role `vmimport`.
    pub role: bool,
    /// AMIs registered (in us-east-1) under these names.
    pub images_named: Vec<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            buckets: Vec::new(),
            role: true,
            images_named: Vec::new(),
        }
    }
}

/// One EC2 or IAM Query call moto (or the shim) received, as the shim recorded it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Call {
    pub action: String,
    pub service: String,
    pub region: String,
    pub dry_run: bool,
    pub params: BTreeMap<String, String>,
    pub session_token: Option<String>,
    /// The answer's HTTP status (401: moto refused the signature; 412: a dry run's answer).
    pub status: u16,
    /// The import task the shim started (ImportSnapshot, ImportImage).
    #[serde(default)]
    pub task: Option<String>,
}

impl Call {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

pub struct Moto {
    child: Child,
    pub port: u16,
    pub key: String,
    pub secret: String,
    dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub fn start(setup: &Setup) -> Moto {
        let python = python();
        let dir = tempfile::tempdir().expect("temp dir");
        let log = fs_err::File::create(dir.path().join("moto.log")).expect("log file");
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/moto_vmimport.py");
        let mut cmd = Command::new(&python);
        cmd.arg(&script).args(["--port", &port.to_string()]);
        for bucket in &setup.buckets {
            cmd.args(["--bucket", bucket]);
        }
        if !setup.role {
            cmd.arg("--no-role");
        }
        for name in &setup.images_named {
            cmd.args(["--image-named", name]);
        }
        let mut child = cmd
            // moto must not find real credentials or config of the machine's user.
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.into_file())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", python.display()));
        // The first line on stdout (after the setup) carries the IAM user's access key.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let log = || fs_err::read_to_string(dir.path().join("moto.log")).unwrap_or_default();
        let Ok(ready) = serde_json::from_str::<serde_json::Value>(&line) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("moto did not start (got {line:?}):\n{}", log());
        };
        let field = |name: &str| ready[name].as_str().expect("a key field").to_string();
        Moto {
            port,
            key: field("access_key"),
            secret: field("secret_key"),
            child,
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The EC2 and IAM Query calls received so far (S3's are not recorded).
    pub async fn calls(&self) -> Vec<Call> {
        let url = format!("{}/vmimport-shim/calls", self.endpoint());
        let text = reqwest::get(&url)
            .await
            .expect("moto answers")
            .text()
            .await
            .expect("the shim's call record");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the shim's call record: {e}: {text}"))
    }

    /// How the next import tasks go: `active_polls` answers `active`, then `completed`, or
    /// `deleted` with `fail_with` as VM Import's status message.
    pub async fn script(&self, active_polls: u64, fail_with: Option<&str>) {
        let url = format!("{}/vmimport-shim/script", self.endpoint());
        let status = reqwest::Client::new()
            .post(&url)
            .body(
                serde_json::json!({"active_polls": active_polls, "fail_with": fail_with})
                    .to_string(),
            )
            .send()
            .await
            .expect("moto answers")
            .status();
        assert!(status.is_success(), "{status}");
    }

    /// Run `code` with boto3 (botocore's client, not builder's) against this moto, signed
    /// with its key: `ec2(region)`, `s3()` and `iam()` make clients (`kw` has the endpoint
    /// and the key; `json` and `hashlib` are imported); the code assigns what it finds to
    /// `out`, returned as JSON.
    pub fn boto3(&self, code: &str) -> serde_json::Value {
        let program = format!(
            "import boto3, json, hashlib\n\
             kw = dict(endpoint_url={endpoint:?}, aws_access_key_id={key:?}, aws_secret_access_key={secret:?})\n\
             ec2 = lambda region: boto3.client('ec2', region_name=region, **kw)\n\
             s3 = lambda: boto3.client('s3', region_name='us-east-1', **kw)\n\
             iam = lambda: boto3.client('iam', region_name='us-east-1', **kw)\n\
             out = None\n\
             {code}\n\
             print(json.dumps(out, default=str))\n",
            endpoint = self.endpoint(),
            key = self.key,
            secret = self.secret,
        );
        let out = Command::new(python())
            .args(["-c", &program])
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "boto3 against moto failed:\n{code}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "boto3's answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// moto's log (its requests, one per line).
    pub fn log(&self) -> String {
        fs_err::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
