//! The stages of one build, in order; what they create is released by [`crate::undo`] lists.
//!
//! [`build`] is the build: reading it is reading the stages. Each stage takes the previous
//! stage's value and returns the next; a stage that creates a resource registers its undo
//! right away (the VM's own resources are on the VM's list, the build's disk chain on the
//! build's). On success the lists unwind before the store commit; on failure they unwind as
//! a failure (keep-on-failure keeps the disk chain and logs and says how to remove them); a
//! dropped build future (Ctrl-C, SIGTERM, a timeout in the caller) unwinds through `Drop` and
//! leaves its report in [`BuildOptions::leftovers`]. What the VMs' lists could not undo is
//! part of the build's report: [`Built::warnings`], [`Failed::unwind`], `build.log` and the
//! `buildFinished` event.
//!
//! ```text
//! Plan ─allocate─▶ BuildSlot + logs ─fetch─▶ base ─overlay─▶ DiskChain ─boot─▶ BuildVm
//!   ─component × n (build, validate, commit layer)─▶ BuildVm ─generalize─▶ Sealed
//!   ─shut down─▶ BuiltDisk ─test (fresh VM)─▶ Tested ─export─▶ outputs ─manifest, commit─▶ StoredImage
//!   ─distribute (each recipe target; a failure leaves the image stored)─▶ Receipts
//! ```
//!
//! A container recipe (`Plan::container`) takes the stages of [`container`] instead: the
//! parent into buildah's storage, one `RUN` per component driven through the agent, the test
//! in a container of the image, the image stored as an OCI image layout; then the same
//! distribute stage.
//!
//! The overlay stage takes the longest usable prefix of the layer chain from the layer cache
//! ([`cache`]): the build VM boots on its last layer and runs only the components above it,
//! and each new layer is cached as it is committed. With every layer cached (generalize
//! too), overlay hands a finished disk ([`stages::Start::Built`]) straight to the test stage.

pub mod cache;
pub mod container;
pub mod events;
pub mod generalize;
pub mod layers;
pub mod plan;
pub mod reuse;
mod stages;

use std::path::PathBuf;
use std::time::Instant;

pub use events::{BuildEvent, BuildLog, BuildObserver, Quiet};
pub use stages::{BuildError, ComponentFailure, FailureShell, wants_a_service_manager};

use crate::recipe::Accelerator;
use crate::store::{Store, StoredImage};
use crate::undo::{Leftovers, Outcome, UnwindReport};
use crate::vm::ErrorClass;
use plan::{Plan, Stage};
use stages::BuildContext;

/// How to run a build, beyond the plan.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Keep the build's disk chain and logs (and the test VM's disk) when it fails; also set
    /// by the recipe's `infrastructure.keepOnFailure`.
    pub keep_on_failure: bool,
    /// Overrides the recipe's `infrastructure.accelerator`.
    pub accel: Option<Accelerator>,
    /// The QEMU system emulator; default `qemu-system-x86_64` from `PATH`.
    pub qemu: Option<PathBuf>,
    /// `--no-cache`: take no layer from the layer cache; every layer runs, and replaces the
    /// cached one of its key (the cache is refreshed).
    pub no_cache: bool,
    /// `--on-error shell`: called when a component step fails, with the build VM running.
    pub on_failure: Option<std::sync::Arc<dyn FailureShell>>,
    /// Where the cleanup report goes if the build is dropped before it returns (Ctrl-C): the
    /// caller reads it and tells the user. A build that returns puts it in its result.
    pub leftovers: Leftovers,
}

/// A finished, stored build.
#[derive(Debug)]
pub struct Built {
    pub image: StoredImage,
    /// The exported files, in the store.
    pub outputs: Vec<PathBuf>,
    /// Copies in the recipe's `outputs.directory`, if it names one.
    pub copies: Vec<PathBuf>,
    /// Undo actions that failed, the VMs' included (resources that may be left behind).
    pub warnings: Vec<String>,
    /// Where the recipe's `distribution` targets put the image (also in the store).
    pub receipts: Vec<crate::store::Receipt>,
    /// Targets that failed (the image is stored all the same): (target, error).
    pub distribution_failures: Vec<(String, String)>,
}

/// A build that did not finish.
#[derive(Debug)]
pub struct Failed {
    pub error: BuildError,
    /// `name/x.y.z/n`, when a build number had been handed out.
    pub image: Option<String>,
    /// Where the failed build's logs are kept.
    pub logs: Option<PathBuf>,
    /// What unwinding kept (keep-on-failure) and what it could not remove.
    pub unwind: UnwindReport,
}

