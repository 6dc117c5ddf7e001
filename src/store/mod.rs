//! The local store: parent images cached by digest, and every build as an image version
//! `name/x.y.z/n` with its manifest, outputs and logs. Owns the folder layout below and the
//! lock that keeps concurrent builders apart; it never runs a VM or converts a disk.
//!
//! ```text
//! <store>/                            $BUILDER_STORE, else $XDG_DATA_HOME/builder,
//!                                     else ~/.local/share/builder
//!   config.yml                        the store's settings, written by the user (optional):
//!                                     the layer cache's cap; see [`config`]
//!   lock                              flock: build numbers, commits, removals, hash index
//!   cache/base/<sha256>.qcow2         parent images by digest (downloads land here, verified)
//!   cache/base/<sha256>.part          a download in progress; resumed with an HTTP Range
//!   cache/oci/<sha256>/               container parents pulled from registries: OCI image
//!                                     layouts named by the digest the recipe pins
//!   cache/layers/<key>.qcow2          component layers by the plan's layer keys, each with
//!   cache/layers/<key>.json           its record; see [`layers`]
//!   cache/hashes.json                 digests of local parent images by (path, size, mtime,
//!                                     inode), so a 1 GiB base is not re-hashed every build
//!   images/<name>/<x.y.z>/.last-build the highest build number handed out for this version
//!   images/<name>/<x.y.z>/<n>/        one finished build: manifest.json, the outputs,
//!                                     SHA256SUMS, logs/, receipts.json (where it was
//!                                     distributed; appended under the lock)
//!   images/<name>/<x.y.z>/<n>/oci/    a container build's image: an OCI image layout holding
//!                                     one image (see [`layout`]); it has no disk outputs
//!   staging/<build-id>/               a build in progress (build.json says which, and which
//!                                     process runs it); renamed to images/… by commit,
//!                                     never copied. The build holds a flock on the folder
//!                                     as long as it runs
//!   work/<build-id>/                  the build's disk chain (outside its folder, so
//!                                     keep-on-failure can keep it apart from the logs)
//!   failed/<build-id>/                a failed build: build.json, logs/, manifest.json if any
//!   trash/<random>/                   removals: renamed here (atomic), then deleted
//! ```
//!
//! A build number is handed out under the lock and never handed out again, even if that
//! build fails or is removed, so `name/1.2.0/3` always means the same build. A finished
//! build appears under its final name in one rename, so readers never see half of one.
//!
//! A build whose process died without cleaning up (`kill -9`, a crash, a power cut) is
//! *abandoned*: its folder's flock is free and the process its `build.json` names is gone.
//! [`Store::recover_abandoned`] (which every builder command runs when it opens the store)
//! removes its disk chain and staging folder and keeps its logs under `failed/`, like any
//! failed build's. A live build is never taken for abandoned: its flock is held.

pub mod base;
pub mod config;
pub mod layers;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod runner;

use fs_err::File;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::recipe::Format;
use crate::recipe::Version;

pub use base::{BaseImage, DownloadProgress, FetchOptions, NoDownloadProgress};
pub use config::{ConfigError, StoreConfig};
pub use layers::{LayerCache, LayerCacheError};
pub use layout::{Layout, LayoutError};
pub use manifest::{
    Artifact, ContainerImage, ImageId, ImageKind, MANIFEST_FILE, Manifest, ManifestError,
};
pub use reference::{ImageRef, check_name};
pub use runner::Runner;

/// Environment variable naming the store folder.
pub const STORE_ENV: &str = "BUILDER_STORE";

/// The logs folder inside a build's folder.
pub const LOGS_DIR: &str = "logs";

/// Where a build was distributed, in its folder: a JSON array of receipts, oldest first.
pub const RECEIPTS_FILE: &str = "receipts.json";

/// Where an image went (one distribution target's result): recorded next to the build in
/// [`RECEIPTS_FILE`], printed by `builder distribute` and `builder images show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    /// The target kind: `oci`, `containerdisk`, `ami`, `vagrant`, `directory`, `store`.
    pub kind: String,
    /// Where it went, in a form the user can use again: `oci://host/repo:tag@sha256:…`,
    /// `ami-0123… (eu-west-1)`, an absolute path.
    pub location: String,
    /// Digests of what was written, by role: `manifest`, `config`, `disk`, `box`, file names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digests: BTreeMap<String, String>,
    /// Ids the destination handed out, by role: `ami:eu-west-1`, `snapshot:eu-west-1`,
    /// `importTask`, …
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ids: BTreeMap<String, String>,
    /// When the target finished.
    pub finished: DateTime<Utc>,
    /// Wall time in seconds.
    pub seconds: f64,
}

