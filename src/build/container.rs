//! The stages of a container recipe's build, after [`super::build`] allocated the slot and
//! before it stores the result: the same context, events, logs and undo list as a machine
//! build, with buildah ([`crate::container`]) in place of QEMU.
//!
//! ```text
//! Plan ─fetch─▶ parent image in the engine's storage (under builder's name for its digest)
//!   ─render the template, `buildah build --layers`─▶ one RUN per component: the agent
//!   connects back and the component's build and validate phases run through it; a RUN that
//!   buildah takes from its cache never connects (the component is reported cached)
//!   ─test (a fresh working container of the image: test phases, test components)─▶ image id
//!   ─store (`buildah push` into the slot's OCI layout, the manifest's container facts)
//! ```
//!
//! Each component's `RUN` carries the component's layer key and the agent's digest in its
//! text (`--key`), so buildah's cache redoes exactly the components that changed and those
//! after them. Nothing of builder stays in a layer: the agent's folder is a bind mount.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::plan::{PlannedParent, Stage};
use super::stages::{self, BuildContext, BuildError, RunOn};
use crate::container::{AgentDir, ContainerError, Engine};
use crate::machine::Machine;
use crate::store::BuildSlot;
use crate::store::manifest::{ImageKind, PackageList, PackageSources, Status};
use crate::undo::{Leftovers, UndoList};

/// The folder in the build context that holds the agent and its sockets.
const AGENT_FOLDER: &str = ".builder";

/// What `{{{ imagebuilder:environments }}}` becomes: builder's agent is a static program, so
/// the parent needs nothing installed for the components to run.
const ENVIRONMENTS: &str =
    "# imagebuilder:environments: nothing to install (builder's agent is a static program)";

/// The built image, in the engine's storage, with what the build learnt of it.
pub struct BuiltImage {
    engine: Engine,
    /// buildah's image id.
    image: String,
    packages: Option<PackageList>,
    package_sources: Option<PackageSources>,
}

/// What the built image holds, read from a container of it: its packages and package sources.
type Inventory = (Option<PackageList>, Option<PackageSources>);

fn engine_err(what: impl Into<String>) -> impl FnOnce(ContainerError) -> BuildError {
    let what = what.into();
    move |source| BuildError::Container {
        what,
        source: Box::new(source),
    }
}

/// A step that failed in a container: no disk to keep, so no `--keep-on-failure` hint.
fn in_container(error: BuildError) -> BuildError {
    match error {
        BuildError::Component(mut f) => {
            f.in_container = true;
            BuildError::Component(f)
        }
        other => other,
    }
}

/// The agent's sha256 (hex): part of every component's key, so a new agent redoes them.
fn agent_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| hex::encode(Sha256::digest(crate::agent::AGENT_BINARY)))
}

/// The key in component `index`'s `RUN`: its layer key (the parent, the components before
/// it, its documents and parameters) and the agent's digest.
fn run_key(cx: &BuildContext<'_>, index: usize) -> String {
    let layer = cx
        .plan
        .components
        .get(index)
        .and_then(|c| c.layer_key.clone())
        .unwrap_or_else(|| cx.chain[index + 1].key.clone());
    hex::encode(Sha256::digest(format!("{layer}\n{}", agent_digest())))
}

/// Stages up to the test; the caller stores the result.
pub async fn run(cx: &BuildContext<'_>) -> Result<BuiltImage, BuildError> {
    let (engine, parent) = cx.stage(Stage::Fetch, fetch_parent(cx)).await?;
    let image = components(cx, &engine, &parent).await?;
    let (packages, package_sources) = if cx.plan.tests.enabled {
        cx.stage(Stage::Test, test(cx, &engine, &image, true))
            .await?
    } else {
        cx.skipped(Stage::Test);
        test(cx, &engine, &image, false).await?
    };
    Ok(BuiltImage {
        engine,
        image,
        packages,
        package_sources,
    })
}