impl Failed {
    pub fn class(&self) -> ErrorClass {
        self.error.class()
    }
}

/// Build `plan` into `store`. Every stage reports to `observer`; the build's logs are written
/// in the store (kept under `failed/` when the build fails).
pub async fn build(
    plan: &Plan,
    store: &Store,
    options: &BuildOptions,
    observer: &dyn BuildObserver,
) -> Result<Built, Failed> {
    let started = Instant::now();
    let fail = |error: BuildError| Failed {
        error,
        image: None,
        logs: None,
        unwind: UnwindReport::default(),
    };
    // A pipeline or the command line may have set the boot mode of a recipe with user data.
    if plan.user_data.is_some() && plan.infrastructure.boot == crate::recipe::Boot::Appliance {
        return Err(fail(BuildError::ApplianceUserData));
    }
    let slot = stages::allocate(plan, store).map_err(fail)?;
    let log = BuildLog::new(&slot.logs_dir(), observer).map_err(|e| fail(BuildError::Logs(e)))?;
    let cx = BuildContext::new(plan, store, options, &slot, &log);
    cx.started(started);

    // A container recipe: buildah builds the image (`container`); a machine recipe: the VM
    // stages. Both end stored the same way, distributed the same way.
    enum Done {
        Machine(stages::Exported),
        Container(container::BuiltImage),
    }
    let result = async {
        if plan.container.is_some() {
            // Boxed: the container flow's future inside this one's is deeper than rustc's
            // layout query allows for `cli::build`'s future.
            return Box::pin(container::run(&cx)).await.map(Done::Container);
        }
        let base = cx.stage(Stage::Fetch, stages::fetch_parent(&cx)).await?;
        let start = cx.stage(Stage::Overlay, stages::overlay(&cx, base)).await?;
        let built = match start {
            stages::Start::Built(built) => {
                stages::all_cached(&cx);
                built
            }
            stages::Start::Boot(chain) => {
                let vm = cx.stage(Stage::Boot, stages::boot(&cx, chain)).await?;
                let vm = stages::components(&cx, vm).await?;
                let sealed = cx
                    .stage(Stage::Generalize, stages::generalize(&cx, vm))
                    .await?;
                cx.stage(Stage::Shutdown, stages::shut_down(&cx, sealed))
                    .await?
            }
        };
        let tested = if plan.tests.enabled {
            cx.stage(Stage::Test, stages::test(&cx, built)).await?
        } else {
            cx.skipped(Stage::Test);
            stages::untested(built)
        };
        cx.stage(Stage::Export, stages::export(&cx, tested))
            .await
            .map(Done::Machine)
    }
    .await;

    match result {
        Ok(done) => {
            let warnings = cx.unwind(Outcome::Success).warnings();
            let stored = match done {
                Done::Machine(exported) => {
                    cx.stage(Stage::Store, stages::store(&cx, exported, slot, warnings))
                        .await
                }
                Done::Container(image) => {
                    cx.stage(
                        Stage::Store,
                        Box::pin(container::store(&cx, image, slot, warnings)),
                    )
                    .await
                }
            };
            let mut built = match stored {
                Ok(built) => built,
                Err(error) => {
                    cx.log.close();
                    return Err(Failed {
                        error,
                        image: Some(cx.image()),
                        logs: None,
                        unwind: UnwindReport::default(),
                    });
                }
            };
            if plan.distribution.is_empty() {
                cx.skipped(Stage::Distribute);
            } else {
                // A failure is in `built.distribution_failures`: the image is stored and
                // the caller reports both.
                let _ = cx
                    .stage(Stage::Distribute, stages::distribute(&cx, &mut built))
                    .await;
            }
            stages::finished(&cx, &built);
            Ok(built)
        }
        Err(mut error) => {
            let unwind = cx.unwind(Outcome::Failure);
            let logs = stages::abandon(&cx, slot, &error, &unwind.warnings());
            // The logs moved with the failed build: point at where they are now.
            if let (BuildError::Component(f), Some(now)) = (&mut error, &logs) {
                for path in [&mut f.log, &mut f.run_log].into_iter().flatten() {
                    if let Ok(rest) = path.strip_prefix(&cx.logs) {
                        *path = now.join(rest);
                    }
                }
            }
            Err(Failed {
                error,
                image: Some(cx.image()),
                logs,
                unwind,
            })
        }
    }
}
