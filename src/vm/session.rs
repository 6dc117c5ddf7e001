//! A booted VM with a step target on it. Readiness comes in two stages, each reported: "agent
//! up" (the agent said hello over virtio-serial), then "ready": systemd finished booting (so
//! `/` is writable, `/tmp` is mounted and no boot job is left) and cloud-init is done, so
//! steps never race the boot or cloud-init for the package manager. "Done" is `cloud-init
//! status --wait` when every stage runs; when the seed cancelled the config and final stages
//! (a build VM without user data, see [`super::seed::CloudInitScope`]) it is cloud-init's own
//! record of this boot (`/run/cloud-init/status.json`) showing its init stages finished
//! without errors. Neither depends on how a cloud-init release names its units (22.4 runs
//! one process per stage, 24.3 and later one process for all). After a Reboot step the
//! target waits for the same again before the next step runs. An appliance boot
//! ([`crate::recipe::Boot::Appliance`]) has no systemd and no cloud-init: the agent is init,
//! and its hello is readiness, at boot and after a reboot. [`Session::close`] powers the
//! guest off through its agent, then falls back on the VM's shutdown ladder.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::GuestChannel;
use super::{RunningVm, ShutdownReport, VmError, VmOptions};
use crate::machine::agent::{AgentMachine, Readiness};
use crate::machine::qga::QgaMachine;
use crate::machine::{
    Capture, DirEntry, ExecOutcome, ExecRequest, ExitStatus, FileInfo, FileSource, FileStat,
    Machine, MachineError, MachineInfo, OutputSink, PutOptions,
};
use crate::recipe::Boot;
use crate::undo::{Outcome, UnwindReport};

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
    /// The disk disables cloud-init for this boot (`/etc/cloud/cloud-init.disabled`: a layer
    /// the build cached, see `build::stages`): wait for systemd's boot only, until the
    /// first reboot, after which cloud-init runs again and is waited for. Default false.
    pub cloud_init_disabled: bool,
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
            cloud_init_disabled: false,
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
async fn guest_error(
    vm: &RunningVm,
    what: String,
    source: crate::machine::MachineError,
) -> VmError {
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
    /// The boot finished, then `cloud-init status --wait`: every stage runs.
    Status,
    /// The boot finished and cloud-init's init stages ran to their end this boot: the seed
    /// cancelled the config and final stages.
    InitStages,
    /// The boot finished; cloud-init is disabled for this boot
    /// ([`SessionOptions::cloud_init_disabled`]).
    Boot,
    /// The appliance: the agent is init; its hello is all there is to wait for.
    Appliance,
}

/// Waits (at most `$1` seconds) until systemd has finished booting: every job of the boot
/// transaction done, so the root file system is writable, `/tmp` is the final one (a tmpfs
/// on systemd 257) and cloud-init's init stages (growpart, resizefs) have run, whatever the
/// units are called in this release (`cloud-init.service` up to 24.2, `cloud-init-network`
/// and `cloud-init-main` from 24.3). Prints `system: <state>`; `degraded` (some unit failed)
/// is ready, with the failed units named. No systemd: `system: none`.
///
/// Run as `sh -c` with its text as an argument, never from a script file: right after a
/// reboot the agent starts early in sysinit, when `/` may still be read-only and `/tmp` not
/// mounted yet. No Python: under TCG each `cloud-init` command costs seconds just to start.
const BOOT_GATE: &str = r#"set -u
if [ ! -d /run/systemd/system ]; then echo "system: none"; exit 0; fi
state=$(timeout "$1" systemctl is-system-running --wait 2>/dev/null)
rc=$?
if [ "$rc" -eq 124 ]; then
  echo "system: starting"
  echo "detail: the boot did not finish within $1 s; its jobs still waiting or running:"
  systemctl list-jobs --no-legend --no-pager 2>/dev/null | head -n 20
  exit 1
fi
echo "system: ${state:-unknown}"
case $state in
running) ;;
degraded)
  echo "failed: $(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | awk '{printf "%s ", $1}')" ;;
*) exit 1 ;;
esac
"#;