/// Opens the engine (recovering what dead builders left), then brings the parent into its
/// storage under `localhost/builder-parent:<digest>` unless it is there already.
async fn fetch_parent(cx: &BuildContext<'_>) -> Result<(Engine, String), BuildError> {
    let engine = Engine::open(&cx.store.containers_dir())
        .await
        .map_err(engine_err("could not open the container engine"))?;
    if let Some(note) = engine.isolation_note() {
        cx.progress(Stage::Fetch, note);
    }
    match engine.recover().await {
        Ok(removed) => {
            for r in removed {
                cx.progress(
                    Stage::Fetch,
                    &format!("removed what an interrupted build left: {r}"),
                );
            }
        }
        Err(e) => cx.progress(
            Stage::Fetch,
            &format!(
                "warning: could not look for what interrupted builds left: {}",
                crate::diagnostic::error_chain(&e)
            ),
        ),
    }
    let digest = cx.plan.parent.sha256().as_str().to_string();
    let name = format!("localhost/builder-parent:{digest}");
    if engine.has_image(&name).await {
        cx.progress(Stage::Fetch, "the parent image is in the engine's storage");
        return Ok((engine, name));
    }
    let source = match &cx.plan.parent {
        PlannedParent::Archive {
            local_path, sha256, ..
        } => {
            let actual = crate::digest::sha256_file(local_path, None)
                .map_err(BuildError::Hash)?
                .sha256;
            let actual = hex::encode(actual);
            if actual != sha256.as_str() {
                return Err(BuildError::ParentChanged {
                    path: local_path.clone(),
                    planned: sha256.to_string(),
                    actual,
                });
            }
            format!("oci-archive:{}", local_path.display())
        }
        PlannedParent::StoredContainer { layout, .. } => format!("oci:{}", layout.display()),
        // Pulled into the store's cache (an OCI layout named by the pinned digest) with the
        // registry client every OCI command uses, then imported from there.
        PlannedParent::Oci {
            reference,
            manifest_digest,
        } => {
            use crate::distribute::oci;
            let src = stages::pinned_oci(reference, manifest_digest)?;
            let dest = cx
                .store
                .oci_parent_dir(manifest_digest.as_str())
                .map_err(BuildError::Fetch)?;
            let bar = stages::PullBar::new(cx, Stage::Fetch, Some("parent image"));
            let pulled = oci::pull_layout(&src, &dest, &oci::OciOptions::from_env(), &bar)
                .await
                .map_err(BuildError::PullParent)?;
            if pulled.from_cache {
                cx.progress(Stage::Fetch, "the parent image is in the store's cache");
            }
            format!("oci:{}", pulled.dir.display())
        }
        other => {
            return Err(BuildError::Container {
                what: format!(
                    "a container recipe cannot build on {}",
                    match other {
                        PlannedParent::Url { .. } => "a URL parent",
                        _ => "a disk image",
                    }
                ),
                source: Box::new(ContainerError::Output {
                    what: "pull".into(),
                    detail: "not an OCI image".into(),
                }),
            });
        }
    };
    cx.progress(Stage::Fetch, &format!("importing {source}"));
    engine.import(&source, &name).await.map_err(engine_err(
        "could not bring the parent image into the container engine",
    ))?;
    Ok((engine, name))
}

