//! Local tier: `builder component run` running real documents (tests/run/) with real processes
//! in temporary folders. Each test checks what the run did on disk, its exit code, its summary
//! and its logs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/s3s.rs"]
mod s3s;
use s3s::{KEY as S3_KEY, S3Server, SECRET as S3_SECRET};

fn doc(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/run")
        .join(name)
}

/// A working directory and a log directory for one run.
struct Sandbox {
    root: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        fs_err::create_dir(root.path().join("work")).expect("work dir");
        Self { root }
    }

    fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }

    fn logs(&self) -> PathBuf {
        self.root.path().join("logs")
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.work().join(relative)
    }

    fn read(&self, relative: &str) -> String {
        fs_err::read_to_string(self.path(relative))
            .unwrap_or_else(|e| panic!("{relative} should exist: {e}"))
    }

    /// Write an inline document into the sandbox.
    fn document(&self, name: &str, text: &str) -> PathBuf {
        let path = self.root.path().join(name);
        fs_err::write(&path, text).expect("write document");
        path
    }

    fn command(&self, documents: &[&Path]) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_builder"));
        let list: Vec<String> = documents.iter().map(|d| d.display().to_string()).collect();
        cmd.args(["component", "run", "--documents", &list.join(",")])
            .arg("--working-directory")
            .arg(self.work())
            .arg("--log-directory")
            .arg(self.logs())
            .env("NO_COLOR", "1")
            .env_remove("BUILDER_S3_ENDPOINT")
            .env("NO_PROXY", "127.0.0.1")
            .timeout(Duration::from_secs(60));
        cmd
    }

    fn run(&self, documents: &[&Path], extra: &[&str]) -> Output {
        self.command(documents)
            .args(extra)
            .output()
            .expect("builder runs")
    }

    /// The one `TOE_*` folder of the run.
    fn run_folder(&self) -> PathBuf {
        let folders: Vec<PathBuf> = fs_err::read_dir(self.logs())
            .expect("log directory exists")
            .map(|e| e.expect("entry").path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("TOE_"))
            })
            .collect();
        assert_eq!(folders.len(), 1, "one run folder: {folders:?}");
        folders.into_iter().next().expect("one folder")
    }

    fn detailed(&self) -> Value {
        let text = fs_err::read_to_string(self.run_folder().join("detailedoutput.json"))
            .expect("detailedoutput.json");
        serde_json::from_str(&text).expect("valid JSON")
    }
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn summary(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is the summary JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            stderr(output)
        )
    })
}

/// Step reports by name, from every document and phase of a detailed output.
fn steps(detailed: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for d in detailed["documents"].as_array().expect("documents") {
        for p in d["phases"].as_array().expect("phases") {
            out.extend(p["steps"].as_array().expect("steps").iter().cloned());
        }
    }
    out
}

fn step(detailed: &Value, name: &str) -> Value {
    steps(detailed)
        .into_iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("step {name} in the report"))
}

/// Running and not a zombie.
fn alive(pid: i32) -> bool {
    match fs_err::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(pid: i32) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn pid_in(sandbox: &Sandbox, file: &str) -> i32 {
    sandbox.read(file).trim().parse().expect("a pid")
}

#[test]
fn file_actions_do_what_they_say() {
    let sb = Sandbox::new();
    let user = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .expect("id")
            .stdout,
    )
    .expect("utf8");
    let owner = format!("Owner={}", user.trim());
    let out = sb.run(&[&doc("files.yml")], &["--parameters", &owner]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(summary(&out)["status"], "success");
    assert_eq!(sb.read("made/hello.txt"), "hello world");
    assert_eq!(sb.read("readback.txt"), "hello world");
    assert_eq!(sb.read("moved/hello-moved.txt"), "hello world");
    assert!(!sb.path("copies/renamed.txt").exists(), "moved away");
    assert_eq!(
        fs_err::read(sb.path("made/new/parent/utf16.txt")).expect("utf16 file"),
        [0x68, 0, 0xe9, 0]
    );
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt;
        fs_err::metadata(sb.path(p))
            .expect("exists")
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("made/hello.txt"), 0o640);
    assert_eq!(mode("made/b.log"), 0o600);
    assert_eq!(mode("shared"), 0o750);
    assert_eq!(
        fs_err::read_link(sb.path("links/hello")).expect("a symlink"),
        Path::new("../made/hello.txt")
    );
    let listed = sb.read("list.txt");
    let work = sb.work();
    assert_eq!(
        listed,
        format!(
            "{w}/made/hello.txt,{w}/made/new/parent/utf16.txt",
            w = work.display()
        )
    );
    assert!(!sb.path("logs/a.log").exists() && !sb.path("logs/b.log").exists());
    assert!(sb.path("logs").is_dir());
    assert!(!sb.path("made/deep/er").exists() && sb.path("made/deep").is_dir());
    assert!(!sb.path("tree-moved").exists() && !sb.path("tree-copy").exists());
    // Inputs are recorded after templating.
    let detailed = sb.detailed();
    let inputs: Value = serde_json::from_str(
        step(&detailed, "WriteReadBack")["inputs"]
            .as_str()
            .expect("inputs are JSON text"),
    )
    .expect("valid");
    assert_eq!(inputs[0]["content"], "hello world");
}

