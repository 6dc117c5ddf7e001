//! OCI image layouts, the image spec's folder form of images (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`): how the store keeps a container build (`<build>/oci/`) and a
//! container parent pulled from a registry, and the shapes every OCI reader and writer of
//! builder shares (descriptors, image manifests, indexes, the media types). Reads, checks and
//! writes layouts; it never talks to a registry and never runs buildah.
//!
//! A layout here holds one image: `index.json` lists one image manifest (named with
//! `org.opencontainers.image.ref.name`, as `buildah push oci:<dir>:<tag>` writes it). The
//! manifest's bytes are kept as they are: its digest is the image's identity, the same in
//! the store, in a registry after a push, and in an `oci-archive`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::ContainerImage;

/// The layout's folder in a container build's folder.
pub const LAYOUT_DIR: &str = "oci";
/// The layout's index of images.
pub const INDEX_FILE: &str = "index.json";
/// The file that marks a folder as an OCI image layout.
pub const LAYOUT_FILE: &str = "oci-layout";
/// What [`LAYOUT_FILE`] holds.
pub const LAYOUT_VERSION: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";
/// The annotation naming an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation titling a blob (the file name of an artifact's layer).
pub const TITLE: &str = "org.opencontainers.image.title";

/// Media types of OCI and Docker manifests, configs and layers.
pub mod media {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// An image manifest (OCI or Docker schema 2), as opposed to an index.
    pub fn is_image_manifest(media_type: &str) -> bool {
        [OCI_MANIFEST, DOCKER_MANIFEST].contains(&media_type)
    }

    /// An index of manifests (OCI index or Docker manifest list).
    pub fn is_index(media_type: &str) -> bool {
        [OCI_INDEX, DOCKER_LIST].contains(&media_type)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{} is not an OCI image layout: {reason}", path.display())]
    NotALayout { path: PathBuf, reason: String },
    #[error("`{digest}` is not a sha256 digest (`sha256:` and 64 hex digits)")]
    BadDigest { digest: String },
    #[error("{what} ({}) is not valid: {detail}", path.display())]
    Decode {
        what: String,
        path: PathBuf,
        detail: String,
    },
    #[error("{} holds {count} images; name one ({})", path.display(), names.join(", "))]
    Ambiguous {
        path: PathBuf,
        count: usize,
        names: Vec<String>,
    },
    #[error("{} holds no image named `{name}`", path.display())]
    NoSuchImage { path: PathBuf, name: String },
    #[error("{what} is a `{media_type}`, not an image manifest")]
    NotAnImage { what: String, media_type: String },
    #[error("blob {digest} ({what}) is missing from {}", dir.display())]
    MissingBlob {
        dir: PathBuf,
        digest: String,
        what: String,
    },
    #[error("blob {digest} ({what}) has {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        digest: String,
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("blob {path} ({what}) has digest {actual}, expected {expected}")]
    DigestMismatch {
        path: PathBuf,
        what: String,
        expected: String,
        actual: String,
    },
}

/// An OCI content descriptor: what a manifest or an index says about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// In an index: the platform the manifest is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A descriptor of `media_type` for the blob with `digest` and `size`, no annotations.
    pub fn new(media_type: &str, digest: &str, size: u64) -> Self {
        Self {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }

    /// The same descriptor with `org.opencontainers.image.title` set.
    pub fn titled(mut self, title: &str) -> Self {
        self.annotations
            .insert(TITLE.to_string(), title.to_string());
        self
    }
}

/// A descriptor's platform (in an index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2). Read leniently: an index parses too (its
/// `manifests` is then set), so a reader can tell what it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Set when what was read is an index.
    #[serde(default, skip_serializing)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    /// Whether what was read is an index (or a Docker manifest list) rather than one image.
    pub fn is_index(&self) -> bool {
        self.manifests.is_some() || self.media_type.as_deref().is_some_and(media::is_index)
    }
}

/// An image index (`index.json`, or a multi-platform image in a registry).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Index {
    /// An index listing `manifests`.
    pub fn of(manifests: Vec<Descriptor>) -> Self {
        Self {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.to_string()),
            manifests,
            annotations: BTreeMap::new(),
        }
    }

    /// The manifest for `os`/`architecture` (variants ignored), if listed.
    pub fn for_platform(&self, os: &str, architecture: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
    }
}

/// The parts of an image config builder reads (the rest is kept in the blob as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub rootfs: RootFs,
}

/// The config's `rootfs`: the digests of the layers uncompressed, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// `sha256:<hex>` → `<hex>` (lower case), if it is a sha256 digest.
pub fn digest_hex(digest: &str) -> Option<String> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// An OCI image layout on disk.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

/// The one image of a layout: its manifest (bytes as stored, and parsed), its config.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    /// The manifest's descriptor in `index.json`.
    pub descriptor: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    /// The config's descriptor (from the manifest).
    pub config_descriptor: Descriptor,
    pub config: ImageConfig,
}

impl LayoutImage {
    /// The name `index.json` gives it, if any.
    pub fn ref_name(&self) -> Option<&str> {
        self.descriptor
            .annotations
            .get(REF_NAME)
            .map(String::as_str)
    }

