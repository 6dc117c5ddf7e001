//! `manifest.json`: what went into one build and what came out of it. The build fills a
//! [`Manifest`] (export gives its [`Artifact`]s); this module defines it, writes it atomically
//! and reads it back (the store lists and resolves images from it), with the package
//! inventory (a simple SBOM) the build reads from the guest.
//!
//! Readers are lenient (missing lists default to empty, unknown keys are ignored) so a newer
//! builder can still list builds made by an older one; `schemaVersion` says which shape it is.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::recipe::Format;

/// The shape of `manifest.json` this builder writes. Bump it when a field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// The file name of the manifest in a build's folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a redacted parameter value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Why a `manifest.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{path} is not a valid manifest: {detail}")]
    Decode { path: PathBuf, detail: String },
}

/// Everything recorded about one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    /// A machine image (disk outputs) or a container image (an OCI image layout). Absent in
    /// manifests written before container builds existed: those are machine builds.
    #[serde(default)]
    pub kind: ImageKind,
    pub image: ImageId,
    /// A unique id for this build (also the name of its log folder if it fails).
    pub build_id: String,
    pub created: DateTime<Utc>,
    /// The version of builder that made the image.
    pub builder_version: String,
    /// The build as a whole.
    pub status: Status,
    #[serde(default)]
    pub inputs: Inputs,
    /// sha256 of the resolved plan: same inputs, same digest.
    #[serde(default)]
    pub plan_digest: String,
    #[serde(default)]
    pub host: HostInfo,
    /// Wall time of each build stage, in order.
    #[serde(default)]
    pub timings: Vec<StageTiming>,
    /// Status of each phase of each component, in the order they ran.
    #[serde(default)]
    pub phases: Vec<PhaseStatus>,
    /// The disk layer written by each component, with its cache key.
    #[serde(default)]
    pub layers: Vec<LayerKey>,
    /// The exported files (in the build's folder), with their digests.
    #[serde(default)]
    pub outputs: Vec<Artifact>,
    /// Packages installed in the image, read from the guest after the build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<PackageList>,
    /// The image's package sources and the keys it trusts, read from the image after the build
    /// (what `builder images outdated` and `packageUpdates` check against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_sources: Option<PackageSources>,
    /// What changed in the package list since the image this one replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_changes: Option<PackageChanges>,
    /// Results of the test stage.
    #[serde(default)]
    pub tests: Vec<TestResult>,
    /// A container build's image: where its OCI image layout is and what it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerImage>,
}

/// What a build made: a machine image or a container image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// Disks (qcow2, raw, …) booted by a VM: `outputs`.
    #[default]
    Machine,
    /// An OCI image: `container`.
    Container,
}

impl ImageKind {
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Machine => "machine",
            ImageKind::Container => "container",
        }
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A container build's image, as its OCI image layout holds it: one image manifest
/// (`index.json` names it with `org.opencontainers.image.ref.name`), its config and layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerImage {
    /// The OCI image layout's folder, relative to the build's folder (`oci`).
    pub layout: String,
    /// `sha256:<hex>` of the image manifest (its bytes, as pushed: a registry reports the same).
    pub manifest_digest: String,
    /// `sha256:<hex>` of the image config.
    pub config_digest: String,
    /// The image manifest's media type (`application/vnd.oci.image.manifest.v1+json`).
    pub media_type: String,
    /// Bytes of the manifest, the config and the layers, as stored (compressed layers).
    pub size: u64,
    /// From the image config: `amd64`, …
    pub architecture: String,
    /// From the image config: `linux`.
    pub os: String,
}

/// `name/x.y.z/n`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageId {
    pub name: String,
    /// The recipe's semantic version, `x.y.z`.
    pub version: String,
    /// The build number, counted per name and version from 1.
    pub build: u32,
}

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.name, self.version, self.build)
    }
}

/// Outcome of a build, a phase, a step or a test (AWSTOE's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    Failed,
    Skipped,
    Cancelled,
    /// Not run: its result came from the layer cache.
    Cached,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Success => "success",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Cached => "cached",
            Status::Cancelled => "cancelled",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inputs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentInput>,
    #[serde(default)]
    pub components: Vec<ComponentInput>,
}

