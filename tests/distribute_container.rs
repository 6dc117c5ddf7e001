//! Distribution tier for container builds: a small image made with real buildah (in a private
//! storage under a temp folder: nothing lands in the host's buildah storage), stored as a
//! container build, pushed to a real registry (Debian's `docker-registry` on loopback) and
//! read back by builder and by skopeo with the same digests, written as `oci-archive` and
//! `docker-archive` files that buildah loads. Needs buildah, skopeo and docker-registry
//! (scripts/install-deps); without them these tests fail and say so.

#[path = "support/registry.rs"]
#[allow(dead_code)] // shared with tests/distribute_oci.rs, which uses all of it
mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use assert_cmd::Command as Cli;
use builder::distribute::NoProgress;
use builder::distribute::oci::{self, OciError, OciOptions};
use builder::recipe::{OciReference, Version};
use builder::store::layout::{self, Descriptor, Index, Layout, media};
use builder::store::{ImageKind, Manifest, Store, StoredImage};
use registry::TestRegistry;

/// Credentials come from `$DOCKER_CONFIG/config.json`: an empty one, so no test sees the
/// machine's own logins.
#[allow(unsafe_code)] // `set_var`: unsafe since edition 2024
fn docker_config() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distribute_container-docker");
        fs_err::create_dir_all(&dir).expect("create the docker config folder");
        fs_err::write(dir.join("config.json"), "{}").expect("empty docker config");
        // SAFETY: runs once, before any test reads the environment or starts a thread.
        unsafe {
            std::env::set_var("DOCKER_CONFIG", &dir);
            std::env::remove_var("REGISTRY_AUTH_FILE");
        }
        dir
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn options(registry: &TestRegistry) -> OciOptions {
    OciOptions {
        plain_http: vec![registry.host()],
        ..OciOptions::default()
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/install-deps installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// buildah with its own storage in a temp folder, emptied and removed on drop.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        let out = run(self.cmd().args(args));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// An image from scratch holding `/hello.txt` and an ENV, pushed as an OCI layout to
    /// `dest` (tag `latest`).
    fn small_image(&self, dest: &Path) {
        let c = self.run(&["from", "scratch"]);
        let file = self.dir.path().join("hello.txt");
        fs_err::write(&file, "hello from a container build\n").expect("file");
        self.run(&["copy", &c, &file.display().to_string(), "/hello.txt"]);
        self.run(&["config", "--env", "GREETING=hello", &c]);
        self.run(&["commit", "-q", &c, "small"]);
        self.run(&["rm", &c]);
        self.run(&[
            "push",
            "-q",
            "small",
            &format!("oci:{}:latest", dest.display()),
        ]);
    }

    /// The image id (the config digest) of the image `transport` names, once pulled.
    fn pulled_id(&self, transport: &str) -> String {
        let id = self.run(&["pull", "-q", transport]);
        format!("sha256:{}", id.trim_start_matches("sha256:"))
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all"]).output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
    }
}

/// A container build in `store` holding buildah's small image.
fn stored_container(store: &Store, buildah: &Buildah, name: &str) -> StoredImage {
    let slot = store
        .allocate_build(name, &Version::new(1, 0, 0))
        .expect("slot");
    buildah.small_image(&slot.layout_dir());
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.kind = ImageKind::Container;
    m.container = Some(slot.container_image().expect("the layout's facts"));
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit")
}

fn builder(store: &Path) -> Cli {
    let mut cmd = Cli::cargo_bin("builder").expect("the builder binary");
    cmd.env("BUILDER_STORE", store)
        .env("NO_COLOR", "1")
        .env("DOCKER_CONFIG", docker_config());
    cmd
}

#[test]
fn a_container_build_is_pushed_and_pulled_back_with_the_same_digests() {
    docker_config();
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let buildah = Buildah::new();
    let image = stored_container(&store, &buildah, "tools");
    let facts = image.manifest.container.clone().expect("container");
    let registry = TestRegistry::start();

    // `images list` and `show` say what it is.
    let out = builder(store.root())
        .args(["images", "list"])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(
        stdout.lines().next().unwrap_or("").contains("KIND"),
        "{stdout}"
    );
    assert!(stdout.contains("container"), "{stdout}");
    let out = builder(store.root())
        .args(["images", "show", "tools", "--verify"])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(stdout.contains(&facts.manifest_digest), "{stdout}");

    // Pushed from the command line, as a user does.
    let host = registry.host();
    let out = builder(store.root())
        .args([
            "distribute",
            "tools",
            "--to",
            &format!("oci://{host}/tools/small:1.0.0"),
            "--plain-http",
            &host,
        ])
        .assert()
        .success();
    let location = String::from_utf8_lossy(&out.get_output().stdout)
        .trim()
        .to_string();
    assert_eq!(
        location,
        format!("oci://{host}/tools/small:1.0.0@{}", facts.manifest_digest)
    );
    let receipts = store
        .resolve(&"tools".parse().expect("ref"))
        .expect("image")
        .receipts();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].digests["manifest"], facts.manifest_digest);

    // skopeo sees the same image.
    let out = run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{host}/tools/small:1.0.0"),
    ]));
    assert_eq!(
        layout::digest_of(&out.stdout),
        facts.manifest_digest,
        "the registry holds the manifest's bytes unchanged"
    );

    // builder pulls it back by digest into a layout with the same blobs.
    let rt = runtime();
    let pinned: OciReference = format!("{host}/tools/small:1.0.0@{}", facts.manifest_digest)
        .parse()
        .expect("reference");
    let dest = tmp.path().join("pulled");
    let pulled = rt
        .block_on(oci::pull_layout(
            &pinned,
            &dest,
            &options(&registry),
            &NoProgress,
        ))
        .expect("pull");
    assert!(!pulled.from_cache);
    assert_eq!(pulled.image.manifest_digest, facts.manifest_digest);
    assert_eq!(pulled.image.config_digest, facts.config_digest);
    assert_eq!(pulled.image.size, facts.size);
    Layout::open(&dest)
        .expect("a layout")
        .verify(None)
        .expect("every blob");
    // Again: the layout is there, the registry is not asked.
    drop(registry);
    let again = rt
        .block_on(oci::pull_layout(
            &pinned,
            &dest,
            &OciOptions::default(),
            &NoProgress,
        ))
        .expect("from the layout");
    assert!(again.from_cache);
    // Nothing but the layout was left beside it.
    let names: Vec<String> = fs_err::read_dir(tmp.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");
}

