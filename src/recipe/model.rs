//! The validated recipe. A value of these types is always valid and has every default filled
//! in. Defaults live here, in [`Infrastructure::default`] and friends, and nowhere else; the
//! user reference for each key (camelCase in files) is its declaration in
//! [`super::settings`], which shows these defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::name_template::NameTemplate;
use super::units::ByteSize;
use super::version::{Version, VersionPattern};
use crate::diagnostic::Span;

/// One image recipe: what to start from, what to apply, how to build, test and export it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// `name` (required): letters, digits, `-` and `_`, at most 128 characters, starting with a
    /// letter or digit. Used in store references (`name/1.2.0`) and file names.
    pub name: String,
    /// `version` (required): semantic version `major.minor.patch`. Each build of it gets a
    /// build number in the store: `name/1.2.0/3`.
    pub version: Version,
    /// `description`: free text. Default: none.
    pub description: Option<String>,
    /// `parentImage` (required): the disk image the build starts from.
    pub parent: Located<ParentImage>,
    /// `components` (required, at least one): applied in order; each one's `build` then
    /// `validate` phase runs before the next component starts.
    pub components: Vec<ComponentUse>,
    /// `workingDirectory`: absolute directory in the guest where components run.
    /// Default: `/tmp`.
    pub working_directory: String,
    /// `userData`: a `#cloud-config` document merged into the build VM's cloud-init seed.
    /// Default: none.
    pub user_data: Option<String>,
    /// `diskSize`: size of the image's disk; the guest grows its root partition to fill it.
    /// At least the parent image's virtual size. Default: the parent's size.
    pub disk_size: Option<Located<ByteSize>>,
    /// `infrastructure`: the build VM, inline or a path to a file with the same keys.
    pub infrastructure: Infrastructure,
    /// `tests`: the test stage in a fresh VM booted from the result.
    pub tests: Tests,
    /// `outputs`: exported formats and their file names.
    pub outputs: Outputs,
    /// `generalize`: seal the image before it is shut down for good (cloud-init clean, empty
    /// machine-id, no SSH host keys, logs and shell history cleared, fstrim). `false` keeps
    /// all of that as the build left it; builder's agent is removed either way. Default: `true`.
    pub generalize: bool,
    /// `distribution`: where finished images go besides the local store (which always keeps
    /// them): a list of targets, each a mapping with one key naming its kind (`directory`,
    /// `vagrant`, `oci`, `containerDisk`, `ami`) and that kind's settings. `builder build`
    /// distributes to every target after the image is stored; `builder distribute` does the
    /// same for an image already in the store. Default: none.
    pub distribution: Vec<Located<Distribution>>,
    /// Where the recipe was read from, its text and its sha256.
    pub source: RecipeSource,
}

pub const DEFAULT_WORKING_DIRECTORY: &str = "/tmp";
pub const DEFAULT_GENERALIZE: bool = true;
pub const DEFAULT_IMPORT_METHOD: ImportMethod = ImportMethod::Snapshot;

/// The recipe file: for messages after validation (e.g. while planning) and for pinning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeSource {
    pub path: PathBuf,
    pub text: String,
    pub sha256: String,
}

/// A value and where it was written, for problems found after validation (while planning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub span: Span,
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
    /// `directory`: a copy of the outputs in a folder of their own.
    Directory(DirectoryDistribution),
    /// `vagrant`: a Vagrant box for the libvirt provider.
    Vagrant(VagrantDistribution),
    /// `oci`: the disk pushed to an OCI registry as an artifact (a layer holding the qcow2,
    /// with `manifest.json` and `SHA256SUMS` alongside).
    Oci(OciDistribution),
    /// `containerDisk`: the disk pushed as a KubeVirt containerDisk (an image whose single
    /// layer holds `disk/<name>.qcow2`).
    ContainerDisk(OciDistribution),
    /// `ami`: the disk imported into EC2 as an AMI (S3 upload, then ImportSnapshot +
    /// RegisterImage).
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
    /// `path` (required): the folder that receives the image's folder; relative to the
    /// recipe's directory. Created if missing.
    pub path: Located<String>,
    /// `name`: the image's folder inside `path`, a name template. Default:
    /// `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: NameTemplate,
    /// `formats`: which outputs to copy. A format the build did not export (e.g. `ova`) is
    /// converted from the stored disk. Default: every output of the build.
    pub formats: Vec<Format>,
    /// `overwrite`: replace a folder of the same name. Default: `false` (refuse).
    pub overwrite: bool,
}

