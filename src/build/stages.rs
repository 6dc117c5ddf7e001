//! The stages of [`super::build`], each a function from one value to the next, and the build
//! context they share ([`BuildContext`]: the plan, the store, the log, the undo list, the manifest being
//! filled in).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::BuildOptions;
use super::cache::{self, ChainLayer, Inserting};
use super::events::{BuildEvent, BuildLog, StageOutput};
use super::generalize::{self, GeneralizeError};
use super::layers::{DiskChain, Layer, LayerError, file_safe};
use super::plan::{self, Plan, PlanError, PlannedComponent, PlannedParent, ReachedDocument, Stage};
use crate::component::executor::{self, RunError, RunOptions, RunRequest};
use crate::component::report::{ExecutionReport, Status as StepStatus};
use crate::diagnostic::error_chain;
use crate::export::{self, ExportError, ExportProgress, ExportRequest};
use crate::machine::{Capture, ExecRequest, Machine, MachineError};
use crate::recipe;
use crate::store::layers::Origin;
use crate::store::manifest::{
    Artifact, ComponentInput, HostInfo, ImageId, LayerKey, Manifest, PackageList, PackageSources,
    ParameterValue, ParentInput, PhaseStatus, StageTiming, Status, TestResult,
};
use crate::store::{BuildSlot, DownloadProgress, FetchOptions, LayerCacheError, Store, StoreError};
use crate::undo::{self, Leftovers, Outcome, UndoError, UndoList, UnwindReport};
use crate::vm::seed::CloudInitScope;
use crate::vm::session::{Session, SessionOptions};
use crate::vm::{ErrorClass, GuestChannel, VmError, VmOptions};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("could not start a build in the store")]
    Allocate(#[source] StoreError),
    /// The io error names the file.
    #[error("could not write the build's logs")]
    Logs(#[source] std::io::Error),
    #[error("could not fetch the parent image")]
    Fetch(#[source] StoreError),
    #[error("could not pull the parent image from its registry")]
    PullParent(#[source] crate::distribute::oci::OciError),
    #[error("the parent image {path} has sha256 {actual}, but the plan pinned {planned}")]
    ParentChanged {
        path: PathBuf,
        planned: String,
        actual: String,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("could not prepare the build's disk")]
    Disk(#[source] LayerError),
    /// Only a full disk fails the build; any other trouble with the cache is a warning and
    /// the build goes on without it.
    #[error("could not write the layer cache")]
    Cache(#[source] LayerCacheError),
    /// The io error names the folder.
    #[error("could not create the build's work folder")]
    WorkDir(#[source] std::io::Error),
    #[error("the {which} VM failed")]
    Vm {
        which: &'static str,
        #[source]
        source: VmError,
    },
    #[error("{what}")]
    Guest {
        what: String,
        #[source]
        source: MachineError,
    },
    #[error(
        "the root file system did not grow to `diskSize` ({wanted}): it is {actual} (the parent's disk is {parent}); {grower}"
    )]
    DiskNotGrown {
        wanted: recipe::ByteSize,
        actual: recipe::ByteSize,
        parent: recipe::ByteSize,
        /// Who should have grown it, in this boot mode.
        grower: &'static str,
    },
    /// The appliance has no cloud-init to grow the root partition: the build does it with
    /// the image's own tools ([`GROW_ROOT`]).
    #[error("the appliance could not grow the root file system to `diskSize` ({wanted}): {reason}")]
    ApplianceGrow {
        wanted: recipe::ByteSize,
        reason: String,
    },
    /// `userData` and `infrastructure.boot: appliance`, brought together by a pipeline or the
    /// command line (a recipe that has both is refused when it is read).
    #[error("{}", recipe::USER_DATA_IN_APPLIANCE)]
    ApplianceUserData,
    #[error("{}", .0.heading())]
    Component(Box<ComponentFailure>),
    #[error("could not run component `{component}`")]
    Executor {
        component: String,
        #[source]
        source: RunError,
    },
    #[error("generalizing the image failed")]
    Generalize(#[source] GeneralizeError),
    #[error("{stage} did not finish within {secs} s (infrastructure.{setting})")]
    Timeout {
        stage: &'static str,
        secs: u64,
        setting: &'static str,
    },
    #[error(
        "the test stage changed the built disk {file} (sha256 {before} before, {after} after); the artifact must stay as built"
    )]
    ArtifactChanged {
        file: PathBuf,
        before: String,
        after: String,
    },
    /// The io error names the file.
    #[error("could not compute the sha256 of a disk")]
    Hash(#[source] std::io::Error),
    #[error("exporting the image failed")]
    Export(#[source] ExportError),
    #[error("could not write the manifest")]
    Manifest(#[source] std::io::Error),
    /// The io error names the files.
    #[error("could not copy the outputs to `outputs.directory`")]
    Copy(#[source] std::io::Error),
    #[error("could not store the build")]
    Commit(#[source] StoreError),
    /// A machine build's plan names a container image as its parent.
    #[error("{parent} is a container image: a machine image builds on a disk image")]
    ParentNotADisk { parent: String },
    /// A container build's engine (buildah) failed.
    #[error("{what}")]
    Container {
        what: String,
        #[source]
        source: Box<crate::container::ContainerError>,
    },
    /// The image is stored; sending it to a target failed.
    #[error("the image is stored, but distributing it to {target} failed{}: {message}", if *.failed > 1 { format!(" (and {} more)", .failed - 1) } else { String::new() })]
    Distribute {
        target: String,
        message: String,
        failed: usize,
    },
}

/// What `--on-error shell` does when a component step fails: called with the failure while
/// the build VM still runs (outside the build's timeout), it returns when the user is done
/// (typically after an interactive shell in the guest through `agent`). The build then fails
/// as it would have.
#[async_trait::async_trait]
pub trait FailureShell: Send + Sync + std::fmt::Debug {
    async fn open(
        &self,
        failure: &ComponentFailure,
        vm: &str,
        agent: Arc<crate::machine::agent::AgentMachine>,
    );
}

/// A component (or test) step that failed, with what the user needs to act on it.
#[derive(Debug, Clone)]
pub struct ComponentFailure {
    pub component: String,
    pub phase: String,
    pub step: String,
    pub attempt: u32,
    pub max_attempts: u32,
    /// The step's failure message (the cause).
    pub cause: String,
    /// The last lines of the step's output.
    pub last_lines: Vec<String>,
    /// The step's full output, in the build's logs (moved to `failed/` with them).
    pub log: Option<PathBuf>,
    /// The executor's own log folder for this component (`TOE_…`, detailedoutput.json).
    pub run_log: Option<PathBuf>,
    /// The step ran in the appliance and its output says it wanted a running service
    /// manager ([`wants_a_service_manager`]): the hint says to boot `full`.
    pub no_service_manager: bool,
    /// The step ran in a container build: there is no disk to keep (the logs are kept
    /// anyway), so no `--keep-on-failure` hint.
    pub in_container: bool,
}

/// The hint of a step that failed in the appliance for want of a running service manager.
pub const NO_SERVICE_MANAGER: &str = "the build VM is the appliance (`infrastructure.boot: appliance`), where no service manager runs: `systemctl enable` works there, but starting, stopping or asking services (`systemctl start`, D-Bus) does not; use `infrastructure.boot: full` for this recipe";

/// Whether a step's output (its last lines, its failure message) says it wanted systemd
/// running as PID 1 or a D-Bus system bus, which the appliance does not have.
pub fn wants_a_service_manager<'a>(texts: impl IntoIterator<Item = &'a str>) -> bool {
    const SIGNS: &[&str] = &[
        "System has not been booted with systemd",
        "Failed to connect to bus",
        "Failed to connect to system scope bus",
        "Running in chroot, ignoring",
        // What the appliance's own `systemctl start` and friends say.
        "no service manager runs in the appliance",
    ];
    texts
        .into_iter()
        .any(|t| SIGNS.iter().any(|sign| t.contains(sign)))
}

impl ComponentFailure {
    pub fn heading(&self) -> String {
        let what = if self.phase == "test" {
            "test of component"
        } else {
            "component"
        };
        let attempts = if self.max_attempts > 1 {
            format!(" (attempt {} of {})", self.attempt, self.max_attempts)
        } else {
            String::new()
        };
        format!(
            "{what} `{}` failed in phase `{}`, step `{}`{attempts}",
            self.component, self.phase, self.step
        )
    }
}

impl BuildError {
    /// Whose fault it is, for the exit code.
    pub fn class(&self) -> ErrorClass {
        match self {
            BuildError::Plan(
                PlanError::Invalid(_) | PlanError::Changed { .. } | PlanError::NotUtf8 { .. },
            )
            | BuildError::ParentChanged { .. }
            | BuildError::ParentNotADisk { .. }
            | BuildError::ApplianceUserData => ErrorClass::Input,
            BuildError::Vm { source, .. } => source.class(),
            BuildError::Allocate(_)
            | BuildError::Logs(_)
            | BuildError::Fetch(_)
            | BuildError::PullParent(_)
            | BuildError::Plan(_)
            | BuildError::Disk(_)
            | BuildError::Cache(_)
            | BuildError::WorkDir(_)
            | BuildError::Hash(_)
            | BuildError::Export(_)
            | BuildError::Manifest(_)
            | BuildError::Copy(_)
            | BuildError::Commit(_) => ErrorClass::Host,
            BuildError::Distribute { .. } => ErrorClass::Failed,
            BuildError::Container { source, .. } => match **source {
                crate::container::ContainerError::Command { .. }
                | crate::container::ContainerError::Agent { .. } => ErrorClass::Failed,
                _ => ErrorClass::Host,
            },
            BuildError::Guest { .. }
            | BuildError::DiskNotGrown { .. }
            | BuildError::ApplianceGrow { .. }
            | BuildError::Component(_)
            | BuildError::Executor { .. }
            | BuildError::Generalize(_)
            | BuildError::Timeout { .. }
            | BuildError::ArtifactChanged { .. } => ErrorClass::Failed,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            BuildError::Vm { source, .. } => source.hint(),
            BuildError::PullParent(source) => source.hint(),
            BuildError::Component(f) if f.no_service_manager => Some(NO_SERVICE_MANAGER.into()),
            BuildError::Component(f) if f.in_container => None,
            BuildError::ApplianceGrow { .. } => Some(
                "use `infrastructure.boot: full`: the image's cloud-init grows its root partition as it boots (or add cloud-guest-utils to the parent image)".into(),
            ),
            BuildError::ApplianceUserData => Some(recipe::USER_DATA_IN_APPLIANCE_HINT.into()),
            BuildError::Component(_)
            | BuildError::Generalize(_)
            | BuildError::DiskNotGrown { .. } => {
                Some("rerun with `--keep-on-failure` to keep the build's disk and logs".into())
            }
            BuildError::Cache(_) => Some(
                "free space on the store's disk, e.g. `builder cache prune --max-size 10GiB`, or build with `--no-cache`".into(),
            ),
            BuildError::Timeout { setting, .. } => Some(format!(
                "raise `{setting}` in the recipe if the work is just slow (TCG is much slower than KVM)"
            )),
            _ => None,
        }
    }
}

fn vm_err(which: &'static str) -> impl FnOnce(VmError) -> BuildError {
    move |source| BuildError::Vm { which, source }
}

/// Whether a failed build keeps its disk chain and logs (and the test VM's disk): the
/// command line's `--keep-on-failure` or the recipe's `infrastructure.keepOnFailure`.
pub fn keeps_on_failure(plan: &Plan, options: &BuildOptions) -> bool {
    options.keep_on_failure || plan.infrastructure.keep_on_failure
}

/// What the stages share. Everything mutable sits behind a mutex so stages take `&BuildContext`.
pub struct BuildContext<'a> {
    pub plan: &'a Plan,
    pub store: &'a Store,
    pub options: &'a BuildOptions,
    pub log: &'a BuildLog<'a>,
    pub id: ImageId,
    pub build_id: String,
    /// The build's folder in `staging/` (outputs, manifest).
    pub dir: PathBuf,
    /// The build's logs folder.
    pub logs: PathBuf,
    /// `<store>/work/<build-id>`: the disk chain (outside the build's folder so keeping it on
    /// failure does not depend on the store moving the folder).
    pub work: PathBuf,
    pub keep: bool,
    pub build_date: DateTime<Utc>,
    undo: Mutex<UndoList>,
    /// What the VMs' lists left (closed, or dropped on an error path), for [`Self::unwind`].
    leftovers: Leftovers,
    manifest: Mutex<Manifest>,
    started: Mutex<Option<Instant>>,
    /// The stages of [`Plan::stages`] not run yet: the build runs exactly that list, in order.
    planned: Mutex<std::vec::IntoIter<Stage>>,
    /// The build's layer chain (`build::cache::chain`).
    pub chain: Vec<ChainLayer>,
    /// The layer cache as the build uses it: `None` before the overlay stage, and when the
    /// cache cannot be used (said then). Holds the guards of the layers the build uses.
    layer_cache: Mutex<Option<Inserting>>,
}

impl Drop for BuildContext<'_> {
    /// A build dropped before it finished (Ctrl-C) unwinds as a failure and hands the report
    /// to its caller ([`super::BuildOptions::leftovers`]); after [`Self::unwind`] there is
    /// nothing left to hand.
    fn drop(&mut self) {
        let mut report = match self.undo.get_mut() {
            Ok(undo) => undo.unwind(Outcome::Failure),
            Err(poisoned) => poisoned.into_inner().unwind(Outcome::Failure),
        };
        report.append(self.leftovers.take());
        if !report.is_clean() {
            self.options.leftovers.add(report);
        }
    }
}

impl<'a> BuildContext<'a> {
    pub fn new(
        plan: &'a Plan,
        store: &'a Store,
        options: &'a BuildOptions,
        slot: &BuildSlot,
        log: &'a BuildLog<'a>,
    ) -> BuildContext<'a> {
        let mut manifest = Manifest::new(slot.id().clone(), slot.build_id());
        fill_inputs(&mut manifest, plan);
        let keep = keeps_on_failure(plan, options);
        let leftovers = Leftovers::default();
        BuildContext {
            plan,
            store,
            options,
            log,
            id: slot.id().clone(),
            build_id: slot.build_id().to_string(),
            dir: slot.dir().to_path_buf(),
            logs: slot.logs_dir(),
            work: store.root().join("work").join(slot.build_id()),
            keep,
            build_date: manifest.created,
            undo: Mutex::new(UndoList::new(keep, leftovers.clone())),
            leftovers,
            manifest: Mutex::new(manifest),
            started: Mutex::new(None),
            planned: Mutex::new(plan.stages().into_iter()),
            chain: cache::chain(plan),
            layer_cache: Mutex::new(None),
        }
    }

    /// `name/x.y.z/n`.
    pub fn image(&self) -> String {
        self.id.to_string()
    }

    pub fn started(&self, at: Instant) {
        if let Ok(mut s) = self.started.lock() {
            *s = Some(at);
        }
        let image = self.image();
        let digest = self.plan.digest();
        self.log.emit(&BuildEvent::BuildStarted {
            image: &image,
            build_id: &self.build_id,
            plan_digest: &digest,
            logs: &self.logs,
        });
    }

    fn elapsed(&self) -> Duration {
        self.started
            .lock()
            .ok()
            .and_then(|s| *s)
            .map(|s| s.elapsed())
            .unwrap_or_default()
    }

    pub(super) fn push_undo<E: Into<UndoError>>(
        &self,
        label: String,
        keep_note: Option<String>,
        action: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) {
        if let Ok(mut undo) = self.undo.lock() {
            match keep_note {
                Some(note) => undo.push_keepable(label, note, action),
                None => undo.push(label, action),
            }
        }
    }

    /// Unwind the build's own list, then add what its VMs' lists left (closed VMs, and VMs
    /// dropped on an error path): the whole report, also written to `build.log`.
    pub fn unwind(&self, outcome: Outcome) -> UnwindReport {
        let mut report = self
            .undo
            .lock()
            .map(|mut u| u.unwind(outcome))
            .unwrap_or_default();
        report.append(self.leftovers.take());
        for w in report.warnings() {
            self.log.line(&format!("warning: {w}"));
        }
        for k in &report.kept {
            self.log.line(&format!("kept: {k}"));
        }
        report
    }

    fn with_manifest(&self, f: impl FnOnce(&mut Manifest)) {
        if let Ok(mut m) = self.manifest.lock() {
            f(&mut m);
        }
    }

    /// The manifest as the build has filled it so far.
    pub(super) fn manifest_now(&self) -> Manifest {
        self.manifest()
    }

    /// The test stage's results, for the manifest.
    pub(super) fn set_tests(&self, results: Vec<TestResult>) {
        self.with_manifest(|m| m.tests = results);
    }

    fn manifest(&self) -> Manifest {
        self.manifest
            .lock()
            .map(|m| m.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn progress(&self, stage: Stage, message: &str) {
        self.log.progress(stage, message);
    }

    /// Run one stage: announce it, time it, record its timing and status.
    pub async fn stage<T>(
        &self,
        stage: Stage,
        work: impl Future<Output = Result<T, BuildError>>,
    ) -> Result<T, BuildError> {
        self.stage_of(stage, None, work).await
    }

    /// [`BuildContext::stage`] for one of several units of a stage (a component).
    pub async fn stage_of<T>(
        &self,
        stage: Stage,
        detail: Option<&str>,
        work: impl Future<Output = Result<T, BuildError>>,
    ) -> Result<T, BuildError> {
        // `builder plan` shows `Plan::stages`: a build that strayed from it is a bug here.
        let next = self.planned.lock().ok().and_then(|mut p| p.next());
        debug_assert_eq!(
            next,
            Some(stage),
            "the build runs the stages Plan::stages lists"
        );
        self.log.emit(&BuildEvent::StageStarted { stage, detail });
        let started = Utc::now();
        let t0 = Instant::now();
        let result = work.await;
        let took = t0.elapsed();
        let status = if result.is_ok() {
            Status::Success
        } else {
            Status::Failed
        };
        self.log.emit(&BuildEvent::StageFinished {
            stage,
            detail,
            status: &status.to_string(),
            duration_ms: took.as_millis() as u64,
        });
        let stage = match detail {
            Some(d) => format!("{stage}:{d}"),
            None => stage.to_string(),
        };
        self.with_manifest(|m| {
            m.timings.push(StageTiming {
                stage,
                started,
                duration_secs: took.as_secs_f64(),
                status,
            })
        });
        result
    }

    /// A stage that did not run because the layer cache held its result.
    pub fn cached(&self, stage: Stage, detail: Option<&str>) {
        let next = self.planned.lock().ok().and_then(|mut p| p.next());
        debug_assert_eq!(
            next,
            Some(stage),
            "the build runs the stages Plan::stages lists"
        );
        self.log.emit(&BuildEvent::StageFinished {
            stage,
            detail,
            status: "cached",
            duration_ms: 0,
        });
        let stage = match detail {
            Some(d) => format!("{stage}:{d}"),
            None => stage.to_string(),
        };
        self.with_manifest(|m| {
            m.timings.push(StageTiming {
                stage,
                started: Utc::now(),
                duration_secs: 0.0,
                status: Status::Cached,
            })
        });
    }

    pub fn skipped(&self, stage: Stage) {
        self.log.emit(&BuildEvent::StageFinished {
            stage,
            detail: None,
            status: "skipped",
            duration_ms: 0,
        });
        self.with_manifest(|m| {
            m.timings.push(StageTiming {
                stage: stage.to_string(),
                started: Utc::now(),
                duration_secs: 0.0,
                status: Status::Skipped,
            })
        });
    }
}

/// The manifest's inputs: the parent and every component, with digests and parameters.
fn fill_inputs(m: &mut Manifest, plan: &Plan) {
    m.plan_digest = plan.digest();
    m.inputs.parent = Some(parent_input(&plan.parent));
    m.inputs.components = plan
        .components
        .iter()
        .chain(&plan.tests.components)
        .map(|c| ComponentInput {
            path: c.path.clone(),
            name: c.label().to_string(),
            sha256: c.sha256.to_string(),
            parameters: c
                .parameters
                .iter()
                .map(|(k, v)| ParameterValue::new(k, v, false))
                .collect(),
            documents: c.documents.iter().map(ReachedDocument::input).collect(),
        })
        .collect();
    let i = &plan.infrastructure;
    m.host = HostInfo {
        qemu_version: String::new(),
        accelerator: String::new(),
        firmware: i.firmware.to_string(),
        boot: i.boot.to_string(),
        cpus: i.cpus,
        memory_mib: i.memory.bytes() >> 20,
    };
}

/// The parent as the manifest records it: as written, with the digest the build used.
fn parent_input(parent: &PlannedParent) -> ParentInput {
    match parent {
        PlannedParent::File { path, sha256, .. } => ParentInput {
            source: path.clone(),
            sha256: sha256.to_string(),
            store_image: None,
            disk_sha256: None,
        },
        PlannedParent::Url { url, sha256 } => ParentInput {
            source: url.clone(),
            sha256: sha256.to_string(),
            store_image: None,
            disk_sha256: None,
        },
        // The pin is the manifest digest (written in the recipe, or what the tag pointed to
        // when the plan resolved it); the pull checks the disk layer's digest against that
        // manifest.
        PlannedParent::Oci {
            reference,
            manifest_digest,
        } => ParentInput {
            // A resolved tag is recorded with the digest: what to write to build it again.
            source: format!(
                "oci://{}",
                parent.resolved_tag().unwrap_or_else(|| reference.clone())
            ),
            sha256: manifest_digest.to_string(),
            store_image: None,
            disk_sha256: None,
        },
        PlannedParent::Store {
            reference,
            resolved,
            sha256,
            ..
        } => ParentInput {
            source: reference.clone(),
            sha256: sha256.to_string(),
            store_image: Some(resolved.clone()),
            disk_sha256: None,
        },
        PlannedParent::Archive { path, sha256, .. } => ParentInput {
            source: path.clone(),
            sha256: sha256.to_string(),
            store_image: None,
            disk_sha256: None,
        },
        PlannedParent::StoredContainer {
            reference,
            resolved,
            manifest_digest,
            ..
        } => ParentInput {
            source: reference.clone(),
            sha256: manifest_digest.to_string(),
            store_image: Some(resolved.clone()),
            disk_sha256: None,
        },
    }
}

// ─── 1. allocate ────────────────────────────────────────────────────────────────────────

/// A build number and folder in the store's staging area.
pub fn allocate(plan: &Plan, store: &Store) -> Result<BuildSlot, BuildError> {
    store
        .allocate_build(&plan.recipe.name, &plan.recipe.version)
        .map_err(BuildError::Allocate)
}

// ─── 2. fetch the parent ────────────────────────────────────────────────────────────────

/// The parent image, verified.
pub struct Base {
    pub path: PathBuf,
}

struct DownloadBar<'a, 'b>(&'b BuildContext<'a>, Mutex<Option<u64>>, Mutex<u64>);

impl DownloadProgress for DownloadBar<'_, '_> {
    fn started(&self, total: Option<u64>, offset: u64) {
        if let Ok(mut t) = self.1.lock() {
            *t = total;
        }
        self.0.progress(
            Stage::Fetch,
            &format!(
                "downloading{}{}",
                total
                    .map(|t| format!(" {}", recipe::ByteSize::b(t)))
                    .unwrap_or_default(),
                if offset > 0 {
                    format!(", resuming at {}", recipe::ByteSize::b(offset))
                } else {
                    String::new()
                }
            ),
        );
    }
    fn advanced(&self, done: u64) {
        // One event per MiB at most.
        let Ok(mut last) = self.2.lock() else { return };
        if done < *last + (1 << 20) {
            return;
        }
        *last = done;
        let total = self.1.lock().ok().and_then(|t| *t);
        self.0.log.emit(&BuildEvent::Transfer {
            stage: Stage::Fetch,
            what: "parent image",
            done,
            total,
            unit: crate::distribute::Unit::Bytes,
        });
    }
    fn retrying(&self, attempt: u32, error: &str, wait: Duration) {
        self.0.progress(
            Stage::Fetch,
            &format!(
                "attempt {attempt} failed ({error}); retrying in {} s",
                wait.as_secs()
            ),
        );
    }
    fn verifying(&self) {
        self.0.progress(Stage::Fetch, "verifying sha256");
    }
}

/// Registry transfers as build events in `stage` (one per MiB at most per thing moved), like
/// [`DownloadBar`]: the parent image's pull, and the shared layer cache's pulls and pushes.
pub(super) struct PullBar<'a, 'b> {
    cx: &'b BuildContext<'a>,
    stage: Stage,
    /// What the events name; `None`: the target and what the registry code names.
    what: Option<&'static str>,
    /// The last thing reported and its bytes.
    last: Mutex<(String, u64)>,
}

impl<'a, 'b> PullBar<'a, 'b> {
    pub(super) fn new(cx: &'b BuildContext<'a>, stage: Stage, what: Option<&'static str>) -> Self {
        Self {
            cx,
            stage,
            what,
            last: Mutex::new((String::new(), 0)),
        }
    }
}

impl crate::distribute::Progress for PullBar<'_, '_> {
    fn step(&self, target: &str, message: &str) {
        match self.what {
            Some(_) => self.cx.progress(self.stage, message),
            None => self
                .cx
                .progress(self.stage, &format!("{target}: {message}")),
        }
    }
    fn transfer(&self, target: &str, what: &str, done: u64, total: Option<u64>) {
        let what = match self.what {
            Some(what) => what.to_string(),
            None => format!("{target}: {what}"),
        };
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if last.0 == what && done < last.1 + (1 << 20) && Some(done) != total {
            return;
        }
        *last = (what.clone(), done);
        self.cx.log.emit(&BuildEvent::Transfer {
            stage: self.stage,
            what: &what,
            done,
            total,
            unit: crate::distribute::Unit::Bytes,
        });
    }
}

/// An OCI parent as the plan pinned it: its reference with the digest written in the recipe,
/// or the one its tag pointed to when the plan resolved it (a tag moved since is not followed).
pub fn pinned_oci(
    reference: &str,
    manifest_digest: &crate::recipe::Sha256,
) -> Result<crate::recipe::OciReference, BuildError> {
    let mut src = reference
        .parse::<crate::recipe::OciReference>()
        .map_err(|e| BuildError::PullParent(e.into()))?;
    src.digest = Some(format!("sha256:{manifest_digest}"));
    Ok(src)
}

pub async fn fetch_parent(cx: &BuildContext<'_>) -> Result<Base, BuildError> {
    match &cx.plan.parent {
        // Only container plans have these parents, and `build` sends those elsewhere.
        PlannedParent::Archive { local_path, .. } => Err(BuildError::ParentNotADisk {
            parent: local_path.display().to_string(),
        }),
        PlannedParent::StoredContainer { resolved, .. } => Err(BuildError::ParentNotADisk {
            parent: resolved.clone(),
        }),
        PlannedParent::Oci {
            reference,
            manifest_digest,
        } => {
            use crate::distribute::oci;
            let src = pinned_oci(reference, manifest_digest)?;
            let bar = PullBar::new(cx, Stage::Fetch, Some("parent image"));
            let pulled = oci::pull_disk(
                &src,
                &oci::OciOptions::from_env(),
                &cx.store.base_dir(),
                &bar,
            )
            .await
            .map_err(BuildError::PullParent)?;
            // From the cache, the pull already said so ("already cached as …").
            if !pulled.from_cache {
                cx.progress(
                    Stage::Fetch,
                    &format!(
                        "cached as {} (layer digest verified)",
                        pulled.path.display()
                    ),
                );
            }
            // The pin is the manifest's digest; the cache knows the disk by its own.
            cx.with_manifest(|m| {
                if let Some(parent) = &mut m.inputs.parent {
                    parent.disk_sha256 = Some(pulled.sha256.clone());
                }
            });
            Ok(Base { path: pulled.path })
        }
        // Hashed by the plan moments ago.
        PlannedParent::File { local_path, .. } => {
            cx.progress(
                Stage::Fetch,
                &format!(
                    "local file {} (sha256 checked by the plan)",
                    local_path.display()
                ),
            );
            Ok(Base {
                path: local_path.clone(),
            })
        }
        PlannedParent::Url { url, sha256 } => {
            let bar = DownloadBar(cx, Mutex::new(None), Mutex::new(0));
            let base = cx
                .store
                .fetch_base(url, sha256.as_str(), &FetchOptions::default(), &bar)
                .await
                .map_err(BuildError::Fetch)?;
            cx.progress(
                Stage::Fetch,
                &format!("cached as {} (sha256 verified)", base.path.display()),
            );
            Ok(Base { path: base.path })
        }
        PlannedParent::Store {
            resolved,
            local_path,
            sha256,
            ..
        } => {
            cx.progress(
                Stage::Fetch,
                &format!("{resolved} from the store: verifying sha256"),
            );
            let actual = hash(local_path).await?;
            if actual != sha256.as_str() {
                return Err(BuildError::ParentChanged {
                    path: local_path.clone(),
                    planned: sha256.to_string(),
                    actual,
                });
            }
            Ok(Base {
                path: local_path.clone(),
            })
        }
    }
}

async fn hash(path: &Path) -> Result<String, BuildError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || crate::digest::sha256_file(&p, None))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map(|d| d.hex())
        .map_err(BuildError::Hash)
}

// ─── 3. overlay ─────────────────────────────────────────────────────────────────────────

/// Where the build starts after the overlay stage.
pub enum Start {
    /// Boot the build VM on this chain: a new overlay on the parent image, or on the last
    /// layer taken from the cache.
    Boot(DiskChain),
    /// Every layer, the generalize layer included, came from the cache: no build VM boots.
    Built(BuiltDisk),
}

/// Take the longest usable prefix of the chain from the layer cache, then make the chain's
/// new top file on it (or on the parent image).
pub async fn overlay(cx: &BuildContext<'_>, base: Base) -> Result<Start, BuildError> {
    fs_err::create_dir_all(&cx.work).map_err(BuildError::WorkDir)?;
    let work = cx.work.clone();
    cx.push_undo(
        format!("remove the build's disk chain {}", work.display()),
        Some(format!(
            "kept the build's disk chain in {} (the top file is the newest state; open it with `builder vm shell --image <file>`); remove with: rm -rf {}",
            work.display(),
            work.display()
        )),
        undo::remove_dir(work),
    );
    let cached = reuse_layers(cx, &base).await?;
    if cached.len() == cx.chain.len()
        && let Some(chain) = DiskChain::from_cache(&cx.work, &base.path, cached.clone())
    {
        cx.progress(
            Stage::Overlay,
            &format!(
                "every layer is cached: no build VM boots; the image is {}",
                chain.top.display()
            ),
        );
        return Ok(Start::Built(BuiltDisk { chain }));
    }
    if !cached.is_empty() {
        let next = &cx.chain[cached.len()].name;
        let names: Vec<&str> = cached.iter().map(|l| l.name.as_str()).collect();
        let chain = DiskChain::resume(&cx.work, &base.path, cached.clone(), next)
            .await
            .map_err(BuildError::Disk)?;
        cx.progress(
            Stage::Overlay,
            &format!(
                "{} on {} cached layer{} ({}); from {} on, the build runs",
                chain.top.display(),
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                names.join(", "),
                next
            ),
        );
        return Ok(Start::Boot(chain));
    }
    let size = cx.plan.disk_size.map(|s| s.bytes());
    let chain = DiskChain::create(&cx.work, &base.path, size)
        .await
        .map_err(BuildError::Disk)?;
    cx.progress(
        Stage::Overlay,
        &format!(
            "{} on {}{}",
            chain.top.display(),
            base.path.display(),
            cx.plan
                .disk_size
                .map(|s| format!(", grown to {s}"))
                .unwrap_or_default()
        ),
    );
    Ok(Start::Boot(chain))
}

/// Look the chain up in the layer cache: report what was discarded, say for every layer
/// whether it is cached or runs (events, manifest), and keep the cache for the inserts to
/// come. Returns the cached prefix as chain layers (their files in the cache).
async fn reuse_layers(cx: &BuildContext<'_>, base: &Base) -> Result<Vec<Layer>, BuildError> {
    let no_cache = cx.options.no_cache;
    let cacheable = cache::usable_prefix(cx.plan, &cx.chain, false);
    let usable = if no_cache { 0 } else { cacheable };
    let layer_cache = match cx.store.layers() {
        Ok(c) => Some(c),
        Err(e) => {
            cx.progress(
                Stage::Overlay,
                &format!(
                    "warning: the layer cache cannot be used ({}); every layer runs and none is cached",
                    error_chain(&e)
                ),
            );
            None
        }
    };
    // Needed to insert a first layer: the build's own, or one pulled from a shared cache.
    let base_format = match &layer_cache {
        Some(_) => Some(
            crate::vm::img::info(&base.path)
                .await
                .and_then(|i| i.disk_format())
                .map_err(|e| BuildError::Disk(LayerError::Parent(e)))?,
        ),
        None => None,
    };
    if let (Some(c), Some(format)) = (&layer_cache, base_format) {
        let bar = PullBar::new(cx, Stage::Overlay, None);
        let pulled =
            cache::pull_shared(cx.plan, c, &base.path, format, &cx.chain, usable, &bar).await;
        for warning in pulled {
            cx.progress(
                Stage::Overlay,
                &format!("warning: {warning}; the build goes on without those layers"),
            );
        }
    }
    let found = match &layer_cache {
        Some(c) => match cache::lookup(c, &base.path, &cx.chain, usable).await {
            Ok(found) => found,
            Err(LayerCacheError::Full(e)) => {
                return Err(BuildError::Cache(LayerCacheError::Full(e)));
            }
            Err(e) => {
                cx.progress(
                    Stage::Overlay,
                    &format!(
                        "warning: could not read the layer cache ({}); every layer runs",
                        error_chain(&e)
                    ),
                );
                Default::default()
            }
        },
        None => Default::default(),
    };
    for d in &found.discarded {
        cx.progress(
            Stage::Overlay,
            &format!("{d}; it and the layers built on it are rebuilt"),
        );
    }
    let reasons = cache::run_reasons(cx.plan, &cx.chain, found.layers.len(), no_cache);
    let mut layers = Vec::new();
    for (layer, cached) in cx.chain.iter().zip(&found.layers) {
        // A layer pulled from a shared cache names it.
        let from = cached.record.source.as_deref().unwrap_or("local");
        cx.log.emit(&BuildEvent::LayerCache {
            layer: &layer.name,
            key: &layer.key,
            status: "cached",
            from: Some(from),
            build: Some(&cached.record.build),
            reason: None,
        });
        cx.with_manifest(|m| {
            m.layers.push(LayerKey {
                component: layer.name.clone(),
                key: layer.key.clone(),
                from: Some(from.to_string()),
                build: Some(cached.record.build.clone()),
            })
        });
        layers.push(Layer {
            name: layer.name.clone(),
            key: Some(layer.key.clone()),
            file: cached.path.clone(),
        });
    }
    for (layer, reason) in cx.chain.iter().skip(found.layers.len()).zip(&reasons) {
        // A layer the lookup just discarded says why, rather than only that it is missing.
        let discarded = found.discarded.iter().find(|d| d.key == layer.key);
        let reason = match (reason, discarded) {
            (cache::RunReason::NotCached, Some(d)) => {
                format!("the cached layer was discarded: {}", d.damage)
            }
            _ => reason.to_string(),
        };
        cx.log.emit(&BuildEvent::LayerCache {
            layer: &layer.name,
            key: &layer.key,
            status: "run",
            from: None,
            build: None,
            reason: Some(&reason),
        });
    }
    if let Some(last) = found.layers.last()
        && layers.len() == cx.chain.len()
    {
        let packages = last.record.packages.clone().map(|p| *p);
        let sources = last.record.package_sources.clone().map(|s| *s);
        cx.with_manifest(|m| {
            m.packages = packages;
            m.package_sources = sources;
        });
    }
    if let (Some(cache), Some(base_format)) = (layer_cache, base_format) {
        let parent = found
            .layers
            .last()
            .map(|l| (l.record.key.clone(), l.record.sha256.clone()));
        let next = found.layers.len();
        if let Ok(mut slot) = cx.layer_cache.lock() {
            *slot = Some(Inserting {
                cache,
                base: base.path.clone(),
                base_format,
                parent,
                refresh: no_cache,
                on: next < cacheable,
                next,
                limit: cacheable,
                guards: found.layers,
            });
        }
    }
    Ok(layers)
}

/// Put a layer the build just finished (`file`, chain layer `name` with `key`) into the
/// layer cache, written on the previous one. A refusal stops the inserts of this build (its
/// later layers are written on bytes the cache does not hold) and is said; only a full disk
/// fails the build.
async fn insert_layer(
    cx: &BuildContext<'_>,
    stage: Stage,
    name: &str,
    key: &str,
    file: &Path,
    packages: Option<&PackageList>,
) -> Result<(), BuildError> {
    let Some(mut state) = cx.layer_cache.lock().ok().and_then(|mut s| s.take()) else {
        return Ok(());
    };
    let result = insert_into(cx, stage, &mut state, name, key, file, packages).await;
    if let Ok(mut slot) = cx.layer_cache.lock() {
        *slot = Some(state);
    }
    result
}

async fn insert_into(
    cx: &BuildContext<'_>,
    stage: Stage,
    state: &mut Inserting,
    name: &str,
    key: &str,
    file: &Path,
    packages: Option<&PackageList>,
) -> Result<(), BuildError> {
    let index = state.next;
    state.next += 1;
    if !state.on || index >= state.limit {
        state.on = false;
        return Ok(());
    }
    let short = &key[..12.min(key.len())];
    if state.refresh {
        match state.cache.evict(key) {
            Ok(true) => {}
            Ok(false) => {
                cx.progress(stage, &format!(
                    "layer {name} ({short}) is cached and in use by another build: kept; this build's later layers are not cached"
                ));
                state.on = false;
                return Ok(());
            }
            Err(e) => return cache_trouble(cx, stage, state, name, e),
        }
    }
    let image = cx.image();
    // What went into the key, so a later plan can say what changed.
    let inputs = Some(super::reuse::inputs(cx.plan, &cx.chain, index));
    // Recorded with the generalize layer, as its packages are (they come together).
    let sources = packages.and(cx.manifest().package_sources);
    let origin = Origin {
        component: name,
        build: &image,
        packages,
        package_sources: sources.as_ref(),
        inputs: inputs.as_ref(),
        // Built here (a pulled layer is inserted by distribute::oci::layers).
        source: None,
    };
    let started = Instant::now();
    match state.cache.insert(key, state.parent(), file, origin).await {
        Ok(inserted) => {
            let note = if inserted.ours {
                format!(
                    "cached layer {name} as {short} ({}, {:.1} s)",
                    recipe::ByteSize::b(inserted.layer.record.size),
                    started.elapsed().as_secs_f64()
                )
            } else {
                format!("layer {name} ({short}) was cached by another build meanwhile")
            };
            cx.progress(stage, &note);
            state.parent = Some((key.to_string(), inserted.sha256));
            state.guards.push(inserted.layer);
            Ok(())
        }
        Err(e) => cache_trouble(cx, stage, state, name, e),
    }
}

/// A full disk fails the build (exit 3, the cache is left consistent); anything else is said
/// and the build goes on without caching its later layers.
fn cache_trouble(
    cx: &BuildContext<'_>,
    stage: Stage,
    state: &mut Inserting,
    name: &str,
    e: LayerCacheError,
) -> Result<(), BuildError> {
    state.on = false;
    if let LayerCacheError::Full(_) = e {
        return Err(BuildError::Cache(e));
    }
    cx.progress(
        stage,
        &format!(
            "warning: layer {name} was not cached: {}; this build's later layers are not cached either",
            error_chain(&e)
        ),
    );
    Ok(())
}

// ─── 4. seed + boot ─────────────────────────────────────────────────────────────────────

/// The build VM, ready for steps, and the disk chain it writes.
pub struct BuildVm {
    pub session: Session,
    pub chain: DiskChain,
}

/// Which of the build's two VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhichVm {
    /// Boots the disk chain in place; only the cloud-init the build needs.
    Build,
    /// Boots a throwaway overlay of the result with a full first boot, as the image will see
    /// it; kept on failure with the build.
    Test,
}

/// How the build launches one of its VMs: every `infrastructure` setting a VM uses (the
/// accelerator unless the command line overrides it; `boot` only for the build VM), the user
/// data and the disk size.
/// Pure, so a test can check that each setting reaches the VM.
fn launch_options(
    plan: &Plan,
    options: &BuildOptions,
    keep: bool,
    which: WhichVm,
    image: &Path,
    logs: PathBuf,
) -> SessionOptions {
    let i = &plan.infrastructure;
    let mut vm = VmOptions::new(image);
    vm.accel = options.accel.unwrap_or(i.accelerator);
    vm.cpus = i.cpus;
    vm.memory_mib = i.memory.bytes() >> 20;
    vm.firmware = i.firmware;
    vm.network = i.network;
    // The test VM always boots the image's own way: the result as it will boot.
    vm.boot = match which {
        WhichVm::Build => i.boot,
        WhichVm::Test => recipe::Boot::Full,
    };
    vm.channel = GuestChannel::Agent {
        user_data: plan.user_data.clone(),
    };
    vm.qemu = options.qemu.clone();
    vm.log_dir = Some(logs);
    match which {
        WhichVm::Build => {
            // The chain is the build's: the VM writes to it in place and leaves it behind.
            vm.boot_in_place = true;
            // A throwaway VM: only the cloud-init the build needs (the test VM gets a full
            // first boot, as the image will see it).
            vm.cloud_init = CloudInitScope::Build {
                grow_root: plan.disk_size.is_some(),
            };
            // One instance for every boot of the chain: a build that resumes on cached
            // layers reboots the guest that wrote them, as far as cloud-init can tell.
            vm.instance_id = Some(format!("builder-{}", &plan.root_layer_key()[..16]));
        }
        WhichVm::Test => vm.keep_on_failure = keep,
    }
    let mut session = SessionOptions::new(vm);
    session.boot_timeout = Duration::from_secs(i.boot_timeout_secs);
    session.shutdown_timeout = Duration::from_secs(i.shutdown_timeout_secs);
    session
}

pub async fn boot(cx: &BuildContext<'_>, chain: DiskChain) -> Result<BuildVm, BuildError> {
    let mut options = launch_options(
        cx.plan,
        cx.options,
        cx.keep,
        WhichVm::Build,
        &chain.top,
        cx.logs.join("build-vm"),
    );
    options.vm.leftovers = cx.leftovers.clone();
    // On a cached layer: cloud-init is disabled for this boot (SKIP_CLOUD_INIT). The
    // appliance runs no cloud-init at all: its layers carry no marker.
    let appliance = cx.plan.infrastructure.boot == recipe::Boot::Appliance;
    let on_cached_layer = !chain.layers.is_empty();
    let resumed = on_cached_layer && !appliance;
    options.cloud_init_disabled = resumed;
    let progress = |m: &str| cx.progress(Stage::Boot, m);
    let session = Session::open(options, &progress)
        .await
        .map_err(vm_err("build"))?;
    if resumed {
        run_quiet(
            session.target().as_ref(),
            RUN_CLOUD_INIT,
            "unmark the cached layer",
        )
        .await?;
    }
    let accel = session.vm().accel().accel.as_str().to_string();
    let qemu_version = qemu_version(cx).await;
    cx.with_manifest(|m| {
        m.host.accelerator = accel;
        m.host.qemu_version = qemu_version;
    });
    let vm = BuildVm { session, chain };
    // A cached boot layer has both already (`diskSize` is in its key).
    if appliance && !on_cached_layer {
        let made = run_quiet(
            vm.session.target().as_ref(),
            APPLIANCE_HOST_KEY,
            "make an SSH host key",
        )
        .await?;
        if made.contains("made") {
            cx.progress(
                Stage::Boot,
                "made an ed25519 SSH host key, as the image's first boot would (generalize removes it)",
            );
        }
        grow_root_in_appliance(cx, &vm).await?;
    }
    check_disk_grew(cx, &vm).await?;
    let wd = cx.plan.working_directory.clone();
    run_quiet(
        vm.session.target().as_ref(),
        &format!("mkdir -p '{}'", wd.replace('\'', r"'\''")),
        "create the working directory",
    )
    .await?;
    Ok(vm)
}

async fn qemu_version(cx: &BuildContext<'_>) -> String {
    let qemu = cx
        .options
        .qemu
        .clone()
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    match tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        Err(_) => String::new(),
    }
}

/// Run a short shell command in the guest; its stdout, or an error naming `what`.
async fn run_quiet(target: &dyn Machine, script: &str, what: &str) -> Result<String, BuildError> {
    let out = Capture::default();
    let outcome = target
        .exec(
            &ExecRequest::bash(script).with_timeout(Some(Duration::from_secs(300))),
            &out,
        )
        .await
        .map_err(|source| BuildError::Guest {
            what: format!("could not {what} in the guest"),
            source,
        })?;
    if !outcome.status.success() {
        return Err(BuildError::Guest {
            what: format!("could not {what} in the guest"),
            source: MachineError::CommandFailed {
                command: script.to_owned(),
                status: outcome.status,
                stderr: String::from_utf8_lossy(&out.stderr()).trim().to_owned(),
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout()).into_owned())
}

/// What a full build VM's first boot gives steps and the appliance does not: an SSH host key
/// (cloud-init makes one ed25519 key in the build VM; `sshd -t`, and so many hardening
/// components, refuse to run without one). Only when the image has OpenSSH and no host key;
/// generalizing removes it as it removes cloud-init's.
pub(super) const APPLIANCE_HOST_KEY: &str = r#"if [ -d /etc/ssh ] && command -v ssh-keygen >/dev/null 2>&1 && ! ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1; then
  ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key && echo made
fi"#;

/// `diskSize` and the parent's size in bytes, when the disk was grown beyond the parent.
async fn disk_growth(cx: &BuildContext<'_>, vm: &BuildVm) -> Option<(recipe::ByteSize, u64)> {
    let wanted = cx.plan.disk_size?;
    let parent = match cx.plan.parent.virtual_size() {
        Some(s) => s.bytes(),
        None => crate::vm::img::info(&vm.chain.parent)
            .await
            .map(|i| i.virtual_size)
            .unwrap_or(0),
    };
    (wanted.bytes() > parent).then_some((wanted, parent))
}

/// Grows the root partition and its file system to the end of the disk, with the image's own
/// tools, for the appliance (which has no cloud-init to do it). Exit 3: it cannot (a tool is
/// missing, the root is not on a partition, a file system it cannot grow), the reason on the
/// last `error:` line; any other failure exits with the failing tool's status.
pub(super) const GROW_ROOT: &str = r#"set -u
exec 2>&1
fail() { echo "error: $*"; exit 3; }
src=$(findmnt -nvo SOURCE / 2>/dev/null || awk '$2 == "/" { s = $1 } END { print s }' /proc/self/mounts)
fstype=$(findmnt -no FSTYPE / 2>/dev/null || awk '$2 == "/" { t = $3 } END { print t }' /proc/self/mounts)
part=${src#/dev/}
sys=/sys/class/block/$part
[ -n "$part" ] && [ -e "$sys/partition" ] || fail "the root file system ($src) is not on a disk partition"
number=$(cat "$sys/partition")
disk=/dev/$(basename "$(readlink -f "$sys/..")")
case $fstype in
  ext2|ext3|ext4) tool=resize2fs ;;
  xfs) tool=xfs_growfs ;;
  btrfs) tool=btrfs ;;
  *) fail "the root file system is $fstype, which builder cannot grow" ;;
esac
missing=""
for t in growpart $tool; do command -v "$t" >/dev/null 2>&1 || missing="$missing \`$t\`"; done
[ -z "$missing" ] || fail "the image has no$missing (growpart is in cloud-guest-utils or cloud-utils-growpart)"
echo "+ growpart $disk $number"
out=$(growpart "$disk" "$number"); status=$?
echo "$out"
# 1 with NOCHANGE: the partition already fills the disk (a layer grown before).
if [ $status -ne 0 ] && ! { [ $status -eq 1 ] && case $out in *NOCHANGE*) true ;; *) false ;; esac; }; then
  exit $status
