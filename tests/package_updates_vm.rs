//! VM tier: a pipeline with `packageUpdates: true` end to end (issue #15), with real QEMU (TCG
//! here, the build VM in the appliance), the fixture base image and a real signed apt
//! repository on the host's loopback (tests/support/apt_repo.rs: `.deb` files from
//! `dpkg-deb`, indices from `apt-ftparchive`, an ed25519 key made by gpg). Run with:
//!
//! ```text
//! BUILDER_VM_TESTS=1 BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) \
//!     cargo test --locked --test package_updates_vm -- --nocapture
//! ```
//!
//! One sequence on one store, two builds in all (each 40-90 s under TCG):
//!
//! 1. `builder-hello 1.0-1` published; the first run builds (no successful execution yet).
//!    Its manifest lists the package and the image's sources and key;
//!    `builder images outdated` (human and `--json`) finds nothing, through the store's
//!    mirror (`http://10.0.2.2:PORT` as the image writes it → `http://127.0.0.1:PORT`).
//! 2. The second run skips: nothing changed and no package updates, said in the reason.
//! 3. `1.1-1` published: `images outdated` lists it (not with `--security-only`); the third
//!    run builds, its reason names the package, the new image has 1.1-1 in its package list
//!    (its components ran again: no layer came from the cache) and its manifest's package
//!    changes show 1.0-1 → 1.1-1 since the first image.
//! 4. The repository's Release file altered after signing: `images outdated` fails (exit 1,
//!    `could not check updates`, the bad signature named); the fourth run skips with that
//!    reason, builds nothing, and notifies although `notifications.on` lists only
//!    `available`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use base64::Engine as _;

#[path = "support/vm_tier.rs"]
mod vm_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

#[path = "support/http.rs"]
mod http;

#[path = "support/apt_repo.rs"]
mod apt_repo;
use apt_repo::AptRepo;

const PACKAGE: &str = "builder-hello";