/// Renders the template, runs `buildah build` and drives each component's RUN through the
/// agent; the image id.
async fn components(
    cx: &BuildContext<'_>,
    engine: &Engine,
    parent: &str,
) -> Result<String, BuildError> {
    let Some(container) = &cx.plan.container else {
        return Err(BuildError::Container {
            what: "the plan is not a container plan".into(),
            source: Box::new(ContainerError::Output {
                what: "build".into(),
                detail: "no template".into(),
            }),
        });
    };
    let work = cx.work.clone();
    fs_err::create_dir_all(&work).map_err(BuildError::WorkDir)?;
    {
        let work = work.clone();
        cx.push_undo(
            format!("remove the build's work folder {}", work.display()),
            None,
            crate::undo::remove_dir(work),
        );
    }
    let context = work.join("context");
    fs_err::create_dir_all(&context).map_err(BuildError::WorkDir)?;
    let count = cx.plan.components.len();
    let mut agents = AgentDir::create(&context.join(AGENT_FOLDER), count).map_err(engine_err(
        "could not prepare the agent for the container build",
    ))?;
    let runs: Vec<String> = (0..count)
        .map(|i| AgentDir::run_instruction(AGENT_FOLDER, i + 1, &run_key(cx, i)))
        .collect();
    let containerfile = render(&container.template, parent, ENVIRONMENTS, &runs.join("\n"));
    let file = work.join("Containerfile");
    fs_err::write(&file, &containerfile).map_err(BuildError::WorkDir)?;
    // The Containerfile builder ran, next to the build's logs.
    let _ = fs_err::write(cx.logs.join("Containerfile"), &containerfile);
    let iid = work.join("image-id");
    let mut args: Vec<String> = vec![
        "build".into(),
        "--isolation".into(),
        engine.isolation().as_str().into(),
        "--layers".into(),
        "--pull-never".into(),
        "--force-rm".into(),
        "--iidfile".into(),
        iid.display().to_string(),
        "-f".into(),
        file.display().to_string(),
        context.display().to_string(),
    ];
    if cx.options.no_cache {
        // `--no-cache`: every component runs, and its new layer replaces the cached one.
        args.insert(1, "--no-cache".into());
    }
    let mut connections = agents
        .connections()
        .map_err(engine_err("could not listen for the agent"))?;
    let mut build = engine
        .start(&args)
        .map_err(engine_err("could not start the container build"))?;
    let mut lines = build.take_lines();
    let secs = cx.plan.infrastructure.build_timeout_secs;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut next = 0usize;
    let mut tail: Vec<String> = Vec::new();
    let log_line = |tail: &mut Vec<String>, line: String| {
        cx.log.line(&format!("buildah: {line}"));
        tail.push(line);
        if tail.len() > 40 {
            tail.remove(0);
        }
    };
    let status = loop {
        tokio::select! {
            line = lines.recv() => {
                if let Some(line) = line {
                    log_line(&mut tail, line);
                }
            }
            connection = connections.recv() => {
                let Some((n, stream)) = connection else { continue };
                let index = n - 1;
                for skipped in next..index {
                    cx.cached(Stage::Component(skipped), Some(cx.plan.components[skipped].label()));
                }
                next = index + 1;
                let component = &cx.plan.components[index];
                let label = component.label().to_string();
                let describe = format!("the container build's step for component `{label}`");
                let work = async {
                    let machine = Engine::agent_machine(stream, describe)
                        .await
                        .map_err(engine_err(format!("the agent for component `{label}` did not answer")))?;
                    let result = stages::run_build_phases(
                        cx,
                        RunOn::Machine(&machine as &dyn Machine),
                        index,
                        component,
                        false,
                    )
                    .await
                    .map_err(in_container);
                    if result.is_ok() {
                        machine.poweroff().await.map_err(|source| BuildError::Guest {
                            what: format!("could not end the step of component `{label}`"),
                            source,
                        })?;
                    }
                    // Dropped without Poweroff on a failure: the agent exits 1, the RUN fails.
                    result.map(|_| ())
                };
                let stage = cx.stage_of(Stage::Component(index), Some(&label), work);
                tokio::pin!(stage);
                let result = loop {
                    tokio::select! {
                        r = &mut stage => break r,
                        line = lines.recv() => {
                            if let Some(line) = line {
                                log_line(&mut tail, line);
                            }
                        }
                        _ = tokio::time::sleep_until(deadline) => {
                            return Err(BuildError::Timeout {
                                stage: "the components",
                                secs,
                                setting: "buildTimeoutSeconds",
                            });
                        }
                    }
                };
                if let Err(e) = result {
                    // buildah fails the RUN and removes its container (--force-rm): wait for
                    // it, so nothing is left when the build reports the failure.
                    let _ = tokio::time::timeout(Duration::from_secs(60), build.exited()).await;
                    while let Ok(line) = lines.try_recv() {
                        log_line(&mut tail, line);
                    }
                    return Err(e);
                }
            }
            status = build.exited() => break status,
            _ = tokio::time::sleep_until(deadline) => {
                return Err(BuildError::Timeout {
                    stage: "the components",
                    secs,
                    setting: "buildTimeoutSeconds",
                });
            }
        }
    };
    // What buildah printed last.
    while let Some(line) = lines.recv().await {
        log_line(&mut tail, line);
    }
    let status = status.map_err(engine_err("the container build failed"))?;
    if !status.success() {
        return Err(BuildError::Container {
            what: "the container build failed".into(),
            source: Box::new(ContainerError::Command {
                what: "build".into(),
                status: status.to_string(),
                output: tail.join("\n"),
            }),
        });
    }
    for skipped in next..count {
        cx.cached(
            Stage::Component(skipped),
            Some(cx.plan.components[skipped].label()),
        );
    }
    drop(agents);
    let image = fs_err::read_to_string(&iid)
        .map_err(BuildError::WorkDir)?
        .trim()
        .to_string();
    cx.progress(
        Stage::Component(count.saturating_sub(1)),
        &format!("built image {image}"),
    );
    Ok(image)
}

