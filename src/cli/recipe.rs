//! `builder validate recipe.yml`, `builder plan recipe.yml [--json]`, `builder schema recipe`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anstream::{eprint, eprintln};
use clap::{Args, ValueEnum};

use super::{CliResult, EXIT_INPUT, Failure, env, worst_of};
use builder::build::plan::{
    self, ParentResolver, Plan, PlanError, PlannedComponent, PlannedParent, ResolveError, Stage,
    StoredParent,
};
use builder::build::reuse::{self, Missing, Preview, Status};
use builder::diagnostic::{Diagnostics, Severity};
use builder::recipe::{Boot, Format, VersionPattern};
use builder::store::LayerCache;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Recipes (YAML). The component documents and infrastructure file each names are
    /// checked too.
    #[arg(required = true, value_name = "RECIPE")]
    recipes: Vec<PathBuf>,
    /// Print the results as JSON on stdout (one entry per recipe, with every file's
    /// problems) instead of messages.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe (YAML).
    #[arg(value_name = "RECIPE")]
    recipe: PathBuf,
    /// Print the plan as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Accept a `parentImage: oci://host/repo:tag` without `@sha256:…`: ask the registry what
    /// the tag points to now and pin that manifest digest in the plan, as `builder build
    /// --resolve-tags` and every pipeline execution do.
    #[arg(long)]
    resolve_tags: bool,
    /// Show the plan of `builder build --no-cache`: every layer runs.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Which file's schema.
    #[arg(value_enum)]
    kind: SchemaKind,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SchemaKind {
    /// Recipe files.
    Recipe,
}

/// Print every file's problems (errors and warnings), coloured when stderr allows it.
pub(super) fn show(files: &[Diagnostics]) {
    for (i, d) in files.iter().filter(|d| !d.is_empty()).enumerate() {
        if i > 0 {
            eprintln!();
        }
        eprint!("{}", d.render(true));
    }
}

pub(super) fn failure(error: PlanError) -> Failure {
    match error {
        PlanError::Invalid(files) => {
            show(&files);
            Failure::already_printed(EXIT_INPUT)
        }
        e @ (PlanError::Unreadable(_) | PlanError::Changed { .. } | PlanError::NotUtf8 { .. }) => {
            Failure::input(e)
        }
        e @ (PlanError::Io(_) | PlanError::Store { .. }) => Failure::host(e),
        e @ PlanError::Registry { .. } => {
            let hint = e.hint();
            let failure = Failure::host(e);
            match hint {
                Some(hint) => failure.with_hint(hint),
                None => failure,
            }
        }
    }
}

/// Say which digest a tag-only OCI parent was pinned to (`--resolve-tags`), on stderr.
pub(super) fn show_resolved_tag(plan: &Plan) {
    if let Some(pinned) = plan.parent.resolved_tag() {
        eprintln!("parent image: pinned oci://{pinned} (what the tag points to now)");
    }
}

pub fn validate(args: ValidateArgs) -> CliResult {
    if args.json {
        return validate_json(&args.recipes);
    }
    // Every recipe is checked even when an earlier one is invalid; the exit code is the
    // worst outcome (2 invalid, 3 host problem).
    let mut worst = 0;
    for recipe in &args.recipes {
        if let Err(failure) = validate_one(recipe) {
            super::report(&failure);
            worst = worst.max(failure.code);
        }
    }
    worst_of(worst)
}

#[derive(Serialize)]
struct JsonRecipe {
    recipe: PathBuf,
    valid: bool,
    /// Why the recipe could not be checked at all (unreadable file, host problem).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Every file with problems (errors or warnings): the recipe, an infrastructure file,
    /// component documents.
    files: Vec<JsonFile>,
}

#[derive(Serialize)]
struct JsonFile {
    path: PathBuf,
    problems: Vec<JsonProblem>,
}

#[derive(Serialize)]
struct JsonProblem {
    line: usize,
    col: usize,
    severity: Severity,
    message: String,
    hint: Option<String>,
}

fn json_files(files: &[Diagnostics]) -> Vec<JsonFile> {
    files
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| JsonFile {
            path: d.path().to_path_buf(),
            problems: d
                .problems()
                .iter()
                .map(|p| JsonProblem {
                    line: p.span.line,
                    col: p.span.col,
                    severity: p.severity,
                    message: p.message.clone(),
                    hint: p.hint.clone(),
                })
                .collect(),
        })
        .collect()
}

