//! Distribution tier: push stored builds to a real OCI registry (Debian's `docker-registry` on
//! loopback, see tests/support/registry.rs) as an artifact and as a KubeVirt containerDisk,
//! pull them back, and break things on the way: a registry killed half way through a blob, a
//! wrong password, a tag-only pull, HTTPS spoken to a plain-HTTP registry. No VM is needed;
//! the registry binary is (scripts/install-deps installs it; without it these tests fail).

#[path = "support/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use builder::distribute::oci::{self, OciError, OciOptions, OciShape};
use builder::distribute::{Progress, Receipt};
use builder::recipe::Format;
use builder::recipe::OciReference;
use builder::recipe::Version;
use builder::store::manifest::{Artifact, Manifest};
use builder::store::{Store, StoredImage};
use registry::TestRegistry;
use sha2::{Digest, Sha256};

/// Credentials come from `$DOCKER_CONFIG/config.json`: every test uses one temp folder, set
/// once before any test reads the environment (so no test sees the machine's own logins).
#[allow(unsafe_code)] // `set_var`: unsafe since edition 2024
fn docker_config() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // In cargo's temp folder for tests (under target/), so nothing is left in /tmp.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("distribute_oci-docker-config");
        fs_err::create_dir_all(&dir).expect("create the docker config folder");
        fs_err::write(dir.join("config.json"), "{}").expect("empty docker config");
        // SAFETY: runs once, and every test calls this before it reads the environment or
        // starts a thread that could, so nothing reads the environment concurrently.
        unsafe {
            std::env::set_var("DOCKER_CONFIG", &dir);
            std::env::remove_var("REGISTRY_AUTH_FILE");
            std::env::remove_var("XDG_RUNTIME_DIR");
        }
        dir
    })
}

/// Write `config.json` atomically (other tests may be reading it).
fn write_docker_config(json: &serde_json::Value) {
    let dir = docker_config();
    let tmp = dir.join(format!("config.json.{}", std::process::id()));
    fs_err::write(&tmp, serde_json::to_vec(json).expect("json")).expect("write");
    fs_err::rename(&tmp, dir.join("config.json")).expect("rename");
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
        chunk_size: 1 << 20,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..OciOptions::default()
    }
}

fn qemu(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is missing ({e}): run scripts/install-deps"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stored build `name/1.0.0/1` whose qcow2 holds `mib` MiB of data (more than one upload
/// chunk of 1 MiB), with `SHA256SUMS` next to it as exports write it.
fn stored_image(store_dir: &Path, name: &str, mib: u32) -> StoredImage {
    let store = Store::open(store_dir).expect("store");
    let slot = store
        .allocate_build(name, &"1.0.0".parse::<Version>().expect("version"))
        .expect("allocate");
    let file = format!("{name}-1.0.0-1.qcow2");
    let disk = slot.dir().join(&file);
    let disk_s = disk.to_str().expect("utf-8 path");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", disk_s, "64M"]);
    // Two patterns, so every chunk differs from its neighbours.
    let half = mib / 2;
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -q -P 0xab 0 {half}M"),
            disk_s,
        ],
    );
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -q -P 0x5c {half}M {}M", mib - half),
            disk_s,
        ],
    );
    let sha = builder::digest::sha256_file(&disk, None)
        .expect("hash")
        .hex();
    fs_err::write(slot.dir().join("SHA256SUMS"), format!("{sha}  {file}\n")).expect("sums");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.outputs.push(Artifact {
        file,
        format: Format::Qcow2,
        size: fs_err::metadata(&disk).expect("size").len(),
        virtual_size: 64 << 20,
        sha256: sha,
    });
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit")
}

/// Records every transfer report; runs `hook` on each.
#[derive(Default)]
struct Recorder {
    transfers: Mutex<Vec<(String, u64)>>,
    #[allow(clippy::type_complexity)]
    hook: Option<Box<dyn Fn(&str, u64) + Send + Sync>>,
}

