//! Local tier: `builder pipeline run` and `builder serve` as real processes on a private store
//! and pipeline history, without booting a guest:
//!
//! - a pipeline whose inputs did not change since its last successful execution is skipped,
//!   with what did not change; after its parent image changes, it builds, and the run reason
//!   names the parent (the build itself cannot boot the 4 KiB parent: it fails fast, which is
//!   all this tier needs; the VM tier builds for real in `pipeline_serve_vm.rs`).
//! - `builder serve` after downtime runs only the latest missed occurrence, persists the next
//!   run, stops on SIGTERM, and a restarted scheduler does not run that slot again.
//! - a recipe on `parentImage: oci://host/repo:tag` (a real registry: Debian's
//!   `docker-registry` on loopback, tests/support/registry.rs): each execution pins the digest
//!   the tag points to, skips while it stays, builds after a push moves the tag and names the
//!   new digest; `builder build`/`plan` refuse the tag without `--resolve-tags` and pin it with.
//!
//! The history is read with the library while the processes write it (SQLite in WAL mode).

#[path = "support/registry.rs"]
#[allow(dead_code)] // shared with tests/distribute_oci.rs, which uses all of it
mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use builder::pipeline::conditions::Inputs;
use builder::pipeline::history::{ExecStatus, Execution, ExecutionId, History, Outcome, Trigger};
use builder::store::Store;
use chrono::Utc;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

/// A folder with a recipe on a 4 KiB raw parent, its component, and a store; its store and
/// runtime folder are a [`NoLeftovers`] guard's.
struct Site {
    guard: NoLeftovers,
}

impl Site {
    fn new(pipeline: &str, parent: &str) -> Site {
        let guard = NoLeftovers::new();
        let d = guard.root();
        fs_err::create_dir_all(d.join("pipelines")).expect("mkdir");
        fs_err::create_dir_all(d.join("run")).expect("mkdir");
        fs_err::create_dir_all(d.join("docker")).expect("mkdir");
        fs_err::write(d.join("docker/config.json"), "{}").expect("write the docker config");
        fs_err::copy(
            root().join("tests/cases/recipe/parent.raw"),
            d.join("parent.raw"),
        )
        .expect("copy the parent");
        fs_err::copy(
            root().join("tests/cases/recipe/components/hello.yml"),
            d.join("hello.yml"),
        )
        .expect("copy the component");
        fs_err::write(
            d.join("recipe.yml"),
            format!(
                "name: hello\nversion: 1.0.0\nparentImage: {parent}\ncomponents:\n  - path: hello.yml\n    parameters: {{Greeting: hi}}\ntests: {{enabled: false}}\n"
            ),
        )
        .expect("write the recipe");
        fs_err::write(d.join("pipelines/hello.yml"), pipeline).expect("write the pipeline");
        Site { guard }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.guard.root().join(p)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.command_on_store_env(args);
        c.arg("--store").arg(self.path("store"));
        c
    }

    /// For commands without `--store` (`builder plan`): the store through `$BUILDER_STORE`.
    fn command_on_store_env(&self, args: &[&str]) -> Command {
        let mut c = self.guard.builder_command(args);
        // No registry credentials of this machine: an empty docker config.
        c.env("DOCKER_CONFIG", self.path("docker"))
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("BUILDER_INSECURE_REGISTRIES");
        c
    }

