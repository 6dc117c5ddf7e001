//! The plan of one build: the recipe with every input resolved and pinned by sha256. Same
//! inputs, same plan ([`Plan::digest`]).
//!
//! Two steps, both before any VM starts:
//! - [`validate`] reads the recipe and every file it names (infrastructure file, component
//!   documents) and checks them together: each component document is valid, the parameters
//!   passed are declared and the required ones given, a local parent image exists. Every
//!   problem of every file is collected. This is `builder validate`.
//! - [`plan`] resolves what validation does not touch: hashes a local parent image (streamed,
//!   with progress) and checks it against a pinned digest, resolves a store reference through a
//!   [`ParentResolver`], checks `diskSize` against the parent's virtual size, and computes the
//!   layer key of each component. A URL parent is recorded; the build downloads it.
//!
//! This module reads files; it never starts a process.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256 as Hasher};

use crate::component::document::Document;
use crate::component::executor::{self, bind_parameters};
use crate::diagnostic::{Diagnostics, Problem, Span, close_file_hint};
use crate::digest::Hashed;
use crate::recipe::{
    self, ByteSize, ComponentUse, Compression, Format, Infrastructure, Located, ParentImage,
    Recipe, Sha256, Version, VersionPattern,
};
use crate::store::layers::LayerInputs;

/// Bumped when the plan's JSON changes meaning; part of every digest and layer key.
pub const PLAN_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The recipe file itself cannot be read (exit 2: the user named a file that is not there).
    /// The io error names the file.
    #[error("could not read the recipe")]
    Unreadable(#[source] std::io::Error),
    /// Invalid input: the diagnostics of each file with problems, the recipe's first.
    #[error("{}", recipe::render(.0))]
    Invalid(Vec<Diagnostics>),
    /// Reading an input failed part-way (a host problem, exit 3); fs-err's error names the
    /// file and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A component document changed after the plan was made.
    #[error(
        "component document `{path}` changed since the plan was made (sha256 {actual}, planned {planned})"
    )]
    Changed {
        path: PathBuf,
        planned: Sha256,
        actual: Sha256,
    },
    /// A path the plan records is not UTF-8 (the recipe's folder, the store's, the working
    /// folder's): a plan travels as JSON (its digest, `builder plan --json`, the manifest, a
    /// pipeline's settings), whose strings are UTF-8.
    #[error(
        "the plan of `{}` would name a path that is not UTF-8, which a plan (written as JSON) cannot hold; use folders whose names are UTF-8",
        recipe.display()
    )]
    NotUtf8 { recipe: PathBuf },
    /// The store could not be asked (a host problem).
    #[error("could not look up `{reference}` in the image store")]
    Store {
        reference: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The registry of a tag-only `parentImage: oci://…` could not say what the tag points to
    /// (unreachable, refused the credential, failed): a host problem (exit 3). A tag the
    /// registry does not hold is a problem of the recipe instead ([`PlanError::Invalid`]).
    #[error("`parentImage` at {location}: cannot resolve the tag of `oci://{reference}`: {cause}")]
    Registry {
        /// Without `oci://`.
        reference: String,
        /// `recipe.yml:3:14`.
        location: String,
        cause: Box<crate::distribute::oci::OciError>,
    },
}

impl PlanError {
    /// What the user can do about it, when the error has advice beyond its message.
    pub fn hint(&self) -> Option<String> {
        match self {
            PlanError::Registry { cause, .. } => cause.hint(),
            _ => None,
        }
    }
}

/// A recipe and everything it names, read and checked together.
#[derive(Debug, Clone)]
pub struct Validated {
    pub recipe: Recipe,
    /// The recipe's components, in order.
    pub components: Vec<LoadedComponent>,
    /// `tests.components`, in order.
    pub test_components: Vec<LoadedComponent>,
    /// Warnings of files that are valid (show them; they do not stop anything).
    pub warnings: Vec<Diagnostics>,
}

/// A component entry with its document read and its parameters bound.
#[derive(Debug, Clone)]
pub struct LoadedComponent {
    pub usage: ComponentUse,
    /// The document's path (the recipe's directory joined with `usage.path`).
    pub path: PathBuf,
    pub document: Document,
    pub sha256: Sha256,
    /// Every declared parameter with its value: from the recipe, else the document's default.
    pub parameters: BTreeMap<String, String>,
    /// The documents it runs through `ExecuteDocument`, at any depth (see [`ReachedDocument`]).
    pub documents: Vec<ReachedDocument>,
}

/// Read the recipe at `path` and every file it names, and check them all. Environment
/// variables in a parent image path are read with `env` (`std::env::var` in the CLI).
pub fn validate(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Validated, PlanError> {
    let text = fs_err::read_to_string(path).map_err(PlanError::Unreadable)?;
    let checked = recipe::check_file(path, &text);
    let mut files = checked.diagnostics;
    let mut recipe_problems = Vec::new();

    let mut load_all = |uses: &[ComponentUse], test: bool, files: &mut Vec<Diagnostics>| {
        uses.iter()
            .filter_map(|usage| read_component(path, usage, test, &mut recipe_problems, files))
            .collect::<Vec<_>>()
    };
    let components = load_all(&checked.components, false, &mut files);
    let test_components = load_all(&checked.test_components, true, &mut files);

    if let Some(parent) = &checked.parent
        && let ParentImage::File { path: written, .. } = &parent.value
        && let Some(local) = local_parent(path, written, parent.span, env, &mut recipe_problems)
    {
        match fs_err::metadata(&local) {
            Ok(m) if m.is_file() => {}
            Ok(_) => recipe_problems.push(Problem::error(
                parent.span,
                format!("parent image `{}` is not a file", local.display()),
            )),
            Err(e) => recipe_problems.push(
                Problem::error(
                    parent.span,
                    format!(
                        "parent image `{}` cannot be read: {}",
                        local.display(),
                        io_reason(&e)
                    ),
                )
                .with_hint_opt(close_file_hint(&local)),
            ),
        }
    }

    files[0].extend(recipe_problems);
    files[0].sort();
    if files.iter().any(Diagnostics::has_errors) {
        files.retain(|d| !d.is_empty());
        return Err(PlanError::Invalid(files));
    }
    // Every part that fails reports a problem, so this is not expected; but a missed case
    // must be a message, not a panic.
    let Some(recipe) = checked.recipe else {
        files[0].push(Problem::error(
            Span::from_offsets(&text, 0, 0),
            "the recipe could not be read, although no problem was found in it",
        ));
        return Err(PlanError::Invalid(files));
    };
    files.retain(|d| !d.is_empty());
    Ok(Validated {
        recipe,
        components,
        test_components,
        warnings: files,
    })
}

/// Where `written` (a parent path from the recipe, with `${VAR}`) is on this machine.
fn local_parent(
    recipe_path: &Path,
    written: &str,
    span: Span,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) -> Option<PathBuf> {
    let mut out = String::new();
    let mut rest = written;
    let mut ok = true;
    while let Some(open) = rest.find("${") {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map(|i| i + open)?;
        let name = &rest[open + 2..close];
        match env(name).filter(|v| !v.is_empty()) {
            Some(value) => out.push_str(&value),
            None => {
                problems.push(
                    Problem::error(span, format!("environment variable `{name}` is not set"))
                        .with_hint(format!(
                            "`parentImage` uses `${{{name}}}`: set it to the parent image's path, e.g. `{name}=fixtures/cache/debian-12-cloud-init.qcow2`"
                        )),
                );
                ok = false;
            }
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    if !ok {
        return None;
    }
    // A path that starts with a variable means the variable's value: a relative value is
    // relative to where builder runs, as it was when the user typed it. Every other relative
    // path is relative to the recipe's directory.
    let expanded = PathBuf::from(&out);
    Some(if written.starts_with("${") && expanded.is_relative() {
        absolute(&expanded)
    } else {
        recipe::resolve_relative(recipe_path, &out)
    })
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

fn read_component(
    recipe_path: &Path,
    usage: &ComponentUse,
    test: bool,
    recipe_problems: &mut Vec<Problem>,
    files: &mut Vec<Diagnostics>,
) -> Option<LoadedComponent> {
    let path = recipe::resolve_relative(recipe_path, &usage.path.value);
    let text = match fs_err::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            let hint = close_file_hint(&path)
                .unwrap_or_else(|| "the path is relative to the recipe's directory".to_string());
            recipe_problems.push(
                Problem::error(
                    usage.path.span,
                    format!(
                        "component document `{}` cannot be read: {}",
                        path.display(),
                        io_reason(&e)
                    ),
                )
                .with_hint(hint),
            );
            return None;
        }
    };
    let checked = crate::component::parse::check(&path, &text);
    let diagnostics = checked.diagnostics.with_consequence(recipe::CONSEQUENCE);
    let document = checked.document;
    // A document used twice (as a build and a test component) is reported once.
    if !files.iter().any(|d| d.path() == diagnostics.path()) {
        files.push(diagnostics);
    }
    let document = document?;
    let (parameters, problems) = recipe::bind_parameters(usage, &document, &path, &text);
    recipe_problems.extend(problems);
    let phase_problem = if test {
        recipe::check_test_component(usage, &document, &path)
    } else {
        recipe::check_build_component(usage, &document, &path)
    };
    recipe_problems.extend(phase_problem);
    // What runs of it: build components run every standard phase (test in the test VM), test
    // components their `test` phase.
    let runs: &[&str] = if test {
        &["test"]
    } else {
        &["build", "validate", "test"]
    };
    recipe_problems.extend(recipe::check_linux_actions(usage, &document, &path, runs));
    let mut reach = Reach {
        files,
        found: Vec::new(),
    };
    let overrides: Vec<(String, String)> = parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Binding problems were reported just above, against the recipe.
    if let Ok(variables) = bind_parameters(&document, "", &overrides, executor::Given::CommandLine)
    {
        let runs: Vec<String> = runs.iter().map(|r| r.to_string()).collect();
        let shown = PathBuf::from(&usage.path.value);
        reach.walk(
            &document,
            &shown,
            &variables,
            Some(&runs),
            &mut vec![executor::canonical(&path)],
        );
    }
    Some(LoadedComponent {
        usage: usage.clone(),
        path,
        sha256: Sha256::from_digest(&Hasher::digest(text.as_bytes())),
        document,
        parameters,
        documents: reach.found,
    })
}

/// A document a component runs through `ExecuteDocument` (directly or from a document that
/// is itself run so), pinned like the component's own document: editing it changes the plan,
/// the component's layer key, the manifest's inputs and a pipeline's `dependencyChanged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReachedDocument {
    /// Relative to the recipe's directory: the calling document's folder joined with the path
    /// it writes (`components/lib/common.yml`).
    pub path: String,
    pub local_path: PathBuf,
    pub sha256: Sha256,
}

impl ReachedDocument {
    /// How the manifest's inputs (and a pipeline's recorded inputs) name this document.
    pub fn input(&self) -> crate::store::manifest::DocumentInput {
        crate::store::manifest::DocumentInput {
            path: self.path.clone(),
            sha256: self.sha256.to_string(),
        }
    }
}

/// Follows `ExecuteDocument` steps from a component's document, as the executor will: the
/// `document` input is resolved relative to the calling document, with the parameters and
/// constants it will see. A path known only while the build runs (a loop value, a step's
/// output) cannot be pinned and is a problem, as are documents that cannot be read, are
/// invalid, nest too deep or call each other in a cycle.
struct Reach<'a> {
    files: &'a mut Vec<Diagnostics>,
    found: Vec<ReachedDocument>,
}