/// The Containerfile: the recipe's template with its placeholders replaced.
fn render(
    template: &crate::recipe::dockerfile::DockerfileTemplate,
    parent: &str,
    environments: &str,
    components: &str,
) -> String {
    template.render(parent, environments, components)
}

/// A fresh working container of `image` running the agent: with `run_tests`, the `test`
/// phase of each component that has one and the test components; always the package list
/// (the manifest's SBOM) and the package sources. The container is removed afterwards.
async fn test(
    cx: &BuildContext<'_>,
    engine: &Engine,
    image: &str,
    run_tests: bool,
) -> Result<Inventory, BuildError> {
    let stage = if run_tests { Stage::Test } else { Stage::Store };
    let mut undo = UndoList::new(false, Leftovers::default());
    let what = if run_tests { "test" } else { "inspect" };
    let name = engine
        .from_image(image, what, &mut undo)
        .await
        .map_err(engine_err("could not start a container of the built image"))?;
    let result = test_in(cx, engine, image, &name, run_tests, stage).await;
    let report = undo.unwind(crate::undo::Outcome::Success);
    for w in report.warnings() {
        cx.progress(stage, &format!("warning: {w}"));
    }
    result
}

async fn test_in(
    cx: &BuildContext<'_>,
    engine: &Engine,
    image: &str,
    name: &str,
    run_tests: bool,
    stage: Stage,
) -> Result<Inventory, BuildError> {
    let secs = cx.plan.tests.timeout_secs;
    let dir = cx
        .work
        .join(format!("agent-{}", uuid::Uuid::new_v4().simple()));
    fs_err::create_dir_all(&cx.work).map_err(BuildError::WorkDir)?;
    let mut agents =
        AgentDir::create(&dir, 1).map_err(engine_err("could not prepare the agent"))?;
    let mut connections = agents
        .connections()
        .map_err(engine_err("could not listen for the agent"))?;
    let mut run = engine
        .run_in(name, &[agents.volume()], &AgentDir::agent_argv(1, None))
        .map_err(engine_err("could not run the agent in the container"))?;
    let mut lines = run.take_lines();
    let started = Instant::now();
    let stream = tokio::select! {
        c = connections.recv() => c.map(|(_, s)| s),
        _ = tokio::time::sleep(Duration::from_secs(60)) => None,
        _ = run.exited() => None,
    };
    let Some(stream) = stream else {
        let mut out = Vec::new();
        while let Ok(l) = lines.try_recv() {
            out.push(l);
        }
        return Err(BuildError::Container {
            what: "the agent did not start in the container of the built image".into(),
            source: Box::new(ContainerError::Command {
                what: format!("run {name}"),
                status: "did not connect".into(),
                output: out.join("\n"),
            }),
        });
    };
    let machine =
        Engine::agent_machine(stream, format!("the container of the built image ({name})"))
            .await
            .map_err(engine_err("the agent in the container did not answer"))?;
    let work = async {
        let mut failure = None;
        if run_tests {
            let (mut results, first) =
                stages::test_components(cx, RunOn::Machine(&machine), "test").await?;
            failure = first;
            // AWSTOE's `container-host-test` phases run on this machine, after the test
            // phases in the container. Their commands reach the image: `BUILDER_IMAGE` is its
            // id, and `buildah`/`podman` see builder's storage and isolation.
            let conf = engine
                .storage_conf()
                .map_err(engine_err("could not describe the container storage"))?;
            let host = crate::machine::host::HostMachine::new()
                .with_env("BUILDER_IMAGE", image)
                .with_env("BUILDAH_ISOLATION", engine.isolation().as_str())
                .with_env("CONTAINERS_STORAGE_CONF", conf.display().to_string());
            let (host_results, host_failure) =
                stages::test_components(cx, RunOn::Machine(&host), "container-host-test").await?;
            results.extend(host_results);
            failure = failure.or(host_failure);
            cx.set_tests(results);
        }
        let packages = crate::build::generalize::packages(&machine)
            .await
            .unwrap_or_else(|e| {
                cx.progress(
                    stage,
                    &format!(
                        "warning: could not list the image's packages: {}",
                        crate::diagnostic::error_chain(&e)
                    ),
                );
                None
            });
        let sources = crate::build::generalize::package_sources(&machine).await;
        let sources = stages::package_sources(cx, stage, sources);
        match failure {
            Some(f) => Err(in_container(f)),
            None => Ok((packages, sources)),
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(secs), work)
        .await
        .unwrap_or(Err(BuildError::Timeout {
            stage: "the test stage",
            secs,
            setting: "tests.timeoutSeconds",
        }));
    let _ = machine.poweroff().await;
    drop(machine);
    let _ = tokio::time::timeout(Duration::from_secs(30), run.exited()).await;
    while let Ok(l) = lines.try_recv() {
        cx.log.line(&format!("buildah run: {l}"));
    }
    drop(agents);
    if run_tests && result.is_ok() {
        cx.progress(
            stage,
            &format!(
                "tests passed in a container of the built image ({:.1} s)",
                started.elapsed().as_secs_f64()
            ),
        );
    }
    result
}

/// The built image into the slot's OCI layout, the manifest's container facts and package
/// list, the slot committed.
pub async fn store(
    cx: &BuildContext<'_>,
    built: BuiltImage,
    slot: BuildSlot,
    warnings: Vec<String>,
) -> Result<super::Built, BuildError> {
    let layout = slot.layout_dir();
    let tag = cx.plan.recipe.version.to_string();
    let dest = format!("oci:{}:{tag}", layout.display());
    built
        .engine
        .run(&["push", "--quiet", &built.image, &dest])
        .await
        .map_err(engine_err("could not write the image to the store"))?;
    let facts =
        tokio::task::block_in_place(|| slot.container_image()).map_err(BuildError::Commit)?;
    cx.progress(
        Stage::Store,
        &format!("image {} ({} bytes)", facts.manifest_digest, facts.size),
    );
    let mut manifest = cx.manifest_now();
    manifest.status = Status::Success;
    manifest.kind = ImageKind::Container;
    manifest.container = Some(facts);
    manifest.packages = built.packages;
    manifest.package_sources = built.package_sources;
    stages::record_package_changes(cx, Stage::Store, &mut manifest);
    manifest.write(slot.dir()).map_err(BuildError::Manifest)?;
    let image = slot.commit().map_err(BuildError::Commit)?;
    let outputs = vec![image.dir.join(crate::store::layout::LAYOUT_DIR)];
    Ok(super::Built {
        image,
        outputs,
        copies: Vec::new(),
        warnings,
        receipts: Vec::new(),
        distribution_failures: Vec::new(),
    })
}
