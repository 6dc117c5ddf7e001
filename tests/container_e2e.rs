//! Container tier: `builder build` of container recipes end to end, with real buildah (as
//! root) on the fixture base container image (`BUILDER_TEST_CONTAINER`, an OCI archive of
//! Debian 12 made by fixtures/base-container.sh). Run with:
//!
//! ```text
//! BUILDER_CONTAINER_TESTS=1 BUILDER_TEST_CONTAINER=$(fixtures/base-container.sh) \
//!     cargo test --test container_e2e
//! ```
//!
//! One test, in order, so the parent is imported into the store's engine once
//! (tests/container/): a recipe with a loop, chaining and file actions builds and its test
//! stage runs in a container; the stored image (an OCI layout, kind `container`, packages
//! and their apt sources and keys listed) runs with `buildah` and has the components'
//! changes; built again, every component is cached and the manifest's package changes name
//! the first build (and, where a package's version differs, list it); with `--no-cache` every component runs; one changed component redoes
//! only itself; a custom template's ENV, LABEL and USER are honoured; a failing component exits 1 naming the step and its output, leaving no
//! container, mount or work folder behind; a parent pushed to a real registry
//! (docker-registry, by skopeo) is pulled by digest; builder killed (SIGKILL) during a
//! component leaves nothing the next build does not remove; SIGTERM during a component exits
//! 130 and leaves nothing at all. `container-host-test` phases run on the host after the test
//! phases in the container, and reach the image through buildah.

#[path = "support/container_tier.rs"]
mod container_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

#[path = "support/registry.rs"]
#[allow(dead_code)] // shared with tests/distribute_oci.rs, which uses all of it
mod registry;

#[path = "support/events.rs"]
mod build_events;
use build_events::{events, json_lines};

use std::path::{Path, PathBuf};
use std::process::Output;

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/container")
}

fn build(guard: &NoLeftovers, base: &Path, recipe: &Path) -> (Output, Vec<serde_json::Value>) {
    build_with(guard, base, recipe, &[])
}

/// [`build`] with more options (`--no-cache`).
fn build_with(
    guard: &NoLeftovers,
    base: &Path,
    recipe: &Path,
    extra: &[&str],
) -> (Output, Vec<serde_json::Value>) {
    let recipe = recipe.display().to_string();
    let mut args = vec!["build", "--json", recipe.as_str()];
    args.extend_from_slice(extra);
    let out = leftovers::run_echoed(
        guard
            .builder_command(&args)
            .env("BUILDER_TEST_CONTAINER", base),
        &args,
    );
    let all = json_lines(&out.stdout);
    (out, all)
}