impl Reach<'_> {
    /// The ExecuteDocument steps of `document`'s phases that run (`phases`; all when `None`).
    /// `shown` is the document's path relative to the recipe's directory; `ancestry` the
    /// canonical paths from the component's document down to this one.
    fn walk(
        &mut self,
        document: &Document,
        shown: &Path,
        variables: &std::collections::HashMap<String, String>,
        phases: Option<&[String]>,
        ancestry: &mut Vec<PathBuf>,
    ) {
        let steps = document
            .phases
            .iter()
            .filter(|p| phases.is_none_or(|names| names.contains(&p.name)))
            .flat_map(|p| p.steps.iter())
            .filter(|s| s.action == crate::component::document::Action::ExecuteDocument);
        for step in steps {
            self.step(document, shown, variables, step, ancestry);
        }
    }

    fn step(
        &mut self,
        document: &Document,
        shown: &Path,
        variables: &std::collections::HashMap<String, String>,
        step: &crate::component::document::Step,
        ancestry: &mut Vec<PathBuf>,
    ) {
        let calling = &document.source.path;
        let scope = PlanScope(variables);
        let input = |key: &str| step.inputs.get(key).and_then(serde_json::Value::as_str);
        let Some(written) = input("document") else {
            return; // the document's own validation requires it
        };
        let problem = |message: String| Problem::error(step.span, message);
        let written = match crate::component::template::expand(written, &scope) {
            Ok(w) => w,
            Err(reason) => {
                return self.problem(
                    calling,
                    problem(format!(
                        "the document step `{}` runs must be known before the build starts, to be pinned by its sha256: {reason}",
                        step.name
                    ))
                    .with_hint("write the document's path, or take it from a parameter of the component"),
                );
            }
        };
        let path = match executor::nested_document_path(calling, &written) {
            Ok(p) => p,
            Err(message) => return self.problem(calling, problem(message)),
        };
        let canonical = executor::canonical(&path);
        if ancestry.contains(&canonical) {
            let chain: Vec<String> = ancestry
                .iter()
                .chain(std::iter::once(&canonical))
                .map(|p| p.display().to_string())
                .collect();
            return self.problem(
                calling,
                problem(format!(
                    "documents call each other in a cycle: {}",
                    chain.join(" → ")
                )),
            );
        }
        if ancestry.len() > executor::MAX_NESTING {
            return self.problem(
                calling,
                problem(format!(
                    "ExecuteDocument may nest at most {} levels below a component's document; `{}` would be level {}",
                    executor::MAX_NESTING,
                    path.display(),
                    ancestry.len()
                )),
            );
        }
        let text = match fs_err::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                return self.problem(
                    calling,
                    problem(format!(
                        "document `{}` (run by step `{}`) cannot be read: {}",
                        path.display(),
                        step.name,
                        io_reason(&e)
                    ))
                    .with_hint(close_file_hint(&path).unwrap_or_else(|| {
                        "the path is relative to the folder of the document that runs it"
                            .to_string()
                    })),
                );
            }
        };
        let checked = crate::component::parse::check(&path, &text);
        if !self.files.iter().any(|d| d.path() == path) {
            self.files
                .push(checked.diagnostics.with_consequence(recipe::CONSEQUENCE));
        }
        let Some(nested) = checked.document else {
            return;
        };
        let shown = shown.parent().unwrap_or(Path::new("")).join(&written);
        if !self
            .found
            .iter()
            .any(|d| executor::canonical(&d.local_path) == canonical)
        {
            self.found.push(ReachedDocument {
                path: shown.to_string_lossy().into_owned(),
                local_path: absolute(&path),
                sha256: Sha256::from_digest(&Hasher::digest(text.as_bytes())),
            });
        }
        let mut parameters = Vec::new();
        if let Some(serde_json::Value::Array(items)) = step.inputs.get("parameters") {
            for item in items {
                let name = item.get("name").and_then(serde_json::Value::as_str);
                let value = item.get("value").map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                if let (Some(name), Some(value)) = (name, value) {
                    // A value known only at run time does not change which document runs
                    // unless the nested document uses it in a path; that is reported there.
                    let value = crate::component::template::expand(&value, &scope).unwrap_or(value);
                    parameters.push((name.to_string(), value));
                }
            }
        }
        let label = format!("`{}`", shown.display());
        let variables = match bind_parameters(&nested, &label, &parameters, executor::Given::Step) {
            Ok(v) => v,
            Err(errors) => {
                for e in errors {
                    self.problem(calling, problem(e));
                }
                return;
            }
        };
        let phases = input("phases")
            .and_then(|p| crate::component::template::expand(p, &scope).ok())
            .and_then(|p| executor::selected_phases(&p));
        ancestry.push(canonical);
        self.walk(&nested, &shown, &variables, phases.as_deref(), ancestry);
        ancestry.pop();
    }

    /// A problem of the document at `path` (once, however often the document is reached).
    fn problem(&mut self, path: &Path, problem: Problem) {
        if let Some(d) = self.files.iter_mut().find(|d| d.path() == path)
            && !d.problems().contains(&problem)
        {
            d.push(problem);
        }
    }
}

/// What a document's references are worth before the build: its parameters and constants.
struct PlanScope<'a>(&'a std::collections::HashMap<String, String>);

impl crate::component::template::Scope for PlanScope<'_> {
    fn resolve(
        &self,
        reference: &crate::component::template::Reference,
    ) -> Result<Option<String>, String> {
        use crate::component::template::Reference;
        match reference {
            Reference::Variable(name) => match self.0.get(name) {
                Some(value) => Ok(Some(value.clone())),
                None => Err(format!("`{{{{ {name} }}}}` is not a parameter or constant")),
            },
            other => Err(format!(
                "`{{{{ {other} }}}}` is known only while the build runs"
            )),
        }
    }
}

/// How a reference to a previous build (`name/1.x.x`) becomes a disk: the store implements
/// this; tests and `builder plan` without a store use [`NoStore`].
pub trait ParentResolver {
    /// The newest stored build of `name` whose version matches `version`.
    fn resolve(&self, name: &str, version: &VersionPattern) -> Result<StoredParent, ResolveError>;

    /// The newest stored container build of `name` whose version matches `version`: its OCI
    /// image layout and manifest digest. Default: none (no store).
    fn resolve_container(
        &self,
        name: &str,
        version: &VersionPattern,
    ) -> Result<StoredContainerParent, ResolveError> {
        Err(ResolveError::NotFound {
            message: format!("no container image `{name}/{version}` in the store"),
            hint: Some(format!(
                "build it first: `builder build` of the container recipe named `{name}`"
            )),
        })
    }

    /// The digest of the local file at `path` if it is known and the file has not changed
    /// since (the store keeps such an index), so a large parent is not hashed at every plan.
    fn known_digest(&self, _path: &Path) -> Option<Sha256> {
        None
    }

    /// Remember the digest just computed for the local file at `path`.
    fn remember_digest(&self, _path: &Path, _sha256: &Sha256) {}

    /// The manifest digest the tag of `reference` (a `parentImage: oci://…` without a digest,
    /// without the scheme) points to now, asked of its registry. `None`: this resolver cannot
    /// ask (the default).
    fn oci_tag_digest(
        &self,
        _reference: &crate::recipe::OciReference,
    ) -> Option<Result<Sha256, crate::distribute::oci::OciError>> {
        None
    }

    /// Whether a tag-only `parentImage: oci://…` is pinned to the digest its tag points to now
    /// (pipelines; `builder build --resolve-tags`) rather than refused with that digest in the
    /// hint. Default: refused; wrap a resolver in [`ResolveTags`] to resolve.
    fn resolves_tags(&self) -> bool {
        false
    }
}

/// `resolver`, resolving tag-only OCI parents to the digest their tag points to now: every
/// pipeline execution, and `builder build`/`builder plan` with `--resolve-tags`.
pub struct ResolveTags<'a>(pub &'a dyn ParentResolver);

impl ParentResolver for ResolveTags<'_> {
    fn resolve(&self, name: &str, version: &VersionPattern) -> Result<StoredParent, ResolveError> {
        self.0.resolve(name, version)
    }
    fn resolve_container(
        &self,
        name: &str,
        version: &VersionPattern,
    ) -> Result<StoredContainerParent, ResolveError> {
        self.0.resolve_container(name, version)
    }
    fn known_digest(&self, path: &Path) -> Option<Sha256> {
        self.0.known_digest(path)
    }
    fn remember_digest(&self, path: &Path, sha256: &Sha256) {
        self.0.remember_digest(path, sha256)
    }
    fn oci_tag_digest(
        &self,
        reference: &crate::recipe::OciReference,
    ) -> Option<Result<Sha256, crate::distribute::oci::OciError>> {
        self.0.oci_tag_digest(reference)
    }
    fn resolves_tags(&self) -> bool {
        true
    }
}

