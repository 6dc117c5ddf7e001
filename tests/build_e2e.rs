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
//! Boots are expensive (60-140 s each under TCG, several minutes on a busy machine), so the
//! tests share them: thirteen full boots in all (a reboot counts as one) and three appliances
//! (seconds each) where the build VM's boot is not what a test is about, one build at a time.
//!
//! - the two-component recipe (`tests/build/two-components.yml`: `diskSize`, a Reboot step,
//!   AWS's exit-194 reboot, the test stage, every export format): exit 0, every output
//!   `qemu-img check`ed and its sha256 in the manifest recomputed, layer keys equal to
//!   `builder plan`'s, packages and test results recorded; then the exported qcow2 boots
//!   (`builder vm exec`) with the changes in it. Another component shows that `network: none`
//!   leaves the build VM without a route.
//! - the same recipe on the Debian 13 fixture (`BUILDER_TEST_IMAGE_DEBIAN13`: systemd 257,
//!   cloud-init 25.1), qcow2 only: the grown disk, both reboots, the test stage.
//! - `firmware: uefi` + `network: user` (`tests/build/uefi-user-network.yml`): the build VM
//!   and the test VM boot OVMF and fetch from an HTTP server the test runs on the host's
//!   loopback.
//! - `--on-error shell` on a pseudo-terminal (`tests/build/failing-step.yml`): the shell opens
//!   in the build VM (the appliance), a typed command runs, exiting fails the build.
//! - the example `images/debian-12-base/recipe.yml`, then a recipe built on it from the store
//!   (`tests/build/on-parent.yml`) in the appliance (`--boot appliance`: seconds, not a boot).
//! - a failing test component with `--keep-on-failure` and `--on-error shell` on a
//!   pseudo-terminal (the build VM the appliance; the test VM boots full, as always): the shell
//!   opens in the test VM; then exit 1, the STYLE.md error, logs in the store's `failed/` area,
//!   the disk chain and the test VM kept as the notes say, then removed with the notes' own
//!   commands.
//!
//! Each test owns a [`NoLeftovers`] guard (tests/support/leftovers.rs, shared with
//! tests/vm.rs): a private store and runtime folder (where the VM folders go, through
//! `XDG_RUNTIME_DIR`); its `Drop` checks that no process mentions them (QEMU found by command
//! line) and that no work folder, staging build, VM folder or partial output is left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// One VM build at a time: two TCG guests on two cores only slow each other down.
static SERIAL: Mutex<()> = Mutex::new(());

#[path = "support/vm_tier.rs"]
mod vm_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

#[path = "support/http.rs"]
mod http;
use http::HostHttp;

#[path = "support/events.rs"]
mod build_events;
use build_events::{events, json_lines, print_stage_times, step_output, step_succeeded};

/// Builder as this file's tests run it, in a guard's store and runtime folder.
impl NoLeftovers {
    /// `builder ARGS` with this guard's store and runtime folder, not started.
    fn command(&self, image: &Path, args: &[&str]) -> Command {
        let mut cmd = self.builder_command(args);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BUILDER_TEST_IMAGE", image)
            .env("BUILDER_BASE_IMAGE", image);
        cmd
    }

    /// `builder ARGS` with this guard's store and runtime folder.
    /// When it fails, the end of each failed VM's console follows its output.
    fn builder(&self, image: &Path, args: &[&str]) -> Output {
        let out = leftovers::run_echoed(&mut self.command(image, args), args);
        if !out.status.success() {
            self.echo_failed_consoles(80);
        }
        out
    }
}