/// `vagrant`: a Vagrant box for the libvirt provider (`metadata.json`, a `Vagrantfile` with
/// libvirt defaults, `box.img` = the qcow2; a gzip'd tar), accepted by `vagrant box add`.
/// Next to the box, `<box>.json` is catalog metadata (name, version, sha256) that `vagrant
/// box add <box>.json` also reads. `vagrant up` needs the vagrant-libvirt plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VagrantDistribution {
    /// `path` (required): the box file (`./out/web.box`), or a folder (written with a
    /// trailing `/`) that receives `<name>.box`; relative to the recipe's directory.
    pub path: Located<String>,
    /// `name`: the box file's stem when `path` is a folder, a name template. Default:
    /// `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: NameTemplate,
    /// `overwrite`: replace a box file of the same name. Default: `false` (refuse).
    pub overwrite: bool,
}

/// `oci` and `containerDisk`: an OCI registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciDistribution {
    /// `reference` (required): `registry[:port]/repository:tag`, without a scheme. The tag
    /// may hold name-template placeholders (`web:{{imagebuilder:version}}`). Default tag:
    /// `{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`. Credentials come from the
    /// docker/podman config files and credential helpers.
    pub reference: Located<String>,
    /// `plainHttp`: talk to this registry over plain HTTP (a registry on loopback or a lab
    /// network). Default: `false` (HTTPS).
    pub plain_http: bool,
}

/// `ami`: Image Builder's `amiDistributionConfiguration`, plus where to upload the disk.
/// Credentials come from the standard AWS environment variables and `~/.aws` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmiDistribution {
    /// `region`: where the AMI is made. Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, then the
    /// profile's region.
    pub region: Option<String>,
    /// `bucket` (required): the S3 bucket the disk is uploaded to for the import.
    pub bucket: String,
    /// `prefix`: key prefix of the upload in the bucket. Default: `builder-imports/`.
    pub prefix: Option<String>,
    /// `name`: the AMI's name, a name template (EC2 wants 3 to 128 characters). Default:
    /// `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: NameTemplate,
    /// `description`: the AMI's description. Default: the recipe's description.
    pub description: Option<String>,
    /// `amiTags`: tags on the AMI and its snapshot, `key: value`. Default: none.
    pub ami_tags: BTreeMap<String, String>,
    /// `regions`: other regions the AMI is copied to. Default: none.
    pub regions: Vec<String>,
    /// `launchPermission`: `{userIds: [account ids], userGroups: [all]}`; `all` makes the
    /// AMI public. Default: private.
    pub launch_permission: LaunchPermission,
    /// `bootMode`: `legacy-bios`, `uefi` or `uefi-preferred`. Default: from
    /// `infrastructure.firmware` (`bios` → `legacy-bios`).
    pub boot_mode: Option<BootMode>,
    /// `importMethod`: `snapshot` (ImportSnapshot + RegisterImage) or `image` (ImportImage).
    /// Default: `snapshot`.
    pub import_method: ImportMethod,
    /// `endpoint`: `{s3: URL, ec2: URL}` for S3- and EC2-compatible services on premises.
    /// Default: AWS's endpoints for the region.
    pub endpoint: AmiEndpoints,
    /// `profile`: the profile in `~/.aws/config` and `~/.aws/credentials`. Default:
    /// `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
}

/// Who may launch an AMI besides its owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchPermission {
    /// `userIds`: 12-digit AWS account ids.
    pub user_ids: Vec<String>,
    /// `userGroups`: `all` (public).
    pub user_groups: Vec<String>,
}