fn validate_json(recipes: &[PathBuf]) -> CliResult {
    let mut worst = 0;
    let mut results = Vec::new();
    for recipe in recipes {
        let (valid, error, files) = match plan::validate(recipe, &env) {
            Ok(validated) => (true, None, json_files(&validated.warnings)),
            Err(PlanError::Invalid(files)) => {
                worst = worst.max(EXIT_INPUT);
                (false, None, json_files(&files))
            }
            Err(e) => {
                let failure = failure(e);
                worst = worst.max(failure.code);
                let chain: Vec<String> = failure.error.chain().map(|c| c.to_string()).collect();
                (false, Some(chain.join(": ")), Vec::new())
            }
        };
        results.push(JsonRecipe {
            recipe: recipe.clone(),
            valid,
            error,
            files,
        });
    }
    let json = serde_json::to_string_pretty(&results)
        .map_err(|e| Failure::failed(anyhow::Error::new(e).context("could not write JSON")))?;
    stdout(&(json + "\n"))?;
    worst_of(worst)
}

fn validate_one(path: &std::path::Path) -> CliResult {
    let validated = plan::validate(path, &env).map_err(failure)?;
    show(&validated.warnings);
    let r = &validated.recipe;
    let count = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let mut summary = format!(
        "ok: {} ({} {}: {}{}",
        path.display(),
        r.name,
        r.version,
        if r.is_container() {
            "a container image, "
        } else {
            ""
        },
        count(validated.components.len(), "component")
    );
    if !validated.test_components.is_empty() {
        let _ = write!(
            summary,
            ", {}",
            count(validated.test_components.len(), "test component")
        );
    }
    summary.push(')');
    eprintln!("{summary}");
    Ok(0)
}

/// Opens the default store only when the recipe names a stored parent.
struct DefaultStore;

impl ParentResolver for DefaultStore {
    fn resolve(&self, name: &str, version: &VersionPattern) -> Result<StoredParent, ResolveError> {
        let store =
            builder::store::Store::open_default().map_err(|e| ResolveError::Failed(Box::new(e)))?;
        super::recover_abandoned(&store);
        ParentResolver::resolve(&store, name, version)
    }

    fn oci_tag_digest(
        &self,
        reference: &builder::recipe::OciReference,
    ) -> Option<Result<builder::recipe::Sha256, builder::distribute::oci::OciError>> {
        Some(plan::registry_tag_digest(reference))
    }
}

pub fn plan(args: PlanArgs) -> CliResult {
    let validated = plan::validate(&args.recipe, &env).map_err(failure)?;
    show(&validated.warnings);
    let hashing = super::bar::Hashing::new(true);
    let mut progress = |p: builder::digest::Hashed<'_>| hashing.show(&p);
    let result = if args.resolve_tags {
        plan::plan(
            validated,
            &plan::ResolveTags(&DefaultStore),
            &env,
            &mut progress,
        )
    } else {
        plan::plan(validated, &DefaultStore, &env, &mut progress)
    };
    hashing.end();
    let plan = result.map_err(failure)?;
    show_resolved_tag(&plan);
    // Read only: planning never creates the store or its cache.
    let layers = builder::store::Store::default_root()
        .map_err(anyhow::Error::new)
        .and_then(|root| {
            let cache = LayerCache::read_only(&root);
            Ok(reuse::preview(&plan, &cache, args.no_cache)?)
        });
    let layers = match layers {
        Ok(layers) => Some(layers),
        Err(e) => {
            eprintln!("warning: the layer cache could not be read: {e:#}");
            None
        }
    };
    if args.json {
        let shown = JsonPlan {
            plan: &plan,
            layers: layers
                .as_deref()
                .map(|l| l.iter().map(JsonLayer::from).collect()),
        };
        let json = serde_json::to_string_pretty(&shown).map_err(|e| {
            Failure::failed(anyhow::Error::new(e).context("could not write the plan as JSON"))
        })?;
        stdout(&(json + "\n"))
    } else {
        stdout(&describe(&plan, layers.as_deref()))
    }
}

/// `builder plan --json`: the plan, and what the layer cache holds for it.
#[derive(Serialize)]
struct JsonPlan<'a> {
    #[serde(flatten)]
    plan: &'a Plan,
    /// Boot, each component, generalize: cached or run, and why. Absent when the cache could
    /// not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<Vec<JsonLayer>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonLayer {
    /// `boot`, the component's label, or `generalize`.
    layer: String,
    key: String,
    /// `cached` or `run`, as the build's `layerCache` events say.
    status: &'static str,
    /// Cached: the build that made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    build: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used: Option<chrono::DateTime<chrono::Utc>>,
    /// Cached from a registry (`--cache-from`): which.
    #[serde(skip_serializing_if = "Option::is_none")]
    pulled_from: Option<String>,
    /// Run: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Run because inputs changed: each change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    changes: Vec<String>,
}

