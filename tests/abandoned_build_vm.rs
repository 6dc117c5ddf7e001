//! VM tier: what a `kill -9` of `builder build` leaves, and what the next command makes of it;
//! and an OCI parent that pruning keeps and a rebuild finds without the registry. Real QEMU
//! (TCG) on the fixture image, the real registry (Debian's docker-registry on loopback,
//! tests/support/registry.rs). Run with:
//!
//! ```text
//! BUILDER_VM_TESTS=1 BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) cargo test --test abandoned_build_vm
//! ```
//!
//! One test, two boots of the appliance (`boot: appliance`: seconds under TCG, where a full
//! boot costs minutes; how the build VM boots is not what this test is about):
//!
//! 1. the fixture image is pushed to the registry as an OCI artifact; a build on
//!    `parentImage: oci://…@sha256:<manifest>` (tests off, no generalize) pulls it and is
//!    stored: its manifest records the manifest digest and the disk's;
//! 2. the registry stops; `images rm --prune-cache` keeps that parent (a stored build uses it)
//!    and removes what nothing uses: an unused cached disk, a partial download, a memo about a
//!    disk no longer there;
//! 3. a second build on the same parent, the registry still down: the parent comes from the
//!    cache (no pull), the VM boots, and its second component waits for ever. It is killed
//!    with SIGKILL mid-component: QEMU dies with it (parent-death signal; found by command
//!    line, since it renames itself); its disk chain and staging folder are left behind (which
//!    used to make `images rm --prune-cache` refuse for ever: "a build is in progress");
//! 4. `builder images list --json` cleans that up and says so (stderr and JSON): nothing left in
//!    `work/` or `staging/`, the logs under `failed/` with the reason; `images rm
//!    --prune-cache` no longer refuses, and still keeps the stored build's OCI parent.
//!
//! Without `BUILDER_VM_TESTS=1` the test is ignored (tests/support/vm_tier.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use builder::recipe::Format;
use builder::recipe::Version;
use builder::store::Store;
use builder::store::manifest::{Artifact, Manifest};

#[path = "support/vm_tier.rs"]
mod vm_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

#[path = "support/registry.rs"]
#[allow(dead_code)] // shared with tests/distribute_oci.rs, which uses all of it
mod registry;

const MARK: &str = "name: mark\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Mark\n        action: ExecuteBash\n        inputs:\n          commands:\n            - echo built-on-an-oci-parent > /etc/oci-mark\n";

/// Writes 2 MiB to the disk (a full boot's own writes did that before; the appliance writes
/// next to nothing), says it started, then waits for a file no one creates.
const WAIT: &str = "name: wait-for-marker\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Wait\n        action: ExecuteBash\n        inputs:\n          commands:\n            - head -c 2M /dev/urandom > /var/tmp/written-before-waiting && sync\n            - echo WAITING-FOR-THE-MARKER\n            - while [ ! -e /var/tmp/never-created ]; do sleep 1; done\n";

fn recipe(parent: &str, components: &[&str]) -> String {
    let components: String = components
        .iter()
        .map(|c| format!("  - path: {c}\n"))
        .collect();
    format!(
        "name: on-oci\nversion: 1.0.0\nparentImage: {parent}\ncomponents:\n{components}infrastructure: {{cpus: 2, memory: 1GiB, network: none, boot: appliance}}\ntests: {{enabled: false}}\ngeneralize: false\noutputs: {{formats: [qcow2], compression: none}}\n"
    )
}

/// `builder ARGS` on the guard's store, with the registry at `registry` spoken to in plain
/// HTTP, and no credentials; the appliance cached in the guard's folder.
fn command(guard: &NoLeftovers, registry: &str, args: &[&str]) -> Command {
    let mut cmd = guard.builder_command(args);
    cmd.env("DOCKER_CONFIG", guard.root().join("docker"))
        .env(
            "BUILDER_APPLIANCE_CACHE",
            guard.root().join("appliance-cache"),
        )
        .env_remove("REGISTRY_AUTH_FILE")
        .env("BUILDER_INSECURE_REGISTRIES", registry)
        .stdin(Stdio::null());
    cmd
}

