//! Spanned YAML nodes → the typed [`Recipe`]. Every problem is collected (never stop at the
//! first); each names the offending value and, where one exists, what would be right.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::dockerfile::DockerfileTemplate;
use super::model::{
    AmiDistribution, AmiEndpoints, ArchiveFormat, Boot, ComponentUse, ContainerRecipe,
    ContainerType, DEFAULT_ARCHIVE_FORMATS, DEFAULT_GENERALIZE, DEFAULT_IMPORT_METHOD,
    DEFAULT_WORKING_DIRECTORY, DirectoryDistribution, DirectoryFormats, Distribution, Format,
    Infrastructure, LaunchPermission, Located, MAX_CPUS, MAX_TIMEOUT_SECS, MIN_MEMORY,
    OciDistribution, Outputs, ParameterValue, ParentImage, Sha256, SharedCache, Tests,
    USER_DATA_IN_APPLIANCE, USER_DATA_IN_APPLIANCE_HINT, VagrantDistribution, Word,
};
use super::name_template::NameTemplate;
use super::oci_reference::{OciReference, split_oci_reference};
use super::settings::{Scope, keys, pipeline_keys, scope_of};
use super::units::ByteSize;
use super::version::{Version, VersionPattern};
use crate::diagnostic::{Problem, Span, one_of};
use crate::yaml::reader::Reader;
use crate::yaml::{Node, ScalarStyle};

/// Image Builder's spelling of a setting → how to write it here. Users coming from AWS write
/// these first; a plain "unknown key" would leave them guessing.
const IMAGE_BUILDER_KEYS: crate::yaml::reader::ImageBuilderKeys = &[
    ("semanticVersion", "write `version: 1.0.0`"),
    (
        "componentArn",
        "name the document with `path: components/x.yml`",
    ),
    (
        "blockDeviceMappings",
        "set the disk's size with `diskSize: 8GiB`",
    ),
    (
        "additionalInstanceConfiguration",
        "put a `#cloud-config` document in `userData`",
    ),
    (
        "userDataOverride",
        "put a `#cloud-config` document in `userData`",
    ),
    ("imageTestsConfiguration", "use `tests: {enabled: true}`"),
    (
        "infrastructureConfiguration",
        "use `infrastructure:` with `cpus`, `memory`, …",
    ),
    ("distributionConfiguration", "use `distribution:`"),
    ("instanceTypes", "size the VM with `cpus` and `memory`"),
    (
        "terminateInstanceOnFailure",
        "use `keepOnFailure` (the opposite meaning: `keepOnFailure: true` keeps the VM)",
    ),
    ("imageTestsEnabled", "write `enabled: true`"),
    (
        "amiDistributionConfiguration",
        "write `- ami: {region: …, bucket: …, name: …}`",
    ),
    (
        "containerDistributionConfiguration",
        "write `- oci: {reference: registry/repository:tag}`",
    ),
    (
        "s3ExportConfiguration",
        "copy the outputs with `- directory: {path: …}`",
    ),
    (
        "region",
        "name the region inside the target: `- ami: {region: eu-west-1, bucket: …}`",
    ),
    (
        "targetAccountIds",
        "share the AMI with `launchPermission: {userIds: [...]}`",
    ),
    ("timeoutMinutes", "write `timeoutSeconds`"),
    (
        "dockerfileTemplateData",
        "write the template inline: `dockerfileTemplate: |`",
    ),
    (
        "dockerfileTemplateUri",
        "write the template inline: `dockerfileTemplate: |`",
    ),
    (
        "targetRepository",
        "write `distribution:` then `- oci: {reference: registry/repository:tag}`",
    ),
    (
        "containerTags",
        "write the tag in the reference: `- oci: {reference: registry/repository:tag}`",
    ),
];

/// Which recipe a part is read for: a machine recipe, a container recipe, or not known yet
/// (a pipeline's `distribution` list, read before its recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecipeKind {
    Machine,
    Container,
    Unknown,
}

/// A context for a recipe file (or an infrastructure file it names).
pub(super) fn new_reader(source: &str) -> Reader<'_> {
    Reader::new(source, IMAGE_BUILDER_KEYS)
}

/// Readers only recipes need.
trait RecipeReader {
    fn named<T: Word>(&mut self, node: &Node, noun: &str) -> Option<T>;
    fn inner_span(&self, node: &Node, start: usize, end: usize, value: &str) -> Span;
}

impl RecipeReader for Reader<'_> {
    /// One word of `T`'s closed set (`accelerator: kvm`).
    fn named<T: Word>(&mut self, node: &Node, noun: &str) -> Option<T> {
        self.word(node, noun, T::NAMES, T::from_name)
    }

    /// The span of `part` inside the scalar `node` (found in its source text), or the whole
    /// scalar when it cannot be found (escapes, folding).
    fn inner_span(&self, node: &Node, start: usize, end: usize, value: &str) -> Span {
        let raw = &self.source[node.span.start..node.span.end.min(self.source.len())];
        let part = &value[start..end];
        let quote = usize::from(matches!(
            node.as_scalar().map(|s| s.style),
            Some(ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted)
        ));
        // Without escapes, the value sits verbatim in the raw text after the opening quote.
        if raw.get(quote + start..quote + end) == Some(part) {
            let at = node.span.start + quote + start;
            return Span::from_offsets(self.source, at, at + part.len());
        }
        match raw.find(part) {
            Some(i) => Span::from_offsets(
                self.source,
                node.span.start + i,
                node.span.start + i + part.len(),
            ),
            None => node.span,
        }
    }
}

/// What the walk found: the recipe's parts, each `None` when it had a problem. Component
/// entries are kept even when other parts fail, so their documents can be checked too.
#[derive(Default)]
pub(super) struct Parts {
    pub name: Option<String>,
    pub version: Option<Version>,
    pub description: Option<String>,
    pub parent: Option<Located<ParentImage>>,
    pub components: Vec<ComponentUse>,
    pub working_directory: Option<String>,
    pub user_data: Option<String>,
    pub disk_size: Option<Located<ByteSize>>,
    pub infrastructure: Option<Infrastructure>,
    pub tests: Option<Tests>,
    pub outputs: Option<Outputs>,
    pub generalize: Option<bool>,
    pub distribution: Option<Vec<Located<Distribution>>>,
    pub cache: Option<SharedCache>,
    /// `Some(None)`: a machine recipe.
    pub container: Option<Option<ContainerRecipe>>,
}

/// How the walk reads an infrastructure file named by the recipe: its path (as resolved) and
/// what reading it gave.
pub(super) type Include<'r> = &'r mut dyn FnMut(&str) -> (PathBuf, std::io::Result<String>);

/// An infrastructure file that was read: its path, text and problems.
pub(super) struct IncludedFile {
    pub path: PathBuf,
    pub text: String,
    pub problems: Vec<Problem>,
}

