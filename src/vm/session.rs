//! A booted VM with a step target on it. Readiness comes in two stages, each reported: "agent
//! up" (the agent said hello over virtio-serial), then "cloud-init done", so steps never race
//! cloud-init for the package manager. "Done" is `cloud-init status --wait` when every stage
//! runs; when the seed cancelled the config and final stages (a build VM without user data,
//! see [`super::seed::CloudInitScope`]) it is the init stages' systemd jobs having finished
//! without failure. After a Reboot step the target waits for the same again before the next
//! step runs. [`Session::close`] powers the guest off through its agent, then falls back on
//! the VM's shutdown ladder.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::GuestChannel;
use super::{RunningVm, ShutdownReport, VmError, VmOptions};
use crate::build::undo::{Outcome, UnwindReport};
use crate::target::agent::{AgentTarget, Readiness};
use crate::target::qga::QgaTarget;
use crate::target::{
    Capture, DirEntry, ExecOutcome, ExecRequest, ExitStatus, FileInfo, FileSource, FileStat,
    OutputSink, PutOptions, StepTarget, TargetError, TargetInfo,
};

/// How long the guest gets to power itself off before QMP `quit`, unless the caller says
/// otherwise ([`SessionOptions::shutdown_timeout`]; a build passes the recipe's
/// `shutdownTimeoutSeconds`).
const POWEROFF_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub vm: VmOptions,
    /// From QEMU's start until the agent says hello (and, when waited for, cloud-init is
    /// done). Default 600 s: TCG on a busy 2-core machine needs several minutes.
    pub boot_timeout: Duration,
    /// Wait for cloud-init to finish before handing out the target (default true).
    pub wait_cloud_init: bool,
    /// From asking the guest to power off (through the agent, else the ACPI power button)
    /// until QEMU is stopped hard. Default 60 s.
    pub shutdown_timeout: Duration,
}

impl SessionOptions {
    pub fn new(vm: VmOptions) -> Self {
        Self {
            vm,
            boot_timeout: Duration::from_secs(600),
            wait_cloud_init: true,
            shutdown_timeout: POWEROFF_GRACE,
        }
    }
}

/// Seconds from QEMU's start to each readiness stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootTimings {
    pub agent_up: Duration,
    /// `None` when cloud-init was not waited for.
    pub cloud_init_done: Option<Duration>,
}

/// The error for a failed talk with the guest: the VM's own failure when it has one (QEMU
/// killed, a panic), which explains a broken channel better than the channel's error.
async fn guest_error(vm: &RunningVm, what: String, source: crate::target::TargetError) -> VmError {
    match vm.explain(Duration::from_secs(1)).await {
        Some(e) => e,
        None => VmError::Guest { what, source },
    }
}

/// How to tell that cloud-init is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Do not wait (the caller said so).
    None,
    /// `cloud-init status --wait`: every stage runs.
    Status,
    /// The init stages' jobs finished: the seed cancelled the config and final stages.
    InitStages,
}

/// Waits until no cloud-init stage has a queued or running systemd job, then fails if an init
/// stage failed. Prints `status: …` lines like `cloud-init status --long`. Without systemd the
/// seed cancels nothing, so `cloud-init status --wait` is the answer there. No Python: under
/// TCG each `cloud-init` command costs seconds just to start.
const INIT_STAGES_GATE: &str = r#"set -u
if [ ! -d /run/systemd/system ]; then exec cloud-init status --wait --long; fi
pending() {
  systemctl list-jobs --no-legend 2>/dev/null | awk '{print $2}' \
    | grep -qxE 'cloud-(init-local|init|config|final)\.service'
}
while pending; do sleep 0.3; done
failed=""
for u in cloud-init-local.service cloud-init.service; do
  [ "$(systemctl is-failed "$u" 2>/dev/null)" = failed ] && failed="$failed $u"
done
if [ -n "$failed" ]; then
  echo "status: error"
  echo "detail: failed:$failed"
  exit 1
