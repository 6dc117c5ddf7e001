//! VM tier: `builder build` end to end, with real QEMU (TCG here) booting the fixture base
//! image and the real agent. Run with:
//!
//! ```text
//! BUILDER_VM_TESTS=1 BUILDER_TEST_IMAGE=/var/cache/builder-fixtures/<hash>/debian-12-cloud-init.qcow2 \
//!     cargo test --test build_e2e
//! ```
//!
//! Without `BUILDER_VM_TESTS=1` each VM test is ignored (tests/support/vm_tier.rs); with it, a
//! missing image fails.
//! Boots are expensive (60-140 s each under TCG), so the tests share them: eight boots in all,
//! one build at a time.
//!
//! - the two-component recipe (`tests/build/two-components.yml`: a Reboot step, the test
//!   stage, every export format): exit 0, every output `qemu-img check`ed and its sha256 in
//!   the manifest recomputed, layer keys equal to `builder plan`'s, packages and test results
//!   recorded; then the exported qcow2 boots (`builder vm exec`) with the changes in it.
//! - the example `images/debian-12-base/recipe.yml`, then a recipe built on it from the store
//!   (`tests/build/on-parent.yml`).
//! - a failing test component with `--keep-on-failure`: exit 1, the STYLE.md error, logs in
//!   the store's `failed/` area, the disk chain and the test VM kept as the notes say, then
//!   removed with the notes' own commands.
//!
//! Each test owns a [`NoLeftovers`] guard: a private store and runtime folder (where the VM
//! folders go, through `XDG_RUNTIME_DIR`); its `Drop` checks that no process mentions them
//! and that no work folder, staging build, VM folder or partial output is left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// One VM build at a time: two TCG guests on two cores only slow each other down.
static SERIAL: Mutex<()> = Mutex::new(());

#[path = "support/vm_tier.rs"]
mod vm_tier;

/// A private store and runtime folder; checks in `Drop` that nothing was left behind.
struct NoLeftovers {
    root: tempfile::TempDir,
}

impl NoLeftovers {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("b-e2e-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(root.path().join("run")).expect("mkdir run");
        Self { root }
    }
    fn store(&self) -> PathBuf {
        self.root.path().join("store")
    }
    fn runtime(&self) -> PathBuf {
        self.root.path().join("run")
    }

    /// `builder ARGS` with this guard's store and runtime folder.
    fn builder(&self, image: &Path, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_builder"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BUILDER_STORE", self.store())
            .env("XDG_RUNTIME_DIR", self.runtime())
            .env("BUILDER_TEST_IMAGE", image)
            .env("BUILDER_BASE_IMAGE", image)
            .env("NO_COLOR", "1")
            .output()
            .expect("builder runs");
        eprintln!(
            "$ builder {}\n--- stderr ---\n{}--- exit {:?} ---",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            out.status.code()
        );
        out
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let root = self.root.path().to_string_lossy().into_owned();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                if let Ok(cmdline) = std::fs::read(p.path().join("cmdline"))
                    && String::from_utf8_lossy(&cmdline).contains(&root)
                {
                    left.push(format!(
                        "process {}: {}",
                        p.file_name().to_string_lossy(),
                        String::from_utf8_lossy(&cmdline).replace('\0', " ")
                    ));
                }
            }
        }
        for dir in [
            self.runtime(),
            self.store().join("work"),
            self.store().join("staging"),
            self.store().join("trash"),
        ] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                left.push(format!("{}", e.path().display()));
            }
        }
        for e in walk(&self.store().join("images")) {
            if e.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".partial"))
            {
                left.push(format!("partial output {}", e.display()));
            }
        }
        left
    }
}