/// The parent image as the recipe named it, and the digest of what was used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentInput {
    /// As written in the recipe: a path, a URL, a store reference (`name/1.x.x`) or an OCI
    /// reference; an OCI tag the plan resolved is written with the manifest digest it pointed
    /// to (`oci://host/repo:tag@sha256:…`, which is also `sha256`).
    pub source: String,
    pub sha256: String,
    /// For a parent from the local store: the exact build used, `name/x.y.z/n`. The store
    /// uses it to refuse removing an image another build was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_image: Option<String>,
    /// For a parent pulled from an OCI registry, whose `sha256` is the manifest digest: the
    /// sha256 of the disk the manifest held, which the parent cache keeps it under
    /// (`cache/base/<disk sha256>.qcow2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_sha256: Option<String>,
}

/// One component document as used by the build, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentInput {
    /// Where the document came from (path or store reference).
    pub path: String,
    /// The document's `name` (its path when it has none).
    pub name: String,
    /// sha256 of the document's bytes: what identifies the component. An AWSTOE document has
    /// no version field (Image Builder versions the component resource that wraps a
    /// document, not the document), so there is no version to record; manifests of earlier
    /// builders had an always-empty `version`, which readers ignore.
    pub sha256: String,
    #[serde(default)]
    pub parameters: Vec<ParameterValue>,
    /// The documents it runs through `ExecuteDocument`, at any depth, as the plan pinned them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<DocumentInput>,
}

/// A document a component reaches through `ExecuteDocument`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentInput {
    /// Relative to the recipe's directory.
    pub path: String,
    /// sha256 of the document's bytes.
    pub sha256: String,
}

/// A parameter value the component ran with. Secret values are never written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParameterValue {
    pub name: String,
    /// The value, or [`REDACTED`] for a secret.
    pub value: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redacted: bool,
}

impl ParameterValue {
    /// The value as it will be recorded: a secret's value is replaced by [`REDACTED`].
    pub fn new(name: impl Into<String>, value: impl Into<String>, secret: bool) -> Self {
        Self {
            name: name.into(),
            value: if secret {
                REDACTED.to_string()
            } else {
                value.into()
            },
            redacted: secret,
        }
    }
}

/// Where the build ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    /// `qemu-system-x86_64 --version`'s first line.
    #[serde(default)]
    pub qemu_version: String,
    /// `kvm` or `tcg`.
    #[serde(default)]
    pub accelerator: String,
    /// `bios`, or `uefi` with the firmware file used.
    #[serde(default)]
    pub firmware: String,
    /// How the build VM started (`infrastructure.boot`): `full` (the image's own boot) or
    /// `appliance` (the host's kernel, builder's agent as init). Empty in manifests written
    /// before boot modes existed: those builds booted `full`. The test VM always boots `full`.
    #[serde(default)]
    pub boot: String,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageTiming {
    /// `fetch`, `overlay`, `boot`, `build`, `generalize`, `shutdown`, `test`, `export`, …
    pub stage: String,
    pub started: DateTime<Utc>,
    pub duration_secs: f64,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseStatus {
    pub component: String,
    /// `build`, `validate` or `test`.
    pub phase: String,
    pub status: Status,
    pub duration_secs: f64,
    /// The failure's message, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One layer of the build's disk: `boot`, a component's, or `generalize`, by its cache key;
/// and, when the build took it from the layer cache, from where and which build made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerKey {
    pub component: String,
    /// The layer cache's key (`build::cache`).
    pub key: String,
    /// `local` (this store's cache) or the registry it was pulled from; absent when the
    /// build ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The earlier build that made the reused layer (`name/x.y.z/n`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    /// The component whose test phase (or the test component) ran.
    pub component: String,
    pub status: Status,
    pub duration_secs: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One exported file, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// File name inside the output folder.
    pub file: String,
    pub format: Format,
    /// Bytes on disk (the apparent size; a raw file is sparse).
    pub size: u64,
    /// The disk's size as the guest sees it.
    pub virtual_size: u64,
    pub sha256: String,
}

impl Artifact {
    pub fn path(&self, out_dir: &Path) -> PathBuf {
        out_dir.join(&self.file)
    }
}

/// The package inventory of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageList {
    /// `dpkg` or `rpm`.
    pub manager: String,
    pub packages: Vec<Package>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
}