    /// Every blob of the image, the manifest first, then the config and the layers.
    pub fn blobs(&self) -> Vec<&Descriptor> {
        std::iter::once(&self.descriptor)
            .chain(std::iter::once(&self.config_descriptor))
            .chain(&self.manifest.layers)
            .collect()
    }

    /// What the build's manifest records about the image, the layout being `layout` (relative
    /// to the build's folder).
    pub fn facts(&self, layout: &str) -> ContainerImage {
        ContainerImage {
            layout: layout.to_string(),
            manifest_digest: self.descriptor.digest.clone(),
            config_digest: self.config_descriptor.digest.clone(),
            media_type: self.descriptor.media_type.clone(),
            size: self.blobs().iter().map(|d| d.size).sum(),
            architecture: self.config.architecture.clone(),
            os: self.config.os.clone(),
        }
    }
}

impl Layout {
    /// The layout in `dir` (checks its `oci-layout` marker).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        let marker = dir.join(LAYOUT_FILE);
        match fs_err::read(&marker) {
            Ok(bytes) => {
                #[derive(Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Marker {
                    image_layout_version: String,
                }
                let m: Marker =
                    serde_json::from_slice(&bytes).map_err(|e| LayoutError::NotALayout {
                        path: dir.clone(),
                        reason: format!("its {LAYOUT_FILE} is not valid ({e})"),
                    })?;
                if !m.image_layout_version.starts_with("1.") {
                    return Err(LayoutError::NotALayout {
                        path: dir,
                        reason: format!("layout version {} (expected 1.x)", m.image_layout_version),
                    });
                }
                Ok(Self { dir })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LayoutError::NotALayout {
                path: dir,
                reason: format!("it has no {LAYOUT_FILE} file"),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// A new, empty layout in `dir` (created; it may exist and be empty).
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        fs_err::create_dir_all(dir.join("blobs/sha256"))?;
        crate::atomic::write_atomic(&dir.join(LAYOUT_FILE), LAYOUT_VERSION.as_bytes())?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `blobs/sha256/<hex>` for `digest`.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        let hex = digest_hex(digest).ok_or_else(|| LayoutError::BadDigest {
            digest: digest.to_string(),
        })?;
        Ok(self.dir.join("blobs/sha256").join(hex))
    }

    /// `index.json`.
    pub fn index(&self) -> Result<Index, LayoutError> {
        let path = self.dir.join(INDEX_FILE);
        let bytes = fs_err::read(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Decode {
            what: "the layout's index".into(),
            path,
            detail: e.to_string(),
        })
    }

    /// Write `index.json` (whole or not at all).
    pub fn write_index(&self, index: &Index) -> Result<(), LayoutError> {
        Ok(crate::atomic::write_json(
            &self.dir.join(INDEX_FILE),
            index,
        )?)
    }

    /// Store `bytes` as a blob (whole or not at all); returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<String, LayoutError> {
        let digest = digest_of(bytes);
        crate::atomic::write_atomic(&self.blob_path(&digest)?, bytes)?;
        Ok(digest)
    }