impl Drop for NoLeftovers {
    fn drop(&mut self) {
        let left = self.leftovers();
        if !left.is_empty() && !std::thread::panicking() {
            panic!("left behind:\n  {}", left.join("\n  "));
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn sha256(path: &Path) -> String {
    use std::io::Read;
    let mut file = std::fs::File::open(path).expect("open output");
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).expect("read output");
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    hex::encode(hasher.finalize())
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn events<'a>(all: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    all.iter().filter(|e| e["event"] == name).collect()
}

fn stored_build(store: &Path, name: &str) -> PathBuf {
    store.join("images").join(name).join("1.0.0").join("1")
}

fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(path)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn two_components_tested_exported_booted_and_built_upon() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();
    let recipe = "tests/build/two-components.yml";

    let planned = guard.builder(&image, &["plan", recipe, "--json"]);
    assert!(planned.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&planned.stdout).expect("plan JSON");
    let planned_keys: Vec<&str> = plan["components"]
        .as_array()
        .expect("components")
        .iter()
        .map(|c| c["layerKey"].as_str().expect("a layer key"))
        .collect();

    // 1. The build, with --json events on stdout.
    let out = guard.builder(&image, &["build", recipe, "--json", "--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(0), "the build failed");
    let all = json_lines(&out.stdout);
    let stages: Vec<&str> = events(&all, "stageFinished")
        .iter()
        .map(|e| e["stage"].as_str().expect("stage"))
        .collect();
    for stage in [
        "fetch",
        "overlay",
        "boot",
        "component",
        "generalize",
        "shutdown",
        "test",
        "export",
        "store",
    ] {
        assert!(stages.contains(&stage), "no stage {stage} in {stages:?}");
    }
    assert!(
        events(&all, "stepStarted")
            .iter()
            .any(|e| e["step"] == "RebootNow"),
        "the Reboot step ran"
    );
    // The step after the reboot found cloud-init's boot stages finished (the session waits
    // for them again after a reboot).
    assert!(
        events(&all, "stepFinished")
            .iter()
            .any(|e| e["step"] == "CloudInitSettledAfterReboot" && e["status"] == "success"),
        "the step after the reboot ran once cloud-init was done"
    );
    // The build VM had no user data: readiness is the end of cloud-init's init stages (the
    // seed cancelled the others), reported as the boot stage's "cloud-init done".
    assert!(
        events(&all, "progress").iter().any(|e| e["stage"] == "boot"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cloud-init done after"))),
        "boot reports cloud-init done"
    );
    let layers: Vec<&str> = events(&all, "layerCommitted")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    assert_eq!(
        layers, planned_keys,
        "each component committed its own layer"
    );
    let finished = events(&all, "buildFinished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["status"], "success");
    assert_eq!(finished[0]["image"], "e2e-two/1.0.0/1");

    // 2. The stored build: every format, checked, hashed as the manifest says.
    let dir = stored_build(&guard.store(), "e2e-two");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    assert_eq!(manifest["status"], "success");
    let outputs = manifest["outputs"].as_array().expect("outputs");
    let formats: Vec<&str> = outputs
        .iter()
        .map(|o| o["format"].as_str().expect("format"))
        .collect();
    assert_eq!(formats, ["qcow2", "raw", "vmdk", "vhdx", "vhd", "ova"]);
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).expect("SHA256SUMS");
    for o in outputs {
        let file = dir.join(o["file"].as_str().expect("file"));
        let digest = sha256(&file);
        assert_eq!(o["sha256"], digest.as_str(), "{}", file.display());
        assert!(
            sums.contains(&digest),
            "{} not in SHA256SUMS",
            file.display()
        );
        if matches!(o["format"].as_str(), Some("qcow2" | "vmdk" | "vhdx")) {
            qemu_img_check(&file);
        }
    }
    let qcow2 = dir.join(outputs[0]["file"].as_str().expect("file"));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&qcow2)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    assert!(info["backing-filename"].is_null(), "the qcow2 is flattened");
    assert_eq!(
        info["virtual-size"],
        4u64 << 30,
        "diskSize is the disk's size"
    );
    let keys: Vec<&str> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, planned_keys);
    assert_eq!(manifest["planDigest"], plan_digest(&guard, &image, recipe));
    let packages = manifest["packages"]["packages"]
        .as_array()
        .expect("packages");
    assert!(packages.iter().any(|p| p["name"] == "bash"), "an SBOM");
    let tests: Vec<(&str, &str)> = manifest["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .map(|t| {
            (
                t["component"].as_str().expect("component"),
                t["status"].as_str().expect("status"),
            )
        })
        .collect();
    assert_eq!(
        tests,
        [("write-marker", "success"), ("image-is-sealed", "success")],
        "the test phase of the build component, then the test component"
    );
    assert!(
        manifest["phases"]
            .as_array()
            .expect("phases")
            .iter()
            .any(|p| p["phase"] == "generalize" && p["status"] == "success")
    );
    assert!(dir.join("logs/build.log").is_file());
    assert!(dir.join("logs/build-vm/console.log").is_file());
    assert!(dir.join("logs/test-vm/console.log").is_file());

    // 3. The exported qcow2 boots, and the components' changes are in it.
    let out = guard.builder(
        &image,
        &[
            "vm",
            "exec",
            "--image",
            qcow2.to_str().expect("utf-8 path"),
            "--accel",
            "tcg",
            "--",
            "sh",
            "-c",
            "cat /etc/builder-e2e/marker; echo; test -s /var/lib/builder-e2e/boot-after && echo rebooted",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "built by the e2e test\nrebooted\n"
    );
}

#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn example_recipe_and_a_recipe_built_on_it() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();

    // CI builds at least one example from images/.
    let out = guard.builder(
        &image,
        &[
            "build",
            "images/debian-12-base/recipe.yml",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "the example failed to build");
    let base = stored_build(&guard.store(), "debian-12-base");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    let parent_sha = manifest["outputs"][0]["sha256"].clone();
    assert_eq!(manifest["tests"][0]["component"], "test-basics");
    assert_eq!(manifest["tests"][0]["status"], "success");

    // A recipe whose parent is that build, from the store; its component checks the
    // parent's changes are there (the exported qcow2 boots as a parent). It is
    // tests/build/on-parent.yml with a `distribution:` to a directory outside the checkout
    // added, so the build's distribute stage runs in a real build too.
    let recipe_dir = guard.root.path().join("recipe");
    std::fs::create_dir(&recipe_dir).expect("mkdir recipe");
    let components = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/build/components");
    let shipped = guard.root.path().join("shipped");
    let text = std::fs::read_to_string("tests/build/on-parent.yml")
        .expect("on-parent.yml")
        .replace(
            "path: components/",
            &format!("path: {}/", components.display()),
        );
    let recipe = recipe_dir.join("on-parent.yml");
    std::fs::write(
        &recipe,
        format!(
            "{text}distribution:\n  - directory: {{path: {}}}\n",
            shipped.display()
        ),
    )
    .expect("write the child recipe");
    let out = guard.builder(
        &image,
        &[
            "build",
            recipe.to_str().expect("utf-8 path"),
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "the child build failed");
    let child = stored_build(&guard.store(), "e2e-child");
    // Distributed: the folder holds the qcow2, the manifest and SHA256SUMS, with the stored
    // digests, and the store recorded the receipt.
    let receipts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(child.join("receipts.json")).expect("receipts"))
            .expect("receipts JSON");
    assert_eq!(receipts[0]["kind"], "directory", "{receipts}");
    let location = PathBuf::from(receipts[0]["location"].as_str().expect("location"));
    assert!(location.starts_with(&shipped), "{}", location.display());
    let sums = std::fs::read_to_string(location.join("SHA256SUMS")).expect("shipped SHA256SUMS");
    let stored_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(child.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    let qcow2 = stored_manifest["outputs"][0]["file"]
        .as_str()
        .expect("file");
    assert_eq!(
        sha256(&location.join(qcow2)),
        stored_manifest["outputs"][0]["sha256"]
            .as_str()
            .expect("sha256"),
        "the shipped qcow2 is the stored one"
    );
    assert!(sums.contains(qcow2), "{sums}");
    assert!(location.join("manifest.json").is_file());
    let shipped_entries: Vec<PathBuf> = std::fs::read_dir(&shipped)
        .expect("shipped folder")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        shipped_entries,
        std::slice::from_ref(&location),
        "no temporary folder left"
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.trim().ends_with(".qcow2") && printed.contains(&*child.to_string_lossy()),
        "stdout names the output: {printed}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(child.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    assert_eq!(
        manifest["inputs"]["parent"]["storeImage"],
        "debian-12-base/1.0.0/1"
    );
    assert_eq!(
        manifest["inputs"]["parent"]["sha256"], parent_sha,
        "the parent is the stored qcow2"
    );
    assert!(
        manifest["timings"]
            .as_array()
            .expect("timings")
            .iter()
            .any(|t| t["stage"] == "test" && t["status"] == "skipped")
    );
}

fn plan_digest(guard: &NoLeftovers, image: &Path, recipe: &str) -> String {
    let out = guard.builder(image, &["plan", recipe]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("plan digest"))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|| panic!("no plan digest in:\n{text}"))
}

#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn failing_test_fails_the_build_and_keep_on_failure_keeps_what_it_says() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();
    let out = guard.builder(
        &image,
        &[
            "build",
            "tests/build/failing-test.yml",
            "--keep-on-failure",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "a failing test is exit 1");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(
            "error: test of component `always-fails` failed in phase `test`, step `CheckSomethingMissing`"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("`test -e /etc/not-there`") || stderr.contains("Caused by"));
    assert!(stderr.contains("│ it is not there"), "last lines of output");
    assert!(out.stdout.is_empty(), "no output paths on failure");

    // The logs are kept in the store's failed/ area, where the message says.
    let full_log = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("full log: "))
        .map(PathBuf::from)
        .expect("a full log line");
    assert!(
        full_log.starts_with(guard.store().join("failed")),
        "{}",
        full_log.display()
    );
    let log = std::fs::read_to_string(&full_log).expect("the step's log");
    assert!(log.contains("looking for /etc/not-there"), "{log}");
    // The build's own `logs:` line is the last one (the executor prints one per run).
    let logs = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("  logs: "))
        .map(PathBuf::from)
        .expect("a logs line");
    for f in ["build.log", "build-vm/console.log", "test-vm/console.log"] {
        assert!(logs.join(f).is_file(), "{f} kept");
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(logs.parent().expect("build folder").join("manifest.json"))
            .expect("the failed build's manifest"),
    )
    .expect("manifest JSON");
    assert_eq!(manifest["status"], "failed");
    assert!(
        !stored_build(&guard.store(), "e2e-failing").exists(),
        "a failed build is not stored"
    );

    // --keep-on-failure: the disk chain and the test VM are kept, and the notes say how to
    // remove them. Follow them; the guard then checks nothing else is left.
    let removals: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("note: kept"))
        .filter_map(|l| l.split("remove with: rm -rf ").nth(1))
        .collect();
    assert_eq!(
        removals.len(),
        2,
        "the disk chain and the test VM: {stderr}"
    );
    let chain = PathBuf::from(removals[0]);
    assert!(chain.starts_with(guard.store().join("work")));
    let mut files: Vec<String> = std::fs::read_dir(&chain)
        .expect("kept chain")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["0-boot.qcow2", "1-write-marker.qcow2", "2-generalize.qcow2"]
    );
    qemu_img_check(&chain.join("2-generalize.qcow2"));
    for dir in removals {
        std::fs::remove_dir_all(dir).expect("remove what was kept");
    }
}

/// `--on-error shell` needs a terminal: without one it is refused before anything starts
/// (exit 2), instead of hanging at the first failed step. No VM needed.
#[test]
fn on_error_shell_without_a_terminal_is_refused_at_once() {
    let store = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_builder"))
        .args([
            "build",
            "tests/build/two-components.yml",
            "--on-error",
            "shell",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BUILDER_STORE", store.path())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("builder runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: `--on-error shell` needs a terminal on stdin"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: use `--on-error keep`"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(store.path()).expect("store").count(),
        0,
        "nothing was started"
    );
}