/// The package sources an image uses and the keys it trusts, as files read from the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageSources {
    /// `apt` or `dnf` (yum's files too).
    pub manager: String,
    /// apt: `dpkg --print-architecture`, then `dpkg --print-foreign-architectures`.
    /// dnf: `uname -m`.
    pub architectures: Vec<String>,
    /// Every sources file, sorted by path: apt `/etc/apt/sources.list`,
    /// `/etc/apt/sources.list.d/*.list` and `*.sources`; dnf `/etc/yum.repos.d/*.repo`.
    pub files: Vec<SourceFile>,
    /// Every key file in the places keys live, sorted by path: apt `/etc/apt/trusted.gpg`,
    /// `/etc/apt/trusted.gpg.d/*`, `/etc/apt/keyrings/*`, `/usr/share/keyrings/*`;
    /// dnf `/etc/pki/rpm-gpg/*`. WHICH keys a repository trusts is decided at check time
    /// from the sources (Signed-By / signed-by), as apt does; not here.
    pub keys: Vec<KeyFile>,
}

/// A package sources file of the image, as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceFile {
    pub path: String,
    pub text: String,
}

/// A key file of the image (binary or armored OpenPGP), as bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyFile {
    pub path: String,
    /// sha256 of the file's bytes, hex.
    pub sha256: String,
    /// The file's bytes, standard base64.
    pub data: String,
}

/// What changed in the package list since the image this one replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageChanges {
    /// `name/x.y.z/n` of the image this one replaces: the newest *available* stored build of
    /// the same image name made before this build (in a pipeline: its previous image).
    pub since: String,
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
    pub changed: Vec<PackageChange>,
}

/// A package installed in both images, at different versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageChange {
    pub name: String,
    pub arch: String,
    pub from: String,
    pub to: String,
}

impl PackageSources {
    /// `apt, 3 files, 4 keys`.
    pub fn summary(&self) -> String {
        use crate::diagnostic::plural;
        let (files, keys) = (self.files.len(), self.keys.len());
        format!(
            "{}, {files} {}, {keys} {}",
            self.manager,
            plural(files, "file", "files"),
            plural(keys, "key", "keys")
        )
    }
}

impl PackageChanges {
    /// `since web/1.2.0/1: 1 changed, 0 added, 0 removed`.
    pub fn summary(&self) -> String {
        format!(
            "since {}: {} changed, {} added, {} removed",
            self.since,
            self.changed.len(),
            self.added.len(),
            self.removed.len()
        )
    }
}

impl PackageList {
    /// What changed from `older` to `self`, keyed by (name, arch), sorted by name then arch:
    /// the packages only `self` has (added), those only `older` has (removed), and those
    /// both have at different versions (changed). A name and arch installed at several
    /// versions at once (rpm's kernels) compares as a set of versions: one version on each
    /// side that differs is a change, otherwise the versions only one side has are added or
    /// removed.
    pub fn changes_since(
        &self,
        older: &PackageList,
    ) -> (Vec<Package>, Vec<Package>, Vec<PackageChange>) {
        use std::collections::BTreeMap;
        type Versions<'a> = BTreeMap<(&'a str, &'a str), Vec<&'a str>>;
        fn by_key(list: &PackageList) -> Versions<'_> {
            let mut map = Versions::new();
            for p in &list.packages {
                map.entry((p.name.as_str(), p.arch.as_str()))
                    .or_default()
                    .push(p.version.as_str());
            }
            for versions in map.values_mut() {
                versions.sort_unstable();
                versions.dedup();
            }
            map
        }
        let package = |(name, arch): (&str, &str), version: &str| Package {
            name: name.to_string(),
            version: version.to_string(),
            arch: arch.to_string(),
        };
        let (new, old) = (by_key(self), by_key(older));
        let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        let keys: std::collections::BTreeSet<(&str, &str)> =
            new.keys().chain(old.keys()).copied().collect();
        for key in keys {
            let now = new.get(&key).map(Vec::as_slice).unwrap_or_default();
            let before = old.get(&key).map(Vec::as_slice).unwrap_or_default();
            match (now, before) {
                ([to], [from]) if to != from => changed.push(PackageChange {
                    name: key.0.to_string(),
                    arch: key.1.to_string(),
                    from: from.to_string(),
                    to: to.to_string(),
                }),
                _ => {
                    for v in now.iter().filter(|v| !before.contains(v)) {
                        added.push(package(key, v));
                    }
                    for v in before.iter().filter(|v| !now.contains(v)) {
                        removed.push(package(key, v));
                    }
                }
            }
        }
        (added, removed, changed)
    }
}