const BUILD_FILE: &str = "build.json";
const LAST_BUILD_FILE: &str = ".last-build";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot find the store folder: set ${STORE_ENV}, $XDG_DATA_HOME or $HOME")]
    NoHome,
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Taking a folder's lock without waiting failed (std's error does not name the folder).
    #[error("could not lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not use {path}")]
    NotAFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{name}` is not a valid image name: {reason}")]
    BadName { name: String, reason: String },
    #[error("`{reference}` is not a valid image reference: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("no stored image matches `{reference}`")]
    NotFound {
        reference: String,
        /// Stored names close to the one asked for.
        close: Vec<String>,
    },
    #[error("{image} has no qcow2 or raw output to build on (none exported, or its file is gone)")]
    NoDisk { image: String },
    #[error("{image} is a container build: a machine recipe cannot build on it")]
    ContainerNotMachine { image: String },
    #[error("{image} is a machine build: a container recipe cannot build on it")]
    MachineNotContainer { image: String },
    #[error("the container image of {image} cannot be read")]
    Layout {
        image: String,
        #[source]
        source: Box<LayoutError>,
    },
    #[error("{image} is the parent of {}; remove those first or force it", dependents.join(", "))]
    InUse {
        image: String,
        dependents: Vec<String>,
    },
    #[error("the build in {path} has no readable manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("the manifest in {path} is for {found}, but this build is {expected}")]
    ManifestMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("`{sha256}` is not a sha256 digest (64 hex digits)")]
    BadDigest { sha256: String },
    #[error("`{url}` is not an http(s) URL")]
    BadUrl { url: String },
    #[error("downloading {url} failed after {attempts} attempt(s)")]
    Download {
        url: String,
        attempts: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what} has sha256 {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("a store task stopped unexpectedly: {0}")]
    Task(String),
}

/// The local store, rooted at one folder.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Held while the store's lock file is locked; unlocks on drop.
struct StoreLock {
    _file: File,
}

/// A build finished and stored under `images/<name>/<version>/<n>/`.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub name: String,
    pub version: Version,
    pub build: u32,
    /// The build's folder.
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The output a later build boots from: the qcow2, else the raw. [`Store::resolve_image`]
    /// only returns images that have one. `None` for a container build.
    pub disk: Option<StoredDisk>,
}

/// A stored disk and its digest (from the manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDisk {
    pub path: PathBuf,
    pub format: Format,
    pub sha256: String,
}

impl StoredImage {
    /// `name/x.y.z/n`.
    pub fn reference(&self) -> String {
        format!("{}/{}/{}", self.name, self.version, self.build)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join(LOGS_DIR)
    }

    /// Where this build was distributed, oldest first (empty when never, or when
    /// `receipts.json` is unreadable: receipts are a record, not something a build needs).
    pub fn receipts(&self) -> Vec<Receipt> {
        fs_err::read(self.dir.join(RECEIPTS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Total size of the outputs in bytes (a container build's: its image's blobs).
    pub fn outputs_size(&self) -> u64 {
        self.manifest.outputs.iter().map(|a| a.size).sum::<u64>()
            + self.manifest.container.as_ref().map_or(0, |c| c.size)
    }

    /// A machine or a container build.
    pub fn kind(&self) -> ImageKind {
        self.manifest.kind
    }

    /// A container build's OCI image layout (`<build>/oci`), as its manifest records it.
    pub fn layout(&self) -> Result<Layout, StoreError> {
        let container =
            self.manifest
                .container
                .as_ref()
                .ok_or_else(|| StoreError::MachineNotContainer {
                    image: self.reference(),
                })?;
        Layout::open(self.dir.join(&container.layout)).map_err(|source| StoreError::Layout {
            image: self.reference(),
            source: Box::new(source),
        })
    }

    /// Recompute the sha256 of every output and compare it with the manifest (blocking; reads
    /// every file). Returns the first output that is missing or differs. For a container
    /// build: every blob of its image, and the image manifest's digest the build recorded.
    pub fn verify(&self) -> Result<(), StoreError> {
        if let Some(container) = &self.manifest.container {
            return self.verify_container(container);
        }
        for a in &self.manifest.outputs {
            let path = a.path(&self.dir);
            let actual = crate::digest::sha256_file(&path, None)?.hex();
            if actual != a.sha256 {
                return Err(StoreError::DigestMismatch {
                    what: path.display().to_string(),
                    expected: a.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    fn verify_container(&self, container: &ContainerImage) -> Result<(), StoreError> {
        let layout = self.layout()?;
        let image = match layout.verify(None) {
            Ok(image) => image,
            Err(LayoutError::DigestMismatch {
                path,
                expected,
                actual,
                ..
            }) => {
                return Err(StoreError::DigestMismatch {
                    what: path.display().to_string(),
                    expected,
                    actual,
                });
            }
            Err(source) => {
                return Err(StoreError::Layout {
                    image: self.reference(),
                    source: Box::new(source),
                });
            }
        };
        if image.descriptor.digest != container.manifest_digest {
            return Err(StoreError::DigestMismatch {
                what: format!("the image manifest of {}", self.reference()),
                expected: container.manifest_digest.clone(),
                actual: image.descriptor.digest,
            });
        }
        Ok(())
    }

    fn from_dir(
        name: &str,
        version: Version,
        build: u32,
        dir: PathBuf,
    ) -> Result<Self, StoreError> {
        let manifest = read_manifest(&dir)?;
        let disk = [Format::Qcow2, Format::Raw].into_iter().find_map(|f| {
            manifest.output(f).map(|a: &Artifact| StoredDisk {
                path: a.path(&dir),
                format: f,
                sha256: a.sha256.clone(),
            })
        });
        Ok(Self {
            name: name.to_string(),
            version,
            build,
            dir,
            manifest,
            disk,
        })
    }
}

/// What [`Store::prune_cache`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// The cached files removed: parent images, partial downloads, memos.
    pub removed: Vec<PathBuf>,
    /// Build ids in `staging/` that kept the cache as it was.
    pub builds_in_progress: Vec<String>,
    /// Abandoned builds cleaned up first (see [`Store::recover_abandoned`]).
    pub abandoned: Vec<Abandoned>,
}

/// A build whose process ended without finishing it or cleaning up (`kill -9`, a crash, the
/// machine stopped), as [`Store::recover_abandoned`] cleaned it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Abandoned {
    /// `name/x.y.z/n`; `None` when the build left no readable record.
    pub reference: Option<String>,
    pub build_id: String,
    /// The process that ran it, as its `build.json` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner: Option<Runner>,
    /// Processes still using its disk chain (a QEMU that outlived its builder), killed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub killed: Vec<u32>,
    /// What was removed: its disk chain `work/<id>`, its staging folder `staging/<id>`.
    pub removed: Vec<PathBuf>,
    /// Bytes those held.
    pub freed_bytes: u64,
    /// Where its logs are now, with the reason in `build.json` (`failed/<id>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_dir: Option<PathBuf>,
    /// Why it counts as abandoned; recorded as the failed build's failure.
    pub reason: String,
    /// What could not be cleaned (it is tried again next time).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl std::fmt::Display for Abandoned {
    /// `cleaned up the abandoned build web/1.0.0/3 (pid 4242 on host h is gone): removed
    /// /s/work/<id>, /s/staging/<id> (1.2 GiB); its logs are in /s/failed/<id>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cleaned up the abandoned build ")?;
        match &self.reference {
            Some(r) => write!(f, "{r} (build id {})", self.build_id)?,
            None => write!(f, "{}", self.build_id)?,
        }
        if let Some(runner) = &self.runner {
            write!(f, ": its process ({runner}) is gone")?;
        }
        if !self.killed.is_empty() {
            write!(
                f,
                "; killed processes still using its disks: {:?}",
                self.killed
            )?;
        }
        if !self.removed.is_empty() {
            let removed: Vec<String> = self
                .removed
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            write!(
                f,
                "; removed {} ({})",
                removed.join(", "),
                human_size(self.freed_bytes)
            )?;
        }
        if let Some(dir) = &self.failed_dir {
            write!(f, "; its logs are in {}", dir.display())?;
        }
        for p in &self.problems {
            write!(f, "; {p}")?;
        }
        Ok(())
    }
}

/// `1.2 GiB`, `340.0 MiB`, `512 B`: a size as the store's listings and messages show it.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// What `build.json` records about a build in progress or a failed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildRecord {
    pub name: String,
    pub version: String,
    pub build: u32,
    pub build_id: String,
    pub started: DateTime<Utc>,
    /// Why it failed (failed builds only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The process running the build, so a later builder tells an abandoned build from a
    /// live one (with the flock the build holds on its folder). Absent in records written
    /// by builders before 0.2, which are never taken for abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<Runner>,
}

/// A failed build's record and where its logs are.
#[derive(Debug, Clone)]
pub struct FailedBuild {
    pub record: BuildRecord,
    pub dir: PathBuf,
}

impl FailedBuild {
    pub fn reference(&self) -> String {
        format!(
            "{}/{}/{}",
            self.record.name, self.record.version, self.record.build
        )
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join(LOGS_DIR)
    }
}

/// Every stored build, and the build folders that could not be read.
#[derive(Debug, Default)]
pub struct Listing {
    /// Sorted by name, version, build.
    pub images: Vec<StoredImage>,
    /// Sorted by name, version, build.
    pub failed: Vec<FailedBuild>,
    /// Folders that look like builds but whose manifest is unreadable.
    pub unreadable: Vec<StoreError>,
}