#[test]
fn file_actions_refuse_what_they_should() {
    let sb = Sandbox::new();
    fs_err::write(sb.path("exists.txt"), "old").expect("write");
    fs_err::create_dir(sb.path("full")).expect("dir");
    fs_err::write(sb.path("full/x"), "x").expect("write");
    let cases = [
        (
            "CreateFile",
            "- path: exists.txt\n            overwrite: false",
            "already exists",
        ),
        ("AppendFile", "- path: missing.txt", "does not exist"),
        ("DeleteFolder", "- path: full", "is not empty"),
        ("DeleteFile", "- path: missing.txt", "does not exist"),
        (
            "CreateSymlink",
            "- path: link\n            target: nowhere",
            "does not exist",
        ),
        (
            "CopyFile",
            "- source: \"*.txt\"\n            destination: x/\n            overwrite: false\n          - source: nothing*\n            destination: x/",
            "no file matches",
        ),
    ];
    for (action, inputs, expected) in cases {
        let text = format!(
            "name: refuse\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Try\n        action: {action}\n        inputs:\n          {inputs}\n"
        );
        let path = sb.document("refuse.yml", &text);
        let out = sb.run(&[&path], &[]);
        assert_eq!(code(&out), 1, "{action}: {}", stderr(&out));
        let message = summary(&out)["failureMessage"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(message.contains(expected), "{action}: {message}");
    }
    assert_eq!(sb.read("exists.txt"), "old");
    assert!(sb.path("full/x").exists());
}

#[test]
fn every_operator_and_if_branch() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("operators.yml")], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(summary(&out)["status"], "successwithignoredfailure");
    assert!(sb.path("ran-when-true").exists());
    assert!(!sb.path("ran-when-false").exists());
    assert!(sb.path("ran-else-execute").exists());
    assert!(!sb.path("ran-then-skip").exists());
    assert!(!sb.path("ran-abort").exists());
    let detailed = sb.detailed();
    assert_eq!(step(&detailed, "SkippedWhenFalse")["status"], "skipped");
    assert_eq!(step(&detailed, "ThenSkip")["status"], "skipped");
    assert_eq!(step(&detailed, "AbortIgnored")["status"], "ignoredfailure");
}

#[test]
fn a_false_assertion_fails_the_step() {
    let sb = Sandbox::new();
    for (assertion, ok) in [
        ("numberLessThan: 1\n          value: 2", false),
        ("stringGreaterThan: b\n          value: a", false),
        ("patternMatches: \"^x\"\n          value: y", false),
        ("numberEquals: \"1e3\"\n          value: \"1000\"", false),
        ("stringIsEmpty: \" \"", false),
        ("numberGreaterThan: 99\n          value: 100", true),
    ] {
        let text = format!(
            "name: assert\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Check\n        action: Assert\n        inputs:\n          {assertion}\n"
        );
        let path = sb.document("assert.yml", &text);
        let out = sb.run(&[&path], &[]);
        assert_eq!(
            code(&out),
            if ok { 0 } else { 1 },
            "{assertion}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn loops_collate_outputs_and_stop_at_the_first_failure() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("loops.yml")], &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(
        sb.read("collected.txt"),
        "1\n3\n5|0:3\n1:2\n2:1|a\nb\nc|each-y.txt"
    );
    assert_eq!(sb.read("each-x.txt"), "0");
    assert_eq!(sb.read("each-y.txt"), "1");
    // Iteration 2 failed, so 3 never ran.
    assert_eq!(sb.read("iterations.txt"), "1\n2\n");
    let detailed = sb.detailed();
    let failing = step(&detailed, "StopsAtFirstFailure");
    assert_eq!(failing["status"], "failed");
    let iterations = failing["loop"]["iterations"]
        .as_array()
        .expect("iterations");
    assert_eq!(iterations.len(), 2);
    assert_eq!(iterations[1]["status"], "failed");
    assert!(
        failing["failureMessage"]
            .as_str()
            .is_some_and(|m| m.contains("iteration 1 (value `2`)"))
    );
}

#[test]
fn on_failure_abort_continue_ignore() {
    for (on_failure, exit, status, next_runs) in [
        ("Abort", 1, "failed", false),
        ("Continue", 1, "failed", true),
        ("Ignore", 0, "successwithignoredfailure", true),
    ] {
        let sb = Sandbox::new();
        let text = format!(
            "name: onfailure\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Fails\n        action: ExecuteBash\n        onFailure: {on_failure}\n        inputs:\n          commands:\n            - exit 3\n      - name: Next\n        action: CreateFile\n        inputs:\n          - path: next\n  - name: validate\n    steps:\n      - name: Later\n        action: CreateFile\n        inputs:\n          - path: later\n"
        );
        let path = sb.document("onfailure.yml", &text);
        let out = sb.run(&[&path], &[]);
        assert_eq!(code(&out), exit, "{on_failure}: {}", stderr(&out));
        let summary = summary(&out);
        assert_eq!(summary["status"], status, "{on_failure}");
        assert_eq!(sb.path("next").exists(), next_runs, "{on_failure}");
        assert_eq!(sb.path("later").exists(), next_runs, "{on_failure}");
        let expected_step = if on_failure == "Ignore" {
            "ignoredfailure"
        } else {
            "failed"
        };
        assert_eq!(step(&sb.detailed(), "Fails")["status"], expected_step);
        if on_failure == "Ignore" {
            assert_eq!(summary["ignoredFailedStepCount"], 1);
        } else {
            assert_eq!(summary["failedStepCount"], 1);
        }
    }
}

#[test]
fn max_attempts_is_the_total_number_of_attempts() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("retry.yml")], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(sb.read("attempts").trim(), "3");
    assert_eq!(step(&sb.detailed(), "Flaky")["attempts"], 3);

    // With two attempts the same script gives up.
    let sb = Sandbox::new();
    let text = fs_err::read_to_string(doc("retry.yml"))
        .expect("read")
        .replace("maxAttempts: 3", "maxAttempts: 2");
    let path = sb.document("retry2.yml", &text);
    let out = sb.run(&[&path], &[]);
    assert_eq!(code(&out), 1);
    assert_eq!(sb.read("attempts").trim(), "2");
    let err = stderr(&out);
    assert!(
        err.contains(
            "error: component `retry` failed in phase `build`, step `Flaky` (attempt 2 of 2)"
        ) && err.contains("Caused by: the script exited with status 1")
            && err.contains("full log: "),
        "{err}"
    );
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("timeout.yml")], &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let child = pid_in(&sb, "child.pid");
    let shell = pid_in(&sb, "shell.pid");
    assert!(
        wait_gone(child),
        "background child {child} survived the timeout"
    );
    assert!(wait_gone(shell), "script {shell} survived the timeout");
    let detailed = sb.detailed();
    assert_eq!(step(&detailed, "Hang")["status"], "timedout");
    // The timeout covers all iterations together: 3 × 0.6 s do not fit in 1 s.
    let slow = step(&detailed, "SlowLoop");
    assert_eq!(slow["status"], "timedout");
    assert!(!sb.read("slow.txt").contains('3'));
}