/// A stored build's disk, as the plan pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredParent {
    /// `name/x.y.z/n`.
    pub reference: String,
    pub disk: PathBuf,
    /// From the store's manifest; the build verifies it when it reads the disk.
    pub sha256: Sha256,
}

/// A stored container build, as the plan pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredContainerParent {
    /// `name/x.y.z/n`.
    pub reference: String,
    /// Its OCI image layout.
    pub layout: PathBuf,
    /// The image's manifest digest (from the store's manifest).
    pub manifest_digest: Sha256,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Nothing matches: shown as a problem of the recipe's `parentImage`.
    #[error("{message}")]
    NotFound {
        message: String,
        hint: Option<String>,
    },
    /// The store could not be read.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// A resolver for when no store is open: every store reference is "not found".
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStore;

impl ParentResolver for NoStore {
    fn resolve(&self, name: &str, version: &VersionPattern) -> Result<StoredParent, ResolveError> {
        Err(ResolveError::NotFound {
            message: format!("no image `{name}/{version}` in the store"),
            hint: Some(format!(
                "build it first: `builder build` of the recipe named `{name}`"
            )),
        })
    }
}

/// The manifest digest the tag of `reference` points to now (`latest` when it names none),
/// asked of its registry with the credentials and plain-HTTP list every OCI command uses
/// (docker's `config.json`, `$BUILDER_INSECURE_REGISTRIES`). Runs on a thread of its own, so
/// it works inside or outside a tokio runtime.
pub fn registry_tag_digest(
    reference: &crate::recipe::OciReference,
) -> Result<Sha256, crate::distribute::oci::OciError> {
    use crate::distribute::oci;
    // A plan waits for this: fewer and shorter attempts than a transfer gets.
    let options = oci::OciOptions {
        attempts: 3,
        connect_timeout: std::time::Duration::from_secs(10),
        read_timeout: std::time::Duration::from_secs(30),
        ..oci::OciOptions::from_env()
    };
    let digest = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| oci::OciError::Task(e.to_string()))?;
            rt.block_on(oci::current_digest(reference, &options))
        })
        .join()
        .unwrap_or_else(|_| Err(oci::OciError::Task("the registry lookup panicked".into())))
    })?;
    Sha256::parse(&digest)
        .filter(|_| digest.starts_with("sha256:"))
        .ok_or_else(|| oci::OciError::Registry {
            registry: reference.registry.clone(),
            action: format!(
                "name the digest of tag `{}`",
                reference.tag.as_deref().unwrap_or("latest")
            ),
            status: 200,
            message: format!("`{digest}` is not a sha256 digest"),
        })
}

/// The store as a [`ParentResolver`]. Its hash index spares re-hashing a large local parent
/// at every plan, and the build's `import_base` then finds the digest the plan computed.
impl ParentResolver for crate::store::Store {
    fn known_digest(&self, path: &Path) -> Option<Sha256> {
        self.known_digest(path).and_then(|s| Sha256::parse(&s))
    }

    fn remember_digest(&self, path: &Path, sha256: &Sha256) {
        self.remember_digest(path, sha256.as_str());
    }

    fn oci_tag_digest(
        &self,
        reference: &crate::recipe::OciReference,
    ) -> Option<Result<Sha256, crate::distribute::oci::OciError>> {
        Some(registry_tag_digest(reference))
    }

    fn resolve_container(
        &self,
        name: &str,
        version: &VersionPattern,
    ) -> Result<StoredContainerParent, ResolveError> {
        let reference = format!("{name}/{version}");
        match self.resolve_container(&reference) {
            Ok(image) => {
                let layout = image
                    .layout()
                    .map_err(|e| ResolveError::Failed(Box::new(e)))?;
                let digest = image
                    .manifest
                    .container
                    .as_ref()
                    .map(|c| c.manifest_digest.clone())
                    .unwrap_or_default();
                let manifest_digest = Sha256::parse(digest.trim_start_matches("sha256:"))
                    .ok_or_else(|| {
                        ResolveError::Failed(
                            format!(
                                "the manifest of {} has a malformed image digest",
                                image.reference()
                            )
                            .into(),
                        )
                    })?;
                Ok(StoredContainerParent {
                    reference: image.reference(),
                    layout: layout.dir().to_path_buf(),
                    manifest_digest,
                })
            }
            Err(crate::store::StoreError::NotFound { close, .. }) => {
                Err(not_in_store(&reference, "container recipe", name, &close))
            }
            Err(
                e @ (crate::store::StoreError::MachineNotContainer { .. }
                | crate::store::StoreError::BadName { .. }
                | crate::store::StoreError::BadReference { .. }),
            ) => Err(ResolveError::NotFound {
                message: e.to_string(),
                hint: None,
            }),
            Err(e) => Err(ResolveError::Failed(Box::new(e))),
        }
    }

    fn resolve(&self, name: &str, version: &VersionPattern) -> Result<StoredParent, ResolveError> {
        let reference = format!("{name}/{version}");
        match self.resolve_image(&reference) {
            Ok(image) => {
                let disk = image.disk.as_ref().ok_or_else(|| ResolveError::NotFound {
                    message: format!(
                        "{} has no qcow2 or raw output to build on",
                        image.reference()
                    ),
                    hint: Some("build it again with `qcow2` in `outputs.formats`".to_string()),
                })?;
                let sha256 = Sha256::parse(&disk.sha256).ok_or_else(|| {
                    ResolveError::Failed(
                        format!(
                            "the manifest of {} has a malformed sha256",
                            image.reference()
                        )
                        .into(),
                    )
                })?;
                Ok(StoredParent {
                    reference: image.reference(),
                    disk: disk.path.clone(),
                    sha256,
                })
            }
            Err(crate::store::StoreError::NotFound { close, .. }) => {
                Err(not_in_store(&reference, "recipe", name, &close))
            }
            Err(crate::store::StoreError::NoDisk { image }) => Err(ResolveError::NotFound {
                message: format!("{image} has no qcow2 or raw output to build on"),
                hint: Some("build it again with `qcow2` in `outputs.formats`".to_string()),
            }),
            Err(
                e @ (crate::store::StoreError::BadName { .. }
                | crate::store::StoreError::BadReference { .. }),
            ) => Err(ResolveError::NotFound {
                message: e.to_string(),
                hint: None,
            }),
            Err(e) => Err(ResolveError::Failed(Box::new(e))),
        }
    }
}

/// A stored parent that is not in the store: the builds of that name it has, or how to make
/// one (`recipe`: which kind of recipe builds it).
fn not_in_store(reference: &str, recipe: &str, name: &str, close: &[String]) -> ResolveError {
    ResolveError::NotFound {
        message: format!("no image `{reference}` in the store"),
        hint: Some(if close.is_empty() {
            format!(
                "build it first: `builder build` of the {recipe} named `{name}`; `builder images list` shows what is stored"
            )
        } else {
            format!("the store has {}", crate::diagnostic::one_of(close))
        }),
    }
}

/// The resolved build: what `builder plan --json` prints and the build follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// [`PLAN_FORMAT`].
    pub format: u32,
    pub recipe: PlannedRecipe,
    pub parent: PlannedParent,
    /// The recipe's components in order, with their layer keys.
    pub components: Vec<PlannedComponent>,
    pub working_directory: String,
    pub user_data: Option<String>,
    /// `None`: the parent's size.
    pub disk_size: Option<ByteSize>,
    pub infrastructure: Infrastructure,
    pub tests: PlannedTests,
    pub outputs: PlannedOutputs,
    /// `generalize` (default true). Written only when false, so plans made before the key
    /// existed keep their digest.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub generalize: bool,
    /// The recipe's `distribution` targets, paths resolved. Not part of the digest: where an
    /// image goes does not change what it is (the recipe's own sha256 still pins the file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribution: Vec<crate::distribute::destination::Destination>,
    /// The recipe's `cache` (registries that share the layer cache; `--cache-from` and
    /// `--cache-to` replace it). Not part of the digest nor of any layer key: where layers
    /// are shared does not change what they hold.
    #[serde(default, skip_serializing_if = "recipe::SharedCache::is_empty")]
    pub shared_cache: recipe::SharedCache,
    /// A container recipe's build (an OCI image built by buildah, `build::container`); `None`
    /// for a machine image. Written only for container recipes, so machine plans keep their
    /// digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<PlannedContainer>,
}

/// What a container recipe's build adds to the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedContainer {
    pub container_type: recipe::ContainerType,
    /// The `dockerfileTemplate` (the default when the recipe has none).
    pub template: recipe::dockerfile::DockerfileTemplate,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedRecipe {
    pub name: String,
    pub version: Version,
    pub description: Option<String>,
    /// The recipe file on this machine (not part of the digest).
    pub local_path: PathBuf,
    pub sha256: Sha256,
}