#[test]
fn an_index_is_resolved_to_linux_amd64_and_a_tag_alone_is_refused() {
    docker_config();
    let tmp = tempfile::tempdir().expect("temp dir");
    let buildah = Buildah::new();
    let source = tmp.path().join("source");
    buildah.small_image(&source);
    let layout = Layout::open(&source).expect("layout");
    let image = layout.image(None).expect("image");
    let registry = TestRegistry::start();
    let rt = runtime();
    let o = options(&registry);
    let host = registry.host();
    let dest: OciReference = format!("{host}/multi/small:amd64").parse().expect("ref");
    let pushed = rt
        .block_on(oci::push_layout(&layout, &dest, &o, &NoProgress))
        .expect("push");
    assert_eq!(pushed.manifest_digest, image.descriptor.digest);

    // An index listing it for linux/amd64, after an arm64 image.
    let mut amd64 = image.descriptor.clone();
    amd64.annotations.clear();
    amd64.platform = Some(layout::Platform {
        architecture: "amd64".into(),
        os: "linux".into(),
        variant: None,
    });
    // The arm64 image: the same layer, a config that says arm64 (the registry wants every
    // manifest an index lists to be there).
    let arm = Layout::create(tmp.path().join("arm")).expect("layout");
    let layer = &image.manifest.layers[0];
    arm.write_blob(&fs_err::read(layout.blob_path(&layer.digest).expect("path")).expect("read"))
        .expect("layer");
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "arm64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": image.config.rootfs.diff_ids},
    }))
    .expect("json");
    let config_digest = arm.write_blob(&config).expect("config");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [layer],
    }))
    .expect("json");
    let arm_digest = arm.write_blob(&manifest).expect("manifest");
    arm.write_index(&Index::of(vec![Descriptor::new(
        media::OCI_MANIFEST,
        &arm_digest,
        manifest.len() as u64,
    )]))
    .expect("index");
    let arm_dest: OciReference = format!("{host}/multi/small:arm64").parse().expect("ref");
    rt.block_on(oci::push_layout(&arm, &arm_dest, &o, &NoProgress))
        .expect("push arm64");
    let mut arm64 = Descriptor::new(media::OCI_MANIFEST, &arm_digest, manifest.len() as u64);
    arm64.platform = Some(layout::Platform {
        architecture: "arm64".into(),
        os: "linux".into(),
        variant: None,
    });
    let index = serde_json::to_vec(&Index::of(vec![arm64, amd64])).expect("json");
    let index_digest = layout::digest_of(&index);
    rt.block_on(async {
        let response = reqwest::Client::new()
            .put(format!("http://{host}/v2/multi/small/manifests/multi"))
            .header("content-type", media::OCI_INDEX)
            .body(index.clone())
            .send()
            .await
            .expect("registry answers");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "{status}: {body}");
    });
    let pinned: OciReference = format!("{host}/multi/small:multi@{index_digest}")
        .parse()
        .expect("ref");
    let pulled = rt
        .block_on(oci::pull_layout(
            &pinned,
            &tmp.path().join("pulled"),
            &o,
            &NoProgress,
        ))
        .expect("pull");
    assert_eq!(pulled.image.manifest_digest, image.descriptor.digest);
    assert_eq!(pulled.image.architecture, "amd64");

    let tag_only: OciReference = format!("{host}/multi/small:amd64").parse().expect("ref");
    let e = rt
        .block_on(oci::pull_layout(
            &tag_only,
            &tmp.path().join("x"),
            &o,
            &NoProgress,
        ))
        .expect_err("a tag alone");
    match &e {
        OciError::NotPinned { current, .. } => {
            assert_eq!(current.as_deref(), Some(image.descriptor.digest.as_str()));
        }
        other => panic!("{other:?}"),
    }
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn archives_in_a_directory_load_in_buildah_and_machine_only_targets_are_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let buildah = Buildah::new();
    let image = stored_container(&store, &buildah, "tools");
    let facts = image.manifest.container.clone().expect("container");
    let out = tmp.path().join("out");

    let sent = builder(store.root())
        .args([
            "distribute",
            "tools/1.0.0/1",
            "--to",
            &format!("dir:{}", out.display()),
            "--format",
            "oci-archive",
            "--format",
            "docker-archive",
        ])
        .assert()
        .success();
    let folder = PathBuf::from(
        String::from_utf8_lossy(&sent.get_output().stdout)
            .trim()
            .to_string(),
    );
    assert_eq!(folder, out.join("tools-1.0.0-1"));
    let mut names: Vec<String> = fs_err::read_dir(&folder)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "manifest.json",
            "tools-1.0.0-1.docker-archive.tar",
            "tools-1.0.0-1.oci-archive.tar",
        ]
    );
    let sums = run_in(
        &folder,
        Command::new("sha256sum").args(["-c", "SHA256SUMS"]),
    );
    assert!(sums.contains("OK"), "{sums}");

    // buildah loads both; the image is the same (its id is the config digest).
    let reader = Buildah::new();
    for file in [
        "tools-1.0.0-1.oci-archive.tar",
        "tools-1.0.0-1.docker-archive.tar",
    ] {
        let transport = if file.contains("oci-archive") {
            "oci-archive"
        } else {
            "docker-archive"
        };
        let id = reader.pulled_id(&format!("{transport}:{}", folder.join(file).display()));
        assert_eq!(id, facts.config_digest, "{file}");
    }
    // The oci-archive keeps the manifest's digest.
    let out_layout = tmp.path().join("from-archive");
    run(Command::new("skopeo").args([
        "copy",
        &format!(
            "oci-archive:{}",
            folder.join("tools-1.0.0-1.oci-archive.tar").display()
        ),
        &format!("oci:{}:x", out_layout.display()),
    ]));
    assert_eq!(
        Layout::open(&out_layout)
            .expect("layout")
            .image(None)
            .expect("image")
            .descriptor
            .digest,
        facts.manifest_digest
    );

    // A target for disks only: refused before anything is written, with what to use.
    let out = builder(store.root())
        .args([
            "distribute",
            "tools",
            "--to",
            &format!("vagrant:{}/t.box", tmp.path().display()),
        ])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("is a container build"), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    builder(store.root())
        .args([
            "distribute",
            "tools",
            "--to",
            &format!("dir:{}", tmp.path().join("x").display()),
            "--format",
            "qcow2",
        ])
        .assert()
        .code(2);
    assert!(!tmp.path().join("x").exists());
    assert_eq!(image.kind(), ImageKind::Container);
}