    /// A small blob's bytes (a manifest, a config), checked against the descriptor's size and
    /// digest.
    pub fn read_blob(&self, d: &Descriptor, what: &str) -> Result<Vec<u8>, LayoutError> {
        let path = self.existing_blob(d, what)?;
        let bytes = fs_err::read(&path)?;
        let actual = digest_of(&bytes);
        if actual != d.digest {
            return Err(LayoutError::DigestMismatch {
                path,
                what: what.to_string(),
                expected: d.digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// The blob's path, checked to exist with the descriptor's size.
    fn existing_blob(&self, d: &Descriptor, what: &str) -> Result<PathBuf, LayoutError> {
        let path = self.blob_path(&d.digest)?;
        let size = match fs_err::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LayoutError::MissingBlob {
                    dir: self.dir.clone(),
                    digest: d.digest.clone(),
                    what: what.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if size != d.size {
            return Err(LayoutError::SizeMismatch {
                digest: d.digest.clone(),
                what: what.to_string(),
                expected: d.size,
                actual: size,
            });
        }
        Ok(path)
    }

    /// The image named `name` (`org.opencontainers.image.ref.name`), or with `None` the only
    /// image of the layout.
    pub fn image(&self, name: Option<&str>) -> Result<LayoutImage, LayoutError> {
        let index = self.index()?;
        let descriptor = match name {
            Some(name) => index
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(name))
                .ok_or_else(|| LayoutError::NoSuchImage {
                    path: self.dir.clone(),
                    name: name.to_string(),
                })?,
            None => match index.manifests.as_slice() {
                [one] => one,
                many => {
                    return Err(LayoutError::Ambiguous {
                        path: self.dir.clone(),
                        count: many.len(),
                        names: many
                            .iter()
                            .map(|d| {
                                d.annotations
                                    .get(REF_NAME)
                                    .cloned()
                                    .unwrap_or_else(|| d.digest.clone())
                            })
                            .collect(),
                    });
                }
            },
        }
        .clone();
        if !media::is_image_manifest(&descriptor.media_type) {
            return Err(LayoutError::NotAnImage {
                what: format!("{} in {}", descriptor.digest, self.dir.display()),
                media_type: descriptor.media_type.clone(),
            });
        }
        let manifest_bytes = self.read_blob(&descriptor, "the image manifest")?;
        let decode = |what: &str, e: serde_json::Error| LayoutError::Decode {
            what: what.to_string(),
            path: self.blob_path(&descriptor.digest).unwrap_or_default(),
            detail: e.to_string(),
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| decode("the image manifest", e))?;
        let config_descriptor = manifest.config.clone().ok_or_else(|| LayoutError::Decode {
            what: "the image manifest".into(),
            path: self.blob_path(&descriptor.digest).unwrap_or_default(),
            detail: "it has no config".into(),
        })?;
        let config_bytes = self.read_blob(&config_descriptor, "the image config")?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| LayoutError::Decode {
                what: "the image config".into(),
                path: self
                    .blob_path(&config_descriptor.digest)
                    .unwrap_or_default(),
                detail: e.to_string(),
            })?;
        Ok(LayoutImage {
            descriptor,
            manifest_bytes,
            manifest,
            config_descriptor,
            config,
        })
    }

    /// Check every blob of the image named `name` (or the only one): present, of its size, of
    /// its digest (blocking; reads every layer). Returns the image.
    pub fn verify(&self, name: Option<&str>) -> Result<LayoutImage, LayoutError> {
        let image = self.image(name)?;
        for (i, layer) in image.manifest.layers.iter().enumerate() {
            let what = format!("layer {}", i + 1);
            let path = self.existing_blob(layer, &what)?;
            let actual = format!("sha256:{}", crate::digest::sha256_file(&path, None)?.hex());
            if actual != layer.digest {
                return Err(LayoutError::DigestMismatch {
                    path,
                    what,
                    expected: layer.digest.clone(),
                    actual,
                });
            }
        }
        Ok(image)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A layout with one image of one layer, as `buildah push oci:` writes one.
    pub(crate) fn small_layout(dir: &Path) -> (Layout, LayoutImage) {
        let layer = b"not really a tar, but a blob";
        layout_with_layer(dir, layer, media::OCI_LAYER_TAR, &digest_of(layer))
    }

    /// A layout with one image whose one layer is `layer` (of `media_type`; `diff_id`: the
    /// digest of its tar uncompressed), named `latest`.
    pub(crate) fn layout_with_layer(
        dir: &Path,
        layer: &[u8],
        media_type: &str,
        diff_id: &str,
    ) -> (Layout, LayoutImage) {
        let layout = Layout::create(dir).expect("create");
        let layer_digest = layout.write_blob(layer).expect("layer");
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .expect("json");
        let config_digest = layout.write_blob(&config).expect("config");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": media_type, "digest": layer_digest, "size": layer.len()}],
        }))
        .expect("json");
        let manifest_digest = layout.write_blob(&manifest).expect("manifest");
        let mut d = Descriptor::new(media::OCI_MANIFEST, &manifest_digest, manifest.len() as u64);
        d.annotations.insert(REF_NAME.into(), "latest".into());
        layout.write_index(&Index::of(vec![d])).expect("index");
        let image = layout.image(None).expect("image");
        (layout, image)
    }

    #[test]
    fn a_layout_is_read_and_its_facts_add_up() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (layout, image) = small_layout(tmp.path());
        assert_eq!(image.ref_name(), Some("latest"));
        let facts = image.facts(LAYOUT_DIR);
        assert_eq!(facts.architecture, "amd64");
        assert_eq!(facts.os, "linux");
        assert_eq!(facts.manifest_digest, digest_of(&image.manifest_bytes));
        let total: u64 = ["blobs/sha256"]
            .iter()
            .flat_map(|d| fs_err::read_dir(tmp.path().join(d)).expect("ls"))
            .map(|e| e.expect("entry").metadata().expect("meta").len())
            .sum();
        assert_eq!(facts.size, total);
        assert_eq!(
            layout.image(Some("latest")).expect("by name").descriptor,
            image.descriptor
        );
        assert!(matches!(
            layout.image(Some("other")),
            Err(LayoutError::NoSuchImage { .. })
        ));
        layout.verify(None).expect("verified");
    }

    #[test]
    fn a_changed_or_missing_blob_fails_verification() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (layout, image) = small_layout(tmp.path());
        let layer = layout
            .blob_path(&image.manifest.layers[0].digest)
            .expect("path");
        // Same size, other bytes.
        let mut bytes = fs_err::read(&layer).expect("read");
        bytes[0] ^= 1;
        fs_err::write(&layer, &bytes).expect("write");
        let e = layout.verify(None).expect_err("changed");
        assert!(matches!(e, LayoutError::DigestMismatch { .. }), "{e}");
        fs_err::remove_file(&layer).expect("rm");
        let e = layout.verify(None).expect_err("missing");
        assert!(matches!(e, LayoutError::MissingBlob { .. }), "{e}");
        assert!(matches!(
            Layout::open(tmp.path().join("blobs")),
            Err(LayoutError::NotALayout { .. })
        ));
    }
}
