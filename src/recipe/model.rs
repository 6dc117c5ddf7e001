//! The validated recipe. A value of these types is always valid and has every default filled
//! in. Defaults live here, in [`Infrastructure::default`] and friends, and nowhere else; the
//! user reference for each key (camelCase in files) is its declaration in
//! [`super::settings`], which shows these defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::dockerfile::DockerfileTemplate;
use super::name_template::NameTemplate;
use super::oci_reference::OciReference;
use super::units::ByteSize;
use super::version::{Version, VersionPattern};
use crate::diagnostic::Span;

/// One image recipe: what to start from, what to apply, how to build, test and export it.
/// Each field here and in the sections below is the setting of the same name (camelCase in
/// files; `parent` is `parentImage`, `*_secs` are `*Seconds`) declared in `settings`.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub name: String,
    pub version: Version,
    pub description: Option<String>,
    pub parent: Located<ParentImage>,
    pub components: Vec<ComponentUse>,
    pub working_directory: String,
    pub user_data: Option<String>,
    pub disk_size: Option<Located<ByteSize>>,
    pub infrastructure: Infrastructure,
    pub tests: Tests,
    pub outputs: Outputs,
    pub generalize: bool,
    pub distribution: Vec<Located<Distribution>>,
    pub cache: SharedCache,
    /// A container recipe (`containerType` written): built as an OCI image by buildah
    /// instead of a disk in a VM. `None`: a machine recipe.
    pub container: Option<ContainerRecipe>,
    /// Where the recipe was read from, its text and its sha256.
    pub source: RecipeSource,
}

impl Recipe {
    /// Whether it builds a container image (else a machine image).
    pub fn is_container(&self) -> bool {
        self.container.is_some()
    }
}

/// What a container recipe adds: its `containerType` and `dockerfileTemplate`. A container
/// recipe has none of the machine-only settings (`diskSize`, `userData`, `generalize`,
/// `outputs`, `cache`, the VM's `infrastructure` keys): validation refuses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecipe {
    pub container_type: ContainerType,
    /// The template as written, or [`super::dockerfile::DEFAULT_TEMPLATE`] when the recipe
    /// has none (then located at the `containerType` key).
    pub template: Located<DockerfileTemplate>,
}

/// `cache`: the OCI repositories that share the layer cache (`oci://host[:port]/repository`,
/// no tag: each layer's tag is its key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedCache {
    /// Pulled from in order, for the layers the local cache lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<OciReference>,
    /// Where the build's new layers are pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<OciReference>,
}

impl SharedCache {
    pub fn is_empty(&self) -> bool {
        self.from.is_empty() && self.to.is_none()
    }
}

pub const DEFAULT_WORKING_DIRECTORY: &str = "/tmp";
pub const DEFAULT_GENERALIZE: bool = true;
pub const DEFAULT_IMPORT_METHOD: ImportMethod = ImportMethod::Snapshot;

/// The recipe file: for messages after validation (e.g. while planning) and for pinning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeSource {
    pub path: PathBuf,
    pub text: String,
    pub sha256: Sha256,
}

/// A value and where it was written, for problems found after validation (while planning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Located<T> {
    pub fn new(value: T, span: Span) -> Located<T> {
        Located { value, span }
    }
}

/// Where the parent image comes from. Forms in a recipe:
///
/// - `parentImage: ../base/debian-12.qcow2` — a local file, relative to the recipe's directory.
///   `${VAR}` in the path is replaced by the environment variable `VAR` (only here). A path
///   that starts with `${VAR}` is the variable's value: when that is relative, it is relative
///   to the directory builder runs in (`BUILDER_BASE_IMAGE=fixtures/cache/x.qcow2`).
/// - `parentImage: {path: ./x.qcow2, sha256: <64 hex>}` — a local file pinned to a digest.
/// - `parentImage: {url: https://…/x.qcow2, sha256: <64 hex>}` — downloaded into the cache;
///   the sha256 is required.
/// - `parentImage: debian-12-base/1.x.x` or `{image: debian-12-base/1.x.x}` — the newest
///   matching build in the local store (`x` wildcards as in Image Builder; `1.2.0/3` names
///   one build).
/// - `parentImage: oci://registry:5000/images/base:1.0.0@sha256:<64 hex>` — a disk pushed to
///   an OCI registry (artifact or containerDisk), pinned by its manifest digest.
/// - `parentImage: oci://registry:5000/images/base:stable` — the same by tag: pipelines (and
///   `builder build`/`plan` with `--resolve-tags`) pin the digest the tag points to when the
///   plan is made; otherwise refused, with that digest in the hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ParentImage {
    File {
        /// As written, `${VAR}` not yet replaced.
        path: String,
        sha256: Option<Sha256>,
    },
    Url {
        url: String,
        sha256: Sha256,
    },
    Store {
        name: String,
        version: VersionPattern,
    },
    /// `parentImage: oci://host[:port]/repository[:tag]@sha256:<manifest digest>`: a disk
    /// pushed as a builder artifact or a KubeVirt containerDisk, pulled into the cache. A tag
    /// alone can move: the plan pins what it points to only when told to resolve tags.
    Oci {
        /// Without the `oci://` scheme.
        reference: String,
    },
}