fn run(guard: &NoLeftovers, registry: &str, args: &[&str]) -> (Output, String) {
    let out = leftovers::run_echoed(&mut command(guard, registry, args), args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs_err::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A store (apart from the test's) holding the fixture image as a build, to push from.
fn source_store(root: &Path, image: &Path) -> (PathBuf, String) {
    let dir = root.join("source-store");
    let store = Store::open(&dir).expect("source store");
    let slot = store
        .allocate_build("base", &Version::new(1, 0, 0))
        .expect("allocate");
    let file = "base.qcow2";
    let status = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(image)
        .arg(slot.dir().join(file))
        .status()
        .expect("cp");
    assert!(status.success());
    let sha = builder::digest::sha256_file(&slot.dir().join(file), None)
        .expect("hash")
        .hex();
    fs_err::write(slot.dir().join("SHA256SUMS"), format!("{sha}  {file}\n")).expect("sums");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.outputs.push(Artifact {
        file: file.into(),
        format: Format::Qcow2,
        size: fs_err::metadata(slot.dir().join(file)).expect("size").len(),
        virtual_size: 2 << 30,
        sha256: sha.clone(),
    });
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit");
    (dir, sha)
}

#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn a_killed_build_is_cleaned_up_and_an_oci_parent_survives_pruning() {
    let image = vm_tier::test_image();
    let guard = NoLeftovers::new();
    let root = guard.root();
    fs_err::create_dir(root.join("docker")).expect("mkdir");
    fs_err::write(root.join("docker/config.json"), "{}").expect("docker config");
    fs_err::write(root.join("mark.yml"), MARK).expect("component");
    fs_err::write(root.join("wait.yml"), WAIT).expect("component");

    // 1. Push the fixture image; build on it from the registry.
    let mut registry = registry::TestRegistry::start();
    let host = registry.host();
    let (source, disk_sha) = source_store(root, &image);
    let (out, stderr) = run(
        &guard,
        &host,
        &[
            "distribute",
            "base/1.0.0/1",
            "--store",
            &source.to_string_lossy(),
            "--plain-http",
            &host,
            "--to",
            &format!("oci://{host}/images/base:1"),
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let location = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "receipt")
        .and_then(|e| e["receipt"]["location"].as_str().map(str::to_string))
        .expect("a receipt with the pinned location");
    let manifest_hex = location
        .rsplit_once("@sha256:")
        .map(|(_, hex)| hex.to_string())
        .expect("pinned");
    fs_err::remove_dir_all(&source).expect("remove the source store");
    fs_err::write(root.join("a.yml"), recipe(&location, &["mark.yml"])).expect("recipe");
    let (out, stderr) = run(&guard, &host, &["build", "a.yml", "--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stored = guard.store().join("images/on-oci/1.0.0/1");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs_err::read(stored.join("manifest.json")).expect("manifest"))
            .expect("JSON");
    let parent = &manifest["inputs"]["parent"];
    assert_eq!(parent["sha256"], manifest_hex.as_str(), "{parent:#}");
    assert_eq!(parent["diskSha256"], disk_sha.as_str(), "{parent:#}");
    let cache = guard.store().join("cache/base");
    let cached = format!("{disk_sha}.qcow2");
    let memo = format!("manifest-{manifest_hex}.sha256");
    assert_eq!(names(&cache), [cached.clone(), memo.clone()]);

    // 2. The registry goes; pruning keeps the parent the stored build uses, and only it.
    registry.stop();
    let junk = ["b", "c", "d"].map(|c| c.repeat(64));
    fs_err::write(cache.join(format!("{}.qcow2", junk[0])), "unused").expect("junk");
    fs_err::write(cache.join(format!("{}.part", junk[1])), "half").expect("junk");
    fs_err::write(
        cache.join(format!("manifest-{}.sha256", junk[2])),
        format!("{}\n", junk[1]),
    )
    .expect("junk");
    let store = Store::open(guard.store()).expect("store");
    let throwaway = store
        .allocate_build("throwaway", &Version::new(1, 0, 0))
        .expect("allocate");
    throwaway.abandon("made by the test").expect("abandon");
    let (out, stderr) = run(
        &guard,
        &host,
        &["images", "rm", "throwaway/1.0.0/1", "--prune-cache"],
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(names(&cache), [cached.clone(), memo.clone()], "{stderr}");

    // 3. Build again on the same parent, registry down, and kill it mid-component.
    fs_err::write(
        root.join("b.yml"),
        recipe(&location, &["mark.yml", "wait.yml"]),
    )
    .expect("recipe");
    let (mut child, seen, _rest) = leftovers::spawn_until(
        &mut command(&guard, &host, &["build", "b.yml", "--accel", "tcg"]),
        "WAITING-FOR-THE-MARKER",
        Duration::from_secs(20 * 60),
    );
    let all = seen.join("\n");
    assert!(all.contains("already cached as"), "no pull: {all}");
    assert!(!all.contains("connecting to"), "no pull: {all}");
    guard.kill_builder_and_its_qemu(&mut child);
    let build_id = names(&guard.store().join("staging"))
        .pop()
        .expect("the killed build's staging folder is left");
    assert_eq!(
        names(&guard.store().join("work")),
        std::slice::from_ref(&build_id)
    );
    // As the killed builder left them (before this change, for ever): its chain and staging
    // folder. The next command cleans them up first.
    let (out, stderr) = run(&guard, &host, &["images", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");

    // 4. What `images list` cleaned, and said.
    assert!(
        stderr.contains(&format!(
            "note: cleaned up the abandoned build on-oci/1.0.0/2 (build id {build_id}): its process (pid {}",
            child.id()
        )),
        "{stderr}"
    );
    let work = guard.store().join("work").join(&build_id);
    assert!(stderr.contains(&work.display().to_string()), "{stderr}");
    assert!(names(&guard.store().join("work")).is_empty());
    assert!(names(&guard.store().join("staging")).is_empty());
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let row = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["reference"] == "on-oci/1.0.0/2")
        .unwrap_or_else(|| panic!("no row for the killed build: {rows:#}"));
    assert_eq!(row["status"], "failed");
    assert_eq!(row["cleaned"]["buildId"], build_id.as_str(), "{row:#}");
    assert!(
        row["cleaned"]["freedBytes"].as_u64() > Some(1 << 20),
        "the chain held the component's writes: {row:#}"
    );
    let failed = guard.store().join("failed").join(&build_id);
    let record: serde_json::Value =
        serde_json::from_slice(&fs_err::read(failed.join("build.json")).expect("build.json"))
            .expect("JSON");
    let reason = record["failure"].as_str().unwrap_or_default();
    assert!(reason.starts_with("abandoned: "), "{reason}");
    assert!(reason.contains(&format!("pid {}", child.id())), "{reason}");
    let console = failed.join("logs/build-vm/console.log");
    assert!(console.is_file(), "{} kept", console.display());

    // Pruning runs again, and keeps the stored build's parent.
    let (out, stderr) = run(
        &guard,
        &host,
        &["images", "rm", "on-oci/1.0.0/2", "--prune-cache"],
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("in progress"), "{stderr}");
    assert!(!stderr.contains("abandoned"), "cleaned once: {stderr}");
    assert_eq!(names(&cache), [cached, memo]);
    drop(guard);
}
