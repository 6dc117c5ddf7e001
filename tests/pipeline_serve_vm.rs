//! VM tier: `builder serve` building a real pipeline under TCG on the fixture image, killed
//! with SIGKILL mid-build and restarted. Run with:
//!
//! ```text
//! BUILDER_VM_TESTS=1 BUILDER_TEST_IMAGE=/var/cache/builder-fixtures/<hash>/debian-12-cloud-init.qcow2 \
//!     cargo test --test pipeline_serve_vm
//! ```
//!
//! One build to its end in all, in one test that walks through the steps below. Its build VM
//! is the appliance (`boot: appliance`: seconds under TCG, where a full boot costs minutes;
//! how the VM boots is not what this test is about):
//!
//! 1. a pipeline (`* * * * *`, `dependencyChanged`) whose run is due when `serve` starts; the
//!    scheduler is killed with SIGKILL once QEMU runs: QEMU and the VM folder go with it, the
//!    execution is left `building`;
//! 2. `serve` again: the dead execution is recorded as failed ("scheduler stopped") and its
//!    staging and work folders are cleaned (logs kept in `failed/`); the missed minute runs
//!    once and builds for real (`available`, manifest on disk); the next minute is skipped
//!    because nothing changed; SIGTERM stops it (exit 0); no slot ran twice;
//! 3. the parent image changes: `builder pipeline run` builds (the reason names the parent)
//!    and is interrupted with SIGINT once its VM runs: recorded `cancelled`, nothing left;
//! 4. `serve` again: the missed minute builds; SIGTERM once its VM runs cancels it cleanly
//!    (exit 0, recorded `cancelled`, nothing left).
//!
//! Without `BUILDER_VM_TESTS=1` the test is ignored (tests/support/vm_tier.rs); with it, a
//! missing image fails.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use builder::pipeline::history::{ExecStatus, Execution, History};
use builder::store::Store;
use nix::sys::signal::Signal;

#[path = "support/vm_tier.rs"]
mod vm_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

const COMPONENT: &str = "name: mark\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Mark\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo built-by-a-pipeline > /etc/pipeline-mark\n";

/// The smallest useful build: one step in the appliance, no test stage, no generalize, an
/// uncompressed qcow2.
const RECIPE: &str = "name: tiny\nversion: 1.0.0\nparentImage: parent.qcow2\ncomponents:\n  - path: mark.yml\ninfrastructure: {cpus: 2, memory: 1GiB, network: none, boot: appliance}\ntests: {enabled: false}\ngeneralize: false\noutputs: {formats: [qcow2], compression: none}\n";

const PIPELINE: &str = "name: tiny\nrecipe: ../recipe.yml\nschedule:\n  expression: '* * * * *'\n  startCondition: dependencyChanged\n";

/// The test's folder: its store and runtime folder are a [`NoLeftovers`] guard's.
struct Site {
    guard: NoLeftovers,
}

impl Site {
    fn new(image: &Path) -> Site {
        let guard = NoLeftovers::new();
        let d = guard.root();
        for sub in ["pipelines", "run"] {
            fs_err::create_dir_all(d.join(sub)).expect("mkdir");
        }
        // A copy, so step 3 can change it.
        let status = Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(image)
            .arg(d.join("parent.qcow2"))
            .status()
            .expect("cp runs");
        assert!(status.success(), "copy the fixture image");
        fs_err::write(d.join("mark.yml"), COMPONENT).expect("component");
        fs_err::write(d.join("recipe.yml"), RECIPE).expect("recipe");
        fs_err::write(d.join("pipelines/tiny.yml"), PIPELINE).expect("pipeline");
        Site { guard }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.guard.root().join(p)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.guard.builder_command(args);
        c.arg("--store")
            .arg(self.path("store"))
            .env("BUILDER_APPLIANCE_CACHE", self.path("appliance-cache"));
        c
    }

    fn spawn(&self, args: &[&str], log: &str) -> Child {
        let file = fs_err::File::create(self.path(log)).expect("log file");
        self.command(args)
            .stdout(Stdio::null())
            .stderr(file.into_file())
            .spawn()
            .expect("builder starts")
    }

    fn log(&self, log: &str) -> String {
        fs_err::read_to_string(self.path(log)).unwrap_or_default()
    }