impl Recorder {
    fn with_hook(hook: impl Fn(&str, u64) + Send + Sync + 'static) -> Self {
        Self {
            hook: Some(Box::new(hook)),
            ..Self::default()
        }
    }
}

impl Progress for Recorder {
    fn transfer(&self, _target: &str, what: &str, done: u64, _total: Option<u64>) {
        self.transfers
            .lock()
            .expect("lock")
            .push((what.to_string(), done));
        if let Some(hook) = &self.hook {
            hook(what, done);
        }
    }
}

fn reference(registry: &TestRegistry, path: &str) -> OciReference {
    format!("{}/{path}", registry.host())
        .parse()
        .expect("reference")
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(fs_err::read(path).expect("read")))
}

/// GET from the registry's API without builder's client (what another tool would see):
/// the status and the body.
fn api_get(registry: &TestRegistry, path: &str, accept: &str) -> (u16, Vec<u8>) {
    runtime().block_on(async {
        let response = reqwest::Client::new()
            .get(format!("http://{}/v2/{path}", registry.host()))
            .header("accept", accept)
            .send()
            .await
            .expect("registry answers");
        let status = response.status().as_u16();
        (status, response.bytes().await.expect("body").to_vec())
    })
}

fn api_json(registry: &TestRegistry, path: &str, accept: &str) -> serde_json::Value {
    let (status, body) = api_get(registry, path, accept);
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("json")
}

fn api_bytes(registry: &TestRegistry, path: &str) -> Vec<u8> {
    let (status, body) = api_get(registry, path, "*/*");
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    body
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry that a progress hook can stop and restart (hence shared), its host and the
/// options to reach it; the docker config is set up first, as in every test.
fn stoppable_registry() -> (Arc<Mutex<TestRegistry>>, String, OciOptions) {
    docker_config();
    let registry = TestRegistry::start();
    let (host, opts) = (registry.host(), options(&registry));
    (Arc::new(Mutex::new(registry)), host, opts)
}

/// A temp folder holding a store with one build `name` of `mib` MiB (see `stored_image`).
fn temp_image(name: &str, mib: u32) -> (tempfile::TempDir, StoredImage) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let image = stored_image(&tmp.path().join("store"), name, mib);
    (tmp, image)
}

fn push(
    rt: &tokio::runtime::Runtime,
    image: &StoredImage,
    dest: &OciReference,
    shape: OciShape,
    opts: &OciOptions,
    progress: &Recorder,
) -> Result<Receipt, OciError> {
    rt.block_on(oci::push(image, dest, shape, opts, progress))
}

/// A push with the test options for `registry` and no progress hook.
fn push_plain(
    rt: &tokio::runtime::Runtime,
    image: &StoredImage,
    dest: &OciReference,
    shape: OciShape,
    registry: &TestRegistry,
) -> Result<Receipt, OciError> {
    push(
        rt,
        image,
        dest,
        shape,
        &options(registry),
        &Recorder::default(),
    )
}

fn pull(
    rt: &tokio::runtime::Runtime,
    pinned: &OciReference,
    opts: &OciOptions,
    cache: &Path,
) -> Result<oci::PulledDisk, OciError> {
    rt.block_on(oci::pull_disk(pinned, opts, cache, &Recorder::default()))
}

/// `host/repo@digest`: a reference pinned to a manifest digest.
fn pinned(host: &str, repo: &str, digest: &str) -> OciReference {
    format!("{host}/{repo}@{digest}").parse().expect("pinned")
}