impl From<&Preview> for JsonLayer {
    fn from(p: &Preview) -> Self {
        let pulled_from = match &p.status {
            Status::Cached(record) => record.source.clone(),
            Status::Run { .. } => None,
        };
        let (status, build, last_used, reason, changes) = match &p.status {
            Status::Cached(record) => (
                "cached",
                Some(record.build.clone()),
                Some(record.last_used),
                None,
                Vec::new(),
            ),
            Status::Run { missing, .. } => {
                let changes = match missing {
                    Some(Missing::Changed { changes, .. }) => {
                        changes.iter().map(ToString::to_string).collect()
                    }
                    _ => Vec::new(),
                };
                ("run", None, None, p.status.why(), changes)
            }
        };
        JsonLayer {
            layer: p.name.clone(),
            key: p.key.clone(),
            status,
            build,
            last_used,
            pulled_from,
            reason,
            changes,
        }
    }
}

/// One layer's line under its stage: `cached    layer 3f2a91c0d4e5, made by …` or
/// `will run  layer 3f2a91c0d4e5: why`, a change a line.
fn layer_line(s: &mut String, layer: &Preview, pad: usize) {
    let short: String = layer.key.chars().take(12).collect();
    match &layer.status {
        Status::Cached(record) => {
            let _ = write!(
                s,
                "\n{:pad$}cached    layer {short}, made by {}, last used {}",
                "",
                record.build,
                reuse::when(record.last_used)
            );
            if let Some(source) = &record.source {
                let _ = write!(s, ", pulled from {source}");
            }
        }
        Status::Run {
            missing: Some(Missing::Changed { build, changes }),
            ..
        } if !changes.is_empty() => {
            let _ = write!(
                s,
                "\n{:pad$}will run  layer {short}: changed since the layer {build} made here:",
                ""
            );
            for change in changes {
                let _ = write!(s, "\n{:pad$}            {change}", "");
            }
        }
        Status::Run { .. } => {
            let why = layer.status.why().unwrap_or_default();
            let _ = write!(s, "\n{:pad$}will run  layer {short}: {why}", "");
        }
    }
}

pub fn schema(args: SchemaArgs) -> CliResult {
    let schema = match args.kind {
        SchemaKind::Recipe => builder::recipe::settings::json_schema(),
    };
    let json = serde_json::to_string_pretty(&schema)
        .map_err(|e| Failure::failed(anyhow::Error::new(e).context("could not write JSON")))?;
    stdout(&(json + "\n"))
}

/// Write data to stdout; a reader that went away (`| head`) is not an error.
fn stdout(text: &str) -> CliResult {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(Failure::host(
            anyhow::Error::new(e).context("could not write to stdout"),
        )),
    }
}

