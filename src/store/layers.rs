//! The layer cache: component layers (qcow2 files) kept by the plan's layer keys, so a later
//! build resumes from the longest cached prefix of its chain instead of running every
//! component. Owns `cache/layers/`; it never runs a VM and does not decide what to cache
//! (the build stages do).
//!
//! ```text
//! <store>/cache/layers/
//!   <key>.qcow2        one layer; its backing file is `<parent key>.qcow2` (relative, so the
//!                      chain resolves inside the cache), or for a first layer the parent
//!                      image (`../base/<sha256>.qcow2` when it is in the store, else an
//!                      absolute path)
//!   <key>.json         its record (LayerRecord): key, parent key, backing file, component,
//!                      sha256 and size of the cached file, created, last used, which build
//!   .tmp-<random>      an insert in progress (flock held by the inserter), renamed into place
//! ```
//!
//! **Keys** are the plan's layer keys (`build::plan`): the first layer's key is the plan's
//! root key (parent digest + the settings that shape the disk before the first component),
//! each next one hashes the previous key with what the component runs. A key therefore names
//! the whole chain below it: a layer's parent key is fixed by its key.
//!
//! **Insert** ([`LayerCache::insert`]) copies a committed layer (the kernel shares the extents
//! where the file system can: `copy_file_range`), never hardlinks it (the rebase rewrites the
//! header in place, and the build's own chain still reads that file), under a temporary
//! name; rewrites the copy's backing reference to the cached parent (`qemu-img rebase -u`:
//! only the header changes, the clusters are the guest's writes); hashes it after the
//! rebase; then, under the store lock, renames it to `<key>.qcow2` and writes the record. The
//! file comes first and the record last, both under the store lock, so a record always names
//! a complete file; a file without a record is an insert that died and is removed. Two
//! inserts of the same key: the first to take the store lock wins and the other's copy is
//! deleted; a placed layer is never replaced, because its children were written on top of
//! exactly its clusters. For the same reason a child names the parent it was written on by
//! its key *and* the sha256 of that cached file ([`LayerParent::Layer`]): a build that lost
//! the race for a key built its next layers on its own copy, which the cache does not hold,
//! and inserting them under the winner's file is refused ([`LayerCacheError::ParentDiffers`]).
//!
//! **Lookup** ([`LayerCache::lookup`]) walks the chain from the first key and returns the
//! longest prefix that is cached and sound. Each layer is checked before use: the record is
//! there and names this key and the expected parent, the first layer is backed by the very
//! file the build's plan verified as its parent (same path: the key names the parent's
//! digest, not where it is), the file's size (cheap) and then its sha256 match the record. A layer that fails is
//! reported ([`Discarded`]), removed with its record and with every layer whose chain goes
//! through it, and the prefix stops before it. Lookup updates each returned layer's last use.
//!
//! **In use**: every layer lookup or insert returns holds a shared `flock` on its file
//! ([`CachedLayer`] is the guard) for as long as the build keeps the guard. Pruning takes the
//! exclusive lock of what it removes without waiting and skips what it cannot lock.
//!
//! **Prune** ([`LayerCache::prune`]) removes leaves only: a layer goes once no cached layer
//! is built on it, so a child never outlives its parent. Least recently used leaf first until
//! the cache fits `max_size`; leaves unused for `older_than` (and then their parents, once
//! they are leaves and old too); or everything with `all`. A layer in use keeps its whole
//! chain (its parents are not leaves). Leftovers are removed whatever the options: temporary
//! files no insert holds, files without a record, records without a file, and orphans (a
//! layer whose parent is gone, with its descendants). [`Store::prune_layers_to_cap`] prunes
//! to the cap the store's `config.yml` sets ([`super::config`]): every successful build
//! does, once it is done.
//!
//! **A build uses it** like this: `lookup(parent image, chain)`; boot an overlay on the
//! last returned layer's path (or on the parent image when none); after each commit,
//! `insert` the sealed layer on [`LayerParent::Base`] (the first) or on
//! [`LayerParent::Layer`] with the previous layer's key and sha256, and stop inserting once
//! one is refused; keep every guard until the build's VM is gone. The chain's first layer
//! is what lies between the parent image and the first component: in `build::layers` that
//! is the boot layer (first boot, cloud-init), which the first component's layer is written
//! on, so it is cached too, under the plan's root key, and the chain is the root key then
//! each component's key. A layer is never rebased onto anything but the layer it was
//! written on.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fs_err::File;
use serde::{Deserialize, Serialize};

use super::config::ConfigError;
use super::manifest::DocumentInput;
use super::{Store, StoreError, human_size, write_json};
use crate::digest::sha256_file;
use crate::recipe::ByteSize;
use crate::vm::DiskFormat;
use crate::vm::img;

/// Prefix of inserts in progress in `cache/layers/`.
const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum LayerCacheError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file system call failed; fs-err's error names the path.
    #[error(transparent)]
    Io(std::io::Error),
    /// The disk (or the user's quota) is full; the source names the file being written. The
    /// cache is left as it was: nothing is under a final name half written.
    #[error("no space left to write the layer cache")]
    Full(#[source] std::io::Error),
    #[error("`{key}` is not a layer key (64 hex digits)")]
    BadKey { key: String },
    /// qemu-img's error names the file.
    #[error("could not point the cached copy of layer {key} at its parent")]
    Rebase {
        key: String,
        #[source]
        source: img::ImgError,
    },
    #[error("layer {key} cannot be cached: its parent layer {parent} is not in the cache")]
    ParentMissing { key: String, parent: String },
    #[error(
        "layer {key} cannot be cached: it was written on a copy of layer {parent} (sha256 \
         {built_on}) that is not the cached one (sha256 {cached})"
    )]
    ParentDiffers {
        key: String,
        parent: String,
        built_on: String,
        cached: String,
    },
    #[error("layer {key} cannot be cached: its parent image {} does not exist", path.display())]
    BaseMissing { key: String, path: PathBuf },
    #[error("a layer cache task stopped unexpectedly: {0}")]
    Task(String),
    /// The store's `config.yml` (which sets the cache's cap) is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl From<std::io::Error> for LayerCacheError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => Self::Full(e),
            _ => Self::Io(e),
        }
    }
}

/// What the cache knows about one layer (`<key>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerRecord {
    /// The plan's layer key (64 hex digits).
    pub key: String,
    /// The key of the layer below; `None` for a first layer, which is backed by the parent
    /// image.
    pub parent: Option<String>,
    /// The backing file as the layer's header names it: `<parent key>.qcow2`, or the parent
    /// image (relative to `cache/layers/` when it is inside the store, else absolute).
    pub backing: String,
    /// The component whose changes the layer holds (its label in the recipe).
    pub component: String,
    /// sha256 of the cached file (after its backing reference was rewritten).
    pub sha256: String,
    /// Bytes of the cached file.
    pub size: u64,
    pub created: DateTime<Utc>,
    pub last_used: DateTime<Utc>,
    /// The build that made it: `name/x.y.z/n`.
    pub build: String,
    /// What went into its key, to explain why a later plan's key differs (records written
    /// before it existed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Box<LayerInputs>>,
    /// The registry it was pulled from (`oci://host/repository`); `None`: built here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The generalize layer's: the packages the image holds (read before generalizing), so
    /// a build that takes every layer from the cache still lists them in its manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Box<super::manifest::PackageList>>,
    /// The generalize layer's too: the image's package sources and keys (read with the
    /// packages), so a fully cached build can still be checked for package updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_sources: Option<Box<super::manifest::PackageSources>>,
}

/// What went into one layer's key (`build::plan` makes it from the plan), kept in the
/// layer's record: when a build's key is not cached but a layer built on the same parent
/// key is, comparing the two ([`LayerInputs::changes`]) says what changed. Holds no more
/// than the plan shows (`builder plan`): parameters as given, the user data only by digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerInputs {
    /// `boot`, the component's label, or `generalize`.
    pub layer: String,
    /// The component document's `name`, if it has one. An AWSTOE document has no version:
    /// its sha256 is what identifies it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The component document as the recipe names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// sha256 of the component document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The component's parameters, each with the value it gets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// The documents the component runs through `ExecuteDocument`, with their sha256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<DocumentInput>,
    /// For the boot and generalize layers: the settings in their key (the parent image's
    /// digest, `diskSize`, the user data's digest, …), as text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
    /// The key of the layer below (`None` for the boot layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// One difference between the inputs of a cached layer and those of the layer a build
