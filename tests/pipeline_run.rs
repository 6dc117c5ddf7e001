//! Local tier: `builder pipeline run` and `builder serve` as real processes on a private store
//! and pipeline history, without booting a guest:
//!
//! - a pipeline whose inputs did not change since its last successful execution is skipped,
//!   with what did not change; after its parent image changes, it builds, and the run reason
//!   names the parent (the build itself cannot boot the 4 KiB parent: it fails fast, which is
//!   all this tier needs; the VM tier builds for real in `pipeline_serve_vm.rs`).
//! - `builder serve` after downtime runs only the latest missed occurrence, persists the next
//!   run, stops on SIGTERM, and a restarted scheduler does not run that slot again.
//!
//! The history is read with the library while the processes write it (SQLite in WAL mode).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use builder::pipeline::conditions::Inputs;
use builder::pipeline::history::{ExecStatus, Execution, History, Outcome, Trigger};
use builder::store::Store;
use chrono::Utc;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A folder with a recipe on a 4 KiB raw parent, its component, and a store.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(pipeline: &str, parent: &str) -> Site {
        let dir = tempfile::Builder::new()
            .prefix("b-pipeline-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("pipelines")).expect("mkdir");
        std::fs::create_dir_all(d.join("run")).expect("mkdir");
        std::fs::copy(
            root().join("tests/cases/recipe/parent.raw"),
            d.join("parent.raw"),
        )
        .expect("copy the parent");
        std::fs::copy(
            root().join("tests/cases/recipe/components/hello.yml"),
            d.join("hello.yml"),
        )
        .expect("copy the component");
        std::fs::write(
            d.join("recipe.yml"),
            format!(
                "name: hello\nversion: 1.0.0\nparentImage: {parent}\ncomponents:\n  - path: hello.yml\n    parameters: {{Greeting: hi}}\ntests: {{enabled: false}}\n"
            ),
        )
        .expect("write the recipe");
        std::fs::write(d.join("pipelines/hello.yml"), pipeline).expect("write the pipeline");
        Site { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_builder"));
        c.args(args)
            .arg("--store")
            .arg(self.path("store"))
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env("XDG_RUNTIME_DIR", self.path("run"));
        c
    }

    fn builder(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = self.command(args).output().expect("builder runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!(
            "$ builder {}\n{stderr}--- exit {:?}",
            args.join(" "),
            out.status.code()
        );
        (out.status.code(), stderr)
    }

    fn history(&self) -> History {
        let store = Store::open(self.path("store")).expect("store");
        History::open(&History::default_path(&store)).expect("history")
    }

    fn executions(&self) -> Vec<Execution> {
        self.history()
            .executions(Some("hello"), 100)
            .expect("executions")
    }

    /// Nothing of a build is left: no staging or work folder, no VM folder, no process.
    fn assert_no_leftovers(&self) {
        for dir in ["store/staging", "store/work", "run"] {
            let left: Vec<_> = std::fs::read_dir(self.path(dir))
                .map(|r| r.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left in {dir}: {left:?}");
        }
        let me = self.dir.path().to_string_lossy().into_owned();
        for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
            if let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                assert!(!cmdline.contains(&me), "process left: {cmdline}");
            }
        }
    }
}

/// The transitions' details, joined, for messages and checks.
fn details(e: &Execution) -> String {
    e.transitions
        .iter()
        .map(|t| format!("{}: {}", t.status, t.detail.as_deref().unwrap_or("")))
        .collect::<Vec<_>>()
        .join("\n")
}

const DEPENDENCY_PIPELINE: &str = "name: hello\nrecipe: ../recipe.yml\n# Fails fast whatever the host: no KVM, or a guest that cannot boot.\ninfrastructure: {accelerator: kvm, bootTimeoutSeconds: 5}\nschedule:\n  expression: '0 3 * * *'\n  startCondition: dependencyChanged\n";