fi
echo "+ $tool ($fstype on $src)"
case $fstype in
  xfs) xfs_growfs / ;;
  btrfs) btrfs filesystem resize max / ;;
  *) resize2fs "$src" ;;
esac
"#;

/// For the appliance: grow the root partition and file system when `diskSize` grew the disk
/// ([`GROW_ROOT`]); [`check_disk_grew`] then checks the result as for a full boot.
async fn grow_root_in_appliance(cx: &BuildContext<'_>, vm: &BuildVm) -> Result<(), BuildError> {
    let Some((wanted, _)) = disk_growth(cx, vm).await else {
        return Ok(());
    };
    let out = Capture::default();
    let outcome = vm
        .session
        .target()
        .exec(
            &ExecRequest::bash(GROW_ROOT).with_timeout(Some(Duration::from_secs(300))),
            &out,
        )
        .await
        .map_err(|source| BuildError::Guest {
            what: "could not grow the root file system in the appliance".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout()).into_owned();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        cx.progress(Stage::Boot, line);
    }
    if outcome.status.success() {
        return Ok(());
    }
    let reason = match text.lines().rev().find_map(|l| l.strip_prefix("error: ")) {
        Some(reason) => reason.to_string(),
        None => {
            let last: Vec<&str> = text.lines().rev().take(3).collect();
            let last: Vec<&str> = last.into_iter().rev().collect();
            format!("growing it {}: {}", outcome.status, last.join(" / "))
        }
    };
    Err(BuildError::ApplianceGrow { wanted, reason })
}

