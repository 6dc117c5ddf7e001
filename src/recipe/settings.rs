//! Every recipe setting, declared once: its key path, kind, default, whether a pipeline may
//! replace it, and the text a user reads. The declarations drive the walker's key lists (and
//! so its unknown-key suggestions), the JSON Schema ([`json_schema`]), the reference in
//! `docs/reference/recipe.md` ([`reference`]), the keys a pipeline may override, and the
//! build's test that every setting changes what a build does.
//!
//! A table rather than a derive on the model: the model is not shaped like the file (spans,
//! resolved defaults, one key with several forms, `oci` and `containerDisk` sharing one
//! type), and the walker's per-key checks (ranges, names, templates) stay plain code next to
//! the messages they give. Defaults are values of the model (`Infrastructure::default()`),
//! shown here, never repeated.

use serde_json::{Map, Value, json};

use super::model::{
    Accelerator, ArchiveFormat, Boot, BootMode, Compression, ContainerType, DEFAULT_GENERALIZE,
    DEFAULT_IMPORT_METHOD, DEFAULT_WORKING_DIRECTORY, Firmware, Format, ImportMethod,
    Infrastructure, MAX_CPUS, MAX_TIMEOUT_SECS, Network, Outputs, Tests,
};
use super::name_template::NameTemplate;

/// One setting of a recipe file.
pub struct Setting {
    /// Where it is written: keys joined with `.` (`infrastructure.cpus`); entries of a list
    /// (`components`, `distribution`) are not counted.
    pub path: &'static str,
    pub kind: Kind,
    /// The recipe (or its mapping) is invalid without it.
    pub required: bool,
    pub default: DefaultIs,
    /// A pipeline file may set it, replacing the recipe's value.
    pub pipeline: bool,
    /// Which recipes may write it: machine recipes, container recipes (`containerType`), or
    /// both.
    pub scope: Scope,
    /// What it does, for the user (Markdown).
    pub doc: &'static str,
}

