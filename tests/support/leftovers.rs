//! The one leftover guard for tests that start builder, QEMU or a VM: a private folder with
//! a store (`store/`) and a runtime folder (`run/`, where VM folders go through
//! `XDG_RUNTIME_DIR` or `VmOptions::work_dir`), checked when the guard is dropped.
//!
//! Left behind means: a live process whose command line mentions the folder (QEMU, the VM
//! folder's watcher, builder itself), anything in `run/`, a disk chain in `store/work/`, a
//! build in `store/staging/`, anything in `store/trash/`, a `.partial` output in
//! `store/images/`, an insert in progress (`.tmp-*`) in `store/cache/layers/`. Processes are found by command line
//! ([`builder::store::runner::processes_mentioning`]), never by name: QEMU renames itself
//! (`-name …,process=builder-vm-…`), so `pgrep qemu-system` sees nothing. `Drop` waits a
//! little (a killed builder's QEMU and watcher take a moment), kills what is still running,
//! and fails the test with the list.

// Each test file that includes this uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct NoLeftovers {
    root: tempfile::TempDir,
}

impl NoLeftovers {
    pub fn new() -> Self {
        // A short path: unix sockets (at most 107 bytes) live under it.
        let root = tempfile::Builder::new()
            .prefix("bt-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        fs_err::create_dir(root.path().join("run")).expect("mkdir run");
        Self { root }
    }

    /// The private folder; files a test writes here (recipes, copies) are not leftovers.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The store (`BUILDER_STORE`); created by the first builder command.
    pub fn store(&self) -> PathBuf {
        self.root().join("store")
    }

    /// Where VM folders go (`XDG_RUNTIME_DIR`, `VmOptions::work_dir`); must end empty.
    pub fn runtime(&self) -> PathBuf {
        self.root().join("run")
    }

    /// `builder ARGS` in this folder: its store (`BUILDER_STORE`) and runtime folder
    /// (`XDG_RUNTIME_DIR`), the folder as working directory, no colour; not started.
    pub fn builder_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_builder"));
        cmd.args(args)
            .current_dir(self.root())
            .env("BUILDER_STORE", self.store())
            .env("XDG_RUNTIME_DIR", self.runtime())
            .env("NO_COLOR", "1");
        cmd
    }

    /// The end of each VM's serial console in the store's failed builds, on the test's
    /// stderr: what a CI log needs to tell a guest that hung from one that was slow (the
    /// store itself goes with the guard).
    pub fn echo_failed_consoles(&self, lines: usize) {
        for path in walk(&self.store().join("failed")) {
            if path.file_name().is_none_or(|n| n != "console.log") {
                continue;
            }
            let text = fs_err::read(&path).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let all: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- last {lines} lines of {} ---",
                path.strip_prefix(self.store()).unwrap_or(&path).display()
            );
            for line in &all[all.len().saturating_sub(lines)..] {
                eprintln!("  | {line}");
            }
        }
    }

    /// What is left now, one line each (`process <pid>: <command line>`, or a path).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> =
            builder::store::runner::processes_mentioning(&self.root().to_string_lossy())
                .into_iter()
                .map(|p| format!("process {}: {}", p.pid, p.command_line))
                .collect();
        for dir in [
            self.runtime(),
            self.store().join("work"),
            self.store().join("staging"),
            self.store().join("trash"),
        ] {
            for e in fs_err::read_dir(&dir).into_iter().flatten().flatten() {
                left.push(format!("file {}", e.path().display()));
            }
        }
        // An insert into the layer cache in progress (store::layers) never outlives its build.
        for e in fs_err::read_dir(self.store().join("cache/layers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                left.push(format!("layer cache insert {}", e.path().display()));
            }
        }
        for p in walk(&self.store().join("images")) {
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".partial"))
            {
                left.push(format!("partial output {}", p.display()));
            }
        }
        left
    }

    /// Wait (bounded) until nothing is left; what is left otherwise.
    pub fn wait_clean(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = self.leftovers();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The QEMU processes of this folder, found by command line (QEMU renames itself).
    pub fn qemus(&self) -> Vec<u32> {
        builder::store::runner::processes_mentioning(&self.root().to_string_lossy())
            .into_iter()
            .filter(|p| p.command_line.contains("qemu-system"))
            .map(|p| p.pid)
            .collect()
    }

    /// SIGKILLs `builder` (running one VM of this folder) and checks its QEMU dies with it
    /// (parent-death signal) within 30 s.
    pub fn kill_builder_and_its_qemu(&self, builder: &mut Child) {
        let running = self.qemus();
        assert_eq!(running.len(), 1, "one QEMU: {running:?}");
        builder.kill().expect("SIGKILL builder");
        builder.wait().expect("reap builder");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.qemus().is_empty() {
            assert!(
                Instant::now() < deadline,
                "QEMU {running:?} outlived its builder"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill (SIGKILL) every process that mentions the folder; their pids.
    pub fn kill_processes(&self) -> Vec<u32> {
        let found = builder::store::runner::processes_mentioning(&self.root().to_string_lossy());
        for p in &found {
            if let Ok(pid) = i32::try_from(p.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        found.into_iter().map(|p| p.pid).collect()
    }
}

impl Drop for NoLeftovers {
    fn drop(&mut self) {
        let left = self.wait_clean(Duration::from_secs(15));
        if left.is_empty() {
            return;
        }
        // Leave no mess for the next test either way.
        self.kill_processes();
        if !std::thread::panicking() {
            panic!("left behind after the test:\n  {}", left.join("\n  "));
        }
    }
}

/// Runs `cmd` (a `builder ARGS`) to its end, and echoes the command line, its stderr and its
/// exit code on the test's stderr (shown when the test fails).
pub fn run_echoed(cmd: &mut Command, args: &[&str]) -> Output {
    let out = cmd.output().expect("builder runs");
    eprintln!(
        "$ builder {}\n{}--- exit {:?}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    out
}

/// Starts `cmd` (a `builder ARGS`) with its stderr piped and echoed on the test's stderr, and
/// returns once a line contains `needle`: the child, the lines so far, and the rest as they
/// come. Kills the child and fails the test when no such line comes within `within`.
pub fn spawn_until(
    cmd: &mut Command,
    needle: &str,
    within: Duration,
) -> (Child, Vec<String>, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("builder starts");
    let (tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + within;
    while !seen.iter().any(|l| l.contains(needle)) {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no `{needle}` from builder:\n{}", seen.join("\n"));
            }
        }
    }
    (child, seen, lines)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs_err::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