/// With `diskSize`, the guest must have grown its root file system (cloud-init growpart and
/// resizefs, or systemd's x-systemd.growfs; in the appliance, [`grow_root_in_appliance`]).
/// Checked with `df` once cloud-init is done.
async fn check_disk_grew(cx: &BuildContext<'_>, vm: &BuildVm) -> Result<(), BuildError> {
    let Some((wanted, parent)) = disk_growth(cx, vm).await else {
        return Ok(());
    };
    let out = run_quiet(
        vm.session.target().as_ref(),
        "df -B1 --output=size / | tail -n 1",
        "measure the root file system",
    )
    .await?;
    let actual: u64 = out.trim().parse().unwrap_or(0);
    // The file system is smaller than the disk (partition table, boot partitions, its own
    // metadata); it must at least have taken most of the added space.
    let grown_enough = actual > parent.saturating_sub(parent / 10) + (wanted.bytes() - parent) / 2;
    cx.progress(
        Stage::Boot,
        &format!(
            "root file system: {} (disk {wanted}, parent {})",
            recipe::ByteSize::b(actual),
            recipe::ByteSize::b(parent)
        ),
    );
    if grown_enough {
        Ok(())
    } else {
        Err(BuildError::DiskNotGrown {
            wanted,
            actual: recipe::ByteSize::b(actual),
            parent: recipe::ByteSize::b(parent),
            grower: match cx.plan.infrastructure.boot {
                recipe::Boot::Full => {
                    "the image's cloud-init must run growpart and resize the root file system"
                }
                recipe::Boot::Appliance => {
                    "the image's growpart and resize2fs, xfs_growfs or btrfs ran in the appliance but the file system stayed small"
                }
            },
        })
    }
}