fi
echo "status: done"
echo "detail: init stages finished; config and final stages cancelled for the build VM"
"#;

/// Wait for cloud-init as `gate` says, within `timeout`.
async fn settle(
    agent: &AgentTarget,
    gate: Gate,
    timeout: Duration,
) -> Result<Readiness, TargetError> {
    match gate {
        Gate::None => agent.wait_ready(false, timeout).await,
        Gate::Status => agent.wait_ready(true, timeout).await,
        Gate::InitStages => {
            let mut ready = agent.wait_ready(false, timeout).await?;
            if ready.hello.cloud_init == "absent" {
                ready.cloud_init = Some("absent".into());
                return Ok(ready);
            }
            let out = Capture::default();
            let outcome = agent
                .exec(
                    &ExecRequest::bash(INIT_STAGES_GATE).with_timeout(Some(timeout)),
                    &out,
                )
                .await?;
            let report = String::from_utf8_lossy(&out.stdout()).into_owned();
            let status = report
                .lines()
                .find_map(|l| l.trim().strip_prefix("status:"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default();
            if outcome.status.success() && status == "done" {
                ready.cloud_init = Some(status);
                return Ok(ready);
            }
            let what = if outcome.status == ExitStatus::TimedOut {
                format!(
                    "cloud-init's init stages did not finish within {}s in {}",
                    timeout.as_secs(),
                    agent.describe()
                )
            } else {
                format!(
                    "cloud-init's init stages did not finish cleanly in {} (the readiness check {})",
                    agent.describe(),
                    outcome.status
                )
            };
            Err(agent.cloud_init_failure(what, &report).await)
        }
    }
}

/// Our agent as a step target that waits for cloud-init again after a reboot, so the step
/// after a Reboot never races cloud-init's boot stages (on later boots the agent starts early
/// in sysinit, long before them).
struct Gated {
    agent: Arc<AgentTarget>,
    gate: Gate,
    timeout: Duration,
}

#[async_trait]
impl StepTarget for Gated {
    fn describe(&self) -> String {
        self.agent.describe()
    }

    async fn info(&self) -> Result<TargetInfo, TargetError> {
        self.agent.info().await
    }

    async fn exec(
        &self,
        request: &ExecRequest,
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, TargetError> {
        self.agent.exec(request, sink).await
    }

    async fn put_file(
        &self,
        remote: &Path,
        content: FileSource,
        options: &PutOptions,
    ) -> Result<FileInfo, TargetError> {
        self.agent.put_file(remote, content, options).await
    }

    async fn get_file(&self, remote: &Path, local: &Path) -> Result<FileInfo, TargetError> {
        self.agent.get_file(remote, local).await
    }

    async fn stat(&self, remote: &Path) -> Result<Option<FileStat>, TargetError> {
        self.agent.stat(remote).await
    }

    async fn list(&self, remote: &Path) -> Result<Vec<DirEntry>, TargetError> {
        self.agent.list(remote).await
    }

    async fn reboot(&self) -> Result<(), TargetError> {
        self.agent.reboot().await?;
        // Right after a reboot the host can still see the old boot's agent say hello (it
        // reopens the port while the guest shuts down) before the new boot's agent does; the
        // switch then fails whatever was in flight with "the agent in the guest restarted".
        // That is the reboot finishing, not a fault: wait for cloud-init again on the agent
        // that is there now (a few times at most, within the same timeout).
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut switches = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match settle(&self.agent, self.gate, left).await {
                Err(TargetError::Protocol { .. } | TargetError::Disconnected { .. })
                    if switches < 3 && !left.is_zero() =>
                {
                    switches += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => return other.map(drop),
            }
        }
    }
}

/// The target in the guest: our agent, or qemu-guest-agent.
#[derive(Clone)]
enum Guest {
    Agent(Arc<AgentTarget>, Arc<Gated>),
    Qga(Arc<QgaTarget>),
}

/// A guest channel that just answered, before it is shared.
enum Connected {
    Agent(AgentTarget),
    Qga(QgaTarget),
}

/// Boots of one VM whose kernel panicked early before we give up.
const BOOT_ATTEMPTS: u32 = 3;

/// A running VM and the step target in it.
pub struct Session {
    vm: RunningVm,
    guest: Guest,
    /// [`SessionOptions::shutdown_timeout`], for [`Session::close`].
    shutdown_timeout: Duration,
    /// What our agent reported (`None` with qemu-guest-agent).
    pub readiness: Option<Readiness>,
    pub timings: BootTimings,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("vm", &self.vm)
            .field("timings", &self.timings)
            .finish()
    }
}

impl Session {
    /// Boot a VM with our agent on its seed, and wait until it is ready for steps.
    pub async fn open(
        options: SessionOptions,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Session, VmError> {
        let gate = match (&options.vm.channel, options.wait_cloud_init) {
            (_, false) => Gate::None,
            (GuestChannel::Agent { user_data }, true)
                if options
                    .vm
                    .cloud_init
                    .cancels_later_stages(user_data.is_some()) =>
            {
                Gate::InitStages
            }
            _ => Gate::Status,
        };
        let mut vm = RunningVm::boot(options.vm, progress).await?;
        let connector = vm.channel_connector();
        let describe = vm.describe();
        // The hello timeout runs a little past ours so the boot timeout, which carries the
        // console's last lines, is what the user sees.
        let hello_timeout = options.boot_timeout + Duration::from_secs(5);
        let qga = vm.channel == GuestChannel::Qga;
        let mut attempt = 1;
        let guest = loop {
            // Connect before the guest opens its port (it would read end-of-file otherwise).
            // The chardev exists once QMP answers: QEMU creates chardevs in command-line order.
            let stream = connector.connect().await.map_err(|e| VmError::Guest {
                what: format!("could not connect to the agent socket of {describe}"),
                source: crate::target::TargetError::io(connector.socket().display().to_string(), e),
            })?;
            let up = if qga {
                vm.boot_phase("qemu-guest-agent to answer", options.boot_timeout, async {
                    QgaTarget::connect(stream, describe.clone(), hello_timeout)
                        .await
                        .map(Connected::Qga)
                })
                .await
            } else {
                vm.boot_phase("the agent to say hello", options.boot_timeout, async {
                    AgentTarget::connect(stream, describe.clone(), hello_timeout)
                        .await
                        .map(Connected::Agent)
                })
                .await
            };
            match up {
                Ok(Ok(guest)) => break guest,
                Ok(Err(source)) => {
                    let what = if qga {
                        format!("qemu-guest-agent in {describe} did not answer")
                    } else {
                        format!("the agent in {describe} did not start talking")
                    };
                    return Err(guest_error(&vm, what, source).await);
                }
                // Early-boot panics under TCG on a loaded host (the kernel's timer check) go
                // away on a reset; anything else, or a third panic, is the answer.
                Err(VmError::GuestPanicked { .. }) if attempt < BOOT_ATTEMPTS => {
                    attempt += 1;
                    progress(&format!(
                        "the guest kernel panicked while booting; resetting it (attempt {attempt} of {BOOT_ATTEMPTS})"
                    ));
                    vm.reset_after_panic().await?;
                }
                Err(e) => return Err(e),
            }
        };
        let agent = match guest {
            Connected::Agent(agent) => agent,
            Connected::Qga(qga) => {
                let agent_up = vm.uptime();
                progress(&format!(
                    "qemu-guest-agent up after {:.1} s",
                    agent_up.as_secs_f64()
                ));
                return Ok(Session {
                    vm,
                    shutdown_timeout: options.shutdown_timeout,
                    guest: Guest::Qga(Arc::new(qga.with_connector(Arc::new(connector)))),
                    readiness: None,
                    timings: BootTimings {
                        agent_up,
                        cloud_init_done: None,
                    },
                });
            }
        };
        let agent_up = vm.uptime();
        progress(&format!("agent up after {:.1} s", agent_up.as_secs_f64()));
        let agent = Arc::new(agent.with_connector(Arc::new(connector)));

        let cloud_init_budget = options.boot_timeout.saturating_sub(vm.uptime());
        let readiness = vm
            .boot_phase(
                "cloud-init to finish",
                options.boot_timeout,
                settle(&agent, gate, cloud_init_budget),
            )
            .await?;
        let readiness = match readiness {
            Ok(r) => r,
            Err(source) => {
                let what = format!("{describe} is not ready for steps");
                return Err(guest_error(&vm, what, source).await);
            }
        };
        let cloud_init_done = match &readiness.cloud_init {
            Some(state) => {
                let t = vm.uptime();
                progress(&format!(
                    "cloud-init {state} after {:.1} s",
                    t.as_secs_f64()
                ));
                Some(t)
            }
            None => None,
        };
        let gated = Arc::new(Gated {
            agent: agent.clone(),
            gate,
            timeout: options.boot_timeout,
        });
        Ok(Session {
            vm,
            shutdown_timeout: options.shutdown_timeout,
            guest: Guest::Agent(agent, gated),
            readiness: Some(readiness),
            timings: BootTimings {
                agent_up,
                cloud_init_done,
            },
        })
    }

    pub fn vm(&self) -> &RunningVm {
        &self.vm
    }

    /// Our agent, when the guest channel is ours (not qemu-guest-agent).
    pub fn agent(&self) -> Option<&Arc<AgentTarget>> {
        match &self.guest {
            Guest::Agent(a, _) => Some(a),
            Guest::Qga(_) => None,
        }
    }

    /// The guest as a step target, for the component executor. With our agent, a reboot
    /// returns once cloud-init is done again (as the session waited for it at boot).
    pub fn target(&self) -> Arc<dyn StepTarget> {
        match &self.guest {
            Guest::Agent(_, gated) => gated.clone(),
            Guest::Qga(q) => q.clone(),
        }
    }

    /// Wait (within `timeout`) until cloud-init is done, as the session did at boot: cheap
    /// when it already is. `None` with qemu-guest-agent or when the session was opened
    /// without waiting.
    pub async fn settle(&self, timeout: Duration) -> Result<Option<Readiness>, VmError> {
        let Guest::Agent(agent, gated) = &self.guest else {
            return Ok(None);
        };
        if gated.gate == Gate::None {
            return Ok(None);
        }
        match self.vm.guard(settle(agent, gated.gate, timeout)).await? {
            Ok(r) => Ok(Some(r)),
            Err(source) => Err(guest_error(
                &self.vm,
                format!("cloud-init did not settle in {}", self.vm.describe()),
                source,
            )
            .await),
        }
    }

    /// Run `work` while watching the VM (see [`RunningVm::guard`]).
    pub async fn guard<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T, VmError> {
        self.vm.guard(work).await
    }

    /// Power the guest off through its agent, then the VM's ladder (QMP `quit` after
    /// [`SessionOptions::shutdown_timeout`]); unwind with `outcome`.
    pub async fn close(
        self,
        outcome: Outcome,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> ShutdownReport {
        let asked = match &self.guest {
            Guest::Agent(agent, _) if self.vm.child.exit().is_none() && !self.vm.has_failed() => {
                progress("powering off…");
                matches!(
                    tokio::time::timeout(Duration::from_secs(10), agent.poweroff()).await,
                    Ok(Ok(()))
                )
            }
            // qemu-guest-agent: the ACPI power button of the ladder.
            _ => false,
        };
        drop(self.guest);
        self.vm
            .shut_down(outcome, asked, self.shutdown_timeout, progress)
            .await
    }

    /// Kill the VM at once (no guest shutdown) and release everything.
    pub fn kill(self, outcome: Outcome) -> UnwindReport {
        self.vm.kill(outcome)
    }
}
