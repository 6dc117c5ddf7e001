//! `builder images list|show|rm`: the image versions in the local store.
//! stdout carries the listing (a table or `--json`); messages go to stderr.

use std::io::Write;

use anstream::eprintln;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::{CliResult, Failure};
use builder::store::Manifest;
use builder::store::{
    Abandoned, FailedBuild, ImageRef, Store, StoreError, StoredImage, human_size,
};

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// List stored builds (and failed ones, whose logs are kept): NAME VERSION BUILD CREATED
    /// STATUS KIND FORMATS SIZE SENT.
    List(ListArgs),
    /// Show one build: its manifest summary, outputs with sha256, and where its logs are.
    /// A partial reference (`web`, `web/1.x.x`) shows the newest matching build.
    Show(ShowArgs),
    /// Remove stored builds. A reference matching several builds needs `--all` (or `--yes`);
    /// an image another stored build was made from needs `--force`.
    Rm(RmArgs),
    /// Which installed packages of a stored build have newer versions in its repositories now:
    /// NAME INSTALLED → CANDIDATE REPOSITORY. Checked on the host (no VM), from the package
    /// list and sources its manifest records, with the signatures verified by the keys the
    /// image trusts. Exit 0 (updates or not), 1 when the check failed.
    Outdated(OutdatedArgs),
}

#[derive(Debug, Args)]
pub struct OutdatedArgs {
    /// `NAME`, `NAME/VERSION` (with `x` wildcards, like `1.x.x`) or `NAME/VERSION/BUILD`: the
    /// newest matching build.
    #[arg(value_name = "NAME[/VERSION[/BUILD]]")]
    reference: String,
    /// Print the result as JSON on stdout (`packagesChecked`, `repositories`, `updates`).
    #[arg(long)]
    json: bool,
    /// Only updates from security repositories (a Release `Label` with "Security", or a suite
    /// ending in `-security`).
    #[arg(long)]
    security_only: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the builds this pipeline produced (from the pipeline history).
    #[arg(long, value_name = "NAME")]
    pipeline: Option<String>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// `NAME`, `NAME/VERSION` (with `x` wildcards, like `1.x.x`) or `NAME/VERSION/BUILD`.
    #[arg(value_name = "NAME[/VERSION[/BUILD]]")]
    reference: String,
    /// Print the manifest and the build's folders as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Also recompute the sha256 of every output and compare it with the manifest
    /// (exit 1 if one differs).
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// `NAME`, `NAME/VERSION` (with `x` wildcards) or `NAME/VERSION/BUILD`.
    #[arg(value_name = "NAME[/VERSION[/BUILD]]")]
    reference: String,
    /// Remove every build the reference matches.
    #[arg(long)]
    all: bool,
    /// Do not ask: same as `--all` for a reference that matches several builds.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Remove even if another stored build uses it as its parent image.
    #[arg(long)]
    force: bool,
    /// Also prune the caches: the layer cache down to its cap (`layerCache.maxSize` in the
    /// store's config.yml) and its leftovers (never a layer a running build uses), then the
    /// cached parent images (`cache/base/`) that no remaining stored build was made from and
    /// no cached layer is built on (never one a stored build references; nothing while a
    /// build runs).
    #[arg(long)]
    prune_cache: bool,
}

pub async fn main(command: ImagesCommand) -> CliResult {
    let (store, abandoned) = super::open_store(None)?;
    match command {
        ImagesCommand::List(args) => list(&store, &args, &abandoned),
        ImagesCommand::Show(args) => show(&store, &args).await,
        ImagesCommand::Rm(args) => rm(&store, &args),
        ImagesCommand::Outdated(args) => outdated(&store, &args).await,
    }
}