/// wants ([`LayerInputs::changes`]); its `Display` is the sentence `builder plan` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputChange {
    /// The component's document: another file, or the same file with other contents.
    Document {
        path: String,
        before: Option<String>,
        after: Option<String>,
    },
    /// A document reached through `ExecuteDocument`: `None` on one side when only one of
    /// the two runs it.
    Reached {
        path: String,
        before: Option<String>,
        after: Option<String>,
    },
    Parameter {
        name: String,
        before: Option<String>,
        after: Option<String>,
    },
    Setting {
        name: String,
        before: Option<String>,
        after: Option<String>,
    },
    /// Built on another layer (never when the two share their parent key).
    Previous,
}

impl std::fmt::Display for InputChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn short(sha: &Option<String>) -> String {
            sha.as_deref()
                .map_or("none".to_string(), |s| s.chars().take(12).collect())
        }
        fn value(v: &Option<String>) -> String {
            v.as_deref().map_or("unset".to_string(), |v| {
                // A digest (the parent image's, the user data's) by its first 12 digits.
                let shown: Vec<String> = v
                    .split(' ')
                    .map(|word| match check_key(word) {
                        Ok(_) => word.chars().take(12).collect(),
                        Err(_) => word.to_string(),
                    })
                    .collect();
                serde_json::Value::String(shown.join(" ")).to_string()
            })
        }
        match self {
            InputChange::Document {
                path,
                before,
                after,
            } => write!(
                f,
                "document {path} changed (sha256 {} → {})",
                short(before),
                short(after)
            ),
            InputChange::Reached {
                path,
                before: Some(_),
                after: None,
            } => write!(f, "no longer runs document {path} (ExecuteDocument)"),
            InputChange::Reached {
                path,
                before: None,
                after: Some(_),
            } => write!(f, "now runs document {path} (ExecuteDocument)"),
            InputChange::Reached {
                path,
                before,
                after,
            } => write!(
                f,
                "document {path} (run through ExecuteDocument) changed (sha256 {} → {})",
                short(before),
                short(after)
            ),
            InputChange::Parameter {
                name,
                before,
                after,
            } => write!(
                f,
                "parameter {name} changed from {} to {}",
                value(before),
                value(after)
            ),
            InputChange::Setting {
                name,
                before,
                after,
            } => write!(
                f,
                "{name} changed from {} to {}",
                value(before),
                value(after)
            ),
            InputChange::Previous => f.write_str("it is built on another layer"),
        }
    }
}

impl LayerInputs {
    /// What differs from `before` (a cached layer's inputs) to `self` (the wanted layer's):
    /// empty when they are equal.
    pub fn changes(&self, before: &LayerInputs) -> Vec<InputChange> {
        let mut out = Vec::new();
        if self.path != before.path || self.sha256 != before.sha256 {
            out.push(InputChange::Document {
                path: self
                    .path
                    .clone()
                    .or_else(|| before.path.clone())
                    .unwrap_or_default(),
                before: before.sha256.clone(),
                after: self.sha256.clone(),
            });
        }
        for (name, before, after) in map_changes(&before.parameters, &self.parameters) {
            out.push(InputChange::Parameter {
                name,
                before,
                after,
            });
        }
        for (name, before, after) in map_changes(&before.settings, &self.settings) {
            out.push(InputChange::Setting {
                name,
                before,
                after,
            });
        }
        let reached = |inputs: &LayerInputs| -> BTreeMap<String, String> {
            inputs
                .documents
                .iter()
                .map(|d| (d.path.clone(), d.sha256.clone()))
                .collect()
        };
        for (path, before, after) in map_changes(&reached(before), &reached(self)) {
            out.push(InputChange::Reached {
                path,
                before,
                after,
            });
        }
        if out.is_empty() && self.previous != before.previous {
            out.push(InputChange::Previous);
        }
        out
    }
}

/// Keys whose values differ between two maps: (key, before, after).
fn map_changes(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<(String, Option<String>, Option<String>)> {
    before
        .keys()
        .chain(after.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| (k.clone(), before.get(k).cloned(), after.get(k).cloned()))
        .collect()
}

/// What a new layer is written on.
#[derive(Debug, Clone, Copy)]
pub enum LayerParent<'a> {
    /// A first layer: backed by the parent image at `path`, read as `format`.
    Base { path: &'a Path, format: DiskFormat },
    /// A cached layer, as the build used it: its key and the sha256 of the cached file the
    /// new layer was written on ([`CachedLayer::record`]'s, or [`Inserted::sha256`]).
    Layer { key: &'a str, sha256: &'a str },
}

/// Who made a layer, for its record. Fields added later are optional: build one with
/// `..Origin::default()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    /// The component's label.
    pub component: &'a str,
    /// `name/x.y.z/n`.
    pub build: &'a str,
    /// What went into the key (`build::plan::layer_inputs`), kept in the record.
    pub inputs: Option<&'a LayerInputs>,
    /// The registry a pulled layer came from (`oci://host/repository`); `None`: built here.
    pub source: Option<&'a str>,
    /// For [`LayerRecord::packages`].
    pub packages: Option<&'a super::manifest::PackageList>,
    /// For [`LayerRecord::package_sources`].
    pub package_sources: Option<&'a super::manifest::PackageSources>,
}

/// A cached layer a build uses: holds a shared lock on its file, so no prune removes it
/// until this guard is dropped.
#[derive(Debug)]
pub struct CachedLayer {
    pub record: LayerRecord,
    /// `<store>/cache/layers/<key>.qcow2`.
    pub path: PathBuf,
    _lock: File,
}

/// What [`LayerCache::insert`] did.
#[derive(Debug)]
pub struct Inserted {
    /// The layer now cached under the key: this insert's copy, or the one that won the race.
    pub layer: CachedLayer,
    /// Whether this insert's copy is the cached one.
    pub ours: bool,
    /// sha256 of this insert's copy. The build's next layer was written on it: pass it in
    /// [`LayerParent::Layer`]. When another insert won with different bytes, inserting the
    /// next layers is refused ([`LayerCacheError::ParentDiffers`]).
    pub sha256: String,
}

/// What is wrong with a cached layer that lookup discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("its file is missing")]
    FileMissing,
    #[error("its record is missing")]
    RecordMissing,
    #[error("its record is unreadable: {0}")]
    RecordUnreadable(String),
    #[error("its record is for layer {found}")]
    WrongKey { found: String },
    #[error("its record names parent {found:?}, expected {expected:?}")]
    WrongParent {
        found: Option<String>,
        expected: Option<String>,
    },
    #[error("its parent image {} is gone", .0.display())]
    BaseMissing(PathBuf),
    #[error(
        "it is backed by the parent image {}, this build's is {}",
        cached.display(),
        wanted.display()
    )]
    BaseDiffers { cached: PathBuf, wanted: PathBuf },
    #[error("its file has {actual} bytes, the record says {expected} (truncated?)")]
    Size { expected: u64, actual: u64 },
    #[error("its file has sha256 {actual}, the record says {expected} (corrupt)")]
    Digest { expected: String, actual: String },
}

/// A layer lookup found unusable and removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discarded {
    pub key: String,
    pub damage: Damage,
    /// Files removed: its own and those of the layers built on it.
    pub removed: Vec<PathBuf>,
}

impl std::fmt::Display for Discarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "discarded cached layer {}: {}", self.key, self.damage)
    }
}

/// What [`LayerCache::lookup`] found.
#[derive(Debug, Default)]
pub struct Lookup {
    /// The longest cached prefix of the chain, first layer first; each verified and locked.
    pub layers: Vec<CachedLayer>,
    /// Layers found unusable (at most one: the prefix stops there), for the caller to print.
    pub discarded: Vec<Discarded>,
}

/// What [`LayerCache::peek`] sees under one key of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// A record and a file of the recorded size (its sha256 is checked only by lookup).
    Cached(LayerRecord),
    Missing,
    /// Lookup would discard it.
    Damaged(Damage),
}

/// What [`LayerCache::prune`] removes, besides leftovers.
#[derive(Debug, Clone, Copy, Default)]
pub struct PruneOptions {
    /// Remove least recently used layers until the cache holds at most this many bytes.
    pub max_size: Option<u64>,
    /// Remove layers not used for this long.
    pub older_than: Option<Duration>,
    /// Remove every layer not in use.
    pub all: bool,
}

