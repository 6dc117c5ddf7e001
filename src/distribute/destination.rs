//! Targets as the user names them, and the dispatcher that runs one.
//!
//! A [`Destination`] comes from the command line (`--to oci://host:5000/repo:tag`, `--to
//! vagrant:./out/web.box`, …; see [`Destination::parse`]) or from a recipe's `distribution:` entry
//! ([`Destination::from_recipe`], paths resolved against the recipe's folder). Names and tags
//! may hold name-template placeholders; they are rendered for one stored build by
//! [`distribute`], with that build's name, version, number and date.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::directory::{self, DirectoryOptions, VagrantOptions};
use super::{DistributeError, Progress, Receipt, StoredImage};
use crate::recipe::model::ArchiveFormat;
use crate::recipe::{self, Distribution, Format, NameTemplate, NameValues};
use crate::store::ImageKind;

/// The CLI forms, for messages.
pub const CLI_FORMS: &str = "`oci://REGISTRY/REPO:TAG`, `containerdisk://REGISTRY/REPO:TAG`, `ami`, `vagrant:PATH.box`, `dir:PATH` or `store`";

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("`{text}` is not a distribution target")]
    Unknown {
        text: String,
        /// A close spelling, if there is one.
        suggestion: Option<String>,
    },
    #[error("`{text}`: {reason}")]
    Bad { text: String, reason: String },
    #[error("`--to ami` needs `--bucket`: the disk is uploaded there for the import")]
    NoBucket,
    #[error("the {kind} target is not available in this build of builder")]
    NotAvailable { kind: &'static str },
    #[error("sending to the {kind} target was stopped")]
    Cancelled { kind: &'static str },
    #[error("{image} is a container build: the {kind} target takes machine builds only")]
    NotForContainers { image: String, kind: &'static str },
    #[error("{image} is a {kind} build: {detail}")]
    WrongFormats {
        image: String,
        kind: ImageKind,
        detail: String,
    },
}

impl DestinationError {
    pub fn hint(&self) -> Option<String> {
        match self {
            DestinationError::Unknown {
                suggestion: Some(s),
                ..
            } => Some(format!("did you mean `{s}`?")),
            DestinationError::Unknown { .. } | DestinationError::Bad { .. } => {
                Some(format!("targets are {CLI_FORMS}"))
            }
            DestinationError::NotForContainers { .. } => Some(
                "a container build goes to `oci://REGISTRY/REPO:TAG` or `dir:PATH` (as an \
                 oci-archive or docker-archive file)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// Where an image goes. Names are name templates (as written), rendered per build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Destination {
    /// A copy of the outputs in `<path>/<name>/` (a container build's: archive files).
    #[serde(rename_all = "camelCase")]
    Directory {
        path: PathBuf,
        name: String,
        /// Empty: every output of the build.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        formats: Vec<Format>,
        /// A container build's files; empty: an `oci-archive`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        archives: Vec<ArchiveFormat>,
        #[serde(default)]
        overwrite: bool,
    },
    /// A Vagrant box (libvirt provider) at `path`, or `<path>/<name>.box` when `folder`.
    #[serde(rename_all = "camelCase")]
    Vagrant {
        path: PathBuf,
        #[serde(default)]
        folder: bool,
        name: String,
        #[serde(default)]
        overwrite: bool,
    },
    /// An OCI artifact; the reference's tag may be a template.
    #[serde(rename_all = "camelCase")]
    Oci {
        reference: String,
        #[serde(default)]
        plain_http: bool,
    },
    /// A KubeVirt containerDisk.
    #[serde(rename_all = "camelCase")]
    ContainerDisk {
        reference: String,
        #[serde(default)]
        plain_http: bool,
    },
    /// An AMI.
    Ami(Box<AmiDestination>),
    /// The local store (where every build already is).
    Store,
}

/// The AMI settings as written (name is a template), before credentials are looked up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AmiDestination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Name template; empty: the default output name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy_to_regions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub launch_permission_user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub launch_permission_groups: Vec<String>,
    /// `legacy-bios`, `uefi`, `uefi-preferred`; none: from the build's firmware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_mode: Option<String>,
    /// `snapshot` (default) or `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// Options of `builder distribute` that shape targets named with `--to`.
#[derive(Debug, Clone, Default)]
pub struct CliOptions {
    /// `--name`: the folder, box or AMI name template.
    pub name: Option<String>,
    /// `--format`: for `dir:` targets.
    pub formats: Vec<Format>,
    /// `--format oci-archive|docker-archive`: for `dir:` targets of container builds.
    pub archives: Vec<ArchiveFormat>,
    /// `--overwrite`: for `dir:` and `vagrant:` targets.
    pub overwrite: bool,
    /// `--plain-http HOST`: registries spoken to over plain HTTP.
    pub plain_http: Vec<String>,
    /// `--region`, `--bucket`, `--prefix`, `--endpoint` (both S3 and EC2), `--profile`, …
    pub ami: AmiDestination,
}

impl Destination {
    /// The kind as in receipts: `directory`, `vagrant`, `oci`, `containerdisk`, `ami`, `store`.
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Directory { .. } => "directory",
            Destination::Vagrant { .. } => "vagrant",
            Destination::Oci { .. } => "oci",
            Destination::ContainerDisk { .. } => "containerdisk",
            Destination::Ami(_) => "ami",
            Destination::Store => "store",
        }
    }

    /// Parse the command-line form of a target: `oci://host:5000/repo:tag`,
    /// `containerdisk://…`, `ami`, `vagrant:PATH`, `dir:PATH`, `store`. `options` fills in
    /// what the form does not say.
    pub fn parse(text: &str, options: &CliOptions) -> Result<Destination, DestinationError> {
        let bad = |reason: &str| DestinationError::Bad {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let name = options
            .name
            .clone()
            .unwrap_or_else(|| recipe::name_template::DEFAULT_NAME_TEMPLATE.to_string());
        if let Some(errors) = options
            .name
            .as_deref()
            .and_then(|n| NameTemplate::parse(n).err())
        {
            let first = errors.into_iter().next().map(|e| e.message);
            return Err(DestinationError::Bad {
                text: options.name.clone().unwrap_or_default(),
                reason: first.unwrap_or_else(|| "not a valid name template".into()),
            });
        }
        if let Some(rest) = text.strip_prefix("oci://") {
            let reference = check_reference(text, rest)?;
            return Ok(Destination::Oci {
                plain_http: plain_http_for(&reference, &options.plain_http),
                reference,
            });
        }
        if let Some(rest) = text.strip_prefix("containerdisk://") {
            let reference = check_reference(text, rest)?;
            return Ok(Destination::ContainerDisk {
                plain_http: plain_http_for(&reference, &options.plain_http),
                reference,
            });
        }
        if let Some(rest) = text.strip_prefix("vagrant:") {
            if rest.is_empty() {
                return Err(bad("name the box file: `vagrant:./out/web.box`"));
            }
            return Ok(Destination::Vagrant {
                folder: rest.ends_with('/') || Path::new(rest).is_dir(),
                path: absolute(Path::new(rest)),
                name,
                overwrite: options.overwrite,
            });
        }
        if let Some(rest) = text
            .strip_prefix("dir:")
            .or_else(|| text.strip_prefix("directory:"))
        {
            if rest.is_empty() {
                return Err(bad("name the folder: `dir:/srv/images/`"));
            }
            return Ok(Destination::Directory {
                path: absolute(Path::new(rest)),
                name,
                formats: options.formats.clone(),
                archives: options.archives.clone(),
                overwrite: options.overwrite,
            });
        }
        match text {
            "store" => return Ok(Destination::Store),
            "ami" => {
                if options.ami.bucket.is_empty() {
                    return Err(DestinationError::NoBucket);
                }
                let mut ami = options.ami.clone();
                if let Some(n) = &options.name {
                    ami.name = n.clone();
                }
                return Ok(Destination::Ami(Box::new(ami)));
            }
            _ => {}
        }
        if text.starts_with("ami:") || text.starts_with("ami://") {
            return Err(bad(
                "write `--to ami` and give the region and bucket with `--region` and `--bucket`",
            ));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(DestinationError::Unknown {
                text: text.to_string(),
                suggestion: crate::diagnostic::did_you_mean(scheme, ["oci", "containerdisk"])
                    .map(|s| format!("{s}://…")),
            });
        }
        let head = text.split(':').next().unwrap_or(text);
        Err(DestinationError::Unknown {
            text: text.to_string(),
            suggestion: closest(
                head,
                &["oci", "containerdisk", "ami", "vagrant", "dir", "store"],
            )
            .map(|s| match s {
                "ami" | "store" => s.to_string(),
                "oci" | "containerdisk" => format!("{s}://…"),
                _ => format!("{s}:…"),
            }),
        })
    }

    /// A recipe's distribution entry, with relative paths resolved against the recipe's
    /// folder (`recipe_path` is the recipe file).
    pub fn from_recipe(entry: &Distribution, recipe_path: &Path) -> Destination {
        let resolve = |p: &str| absolute(&recipe::resolve_relative(recipe_path, p));
        match entry {
            Distribution::Directory(d) => Destination::Directory {
                path: resolve(&d.path.value),
                name: d.name.as_str().to_string(),
                formats: d.formats.disk().to_vec(),
                // Empty for a machine recipe's entry (the default for a container build is
                // applied when it is written: `oci-archive`).
                archives: match &d.formats {
                    recipe::model::DirectoryFormats::Container(archives) => archives.clone(),
                    recipe::model::DirectoryFormats::Disk(_) => Vec::new(),
                },
                overwrite: d.overwrite,
            },
            Distribution::Vagrant(v) => Destination::Vagrant {
                folder: v.path.value.ends_with('/'),
                path: resolve(&v.path.value),
                name: v.name.as_str().to_string(),
                overwrite: v.overwrite,
            },
            Distribution::Oci(o) => Destination::Oci {
                reference: o.reference.value.clone(),
                plain_http: o.plain_http,
            },
            Distribution::ContainerDisk(o) => Destination::ContainerDisk {
                reference: o.reference.value.clone(),
                plain_http: o.plain_http,
            },
            Distribution::Ami(a) => Destination::Ami(Box::new(AmiDestination {
                region: a.region.clone(),
                bucket: a.bucket.clone(),
                prefix: a.prefix.clone(),
                name: a.name.as_str().to_string(),
                description: a.description.clone(),
                tags: a.ami_tags.clone(),
                copy_to_regions: a.regions.clone(),
                launch_permission_user_ids: a.launch_permission.user_ids.clone(),
                launch_permission_groups: a.launch_permission.user_groups.clone(),
                boot_mode: a.boot_mode.map(|b| b.name().to_string()),
                import_method: Some(a.import_method.name().to_string()),
                s3_endpoint: a.endpoint.s3.clone(),
                ec2_endpoint: a.endpoint.ec2.clone(),
                profile: a.profile.clone(),
            })),
        }
    }

    /// Where this target puts `image`, in words (for messages before it runs).
    pub fn describe(&self, image: &StoredImage) -> String {
        match self {
            Destination::Directory { .. } => self
                .directory_options(image)
                .map(|o| format!("directory {}", o.destination().display()))
                .unwrap_or_else(|_| "directory".into()),
            Destination::Vagrant { .. } => self
                .vagrant_options(image)
                .map(|o| format!("vagrant box {}", o.path.display()))
                .unwrap_or_else(|_| "vagrant box".into()),
            Destination::Oci { reference, .. } => {
                format!("oci://{}", render_reference(reference, image))
            }
            Destination::ContainerDisk { reference, .. } => {
                format!("containerdisk://{}", render_reference(reference, image))
            }
            Destination::Ami(a) => format!(
                "ami {} (bucket {})",
                a.region.as_deref().unwrap_or("default region"),
                a.bucket
            ),
            Destination::Store => "the local store".into(),
        }
    }

    fn directory_options(&self, image: &StoredImage) -> Result<DirectoryOptions, DestinationError> {
        match self {
            Destination::Directory {
                path,
                name,
                formats,
                archives,
                overwrite,
            } => Ok(DirectoryOptions {
                path: path.clone(),
                name: render(name, image),
                formats: formats.clone(),
                archives: archives.clone(),
                overwrite: *overwrite,
            }),
            _ => Err(DestinationError::NotAvailable { kind: self.kind() }),
        }
    }

    fn vagrant_options(&self, image: &StoredImage) -> Result<VagrantOptions, DestinationError> {
        match self {
            Destination::Vagrant {
                path,
                folder,
                name,
                overwrite,
            } => Ok(VagrantOptions {
                path: if *folder {
                    path.join(format!("{}.box", render(name, image)))
                } else {
                    path.clone()
                },
                overwrite: *overwrite,
            }),
            _ => Err(DestinationError::NotAvailable { kind: self.kind() }),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Directory { path, .. } => write!(f, "dir:{}", path.display()),
            Destination::Vagrant { path, .. } => write!(f, "vagrant:{}", path.display()),
            Destination::Oci { reference, .. } => write!(f, "oci://{reference}"),
            Destination::ContainerDisk { reference, .. } => {
                write!(f, "containerdisk://{reference}")
            }
            Destination::Ami(a) => write!(f, "ami (bucket {})", a.bucket),
            Destination::Store => f.write_str("store"),
        }
    }
}

/// The likely meant kind: the usual typo rule, and for short words (`dri`) one edit or swap.
fn closest(word: &str, kinds: &[&'static str]) -> Option<&'static str> {
    crate::diagnostic::did_you_mean(word, kinds.iter().copied()).or_else(|| {
        kinds
            .iter()
            .copied()
            .find(|k| strsim::damerau_levenshtein(&word.to_lowercase(), k) <= 1)
    })
}

fn absolute(path: &Path) -> PathBuf {
    directory::absolute(path)
}

/// `registry/repo[:tag]` checked the way a recipe's reference is.
fn check_reference(text: &str, rest: &str) -> Result<String, DestinationError> {
    let bad = |reason: String| DestinationError::Bad {
        text: text.to_string(),
        reason,
    };
    if rest.contains('@') {
        return Err(bad(
            "a push writes a tag, not a digest; the digest is in the receipt".into(),
        ));
    }
    let Some((slash, tag)) = recipe::split_oci_reference(rest) else {
        return Err(bad(
            "name the registry and the repository: `oci://127.0.0.1:5000/images/web:1.0.0`".into(),
        ));
    };
    if slash == 0 {
        return Err(bad("the registry's host is missing".into()));
    }
    if let Some(t) = tag
        && let Err(errors) = NameTemplate::parse(&rest[t..])
    {
        let message = errors
            .into_iter()
            .next()
            .map(|e| e.message)
            .unwrap_or_default();
        return Err(bad(format!("the tag is not valid: {message}")));
    }
    let repository = &rest[slash + 1..tag.map(|t| t - 1).unwrap_or(rest.len())];
    if repository.is_empty() || repository.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(bad(format!(
            "`{repository}` is not a repository name (lower-case letters, digits, `.`, `_`, `-`, `/`)"
        )));
    }
    Ok(rest.to_string())
}

fn plain_http_for(reference: &str, hosts: &[String]) -> bool {
    let registry = reference.split('/').next().unwrap_or_default();
    hosts
        .iter()
        .any(|h| h == registry || registry.split(':').next() == Some(h.as_str()))
}

/// What name templates are rendered with for `image`.
pub fn name_values(image: &StoredImage) -> NameValues<'_> {
    NameValues {
        name: &image.name,
        version: image.version,
        build_version: image.build,
        build_date: image.manifest.created,
    }
}

/// A name template rendered for `image` (a template that does not parse is used as written:
/// every template here was validated when it was read).
pub fn render(template: &str, image: &StoredImage) -> String {
    match NameTemplate::parse(template) {
        Ok(t) => t.render(&name_values(image)),
        Err(_) => template.to_string(),
    }
}

/// `registry/repo:tag` with the tag rendered (the default tag when there is none).
pub fn render_reference(reference: &str, image: &StoredImage) -> String {
    match recipe::split_oci_reference(reference) {
        Some((_, Some(tag))) => {
            format!("{}{}", &reference[..tag], render(&reference[tag..], image))
        }
        _ => format!("{reference}:{}", render(recipe::DEFAULT_OCI_TAG, image)),
    }
}

/// Check what can be checked before anything is written or uploaded: destinations are free,
/// names are file names, references parse, credentials and buckets answer. Returns warnings
/// (problems that do not stop the target, e.g. a role that could not be checked).
pub async fn preflight(
    image: &StoredImage,
    target: &Destination,
) -> Result<Vec<String>, DistributeError> {
    check_kind(image, target)?;
    match target {
        Destination::Directory { .. } => {
            directory::preflight_directory(&target.directory_options(image)?)?;
        }
        Destination::Vagrant { .. } => {
            directory::preflight_vagrant(&target.vagrant_options(image)?)?;
        }
        Destination::Store => {}
        Destination::Oci { .. } | Destination::ContainerDisk { .. } => {
            oci_dispatch::destination(image, target)?;
        }
        Destination::Ami(ami) => {
            let options = aws_dispatch::options(image, ami, None)?;
            return Ok(super::aws::preflight(&options).await?);
        }
    }
    Ok(Vec::new())
}

/// Send `image` to `target`.
pub async fn distribute(
    image: &StoredImage,
    target: &Destination,
    progress: &dyn Progress,
) -> Result<Receipt, DistributeError> {
    distribute_cancellable(image, target, progress, &CancellationToken::new()).await
}

/// [`distribute`], stopping cleanly when `cancel` fires: local copies stop at the next chunk
/// and remove what they wrote; an AMI upload is aborted and an import task cancelled (which
/// takes a few requests: keep polling the future after cancelling). A push stops where it
/// is; its tag is only written last, so nothing half-pushed is tagged.
pub async fn distribute_cancellable(
    image: &StoredImage,
    target: &Destination,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<Receipt, DistributeError> {
    let cancelled = || DestinationError::Cancelled {
        kind: target.kind(),
    };
    check_kind(image, target)?;
    match target {
        Destination::Directory { .. } => {
            let options = target.directory_options(image)?;
            tokio::select! {
                r = directory::to_directory(image, &options, progress) => Ok(r?),
                () = cancel.cancelled() => Err(cancelled().into()),
            }
        }
        Destination::Vagrant { .. } => {
            let options = target.vagrant_options(image)?;
            tokio::select! {
                r = directory::to_vagrant(image, &options, progress) => Ok(r?),
                () = cancel.cancelled() => Err(cancelled().into()),
            }
        }
        Destination::Store => Ok(directory::to_store(image)),
        Destination::Oci { plain_http, .. } | Destination::ContainerDisk { plain_http, .. } => {
            let (dest, shape) = oci_dispatch::destination(image, target)?;
            let mut options = super::oci::OciOptions::from_env();
            if *plain_http && !options.plain_http.contains(&dest.registry) {
                options.plain_http.push(dest.registry.clone());
            }
            if image.kind() == ImageKind::Container {
                return tokio::select! {
                    r = super::oci::push_container(image, &dest, &options, progress) => Ok(r?),
                    () = cancel.cancelled() => Err(cancelled().into()),
                };
            }
            tokio::select! {
                r = super::oci::push(image, &dest, shape, &options, progress) => Ok(r?),
                () = cancel.cancelled() => Err(cancelled().into()),
            }
        }
        Destination::Ami(ami) => {
            let options = aws_dispatch::options(image, ami, Some(cancel.clone()))?;
            Ok(super::aws::import_ami(image, &options, progress).await?)
        }
    }
}

/// Whether `target` takes `image`'s kind: a container build goes to `oci`, `directory` (as
/// archive files) and `store`; a directory target's formats must be of the build's kind.
fn check_kind(image: &StoredImage, target: &Destination) -> Result<(), DestinationError> {
    let kind = image.kind();
    let wrong = |detail: String| DestinationError::WrongFormats {
        image: image.reference(),
        kind,
        detail,
    };
    match (kind, target) {
        (
            ImageKind::Container,
            Destination::Vagrant { .. } | Destination::ContainerDisk { .. } | Destination::Ami(_),
        ) => Err(DestinationError::NotForContainers {
            image: image.reference(),
            kind: target.kind(),
        }),
        (ImageKind::Container, Destination::Directory { formats, .. }) if !formats.is_empty() => {
            Err(wrong(format!(
                "its image is written as {} files, not as {}",
                crate::diagnostic::one_of(ArchiveFormat::NAMES),
                formats
                    .iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
        (ImageKind::Machine, Destination::Directory { archives, .. }) if !archives.is_empty() => {
            Err(wrong(format!(
                "{} files are made of container builds only",
                archives
                    .iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
        _ => Ok(()),
    }
}

/// The OCI targets, through `super::oci`.
mod oci_dispatch {
    use super::*;
    use crate::distribute::oci::OciShape;
    use crate::recipe::OciReference;

    /// Where the push goes (the tag rendered for `image`) and in which shape.
    pub fn destination(
        image: &StoredImage,
        target: &Destination,
    ) -> Result<(OciReference, OciShape), DestinationError> {
        let (reference, shape) = match target {
            Destination::Oci { reference, .. } => (reference, OciShape::Artifact),
            Destination::ContainerDisk { reference, .. } => (reference, OciShape::ContainerDisk),
            _ => {
                return Err(DestinationError::NotAvailable {
                    kind: target.kind(),
                });
            }
        };
        let rendered = render_reference(reference, image);
        let dest = rendered
            .parse::<OciReference>()
            .map_err(|e| DestinationError::Bad {
                text: rendered.clone(),
                reason: e.to_string(),
            })?;
        Ok((dest, shape))
    }
}

/// The AMI target, through `super::aws`.
mod aws_dispatch {
    use super::*;
    use crate::distribute::aws::AmiOptions;
    use crate::recipe::ImportMethod;

    /// The import's options for `image`: the name rendered, the description defaulted.
    pub fn options(
        image: &StoredImage,
        ami: &AmiDestination,
        cancel: Option<CancellationToken>,
    ) -> Result<AmiOptions, DestinationError> {
        let template = if ami.name.is_empty() {
            recipe::name_template::DEFAULT_NAME_TEMPLATE
        } else {
            &ami.name
        };
        let mut o = AmiOptions::new(ami.bucket.clone(), render(template, image));
        o.region = ami.region.clone();
        o.prefix = ami.prefix.clone();
        o.description = ami
            .description
            .clone()
            .or_else(|| Some(format!("{} built by builder", image.reference())));
        o.tags = ami.tags.clone();
        o.copy_to_regions = ami.copy_to_regions.clone();
        o.launch_permission_user_ids = ami.launch_permission_user_ids.clone();
        o.launch_permission_groups = ami.launch_permission_groups.clone();
        o.boot_mode = ami.boot_mode.clone();
        if let Some(m) = &ami.import_method {
            o.import_method = ImportMethod::parse_named("import method", m).map_err(|reason| {
                DestinationError::Bad {
                    text: m.clone(),
                    reason,
                }
            })?;
        }
        o.s3_endpoint = ami.s3_endpoint.clone();
        o.ec2_endpoint = ami.ec2_endpoint.clone();
        o.profile = ami.profile.clone();
        o.cancel = cancel;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Destination, DestinationError> {
        Destination::parse(text, &CliOptions::default())
    }

    #[test]
    fn every_cli_form_parses() {
        assert!(matches!(
            parse("oci://127.0.0.1:5000/images/web:1.2.0"),
            Ok(Destination::Oci { ref reference, plain_http: false }) if reference == "127.0.0.1:5000/images/web:1.2.0"
        ));
        let options = CliOptions {
            plain_http: vec!["127.0.0.1".into()],
            ..CliOptions::default()
        };
        assert!(matches!(
            Destination::parse("containerdisk://127.0.0.1:5000/vms/web", &options),
            Ok(Destination::ContainerDisk {
                plain_http: true,
                ..
            })
        ));
        assert!(matches!(
            parse("vagrant:./out/web.box"),
            Ok(Destination::Vagrant { folder: false, .. })
        ));
        assert!(matches!(
            parse("vagrant:./out/"),
            Ok(Destination::Vagrant { folder: true, .. })
        ));
        assert!(matches!(
            parse("dir:/srv/images/"),
            Ok(Destination::Directory { .. })
        ));
        assert_eq!(parse("store").ok(), Some(Destination::Store));
        assert!(matches!(parse("ami"), Err(DestinationError::NoBucket)));
        let options = CliOptions {
            ami: AmiDestination {
                bucket: "b-1".into(),
                ..AmiDestination::default()
            },
            ..CliOptions::default()
        };
        assert!(matches!(
            Destination::parse("ami", &options),
            Ok(Destination::Ami(_))
        ));
    }

    #[test]
    fn mistakes_are_named_with_a_suggestion() {
        let e = parse("ocj://x:5000/a:b").expect_err("scheme");
        assert_eq!(e.hint().as_deref(), Some("did you mean `oci://…`?"));
        let e = parse("vagrnt:./x.box").expect_err("typo");
        assert_eq!(e.hint().as_deref(), Some("did you mean `vagrant:…`?"));
        let e = parse("dri:./out").expect_err("swapped letters");
        assert_eq!(e.hint().as_deref(), Some("did you mean `dir:…`?"));
        let e = parse("oci://web:1.0").expect_err("no registry");
        assert!(e.to_string().contains("registry"), "{e}");
        let e = parse("oci://h:5000/Web:1").expect_err("upper case");
        assert!(e.to_string().contains("`Web`"), "{e}");
        let e = parse("oci://h:5000/web@sha256:abcd").expect_err("digest");
        assert!(e.to_string().contains("digest"), "{e}");
        let e = parse("dir:").expect_err("empty");
        assert!(e.to_string().contains("folder"), "{e}");
        let e = parse("ami:eu-west-1").expect_err("ami form");
        assert!(e.to_string().contains("--region"), "{e}");
    }
}
