//! The JSON Schema (draft 2020-12) of recipe files, for editors: `builder schema recipe`.
//!
//! Generated with `schemars` from a serde mirror of the file's shape: the validated model is
//! not serde-shaped (spans, resolved defaults, several spellings per key). The mirror's key
//! sets are tested against the parser's (`parse::*_KEYS`), so the two cannot drift apart, and
//! every example in `images/` is checked against the schema.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use super::model::{Accelerator, BootMode, Compression, Firmware, Format, ImportMethod, Network};

/// A builder image recipe: a parent image, components applied in order, and how to build,
/// test and export the result. Keys are camelCase, as in EC2 Image Builder.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "builder image recipe")]
pub struct RecipeFile {
    /// Required. Letters, digits, `-` and `_`, at most 128 characters, starting with a letter
    /// or digit. Used in store references (`name/1.2.0`) and file names.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"))]
    pub name: String,
    /// Required. Semantic version `major.minor.patch`; each build of it gets a build number in
    /// the store (`name/1.2.0/3`).
    #[schemars(regex(pattern = r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$"))]
    pub version: String,
    /// Free text. Default: none.
    pub description: Option<String>,
    /// Required. The disk image the build starts from.
    pub parent_image: ParentImageFile,
    /// Required, at least one. Component documents applied in order; each one's `build` then
    /// `validate` phase runs before the next starts.
    #[schemars(length(min = 1))]
    pub components: Vec<ComponentFile>,
    /// Absolute directory in the guest where components run. Default: `/tmp`.
    #[schemars(regex(pattern = "^/"))]
    pub working_directory: Option<String>,
    /// A `#cloud-config` document merged into the build VM's cloud-init seed. Default: none.
    #[schemars(regex(pattern = "^#cloud-config"))]
    pub user_data: Option<String>,
    /// Size of the image's disk (`8GiB`); the guest grows its root partition to fill it. At
    /// least the parent image's virtual size. Default: the parent's size.
    pub disk_size: Option<SizeFile>,
    /// The build VM: these keys inline, or the path (relative to the recipe) of a YAML file
    /// holding them. Default: every infrastructure default.
    pub infrastructure: Option<InfrastructureRefFile>,
    /// The test stage, in a fresh VM booted from the result.
    pub tests: Option<TestsFile>,
    /// Exported formats and their file names. The local store always keeps the outputs.
    pub outputs: Option<OutputsFile>,
    /// Seal the image before it is shut down (cloud-init clean, empty machine-id, no SSH host
    /// keys, logs and shell history cleared, fstrim); `false` keeps that state as the build
    /// left it (builder's agent is removed either way). Default: `true`.
    pub generalize: Option<bool>,
    /// Where finished images go besides the local store (which always keeps them): each entry
    /// names one target. `builder build` distributes to every one after storing the image.
    /// Default: none.
    pub distribution: Option<Vec<DistributionFile>>,
}

/// Where the parent image comes from.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ParentImageFile {
    /// A local file relative to the recipe's directory (`${VAR}` is replaced by the environment
    /// variable VAR; a path starting with `${VAR}` takes a relative value from the directory
    /// builder runs in), a previous build in the local store: `name/1.2.0`, `name/1.x.x`,
    /// `name/1.2.0/3`, or a disk in an OCI registry: `oci://host[:port]/repo:tag@sha256:<manifest
    /// digest>` (a tag alone is pinned to what it points to by pipelines and `--resolve-tags`).
    Reference(String),
    /// A local file, optionally pinned to its sha256.
    Path {
        /// Relative to the recipe's directory; `${VAR}` is replaced by the environment variable.
        path: String,
        /// 64 hex digits; the build fails when the file's digest differs.
        #[schemars(regex(pattern = "^[0-9a-fA-F]{64}$"))]
        sha256: Option<String>,
    },
    /// Downloaded into the cache and verified.
    Url {
        /// `https://` or `http://`.
        #[schemars(regex(pattern = "^https?://"))]
        url: String,
        /// Required: 64 hex digits.
        #[schemars(regex(pattern = "^[0-9a-fA-F]{64}$"))]
        sha256: String,
    },
    /// A previous build in the local store.
    Image {
        /// `name/1.2.0`, `name/1.x.x` (once a part is `x`, all after it are) or `name/1.2.0/3`.
        #[schemars(regex(
            pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]*/([0-9]+|x)\.([0-9]+|x)\.([0-9]+|x)(/[0-9]+)?$"
        ))]
        image: String,
    },
}

/// One component document and the values of its parameters.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentFile {
    /// Required. The component document (AWSTOE YAML), relative to the recipe's directory.
    pub path: String,
    /// Values for the document's parameters: `name: value`. A list is passed joined with `,`.
    /// Parameters not given take their default from the document.
    pub parameters: Option<BTreeMap<String, ParameterFile>>,
}