/// A sha256 digest as 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sha256(String);

impl Sha256 {
    /// `text` when it is 64 hex digits (either case; kept lower-case).
    pub fn parse(text: &str) -> Option<Sha256> {
        let text = text.strip_prefix("sha256:").unwrap_or(text);
        (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Sha256(text.to_ascii_lowercase()))
    }
    /// From a digest computed here.
    pub fn from_digest(bytes: &[u8]) -> Sha256 {
        Sha256(hex::encode(bytes))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry of `distribution`: where a finished image goes. Close to Image Builder's
/// distribution settings, for local use:
///
/// ```yaml
/// distribution:
///   - directory: {path: /srv/images/, name: "web-{{imagebuilder:buildVersion}}"}
///   - vagrant: {path: ./out/web.box}
///   - oci: {reference: "127.0.0.1:5000/images/web:{{imagebuilder:version}}", plainHttp: true}
///   - containerDisk: {reference: "127.0.0.1:5000/vms/web:{{imagebuilder:version}}"}
///   - ami: {region: eu-west-1, bucket: my-imports, name: "web {{imagebuilder:buildDate}}"}
/// ```
///
/// Name templates (`name`, an OCI tag) know the placeholders of `outputs.name`:
/// `{{imagebuilder:name}}`, `{{imagebuilder:version}}`, `{{imagebuilder:buildVersion}}` (the
/// build number) and `{{imagebuilder:buildDate}}` (optionally with a format suffix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distribution {
    Directory(DirectoryDistribution),
    Vagrant(VagrantDistribution),
    Oci(OciDistribution),
    ContainerDisk(OciDistribution),
    Ami(AmiDistribution),
}

/// The distribution kinds as keys in a recipe, in the order of [`Distribution`].
pub const DISTRIBUTION_KINDS: &[&str] = &["directory", "vagrant", "oci", "containerDisk", "ami"];

impl Distribution {
    /// The key the entry is written with (`directory`, `containerDisk`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Distribution::Directory(_) => "directory",
            Distribution::Vagrant(_) => "vagrant",
            Distribution::Oci(_) => "oci",
            Distribution::ContainerDisk(_) => "containerDisk",
            Distribution::Ami(_) => "ami",
        }
    }
}

/// `directory`: the build's outputs, `manifest.json` and `SHA256SUMS` copied into
/// `<path>/<name>/`. The copy is made in a temporary folder inside `path`, every file's
/// sha256 is checked against the manifest, and the folder is then renamed to its name in one
/// step, so a reader never sees half of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryDistribution {
    pub path: Located<String>,
    pub name: NameTemplate,
    pub formats: DirectoryFormats,
    pub overwrite: bool,
}

/// `directory.formats`: a machine build's disk formats, or a container build's archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryFormats {
    /// The disk formats to copy (a format the build did not export is converted); empty:
    /// every output of the build (and, in a pipeline's list, `formats` not written).
    Disk(Vec<Format>),
    /// The archive files a container image is written to; a container recipe without
    /// `formats` gets `[oci-archive]`.
    Container(Vec<ArchiveFormat>),
}

/// A container recipe's `directory.formats` when it writes none.
pub const DEFAULT_ARCHIVE_FORMATS: &[ArchiveFormat] = &[ArchiveFormat::OciArchive];

impl Default for DirectoryFormats {
    fn default() -> DirectoryFormats {
        DirectoryFormats::Disk(Vec::new())
    }
}