fn interrupt_with(signal: nix::sys::signal::Signal) {
    let sb = Sandbox::new();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["component", "run", "--documents"])
        .arg(doc("interrupt.yml"))
        .arg("--working-directory")
        .arg(sb.work())
        .arg("--log-directory")
        .arg(sb.logs())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("builder starts");
    let until = Instant::now() + Duration::from_secs(20);
    while !sb.path("started").exists() {
        assert!(Instant::now() < until, "the step never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, signal).expect("signal sent");
    let status = child.wait().expect("builder exits");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read");
    assert_eq!(status.code(), Some(130), "{signal:?}");
    let summary: Value = serde_json::from_str(&stdout).expect("summary on stdout");
    assert_eq!(summary["status"], "cancelled");
    for file in ["child.pid", "shell.pid"] {
        let pid = pid_in(&sb, file);
        assert!(wait_gone(pid), "{file} {pid} survived {signal:?}");
    }
    assert!(!sb.path("never").exists());
    let detailed = sb.detailed();
    assert_eq!(step(&detailed, "Wait")["status"], "cancelled");
    assert_eq!(step(&detailed, "Never")["status"], "cancelled");
    let folder = sb.run_folder();
    for file in [
        "console.log",
        "application.log",
        "chaining.json",
        "document.yaml",
    ] {
        assert!(folder.join(file).exists(), "{file} written");
    }
}

#[test]
fn ctrl_c_cancels_kills_the_step_and_still_writes_logs() {
    interrupt_with(nix::sys::signal::Signal::SIGINT);
}

#[test]
fn sigterm_cancels_like_ctrl_c() {
    interrupt_with(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn parameters_are_checked_before_anything_runs() {
    let sb = Sandbox::new();
    let path = doc("required-parameter.yml");
    let out = sb.run(&[&path], &[]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("parameter `Needed` is required"),
        "{}",
        stderr(&out)
    );
    assert!(!sb.path("needed.txt").exists());
    assert!(!sb.logs().exists(), "nothing ran, so no run folder");

    let out = sb.run(&[&path], &["--parameters", "Needed="]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("empty value"), "{}", stderr(&out));

    let out = sb.run(&[&path], &["--parameters", "Needed=x,Mode=medium"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("not an allowed value"),
        "{}",
        stderr(&out)
    );

    let out = sb.run(
        &[&path],
        &[
            "--parameters",
            "Needed=a,b",
            "--parameters",
            "Mode=slow,Other=1",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(sb.read("needed.txt"), "a,b slow");
    assert!(
        stderr(&out).contains("`Other` is not declared"),
        "{}",
        stderr(&out)
    );
}

/// What AWSTOE accepts although it looks wrong runs as AWSTOE runs it, after a warning: an
/// input key the action does not have is ignored, and a `{{` without its `}}` stays text while
/// the reference after it is expanded.
#[test]
fn what_awstoe_ignores_is_ignored_and_an_unclosed_brace_is_text() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("awstoe-leniency.yml")], &[]);
    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert_eq!(summary(&out)["status"], "success");
    assert!(
        err.contains("warning: unknown key `force` in the inputs of `DeleteFile` is ignored"),
        "{err}"
    );
    assert!(
        err.contains("warning: `{{` is not closed by `}}`, so it is kept as text"),
        "{err}"
    );
    assert!(
        !sb.path("scratch.txt").exists(),
        "DeleteFile ran without `force`"
    );
    assert!(
        !sb.path("wrong.txt").exists(),
        "the unclosed `{{{{` was expanded"
    );
    assert_eq!(
        sb.read("literal.txt"),
        "{{ build.Mode.outputs.stdout\ninstall\n"
    );
}

#[test]
fn reboot_on_this_machine_fails_with_a_hint() {
    for name in ["reboot.yml", "reboot-194.yml"] {
        let sb = Sandbox::new();
        let out = sb.run(&[&doc(name)], &[]);
        assert_eq!(code(&out), 1, "{name}");
        let err = stderr(&out);
        assert!(
            err.contains("rebooting is not possible on this machine"),
            "{name}: {err}"
        );
        assert!(
            err.contains("hint:") && err.contains("vm:IMAGE"),
            "{name}: {err}"
        );
    }
}

#[test]
fn windows_actions_are_refused_before_anything_runs() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("windows.yml")], &[]);
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    assert!(err.contains("Windows-only"), "{err}");
    assert!(
        err.contains("windows.yml:") && err.contains("ExecutePowerShell"),
        "{err}"
    );
    assert!(!sb.path("ran").exists());
    // The phase that holds it is not selected: the rest runs.
    let out = sb.run(&[&doc("windows.yml")], &["--phases", "validate"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// One HTTP request as the test servers see it.
struct Request {
    method: String,
    /// Path and query, as sent.
    target: String,
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that answers each request with `handler`
/// (status, body) until dropped.
struct HttpServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    fn start(handler: impl Fn(&Request) -> (u16, Vec<u8>) + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                // Read (and drop) the body so the client sees the whole request consumed.
                let mut body = vec![0u8; length];
                let _ = reader.read_exact(&mut body);
                let mut parts = request_line.split_whitespace();
                let request = Request {
                    method: parts.next().unwrap_or("").to_string(),
                    target: parts.next().unwrap_or("").to_string(),
                };
                let (status, body) = handler(&request);
                let reason = if status == 200 { "OK" } else { "Error" };
                let mut response = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                response.extend_from_slice(&body);
                let _ = stream.write_all(&response);
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `body` at `/file.txt`, 404 elsewhere.
    fn file(body: &'static [u8]) -> Self {
        Self::start(move |r| {
            if r.method == "GET" && r.target == "/file.txt" {
                (200, body.to_vec())
            } else {
                (404, Vec::new())
            }
        })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread sees the flag and ends.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn web_download_checks_the_checksum() {
    let server = HttpServer::file(b"downloaded content\n");
    let url = format!("http://127.0.0.1:{}/file.txt", server.port);
    let actual = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"downloaded content\n"))
    };
    let document = |checksum: &str, destination: &str| {
        format!(
            "name: download\nschemaVersion: 1.0\nparameters:\n  - Url:\n      type: string\nphases:\n  - name: build\n    steps:\n      - name: Get\n        action: WebDownload\n        inputs:\n          - source: \"{{{{ Url }}}}\"\n            destination: {destination}\n            checksum: {checksum}\n            algorithm: SHA256\n      - name: Record\n        action: CreateFile\n        inputs:\n          - path: where.txt\n            content: \"{{{{ build.Get.outputs.destination }}}}\"\n"
        )
    };
    let url_param = format!("Url={url}");

    let sb = Sandbox::new();
    let path = sb.document("good.yml", &document(&actual, "into/folder/"));
    let out = sb.run(&[&path], &["--parameters", &url_param]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(sb.read("into/folder/file.txt"), "downloaded content\n");
    assert_eq!(
        sb.read("where.txt"),
        sb.path("into/folder/file.txt").display().to_string()
    );

    let sb = Sandbox::new();
    let bad = "0".repeat(64);
    let path = sb.document("bad.yml", &document(&bad, "file.txt"));
    let out = sb.run(&[&path], &["--parameters", &url_param]);
    assert_eq!(code(&out), 1);
    let message = summary(&out)["failureMessage"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("does not match"), "{message}");
    assert!(!sb.path("file.txt").exists(), "a bad download is not kept");
    let leftovers: Vec<_> = fs_err::read_dir(sb.work())
        .expect("work")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(leftovers.is_empty(), "nothing left behind: {leftovers:?}");

    let sb = Sandbox::new();
    let missing = format!("Url=http://127.0.0.1:{}/missing", server.port);
    let path = sb.document("missing.yml", &document(&actual, "file.txt"));
    let out = sb.run(&[&path], &["--parameters", &missing]);
    assert_eq!(code(&out), 1);
    assert!(
        summary(&out)["failureMessage"]
            .as_str()
            .is_some_and(|m| m.contains("404")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn s3_without_an_endpoint_says_how_to_configure_one() {
    let sb = Sandbox::new();
    let path = sb.document(
        "s3.yml",
        "name: s3\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Get\n        action: S3Download\n        inputs:\n          - source: s3://bucket/key.txt\n            destination: key.txt\n",
    );
    let out = sb.run(&[&path], &[]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("BUILDER_S3_ENDPOINT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn execute_document_runs_nested_documents_and_detects_cycles() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("parent.yml")], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(sb.read("child.txt"), "nested");
    assert!(
        !sb.path("child-test-phase.txt").exists(),
        "only the build phase ran"
    );
    assert_eq!(sb.read("nested-summary.txt"), "success 1");
    let nested = &step(&sb.detailed(), "Nested")["detailedOutput"];
    assert_eq!(nested[0]["documents"][0]["name"], "child");

    let sb = Sandbox::new();
    let out = sb.run(&[&doc("cycle.yml")], &[]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("cycle"), "{}", stderr(&out));
}

#[test]
fn phases_run_in_document_order_and_documents_in_the_order_given() {
    let sb = Sandbox::new();
    let make = |name: &str| {
        sb.document(
            &format!("{name}.yml"),
            &format!(
                "name: {name}\nschemaVersion: 1.0\nphases:\n{}",
                ["build", "validate", "test"]
                    .iter()
                    .map(|p| format!(
                        "  - name: {p}\n    steps:\n      - name: Mark\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo {name}-{p} >> order.txt\n"
                    ))
                    .collect::<String>()
            ),
        )
    };
    let first = make("first");
    let second = make("second");
    let out = sb
        .command(&[&second])
        .arg("--documents")
        .arg(&first)
        .args(["--phases", "test,build"])
        .output()
        .expect("runs");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        sb.read("order.txt"),
        "second-build\nsecond-test\nfirst-build\nfirst-test\n"
    );
    let folder = sb.run_folder();
    assert!(folder.join("document-1.yaml").exists() && folder.join("document-2.yaml").exists());
}

#[test]
fn logs_and_json_events() {
    let sb = Sandbox::new();
    let out = sb.run(
        &[&doc("loops.yml")],
        &["--json", "--execution-id", "run-42", "--phases", "build"],
    );
    assert_eq!(code(&out), 1);
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(events[0]["event"], "runStarted");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "stepOutput" && e["step"] == "Delimited" && e["line"] == "b")
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "stepFinished" && e["step"] == "Up" && e["status"] == "success")
    );
    let last = events.last().expect("events");
    assert_eq!(last["event"], "summary");
    assert_eq!(last["executionId"], "run-42");
    assert_eq!(last["status"], "failed");
    assert_eq!(last["failedStepCount"], 1);

    let folder = sb.run_folder();
    let name = folder
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("TOE_") && name.ends_with("_UTC-0_run-42"),
        "{name}"
    );
    let console = fs_err::read_to_string(folder.join("console.log")).expect("console.log");
    assert!(console.contains("0:3\n1:2\n2:1\n"), "{console}");
    let app = fs_err::read_to_string(folder.join("application.log")).expect("application.log");
    assert!(app.contains("StopsAtFirstFailure"), "{app}");
    let chaining: Value = serde_json::from_str(
        &fs_err::read_to_string(folder.join("chaining.json")).expect("chaining.json"),
    )
    .expect("JSON");
    assert!(
        chaining["resolutions"]
            .as_array()
            .expect("resolutions")
            .iter()
            .any(|r| r["reference"] == "build.Up.outputs.stdout" && r["value"] == "1\n3\n5")
    );
    let detailed = sb.detailed();
    assert_eq!(detailed["executionId"], "run-42");
    assert_eq!(detailed["documents"][0]["status"], "failed");
}

#[test]
fn bad_input_is_rejected_with_exit_code_2() {
    let sb = Sandbox::new();
    let path = sb.document(
        "invalid.yml",
        "name: bad\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: X\n        action: NoSuchAction\n",
    );
    let out = sb.run(&[&path], &[]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("invalid.yml:7:"), "{}", stderr(&out));

    let out = sb.run(&[&doc("retry.yml")], &["--target", "ssh:somewhere"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("unknown target"), "{}", stderr(&out));
    assert!(!sb.path("attempts").exists());
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("images/components")
        .join(name)
}

#[test]
fn example_components_validate_and_the_local_ones_run() {
    let all: Vec<PathBuf> = fs_err::read_dir(example(""))
        .expect("images/components")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    assert!(all.len() >= 4, "{all:?}");
    let out = assert_cmd::Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["component", "validate"])
        .args(&all)
        .output()
        .expect("validate runs");
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // install-packages changes the system (root, package manager): validated only.
    let sb = Sandbox::new();
    let motd = sb.path("motd");
    let ssh = sb.path("ssh");
    let parameters = format!(
        "MotdPath={},ConfigDirectory={},ImageName=example",
        motd.display(),
        ssh.display()
    );
    let out = sb.run(
        &[
            &example("create-motd.yml"),
            &example("harden-ssh.yml"),
            &example("test-basics.yml"),
        ],
        &["--parameters", &parameters],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        sb.read("motd")
            .starts_with("Welcome to example, built by builder on ")
    );
    assert!(
        sb.read("ssh/50-builder-hardening.conf")
            .contains("PasswordAuthentication no")
    );
}

/// This machine, but `reboot()` succeeds (and is counted): what a VM target does, minus the
/// VM. Proves the executor's reboot path without one.
struct RebootableLocal {
    inner: builder::machine::host::HostMachine,
    reboots: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl builder::machine::Machine for RebootableLocal {
    fn describe(&self) -> String {
        "this machine (pretending to reboot)".into()
    }
    async fn info(&self) -> Result<builder::machine::MachineInfo, builder::machine::MachineError> {
        self.inner.info().await
    }
    async fn exec(
        &self,
        request: &builder::machine::ExecRequest,
        sink: &dyn builder::machine::OutputSink,
    ) -> Result<builder::machine::ExecOutcome, builder::machine::MachineError> {
        self.inner.exec(request, sink).await
    }
    async fn put_file(
        &self,
        remote: &Path,
        content: builder::machine::FileSource,
        options: &builder::machine::PutOptions,
    ) -> Result<builder::machine::FileInfo, builder::machine::MachineError> {
        self.inner.put_file(remote, content, options).await
    }
    async fn get_file(
        &self,
        remote: &Path,
        local: &Path,
    ) -> Result<builder::machine::FileInfo, builder::machine::MachineError> {
        self.inner.get_file(remote, local).await
    }
    async fn stat(
        &self,
        remote: &Path,
    ) -> Result<Option<builder::machine::FileStat>, builder::machine::MachineError> {
        self.inner.stat(remote).await
    }
    async fn list(
        &self,
        remote: &Path,
    ) -> Result<Vec<builder::machine::DirEntry>, builder::machine::MachineError> {
        self.inner.list(remote).await
    }
    async fn reboot(&self) -> Result<(), builder::machine::MachineError> {
        self.reboots.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn run_with_reboots(sb: &Sandbox, text: &str) -> (builder::component::executor::RunOutcome, u32) {
    use builder::component::executor::{RunOptions, RunRequest, Silent};
    let path = sb.document("reboots.yml", text);
    let document = builder::component::parse::load(&path).expect("valid document");
    let target = RebootableLocal {
        inner: builder::machine::host::HostMachine::new(),
        reboots: std::sync::atomic::AtomicU32::new(0),
    };
    let options = RunOptions {
        working_directory: Some(sb.work()),
        max_reboots: 3,
        ..RunOptions::default()
    };
    let request = RunRequest {
        documents: vec![document],
        ..RunRequest::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = runtime
        .block_on(builder::component::executor::run(
            &target,
            request,
            options,
            &Silent,
            tokio_util::sync::CancellationToken::new(),
        ))
        .expect("the run starts");
    (outcome, target.reboots.load(Ordering::SeqCst))
}

#[test]
fn exit_194_reboots_and_reruns_the_same_step_and_reboot_continues() {
    let sb = Sandbox::new();
    let text = "name: reboots\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Before\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo before >> trace\n      - name: Kernel\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo kernel >> trace\n            - if [ ! -e rebooted ]; then touch rebooted; exit 194; fi\n      - name: Restart\n        action: Reboot\n      - name: After\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo after >> trace\n";
    let (outcome, reboots) = run_with_reboots(&sb, text);
    assert_eq!(outcome.summary.status.as_str(), "success");
    assert_eq!(reboots, 2, "one for exit 194, one for the Reboot action");
    // The 194 step ran again after its reboot; the steps before it did not.
    assert_eq!(sb.read("trace"), "before\nkernel\nkernel\nafter\n");
}

#[test]
fn reboots_are_capped() {
    let sb = Sandbox::new();
    let text = "name: reboots\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Always\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo x >> trace\n            - exit 194\n";
    let (outcome, reboots) = run_with_reboots(&sb, text);
    assert_eq!(outcome.summary.status.as_str(), "failed");
    assert_eq!(reboots, 3);
    assert!(
        outcome
            .summary
            .failure_message
            .contains("more than 3 reboots")
    );
    assert_eq!(sb.read("trace").lines().count(), 4);
}

#[test]
fn execute_bash_and_execute_binary() {
    let sb = Sandbox::new();
    let out = sb.run(&[&doc("exec.yml")], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        sb.read("exec.txt"),
        format!("in {}\none two|ONLY_HERE=unset|", sb.work().display())
    );
}

#[test]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
fn s3_upload_and_download_against_an_s3_compatible_endpoint() {
    let server = S3Server::start("bucket");
    let run = |sb: &Sandbox, document: &Path, secret: &str| {
        sb.command(&[document])
            .env("BUILDER_S3_ENDPOINT", server.endpoint())
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_REGION", "us-east-1")
            .output()
            .expect("runs")
    };

    let sb = Sandbox::new();
    let path = sb.document(
        "s3.yml",
        "name: s3\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Prepare\n        action: CreateFile\n        inputs:\n          - path: up/one.txt\n            content: one\n          - path: up/sub/two.txt\n            content: two\n          - path: up/sub/deeper/three.txt\n            content: three\n      - name: UploadOne\n        action: S3Upload\n        inputs:\n          - source: up/one.txt\n            destination: s3://bucket/single/one-copy.txt\n      - name: UploadTree\n        action: S3Upload\n        inputs:\n          - source: up\n            destination: s3://bucket/tree/\n            recurse: true\n      - name: DownloadOne\n        action: S3Download\n        inputs:\n          - source: s3://bucket/single/one-copy.txt\n            destination: one-back.txt\n      - name: DownloadPrefix\n        action: S3Download\n        inputs:\n          - source: s3://bucket/tree/*\n            destination: tree-back\n",
    );
    let out = run(&sb, &path, S3_SECRET);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // What the server keeps, read from its own folder.
    assert_eq!(
        server.stored("bucket", "single/one-copy.txt").as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        server.stored("bucket", "tree/one.txt").as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        server.stored("bucket", "tree/sub/two.txt").as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        server
            .stored("bucket", "tree/sub/deeper/three.txt")
            .as_deref(),
        Some(&b"three"[..])
    );
    // What came back through S3.
    assert_eq!(sb.read("one-back.txt"), "one");
    assert_eq!(sb.read("tree-back/one.txt"), "one");
    assert_eq!(sb.read("tree-back/sub/two.txt"), "two");
    assert_eq!(sb.read("tree-back/sub/deeper/three.txt"), "three");
    let mut back: Vec<String> = Vec::new();
    let mut pending = vec![sb.path("tree-back")];
    while let Some(dir) = pending.pop() {
        for entry in fs_err::read_dir(&dir).expect("tree-back") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(sb.path("tree-back")).expect("under");
                back.push(relative.display().to_string());
            }
        }
    }
    back.sort();
    assert_eq!(
        back,
        ["one.txt", "sub/deeper/three.txt", "sub/two.txt"],
        "exactly the objects under the prefix"
    );

    // A wrong secret: the server refuses the signature and the step says so.
    for (name, action) in [
        (
            "upload",
            "action: S3Upload\n        inputs:\n          - source: one.txt\n            destination: s3://bucket/refused.txt\n",
        ),
        (
            "download",
            "action: S3Download\n        inputs:\n          - source: s3://bucket/single/one-copy.txt\n            destination: refused.txt\n",
        ),
    ] {
        let sb = Sandbox::new();
        fs_err::write(sb.path("one.txt"), "one").expect("write");
        let path = sb.document(
            "wrong.yml",
            &format!(
                "name: wrong\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Transfer\n        {action}"
            ),
        );
        let out = run(&sb, &path, "not-the-secret");
        assert_eq!(code(&out), 1, "{name}: {}", stderr(&out));
        let message = summary(&out)["failureMessage"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(message.contains("403"), "{name}: {message}");
        // The S3 error code from the response body, as AWS would send it too.
        assert!(
            message.contains("SignatureDoesNotMatch"),
            "{name}: {message}"
        );
        assert!(
            !message.contains("X-Amz-Signature"),
            "{name}: the presigned query is not shown: {message}"
        );
    }
    assert_eq!(server.stored("bucket", "refused.txt"), None);
}

#[test]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
fn s3_upload_of_a_large_file_goes_in_parts() {
    let server = S3Server::start("bucket");
    let sb = Sandbox::new();
    // Past the 16 MiB single-request limit: two parts with the AMI import's multipart upload.
    let data: Vec<u8> = (0..17 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    fs_err::write(sb.path("big.bin"), &data).expect("write");
    let path = sb.document(
        "big.yml",
        "name: big\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Up\n        action: S3Upload\n        inputs:\n          - source: big.bin\n            destination: s3://bucket/big.bin\n      - name: Down\n        action: S3Download\n        inputs:\n          - source: s3://bucket/big.bin\n            destination: back.bin\n",
    );
    let out = sb
        .command(&[&path])
        .env("BUILDER_S3_ENDPOINT", server.endpoint())
        .env("AWS_ACCESS_KEY_ID", S3_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env_remove("AWS_SESSION_TOKEN")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("runs");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        server.stored("bucket", "big.bin") == Some(data.clone()),
        "stored intact"
    );
    assert!(
        fs_err::read(sb.path("back.bin")).expect("back") == data,
        "read back intact"
    );
    assert_eq!(server.pending_uploads(), Vec::<String>::new());
}

#[test]
fn update_os_uses_the_package_manager_it_finds() {
    let sb = Sandbox::new();
    // Stand-ins for apt-get and apt-mark, first on PATH, that record how they were called.
    let bin = sb.root.path().join("bin");
    fs_err::create_dir(&bin).expect("bin");
    let calls = sb.root.path().join("calls");
    for tool in ["apt-get", "apt-mark"] {
        let script = bin.join(tool);
        fs_err::write(
            &script,
            format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", calls.display()),
        )
        .expect("write");
        use std::os::unix::fs::PermissionsExt;
        fs_err::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = sb.document(
        "update.yml",
        "name: update\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Everything\n        action: UpdateOS\n      - name: Some\n        action: UpdateOS\n        inputs:\n          include:\n            - curl\n            - openssl\n          exclude:\n            - openssl\n            - linux-image-amd64\n",
    );
    let system_path = std::env::var("PATH").unwrap_or_default();
    let out = sb
        .command(&[&path])
        .env("PATH", format!("{}:{system_path}", bin.display()))
        .output()
        .expect("runs");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let calls = fs_err::read_to_string(&calls).expect("the package manager was called");
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(
        lines,
        [
            "apt-get update",
            "apt-get -y -o Dpkg::Options::=--force-confold upgrade",
            "apt-get update",
            "apt-mark hold openssl linux-image-amd64",
            "apt-get -y -o Dpkg::Options::=--force-confold install --only-upgrade curl",
            "apt-mark unhold openssl linux-image-amd64",
        ]
    );
}

#[test]
fn web_download_retries_a_server_error() {
    let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = hits.clone();
    let server = HttpServer::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            (503, Vec::new())
        } else {
            (200, b"second time lucky".to_vec())
        }
    });
    let sb = Sandbox::new();
    let path = sb.document(
        "retry-download.yml",
        &format!(
            "name: d\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Get\n        action: WebDownload\n        inputs:\n          - source: http://127.0.0.1:{}/x\n            destination: x.txt\n",
            server.port
        ),
    );
    let out = sb.run(&[&path], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(sb.read("x.txt"), "second time lucky");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(
        stderr(&out).contains("503"),
        "the retry is shown: {}",
        stderr(&out)
    );
}

#[test]
fn nothing_is_left_in_the_temporary_folder() {
    // The default working directory and every script file live under TMPDIR; after runs that
    // succeed, fail, time out and are interrupted, it is empty again.
    let sb = Sandbox::new();
    let tmp = sb.root.path().join("tmp");
    fs_err::create_dir(&tmp).expect("tmp");
    for name in ["exec.yml", "loops.yml", "timeout.yml", "retry.yml"] {
        let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_builder"));
        let out = cmd
            .args(["component", "run", "--documents"])
            .arg(doc(name))
            .arg("--log-directory")
            .arg(sb.logs())
            .env("TMPDIR", &tmp)
            .timeout(Duration::from_secs(60))
            .output()
            .expect("runs");
        assert!(code(&out) <= 1, "{name}: {}", stderr(&out));
        let left: Vec<_> = fs_err::read_dir(&tmp)
            .expect("tmp")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "{name} left {left:?}");
    }
}

/// A build passes the documents its plan pinned: `ExecuteDocument` runs a pinned document
/// whose bytes are unchanged, and fails the step for one that changed or was not pinned.
#[test]
fn execute_document_runs_only_pinned_documents_when_given_pins() {
    use builder::component::executor::{self, RunOptions, RunRequest, Silent};
    use sha2::Digest;
    let run = |pins: Option<Vec<(PathBuf, String)>>| {
        let sb = Sandbox::new();
        let document = builder::component::parse::load(&doc("parent.yml")).expect("valid");
        let options = RunOptions {
            working_directory: Some(sb.work()),
            pinned_documents: pins.map(|p| p.into_iter().collect()),
            ..RunOptions::default()
        };
        let request = RunRequest {
            documents: vec![document],
            ..RunRequest::default()
        };
        let outcome = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(executor::run(
                &builder::machine::host::HostMachine::new(),
                request,
                options,
                &Silent,
                tokio_util::sync::CancellationToken::new(),
            ))
            .expect("the run starts");
        (
            outcome.summary.status.as_str().to_string(),
            outcome.report.failure_message,
        )
    };
    let child = executor::canonical(&doc("child.yml"));
    let bytes = fs_err::read(&child).expect("child.yml");
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));

    assert_eq!(run(None).0, "success", "no pins: any document");
    assert_eq!(run(Some(vec![(child.clone(), sha256)])).0, "success");
    let (status, message) = run(Some(vec![(child.clone(), "0".repeat(64))]));
    assert_eq!(status, "failed");
    assert!(
        message.contains("changed since the build was planned"),
        "{message}"
    );
    let (status, message) = run(Some(Vec::new()));
    assert_eq!(status, "failed");
    assert!(
        message.contains("is not one of the documents the build's plan pinned"),
        "{message}"
    );
}