async fn outdated(store: &Store, args: &OutdatedArgs) -> CliResult {
    let reference = parse_ref(&args.reference)?;
    let image = store.resolve(&reference).map_err(store_failure)?;
    let name = image.reference();
    eprintln!("checking the package repositories of {name}…");
    let checked = builder::packages::image::check_image(store, &name, &image.manifest).await;
    let mut outdated = checked.map_err(|e| {
        let hint = e.hint();
        let failure = Failure::failed(e);
        match hint {
            Some(h) => failure.with_hint(h),
            None => failure,
        }
    })?;
    if args.security_only {
        outdated = outdated.security_only();
    }
    if args.json {
        super::print_json(&outdated);
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", outdated_table(&outdated.updates));
    eprintln!("{name}: {}", outdated.summary());
    Ok(0)
}

/// `name  installed → candidate  repository`, aligned as in the example; a package
/// installed for several architectures is named `name:arch`.
fn outdated_table(updates: &[builder::packages::Update]) -> String {
    let label = |u: &builder::packages::Update| {
        if updates.iter().filter(|o| o.name == u.name).count() > 1 {
            format!("{}:{}", u.name, u.arch)
        } else {
            u.name.clone()
        }
    };
    let name_w = updates
        .iter()
        .map(|u| label(u).chars().count())
        .max()
        .unwrap_or(0);
    let from_w = updates
        .iter()
        .map(|u| u.installed.chars().count())
        .max()
        .unwrap_or(0);
    let to_w = updates
        .iter()
        .map(|u| u.candidate.chars().count())
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    for u in updates {
        s.push_str(&format!(
            "{:name_w$}  {:from_w$} → {:to_w$}  {}\n",
            label(u),
            u.installed,
            u.candidate,
            u.repository
        ));
    }
    s
}

/// Exit 2 for what the user can fix by asking differently, 3 for the host (disk, permissions).
pub(super) fn store_failure(e: StoreError) -> Failure {
    let hint = match &e {
        StoreError::NotFound { close, .. } if !close.is_empty() => Some(format!(
            "stored images with a close name: {}",
            close.join(", ")
        )),
        StoreError::NotFound { .. } => {
            Some("`builder images list` shows what is stored".to_string())
        }
        StoreError::InUse { .. } => Some("pass --force to remove it anyway".to_string()),
        StoreError::BadReference { .. } => {
            Some("references look like `web`, `web/1.x.x`, `web/1.2.0` or `web/1.2.0/3`".into())
        }
        StoreError::NoHome => Some(format!(
            "set {} to the folder the store should live in",
            builder::store::STORE_ENV
        )),
        _ => None,
    };
    let input = matches!(
        e,
        StoreError::NotFound { .. }
            | StoreError::InUse { .. }
            | StoreError::BadReference { .. }
            | StoreError::BadName { .. }
    );
    let failure = if input {
        Failure::input(e)
    } else {
        Failure::host(e)
    };
    match hint {
        Some(h) => failure.with_hint(h),
        None => failure,
    }
}

fn parse_ref(s: &str) -> Result<ImageRef, Failure> {
    s.parse::<ImageRef>().map_err(store_failure)
}

/// One row of `images list`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    reference: String,
    name: String,
    version: String,
    build: u32,
    created: chrono::DateTime<chrono::Utc>,
    status: String,
    /// `machine` or `container` (empty for a failed build).
    #[serde(skip_serializing_if = "String::is_empty")]
    kind: String,
    /// Output formats; `oci` for a container build (its OCI image layout).
    formats: Vec<String>,
    /// Bytes of all outputs (a container build's: its image's blobs).
    size: u64,
    dir: std::path::PathBuf,
    logs: std::path::PathBuf,
    /// Where the build was distributed: receipt kinds and locations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sent: Vec<String>,
    /// Failed builds: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    /// A build abandoned by its process (killed, crashed) that this command cleaned up:
    /// what it removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    cleaned: Option<Abandoned>,
}

fn row(image: &StoredImage) -> Row {
    Row {
        reference: image.reference(),
        name: image.name.clone(),
        version: image.version.to_string(),
        build: image.build,
        created: image.manifest.created,
        status: image.manifest.status.to_string(),
        kind: image.kind().to_string(),
        formats: image
            .manifest
            .outputs
            .iter()
            .map(|a| a.format.to_string())
            .chain(image.manifest.container.as_ref().map(|_| "oci".to_string()))
            .collect(),
        size: image.outputs_size(),
        dir: image.dir.clone(),
        logs: image.logs_dir(),
        sent: image
            .receipts()
            .iter()
            .map(|r| format!("{} {}", r.kind, r.location))
            .collect(),
        failure: None,
        cleaned: None,
    }
}