pub(super) fn recipe(
    cx: &mut Reader<'_>,
    root: &Node,
    include: Include<'_>,
    included: &mut Vec<IncludedFile>,
) -> Parts {
    let mut parts = Parts::default();
    let Some(entries) = cx.mapping(root, "a recipe", &keys("")) else {
        return parts;
    };
    let container_entry = entries
        .iter()
        .find(|(k, _)| k.as_str() == Some("containerType"));
    let kind = if container_entry.is_some() {
        RecipeKind::Container
    } else {
        RecipeKind::Machine
    };
    // Each key written in the other kind of recipe is refused where it is written; a
    // machine-only key in a container recipe is not read further.
    for (key, _) in entries {
        if let Some(k) = key.as_str() {
            scoped(cx, key, k, kind);
        }
    }
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .filter(|_| in_scope(key, kind))
    };
    let start = cx.start_of(root);
    let required = |cx: &mut Reader<'_>, key: &str, hint: &str| {
        let entry = get(key);
        if entry.is_none() {
            cx.error(start, format!("missing `{key}`"), Some(hint.to_string()));
        }
        entry
    };

    let hint = "add `name: my-image` at the top level";
    parts.name = required(cx, "name", hint).and_then(|(_, v)| name(cx, v));
    let hint = "add `version: 1.0.0` at the top level (semantic version major.minor.patch)";
    parts.version = required(cx, "version", hint).and_then(|(_, v)| version(cx, v));
    parts.description =
        get("description").and_then(|(_, v)| cx.optional_string(v, "`description`"));
    parts.container = match container_entry {
        None => Some(None),
        Some((key, value)) => {
            let container_type = cx.named::<ContainerType>(value, "container type");
            let template = match entries
                .iter()
                .find(|(k, _)| k.as_str() == Some("dockerfileTemplate"))
            {
                Some((template_key, v)) => dockerfile_template(cx, template_key, v),
                None => Some(Located::new(
                    DockerfileTemplate::default_template(),
                    key.span,
                )),
            };
            match (container_type, template) {
                (Some(container_type), Some(template)) => Some(Some(ContainerRecipe {
                    container_type,
                    template,
                })),
                _ => None,
            }
        }
    };
    let hint = match kind {
        RecipeKind::Container => {
            "add `parentImage: oci://registry/repository@sha256:…` (or the path of an OCI archive, or `name/1.x.x` from the store)"
        }
        _ => {
            "add `parentImage: path/to/base.qcow2` (or `{url: …, sha256: …}`, or `name/1.x.x` from the store)"
        }
    };
    parts.parent = required(cx, "parentImage", hint).and_then(|(_, v)| parent(cx, v, kind));
    let hint = "add `components:` with at least one `- path: components/x.yml`";
    if let Some((key, v)) = required(cx, "components", hint)
        && let Some(list) = component_list(cx, v, "components")
    {
        // Entries with problems are not in `list`; only a list with none written is empty.
        if v.as_sequence().is_none_or(|items| items.is_empty()) {
            cx.error(
                key.span,
                "`components` is empty",
                Some(
                    "a recipe applies at least one component: `- path: components/x.yml`"
                        .to_string(),
                ),
            );
        }
        parts.components = list;
    }
    parts.working_directory = get("workingDirectory")
        .map_or(Some(DEFAULT_WORKING_DIRECTORY.to_string()), |(_, v)| {
            working_directory(cx, v)
        });
    parts.user_data = get("userData").and_then(|(_, v)| user_data(cx, v));
    parts.disk_size = get("diskSize").and_then(|(_, v)| disk_size(cx, v));
    parts.infrastructure = get("infrastructure")
        .map_or(Some(Infrastructure::default()), |(_, v)| {
            infrastructure_ref(cx, v, include, included, kind)
        });
    // Said where `userData` is written: it is always in the recipe, while `boot` may be in an
    // infrastructure file.
    if let (Some((key, _)), Some(infra)) = (get("userData"), &parts.infrastructure)
        && infra.boot == Boot::Appliance
    {
        cx.error(
            key.span,
            USER_DATA_IN_APPLIANCE,
            Some(USER_DATA_IN_APPLIANCE_HINT.to_string()),
        );
    }
    parts.tests = get("tests").map_or(Some(Tests::default()), |(_, v)| {
        tests(cx, v, &keys("tests"))
    });
    parts.outputs = get("outputs").map_or(Some(Outputs::default()), |(_, v)| outputs(cx, v));
    parts.generalize = get("generalize").map_or(Some(DEFAULT_GENERALIZE), |(_, v)| {
        cx.boolean(v, "`generalize`")
    });
    parts.distribution =
        get("distribution").map_or(Some(Vec::new()), |(_, v)| distribution_for(cx, v, kind));
    parts.cache = get("cache").map_or(Some(SharedCache::default()), |(_, v)| shared_cache(cx, v));
    parts
}

/// Whether the setting at `path` may be read in a recipe of `kind`.
fn in_scope(path: &str, kind: RecipeKind) -> bool {
    !(kind == RecipeKind::Container && matches!(scope_of(path), Scope::Machine(_)))
}

/// Refuse the setting at `path` (written at `key`) when it is not for recipes of `kind`;
/// whether it was refused.
fn scoped(cx: &mut Reader<'_>, key: &Node, path: &str, kind: RecipeKind) -> bool {
    match (scope_of(path), kind) {
        (Scope::Machine(hint), RecipeKind::Container) => {
            cx.error(
                key.span,
                format!(
                    "`{path}` is for machine images; this is a container recipe (`containerType`)"
                ),
                Some(hint.to_string()),
            );
            true
        }
        (Scope::Container, RecipeKind::Machine) if path != "containerType" => {
            cx.error(
                key.span,
                format!("`{path}` is for container recipes"),
                Some("add `containerType: docker` to build a container image".to_string()),
            );
            true
        }
        _ => false,
    }
}

/// `dockerfileTemplate`, each problem at its place in the file.
fn dockerfile_template(
    cx: &mut Reader<'_>,
    key: &Node,
    node: &Node,
) -> Option<Located<DockerfileTemplate>> {
    let text = cx.string(node, "`dockerfileTemplate`")?;
    match DockerfileTemplate::parse(&text) {
        Ok(template) => Some(Located::new(template, node.span)),
        Err(problems) => {
            for p in problems {
                let span = match p.at {
                    None => key.span,
                    Some(range) => literal_span(cx.source, node, &text, range.clone())
                        .unwrap_or_else(|| cx.inner_span(node, range.start, range.end, &text)),
                };
                cx.error(span, p.message, p.hint);
            }
            None
        }
    }
}

/// Where `range` of a literal block scalar's value (`|`) is in the file: each line of the
/// value is a line of the file, after the block's indentation. `None` when the scalar is not
/// a literal block or the line cannot be found as written.
fn literal_span(source: &str, node: &Node, value: &str, range: Range<usize>) -> Option<Span> {
    if node.as_scalar().map(|s| s.style) != Some(ScalarStyle::Literal) {
        return None;
    }
    let line_index = value.get(..range.start)?.matches('\n').count();
    let line_start = value[..range.start].rfind('\n').map_or(0, |i| i + 1);
    let value_line = value[line_start..].split('\n').next()?;
    let first = source
        .get(..node.span.start)?
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let mut offset = first;
    let lines: Vec<(usize, &str)> = source[first..]
        .split_inclusive('\n')
        .map(|line| {
            let at = offset;
            offset += line.len();
            (at, line.trim_end_matches(['\n', '\r']))
        })
        .collect();
    // The block starts on the line after its `|` header (or, for a span that starts at its
    // content, on that line).
    for header in 0..2 {
        let Some((at, text)) = lines.get(header + line_index) else {
            continue;
        };
        if let Some(indent) = text.len().checked_sub(value_line.len())
            && text.get(indent..) == Some(value_line)
            && text[..indent].chars().all(|c| c == ' ')
        {
            let start = at + indent + (range.start - line_start);
            return Some(Span::from_offsets(source, start, start + range.len()));
        }
    }
    None
}

fn name(cx: &mut Reader<'_>, node: &Node) -> Option<String> {
    let text = cx.string(node, "`name`")?;
    let mut bad: Vec<char> = text
        .chars()
        .filter(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        .collect();
    bad.sort_unstable();
    bad.dedup();
    if !bad.is_empty() {
        let fixed: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let shown: String = bad
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ");
        cx.error(
            node.span,
            format!("name `{text}` holds {shown}; names may hold letters, digits, `-` and `_`"),
            Some(format!(
                "names become store references (`name/1.0.0`) and file names: write `{fixed}`"
            )),
        );
        return None;
    }
    if text.len() > 128 {
        cx.error(
            node.span,
            format!("name is {} characters long; the maximum is 128", text.len()),
            None,
        );
        return None;
    }
    if text.starts_with(['-', '_']) {
        cx.error(
            node.span,
            format!("name `{text}` must start with a letter or digit"),
            None,
        );
        return None;
    }
    Some(text)
}

fn version(cx: &mut Reader<'_>, node: &Node) -> Option<Version> {
    let text = cx.string(node, "`version`")?;
    match text.parse::<Version>() {
        Ok(v) => Some(v),
        Err(e) => {
            let hint = e.hint().or_else(|| {
                text.contains(['x', 'X']).then(|| {
                    "a recipe has an exact version; wildcards (`1.x.x`) select a parent image from the store".to_string()
                })
            });
            cx.error(node.span, e.to_string(), hint);
            None
        }
    }
}

/// `name/1.2.3`, `name/1.x.x`, `name/1.2.3/4`: a previous build in the store.
fn looks_like_store_reference(text: &str) -> bool {
    let mut parts = text.splitn(2, '/');
    let (Some(name), Some(version)) = (parts.next(), parts.next()) else {
        return false;
    };
    let name_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let version = version.split_once('/').map_or(version, |(v, _)| v);
    let nodes: Vec<&str> = version.split('.').collect();
    name_ok
        && nodes.len() == 3
        && nodes.iter().all(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, 'x' | 'X' | '*'))
        })
}