// ─── 5. components ──────────────────────────────────────────────────────────────────────

/// Commit the boot layer, then run each component's `build` and `validate` phases and commit
/// its layer; all within `buildTimeoutSeconds`.
pub async fn components(cx: &BuildContext<'_>, mut vm: BuildVm) -> Result<BuildVm, BuildError> {
    // Layers taken from the cache: the boot layer and the components below the first that runs.
    let cached = vm.chain.layers.len();
    if cached == 0 {
        let first = cx.chain[1].name.clone();
        let key = cx.chain[0].key.clone();
        commit_layer(cx, &mut vm, cache::BOOT, &key, &first).await?;
    }
    let secs = cx.plan.infrastructure.build_timeout_secs;
    let all = async {
        for (index, component) in cx.plan.components.iter().enumerate() {
            let label = component.label().to_string();
            if index + 1 < cached {
                cx.cached(Stage::Component(index), Some(&label));
                continue;
            }
            cx.stage_of(
                Stage::Component(index),
                Some(&label),
                run_component(cx, &mut vm, index, component),
            )
            .await?;
        }
        Ok::<(), BuildError>(())
    };
    let result = match tokio::time::timeout(Duration::from_secs(secs), all).await {
        Ok(result) => result,
        Err(_) => {
            return Err(BuildError::Timeout {
                stage: "the components",
                secs,
                setting: "buildTimeoutSeconds",
            });
        }
    };
    if let (Err(BuildError::Component(failure)), Some(shell), Some(agent)) =
        (&result, &cx.options.on_failure, vm.session.agent().cloned())
    {
        // The user's time in the shell is not the build's: outside the timeout. A VM that
        // dies meanwhile ends the wait (the shell's channel breaks with it).
        let describe = vm.session.vm().describe();
        let _ = vm
            .session
            .guard(shell.open(failure, &describe, agent))
            .await;
    }
    result?;
    Ok(vm)
}

fn component_folder(index: usize, component: &PlannedComponent) -> String {
    file_safe(&format!("{}-{}", index + 1, component.label()))
}

/// Run just before a layer is committed: a build that resumes on the layer boots it as a
/// reboot of the guest that wrote it, and cloud-init has nothing to do there (its work is in
/// the layer; the seed's instance is the same). Under TCG its Python stages cost tens of
/// seconds, so the layer carries `/etc/cloud/cloud-init.disabled`, which cloud-init's systemd
/// generator honours at boot ([`RUN_CLOUD_INIT`] removes it from the next layer right after
/// the commit, and from a resumed boot once it is ready). A marker the guest already had (a
/// component disabled cloud-init on purpose) is left alone: ours says `builder-layer`.
const SKIP_CLOUD_INIT: &str = r#"f=/etc/cloud/cloud-init.disabled
if [ -d /etc/cloud ] && [ ! -e "$f" ]; then echo builder-layer > "$f" && echo added; fi"#;

/// Remove the marker [`SKIP_CLOUD_INIT`] wrote, only if it is ours.
const RUN_CLOUD_INIT: &str = r#"f=/etc/cloud/cloud-init.disabled
if [ "$(cat "$f" 2>/dev/null)" = builder-layer ]; then rm -f "$f"; fi"#;

async fn commit_layer(
    cx: &BuildContext<'_>,
    vm: &mut BuildVm,
    name: &str,
    key: &str,
    next: &str,
) -> Result<(), BuildError> {
    let qmp = vm.session.vm().qmp().clone();
    let agent = vm
        .session
        .agent()
        .cloned()
        .ok_or_else(|| BuildError::Guest {
            what: format!("could not commit layer `{name}`"),
            source: MachineError::NoAgent,
        })?;
    // A build that resumes on this layer boots it without cloud-init (see SKIP_CLOUD_INIT);
    // the appliance boots none anyway.
    let target = vm.session.target();
    let marked = cx.plan.infrastructure.boot == recipe::Boot::Full
        && run_quiet(target.as_ref(), SKIP_CLOUD_INIT, "mark the layer")
            .await?
            .contains("added");
    let layer = vm
        .session
        .guard(vm.chain.commit(&qmp, &agent, name, Some(key), next))
        .await
        .map_err(vm_err("build"))?
        .map_err(BuildError::Disk)?
        .clone();
    if marked {
        run_quiet(target.as_ref(), RUN_CLOUD_INIT, "unmark the layer").await?;
    }
    cx.log.emit(&BuildEvent::LayerCommitted {
        layer: &layer.name,
        key: layer.key.as_deref(),
        file: &layer.file,
    });
    cx.with_manifest(|m| {
        m.layers.push(LayerKey {
            component: layer.name.clone(),
            key: key.to_string(),
            from: None,
            build: None,
        })
    });
    let stage = if name == cache::BOOT {
        Stage::Boot
    } else {
        Stage::Component(
            cx.chain
                .iter()
                .find(|l| l.key == key)
                .and_then(|l| l.component)
                .unwrap_or_default(),
        )
    };
    insert_layer(cx, stage, name, key, &layer.file, None).await
}

async fn run_component(
    cx: &BuildContext<'_>,
    vm: &mut BuildVm,
    index: usize,
    component: &PlannedComponent,
) -> Result<(), BuildError> {
    let appliance = cx.plan.infrastructure.boot == recipe::Boot::Appliance;
    let label = run_build_phases(cx, RunOn::Vm(&vm.session), index, component, appliance).await?;
    let next = cx.chain[index + 2].name.clone();
    let key = cx.chain[index + 1].key.clone();
    commit_layer(cx, vm, &label, &key, &next).await
}