fn failed_row(f: &FailedBuild) -> Row {
    Row {
        reference: f.reference(),
        name: f.record.name.clone(),
        version: f.record.version.clone(),
        build: f.record.build,
        created: f.record.started,
        status: "failed".into(),
        kind: String::new(),
        formats: Vec::new(),
        size: 0,
        dir: f.dir.clone(),
        logs: f.logs_dir(),
        sent: Vec::new(),
        failure: f.record.failure.clone(),
        cleaned: None,
    }
}

fn list(store: &Store, args: &ListArgs, abandoned: &[Abandoned]) -> CliResult {
    let listing = store.list().map_err(store_failure)?;
    for problem in &listing.unreadable {
        warn(problem);
    }
    let mut rows: Vec<Row> = listing.images.iter().map(row).collect();
    rows.extend(listing.failed.iter().map(|f| {
        let mut r = failed_row(f);
        r.cleaned = abandoned
            .iter()
            .find(|a| a.build_id == f.record.build_id)
            .cloned();
        r
    }));
    let history = pipeline_view(store, args.pipeline.as_deref())?;
    if let Some(only) = &history.only {
        rows.retain(|r| only.contains(&r.reference));
    }
    for r in &mut rows {
        if history.deprecated.contains(&r.reference) {
            // Image Builder's state for an image lifecycle deprecated.
            r.status = "deprecated".into();
        }
    }
    rows.sort_by(|a, b| {
        let key = |r: &Row| {
            (
                r.name.clone(),
                r.version.parse::<builder::recipe::Version>().ok(),
                r.build,
            )
        };
        key(a).cmp(&key(b))
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        super::print_json(&rows);
        return Ok(0);
    }
    if rows.is_empty() {
        eprintln!("no images in the store ({})", store.root().display());
        return Ok(0);
    }
    let table: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.version.clone(),
                r.build.to_string(),
                r.created.format("%Y-%m-%d %H:%M").to_string(),
                r.status.clone(),
                if r.kind.is_empty() {
                    "-".into()
                } else {
                    r.kind.clone()
                },
                if r.formats.is_empty() {
                    "-".into()
                } else {
                    r.formats.join(",")
                },
                if r.formats.is_empty() {
                    "-".into()
                } else {
                    human_size(r.size)
                },
                sent_summary(&r.sent),
            ]
        })
        .collect();
    let header = [
        "NAME", "VERSION", "BUILD", "CREATED", "STATUS", "KIND", "FORMATS", "SIZE", "SENT",
    ];
    let _ = write!(out, "{}", super::table("", header, &table));
    Ok(0)
}

