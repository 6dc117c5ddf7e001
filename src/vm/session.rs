//! A booted VM with a step target on it. Readiness comes in two stages, each reported: "agent
//! up" (the agent said hello over virtio-serial), then "cloud-init done" (`cloud-init status
//! --wait`), so steps never race cloud-init for the package manager. [`Session::close`]
//! powers the guest off through its agent, then falls back on the VM's shutdown ladder.

use std::sync::Arc;
use std::time::Duration;

use super::GuestChannel;
use super::{RunningVm, ShutdownReport, VmError, VmOptions};
use crate::build::undo::{Outcome, UnwindReport};
use crate::target::StepTarget;
use crate::target::agent::{AgentTarget, Readiness};
use crate::target::qga::QgaTarget;

/// How long the guest gets to power itself off before QMP `quit`.
const POWEROFF_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub vm: VmOptions,
    /// From QEMU's start until the agent says hello (and, when waited for, cloud-init is
    /// done). Default 600 s: TCG on a busy 2-core machine needs several minutes.
    pub boot_timeout: Duration,
    /// Wait for cloud-init to finish before handing out the target (default true).
    pub wait_cloud_init: bool,
}

impl SessionOptions {
    pub fn new(vm: VmOptions) -> Self {
        Self {
            vm,
            boot_timeout: Duration::from_secs(600),
            wait_cloud_init: true,
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

/// The target in the guest: our agent, or qemu-guest-agent.
#[derive(Clone)]
enum Guest {
    Agent(Arc<AgentTarget>),
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
                agent.wait_ready(options.wait_cloud_init, cloud_init_budget),
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
        Ok(Session {
            vm,
            guest: Guest::Agent(agent),
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
            Guest::Agent(a) => Some(a),
            Guest::Qga(_) => None,
        }
    }

    /// The guest as a step target, for the component executor.
    pub fn target(&self) -> Arc<dyn StepTarget> {
        match &self.guest {
            Guest::Agent(a) => a.clone(),
            Guest::Qga(q) => q.clone(),
        }
    }

    /// Run `work` while watching the VM (see [`RunningVm::guard`]).
    pub async fn guard<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T, VmError> {
        self.vm.guard(work).await
    }

    /// Power the guest off through its agent, then the VM's ladder; unwind with `outcome`.
    pub async fn close(
        self,
        outcome: Outcome,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> ShutdownReport {
        let asked = match &self.guest {
            Guest::Agent(agent) if self.vm.child.exit().is_none() && !self.vm.has_failed() => {
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
            .shut_down(outcome, asked, POWEROFF_GRACE, progress)
            .await
    }

    /// Kill the VM at once (no guest shutdown) and release everything.
    pub fn kill(self, outcome: Outcome) -> UnwindReport {
        self.vm.kill(outcome)
    }
}
