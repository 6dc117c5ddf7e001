//! The local store: parent images cached by digest, and every build as an image version
//! `name/x.y.z/n` with its manifest, outputs and logs. Owns the folder layout below and the
//! lock that keeps concurrent builders apart; it never runs a VM or converts a disk.
//!
//! ```text
//! <store>/                            $BUILDER_STORE, else $XDG_DATA_HOME/builder,
//!                                     else ~/.local/share/builder
//!   lock                              flock: build numbers, commits, removals, hash index
//!   cache/base/<sha256>.qcow2         parent images by digest (downloads land here, verified)
//!   cache/base/<sha256>.part          a download in progress; resumed with an HTTP Range
//!   cache/hashes.json                 digests of local parent images by (path, size, mtime,
//!                                     inode), so a 1 GiB base is not re-hashed every build
//!   images/<name>/<x.y.z>/.last-build the highest build number handed out for this version
//!   images/<name>/<x.y.z>/<n>/        one finished build: manifest.json, the outputs,
//!                                     SHA256SUMS, logs/, receipts.json (where it was
//!                                     distributed; appended under the lock)
//!   staging/<build-id>/               a build in progress (build.json says which);
//!                                     renamed to images/… by commit, never copied
//!   failed/<build-id>/                a failed build: build.json, logs/, manifest.json if any
//!   trash/<random>/                   removals: renamed here (atomic), then deleted
//! ```
//!
//! A build number is handed out under the lock and never handed out again, even if that
//! build fails or is removed, so `name/1.2.0/3` always means the same build. A finished
//! build appears under its final name in one rename, so readers never see half of one.

pub mod base;
pub mod reference;

use std::fs::File;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::export::manifest::{ImageId, MANIFEST_FILE};
use crate::export::{Artifact, ExportError, Format, Manifest};

pub use base::{BaseImage, DownloadProgress, FetchOptions, NoDownloadProgress};
pub use reference::{ImageRef, Version, VersionPattern, check_name};

/// Environment variable naming the store folder.
pub const STORE_ENV: &str = "BUILDER_STORE";

/// The logs folder inside a build's folder.
pub const LOGS_DIR: &str = "logs";

/// Where a build was distributed, in its folder: a JSON array of receipts, oldest first.
pub const RECEIPTS_FILE: &str = "receipts.json";