fn parent(cx: &mut Reader<'_>, node: &Node, kind: RecipeKind) -> Option<Located<ParentImage>> {
    let value = if node.as_mapping().is_some() {
        parent_mapping(cx, node, kind)?
    } else {
        let text = cx.string(node, "`parentImage`")?;
        if let Some(rest) = text.strip_prefix("oci://") {
            ParentImage::Oci {
                reference: oci_parent(cx, node, rest)?,
            }
        } else if let Some((scheme, _)) = text.split_once("://")
            && kind == RecipeKind::Container
            && scheme != "oci"
        {
            cx.error(
                node.span,
                format!("a container recipe's parent image cannot come from `{scheme}://`"),
                Some("write `oci://registry[:port]/repository:tag@sha256:<64 hex digits>`, the path of an OCI archive, or a stored container build `name/1.x.x`".to_string()),
            );
            return None;
        } else if let Some((scheme, _)) = text.split_once("://") {
            url_without_pin(cx, node, scheme, &text);
            return None;
        } else if looks_like_store_reference(&text) {
            store_reference(cx, node, &text)?
        } else if kind == RecipeKind::Container && looks_like_image_name(&text) {
            cx.error(
                node.span,
                format!("`{text}` is an image name, not a file; a container recipe's parent from a registry is an `oci://` reference pinned by its digest"),
                Some(format!(
                    "write `parentImage: oci://{}{text}@sha256:<64 hex digits>` (`skopeo inspect` prints the digest)",
                    if text.split_once('/').is_some_and(|(host, _)| host.contains(['.', ':'])) {
                        ""
                    } else {
                        "<registry>/"
                    }
                )),
            );
            return None;
        } else {
            ParentImage::File {
                path: file_path(cx, node, &text)?,
                sha256: None,
            }
        }
    };
    if kind == RecipeKind::Container
        && let ParentImage::File { path, .. } = &value
    {
        disk_image_as_container_parent(cx, node, path);
    }
    Some(Located::new(value, node.span))
}

/// `debian:12`, `docker.io/library/debian:12`: what `docker pull` takes, not a path.
fn looks_like_image_name(text: &str) -> bool {
    let last = text.rsplit('/').next().unwrap_or(text);
    !text.starts_with(['.', '/', '$', '~'])
        && last.contains(':')
        && !last.contains("${")
        && !last.contains(".tar")
        && !text.contains(char::is_whitespace)
}

/// A container recipe's parent file is an OCI archive: a disk image there is a mix-up.
fn disk_image_as_container_parent(cx: &mut Reader<'_>, node: &Node, path: &str) {
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    if let Some(extension) = extension
        && (Format::from_name(&extension).is_some() || extension == "img")
    {
        cx.warning(
            node.span,
            format!("`{path}` looks like a disk image; a container recipe starts from an OCI archive"),
            Some("a container recipe's parent file is an `oci-archive` (`skopeo copy … oci-archive:base.tar`, `podman save --format oci-archive`)".to_string()),
        );
    }
}

fn url_without_pin(cx: &mut Reader<'_>, node: &Node, scheme: &str, text: &str) {
    match scheme {
        "http" | "https" => cx.error(
            node.span,
            "a parent image from a URL needs its sha256",
            Some(format!(
                "pin it: `parentImage: {{url: {text}, sha256: <64 hex digits>}}`"
            )),
        ),
        "oci" => oci_not_supported(cx, node.span),
        other => cx.error(
            node.span,
            format!("unsupported URL scheme `{other}://` for `parentImage`"),
            Some(
                "use `https://` (with `sha256`), a local path, or a store image `name/1.x.x`"
                    .to_string(),
            ),
        ),
    }
}

fn oci_not_supported(cx: &mut Reader<'_>, span: Span) {
    cx.error(
        span,
        "an OCI parent image is written as a string, pinned by its manifest digest",
        Some(
            "write `parentImage: oci://registry[:port]/repository:tag@sha256:<64 hex digits>`"
                .to_string(),
        ),
    );
}

/// `registry[:port]/repository[:tag][@sha256:<hex>]` after `oci://`: its shape only (the
/// plan parses it fully, and pins a tag-only reference or refuses it naming the current digest).
fn oci_parent(cx: &mut Reader<'_>, node: &Node, rest: &str) -> Option<String> {
    let (name, digest) = match rest.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (rest, None),
    };
    if let Some(digest) = digest
        && Sha256::parse(digest).is_none_or(|_| !digest.starts_with("sha256:"))
    {
        cx.error(
            node.span,
            format!("`{digest}` is not a manifest digest"),
            Some("write `@sha256:` and the 64 hex digits the push printed".to_string()),
        );
        return None;
    }
    if name
        .find('/')
        .is_none_or(|slash| slash == 0 || slash + 1 == name.len())
    {
        cx.error(
            node.span,
            format!("`oci://{rest}` does not name a registry and a repository"),
            Some("write `oci://registry[:port]/repository:tag@sha256:<64 hex digits>`".to_string()),
        );
        return None;
    }
    Some(rest.to_string())
}

fn store_reference(cx: &mut Reader<'_>, node: &Node, text: &str) -> Option<ParentImage> {
    let (name, version) = text.split_once('/')?;
    match version.parse::<VersionPattern>() {
        Ok(version) => Some(ParentImage::Store {
            name: name.to_string(),
            version,
        }),
        Err(e) => {
            let at = name.len() + 1;
            let span = cx.inner_span(node, at, text.len(), text);
            cx.error(span, e.to_string(), e.hint());
            None
        }
    }
}

/// A local path; `${VAR}` must be well formed (it is replaced when the plan is made).
fn file_path(cx: &mut Reader<'_>, node: &Node, text: &str) -> Option<String> {
    let mut ok = true;
    let mut rest = 0;
    while let Some(open) = text[rest..].find("${").map(|i| i + rest) {
        let Some(close) = text[open..].find('}').map(|i| i + open) else {
            let span = cx.inner_span(node, open, text.len(), text);
            cx.error(
                span,
                "`${` is never closed",
                Some("write `${NAME}` to use the environment variable NAME".to_string()),
            );
            ok = false;
            break;
        };
        let var = &text[open + 2..close];
        let valid = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            let span = cx.inner_span(node, open, close + 1, text);
            cx.error(
                span,
                format!(
                    "`{}` is not an environment variable reference",
                    &text[open..=close]
                ),
                Some("write `${NAME}` with letters, digits and `_` only".to_string()),
            );
            ok = false;
        }
        rest = close + 1;
    }
    ok.then(|| text.to_string())
}

fn sha256(cx: &mut Reader<'_>, node: &Node) -> Option<Sha256> {
    let text = cx.string(node, "`sha256`")?;
    match Sha256::parse(&text) {
        Some(d) => Some(d),
        None => {
            cx.error(
                node.span,
                format!(
                    "`sha256` must be 64 hex digits, found {} characters",
                    text.chars().count()
                ),
                Some("compute it with `sha256sum <file>`".to_string()),
            );
            None
        }
    }
}