/// A parameter value.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ParameterFile {
    Text(String),
    Number(f64),
    Bool(bool),
    List(Vec<String>),
}

/// A size: `2GiB`, `512MiB`, `2G` (K, M, G, T are powers of 1024, as in QEMU), or bytes.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SizeFile {
    Text(#[schemars(regex(pattern = r"^[0-9_]+ ?([KkMmGgTt]([Ii][Bb])?|[Bb])?$"))] String),
    Bytes(u64),
}

/// Inline infrastructure settings or a file holding them.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum InfrastructureRefFile {
    /// Path of a YAML file with the infrastructure keys, relative to the recipe.
    File(String),
    Inline(InfrastructureFile),
}

/// The build VM (Image Builder's infrastructure configuration).
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InfrastructureFile {
    /// Virtual CPUs, 1 to 255. Default: 2.
    #[schemars(range(min = 1, max = 255))]
    pub cpus: Option<u32>,
    /// Guest memory, at least 256MiB. Default: 2GiB.
    pub memory: Option<SizeFile>,
    /// `auto` uses KVM when it works and TCG otherwise; `kvm` fails when KVM is unusable; `tcg`
    /// always emulates. Default: `auto`.
    pub accelerator: Option<Accelerator>,
    /// Default: `bios`.
    pub firmware: Option<Firmware>,
    /// `none`: no network device; `user`: QEMU user networking (outbound only). Default: `none`.
    pub network: Option<Network>,
    /// From QEMU start until the agent connects. Default: 900.
    #[schemars(range(min = 1, max = 604800))]
    pub boot_timeout_seconds: Option<u64>,
    /// The whole build stage (all components). Default: 7200.
    #[schemars(range(min = 1, max = 604800))]
    pub build_timeout_seconds: Option<u64>,
    /// For each VM (build and test): from asking the guest to power off (the agent, else the
    /// ACPI power button) until QEMU is stopped hard (QMP `quit`, then SIGKILL). Default: 120.
    #[schemars(range(min = 1, max = 604800))]
    pub shutdown_timeout_seconds: Option<u64>,
    /// Keep the VM's disk and logs when the build fails. Default: false.
    pub keep_on_failure: Option<bool>,
}

/// The test stage (Image Builder's image tests configuration).
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TestsFile {
    /// Run the test stage. Default: true.
    pub enabled: Option<bool>,
    /// The whole test stage, boot included. Default: 3600.
    #[schemars(range(min = 1, max = 604800))]
    pub timeout_seconds: Option<u64>,
    /// Extra test components; their `test` phase runs after the recipe components' `test`
    /// phases. Default: none.
    pub components: Option<Vec<ComponentFile>>,
}

/// What the build exports.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputsFile {
    /// Each at most once. Default: `[qcow2]`.
    #[schemars(length(min = 1))]
    pub formats: Option<Vec<Format>>,
    /// For the qcow2 output. Default: `zlib`.
    pub compression: Option<Compression>,
    /// File stem template: `{{imagebuilder:name}}`, `{{imagebuilder:version}}`,
    /// `{{imagebuilder:buildVersion}}`, `{{imagebuilder:buildDate}}` (or
    /// `{{imagebuilder:buildDate:yyyyMMddHHmm}}`). Default:
    /// `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: Option<String>,
    /// An extra directory (relative to the recipe) that receives a copy of the outputs.
    /// Default: none.
    pub directory: Option<String>,
}

/// One distribution target: a mapping with exactly one key.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum DistributionFile {
    /// A copy of the outputs, `manifest.json` and `SHA256SUMS` in `<path>/<name>/` (made in a
    /// temporary folder, verified, then renamed).
    Directory(DirectoryFile),
    /// A Vagrant box for the libvirt provider, with `<box>.json` catalog metadata next to it.
    Vagrant(VagrantFile),
    /// The disk pushed to an OCI registry as an artifact.
    Oci(OciFile),
    /// The disk pushed as a KubeVirt containerDisk (`disk/<name>.qcow2` in one layer).
    ContainerDisk(OciFile),
    /// The disk imported into EC2 as an AMI.
    Ami(Box<AmiFile>),
}