/// What a setting's value is.
pub enum Kind {
    /// Text, matching `pattern` when there is one (the walker checks more and says why).
    Text(Option<&'static str>),
    Bool,
    /// A whole number from `min` to `max`.
    Number {
        min: u64,
        max: u64,
    },
    /// A size: `2GiB`, `512MiB`, `2G` (K, M, G, T are powers of 1024, as in QEMU), or bytes.
    Size,
    /// One word of a closed set.
    Word(&'static [&'static str]),
    /// A list of words of a closed set, each at most once, at least one.
    Words(&'static [&'static str]),
    /// A list of texts.
    Texts,
    /// A text matching `pattern` when there is one, or a list of them.
    TextOrTexts(Option<&'static str>),
    /// A mapping of texts to texts.
    TextMap,
    /// A name template (see `outputs.name`).
    Template,
    /// A mapping of the settings below it.
    Section,
    /// A mapping of the settings below it, or the path (relative to the recipe) of a YAML
    /// file holding them.
    SectionOrFile,
    /// A list of mappings of the settings below it; at least one when the list is required.
    List,
    /// A list of mappings with one key each, naming one of the settings below it.
    Targets,
    /// A mapping of component parameter names to values.
    Parameters,
    /// A string (path, store reference or `oci://` reference) or a mapping with one of the
    /// settings below it (`sha256` pins `path` or `url`; `url` needs it).
    Parent,
    /// The same as the setting at this path (its kind and the settings below it).
    Like(&'static str),
}

/// Which recipes a setting belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Both,
    /// Machine recipes only; a container recipe that writes it is refused with this hint.
    Machine(&'static str),
    /// Container recipes only.
    Container,
}

/// A setting's default, as the reference and the schema show it.
pub enum DefaultIs {
    /// Required, or nothing happens without it.
    None,
    /// Described in words (it depends on something else).
    Text(&'static str),
    /// The model's default value, shown in backticks.
    Value(fn() -> String),
}

const TIMEOUT: Kind = Kind::Number {
    min: 1,
    max: MAX_TIMEOUT_SECS,
};
/// An `oci://` repository, without a tag or digest.
const CACHE_REPOSITORY: &str = r"^oci://[^/@]+/[^:@]+$";
const SHA256: Kind = Kind::Text(Some("^[0-9a-fA-F]{64}$"));
const COMPONENT_PATH: &str =
    "The component document (AWSTOE YAML), relative to the recipe's directory.";
const COMPONENT_PARAMETERS: &str = "Values for the document's parameters, `name: value`; a list is passed joined with `,` (as AWSTOE reads a `stringList`).";
const COMPONENT_PARAMETERS_DEFAULT: DefaultIs =
    DefaultIs::Text("each parameter's default in the document");
const DEFAULT_NAME: DefaultIs = DefaultIs::Value(|| NameTemplate::default().to_string());

/// What `distribution.directory.formats` may name: disk formats (machine recipes) and
/// archives (container recipes).
const DIRECTORY_FORMATS: [&str; Format::NAMES.len() + ArchiveFormat::NAMES.len()] =
    concat(Format::NAMES, ArchiveFormat::NAMES);

const fn concat<const N: usize>(a: &[&'static str], b: &[&'static str]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[i + j] = b[j];
        j += 1;
    }
    out
}

fn default_formats() -> String {
    let formats: Vec<&str> = Outputs::default()
        .formats
        .iter()
        .map(|f| f.name())
        .collect();
    format!("[{}]", formats.join(", "))
}

const fn setting(path: &'static str, kind: Kind, default: DefaultIs, doc: &'static str) -> Setting {
    Setting {
        path,
        kind,
        required: false,
        default,
        pipeline: false,
        scope: Scope::Both,
        doc,
    }
}

/// A setting of machine recipes only; `hint` says a container recipe's author what to do.
const fn machine(hint: &'static str, s: Setting) -> Setting {
    Setting {
        scope: Scope::Machine(hint),
        ..s
    }
}

/// A setting of container recipes only.
const fn container(s: Setting) -> Setting {
    Setting {
        scope: Scope::Container,
        ..s
    }
}

/// The hint for the VM's `infrastructure` keys in a container recipe.
const IN_A_CONTAINER: &str = "a container recipe builds in a container on this host: of `infrastructure`, only `buildTimeoutSeconds` and `keepOnFailure` apply";
/// The hint for a distribution kind that takes a disk.
const DISK_TARGET: &str = "a container image is distributed with `oci` (a registry) or `directory` (`docker-archive`/`oci-archive` files)";

const fn required(path: &'static str, kind: Kind, doc: &'static str) -> Setting {
    Setting {
        required: true,
        ..setting(path, kind, DefaultIs::None, doc)
    }
}

/// A setting a pipeline may replace.
const fn overridable(
    path: &'static str,
    kind: Kind,
    default: DefaultIs,
    doc: &'static str,
) -> Setting {
    Setting {
        pipeline: true,
        ..setting(path, kind, default, doc)
    }
}

/// Every setting, parents before their children, each mapping's keys in the order the
/// reference lists them.
#[rustfmt::skip]
pub const SETTINGS: &[Setting] = &[
    required("name", Kind::Text(Some(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")),
        "Letters, digits, `-` and `_`, at most 128 characters, starting with a letter or digit. Used in store references (`name/1.2.0`) and file names."),
    required("version", Kind::Text(Some(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")),
        "Semantic version `major.minor.patch`; each build of it gets a build number in the store (`name/1.2.0/3`)."),
    setting("description", Kind::Text(None), DefaultIs::None,
        "Free text."),
    container(setting("containerType", Kind::Word(ContainerType::NAMES), DefaultIs::Text("none: a machine recipe"),
        "Makes this a container recipe (Image Builder's key): the components are applied to a container image built by buildah, tested in a container, stored as an OCI image layout and distributed with `oci` and `directory`. Machine-only keys (`diskSize`, `userData`, `generalize`, `outputs`, `cache`, the VM's `infrastructure` keys) are refused in a container recipe.")),
    container(setting("dockerfileTemplate", Kind::Text(Some(r"\{\{\{ *imagebuilder:components *\}\}\}")), DefaultIs::Text("`FROM {{{ imagebuilder:parentImage }}}`, `{{{ imagebuilder:environments }}}` and `{{{ imagebuilder:components }}}`, one a line"),
        "The Containerfile the image is built from, with Image Builder's placeholders: a `FROM {{{ imagebuilder:parentImage }}}` line (the pinned parent), and, each on a line of its own after it, `{{{ imagebuilder:environments }}}` (at most once; builder's executor needs nothing installed in the image, so it becomes a comment) and `{{{ imagebuilder:components }}}` (exactly once: one `RUN` per component, each running its `build` then `validate` phase; nothing of builder stays in a layer). Other lines (`ENV`, `LABEL`, `USER`, stages after the placeholders) work as in any Containerfile.")),
    required("parentImage", Kind::Parent,
        "The image the build starts from. A machine recipe's disk image: a local file relative to the recipe's directory (`${VAR}` is replaced by the environment variable `VAR`; a path that starts with `${VAR}` takes a relative value from the directory builder runs in), a previous build in the local store (`name/1.2.0`, `name/1.x.x`, `name/1.2.0/3`), or a disk pushed to an OCI registry (`oci://host[:port]/repository:tag@sha256:<manifest digest>`; a tag alone is pinned to what it points to by pipelines and `--resolve-tags`). Or a mapping with one of `path`, `url`, `image`. A container recipe's image: `oci://host[:port]/repository[:tag]@sha256:<manifest digest>`, an OCI archive file (`path`, optionally pinned by `sha256`), or a container build in the local store (`name/1.x.x`)."),
    setting("parentImage.path", Kind::Text(None), DefaultIs::None,
        "A local file, relative to the recipe's directory; `${VAR}` is replaced by the environment variable."),
    machine("a container recipe starts from `oci://registry/repository@sha256:…`, an OCI archive file or a stored container build", setting("parentImage.url", Kind::Text(Some("^https?://")), DefaultIs::None,
        "`https://` or `http://`: downloaded into the cache and verified; needs `sha256`.")),
    setting("parentImage.image", Kind::Text(Some(r"^[A-Za-z0-9][A-Za-z0-9_-]*/([0-9]+|x)\.([0-9]+|x)\.([0-9]+|x)(/[0-9]+)?$")), DefaultIs::None,
        "A previous build in the local store: `name/1.2.0`, `name/1.x.x` (once a part is `x`, all after it are) or `name/1.2.0/3`."),
    setting("parentImage.sha256", SHA256, DefaultIs::None,
        "64 hex digits pinning `path` or `url` (required with `url`); the build fails when the file's digest differs."),
    required("components", Kind::List,
        "Component documents applied in order; each one's `build` then `validate` phase runs before the next starts."),
    required("components.path", Kind::Text(None), COMPONENT_PATH),
    setting("components.parameters", Kind::Parameters, COMPONENT_PARAMETERS_DEFAULT, COMPONENT_PARAMETERS),
    setting("components.cache", Kind::Bool, DefaultIs::Value(|| "true".to_string()),
        "`false`: never reuse a cached layer for this component: it runs at every build, and so does every component after it (for steps whose result depends on more than the inputs: a download without a checksum, packages from a mirror). Not part of the layer key."),
    setting("workingDirectory", Kind::Text(Some("^/")), DefaultIs::Value(|| DEFAULT_WORKING_DIRECTORY.to_string()),
        "Absolute directory in the guest (a container recipe: in the container) where components run."),
    machine("cloud-init does not run in a container build: do its work in a component step", setting("userData", Kind::Text(Some("^#cloud-config")), DefaultIs::None,
        "A `#cloud-config` document merged into the build VM's cloud-init seed.")),
    machine("a container image has no disk to size", setting("diskSize", Kind::Size, DefaultIs::Text("the parent's size"),
        "Size of the image's disk (`8GiB`); the guest grows its root partition to fill it. At least the parent image's virtual size.")),
    overridable("infrastructure", Kind::SectionOrFile, DefaultIs::Text("every infrastructure default"),
        "The build VM (Image Builder's infrastructure configuration): these keys inline, or the path (relative to the recipe) of a YAML file holding them."),
    machine(IN_A_CONTAINER, overridable("infrastructure.cpus", Kind::Number { min: 1, max: MAX_CPUS as u64 }, DefaultIs::Value(|| Infrastructure::default().cpus.to_string()),
        "Virtual CPUs.")),
    machine(IN_A_CONTAINER, overridable("infrastructure.memory", Kind::Size, DefaultIs::Value(|| Infrastructure::default().memory.to_string()),
        "Guest memory, at least 256MiB.")),
    machine(IN_A_CONTAINER, overridable("infrastructure.accelerator", Kind::Word(Accelerator::NAMES), DefaultIs::Value(|| Infrastructure::default().accelerator.to_string()),
        "`auto` uses KVM when it works and TCG otherwise; `kvm` fails when KVM is unusable; `tcg` always emulates.")),
    machine(IN_A_CONTAINER, overridable("infrastructure.firmware", Kind::Word(Firmware::NAMES), DefaultIs::Value(|| Infrastructure::default().firmware.to_string()),
        "`bios` or `uefi`.")),
    machine(IN_A_CONTAINER, overridable("infrastructure.boot", Kind::Word(Boot::NAMES), DefaultIs::Value(|| Infrastructure::default().boot.to_string()),
        "How the build VM starts. `full`: the image's own boot (firmware, bootloader, its kernel, systemd, cloud-init). `appliance`: the host's kernel with builder's agent as init, the steps in a chroot of the image's root file system: much faster under TCG, but no service manager runs (`systemctl enable` works, `systemctl start` does not), the image's own kernel does not run, and `userData` is refused (see \"Boot modes\" in the README). The test stage always boots `full`.")),
    machine(IN_A_CONTAINER, overridable("infrastructure.network", Kind::Word(Network::NAMES), DefaultIs::Value(|| Infrastructure::default().network.to_string()),
        "`none`: no network device; `user`: QEMU user networking (outbound only).")),
    machine(IN_A_CONTAINER, overridable("infrastructure.bootTimeoutSeconds", TIMEOUT, DefaultIs::Value(|| Infrastructure::default().boot_timeout_secs.to_string()),
        "From QEMU start until the agent connects (TCG is slow).")),
    overridable("infrastructure.buildTimeoutSeconds", TIMEOUT, DefaultIs::Value(|| Infrastructure::default().build_timeout_secs.to_string()),
        "The whole build stage (all components)."),
    machine(IN_A_CONTAINER, overridable("infrastructure.shutdownTimeoutSeconds", TIMEOUT, DefaultIs::Value(|| Infrastructure::default().shutdown_timeout_secs.to_string()),
        "For each VM (build and test): from asking the guest to power off (through builder's agent, else the ACPI power button) until QEMU is stopped hard (QMP `quit`, then SIGKILL).")),
    overridable("infrastructure.keepOnFailure", Kind::Bool, DefaultIs::Value(|| Infrastructure::default().keep_on_failure.to_string()),
        "Keep the VM's disk and logs when the build fails (the inverse of Image Builder's `terminateInstanceOnFailure`)."),
    setting("tests", Kind::Section, DefaultIs::None,
        "The test stage (Image Builder's image tests configuration), in a fresh VM booted from the result (a container recipe: in a fresh container from the image)."),
    overridable("tests.enabled", Kind::Bool, DefaultIs::Value(|| Tests::default().enabled.to_string()),
        "Run the test stage."),
    overridable("tests.timeoutSeconds", TIMEOUT, DefaultIs::Value(|| Tests::default().timeout_secs.to_string()),
        "The whole test stage, boot included."),
    setting("tests.components", Kind::List, DefaultIs::None,
        "Extra test components (`path` and `parameters`); their `test` phase runs after the `test` phases of the recipe's components."),
    // A component entry without `cache`: a test component makes no layer.
    required("tests.components.path", Kind::Text(None), COMPONENT_PATH),
    setting("tests.components.parameters", Kind::Parameters, COMPONENT_PARAMETERS_DEFAULT, COMPONENT_PARAMETERS),
    machine("the store keeps a container build as an OCI image layout; write archives with `- directory: {path: …, formats: [oci-archive]}`", setting("outputs", Kind::Section, DefaultIs::None,
        "What the build exports: formats and their file names. The local store always keeps the outputs.")),
    setting("outputs.formats", Kind::Words(Format::NAMES), DefaultIs::Value(default_formats),
        "Each at most once. `vmdk` is streamOptimized, `vhd` is fixed (as clouds import it)."),
    setting("outputs.compression", Kind::Word(Compression::NAMES), DefaultIs::Value(|| Outputs::default().compression.to_string()),
        "For the qcow2 output (`zlib` is readable by every QEMU; `zstd` needs QEMU ≥ 5.1)."),
    setting("outputs.name", Kind::Template, DEFAULT_NAME,
        "File stem of each output, a template with `{{imagebuilder:name}}`, `{{imagebuilder:version}}`, `{{imagebuilder:buildVersion}}` and `{{imagebuilder:buildDate}}` (optionally `{{imagebuilder:buildDate:yyyyMMddHHmm}}`) and literal text without `/`."),
    setting("outputs.directory", Kind::Text(None), DefaultIs::None,
        "An extra directory (relative to the recipe's directory) that receives a copy of the outputs."),
    machine("nothing of builder stays in a container image's layers, and a container has no machine identity to clear", setting("generalize", Kind::Bool, DefaultIs::Value(|| DEFAULT_GENERALIZE.to_string()),
        "Seal the image before it is shut down for good (cloud-init clean, empty machine-id, no SSH host keys, logs and shell history cleared, fstrim); `false` keeps all of that as the build left it (builder's agent is removed either way).")),
    overridable("distribution", Kind::Targets, DefaultIs::None,
        "Where finished images go besides the local store (which always keeps them): a list of targets, each a mapping with one key naming its kind and that kind's settings. `builder build` distributes to every target after the image is stored; `builder distribute` does the same for an image already in the store. Name templates (`name`, an OCI tag) know the placeholders of `outputs.name`."),
    setting("distribution.directory", Kind::Section, DefaultIs::None,
        "A copy of the outputs, `manifest.json` and `SHA256SUMS` in `<path>/<name>/`, made in a temporary folder inside `path`, every file checked against the manifest, then renamed in one step."),
    required("distribution.directory.path", Kind::Text(None),
        "The folder that receives the image's folder; relative to the recipe's directory. Created if missing."),
    setting("distribution.directory.name", Kind::Template, DEFAULT_NAME,
        "The image's folder inside `path`, a name template."),
    setting("distribution.directory.formats", Kind::Words(&DIRECTORY_FORMATS), DefaultIs::Text("every output of the build; `[oci-archive]` in a container recipe"),
        "Which outputs to copy; a format the build did not export (e.g. `ova`) is converted from the stored disk. A container recipe writes archive files instead (`docker-archive`, `oci-archive`) that `docker load` and `podman load` read; disk formats are refused there, and archives in a machine recipe."),
    setting("distribution.directory.overwrite", Kind::Bool, DefaultIs::Value(|| "false".to_string()),
        "Replace a folder of the same name (else refuse)."),
    machine(DISK_TARGET, setting("distribution.vagrant", Kind::Section, DefaultIs::None,
        "A Vagrant box for the libvirt provider (`metadata.json`, a `Vagrantfile`, `box.img`; a gzip'd tar) that `vagrant box add` accepts, with `<box>.json` catalog metadata next to it. `vagrant up` needs the vagrant-libvirt plugin.")),
    required("distribution.vagrant.path", Kind::Text(None),
        "The box file (`./out/web.box`), or a folder (written with a trailing `/`) that receives `<name>.box`; relative to the recipe's directory."),
    setting("distribution.vagrant.name", Kind::Template, DEFAULT_NAME,
        "The box file's stem when `path` is a folder, a name template."),
    setting("distribution.vagrant.overwrite", Kind::Bool, DefaultIs::Value(|| "false".to_string()),
        "Replace a box file of the same name (else refuse)."),
    setting("distribution.oci", Kind::Section, DefaultIs::None,
        "The disk pushed to an OCI registry as an artifact (a layer holding the qcow2, with `manifest.json` and `SHA256SUMS` alongside). Credentials come from the docker/podman config files and credential helpers."),
    required("distribution.oci.reference", Kind::Text(Some(r"^[A-Za-z0-9.\-:\[\]]+/[^@]+$")),
        "`registry[:port]/repository:tag`, without a scheme; the tag may hold name-template placeholders (`web:{{imagebuilder:version}}`). Default tag: `{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`."),
    setting("distribution.oci.plainHttp", Kind::Bool, DefaultIs::Value(|| "false".to_string()),
        "Talk to this registry over plain HTTP (a registry on loopback or a lab network) instead of HTTPS."),
    machine(DISK_TARGET, setting("distribution.containerDisk", Kind::Like("distribution.oci"), DefaultIs::None,
        "The disk pushed as a KubeVirt containerDisk (an image whose single layer holds `disk/<name>.qcow2`); the settings of `oci`.")),
    machine(DISK_TARGET, setting("distribution.ami", Kind::Section, DefaultIs::None,
        "The disk imported into EC2 as an AMI (S3 upload, then ImportSnapshot + RegisterImage): Image Builder's `amiDistributionConfiguration`, plus where to upload the disk. Credentials come from the standard AWS environment variables and `~/.aws` files.")),
    setting("distribution.ami.region", Kind::Text(None), DefaultIs::Text("`AWS_REGION`, `AWS_DEFAULT_REGION`, then the profile's region"),
        "Where the AMI is made."),
    required("distribution.ami.bucket", Kind::Text(Some(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")),
        "The S3 bucket the disk is uploaded to for the import."),
    setting("distribution.ami.prefix", Kind::Text(None), DefaultIs::Text("`builder-imports/`"),
        "Key prefix of the upload in the bucket."),
    setting("distribution.ami.name", Kind::Template, DEFAULT_NAME,
        "The AMI's name, a name template (EC2 wants 3 to 128 characters)."),
    setting("distribution.ami.description", Kind::Text(None), DefaultIs::Text("the recipe's description"),
        "The AMI's description."),
    setting("distribution.ami.amiTags", Kind::TextMap, DefaultIs::None,
        "Tags on the AMI and its snapshot, `key: value`."),
    setting("distribution.ami.regions", Kind::Texts, DefaultIs::None,
        "Other regions the AMI is copied to."),
    setting("distribution.ami.launchPermission", Kind::Section, DefaultIs::Text("private"),
        "Who may launch the AMI besides its owner."),
    setting("distribution.ami.launchPermission.userIds", Kind::Texts, DefaultIs::None,
        "12-digit AWS account ids."),
    setting("distribution.ami.launchPermission.userGroups", Kind::Texts, DefaultIs::None,
        "`all` makes the AMI public."),
    setting("distribution.ami.bootMode", Kind::Word(BootMode::NAMES), DefaultIs::Text("from `infrastructure.firmware` (`bios` → `legacy-bios`)"),
        "The AMI's boot mode, as EC2 spells it."),
    setting("distribution.ami.importMethod", Kind::Word(ImportMethod::NAMES), DefaultIs::Value(|| DEFAULT_IMPORT_METHOD.to_string()),
        "`snapshot` (ImportSnapshot + RegisterImage) or `image` (ImportImage)."),
    setting("distribution.ami.endpoint", Kind::Section, DefaultIs::Text("AWS's endpoints for the region"),
        "S3- and EC2-compatible services on premises, to use instead of AWS's."),
    setting("distribution.ami.endpoint.s3", Kind::Text(Some("^https?://")), DefaultIs::None,
        "`http(s)://host[:port]` of an S3-compatible service."),
    setting("distribution.ami.endpoint.ec2", Kind::Text(Some("^https?://")), DefaultIs::None,
        "`http(s)://host[:port]` of an EC2-compatible service."),
    setting("distribution.ami.profile", Kind::Text(None), DefaultIs::Text("`AWS_PROFILE`, else `default`"),
        "The profile in `~/.aws/config` and `~/.aws/credentials`."),
    machine("buildah's layer cache reuses the components that did not change", overridable("cache", Kind::Section, DefaultIs::Text("the local layer cache only"),
        "The layer cache shared through OCI registries, so builds on other machines reuse the layers built here: each layer is an artifact tagged with its key. `--cache-from` and `--cache-to` replace these. Credentials and plain-HTTP registries (`BUILDER_INSECURE_REGISTRIES`) as for `distribution`.")),
    setting("cache.from", Kind::TextOrTexts(Some(CACHE_REPOSITORY)), DefaultIs::None,
        "`oci://registry[:port]/repository`, or a list of them: before the build VM boots, the layers the local cache lacks are pulled from each in order (the longest prefix of the chain, each layer verified); a registry that fails is a warning."),
    setting("cache.to", Kind::Text(Some(CACHE_REPOSITORY)), DefaultIs::None,
        "`oci://registry[:port]/repository`: after the image is stored, the chain's layers the repository lacks are pushed (a tag already there is never replaced); a push that fails is a warning."),
];

impl Setting {
    /// The last key of the path.
    pub fn key(&self) -> &'static str {
        self.path.rsplit('.').next().unwrap_or(self.path)
    }

    /// The path of the mapping it is written in (`""` at the top).
    pub fn parent(&self) -> &'static str {
        self.path.rsplit_once('.').map_or("", |(p, _)| p)
    }

    /// Its kind, with `Like` followed.
    fn kind(&self) -> &Kind {
        match self.kind {
            Kind::Like(path) => &find(path).kind,
            ref kind => kind,
        }
    }

    /// Where the settings below it are declared (itself, or what it is like).
    fn children_of(&self) -> &'static str {
        match self.kind {
            Kind::Like(path) => path,
            _ => self.path,
        }
    }

    /// The default as the reference shows it.
    pub fn default_text(&self) -> Option<String> {
        match &self.default {
            DefaultIs::None => None,
            DefaultIs::Text(text) => Some(text.to_string()),
            DefaultIs::Value(value) => Some(format!("`{}`", value())),
        }
    }
}

impl Setting {
    /// A value other than the default, for the tests that every setting has an effect: for
    /// the kinds whose default is a model value.
    #[cfg(test)]
    pub fn other_value(&self) -> Option<String> {
        let DefaultIs::Value(default) = self.default else {
            return None;
        };
        let default = default();
        match self.kind() {
            Kind::Bool => Some((default != "true").to_string()),
            Kind::Number { min, max } => {
                Some(if default == min.to_string() { max } else { min }.to_string())
            }
            Kind::Word(words) => words.iter().find(|w| **w != default).map(|w| w.to_string()),
            Kind::Size => Some(if default == "1GiB" { "3GiB" } else { "1GiB" }.into()),
            _ => None,
        }
    }
}

/// The setting at `path`. Panics when there is none: paths are constants of this module and
/// the walker, checked by the tests.
fn find(path: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.path == path)
        .unwrap_or_else(|| panic!("no recipe setting `{path}`"))
}

/// The settings written in the mapping at `section` (`""`: the top level), in order.
fn children(section: &str) -> impl Iterator<Item = &'static Setting> {
    let section = if section.is_empty() {
        ""
    } else {
        find(section).children_of()
    };
    SETTINGS.iter().filter(move |s| s.parent() == section)
}

/// Which recipes the setting at `path` belongs to (`Both` for a path that is no setting).
pub fn scope_of(path: &str) -> Scope {
    SETTINGS
        .iter()
        .find(|s| s.path == path)
        .map_or(Scope::Both, |s| s.scope)
}

/// The keys of the mapping at `section` (`""`: the top level), for the walker.
pub fn keys(section: &str) -> Vec<&'static str> {
    children(section).map(Setting::key).collect()
}

/// The keys of the mapping at `section` that a pipeline may set.
pub fn pipeline_keys(section: &str) -> Vec<&'static str> {
    children(section)
        .filter(|s| s.pipeline)
        .map(Setting::key)
        .collect()
}