#[test]
fn an_artifact_round_trips_with_equal_digests() {
    docker_config();
    let registry = TestRegistry::start();
    let (tmp, image) = temp_image("web", 3);
    let disk = image.disk.clone().expect("disk");
    let dest = reference(&registry, "images/web:1.0.0");
    let rt = runtime();
    let progress = Recorder::default();
    let receipt = push(
        &rt,
        &image,
        &dest,
        OciShape::Artifact,
        &options(&registry),
        &progress,
    )
    .expect("push");
    assert_eq!(receipt.kind, "oci");
    let manifest_digest = receipt.digests["manifest"].clone();
    assert_eq!(
        receipt.location,
        format!(
            "oci://{}/images/web:1.0.0@{manifest_digest}",
            registry.host()
        )
    );
    assert_eq!(receipt.digests["disk"], format!("sha256:{}", disk.sha256));
    // Chunked: the disk went up in several 1 MiB requests, reported one by one.
    let disk_reports = progress
        .transfers
        .lock()
        .expect("lock")
        .iter()
        .filter(|(what, _)| what.ends_with(".qcow2"))
        .count();
    assert!(
        disk_reports >= 4,
        "{disk_reports} progress reports for the disk"
    );

    // What any OCI client sees under the tag.
    let m = api_json(&registry, "images/web/manifests/1.0.0", OCI_MANIFEST);
    assert_eq!(m["artifactType"], oci::ARTIFACT_TYPE);
    assert_eq!(m["config"]["mediaType"], oci::EMPTY_CONFIG);
    assert_eq!(m["annotations"]["org.builder.image.ref"], "web/1.0.0/1");
    let layers = m["layers"].as_array().expect("layers");
    let titles: Vec<&str> = layers
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .expect("title")
        })
        .collect();
    assert_eq!(titles, ["web-1.0.0-1.qcow2", "manifest.json", "SHA256SUMS"]);
    assert_eq!(layers[0]["mediaType"], oci::DISK_QCOW2);
    assert_eq!(layers[0]["digest"], format!("sha256:{}", disk.sha256));
    let sums = api_bytes(
        &registry,
        &format!(
            "images/web/blobs/{}",
            layers[2]["digest"].as_str().expect("digest")
        ),
    );
    assert_eq!(
        sums,
        fs_err::read(image.dir.join("SHA256SUMS")).expect("sums")
    );

    // Pushing again sends nothing new (every blob is there) and gives the same manifest.
    let again = Recorder::default();
    let receipt2 = push(
        &rt,
        &image,
        &dest,
        OciShape::Artifact,
        &options(&registry),
        &again,
    )
    .expect("second push");
    assert_eq!(receipt2.digests, receipt.digests);
    assert!(
        again
            .transfers
            .lock()
            .expect("lock")
            .iter()
            .all(|(_, done)| *done > 0),
        "a blob was uploaded again from zero"
    );

    // Pull it back by digest into a cache.
    let cache = tmp.path().join("cache");
    let pinned = pinned(&registry.host(), "images/web", &manifest_digest);
    let pulled = pull(&rt, &pinned, &options(&registry), &cache).expect("pull");
    assert_eq!(pulled.sha256, disk.sha256);
    assert_eq!(pulled.manifest_digest, manifest_digest);
    assert_eq!(pulled.path, cache.join(format!("{}.qcow2", disk.sha256)));
    assert_eq!(sha256_hex(&pulled.path), disk.sha256);
    assert_eq!(
        fs_err::read(&pulled.path).expect("pulled"),
        fs_err::read(&disk.path).expect("original")
    );
    let leftovers: Vec<_> = fs_err::read_dir(&cache)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!pulled.from_cache);

    // A manifest digest names its content for ever: once pulled, the registry is not asked
    // again (here it is gone).
    let opts = options(&registry);
    drop(registry);
    let again = pull(&rt, &pinned, &opts, &cache).expect("pull from the cache");
    assert!(again.from_cache);
    assert_eq!((again.path, again.sha256), (pulled.path, pulled.sha256));
}