    fn history(&self) -> History {
        let store = Store::open(self.path("store")).expect("store");
        History::open(&History::default_path(&store)).expect("history")
    }

    fn executions(&self) -> Vec<Execution> {
        let mut all = self
            .history()
            .executions(Some("tiny"), 1000)
            .expect("executions");
        all.reverse();
        all
    }

    /// Whether a QEMU of this site runs (found by command line: it renames its process).
    fn qemu_running(&self) -> bool {
        builder::store::runner::processes_mentioning(&self.guard.root().to_string_lossy())
            .iter()
            .any(|p| p.command_line.contains("qemu-system"))
    }

    /// Waits until nothing of a build is left (a killed builder's QEMU and folder watcher
    /// need a moment to notice), then checks.
    fn assert_no_leftovers(&self) {
        let left = self.guard.wait_clean(Duration::from_secs(60));
        assert!(left.is_empty(), "left behind:\n  {}", left.join("\n  "));
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // A failed assertion must not leave a scheduler or QEMU running on the machine (the
        // guard would wait for them first).
        if std::thread::panicking() {
            self.guard.kill_processes();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn signal(child: &Child, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    nix::sys::signal::kill(pid, signal).expect("signal");
}

fn details(e: &Execution) -> String {
    let mut text = format!("#{} {} ({}): ", e.id, e.status, e.reason);
    for t in &e.transitions {
        text.push_str(&format!(
            "\n  {}: {}",
            t.status,
            t.detail.as_deref().unwrap_or("")
        ));
    }
    if let Some(err) = &e.error {
        text.push_str(&format!("\n  error: {err}"));
    }
    text
}

#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn serve_builds_survives_sigkill_skips_when_unchanged_and_runs_when_the_parent_changes() {
    let image = vm_tier::test_image();
    let site = Site::new(&image);
    // Step 1 expects one execution until its VM runs: start early in a minute, so the next
    // minute's slot (`* * * * *`) does not come while the first build boots (it would be
    // recorded as skipped, "the previous execution is still running").
    let second = u64::from(chrono::Timelike::second(&chrono::Utc::now()));
    if second > 30 {
        std::thread::sleep(Duration::from_secs(61 - second));
    }
    // Due as soon as the scheduler starts (as after a short downtime).
    site.history()
        .set_next_run("tiny", chrono::Utc::now() - chrono::Duration::seconds(5))
        .expect("seed the next run");

    // 1. Killed with SIGKILL while the build's VM runs.
    let mut first = site.spawn(&["serve", "--pipelines", "pipelines"], "serve-1.log");
    wait_for("QEMU to start", Duration::from_secs(300), || {
        site.qemu_running()
    });
    let killed = site.executions();
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert_eq!(
        killed[0].status,
        ExecStatus::Building,
        "{}",
        details(&killed[0])
    );
    signal(&first, Signal::SIGKILL);
    first.wait().expect("the scheduler is gone");
    wait_for(
        "QEMU to die with the scheduler",
        Duration::from_secs(60),
        || !site.qemu_running(),
    );
    eprintln!("--- serve 1 ---\n{}", site.log("serve-1.log"));

    // 2. Restarted: recovery, one catch-up build, then skips; SIGTERM.
    let mut second = site.spawn(&["serve", "--pipelines", "pipelines"], "serve-2.log");
    let built = || {
        site.executions()
            .iter()
            .any(|e| e.status == ExecStatus::Available)
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("a successful build", Duration::from_secs(1800), || {
            built()
                || site
                    .executions()
                    .iter()
                    .skip(1)
                    .any(|e| e.status == ExecStatus::Failed)
        });
        assert!(
            built(),
            "{:#?}",
            site.executions().iter().map(details).collect::<Vec<_>>()
        );
        wait_for(
            "a run skipped as unchanged",
            Duration::from_secs(150),
            || {
                site.executions().iter().any(|e| {
                    e.status == ExecStatus::Skipped && details(e).contains("nothing changed")
                })
            },
        );
    }));
    signal(&second, Signal::SIGTERM);
    let code = second.wait().expect("the scheduler exits").code();
    eprintln!("--- serve 2 ---\n{}", site.log("serve-2.log"));
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(code, Some(0));