/// The plan for people: every setting with defaults filled in, the pins, and the stages;
/// with `layers` ([`reuse::preview`]), whether each layer is cached or runs, and why.
pub fn describe(plan: &Plan, layers: Option<&[Preview]>) -> String {
    // A container image's layers are buildah's: the disk layer cache says nothing of them.
    let layers = layers.filter(|_| plan.container.is_none());
    let layer = |i: usize| layers.and_then(|l| l.get(i));
    let mut out = String::new();
    let r = &plan.recipe;
    let _ = writeln!(out, "plan for {} {}", r.name, r.version);
    if let Some(d) = &r.description {
        let _ = writeln!(out, "  {d}");
    }
    let _ = writeln!(
        out,
        "  recipe          {} (sha256 {})",
        r.local_path.display(),
        r.sha256
    );
    let _ = writeln!(out, "  plan digest     {}", plan.digest());
    let _ = writeln!(out);

    let _ = writeln!(out, "settings");
    match &plan.parent {
        PlannedParent::File {
            path,
            local_path,
            sha256,
            format,
            virtual_size,
        } => {
            let _ = writeln!(out, "  parent image    {path} → {}", local_path.display());
            let _ = writeln!(
                out,
                "                  {format}, virtual size {virtual_size}, sha256 {sha256}"
            );
        }
        PlannedParent::Url { url, sha256 } => {
            let _ = writeln!(out, "  parent image    {url}");
            let _ = writeln!(
                out,
                "                  downloaded by the build, sha256 {sha256}"
            );
        }
        PlannedParent::Store {
            reference,
            resolved,
            local_path,
            sha256,
            virtual_size,
            ..
        } => {
            let _ = writeln!(
                out,
                "  parent image    {reference} → {resolved} ({})",
                local_path.display()
            );
            let _ = writeln!(
                out,
                "                  virtual size {virtual_size}, sha256 {sha256}"
            );
        }
        PlannedParent::Archive {
            path,
            local_path,
            sha256,
        } => {
            let _ = writeln!(out, "  parent image    {path} → {}", local_path.display());
            let _ = writeln!(out, "                  OCI archive, sha256 {sha256}");
        }
        PlannedParent::StoredContainer {
            reference,
            resolved,
            layout,
            manifest_digest,
        } => {
            let _ = writeln!(
                out,
                "  parent image    {reference} → {resolved} ({})",
                layout.display()
            );
            let _ = writeln!(out, "                  manifest sha256:{manifest_digest}");
        }
        PlannedParent::Oci {
            reference,
            manifest_digest,
        } => {
            let _ = writeln!(out, "  parent image    oci://{reference}");
            let _ = writeln!(
                out,
                "                  manifest sha256:{manifest_digest}{}",
                if plan.parent.resolved_tag().is_some() {
                    " (what the tag points to now)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "                  pulled by the build (manifest pinned, layer digest verified)"
            );
        }
    }
    let disk = match (plan.disk_size, plan.parent.virtual_size()) {
        (Some(size), _) => size.to_string(),
        (None, Some(parent)) => format!("{parent} (the parent's)"),
        (None, None) => "the parent's".to_string(),
    };
    let i = &plan.infrastructure;
    if let Some(container) = &plan.container {
        let _ = writeln!(
            out,
            "  image           a container image ({}), built by buildah",
            container.container_type
        );
        let mut label = "template";
        for line in container.template.text().lines() {
            let _ = writeln!(out, "  {label:<15} {line}");
            label = "";
        }
    } else {
        let _ = writeln!(out, "  disk size       {disk}");
    }
    let _ = writeln!(out, "  working dir     {}", plan.working_directory);
    if plan.container.is_none() {
        let user_data = match &plan.user_data {
            Some(u) => format!("{} lines of cloud-config", u.lines().count()),
            None => "none".to_string(),
        };
        let _ = writeln!(out, "  user data       {user_data}");
    }
    // The sections a pipeline may override, key by key as declared (and named as in files).
    let sections = [
        ("infrastructure", serde_json::to_value(&plan.infrastructure)),
        ("tests", serde_json::to_value(&plan.tests)),
    ];
    for (section, value) in sections {
        let value = value.unwrap_or_default();
        let mut label = section;
        for key in builder::recipe::settings::keys(section) {
            // A container recipe has only these of the infrastructure's keys.
            if plan.container.is_some()
                && section == "infrastructure"
                && !matches!(key, "buildTimeoutSeconds" | "keepOnFailure")
            {
                continue;
            }
            let shown = match value.get(key) {
                // Written in the plan only when not `full`; shown always.
                None if section == "infrastructure" && key == "boot" => i.boot.to_string(),
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    v.to_string()
                }
                _ => continue,
            };
            let _ = writeln!(out, "  {label:<15} {key} {shown}");
            label = "";
        }
    }
    let formats: Vec<String> = plan
        .outputs
        .formats
        .iter()
        .map(|f| match f {
            Format::Qcow2 => format!("qcow2 ({})", plan.outputs.compression),
            other => other.to_string(),
        })
        .collect();
    if plan.container.is_none() {
        let _ = writeln!(
            out,
            "  generalize      {}",
            if plan.generalize {
                "yes (cloud-init clean, machine-id, ssh host keys, logs, fstrim)"
            } else {
                "no (only builder's agent is removed)"
            }
        );

        let _ = writeln!(
            out,
            "  outputs         {} named `{}`",
            formats.join(", "),
            plan.outputs.name
        );
    }
    if let Some(dir) = &plan.outputs.local_directory {
        let _ = writeln!(out, "  copied to       {}", dir.display());
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "stages");
    let stages = plan.stages();
    let width = stages.len().to_string().len();
    for (n, stage) in stages.iter().enumerate() {
        let n = n + 1;
        let what = match stage {
            Stage::Fetch => match &plan.parent {
                PlannedParent::File { .. } => {
                    "local file; the build checks it still has the sha256 above".to_string()
                }
                PlannedParent::Url { .. } => {
                    "download into the cache (resumable), verify sha256".to_string()
                }
                PlannedParent::Store { resolved, .. } => format!("{resolved} from the store"),
                PlannedParent::Archive { .. } => {
                    "import the OCI archive into the container engine (sha256 checked)".to_string()
                }
                PlannedParent::StoredContainer { resolved, .. } => {
                    format!("{resolved} from the store into the container engine")
                }
                PlannedParent::Oci { .. } if plan.container.is_some() => {
                    "pull into the container engine, pinned by the manifest digest".to_string()
                }
                PlannedParent::Oci { .. } => {
                    "pull from the registry into the cache, verify the layer digest".to_string()
                }
            },
            Stage::Overlay => format!("qcow2 on the parent, {disk}"),
            Stage::Boot => {
                let mut s = match i.boot {
                    Boot::Full => format!(
                        "cloud-init NoCloud seed with the agent{}; agent expected within {}s",
                        if plan.user_data.is_some() {
                            " and the user data"
                        } else {
                            ""
                        },
                        i.boot_timeout_secs
                    ),
                    Boot::Appliance => format!(
                        "appliance: the host's kernel, the agent as init, steps in a chroot of the image's root{}; agent expected within {}s",
                        if plan.disk_size.is_some() {
                            ", root grown with the image's growpart"
                        } else {
                            ""
                        },
                        i.boot_timeout_secs
                    ),
                };
                if let Some(l) = layer(0) {
                    layer_line(&mut s, l, width + 20);
                }
                s
            }
            Stage::Component(index) => {
                let c = &plan.components[*index];
                let phases: Vec<&str> = c
                    .phases
                    .iter()
                    .map(String::as_str)
                    .filter(|p| *p != "test")
                    .collect();
                let mut s = format!(
                    "{} ({}): {}",
                    c.label(),
                    c.path,
                    if phases.is_empty() {
                        "no build phases".to_string()
                    } else {
                        phases.join(" + ")
                    }
                );
                component_details(&mut s, c, width);
                if let Some(key) = &c.layer_key {
                    let _ = write!(s, "\n{:w$}layer key {key}", "", w = width + 20);
                }
                if let Some(l) = layer(index + 1) {
                    layer_line(&mut s, l, width + 20);
                }
                s
            }
            Stage::Generalize => {
                let mut s =
                    "cloud-init clean, machine-id, ssh host keys, agent, logs, fstrim".to_string();
                if let Some(l) = layer(plan.components.len() + 1) {
                    layer_line(&mut s, l, width + 20);
                }
                s
            }
            Stage::Shutdown => format!(
                "guest power-off (agent, else ACPI), hard stop after {}s",
                i.shutdown_timeout_secs
            ),
            Stage::Test => {
                let mut s = "fresh VM from the result (the image's own boot); ".to_string();
                let with_tests: Vec<&str> = plan
                    .components
                    .iter()
                    .filter(|c| c.phases.iter().any(|p| p == "test"))
                    .map(PlannedComponent::label)
                    .collect();
                s.push_str(&if with_tests.is_empty() {
                    "no component has a test phase".to_string()
                } else {
                    format!("test phases of {}", with_tests.join(", "))
                });
                for c in &plan.tests.components {
                    let _ = write!(
                        s,
                        "\n{:w$}+ test component {} ({})",
                        "",
                        c.label(),
                        c.path,
                        w = width + 20
                    );
                    component_details(&mut s, c, width);
                }
                s
            }
            Stage::Export => formats.join(", "),
            Stage::Store => format!(
                "{}/{}/<next build number>{}",
                r.name,
                r.version,
                plan.outputs
                    .local_directory
                    .as_ref()
                    .map(|d| format!(", copy to {}", d.display()))
                    .unwrap_or_default()
            ),
            Stage::Distribute => {
                let targets: Vec<String> =
                    plan.distribution.iter().map(|t| t.to_string()).collect();
                targets.join(", ")
            }
        };
        // Named as the build's events name them (`--json`'s `stageStarted`).
        let line = format!("{:<15} {what}", stage.name());
        let _ = writeln!(out, "  {n:>width$}. {line}");
    }
    if !plan.tests.enabled {
        let _ = writeln!(out, "  (tests are disabled)");
    }
    out
}

fn component_details(s: &mut String, c: &PlannedComponent, width: usize) {
    let pad = width + 20;
    let _ = write!(s, "\n{:pad$}sha256 {}", "", c.sha256);
    if !c.parameters.is_empty() {
        let params: Vec<String> = c
            .parameters
            .iter()
            .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
            .collect();
        let _ = write!(s, "\n{:pad$}parameters {}", "", params.join(", "));
    }
    for d in &c.documents {
        let _ = write!(
            s,
            "\n{:pad$}runs {} (ExecuteDocument), sha256 {}",
            "", d.path, d.sha256
        );
    }
}