#[test]
fn a_container_disk_holds_the_disk_owned_by_qemu_read_only() {
    docker_config();
    let registry = TestRegistry::start();
    let (tmp, image) = temp_image("vm", 3);
    let disk = image.disk.clone().expect("disk");
    let dest = reference(&registry, "vms/vm:1.0.0");
    let rt = runtime();
    let receipt = push_plain(&rt, &image, &dest, OciShape::ContainerDisk, &registry).expect("push");
    assert_eq!(receipt.kind, "containerdisk");
    assert!(
        receipt.location.starts_with(&format!(
            "containerdisk://{}/vms/vm:1.0.0@sha256:",
            registry.host()
        )),
        "{}",
        receipt.location
    );

    let m = api_json(&registry, "vms/vm/manifests/1.0.0", OCI_MANIFEST);
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layers = m["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    let layer_digest = layers[0]["digest"].as_str().expect("digest").to_string();
    let config = api_json(
        &registry,
        &format!(
            "vms/vm/blobs/{}",
            m["config"]["digest"].as_str().expect("digest")
        ),
        "*/*",
    );
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["rootfs"]["diff_ids"][0], layer_digest.as_str());

    let tar_bytes = api_bytes(&registry, &format!("vms/vm/blobs/{layer_digest}"));
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&tar_bytes))),
        layer_digest
    );
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut files = Vec::new();
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        let h = entry.header().clone();
        let path = entry.path().expect("path").display().to_string();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut body).expect("body");
        files.push((
            path,
            h.uid().expect("uid"),
            h.gid().expect("gid"),
            h.mode().expect("mode"),
            hex::encode(Sha256::digest(&body)),
        ));
    }
    let disk_entry = files
        .iter()
        .find(|f| f.0 == "disk/vm-1.0.0-1.qcow2")
        .unwrap_or_else(|| panic!("no disk/vm-1.0.0-1.qcow2 in {files:?}"));
    assert_eq!(
        (disk_entry.1, disk_entry.2, disk_entry.3),
        (107, 107, 0o440)
    );
    assert_eq!(
        disk_entry.4, disk.sha256,
        "the layer holds the disk unchanged"
    );
    assert!(files.iter().any(|f| f.0 == "disk/"), "{files:?}");

    // A containerDisk works as a parent image too: the qcow2 comes out of the layer.
    let pinned = pinned(&registry.host(), "vms/vm", &receipt.digests["manifest"]);
    let cache = tmp.path().join("cache");
    let pulled = pull(&rt, &pinned, &options(&registry), &cache).expect("pull");
    assert_eq!(pulled.sha256, disk.sha256);
    assert_eq!(sha256_hex(&pulled.path), disk.sha256);
}

/// The registry dies half way through the disk blob and stays down: the push fails, the tag
/// does not exist; once the registry is back the same push succeeds.
#[test]
fn an_interrupted_push_leaves_no_tag_and_succeeds_when_retried() {
    let (registry, host, opts) = stoppable_registry();
    let (_tmp, image) = temp_image("web", 6);
    let dest: OciReference = format!("{host}/images/web:1.0.0").parse().expect("ref");
    let rt = runtime();
    let killer = {
        let registry = registry.clone();
        Recorder::with_hook(move |what: &str, done: u64| {
            if what.ends_with(".qcow2") && done >= 2 << 20 {
                registry.lock().expect("lock").stop();
            }
        })
    };
    let opts_few = OciOptions {
        attempts: 2,
        ..opts.clone()
    };
    let e = push(&rt, &image, &dest, OciShape::Artifact, &opts_few, &killer)
        .expect_err("the registry went away");
    assert!(matches!(e, OciError::GaveUp { .. }), "{e}");
    assert!(
        e.hint().is_some_and(|h| h.contains("again")),
        "{:?}",
        e.hint()
    );

    registry.lock().expect("lock").restart();
    let (tag_status, _) = api_get(
        &registry.lock().expect("lock"),
        "images/web/manifests/1.0.0",
        OCI_MANIFEST,
    );
    assert_eq!(tag_status, 404, "a failed push left a tag");

    let receipt = push(
        &rt,
        &image,
        &dest,
        OciShape::Artifact,
        &opts,
        &Recorder::default(),
    )
    .expect("push after restart");
    let r = registry.lock().expect("lock");
    let m = api_json(&r, "images/web/manifests/1.0.0", OCI_MANIFEST);
    assert_eq!(
        m["layers"][0]["digest"],
        format!("sha256:{}", image.disk.as_ref().expect("disk").sha256)
    );
    assert!(receipt.location.ends_with(&receipt.digests["manifest"]));
}