/// The distinct receipt kinds, in the order first sent: `directory,vagrant`, or `-`.
fn sent_summary(sent: &[String]) -> String {
    let mut kinds: Vec<&str> = Vec::new();
    for s in sent {
        let kind = s.split(' ').next().unwrap_or_default();
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    if kinds.is_empty() {
        "-".into()
    } else {
        kinds.join(",")
    }
}

fn warn(problem: &StoreError) {
    let mut msg = format!("warning: {problem}");
    for cause in builder::diagnostic::causes(problem) {
        msg.push_str(&format!("\n  Caused by: {cause}"));
    }
    eprintln!("{msg}");
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShowJson<'a> {
    reference: String,
    status: String,
    dir: &'a std::path::Path,
    logs: std::path::PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<&'a Manifest>,
    /// Where the build was distributed (`receipts.json`), oldest first.
    receipts: Vec<builder::store::Receipt>,
}

async fn show(store: &Store, args: &ShowArgs) -> CliResult {
    let reference = parse_ref(&args.reference)?;
    match store.resolve(&reference) {
        Ok(image) => {
            if args.verify {
                let img = image.clone();
                tokio::task::spawn_blocking(move || img.verify())
                    .await
                    .map_err(|e| Failure::host(anyhow::anyhow!("verification stopped: {e}")))?
                    .map_err(|e| match e {
                        e @ StoreError::DigestMismatch { .. } => Failure::failed(e),
                        e => store_failure(e),
                    })?;
                match &image.manifest.container {
                    Some(c) => eprintln!(
                        "verified: every blob of the image {} matches its digest",
                        c.manifest_digest
                    ),
                    None => eprintln!(
                        "verified: {} output(s) match their sha256",
                        image.manifest.outputs.len()
                    ),
                }
            }
            let mut out = std::io::stdout().lock();
            if args.json {
                let json = ShowJson {
                    reference: image.reference(),
                    status: image.manifest.status.to_string(),
                    dir: &image.dir,
                    logs: image.logs_dir(),
                    failure: None,
                    manifest: Some(&image.manifest),
                    receipts: image.receipts(),
                };
                super::print_json(&json);
            } else {
                let _ = write!(out, "{}", describe(&image));
            }
            Ok(0)
        }
        Err(StoreError::NotFound { .. }) if reference.is_exact() => {
            // A failed build keeps its number and its logs: show where they are.
            let Some(failed) = store.failed_build(&reference).map_err(store_failure)? else {
                return Err(store_failure(store.not_found(&reference)));
            };
            let manifest = Manifest::read(&failed.dir.join("manifest.json")).ok();
            let mut out = std::io::stdout().lock();
            if args.json {
                let json = ShowJson {
                    reference: failed.reference(),
                    status: "failed".into(),
                    dir: &failed.dir,
                    logs: failed.logs_dir(),
                    failure: failed.record.failure.as_deref(),
                    manifest: manifest.as_ref(),
                    receipts: Vec::new(),
                };
                super::print_json(&json);
            } else {
                let _ = writeln!(out, "{}", failed.reference());
                let _ = writeln!(out, "  status:   failed");
                if let Some(f) = &failed.record.failure {
                    let _ = writeln!(out, "  failure:  {f}");
                }
                let _ = writeln!(
                    out,
                    "  started:  {}",
                    failed.record.started.format("%Y-%m-%d %H:%M:%S UTC")
                );
                let _ = writeln!(out, "  build id: {}", failed.record.build_id);
                let _ = writeln!(out, "  logs:     {}", failed.logs_dir().display());
            }
            Ok(0)
        }
        Err(e) => Err(store_failure(e)),
    }
}

/// The human summary of a stored build.
fn describe(image: &StoredImage) -> String {
    use std::fmt::Write as _;
    let m = &image.manifest;
    let mut s = String::new();
    let _ = writeln!(s, "{}", image.reference());
    let _ = writeln!(s, "  kind:       {}", m.kind);
    let _ = writeln!(s, "  status:     {}", m.status);
    let _ = writeln!(
        s,
        "  created:    {} by builder {} (build id {})",
        m.created.format("%Y-%m-%d %H:%M:%S UTC"),
        m.builder_version,
        m.build_id
    );
    let _ = writeln!(s, "  folder:     {}", image.dir.display());
    let _ = writeln!(s, "  logs:       {}", image.logs_dir().display());
    if let Some(p) = &m.inputs.parent {
        let exact = p
            .store_image
            .as_ref()
            .map(|r| format!(" = {r}"))
            .unwrap_or_default();
        let _ = writeln!(s, "  parent:     {}{exact} (sha256 {})", p.source, p.sha256);
    }
    for (i, c) in m.inputs.components.iter().enumerate() {
        let label = if i == 0 { "components:" } else { "" };
        let _ = writeln!(
            s,
            "  {label:<11} {} from {} (sha256 {})",
            c.name, c.path, c.sha256
        );
        for d in &c.documents {
            let _ = writeln!(
                s,
                "  {:<11}   runs {} (ExecuteDocument, sha256 {})",
                "", d.path, d.sha256
            );
        }
    }
    if !m.plan_digest.is_empty() {
        let _ = writeln!(s, "  plan:       sha256 {}", m.plan_digest);
    }
    if !m.host.qemu_version.is_empty() || !m.host.accelerator.is_empty() {
        let _ = writeln!(
            s,
            "  host:       {}, accelerator {}, firmware {}{}",
            m.host.qemu_version,
            m.host.accelerator,
            m.host.firmware,
            // Shown only when it is not the image's own boot (older manifests have none).
            if m.host.boot == "appliance" {
                ", build VM booted the appliance"
            } else {
                ""
            }
        );
    }
    if let Some(p) = &m.packages {
        let _ = writeln!(s, "  packages:   {} ({})", p.packages.len(), p.manager);
    }
    if let Some(p) = &m.package_sources {
        let _ = writeln!(s, "  package sources: {}", p.summary());
    }
    if let Some(c) = &m.package_changes {
        let _ = writeln!(s, "  package changes {}", c.summary());
        for p in &c.changed {
            let _ = writeln!(s, "    {} {} {} → {}", p.name, p.arch, p.from, p.to);
        }
        for p in &c.added {
            let _ = writeln!(s, "    + {} {} {}", p.name, p.arch, p.version);
        }
        for p in &c.removed {
            let _ = writeln!(s, "    - {} {} {}", p.name, p.arch, p.version);
        }
    }
    if !m.tests.is_empty() {
        let passed = m
            .tests
            .iter()
            .filter(|t| t.status == builder::store::manifest::Status::Success)
            .count();
        let _ = writeln!(
            s,
            "  tests:      {passed} passed, {} not",
            m.tests.len() - passed
        );
    }
    if let Some(c) = &m.container {
        let _ = writeln!(
            s,
            "  image:      {} ({}/{}, {})",
            image.dir.join(&c.layout).display(),
            c.os,
            c.architecture,
            human_size(c.size)
        );
        let _ = writeln!(s, "    manifest  {} ({})", c.manifest_digest, c.media_type);
        let _ = writeln!(s, "    config    {}", c.config_digest);
    } else if m.outputs.is_empty() {
        let _ = writeln!(s, "  outputs:    none");
    } else {
        let _ = writeln!(s, "  outputs:");
        let width = m.outputs.iter().map(|a| a.file.len()).max().unwrap_or(0);
        for a in &m.outputs {
            let _ = writeln!(
                s,
                "    {:<width$}  {:<5}  {:>10}  virtual {:>10}  sha256 {}",
                a.file,
                a.format.to_string(),
                human_size(a.size),
                human_size(a.virtual_size),
                a.sha256
            );
        }
    }
    let receipts = image.receipts();
    if receipts.is_empty() {
        let _ = writeln!(
            s,
            "  sent:       nowhere else (builder distribute sends it)"
        );
    } else {
        let _ = writeln!(s, "  sent:");
        for r in &receipts {
            let _ = writeln!(
                s,
                "    {}  {:<10} {}",
                r.finished.format("%Y-%m-%d %H:%M"),
                r.kind,
                r.location
            );
            for (role, digest) in &r.digests {
                // Receipts hold files' digests as bare hex, images' as `sha256:<hex>`.
                let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
                let _ = writeln!(s, "      {role}: sha256 {hex}");
            }
            for (role, id) in &r.ids {
                let _ = writeln!(s, "      {role}: {id}");
            }
        }
    }
    s
}

fn rm(store: &Store, args: &RmArgs) -> CliResult {
    let reference = parse_ref(&args.reference)?;
    let matches = store.matching(&reference).map_err(store_failure)?;
    if matches.is_empty() {
        // An exact reference may name a failed build: remove its logs.
        if reference.is_exact()
            && let Some(failed) = store.failed_build(&reference).map_err(store_failure)?
        {
            store.remove_failed(&failed).map_err(store_failure)?;
            eprintln!(
                "removed the failed build {} and its logs",
                failed.reference()
            );
            if args.prune_cache {
                prune_cache(store)?;
            }
            return Ok(0);
        }
        return Err(store_failure(store.not_found(&reference)));
    }
    if matches.len() > 1 && !(args.all || args.yes) {
        let list: Vec<String> = matches.iter().map(StoredImage::reference).collect();
        return Err(Failure::input(anyhow::anyhow!(
            "`{reference}` matches {} builds: {}",
            matches.len(),
            list.join(", ")
        ))
        .with_hint("pass --all to remove all of them, or name one build as NAME/VERSION/BUILD"));
    }
    store.remove(&matches, args.force).map_err(store_failure)?;
    for image in &matches {
        eprintln!("removed {}", image.reference());
    }
    if args.prune_cache {
        prune_cache(store)?;
    }
    Ok(0)
}

/// `--prune-cache`: what was removed from the layer cache and the parent cache, or why
/// nothing was. Layers first: a parent image the removed layers were built on can go too.
fn prune_cache(store: &Store) -> Result<(), Failure> {
    let layers = store.prune_layers_to_cap().map_err(super::cache::failure)?;
    super::cache::print_pruned(&layers.report);
    let report = store.prune_cache().map_err(store_failure)?;
    for a in &report.abandoned {
        eprintln!("note: {a}");
    }
    for path in &report.removed {
        let what = match path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(builder::store::base::CacheFile::parse)
        {
            Some(builder::store::base::CacheFile::Part) => "partial download",
            Some(builder::store::base::CacheFile::Memo) => "cache memo",
            _ => "cached parent",
        };
        eprintln!("removed {what} {}", path.display());
    }
    if !report.builds_in_progress.is_empty() {
        eprintln!(
            "kept the parent cache: a build is in progress ({})",
            report.builds_in_progress.join(", ")
        );
    }
    Ok(())
}

/// What the pipeline history says about stored builds: those one pipeline produced, and
/// those lifecycle deprecated.
#[derive(Default)]
struct PipelineView {
    /// With `--pipeline`: the builds of its executions (successful or not).
    only: Option<std::collections::BTreeSet<String>>,
    deprecated: std::collections::BTreeSet<String>,
}

fn pipeline_view(store: &Store, pipeline: Option<&str>) -> Result<PipelineView, Failure> {
    use builder::pipeline::history::History;
    let read_failure = |e: builder::pipeline::history::HistoryError| {
        Failure::host(anyhow::Error::new(e).context("could not read the pipeline history"))
    };
    // Never create a history just to list images.
    let Some(history) =
        History::open_existing(&History::default_path(store)).map_err(read_failure)?
    else {
        return match pipeline {
            Some(name) => Err(Failure::input(anyhow::anyhow!(
                "pipeline `{name}` has never run in this store ({})",
                store.root().display()
            ))
            .with_hint("`builder pipeline run FILE` runs a pipeline once")),
            None => Ok(PipelineView::default()),
        };
    };
    let mut view = PipelineView::default();
    for mark in history.marks(pipeline).map_err(read_failure)? {
        if mark.deprecated_at.is_some() && mark.deleted_at.is_none() {
            view.deprecated.insert(mark.image);
        }
    }
    if let Some(name) = pipeline {
        let known = history.pipelines().map_err(read_failure)?;
        if !known.iter().any(|k| k == name) {
            let hint = if known.is_empty() {
                "no pipeline has run yet".to_string()
            } else {
                format!("pipelines with a history: {}", known.join(", "))
            };
            return Err(Failure::input(anyhow::anyhow!(
                "pipeline `{name}` is not in the pipeline history"
            ))
            .with_hint(hint));
        }
        let images = history
            .executions(Some(name), usize::MAX)
            .map_err(read_failure)?
            .into_iter()
            .filter_map(|e| e.image)
            .collect();
        view.only = Some(images);
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_lists_package_sources_and_changes() {
        use builder::store::manifest::{
            ImageId, KeyFile, Package, PackageChange, PackageChanges, PackageSources, SourceFile,
        };
        let mut manifest = Manifest::new(
            ImageId {
                name: "web".into(),
                version: "1.2.0".into(),
                build: 2,
            },
            "b-2",
        );
        manifest.package_sources = Some(PackageSources {
            manager: "apt".into(),
            architectures: vec!["amd64".into()],
            files: vec![SourceFile {
                path: "/etc/apt/sources.list.d/debian.sources".into(),
                text: String::new(),
            }],
            keys: vec![
                KeyFile {
                    path: "/usr/share/keyrings/a.gpg".into(),
                    sha256: String::new(),
                    data: String::new(),
                };
                2
            ],
        });
        let package = |name: &str| Package {
            name: name.into(),
            version: "1.0".into(),
            arch: "amd64".into(),
        };
        manifest.package_changes = Some(PackageChanges {
            since: "web/1.2.0/1".into(),
            added: vec![package("curl")],
            removed: vec![package("wget")],
            changed: vec![PackageChange {
                name: "libssl3".into(),
                arch: "amd64".into(),
                from: "3.0.17-1~deb12u2".into(),
                to: "3.0.18-1~deb12u1".into(),
            }],
        });
        let image = StoredImage {
            name: "web".into(),
            version: "1.2.0".parse().expect("a version"),
            build: 2,
            dir: "/nonexistent/web/1.2.0/2".into(),
            manifest,
            disk: None,
        };
        let text = describe(&image);
        assert!(
            text.contains(
                "  package sources: apt, 1 file, 2 keys\n\
                 \x20 package changes since web/1.2.0/1: 1 changed, 1 added, 1 removed\n\
                 \x20   libssl3 amd64 3.0.17-1~deb12u2 → 3.0.18-1~deb12u1\n\
                 \x20   + curl amd64 1.0\n\
                 \x20   - wget amd64 1.0\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }
}