impl DirectoryFormats {
    /// The disk formats (none for a container build's archives).
    pub fn disk(&self) -> &[Format] {
        match self {
            DirectoryFormats::Disk(formats) => formats,
            DirectoryFormats::Container(_) => &[],
        }
    }

    /// The archives for a container build: those written, else the default (also for a
    /// pipeline's entry that names no formats).
    pub fn archives(&self) -> Vec<ArchiveFormat> {
        match self {
            DirectoryFormats::Container(formats) => formats.clone(),
            DirectoryFormats::Disk(formats) if formats.is_empty() => {
                DEFAULT_ARCHIVE_FORMATS.to_vec()
            }
            DirectoryFormats::Disk(_) => Vec::new(),
        }
    }
}

/// `vagrant`: a Vagrant box for the libvirt provider (`metadata.json`, a `Vagrantfile` with
/// libvirt defaults, `box.img` = the qcow2; a gzip'd tar), accepted by `vagrant box add`.
/// Next to the box, `<box>.json` is catalog metadata (name, version, sha256) that `vagrant
/// box add <box>.json` also reads. `vagrant up` needs the vagrant-libvirt plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VagrantDistribution {
    pub path: Located<String>,
    pub name: NameTemplate,
    pub overwrite: bool,
}

/// `oci` and `containerDisk`: an OCI registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciDistribution {
    pub reference: Located<String>,
    pub plain_http: bool,
}

/// `ami`: Image Builder's `amiDistributionConfiguration`, plus where to upload the disk.
/// Credentials come from the standard AWS environment variables and `~/.aws` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmiDistribution {
    pub region: Option<String>,
    pub bucket: String,
    pub prefix: Option<String>,
    pub name: NameTemplate,
    pub description: Option<String>,
    pub ami_tags: BTreeMap<String, String>,
    pub regions: Vec<String>,
    pub launch_permission: LaunchPermission,
    pub boot_mode: Option<BootMode>,
    pub import_method: ImportMethod,
    pub endpoint: AmiEndpoints,
    pub profile: Option<String>,
}

/// Who may launch an AMI besides its owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchPermission {
    pub user_ids: Vec<String>,
    pub user_groups: Vec<String>,
}

/// S3 and EC2 endpoints that replace AWS's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmiEndpoints {
    pub s3: Option<String>,
    pub ec2: Option<String>,
}

/// One entry of `components` (or `tests.components`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentUse {
    pub path: Located<String>,
    pub parameters: Vec<ParameterValue>,
    /// `cache` (default true): `false` always runs the component (and every later one)
    /// instead of reusing its cached layer.
    pub cache: bool,
    /// The whole entry, for problems about it.
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterValue {
    pub name: String,
    /// The value given to the component.
    pub value: String,
    /// Where the name is written.
    pub span: Span,
}

impl ComponentUse {
    /// The parameters as the executor takes them.
    pub fn parameter_map(&self) -> BTreeMap<String, String> {
        self.parameters
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect()
    }
}

/// The build VM (Image Builder's infrastructure configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Infrastructure {
    pub cpus: u32,
    pub memory: ByteSize,
    pub accelerator: Accelerator,
    pub firmware: Firmware,
    /// Written only when not `full`, so plans made before the key existed keep their digest.
    #[serde(default = "Boot::full", skip_serializing_if = "Boot::is_full")]
    pub boot: Boot,
    pub network: Network,
    #[serde(rename = "bootTimeoutSeconds")]
    pub boot_timeout_secs: u64,
    #[serde(rename = "buildTimeoutSeconds")]
    pub build_timeout_secs: u64,
    #[serde(rename = "shutdownTimeoutSeconds")]
    pub shutdown_timeout_secs: u64,
    pub keep_on_failure: bool,
}

pub const MIN_MEMORY: ByteSize = ByteSize::mib(256);
pub const MAX_CPUS: u32 = 255;
/// Upper bound for every timeout: a week.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

impl Default for Infrastructure {
    fn default() -> Infrastructure {
        Infrastructure {
            cpus: 2,
            memory: ByteSize::gib(2),
            accelerator: Accelerator::Auto,
            firmware: Firmware::Bios,
            boot: Boot::Full,
            network: Network::None,
            boot_timeout_secs: 900,
            build_timeout_secs: 7200,
            shutdown_timeout_secs: 120,
            keep_on_failure: false,
        }
    }
}

/// A closed set of words ([`word_enum!`]'s enums), as the file walker reads one.
pub(crate) trait Word: Copy {
    const NAMES: &'static [&'static str];
    fn from_name(text: &str) -> Option<Self>;
}