impl Manifest {
    /// A manifest for a build that starts now, with every list empty.
    pub fn new(image: ImageId, build_id: impl Into<String>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            kind: ImageKind::Machine,
            image,
            build_id: build_id.into(),
            created: Utc::now(),
            builder_version: env!("CARGO_PKG_VERSION").to_string(),
            status: Status::Success,
            inputs: Inputs::default(),
            plan_digest: String::new(),
            host: HostInfo::default(),
            timings: Vec::new(),
            phases: Vec::new(),
            layers: Vec::new(),
            outputs: Vec::new(),
            packages: None,
            package_sources: None,
            package_changes: None,
            tests: Vec::new(),
            container: None,
        }
    }

    /// Write `dir/manifest.json` under a temporary name, sync it, and rename it into place.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(MANIFEST_FILE);
        super::write_json(&path, self)?;
        Ok(path)
    }

    /// Read a `manifest.json`.
    pub fn read(path: &Path) -> Result<Self, ManifestError> {
        let bytes = fs_err::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| ManifestError::Decode {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    /// What changed in the package list since `older` (the image this one replaces), when
    /// both have a package list.
    pub fn package_changes_since(&self, older: &Manifest) -> Option<PackageChanges> {
        let (new, old) = (self.packages.as_ref()?, older.packages.as_ref()?);
        let (added, removed, changed) = new.changes_since(old);
        Some(PackageChanges {
            since: older.image.to_string(),
            added,
            removed,
            changed,
        })
    }

    /// The output of the given format, if the build exported one.
    pub fn output(&self, format: Format) -> Option<&Artifact> {
        self.outputs.iter().find(|a| a.format == format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_manifest_round_trips() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut m = Manifest::new(
            ImageId {
                name: "web".into(),
                version: "1.2.0".into(),
                build: 3,
            },
            "b-1",
        );
        m.inputs.components.push(ComponentInput {
            path: "c.yml".into(),
            name: "c".into(),
            sha256: "00".repeat(32),
            parameters: vec![
                ParameterValue::new("port", "8080", false),
                ParameterValue::new("token", "hunter2", true),
            ],
            documents: vec![DocumentInput {
                path: "lib/common.yml".into(),
                sha256: "11".repeat(32),
            }],
        });
        m.outputs.push(Artifact {
            file: "web.qcow2".into(),
            format: Format::Qcow2,
            size: 10,
            virtual_size: 20,
            sha256: "ab".repeat(32),
        });
        let path = m.write(dir.path()).expect("write");
        let text = fs_err::read_to_string(&path).expect("read");
        assert!(!text.contains("hunter2"));
        assert!(text.contains("\"schemaVersion\": 1"));
        assert!(text.contains("\"format\": \"qcow2\""));
        let back = Manifest::read(&path).expect("read back");
        assert_eq!(back, m);
        assert_eq!(back.output(Format::Qcow2).map(|a| a.size), Some(10));
        // Only the manifest is left: the temporary file was renamed.
        let names: Vec<_> = fs_err::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(MANIFEST_FILE)]);
    }

    fn list(packages: &[(&str, &str, &str)]) -> PackageList {
        PackageList {
            manager: "dpkg".into(),
            packages: packages
                .iter()
                .map(|(name, version, arch)| Package {
                    name: name.to_string(),
                    version: version.to_string(),
                    arch: arch.to_string(),
                })
                .collect(),
        }
    }

    fn names(packages: &[Package]) -> Vec<String> {
        packages
            .iter()
            .map(|p| format!("{}:{} {}", p.name, p.arch, p.version))
            .collect()
    }

    #[test]
    fn changes_since_finds_added_removed_and_changed_by_name_and_arch() {
        let older = list(&[
            ("bash", "5.2.15-2+b7", "amd64"),
            ("libc6", "2.36-9+deb12u7", "amd64"),
            ("libc6", "2.36-9+deb12u7", "i386"),
            ("nginx", "1.22.1-9", "amd64"),
            ("tzdata", "2024a-0+deb12u1", "all"),
        ]);
        let newer = list(&[
            ("bash", "5.2.15-2+b7", "amd64"),
            ("curl", "7.88.1-10+deb12u8", "amd64"),
            // Only the amd64 one was upgraded: the i386 one did not change.
            ("libc6", "2.36-9+deb12u9", "amd64"),
            ("libc6", "2.36-9+deb12u7", "i386"),
            ("tzdata", "2025b-0+deb12u1", "all"),
        ]);
        let (added, removed, changed) = newer.changes_since(&older);
        assert_eq!(names(&added), ["curl:amd64 7.88.1-10+deb12u8"]);
        assert_eq!(names(&removed), ["nginx:amd64 1.22.1-9"]);
        assert_eq!(
            changed,
            [
                PackageChange {
                    name: "libc6".into(),
                    arch: "amd64".into(),
                    from: "2.36-9+deb12u7".into(),
                    to: "2.36-9+deb12u9".into(),
                },
                PackageChange {
                    name: "tzdata".into(),
                    arch: "all".into(),
                    from: "2024a-0+deb12u1".into(),
                    to: "2025b-0+deb12u1".into(),
                },
            ]
        );
        // The same list: nothing; the other way round: added and removed swap.
        assert_eq!(newer.changes_since(&newer), (vec![], vec![], vec![]));
        let (added, removed, changed) = older.changes_since(&newer);
        assert_eq!(names(&added), ["nginx:amd64 1.22.1-9"]);
        assert_eq!(names(&removed), ["curl:amd64 7.88.1-10+deb12u8"]);
        assert_eq!(changed[0].from, "2.36-9+deb12u9");
    }

    #[test]
    fn package_changes_name_the_older_build_and_need_both_lists() {
        let id = |build| ImageId {
            name: "web".into(),
            version: "1.2.0".into(),
            build,
        };
        let (mut older, mut newer) = (Manifest::new(id(1), "b-1"), Manifest::new(id(2), "b-2"));
        newer.packages = Some(list(&[("bash", "5.2.15-2+b8", "amd64")]));
        assert_eq!(newer.package_changes_since(&older), None, "no older list");
        older.packages = Some(list(&[("bash", "5.2.15-2+b7", "amd64")]));
        let changes = newer.package_changes_since(&older).expect("both lists");
        assert_eq!(changes.since, "web/1.2.0/1");
        assert_eq!(changes.changed.len(), 1);
        assert_eq!(
            changes.summary(),
            "since web/1.2.0/1: 1 changed, 0 added, 0 removed"
        );
        newer.packages = None;
        assert_eq!(newer.package_changes_since(&older), None, "no newer list");
    }

    #[test]
    fn changes_since_an_arch_change_is_a_removal_and_an_addition() {
        let older = list(&[("libfoo", "1.0", "i386")]);
        let newer = list(&[("libfoo", "1.0", "amd64")]);
        let (added, removed, changed) = newer.changes_since(&older);
        assert_eq!(names(&added), ["libfoo:amd64 1.0"]);
        assert_eq!(names(&removed), ["libfoo:i386 1.0"]);
        assert!(changed.is_empty());
    }

    #[test]
    fn changes_since_compares_several_installed_versions_as_sets() {
        // rpm keeps several kernels: one more and one fewer is not a "change".
        let older = list(&[
            ("kernel", "5.14.0-1.el9", "x86_64"),
            ("kernel", "5.14.0-2.el9", "x86_64"),
        ]);
        let newer = list(&[
            ("kernel", "5.14.0-2.el9", "x86_64"),
            ("kernel", "5.14.0-3.el9", "x86_64"),
        ]);
        let (added, removed, changed) = newer.changes_since(&older);
        assert_eq!(names(&added), ["kernel:x86_64 5.14.0-3.el9"]);
        assert_eq!(names(&removed), ["kernel:x86_64 5.14.0-1.el9"]);
        assert!(changed.is_empty());
    }
}