fn parent_mapping(cx: &mut Reader<'_>, node: &Node, kind: RecipeKind) -> Option<ParentImage> {
    let entries = cx.mapping(node, "`parentImage`", &keys("parentImage"))?;
    let get = |key: &str| entries.iter().find(|(k, _)| k.as_str() == Some(key));
    if let Some((key, _)) = get("url")
        && scoped(cx, key, "parentImage.url", kind)
    {
        return None;
    }
    let given: Vec<&str> = ["path", "url", "image"]
        .into_iter()
        .filter(|k| get(k).is_some())
        .collect();
    if given.len() != 1 {
        let message = if given.is_empty() {
            "`parentImage` needs one of `path`, `url` or `image`".to_string()
        } else {
            format!("`parentImage` has {}; give only one", one_of(&given))
        };
        cx.error(node.span, message, None);
        return None;
    }
    let digest = get("sha256").map(|(_, v)| sha256(cx, v));
    match given[0] {
        "path" => {
            let (_, v) = get("path")?;
            let text = cx.string(v, "`path`")?;
            let path = file_path(cx, v, &text)?;
            if kind == RecipeKind::Container {
                disk_image_as_container_parent(cx, v, &path);
            }
            Some(ParentImage::File {
                path,
                sha256: digest.flatten(),
            })
        }
        "url" => {
            let (key, v) = get("url")?;
            let url = cx.string(v, "`url`")?;
            match url.split_once("://").map(|(s, _)| s) {
                Some("http" | "https") => {}
                Some("oci") => {
                    oci_not_supported(cx, v.span);
                    return None;
                }
                _ => {
                    cx.error(
                        v.span,
                        format!("`url` must start with `https://` or `http://`, found `{url}`"),
                        None,
                    );
                    return None;
                }
            }
            match digest {
                Some(d) => Some(ParentImage::Url { url, sha256: d? }),
                None => {
                    cx.error(
                        key.span,
                        "a parent image from a URL needs its sha256",
                        Some("add `sha256: <64 hex digits>` next to `url` (the publisher's SHA256SUMS has it)".to_string()),
                    );
                    None
                }
            }
        }
        _ => {
            let (_, v) = get("image")?;
            let text = cx.string(v, "`image`")?;
            if let Some((key, _)) = get("sha256") {
                cx.error(
                    key.span,
                    "`sha256` cannot pin a store image",
                    Some("name one build exactly instead: `image: name/1.2.0/3`".to_string()),
                );
                return None;
            }
            if !looks_like_store_reference(&text) {
                cx.error(
                    v.span,
                    format!("`{text}` is not a store image reference"),
                    Some("write `name/1.2.0`, `name/1.x.x` or `name/1.2.0/3`".to_string()),
                );
                return None;
            }
            store_reference(cx, v, &text)
        }
    }
}

/// The list at `section` (`components`, `tests.components`).
pub(super) fn component_list(
    cx: &mut Reader<'_>,
    node: &Node,
    section: &str,
) -> Option<Vec<ComponentUse>> {
    if node.is_null() {
        return Some(Vec::new());
    }
    let Some(items) = node.as_sequence() else {
        cx.not_a(
            node,
            &format!("`{section}`"),
            "a list of `- path: …` entries",
        );
        return None;
    };
    Some(
        items
            .iter()
            .filter_map(|item| component_use(cx, item, section))
            .collect(),
    )
}

/// One entry of the list at `section` (`components`, `tests.components`: their keys differ).
fn component_use(cx: &mut Reader<'_>, item: &Node, section: &str) -> Option<ComponentUse> {
    if let Some(text) = item.as_str().filter(|_| !item.is_null()) {
        cx.error(
            item.span,
            "a component entry must be a mapping",
            Some(format!("write `- path: {text}`")),
        );
        return None;
    }
    let entries = cx.mapping(item, "a component entry", &keys(section))?;
    let get = |key: &str| entries.iter().find(|(k, _)| k.as_str() == Some(key));
    let missing = (item.span, "a component entry");
    let path = path(cx, get("path").map(|(_, v)| v), missing, "components/x.yml");
    let parameters = match get("parameters") {
        None => Some(Vec::new()),
        Some((_, v)) => parameters(cx, v),
    };
    let cache = match get("cache") {
        None => Some(true),
        Some((_, v)) => cx.boolean(v, "`cache`"),
    };
    Some(ComponentUse {
        path: path?,
        parameters: parameters?,
        cache: cache?,
        span: item.span,
    })
}