/// `/run/cloud-init/status.json` (written by cloud-init 22.4 and 25.x alike, fresh each boot
/// since `/run` is a tmpfs): the init stages of this boot ran to their end without errors.
fn init_stages_report(status_json: &str) -> Result<String, String> {
    let doc: serde_json::Value = serde_json::from_str(status_json)
        .map_err(|e| format!("/run/cloud-init/status.json is not JSON: {e}"))?;
    let v1 = &doc["v1"];
    let mut problems = Vec::new();
    for stage in ["init-local", "init"] {
        let s = &v1[stage];
        if s["finished"].as_f64().is_none() {
            problems.push(format!("stage `{stage}` did not finish this boot"));
        }
        if let Some(errors) = s["errors"].as_array()
            && !errors.is_empty()
        {
            let list: Vec<String> = errors
                .iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                .collect();
            problems.push(format!("stage `{stage}` failed: {}", list.join("; ")));
        }
    }
    if problems.is_empty() {
        Ok(format!(
            "init stages finished (datasource {}); config and final stages cancelled for the build VM",
            v1["datasource"].as_str().unwrap_or("none")
        ))
    } else {
        Err(problems.join("\n"))
    }
}

/// What the boot gate found: systemd's state once the boot finished (`running`, `degraded`
/// with the failed units, or `none` without systemd).
fn boot_state(report: &str) -> Option<&str> {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix("system:"))
        .map(str::trim)
}

/// Waits until the guest's boot finished (see [`BOOT_GATE`]), within `timeout`. Returns the
/// gate's report (`system: …` and, when degraded, `failed: …`).
async fn boot_finished(agent: &AgentMachine, timeout: Duration) -> Result<String, MachineError> {
    let secs = timeout.as_secs().max(1);
    let out = Capture::default();
    let outcome = agent
        .exec(
            &ExecRequest::argv(["sh", "-c", BOOT_GATE, "sh", &secs.to_string()])
                // The script's own limit ends it first, with the jobs still queued.
                .with_timeout(Some(timeout + Duration::from_secs(30))),
            &out,
        )
        .await?;
    let report = String::from_utf8_lossy(&out.stdout()).into_owned();
    if outcome.status.success() {
        return Ok(report);
    }
    let state = boot_state(&report);
    let unfinished =
        state == Some("starting") || (state.is_none() && outcome.status == ExitStatus::TimedOut);
    let what = match state {
        _ if unfinished => format!(
            "{} did not finish booting within {}s",
            agent.describe(),
            timeout.as_secs()
        ),
        Some(state) => format!(
            "{} is not ready for steps: systemd says the system is `{state}`",
            agent.describe()
        ),
        None => format!(
            "{} is not ready for steps (the boot check {})",
            agent.describe(),
            outcome.status
        ),
    };
    Err(MachineError::NotReady {
        what,
        report: report.trim_end().to_owned(),
    })
}

/// Wait for the guest as `gate` says, within `timeout`: the agent's hello, then (unless
/// `Gate::None`) the end of the boot, then cloud-init's result.
async fn settle(
    agent: &AgentMachine,
    gate: Gate,
    timeout: Duration,
) -> Result<Readiness, MachineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut ready = agent.wait_ready(false, timeout).await?;
    match gate {
        Gate::None => return Ok(ready),
        Gate::Appliance => {
            ready.system = Some("system: appliance".into());
            return Ok(ready);
        }
        _ => {}
    }
    let boot = boot_finished(agent, left()).await?;
    if gate == Gate::Boot {
        ready.cloud_init = Some("disabled for this boot".into());
        ready.system = Some(boot.trim_end().to_owned());
        return Ok(ready);
    }
    if ready.hello.cloud_init == "absent" {
        ready.cloud_init = Some("absent".into());
        ready.system = Some(boot.trim_end().to_owned());
        return Ok(ready);
    }
    // Without systemd the seed cancels nothing: every stage runs, and `cloud-init status
    // --wait` is the answer there too.
    if gate == Gate::Status || boot_state(&boot) == Some("none") {
        let mut ready = agent.wait_ready(true, left()).await?;
        ready.system = Some(boot.trim_end().to_owned());
        return Ok(ready);
    }
    let out = Capture::default();
    let outcome = agent
        .exec(
            &ExecRequest::argv(["cat", "/run/cloud-init/status.json"])
                .with_timeout(Some(Duration::from_secs(60))),
            &out,
        )
        .await?;
    let report = if outcome.status.success() {
        init_stages_report(&String::from_utf8_lossy(&out.stdout()))
    } else {
        Err(format!(
            "cloud-init did not run in this boot (no /run/cloud-init/status.json: {})",
            String::from_utf8_lossy(&out.stderr()).trim()
        ))
    };
    match report {
        Ok(_) => {
            ready.cloud_init = Some("done".into());
            ready.system = Some(boot.trim_end().to_owned());
            Ok(ready)
        }
        Err(problem) => {
            let what = format!(
                "cloud-init's init stages did not finish cleanly in {}",
                agent.describe()
            );
            Err(agent
                .cloud_init_failure(what, &format!("{}\n{problem}", boot.trim_end()))
                .await)
        }
    }
}