/// The registry restarts while the disk is half uploaded: the push waits, asks the registry
/// how much of the upload session it holds, and carries on from there (never from zero).
#[test]
fn a_push_resumes_its_upload_session_after_the_registry_restarts() {
    let (registry, host, opts) = stoppable_registry();
    let (tmp, image) = temp_image("web", 6);
    let dest: OciReference = format!("{host}/images/web:2").parse().expect("ref");
    let kill_at = 3u64 << 20;
    let killed = Arc::new(Mutex::new(false));
    let progress = {
        let registry = registry.clone();
        let killed = killed.clone();
        Recorder::with_hook(move |what: &str, done: u64| {
            let mut k = killed.lock().expect("lock");
            if what.ends_with(".qcow2") && done >= kill_at && !*k {
                *k = true;
                registry.lock().expect("lock").stop();
                // Back after a while: the push's first retry fails, a later one resumes.
                let registry = registry.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    registry.lock().expect("lock").restart();
                });
            }
        })
    };
    let opts = OciOptions {
        attempts: 8,
        ..opts
    };
    let receipt = push(
        &runtime(),
        &image,
        &dest,
        OciShape::Artifact,
        &opts,
        &progress,
    )
    .expect("push");
    assert!(
        *killed.lock().expect("lock"),
        "the registry was never stopped"
    );
    let reports = progress.transfers.lock().expect("lock").clone();
    let after_kill: Vec<u64> = reports
        .iter()
        .filter(|(what, _)| what.ends_with(".qcow2"))
        .map(|(_, done)| *done)
        .skip_while(|done| *done < kill_at)
        .collect();
    assert!(
        after_kill.iter().all(|done| *done >= kill_at),
        "the upload started over after the restart: {after_kill:?}"
    );
    let pinned = pinned(&host, "images/web", &receipt.digests["manifest"]);
    let pulled = pull(&runtime(), &pinned, &opts, &tmp.path().join("cache")).expect("pull");
    assert_eq!(pulled.sha256, image.disk.as_ref().expect("disk").sha256);
}

/// htpasswd basic auth, credentials from `$DOCKER_CONFIG/config.json`: a wrong password is
/// refused before anything is uploaded, with the file named; the right one works.
#[test]
fn registry_credentials_come_from_the_docker_config() {
    let config_dir = docker_config();
    let registry = TestRegistry::start_with_auth("builder", "s3cret-pass");
    let (tmp, image) = temp_image("web", 2);
    let dest = reference(&registry, "private/web:1.0.0");
    let rt = runtime();
    use base64::Engine as _;
    // Log `builder` in with `password` in the docker config, then push.
    let push_as = |password: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("builder:{password}"));
        write_docker_config(&serde_json::json!({
            "auths": { registry.host(): { "auth": auth } }
        }));
        push_plain(&rt, &image, &dest, OciShape::Artifact, &registry)
    };

    // No credential at all.
    let e = push_plain(&rt, &image, &dest, OciShape::Artifact, &registry)
        .expect_err("anonymous push to an htpasswd registry");
    assert!(matches!(e, OciError::AuthFailed { .. }), "{e}");

    let e = push_as("wrong").expect_err("wrong password");
    let message = e.to_string();
    assert!(matches!(e, OciError::AuthFailed { .. }), "{message}");
    assert!(
        message.contains(&config_dir.join("config.json").display().to_string())
            && message.contains("`builder`"),
        "the error names the user and the file: {message}"
    );
    assert!(
        e.hint().is_some_and(|h| h.contains("docker login")),
        "{:?}",
        e.hint()
    );

    let receipt = push_as("s3cret-pass").expect("push with the right password");
    let pinned = pinned(
        &registry.host(),
        "private/web",
        &receipt.digests["manifest"],
    );
    let pulled = pull(&rt, &pinned, &options(&registry), &tmp.path().join("cache"))
        .expect("pull with the right password");
    assert_eq!(pulled.sha256, image.disk.as_ref().expect("disk").sha256);
}