impl Store {
    /// The store at `root`, creating its folders if needed.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for sub in ["cache/base", "images", "staging", "failed", "trash"] {
            let dir = root.join(sub);
            fs_err::create_dir_all(&dir)?;
        }
        Ok(Self { root })
    }

    /// The store at [`Store::default_root`].
    pub fn open_default() -> Result<Self, StoreError> {
        Self::open(Self::default_root()?)
    }

    /// `$BUILDER_STORE`, else `$XDG_DATA_HOME/builder`, else `~/.local/share/builder`.
    pub fn default_root() -> Result<PathBuf, StoreError> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(p) = var(STORE_ENV) {
            return Ok(p);
        }
        if let Some(p) = var("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
            return Ok(p.join("builder"));
        }
        var("HOME")
            .map(|h| h.join(".local/share/builder"))
            .ok_or(StoreError::NoHome)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/containers`: the container engine's private storage (buildah's), so
    /// container builds put nothing in the host's own container storage.
    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    fn lock(&self) -> Result<StoreLock, StoreError> {
        let path = self.root.join("lock");
        let file = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok(StoreLock { _file: file })
    }

    fn version_dir(&self, name: &str, version: &Version) -> PathBuf {
        self.root
            .join("images")
            .join(name)
            .join(version.to_string())
    }

    /// Move `path` into the trash (one atomic rename) and delete it from there.
    fn discard(&self, path: &Path) -> Result<(), StoreError> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let trash = self.root.join("trash").join(tag);
        fs_err::rename(path, &trash)?;
        Ok(fs_err::remove_dir_all(&trash)?)
    }

    /// Hand out the next build number of `name/version` (under the lock: two builders never
    /// get the same number) and create the build's folder in `staging/`.
    pub fn allocate_build(&self, name: &str, version: &Version) -> Result<BuildSlot, StoreError> {
        check_name(name)?;
        let _lock = self.lock()?;
        let vdir = self.version_dir(name, version);
        fs_err::create_dir_all(&vdir)?;
        let counter = vdir.join(LAST_BUILD_FILE);
        let last_recorded = match fs_err::read_to_string(&counter) {
            Ok(s) => s.trim().parse::<u32>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e.into()),
        };
        // Also above any folder already there, should the counter have been lost.
        let last_present = numbered_dirs(&vdir)?.into_iter().max().unwrap_or(0);
        let build = last_recorded.max(last_present) + 1;
        write_atomic(&counter, format!("{build}\n").as_bytes())?;

        let build_id = format!(
            "{}-{}",
            Utc::now().format("%Y%m%dT%H%M%SZ"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let dir = self.root.join("staging").join(&build_id);
        let logs = dir.join(LOGS_DIR);
        fs_err::create_dir_all(&logs)?;
        // Taken before the store lock is released: no one ever sees the folder unlocked
        // while this build runs.
        let folder_lock = lock_folder(&dir)?;
        let record = BuildRecord {
            name: name.to_string(),
            version: version.to_string(),
            build,
            build_id: build_id.clone(),
            started: Utc::now(),
            failure: None,
            runner: Some(Runner::current()),
        };
        write_json(&dir.join(BUILD_FILE), &record)?;
        Ok(BuildSlot {
            _folder_lock: folder_lock,
            store: self.clone(),
            id: ImageId {
                name: name.to_string(),
                version: version.to_string(),
                build,
            },
            version: *version,
            record,
            dir,
            done: false,
        })
    }

    /// Every stored build, and every failed one.
    pub fn list(&self) -> Result<Listing, StoreError> {
        let mut listing = Listing::default();
        let images = self.root.join("images");
        for name in sorted_names(&images)? {
            if check_name(&name).is_err() {
                continue;
            }
            for vname in sorted_names(&images.join(&name))? {
                let Ok(version) = vname.parse::<Version>() else {
                    continue;
                };
                let vdir = images.join(&name).join(&vname);
                for build in numbered_dirs(&vdir)? {
                    let dir = vdir.join(build.to_string());
                    match StoredImage::from_dir(&name, version, build, dir) {
                        Ok(img) => listing.images.push(img),
                        Err(e) => listing.unreadable.push(e),
                    }
                }
            }
        }
        listing
            .images
            .sort_by(|a, b| (&a.name, a.version, a.build).cmp(&(&b.name, b.version, b.build)));
        let failed = self.root.join("failed");
        for id in sorted_names(&failed)? {
            let dir = failed.join(&id);
            if let Ok(bytes) = fs_err::read(dir.join(BUILD_FILE))
                && let Ok(record) = serde_json::from_slice::<BuildRecord>(&bytes)
            {
                listing.failed.push(FailedBuild { record, dir });
            }
        }
        listing.failed.sort_by(|a, b| {
            let key = |f: &FailedBuild| {
                (
                    f.record.name.clone(),
                    f.record.version.parse::<Version>().ok(),
                    f.record.build,
                )
            };
            key(a).cmp(&key(b))
        });
        Ok(listing)
    }

    /// Every stored build `reference` matches, sorted by name, version, build.
    pub fn matching(&self, reference: &ImageRef) -> Result<Vec<StoredImage>, StoreError> {
        let listing = self.list()?;
        Ok(listing
            .images
            .into_iter()
            .filter(|i| reference.matches(&i.name, &i.version, i.build))
            .collect())
    }

    /// The image a build of `name` started at `created` replaces: the newest stored build of
    /// that name made before it (by its manifest's `created`), if there is one. Builds being
    /// made, failed or removed are not stored ones, so they never count.
    pub fn replaced_by(
        &self,
        name: &str,
        created: DateTime<Utc>,
    ) -> Result<Option<StoredImage>, StoreError> {
        Ok(self
            .list()?
            .images
            .into_iter()
            .filter(|i| i.name == name && i.manifest.created < created)
            .max_by_key(|i| (i.manifest.created, i.version, i.build)))
    }

    /// The build `reference` means: the newest build of the highest matching version.
    pub fn resolve(&self, reference: &ImageRef) -> Result<StoredImage, StoreError> {
        let mut all = self.matching(reference)?;
        all.pop().ok_or_else(|| self.not_found(reference))
    }

    /// For a recipe's `parentImage: name/1.x.x`: the build it means, with its bootable disk
    /// (`disk` is always `Some` in what this returns) and that disk's sha256 from the manifest.
    pub fn resolve_image(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let reference: ImageRef = reference.parse()?;
        let image = self.resolve(&reference)?;
        if image.kind() == ImageKind::Container {
            return Err(StoreError::ContainerNotMachine {
                image: image.reference(),
            });
        }
        match &image.disk {
            Some(d) if d.path.is_file() => Ok(image),
            // Recorded but gone (removed by hand): as unusable as never exported.
            _ => Err(StoreError::NoDisk {
                image: image.reference(),
            }),
        }
    }

    /// For a container recipe's `parentImage: name/1.x.x`: the container build it means, its
    /// OCI image layout present (`manifest.container` is always `Some` in what this returns).
    pub fn resolve_container(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let reference: ImageRef = reference.parse()?;
        let image = self.resolve(&reference)?;
        if image.kind() != ImageKind::Container || image.manifest.container.is_none() {
            return Err(StoreError::MachineNotContainer {
                image: image.reference(),
            });
        }
        image.layout()?;
        Ok(image)
    }

    /// Where a container parent pulled from a registry is kept: an OCI image layout named by
    /// the digest the recipe pins (`sha256:<hex>` or `<hex>`), `cache/oci/<hex>`.
    /// [`Store::prune_cache`] removes those no stored build names as its parent.
    pub fn oci_parent_dir(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = base::check_digest(digest.strip_prefix("sha256:").unwrap_or(digest))?;
        Ok(self.oci_cache_dir().join(hex))
    }

    fn oci_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("oci")
    }

    /// A failed build with exactly this `name/x.y.z/n`, if there is one.
    pub fn failed_build(&self, reference: &ImageRef) -> Result<Option<FailedBuild>, StoreError> {
        Ok(self.list()?.failed.into_iter().find(|f| {
            f.record.version.parse::<Version>().is_ok_and(|v| {
                reference.is_exact() && reference.matches(&f.record.name, &v, f.record.build)
            })
        }))
    }

    /// The not-found error, with stored names close to the one asked for.
    pub fn not_found(&self, reference: &ImageRef) -> StoreError {
        // Names with at least one stored build (a name whose builds were all removed keeps
        // its folder for the build counter, but there is nothing to suggest).
        let mut names: Vec<String> = self
            .list()
            .map(|l| l.images.into_iter().map(|i| i.name).collect())
            .unwrap_or_default();
        names.dedup();
        let mut close: Vec<(f64, String)> = names
            .into_iter()
            .map(|n| {
                // Damerau-Levenshtein catches swapped letters in short names, which
                // Jaro-Winkler misses; Jaro-Winkler favours a shared prefix in long ones.
                let jw = strsim::jaro_winkler(&n, &reference.name);
                let score = strsim::normalized_damerau_levenshtein(&n, &reference.name)
                    .max(if jw >= 0.85 { jw } else { 0.0 });
                (score, n)
            })
            .filter(|(score, _)| *score >= 0.5)
            .collect();
        close.sort_by(|a, b| b.0.total_cmp(&a.0));
        StoreError::NotFound {
            reference: reference.to_string(),
            close: close.into_iter().map(|(_, n)| n).take(3).collect(),
        }
    }

    /// The stored builds made from `image` (their manifest names it as parent, by reference
    /// or by the digest of its disk).
    pub fn dependents(&self, image: &StoredImage) -> Result<Vec<StoredImage>, StoreError> {
        let me = image.reference();
        let digest = image.disk.as_ref().map(|d| d.sha256.as_str()).or_else(|| {
            let c = image.manifest.container.as_ref()?;
            c.manifest_digest.strip_prefix("sha256:")
        });
        Ok(self
            .list()?
            .images
            .into_iter()
            .filter(|other| other.reference() != me)
            .filter(|other| {
                other.manifest.inputs.parent.as_ref().is_some_and(|p| {
                    p.store_image.as_deref() == Some(me.as_str())
                        || digest.is_some_and(|d| {
                            d == p.sha256.strip_prefix("sha256:").unwrap_or(&p.sha256)
                        })
                })
            })
            .collect())
    }

    /// Remove stored builds: each folder is renamed into the trash, then deleted. Refuses
    /// (removing nothing) if another build that stays uses one of them as its parent, unless
    /// `force`.
    pub fn remove(&self, images: &[StoredImage], force: bool) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        if !force {
            let removing: Vec<String> = images.iter().map(StoredImage::reference).collect();
            for image in images {
                let dependents: Vec<String> = self
                    .dependents(image)?
                    .iter()
                    .map(StoredImage::reference)
                    .filter(|r| !removing.contains(r))
                    .collect();
                if !dependents.is_empty() {
                    return Err(StoreError::InUse {
                        image: image.reference(),
                        dependents,
                    });
                }
            }
        }
        for image in images {
            self.discard(&image.dir)?;
        }
        Ok(())
    }

    /// Append `receipts` to the build's `receipts.json` (under the lock, so two distributions
    /// of one build never lose each other's; written under a temporary name, then renamed).
    pub fn record_receipts(
        &self,
        image: &StoredImage,
        receipts: &[Receipt],
    ) -> Result<(), StoreError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let _lock = self.lock()?;
        if !image.dir.is_dir() {
            return Err(StoreError::NotFound {
                reference: image.reference(),
                close: Vec::new(),
            });
        }
        let mut all = image.receipts();
        all.extend_from_slice(receipts);
        Ok(write_json(&image.dir.join(RECEIPTS_FILE), &all)?)
    }

    /// Clean up abandoned builds (see the module doc): for each build in `staging/` whose
    /// folder lock is free and whose process (as `build.json` names it) is gone from this
    /// host, kill what still uses its disk chain, remove the chain (`work/<id>`) and the
    /// staging folder, and keep its logs in `failed/<id>` with the reason. Builds that run,
    /// ran on another host, or were started by a builder that recorded no process, are left
    /// alone. Every builder command runs this when it opens the store.
    pub fn recover_abandoned(&self) -> Result<Vec<Abandoned>, StoreError> {
        // Nothing in progress (the usual case): no need for the lock.
        if sorted_names(&self.root.join("staging"))?.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        self.recover_abandoned_locked()
    }

    fn recover_abandoned_locked(&self) -> Result<Vec<Abandoned>, StoreError> {
        let staging = self.root.join("staging");
        let mut recovered = Vec::new();
        for id in sorted_names(&staging)? {
            if let Some(abandoned) = self.recover_one(&staging.join(&id), &id)? {
                recovered.push(abandoned);
            }
        }
        Ok(recovered)
    }

    /// One folder of `staging/`, under the store lock: cleaned up if abandoned.
    fn recover_one(&self, dir: &Path, id: &str) -> Result<Option<Abandoned>, StoreError> {
        let folder = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match folder.try_lock() {
            Ok(()) => {}
            // A live build holds it.
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::Lock {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
        let record: Option<BuildRecord> = fs_err::read(dir.join(BUILD_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let reason = match &record {
            // Allocation writes the record under the store lock, which we hold: a folder
            // without one was never a build that could still be running.
            None => "abandoned: the build's folder has no readable build.json".to_string(),
            // An older builder took no folder lock: a free lock proves nothing.
            Some(BuildRecord { runner: None, .. }) => return Ok(None),
            Some(BuildRecord {
                runner: Some(runner),
                ..
            }) => match runner.is_alive() {
                Some(false) => format!(
                    "abandoned: the process running the build ({runner}) ended before the \
                     build finished (killed, crashed, or the machine stopped)"
                ),
                // Alive without its lock cannot happen to a build of ours; another host's
                // process only that host can judge.
                Some(true) | None => return Ok(None),
            },
        };
        let mut abandoned = Abandoned {
            reference: record
                .as_ref()
                .map(|r| format!("{}/{}/{}", r.name, r.version, r.build)),
            build_id: id.to_string(),
            runner: record.as_ref().and_then(|r| r.runner.clone()),
            killed: Vec::new(),
            removed: Vec::new(),
            freed_bytes: 0,
            failed_dir: None,
            reason: reason.clone(),
            problems: Vec::new(),
        };
        // QEMU dies with its builder (parent-death signal); should one have outlived it, it
        // must not keep running on a chain that is about to go.
        let work = self.root.join("work").join(id);
        for process in runner::processes_mentioning(&work.to_string_lossy()) {
            if let Ok(pid) = i32::try_from(process.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                abandoned.killed.push(process.pid);
            }
        }
        if work.exists() {
            let size = tree_size(&work);
            match self.discard(&work) {
                Ok(()) => {
                    abandoned.removed.push(work);
                    abandoned.freed_bytes += size;
                }
                Err(e) => abandoned.problems.push(format!("could not remove: {e}")),
            }
        }
        // What goes: all but the logs and the manifest, which move to `failed/`.
        let size = tree_size(dir)
            .saturating_sub(tree_size(&dir.join(LOGS_DIR)))
            .saturating_sub(tree_size(&dir.join(MANIFEST_FILE)));
        let kept = match &record {
            Some(record) => self.keep_failed(dir, record, &reason).map(Some),
            None => self.discard(dir).map(|()| None),
        };
        match kept {
            Ok(failed) => {
                abandoned.removed.push(dir.to_path_buf());
                abandoned.freed_bytes += size;
                abandoned.failed_dir = failed;
            }
            Err(e) => abandoned.problems.push(format!("could not clean up: {e}")),
        }
        Ok(Some(abandoned))
    }

    /// Keep a failed build's logs (and manifest, if written) in `failed/<build-id>/` with
    /// `failure` recorded in its `build.json`, and delete the rest of its staging folder.
    fn keep_failed(
        &self,
        staging: &Path,
        record: &BuildRecord,
        failure: &str,
    ) -> Result<PathBuf, StoreError> {
        let failed = self.root.join("failed").join(&record.build_id);
        fs_err::create_dir_all(&failed)?;
        for keep in [LOGS_DIR, MANIFEST_FILE] {
            let from = staging.join(keep);
            let to = failed.join(keep);
            // Already there when an earlier attempt was cut short half way.
            if from.exists() && !to.exists() {
                fs_err::rename(&from, &to)?;
            }
        }
        let mut record = record.clone();
        record.failure = Some(failure.to_string());
        write_json(&failed.join(BUILD_FILE), &record)?;
        if staging.exists() {
            self.discard(staging)?;
        }
        Ok(failed)
    }

    /// Clean the parent-image cache (`cache/base/`): remove the parent images no stored build
    /// was made from, partial downloads (`.part`) no one is writing, memos about files no
    /// longer there, and digests of local files that changed or are gone
    /// (`cache/hashes.json`). A stored build's parent is known by its disk digest, or, for
    /// an OCI parent, by the manifest digest, which the pull's memo maps to the disk it
    /// held. A disk chain kept by `--keep-on-failure` keeps the file it is backed by. While
    /// a build is in progress (its folder is in `staging/`) nothing is removed: its disk
    /// chain may be backed by any cached file. Nor is a parent image a cached layer is
    /// backed by (`cache/layers/`). Abandoned builds are cleaned up first.
    pub fn prune_cache(&self) -> Result<PruneReport, StoreError> {
        let _lock = self.lock()?;
        let abandoned = self.recover_abandoned_locked()?;
        let busy = sorted_names(&self.root.join("staging"))?;
        if !busy.is_empty() {
            return Ok(PruneReport {
                removed: Vec::new(),
                builds_in_progress: busy,
                abandoned,
            });
        }
        let cache = self.base_dir();
        let mut used = std::collections::BTreeSet::new();
        for image in self.list()?.images {
            let Some(parent) = &image.manifest.inputs.parent else {
                continue;
            };
            used.insert(
                parent
                    .sha256
                    .strip_prefix("sha256:")
                    .unwrap_or(&parent.sha256)
                    .to_string(),
            );
            used.extend(parent.disk_sha256.clone());
            used.extend(base::read_memo(&base::oci_manifest_memo(
                &cache,
                &parent.sha256,
            )));
        }
        used.extend(self.kept_chain_parents(&cache));
        used.extend(self.layer_cache().bases_in_use());
        let mut removed = Vec::new();
        let remove = |path: &Path, removed: &mut Vec<PathBuf>| -> Result<(), StoreError> {
            fs_err::remove_file(path)?;
            removed.push(path.to_path_buf());
            Ok(())
        };
        let mut memos = Vec::new();
        for name in file_names(&cache)? {
            let path = cache.join(&name);
            match base::CacheFile::parse(&name) {
                Some(base::CacheFile::Disk(sha)) if !used.contains(&sha) => {
                    remove(&path, &mut removed)?;
                }
                Some(base::CacheFile::Part) => {
                    // A download in progress holds its lock; a free one is left over.
                    let Ok(file) = File::open(&path) else {
                        continue;
                    };
                    if file.try_lock().is_ok() {
                        remove(&path, &mut removed)?;
                    }
                }
                Some(base::CacheFile::Memo) => memos.push(path),
                _ => {}
            }
        }
        // A memo is worth keeping only while the disk it names is cached.
        for memo in memos {
            let target = base::read_memo(&memo);
            if target.is_none_or(|sha| self.cached_base(&sha).is_none()) {
                remove(&memo, &mut removed)?;
            }
        }
        // Container parents: layouts no stored build names, and pulls cut short.
        for name in sorted_names(&self.oci_cache_dir())?
            .into_iter()
            .chain(hidden_names(&self.oci_cache_dir())?)
        {
            if !used.contains(&name) {
                let path = self.oci_cache_dir().join(&name);
                self.discard(&path)?;
                removed.push(path);
            }
        }
        self.prune_hash_index_locked();
        removed.sort();
        Ok(PruneReport {
            removed,
            builds_in_progress: Vec::new(),
            abandoned,
        })
    }

    /// Digests of the cached files that disk chains kept in `work/` (keep-on-failure) are
    /// backed by: removing one would break the kept chain.
    fn kept_chain_parents(&self, cache: &Path) -> Vec<String> {
        let mut parents = Vec::new();
        let work = self.root.join("work");
        for id in sorted_names(&work).unwrap_or_default() {
            for name in file_names(&work.join(&id)).unwrap_or_default() {
                let Some(backing) = base::qcow2_backing_file(&work.join(&id).join(&name)) else {
                    continue;
                };
                let backing = PathBuf::from(backing);
                if backing.parent() == Some(cache)
                    && let Some(base::CacheFile::Disk(sha)) = backing
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(base::CacheFile::parse)
                {
                    parents.push(sha);
                }
            }
        }
        parents
    }

    /// Remove a failed build's folder (its logs).
    pub fn remove_failed(&self, failed: &FailedBuild) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        self.discard(&failed.dir)
    }
}

/// A build in progress: its number is taken, its folder lives in `staging/` until
/// [`BuildSlot::commit`] renames it to `images/<name>/<version>/<n>/`. Dropped without
/// commit or abandon (an error, Ctrl-C), it is abandoned: its logs move to `failed/`.
#[derive(Debug)]
pub struct BuildSlot {
    /// The flock on the staging folder, held as long as the build runs: it tells a live
    /// build from an abandoned one. Fields drop after `Drop::drop` moved the folder, so the
    /// lock outlives the folder's move to `images/` or `failed/`.
    _folder_lock: File,
    store: Store,
    id: ImageId,
    version: Version,
    record: BuildRecord,
    dir: PathBuf,
    done: bool,
}

impl BuildSlot {
    /// `name/x.y.z/n`, as recorded in the manifest.
    pub fn id(&self) -> &ImageId {
        &self.id
    }

    pub fn build_id(&self) -> &str {
        &self.record.build_id
    }

    /// Where the build writes its outputs and `manifest.json` (in `staging/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the build writes its logs; kept when the build fails.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join(LOGS_DIR)
    }

    /// Where a container build puts its OCI image layout (`<slot>/oci`).
    pub fn layout_dir(&self) -> PathBuf {
        self.dir.join(layout::LAYOUT_DIR)
    }

    /// What the manifest records about the container image in [`BuildSlot::layout_dir`],
    /// every blob checked (blocking; reads every layer). Set it as the manifest's
    /// `container`, with `kind: container`, before [`BuildSlot::commit`].
    pub fn container_image(&self) -> Result<ContainerImage, StoreError> {
        let layout_error = |source| StoreError::Layout {
            image: self.id.to_string(),
            source: Box::new(source),
        };
        let layout = Layout::open(self.layout_dir()).map_err(layout_error)?;
        let image = layout.verify(None).map_err(layout_error)?;
        Ok(image.facts(layout::LAYOUT_DIR))
    }

    /// Where the build will be once committed.
    pub fn final_dir(&self) -> PathBuf {
        self.store
            .version_dir(&self.id.name, &self.version)
            .join(self.id.build.to_string())
    }

    /// Store the finished build: its `manifest.json` must be there and name this build. One
    /// rename puts the whole folder under its final name.
    pub fn commit(mut self) -> Result<StoredImage, StoreError> {
        let manifest = read_manifest(&self.dir)?;
        if manifest.image != self.id {
            return Err(StoreError::ManifestMismatch {
                path: self.dir.join(MANIFEST_FILE),
                found: manifest.image.to_string(),
                expected: self.id.to_string(),
            });
        }
        let final_dir = self.final_dir();
        {
            let _lock = self.store.lock()?;
            let build_file = self.dir.join(BUILD_FILE);
            fs_err::remove_file(&build_file)?;
            let parent = self.store.version_dir(&self.id.name, &self.version);
            fs_err::create_dir_all(&parent)?;
            fs_err::rename(&self.dir, &final_dir)?;
            self.done = true;
        }
        StoredImage::from_dir(&self.id.name, self.version, self.id.build, final_dir)
    }

    /// The build failed: keep its logs (and manifest, if written) in `failed/<build-id>/`
    /// with `failure` recorded, and delete the rest. Returns the failed build's folder.
    pub fn abandon(mut self, failure: &str) -> Result<PathBuf, StoreError> {
        self.done = true;
        self.abandon_inner(failure)
    }

    fn abandon_inner(&mut self, failure: &str) -> Result<PathBuf, StoreError> {
        self.store.keep_failed(&self.dir, &self.record, failure)
    }
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.abandon_inner("the build was interrupted");
        }
    }
}