    fn builder(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = leftovers::run_echoed(&mut self.command(args), args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn history(&self) -> History {
        let store = Store::open(self.path("store")).expect("store");
        History::open(&History::default_path(&store)).expect("history")
    }

    /// Record a successful execution of `hello` with `inputs`, as a real build records one.
    fn seed_success(&self, inputs: Option<serde_json::Value>) -> ExecutionId {
        let history = self.history();
        let id = history
            .begin("hello", Trigger::Manual, "seeded by the test")
            .expect("begin")
            .expect("an id");
        history
            .finish(
                id,
                &Outcome {
                    inputs,
                    ..Outcome::available("hello/1.0.0/1")
                },
            )
            .expect("finish");
        id
    }

    fn executions(&self) -> Vec<Execution> {
        self.history()
            .executions(Some("hello"), 100)
            .expect("executions")
    }

    /// Nothing of a build is left: no staging or work folder, no VM folder, no process.
    fn assert_no_leftovers(&self) {
        let left = self.guard.leftovers();
        assert!(left.is_empty(), "left behind:\n  {}", left.join("\n  "));
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
    let first = site.seed_success(Some(Inputs::of(&plan).to_json()));

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
    let mut bytes = fs_err::read(site.path("parent.raw")).expect("read the parent");
    bytes[0] ^= 0xff;
    fs_err::write(site.path("parent.raw"), bytes).expect("write the parent");
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

/// A document the component runs through ExecuteDocument is an input like the component's
/// own: unchanged, the pipeline skips; edited, it builds and the reason names the document.
#[test]
fn editing_a_document_run_through_execute_document_is_a_changed_dependency() {
    let site = Site::new(DEPENDENCY_PIPELINE, "parent.raw");
    fs_err::create_dir_all(site.path("lib")).expect("mkdir");
    let common = "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Say\n        action: ExecuteBash\n        inputs:\n          commands: [echo common]\n";
    fs_err::write(site.path("lib/common.yml"), common).expect("write");
    fs_err::write(
        site.path("caller.yml"),
        "name: caller\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Common\n        action: ExecuteDocument\n        inputs:\n          document: lib/common.yml\n",
    )
    .expect("write");
    fs_err::write(
        site.path("recipe.yml"),
        "name: hello\nversion: 1.0.0\nparentImage: parent.raw\ncomponents:\n  - path: caller.yml\ntests: {enabled: false}\n",
    )
    .expect("write the recipe");
    let store = Store::open(site.path("store")).expect("store");
    let (plan, _) =
        builder::build::plan::make(&site.path("recipe.yml"), &store, &mut |_| {}).expect("plan");
    assert_eq!(plan.components[0].documents[0].path, "lib/common.yml");
    let shown = Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["plan", "recipe.yml"])
        .current_dir(site.path(""))
        .env("NO_COLOR", "1")
        .output()
        .expect("builder plan runs");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(&format!(
            "runs lib/common.yml (ExecuteDocument), sha256 {}",
            plan.components[0].documents[0].sha256
        )),
        "builder plan shows the reached document:\n{text}\n{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let first = site.seed_success(Some(Inputs::of(&plan).to_json()));

    let (code, stderr) = site.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let skipped = &site.executions()[0];
    let why = details(skipped);
    assert_eq!(skipped.status, ExecStatus::Skipped, "{why}");
    assert!(
        why.contains("the document they run through ExecuteDocument"),
        "{why}"
    );

    fs_err::write(site.path("lib/common.yml"), format!("{common}# edited\n")).expect("edit");
    let (code, stderr) = site.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_ne!(code, Some(0), "the 4 KiB parent cannot boot:\n{stderr}");
    assert_ne!(code, Some(2), "not an input problem:\n{stderr}");
    let ran = &site.executions()[0];
    let why = details(ran);
    assert!(
        why.contains(&format!("dependency changed since execution {first}"))
            && why.contains(
                "`lib/common.yml`, which component `caller` runs through ExecuteDocument, changed (sha256 "
            ),
        "{why}"
    );
    site.assert_no_leftovers();
}

/// `builder serve` on the site's pipelines folder, with stderr kept in a file.
fn serve(site: &Site, log: &str) -> Child {
    let file = fs_err::File::create(site.path(log))
        .expect("log file")
        .into_file();
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
    let log = fs_err::read_to_string(site.path("serve-1.log")).expect("log");
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
        fs_err::read_to_string(site.path("serve-2.log")).is_ok_and(|l| l.contains("serving"))
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

/// The site's recipe on `oci://<registry>/base:<tag>`, a registry spoken to over plain HTTP,
/// and builds of small qcow2 disks in the site's store to push to it.
struct OciSite {
    site: Site,
    registry: registry::TestRegistry,
}

impl OciSite {
    fn new(pipeline: &str) -> OciSite {
        let registry = registry::TestRegistry::start();
        let site = Site::new(pipeline, &format!("oci://{}/base:stable", registry.host()));
        OciSite { site, registry }
    }

    /// `builder ARGS` with the registry allowed over plain HTTP (the store from the environment).
    fn builder(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = leftovers::run_echoed(
            self.site
                .command_on_store_env(args)
                .env("BUILDER_INSECURE_REGISTRIES", self.registry.host()),
            args,
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), stdout, stderr)
    }

    /// Store a new build `base/1.0.0/N` whose 1 MiB qcow2 is filled with `pattern`, push it to
    /// `base:<tag>` with `builder distribute`, and return (manifest digest, disk sha256).
    fn push(&self, tag: &str, pattern: u8) -> (String, String) {
        let store = Store::open(self.site.path("store")).expect("store");
        let slot = store
            .allocate_build("base", &"1.0.0".parse().expect("version"))
            .expect("allocate");
        let file = format!("base-1.0.0-{}.qcow2", slot.id().build);
        let disk = slot.dir().join(&file);
        for (tool, args) in [
            (
                "qemu-img",
                vec!["create", "-q", "-f", "qcow2", "DISK", "1M"],
            ),
            (
                "qemu-io",
                vec![
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -q -P {pattern} 0 1M"),
                    "DISK",
                ],
            ),
        ] {
            let out = Command::new(tool)
                .args(args.iter().map(|a| {
                    if *a == "DISK" {
                        disk.as_os_str()
                    } else {
                        a.as_ref()
                    }
                }))
                .output()
                .unwrap_or_else(|e| panic!("{tool} is missing ({e}): run scripts/install-deps"));
            assert!(
                out.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let sha256 = builder::digest::sha256_file(&disk, None)
            .expect("hash")
            .hex();
        fs_err::write(slot.dir().join("SHA256SUMS"), format!("{sha256}  {file}\n")).expect("sums");
        let mut m = builder::store::manifest::Manifest::new(slot.id().clone(), slot.build_id());
        m.outputs.push(builder::store::Artifact {
            file,
            format: builder::recipe::Format::Qcow2,
            size: fs_err::metadata(&disk).expect("size").len(),
            virtual_size: 1 << 20,
            sha256: sha256.clone(),
        });
        m.write(slot.dir()).expect("manifest");
        let image = slot.commit().expect("commit").reference();
        let to = format!("oci://{}/base:{tag}", self.registry.host());
        let (code, stdout, stderr) = self.builder(&["distribute", &image, "--to", &to]);
        assert_eq!(code, Some(0), "{stderr}");
        // stdout: the receipt's location, `oci://host/base:tag@sha256:<manifest digest>`.
        let digest = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{to}@sha256:")))
            .unwrap_or_else(|| panic!("no receipt for {to} in {stdout:?}"))
            .to_string();
        (digest, sha256)
    }

    /// The parent's digest an execution recorded with its inputs.
    fn recorded_parent(e: &Execution) -> builder::pipeline::conditions::ParentInput {
        let inputs: Inputs =
            serde_json::from_value(e.inputs.clone().expect("inputs recorded")).expect("inputs");
        inputs.parent
    }
}

/// Without a VM: the build of every execution that runs fails fast (its 1 MiB parent cannot
/// boot; only the decision matters here). The comparison is with the last *successful*
/// execution, so once the first execution has pinned the tag, a success is recorded with the
/// inputs it recorded (a successful build records the same inputs: they are pinned before the
/// build starts, `pipeline_serve_vm.rs` shows it for real) and the next run is skipped.
#[test]
fn a_moved_oci_tag_is_a_changed_dependency_named_by_its_new_digest() {
    let oci = OciSite::new(DEPENDENCY_PIPELINE);
    let site = &oci.site;
    let written = format!("oci://{}/base:stable", oci.registry.host());
    let (first_digest, first_disk) = oci.push("stable", 0x11);

    // 1. The tag is resolved and pinned; the build pulls that digest (its disk is cached).
    let (code, _, stderr) = oci.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_ne!(code, Some(0), "the 1 MiB parent cannot boot:\n{stderr}");
    assert_ne!(code, Some(2), "not an input problem:\n{stderr}");
    let ran = &site.executions()[0];
    let why = details(ran);
    assert_eq!(ran.status, ExecStatus::Failed, "{why}");
    assert!(why.contains("no successful execution yet"), "{why}");
    let parent = OciSite::recorded_parent(ran);
    assert_eq!(
        (parent.written.as_str(), parent.sha256.as_str()),
        (written.as_str(), first_digest.as_str())
    );
    assert!(
        site.path(&format!("store/cache/base/{first_disk}.qcow2"))
            .is_file(),
        "the build pulled the pinned disk:\n{why}"
    );
    site.assert_no_leftovers();
    // A failed execution is no baseline: the same tag runs again.
    let (code, _, stderr) = oci.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_ne!(code, Some(0), "{stderr}");
    let again = &site.executions()[0];
    assert!(
        details(again).contains("no successful execution yet"),
        "{}",
        details(again)
    );
    assert_eq!(OciSite::recorded_parent(again), parent);

    // As if that build had succeeded: the same inputs, recorded as available.
    let success = site.seed_success(ran.inputs.clone());

    // 2. The tag has not moved: skipped, the reason names the tag and its digest.
    let (code, _, stderr) = oci.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let skipped = &site.executions()[0];
    let why = details(skipped);
    assert_eq!(skipped.status, ExecStatus::Skipped, "{why}");
    assert!(
        why.contains(&format!("nothing changed since execution {success}"))
            && why.contains(&format!(
                "parent image `{written}` (sha256 {})",
                &first_digest[..12]
            )),
        "{why}"
    );

    // 3. Another disk pushed to the same tag: the pipeline builds, and says to what.
    let (second_digest, second_disk) = oci.push("stable", 0x22);
    assert_ne!(second_digest, first_digest);
    let (code, _, stderr) = oci.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_ne!(code, Some(0), "the 1 MiB parent cannot boot:\n{stderr}");
    let ran = &site.executions()[0];
    let why = details(ran);
    assert_eq!(ran.status, ExecStatus::Failed, "{why}");
    assert!(
        why.contains(&format!("dependency changed since execution {success}"))
            && why.contains(&format!(
                "parent image `{written}` now points to sha256:{second_digest} (was sha256:{})",
                &first_digest[..12]
            )),
        "{why}"
    );
    assert_eq!(OciSite::recorded_parent(ran).sha256, second_digest);
    assert!(
        site.path(&format!("store/cache/base/{second_disk}.qcow2"))
            .is_file()
    );
    site.assert_no_leftovers();
}

/// `builder plan`/`build` on a tag-only parent: refused with the digest to pin and the flag,
/// pinned (and said so) with `--resolve-tags`; a missing tag and an unreachable registry are
/// errors at the recipe's `parentImage`, and fail a pipeline execution the same way.
#[test]
fn tags_are_resolved_only_when_asked_and_failures_name_the_parent_line() {
    let mut oci = OciSite::new(DEPENDENCY_PIPELINE);
    let host = oci.registry.host();
    let (digest, _) = oci.push("stable", 0x33);
    let site = &oci.site;
    let at = "recipe.yml:3:14";

    // Refused, with the hint it always gave plus the flag; nothing is started.
    for command in ["plan", "build"] {
        let (code, _, stderr) = oci.builder(&[command, "recipe.yml"]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains("names a tag, not a digest")
                && stderr.contains("recipe.yml:3:14")
                && stderr.contains(&format!(
                    "pin it: `oci://{host}/base:stable@sha256:{digest}`"
                ))
                && stderr.contains("--resolve-tags"),
            "{stderr}"
        );
    }

    // `plan --resolve-tags`: the digest is in the plan, and said on stderr.
    let pinned = format!("pinned oci://{host}/base:stable@sha256:{digest}");
    let (code, stdout, stderr) = oci.builder(&["plan", "--resolve-tags", "--json", "recipe.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains(&pinned), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).expect("the plan as JSON");
    assert_eq!(plan["parent"]["kind"], "oci");
    assert_eq!(plan["parent"]["reference"], format!("{host}/base:stable"));
    assert_eq!(plan["parent"]["manifestDigest"], digest.as_str());
    let (code, stdout, stderr) = oci.builder(&["plan", "--resolve-tags", "recipe.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "manifest sha256:{digest} (what the tag points to now)"
        )),
        "{stdout}"
    );

    // `build --resolve-tags` says what it pinned, then builds (and fails fast: no bootable disk).
    fs_err::write(
        site.path("direct.yml"),
        fs_err::read_to_string(site.path("recipe.yml")).expect("recipe")
            + "infrastructure: {accelerator: kvm, bootTimeoutSeconds: 5}\n",
    )
    .expect("write the recipe");
    let (code, _, stderr) = oci.builder(&["build", "--resolve-tags", "direct.yml"]);
    assert!(stderr.contains(&pinned), "{stderr}");
    assert_ne!(code, Some(0), "the 1 MiB parent cannot boot:\n{stderr}");
    assert_ne!(code, Some(2), "not an input problem:\n{stderr}");

    // A tag the registry does not hold: a problem of the recipe, at its line.
    fs_err::write(
        site.path("missing.yml"),
        fs_err::read_to_string(site.path("recipe.yml"))
            .expect("recipe")
            .replace("base:stable", "base:nope"),
    )
    .expect("write the recipe");
    let (code, _, stderr) = oci.builder(&["plan", "--resolve-tags", "missing.yml"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("missing.yml:3:14")
            && stderr.contains(&format!("{host}/base has no tag `nope`")),
        "{stderr}"
    );

    // The registry is gone: a host problem (exit 3) that still names the line; a pipeline
    // execution fails with the same words and the hint.
    oci.registry.stop();
    let site = &oci.site;
    let (code, _, stderr) = oci.builder(&["plan", "--resolve-tags", "recipe.yml"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot resolve the tag of `oci://{host}/base:stable`"
        )) && stderr.contains(at)
            && stderr.contains("cannot reach the registry")
            && stderr.contains("hint:"),
        "{stderr}"
    );
    let (code, _, stderr) = oci.builder(&["pipeline", "run", "pipelines/hello.yml"]);
    assert_ne!(code, Some(0), "{stderr}");
    let failed = &site.executions()[0];
    assert_eq!(failed.status, ExecStatus::Failed, "{}", details(failed));
    let error = failed.error.as_deref().unwrap_or_default();
    assert!(
        error.contains(at)
            && error.contains("cannot reach the registry")
            && error.contains("hint:"),
        "{error}"
    );
    site.assert_no_leftovers();
}