/// What [`LayerCache::prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerPruneReport {
    /// Layers removed, in the order they were.
    pub removed: Vec<LayerRecord>,
    /// Bytes the removed layers held.
    pub freed_bytes: u64,
    /// Keys of layers in use by a running build (kept, with their parents).
    pub in_use: Vec<String>,
    /// Leftovers removed: temporary files, files without a record, records without a file,
    /// orphaned layers.
    pub leftovers: Vec<PathBuf>,
}

/// What [`Store::prune_layers_to_cap`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapPrune {
    /// The cap (`layerCache.maxSize` of the store's `config.yml`); `None`: unlimited.
    pub max_size: Option<ByteSize>,
    pub report: LayerPruneReport,
}

impl CapPrune {
    /// One line for the user when something was removed: `layer cache: removed 2 least
    /// recently used layers (1.2 GiB) to stay within its 20GiB cap; removed 1 leftover file`.
    pub fn summary(&self) -> Option<String> {
        let mut parts = Vec::new();
        let removed = self.report.removed.len();
        if removed > 0 {
            let cap = self
                .max_size
                .map_or_else(|| "unlimited".to_string(), |m| m.to_string());
            parts.push(format!(
                "removed {removed} least recently used {} ({}) to stay within its {cap} cap",
                if removed == 1 { "layer" } else { "layers" },
                human_size(self.report.freed_bytes)
            ));
        }
        let leftovers = self.report.leftovers.len();
        if leftovers > 0 {
            parts.push(format!(
                "removed {leftovers} leftover {}",
                if leftovers == 1 { "file" } else { "files" }
            ));
        }
        (!parts.is_empty()).then(|| format!("layer cache: {}", parts.join("; ")))
    }
}

/// The store's layer cache (`cache/layers/`).
#[derive(Debug, Clone)]
pub struct LayerCache {
    store: Store,
    dir: PathBuf,
}

impl Store {
    /// The layer cache, creating its folder if needed.
    pub fn layers(&self) -> Result<LayerCache, StoreError> {
        let cache = self.layer_cache();
        fs_err::create_dir_all(&cache.dir)?;
        Ok(cache)
    }

    /// Prune the layer cache to the cap the store's `config.yml` sets (20 GiB by default),
    /// least recently used layers first, never one in use, and remove its leftovers: what
    /// every successful build does once it is done, and `builder images rm --prune-cache`.
    pub fn prune_layers_to_cap(&self) -> Result<CapPrune, LayerCacheError> {
        let max_size = self.config()?.layer_cache.max_size;
        let report = self.layer_cache().prune(&PruneOptions {
            max_size: max_size.map(ByteSize::bytes),
            ..PruneOptions::default()
        })?;
        Ok(CapPrune { max_size, report })
    }

    /// The layer cache, its folder not created (readers: a missing folder holds nothing).
    pub(super) fn layer_cache(&self) -> LayerCache {
        LayerCache {
            store: self.clone(),
            dir: self.root.join("cache").join("layers"),
        }
    }
}

impl LayerCache {
    /// The layer cache of the store at `root`, for reading only ([`LayerCache::peek`],
    /// [`LayerCache::list`]): neither the store nor the cache folder is created, and a
    /// missing one holds nothing.
    pub fn read_only(root: &Path) -> LayerCache {
        LayerCache {
            store: Store {
                root: root.to_path_buf(),
            },
            dir: root.join("cache").join("layers"),
        }
    }