/// Sub-folder names of `dir` that are not hidden, sorted; empty if `dir` does not exist.
fn sorted_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    entry_names(dir, |entry, name| {
        !name.starts_with('.') && entry.path().is_dir()
    })
}

/// Hidden sub-folder names of `dir` (`.…partial-…`: work cut short), sorted.
fn hidden_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    entry_names(dir, |entry, name| {
        name.starts_with('.') && entry.path().is_dir()
    })
}

/// Names of the plain files in `dir`, sorted; empty if `dir` does not exist.
fn file_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    entry_names(dir, |entry, _| entry.file_type().is_ok_and(|t| t.is_file()))
}

/// Names of the entries of `dir` that `keep` accepts, sorted; empty if `dir` does not exist.
fn entry_names(
    dir: &Path,
    keep: impl Fn(&fs_err::DirEntry, &str) -> bool,
) -> Result<Vec<String>, StoreError> {
    let entries = match fs_err::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep(&entry, &name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Bytes of the files under `path` (best effort: what cannot be read counts as nothing).
fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs_err::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs_err::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| tree_size(&e.path()))
        .sum()
}

/// Lock a build's staging folder (flock on the folder itself), without waiting.
fn lock_folder(dir: &Path) -> Result<File, StoreError> {
    let folder = File::open(dir)?;
    folder.try_lock().map_err(|e| StoreError::Lock {
        path: dir.to_path_buf(),
        source: match e {
            std::fs::TryLockError::WouldBlock => {
                std::io::Error::other("another process holds the build's lock")
            }
            std::fs::TryLockError::Error(e) => e,
        },
    })?;
    Ok(folder)
}