/// On-disk format of a local parent image, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum PlannedParent {
    /// A file on this machine, hashed now.
    #[serde(rename_all = "camelCase")]
    File {
        /// As written in the recipe.
        path: String,
        local_path: PathBuf,
        sha256: Sha256,
        format: DiskFormat,
        virtual_size: ByteSize,
    },
    /// Downloaded (and verified against `sha256`) by the build.
    #[serde(rename_all = "camelCase")]
    Url { url: String, sha256: Sha256 },
    /// A previous build from the store.
    #[serde(rename_all = "camelCase")]
    Store {
        /// As written in the recipe (`name/1.x.x`).
        reference: String,
        /// The build it resolved to (`name/1.2.0/3`).
        resolved: String,
        local_path: PathBuf,
        sha256: Sha256,
        format: DiskFormat,
        virtual_size: ByteSize,
    },
    /// A container recipe's parent in an OCI archive file on this machine, hashed now.
    #[serde(rename_all = "camelCase")]
    Archive {
        /// As written in the recipe.
        path: String,
        local_path: PathBuf,
        sha256: Sha256,
    },
    /// A container recipe's parent: a stored container build (its OCI image layout).
    #[serde(rename_all = "camelCase")]
    StoredContainer {
        /// As written in the recipe (`name/1.x.x`).
        reference: String,
        /// The build it resolved to (`name/1.2.0/3`).
        resolved: String,
        /// The build's OCI image layout.
        layout: PathBuf,
        /// The image's manifest digest.
        manifest_digest: Sha256,
    },
    /// Pulled from an OCI registry by the build (the disk layer of a builder artifact, or the
    /// qcow2 in a containerDisk; a container recipe's parent image), pinned by the manifest
    /// digest; the pull checks the layer.
    #[serde(rename_all = "camelCase")]
    Oci {
        /// As written, without `oci://`. Without `@sha256:…` when the plan resolved the tag
        /// (pipelines, `--resolve-tags`): `manifest_digest` is then what the tag pointed to.
        reference: String,
        manifest_digest: Sha256,
    },
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl PlannedParent {
    /// The digest the parent is pinned to.
    pub fn sha256(&self) -> &Sha256 {
        match self {
            PlannedParent::File { sha256, .. }
            | PlannedParent::Url { sha256, .. }
            | PlannedParent::Store { sha256, .. }
            | PlannedParent::Archive { sha256, .. } => sha256,
            PlannedParent::Oci {
                manifest_digest, ..
            }
            | PlannedParent::StoredContainer {
                manifest_digest, ..
            } => manifest_digest,
        }
    }

    /// For an OCI parent whose tag the plan resolved: the reference pinned to the digest the
    /// tag pointed to (`host/repo:tag@sha256:…`, without `oci://`). `None` for every other
    /// parent, and for an OCI reference the recipe pinned itself.
    pub fn resolved_tag(&self) -> Option<String> {
        match self {
            PlannedParent::Oci {
                reference,
                manifest_digest,
            } if !reference.contains('@') => Some(format!("{reference}@sha256:{manifest_digest}")),
            _ => None,
        }
    }

    /// Known now for local and stored parents; a downloaded one is measured by the build.
    pub fn virtual_size(&self) -> Option<ByteSize> {
        match self {
            PlannedParent::File { virtual_size, .. }
            | PlannedParent::Store { virtual_size, .. } => Some(*virtual_size),
            PlannedParent::Url { .. }
            | PlannedParent::Oci { .. }
            | PlannedParent::Archive { .. }
            | PlannedParent::StoredContainer { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedComponent {
    /// As written in the recipe.
    pub path: String,
    pub local_path: PathBuf,
    /// The document's `name`, if it has one.
    pub name: Option<String>,
    pub sha256: Sha256,
    /// Every declared parameter and the value it gets.
    pub parameters: BTreeMap<String, String>,
    /// The document's phases, in order.
    pub phases: Vec<String>,
    /// The documents it runs through `ExecuteDocument`, at any depth, in the order first
    /// reached; each pinned by sha256. Written only when there are some, so plans of
    /// components without them keep their digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<ReachedDocument>,
    /// Key of the disk layer this component produces (recipe components only):
    /// sha256(previous layer key, document sha256, canonical parameters, and the sha256 of
    /// each document it reaches). Equal keys mean the same disk contents could be reused.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub layer_key: Option<String>,
    /// The recipe entry's `cache` (default true): `false` runs the component (and every
    /// later one) at every build, whatever the layer cache holds. Not part of the layer key
    /// (the layer it makes is the same; only whether a cached one may be reused changes).
    /// Written only when false, so plans made before it existed keep their digest.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub cache: bool,
}

impl PlannedComponent {
    /// `install-nginx` or the path.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedTests {
    pub enabled: bool,
    /// Named as in the recipe.
    #[serde(rename = "timeoutSeconds")]
    pub timeout_secs: u64,
    pub components: Vec<PlannedComponent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedOutputs {
    pub formats: Vec<Format>,
    pub compression: Compression,
    /// The file stem template (parse with `recipe::NameTemplate::parse`; it was validated).
    pub name: String,
    /// As written in the recipe.
    pub directory: Option<String>,
    pub local_directory: Option<PathBuf>,
}

/// One stage of the build, in the order the build runs them: [`Plan::stages`] lists a plan's,
/// `builder plan` prints that list, and the build records each by this value, so its events
/// (`stageStarted`, `progress`, …), the manifest's timings and the plan use the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The parent image, into the cache and verified.
    Fetch,
    Overlay,
    /// The seed volume (agent, user data), then QEMU, until the guest is ready.
    Boot,
    /// The `build` and `validate` phases of `components[index]`.
    Component(usize),
    Generalize,
    Shutdown,
    /// In a fresh VM: the `test` phases of the components, then the test components.
    Test,
    Export,
    Store,
    /// The recipe's `distribution` targets, one after another.
    Distribute,
}

impl Stage {
    /// The name events, logs and `builder plan` show (`fetch`, `component`, …).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Overlay => "overlay",
            Stage::Boot => "boot",
            Stage::Component(_) => "component",
            Stage::Generalize => "generalize",
            Stage::Shutdown => "shutdown",
            Stage::Test => "test",
            Stage::Export => "export",
            Stage::Store => "store",
            Stage::Distribute => "distribute",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Stage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// Read the document of a planned component for running it: the file must still have the
/// digest the plan pinned (so the build runs what the plan shows), and it is validated again.
pub fn load_component(component: &PlannedComponent) -> Result<Document, PlanError> {
    load_component_checked(component).map(|(document, _)| document)
}

/// [`load_component`], with the document's warnings (empty when it has none), one per line
/// (`path:line:col: warning: …`), for the build's log.
pub fn load_component_checked(
    component: &PlannedComponent,
) -> Result<(Document, Vec<String>), PlanError> {
    let path = &component.local_path;
    let text = fs_err::read_to_string(path)?;
    let actual = Sha256::from_digest(&Hasher::digest(text.as_bytes()));
    if actual != component.sha256 {
        return Err(PlanError::Changed {
            path: path.clone(),
            planned: component.sha256.clone(),
            actual,
        });
    }
    let checked = crate::component::parse::check(path, &text);
    match checked.document {
        Some(document) => Ok((document, checked.diagnostics.lines())),
        None => Err(PlanError::Invalid(vec![
            checked.diagnostics.with_consequence(recipe::CONSEQUENCE),
        ])),
    }
}

impl Plan {
    /// The file stem of this build's outputs (`outputs.name` rendered), e.g.
    /// `debian-12-web-1.2.0-3`.
    pub fn output_stem(
        &self,
        build_version: u32,
        build_date: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let template = recipe::NameTemplate::parse(&self.outputs.name)
            .unwrap_or_else(|_| recipe::NameTemplate::default());
        template.render(&recipe::NameValues {
            name: &self.recipe.name,
            version: self.recipe.version,
            build_version,
            build_date,
        })
    }

    /// sha256 of the plan's canonical JSON (keys sorted, no spaces), leaving out where files
    /// are on this machine (`localPath`, `localDirectory`): the same recipe and inputs give
    /// the same digest in any checkout.
    pub fn digest(&self) -> String {
        #[expect(
            clippy::expect_used,
            reason = "plan() refuses a plan that does not serialize (PlanError::NotUtf8: a path that is not UTF-8, the one Serialize in it that can fail), and a plan read back from JSON serializes again"
        )]
        let mut value = serde_json::to_value(self).expect("a plan serialises to JSON");
        strip_local(&mut value);
        let mut text = String::new();
        canonical_json(&value, &mut text);
        hex::encode(Hasher::digest(text.as_bytes()))
    }

    /// The stages in order (the test stage only when enabled).
    pub fn stages(&self) -> Vec<Stage> {
        if self.container.is_some() {
            // buildah builds the image: each component is a RUN; the test runs in a
            // container of the image; the store keeps an OCI image layout.
            let mut stages = vec![Stage::Fetch];
            stages.extend((0..self.components.len()).map(Stage::Component));
            if self.tests.enabled {
                stages.push(Stage::Test);
            }
            stages.push(Stage::Store);
            if !self.distribution.is_empty() {
                stages.push(Stage::Distribute);
            }
            return stages;
        }
        let mut stages = vec![Stage::Fetch, Stage::Overlay, Stage::Boot];
        stages.extend((0..self.components.len()).map(Stage::Component));
        stages.extend([Stage::Generalize, Stage::Shutdown]);
        if self.tests.enabled {
            stages.push(Stage::Test);
        }
        stages.extend([Stage::Export, Stage::Store]);
        if !self.distribution.is_empty() {
            stages.push(Stage::Distribute);
        }
        stages
    }

    /// (Re)compute each component's layer key, from [`Plan::root_layer_key`] on: after
    /// planning, and after anything that goes into the keys changed (a pipeline's settings).
    pub fn set_layer_keys(&mut self) {
        let mut key = self.root_layer_key();
        for component in &mut self.components {
            key = layer_key(&key, component);
            component.layer_key = Some(key.clone());
        }
    }

    /// The key the first layer builds on: the parent's digest and the settings that shape
    /// the disk before the first component runs.
    pub fn root_layer_key(&self) -> String {
        let mut text = String::new();
        canonical_json(&self.root_key_value(), &mut text);
        hex::encode(Hasher::digest(text.as_bytes()))
    }

    /// What went into [`Plan::root_layer_key`], for the boot layer's record: every setting
    /// it hashes, as text, the user data by its sha256 (a cloud-config may hold secrets).
    pub fn root_layer_inputs(&self) -> LayerInputs {
        let value = self.root_key_value();
        let settings = value
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) if k == "userData" => {
                        format!("sha256 {}", hex::encode(Hasher::digest(s.as_bytes())))
                    }
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        LayerInputs {
            layer: "boot".to_string(),
            settings,
            ..LayerInputs::default()
        }
    }

    /// The settings the root key hashes. The formula (parent key + component +
    /// parameters) starts from the parent's digest; the disk size, user data, working
    /// directory and network also change what the first component sees, so they are folded
    /// in here.
    ///
    /// What builder itself puts in the guest before the first component is folded in too:
    /// a full boot installs our agent on the disk (a build resuming on a cached layer runs
    /// the agent that layer holds, so a layer made by another agent must not be reused) and
    /// boots it with the recipe's firmware (`seed::guest_digest()`, `firmware`). An appliance
    /// boot (`infrastructure.boot: appliance`) leaves another disk than the image's own boot
    /// (no cloud-init ran, nothing of builder's was installed): its boot mode and what the
    /// appliance puts in the guest's way instead.
    fn root_key_value(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "format": PLAN_FORMAT,
            "parent": self.parent.sha256().as_str(),
            "diskSize": self.disk_size.map(|s| s.bytes()),
            "userData": self.user_data.as_deref(),
            "workingDirectory": &self.working_directory,
            "network": self.infrastructure.network.name(),
        });
        if self.infrastructure.boot == recipe::Boot::Appliance {
            value["boot"] = self.infrastructure.boot.name().into();
            value["appliance"] = crate::vm::appliance::digest().into();
            // What the build does in the appliance before the first component (a host key,
            // the root grown): in the boot layer.
            let first_boot = format!(
                "{}\n{}",
                super::stages::APPLIANCE_HOST_KEY,
                super::stages::GROW_ROOT
            );
            value["applianceFirstBoot"] = hex::encode(Hasher::digest(first_boot.as_bytes())).into();
        } else {
            value["firmware"] = self.infrastructure.firmware.name().into();
            value["builderGuest"] = crate::vm::seed::guest_digest().into();
        }
        value
    }
}