    /// The store it belongs to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// `<store>/cache/layers/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the layer with this key is (or would be) cached.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.qcow2"))
    }

    /// The cached layer `key` as its record says, locked, its file not hashed (a push checks
    /// what it sends against the record's sha256); `None` when it is not cached.
    pub async fn get(&self, key: &str) -> Result<Option<CachedLayer>, LayerCacheError> {
        let key = check_key(key)?;
        let cache = self.clone();
        blocking(move || {
            let Some(lock) = cache.lock_shared(&key)? else {
                return Ok(None);
            };
            Ok(match cache.read_record(&key) {
                Ok(record) if record.key == key => Some(CachedLayer {
                    record,
                    path: cache.path(&key),
                    _lock: lock,
                }),
                _ => None,
            })
        })
        .await?
    }

    /// A new empty file in the cache's folder, locked: prune leaves it alone while it is
    /// open, and removes it if a crash leaves it. Where a pulled layer is downloaded before
    /// [`LayerCache::insert`] copies it (on the same file system, so the copy can share
    /// its extents).
    pub fn scratch_file(&self) -> Result<tempfile::NamedTempFile, LayerCacheError> {
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .suffix(".part")
            .tempfile_in(&self.dir)?;
        tmp.as_file().lock()?;
        Ok(tmp)
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Cache the committed layer `file` (a qcow2 whose clusters are one component's writes)
    /// as `key`, written on `parent`. See the module's docs for the steps; the file itself is
    /// not changed. Returns the cached layer, locked: keep it while the build uses the key.
    pub async fn insert(
        &self,
        key: &str,
        parent: LayerParent<'_>,
        file: &Path,
        origin: Origin<'_>,
    ) -> Result<Inserted, LayerCacheError> {
        let key = check_key(key)?;
        // Held until the layer is placed, so no prune removes the parent meanwhile.
        let (parent_key, backing, format, _parent_lock) = match parent {
            LayerParent::Layer {
                key: parent,
                sha256,
            } => {
                let parent = check_key(parent)?;
                let missing = || LayerCacheError::ParentMissing {
                    key: key.clone(),
                    parent: parent.clone(),
                };
                let lock = self.lock_shared(&parent)?.ok_or_else(missing)?;
                let record = self.read_record(&parent).map_err(|_| missing())?;
                if !record.sha256.eq_ignore_ascii_case(sha256) {
                    return Err(LayerCacheError::ParentDiffers {
                        key,
                        parent,
                        built_on: sha256.to_string(),
                        cached: record.sha256,
                    });
                }
                let backing = format!("{parent}.qcow2");
                (Some(parent), backing, DiskFormat::Qcow2, Some(lock))
            }
            LayerParent::Base { path, format } => {
                if !path.is_file() {
                    return Err(LayerCacheError::BaseMissing {
                        key,
                        path: path.to_path_buf(),
                    });
                }
                (None, self.base_backing(path)?, format, None)
            }
        };

        // An exclusive lock on the temporary file tells prune an insert is working on it.
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .suffix(".qcow2")
            .tempfile_in(&self.dir)?;
        tmp.as_file().lock()?;
        let tmp_path = tmp.path().to_path_buf();
        // Into the temporary file's own handle, never by its name: a build dropped mid-copy
        // removes the name, and nothing can create it again.
        let source = file.to_path_buf();
        let mut copy_to = tmp.as_file().try_clone()?;
        blocking(move || {
            let (mut from, _) = File::open(&source)?.into_parts();
            std::io::copy(&mut from, &mut copy_to)
                .map(drop)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "could not copy {} into the layer cache: {e}",
                            source.display()
                        ),
                    )
                })
        })
        .await??;
        img::rebase_unsafe(&tmp_path, &backing, format)
            .await
            .map_err(|source| LayerCacheError::Rebase {
                key: key.clone(),
                source,
            })?;
        let hash_path = tmp_path.clone();
        let digest = blocking(move || sha256_file(&hash_path, None)).await??;
        let now = Utc::now();
        let record = LayerRecord {
            key: key.clone(),
            parent: parent_key,
            backing,
            component: origin.component.to_string(),
            sha256: digest.hex(),
            size: digest.size,
            created: now,
            last_used: now,
            build: origin.build.to_string(),
            inputs: origin.inputs.cloned().map(Box::new),
            source: origin.source.map(str::to_string),
            packages: origin.packages.cloned().map(Box::new),
            package_sources: origin.package_sources.cloned().map(Box::new),
        };
        let cache = self.clone();
        blocking(move || cache.place(tmp, record)).await?
    }

    /// Rename the finished copy to its key's name and write its record, under the store lock,
    /// unless a sound layer is there already (another insert won).
    fn place(
        &self,
        tmp: tempfile::NamedTempFile,
        record: LayerRecord,
    ) -> Result<Inserted, LayerCacheError> {
        let key = record.key.clone();
        let path = self.path(&key);
        let _lock = self.store.lock()?;
        if path.is_file()
            && let Ok(existing) = self.read_record(&key)
        {
            // Lost the race: the placed layer stays (its children may be built on it).
            drop(tmp);
            let lock = self.lock_shared(&key)?.ok_or_else(|| {
                LayerCacheError::Io(std::io::Error::other(format!(
                    "{} vanished under the store lock",
                    path.display()
                )))
            })?;
            return Ok(Inserted {
                layer: CachedLayer {
                    record: existing,
                    path,
                    _lock: lock,
                },
                ours: false,
                sha256: record.sha256,
            });
        }
        let file = tmp.persist(&path).map_err(|e| {
            LayerCacheError::from(std::io::Error::new(
                e.error.kind(),
                format!(
                    "could not rename {} to {}: {}",
                    e.file.path().display(),
                    path.display(),
                    e.error
                ),
            ))
        })?;
        if let Err(e) = write_json(&self.record_path(&key), &record) {
            // No file without its record under a final name.
            let _ = fs_err::remove_file(&path);
            return Err(e.into());
        }
        // The exclusive lock taken on the temporary file becomes the build's shared one.
        file.lock_shared()?;
        let sha256 = record.sha256.clone();
        Ok(Inserted {
            layer: CachedLayer {
                record,
                path: path.clone(),
                _lock: File::from_parts(file, path),
            },
            ours: true,
            sha256,
        })
    }

    /// The longest cached prefix of `chain` (layer keys, first layer first) for a build on
    /// the parent image `base` (the file the plan verified), each layer verified (record,
    /// parent, parent image, size, sha256) and locked. A layer that fails is removed with
    /// the layers built on it and reported in [`Lookup::discarded`]. Updates the last use of
    /// the layers returned. Reads every returned layer in full.
    ///
    /// The first layer must be backed by `base` itself: the key names the parent's digest,
    /// not where it is, and a first layer backed by another path (a local parent image
    /// since edited, with the same digest now found elsewhere) would read other clusters.
    pub async fn lookup(&self, base: &Path, chain: &[String]) -> Result<Lookup, LayerCacheError> {
        let chain: Vec<String> = chain
            .iter()
            .map(|k| check_key(k))
            .collect::<Result<_, _>>()?;
        let base = fs_err::canonicalize(base).or_else(|_| std::path::absolute(base))?;
        let cache = self.clone();
        blocking(move || cache.lookup_blocking(&base, &chain)).await?
    }

    fn lookup_blocking(&self, base: &Path, chain: &[String]) -> Result<Lookup, LayerCacheError> {
        let mut found = Lookup::default();
        let mut parent: Option<&str> = None;
        for key in chain {
            match self.verify(key, parent, base)? {
                Verified::Sound(layer) => found.layers.push(layer),
                Verified::NotCached => break,
                Verified::Damaged(damage, held) => {
                    let removed = self.discard(key, &damage, held)?;
                    // Nothing removed: an insert replaced it meanwhile; the next lookup
                    // judges the new one.
                    if !removed.is_empty() {
                        found.discarded.push(Discarded {
                            key: key.clone(),
                            damage,
                            removed,
                        });
                    }
                    break;
                }
            }
            parent = Some(key.as_str());
        }
        if !found.layers.is_empty() {
            let _lock = self.store.lock()?;
            let now = Utc::now();
            for layer in &mut found.layers {
                layer.record.last_used = now;
                // Pruned meanwhile cannot be (the layer is locked); checked all the same, so
                // a record is never written back without its file.
                if layer.path.is_file() {
                    write_json(&self.record_path(&layer.record.key), &layer.record)?;
                }
            }
        }
        Ok(found)
    }

    /// What the cache holds under each key of `chain` (first layer first), for showing a
    /// plan: reads records and file sizes only. Unlike [`LayerCache::lookup`] it changes
    /// nothing (removes no damaged layer, updates no last use, takes no lock, creates no
    /// folder) and does not hash the files: a layer of the right size whose bytes changed is
    /// `Cached` here and discarded by the build's lookup. Each key is judged on its own, its
    /// expected parent being the key before it. `base` is the parent image the first layer
    /// must be backed by; `None` when it is not on this machine yet (a download or pull the
    /// build makes), and then it is not compared.
    pub fn peek(
        &self,
        base: Option<&Path>,
        chain: &[String],
    ) -> Result<Vec<Peeked>, LayerCacheError> {
        let base = match base {
            Some(base) => Some(fs_err::canonicalize(base).or_else(|_| std::path::absolute(base))?),
            None => None,
        };
        let mut out = Vec::with_capacity(chain.len());
        let mut parent: Option<String> = None;
        for key in chain {
            let key = check_key(key)?;
            out.push(self.peek_one(&key, parent.as_deref(), base.as_deref())?);
            parent = Some(key);
        }
        Ok(out)
    }

    fn peek_one(
        &self,
        key: &str,
        parent: Option<&str>,
        base: Option<&Path>,
    ) -> Result<Peeked, LayerCacheError> {
        let size = match fs_err::metadata(self.path(key)) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let record = match self.read_record(key) {
            Ok(record) => record,
            Err(RecordError::Missing) if size.is_none() => return Ok(Peeked::Missing),
            Err(RecordError::Missing) => return Ok(Peeked::Damaged(Damage::RecordMissing)),
            Err(RecordError::Unreadable(e)) => {
                return Ok(Peeked::Damaged(Damage::RecordUnreadable(e)));
            }
        };
        let Some(size) = size else {
            return Ok(Peeked::Damaged(Damage::FileMissing));
        };
        if record.key != key {
            return Ok(Peeked::Damaged(Damage::WrongKey { found: record.key }));
        }
        if record.parent.as_deref() != parent {
            return Ok(Peeked::Damaged(Damage::WrongParent {
                found: record.parent,
                expected: parent.map(str::to_string),
            }));
        }
        // Without `base` the parent image is not here yet, so neither is the file a first
        // layer is backed by: the build fetches it first.
        if record.parent.is_none()
            && let Some(wanted) = base
        {
            let backing = self.dir.join(&record.backing);
            match fs_err::canonicalize(&backing) {
                Err(_) => return Ok(Peeked::Damaged(Damage::BaseMissing(backing))),
                Ok(cached) if cached != wanted => {
                    return Ok(Peeked::Damaged(Damage::BaseDiffers {
                        cached,
                        wanted: wanted.to_path_buf(),
                    }));
                }
                _ => {}
            }
        }
        if size != record.size {
            return Ok(Peeked::Damaged(Damage::Size {
                expected: record.size,
                actual: size,
            }));
        }
        Ok(Peeked::Cached(record))
    }

    /// The cached layers built on `parent` (`None`: first layers), most recently used
    /// first: a build whose key is not cached compares its inputs with theirs.
    pub fn built_on(&self, parent: Option<&str>) -> Result<Vec<LayerRecord>, LayerCacheError> {
        let mut found = self.list()?;
        found.retain(|r| r.parent.as_deref() == parent);
        Ok(found)
    }

    /// Check one cached layer. Takes its shared lock first, so what is checked is what the
    /// build will use.
    fn verify(
        &self,
        key: &str,
        parent: Option<&str>,
        base: &Path,
    ) -> Result<Verified, LayerCacheError> {
        let Some(lock) = self.lock_shared(key)? else {
            return Ok(if self.record_path(key).is_file() {
                Verified::Damaged(Damage::FileMissing, None)
            } else {
                Verified::NotCached
            });
        };
        let damaged = |damage| Ok(Verified::Damaged(damage, Some(inode(&lock))));
        let record = match self.read_record(key) {
            Ok(record) => record,
            Err(RecordError::Missing) => return damaged(Damage::RecordMissing),
            Err(RecordError::Unreadable(e)) => return damaged(Damage::RecordUnreadable(e)),
        };
        if record.key != key {
            return damaged(Damage::WrongKey { found: record.key });
        }
        if record.parent.as_deref() != parent {
            return damaged(Damage::WrongParent {
                found: record.parent,
                expected: parent.map(str::to_string),
            });
        }
        if record.parent.is_none() {
            let backing = self.dir.join(&record.backing);
            match fs_err::canonicalize(&backing) {
                Err(_) => return damaged(Damage::BaseMissing(backing)),
                Ok(cached) if cached != base => {
                    return damaged(Damage::BaseDiffers {
                        cached,
                        wanted: base.to_path_buf(),
                    });
                }
                Ok(_) => {}
            }
        }
        let actual = lock.metadata()?.len();
        if actual != record.size {
            return damaged(Damage::Size {
                expected: record.size,
                actual,
            });
        }
        let path = self.path(key);
        let digest = sha256_file(&path, None)?;
        if !digest.hex().eq_ignore_ascii_case(&record.sha256) {
            return damaged(Damage::Digest {
                expected: record.sha256,
                actual: digest.hex(),
            });
        }
        Ok(Verified::Sound(CachedLayer {
            record,
            path,
            _lock: lock,
        }))
    }

    /// Remove a damaged layer and the layers built on it, under the store lock, if it is
    /// still the file that was judged (`held`: its inode; `None`: it had no file).
    fn discard(
        &self,
        key: &str,
        damage: &Damage,
        held: Option<(u64, u64)>,
    ) -> Result<Vec<PathBuf>, LayerCacheError> {
        let _lock = self.store.lock()?;
        let path = self.path(key);
        let current = fs_err::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        let still = match held {
            None => current.is_none(),
            Some(judged) => current == Some(judged),
        };
        let still = still && (*damage != Damage::RecordMissing || !self.record_path(key).is_file());
        if !still {
            // An insert replaced it meanwhile: the next lookup judges the new one.
            return Ok(Vec::new());
        }
        let records = self.records();
        let mut removed = Vec::new();
        for doomed in std::iter::once(key.to_string()).chain(descendants(&records, key)) {
            removed.extend(self.remove_layer(&doomed)?);
        }
        Ok(removed)
    }

    /// Remove the layer cached under `key` and every layer built on it, so a build can
    /// insert its own (`--no-cache` refreshes the cache). Nothing is removed when one of
    /// them is in use (a running build holds it): returns `false` then. `true` when the key
    /// is free now.
    pub fn evict(&self, key: &str) -> Result<bool, LayerCacheError> {
        let key = check_key(key)?;
        let _lock = self.store.lock()?;
        let records = self.records();
        let doomed: Vec<String> = std::iter::once(key.clone())
            .chain(descendants(&records, &key))
            .collect();
        let mut held = Vec::new();
        for k in &doomed {
            let path = self.path(k);
            if !path.is_file() {
                continue;
            }
            match try_lock_exclusive(&path)? {
                Some(lock) => held.push(lock),
                None => return Ok(false),
            }
        }
        for k in &doomed {
            self.remove_layer(k)?;
        }
        Ok(true)
    }

    /// Remove a layer's record, then its file (a file left by a crash in between has no
    /// record: prune removes it). Returns what existed.
    fn remove_layer(&self, key: &str) -> Result<Vec<PathBuf>, LayerCacheError> {
        let mut removed = Vec::new();
        for path in [self.record_path(key), self.path(key)] {
            match fs_err::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(removed)
    }

    /// Every cached layer (a record with its file), most recently used first: what
    /// `builder cache list` shows.
    pub fn list(&self) -> Result<Vec<LayerRecord>, LayerCacheError> {
        let mut records: Vec<LayerRecord> = self
            .records()
            .into_values()
            .filter(|r| self.path(&r.key).is_file())
            .collect();
        records.sort_by(|a, b| {
            b.last_used
                .cmp(&a.last_used)
                .then_with(|| a.key.cmp(&b.key))
        });
        Ok(records)
    }

    /// Remove layers as `options` say (leaves only, least recently used first; see the
    /// module's docs), never one in use, and the leftovers of inserts that died. Under the
    /// store lock.
    pub fn prune(&self, options: &PruneOptions) -> Result<LayerPruneReport, LayerCacheError> {
        let _lock = self.store.lock()?;
        let mut report = LayerPruneReport::default();
        let mut records = BTreeMap::new();
        // Exclusive locks on the layers taken, held until the end: no lookup starts using one
        // while prune decides.
        let mut locks = BTreeMap::new();
        let mut in_use = BTreeSet::new();
        for name in super::file_names(&self.dir)? {
            let path = self.dir.join(&name);
            if name.starts_with(TMP_PREFIX) {
                // An insert in progress holds its lock; a free one died.
                if try_lock_exclusive(&path)?.is_some() {
                    remove_leftover(&path, &mut report)?;
                }
                continue;
            }
            if let Some(key) = name.strip_suffix(".json") {
                match self.read_record(key) {
                    Ok(record) if self.path(key).is_file() => {
                        records.insert(key.to_string(), record);
                    }
                    // A record without its file, or one that cannot be read: its file (if
                    // any) goes when it is seen without a record below.
                    _ => remove_leftover(&path, &mut report)?,
                }
            }
        }
        for name in super::file_names(&self.dir)? {
            let Some(key) = name.strip_suffix(".qcow2") else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let path = self.dir.join(&name);
            match try_lock_exclusive(&path)? {
                None => {
                    in_use.insert(key.to_string());
                }
                Some(lock) if records.contains_key(key) => {
                    locks.insert(key.to_string(), lock);
                }
                Some(_) => remove_leftover(&path, &mut report)?,
            }
        }

        // Orphans: a layer whose parent is gone, and everything built on it.
        let orphans: Vec<String> = records
            .values()
            .filter(|r| r.parent.as_ref().is_some_and(|p| !records.contains_key(p)))
            .map(|r| r.key.clone())
            .collect();
        for orphan in orphans {
            let mut doomed = vec![orphan.clone()];
            doomed.extend(descendants(&records, &orphan));
            for key in doomed {
                if in_use.contains(&key) || !records.contains_key(&key) {
                    continue;
                }
                report.leftovers.extend(self.remove_layer(&key)?);
                records.remove(&key);
            }
        }

        // A layer in use pins its chain: its parents are never leaves while it is cached.
        let mut pinned = BTreeSet::new();
        for key in &in_use {
            let mut at = Some(key.clone());
            while let Some(key) = at {
                at = records.get(&key).and_then(|r| r.parent.clone());
                pinned.insert(key);
            }
        }
        report.in_use = in_use.into_iter().collect();

        let cutoff = options
            .older_than
            .and_then(|age| chrono::Duration::from_std(age).ok())
            .map(|age| Utc::now() - age);
        let mut total: u64 = records.values().map(|r| r.size).sum();
        loop {
            let leaves: Vec<&LayerRecord> = records
                .values()
                .filter(|r| !pinned.contains(&r.key))
                .filter(|r| !records.values().any(|c| c.parent.as_ref() == Some(&r.key)))
                .collect();
            let oldest = leaves
                .into_iter()
                .min_by(|a, b| {
                    (a.last_used, a.created, &a.key).cmp(&(b.last_used, b.created, &b.key))
                })
                .cloned();
            let Some(oldest) = oldest else { break };
            let wanted = options.all
                || cutoff.is_some_and(|c| oldest.last_used < c)
                || options.max_size.is_some_and(|max| total > max);
            if !wanted {
                break;
            }
            self.remove_layer(&oldest.key)?;
            locks.remove(&oldest.key);
            records.remove(&oldest.key);
            total = total.saturating_sub(oldest.size);
            report.freed_bytes += oldest.size;
            report.removed.push(oldest);
        }
        Ok(report)
    }

    /// Open a layer's file and take a shared lock on it (waiting for a prune that holds it).
    /// `None` when the file does not exist, or was removed or replaced while waiting.
    fn lock_shared(&self, key: &str) -> Result<Option<File>, LayerCacheError> {
        let path = self.path(key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        file.lock_shared()?;
        let now = fs_err::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        Ok((now == Some(inode(&file))).then_some(file))
    }

    fn read_record(&self, key: &str) -> Result<LayerRecord, RecordError> {
        let path = self.record_path(key);
        let bytes = match fs_err::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordError::Missing);
            }
            Err(e) => return Err(RecordError::Unreadable(e.to_string())),
        };
        serde_json::from_slice(&bytes).map_err(|e| RecordError::Unreadable(e.to_string()))
    }

    /// Every readable record, by key (files not checked).
    fn records(&self) -> BTreeMap<String, LayerRecord> {
        super::file_names(&self.dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|name| name.strip_suffix(".json"))
            .filter_map(|key| self.read_record(key).ok())
            .map(|r| (r.key.clone(), r))
            .collect()
    }

    /// Digests of the parent images in `cache/base/` that cached first layers are backed
    /// by: pruning the parent cache keeps them.
    pub(super) fn bases_in_use(&self) -> Vec<String> {
        let base_dir = self.store.base_dir();
        self.records()
            .into_values()
            .filter(|r| r.parent.is_none())
            .filter_map(|r| {
                let backing = fs_err::canonicalize(self.dir.join(&r.backing)).ok()?;
                let name = backing.file_name()?.to_str()?.to_string();
                let in_cache = fs_err::canonicalize(base_dir.join(&name)).ok()? == backing;
                match super::base::CacheFile::parse(&name) {
                    Some(super::base::CacheFile::Disk(sha)) if in_cache => Some(sha),
                    _ => None,
                }
            })
            .collect()
    }

    /// How a first layer names the parent image at `path`: relative to `cache/layers/` when
    /// the image is inside the store (the store can move), else absolute.
    fn base_backing(&self, path: &Path) -> Result<String, LayerCacheError> {
        let path = std::path::absolute(path)?;
        let root = std::path::absolute(self.store.root())?;
        let named = match path.strip_prefix(&root) {
            Ok(inside) => Path::new("../..").join(inside),
            Err(_) => path,
        };
        named.to_str().map(str::to_string).ok_or_else(|| {
            LayerCacheError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not UTF-8; qcow2 cannot name it", named.display()),
            ))
        })
    }
}