/// `builder build` of tests/container/sleeping.yml, returned once its component's RUN runs
/// (a working container exists), for a test to interrupt.
fn sleeping_build(guard: &NoLeftovers, base: &Path) -> std::process::Child {
    let sleeping = here().join("sleeping.yml").display().to_string();
    let child = guard
        .builder_command(&["build", sleeping.as_str()])
        .env("BUILDER_TEST_CONTAINER", base)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("builder starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while buildah(guard, &["containers", "--all", "--quiet"])
        .trim()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sleeping component's RUN started"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    child
}

/// Each component stage's status, in order: `success` or `cached`.
fn component_statuses(all: &[serde_json::Value]) -> Vec<String> {
    events(all, "stageFinished")
        .iter()
        .filter(|e| {
            e["stage"]
                .as_str()
                .is_some_and(|s| s.starts_with("component"))
        })
        .map(|e| e["status"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The recipe of the two-component image, its second component's parameter `text`.
fn tools_recipe(guard: &NoLeftovers, text: &str) -> PathBuf {
    let components = here().join("components");
    let path = guard.root().join("tools.yml");
    fs_err::write(
        &path,
        format!(
            "name: ctools\nversion: 1.0.0\ncontainerType: docker\nparentImage: ${{BUILDER_TEST_CONTAINER}}\n\
             components:\n  - path: {c}/write-tools.yml\n  - path: {c}/second.yml\n    parameters:\n      Text: {text}\n\
             tests:\n  components:\n    - path: {c}/test-basics.yml\n",
            c = components.display()
        ),
    )
    .expect("write recipe");
    path
}

/// buildah on the store's engine storage.
fn buildah(guard: &NoLeftovers, args: &[&str]) -> String {
    let dir = guard.store().join("containers");
    let out = std::process::Command::new("buildah")
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(args)
        .output()
        .expect("buildah");
    assert!(
        out.status.success(),
        "buildah {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs_err::read(dir.join("manifest.json")).expect("manifest"))
        .expect("manifest JSON")
}

/// The stored build's folder, from the `buildFinished` event.
fn stored_dir(all: &[serde_json::Value]) -> PathBuf {
    let finished = events(all, "buildFinished");
    PathBuf::from(
        finished[0]["directory"]
            .as_str()
            .expect("a finished build names its folder"),
    )
}

/// `oci:<a lower-case link to the build's layout>` (buildah names what it reads from a layout
/// after its path, and refuses upper case letters, which temporary folders have), and the
/// folder of the link.
fn lower_case_link(dir: &Path) -> (tempfile::TempDir, String) {
    let link = tempfile::Builder::new()
        .prefix("e2e-")
        .rand_bytes(0)
        .suffix(&format!("{}", std::process::id()))
        .tempdir()
        .expect("temp dir");
    fs_err::os::unix::fs::symlink(dir.join("oci"), link.path().join("layout")).expect("link");
    let source = format!("oci:{}", link.path().join("layout").display());
    (link, source)
}

/// The image configuration in the OCI layout at `layout` (its one image).
fn image_config(layout: &Path) -> serde_json::Value {
    let read = |digest: &str| -> serde_json::Value {
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(&fs_err::read(layout.join("blobs/sha256").join(hex)).expect("blob"))
            .expect("blob JSON")
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs_err::read(layout.join("index.json")).expect("index.json"))
            .expect("index JSON");
    let manifest = read(
        index["manifests"][0]["digest"]
            .as_str()
            .expect("a manifest"),
    );
    read(manifest["config"]["digest"].as_str().expect("a config"))
}

/// Runs `script` in a throwaway container of the stored layout at `dir`; its stdout.
fn run_in_stored(guard: &NoLeftovers, dir: &Path, script: &str) -> String {
    let source = lower_case_link(dir);
    let name = buildah(guard, &["from", "--name", "e2e-check", &source.1]);
    let out = buildah(
        guard,
        &[
            "run",
            "--isolation",
            "chroot",
            "e2e-check",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    buildah(guard, &["rm", name.trim()]);
    out
}

#[test]
#[cfg_attr(
    not(container_tier),
    ignore = "container tier: set BUILDER_CONTAINER_TESTS=1 and BUILDER_TEST_CONTAINER (scripts/test does)"
)]
fn container_recipes_build_test_cache_and_fail_cleanly() {
    let base = container_tier::base_container();
    let guard = NoLeftovers::new();
    // Dropped first: the engine's storage is unmounted before the guard checks and removes.
    let _engine = container_tier::EngineDir(guard.store().join("containers"));

    // 1. Loops, chaining, file actions; the test stage in a container.
    let recipe = tools_recipe(&guard, "first");
    let (out, all) = build(&guard, &base, &recipe);
    assert!(out.status.success(), "the container build succeeds");
    assert_eq!(component_statuses(&all), ["success", "success"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tested = events(&all, "stageFinished")
        .iter()
        .any(|e| e["stage"] == "test" && e["status"] == "success");
    assert!(tested, "the test stage ran: {stderr}");
    let dir = stored_dir(&all);
    let m = manifest(&dir);
    assert_eq!(m["kind"], "container");
    assert!(
        m["container"]["manifestDigest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{m:#}"
    );
    let packages = m["packages"]["packages"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert!(
        packages > 50,
        "the image's dpkg database is the SBOM: {packages}"
    );
    // The image's apt sources and keys, for the package update check (mmdebstrap wrote the
    // host's deb822 sources; debian-archive-keyring the keys).
    let sources = &m["packageSources"];
    assert_eq!(sources["manager"], "apt", "{sources:#}");
    assert_eq!(sources["architectures"], serde_json::json!(["amd64"]));
    let files: Vec<&str> = sources["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(files, ["/etc/apt/sources.list.d/0000debian.sources"]);
    assert!(
        sources["files"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("bookworm")),
        "{sources:#}"
    );
    let keys: Vec<(&str, &str)> = sources["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| Some((k["path"].as_str()?, k["sha256"].as_str()?)))
        .collect();
    // The source's Signed-By keyring, as the image has it, and no other key: the image's
    // other keyrings (trusted.gpg.d, removed keys) verify none of its sources.
    let in_image = run_in_stored(
        &guard,
        &dir,
        "cd / && sha256sum /usr/share/keyrings/debian-archive-keyring.gpg",
    );
    let (sha256, path) = in_image.trim().split_once("  ").expect("sha256sum's line");
    assert_eq!(keys, [(path, sha256)], "{in_image}");
    assert!(
        m.get("packageChanges").is_none(),
        "the first build replaces nothing"
    );
    let first = m["image"].clone();
    let tests: Vec<(String, String)> = m["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["component"].as_str().unwrap_or("?").to_string(),
                t["status"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert_eq!(
        tests,
        [
            ("write-tools".to_string(), "success".to_string()),
            ("test-basics".to_string(), "success".to_string()),
            (
                "test-basics (container-host-test)".to_string(),
                "success".to_string()
            ),
        ],
        "the test phases in a container, then container-host-test on the host"
    );
    let seen = run_in_stored(
        &guard,
        &dir,
        "cat /opt/tools/list /opt/tools/stamp; echo; cat /opt/tools/second /opt/tools/env; ls -A /run",
    );
    assert!(
        seen.starts_with("curl\njq\nyq\nstamp-3\nfirst\ngreeting=none user=root\n"),
        "the components' changes: {seen}"
    );
    assert!(
        !seen.lines().any(|l| l == "builder-agent"),
        "nothing of builder in /run: {seen}"
    );

    // 2. The same recipe again: every component comes from buildah's cache. It replaces the
    // first build, and no package changed.
    let (out, all) = build(&guard, &base, &recipe);
    assert!(out.status.success());
    assert_eq!(component_statuses(&all), ["cached", "cached"]);
    let changes = &manifest(&stored_dir(&all))["packageChanges"];
    assert_eq!(
        changes["since"].as_str(),
        Some(
            format!(
                "{}/{}/{}",
                first["name"].as_str().unwrap_or("?"),
                first["version"].as_str().unwrap_or("?"),
                first["build"]
            )
            .as_str()
        ),
        "{changes:#}"
    );
    for list in ["added", "removed", "changed"] {
        assert_eq!(changes[list], serde_json::json!([]), "{changes:#}");
    }

    // 2a. A package's version differs from the image this build replaces: the manifest's
    // package changes say which, and `builder images show` lists it.
    let package_recipe = |version: &str| {
        let path = guard.root().join("package.yml");
        fs_err::write(
            &path,
            format!(
                "name: cpackage\nversion: 1.0.0\ncontainerType: docker\n\
                 parentImage: ${{BUILDER_TEST_CONTAINER}}\ncomponents:\n\
                 \x20 - path: {}/install-package.yml\n    parameters:\n      Version: '{version}'\n\
                 tests:\n  enabled: false\n",
                here().join("components").display()
            ),
        )
        .expect("write recipe");
        path
    };
    let (out, _) = build(&guard, &base, &package_recipe("1.0"));
    assert!(out.status.success());
    let (out, all) = build(&guard, &base, &package_recipe("2.0~rc1"));
    assert!(out.status.success());
    let changes = &manifest(&stored_dir(&all))["packageChanges"];
    assert_eq!(
        changes,
        &serde_json::json!({
            "since": "cpackage/1.0.0/1",
            "added": [],
            "removed": [],
            "changed": [{"name": "builder-demo", "arch": "all", "from": "1.0", "to": "2.0~rc1"}],
        }),
        "{changes:#}"
    );
    let args = ["images", "show", "cpackage/1.0.0/2"];
    let shown = leftovers::run_echoed(&mut guard.builder_command(&args), &args);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(
            "  package changes since cpackage/1.0.0/1: 1 changed, 0 added, 0 removed\n\
             \x20   builder-demo all 1.0 → 2.0~rc1\n"
        ),
        "{shown}"
    );
    assert!(
        shown.contains("  package sources: apt, 1 file, "),
        "{shown}"
    );

    // 2b. `--no-cache`: every component runs again.
    let (out, all) = build_with(&guard, &base, &recipe, &["--no-cache"]);
    assert!(out.status.success());
    assert_eq!(component_statuses(&all), ["success", "success"]);

    // 3. The second component changed: only it runs again.
    let recipe = tools_recipe(&guard, "changed");
    let (out, all) = build(&guard, &base, &recipe);
    assert!(out.status.success());
    assert_eq!(component_statuses(&all), ["cached", "success"]);
    let dir = stored_dir(&all);
    assert_eq!(
        run_in_stored(&guard, &dir, "cat /opt/tools/second"),
        "changed\n"
    );

    // 4. A custom template: ENV reaches the components, LABEL and USER are in the image.
    let (out, all) = build(&guard, &base, &here().join("custom-template.yml"));
    assert!(out.status.success());
    let dir = stored_dir(&all);
    assert_eq!(
        run_in_stored(&guard, &dir, "cat /opt/tools/env; id -un"),
        "greeting=hello user=root\nnobody\n"
    );
    let config = image_config(&dir.join("oci"));
    assert_eq!(config["config"]["User"], "nobody", "{config:#}");
    assert_eq!(config["config"]["Labels"]["org.example.team"], "tools");

    // 5. A failing component: exit 1, the step and its output named, nothing left.
    let (out, _) = build(&guard, &base, &here().join("failing.yml"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`Breaks`"), "the step is named: {stderr}");
    assert!(
        stderr.contains("about to fail, no such tool"),
        "its output is shown: {stderr}"
    );
    assert!(
        !stderr.contains("--keep-on-failure"),
        "no disk to keep in a container build: {stderr}"
    );
    let containers = buildah(&guard, &["containers", "--all", "--quiet"]);
    assert_eq!(containers.trim(), "", "no working container is left");

    // 6. A parent from an OCI registry, pinned by digest: pulled into the store's cache.
    let registry = registry::TestRegistry::start();
    let digest_file = guard.root().join("digest");
    let pushed = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
        .arg(&digest_file)
        .arg(format!("oci-archive:{}", base.display()))
        .arg(format!("docker://{}/base/debian:12", registry.host()))
        .status()
        .expect("skopeo");
    assert!(pushed.success(), "skopeo pushes the fixture");
    let digest = fs_err::read_to_string(&digest_file).expect("digest");
    let recipe = guard.root().join("from-registry.yml");
    fs_err::write(
        &recipe,
        format!(
            "name: cregistry\nversion: 1.0.0\ncontainerType: docker\n\
             parentImage: oci://{}/base/debian@{}\n\
             components:\n  - path: {}/write-tools.yml\ntests:\n  enabled: false\n",
            registry.host(),
            digest.trim(),
            here().join("components").display()
        ),
    )
    .expect("write recipe");
    let recipe_arg = recipe.display().to_string();
    let args = ["build", "--json", recipe_arg.as_str()];
    let out = leftovers::run_echoed(
        guard
            .builder_command(&args)
            .env("BUILDER_INSECURE_REGISTRIES", registry.host()),
        &args,
    );
    assert!(
        out.status.success(),
        "the build from a registry parent succeeds"
    );
    let dir = stored_dir(&json_lines(&out.stdout));
    assert_eq!(
        manifest(&dir)["inputs"]["parent"]["sha256"]
            .as_str()
            .map(|d| format!("sha256:{d}")),
        Some(digest.trim().to_string())
    );

    // 7. builder killed (SIGKILL) in the middle of a component: buildah goes with it, and
    // the next build removes what was left.
    let mut killed = sleeping_build(&guard, &base);
    killed.kill().expect("SIGKILL builder");
    killed.wait().expect("reap builder");
    let (out, _) = build(&guard, &base, &here().join("custom-template.yml"));
    assert!(out.status.success(), "the next build runs");
    let containers = buildah(&guard, &["containers", "--all", "--quiet"]);
    assert_eq!(containers.trim(), "", "nothing of the killed build is left");
    let scratch: Vec<_> = fs_err::read_dir(guard.store().join("containers/tmp"))
        .expect("the engine's scratch folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        scratch.is_empty(),
        "nothing of the killed buildah in the scratch folder: {scratch:?}"
    );

    let mounts: Vec<String> = container_tier::mounts_under(&guard.store())
        .into_iter()
        .filter(|m| m.ends_with("/merged"))
        .collect();
    assert!(mounts.is_empty(), "no container mount is left: {mounts:?}");

    // 8. SIGTERM (and Ctrl-C, the same path) in the middle of a component: builder stops
    // buildah, removes its containers and says it was interrupted; nothing needs a next build.
    let mut stopped = sleeping_build(&guard, &base);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(stopped.id()).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM builder");
    let status = stopped.wait().expect("reap builder");
    assert_eq!(status.code(), Some(130), "an interrupted build exits 130");
    let containers = buildah(&guard, &["containers", "--all", "--quiet"]);
    assert_eq!(containers.trim(), "", "SIGTERM leaves no container");
    let mounts: Vec<String> = container_tier::mounts_under(&guard.store())
        .into_iter()
        .filter(|m| m.ends_with("/merged"))
        .collect();
    assert!(
        mounts.is_empty(),
        "SIGTERM leaves no container mount: {mounts:?}"
    );
}