/// Where a component's documents run: a VM's session (guarded: a VM that dies ends the run
/// at once) or another target (a container's agent: a container that ends breaks the agent's
/// connection; this machine, for `container-host-test`).
#[derive(Clone, Copy)]
pub(super) enum RunOn<'s> {
    Vm(&'s Session),
    Machine(&'s dyn Machine),
}

/// A component's `build` then `validate` phases on `on`, recorded in the manifest; the
/// component's label, or the failed step as the error. `appliance`: it ran in the appliance
/// (see [`wants_a_service_manager`]).
pub(super) async fn run_build_phases(
    cx: &BuildContext<'_>,
    on: RunOn<'_>,
    index: usize,
    component: &PlannedComponent,
    appliance: bool,
) -> Result<String, BuildError> {
    let (document, warnings) = plan::load_component_checked(component)?;
    // Shown before the build too; here they become part of the build's log and events.
    for w in &warnings {
        cx.progress(Stage::Component(index), w);
    }
    let wanted = ["build", "validate"];
    let phases: Vec<String> = wanted
        .iter()
        .filter(|p| document.phases.iter().any(|d| d.name == **p))
        .map(|p| p.to_string())
        .collect();
    let folder = component_folder(index, component);
    let report = run_document(cx, on, document, component, phases, &folder, "components").await?;
    let label = component.label().to_string();
    record_phases(cx, &label, &report.report);
    if !report.report.status.is_ok() {
        return Err(failure_of(cx, &label, &report, appliance));
    }
    Ok(label)
}

/// One executor run of one document on `on`.
async fn run_document(
    cx: &BuildContext<'_>,
    on: RunOn<'_>,
    document: crate::component::document::Document,
    component: &PlannedComponent,
    phases: Vec<String>,
    folder: &str,
    logs: &str,
) -> Result<executor::RunOutcome, BuildError> {
    cx.log.set_component(folder);
    let request = RunRequest {
        documents: vec![document],
        phases: Some(phases),
        parameters: component
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let options = RunOptions {
        execution_id: Some(folder.to_string()),
        log_directory: Some(cx.logs.join(logs)),
        working_directory: Some(PathBuf::from(&cx.plan.working_directory)),
        // ExecuteDocument runs only what the plan pinned, unchanged.
        pinned_documents: Some(
            component
                .documents
                .iter()
                .map(|d| {
                    (
                        executor::canonical(&d.local_path),
                        d.sha256.as_str().to_string(),
                    )
                })
                .collect(),
        ),
        ..RunOptions::default()
    };
    let executor_err = |source| BuildError::Executor {
        component: component.label().to_string(),
        source,
    };
    match on {
        RunOn::Vm(session) => {
            let target: Arc<dyn Machine> = session.target();
            let run = executor::run(
                target.as_ref(),
                request,
                options,
                cx.log,
                CancellationToken::new(),
            );
            session
                .guard(run)
                .await
                .map_err(vm_err(if logs == "tests" { "test" } else { "build" }))?
                .map_err(executor_err)
        }
        RunOn::Machine(target) => {
            executor::run(target, request, options, cx.log, CancellationToken::new())
                .await
                .map_err(executor_err)
        }
    }
}

fn record_phases(cx: &BuildContext<'_>, label: &str, report: &ExecutionReport) {
    let phases: Vec<PhaseStatus> = report
        .documents
        .iter()
        .flat_map(|d| d.phases.iter())
        .map(|p| PhaseStatus {
            component: label.to_string(),
            phase: p.name.clone(),
            status: status_of(p.status),
            duration_secs: seconds_between(&p.start_time, &p.end_time),
            message: (!p.failure_message.is_empty()).then(|| p.failure_message.clone()),
        })
        .collect();
    cx.with_manifest(|m| m.phases.extend(phases));
}

fn status_of(s: StepStatus) -> Status {
    match s {
        StepStatus::Success
        | StepStatus::SuccessWithIgnoredFailure
        | StepStatus::IgnoredFailure => Status::Success,
        StepStatus::Skipped => Status::Skipped,
        StepStatus::Cancelled => Status::Cancelled,
        StepStatus::Failed | StepStatus::TimedOut => Status::Failed,
    }
}

fn seconds_between(start: &str, end: &str) -> f64 {
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).ok();
    match (parse(start), parse(end)) {
        (Some(a), Some(b)) => (b - a).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    }
}

/// The failed step of a run, with its last lines of output and where its logs are.
/// `appliance`: it ran in the appliance (see [`wants_a_service_manager`]).
fn failure_of(
    cx: &BuildContext<'_>,
    label: &str,
    outcome: &executor::RunOutcome,
    appliance: bool,
) -> BuildError {
    let report = &outcome.report;
    let failed = report.documents.iter().find_map(|d| {
        d.phases.iter().find_map(|p| {
            p.steps
                .iter()
                .find(|s| matches!(s.status, StepStatus::Failed | StepStatus::TimedOut))
                .map(|s| (d, p, s))
        })
    });
    let mut failure = match failed {
        Some((d, p, s)) => {
            let tail = cx.log.tail(&d.name, &p.name, &s.name);
            ComponentFailure {
                component: label.to_string(),
                phase: p.name.clone(),
                step: s.name.clone(),
                attempt: s.attempts.max(1),
                max_attempts: s.max_attempts,
                cause: if s.failure_message.is_empty() {
                    format!("the step {}", s.status)
                } else {
                    s.failure_message.clone()
                },
                last_lines: tail.lines.into_iter().collect(),
                log: tail.log,
                run_log: outcome.log_dir.clone(),
                no_service_manager: false,
                in_container: false,
            }
        }
        None => ComponentFailure {
            component: label.to_string(),
            phase: report
                .documents
                .first()
                .and_then(|d| d.phases.iter().find(|p| !p.status.is_ok()))
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            step: String::new(),
            attempt: 1,
            max_attempts: 1,
            cause: if report.failure_message.is_empty() {
                format!("the run {}", report.status)
            } else {
                report.failure_message.clone()
            },
            last_lines: Vec::new(),
            log: None,
            run_log: outcome.log_dir.clone(),
            no_service_manager: false,
            in_container: false,
        },
    };
    if appliance {
        // The sign may be above the last lines (a service's unit failing, then more output).
        let full = failure
            .log
            .as_ref()
            .and_then(|log| fs_err::read(log).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let texts = failure.last_lines.iter().map(String::as_str);
        failure.no_service_manager =
            wants_a_service_manager(texts.chain([failure.cause.as_str(), full.as_str()]));
    }
    BuildError::Component(Box::new(failure))
}

// ─── 6. generalize ──────────────────────────────────────────────────────────────────────

/// The build VM after generalizing, and the package list read before.
pub struct Sealed {
    vm: BuildVm,
}

pub async fn generalize(cx: &BuildContext<'_>, vm: BuildVm) -> Result<Sealed, BuildError> {
    let target = vm.session.target();
    // A `cloud-init clean` racing cloud-init's boot stages would be undone (cloud-init
    // recreates its instance state). Reboots already wait for them; this is for a step that
    // restarted cloud-init some other way, and returns at once otherwise.
    vm.session
        .settle(Duration::from_secs(900))
        .await
        .map_err(vm_err("build"))?;
    let packages: Option<PackageList> = vm
        .session
        .guard(generalize::packages(target.as_ref()))
        .await
        .map_err(vm_err("build"))?
        .map_err(BuildError::Generalize)?;
    if let Some(p) = &packages {
        cx.progress(
            Stage::Generalize,
            &format!("{} packages ({})", p.packages.len(), p.manager),
        );
    }
    cx.with_manifest(|m| m.packages = packages);
    let sources = vm
        .session
        .guard(generalize::package_sources(target.as_ref()))
        .await
        .map_err(vm_err("build"))?;
    let sources = package_sources(cx, Stage::Generalize, sources);
    cx.with_manifest(|m| m.package_sources = sources);
    cx.log.set_component("generalize");
    if !cx.plan.generalize {
        cx.progress(
            Stage::Generalize,
            "the recipe has `generalize: false`: only builder's agent is removed",
        );
    }
    let sink = StageOutput::new(cx.log, Stage::Generalize.name());
    let t0 = Utc::now();
    let result = vm
        .session
        .guard(generalize::generalize(
            target.as_ref(),
            &sink,
            cx.plan.generalize,
        ))
        .await
        .map_err(vm_err("build"))?;
    sink.finish();
    let took = (Utc::now() - t0).num_milliseconds() as f64 / 1000.0;
    let (status, message) = match &result {
        Ok(g) => {
            for c in &g.checks {
                cx.progress(Stage::Generalize, &format!("✓ {}: {}", c.name, c.detail));
            }
            (Status::Success, None)
        }
        Err(e) => (Status::Failed, Some(e.to_string())),
    };
    cx.with_manifest(|m| {
        m.phases.push(PhaseStatus {
            component: "builder".into(),
            phase: "generalize".into(),
            status,
            duration_secs: took,
            message,
        })
    });
    result.map_err(BuildError::Generalize)?;
    Ok(Sealed { vm })
}

/// The image's package sources for the manifest, said in the stage's progress. Not being able
/// to read them, or some of their files, is a warning: the image is fine, only checking it
/// for package updates will lack what it needs.
pub(super) fn package_sources(
    cx: &BuildContext<'_>,
    stage: Stage,
    read: Result<Option<generalize::ReadSources>, GeneralizeError>,
) -> Option<PackageSources> {
    let read = match read {
        Ok(read) => read?,
        Err(e) => {
            cx.progress(
                stage,
                &format!(
                    "warning: could not read the image's package sources: {}",
                    error_chain(&e)
                ),
            );
            return None;
        }
    };
    for path in &read.unreadable {
        cx.progress(
            stage,
            &format!("warning: could not read {path} in the image; the manifest lacks it"),
        );
    }
    let mut s = read.sources;
    // Only the keys a repository of the image may be verified with go in the manifest.
    s.keys = crate::packages::gpg::keys_in_use(&s);
    cx.progress(stage, &format!("package sources: {}", s.summary()));
    Some(s)
}

/// `manifest.package_changes`: the package diff from the image this build replaces (the
/// newest stored build of its name made before it), when both have a package list. Not
/// finding it is a warning: the image is stored all the same.
pub(super) fn record_package_changes(cx: &BuildContext<'_>, stage: Stage, manifest: &mut Manifest) {
    let previous = match cx.store.replaced_by(&manifest.image.name, manifest.created) {
        Ok(previous) => previous,
        Err(e) => {
            cx.progress(
                stage,
                &format!(
                    "warning: could not find the image this one replaces, for its package changes: {}",
                    error_chain(&e)
                ),
            );
            return;
        }
    };
    let Some(changes) = previous.and_then(|p| manifest.package_changes_since(&p.manifest)) else {
        return;
    };
    cx.progress(stage, &format!("package changes {}", changes.summary()));
    manifest.package_changes = Some(changes);
}

// ─── 7. shut down ───────────────────────────────────────────────────────────────────────

/// The finished disk: a chain whose top file is the image. Nothing runs on it any more.
pub struct BuiltDisk {
    pub chain: DiskChain,
}

pub async fn shut_down(cx: &BuildContext<'_>, sealed: Sealed) -> Result<BuiltDisk, BuildError> {
    let BuildVm { session, chain } = sealed.vm;
    let progress = |m: &str| cx.progress(Stage::Shutdown, m);
    let report = session.close(Outcome::Success, &progress).await;
    cx.progress(
        Stage::Shutdown,
        &format!("{:?} after {:.1} s", report.rung, report.took.as_secs_f64()),
    );
    cx.leftovers.add(report.unwind);
    // The top file holds what generalizing wrote: the chain's last layer.
    #[expect(
        clippy::expect_used,
        reason = "the chain ends with the generalize layer"
    )]
    let layer = cx.chain.last().expect("the generalize layer");
    cx.with_manifest(|m| {
        m.layers.push(LayerKey {
            component: layer.name.clone(),
            key: layer.key.clone(),
            from: None,
            build: None,
        })
    });
    let packages = cx.manifest().packages;
    insert_layer(
        cx,
        Stage::Shutdown,
        &layer.name,
        &layer.key,
        &chain.top,
        packages.as_ref(),
    )
    .await?;
    Ok(BuiltDisk { chain })
}

/// Every layer came from the cache: the stages that would have made them are `cached`.
pub fn all_cached(cx: &BuildContext<'_>) {
    cx.cached(Stage::Boot, None);
    for (index, component) in cx.plan.components.iter().enumerate() {
        cx.cached(Stage::Component(index), Some(component.label()));
    }
    cx.cached(Stage::Generalize, None);
    cx.cached(Stage::Shutdown, None);
}

// ─── 8. test ────────────────────────────────────────────────────────────────────────────

/// The built disk, tested (or not, when the recipe turned tests off).
pub struct Tested {
    pub disk: BuiltDisk,
}

pub fn untested(disk: BuiltDisk) -> Tested {
    Tested { disk }
}

/// Boot a fresh VM on a throwaway overlay of the built disk, run the `test` phase of every
/// component that has one and then the test components, and throw the VM away. The built
/// disk's files must hash the same afterwards.
pub async fn test(cx: &BuildContext<'_>, disk: BuiltDisk) -> Result<Tested, BuildError> {
    let files = disk.chain.files();
    let mut before = Vec::new();
    for f in &files {
        before.push(hash(f).await?);
    }
    run_tests(cx, &disk).await?;
    for (f, b) in files.iter().zip(before) {
        let after = hash(f).await?;
        if after != b {
            return Err(BuildError::ArtifactChanged {
                file: f.clone(),
                before: b,
                after,
            });
        }
    }
    cx.progress(
        Stage::Test,
        "the built disk is unchanged (sha256 of every layer re-checked)",
    );
    Ok(Tested { disk })
}