/// Keys whose values say where something is on this machine or where it is shared, left out
/// of digests.
const LOCAL_KEYS: &[&str] = &["localPath", "localDirectory", "distribution", "sharedCache"];

fn strip_local(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| !LOCAL_KEYS.contains(&k.as_str()));
            map.values_mut().for_each(strip_local);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_local),
        _ => {}
    }
}

/// JSON with object keys sorted and no whitespace, whatever order serde_json's map keeps.
fn canonical_json(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(&map[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// sha256(previous layer key, component digest, canonical parameters, then the digest of
/// each document the component reaches, when it reaches any).
pub fn layer_key(previous: &str, component: &PlannedComponent) -> String {
    #[expect(clippy::expect_used, reason = "a string map always serialises to JSON")]
    let params =
        serde_json::to_value(&component.parameters).expect("a string map serialises to JSON");
    let mut text = String::new();
    canonical_json(&params, &mut text);
    let mut hasher = Hasher::new();
    hasher.update(previous.as_bytes());
    hasher.update(b"\n");
    hasher.update(component.sha256.as_str().as_bytes());
    hasher.update(b"\n");
    hasher.update(text.as_bytes());
    for document in &component.documents {
        hasher.update(b"\n");
        hasher.update(document.sha256.as_str().as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// What went into `component`'s layer key on top of the layer `previous`, for the layer's
/// record ([`LayerInputs`]): what [`layer_key`] hashes, with names.
pub fn layer_inputs(previous: &str, component: &PlannedComponent) -> LayerInputs {
    LayerInputs {
        layer: component.label().to_string(),
        name: component.name.clone(),
        path: Some(component.path.clone()),
        sha256: Some(component.sha256.to_string()),
        parameters: component.parameters.clone(),
        documents: component
            .documents
            .iter()
            .map(ReachedDocument::input)
            .collect(),
        settings: BTreeMap::new(),
        previous: Some(previous.to_string()),
    }
}

/// Resolve everything validation left: the parent image (hashed, or looked up in the store)
/// and the layer keys. `progress` is called while a local parent is hashed.
pub fn plan(
    validated: Validated,
    resolver: &dyn ParentResolver,
    env: &dyn Fn(&str) -> Option<String>,
    progress: &mut dyn FnMut(Hashed<'_>),
) -> Result<Plan, PlanError> {
    let Validated {
        recipe,
        components,
        test_components,
        ..
    } = validated;
    let mut problems = Vec::new();
    let parent = resolve_parent(&recipe, resolver, env, progress, &mut problems)?;

    if let (Some(parent), Some(disk)) = (&parent, &recipe.disk_size)
        && let Some(virtual_size) = parent.virtual_size()
        && disk.value < virtual_size
    {
        problems.push(
            Problem::error(
                disk.span,
                format!(
                    "diskSize ({}) is smaller than the parent image's virtual size ({virtual_size})",
                    disk.value
                ),
            )
            .with_hint(format!(
                "a disk can only grow: use at least `{virtual_size}`, or remove `diskSize` to keep the parent's size"
            )),
        );
    }
    if parent.is_none() && problems.is_empty() {
        problems.push(Problem::error(
            recipe.parent.span,
            "the parent image could not be resolved",
        ));
    }
    let parent = match parent {
        Some(parent) if problems.is_empty() => parent,
        _ => {
            let mut d = Diagnostics::new(
                &recipe.source.path,
                recipe.source.text.clone(),
                recipe::NOUN,
            )
            .with_consequence(recipe::CONSEQUENCE);
            d.extend(problems);
            d.sort();
            return Err(PlanError::Invalid(vec![d]));
        }
    };

    let planned = |c: &LoadedComponent| PlannedComponent {
        path: c.usage.path.value.clone(),
        local_path: absolute(&c.path),
        name: c.document.name.clone(),
        sha256: c.sha256.clone(),
        parameters: c.parameters.clone(),
        phases: c.document.phases.iter().map(|p| p.name.clone()).collect(),
        documents: c.documents.clone(),
        layer_key: None,
        cache: c.usage.cache,
    };
    let mut plan = Plan {
        format: PLAN_FORMAT,
        recipe: PlannedRecipe {
            name: recipe.name.clone(),
            version: recipe.version,
            description: recipe.description.clone(),
            local_path: absolute(&recipe.source.path),
            sha256: recipe.source.sha256.clone(),
        },
        parent,
        components: components.iter().map(planned).collect(),
        working_directory: recipe.working_directory.clone(),
        user_data: recipe.user_data.clone(),
        disk_size: recipe.disk_size.as_ref().map(|d| d.value),
        infrastructure: recipe.infrastructure.clone(),
        tests: PlannedTests {
            enabled: recipe.tests.enabled,
            timeout_secs: recipe.tests.timeout_secs,
            components: test_components.iter().map(planned).collect(),
        },
        outputs: PlannedOutputs {
            formats: recipe.outputs.formats.clone(),
            compression: recipe.outputs.compression,
            name: recipe.outputs.name.as_str().to_string(),
            directory: recipe.outputs.directory.clone(),
            local_directory: recipe
                .outputs
                .directory
                .as_ref()
                .map(|d| absolute(&recipe::resolve_relative(&recipe.source.path, d))),
        },
        generalize: recipe.generalize,
        distribution: recipe
            .distribution
            .iter()
            .map(|d| {
                crate::distribute::destination::Destination::from_recipe(
                    &d.value,
                    &recipe.source.path,
                )
            })
            .collect(),
        shared_cache: recipe.cache.clone(),
        container: recipe.container.as_ref().map(|c| PlannedContainer {
            container_type: c.container_type,
            template: c.template.value.clone(),
        }),
    };
    if serde_json::to_value(&plan).is_err() {
        return Err(PlanError::NotUtf8 {
            recipe: recipe.source.path.clone(),
        });
    }
    plan.set_layer_keys();
    Ok(plan)
}

/// [`validate`] then [`plan`], reading the environment of this process.
pub fn make(
    recipe_path: &Path,
    resolver: &dyn ParentResolver,
    progress: &mut dyn FnMut(Hashed<'_>),
) -> Result<(Plan, Vec<Diagnostics>), PlanError> {
    let env = |name: &str| std::env::var(name).ok();
    let validated = validate(recipe_path, &env)?;
    let warnings = validated.warnings.clone();
    let plan = plan(validated, resolver, &env, progress)?;
    Ok((plan, warnings))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn resolve_parent(
    recipe: &Recipe,
    resolver: &dyn ParentResolver,
    env: &dyn Fn(&str) -> Option<String>,
    progress: &mut dyn FnMut(Hashed<'_>),
    problems: &mut Vec<Problem>,
) -> Result<Option<PlannedParent>, PlanError> {
    let Located { value, span } = &recipe.parent;
    match value {
        ParentImage::Url { url, sha256 } => Ok(Some(PlannedParent::Url {
            url: url.clone(),
            sha256: sha256.clone(),
        })),
        ParentImage::Oci { reference } => {
            use crate::distribute::oci::OciError;
            use crate::recipe::OciReference;
            let parsed = match reference.parse::<OciReference>() {
                Ok(r) => r,
                Err(e) => {
                    problems.push(Problem::error(*span, e.to_string()).with_hint_opt(e.hint()));
                    return Ok(None);
                }
            };
            if let Some(manifest_digest) = parsed.digest.as_deref().and_then(Sha256::parse) {
                return Ok(Some(PlannedParent::Oci {
                    reference: reference.clone(),
                    manifest_digest,
                }));
            }
            if !resolver.resolves_tags() {
                let e = OciError::NotPinned {
                    reference: parsed.to_string(),
                    current: resolver
                        .oci_tag_digest(&parsed)
                        .and_then(Result::ok)
                        .map(|d| format!("sha256:{d}")),
                };
                let hint = e.hint().map(|h| {
                    format!("{h}; or pass `--resolve-tags` to pin what the tag points to now")
                });
                problems.push(Problem::error(*span, e.to_string()).with_hint_opt(hint));
                return Ok(None);
            }
            let tag = parsed.tag.as_deref().unwrap_or("latest");
            match resolver.oci_tag_digest(&parsed) {
                Some(Ok(manifest_digest)) => Ok(Some(PlannedParent::Oci {
                    reference: reference.clone(),
                    manifest_digest,
                })),
                Some(Err(OciError::NotFound { .. })) => {
                    problems.push(
                        Problem::error(
                            *span,
                            format!(
                                "{}/{} has no tag `{tag}`",
                                parsed.registry, parsed.repository
                            ),
                        )
                        .with_hint(
                            "check the repository and the tag, or push the image to that tag first",
                        ),
                    );
                    Ok(None)
                }
                Some(Err(cause)) => Err(PlanError::Registry {
                    reference: reference.clone(),
                    location: format!(
                        "{}:{}:{}",
                        recipe.source.path.display(),
                        span.line,
                        span.col
                    ),
                    cause: Box::new(cause),
                }),
                None => {
                    problems.push(
                        Problem::error(
                            *span,
                            format!(
                                "`oci://{parsed}` names a tag and no registry can be asked here"
                            ),
                        )
                        .with_hint("pin it: `oci://…@sha256:<manifest digest>`"),
                    );
                    Ok(None)
                }
            }
        }
        ParentImage::File { path, sha256 } => {
            let Some(local) = local_parent(&recipe.source.path, path, *span, env, problems) else {
                return Ok(None);
            };
            // A container recipe's file parent is an OCI archive: no disk header to read.
            let header = if recipe.container.is_some() {
                None
            } else {
                match disk_header(&local) {
                    Ok(header) => Some(header),
                    Err(HeaderError::Io(source)) => return Err(source.into()),
                    Err(HeaderError::Unsupported(kind)) => {
                        problems.push(unsupported_format(*span, &local, kind));
                        return Ok(None);
                    }
                }
            };
            let digest = match resolver.known_digest(&local) {
                Some(known) => known,
                None => {
                    let mut each_block = |h: Hashed<'_>| {
                        progress(h);
                        std::ops::ControlFlow::Continue(())
                    };
                    let digest = crate::digest::sha256_file(&local, Some(&mut each_block))
                        .map(|d| Sha256::from_digest(&d.sha256))?;
                    resolver.remember_digest(&local, &digest);
                    digest
                }
            };
            if let Some(pinned) = sha256
                && *pinned != digest
            {
                problems.push(
                    Problem::error(
                        *span,
                        format!(
                            "parent image `{}` has sha256 {digest}, but the recipe pins {pinned}",
                            local.display()
                        ),
                    )
                    .with_hint("if the file was meant to change, update `sha256`; otherwise this is not the image that was pinned"),
                );
                return Ok(None);
            }
            Ok(Some(match header {
                Some((format, virtual_size)) => PlannedParent::File {
                    path: path.clone(),
                    local_path: absolute(&local),
                    sha256: digest,
                    format,
                    virtual_size,
                },
                None => PlannedParent::Archive {
                    path: path.clone(),
                    local_path: absolute(&local),
                    sha256: digest,
                },
            }))
        }
        ParentImage::Store { name, version } if recipe.container.is_some() => {
            match resolver.resolve_container(name, version) {
                Ok(stored) => Ok(Some(PlannedParent::StoredContainer {
                    reference: format!("{name}/{version}"),
                    resolved: stored.reference,
                    layout: stored.layout,
                    manifest_digest: stored.manifest_digest,
                })),
                Err(ResolveError::NotFound { message, hint }) => {
                    problems.push(Problem::error(*span, message).with_hint_opt(hint));
                    Ok(None)
                }
                Err(ResolveError::Failed(source)) => Err(PlanError::Store {
                    reference: format!("{name}/{version}"),
                    source,
                }),
            }
        }
        ParentImage::Store { name, version } => match resolver.resolve(name, version) {
            Ok(stored) => {
                let (format, virtual_size) = match disk_header(&stored.disk) {
                    Ok(header) => header,
                    Err(HeaderError::Io(source)) => return Err(source.into()),
                    Err(HeaderError::Unsupported(kind)) => {
                        problems.push(unsupported_format(*span, &stored.disk, kind));
                        return Ok(None);
                    }
                };
                Ok(Some(PlannedParent::Store {
                    reference: format!("{name}/{version}"),
                    resolved: stored.reference,
                    local_path: stored.disk,
                    sha256: stored.sha256,
                    format,
                    virtual_size,
                }))
            }
            Err(ResolveError::NotFound { message, hint }) => {
                problems.push(Problem::error(*span, message).with_hint_opt(hint));
                Ok(None)
            }
            Err(ResolveError::Failed(source)) => Err(PlanError::Store {
                reference: format!("{name}/{version}"),
                source,
            }),
        },
    }
}

fn unsupported_format(span: Span, path: &Path, kind: &str) -> Problem {
    Problem::error(
        span,
        format!(
            "parent image `{}` is a {kind} image; builds start from qcow2 or raw images",
            path.display()
        ),
    )
    .with_hint(format!(
        "convert it: `qemu-img convert -O qcow2 {} base.qcow2`",
        path.display()
    ))
}

enum HeaderError {
    Io(std::io::Error),
    Unsupported(&'static str),
}

/// The format and virtual size of a disk image, from its header: qcow2 (magic `QFI\xfb`, size
/// at byte 24, big-endian) or raw (the file's length). Other known formats are refused rather
/// than booted as raw bytes.
fn disk_header(path: &Path) -> Result<(DiskFormat, ByteSize), HeaderError> {
    let mut file = fs_err::File::open(path).map_err(HeaderError::Io)?;
    let length = file.metadata().map_err(HeaderError::Io)?.len();
    let mut header = [0u8; 512];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeaderError::Io(e)),
        }
    }
    let header = &header[..filled];
    if header.starts_with(b"QFI\xfb") && header.len() >= 32 {
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[24..32]);
        return Ok((DiskFormat::Qcow2, ByteSize::b(u64::from_be_bytes(size))));
    }
    let kind = if header.starts_with(b"KDMV") || header.starts_with(b"# Disk DescriptorFile") {
        Some("VMDK")
    } else if header.starts_with(b"vhdxfile") {
        Some("VHDX")
    } else if header.starts_with(b"conectix") {
        Some("VHD")
    } else if header.len() >= 68 && header[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        Some("VDI")
    } else if header.starts_with(b"QFI") {
        Some("damaged qcow2")
    } else {
        None
    };
    match kind {
        Some(kind) => Err(HeaderError::Unsupported(kind)),
        None => Ok((DiskFormat::Raw, ByteSize::b(length))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    const COMPONENT: &str = "name: hello\nschemaVersion: 1.0\nparameters:\n  - greeting:\n      type: string\n      default: hi\nphases:\n  - name: build\n    steps:\n      - name: say\n        action: ExecuteBash\n        inputs:\n          commands: [\"echo {{ greeting }}\"]\n";

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let f = Fixture { dir };
            f.write("a.yml", COMPONENT);
            f.write("b.yml", &COMPONENT.replace("hello", "second"));
            f.write_bytes("base.raw", &vec![0u8; 3 << 20]);
            f.write(
                "recipe.yml",
                "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: a.yml\n  - path: b.yml\n    parameters: {greeting: hello}\n",
            );
            f
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn write(&self, name: &str, text: &str) {
            fs_err::write(self.path(name), text).unwrap();
        }
        fn write_bytes(&self, name: &str, bytes: &[u8]) {
            fs_err::write(self.path(name), bytes).unwrap();
        }
        fn plan(&self) -> Result<Plan, PlanError> {
            let env = |_: &str| None;
            let validated = validate(&self.path("recipe.yml"), &env)?;
            plan(validated, &NoStore, &env, &mut |_| {})
        }
    }

    fn problems(err: PlanError) -> Vec<String> {
        match err {
            PlanError::Invalid(files) => files
                .iter()
                .flat_map(|d| d.problems().iter().map(|p| p.message.clone()))
                .collect(),
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn plan_pins_everything_and_fills_parameters() {
        let f = Fixture::new();
        let plan = f.plan().unwrap();
        let PlannedParent::File {
            sha256,
            format,
            virtual_size,
            ..
        } = &plan.parent
        else {
            panic!("{:?}", plan.parent);
        };
        assert_eq!(*format, DiskFormat::Raw);
        assert_eq!(*virtual_size, ByteSize::mib(3));
        assert_eq!(
            sha256.as_str(),
            hex::encode(Hasher::digest(vec![0u8; 3 << 20]))
        );
        assert_eq!(plan.components[0].parameters["greeting"], "hi");
        assert_eq!(plan.components[1].parameters["greeting"], "hello");
        assert_eq!(plan.components[0].name.as_deref(), Some("hello"));
        assert_eq!(plan.components[1].phases, ["build"]);
        assert!(plan.components.iter().all(|c| c.layer_key.is_some()));
        assert_eq!(plan.stages().len(), 3 + 2 + 2 + 1 + 2);
        let json = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
        assert_eq!(back.digest(), plan.digest());
    }

    #[test]
    fn same_inputs_same_digest_and_a_changed_component_changes_its_keys_onwards() {
        let f = Fixture::new();
        let first = f.plan().unwrap();
        let key = |plan: &Plan, i: usize| plan.components[i].layer_key.clone();
        assert_eq!(f.plan().unwrap().digest(), first.digest());

        // The same files in another directory: same digest.
        let g = Fixture::new();
        assert_eq!(g.plan().unwrap().digest(), first.digest());

        // One byte more in the second component: its key and the digest change, the first
        // component's key does not.
        f.write("b.yml", &(COMPONENT.replace("hello", "second") + "\n"));
        let changed = f.plan().unwrap();
        assert_ne!(changed.digest(), first.digest());
        assert_eq!(key(&changed, 0), key(&first, 0));
        assert_ne!(key(&changed, 1), key(&first, 1));

        // A change in the first component changes every key from it on.
        let f = Fixture::new();
        f.write("a.yml", &(COMPONENT.to_string() + "# changed\n"));
        let changed = f.plan().unwrap();
        assert_ne!(key(&changed, 0), key(&first, 0));
        assert_ne!(key(&changed, 1), key(&first, 1));

        // A parameter value changes its component's key.
        let f = Fixture::new();
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: a.yml\n    parameters: {greeting: bye}\n  - path: b.yml\n    parameters: {greeting: hello}\n",
        );
        let changed = f.plan().unwrap();
        assert_ne!(key(&changed, 0), key(&first, 0));
        let root = first.root_layer_key();
        let said: Vec<String> = layer_inputs(&root, &changed.components[0])
            .changes(&layer_inputs(&root, &first.components[0]))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(said, ["parameter greeting changed from \"hi\" to \"bye\""]);
        // `cache: false` is not part of the key.
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: a.yml\n    cache: false\n    parameters: {greeting: hi}\n  - path: b.yml\n    parameters: {greeting: hello}\n",
        );
        let uncached = f.plan().unwrap();
        assert!(!uncached.components[0].cache && uncached.components[1].cache);
        assert_eq!(key(&uncached, 1), key(&first, 1));

        // A different parent changes everything; the boot layer's inputs say it.
        let f = Fixture::new();
        f.write_bytes("base.raw", &vec![1u8; 3 << 20]);
        let changed = f.plan().unwrap();
        assert_ne!(key(&changed, 0), key(&first, 0));
        let said: Vec<String> = changed
            .root_layer_inputs()
            .changes(&first.root_layer_inputs())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].starts_with("parent changed from"), "{said:?}");
    }

    /// A component that runs `{{ lib }}/common.yml` (the parameter's default is `lib`), which
    /// runs `deeper.yml` next to it in its `build` phase (the only one asked for: its `other`
    /// phase names a document that does not exist).
    const CALLER: &str = "name: caller\nschemaVersion: 1.0\nparameters:\n  - lib:\n      type: string\n      default: lib\nphases:\n  - name: build\n    steps:\n      - name: common\n        action: ExecuteDocument\n        inputs:\n          document: '{{ lib }}/common.yml'\n          phases: build\n          parameters:\n            - name: Word\n              value: hi\n";
    const COMMON: &str = "schemaVersion: 1.0\nparameters:\n  - Word:\n      type: string\nphases:\n  - name: build\n    steps:\n      - name: deeper\n        action: ExecuteDocument\n        inputs:\n          document: deeper.yml\n  - name: other\n    steps:\n      - name: never\n        action: ExecuteDocument\n        inputs:\n          document: missing.yml\n";
    const DEEPER: &str = "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: say\n        action: ExecuteBash\n        inputs:\n          commands: [echo deep]\n";

    fn with_reached_documents() -> Fixture {
        let f = Fixture::new();
        fs_err::create_dir(f.path("lib")).unwrap();
        f.write("caller.yml", CALLER);
        f.write("lib/common.yml", COMMON);
        f.write("lib/deeper.yml", DEEPER);
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: a.yml\n  - path: caller.yml\n  - path: b.yml\n",
        );
        f
    }

    #[test]
    fn documents_reached_through_execute_document_are_pinned() {
        let f = with_reached_documents();
        let plan = f.plan().unwrap();
        let sha = |text: &str| Sha256::from_digest(&Hasher::digest(text.as_bytes()));
        let reached: Vec<(&str, &Sha256)> = plan.components[1]
            .documents
            .iter()
            .map(|d| (d.path.as_str(), &d.sha256))
            .collect();
        // Nested paths are relative to the calling document; a phase that never runs
        // (`other`, with a missing document) is not followed.
        assert_eq!(
            reached,
            [
                ("lib/common.yml", &sha(COMMON)),
                ("lib/deeper.yml", &sha(DEEPER))
            ]
        );
        assert!(plan.components[0].documents.is_empty());
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);

        // Editing the document two levels down changes the plan, the calling component's
        // layer key and every one after it, not the ones before.
        f.write("lib/deeper.yml", &(DEEPER.to_string() + "# edited\n"));
        let edited = f.plan().unwrap();
        assert_ne!(edited.digest(), plan.digest());
        assert_eq!(edited.components[0].layer_key, plan.components[0].layer_key);
        assert_ne!(edited.components[1].layer_key, plan.components[1].layer_key);
        assert_ne!(edited.components[2].layer_key, plan.components[2].layer_key);
        assert_eq!(
            edited.components[1].documents[1].sha256,
            sha(&(DEEPER.to_string() + "# edited\n"))
        );
        // The layer's recorded inputs say which document it was.
        let previous = plan.components[0].layer_key.clone().unwrap();
        let inputs = |p: &Plan| layer_inputs(&previous, &p.components[1]);
        let changes = inputs(&edited).changes(&inputs(&plan));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            changes[0]
                .to_string()
                .starts_with("document lib/deeper.yml (run through ExecuteDocument) changed"),
            "{}",
            changes[0]
        );

        // The parameter that names the folder: another folder, other documents.
        fs_err::create_dir(f.path("lib2")).unwrap();
        f.write("lib2/common.yml", COMMON);
        f.write("lib2/deeper.yml", DEEPER);
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: caller.yml\n    parameters: {lib: lib2}\n",
        );
        let other = f.plan().unwrap();
        assert_eq!(other.components[0].documents[0].path, "lib2/common.yml");
    }

    #[test]
    fn a_test_component_pins_what_its_test_phase_runs() {
        let f = with_reached_documents();
        f.write(
            "tester.yml",
            "schemaVersion: 1.0\nphases:\n  - name: test\n    steps:\n      - name: run\n        action: ExecuteDocument\n        inputs:\n          document: lib/deeper.yml\n",
        );
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: a.yml\ntests:\n  components:\n    - path: tester.yml\n",
        );
        let plan = f.plan().unwrap();
        assert_eq!(plan.tests.components[0].documents[0].path, "lib/deeper.yml");
        f.write("lib/deeper.yml", &(DEEPER.to_string() + "# edited\n"));
        assert_ne!(f.plan().unwrap().digest(), plan.digest());
    }

    #[test]
    fn the_shared_cache_is_in_the_plan_but_in_no_digest_or_key() {
        let f = with_reached_documents();
        let recipe =
            "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: a.yml\n";
        f.write("recipe.yml", recipe);
        let plain = f.plan().unwrap();
        assert!(
            serde_json::to_value(&plain)
                .unwrap()
                .get("sharedCache")
                .is_none()
        );
        f.write(
            "recipe.yml",
            &format!(
                "{recipe}cache:\n  from: oci://127.0.0.1:5000/cache/web\n  to: oci://127.0.0.1:5000/cache/web\n"
            ),
        );
        let shared = f.plan().unwrap();
        let repository: crate::recipe::OciReference = "127.0.0.1:5000/cache/web".parse().unwrap();
        assert_eq!(shared.shared_cache.from, std::slice::from_ref(&repository));
        assert_eq!(shared.shared_cache.to, Some(repository));
        assert_eq!(
            shared.components[0].layer_key,
            plain.components[0].layer_key
        );
        // The recipe's own sha256 changed; the rest of the digest did not.
        let mut same_recipe = shared.clone();
        same_recipe.recipe.sha256 = plain.recipe.sha256.clone();
        assert_eq!(same_recipe.digest(), plain.digest());
        // A plan read back keeps it.
        let json = serde_json::to_string(&shared).unwrap();
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back.shared_cache, shared.shared_cache);
    }

    #[test]
    fn documents_that_cannot_be_pinned_are_problems() {
        let f = with_reached_documents();
        let messages = |caller: &str| {
            f.write("caller.yml", caller);
            problems(f.plan().unwrap_err())
        };
        // Unreadable, at the step that names it.
        let missing = messages(&CALLER.replace("common.yml", "nothing.yml"));
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(
            missing[0].contains("nothing.yml") && missing[0].contains("cannot be read"),
            "{missing:?}"
        );
        // Known only while the build runs.
        let chained = messages(&CALLER.replace(
            "      - name: common\n",
            "      - name: find\n        action: ExecuteBash\n        inputs:\n          commands: [echo lib]\n      - name: common\n",
        ).replace("{{ lib }}", "{{ build.find.outputs.stdout }}"));
        assert!(
            chained[0].contains("must be known before the build starts"),
            "{chained:?}"
        );
        // A required parameter not given.
        let unbound = messages(&CALLER.replace("- name: Word", "- name: Other"));
        assert!(
            unbound
                .iter()
                .any(|m| m.contains("parameter `Word` is required")),
            "{unbound:?}"
        );
        // A cycle.
        f.write("caller.yml", CALLER);
        f.write(
            "lib/deeper.yml",
            "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: back\n        action: ExecuteDocument\n        inputs:\n          document: common.yml\n",
        );
        let cycle = problems(f.plan().unwrap_err());
        assert!(cycle[0].contains("in a cycle"), "{cycle:?}");
        // An invalid nested document is reported as its own file.
        f.write("lib/deeper.yml", "schemaVersion: 1.0\nphases: []\n");
        let err = f.plan().unwrap_err();
        let PlanError::Invalid(files) = err else {
            panic!("{err:?}")
        };
        assert!(
            files.iter().any(|d| d.path().ends_with("lib/deeper.yml")),
            "{files:?}"
        );
    }

    #[test]
    fn pinned_parent_mismatch_shows_both_digests() {
        let f = Fixture::new();
        let wrong = "0".repeat(64);
        f.write(
            "recipe.yml",
            &format!("name: web\nversion: 1.0.0\nparentImage: {{path: base.raw, sha256: {wrong}}}\ncomponents:\n  - path: a.yml\n"),
        );
        let actual = hex::encode(Hasher::digest(vec![0u8; 3 << 20]));
        let messages = problems(f.plan().unwrap_err());
        assert_eq!(messages.len(), 1);
        assert!(
            messages[0].contains(&actual) && messages[0].contains(&wrong),
            "{messages:?}"
        );
    }

    #[test]
    fn disk_size_below_the_parents_size_is_a_problem() {
        let f = Fixture::new();
        let mut qcow2 = vec![0u8; 512];
        qcow2[..4].copy_from_slice(b"QFI\xfb");
        qcow2[7] = 3;
        qcow2[24..32].copy_from_slice(&(4u64 << 30).to_be_bytes());
        f.write_bytes("base.qcow2", &qcow2);
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: base.qcow2\ndiskSize: 2GiB\ncomponents:\n  - path: a.yml\n",
        );
        assert_eq!(
            problems(f.plan().unwrap_err()),
            ["diskSize (2GiB) is smaller than the parent image's virtual size (4GiB)"]
        );
    }

    #[test]
    fn store_references_go_through_the_resolver() {
        struct One(PathBuf);
        impl ParentResolver for One {
            fn resolve(
                &self,
                name: &str,
                version: &VersionPattern,
            ) -> Result<StoredParent, ResolveError> {
                assert_eq!((name, version.to_string().as_str()), ("base", "1.x.x"));
                Ok(StoredParent {
                    reference: "base/1.2.0/3".into(),
                    disk: self.0.clone(),
                    sha256: Sha256::parse(&"ab".repeat(32)).unwrap(),
                })
            }
        }
        let f = Fixture::new();
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: base/1.x.x\ncomponents:\n  - path: a.yml\n",
        );
        let env = |_: &str| None;
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let plan = plan(
            validated.clone(),
            &One(f.path("base.raw")),
            &env,
            &mut |_| {},
        )
        .unwrap();
        assert!(
            matches!(&plan.parent, PlannedParent::Store { resolved, .. } if resolved == "base/1.2.0/3")
        );
        let err = super::plan(validated, &NoStore, &env, &mut |_| {}).unwrap_err();
        assert_eq!(problems(err), ["no image `base/1.x.x` in the store"]);
    }

    #[test]
    fn environment_variables_in_parent_paths() {
        let f = Fixture::new();
        f.write(
            "recipe.yml",
            "name: web\nversion: 1.0.0\nparentImage: ${BASE_DIR}/base.raw\ncomponents:\n  - path: a.yml\n",
        );
        let dir = f.dir.path().to_string_lossy().to_string();
        let env = |name: &str| (name == "BASE_DIR").then(|| dir.clone());
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let mut calls = 0;
        let plan = plan(validated, &NoStore, &env, &mut |p| {
            calls += 1;
            assert_eq!(p.total, 3 << 20);
        })
        .unwrap();
        assert!(calls >= 3);
        assert!(
            matches!(&plan.parent, PlannedParent::File { path, .. } if path == "${BASE_DIR}/base.raw")
        );
        let unset = |_: &str| None;
        let err = validate(&f.path("recipe.yml"), &unset).unwrap_err();
        assert_eq!(
            problems(err),
            ["environment variable `BASE_DIR` is not set"]
        );
    }

    #[test]
    fn components_load_only_as_planned() {
        let f = Fixture::new();
        let plan = f.plan().unwrap();
        let document = load_component(&plan.components[1]).unwrap();
        assert_eq!(document.name.as_deref(), Some("second"));
        f.write(
            "b.yml",
            &(COMPONENT.replace("hello", "second") + "# edited\n"),
        );
        assert!(matches!(
            load_component(&plan.components[1]),
            Err(PlanError::Changed { .. })
        ));
        use chrono::TimeZone;
        let date = chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(plan.output_stem(7, date), "web-1.0.0-7");
    }

    #[test]
    fn a_component_with_warnings_is_planned_and_loads_with_them() {
        let f = Fixture::new();
        f.write(
            "a.yml",
            &COMPONENT.replace("commands: [", "comands: oops\n          commands: ["),
        );
        let plan = f.plan().expect("warnings do not stop planning");
        let (document, warnings) = load_component_checked(&plan.components[0]).unwrap();
        assert_eq!(document.name.as_deref(), Some("hello"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].ends_with(
                "a.yml:13:11: warning: unknown key `comands` in the inputs of `ExecuteBash` is ignored (AWSTOE ignores it too) (hint: did you mean `commands`?)"
            ),
            "{warnings:?}"
        );
        assert!(
            load_component_checked(&plan.components[1])
                .unwrap()
                .1
                .is_empty()
        );
    }

    #[test]
    fn url_parents_are_recorded_for_the_build() {
        let f = Fixture::new();
        let digest = "ef".repeat(32);
        f.write(
            "recipe.yml",
            &format!("name: web\nversion: 1.0.0\nparentImage: {{url: 'https://example.invalid/b.qcow2', sha256: {digest}}}\ndiskSize: 1GiB\ncomponents:\n  - path: a.yml\n"),
        );
        let plan = f.plan().unwrap();
        assert_eq!(
            plan.parent,
            PlannedParent::Url {
                url: "https://example.invalid/b.qcow2".into(),
                sha256: Sha256::parse(&digest).unwrap()
            }
        );
        // Its size is known only after the download: the build checks diskSize then.
        assert_eq!(plan.parent.virtual_size(), None);
        assert_eq!(plan.disk_size, Some(ByteSize::gib(1)));
    }

    /// A registry as the plan sees it: tag `1` of `127.0.0.1:5000/base` points to `ab…`;
    /// `127.0.0.1:9` cannot be reached.
    struct Registry;
    impl ParentResolver for Registry {
        fn resolve(
            &self,
            name: &str,
            version: &VersionPattern,
        ) -> Result<StoredParent, ResolveError> {
            NoStore.resolve(name, version)
        }
        fn oci_tag_digest(
            &self,
            reference: &crate::recipe::OciReference,
        ) -> Option<Result<Sha256, crate::distribute::oci::OciError>> {
            use crate::distribute::oci::OciError;
            Some(match reference.to_string().as_str() {
                "127.0.0.1:5000/base:1" => Ok(Sha256::parse(&"ab".repeat(32)).unwrap()),
                r if r.starts_with("127.0.0.1:9/") => Err(OciError::Unreachable {
                    registry: "127.0.0.1:9".into(),
                    cause: "connection refused".into(),
                }),
                _ => Err(OciError::NotFound {
                    reference: reference.to_string(),
                }),
            })
        }
    }

    fn oci_recipe(parent: &str) -> String {
        format!("name: web\nversion: 1.0.0\nparentImage: {parent}\ncomponents:\n  - path: a.yml\n")
    }

    #[test]
    fn oci_parents_must_be_pinned_by_their_manifest_digest() {
        let f = Fixture::new();
        let env = |_: &str| None;
        let digest = format!("sha256:{}", "cd".repeat(32));
        f.write(
            "recipe.yml",
            &oci_recipe(&format!("oci://127.0.0.1:5000/base:1@{digest}")),
        );
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let pinned = plan(validated, &Registry, &env, &mut |_| {}).unwrap();
        assert_eq!(
            pinned.parent,
            PlannedParent::Oci {
                reference: format!("127.0.0.1:5000/base:1@{digest}"),
                manifest_digest: Sha256::parse(&digest).unwrap(),
            }
        );
        assert_eq!(pinned.parent.resolved_tag(), None);
        f.write("recipe.yml", &oci_recipe("oci://127.0.0.1:5000/base:1"));
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let err = plan(validated, &Registry, &env, &mut |_| {}).unwrap_err();
        assert!(matches!(err, PlanError::Invalid(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("must be pinned"), "{text}");
        assert!(
            text.contains(&format!(
                "oci://127.0.0.1:5000/base:1@sha256:{}",
                "ab".repeat(32)
            )) && text.contains("--resolve-tags"),
            "the hint names the current digest and the flag: {text}"
        );
    }

    #[test]
    fn a_tag_is_pinned_to_its_digest_when_tags_are_resolved() {
        let f = Fixture::new();
        let env = |_: &str| None;
        f.write("recipe.yml", &oci_recipe("oci://127.0.0.1:5000/base:1"));
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let pinned = plan(validated, &ResolveTags(&Registry), &env, &mut |_| {}).unwrap();
        let ab = Sha256::parse(&"ab".repeat(32)).unwrap();
        assert_eq!(
            pinned.parent,
            PlannedParent::Oci {
                reference: "127.0.0.1:5000/base:1".into(),
                manifest_digest: ab.clone(),
            }
        );
        assert_eq!(
            pinned.parent.resolved_tag().unwrap(),
            format!("127.0.0.1:5000/base:1@sha256:{ab}")
        );
        // The digest is an input like any other: it is in the plan's digest and layer keys.
        assert_eq!(pinned.parent.sha256(), &ab);

        // A tag the registry does not hold is a problem of the recipe, at `parentImage`.
        f.write("recipe.yml", &oci_recipe("oci://127.0.0.1:5000/base:2"));
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let err = plan(validated, &ResolveTags(&Registry), &env, &mut |_| {}).unwrap_err();
        assert!(matches!(err, PlanError::Invalid(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("recipe.yml:3:14") && text.contains("127.0.0.1:5000/base has no tag `2`"),
            "{text}"
        );

        // A registry that cannot be asked is a host problem, still located in the recipe.
        f.write("recipe.yml", &oci_recipe("oci://127.0.0.1:9/base:1"));
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let err = plan(validated, &ResolveTags(&Registry), &env, &mut |_| {}).unwrap_err();
        assert!(matches!(err, PlanError::Registry { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("recipe.yml:3:14")
                && text
                    .contains("cannot resolve the tag of `oci://127.0.0.1:9/base:1`: cannot reach")
                && text.contains("connection refused"),
            "{text}"
        );
        assert!(err.hint().unwrap().contains("registry is running"));
    }

    #[test]
    fn a_known_digest_is_not_recomputed() {
        struct Known(std::cell::Cell<usize>);
        impl ParentResolver for Known {
            fn resolve(
                &self,
                name: &str,
                version: &VersionPattern,
            ) -> Result<StoredParent, ResolveError> {
                NoStore.resolve(name, version)
            }
            fn known_digest(&self, _: &Path) -> Option<Sha256> {
                Sha256::parse(&"cd".repeat(32))
            }
            fn remember_digest(&self, _: &Path, _: &Sha256) {
                self.0.set(self.0.get() + 1);
            }
        }
        let f = Fixture::new();
        let env = |_: &str| None;
        let validated = validate(&f.path("recipe.yml"), &env).unwrap();
        let known = Known(std::cell::Cell::new(0));
        let mut hashed = false;
        let plan = plan(validated, &known, &env, &mut |_| hashed = true).unwrap();
        assert!(!hashed);
        assert_eq!(known.0.get(), 0);
        assert_eq!(plan.parent.sha256().as_str(), "cd".repeat(32));
    }

    #[test]
    fn other_disk_formats_are_refused() {
        let f = Fixture::new();
        f.write_bytes("base.raw", b"KDMV\x01\x00\x00\x00 and so on");
        assert!(problems(f.plan().unwrap_err())[0].contains("is a VMDK image"));
    }
}