/// Our agent as a step target that waits for cloud-init again after a reboot, so the step
/// after a Reboot never races cloud-init's boot stages (on later boots the agent starts early
/// in sysinit, long before them).
struct Gated {
    agent: Arc<AgentMachine>,
    gate: Gate,
    /// cloud-init is disabled in the boot now running (until the first reboot).
    disabled_this_boot: std::sync::atomic::AtomicBool,
    timeout: Duration,
}

impl Gated {
    /// How to tell that the boot running now is done.
    fn current(&self) -> Gate {
        self.gate.this_boot(
            self.disabled_this_boot
                .load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

impl Gate {
    /// The gate for a boot in which cloud-init is disabled (or not): only the boot then,
    /// unless nothing is waited for at all.
    fn this_boot(self, cloud_init_disabled: bool) -> Gate {
        if cloud_init_disabled && !matches!(self, Gate::None | Gate::Appliance) {
            Gate::Boot
        } else {
            self
        }
    }
}

#[async_trait]
impl Machine for Gated {
    fn describe(&self) -> String {
        self.agent.describe()
    }

    async fn info(&self) -> Result<MachineInfo, MachineError> {
        self.agent.info().await
    }

    async fn exec(
        &self,
        request: &ExecRequest,
        sink: &dyn OutputSink,
    ) -> Result<ExecOutcome, MachineError> {
        self.agent.exec(request, sink).await
    }

    async fn put_file(
        &self,
        remote: &Path,
        content: FileSource,
        options: &PutOptions,
    ) -> Result<FileInfo, MachineError> {
        self.agent.put_file(remote, content, options).await
    }

    async fn get_file(&self, remote: &Path, local: &Path) -> Result<FileInfo, MachineError> {
        self.agent.get_file(remote, local).await
    }

    async fn stat(&self, remote: &Path) -> Result<Option<FileStat>, MachineError> {
        self.agent.stat(remote).await
    }

    async fn list(&self, remote: &Path) -> Result<Vec<DirEntry>, MachineError> {
        self.agent.list(remote).await
    }

    async fn reboot(&self) -> Result<(), MachineError> {
        self.agent.reboot().await?;
        // A new boot: cloud-init runs in it (the build removed the marker once ready).
        self.disabled_this_boot
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // Right after a reboot the host can still see the old boot's agent say hello (it
        // reopens the port while the guest shuts down) before the new boot's agent does; the
        // switch then fails whatever was in flight with "the agent in the guest restarted".
        // That is the reboot finishing, not a fault: wait for cloud-init again on the agent
        // that is there now (a few times at most, within the same timeout).
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut switches = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match settle(&self.agent, self.current(), left).await {
                Err(MachineError::Protocol { .. } | MachineError::Disconnected { .. })
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
    Agent(Arc<AgentMachine>, Arc<Gated>),
    Qga(Arc<QgaMachine>),
}

/// A guest channel that just answered, before it is shared.
enum Connected {
    Agent(AgentMachine),
    Qga(QgaMachine),
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
            _ if options.vm.boot == Boot::Appliance => Gate::Appliance,
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
        let first_gate = gate.this_boot(options.cloud_init_disabled);
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
                source: crate::machine::MachineError::io(
                    connector.socket().display().to_string(),
                    e,
                ),
            })?;
            let up = if qga {
                vm.boot_phase("qemu-guest-agent to answer", options.boot_timeout, async {
                    QgaMachine::connect(stream, describe.clone(), hello_timeout)
                        .await
                        .map(Connected::Qga)
                })
                .await
            } else {
                vm.boot_phase("the agent to say hello", options.boot_timeout, async {
                    AgentMachine::connect(stream, describe.clone(), hello_timeout)
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
                "the boot and cloud-init to finish",
                options.boot_timeout,
                settle(&agent, first_gate, cloud_init_budget),
            )
            .await?;
        let mut readiness = match readiness {
            Ok(r) => r,
            Err(source) => {
                let what = format!("{describe} is not ready for steps");
                return Err(guest_error(&vm, what, source).await);
            }
        };
        if let Some(appliance) = vm.appliance() {
            readiness.system = Some(format!("system: appliance (kernel {})", appliance.release));
        }
        if let Some(failed) = readiness.system.as_deref().and_then(|r| {
            r.lines()
                .find_map(|l| l.trim().strip_prefix("failed:"))
                .map(str::trim)
        }) {
            progress(&format!(
                "the guest finished booting `degraded` (failed units: {failed}); steps run anyway"
            ));
        }
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
            disabled_this_boot: (first_gate == Gate::Boot).into(),
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
    pub fn agent(&self) -> Option<&Arc<AgentMachine>> {
        match &self.guest {
            Guest::Agent(a, _) => Some(a),
            Guest::Qga(_) => None,
        }
    }

    /// The guest as a step target, for the component executor. With our agent, a reboot
    /// returns once cloud-init is done again (as the session waited for it at boot).
    pub fn target(&self) -> Arc<dyn Machine> {
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
        match self
            .vm
            .guard(settle(agent, gated.current(), timeout))
            .await?
        {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `/run/cloud-init/status.json` as cloud-init writes it (22.4 and 25.1 alike) in a build
    /// VM whose config and final stages were cancelled.
    fn status_json(init_finished: &str, init_errors: &str) -> String {
        format!(
            r#"{{
 "v1": {{
  "datasource": "DataSourceNoCloud [seed=/dev/vdb][dsmode=net]",
  "init": {{
   "errors": [{init_errors}],
   "finished": {init_finished},
   "recoverable_errors": {{}},
   "start": 1765037390.112
  }},
  "init-local": {{
   "errors": [],
   "finished": 1765037388.5,
   "recoverable_errors": {{}},
   "start": 1765037380.25
  }},
  "modules-config": {{ "errors": [], "finished": null, "recoverable_errors": {{}}, "start": null }},
  "modules-final": {{ "errors": [], "finished": null, "recoverable_errors": {{}}, "start": null }},
  "stage": null
 }}
}}"#
        )
    }

    #[test]
    fn a_boot_with_cloud_init_disabled_waits_for_systemd_only() {
        for gate in [Gate::Status, Gate::InitStages, Gate::Boot] {
            assert_eq!(gate.this_boot(true), Gate::Boot);
            assert_eq!(gate.this_boot(false), gate);
        }
        // Nothing to wait for, or the appliance (no systemd): the same in every boot.
        for gate in [Gate::None, Gate::Appliance] {
            assert_eq!(gate.this_boot(true), gate);
            assert_eq!(gate.this_boot(false), gate);
        }
    }

    #[test]
    fn init_stages_are_done_only_when_both_finished_without_errors() {
        let done = init_stages_report(&status_json("1765037401.75", "")).expect("done");
        assert!(done.contains("DataSourceNoCloud"), "{done}");
        // The network stage still running (growpart and resizefs are in it): not ready.
        let running = init_stages_report(&status_json("null", "")).expect_err("running");
        assert_eq!(running, "stage `init` did not finish this boot");
        let failed = init_stages_report(&status_json(
            "1765037401.75",
            r#""('growpart', ProcessExecutionError())""#,
        ))
        .expect_err("failed");
        assert!(
            failed.starts_with("stage `init` failed: ('growpart'"),
            "{failed}"
        );
        let garbage = init_stages_report("{\"v1\": ").expect_err("not JSON");
        assert!(garbage.contains("not JSON"), "{garbage}");
        // No record of a stage at all (cloud-init never got that far this boot).
        let empty = init_stages_report("{\"v1\": {}}").expect_err("empty");
        assert_eq!(
            empty,
            "stage `init-local` did not finish this boot\nstage `init` did not finish this boot"
        );
    }

    #[test]
    fn boot_gate_parses_in_sh_and_reads_its_budget_from_an_argument() {
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", BOOT_GATE])
            .status()
            .expect("sh runs");
        assert!(status.success(), "sh -n rejected:\n{BOOT_GATE}");
        assert!(BOOT_GATE.contains(r#"timeout "$1" systemctl is-system-running --wait"#));
        assert_eq!(
            boot_state("system: degraded\nfailed: x.service \n"),
            Some("degraded")
        );
        assert_eq!(boot_state("nothing\n"), None);
    }
}