/// Within `tests.timeoutSeconds` (the VM's boot and the tests; not the user's time in an
/// `--on-error shell`).
async fn run_tests(cx: &BuildContext<'_>, disk: &BuiltDisk) -> Result<(), BuildError> {
    let secs = cx.plan.tests.timeout_secs;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let timed_out = || BuildError::Timeout {
        stage: "the test stage",
        secs,
        setting: "tests.timeoutSeconds",
    };
    let mut options = launch_options(
        cx.plan,
        cx.options,
        cx.keep,
        WhichVm::Test,
        &disk.chain.top,
        cx.logs.join("test-vm"),
    );
    options.vm.leftovers = cx.leftovers.clone();
    let progress = |m: &str| cx.progress(Stage::Test, m);
    let session = tokio::time::timeout_at(deadline, Session::open(options, &progress))
        .await
        .map_err(|_| timed_out())?
        .map_err(vm_err("test"))?;
    let (results, failure) =
        tokio::time::timeout_at(deadline, test_components(cx, RunOn::Vm(&session), "test"))
            .await
            .map_err(|_| timed_out())??;
    cx.with_manifest(|m| m.tests = results);
    if let (Some(BuildError::Component(f)), Some(shell), Some(agent)) =
        (&failure, &cx.options.on_failure, session.agent().cloned())
    {
        let describe = session.vm().describe();
        let _ = session.guard(shell.open(f, &describe, agent)).await;
    }
    let outcome = if failure.is_some() {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    let report = session.close(outcome, &progress).await;
    cx.leftovers.add(report.unwind);
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// The `test` phase of every component that has one, then the test components: each one's
/// result, and the first failure.
/// `phase` is `test`, or `container-host-test` (AWSTOE's phase that a container build runs
/// on the host): then only the components that have it run, and the results say the phase.
pub(super) async fn test_components(
    cx: &BuildContext<'_>,
    on: RunOn<'_>,
    phase: &'static str,
) -> Result<(Vec<TestResult>, Option<BuildError>), BuildError> {
    let mut results = Vec::new();
    let mut failure = None;
    let has = |c: &&PlannedComponent| c.phases.iter().any(|p| p == phase);
    let with_test = cx.plan.components.iter().filter(has).chain(
        cx.plan
            .tests
            .components
            .iter()
            .filter(|c| phase == "test" || has(c)),
    );
    let prefix = if phase == "test" { "test" } else { "host-test" };
    for (index, component) in with_test.enumerate() {
        let (document, warnings) = plan::load_component_checked(component)?;
        for w in &warnings {
            cx.progress(Stage::Test, w);
        }
        let folder = file_safe(&format!("{prefix}-{}-{}", index + 1, component.label()));
        let t0 = Instant::now();
        let outcome = run_document(
            cx,
            on,
            document,
            component,
            vec![phase.to_string()],
            &folder,
            "tests",
        )
        .await?;
        let label = if phase == "test" {
            component.label().to_string()
        } else {
            format!("{} ({phase})", component.label())
        };
        let ok = outcome.report.status.is_ok();
        results.push(TestResult {
            component: label.clone(),
            status: if ok { Status::Success } else { Status::Failed },
            duration_secs: t0.elapsed().as_secs_f64(),
            message: (!ok).then(|| outcome.report.failure_message.clone()),
        });
        if !ok && failure.is_none() {
            // The test VM always boots full.
            failure = Some(failure_of(cx, &label, &outcome, false));
        }
    }
    Ok((results, failure))
}

// ─── 9. export ──────────────────────────────────────────────────────────────────────────

/// The exported files in the build's folder.
pub struct Exported {
    pub report: export::ExportReport,
    pub stem: String,
}

struct ExportBar<'a, 'b>(&'b BuildContext<'a>, Mutex<BTreeMap<String, u32>>);

impl ExportProgress for ExportBar<'_, '_> {
    fn started(&self, format: recipe::Format, file: &str) {
        self.0
            .progress(Stage::Export, &format!("{format}: writing {file}"));
    }
    fn converting(&self, format: recipe::Format, percent: f32) {
        let Ok(mut last) = self.1.lock() else { return };
        let p = percent as u32;
        let seen = last.entry(format.to_string()).or_insert(u32::MAX);
        // One event per 5 % (and each of 0 and 100 once).
        if *seen != u32::MAX && (p == *seen || (p < seen.saturating_add(5) && p < 100)) {
            return;
        }
        *seen = p;
        let what = format.to_string();
        self.0.log.emit(&BuildEvent::Transfer {
            stage: Stage::Export,
            what: &what,
            done: u64::from(p),
            total: Some(100),
            unit: crate::distribute::Unit::Percent,
        });
    }
    fn verifying(&self, format: recipe::Format) {
        self.0
            .progress(Stage::Export, &format!("{format}: checking and hashing"));
    }
    fn finished(&self, artifact: &Artifact, took: Duration) {
        self.0.progress(
            Stage::Export,
            &format!(
                "{}: {} ({}) in {:.1} s, sha256 {}",
                artifact.format,
                artifact.file,
                recipe::ByteSize::b(artifact.size),
                took.as_secs_f64(),
                artifact.sha256
            ),
        );
    }
}

pub async fn export(cx: &BuildContext<'_>, tested: Tested) -> Result<Exported, BuildError> {
    let stem = cx.plan.output_stem(cx.id.build, cx.build_date);
    let request = export_request(cx.plan, &tested.disk.chain.top, &cx.dir, &stem);
    let bar = ExportBar(cx, Mutex::new(BTreeMap::new()));
    let report = export::export(&request, &bar)
        .await
        .map_err(BuildError::Export)?;
    cx.with_manifest(|m| m.outputs = report.artifacts.clone());
    Ok(Exported { report, stem })
}

/// What the export stage writes: the recipe's `outputs` and, for an OVA, the VM it
/// describes. Pure, so a test can check that each setting reaches it.
fn export_request(plan: &Plan, top: &Path, dir: &Path, stem: &str) -> ExportRequest {
    let mut request = ExportRequest::new(top, dir, stem, &plan.outputs.formats);
    request.compression = Some(plan.outputs.compression);
    request.machine.name = format!("{}-{}", plan.recipe.name, plan.recipe.version);
    request.machine.description = plan.recipe.description.clone();
    request.machine.cpus = plan.infrastructure.cpus;
    request.machine.memory_mib = plan.infrastructure.memory.bytes() >> 20;
    request.machine.firmware = plan.infrastructure.firmware;
    request
}

// ─── 10. manifest + store ───────────────────────────────────────────────────────────────

pub async fn store(
    cx: &BuildContext<'_>,
    exported: Exported,
    slot: BuildSlot,
    warnings: Vec<String>,
) -> Result<super::Built, BuildError> {
    let mut manifest = cx.manifest();
    manifest.status = Status::Success;
    record_package_changes(cx, Stage::Store, &mut manifest);
    manifest.write(&cx.dir).map_err(BuildError::Manifest)?;
    let mut copies = Vec::new();
    if let Some(dir) = &cx.plan.outputs.local_directory {
        copies = copy_outputs(dir, &cx.dir, &exported.report)?;
    }
    let image = slot.commit().map_err(BuildError::Commit)?;
    let outputs = exported
        .report
        .artifacts
        .iter()
        .map(|a| a.path(&image.dir))
        .collect::<Vec<_>>();
    let _ = exported.stem;
    let mut warnings = warnings;
    if cx.plan.shared_cache.to.is_some() {
        // The image is stored whatever happens here: a push that fails is a warning.
        let bar = PullBar::new(cx, Stage::Store, None);
        let failed = match cx.store.layers() {
            Ok(layers) => cache::push_shared(cx.plan, &layers, &cx.chain, &bar).await,
            Err(e) => Some(format!(
                "could not push the layer cache: {}",
                error_chain(&e)
            )),
        };
        if let Some(warning) = failed {
            cx.progress(Stage::Store, &format!("warning: {warning}"));
            warnings.push(warning);
        }
    }
    Ok(super::Built {
        image,
        outputs,
        copies,
        warnings,
        receipts: Vec::new(),
        distribution_failures: Vec::new(),
    })
}

// ─── 11. distribute ─────────────────────────────────────────────────────────────────────

/// A distribution target's progress as build events (stage `distribute`).
struct DistributeEvents<'a, 'b>(&'b BuildLog<'a>);

impl crate::distribute::Progress for DistributeEvents<'_, '_> {
    fn step(&self, target: &str, message: &str) {
        self.0
            .progress(Stage::Distribute, &format!("{target}: {message}"));
    }
    fn transfer(&self, target: &str, what: &str, done: u64, total: Option<u64>) {
        let what = format!("{target}: {what}");
        self.0.emit(&BuildEvent::Transfer {
            stage: Stage::Distribute,
            what: &what,
            done,
            total,
            unit: crate::distribute::Unit::Bytes,
        });
    }
    fn converting(&self, target: &str, what: &str, percent: u64) {
        let what = format!("{target}: {what}");
        self.0.emit(&BuildEvent::Transfer {
            stage: Stage::Distribute,
            what: &what,
            done: percent,
            total: Some(100),
            unit: crate::distribute::Unit::Percent,
        });
    }
}

/// Send the stored image to every target of the recipe, one after another. A target that
/// fails does not stop the others; the image stays stored either way. Every receipt is
/// recorded in the store. Fails (after trying every target) when one target failed.
pub async fn distribute(cx: &BuildContext<'_>, built: &mut super::Built) -> Result<(), BuildError> {
    use crate::distribute::destination;
    let events = DistributeEvents(cx.log);
    // Check every target before the first one writes anything.
    for t in &cx.plan.distribution {
        match destination::preflight(&built.image, t).await {
            Ok(warnings) => {
                for w in warnings {
                    cx.progress(
                        Stage::Distribute,
                        &format!("warning: {}: {w}", t.describe(&built.image)),
                    );
                }
            }
            Err(e) => built
                .distribution_failures
                .push((t.describe(&built.image), error_chain(&e))),
        }
    }
    if built.distribution_failures.is_empty() {
        for t in &cx.plan.distribution {
            let what = t.describe(&built.image);
            cx.progress(Stage::Distribute, &format!("to {what}"));
            match destination::distribute(&built.image, t, &events).await {
                Ok(receipt) => {
                    cx.progress(
                        Stage::Distribute,
                        &format!("{}: {}", receipt.kind, receipt.location),
                    );
                    if let Err(e) = cx
                        .store
                        .record_receipts(&built.image, std::slice::from_ref(&receipt))
                    {
                        built
                            .warnings
                            .push(format!("could not record the receipt: {}", error_chain(&e)));
                    }
                    built.receipts.push(receipt);
                }
                Err(e) => built.distribution_failures.push((what, error_chain(&e))),
            }
        }
    }
    for (what, error) in &built.distribution_failures {
        cx.progress(Stage::Distribute, &format!("failed: {what}: {error}"));
    }
    match built.distribution_failures.first() {
        None => Ok(()),
        Some((what, error)) => Err(BuildError::Distribute {
            target: what.clone(),
            message: error.clone(),
            failed: built.distribution_failures.len(),
        }),
    }
}

/// The build's last event, then its log is closed.
pub fn finished(cx: &BuildContext<'_>, built: &super::Built) {
    let image_name = cx.image();
    let message = built
        .distribution_failures
        .first()
        .map(|(what, error)| format!("distribution to {what} failed: {error}"));
    cx.log.emit(&BuildEvent::BuildFinished {
        status: if message.is_some() {
            "distributionFailed"
        } else {
            "success"
        },
        image: &image_name,
        directory: Some(&built.image.dir),
        outputs: built.outputs.iter().map(PathBuf::as_path).collect(),
        message: message.as_deref(),
        warnings: built.warnings.iter().map(String::as_str).collect(),
        duration_ms: cx.elapsed().as_millis() as u64,
    });
    cx.log.close();
}

/// Copy the outputs and `SHA256SUMS` to `dest` (each under a temporary name, then renamed).
fn copy_outputs(
    dest: &Path,
    from: &Path,
    report: &export::ExportReport,
) -> Result<Vec<PathBuf>, BuildError> {
    fs_err::create_dir_all(dest).map_err(BuildError::Copy)?;
    let mut names: Vec<String> = report.artifacts.iter().map(|a| a.file.clone()).collect();
    names.push(export::SUMS_FILE.to_string());
    let mut copies = Vec::new();
    for name in names {
        let target = dest.join(&name);
        let temp = dest.join(format!(".{name}.partial"));
        fs_err::copy(from.join(&name), &temp).map_err(BuildError::Copy)?;
        fs_err::rename(&temp, &target).map_err(BuildError::Copy)?;
        copies.push(target);
    }
    Ok(copies)
}

/// After a failure: record it in the manifest, keep the logs in the store's `failed/` area.
/// Returns where the logs are.
pub fn abandon(
    cx: &BuildContext<'_>,
    slot: BuildSlot,
    error: &BuildError,
    warnings: &[String],
) -> Option<PathBuf> {
    let message = error_chain(error);
    let mut manifest = cx.manifest();
    manifest.status = Status::Failed;
    let _ = manifest.write(&cx.dir);
    let image = cx.image();
    cx.log.emit(&BuildEvent::BuildFinished {
        status: "failed",
        image: &image,
        directory: None,
        outputs: Vec::new(),
        message: Some(&message),
        warnings: warnings.iter().map(String::as_str).collect(),
        duration_ms: cx.elapsed().as_millis() as u64,
    });
    cx.log.close();
    slot.abandon(&message)
        .ok()
        .map(|dir| dir.join(crate::store::LOGS_DIR))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use crate::recipe::Sha256;

    #[test]
    fn an_oci_tag_the_plan_resolved_is_recorded_pinned() {
        let digest = Sha256::parse(&"ab".repeat(32)).unwrap();
        let resolved = parent_input(&PlannedParent::Oci {
            reference: "127.0.0.1:5000/base:stable".into(),
            manifest_digest: digest.clone(),
        });
        assert_eq!(
            resolved.source,
            format!("oci://127.0.0.1:5000/base:stable@sha256:{digest}")
        );
        assert_eq!(resolved.sha256, digest.as_str());
        let written = format!("127.0.0.1:5000/base:stable@sha256:{digest}");
        let pinned = parent_input(&PlannedParent::Oci {
            reference: written.clone(),
            manifest_digest: digest,
        });
        assert_eq!(pinned.source, format!("oci://{written}"));
    }

    use crate::build::plan::{ParentResolver, ResolveError, StoredParent};

    const COMPONENT: &str = "name: hello\nschemaVersion: 1.0\nparameters:\n  - Greeting:\n      type: string\n      default: hi\nphases:\n  - name: build\n    steps:\n      - name: Say\n        action: ExecuteBash\n        inputs:\n          commands: ['echo {{ Greeting }}']\n";
    const TEST_COMPONENT: &str = "name: check\nschemaVersion: 1.0\nphases:\n  - name: test\n    steps:\n      - name: Check\n        action: ExecuteBash\n        inputs:\n          commands: ['true']\n";
    const RECIPE: &str =
        "name: web\nversion: 1.0.0\nparentImage: base.raw\ncomponents:\n  - path: c.yml\n";

    /// Every stored reference resolves to `base.raw`, as the build it names.
    struct Stored(PathBuf);
    impl ParentResolver for Stored {
        fn resolve(
            &self,
            name: &str,
            version: &crate::recipe::VersionPattern,
        ) -> Result<StoredParent, ResolveError> {
            Ok(StoredParent {
                reference: format!("{name}/{version}/1").replace(".x", ".0"),
                disk: self.0.clone(),
                sha256: recipe::Sha256::parse(&"ab".repeat(32)).unwrap(),
            })
        }
    }

    fn plan_of(dir: &Path, recipe_text: &str) -> Result<Plan, PlanError> {
        fs_err::write(dir.join("recipe.yml"), recipe_text).unwrap();
        let env = |_: &str| None;
        let validated = plan::validate(&dir.join("recipe.yml"), &env)?;
        plan::plan(validated, &Stored(dir.join("base.raw")), &env, &mut |_| {})
    }

    /// Where the build reads a setting: what it derives from the plan there.
    #[derive(Clone, Copy)]
    enum Reads {
        /// The build VM's launch options ([`launch_options`]).
        BuildVm,
        /// Whether a failed build keeps its disks ([`keeps_on_failure`]).
        Keep,
        /// The export stage's request ([`export_request`]).
        Export,
        /// The outputs' file stem (and the store's image name and version).
        Stem,
        /// The manifest's inputs ([`fill_inputs`]).
        Manifest,
        /// The targets the distribute stage sends the image to.
        Distribution,
        /// A plan field a stage reads directly (named here, the stage in the row's comment).
        Plan(fn(&Plan) -> String),
        /// A check, not a setting: the changed value (a wrong pin) is refused before the build.
        Refused,
    }

    fn derived(plan: &Plan, reads: Reads) -> String {
        let options = BuildOptions::default();
        match reads {
            Reads::BuildVm => format!(
                "{:?}",
                launch_options(
                    plan,
                    &options,
                    keeps_on_failure(plan, &options),
                    WhichVm::Build,
                    Path::new("/top.qcow2"),
                    PathBuf::from("/logs"),
                )
            ),
            Reads::Keep => format!(
                "{} {:?}",
                keeps_on_failure(plan, &options),
                launch_options(
                    plan,
                    &options,
                    keeps_on_failure(plan, &options),
                    WhichVm::Test,
                    Path::new("/top.qcow2"),
                    PathBuf::from("/logs"),
                )
            ),
            Reads::Export => format!(
                "{:?}",
                export_request(plan, Path::new("/top.qcow2"), Path::new("/out"), "stem")
            ),
            Reads::Stem => {
                use chrono::TimeZone;
                let date = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
                format!(
                    "{} {}/{}",
                    plan.output_stem(1, date),
                    plan.recipe.name,
                    plan.recipe.version
                )
            }
            Reads::Manifest => {
                let m = manifest_of(plan);
                format!("{:?}", m.inputs)
            }
            Reads::Distribution => format!("{:?}", plan.distribution),
            Reads::Plan(field) => field(plan),
            Reads::Refused => String::new(),
        }
    }

    /// `RECIPE` with `replace` applied and `add` appended.
    /// The chain the build walks: boot, each component, generalize; what may come from the
    /// cache, and why the rest runs, with `cache: false` and `--no-cache`.
    #[test]
    fn the_layer_chain_and_what_runs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs_err::write(d.join("c.yml"), COMPONENT).unwrap();
        fs_err::write(d.join("d.yml"), COMPONENT.replace("hello", "other")).unwrap();
        fs_err::write(d.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        let three = recipe_with(&[], "  - path: d.yml\n  - path: c.yml\n");
        let plan = plan_of(d, &three).unwrap();
        let chain = cache::chain(&plan);
        let names: Vec<&str> = chain.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names[0], "boot");
        assert_eq!(names[4], "generalize");
        assert_eq!(chain.len(), 5);
        assert_eq!(chain[0].key, plan.root_layer_key());
        for (i, c) in plan.components.iter().enumerate() {
            assert_eq!(Some(&chain[i + 1].key), c.layer_key.as_ref());
            assert_eq!(chain[i + 1].component, Some(i));
        }
        // The same component twice at different places has different keys.
        assert_ne!(chain[1].key, chain[3].key);
        assert_eq!(
            chain[4].key,
            cache::generalize_key(&chain[3].key, plan.generalize)
        );
        assert_eq!(cache::usable_prefix(&plan, &chain, false), 5);
        assert_eq!(cache::usable_prefix(&plan, &chain, true), 0);
        let reasons = cache::run_reasons(&plan, &chain, 2, false);
        assert_eq!(
            reasons,
            [
                cache::RunReason::NotCached,
                cache::RunReason::Earlier(chain[2].name.clone()),
                cache::RunReason::Earlier(chain[2].name.clone()),
            ]
        );
        assert!(
            cache::run_reasons(&plan, &chain, 0, true)
                .iter()
                .all(|r| *r == cache::RunReason::NoCache)
        );

        // `cache: false` on the second entry: it and everything above it always run.
        let off = recipe_with(&[], "  - path: d.yml\n    cache: false\n  - path: c.yml\n");
        let plan = plan_of(d, &off).unwrap();
        let off_chain = cache::chain(&plan);
        assert_eq!(
            off_chain.iter().map(|l| &l.key).collect::<Vec<_>>(),
            chain.iter().map(|l| &l.key).collect::<Vec<_>>(),
            "`cache: false` is not part of any key"
        );
        assert_eq!(cache::usable_prefix(&plan, &off_chain, false), 2);
        assert_eq!(
            cache::run_reasons(&plan, &off_chain, 2, false)[0],
            cache::RunReason::CacheOff
        );
        // The build VM's cloud-init instance is the chain's, whatever the build.
        let vm = launch_options(
            &plan,
            &BuildOptions::default(),
            false,
            WhichVm::Build,
            d,
            d.join("logs"),
        );
        assert_eq!(
            vm.vm.instance_id,
            Some(format!("builder-{}", &chain[0].key[..16]))
        );
    }

    fn recipe_with(replace: &[(&str, &str)], add: &str) -> String {
        let mut text = RECIPE.to_string();
        for (from, to) in replace {
            assert!(text.contains(from), "`{from}` is not in the base recipe");
            text = text.replace(from, to);
        }
        text + add
    }

    /// Every declared recipe setting (`recipe::settings`, which gives the walker its keys,
    /// the JSON schema and the reference) changes what the build does: a launch option of its
    /// VMs, the export, the manifest, the distribution, or a plan field a stage reads. A key whose change reaches nothing is a setting that is
    /// accepted and ignored (as `shutdownTimeoutSeconds` was). A setting declared without a
    /// row here fails the test.
    #[test]
    fn every_recipe_key_changes_what_the_build_does() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs_err::write(d.join("c.yml"), COMPONENT).unwrap();
        fs_err::write(d.join("d.yml"), COMPONENT.replace("hello", "other")).unwrap();
        fs_err::write(d.join("t.yml"), TEST_COMPONENT).unwrap();
        fs_err::write(d.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        fs_err::write(d.join("other.raw"), vec![1u8; 1 << 20]).unwrap();
        let with_parameter = COMPONENT.replace("name: build", "name: test");
        fs_err::write(d.join("tp.yml"), with_parameter).unwrap();
        fs_err::write(d.join("infra.yml"), "cpus: 3\n").unwrap();

        fn parent(to: &str) -> [(&'static str, &str); 1] {
            [("parentImage: base.raw", to)]
        }
        let dist = |entry: &str| format!("distribution:\n  - {entry}\n");
        let ami = |extra: &str| dist(&format!("ami: {{bucket: images{extra}}}"));
        let url = |file: &str| {
            format!(
                "parentImage: {{url: 'https://example.invalid/{file}', sha256: {}}}",
                "cd".repeat(32)
            )
        };
        let (url_a, url_b) = (url("a.qcow2"), url("b.qcow2"));
        let bad_pin = format!(
            "parentImage: {{path: base.raw, sha256: {}}}",
            "0".repeat(64)
        );
        use Reads::*;
        // (key, base recipe, changed recipe, where the build reads it)
        let rows: Vec<(&str, String, String, Reads)> = vec![
            (
                "name",
                RECIPE.into(),
                recipe_with(&[("name: web", "name: web2")], ""),
                Stem,
            ),
            (
                "version",
                RECIPE.into(),
                recipe_with(&[("1.0.0", "1.0.1")], ""),
                Stem,
            ),
            (
                "description",
                recipe_with(&[], "description: a\n"),
                recipe_with(&[], "description: b\n"),
                Export,
            ),
            // A container recipe: built by `build::container` from the plan's template.
            (
                "containerType",
                recipe_with(&[], ""),
                recipe_with(&[], "containerType: docker\n"),
                Plan(|p| format!("{:?}", p.container)),
            ),
            (
                "dockerfileTemplate",
                recipe_with(&[], ""),
                recipe_with(
                    &[],
                    "containerType: docker\ndockerfileTemplate: |\n  FROM {{{ imagebuilder:parentImage }}}\n  {{{ imagebuilder:components }}}\n",
                ),
                Plan(|p| format!("{:?}", p.container)),
            ),
            (
                "parentImage",
                RECIPE.into(),
                recipe_with(&parent("parentImage: other.raw"), ""),
                Manifest,
            ),
            (
                "parentImage.path",
                recipe_with(&parent("parentImage: {path: base.raw}"), ""),
                recipe_with(&parent("parentImage: {path: other.raw}"), ""),
                Manifest,
            ),
            (
                "parentImage.url",
                recipe_with(&parent(&url_a), ""),
                recipe_with(&parent(&url_b), ""),
                Manifest,
            ),
            (
                "parentImage.image",
                recipe_with(&parent("parentImage: {image: base/1.x.x}"), ""),
                recipe_with(&parent("parentImage: {image: base/2.x.x}"), ""),
                Manifest,
            ),
            (
                "parentImage.sha256",
                RECIPE.into(),
                recipe_with(&parent(&bad_pin), ""),
                Refused,
            ),
            (
                "components",
                RECIPE.into(),
                recipe_with(&[("c.yml", "d.yml")], ""),
                Manifest,
            ),
            (
                "components.path",
                RECIPE.into(),
                recipe_with(&[("c.yml", "d.yml")], ""),
                Manifest,
            ),
            (
                "components.parameters",
                RECIPE.into(),
                recipe_with(&[], "    parameters: {Greeting: yo}\n"),
                Manifest,
            ),
            // Read by the build's layer cache (`build::cache`): always run it.
            (
                "components.cache",
                RECIPE.into(),
                recipe_with(&[], "    cache: false\n"),
                Plan(|p| p.components[0].cache.to_string()),
            ),
            // Read by `boot` (mkdir) and `run_document` (the executor's working directory).
            (
                "workingDirectory",
                RECIPE.into(),
                recipe_with(&[], "workingDirectory: /var/tmp\n"),
                Plan(|p| p.working_directory.clone()),
            ),
            (
                "userData",
                RECIPE.into(),
                recipe_with(&[], "userData: |\n  #cloud-config\n  packages: []\n"),
                BuildVm,
            ),
            // Also read by `overlay`, which grows the disk to it.
            (
                "diskSize",
                RECIPE.into(),
                recipe_with(&[], "diskSize: 128MiB\n"),
                BuildVm,
            ),
            (
                "infrastructure",
                recipe_with(&[], "infrastructure: {cpus: 2}\n"),
                recipe_with(&[], "infrastructure: infra.yml\n"),
                BuildVm,
            ),
            (
                "infrastructure.cpus",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {cpus: 3}\n"),
                BuildVm,
            ),
            (
                "infrastructure.memory",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {memory: 1GiB}\n"),
                BuildVm,
            ),
            (
                "infrastructure.accelerator",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {accelerator: tcg}\n"),
                BuildVm,
            ),
            (
                "infrastructure.firmware",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {firmware: uefi}\n"),
                BuildVm,
            ),
            (
                "infrastructure.boot",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {boot: appliance}\n"),
                BuildVm,
            ),
            (
                "infrastructure.network",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {network: user}\n"),
                BuildVm,
            ),
            (
                "infrastructure.bootTimeoutSeconds",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {bootTimeoutSeconds: 100}\n"),
                BuildVm,
            ),
            // The deadline of the `components` stage.
            (
                "infrastructure.buildTimeoutSeconds",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {buildTimeoutSeconds: 100}\n"),
                Plan(|p| p.infrastructure.build_timeout_secs.to_string()),
            ),
            (
                "infrastructure.shutdownTimeoutSeconds",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {shutdownTimeoutSeconds: 30}\n"),
                BuildVm,
            ),
            (
                "infrastructure.keepOnFailure",
                RECIPE.into(),
                recipe_with(&[], "infrastructure: {keepOnFailure: true}\n"),
                Keep,
            ),
            // `tests` and `tests.enabled`: `build` runs the test stage or skips it.
            (
                "tests",
                RECIPE.into(),
                recipe_with(&[], "tests: {enabled: false}\n"),
                Plan(|p| p.tests.enabled.to_string()),
            ),
            (
                "tests.enabled",
                RECIPE.into(),
                recipe_with(&[], "tests: {enabled: false}\n"),
                Plan(|p| p.tests.enabled.to_string()),
            ),
            // The deadline of `run_tests`.
            (
                "tests.timeoutSeconds",
                RECIPE.into(),
                recipe_with(&[], "tests: {timeoutSeconds: 100}\n"),
                Plan(|p| p.tests.timeout_secs.to_string()),
            ),
            (
                "tests.components",
                RECIPE.into(),
                recipe_with(&[], "tests:\n  components:\n    - path: t.yml\n"),
                Manifest,
            ),
            (
                "tests.components.path",
                recipe_with(&[], "tests:\n  components:\n    - path: t.yml\n"),
                recipe_with(&[], "tests:\n  components:\n    - path: tp.yml\n"),
                Manifest,
            ),
            (
                "tests.components.parameters",
                recipe_with(&[], "tests:\n  components:\n    - path: tp.yml\n"),
                recipe_with(
                    &[],
                    "tests:\n  components:\n    - path: tp.yml\n      parameters: {Greeting: yo}\n",
                ),
                Manifest,
            ),
            (
                "outputs",
                RECIPE.into(),
                recipe_with(&[], "outputs: {formats: [raw]}\n"),
                Export,
            ),
            (
                "outputs.formats",
                RECIPE.into(),
                recipe_with(&[], "outputs: {formats: [raw]}\n"),
                Export,
            ),
            (
                "outputs.compression",
                RECIPE.into(),
                recipe_with(&[], "outputs: {compression: zstd}\n"),
                Export,
            ),
            (
                "outputs.name",
                RECIPE.into(),
                recipe_with(&[], "outputs: {name: 'x-{{imagebuilder:version}}'}\n"),
                Stem,
            ),
            // Where the `store` stage copies the outputs.
            (
                "outputs.directory",
                RECIPE.into(),
                recipe_with(&[], "outputs: {directory: out/}\n"),
                Plan(|p| format!("{:?}", p.outputs.local_directory)),
            ),
            // What the `generalize` stage runs.
            (
                "generalize",
                RECIPE.into(),
                recipe_with(&[], "generalize: false\n"),
                Plan(|p| p.generalize.to_string()),
            ),
            // What `build::cache` pulls from and pushes to.
            (
                "cache",
                RECIPE.into(),
                recipe_with(&[], "cache: {to: oci://127.0.0.1:5000/cache/web}\n"),
                Plan(|p| format!("{:?}", p.shared_cache)),
            ),
            (
                "cache.from",
                RECIPE.into(),
                recipe_with(&[], "cache: {from: oci://127.0.0.1:5000/cache/web}\n"),
                Plan(|p| format!("{:?}", p.shared_cache.from)),
            ),
            (
                "cache.to",
                RECIPE.into(),
                recipe_with(&[], "cache: {to: oci://127.0.0.1:5000/cache/web}\n"),
                Plan(|p| format!("{:?}", p.shared_cache.to)),
            ),
            (
                "distribution",
                RECIPE.into(),
                recipe_with(&[], &dist("directory: {path: out/}")),
                Distribution,
            ),
            (
                "distribution.directory",
                RECIPE.into(),
                recipe_with(&[], &dist("directory: {path: out/}")),
                Distribution,
            ),
            (
                "distribution.vagrant",
                RECIPE.into(),
                recipe_with(&[], &dist("vagrant: {path: out/}")),
                Distribution,
            ),
            (
                "distribution.oci",
                RECIPE.into(),
                recipe_with(&[], &dist("oci: {reference: 'r:5000/a:1'}")),
                Distribution,
            ),
            (
                "distribution.containerDisk",
                recipe_with(&[], &dist("oci: {reference: 'r:5000/a:1'}")),
                recipe_with(&[], &dist("containerDisk: {reference: 'r:5000/a:1'}")),
                Distribution,
            ),
            (
                "distribution.ami",
                RECIPE.into(),
                recipe_with(&[], &ami("")),
                Distribution,
            ),
            (
                "distribution.directory.path",
                recipe_with(&[], &dist("directory: {path: out/}")),
                recipe_with(&[], &dist("directory: {path: out2/}")),
                Distribution,
            ),
            (
                "distribution.directory.name",
                recipe_with(&[], &dist("directory: {path: out/}")),
                recipe_with(&[], &dist("directory: {path: out/, name: x}")),
                Distribution,
            ),
            (
                "distribution.directory.formats",
                recipe_with(&[], &dist("directory: {path: out/}")),
                recipe_with(&[], &dist("directory: {path: out/, formats: [qcow2]}")),
                Distribution,
            ),
            (
                "distribution.directory.overwrite",
                recipe_with(&[], &dist("directory: {path: out/}")),
                recipe_with(&[], &dist("directory: {path: out/, overwrite: true}")),
                Distribution,
            ),
            (
                "distribution.vagrant.path",
                recipe_with(&[], &dist("vagrant: {path: out/}")),
                recipe_with(&[], &dist("vagrant: {path: out/x.box}")),
                Distribution,
            ),
            (
                "distribution.vagrant.name",
                recipe_with(&[], &dist("vagrant: {path: out/}")),
                recipe_with(&[], &dist("vagrant: {path: out/, name: x}")),
                Distribution,
            ),
            (
                "distribution.vagrant.overwrite",
                recipe_with(&[], &dist("vagrant: {path: out/}")),
                recipe_with(&[], &dist("vagrant: {path: out/, overwrite: true}")),
                Distribution,
            ),
            (
                "distribution.oci.reference",
                recipe_with(&[], &dist("oci: {reference: 'r:5000/a:1'}")),
                recipe_with(&[], &dist("oci: {reference: 'r:5000/b:1'}")),
                Distribution,
            ),
            (
                "distribution.oci.plainHttp",
                recipe_with(&[], &dist("oci: {reference: 'r:5000/a:1'}")),
                recipe_with(
                    &[],
                    &dist("oci: {reference: 'r:5000/a:1', plainHttp: true}"),
                ),
                Distribution,
            ),
            (
                "distribution.containerDisk.reference",
                recipe_with(&[], &dist("containerDisk: {reference: 'r:5000/a:1'}")),
                recipe_with(&[], &dist("containerDisk: {reference: 'r:5000/b:1'}")),
                Distribution,
            ),
            (
                "distribution.containerDisk.plainHttp",
                recipe_with(&[], &dist("containerDisk: {reference: 'r:5000/a:1'}")),
                recipe_with(
                    &[],
                    &dist("containerDisk: {reference: 'r:5000/a:1', plainHttp: true}"),
                ),
                Distribution,
            ),
            (
                "distribution.ami.region",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", region: eu-west-1")),
                Distribution,
            ),
            (
                "distribution.ami.bucket",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami("2")),
                Distribution,
            ),
            (
                "distribution.ami.prefix",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", prefix: p/")),
                Distribution,
            ),
            (
                "distribution.ami.name",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", name: web-ami")),
                Distribution,
            ),
            (
                "distribution.ami.description",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", description: d")),
                Distribution,
            ),
            (
                "distribution.ami.amiTags",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", amiTags: {team: x}")),
                Distribution,
            ),
            (
                "distribution.ami.regions",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", regions: [us-east-1]")),
                Distribution,
            ),
            (
                "distribution.ami.launchPermission",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", launchPermission: {userGroups: [all]}")),
                Distribution,
            ),
            (
                "distribution.ami.launchPermission.userIds",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", launchPermission: {userIds: ['123456789012']}")),
                Distribution,
            ),
            (
                "distribution.ami.launchPermission.userGroups",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", launchPermission: {userGroups: [all]}")),
                Distribution,
            ),
            (
                "distribution.ami.bootMode",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", bootMode: uefi")),
                Distribution,
            ),
            (
                "distribution.ami.importMethod",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", importMethod: image")),
                Distribution,
            ),
            (
                "distribution.ami.endpoint",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", endpoint: {s3: 'http://127.0.0.1:9000'}")),
                Distribution,
            ),
            (
                "distribution.ami.endpoint.s3",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", endpoint: {s3: 'http://127.0.0.1:9000'}")),
                Distribution,
            ),
            (
                "distribution.ami.endpoint.ec2",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", endpoint: {ec2: 'http://127.0.0.1:9000'}")),
                Distribution,
            ),
            (
                "distribution.ami.profile",
                recipe_with(&[], &ami("")),
                recipe_with(&[], &ami(", profile: lab")),
                Distribution,
            ),
        ];

        // Every declared setting has a row, and every row is a declared setting.
        let mut accepted = crate::recipe::settings::paths();
        accepted.sort();
        let mut tested: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
        tested.sort();
        assert_eq!(
            tested, accepted,
            "each recipe key needs a row in this table (and each row a key)"
        );

        let mut ignored = Vec::new();
        for (key, base, changed, reads) in &rows {
            let before = plan_of(d, base).unwrap_or_else(|e| panic!("{key}: base: {e:?}"));
            if let Reads::Refused = reads {
                assert!(
                    plan_of(d, changed).is_err(),
                    "{key}: a wrong value is planned"
                );
                continue;
            }
            let after = plan_of(d, changed).unwrap_or_else(|e| panic!("{key}: changed: {e:?}"));
            if derived(&before, *reads) == derived(&after, *reads) {
                ignored.push(*key);
            }
        }
        assert!(
            ignored.is_empty(),
            "changing these settings changes nothing the build reads: {ignored:?}"
        );
    }

    /// What a VM's undo list could not do (a VM closed, or one dropped on an error path)
    /// reaches the build's report with its cause, and `build.log`, next to the build's own.
    #[test]
    fn the_vms_cleanup_warnings_reach_the_builds_report_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs_err::write(d.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        fs_err::write(d.join("c.yml"), TEST_COMPONENT).unwrap();
        let plan = plan_of(d, RECIPE).unwrap();
        let store = Store::open(d.join("store")).unwrap();
        let slot = allocate(&plan, &store).unwrap();
        let log = BuildLog::new(&slot.logs_dir(), &super::super::Quiet).unwrap();
        let options = BuildOptions::default();
        let cx = BuildContext::new(&plan, &store, &options, &slot, &log);
        cx.push_undo::<UndoError>("remove the build's work".into(), None, || {
            Err("device busy".into())
        });
        // A VM dropped on an error path: its list unwinds into the build's leftovers.
        let mut vm = UndoList::new(false, cx.leftovers.clone());
        vm.push("stop QEMU pid 4242", || {
            Err(crate::vm::process::ProcessError::StillRunning {
                pid: 4242,
                left: vec![4243],
            })
        });
        drop(vm);
        // A VM closed by a stage: its report is handed over the same way.
        let mut closed = UndoList::new(false, Leftovers::default());
        closed.push(
            "remove the VM folder /v",
            undo::remove_dir(d.join("base.raw")),
        );
        cx.leftovers.add(closed.unwind(Outcome::Success));

        let report = cx.unwind(Outcome::Success);
        let warnings = report.warnings();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert_eq!(
            warnings[0],
            "could not remove the build's work: device busy"
        );
        assert_eq!(
            warnings[1],
            "could not stop QEMU pid 4242: processes [4243] of group 4242 are still running after SIGKILL"
        );
        assert!(
            warnings[2].starts_with(&format!(
                "could not remove the VM folder /v: {} is left: ",
                d.join("base.raw").display()
            )),
            "{warnings:?}"
        );
        log.close();
        let text = fs_err::read_to_string(slot.logs_dir().join("build.log")).unwrap();
        for w in &warnings {
            assert!(text.contains(&format!("warning: {w}")), "{text}");
        }
        assert!(cx.unwind(Outcome::Success).is_clean(), "reported once");
    }

    /// The manifest's inputs list the documents a component runs through ExecuteDocument.
    #[test]
    fn the_manifest_lists_documents_run_through_execute_document() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs_err::create_dir(d.join("lib")).unwrap();
        fs_err::write(d.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        fs_err::write(
            d.join("c.yml"),
            "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Lib\n        action: ExecuteDocument\n        inputs:\n          document: lib/x.yml\n",
        )
        .unwrap();
        fs_err::write(d.join("lib/x.yml"), TEST_COMPONENT).unwrap();
        let plan = plan_of(d, RECIPE).unwrap();
        let m = manifest_of(&plan);
        let documents = &m.inputs.components[0].documents;
        assert_eq!(documents.len(), 1);
        assert_eq!(documents[0].path, "lib/x.yml");
        assert_eq!(
            documents[0].sha256,
            plan.components[0].documents[0].sha256.as_str()
        );
        fs_err::write(d.join("lib/x.yml"), format!("{TEST_COMPONENT}# edited\n")).unwrap();
        let mut edited = Manifest::new(m.image.clone(), "build");
        fill_inputs(&mut edited, &plan_of(d, RECIPE).unwrap());
        assert_ne!(edited.inputs.components[0].documents, *documents);
    }

    fn launched(plan: &Plan, which: WhichVm) -> SessionOptions {
        let options = BuildOptions::default();
        launch_options(
            plan,
            &options,
            false,
            which,
            Path::new("/top.qcow2"),
            PathBuf::from("/logs"),
        )
    }

    /// A manifest of build web/1.0.0/1 with `plan`'s inputs filled in.
    fn manifest_of(plan: &Plan) -> Manifest {
        let id = ImageId {
            name: "web".into(),
            version: "1.0.0".into(),
            build: 1,
        };
        let mut m = Manifest::new(id, "build");
        fill_inputs(&mut m, plan);
        m
    }

    /// The test recipe's plan booting full and booting the appliance (and the folder they
    /// read, which must outlive them).
    fn full_and_appliance_plans() -> (tempfile::TempDir, Plan, Plan) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs_err::write(d.join("c.yml"), COMPONENT).unwrap();
        fs_err::write(d.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        let full = plan_of(d, RECIPE).unwrap();
        let appliance =
            plan_of(d, &recipe_with(&[], "infrastructure: {boot: appliance}\n")).unwrap();
        (dir, full, appliance)
    }

    /// `infrastructure.boot` is the build VM's; the test VM always boots the image's own way.
    #[test]
    fn the_build_vm_boots_the_recipes_way_and_the_test_vm_boots_full() {
        let (_dir, full, appliance) = full_and_appliance_plans();
        assert_eq!(launched(&full, WhichVm::Build).vm.boot, recipe::Boot::Full);
        assert_eq!(
            launched(&appliance, WhichVm::Build).vm.boot,
            recipe::Boot::Appliance
        );
        assert_eq!(launched(&full, WhichVm::Test).vm.boot, recipe::Boot::Full);
        assert_eq!(
            launched(&appliance, WhichVm::Test).vm.boot,
            recipe::Boot::Full
        );
    }

    /// An appliance build's layers are not a full build's: every key of the chain differs,
    /// and the boot layer's record says why. A full build's root key holds what builder puts
    /// in its guest (the agent it installs, the firmware), not the appliance's.
    #[test]
    fn the_boot_mode_is_in_every_layer_key() {
        let (dir, full, appliance) = full_and_appliance_plans();
        let d = dir.path();
        let (a, b) = (cache::chain(&full), cache::chain(&appliance));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_ne!(x.key, y.key, "{}", x.name);
        }
        let settings = appliance.root_layer_inputs().settings;
        assert_eq!(settings.get("boot").map(String::as_str), Some("appliance"));
        assert!(settings.contains_key("appliance"), "{settings:?}");
        assert!(!full.root_layer_inputs().settings.contains_key("boot"));
        let settings = full.root_layer_inputs().settings;
        assert_eq!(
            settings.get("builderGuest").map(String::as_str),
            Some(crate::vm::seed::guest_digest())
        );
        assert_eq!(settings.get("firmware").map(String::as_str), Some("bios"));
        let uefi = plan_of(d, &recipe_with(&[], "infrastructure: {firmware: uefi}\n")).unwrap();
        assert_ne!(uefi.root_layer_key(), full.root_layer_key());
        // The plan's JSON (and so its digest) has `boot` only when it is not `full`.
        let json = serde_json::to_value(&full).unwrap();
        assert!(json["infrastructure"].get("boot").is_none(), "{json}");
        let json = serde_json::to_value(&appliance).unwrap();
        assert_eq!(json["infrastructure"]["boot"], "appliance");
    }

    /// A step that wanted a running systemd in the appliance gets the hint to boot `full`;
    /// any other failure, or the same output in a full boot, the usual hint.
    #[test]
    fn a_step_that_wants_a_service_manager_in_the_appliance_suggests_a_full_boot() {
        assert!(wants_a_service_manager([
            "System has not been booted with systemd as init system (PID 1). Can't operate.",
        ]));
        assert!(wants_a_service_manager([
            "ok",
            "Failed to connect to bus: No such file or directory",
        ]));
        assert!(wants_a_service_manager([
            "builder appliance: no service manager runs in the appliance; `systemctl start nginx` cannot run here."
        ]));
        assert!(!wants_a_service_manager([
            "E: Unable to locate package ngnix"
        ]));
        let failure = |no_service_manager| {
            BuildError::Component(Box::new(ComponentFailure {
                component: "nginx".into(),
                phase: "build".into(),
                step: "Start".into(),
                attempt: 1,
                max_attempts: 1,
                cause: "`systemctl start nginx` exited with status 1".into(),
                last_lines: vec![],
                log: None,
                run_log: None,
                no_service_manager,
                in_container: false,
            }))
        };
        let hint = failure(true).hint().unwrap();
        assert!(hint.contains("no service manager runs"), "{hint}");
        assert!(hint.contains("`infrastructure.boot: full`"), "{hint}");
        let hint = failure(false).hint().unwrap();
        assert!(hint.contains("--keep-on-failure"), "{hint}");
    }

    /// The appliance's grow script is valid shell.
    #[test]
    fn the_grow_script_parses() {
        for script in [GROW_ROOT, APPLIANCE_HOST_KEY] {
            let status = std::process::Command::new("bash")
                .args(["-n", "-c", script])
                .status()
                .unwrap();
            assert!(status.success(), "{script}");
        }
    }

    /// The manifest records how the build VM booted.
    #[test]
    fn the_manifest_records_the_build_vms_boot_mode() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs_err::write(d.join("c.yml"), COMPONENT).unwrap();
        fs_err::write(d.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        for (add, boot) in [
            ("", "full"),
            ("infrastructure: {boot: appliance}\n", "appliance"),
        ] {
            let plan = plan_of(d, &recipe_with(&[], add)).unwrap();
            let m = manifest_of(&plan);
            assert_eq!(m.host.boot, boot);
        }
    }
}