#[test]
fn skipped_while_nothing_changed_then_built_after_the_parent_changed() {
    let site = Site::new(DEPENDENCY_PIPELINE, "parent.raw");
    // A successful execution with the inputs the plan pins now, as a real build records them.
    let store = Store::open(site.path("store")).expect("store");
    let (plan, _) =
        builder::build::plan::make(&site.path("recipe.yml"), &store, &mut |_| {}).expect("plan");
    let history = site.history();
    let first = history
        .begin("hello", Trigger::Manual, "seeded by the test")
        .expect("begin")
        .expect("an id");
    history
        .finish(
            first,
            &Outcome {
                inputs: Some(Inputs::of(&plan).to_json()),
                ..Outcome::available("hello/1.0.0/1")
            },
        )
        .expect("finish");

    // 1. Nothing changed: skipped, no build, the reason says what was compared.
    let (code, stderr) = site.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("skipped"), "{stderr}");
    let skipped = &site.executions()[0];
    assert_eq!(skipped.status, ExecStatus::Skipped, "{}", details(skipped));
    let why = details(skipped);
    assert!(
        why.contains(&format!(
            "nothing changed since execution {first} (hello/1.0.0/1)"
        )),
        "{why}"
    );
    assert!(why.contains("parent image `parent.raw`"), "{why}");
    assert!(
        !site
            .path("store/failed")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())
    );

    // 2. A new parent image at the same path: the pipeline builds, and says why.
    let mut bytes = std::fs::read(site.path("parent.raw")).expect("read the parent");
    bytes[0] ^= 0xff;
    std::fs::write(site.path("parent.raw"), bytes).expect("write the parent");
    let (code, stderr) = site.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_ne!(code, Some(0), "the 4 KiB parent cannot boot:\n{stderr}");
    assert_ne!(code, Some(2), "not an input problem:\n{stderr}");
    let ran = &site.executions()[0];
    let why = details(ran);
    assert_eq!(ran.status, ExecStatus::Failed, "{why}");
    assert!(
        why.contains(&format!("dependency changed since execution {first}"))
            && why.contains("parent image `parent.raw` changed (sha256 "),
        "{why}"
    );
    assert!(
        ran.inputs.is_some(),
        "a failed build records its inputs too"
    );
    site.assert_no_leftovers();

    // 3. --force builds whatever the condition says.
    let (_, _) = site.builder(&["pipeline", "run", "--force", "pipelines/hello.yml"]);
    let forced = &site.executions()[0];
    assert!(
        details(forced).contains("forced (--force)"),
        "{}",
        details(forced)
    );
    site.assert_no_leftovers();
}

/// `builder serve` on the site's pipelines folder, with stderr kept in a file.
fn serve(site: &Site, log: &str) -> Child {
    let file = std::fs::File::create(site.path(log)).expect("log file");
    site.command(&["serve", "--pipelines", "pipelines"])
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("builder serve starts")
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop(mut child: Child, signal: nix::sys::signal::Signal) -> Option<i32> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    nix::sys::signal::kill(pid, signal).expect("signal the scheduler");
    child.wait().expect("the scheduler exits").code()
}

#[test]
fn serve_catches_up_once_after_downtime_and_never_twice_after_a_restart() {
    // The parent is a store reference that is not there: the plan fails at once, so the
    // execution ends quickly without a VM.
    let pipeline = "name: hello\nrecipe: ../recipe.yml\nschedule:\n  expression: '0 3 * * *'\n  startCondition: always\n";
    let site = Site::new(pipeline, "missing-base/1.x.x");
    let now = Utc::now();
    // The scheduler was down for three days: three 03:00 occurrences were missed.
    site.history()
        .set_next_run("hello", now - chrono::Duration::days(3))
        .expect("seed the next run");

    let child = serve(&site, "serve-1.log");
    wait_for(
        "the caught-up execution to end",
        Duration::from_secs(120),
        || {
            site.executions()
                .first()
                .is_some_and(|e| e.status.is_terminal())
        },
    );
    let next = site.history().next_run("hello").expect("next run");
    assert_eq!(stop(child, nix::sys::signal::Signal::SIGTERM), Some(0));
    let log = std::fs::read_to_string(site.path("serve-1.log")).expect("log");
    eprintln!("{log}");
    assert!(log.contains("stopped"), "{log}");

    let executions = site.executions();
    assert_eq!(executions.len(), 1, "one catch-up run only: {executions:?}");
    let e = &executions[0];
    let due = e.due().expect("a scheduled execution");
    assert!(
        due <= now && due > now - chrono::Duration::days(1),
        "the latest missed: {due}"
    );
    assert!(
        e.reason.contains("catching up after downtime"),
        "{}",
        e.reason
    );
    assert_eq!(e.status, ExecStatus::Failed);
    assert!(
        e.error
            .as_deref()
            .is_some_and(|m| m.contains("missing-base/1.x.x")),
        "{:?}",
        e.error
    );
    let next = next.expect("the next run is persisted");
    assert!(
        next > now && next <= now + chrono::Duration::days(1),
        "{next}"
    );

    // Restarted: the slot is not run again, nothing is recovered, the next run stays.
    let child = serve(&site, "serve-2.log");
    wait_for("the scheduler to start", Duration::from_secs(60), || {
        std::fs::read_to_string(site.path("serve-2.log")).is_ok_and(|l| l.contains("serving"))
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stop(child, nix::sys::signal::Signal::SIGTERM), Some(0));
    assert_eq!(site.executions().len(), 1);
    assert_eq!(
        site.history().next_run("hello").expect("next run"),
        Some(next)
    );
    site.assert_no_leftovers();
}

#[test]
fn serve_refuses_a_missing_folder() {
    let site = Site::new(DEPENDENCY_PIPELINE, "parent.raw");
    let (code, stderr) = site.builder(&["serve", "--pipelines", "nowhere"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`nowhere` is not a folder"), "{stderr}");
}