const BUILD_FILE: &str = "build.json";
const LAST_BUILD_FILE: &str = ".last-build";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot find the store folder: set ${STORE_ENV}, $XDG_DATA_HOME or $HOME")]
    NoHome,
    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{name}` is not a valid image name: {reason}")]
    BadName { name: String, reason: String },
    #[error("`{version}` is not a valid version: {reason}")]
    BadVersion { version: String, reason: String },
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
    #[error("{image} is the parent of {}; remove those first or force it", dependents.join(", "))]
    InUse {
        image: String,
        dependents: Vec<String>,
    },
    #[error("the build in {path} has no readable manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ExportError,
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

impl StoreError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
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
    /// only returns images that have one.
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
    pub fn receipts(&self) -> Vec<crate::distribute::Receipt> {
        std::fs::read(self.dir.join(RECEIPTS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Total size of the outputs in bytes.
    pub fn outputs_size(&self) -> u64 {
        self.manifest.outputs.iter().map(|a| a.size).sum()
    }

    /// Recompute the sha256 of every output and compare it with the manifest (blocking; reads
    /// every file). Returns the first output that is missing or differs.
    pub fn verify(&self) -> Result<(), StoreError> {
        for a in &self.manifest.outputs {
            let path = a.path(&self.dir);
            let actual = crate::export::sha256_file(&path).map_err(|e| StoreError::Io {
                action: "hash",
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
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

    fn from_dir(
        name: &str,
        version: Version,
        build: u32,
        dir: PathBuf,
    ) -> Result<Self, StoreError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = Manifest::read(&manifest_path).map_err(|source| StoreError::Manifest {
            path: dir.clone(),
            source,
        })?;
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
    /// The cached files removed.
    pub removed: Vec<PathBuf>,
    /// Build ids in `staging/` that kept the cache as it was.
    pub builds_in_progress: Vec<String>,
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
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
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

    fn lock(&self) -> Result<StoreLock, StoreError> {
        let path = self.root.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(StoreError::io("open", &path))?;
        file.lock().map_err(StoreError::io("lock", &path))?;
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
        std::fs::rename(path, &trash).map_err(StoreError::io("move to the trash", path))?;
        std::fs::remove_dir_all(&trash).map_err(StoreError::io("delete", &trash))
    }

    /// Hand out the next build number of `name/version` (under the lock: two builders never
    /// get the same number) and create the build's folder in `staging/`.
    pub fn allocate_build(&self, name: &str, version: &Version) -> Result<BuildSlot, StoreError> {
        check_name(name)?;
        let _lock = self.lock()?;
        let vdir = self.version_dir(name, version);
        std::fs::create_dir_all(&vdir).map_err(StoreError::io("create", &vdir))?;
        let counter = vdir.join(LAST_BUILD_FILE);
        let last_recorded = match std::fs::read_to_string(&counter) {
            Ok(s) => s.trim().parse::<u32>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(StoreError::io("read", &counter)(e)),
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
        std::fs::create_dir_all(&logs).map_err(StoreError::io("create", &logs))?;
        let record = BuildRecord {
            name: name.to_string(),
            version: version.to_string(),
            build,
            build_id: build_id.clone(),
            started: Utc::now(),
            failure: None,
        };
        write_json(&dir.join(BUILD_FILE), &record)?;
        Ok(BuildSlot {
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
            if let Ok(bytes) = std::fs::read(dir.join(BUILD_FILE))
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
        match &image.disk {
            Some(d) if d.path.is_file() => Ok(image),
            // Recorded but gone (removed by hand): as unusable as never exported.
            _ => Err(StoreError::NoDisk {
                image: image.reference(),
            }),
        }
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
        let digest = image.disk.as_ref().map(|d| d.sha256.as_str());
        Ok(self
            .list()?
            .images
            .into_iter()
            .filter(|other| other.reference() != me)
            .filter(|other| {
                other.manifest.inputs.parent.as_ref().is_some_and(|p| {
                    p.store_image.as_deref() == Some(me.as_str())
                        || digest.is_some_and(|d| d == p.sha256)
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
        receipts: &[crate::distribute::Receipt],
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
        write_json(&image.dir.join(RECEIPTS_FILE), &all)
    }

    /// Remove cached parent images (`cache/base/<sha256>.qcow2`) that no stored build names
    /// as its parent (by digest). While a build is in progress (its folder is in `staging/`)
    /// nothing is removed: its disk chain may be backed by any cached file.
    pub fn prune_cache(&self) -> Result<PruneReport, StoreError> {
        let _lock = self.lock()?;
        let staging = self.root.join("staging");
        let busy = sorted_names(&staging)?;
        if !busy.is_empty() {
            return Ok(PruneReport {
                removed: Vec::new(),
                builds_in_progress: busy,
            });
        }
        let listing = self.list()?;
        let used: std::collections::BTreeSet<String> = listing
            .images
            .iter()
            .filter_map(|i| i.manifest.inputs.parent.as_ref().map(|p| p.sha256.clone()))
            .collect();
        let dir = self.root.join("cache").join("base");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PruneReport::default()),
            Err(e) => return Err(StoreError::io("list", &dir)(e)),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(StoreError::io("list", &dir))?;
            let path = entry.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".qcow2"))
            else {
                continue;
            };
            let is_digest = stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit());
            if is_digest && !used.contains(stem) {
                std::fs::remove_file(&path).map_err(StoreError::io("remove", &path))?;
                removed.push(path);
            }
        }
        removed.sort();
        Ok(PruneReport {
            removed,
            builds_in_progress: Vec::new(),
        })
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

    /// Where the build will be once committed.
    pub fn final_dir(&self) -> PathBuf {
        self.store
            .version_dir(&self.id.name, &self.version)
            .join(self.id.build.to_string())
    }

    /// Store the finished build: its `manifest.json` must be there and name this build. One
    /// rename puts the whole folder under its final name.
    pub fn commit(mut self) -> Result<StoredImage, StoreError> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        let manifest = Manifest::read(&manifest_path).map_err(|source| StoreError::Manifest {
            path: self.dir.clone(),
            source,
        })?;
        if manifest.image != self.id {
            return Err(StoreError::ManifestMismatch {
                path: manifest_path,
                found: manifest.image.to_string(),
                expected: self.id.to_string(),
            });
        }
        let final_dir = self.final_dir();
        {
            let _lock = self.store.lock()?;
            let build_file = self.dir.join(BUILD_FILE);
            std::fs::remove_file(&build_file).map_err(StoreError::io("remove", &build_file))?;
            let parent = final_dir.parent().expect("a build folder has a parent");
            std::fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
            std::fs::rename(&self.dir, &final_dir)
                .map_err(StoreError::io("move the build into", &final_dir))?;
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
        let failed = self.store.root.join("failed").join(&self.record.build_id);
        std::fs::create_dir_all(&failed).map_err(StoreError::io("create", &failed))?;
        for keep in [LOGS_DIR, MANIFEST_FILE] {
            let from = self.dir.join(keep);
            if from.exists() {
                let to = failed.join(keep);
                std::fs::rename(&from, &to).map_err(StoreError::io("keep", &from))?;
            }
        }
        let mut record = self.record.clone();
        record.failure = Some(failure.to_string());
        write_json(&failed.join(BUILD_FILE), &record)?;
        if self.dir.exists() {
            self.store.discard(&self.dir)?;
        }
        Ok(failed)
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
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
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

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    crate::export::manifest::write_atomic(path, bytes).map_err(|e| match e {
        ExportError::Io {
            action,
            path,
            source,
        } => StoreError::Io {
            action,
            path,
            source,
        },
        other => StoreError::Io {
            action: "write",
            path: path.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut json = serde_json::to_vec_pretty(value).expect("plain data always serializes");
    json.push(b'\n');
    write_atomic(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_for(slot: &BuildSlot) -> Manifest {
        Manifest::new(slot.id().clone(), slot.build_id())
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
        std::fs::write(b.logs_dir().join("console.log"), "hello").expect("log");
        let img = b.commit().expect("commit");
        assert_eq!(img.dir, tmp.path().join("images/web/1.2.0/2"));
        assert!(img.logs_dir().join("console.log").exists());
        assert!(!img.dir.join(BUILD_FILE).exists());
        assert_eq!(
            std::fs::read_dir(tmp.path().join("staging"))
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
            serde_json::from_slice(&std::fs::read(failed.join(BUILD_FILE)).expect("read"))
                .expect("json");
        assert_eq!(record.failure.as_deref(), Some("boom"));
        assert!(failed.join(LOGS_DIR).is_dir());
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
