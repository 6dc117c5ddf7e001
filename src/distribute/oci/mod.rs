//! OCI registries: push a stored image as an OCI artifact or as a KubeVirt containerDisk, and
//! pull a pushed disk back into the parent-image cache (`parentImage: oci://…`); push and pull
//! container images to and from OCI image layouts ([`push_layout`], [`pull_layout`]); share the
//! layer cache through a repository ([`layers`]). Owns the image shapes and the registry
//! protocol (the OCI types themselves live in [`crate::store::layout`]); it never builds or
//! converts a disk.
//!
//! **Artifact** (`oci://host/repo:tag`): an OCI 1.1 image manifest with
//! `artifactType: application/vnd.builder.disk.v1`, the empty config
//! (`application/vnd.oci.empty.v1+json`, `{}`) and three layers, each titled with its file
//! name (`org.opencontainers.image.title`):
//!
//! | layer | media type |
//! | --- | --- |
//! | the disk | `application/vnd.builder.disk.qcow2` (or `.raw`) |
//! | `manifest.json` | `application/vnd.builder.manifest.v1+json` |
//! | `SHA256SUMS` | `application/vnd.builder.sha256sums` |
//!
//! `oras pull` fetches such an artifact as files. The manifest's annotations carry
//! `org.opencontainers.image.{created,version,title}`, `org.builder.image.ref`
//! (`name/x.y.z/n`) and `org.builder.build-id`.
//!
//! **containerDisk** (`containerdisk://host/repo:tag`): a plain image KubeVirt boots from: config
//! `application/vnd.oci.image.config.v1+json` (amd64, linux, `rootfs.diff_ids`) and one
//! uncompressed tar layer holding `disk/` and `disk/<file>.qcow2`, owned 107:107, mode 0440.
//! The tar is streamed from the stored disk (its headers are made in memory); nothing is copied.
//!
//! **Pushing** uploads every blob in chunks (progress per chunk), skips blobs the registry has
//! (HEAD), resumes an interrupted upload session where the registry says it stopped, retries
//! transient failures with backoff, checks each blob's digest and size with HEAD, and only
//! then writes the manifest under the tag: a failed push never leaves a half image there.
//!
//! **Pulling** needs a digest-pinned reference; it takes the disk layer of an artifact, or the
//! qcow2 inside a containerDisk (a plain or gzip tar layer, as builder, docker or podman make
//! them), into `cache/base/<sha256>.qcow2` (`.part` first, layer digest verified, then
//! renamed).

mod auth;
mod blob;
mod image;
pub mod layers;
mod registry;

pub use image::{PulledLayout, PushedImage, pull_layout, push_container, push_layout};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_client::RegistryOperation;
use sha2::{Digest, Sha256};

use self::blob::BlobSource;
use self::registry::{Descriptor, Failure, Registry};
use crate::diagnostic::error_chain;
use crate::distribute::{Progress, Receipt};
use crate::export::SUMS_FILE;
use crate::recipe::Format;
use crate::recipe::{OciReference, OciReferenceError};
use crate::store::StoredImage;
// The OCI shapes have one home, the store's layouts; `Descriptor` here is a blob the registry
// holds (`registry::Descriptor`).
use crate::store::layout::media::{
    DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, DOCKER_LIST, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP,
    OCI_LAYER_TAR, OCI_MANIFEST,
};
use crate::store::layout::{
    Descriptor as OciDescriptor, ImageManifest, TITLE, digest_hex, digest_of as sha256_of,
};
use crate::store::manifest::MANIFEST_FILE;