/// Build numbers present as folders in a version folder.
fn numbered_dirs(vdir: &Path) -> Result<Vec<u32>, StoreError> {
    let mut v: Vec<u32> = sorted_names(vdir)?
        .iter()
        .filter_map(|n| {
            n.parse::<u32>()
                .ok()
                .filter(|b| *b > 0 && n == &b.to_string())
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The manifest of the build in `dir`.
fn read_manifest(dir: &Path) -> Result<Manifest, StoreError> {
    Manifest::read(&dir.join(MANIFEST_FILE)).map_err(|source| StoreError::Manifest {
        path: dir.to_path_buf(),
        source,
    })
}

// The store's files are written whole or not at all, as every file builder writes in place.
pub use crate::atomic::{write_atomic, write_json};

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_for(slot: &BuildSlot) -> Manifest {
        Manifest::new(slot.id().clone(), slot.build_id())
    }

    #[test]
    fn the_replaced_image_is_the_newest_of_the_name_made_before() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let start = Utc::now() - chrono::Duration::hours(10);
        // (name, version, made hours after `start`), stored in this order.
        for (name, version, hours) in [
            ("web", Version::new(2, 0, 0), 1),
            ("web", Version::new(1, 0, 0), 3),
            ("web", Version::new(1, 0, 0), 5),
            ("db", Version::new(1, 0, 0), 6),
        ] {
            let slot = store.allocate_build(name, &version).expect("slot");
            let mut m = manifest_for(&slot);
            m.created = start + chrono::Duration::hours(hours);
            m.write(slot.dir()).expect("manifest");
            slot.commit().expect("commit");
        }
        let replaced = |hours| {
            store
                .replaced_by("web", start + chrono::Duration::hours(hours))
                .expect("list")
                .map(|i| i.reference())
        };
        // By when it was made, not by version: the 1.0.0 hotfix replaced the 2.0.0.
        assert_eq!(replaced(4).as_deref(), Some("web/1.0.0/1"));
        assert_eq!(replaced(7).as_deref(), Some("web/1.0.0/2"));
        assert_eq!(replaced(2).as_deref(), Some("web/2.0.0/1"));
        assert_eq!(replaced(1), None, "made at the same time is not before");
        assert_eq!(
            store
                .replaced_by("app", Utc::now())
                .expect("list")
                .map(|i| i.reference()),
            None
        );
    }

    #[test]
    fn numbers_increase_and_commit_renames_into_place() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let v = Version::new(1, 2, 0);
        let a = store.allocate_build("web", &v).expect("a");
        let b = store.allocate_build("web", &v).expect("b");
        assert_eq!((a.id().build, b.id().build), (1, 2));
        assert!(a.dir().starts_with(tmp.path().join("staging")));

        // No manifest: commit refuses, and the slot is abandoned on drop.
        let e = a.commit().expect_err("no manifest");
        assert!(matches!(e, StoreError::Manifest { .. }), "{e}");
        assert_eq!(store.list().expect("list").failed.len(), 1);

        manifest_for(&b).write(b.dir()).expect("manifest");
        fs_err::write(b.logs_dir().join("console.log"), "hello").expect("log");
        let img = b.commit().expect("commit");
        assert_eq!(img.dir, tmp.path().join("images/web/1.2.0/2"));
        assert!(img.logs_dir().join("console.log").exists());
        assert!(!img.dir.join(BUILD_FILE).exists());
        assert_eq!(
            fs_err::read_dir(tmp.path().join("staging"))
                .expect("ls")
                .count(),
            0,
            "staging is empty"
        );
        // Numbers are never reused, even after removal.
        store.remove(std::slice::from_ref(&img), false).expect("rm");
        let c = store.allocate_build("web", &v).expect("c");
        assert_eq!(c.id().build, 3);
        let failed = c.abandon("boom").expect("abandon");
        let record: BuildRecord =
            serde_json::from_slice(&fs_err::read(failed.join(BUILD_FILE)).expect("read"))
                .expect("json");
        assert_eq!(record.failure.as_deref(), Some("boom"));
        assert!(failed.join(LOGS_DIR).is_dir());
    }

    /// A runner that was alive once and is gone now: a process that ran and was reaped.
    fn dead_runner() -> Runner {
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        let ticks = fs_err::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(19)?.parse().ok())
            });
        child.wait().expect("reap");
        Runner {
            pid,
            start_ticks: ticks.or(Some(1)),
            ..Runner::current()
        }
    }

    /// A staging folder as a build of `runner` leaves it when killed: its record, a log, a
    /// half-written output, and a disk chain in `work/`.
    fn killed_build(store: &Store, name: &str, runner: Option<Runner>) -> String {
        let slot = store
            .allocate_build(name, &Version::new(1, 0, 0))
            .expect("slot");
        let id = slot.build_id().to_string();
        let dir = slot.dir().to_path_buf();
        fs_err::write(slot.logs_dir().join("build.log"), "component started").expect("log");
        fs_err::write(dir.join("out.qcow2.partial"), vec![0u8; 4096]).expect("partial");
        let work = store.root().join("work").join(&id);
        fs_err::create_dir_all(&work).expect("work");
        fs_err::write(work.join("0-boot.qcow2"), vec![0u8; 8192]).expect("chain");
        let mut record = slot.record.clone();
        record.runner = runner;
        write_json(&dir.join(BUILD_FILE), &record).expect("record");
        // The process is gone: its slot never ran `Drop`, its lock went with it.
        let mut slot = slot;
        slot.done = true;
        drop(slot);
        id
    }

    #[test]
    fn an_abandoned_build_is_cleaned_up_and_its_logs_kept_with_the_reason() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let runner = dead_runner();
        let id = killed_build(&store, "web", Some(runner.clone()));
        let live = store
            .allocate_build("web", &Version::new(1, 0, 0))
            .expect("a live build");

        let cleaned = store.recover_abandoned().expect("recover");
        assert_eq!(cleaned.len(), 1, "{cleaned:?}");
        let a = &cleaned[0];
        assert_eq!(a.build_id, id);
        assert_eq!(a.reference.as_deref(), Some("web/1.0.0/1"));
        assert_eq!(a.runner.as_ref(), Some(&runner));
        assert_eq!(
            a.removed,
            [
                tmp.path().join("work").join(&id),
                tmp.path().join("staging").join(&id)
            ]
        );
        // The chain and the partial output (and the old build.json, a few hundred bytes).
        assert!(
            (8192 + 4096..8192 + 4096 + 1024).contains(&a.freed_bytes),
            "{a:?}"
        );
        assert!(a.problems.is_empty(), "{a:?}");
        let failed = tmp.path().join("failed").join(&id);
        assert_eq!(a.failed_dir.as_deref(), Some(failed.as_path()));
        let text = a.to_string();
        assert!(text.contains("web/1.0.0/1"), "{text}");
        assert!(text.contains(&format!("pid {}", runner.pid)), "{text}");
        assert!(text.contains("logs are in"), "{text}");

        // Kept like any failed build's: listed, with the reason and the log.
        let listing = store.list().expect("list");
        assert_eq!(listing.failed.len(), 1);
        let reason = listing.failed[0].record.failure.as_deref().unwrap_or("");
        assert!(reason.starts_with("abandoned: "), "{reason}");
        assert!(reason.contains(&format!("pid {}", runner.pid)), "{reason}");
        assert_eq!(
            fs_err::read_to_string(failed.join("logs/build.log")).expect("log"),
            "component started"
        );
        assert!(!failed.join("out.qcow2.partial").exists());
        // The live build is untouched, and nothing else is left.
        assert!(live.dir().is_dir());
        assert_eq!(
            sorted_names(&tmp.path().join("work")).expect("ls"),
            Vec::<String>::new()
        );
        assert_eq!(
            sorted_names(&tmp.path().join("trash")).expect("ls"),
            Vec::<String>::new()
        );
        assert!(store.recover_abandoned().expect("again").is_empty());
        drop(live);
    }

    #[test]
    fn a_build_whose_lock_is_held_is_never_taken_for_abandoned() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        // Its record names a dead process (a pid namespace we cannot see, say), but another
        // process holds its lock: it runs.
        let id = killed_build(&store, "web", Some(dead_runner()));
        let dir = tmp.path().join("staging").join(&id);
        // The lock is on the folder opened by the shell, kept by `sleep` after the exec.
        // It says when it holds the lock: probing with a lock of our own could take it in the
        // very moment the shell tries, and make its `flock -n` fail.
        let mut holder = std::process::Command::new("sh")
            .args([
                "-c",
                r#"exec 9<"$0"; flock -n 9 || exit 7; echo locked; exec sleep 300"#,
            ])
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh and flock (util-linux)");
        let mut said = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.as_mut().expect("stdout")),
            &mut said,
        )
        .expect("read");
        assert_eq!(said.trim(), "locked", "the lock holder failed to lock");
        assert!(store.recover_abandoned().expect("recover").is_empty());
        let report = store.prune_cache().expect("prune");
        assert_eq!(report.builds_in_progress, std::slice::from_ref(&id));
        assert!(dir.is_dir());

        holder.kill().expect("kill");
        holder.wait().expect("reap");
        let report = store.prune_cache().expect("prune");
        assert!(report.builds_in_progress.is_empty(), "{report:?}");
        assert_eq!(report.abandoned.len(), 1, "{report:?}");
        assert!(!dir.exists());
    }

    #[test]
    fn builds_no_one_can_judge_here_are_left_alone() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let me = Runner::current();
        let elsewhere = Runner {
            host: format!("{}-other", me.host),
            ..dead_runner()
        };
        // Another host's process; a record from a builder that took no lock; this process
        // (alive) without its lock.
        let ids = [
            killed_build(&store, "a", Some(elsewhere)),
            killed_build(&store, "b", None),
            killed_build(&store, "c", Some(me)),
        ];
        assert!(store.recover_abandoned().expect("recover").is_empty());
        for id in &ids {
            assert!(tmp.path().join("staging").join(id).is_dir());
            assert!(tmp.path().join("work").join(id).is_dir());
        }
        // A folder with no record at all was never a running build: it goes.
        let debris = tmp.path().join("staging/20240101T000000Z-deadbeef");
        fs_err::create_dir_all(debris.join("logs")).expect("debris");
        let cleaned = store.recover_abandoned().expect("recover");
        assert_eq!(cleaned.len(), 1, "{cleaned:?}");
        assert_eq!(cleaned[0].reference, None);
        assert_eq!(cleaned[0].failed_dir, None);
        assert!(!debris.exists());
    }

    #[test]
    fn a_kept_chain_and_oci_parents_survive_pruning_and_leftovers_do_not() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let cache = store.base_dir();
        let [oci_disk, manifest, kept, unused, stale] =
            ["a", "b", "c", "d", "e"].map(|c| c.repeat(64));
        for sha in [&oci_disk, &kept, &unused] {
            fs_err::write(cache.join(format!("{sha}.qcow2")), "disk").expect("cache");
        }
        // The OCI pull's memo: manifest digest → the disk it held.
        base::write_memo(
            &base::oci_manifest_memo(&cache, &format!("sha256:{manifest}")),
            &oci_disk,
        );
        // Memos about disks no longer cached, and partial downloads no one writes.
        base::write_memo(&base::oci_manifest_memo(&cache, &stale), &stale);
        base::write_memo(&base::oci_layer_memo(&cache, &unused), &stale);
        fs_err::write(cache.join(format!("{stale}.part")), "half").expect("part");
        fs_err::write(cache.join(format!("layer-{stale}.part")), "half").expect("part");
        // A download in progress: its `.part` is locked.
        let busy_part = cache.join(format!("{unused}.part"));
        let busy = File::create(&busy_part).expect("part");
        busy.lock().expect("lock");
        // A stored build on the OCI parent: its manifest records the manifest digest.
        let slot = store
            .allocate_build("web", &Version::new(1, 0, 0))
            .expect("slot");
        let mut m = manifest_for(&slot);
        m.inputs.parent = Some(manifest::ParentInput {
            source: format!("oci://127.0.0.1:5000/base:1@sha256:{manifest}"),
            sha256: manifest.clone(),
            store_image: None,
            disk_sha256: None,
        });
        m.write(slot.dir()).expect("manifest");
        slot.commit().expect("commit");
        // A chain kept by --keep-on-failure, backed by a cached file.
        let chain = tmp.path().join("work/20240101T000000Z-0000kept");
        fs_err::create_dir_all(&chain).expect("chain");
        let backing = cache.join(format!("{kept}.qcow2"));
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
            .arg(&backing)
            .arg(chain.join("0-boot.qcow2"))
            .arg("1G")
            .status()
            .expect("qemu-img (scripts/install-deps)");
        assert!(status.success());

        let report = store.prune_cache().expect("prune");
        let names = |dir: &Path| file_names(dir).expect("ls");
        assert_eq!(
            names(&cache),
            [
                format!("{oci_disk}.qcow2"),
                format!("{kept}.qcow2"),
                format!("{unused}.part"),
                format!("manifest-{manifest}.sha256"),
            ],
            "{report:?}"
        );
        assert_eq!(report.removed.len(), 5, "{report:?}");
        drop(busy);
    }

    #[test]
    fn a_container_build_is_stored_resolved_verified_and_kept_apart_from_machine_builds() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let slot = store
            .allocate_build("tools", &Version::new(1, 0, 0))
            .expect("slot");
        let (_, image) = layout::tests::small_layout(&slot.layout_dir());
        let mut m = manifest_for(&slot);
        m.kind = ImageKind::Container;
        m.container = Some(slot.container_image().expect("facts"));
        assert_eq!(
            m.container.as_ref().map(|c| c.manifest_digest.clone()),
            Some(image.descriptor.digest.clone())
        );
        m.write(slot.dir()).expect("manifest");
        let stored = slot.commit().expect("commit");
        assert_eq!(stored.kind(), ImageKind::Container);
        assert!(stored.disk.is_none());
        let text = fs_err::read_to_string(stored.dir.join(MANIFEST_FILE)).expect("read");
        assert!(text.contains("\"kind\": \"container\""), "{text}");

        let found = store.resolve_container("tools/1.x.x").expect("container");
        assert_eq!(found.reference(), "tools/1.0.0/1");
        found.verify().expect("verified");
        let e = store
            .resolve_image("tools")
            .expect_err("not a machine build");
        assert!(matches!(e, StoreError::ContainerNotMachine { .. }), "{e}");

        // A machine build is not a container parent.
        let machine = store
            .allocate_build("web", &Version::new(1, 0, 0))
            .expect("slot");
        manifest_for(&machine)
            .write(machine.dir())
            .expect("manifest");
        machine.commit().expect("commit");
        let e = store.resolve_container("web").expect_err("machine");
        assert!(e.to_string().contains("is a machine build"), "{e}");

        // A build made from it (by its manifest digest) keeps it from removal.
        let child = store
            .allocate_build("app", &Version::new(1, 0, 0))
            .expect("slot");
        let mut m = manifest_for(&child);
        m.inputs.parent = Some(manifest::ParentInput {
            source: "tools/1.x.x".into(),
            sha256: image.descriptor.digest.clone(),
            store_image: None,
            disk_sha256: None,
        });
        m.write(child.dir()).expect("manifest");
        child.commit().expect("commit");
        let e = store
            .remove(std::slice::from_ref(&found), false)
            .expect_err("in use");
        assert!(matches!(e, StoreError::InUse { .. }), "{e}");

        // A changed layer is found.
        let layer = found
            .layout()
            .expect("layout")
            .blob_path(&image.manifest.layers[0].digest)
            .expect("path");
        let mut bytes = fs_err::read(&layer).expect("read");
        bytes[0] ^= 1;
        fs_err::write(&layer, bytes).expect("tamper");
        let e = found.verify().expect_err("tampered");
        assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
        store.remove(&[found], true).expect("rm");
    }

    #[test]
    fn pulled_container_parents_no_stored_build_names_are_pruned() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let [kept, unused] = ["a", "b"].map(|c| c.repeat(64));
        for hex in [&kept, &unused] {
            let dir = store.oci_parent_dir(&format!("sha256:{hex}")).expect("dir");
            layout::tests::small_layout(&dir);
        }
        let partial = tmp.path().join("cache/oci/.x.partial-1234");
        fs_err::create_dir_all(&partial).expect("partial");
        assert!(store.oci_parent_dir("sha256:nope").is_err());
        let slot = store
            .allocate_build("tools", &Version::new(1, 0, 0))
            .expect("slot");
        let mut m = manifest_for(&slot);
        m.inputs.parent = Some(manifest::ParentInput {
            source: format!("oci://127.0.0.1:5000/base@sha256:{kept}"),
            sha256: format!("sha256:{kept}"),
            store_image: None,
            disk_sha256: None,
        });
        m.write(slot.dir()).expect("manifest");
        slot.commit().expect("commit");
        let report = store.prune_cache().expect("prune");
        let oci = tmp.path().join("cache/oci");
        assert_eq!(
            report.removed,
            [oci.join(".x.partial-1234"), oci.join(&unused)]
        );
        assert_eq!(sorted_names(&oci).expect("ls"), [kept]);
    }

    #[test]
    fn a_manifest_for_another_build_is_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Store::open(tmp.path()).expect("open");
        let slot = store
            .allocate_build("web", &Version::new(1, 0, 0))
            .expect("slot");
        let mut m = manifest_for(&slot);
        m.image.build = 9;
        m.write(slot.dir()).expect("write");
        let e = slot.commit().expect_err("mismatch");
        assert!(e.to_string().contains("web/1.0.0/9"), "{e}");
        assert!(store.list().expect("list").images.is_empty());
    }
}