/// Closed sets of words, each with its spelling in files.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const NAMES: &'static [&'static str] = &[$($text),+];
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            pub fn from_name(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
            /// `text` as a command-line value, refused with the recipe's message.
            pub fn parse_named(noun: &str, text: &str) -> Result<$name, String> {
                $name::from_name(text).ok_or_else(|| {
                    format!("unknown {noun} `{text}`; expected {}", crate::diagnostic::one_of($name::NAMES))
                })
            }
        }
        impl Word for $name {
            const NAMES: &'static [&'static str] = $name::NAMES;
            fn from_name(text: &str) -> Option<$name> {
                $name::from_name(text)
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

word_enum!(Accelerator { Auto = "auto", Kvm = "kvm", Tcg = "tcg" });
word_enum!(
    /// An AMI's boot mode, as EC2 spells it.
    BootMode {
        LegacyBios = "legacy-bios",
        Uefi = "uefi",
        UefiPreferred = "uefi-preferred",
    }
);
word_enum!(
    /// How an AMI is imported: ImportSnapshot + RegisterImage, or ImportImage.
    ImportMethod {
        Snapshot = "snapshot",
        Image = "image",
    }
);
word_enum!(Firmware { Bios = "bios", Uefi = "uefi" });
word_enum!(
    /// How the build VM starts: the guest's own boot (firmware, bootloader, systemd,
    /// cloud-init), or a small appliance (the host's kernel, our agent as init, steps in a
    /// chroot of the guest's root file system; see `vm::appliance`).
    Boot {
        Full = "full",
        Appliance = "appliance",
    }
);
word_enum!(Network { None = "none", User = "user" });

impl Boot {
    /// The default (for serde: plans written before the key existed have none).
    pub fn full() -> Boot {
        Boot::Full
    }
    pub fn is_full(&self) -> bool {
        *self == Boot::Full
    }
}

/// `userData` with `infrastructure.boot: appliance`: in the recipe, or made so by a pipeline
/// or the command line.
pub const USER_DATA_IN_APPLIANCE: &str = "`userData` cannot be used with `infrastructure.boot: appliance`: cloud-init does not run in the appliance";
pub const USER_DATA_IN_APPLIANCE_HINT: &str = "use `infrastructure.boot: full` to have cloud-init apply it, or do its work in a component step";
word_enum!(
    /// Export formats. `vmdk` is streamOptimized, `vhd` is fixed (as clouds import it).
    Format {
        Qcow2 = "qcow2",
        Raw = "raw",
        Vmdk = "vmdk",
        Vhdx = "vhdx",
        Vhd = "vhd",
        Ova = "ova",
    }
);
word_enum!(
    /// A container recipe's `containerType` (Image Builder's key; `docker` is its only value).
    ContainerType { Docker = "docker" }
);
word_enum!(
    /// The files a container image is written to in a `directory` distribution: `docker load`
    /// / `podman load` read either.
    ArchiveFormat {
        DockerArchive = "docker-archive",
        OciArchive = "oci-archive",
    }
);
word_enum!(
    /// qcow2 compression. `zstd` needs QEMU ≥ 5.1 to read the image.
    Compression {
        Zstd = "zstd",
        Zlib = "zlib",
        None = "none",
    }
);

impl Format {
    /// The file extension of an output.
    pub fn extension(self) -> &'static str {
        self.name()
    }
}

/// The test stage (Image Builder's `imageTestsConfiguration`). Serialized (without its
/// components) for a pipeline's `tests`, named as in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tests {
    pub enabled: bool,
    #[serde(rename = "timeoutSeconds")]
    pub timeout_secs: u64,
    #[serde(skip)]
    pub components: Vec<ComponentUse>,
}

impl Default for Tests {
    fn default() -> Tests {
        Tests {
            enabled: true,
            timeout_secs: 3600,
            components: Vec::new(),
        }
    }
}

/// What the build exports. The local store always keeps the outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outputs {
    pub formats: Vec<Format>,
    pub compression: Compression,
    pub name: NameTemplate,
    pub directory: Option<String>,
}

impl Default for Outputs {
    fn default() -> Outputs {
        Outputs {
            formats: vec![Format::Qcow2],
            compression: Compression::Zlib,
            name: NameTemplate::default(),
            directory: None,
        }
    }
}