/// `artifactType` of a builder disk artifact.
pub const ARTIFACT_TYPE: &str = "application/vnd.builder.disk.v1";
/// Media type of the disk layer of an artifact (qcow2).
pub const DISK_QCOW2: &str = "application/vnd.builder.disk.qcow2";
/// Media type of the disk layer of an artifact (raw).
pub const DISK_RAW: &str = "application/vnd.builder.disk.raw";
/// Media type of the `manifest.json` layer of an artifact.
pub const BUILD_MANIFEST: &str = "application/vnd.builder.manifest.v1+json";
/// Media type of the `SHA256SUMS` layer of an artifact.
pub const SHA256SUMS: &str = "application/vnd.builder.sha256sums";
/// The OCI empty descriptor's media type (config of an artifact).
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
/// Environment variable: registries (`host[:port]`, comma-separated) spoken to over plain HTTP.
pub const INSECURE_ENV: &str = "BUILDER_INSECURE_REGISTRIES";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    BadReference(#[from] OciReferenceError),
    /// A credential file or helper could not be used.
    #[error("could not read the credential for {registry} from {}: {message}", file.display())]
    Credentials {
        file: PathBuf,
        registry: String,
        message: String,
    },
    /// The registry refused the credential (or its absence).
    #[error("{registry} refused the credential ({origin})")]
    AuthFailed { registry: String, origin: String },
    #[error("cannot reach the registry {registry}: {cause}")]
    Unreachable { registry: String, cause: String },
    #[error(
        "{registry} does not speak HTTPS (it answered the TLS handshake with plain HTTP): {cause}"
    )]
    PlainHttpRegistry { registry: String, cause: String },
    #[error("{registry} could not {action}: HTTP {status}: {message}")]
    Registry {
        registry: String,
        action: String,
        status: u16,
        message: String,
    },
    #[error("{registry}: could not {action} after {attempts} attempt(s): {cause}")]
    GaveUp {
        registry: String,
        action: String,
        attempts: u32,
        cause: String,
    },
    #[error("{what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("after uploading {what}, {registry} does not hold {digest} with {expected} bytes (it reports {})", found.map_or("no such blob".to_string(), |n| format!("{n} bytes")))]
    NotVerified {
        registry: String,
        what: String,
        digest: String,
        expected: u64,
        found: Option<u64>,
    },
    #[error("`{reference}` names a tag, not a digest: a parent image must be pinned")]
    NotPinned {
        reference: String,
        /// The digest the tag points to now, if the registry could be asked.
        current: Option<String>,
    },
    #[error("a push destination needs a tag (`{reference}:<tag>`), not a digest")]
    NoTag { reference: String },
    #[error("{reference} is not in the registry")]
    NotFound { reference: String },
    #[error("{reference} holds no disk: {reason}")]
    NoDisk { reference: String, reason: String },
    #[error("{image} has no qcow2 or raw output to push")]
    NothingToPush { image: String },
    #[error("{reference} holds no container image: {reason}")]
    NoImage { reference: String, reason: String },
    /// A container image's OCI image layout could not be read or written.
    #[error(transparent)]
    Layout(Box<crate::store::LayoutError>),
    #[error(transparent)]
    Store(Box<crate::store::StoreError>),
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("could not read {}: the file got shorter while it was being uploaded", path.display())]
    Shrunk { path: PathBuf },
    #[error("an upload or download task stopped unexpectedly: {0}")]
    Task(String),
}

impl OciError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            OciError::AuthFailed { registry, .. } => Some(format!(
                "log in with `docker login {registry}` or `podman login {registry}` (builder reads \
                 $DOCKER_CONFIG/config.json or ~/.docker/config.json, its credHelpers and \
                 credsStore, then podman's auth.json)"
            )),
            OciError::Credentials { .. } => Some(
                "fix the file, or check that the docker-credential-* helper it names is installed"
                    .into(),
            ),
            OciError::PlainHttpRegistry { registry, .. } => Some(format!(
                "if {registry} is meant to be used without TLS, allow it: \
                 {INSECURE_ENV}={registry}"
            )),
            OciError::Unreachable { registry, .. } => Some(format!(
                "check the host and port of {registry} and that the registry is running"
            )),
            OciError::GaveUp { .. } => Some(
                "run the same command again: blobs already in the registry are not sent again"
                    .into(),
            ),
            OciError::NotPinned {
                reference,
                current: Some(digest),
            } => Some(format!("pin it: `oci://{reference}@{digest}`")),
            OciError::NotPinned { reference, .. } => Some(format!(
                "pin it with the manifest digest the push printed: `oci://{reference}@sha256:…`"
            )),
            OciError::BadReference(e) => e.hint(),
            _ => None,
        }
    }
}