fn parameters(cx: &mut Reader<'_>, node: &Node) -> Option<Vec<ParameterValue>> {
    if node.is_null() {
        return Some(Vec::new());
    }
    if node.as_sequence().is_some() {
        cx.error(
            node.span,
            "`parameters` must be a mapping of names to values",
            Some("write `parameters: {name: value}`; Image Builder's `- name: … value: [...]` list is not used here".to_string()),
        );
        return None;
    }
    let entries = node.as_mapping();
    let Some(entries) = entries else {
        cx.not_a(node, "`parameters`", "a mapping of names to values");
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (key, value) in entries {
        let Some(name) = cx.string(key, "a parameter name") else {
            ok = false;
            continue;
        };
        let what = format!("parameter `{name}`");
        let text = if let Some(items) = value.as_sequence() {
            let mut texts = Vec::new();
            for item in items {
                match item.as_str().filter(|_| !item.is_null()) {
                    Some(s) => texts.push(s.to_string()),
                    None => {
                        cx.not_a(item, &format!("an item of {what}"), "text");
                        ok = false;
                    }
                }
            }
            Some(texts.join(","))
        } else if value.is_null() {
            cx.error(
                value.span,
                format!("{what} has no value"),
                Some(format!("write `{name}: \"\"` to pass an empty value")),
            );
            None
        } else {
            match value.as_str() {
                Some(s) => Some(s.to_string()),
                None => {
                    cx.not_a(value, &what, "text or a list of texts");
                    None
                }
            }
        };
        match text {
            Some(value) => out.push(ParameterValue {
                name,
                value,
                span: key.span,
            }),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn working_directory(cx: &mut Reader<'_>, node: &Node) -> Option<String> {
    let text = cx.string(node, "`workingDirectory`")?;
    if !text.starts_with('/') {
        cx.error(
            node.span,
            format!("`workingDirectory` must be an absolute path in the guest, found `{text}`"),
            Some(format!("write `/{}`", text.trim_start_matches("./"))),
        );
        return None;
    }
    Some(text)
}

fn user_data(cx: &mut Reader<'_>, node: &Node) -> Option<String> {
    let text = cx.optional_string(node, "`userData`")?;
    if text.lines().next().map(str::trim_end) != Some("#cloud-config") {
        cx.error(
            node.span,
            "`userData` must be a cloud-config document starting with `#cloud-config`",
            Some("it is merged into the build VM's cloud-init seed; write `userData: |` then `#cloud-config` on the next line".to_string()),
        );
        return None;
    }
    let (root, problems) = crate::yaml::parse(&text);
    if let Some(first) = problems.first() {
        cx.error(
            node.span,
            format!(
                "`userData` is not valid YAML: {} (line {} of the user data)",
                first.message, first.span.line
            ),
            None,
        );
        return None;
    }
    if let Some(root) = root
        && root.as_mapping().is_none()
        && !root.is_null()
    {
        cx.error(
            node.span,
            format!(
                "`userData` must hold a mapping of cloud-config keys, found {}",
                root.describe()
            ),
            None,
        );
        return None;
    }
    Some(text)
}

/// Below this, no Linux image boots; it catches `diskSize: 8` (bytes) meant as GiB.
const MIN_DISK: ByteSize = ByteSize::mib(64);

fn disk_size(cx: &mut Reader<'_>, node: &Node) -> Option<Located<ByteSize>> {
    let size = ByteSize::read(cx, node, "`diskSize`")?;
    if size < MIN_DISK {
        cx.error(
            node.span,
            format!("diskSize ({size}) is below the minimum ({MIN_DISK})"),
            (node.as_int().is_some())
                .then(|| "a plain number is bytes; write a unit, e.g. `8GiB`".to_string()),
        );
        return None;
    }
    if !size.bytes().is_multiple_of(512) {
        cx.error(
            node.span,
            format!("diskSize ({size}) is not a whole number of 512-byte sectors"),
            Some("use a size in MiB or GiB".to_string()),
        );
        return None;
    }
    Some(Located::new(size, node.span))
}

fn infrastructure_ref(
    cx: &mut Reader<'_>,
    node: &Node,
    include: Include<'_>,
    included: &mut Vec<IncludedFile>,
    kind: RecipeKind,
) -> Option<Infrastructure> {
    if node.as_mapping().is_some() || node.is_null() {
        return infrastructure(cx, node, &keys("infrastructure"), kind);
    }
    let name = cx.string(node, "`infrastructure`")?;
    let (path, read) = include(&name);
    let text = match read {
        Ok(text) => text,
        Err(e) => {
            cx.error(
                node.span,
                format!(
                    "could not read the infrastructure file `{}`: {e}",
                    path.display()
                ),
                Some("the path is relative to the recipe's directory".to_string()),
            );
            return None;
        }
    };
    let mut file_cx = new_reader(&text);
    let (root, problems) = crate::yaml::parse(&text);
    file_cx.problems.extend(problems);
    let result = match &root {
        Some(root) => infrastructure(&mut file_cx, root, &keys("infrastructure"), kind),
        None if !file_cx.problems.is_empty() => None,
        // An empty file: every default.
        None => Some(Infrastructure::default()),
    };
    let problems = std::mem::take(&mut file_cx.problems);
    included.push(IncludedFile {
        path,
        text: text.clone(),
        problems,
    });
    result
}

/// A section mapping (`infrastructure`, `tests`, `outputs`): the model's defaults with each key
/// given `read` into them, when no key had a problem. Written empty, it is all defaults.
fn section<T: Default>(
    cx: &mut Reader<'_>,
    node: &Node,
    what: &str,
    allowed: &[&str],
    mut read: impl FnMut(&mut Reader<'_>, &mut T, &Node, &Node),
) -> Option<T> {
    let mut value = T::default();
    if node.is_null() {
        return Some(value);
    }
    let entries = cx.mapping(node, what, allowed)?;
    let before = cx.problems.len();
    for (key, v) in entries {
        read(cx, &mut value, key, v);
    }
    (cx.problems.len() == before).then_some(value)
}

/// Sets `field` to what a reader returned, unless it found a problem (then reported).
fn set<T>(field: &mut T, read: Option<T>) {
    if let Some(value) = read {
        *field = value;
    }
}

/// A recipe's `infrastructure` mapping, with the keys `allowed` there (those of machine
/// recipes refused in a container recipe).
fn infrastructure(
    cx: &mut Reader<'_>,
    node: &Node,
    allowed: &[&str],
    kind: RecipeKind,
) -> Option<Infrastructure> {
    section(
        cx,
        node,
        "`infrastructure`",
        allowed,
        |cx, infra: &mut Infrastructure, key, value| {
            let timeout = |cx: &mut Reader<'_>, what| cx.number(value, what, 1, MAX_TIMEOUT_SECS);
            let name = key.as_str().unwrap_or_default();
            if allowed.contains(&name) && scoped(cx, key, &format!("infrastructure.{name}"), kind) {
                return;
            }
            match name {
                "cpus" => set(
                    &mut infra.cpus,
                    cx.number(value, "cpus", 1, u64::from(MAX_CPUS))
                        .map(|n| n as u32),
                ),
                "memory" => set(&mut infra.memory, memory(cx, value)),
                "accelerator" => set(&mut infra.accelerator, cx.named(value, "accelerator")),
                "firmware" => set(&mut infra.firmware, cx.named(value, "firmware")),
                "boot" => set(&mut infra.boot, cx.named(value, "boot mode")),
                "network" => set(&mut infra.network, cx.named(value, "network")),
                "bootTimeoutSeconds" => set(
                    &mut infra.boot_timeout_secs,
                    timeout(cx, "bootTimeoutSeconds"),
                ),
                "buildTimeoutSeconds" => set(
                    &mut infra.build_timeout_secs,
                    timeout(cx, "buildTimeoutSeconds"),
                ),
                "shutdownTimeoutSeconds" => set(
                    &mut infra.shutdown_timeout_secs,
                    timeout(cx, "shutdownTimeoutSeconds"),
                ),
                "keepOnFailure" => set(
                    &mut infra.keep_on_failure,
                    cx.boolean(value, "keepOnFailure"),
                ),
                _ => {}
            }
        },
    )
}

fn memory(cx: &mut Reader<'_>, node: &Node) -> Option<ByteSize> {
    let size = ByteSize::read(cx, node, "memory")?;
    if size < MIN_MEMORY {
        let hint = (node.as_int())
            .map(|_| "a plain number is bytes; write a unit, e.g. `2GiB`".to_string());
        cx.error(
            node.span,
            format!("memory ({size}) is below the minimum ({MIN_MEMORY})"),
            hint,
        );
        return None;
    }
    Some(size)
}

/// A recipe's `tests` mapping, with the keys `allowed` there.
fn tests(cx: &mut Reader<'_>, node: &Node, allowed: &[&str]) -> Option<Tests> {
    section(
        cx,
        node,
        "`tests`",
        allowed,
        |cx, tests: &mut Tests, key, value| match key.as_str().unwrap_or_default() {
            "enabled" => set(&mut tests.enabled, cx.boolean(value, "`enabled`")),
            "timeoutSeconds" => set(
                &mut tests.timeout_secs,
                cx.number(value, "timeoutSeconds", 1, MAX_TIMEOUT_SECS),
            ),
            "components" => set(
                &mut tests.components,
                component_list(cx, value, "tests.components"),
            ),
            _ => {}
        },
    )
}

/// What a pipeline writes in place of the recipe's `section` (`infrastructure` or `tests`):
/// read by the recipe's rules (so the messages are the same) with the keys a pipeline may set
/// there, in the model's serde form, whose names are the file's keys.
pub(crate) fn section_override(
    cx: &mut Reader<'_>,
    node: &Node,
    section: &str,
) -> Option<serde_json::Value> {
    let allowed = pipeline_keys(section);
    let values = match section {
        "infrastructure" => {
            serde_json::to_value(infrastructure(cx, node, &allowed, RecipeKind::Unknown)?)
        }
        _ => serde_json::to_value(tests(cx, node, &allowed)?),
    };
    #[expect(
        clippy::expect_used,
        reason = "the model's sections are plain structs with string keys: serde_json cannot fail"
    )]
    let values = values.expect("the model's sections serialize to JSON");
    Some(values)
}

fn outputs(cx: &mut Reader<'_>, node: &Node) -> Option<Outputs> {
    let mut compression_span = None;
    let mut qcow2 = Outputs::default().formats.contains(&Format::Qcow2);
    let outputs = section(
        cx,
        node,
        "`outputs`",
        &keys("outputs"),
        |cx, outputs: &mut Outputs, key, value| match key.as_str().unwrap_or_default() {
            "formats" => {
                if let Some(formats) = formats(cx, key, value) {
                    qcow2 = formats.contains(&Format::Qcow2);
                    outputs.formats = formats;
                }
            }
            "compression" => {
                compression_span = Some(key.span);
                set(&mut outputs.compression, cx.named(value, "compression"));
            }
            "name" => set(&mut outputs.name, name_template(cx, value, "`name`")),
            "directory" => outputs.directory = cx.optional_string(value, "`directory`"),
            _ => {}
        },
    );
    if let Some(span) = compression_span
        && !qcow2
    {
        cx.warning(
            span,
            "`compression` applies to the qcow2 output only, and no qcow2 output is requested",
            Some("add `qcow2` to `formats` or remove `compression`".to_string()),
        );
    }
    outputs
}

/// The items of a `formats` list (`key: node`) that may name `names`: a list of at least one.
fn format_items<'n>(
    cx: &mut Reader<'_>,
    key: &Node,
    node: &'n Node,
    names: &[&str],
) -> Option<&'n [Node]> {
    let Some(items) = node.as_sequence() else {
        let hint = node
            .as_str()
            .map(|s| format!("write a list: `formats: [{s}]`"));
        cx.error(
            node.span,
            format!("`formats` must be a list, found {}", node.describe()),
            hint,
        );
        return None;
    };
    if items.is_empty() {
        cx.error(
            key.span,
            "`formats` is empty",
            Some(format!("list at least one of {}", one_of(names))),
        );
        return None;
    }
    Some(items)
}

fn formats(cx: &mut Reader<'_>, key: &Node, node: &Node) -> Option<Vec<Format>> {
    let items = format_items(cx, key, node, Format::NAMES)?;
    let mut out: Vec<Format> = Vec::new();
    let mut ok = true;
    for item in items {
        match cx.named(item, "output format") {
            Some(f) if out.contains(&f) => {
                cx.error(item.span, format!("format `{f}` is listed twice"), None);
                ok = false;
            }
            Some(f) => out.push(f),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// `directory.formats`: disk formats in a machine recipe, archives in a container recipe.
fn directory_formats(
    cx: &mut Reader<'_>,
    key: &Node,
    node: &Node,
    kind: RecipeKind,
) -> Option<DirectoryFormats> {
    let names = match kind {
        RecipeKind::Container => ArchiveFormat::NAMES,
        _ => Format::NAMES,
    };
    let items = format_items(cx, key, node, names)?;
    let mut disk: Vec<Format> = Vec::new();
    let mut archives: Vec<ArchiveFormat> = Vec::new();
    let mut ok = true;
    for item in items {
        let text = item.as_str().filter(|_| !item.is_null());
        let archive = text.and_then(ArchiveFormat::from_name);
        let disk_format = text.and_then(Format::from_name);
        let twice = |cx: &mut Reader<'_>, name: &str| {
            cx.error(item.span, format!("format `{name}` is listed twice"), None);
        };
        match (kind, archive, disk_format) {
            (RecipeKind::Machine, Some(a), _) => {
                cx.error(
                    item.span,
                    format!("`{a}` is only for container recipes"),
                    Some(format!(
                        "a machine image's directory gets disk formats: {}",
                        one_of(Format::NAMES)
                    )),
                );
                ok = false;
            }
            (RecipeKind::Container, None, Some(f)) => {
                cx.error(
                    item.span,
                    format!(
                        "`{f}` is a disk format; a container image is written as {}",
                        one_of(ArchiveFormat::NAMES)
                    ),
                    Some("`docker load` and `podman load` read either archive".to_string()),
                );
                ok = false;
            }
            (_, Some(a), _) if archives.contains(&a) => {
                twice(cx, a.name());
                ok = false;
            }
            (_, Some(a), _) => archives.push(a),
            (RecipeKind::Container, None, None) => {
                cx.named::<ArchiveFormat>(item, "archive format");
                ok = false;
            }
            (_, None, _) => match cx.named::<Format>(item, "output format") {
                Some(f) if disk.contains(&f) => {
                    twice(cx, f.name());
                    ok = false;
                }
                Some(f) => disk.push(f),
                None => ok = false,
            },
        }
    }
    if ok && !disk.is_empty() && !archives.is_empty() {
        cx.error(
            key.span,
            "`formats` names disk formats and container archives",
            Some("a machine image gets disk formats, a container image archives".to_string()),
        );
        return None;
    }
    let formats = if archives.is_empty() {
        DirectoryFormats::Disk(disk)
    } else {
        DirectoryFormats::Container(archives)
    };
    ok.then_some(formats)
}

/// A pipeline's `distribution` list (which replaces its recipe's): read before the recipe is
/// known, so `directory.formats` may name disk formats or container archives, not both.
pub(crate) fn distribution(cx: &mut Reader<'_>, node: &Node) -> Option<Vec<Located<Distribution>>> {
    distribution_for(cx, node, RecipeKind::Unknown)
}

/// A `distribution` list for a recipe of `kind`.
pub(crate) fn distribution_for(
    cx: &mut Reader<'_>,
    node: &Node,
    kind: RecipeKind,
) -> Option<Vec<Located<Distribution>>> {
    if node.is_null() {
        return Some(Vec::new());
    }
    let Some(items) = node.as_sequence() else {
        let hint = node
            .as_mapping()
            .map(|_| "write a list: `distribution:` then `- directory: {path: …}`".to_string());
        cx.error(
            node.span,
            format!("`distribution` must be a list, found {}", node.describe()),
            hint,
        );
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for item in items {
        match distribution_entry(cx, item, kind) {
            Some(d) => out.push(Located::new(d, item.span)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn distribution_entry(cx: &mut Reader<'_>, item: &Node, kind: RecipeKind) -> Option<Distribution> {
    let targets = keys("distribution");
    let kinds = one_of(&targets);
    if let Some(text) = item.as_str().filter(|_| !item.is_null()) {
        let hint = match targets.iter().find(|k| **k == text) {
            Some(k) => format!("write `- {k}: {{…}}` with its settings"),
            None => format!(
                "each entry is a mapping with one of {kinds}, e.g. `- directory: {{path: ./out/}}`"
            ),
        };
        cx.error(
            item.span,
            "a distribution entry must be a mapping",
            Some(hint),
        );
        return None;
    }
    let entries = cx.mapping(item, "a distribution entry", &targets)?;
    let known: Vec<&(Node, Node)> = entries
        .iter()
        .filter(|(k, _)| k.as_str().is_some_and(|k| targets.contains(&k)))
        .collect();
    if entries.is_empty() {
        cx.error(
            item.span,
            "a distribution entry is empty",
            Some(format!("name one target: {kinds}")),
        );
        return None;
    }
    if known.len() != entries.len() {
        // Unknown keys were reported by `mapping`.
        return None;
    }
    if known.len() > 1 {
        cx.error(
            known[1].0.span,
            "a distribution entry names one target",
            Some("start a new entry with `- ` for each target".to_string()),
        );
        return None;
    }
    let (key, value) = known[0];
    let target = key.as_str().unwrap_or_default();
    if scoped(cx, key, &format!("distribution.{target}"), kind) {
        return None;
    }
    match target {
        "directory" => directory_target(cx, key, value, kind).map(Distribution::Directory),
        "vagrant" => vagrant_target(cx, key, value).map(Distribution::Vagrant),
        "oci" => oci_target(cx, key, value, "oci").map(Distribution::Oci),
        "containerDisk" => {
            oci_target(cx, key, value, "containerDisk").map(Distribution::ContainerDisk)
        }
        _ => ami_target(cx, key, value).map(Distribution::Ami),
    }
}

/// The settings mapping of one target (`- directory: {…}`), with unknown keys reported.
fn target_mapping<'n>(
    cx: &mut Reader<'_>,
    key: &Node,
    value: &'n Node,
    kind: &str,
    example: &str,
) -> Option<&'n [(Node, Node)]> {
    if value.is_null() {
        cx.error(
            key.span,
            format!("`{kind}` has no settings"),
            Some(format!("write `- {kind}: {example}`")),
        );
        return None;
    }
    if value.as_mapping().is_none() {
        cx.error(
            value.span,
            format!(
                "`{kind}` must be a mapping of settings, found {}",
                value.describe()
            ),
            Some(format!("write `- {kind}: {example}`")),
        );
        return None;
    }
    cx.mapping(
        value,
        &format!("`{kind}`"),
        &keys(&format!("distribution.{kind}")),
    )
}

/// A name template with each mistake at its place in the file.
fn name_template(cx: &mut Reader<'_>, node: &Node, what: &str) -> Option<NameTemplate> {
    let text = cx.string(node, what)?;
    match NameTemplate::parse(&text) {
        Ok(t) => Some(t),
        Err(errors) => {
            for e in errors {
                let span = cx.inner_span(node, e.start, e.end, &text);
                cx.error(span, e.message, e.hint);
            }
            None
        }
    }
}

/// One target's settings, as `target_mapping` let them through.
struct Settings<'n>(&'n [(Node, Node)]);

impl<'n> Settings<'n> {
    /// The value of `key`, if it is set.
    fn value(&self, key: &str) -> Option<&'n Node> {
        self.entry(key).map(|(_, v)| v)
    }

    fn entry(&self, key: &str) -> Option<&'n (Node, Node)> {
        self.0.iter().find(|(n, _)| n.as_str() == Some(key))
    }

    /// `key: true|false`; `default` when it is not set or not a boolean (then reported).
    fn boolean(&self, cx: &mut Reader<'_>, key: &str, default: bool) -> bool {
        self.value(key)
            .and_then(|v| cx.boolean(v, &format!("`{key}`")))
            .unwrap_or(default)
    }

    /// The `name` template; the default when it is not set or wrong (then reported).
    fn name(&self, cx: &mut Reader<'_>) -> NameTemplate {
        self.value("name")
            .and_then(|v| name_template(cx, v, "`name`"))
            .unwrap_or_default()
    }
}

/// The start of a target written to a `path` (directory, vagrant): its settings, the
/// number of problems before them, and the path (`None` when missing or not a string, then
/// reported).
fn path_target<'n>(
    cx: &mut Reader<'_>,
    key: &Node,
    value: &'n Node,
    kind: &str,
    example: &str,
) -> Option<(Settings<'n>, usize, Option<Located<String>>)> {
    let settings = Settings(target_mapping(
        cx,
        key,
        value,
        kind,
        &format!("{{path: {example}}}"),
    )?);
    let before = cx.problems.len();
    let path = path(
        cx,
        settings.value("path"),
        (key.span, &format!("`{kind}`")),
        example,
    );
    Some((settings, before, path))
}

/// The `path` of a component entry or a target; when it is missing, a problem at the
/// `missing` span saying that the thing it names has none.
fn path(
    cx: &mut Reader<'_>,
    node: Option<&Node>,
    missing: (Span, &str),
    example: &str,
) -> Option<Located<String>> {
    let Some(v) = node else {
        cx.error(
            missing.0,
            format!("{} has no `path`", missing.1),
            Some(format!("add `path: {example}` (relative to the recipe)")),
        );
        return None;
    };
    cx.string(v, "`path`").map(|p| Located::new(p, v.span))
}

fn directory_target(
    cx: &mut Reader<'_>,
    key: &Node,
    value: &Node,
    kind: RecipeKind,
) -> Option<DirectoryDistribution> {
    let (settings, before, path) = path_target(cx, key, value, "directory", "/srv/images/")?;
    let name = settings.name(cx);
    let formats = match settings.entry("formats") {
        Some((k, v)) => directory_formats(cx, k, v, kind).unwrap_or_default(),
        None if kind == RecipeKind::Container => {
            DirectoryFormats::Container(DEFAULT_ARCHIVE_FORMATS.to_vec())
        }
        None => DirectoryFormats::default(),
    };
    let overwrite = settings.boolean(cx, "overwrite", false);
    let target = DirectoryDistribution {
        path: path?,
        name,
        formats,
        overwrite,
    };
    (cx.problems.len() == before).then_some(target)
}

fn vagrant_target(cx: &mut Reader<'_>, key: &Node, value: &Node) -> Option<VagrantDistribution> {
    let (settings, before, path) = path_target(cx, key, value, "vagrant", "./out/web.box")?;
    let name = settings.name(cx);
    let overwrite = settings.boolean(cx, "overwrite", false);
    let path = path?;
    if !path.value.ends_with('/') && !path.value.ends_with(".box") {
        cx.warning(
            path.span,
            format!("`{}` does not end in `.box`", path.value),
            Some(
                "a folder is written with a trailing `/`; a box file usually ends in `.box`"
                    .to_string(),
            ),
        );
    }
    (cx.problems
        .iter()
        .skip(before)
        .all(|p| p.severity != crate::diagnostic::Severity::Error))
    .then_some(VagrantDistribution {
        path,
        name,
        overwrite,
    })
}

fn oci_target(
    cx: &mut Reader<'_>,
    key: &Node,
    value: &Node,
    kind: &str,
) -> Option<OciDistribution> {
    let entries = target_mapping(
        cx,
        key,
        value,
        kind,
        "{reference: 127.0.0.1:5000/images/web:1.0.0}",
    )?;
    let settings = Settings(entries);
    let before = cx.problems.len();
    let reference = match settings.value("reference") {
        None => {
            cx.error(
                key.span,
                format!("`{kind}` has no `reference`"),
                Some("add `reference: registry[:port]/repository:tag`".to_string()),
            );
            None
        }
        Some(v) => oci_reference(cx, v),
    };
    let plain_http = settings.boolean(cx, "plainHttp", false);
    let reference = reference?;
    (cx.problems.len() == before).then_some(OciDistribution {
        reference,
        plain_http,
    })
}

fn oci_reference(cx: &mut Reader<'_>, node: &Node) -> Option<Located<String>> {
    let text = cx.string(node, "`reference`")?;
    let example = "`127.0.0.1:5000/images/web:1.0.0`";
    if let Some((scheme, rest)) = text.split_once("://") {
        cx.error(
            node.span,
            format!("write the reference without the scheme `{scheme}://`"),
            Some(format!(
                "write `{rest}`; `plainHttp: true` selects plain HTTP"
            )),
        );
        return None;
    }
    if text.contains('@') {
        cx.error(
            node.span,
            format!("`{text}` names a digest; a push writes a tag"),
            Some("the pushed digest is in the receipt (`builder images show`)".to_string()),
        );
        return None;
    }
    let Some((slash, tag)) = split_oci_reference(&text) else {
        cx.error(
            node.span,
            format!("`{text}` does not name a registry and a repository"),
            Some(format!(
                "write `registry[:port]/repository:tag`, e.g. {example}"
            )),
        );
        return None;
    };
    let registry = &text[..slash];
    let ok = !registry.is_empty()
        && (registry.contains(['.', ':']) || registry == "localhost")
        && registry
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !ok {
        let span = cx.inner_span(node, 0, slash, &text);
        cx.error(
            span,
            format!("`{registry}` is not a registry host"),
            Some(format!(
                "the reference starts with the registry's host (and port), e.g. {example}"
            )),
        );
        return None;
    }
    let repo_end = tag.map(|t| t - 1).unwrap_or(text.len());
    let repository = &text[slash + 1..repo_end];
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.chars().all(|ch| {
                ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
            })
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    if !repository.split('/').all(component_ok) {
        let span = cx.inner_span(node, slash + 1, repo_end, &text);
        cx.error(
            span,
            format!("`{repository}` is not a valid repository name"),
            Some(format!(
                "repository names hold lower-case letters, digits and `.`, `_`, `-` between them: `{}`",
                repository.to_ascii_lowercase()
            )),
        );
        return None;
    }
    if let Some(start) = tag {
        let tag_text = &text[start..];
        let template = match NameTemplate::parse(tag_text) {
            Ok(t) => t,
            Err(errors) => {
                for e in errors {
                    let span = cx.inner_span(node, start + e.start, start + e.end, &text);
                    cx.error(span, e.message, e.hint);
                }
                return None;
            }
        };
        // Placeholders render to tag-safe text; the literal parts decide.
        let sample = template.render(&super::name_template::NameValues {
            name: "n",
            version: Version {
                major: 1,
                minor: 0,
                patch: 0,
            },
            build_version: 1,
            build_date: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
        });
        let tag_ok = sample.len() <= 128
            && sample.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && sample
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !tag_ok {
            let span = cx.inner_span(node, start, text.len(), &text);
            cx.error(
                span,
                format!("`{tag_text}` is not a valid tag"),
                Some("tags hold letters, digits, `_`, `.` and `-` (at most 128), and may use name-template placeholders".to_string()),
            );
            return None;
        }
    }
    Some(Located::new(text, node.span))
}

/// A recipe's `cache` (also read by pipelines, whose value replaces the recipe's).
pub(crate) fn shared_cache(cx: &mut Reader<'_>, node: &Node) -> Option<SharedCache> {
    section(
        cx,
        node,
        "`cache`",
        &keys("cache"),
        |cx, cache: &mut SharedCache, key, value| match key.as_str().unwrap_or_default() {
            "from" => {
                // One reference, or a list of them.
                let items = if value.as_sequence().is_some() {
                    string_list(cx, value, "`from`")
                } else {
                    vec![value]
                };
                for item in items {
                    if let Some(reference) = cache_repository(cx, item, "`from`") {
                        cache.from.push(reference);
                    }
                }
            }
            "to" => cache.to = cache_repository(cx, value, "`to`"),
            _ => {}
        },
    )
}

/// `oci://registry[:port]/repository`: a repository, since each layer's tag is its key.
fn cache_repository(cx: &mut Reader<'_>, node: &Node, what: &str) -> Option<OciReference> {
    let text = cx.string(node, what)?;
    match OciReference::parse_repository(&text) {
        Ok(reference) => Some(reference),
        Err(e) => {
            let hint = "write `oci://registry[:port]/repository`".to_string();
            cx.error(node.span, e.to_string(), Some(hint));
            None
        }
    }
}

fn ami_target(cx: &mut Reader<'_>, key: &Node, value: &Node) -> Option<AmiDistribution> {
    let entries = target_mapping(
        cx,
        key,
        value,
        "ami",
        "{region: eu-west-1, bucket: my-imports}",
    )?;
    let before = cx.problems.len();
    let mut ami = AmiDistribution {
        region: None,
        bucket: String::new(),
        prefix: None,
        name: NameTemplate::default(),
        description: None,
        ami_tags: Default::default(),
        regions: Vec::new(),
        launch_permission: LaunchPermission::default(),
        boot_mode: None,
        import_method: DEFAULT_IMPORT_METHOD,
        endpoint: AmiEndpoints::default(),
        profile: None,
    };
    let mut bucket = None;
    for (k, v) in entries {
        match k.as_str().unwrap_or_default() {
            "region" => ami.region = region(cx, v, "`region`"),
            "bucket" => bucket = bucket_name(cx, v),
            "prefix" => ami.prefix = cx.optional_string(v, "`prefix`"),
            "name" => {
                if let Some(t) = name_template(cx, v, "`name`") {
                    ami.name = t;
                }
            }
            "description" => ami.description = cx.optional_string(v, "`description`"),
            "amiTags" => ami.ami_tags = string_map(cx, v, "`amiTags`"),
            "regions" => {
                for item in string_list(cx, v, "`regions`") {
                    if let Some(r) = region(cx, item, "a region") {
                        ami.regions.push(r);
                    }
                }
            }
            "launchPermission" => {
                if let Some(lp) = cx.mapping(
                    v,
                    "`launchPermission`",
                    &keys("distribution.ami.launchPermission"),
                ) {
                    for (lk, lv) in lp {
                        match lk.as_str().unwrap_or_default() {
                            "userIds" => {
                                for item in string_list(cx, lv, "`userIds`") {
                                    if let Some(id) = account_id(cx, item) {
                                        ami.launch_permission.user_ids.push(id);
                                    }
                                }
                            }
                            "userGroups" => {
                                for item in string_list(cx, lv, "`userGroups`") {
                                    match cx.string(item, "a user group") {
                                        Some(g) if g == "all" => {
                                            ami.launch_permission.user_groups.push(g)
                                        }
                                        Some(g) => cx.error(
                                            item.span,
                                            format!("unknown user group `{g}`; the only group is `all`"),
                                            Some("`all` makes the AMI public; share with accounts through `userIds`".to_string()),
                                        ),
                                        None => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            "bootMode" if v.as_str() == Some("bios") => cx.error(
                v.span,
                "unknown boot mode `bios`; EC2 calls it `legacy-bios`",
                Some("write `bootMode: legacy-bios` (or `uefi`, `uefi-preferred`)".to_string()),
            ),
            "bootMode" => ami.boot_mode = cx.named(v, "boot mode"),
            "importMethod" => {
                if let Some(m) = cx.named(v, "import method") {
                    ami.import_method = m;
                }
            }
            "endpoint" => {
                if let Some(ep) = cx.mapping(v, "`endpoint`", &keys("distribution.ami.endpoint")) {
                    for (ek, ev) in ep {
                        let which = ek.as_str().unwrap_or_default();
                        let url = endpoint_url(cx, ev, which);
                        match which {
                            "s3" => ami.endpoint.s3 = url,
                            "ec2" => ami.endpoint.ec2 = url,
                            _ => {}
                        }
                    }
                }
            }
            "profile" => ami.profile = cx.optional_string(v, "`profile`"),
            _ => {}
        }
    }
    match bucket {
        Some(b) => ami.bucket = b,
        None if entries.iter().all(|(k, _)| k.as_str() != Some("bucket")) => cx.error(
            key.span,
            "`ami` has no `bucket`",
            Some("add `bucket: my-imports`: the disk is uploaded there for the import".to_string()),
        ),
        None => {}
    }
    (cx.problems.len() == before).then_some(ami)
}

fn string_list<'n>(cx: &mut Reader<'_>, node: &'n Node, what: &str) -> Vec<&'n Node> {
    match node.as_sequence() {
        Some(items) => items.iter().collect(),
        None if node.is_null() => Vec::new(),
        None => {
            let hint = node.as_str().map(|s| format!("write a list: `[{s}]`"));
            cx.error(
                node.span,
                format!("{what} must be a list, found {}", node.describe()),
                hint,
            );
            Vec::new()
        }
    }
}

fn string_map(
    cx: &mut Reader<'_>,
    node: &Node,
    what: &str,
) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    if node.is_null() {
        return out;
    }
    let Some(entries) = node.as_mapping() else {
        cx.not_a(node, what, "a mapping of keys to values");
        return out;
    };
    for (k, v) in entries {
        let Some(key) = cx.string(k, "a tag key") else {
            continue;
        };
        let value = if v.is_null() {
            Some(String::new())
        } else {
            cx.string(v, &format!("tag `{key}`"))
        };
        if let Some(value) = value {
            out.insert(key, value);
        }
    }
    out
}

fn region(cx: &mut Reader<'_>, node: &Node, what: &str) -> Option<String> {
    let text = cx.string(node, what)?;
    let ok = text.split('-').count() >= 3
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && text.ends_with(|c: char| c.is_ascii_digit());
    let message = format!("`{text}` is not a region name");
    accept(
        cx,
        node,
        text,
        ok,
        message,
        "regions look like `eu-west-1` or `us-east-2`",
    )
}

fn bucket_name(cx: &mut Reader<'_>, node: &Node) -> Option<String> {
    let text = cx.string(node, "`bucket`")?;
    if let Some(rest) = text.strip_prefix("s3://") {
        cx.error(
            node.span,
            "write the bucket's name without `s3://`",
            Some(format!(
                "write `bucket: {}` (and a key prefix in `prefix`)",
                rest.split('/').next().unwrap_or(rest)
            )),
        );
        return None;
    }
    let ok = (3..=63).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric());
    let message = format!("`{text}` is not a valid S3 bucket name");
    let hint = "bucket names have 3 to 63 lower-case letters, digits, `.` and `-`";
    accept(cx, node, text, ok, message, hint)
}

fn account_id(cx: &mut Reader<'_>, node: &Node) -> Option<String> {
    // Written unquoted, a 12-digit id is a YAML number: take its text as written.
    let text = cx.string(node, "an account id")?;
    let ok = text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit());
    let message = format!("`{text}` is not an AWS account id (12 digits)");
    accept(
        cx,
        node,
        text,
        ok,
        message,
        "quote ids that start with 0: `\"012345678901\"`",
    )
}

fn endpoint_url(cx: &mut Reader<'_>, node: &Node, which: &str) -> Option<String> {
    let text = cx.string(node, &format!("`endpoint.{which}`"))?;
    let ok = text.starts_with("http://") || text.starts_with("https://");
    let message = format!("`endpoint.{which}` must be an http(s) URL, found `{text}`");
    let hint = format!("write `http://{text}` or `https://{text}`");
    accept(cx, node, text, ok, message, &hint)
}

/// `text` when `ok`; otherwise the error `message` (with `hint`) at `node`, and `None`.
fn accept(
    cx: &mut Reader<'_>,
    node: &Node,
    text: String,
    ok: bool,
    message: String,
    hint: &str,
) -> Option<String> {
    if !ok {
        cx.error(node.span, message, Some(hint.to_string()));
        return None;
    }
    Some(text)
}

/// Where `relative` (as written in the recipe) is, given the recipe's path.
pub fn resolve_relative(recipe_path: &Path, relative: &str) -> PathBuf {
    let base = recipe_path.parent().unwrap_or(Path::new(""));
    base.join(relative)
}