/// Whether a layer passed its checks.
enum Verified {
    Sound(CachedLayer),
    NotCached,
    /// What is wrong, and the inode of the file judged (`None`: there was none).
    Damaged(Damage, Option<(u64, u64)>),
}

enum RecordError {
    Missing,
    Unreadable(String),
}

/// A layer key, lowercase.
fn check_key(key: &str) -> Result<String, LayerCacheError> {
    super::base::check_digest(key).map_err(|_| LayerCacheError::BadKey {
        key: key.to_string(),
    })
}

/// The keys of every layer built on `key`, directly or not.
fn descendants(records: &BTreeMap<String, LayerRecord>, key: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![key.to_string()];
    while let Some(at) = todo.pop() {
        for child in records.values().filter(|r| r.parent.as_ref() == Some(&at)) {
            if !found.contains(&child.key) && child.key != key {
                found.push(child.key.clone());
                todo.push(child.key.clone());
            }
        }
    }
    found
}

/// (device, inode) of an open file: which file a path named when it was opened.
fn inode(file: &File) -> (u64, u64) {
    file.metadata()
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or((0, 0))
}

/// The file at `path` locked exclusively, or `None` when someone holds a lock on it.
fn try_lock_exclusive(path: &Path) -> Result<Option<File>, LayerCacheError> {
    let file = File::open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

fn remove_leftover(path: &Path, report: &mut LayerPruneReport) -> Result<(), LayerCacheError> {
    match fs_err::remove_file(path) {
        Ok(()) => report.leftovers.push(path.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Run blocking file work (copies, hashes, locks) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LayerCacheError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| LayerCacheError::Task(e.to_string()))
}

/// The qcow2 chains the tests make, shared with tests/cache_cli.rs.
#[cfg(test)]
#[path = "../../tests/support/qcow2.rs"]
mod qcow2;

#[cfg(test)]
mod tests {
    //! Real qemu-img and qemu-io on small chains; no VM.

    use super::qcow2::run;
    use super::*;

    /// A store with a parent image in `cache/base/`, and a build's chain in `work/`:
    /// base ← l1 (0x5a at 64k) ← l2 (0x66 at 128k), and l1b: another l1 (0x5b at 64k).
    struct Setup {
        _dir: tempfile::TempDir,
        store: Store,
        base: PathBuf,
        l1: PathBuf,
        l1b: PathBuf,
        l2: PathBuf,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(dir.path().join("store")).expect("store");
            let base = store.base_dir().join(format!("{}.qcow2", "b".repeat(64)));
            super::qcow2::image(&base, None, "0x11", "0", "64k");
            let work = dir.path().join("work");
            fs_err::create_dir_all(&work).expect("work");
            let (l1, l1b, l2) = (
                work.join("l1.qcow2"),
                work.join("l1b.qcow2"),
                work.join("l2.qcow2"),
            );
            super::qcow2::image(&l1, Some(&base), "0x5a", "64k", "64k");
            super::qcow2::image(&l1b, Some(&base), "0x5b", "64k", "64k");
            super::qcow2::image(&l2, Some(&l1), "0x66", "128k", "64k");
            Setup {
                _dir: dir,
                store,
                base,
                l1,
                l1b,
                l2,
            }
        }

        fn cache(&self) -> LayerCache {
            self.store.layers().expect("layer cache")
        }

        fn base(&self) -> LayerParent<'_> {
            LayerParent::Base {
                path: &self.base,
                format: DiskFormat::Qcow2,
            }
        }

        /// l1 as `key(1)` and l2 as `key(2)`; the sha256 of the cached l1.
        async fn insert_chain(&self) -> String {
            let cache = self.cache();
            let one = cache
                .insert(&key(1), self.base(), &self.l1, origin("one"))
                .await
                .expect("insert l1");
            cache
                .insert(&key(2), parent(1, &one.sha256), &self.l2, origin("two"))
                .await
                .expect("insert l2");
            one.sha256
        }
    }

    fn key(n: u32) -> String {
        format!("{n:064x}")
    }

    fn parent(n: u32, sha256: &str) -> LayerParent<'_> {
        // The key outlives the call: leaked, as tests may.
        let key: &'static str = Box::leak(key(n).into_boxed_str());
        LayerParent::Layer { key, sha256 }
    }

    fn origin(component: &str) -> Origin<'_> {
        Origin {
            component,
            build: "web/1.0.0/1",
            ..Origin::default()
        }
    }

    fn chain(keys: &[u32]) -> Vec<String> {
        keys.iter().map(|n| key(*n)).collect()
    }

    /// Pretend the layer was last used `days` ago.
    fn age(cache: &LayerCache, n: u32, days: i64) {
        let mut record = cache.read_record(&key(n)).ok().expect("record");
        record.last_used = Utc::now() - chrono::Duration::days(days);
        write_json(&cache.record_path(&key(n)), &record).expect("write record");
    }

    fn leftovers_of_inserts(cache: &LayerCache) -> Vec<String> {
        super::super::file_names(cache.dir())
            .expect("names")
            .into_iter()
            .filter(|n| n.starts_with(TMP_PREFIX))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cached_chain_resolves_inside_the_cache_and_reads_as_the_original() {
        let t = Setup::new();
        let before = fs_err::read(&t.l2).expect("read l2");
        t.insert_chain().await;
        let cache = t.cache();
        let found = cache
            .lookup(&t.base, &chain(&[1, 2, 3]))
            .await
            .expect("lookup");
        assert!(found.discarded.is_empty(), "{:?}", found.discarded);
        let keys: Vec<&str> = found.layers.iter().map(|l| l.record.key.as_str()).collect();
        assert_eq!(keys, [key(1), key(2)]);
        let top = &found.layers[1];
        assert_eq!(top.record.parent, Some(key(1)));
        assert_eq!(top.record.backing, format!("{}.qcow2", key(1)));
        assert_eq!(
            found.layers[0].record.backing,
            format!("../../cache/base/{}.qcow2", "b".repeat(64))
        );

        // Every file of the cached chain is in the store; none is the build's.
        let info = run(
            "qemu-img",
            &[
                "info".as_ref(),
                "--backing-chain".as_ref(),
                "--output=json".as_ref(),
                top.path.as_os_str(),
            ],
        );
        let info: Vec<serde_json::Value> = serde_json::from_slice(&info).expect("json");
        assert_eq!(info.len(), 3, "{info:?}");
        let root = fs_err::canonicalize(t.store.root()).expect("root");
        for image in &info {
            let name = image["filename"].as_str().expect("filename");
            let path = fs_err::canonicalize(name).expect("exists");
            assert!(
                path.starts_with(&root),
                "{} is outside the store",
                path.display()
            );
        }
        // Same guest-visible disk as the build's chain, which is untouched.
        run(
            "qemu-img",
            &["compare".as_ref(), top.path.as_os_str(), t.l2.as_os_str()],
        );
        assert_eq!(fs_err::read(&t.l2).expect("read l2"), before);
        assert_eq!(
            super::super::base::qcow2_backing_file(&t.l2).as_deref(),
            t.l1.to_str()
        );

        let listed = cache.list().expect("list");
        let components: Vec<&str> = listed.iter().map(|r| r.component.as_str()).collect();
        assert_eq!(listed.len(), 2);
        assert!(components.contains(&"one") && components.contains(&"two"));
        assert!(listed.iter().all(|r| r.build == "web/1.0.0/1"));
        assert!(leftovers_of_inserts(&cache).is_empty());

        // The parent-image cache keeps the image a cached first layer is backed by.
        let pruned = t.store.prune_cache().expect("prune parents");
        assert!(pruned.removed.is_empty(), "{:?}", pruned.removed);
        assert!(t.base.is_file());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_layer_is_reported_removed_with_its_children_and_never_used() {
        let t = Setup::new();
        let cache = t.cache();

        // One byte changed, same size.
        t.insert_chain().await;
        let path = cache.path(&key(2));
        let mut bytes = fs_err::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs_err::write(&path, bytes).expect("write");
        let found = cache
            .lookup(&t.base, &chain(&[1, 2]))
            .await
            .expect("lookup");
        assert_eq!(found.layers.len(), 1);
        assert_eq!(found.discarded.len(), 1);
        assert_eq!(found.discarded[0].key, key(2));
        assert!(
            matches!(found.discarded[0].damage, Damage::Digest { .. }),
            "{}",
            found.discarded[0]
        );
        assert!(!path.exists() && !cache.record_path(&key(2)).exists());
        drop(found);

        // Truncated first layer: it goes, and so does the layer built on it.
        let sha1 = cache.read_record(&key(1)).ok().expect("record").sha256;
        cache
            .insert(&key(2), parent(1, &sha1), &t.l2, origin("two"))
            .await
            .expect("insert l2 again");
        let first = cache.path(&key(1));
        let size = fs_err::metadata(&first).expect("meta").len();
        fs_err::OpenOptions::new()
            .write(true)
            .open(&first)
            .expect("open")
            .set_len(size - 100)
            .expect("truncate");
        let found = cache
            .lookup(&t.base, &chain(&[1, 2]))
            .await
            .expect("lookup");
        assert!(found.layers.is_empty());
        assert_eq!(
            found.discarded[0].damage,
            Damage::Size {
                expected: size,
                actual: size - 100
            }
        );
        assert_eq!(found.discarded[0].removed.len(), 4, "{:?}", found.discarded);
        assert!(cache.list().expect("list").is_empty());
        assert!(
            found.discarded[0]
                .to_string()
                .starts_with(&format!("discarded cached layer {}: its file has", key(1)))
        );

        // A missing record; then a missing file.
        t.insert_chain().await;
        fs_err::remove_file(cache.record_path(&key(2))).expect("rm record");
        let found = cache
            .lookup(&t.base, &chain(&[1, 2]))
            .await
            .expect("lookup");
        assert_eq!(found.layers.len(), 1);
        assert_eq!(found.discarded[0].damage, Damage::RecordMissing);
        assert!(!cache.path(&key(2)).exists());
        drop(found);
        fs_err::remove_file(cache.path(&key(1))).expect("rm file");
        let found = cache
            .lookup(&t.base, &chain(&[1, 2]))
            .await
            .expect("lookup");
        assert!(found.layers.is_empty());
        assert_eq!(found.discarded[0].damage, Damage::FileMissing);
        assert!(fs_err::read_dir(cache.dir()).expect("dir").next().is_none());

        // A first layer backed by another file than this build's parent image.
        t.insert_chain().await;
        let elsewhere = t.l1.with_file_name("parent.qcow2");
        fs_err::copy(&t.base, &elsewhere).expect("copy");
        let found = cache
            .lookup(&elsewhere, &chain(&[1, 2]))
            .await
            .expect("lookup");
        assert!(found.layers.is_empty());
        assert!(
            matches!(&found.discarded[0].damage, Damage::BaseDiffers { wanted, .. } if wanted.ends_with("parent.qcow2")),
            "{}",
            found.discarded[0]
        );
        assert_eq!(found.discarded[0].removed.len(), 4);

        // Nothing cached is a plain miss.
        let found = cache.lookup(&t.base, &chain(&[1])).await.expect("lookup");
        assert!(found.layers.is_empty() && found.discarded.is_empty());
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn two_threads_inserting_one_key_leave_one_layer_and_no_leftovers() {
        let t = Setup::new();
        let cache = t.cache();
        let results: Vec<Inserted> = std::thread::scope(|scope| {
            let inserts: Vec<_> = [&t.l1, &t.l1b]
                .into_iter()
                .map(|file| {
                    let (cache, base) = (cache.clone(), t.base());
                    scope.spawn(move || {
                        runtime()
                            .block_on(cache.insert(&key(1), base, file, origin("one")))
                            .expect("insert")
                    })
                })
                .collect();
            inserts
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert_eq!(results.iter().filter(|r| r.ours).count(), 1);
        let (won, lost): (Vec<&Inserted>, Vec<&Inserted>) = results.iter().partition(|r| r.ours);
        assert_eq!(won[0].layer.record, lost[0].layer.record);
        assert_ne!(lost[0].sha256, won[0].sha256, "different guest writes");
        assert!(leftovers_of_inserts(&cache).is_empty());
        let on_disk = sha256_file(&cache.path(&key(1)), None).expect("hash");
        assert_eq!(on_disk.hex(), won[0].sha256);

        // The loser's next layer was written on its own copy: refused.
        let refused = runtime()
            .block_on(cache.insert(&key(2), parent(1, &lost[0].sha256), &t.l2, origin("two")))
            .expect_err("written on another copy");
        assert!(
            matches!(refused, LayerCacheError::ParentDiffers { .. }),
            "{refused}"
        );
        assert!(leftovers_of_inserts(&cache).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prune_removes_leaves_least_recently_used_first_and_never_a_layer_in_use() {
        let t = Setup::new();
        let cache = t.cache();
        // key 1 ← key 2, and key 3 (another first layer).
        t.insert_chain().await;
        cache
            .insert(&key(3), t.base(), &t.l1b, origin("three"))
            .await
            .expect("insert l1b");
        let size = |n| cache.read_record(&key(n)).ok().expect("record").size;

        // Old, but in use: kept. Old and free: the child goes first, then its parent.
        let held = cache.lookup(&t.base, &chain(&[3])).await.expect("lookup");
        for n in [1, 2, 3] {
            age(&cache, n, 20);
        }
        let report = cache
            .prune(&PruneOptions {
                older_than: Some(Duration::from_secs(10 * 86_400)),
                ..PruneOptions::default()
            })
            .expect("prune");
        let removed: Vec<&str> = report.removed.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(removed, [key(2), key(1)]);
        assert_eq!(report.in_use, [key(3)]);
        assert_eq!(
            report.freed_bytes,
            report.removed.iter().map(|r| r.size).sum::<u64>()
        );
        assert!(cache.path(&key(3)).is_file() && !cache.path(&key(1)).exists());
        // With everything asked for, the layer in use still stays.
        let all = PruneOptions {
            all: true,
            ..PruneOptions::default()
        };
        assert!(cache.prune(&all).expect("prune").removed.is_empty());
        drop(held);

        // By size: least recently used leaf first until the rest fits.
        t.insert_chain().await;
        age(&cache, 1, 3);
        age(&cache, 2, 2);
        age(&cache, 3, 1);
        let report = cache
            .prune(&PruneOptions {
                max_size: Some(size(3)),
                ..PruneOptions::default()
            })
            .expect("prune");
        let removed: Vec<&str> = report.removed.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(removed, [key(2), key(1)]);
        let listed = cache.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, key(3));

        // A layer whose parent is gone goes with it; so do leftovers of dead inserts.
        t.insert_chain().await;
        fs_err::remove_file(cache.path(&key(1))).expect("rm");
        fs_err::remove_file(cache.record_path(&key(1))).expect("rm");
        let dead = cache.dir().join(".tmp-dead.qcow2");
        fs_err::write(&dead, b"half a copy").expect("write");
        let stray = cache.dir().join(format!("{}.qcow2", key(9)));
        fs_err::write(&stray, b"no record").expect("write");
        let report = cache.prune(&PruneOptions::default()).expect("prune");
        assert!(report.removed.is_empty());
        assert!(!cache.path(&key(2)).exists() && !dead.exists() && !stray.exists());
        assert_eq!(report.leftovers.len(), 4, "{:?}", report.leftovers);
        assert_eq!(cache.list().expect("list").len(), 1);

        // A layer the build just inserted is in use as long as it keeps the guard.
        let inserted = cache
            .insert(&key(4), t.base(), &t.l1, origin("four"))
            .await
            .expect("insert l1 as key 4");
        let report = cache.prune(&all).expect("prune");
        let removed: Vec<&str> = report.removed.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(removed, [key(3)]);
        assert_eq!(report.in_use, [key(4)]);
        drop(inserted);
        let report = cache.prune(&all).expect("prune");
        assert_eq!(report.removed.len(), 1);
        assert!(fs_err::read_dir(cache.dir()).expect("dir").next().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peek_reads_records_and_sizes_and_changes_nothing() {
        let t = Setup::new();
        // A store that does not exist yet: nothing cached, nothing created.
        let nowhere = t.store.root().join("not-yet");
        let empty = LayerCache::read_only(&nowhere);
        let seen = empty.peek(Some(&t.base), &chain(&[1, 2])).expect("peek");
        assert_eq!(seen, [Peeked::Missing, Peeked::Missing]);
        assert!(empty.built_on(None).expect("built on").is_empty());
        assert!(!nowhere.exists());
        let cache = LayerCache::read_only(t.store.root());
        assert!(cache.peek(None, &chain(&[1])).expect("peek")[0] == Peeked::Missing);
        assert!(!cache.dir().exists(), "peek created the cache folder");

        t.insert_chain().await;
        age(&cache, 1, 5);
        let before: Vec<LayerRecord> = [1, 2]
            .iter()
            .map(|n| cache.read_record(&key(*n)).ok().expect("record"))
            .collect();
        let seen = cache.peek(Some(&t.base), &chain(&[1, 2, 3])).expect("peek");
        assert_eq!(
            seen,
            [
                Peeked::Cached(before[0].clone()),
                Peeked::Cached(before[1].clone()),
                Peeked::Missing
            ]
        );
        // Another parent image, or the chain in another order: not this build's layers.
        let elsewhere = t.l1.with_file_name("parent.qcow2");
        fs_err::copy(&t.base, &elsewhere).expect("copy");
        let seen = cache.peek(Some(&elsewhere), &chain(&[1])).expect("peek");
        assert!(
            matches!(&seen[0], Peeked::Damaged(Damage::BaseDiffers { .. })),
            "{seen:?}"
        );
        let seen = cache.peek(None, &chain(&[2, 1])).expect("peek");
        assert!(
            matches!(&seen[0], Peeked::Damaged(Damage::WrongParent { .. })),
            "{seen:?}"
        );
        assert_eq!(
            cache.built_on(Some(&key(1))).expect("built on"),
            [before[1].clone()]
        );

        // Same size, other bytes: peek does not hash, so it cannot tell (lookup does).
        let path = cache.path(&key(2));
        let mut bytes = fs_err::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs_err::write(&path, &bytes).expect("write");
        assert!(matches!(
            cache.peek(None, &chain(&[1, 2])).expect("peek")[1],
            Peeked::Cached(_)
        ));
        // Truncated, or without its record: damaged, and left where it is.
        bytes.truncate(last);
        fs_err::write(&path, &bytes).expect("write");
        let seen = cache.peek(None, &chain(&[1, 2])).expect("peek");
        assert!(
            matches!(seen[1], Peeked::Damaged(Damage::Size { .. })),
            "{seen:?}"
        );
        fs_err::remove_file(cache.record_path(&key(1))).expect("rm record");
        let seen = cache.peek(None, &chain(&[1, 2])).expect("peek");
        assert_eq!(seen[0], Peeked::Damaged(Damage::RecordMissing));
        assert!(cache.path(&key(1)).is_file() && path.is_file());
        let after = cache.read_record(&key(2)).ok().expect("record");
        assert_eq!(
            after.last_used, before[1].last_used,
            "peek updated last use"
        );
        assert!(cache.peek(None, &["nope".to_string()]).is_err());

        // What went into a key is kept in its record.
        let inputs = LayerInputs {
            layer: "three".into(),
            parameters: [("Port".to_string(), "80".to_string())].into(),
            ..LayerInputs::default()
        };
        let origin = Origin {
            inputs: Some(&inputs),
            ..origin("three")
        };
        cache
            .insert(&key(3), t.base(), &t.l1b, origin)
            .await
            .expect("insert with inputs");
        let record = cache.read_record(&key(3)).ok().expect("record");
        assert_eq!(record.inputs, Some(Box::new(inputs)));
        assert!(before[0].inputs.is_none());

        // A parent image not on this machine yet (`None`: the build downloads it first) is
        // not held against a first layer; one that should be here and is gone is.
        fs_err::remove_file(&t.base).expect("rm base");
        assert!(matches!(
            cache.peek(None, &chain(&[3])).expect("peek")[0],
            Peeked::Cached(_)
        ));
        let seen = cache.peek(Some(&t.base), &chain(&[3])).expect("peek");
        assert!(
            matches!(seen[0], Peeked::Damaged(Damage::BaseMissing(_))),
            "{seen:?}"
        );
    }

    #[test]
    fn changes_name_each_input_that_differs() {
        let doc = |path: &str, sha: &str| DocumentInput {
            path: path.into(),
            sha256: sha.into(),
        };
        let before = LayerInputs {
            layer: "web".into(),
            path: Some("components/web.yml".into()),
            sha256: Some("a".repeat(64)),
            parameters: [("Port".to_string(), "80".to_string())].into(),
            documents: vec![doc("lib/a.yml", "1"), doc("lib/b.yml", "2")],
            previous: Some(key(1)),
            ..LayerInputs::default()
        };
        assert!(before.changes(&before).is_empty());
        let after = LayerInputs {
            sha256: Some("b".repeat(64)),
            parameters: [
                ("Port".to_string(), "8080".to_string()),
                ("Tls".to_string(), "on".to_string()),
            ]
            .into(),
            documents: vec![doc("lib/a.yml", "3"), doc("lib/c.yml", "4")],
            ..before.clone()
        };
        let said: Vec<String> = after
            .changes(&before)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            said,
            [
                "document components/web.yml changed (sha256 aaaaaaaaaaaa → bbbbbbbbbbbb)",
                "parameter Port changed from \"80\" to \"8080\"",
                "parameter Tls changed from unset to \"on\"",
                "document lib/a.yml (run through ExecuteDocument) changed (sha256 1 → 3)",
                "no longer runs document lib/b.yml (ExecuteDocument)",
                "now runs document lib/c.yml (ExecuteDocument)",
            ]
        );
        let moved = LayerInputs {
            previous: Some(key(2)),
            ..before.clone()
        };
        assert_eq!(moved.changes(&before), [InputChange::Previous]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inserts_that_cannot_be_cached_are_refused_and_leave_nothing() {
        let t = Setup::new();
        let cache = t.cache();
        let e = cache
            .insert("nope", t.base(), &t.l1, origin("one"))
            .await
            .expect_err("bad key");
        assert!(matches!(e, LayerCacheError::BadKey { .. }), "{e}");
        let e = cache
            .insert(&key(2), parent(1, &"0".repeat(64)), &t.l2, origin("two"))
            .await
            .expect_err("no parent");
        assert!(matches!(e, LayerCacheError::ParentMissing { .. }), "{e}");
        let gone = t.base.with_extension("gone");
        let e = cache
            .insert(
                &key(1),
                LayerParent::Base {
                    path: &gone,
                    format: DiskFormat::Qcow2,
                },
                &t.l1,
                origin("one"),
            )
            .await
            .expect_err("no base");
        assert!(matches!(e, LayerCacheError::BaseMissing { .. }), "{e}");
        let e = cache
            .insert(
                &key(1),
                t.base(),
                &t.base.with_extension("missing"),
                origin("one"),
            )
            .await
            .expect_err("no file");
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(fs_err::read_dir(cache.dir()).expect("dir").next().is_none());

        // A full disk is its own error, the file it was writing named in its source.
        let full = LayerCacheError::from(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "failed to copy file to `/s/cache/layers/.tmp-1`",
        ));
        assert!(matches!(full, LayerCacheError::Full(_)));
        assert!(crate::diagnostic::error_chain(&full).contains(".tmp-1"));
    }
}