/// How to talk to registries.
#[derive(Debug, Clone)]
pub struct OciOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP; every other one over HTTPS.
    /// [`OciOptions::from_env`] fills it from `$BUILDER_INSECURE_REGISTRIES`.
    pub plain_http: Vec<String>,
    /// Attempts per request or blob, the first included. Default 5.
    pub attempts: u32,
    /// Wait before the second attempt; doubled each time. Default 1 s.
    pub first_backoff: Duration,
    /// Longest wait between attempts. Default 30 s.
    pub max_backoff: Duration,
    /// Bytes per upload request (PATCH) of a chunked upload. Default 64 MiB.
    pub chunk_size: usize,
    /// Default 30 s.
    pub connect_timeout: Duration,
    /// Give up on a connection that sends nothing for this long. Default 120 s.
    pub read_timeout: Duration,
}

impl Default for OciOptions {
    fn default() -> Self {
        Self {
            plain_http: Vec::new(),
            attempts: 5,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            chunk_size: 64 << 20,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
        }
    }
}

impl OciOptions {
    /// The defaults, with `plain_http` from `$BUILDER_INSECURE_REGISTRIES` (comma-separated
    /// `host[:port]`). Add the registries the CLI or recipe names to `plain_http`.
    pub fn from_env() -> Self {
        let plain_http = std::env::var(INSECURE_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        Self {
            plain_http,
            ..Self::default()
        }
    }

    fn is_plain_http(&self, registry: &str) -> bool {
        self.plain_http.iter().any(|h| h == registry)
    }
}

/// The shape a disk is pushed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OciShape {
    /// An OCI artifact of type [`ARTIFACT_TYPE`] (`oci://`).
    Artifact,
    /// A KubeVirt containerDisk image (`containerdisk://`).
    ContainerDisk,
}

impl OciShape {
    /// The receipt kind and URL scheme: `oci` or `containerdisk`.
    pub fn kind(self) -> &'static str {
        match self {
            OciShape::Artifact => "oci",
            OciShape::ContainerDisk => "containerdisk",
        }
    }
}

/// A disk pulled into the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledDisk {
    /// `<cache_dir>/<sha256>.qcow2`.
    pub path: PathBuf,
    /// sha256 of the qcow2 file (64 hex digits, no prefix).
    pub sha256: String,
    /// `sha256:<hex>` of the manifest it came from.
    pub manifest_digest: String,
    /// Served from the cache by the manifest's memo: the registry was not asked (the disk's
    /// digest was checked when it was first pulled; its file is named by it).
    pub from_cache: bool,
}

fn descriptor(media_type: &str, d: &Descriptor, title: Option<&str>) -> OciDescriptor {
    let described = OciDescriptor::new(media_type, &d.digest, d.size);
    match title {
        Some(t) => described.titled(t),
        None => described,
    }
}

/// Upload the empty config of an artifact (`{}`; the registry usually has it already).
async fn empty_config(
    registry: &Registry,
    target: &str,
    progress: &dyn Progress,
) -> Result<OciDescriptor, OciError> {
    let empty = b"{}".to_vec();
    let known = sha256_of(&empty);
    let c = registry
        .upload(
            Arc::new(BlobSource::bytes(empty)),
            Some(&known),
            target,
            "config",
            progress,
        )
        .await?;
    Ok(descriptor(EMPTY_CONFIG, &c, None))
}