#[test]
fn a_tag_only_pull_is_refused_with_the_digest_to_pin() {
    docker_config();
    let registry = TestRegistry::start();
    let (tmp, image) = temp_image("base", 2);
    let rt = runtime();
    let receipt = push_plain(
        &rt,
        &image,
        &reference(&registry, "base:1"),
        OciShape::Artifact,
        &registry,
    )
    .expect("push");
    let e = pull(
        &rt,
        &reference(&registry, "base:1"),
        &options(&registry),
        &tmp.path().join("cache"),
    )
    .expect_err("tag only");
    assert!(matches!(e, OciError::NotPinned { .. }), "{e}");
    let hint = e.hint().expect("hint");
    assert!(
        hint.contains(&format!(
            "oci://{}/base:1@{}",
            registry.host(),
            receipt.digests["manifest"]
        )),
        "{hint}"
    );
    assert!(
        !tmp.path().join("cache").exists()
            || fs_err::read_dir(tmp.path().join("cache"))
                .expect("ls")
                .next()
                .is_none()
    );
}

#[test]
fn https_to_a_plain_http_registry_points_at_the_insecure_list() {
    docker_config();
    let registry = TestRegistry::start();
    let (_tmp, image) = temp_image("web", 2);
    let opts = OciOptions {
        plain_http: Vec::new(),
        ..options(&registry)
    };
    let e = push(
        &runtime(),
        &image,
        &reference(&registry, "web:1"),
        OciShape::Artifact,
        &opts,
        &Recorder::default(),
    )
    .expect_err("TLS to a plain registry");
    assert!(matches!(e, OciError::PlainHttpRegistry { .. }), "{e}");
    let hint = e.hint().expect("hint");
    assert!(
        hint.contains(&format!("BUILDER_INSECURE_REGISTRIES={}", registry.host())),
        "{hint}"
    );
}

/// Upload `bytes` as a blob with plain requests (as another tool would); returns its digest.
async fn raw_blob(client: &reqwest::Client, host: &str, repo: &str, bytes: Vec<u8>) -> String {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let url = registry::start_upload(client, host, repo).await;
    let response = client
        .put(format!("{url}&digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .expect("PUT blob");
    assert_eq!(response.status().as_u16(), 201);
    digest
}

/// containerDisks built by docker or podman have a gzip layer (and `./disk/…` paths): the
/// qcow2 comes out of it all the same.
#[test]
fn a_gzip_container_disk_built_elsewhere_can_be_a_parent() {
    docker_config();
    let registry = TestRegistry::start();
    let (tmp, image) = temp_image("ext", 2);
    let disk = image.disk.clone().expect("disk");
    let mut tar_bytes = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut tar_bytes);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_cksum();
        builder
            .append_data(&mut header, "./disk/", std::io::empty())
            .expect("dir");
        let body = fs_err::read(&disk.path).expect("disk");
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o440);
        header.set_uid(107);
        header.set_gid(107);
        header.set_size(body.len() as u64);
        header.set_cksum();
        builder
            .append_data(&mut header, "./disk/disk.img", &body[..])
            .expect("file");
        builder.finish().expect("tar");
    }
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar_bytes)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar_bytes).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let gz_len = gz.len();
    let host = registry.host();
    let manifest_digest = runtime().block_on(async {
        let client = reqwest::Client::new();
        let layer = raw_blob(&client, &host, "ext/vm", gz).await;
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]}
        }))
        .expect("json");
        let config_len = config.len();
        let config = raw_blob(&client, &host, "ext/vm", config).await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config, "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer, "size": gz_len}]
        }))
        .expect("json");
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
        let response = client
            .put(format!("http://{host}/v2/ext/vm/manifests/latest"))
            .header("content-type", OCI_MANIFEST)
            .body(manifest)
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(response.status().as_u16(), 201);
        digest
    });
    let pinned = pinned(&host, "ext/vm", &manifest_digest);
    let pulled = pull(
        &runtime(),
        &pinned,
        &options(&registry),
        &tmp.path().join("cache"),
    )
    .expect("pull");
    assert_eq!(pulled.sha256, disk.sha256);
    assert_eq!(sha256_hex(&pulled.path), disk.sha256);
}