/// Every setting's full path, the settings of a `Like` repeated under it
/// (`distribution.containerDisk.reference`).
pub fn paths() -> Vec<String> {
    fn walk(section: &str, prefix: &str, out: &mut Vec<String>) {
        for s in children(section) {
            let path = if prefix.is_empty() {
                s.key().to_string()
            } else {
                format!("{prefix}.{}", s.key())
            };
            out.push(path.clone());
            walk(s.path, &path, out);
        }
    }
    let mut out = Vec::new();
    walk("", "", &mut out);
    out
}

/// The JSON Schema (draft 2020-12) of recipe files, for editors: `builder schema recipe`.
/// Editors use it with e.g. `builder schema recipe > recipe.schema.json` and
/// `# yaml-language-server: $schema=recipe.schema.json` at the top of a recipe.
pub fn json_schema() -> Value {
    let mut schema = Map::new();
    schema.insert(
        "$schema".into(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    schema.insert("title".into(), json!("builder image recipe"));
    schema.insert(
        "description".into(),
        json!("A builder image recipe: a parent image, components applied in order, and how to build, test and export the result. Keys are camelCase, as in EC2 Image Builder."),
    );
    schema.extend(object(""));
    // A container recipe (one with `containerType`) has no machine-only keys; a machine
    // recipe no container-only ones.
    let none_of = |section: &str, machine: bool| -> Map<String, Value> {
        children(section)
            .filter(|s| match s.scope {
                Scope::Machine(_) => machine,
                Scope::Container => !machine && s.path != "containerType",
                Scope::Both => false,
            })
            .map(|s| (s.key().to_string(), Value::Bool(false)))
            .collect()
    };
    let mut machine_only = none_of("", true);
    machine_only.insert(
        "infrastructure".into(),
        json!({"anyOf": [{"type": "string"}, {"properties": none_of("infrastructure", true)}]}),
    );
    schema.insert("if".into(), json!({"required": ["containerType"]}));
    schema.insert("then".into(), json!({"properties": machine_only}));
    schema.insert("else".into(), json!({"properties": none_of("", false)}));
    Value::Object(schema)
}

/// The schema of the mapping at `section`: its settings, which are required, no others.
fn object(section: &str) -> Map<String, Value> {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for s in children(section) {
        properties.insert(s.key().into(), property(s));
        if s.required {
            required.push(json!(s.key()));
        }
    }
    let mut out = Map::new();
    out.insert("type".into(), json!("object"));
    out.insert("additionalProperties".into(), json!(false));
    out.insert("properties".into(), Value::Object(properties));
    if !required.is_empty() {
        out.insert("required".into(), Value::Array(required));
    }
    out
}

/// A setting's schema, with its description.
fn property(s: &Setting) -> Value {
    let mut value = value_schema(s);
    let mut description = s.doc.to_string();
    if let Some(default) = s.default_text() {
        description.push_str(&format!(" Default: {default}."));
    }
    match s.scope {
        Scope::Both => {}
        Scope::Machine(_) => description.push_str(" Machine recipes only."),
        Scope::Container => description.push_str(" Container recipes only."),
    }
    if let Value::Object(map) = &mut value {
        map.insert("description".into(), json!(description));
    }
    value
}

fn value_schema(s: &Setting) -> Value {
    let size = json!({"anyOf": [
        {"type": "string", "pattern": r"^[0-9_]+ ?([KkMmGgTt]([Ii][Bb])?|[Bb])?$"},
        {"type": "integer", "minimum": 0},
    ]});
    match s.kind() {
        Kind::Text(None) | Kind::Template => json!({"type": "string"}),
        Kind::Text(Some(pattern)) => json!({"type": "string", "pattern": pattern}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Number { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        Kind::Size => size,
        Kind::Word(words) => json!({"type": "string", "enum": words}),
        Kind::Words(words) => json!({
            "type": "array", "minItems": 1, "uniqueItems": true,
            "items": {"type": "string", "enum": words},
        }),
        Kind::Texts => json!({"type": "array", "items": {"type": "string"}}),
        Kind::TextOrTexts(pattern) => {
            let text = match pattern {
                Some(pattern) => json!({"type": "string", "pattern": pattern}),
                None => json!({"type": "string"}),
            };
            json!({"anyOf": [text, {"type": "array", "items": text}]})
        }
        Kind::TextMap => json!({"type": "object", "additionalProperties": {"type": "string"}}),
        Kind::Section => Value::Object(object(s.path)),
        Kind::SectionOrFile => json!({"anyOf": [
            {"type": "string", "description": "The path of a YAML file with these keys, relative to the recipe."},
            object(s.path),
        ]}),
        Kind::List => json!({
            "type": "array",
            "minItems": u64::from(s.required),
            "items": object(s.children_of()),
        }),
        Kind::Targets => {
            let kinds: Vec<Value> = children(s.path)
                .map(|target| {
                    json!({
                        "type": "object",
                        "additionalProperties": false,
                        "description": target.doc,
                        "properties": {target.key(): object(target.path)},
                        "required": [target.key()],
                    })
                })
                .collect();
            json!({"type": "array", "items": {"oneOf": kinds}})
        }
        Kind::Parameters => json!({
            "type": "object",
            "additionalProperties": {"anyOf": [
                {"type": "string"},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "array", "items": {"type": "string"}},
            ]},
        }),
        Kind::Parent => {
            // A string, or a mapping with one form: `path` (optionally pinned), `url` (pinned)
            // or `image`.
            let form = |key: &str, sha256: Option<bool>| {
                let mut properties = Map::new();
                properties.insert(key.into(), property(find(&format!("parentImage.{key}"))));
                let mut required = vec![json!(key)];
                if let Some(needed) = sha256 {
                    properties.insert("sha256".into(), property(find("parentImage.sha256")));
                    if needed {
                        required.push(json!("sha256"));
                    }
                }
                json!({"type": "object", "additionalProperties": false,
                       "properties": properties, "required": required})
            };
            json!({"anyOf": [
                {"type": "string"},
                form("path", Some(false)),
                form("url", Some(true)),
                form("image", None),
            ]})
        }
        Kind::Like(_) => unreachable!("`kind()` follows `Like`"),
    }
}

/// The reference of recipe files, in Markdown: `docs/reference/recipe.md`, written by
/// `cargo run --example gen_reference` and checked fresh by a test.
pub fn reference() -> String {
    let mut out = String::from(
        "<!-- Generated from src/recipe/settings.rs by `cargo run --example gen_reference`; do not edit. -->\n\n\
         # Recipe reference\n\n\
         Every key of a recipe file (camelCase, as in EC2 Image Builder). A mapping's keys are \
         listed under it; a key in no recipe takes its default. `builder schema recipe` prints \
         the same as a JSON Schema for editors. Keys marked *pipeline* may also be set in a \
         pipeline file, replacing the recipe's value. Keys marked *machine* belong to machine \
         recipes only and are refused in a container recipe (one with `containerType`); keys \
         marked *container* belong to container recipes only.\n\n\
         | key | value | default | |\n| --- | --- | --- | --- |\n",
    );
    for path in paths() {
        let s = setting_at(&path);
        let default = if s.required {
            "required".to_string()
        } else {
            s.default_text().unwrap_or_else(|| "none".into())
        };
        let pipeline = if s.pipeline { " *pipeline*" } else { "" };
        let scope = match s.scope {
            Scope::Both => "",
            Scope::Machine(_) => " *machine*",
            Scope::Container => " *container*",
        };
        out.push_str(&format!(
            "| `{path}` | {} | {default} | {}{pipeline}{scope} |\n",
            value_text(s),
            s.doc.replace('|', "\\|"),
        ));
    }
    out
}

/// The declaration a full path (`distribution.containerDisk.reference`) refers to.
pub fn setting_at(path: &str) -> &'static Setting {
    let mut section = "";
    let mut found = None;
    for key in path.split('.') {
        let s = children(section)
            .find(|s| s.key() == key)
            .unwrap_or_else(|| panic!("no recipe setting `{path}`"));
        section = s.path;
        found = Some(s);
    }
    found.unwrap_or_else(|| panic!("no recipe setting `{path}`"))
}

/// A setting's kind, in words.
fn value_text(s: &Setting) -> String {
    let words = |w: &[&str]| {
        w.iter()
            .map(|w| format!("`{w}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match s.kind() {
        Kind::Text(_) => "text".into(),
        Kind::Bool => "`true` or `false`".into(),
        Kind::Number { min, max } => format!("{min} to {max}"),
        Kind::Size => "size (`2GiB`, `512MiB`, bytes)".into(),
        Kind::Word(w) => format!("one of {}", words(w)),
        Kind::Words(w) => format!("list of {}", words(w)),
        Kind::Texts => "list of texts".into(),
        Kind::TextOrTexts(_) => "text or list of texts".into(),
        Kind::TextMap => "mapping of texts".into(),
        Kind::Template => "name template".into(),
        Kind::Section => "mapping".into(),
        Kind::SectionOrFile => "mapping, or a file's path".into(),
        Kind::List => "list of mappings".into(),
        Kind::Targets => "list of one-key mappings".into(),
        Kind::Parameters => "mapping of values".into(),
        Kind::Parent => "text or mapping".into(),
        Kind::Like(_) => unreachable!("`kind()` follows `Like`"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_a_parent_and_a_doc() {
        for s in SETTINGS {
            assert!(
                s.parent().is_empty() || SETTINGS.iter().any(|p| p.path == s.parent()),
                "{}",
                s.path
            );
            assert!(s.doc.ends_with('.'), "{}", s.path);
            assert_eq!(
                SETTINGS.iter().filter(|o| o.path == s.path).count(),
                1,
                "{}",
                s.path
            );
        }
    }

    #[test]
    fn the_schema_knows_every_key_and_word() {
        let schema = json_schema();
        assert_eq!(
            schema["required"],
            json!(["name", "version", "parentImage", "components"])
        );
        let infra = &schema["properties"]["infrastructure"]["anyOf"][1]["properties"];
        assert_eq!(
            infra.as_object().unwrap().keys().count(),
            keys("infrastructure").len()
        );
        let text = schema.to_string();
        for word in Format::NAMES.iter().chain(Accelerator::NAMES) {
            assert!(text.contains(&format!("\"{word}\"")), "{word}");
        }
        assert!(
            schema["properties"]["name"]["description"]
                .as_str()
                .unwrap()
                .contains("store references")
        );
        // Machine-only keys are refused in a container recipe, container-only ones elsewhere.
        assert_eq!(schema["then"]["properties"]["diskSize"], json!(false));
        assert_eq!(
            schema["then"]["properties"]["infrastructure"]["anyOf"][1]["properties"]["cpus"],
            json!(false)
        );
        assert!(
            schema["then"]["properties"]["infrastructure"]["anyOf"][1]["properties"]
                .get("keepOnFailure")
                .is_none()
        );
        assert_eq!(
            schema["else"]["properties"],
            json!({"dockerfileTemplate": false})
        );
    }

    /// `docs/reference/recipe.md` is what [`reference`] writes.
    #[test]
    fn the_reference_is_fresh() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference/recipe.md");
        let text = fs_err::read_to_string(&path).unwrap_or_default();
        assert!(
            text == reference(),
            "{} is not what the recipe settings say; run `cargo run --example gen_reference`",
            path.display()
        );
    }
}