/// `builder ARGS` in the guard's store, from `dir` (where the pipeline and recipe are), with
/// the fixture as `BUILDER_TEST_IMAGE`; run to its end and echoed on the test's stderr.
fn builder(guard: &NoLeftovers, image: &Path, dir: &Path, args: &[&str]) -> Output {
    let mut cmd: Command = guard.builder_command(args);
    cmd.current_dir(dir)
        .env("BUILDER_TEST_IMAGE", image)
        .env(
            "BUILDER_APPLIANCE_CACHE",
            guard.root().join("appliance-cache"),
        )
        .stdin(Stdio::null());
    let started = Instant::now();
    let out = leftovers::run_echoed(&mut cmd, args);
    eprintln!("(took {:.1} s)", started.elapsed().as_secs_f64());
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The pipeline's execution report (`builder pipeline run --json`).
fn run_pipeline(guard: &NoLeftovers, image: &Path, dir: &Path) -> serde_json::Value {
    let out = builder(
        guard,
        image,
        dir,
        &["pipeline", "run", "pipeline.yml", "--json"],
    );
    // JSON lines: the build's events, then `{"event":"execution","report":{…}}`.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "execution")
        .map(|e| e["report"].clone())
        .unwrap_or_else(|| panic!("no execution report on stdout: {stdout}"));
    eprintln!("report: {report:#}");
    report
}

fn manifest(store: &Path, reference: &str) -> serde_json::Value {
    let path = store.join("images").join(reference).join("manifest.json");
    serde_json::from_slice(&fs_err::read(&path).expect("manifest")).expect("manifest JSON")
}

/// The version of `name` in a manifest's package list.
fn installed(manifest: &serde_json::Value, name: &str) -> Option<String> {
    manifest["packages"]["packages"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["version"].as_str())
        .map(str::to_string)
}

/// The recipe, its component and the pipeline, with the repository's port and key, in `dir`.
fn write_project(dir: &Path, repo: &AptRepo, events: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/package_updates");
    let key = base64::engine::general_purpose::STANDARD.encode(repo.public_key_bytes());
    let recipe = fs_err::read_to_string(src.join("recipe.yml"))
        .expect("recipe")
        .replace("\"PORT\"", &format!("\"{}\"", repo.port()))
        .replace("\"KEY\"", &format!("\"{key}\""));
    fs_err::create_dir_all(dir.join("components")).expect("components dir");
    fs_err::write(dir.join("recipe.yml"), recipe).expect("recipe copy");
    fs_err::copy(
        src.join("components/patch-from-the-host.yml"),
        dir.join("components/patch-from-the-host.yml"),
    )
    .expect("component copy");
    let pipeline = fs_err::read_to_string(src.join("pipeline.yml"))
        .expect("pipeline")
        .replace("EVENTS", &events.to_string_lossy());
    fs_err::write(dir.join("pipeline.yml"), pipeline).expect("pipeline copy");
}

#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn a_pipeline_rebuilds_when_its_image_has_package_updates() {
    let image = vm_tier::test_image();
    let guard = NoLeftovers::new();
    let store = guard.store();
    let dir = guard.root().join("project");
    let events = guard.root().join("events.jsonl");
    let repo = AptRepo::new();
    repo.publish(PACKAGE, "1.0-1");
    write_project(&dir, &repo, &events);
    // The image names the repository as the guest reaches it; the host fetches it on its
    // loopback: the store's mirror.
    fs_err::create_dir_all(&store).expect("store");
    fs_err::write(
        store.join("config.yml"),
        format!(
            "packageUpdates:\n  mirrors:\n    - from: {}\n      to: {}\n",
            repo.guest_url(),
            repo.url()
        ),
    )
    .expect("config.yml");

    // 1. The first run builds.
    let first = run_pipeline(&guard, &image, &dir);
    assert_eq!(first["status"], "available", "the first run must build");
    let first_image = first["image"].as_str().expect("image").to_string();
    let m1 = manifest(&store, &first_image);
    assert_eq!(installed(&m1, PACKAGE).as_deref(), Some("1.0-1"));
    let sources = &m1["packageSources"];
    assert_eq!(sources["manager"], "apt", "{sources:#}");
    let files: Vec<&str> = sources["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(files, ["/etc/apt/sources.list.d/builder-test.list"]);
    assert!(
        sources["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["path"] == "/etc/apt/keyrings/builder-test.gpg"),
        "the repository's key is recorded: {sources:#}"
    );
    assert!(
        m1["packageChanges"].is_null(),
        "nothing is replaced by the first image"
    );
    let out = builder(&guard, &image, &dir, &["images", "outdated", &first_image]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty(), "no update is listed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no updates among"), "{stderr}");
    let out = builder(
        &guard,
        &image,
        &dir,
        &["images", "outdated", &first_image, "--json"],
    );
    assert_eq!(out.status.code(), Some(0));
    let checked = json(&out);
    assert_eq!(checked["updates"], serde_json::json!([]));
    let repository = &checked["repositories"][0];
    assert_eq!(repository["uri"], repo.guest_url());
    assert_eq!(
        repository["fetchedFrom"]
            .as_str()
            .map(|s| s.trim_end_matches('/')),
        Some(repo.url().as_str())
    );
    assert_eq!(
        repository["signedBy"],
        serde_json::json!([repo.fingerprint()])
    );

    // 2. Nothing changed, no package updates: skipped, and the reason says both.
    let second = run_pipeline(&guard, &image, &dir);
    assert_eq!(second["status"], "skipped");
    let reason = second["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("nothing changed since execution")
            && reason.contains("no updates among"),
        "{reason}"
    );

    // 3. A newer version in the repository: listed, and the next run builds it.
    repo.publish(PACKAGE, "1.1-1");
    let out = builder(&guard, &image, &dir, &["images", "outdated", &first_image]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    let line: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(
        line,
        [PACKAGE, "1.0-1", "→", "1.1-1", apt_repo::SUITE],
        "{table}"
    );
    let out = builder(
        &guard,
        &image,
        &dir,
        &[
            "images",
            "outdated",
            &first_image,
            "--json",
            "--security-only",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["updates"], serde_json::json!([]));

    let third = run_pipeline(&guard, &image, &dir);
    assert_eq!(third["status"], "available", "package updates must build");
    let reason = third["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("package updates since execution")
            && reason.contains(&format!("{PACKAGE} 1.0-1 → 1.1-1")),
        "{reason}"
    );
    let third_image = third["image"].as_str().expect("image").to_string();
    assert_ne!(third_image, first_image);
    let m3 = manifest(&store, &third_image);
    assert_eq!(
        installed(&m3, PACKAGE).as_deref(),
        Some("1.1-1"),
        "the rebuild has the new version"
    );
    let changes = &m3["packageChanges"];
    assert_eq!(changes["since"], first_image.as_str(), "{changes:#}");
    let changed = changes["changed"].as_array().expect("changed");
    assert!(
        changed
            .iter()
            .any(|c| c["name"] == PACKAGE && c["from"] == "1.0-1" && c["to"] == "1.1-1"),
        "{changes:#}"
    );
    // The history says why it ran.
    let out = builder(
        &guard,
        &image,
        &dir,
        &["pipeline", "status", "e2e-patched", "--json"],
    );
    assert_eq!(out.status.code(), Some(0));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!("{PACKAGE} 1.0-1 → 1.1-1")),
        "{status}"
    );

    // 4. The Release file altered after it was signed: no answer, no build, a notification.
    repo.tamper();
    let out = builder(&guard, &image, &dir, &["images", "outdated", &third_image]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not check updates")
            && stderr.to_lowercase().contains("bad signature"),
        "{stderr}"
    );
    let fourth = run_pipeline(&guard, &image, &dir);
    assert_eq!(fourth["status"], "skipped");
    let reason = fourth["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("could not check updates")
            && reason.to_lowercase().contains("bad signature"),
        "{reason}"
    );
    assert!(fourth["image"].is_null(), "nothing was built: {fourth:#}");
    let notified = fs_err::read_to_string(&events).expect("events");
    let notified: Vec<serde_json::Value> = notified
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("event JSON"))
        .collect();
    let statuses: Vec<&str> = notified
        .iter()
        .filter_map(|e| e["status"].as_str())
        .collect();
    assert_eq!(
        statuses,
        ["available", "available", "skipped"],
        "two builds and the failed check notify; the quiet skip does not: {notified:#?}"
    );
    assert!(
        notified[2]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("could not check updates")),
        "{notified:#?}"
    );
}