/// S3 and EC2 endpoints that replace AWS's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmiEndpoints {
    /// `s3`: `http(s)://host[:port]`.
    pub s3: Option<String>,
    /// `ec2`: `http(s)://host[:port]`.
    pub ec2: Option<String>,
}

/// One entry of `components` (or `tests.components`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentUse {
    /// `path` (required): the component document, relative to the recipe's directory.
    pub path: Located<String>,
    /// `parameters`: values for the document's parameters, `name: value`; a list of strings
    /// is passed joined with `,` (as AWSTOE reads a `stringList`). Default: none (each
    /// parameter takes its default from the document).
    pub parameters: Vec<ParameterValue>,
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
    /// `cpus`: virtual CPUs, 1 to 255. Default: 2.
    pub cpus: u32,
    /// `memory`: guest memory, at least 256MiB. Default: 2GiB.
    pub memory: ByteSize,
    /// `accelerator`: `auto` uses KVM when it works and TCG otherwise; `kvm` fails when KVM
    /// is unusable; `tcg` always emulates. Default: `auto`.
    pub accelerator: Accelerator,
    /// `firmware`: `bios` or `uefi`. Default: `bios`.
    pub firmware: Firmware,
    /// `network`: `none` (no network device) or `user` (QEMU user networking, outbound only).
    /// Default: `none`.
    pub network: Network,
    /// `bootTimeoutSeconds`: from QEMU start until the agent connects. Default: 900 (TCG is
    /// slow).
    #[serde(rename = "bootTimeoutSeconds")]
    pub boot_timeout_secs: u64,
    /// `buildTimeoutSeconds`: the whole build stage (all components). Default: 7200.
    #[serde(rename = "buildTimeoutSeconds")]
    pub build_timeout_secs: u64,
    /// `shutdownTimeoutSeconds`: for each VM (build and test), from asking the guest to power
    /// off (through builder's agent, else the ACPI power button) until QEMU is stopped hard
    /// (QMP `quit`, then SIGKILL). Default: 120.
    #[serde(rename = "shutdownTimeoutSeconds")]
    pub shutdown_timeout_secs: u64,
    /// `keepOnFailure`: keep the VM's disk and logs when the build fails (the inverse of Image
    /// Builder's `terminateInstanceOnFailure`). Default: `false`.
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
            network: Network::None,
            boot_timeout_secs: 900,
            build_timeout_secs: 7200,
            shutdown_timeout_secs: 120,
            keep_on_failure: false,
        }
    }
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
word_enum!(Network { None = "none", User = "user" });
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
    /// `enabled`: run the test stage. Default: `true`.
    pub enabled: bool,
    /// `timeoutSeconds`: the whole test stage, boot included. Default: 3600.
    #[serde(rename = "timeoutSeconds")]
    pub timeout_secs: u64,
    /// `components`: extra test components (`path` + `parameters`); their `test` phase runs
    /// after the `test` phases of the recipe's components. Default: none.
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
    /// `formats`: one or more of `qcow2`, `raw`, `vmdk`, `vhdx`, `vhd`, `ova`, each at most
    /// once. Default: `[qcow2]`.
    pub formats: Vec<Format>,
    /// `compression`: for the qcow2 output: `zstd`, `zlib` or `none`. Default: `zlib` (readable
    /// by every QEMU; `zstd` needs QEMU ≥ 5.1).
    pub compression: Compression,
    /// `name`: file stem of each output, a template with `{{imagebuilder:name}}`,
    /// `{{imagebuilder:version}}`, `{{imagebuilder:buildVersion}}` and
    /// `{{imagebuilder:buildDate}}` (optionally `{{imagebuilder:buildDate:yyyyMMddHHmm}}`).
    /// Default: `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: NameTemplate,
    /// `directory`: an extra directory (relative to the recipe's directory) that receives a
    /// copy of the outputs. Default: none.
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