/// Push `image`'s disk to `dest` (which must name a tag) in `shape`. Blobs first, each
/// verified; the manifest (and so the tag) last.
pub async fn push(
    image: &StoredImage,
    dest: &OciReference,
    shape: OciShape,
    options: &OciOptions,
    progress: &dyn Progress,
) -> Result<Receipt, OciError> {
    let started = Instant::now();
    let tag = match (&dest.tag, &dest.digest) {
        (Some(t), None) => t.clone(),
        _ => {
            return Err(OciError::NoTag {
                reference: format!("{}/{}", dest.registry, dest.repository),
            });
        }
    };
    let disk = image.disk.as_ref().ok_or_else(|| OciError::NothingToPush {
        image: image.reference(),
    })?;
    let file_name = disk
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{}.{}", image.name, disk.format.extension()));
    let target = format!("{}://{dest}", shape.kind());
    progress.step(&target, &format!("connecting to {}", dest.registry));
    let registry = Registry::connect(dest, options, RegistryOperation::Push).await?;

    let manifest = &image.manifest;
    let mut annotations = BTreeMap::from([
        (
            "org.opencontainers.image.created".to_string(),
            manifest
                .created
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        (
            "org.opencontainers.image.version".to_string(),
            image.version.to_string(),
        ),
        (TITLE.to_string(), image.name.clone()),
        ("org.builder.image.ref".to_string(), image.reference()),
    ]);
    if !manifest.build_id.is_empty() {
        annotations.insert("org.builder.build-id".into(), manifest.build_id.clone());
    }
    let mut digests = BTreeMap::new();

    let (config, layers, artifact_type) = match shape {
        OciShape::Artifact => {
            progress.step(&target, &format!("uploading {file_name}"));
            let source = Arc::new(BlobSource::file(&disk.path)?);
            let known = format!("sha256:{}", disk.sha256);
            let d = registry
                .upload(source, Some(&known), &target, &file_name, progress)
                .await?;
            let media = match disk.format {
                Format::Raw => DISK_RAW,
                _ => DISK_QCOW2,
            };
            digests.insert("disk".to_string(), d.digest.clone());
            let mut layers = vec![descriptor(media, &d, Some(&file_name))];
            for (name, media) in [(MANIFEST_FILE, BUILD_MANIFEST), (SUMS_FILE, SHA256SUMS)] {
                let path = image.dir.join(name);
                let bytes = match fs_err::read(&path) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == SUMS_FILE => {
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let known = sha256_of(&bytes);
                let d = registry
                    .upload(
                        Arc::new(BlobSource::bytes(bytes)),
                        Some(&known),
                        &target,
                        name,
                        progress,
                    )
                    .await?;
                digests.insert(name.to_string(), d.digest.clone());
                layers.push(descriptor(media, &d, Some(name)));
            }
            (
                empty_config(&registry, &target, progress).await?,
                layers,
                Some(ARTIFACT_TYPE.to_string()),
            )
        }
        OciShape::ContainerDisk => {
            progress.step(
                &target,
                &format!("uploading disk/{file_name} as a tar layer"),
            );
            let mtime = manifest.created.timestamp().max(0) as u64;
            let source = Arc::new(BlobSource::container_disk(&disk.path, &file_name, mtime)?);
            let d = registry
                .upload(source, None, &target, "layer", progress)
                .await?;
            digests.insert("layer".to_string(), d.digest.clone());
            let config = serde_json::json!({
                "created": manifest.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Labels": { "org.builder.image.ref": image.reference() }
                },
                "rootfs": { "type": "layers", "diff_ids": [d.digest] },
                "history": [{
                    "created": manifest.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "created_by": format!("builder {} (containerDisk of {})",
                        env!("CARGO_PKG_VERSION"), image.reference()),
                }],
            });
            #[expect(clippy::expect_used, reason = "a json! value always serialises")]
            let config = serde_json::to_vec(&config).expect("plain data serializes");
            let known = sha256_of(&config);
            let c = registry
                .upload(
                    Arc::new(BlobSource::bytes(config)),
                    Some(&known),
                    &target,
                    "config",
                    progress,
                )
                .await?;
            (
                descriptor(OCI_CONFIG, &c, None),
                vec![descriptor(OCI_LAYER_TAR, &d, None)],
                None,
            )
        }
    };
    digests.insert("config".to_string(), config.digest.clone());
    let oci_manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_string()),
        artifact_type,
        config: Some(config),
        layers,
        manifests: None,
        annotations,
    };
    #[expect(
        clippy::expect_used,
        reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
    )]
    let body = serde_json::to_vec_pretty(&oci_manifest).expect("plain data serializes");
    progress.step(&target, &format!("tagging {tag}"));
    let digest = registry.put_manifest(&tag, &body, OCI_MANIFEST).await?;
    digests.insert("manifest".to_string(), digest.clone());
    Ok(Receipt {
        kind: shape.kind().to_string(),
        location: format!(
            "{}://{}/{}:{tag}@{digest}",
            shape.kind(),
            registry.host(),
            dest.repository
        ),
        digests,
        ids: BTreeMap::new(),
        finished: chrono::Utc::now(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The manifest digest `reference`'s tag (`latest` if none) points to now.
pub async fn current_digest(
    reference: &OciReference,
    options: &OciOptions,
) -> Result<String, OciError> {
    let registry = Registry::connect(reference, options, RegistryOperation::Pull).await?;
    registry
        .resolve_tag(reference.tag.as_deref().unwrap_or("latest"))
        .await
}

/// Fetch the disk `src` (digest-pinned) holds into `cache_dir` as `<sha256>.qcow2`: the disk
/// layer of a builder artifact, or the qcow2 inside a containerDisk.
pub async fn pull_disk(
    src: &OciReference,
    options: &OciOptions,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<PulledDisk, OciError> {
    let target = format!("oci://{src}");
    let Some(manifest_digest) = src.digest.clone() else {
        // Say which digest to pin, when the registry can tell.
        return Err(OciError::NotPinned {
            reference: src.to_string(),
            current: current_digest(src, options).await.ok(),
        });
    };
    // A manifest digest names its content for ever: what it held, once pulled, is in the
    // cache under the disk's digest, and the registry need not be asked again (it may be
    // down, or the image deleted from it).
    let memo = crate::store::base::oci_manifest_memo(cache_dir, &manifest_digest);
    if let Some(sha256) = crate::store::base::read_memo(&memo) {
        let path = cache_dir.join(format!("{sha256}.qcow2"));
        if path.is_file() {
            progress.step(&target, &format!("already cached as {}", path.display()));
            return Ok(PulledDisk {
                path,
                sha256,
                manifest_digest,
                from_cache: true,
            });
        }
    }
    let pulled =
        pull_uncached(src, &target, &manifest_digest, options, cache_dir, progress).await?;
    crate::store::base::write_memo(&memo, &pulled.sha256);
    Ok(pulled)
}

/// [`pull_disk`] when the cache does not know the manifest: ask the registry.
async fn pull_uncached(
    src: &OciReference,
    target: &str,
    manifest_digest: &str,
    options: &OciOptions,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<PulledDisk, OciError> {
    let manifest_digest = manifest_digest.to_string();
    progress.step(target, &format!("connecting to {}", src.registry));
    let registry = Registry::connect(src, options, RegistryOperation::Pull).await?;
    let (bytes, _) = registry.get_manifest(&manifest_digest).await?;
    let no_disk = |reason: String| OciError::NoDisk {
        reference: src.to_string(),
        reason,
    };
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| no_disk(format!("its manifest is not an OCI image manifest ({e})")))?;
    if manifest.manifests.is_some()
        || matches!(
            manifest.media_type.as_deref(),
            Some(OCI_INDEX | DOCKER_LIST)
        )
    {
        return Err(no_disk(
            "it is an image index (several platforms); pin the digest of the amd64 manifest".into(),
        ));
    }
    let mkdir = |path: &Path| fs_err::create_dir_all(path);
    mkdir(cache_dir)?;
    if let Some(layer) = manifest.layers.iter().find(|l| l.media_type == DISK_QCOW2) {
        let sha = digest_hex(&layer.digest).ok_or_else(|| {
            no_disk(format!(
                "its disk layer digest `{}` is not sha256",
                layer.digest
            ))
        })?;
        let path = download_layer(&registry, layer, &sha, cache_dir, target, progress).await?;
        return Ok(PulledDisk {
            path,
            sha256: sha,
            manifest_digest,
            from_cache: false,
        });
    }
    let tar_layers: Vec<&OciDescriptor> = manifest
        .layers
        .iter()
        .filter(|l| {
            [
                OCI_LAYER_TAR,
                DOCKER_LAYER_TAR,
                OCI_LAYER_GZIP,
                DOCKER_LAYER_GZIP,
            ]
            .contains(&l.media_type.as_str())
        })
        .collect();
    match (tar_layers.as_slice(), manifest.layers.len()) {
        ([layer], 1) => {
            let (path, sha256) =
                extract_container_disk(&registry, layer, cache_dir, target, progress).await?;
            Ok(PulledDisk {
                path,
                sha256,
                manifest_digest,
                from_cache: false,
            })
        }
        _ => Err(no_disk(format!(
            "expected a builder disk artifact ({DISK_QCOW2} layer) or a containerDisk (one \
             tar layer, plain or gzip); found layers: {}",
            manifest
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Open and lock `part` (one download per file: another builder holding it finishes first).
async fn locked_part(part: &Path) -> Result<fs_err::File, OciError> {
    let file = fs_err::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)?;
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| OciError::Task(e.to_string()))?
        .map_err(OciError::from)
}

fn is_qcow2(path: &Path) -> Result<bool, OciError> {
    let mut magic = [0u8; 4];
    let mut f = fs_err::File::open(path)?;
    Ok(f.read_exact(&mut magic).is_ok() && magic == *b"QFI\xfb")
}

/// Download an artifact's disk layer into `<cache_dir>/<sha>.qcow2` (resuming a `.part` left
/// by an earlier attempt with a Range request), verifying its digest before the rename.
async fn download_layer(
    registry: &Registry,
    layer: &OciDescriptor,
    sha: &str,
    cache_dir: &Path,
    target: &str,
    progress: &dyn Progress,
) -> Result<PathBuf, OciError> {
    let dest = cache_dir.join(format!("{sha}.qcow2"));
    let part_path = cache_dir.join(format!("{sha}.part"));
    if dest.is_file() {
        progress.step(target, &format!("already cached as {}", dest.display()));
        return Ok(dest);
    }
    let mut part = locked_part(&part_path).await?;
    if dest.is_file() {
        let _ = fs_err::remove_file(&part_path);
        return Ok(dest);
    }
    let what = layer
        .annotations
        .get(TITLE)
        .cloned()
        .unwrap_or_else(|| "disk".to_string());
    progress.step(target, &format!("downloading {what}"));
    match fetch_blob(registry, layer, sha, &mut part, target, &what, progress).await {
        Ok(()) => {}
        Err(e @ OciError::DigestMismatch { .. }) => {
            drop(part);
            let _ = fs_err::remove_file(&part_path);
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    part.sync_all()?;
    if !is_qcow2(&part_path)? {
        drop(part);
        let _ = fs_err::remove_file(&part_path);
        return Err(OciError::NoDisk {
            reference: layer.digest.clone(),
            reason: "its disk layer is not a qcow2 image".into(),
        });
    }
    fs_err::rename(&part_path, &dest)?;
    Ok(dest)
}

/// Download the blob `layer` (sha256 `sha`, hex) into `part`, resuming what it holds with a
/// Range request and retrying transient failures; the whole file must have the digest
/// ([`OciError::DigestMismatch`] when not: the caller removes the file).
async fn fetch_blob(
    registry: &Registry,
    layer: &OciDescriptor,
    sha: &str,
    part: &mut fs_err::File,
    target: &str,
    what: &str,
    progress: &dyn Progress,
) -> Result<(), OciError> {
    let actual = registry
        .retrying(&format!("download {what}"), async || {
            download_once(registry, layer, part, target, what, progress).await
        })
        .await?;
    if actual != sha {
        return Err(OciError::DigestMismatch {
            what: format!("layer {} ({what})", layer.digest),
            expected: layer.digest.clone(),
            actual: format!("sha256:{actual}"),
        });
    }
    Ok(())
}

/// A small blob (a config) in memory, at most `max` bytes, checked against its digest;
/// transient failures retried.
async fn fetch_small_blob(
    registry: &Registry,
    blob: &OciDescriptor,
    what: &str,
    max: u64,
) -> Result<Vec<u8>, OciError> {
    if blob.size > max {
        return Err(OciError::NoDisk {
            reference: blob.digest.clone(),
            reason: format!("its {what} has {} bytes, more than {max}", blob.size),
        });
    }
    let bytes = registry
        .retrying(&format!("download {what}"), async || {
            let (response, _) = registry.get_blob(&blob.digest, 0).await?;
            response
                .bytes()
                .await
                .map_err(|e| Failure::Transient(error_chain(&e)))
        })
        .await?;
    let actual = sha256_of(&bytes);
    if actual != blob.digest {
        return Err(OciError::DigestMismatch {
            what: format!("{what} {}", blob.digest),
            expected: blob.digest.clone(),
            actual,
        });
    }
    Ok(bytes.to_vec())
}

/// One GET of the layer, from what `part` holds on; returns the sha256 (hex) of the whole file.
async fn download_once(
    registry: &Registry,
    layer: &OciDescriptor,
    part: &mut fs_err::File,
    target: &str,
    what: &str,
    progress: &dyn Progress,
) -> Result<String, Failure> {
    use std::io::{Seek, SeekFrom};
    let fatal = |e: OciError| Failure::Fatal(e);
    let have = part.metadata().map_err(|e| fatal(e.into()))?.len();
    let have = if have > layer.size { 0 } else { have };
    let (mut response, start) = registry.get_blob(&layer.digest, have).await?;
    let mut hasher = Sha256::new();
    if start > 0 {
        part.seek(SeekFrom::Start(0)).map_err(|e| fatal(e.into()))?;
        let mut reader = (&mut *part).take(start);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(|e| fatal(e.into()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    part.set_len(start).map_err(|e| fatal(e.into()))?;
    part.seek(SeekFrom::Start(start))
        .map_err(|e| fatal(e.into()))?;
    let mut done = start;
    progress.transfer(target, what, done, Some(layer.size));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Failure::Transient(error_chain(&e)))?
    {
        part.write_all(&chunk).map_err(|e| fatal(e.into()))?;
        hasher.update(&chunk);
        done += chunk.len() as u64;
        progress.transfer(target, what, done, Some(layer.size));
    }
    if done != layer.size {
        return Err(Failure::Transient(format!(
            "the connection ended after {done} of {} bytes",
            layer.size
        )));
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Stream a containerDisk's tar layer, writing the first regular file under `disk/` into the
/// cache as it passes (no copy of the layer is kept), and check the layer digest at the end.
/// Each attempt starts over: a tar stream cannot be resumed half way through.
async fn extract_container_disk(
    registry: &Registry,
    layer: &OciDescriptor,
    cache_dir: &Path,
    target: &str,
    progress: &dyn Progress,
) -> Result<(PathBuf, String), OciError> {
    let layer_hex = digest_hex(&layer.digest).ok_or_else(|| OciError::NoDisk {
        reference: layer.digest.clone(),
        reason: "its layer digest is not sha256".into(),
    })?;
    // Which qcow2 this layer held, remembered after a pull: the next one needs no download.
    let memo = crate::store::base::oci_layer_memo(cache_dir, &layer_hex);
    if let Some(sha) = crate::store::base::read_memo(&memo) {
        let dest = cache_dir.join(format!("{sha}.qcow2"));
        if dest.is_file() {
            progress.step(target, &format!("already cached as {}", dest.display()));
            return Ok((dest, sha));
        }
    }
    let part_path = cache_dir.join(format!("layer-{layer_hex}.part"));
    let part = locked_part(&part_path).await?;
    progress.step(target, "downloading the containerDisk layer");
    let result = registry
        .retrying("download the containerDisk layer", async || {
            let file = part.try_clone().map_err(|e| Failure::Fatal(e.into()))?;
            extract_once(registry, layer, file, target, progress).await
        })
        .await;
    let result = match result {
        Ok(found) => found,
        Err(e) => {
            drop(part);
            let _ = fs_err::remove_file(&part_path);
            return Err(e);
        }
    };
    let (layer_digest, disk_sha) = result;
    let fail = |e: OciError| {
        let _ = fs_err::remove_file(&part_path);
        e
    };
    if layer_digest != layer_hex {
        return Err(fail(OciError::DigestMismatch {
            what: format!("layer {}", layer.digest),
            expected: layer.digest.clone(),
            actual: format!("sha256:{layer_digest}"),
        }));
    }
    let Some(sha) = disk_sha else {
        return Err(fail(OciError::NoDisk {
            reference: layer.digest.clone(),
            reason: "the containerDisk layer has no file under disk/".into(),
        }));
    };
    if !is_qcow2(&part_path)? {
        return Err(fail(OciError::NoDisk {
            reference: layer.digest.clone(),
            reason: "the file under disk/ is not a qcow2 image (raw disks cannot be parents yet)"
                .into(),
        }));
    }
    part.sync_all()?;
    let dest = cache_dir.join(format!("{sha}.qcow2"));
    fs_err::rename(&part_path, &dest)?;
    crate::store::base::write_memo(&memo, &sha);
    Ok((dest, sha))
}

/// Reads what the download task sends (blocking side of the stream).
struct ChannelReader<T> {
    rx: tokio::sync::mpsc::Receiver<T>,
    current: Option<T>,
    pos: usize,
}

impl<T: AsRef<[u8]>> Read for ChannelReader<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(cur) = &self.current {
                let bytes = cur.as_ref();
                if self.pos < bytes.len() {
                    let n = (bytes.len() - self.pos).min(buf.len());
                    buf[..n].copy_from_slice(&bytes[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            match self.rx.blocking_recv() {
                Some(next) => {
                    self.current = Some(next);
                    self.pos = 0;
                }
                // The sender is gone: the end of the layer (or a failed download, which the
                // async side reports).
                None => return Ok(0),
            }
        }
    }
}

/// Hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn bad_tar(e: std::io::Error) -> OciError {
    OciError::NoDisk {
        reference: "the containerDisk layer".into(),
        reason: format!("it is not a readable tar archive ({e})"),
    }
}

/// Read a tar stream to its end, writing the first regular file under `disk/` into `file`;
/// returns that file's sha256 (hex), if there was one.
fn extract_disk(
    tar_stream: impl Read,
    file: &mut fs_err::File,
) -> Result<Option<String>, OciError> {
    let mut disk_sha = None;
    let mut archive = tar::Archive::new(tar_stream);
    for entry in archive.entries().map_err(bad_tar)? {
        let mut entry = entry.map_err(bad_tar)?;
        let path = entry
            .path()
            .map_err(bad_tar)?
            .to_string_lossy()
            .into_owned();
        let path = path.trim_start_matches("./").trim_start_matches('/');
        if disk_sha.is_none() && entry.header().entry_type().is_file() && path.starts_with("disk/")
        {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(bad_tar)?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n])?;
                h.update(&buf[..n]);
            }
            disk_sha = Some(hex::encode(h.finalize()));
        }
    }
    Ok(disk_sha)
}

/// One streaming pass over the layer. Returns (layer sha256 hex, sha256 hex of the extracted
/// disk if there was one).
async fn extract_once(
    registry: &Registry,
    layer: &OciDescriptor,
    file: fs_err::File,
    target: &str,
    progress: &dyn Progress,
) -> Result<(String, Option<String>), Failure> {
    let (mut response, _) = registry.get_blob(&layer.digest, 0).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let gzip = layer.media_type.ends_with("gzip");
    let extract = tokio::task::spawn_blocking(move || -> Result<_, OciError> {
        let mut reader = HashingReader {
            inner: ChannelReader {
                rx,
                current: None,
                pos: 0,
            },
            hasher: Sha256::new(),
        };
        let mut file = file;
        file.set_len(0)?;
        // Docker and podman build containerDisks with gzip layers; builder pushes plain tar.
        // Either way the layer digest is of the bytes as sent (hashed below the decoder).
        let disk_sha = if gzip {
            let mut gz = flate2::read::GzDecoder::new(&mut reader);
            let found = extract_disk(&mut gz, &mut file)?;
            std::io::copy(&mut gz, &mut std::io::sink()).map_err(bad_tar)?;
            found
        } else {
            extract_disk(&mut reader, &mut file)?
        };
        // The rest of the layer (padding after the end marker) counts for its digest.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(bad_tar)?;
        Ok((hex::encode(reader.hasher.finalize()), disk_sha))
    });
    let mut done = 0u64;
    let mut feed_error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                done += chunk.len() as u64;
                progress.transfer(target, "containerDisk layer", done, Some(layer.size));
                if tx.send(chunk).await.is_err() {
                    break; // the extractor stopped; its error says why
                }
            }
            Ok(None) => break,
            Err(e) => {
                feed_error = Some(error_chain(&e));
                break;
            }
        }
    }
    drop(tx);
    let extracted = extract
        .await
        .map_err(|e| Failure::Fatal(OciError::Task(e.to_string())))?;
    if let Some(cause) = feed_error {
        return Err(Failure::Transient(cause));
    }
    if done != layer.size && extracted.is_ok() {
        return Err(Failure::Transient(format!(
            "the connection ended after {done} of {} bytes",
            layer.size
        )));
    }
    extracted.map_err(Failure::Fatal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_registries_come_from_the_environment_list() {
        let o = OciOptions {
            plain_http: vec!["127.0.0.1:5000".into()],
            ..OciOptions::default()
        };
        assert!(o.is_plain_http("127.0.0.1:5000"));
        assert!(!o.is_plain_http("127.0.0.1:5001"));
    }
}