fn sha256(path: &Path) -> String {
    use std::io::Read;
    let mut file = fs_err::File::open(path).expect("open output");
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

/// What the two-component recipe's build must show on every fixture: the build VM was ready
/// for steps ("cloud-init done", the root file system grown to `diskSize` before any step),
/// the Reboot step and AWS's exit-194 step each rebooted, and the step after each reboot ran
/// on the booted system (boot finished, `/` writable, `/tmp` mounted).
fn booted_grown_and_resumed_after_reboots(all: &[serde_json::Value]) {
    let boot: Vec<&str> = events(all, "progress")
        .iter()
        .filter(|e| e["stage"] == "boot")
        .filter_map(|e| e["message"].as_str())
        .collect();
    // The build VM had no user data: readiness is the end of the boot with cloud-init's
    // init stages finished (the seed cancelled the others).
    assert!(
        boot.iter().any(|m| m.starts_with("cloud-init done after")),
        "boot reports cloud-init done: {boot:?}"
    );
    assert!(
        boot.iter().any(|m| m.starts_with("root file system: ")),
        "the grown root file system was measured: {boot:?}"
    );
    let started = |step: &str| {
        events(all, "stepStarted")
            .iter()
            .filter(|e| e["step"] == step)
            .count()
    };
    let succeeded = |step: &str| step_succeeded(all, "build", step);
    assert_eq!(started("RebootNow"), 1, "the Reboot step ran");
    // The step after the reboot found the boot finished (the session waits for it again
    // after a reboot): `/` writable, no cloud-init job left.
    assert!(
        succeeded("BootFinishedAfterReboot"),
        "the step after the reboot ran once the boot was over"
    );
    // Exit 194: the same step again from its start, in a new boot, writing /tmp.
    assert_eq!(
        started("RebootAndResume"),
        2,
        "the exit-194 step ran before and after its reboot"
    );
    assert!(succeeded("RebootAndResume"));
    assert!(
        succeeded("ResumedInANewBoot"),
        "the exit-194 step resumed in a new boot, on the booted system"
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
    booted_grown_and_resumed_after_reboots(&all);
    // `network: none`: the build VM has no network card but loopback, no default route, and
    // a connection to the host's address on QEMU's user network fails as unreachable.
    for step in ["OnlyLoopback", "NoDefaultRoute", "FetchFails"] {
        assert!(
            step_succeeded(&all, "build", step),
            "no-route step {step} failed"
        );
    }
    assert_eq!(step_output(&all, "build", "OnlyLoopback"), ["lo"]);
    let fetch = step_output(&all, "build", "FetchFails").join("\n");
    assert!(
        fetch.contains("the fetch failed") && fetch.contains("Network is unreachable"),
        "{fetch}"
    );
    let layers: Vec<&str> = events(&all, "layerCommitted")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    // The boot layer (first boot, cloud-init) is committed first, under the chain's root key.
    assert_eq!(layers.len(), planned_keys.len() + 1, "{layers:?}");
    assert_eq!(
        layers[1..],
        planned_keys[..],
        "each component committed its own layer"
    );
    let finished = events(&all, "buildFinished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["status"], "success");
    assert_eq!(finished[0]["image"], "e2e-two/1.0.0/1");

    // 2. The stored build: every format, checked, hashed as the manifest says.
    let dir = stored_build(&guard.store(), "e2e-two");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs_err::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    assert_eq!(manifest["status"], "success");
    let outputs = manifest["outputs"].as_array().expect("outputs");
    let formats: Vec<&str> = outputs
        .iter()
        .map(|o| o["format"].as_str().expect("format"))
        .collect();
    assert_eq!(formats, ["qcow2", "raw", "vmdk", "vhdx", "vhd", "ova"]);
    let sums = fs_err::read_to_string(dir.join("SHA256SUMS")).expect("SHA256SUMS");
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
    // boot, each component, generalize: every layer of the chain, none from the cache.
    let recorded = manifest["layers"].as_array().expect("layers");
    let keys: Vec<&str> = recorded
        .iter()
        .map(|l| l["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys.len(), planned_keys.len() + 2, "{keys:?}");
    assert_eq!(keys[1..=planned_keys.len()], planned_keys[..]);
    assert_eq!(recorded[0]["component"], "boot");
    assert_eq!(recorded[keys.len() - 1]["component"], "generalize");
    assert!(
        recorded.iter().all(|l| l.get("from").is_none()),
        "a first build takes nothing from the cache: {recorded:?}"
    );
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

/// The same recipe on Debian 13 (systemd 257 with a tmpfs `/tmp`, cloud-init 25.1 running
/// all its stages in one process, kernel 6.12), where steps once started before the guest
/// was ready: the root file system had not grown yet, and after a reboot `/` was still
/// read-only. Only the qcow2 format (the exports are the Debian 12 test's business).
#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn two_components_on_debian_13_grown_rebooted_and_tested() {
    let image = vm_tier::debian13_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();
    let recipe = recipe_copy(
        guard.root(),
        "two-components.yml",
        &[(
            "formats: [qcow2, raw, vmdk, vhdx, vhd, ova]",
            "formats: [qcow2]",
        )],
    );

    let out = guard.builder(
        &image,
        &[
            "build",
            recipe.to_str().expect("utf-8 path"),
            "--json",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "the build failed");
    let all = json_lines(&out.stdout);
    print_stage_times(&all);
    booted_grown_and_resumed_after_reboots(&all);
    let say = step_output(&all, "build", "Say").join("\n");
    assert!(
        say.contains("Debian GNU/Linux 13 (trixie)"),
        "built on Debian 13: {say}"
    );

    let dir = stored_build(&guard.store(), "e2e-two");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs_err::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
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
        "the test stage ran in a full first boot of the result"
    );
    let qcow2 = dir.join(manifest["outputs"][0]["file"].as_str().expect("file"));
    qemu_img_check(&qcow2);
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
        serde_json::from_slice(&fs_err::read(base.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    let parent_sha = manifest["outputs"][0]["sha256"].clone();
    assert_eq!(manifest["tests"][0]["component"], "test-basics");
    assert_eq!(manifest["tests"][0]["status"], "success");

    // A recipe whose parent is that build, from the store; its component checks the
    // parent's changes are there (the exported qcow2 boots as a parent). It is
    // tests/build/on-parent.yml with a `distribution:` to a directory outside the checkout
    // added, so the build's distribute stage runs in a real build too.
    let recipe_dir = guard.root().join("recipe");
    fs_err::create_dir(&recipe_dir).expect("mkdir recipe");
    let components = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/build/components");
    let shipped = guard.root().join("shipped");
    let text = fs_err::read_to_string("tests/build/on-parent.yml")
        .expect("on-parent.yml")
        .replace(
            "path: components/",
            &format!("path: {}/", components.display()),
        );
    let recipe = recipe_dir.join("on-parent.yml");
    fs_err::write(
        &recipe,
        format!(
            "{text}distribution:\n  - directory: {{path: {}}}\n",
            shipped.display()
        ),
    )
    .expect("write the child recipe");
    // Its build VM is the appliance (`--boot appliance`): a full boot would only repeat the
    // example's, and this is an appliance build on a parent from the store.
    let out = guard.builder(
        &image,
        &[
            "build",
            recipe.to_str().expect("utf-8 path"),
            "--accel",
            "tcg",
            "--boot",
            "appliance",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "the child build failed");
    let child = stored_build(&guard.store(), "e2e-child");
    // Distributed: the folder holds the qcow2, the manifest and SHA256SUMS, with the stored
    // digests, and the store recorded the receipt.
    let receipts: serde_json::Value =
        serde_json::from_slice(&fs_err::read(child.join("receipts.json")).expect("receipts"))
            .expect("receipts JSON");
    assert_eq!(receipts[0]["kind"], "directory", "{receipts}");
    let location = PathBuf::from(receipts[0]["location"].as_str().expect("location"));
    assert!(location.starts_with(&shipped), "{}", location.display());
    let sums = fs_err::read_to_string(location.join("SHA256SUMS")).expect("shipped SHA256SUMS");
    let stored_manifest: serde_json::Value =
        serde_json::from_slice(&fs_err::read(child.join("manifest.json")).expect("manifest"))
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
    let shipped_entries: Vec<PathBuf> = fs_err::read_dir(&shipped)
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
        serde_json::from_slice(&fs_err::read(child.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    assert_eq!(
        manifest["inputs"]["parent"]["storeImage"],
        "debian-12-base/1.0.0/1"
    );
    assert_eq!(
        manifest["host"]["boot"], "appliance",
        "{}",
        manifest["host"]
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
    // With `--on-error shell` too, on a terminal (stdout a pipe): the test step fails in the
    // test VM, so the shell opens there; once it is closed the build fails and keeps what
    // --keep-on-failure keeps. (No boot of its own: the failing build boots both VMs anyway.)
    // The build VM is the appliance (`--boot appliance`): this test is about the test VM, which
    // boots full whatever the build VM did.
    let minutes = |m: u64| std::time::Duration::from_secs(m * 60);
    let mut term = OnTerminal::spawn(
        &guard.command(
            &image,
            &[
                "build",
                "tests/build/failing-test.yml",
                "--keep-on-failure",
                "--on-error",
                "shell",
                "--accel",
                "tcg",
                "--boot",
                "appliance",
            ],
        ),
        false,
    );
    let at = term.wait_for(0, "shell ready", minutes(20));
    let before = term.transcript()[..at].replace('\r', "");
    assert!(
        before.contains(
            "error: test of component `always-fails` failed in phase `test`, step `CheckSomethingMissing`"
        ) && before.contains(
            "the build then fails and keeps its disk and logs (--keep-on-failure)"
        ),
        "{before}"
    );
    // The test VM: the built image (write-marker's file) in the state the test step left.
    term.type_in(
        "test -e /etc/not-there || echo \"not there; marker $(cat /etc/builder-e2e/marker), $((2 * 2))\"\r",
    );
    term.wait_for(at, "not there; marker hello, 4", minutes(2));
    term.type_in("exit\r");
    let finished = term.finish(minutes(5));
    assert_eq!(finished.code, Some(1), "a failing test is exit 1");
    assert!(
        finished.transcript[at..].contains("note: shell closed; failing the build"),
        "{}",
        finished.transcript
    );
    let stderr = finished.transcript.replace('\r', "");
    assert!(
        stderr.contains(
            "error: test of component `always-fails` failed in phase `test`, step `CheckSomethingMissing`"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("`test -e /etc/not-there`") || stderr.contains("Caused by"));
    assert!(stderr.contains("│ it is not there"), "last lines of output");
    assert!(finished.stdout.is_empty(), "no output paths on failure");
    // write-marker.yml has what AWSTOE accepts with a warning (an input key DeleteFile does not
    // have, an unclosed `{{`): shown before the build, with its place and hint, and the steps
    // ran as AWSTOE runs them (its LiteralBraces step checks that in the guest).
    assert!(
        stderr.contains("warning: unknown key `force` in the inputs of `DeleteFile` is ignored"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: `{{` is not closed by `}}`, so it is kept as text"),
        "{stderr}"
    );

    // The logs are kept in the store's failed/ area, where the message says (the last
    // message: the one before the shell names them where they were while it was open).
    let full_log = stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("full log: "))
        .map(PathBuf::from)
        .expect("a full log line");
    assert!(
        full_log.starts_with(guard.store().join("failed")),
        "{}",
        full_log.display()
    );
    let log = fs_err::read_to_string(&full_log).expect("the step's log");
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
    // The component's warnings are in the build's own log too (one line each, with place and
    // hint), where a build run by a pipeline keeps them.
    let build_log = fs_err::read_to_string(logs.join("build.log")).expect("build.log");
    let warnings: Vec<&str> = build_log
        .lines()
        .filter(|l| l.contains(r#""stage":"component""#) && l.contains("write-marker.yml:"))
        .collect();
    assert_eq!(warnings.len(), 2, "{build_log}");
    assert!(
        warnings[0].contains("unknown key `force` in the inputs of `DeleteFile`")
            && warnings[0].contains("(hint: expected `path`)"),
        "{build_log}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs_err::read(logs.parent().expect("build folder").join("manifest.json"))
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
    let mut files: Vec<String> = fs_err::read_dir(&chain)
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
        fs_err::remove_dir_all(dir).expect("remove what was kept");
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
        fs_err::read_dir(store.path()).expect("store").count(),
        0,
        "nothing was started"
    );
}

/// A recipe from `tests/build/` copied into `dir`, its component paths made absolute and each
/// `(placeholder, value)` replaced.
fn recipe_copy(dir: &Path, name: &str, replace: &[(&str, &str)]) -> PathBuf {
    let components = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/build/components");
    let mut text = fs_err::read_to_string(Path::new("tests/build").join(name))
        .unwrap_or_else(|e| panic!("tests/build/{name}: {e}"))
        .replace(
            "path: components/",
            &format!("path: {}/", components.display()),
        );
    for (from, to) in replace {
        assert!(text.contains(from), "no {from} in {name}");
        text = text.replace(from, to);
    }
    let path = dir.join(name);
    fs_err::write(&path, text).expect("write the recipe copy");
    path
}

/// `firmware: uefi` and `network: user` in one build (tests/build/uefi-user-network.yml): the
/// build VM boots OVMF and fetches from an HTTP server this test runs on the host's loopback,
/// through QEMU's user network; the test VM boots UEFI too, finds what was fetched and fetches
/// again. Costs two boots (build VM, test VM), both on OVMF.
#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn uefi_and_user_network_build_fetches_from_the_host_and_tests_on_uefi() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();
    // Unique to this run: the guest can only know it from this server.
    let token = format!(
        "token-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    // `GET /build` and `GET /test` answer the token, anything else 404.
    let body = format!("{token}\n").into_bytes();
    let server = HostHttp::start([("/build", body.clone()), ("/test", body)]);
    let recipe = recipe_copy(
        guard.root(),
        "uefi-user-network.yml",
        &[
            ("\"PORT\"", &format!("\"{}\"", server.port)),
            ("\"TOKEN\"", &format!("\"{token}\"")),
        ],
    );
    let out = guard.builder(
        &image,
        &[
            "build",
            recipe.to_str().expect("utf-8 path"),
            "--json",
            "--accel",
            "tcg",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "the build failed");
    let all = json_lines(&out.stdout);
    print_stage_times(&all);

    // The build VM: on UEFI, its default route through QEMU's gateway, and the file fetched
    // from this test's server.
    for step in ["BootedOnUefi", "RouteThroughTheHost", "FetchFromTheHost"] {
        assert!(step_succeeded(&all, "build", step), "{step} failed");
    }
    assert_eq!(step_output(&all, "build", "BootedOnUefi"), ["UEFI, 64-bit"]);
    let route = step_output(&all, "build", "RouteThroughTheHost").join("\n");
    assert!(route.starts_with("default via 10.0.2.2 "), "{route}");
    assert_eq!(
        step_output(&all, "build", "FetchFromTheHost"),
        ["HTTP/1.0 200 OK", &format!("fetched {token}")]
    );
    assert!(step_succeeded(&all, "validate", "FetchedTheToken"));
    // The test VM: UEFI too, the fetched file in the image, and the network works there.
    for step in ["TestVmOnUefi", "KeptWhatWasFetched", "TestVmFetchesToo"] {
        assert!(step_succeeded(&all, "test", step), "{step} failed");
    }
    assert_eq!(
        server.requests(),
        ["GET /build HTTP/1.0", "GET /test HTTP/1.0"],
        "the build VM, then the test VM fetched from the host"
    );

    let dir = stored_build(&guard.store(), "e2e-uefi-net");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs_err::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    assert_eq!(manifest["status"], "success");
    assert_eq!(manifest["host"]["firmware"], "uefi", "{}", manifest["host"]);
    assert_eq!(manifest["tests"][0]["component"], "fetch-from-host");
    assert_eq!(manifest["tests"][0]["status"], "success");
    for vm in ["build-vm", "test-vm"] {
        let console = fs_err::read_to_string(dir.join("logs").join(vm).join("console.log"))
            .unwrap_or_else(|e| panic!("{vm}/console.log: {e}"));
        // OVMF's boot manager says what it loads on the serial console.
        assert!(
            console.contains("BdsDxe"),
            "{vm} did not boot OVMF:\n{console}"
        );
    }
}

/// A process on the slave side of a pseudo-terminal (stdin, stdout and stderr), which is its
/// controlling terminal, as in a user's terminal (`setsid --ctty`: a new session, so ^C and
/// window changes reach it from this terminal only); a thread copies everything it writes
/// from the master side into a transcript.
struct OnTerminal {
    child: std::process::Child,
    master: std::fs::File,
    /// The slave's path (`/dev/pts/N`), to resize the terminal with `stty -F`.
    slave: PathBuf,
    transcript: std::sync::Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Reads stdout when it is a pipe rather than the terminal.
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
}

/// How a process on a terminal ended.
struct Finished {
    code: Option<i32>,
    /// Everything the terminal showed.
    transcript: String,
    /// The terminal's local modes as the process left them.
    modes: nix::sys::termios::LocalFlags,
    /// stdout, when it was a pipe.
    stdout: Vec<u8>,
}

impl OnTerminal {
    /// Runs `program` on a new 24x80 terminal; its stdout is the terminal too, or a pipe
    /// (as in `builder build … > paths`).
    fn spawn(program: &Command, stdout_on_terminal: bool) -> Self {
        use std::io::Read;
        let size = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(&size, None).expect("openpty");
        let slave_path = nix::unistd::ttyname(&pty.slave).expect("the pty's name");
        let slave = std::fs::File::from(pty.slave);
        // setsid execs the program (the child is no process group leader, so it does not
        // fork; --wait covers the case where it would).
        let mut cmd = Command::new("setsid");
        cmd.args(["--ctty", "--wait"])
            .arg(program.get_program())
            .args(program.get_args());
        if let Some(dir) = program.get_current_dir() {
            cmd.current_dir(dir);
        }
        for (key, value) in program.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.stdin(slave.try_clone().expect("dup the pty"))
            .stdout(if stdout_on_terminal {
                std::process::Stdio::from(slave.try_clone().expect("dup the pty"))
            } else {
                std::process::Stdio::piped()
            })
            .stderr(slave)
            .env("TERM", "dumb");
        let mut child = cmd.spawn().expect("builder runs");
        let stdout = child.stdout.take().map(|mut out| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = out.read_to_end(&mut bytes);
                bytes
            })
        });
        // `cmd` still holds the slave's descriptors: without dropping them the master would
        // never see the end of the output.
        drop(cmd);
        let master = std::fs::File::from(pty.master);
        let transcript = std::sync::Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let mut master = master.try_clone().expect("dup the master");
            let transcript = transcript.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // EIO once the last slave descriptor is closed (the process exited).
                while let Ok(n) = master.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    transcript
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            })
        };
        Self {
            child,
            master,
            slave: slave_path,
            transcript,
            reader: Some(reader),
            stdout,
        }
    }

    /// Resizes the terminal, as a user resizing the window (the kernel sends SIGWINCH to the
    /// terminal's foreground process group).
    fn resize(&self, rows: u16, cols: u16) {
        let status = Command::new("stty")
            .arg("-F")
            .arg(&self.slave)
            .args(["rows", &rows.to_string(), "cols", &cols.to_string()])
            .status()
            .expect("stty runs");
        assert!(status.success(), "stty -F {}", self.slave.display());
    }

    /// The terminal's local modes now (echo, canonical input, signals from ^C).
    fn local_modes(&self) -> nix::sys::termios::LocalFlags {
        nix::sys::termios::tcgetattr(&self.master)
            .expect("tcgetattr")
            .local_flags
    }

    fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.transcript.lock().unwrap_or_else(|p| p.into_inner()))
            .into_owned()
    }

    /// Waits until the transcript after byte `from` contains `needle`; returns where it ends.
    fn wait_for(&mut self, from: usize, needle: &str, within: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + within;
        loop {
            let text = self.transcript();
            if let Some(at) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + at + needle.len();
            }
            let exited = self.child.try_wait().expect("wait").is_some();
            assert!(
                !exited && std::time::Instant::now() < deadline,
                "no `{needle}` {} ; the terminal showed:\n{text}",
                if exited {
                    "before builder exited"
                } else {
                    "in time"
                }
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Types `text` as a user would.
    fn type_in(&mut self, text: &str) {
        use std::io::Write;
        self.master.write_all(text.as_bytes()).expect("type");
    }

    /// Waits for the process to exit and its output to be drained.
    fn finish(mut self, within: std::time::Duration) -> Finished {
        let deadline = std::time::Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("builder did not exit in time:\n{}", self.transcript());
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stdout = self
            .stdout
            .take()
            .map(|t| t.join().expect("stdout reader"))
            .unwrap_or_default();
        let transcript = self.transcript();
        eprintln!(
            "--- terminal ---\n{transcript}\n--- exit {:?} ---",
            status.code()
        );
        Finished {
            code: status.code(),
            transcript,
            modes: self.local_modes(),
            stdout,
        }
    }
}

/// A test that failed while builder still runs stops it as a user would (SIGTERM: builder
/// removes its VM and files), so the leftovers check that follows sees what builder left.
impl Drop for OnTerminal {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while matches!(self.child.try_wait(), Ok(None)) {
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = self.child.wait();
        eprintln!("--- terminal (stopped) ---\n{}", self.transcript());
    }
}

/// `--on-error shell` on a terminal (a pseudo-terminal here): a build step fails, builder says
/// what failed and opens a root shell in the build VM, in the state the step left; a command
/// typed there runs; exiting the shell fails the build as `abort` does (exit 1, VM and disk
/// removed, logs kept). One boot, of the appliance (`--boot appliance`: the shell is the
/// agent's, the same in both modes; the build never reaches its test stage, and
/// `failing_test_fails_the_build_and_keep_on_failure_keeps_what_it_says` opens one in a
/// fully booted test VM).
#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn on_error_shell_opens_a_shell_in_the_build_vm_on_a_terminal() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();
    let minutes = |m: u64| std::time::Duration::from_secs(m * 60);
    let mut term = OnTerminal::spawn(
        &guard.command(
            &image,
            &[
                "build",
                "tests/build/failing-step.yml",
                "--on-error",
                "shell",
                "--accel",
                "tcg",
                "--boot",
                "appliance",
            ],
        ),
        true,
    );
    use nix::sys::termios::LocalFlags;
    let cooked = LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG;
    assert!(term.local_modes().contains(cooked));
    let at = term.wait_for(0, "shell ready", minutes(15));
    let before = term.transcript()[..at].to_string();
    assert!(
        before.contains(
            "error: component `fails-in-build` failed in phase `build`, step `LeaveStateThenFail`"
        ),
        "says what failed:\n{before}"
    );
    assert!(
        before.contains("│ about to fail"),
        "the step's last lines:\n{before}"
    );
    assert!(
        before.contains("note: opening a shell in")
            && before.contains("the build then fails and removes its VM and disk"),
        "says what happens after the shell:\n{before}"
    );

    // The host terminal is raw while the shell runs: keys go to the guest as typed. (builder
    // says "shell ready" just before it switches.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while term.local_modes().intersects(cooked) {
        assert!(
            std::time::Instant::now() < deadline,
            "the terminal is not raw: {:?}",
            term.local_modes()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // A command typed in the shell runs in the build VM, as root, where the failed step left
    // its file, on a terminal of this one's size and type. Its output is computed in the
    // guest, so the terminal's echo of the line cannot match.
    let typed = term.transcript().len();
    term.type_in(
        "cat /root/left-by-the-step; echo \"typed by $(id -un)-$((6 * 7)), size $(stty size), TERM $TERM\"\r",
    );
    let at = term.wait_for(typed, "typed by root-42, size 24 80, TERM dumb", minutes(2));
    let shown = term.transcript();
    assert!(
        shown[typed..at].contains("state 42"),
        "the file the step left:\n{}",
        &shown[typed..]
    );

    // Resizing this terminal resizes the guest's (the guest polls: the resize travels
    // through builder's SIGWINCH handler and the agent).
    term.resize(30, 100);
    term.type_in(
        "for i in $(seq 100); do [ \"$(stty size)\" = '30 100' ] && break; sleep 0.2; done; echo \"resized to $(stty size)\"\r",
    );
    let at = term.wait_for(at, "resized to 30 100", minutes(2));

    // ^C interrupts the command in the guest, not the build (the terminal is raw, so it is
    // a byte for the guest's terminal, not SIGINT for builder).
    term.type_in("echo \"sleeping $((3 * 3))\"; sleep 600\r");
    let at = term.wait_for(at, "sleeping 9", minutes(2));
    std::thread::sleep(std::time::Duration::from_secs(1));
    term.type_in("\x03");
    term.type_in("echo \"after ctrl-c $((1 + 1))\"\r");
    let at = term.wait_for(at, "after ctrl-c 2", minutes(2));

    // Exiting the shell (with any status) fails the build.
    term.type_in("exit 7\r");
    let Finished {
        code,
        transcript: shown,
        modes,
        ..
    } = term.finish(minutes(5));
    assert!(
        modes.contains(cooked),
        "builder left the terminal raw: {modes:?}"
    );
    assert_eq!(code, Some(1), "the build failed after the shell:\n{shown}");
    let after = &shown[at..];
    assert!(
        after.contains("note: shell closed; failing the build"),
        "{after}"
    );
    assert!(after.contains("logs: "), "{after}");
    assert!(
        !stored_build(&guard.store(), "e2e-shell").exists(),
        "a failed build is not stored"
    );
    // The guard checks the VM, the disk chain and the staging folder are gone.
}