fn run_in(dir: &Path, cmd: &mut Command) -> String {
    let out = run(cmd.current_dir(dir));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_container_image_is_pushed_and_pulled_with_the_docker_config_credential() {
    let config_dir = docker_config();
    let tmp = tempfile::tempdir().expect("temp dir");
    let buildah = Buildah::new();
    let source = tmp.path().join("source");
    buildah.small_image(&source);
    let layout = Layout::open(&source).expect("layout");
    let registry = TestRegistry::start_with_auth("builder", "s3cret-pass");
    let rt = runtime();
    let o = options(&registry);
    let dest: OciReference = format!("{}/private/small:1", registry.host())
        .parse()
        .expect("ref");

    let e = rt
        .block_on(oci::push_layout(&layout, &dest, &o, &NoProgress))
        .expect_err("anonymous push to an htpasswd registry");
    assert!(matches!(e, OciError::AuthFailed { .. }), "{e}");

    // Logged in (for this registry only: the other tests' registries stay anonymous).
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("builder:s3cret-pass");
    let config = serde_json::json!({ "auths": { registry.host(): { "auth": auth } } });
    let tmp_config = config_dir.join(format!("config.json.{}", std::process::id()));
    fs_err::write(&tmp_config, serde_json::to_vec(&config).expect("json")).expect("write");
    fs_err::rename(&tmp_config, config_dir.join("config.json")).expect("rename");
    let pushed = rt
        .block_on(oci::push_layout(&layout, &dest, &o, &NoProgress))
        .expect("push with the credential");
    let pinned: OciReference = format!(
        "{}/private/small:1@{}",
        registry.host(),
        pushed.manifest_digest
    )
    .parse()
    .expect("ref");
    let pulled = rt
        .block_on(oci::pull_layout(
            &pinned,
            &tmp.path().join("pulled"),
            &o,
            &NoProgress,
        ))
        .expect("pull with the credential");
    assert_eq!(pulled.image.manifest_digest, pushed.manifest_digest);
}