/// Name template: `{{imagebuilder:name}}`, `{{imagebuilder:version}}`,
/// `{{imagebuilder:buildVersion}}`, `{{imagebuilder:buildDate}}` (or
/// `{{imagebuilder:buildDate:yyyyMMddHHmm}}`) and literal text without `/`.
type NameTemplateText = String;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectoryFile {
    /// Required. The folder that receives the image's folder (relative to the recipe).
    pub path: String,
    /// The image's folder inside `path`. Default:
    /// `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: Option<NameTemplateText>,
    /// Which outputs to copy; a format the build did not export is converted. Default: every
    /// output of the build.
    #[schemars(length(min = 1))]
    pub formats: Option<Vec<Format>>,
    /// Replace a folder of the same name. Default: false.
    pub overwrite: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VagrantFile {
    /// Required. The box file (`./out/web.box`), or a folder (trailing `/`) that receives
    /// `<name>.box`; relative to the recipe.
    pub path: String,
    /// The box file's stem when `path` is a folder. Default:
    /// `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: Option<NameTemplateText>,
    /// Replace a box file of the same name. Default: false.
    pub overwrite: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OciFile {
    /// Required. `registry[:port]/repository:tag` without a scheme; the tag may hold name
    /// template placeholders. Default tag:
    /// `{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9.\-:\[\]]+/[^@]+$"))]
    pub reference: String,
    /// Talk to the registry over plain HTTP. Default: false.
    pub plain_http: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AmiFile {
    /// Where the AMI is made. Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's.
    pub region: Option<String>,
    /// Required. The S3 bucket the disk is uploaded to.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"))]
    pub bucket: String,
    /// Key prefix in the bucket. Default: `builder-imports/`.
    pub prefix: Option<String>,
    /// The AMI's name. Default:
    /// `{{imagebuilder:name}}-{{imagebuilder:version}}-{{imagebuilder:buildVersion}}`.
    pub name: Option<NameTemplateText>,
    /// Default: the recipe's description.
    pub description: Option<String>,
    /// Tags on the AMI and its snapshot.
    pub ami_tags: Option<BTreeMap<String, String>>,
    /// Other regions the AMI is copied to.
    pub regions: Option<Vec<String>>,
    /// Who may launch the AMI besides its owner.
    pub launch_permission: Option<LaunchPermissionFile>,
    /// Default: from `infrastructure.firmware`.
    pub boot_mode: Option<BootMode>,
    /// Default: `snapshot`.
    pub import_method: Option<ImportMethod>,
    /// S3- and EC2-compatible services to use instead of AWS's.
    pub endpoint: Option<EndpointFile>,
    /// The AWS profile. Default: `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchPermissionFile {
    /// 12-digit account ids.
    pub user_ids: Option<Vec<String>>,
    /// `all` makes the AMI public.
    pub user_groups: Option<Vec<String>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointFile {
    /// `http(s)://host[:port]` of an S3-compatible service.
    pub s3: Option<String>,
    /// `http(s)://host[:port]` of an EC2-compatible service.
    pub ec2: Option<String>,
}

/// The JSON Schema of recipe files. Editors use it with e.g. `builder schema recipe >
/// recipe.schema.json` and `# yaml-language-server: $schema=recipe.schema.json` at the top of
/// a recipe.
pub fn json_schema() -> serde_json::Value {
    schemars::schema_for!(RecipeFile).to_value()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use crate::recipe::parse;
    use std::collections::BTreeSet;

    fn keys(object: &serde_json::Value) -> BTreeSet<String> {
        object["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    fn set(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn schema_and_parser_know_the_same_keys() {
        let schema = json_schema();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(keys(&schema), set(parse::TOP_KEYS));
        let defs = &schema["$defs"];
        assert_eq!(
            keys(&defs["InfrastructureFile"]),
            set(parse::INFRASTRUCTURE_KEYS)
        );
        assert_eq!(keys(&defs["TestsFile"]), set(parse::TESTS_KEYS));
        assert_eq!(keys(&defs["OutputsFile"]), set(parse::OUTPUTS_KEYS));
        assert_eq!(keys(&defs["ComponentFile"]), set(parse::COMPONENT_KEYS));
        assert_eq!(keys(&defs["DirectoryFile"]), set(parse::DIRECTORY_KEYS));
        assert_eq!(keys(&defs["VagrantFile"]), set(parse::VAGRANT_KEYS));
        assert_eq!(keys(&defs["OciFile"]), set(parse::OCI_KEYS));
        assert_eq!(keys(&defs["AmiFile"]), set(parse::AMI_KEYS));
        assert_eq!(
            keys(&defs["LaunchPermissionFile"]),
            set(parse::LAUNCH_PERMISSION_KEYS)
        );
        assert_eq!(keys(&defs["EndpointFile"]), set(parse::ENDPOINT_KEYS));
        let kinds: BTreeSet<String> = defs["DistributionFile"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(keys)
            .collect();
        assert_eq!(kinds, set(crate::recipe::model::DISTRIBUTION_KINDS));
        let parent_keys: BTreeSet<String> = defs["ParentImageFile"]["anyOf"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|alt| alt.get("properties").is_some())
            .flat_map(keys)
            .collect();
        assert_eq!(parent_keys, set(parse::PARENT_KEYS));
        assert_eq!(
            schema["required"],
            serde_json::json!(["name", "version", "parentImage", "components"])
        );
    }

    #[test]
    fn word_sets_come_from_the_model() {
        let schema = json_schema();
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
    }
}