    let executions = site.executions();
    let all = executions
        .iter()
        .map(details)
        .collect::<Vec<_>>()
        .join("\n");
    // The killed one: failed, with why and what was cleaned.
    let dead = &executions[0];
    assert_eq!(dead.status, ExecStatus::Failed, "{all}");
    let error = dead.error.as_deref().unwrap_or_default();
    assert!(error.contains("scheduler stopped"), "{all}");
    assert!(
        error.contains("logs are in"),
        "staging moved to failed/: {all}"
    );
    // Each scheduled slot ran once at most.
    let dues: Vec<_> = executions.iter().filter_map(Execution::due).collect();
    let unique: HashSet<_> = dues.iter().collect();
    assert_eq!(unique.len(), dues.len(), "a slot ran twice: {all}");
    // One real build, its manifest where the history says.
    let good: Vec<&Execution> = executions
        .iter()
        .filter(|e| e.status == ExecStatus::Available)
        .collect();
    assert_eq!(good.len(), 1, "{all}");
    let manifest = good[0].manifest.as_ref().expect("a manifest path");
    assert!(manifest.is_file(), "{}", manifest.display());
    assert!(
        good[0]
            .image
            .as_deref()
            .is_some_and(|i| i.starts_with("tiny/1.0.0/")),
        "{all}"
    );
    // Then skipped: nothing changed.
    let skipped = executions
        .iter()
        .find(|e| e.status == ExecStatus::Skipped && details(e).contains("nothing changed"))
        .expect("a skip");
    assert!(
        details(skipped).contains(&format!("nothing changed since execution {}", good[0].id)),
        "{all}"
    );
    assert!(
        site.path("store/failed")
            .read_dir()
            .expect("failed/")
            .count()
            >= 1,
        "the killed build's logs are kept"
    );
    site.assert_no_leftovers();

    // 3. A new parent image: the pipeline builds again (interrupted once its VM runs).
    let status = Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(site.path("parent.qcow2"))
        .arg("+64M")
        .status()
        .expect("qemu-img runs");
    assert!(status.success());
    let mut run = site.spawn(&["pipeline", "run", "pipelines/tiny.yml"], "run.log");
    wait_for(
        "the changed pipeline's VM",
        Duration::from_secs(300),
        || {
            if let Ok(Some(status)) = run.try_wait() {
                panic!(
                    "`builder pipeline run` ended ({status}) before its VM ran:\n{}\n{}",
                    site.log("run.log"),
                    site.executions()
                        .iter()
                        .map(details)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            site.qemu_running()
        },
    );
    let last = site.executions().pop().expect("an execution");
    let why = details(&last);
    assert!(
        why.contains(&format!(
            "dependency changed since execution {}",
            good[0].id
        )) && why.contains("parent image `parent.qcow2` changed (sha256 "),
        "{why}"
    );
    signal(&run, Signal::SIGINT);
    assert_eq!(
        run.wait().expect("exits").code(),
        Some(130),
        "{}",
        site.log("run.log")
    );
    let last = site.executions().pop().expect("an execution");
    assert_eq!(last.status, ExecStatus::Cancelled, "{}", details(&last));
    site.assert_no_leftovers();

    // 4. `serve` again: the missed minute builds (the parent still differs from the last
    //    success); SIGTERM once its VM runs cancels it cleanly.
    let mut third = site.spawn(&["serve", "--pipelines", "pipelines"], "serve-3.log");
    wait_for("the scheduled build's VM", Duration::from_secs(300), || {
        if let Ok(Some(status)) = third.try_wait() {
            panic!(
                "`builder serve` ended ({status}):\n{}",
                site.log("serve-3.log")
            );
        }
        site.qemu_running()
    });
    signal(&third, Signal::SIGTERM);
    let code = third.wait().expect("the scheduler exits").code();
    let log = site.log("serve-3.log");
    eprintln!("--- serve 3 ---\n{log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("cancelled; its build was stopped and removed"),
        "{log}"
    );
    let last = site.executions().pop().expect("an execution");
    assert_eq!(last.status, ExecStatus::Cancelled, "{}", details(&last));
    assert!(
        details(&last).contains("scheduler stopped (SIGTERM)"),
        "{}",
        details(&last)
    );
    site.assert_no_leftovers();
}
