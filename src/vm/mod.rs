//! Virtual machines: qemu-img, the QEMU command line, QMP, the accelerator probe, the
//! cloud-init seed, and the lifecycle of one running VM. Knows nothing of components.
//!
//! [`RunningVm::boot`] takes [`VmOptions`] and returns a running VM whose every resource
//! (folder, overlay, seed, sockets, the QEMU process) is on its undo list;
//! [`RunningVm::shut_down`] consumes it (ACPI power button, wait, QMP `quit`, SIGKILL) and
//! unwinds the list. Dropping a `RunningVm` (an error, a timeout, Ctrl-C) kills QEMU and
//! removes everything at once. While it runs, QEMU's exit, the QMP connection closing and a
//! guest kernel panic are watched at all times and surface as a [`VmError`] through
//! [`RunningVm::guard`].
//!
//! Two ways to boot ([`VmOptions::boot`]): the guest's own (firmware, bootloader, its
//! systemd; our agent comes on a cloud-init seed), or the appliance ([`appliance`]: the
//! host's kernel booted directly with our agent as init, no seed, no firmware of its own).

pub mod accel;
pub mod appliance;
pub mod argv;
pub mod firmware;
pub mod img;
pub mod process;
pub mod qmp;
pub mod seed;
pub mod session;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use accel::AccelDecision;
pub use argv::{Accel, DiskFormat};

use crate::recipe::{Accelerator, Boot, Firmware, Network};
use crate::undo::{self, Leftovers, Outcome, UndoList, UnwindReport};
use argv::{DirectKernel, FirmwareFiles, SerialPort, VmSpec};
use qmp::{EventKind, Qmp};

/// Unix socket paths are limited to 107 bytes plus the terminating zero.
const MAX_SOCKET_PATH: usize = 107;
/// Lines of the serial console shown in boot errors.
const CONSOLE_TAIL_LINES: usize = 30;

/// How the host talks to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestChannel {
    /// Our agent, brought in on a cloud-init NoCloud seed; `user_data` is the user's own,
    /// combined with ours.
    Agent { user_data: Option<String> },
    /// qemu-guest-agent, already installed in the image; no seed.
    Qga,
}

/// What to boot and how. [`VmOptions::new`] fills the defaults.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The base image; never written to (the VM writes to an overlay).
    pub image: PathBuf,
    /// Default `auto`.
    pub accel: Accelerator,
    /// Default 2.
    pub cpus: u32,
    /// Default 1024 MiB.
    pub memory_mib: u64,
    /// Default BIOS.
    pub firmware: Firmware,
    /// Default full: the guest's own boot. `Appliance`: the host's kernel with our agent as
    /// init, serving from a chroot of the guest's root file system (no firmware, no seed).
    pub boot: Boot,
    /// Default none.
    pub network: Network,
    /// Grow the VM's disk to this many bytes; default: the image's size.
    pub disk_size: Option<u64>,
    pub channel: GuestChannel,
    /// Keep the VM's folder (disk, console and QEMU logs) when it ends in failure.
    pub keep_on_failure: bool,
    /// Where the VM's cleanup report goes when it is dropped instead of shut down (an error,
    /// a timeout, Ctrl-C): the caller reads it and tells the user. Default: a fresh one.
    pub leftovers: Leftovers,
    /// Where the VM's folder is created; default `$XDG_RUNTIME_DIR`, else the temp dir.
    pub work_dir: Option<PathBuf>,
    /// The QEMU system emulator; default `qemu-system-x86_64` from `PATH`.
    pub qemu: Option<PathBuf>,
    /// Boot `image` itself, writable, instead of a throwaway overlay on it. For a caller that
    /// made its own qcow2 overlay and keeps it after the VM (the build's disk chain).
    /// `disk_size` is then ignored (the caller sized it). Default false.
    pub boot_in_place: bool,
    /// Write the serial console, QEMU's stderr and the QMP log here instead of the VM's
    /// folder, so they outlive it (a build keeps them with its logs). Default: none.
    pub log_dir: Option<PathBuf>,
    /// How much of cloud-init the seed lets run (our agent's channel only). Default: a full
    /// first boot.
    pub cloud_init: seed::CloudInitScope,
    /// cloud-init's instance id on the seed (our agent's channel only). Default: a new one
    /// per VM, so each boot is a first boot. A build gives every VM of one disk chain the
    /// same id, so booting a cached layer again is a reboot to cloud-init (its per-instance
    /// modules, and the user data's, do not run twice).
    pub instance_id: Option<String>,
}

impl VmOptions {
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Self {
            image: image.into(),
            accel: Accelerator::Auto,
            cpus: 2,
            memory_mib: 1024,
            firmware: Firmware::Bios,
            boot: Boot::Full,
            network: Network::None,
            disk_size: None,
            channel: GuestChannel::Agent { user_data: None },
            keep_on_failure: false,
            leftovers: Leftovers::default(),
            work_dir: None,
            qemu: None,
            boot_in_place: false,
            log_dir: None,
            cloud_init: seed::CloudInitScope::Full,
            instance_id: None,
        }
    }
}

/// Whose fault an error is, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad input (the image, user data): exit 2.
    Input,
    /// The host cannot do it (no QEMU, no KVM, no space): exit 3.
    Host,
    /// The VM failed (crash, panic, timeout): exit 1.
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("QEMU is not installed (`qemu-system-x86_64` is not on PATH)")]
    QemuMissing,
    #[error("cannot use {path} as a base image")]
    Image {
        path: String,
        #[source]
        source: img::ImgError,
    },
    #[error(
        "the requested disk size ({requested} bytes) is smaller than the image's ({image} bytes); a disk can only grow"
    )]
    DiskTooSmall { requested: u64, image: u64 },
    #[error("could not create the VM's overlay disk")]
    Overlay(#[source] img::ImgError),
    #[error(transparent)]
    Accel(#[from] accel::AccelError),
    #[error(transparent)]
    Firmware(#[from] firmware::FirmwareError),
    /// The io error (fs-err's or tempfile's) names the file.
    #[error("could not prepare the VM's folder")]
    WorkDir(#[source] std::io::Error),
    #[error(
        "the VM's folder {dir} is too deep for unix socket paths (at most {MAX_SOCKET_PATH} bytes); set a shorter work directory"
    )]
    SocketPathTooLong { dir: String },
    #[error("could not write the cloud-init seed")]
    Seed(#[source] seed::SeedError),
    #[error("could not start QEMU")]
    Spawn(#[source] process::ProcessError),
    #[error("QEMU's control socket (QMP) did not work")]
    Qmp(#[source] qmp::QmpError),
    /// QEMU ended while the VM was supposed to run.
    #[error(
        "QEMU {exit} unexpectedly{}",
        section("QEMU's last messages", stderr_tail)
    )]
    QemuExited {
        exit: process::Exit,
        stderr_tail: String,
    },
    #[error("the QMP connection to QEMU closed unexpectedly")]
    QmpClosed,
    #[error(
        "the guest kernel panicked{}",
        section("last lines of the serial console", console_tail)
    )]
    GuestPanicked { console_tail: String },
    #[error(
        "the guest powered itself off{}",
        section("last lines of the serial console", console_tail)
    )]
    GuestPoweredOff { console_tail: String },
    /// Talking to the guest (its agent) failed.
    #[error("{what}")]
    Guest {
        what: String,
        #[source]
        source: crate::machine::MachineError,
    },
    #[error(transparent)]
    ApplianceSetup(#[from] appliance::ApplianceError),
    #[error("the appliance boot serves builder's own agent; it cannot use qemu-guest-agent")]
    ApplianceNeedsAgent,
    /// The agent as init gave up (it printed `builder-appliance: error:` lines, then powered
    /// off) before it said hello.
    #[error("the appliance could not serve this image: {reason}")]
    Appliance { reason: String },
    #[error(
        "timed out after {secs} s of boot waiting for {what}{}",
        section("last lines of the serial console", console_tail)
    )]
    BootTimeout {
        what: String,
        secs: u64,
        console_tail: String,
        /// An appliance boot (no firmware, no cloud-init: a different hint).
        appliance: bool,
    },
}

/// `":\n  line\n  line"` for a non-empty multi-line section of an error message.
fn section(title: &str, body: &str) -> String {
    if body.trim().is_empty() {
        return String::new();
    }
    let mut out = format!("; {title}:");
    for line in body.lines() {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

impl VmError {
    pub fn class(&self) -> ErrorClass {
        match self {
            VmError::Image { .. }
            | VmError::DiskTooSmall { .. }
            | VmError::ApplianceNeedsAgent
            | VmError::Seed(seed::SeedError::UnsupportedUserData { .. }) => ErrorClass::Input,
            VmError::QemuMissing
            | VmError::Accel(_)
            | VmError::Firmware(_)
            | VmError::WorkDir(_)
            | VmError::SocketPathTooLong { .. }
            | VmError::Seed(_)
            | VmError::Overlay(_)
            | VmError::Spawn(_)
            | VmError::ApplianceSetup(_)
            | VmError::Appliance { .. } => ErrorClass::Host,
            VmError::Qmp(_)
            | VmError::QemuExited { .. }
            | VmError::QmpClosed
            | VmError::GuestPanicked { .. }
            | VmError::GuestPoweredOff { .. }
            | VmError::Guest { .. }
            | VmError::BootTimeout { .. } => ErrorClass::Failed,
        }
    }

    /// A hint for the user, where there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            VmError::QemuMissing => Some("install QEMU: apt install qemu-system-x86 qemu-utils".into()),
            VmError::Accel(_) => Some("use `--accel auto` or `--accel tcg` (slower, works everywhere)".into()),
            VmError::ApplianceSetup(e) => e.hint(),
            VmError::Appliance { .. } => Some(
                "the appliance (the host's kernel with builder's agent as init) mounts the image's root file system itself; use `infrastructure.boot: full` (`--boot full`) to boot the image's own system".into(),
            ),
            VmError::BootTimeout {
                appliance: true, ..
            } => Some(
                "the appliance usually answers within seconds: its console lines (`builder-appliance: …`) say how far it got; a longer --boot-timeout helps on busy machines, or use `infrastructure.boot: full`".into(),
            ),
            VmError::BootTimeout { .. } => Some(
                "check that the image boots with a serial console (console=ttyS0) and runs cloud-init; a longer --boot-timeout helps on slow or busy machines".into(),
            ),
            _ => None,
        }
    }
}

/// Something that ended the VM while it was supposed to run.
#[derive(Debug, Clone)]
enum Fault {
    Exited(process::Exit),
    QmpClosed,
    Panicked,
    PoweredOff,
}

/// Paths of one VM's folder.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub seed: PathBuf,
    pub vars: PathBuf,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub qga_socket: PathBuf,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    pub qmp_log: PathBuf,
    pub pidfile: PathBuf,
}

impl VmPaths {
    fn new(dir: PathBuf) -> Self {
        Self {
            disk: dir.join("disk.qcow2"),
            seed: dir.join("seed.img"),
            vars: dir.join("vars.fd"),
            qmp_socket: dir.join("qmp.sock"),
            agent_socket: dir.join("agent.sock"),
            qga_socket: dir.join("qga.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            qmp_log: dir.join("qmp.log"),
            pidfile: dir.join("qemu.pid"),
            dir,
        }
    }
}

/// How [`RunningVm::shut_down`] ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopRung {
    /// It had already stopped before the ladder began.
    AlreadyStopped,
    /// The guest powered off as asked through its agent.
    AgentPoweroff,
    /// The guest shut down after the ACPI power button.
    Powerdown,
    /// QMP `quit`.
    Quit,
    /// SIGKILL to QEMU's process group.
    Killed,
}

#[derive(Debug, Clone)]
pub struct ShutdownReport {
    pub rung: StopRung,
    pub took: Duration,
    pub unwind: UnwindReport,
}

/// A booted VM. Its resources go away with it: [`RunningVm::shut_down`] in order, or `Drop`
/// at once.
pub struct RunningVm {
    name: String,
    paths: VmPaths,
    accel: AccelDecision,
    channel: GuestChannel,
    /// The appliance it boots, for an appliance boot.
    appliance: Option<appliance::Appliance>,
    qmp: Arc<Qmp>,
    child: process::Child,
    fault: watch::Receiver<Option<Fault>>,
    monitor: tokio::task::JoinHandle<()>,
    started: Instant,
    // Declared last: dropped after the monitor is aborted, and it kills QEMU first.
    undo: UndoList,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("name", &self.name)
            .field("pid", &self.child.pid())
            .field("dir", &self.paths.dir)
            .finish()
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

fn default_work_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

impl RunningVm {
    /// Boot a throwaway VM from `options.image`: overlay, seed, QEMU, QMP. Returns as soon as
    /// QEMU runs; wait for the guest with [`RunningVm::boot_phase`]. `progress` receives
    /// one-line messages for the user.
    pub async fn boot(
        options: VmOptions,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<RunningVm, VmError> {
        let qemu = match &options.qemu {
            Some(q) => q.clone(),
            None => {
                process::find_program("qemu-system-x86_64").map_err(|_| VmError::QemuMissing)?
            }
        };
        let image_err = |source| VmError::Image {
            path: options.image.display().to_string(),
            source,
        };
        let base = img::info(&options.image).await.map_err(image_err)?;
        let base_format = base.disk_format().map_err(image_err)?;
        if base.corrupt() {
            return Err(VmError::Image {
                path: options.image.display().to_string(),
                source: img::ImgError::Corrupt {
                    path: options.image.display().to_string(),
                },
            });
        }
        if let Some(size) = options.disk_size
            && size < base.virtual_size
        {
            return Err(VmError::DiskTooSmall {
                requested: size,
                image: base.virtual_size,
            });
        }

        let appliance = match options.boot {
            Boot::Full => None,
            Boot::Appliance => {
                if options.channel == GuestChannel::Qga {
                    return Err(VmError::ApplianceNeedsAgent);
                }
                Some(appliance::Appliance::prepare(
                    &appliance::cache_dir(),
                    progress,
                )?)
            }
        };
        let accel = accel::decide(options.accel, &qemu).await?;
        if let Some(reason) = &accel.fallback_reason {
            progress(&format!("KVM not usable ({reason}); using TCG (slower)"));
        }
        // The appliance's kernel is loaded by QEMU's own BIOS: no UEFI firmware.
        let uefi = match options.firmware {
            Firmware::Uefi if appliance.is_none() => Some(firmware::find_uefi()?),
            _ => None,
        };

        let mut undo = UndoList::new(options.keep_on_failure, options.leftovers.clone());
        let parent = options.work_dir.clone().unwrap_or_else(default_work_dir);
        let dir = tempfile::Builder::new()
            .prefix("builder-vm-")
            .tempdir_in(&parent)
            .map_err(VmError::WorkDir)?
            .keep();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "builder-vm".into());
        undo.push_keepable(
            format!("remove the VM folder {}", dir.display()),
            format!(
                "kept the VM's disk and logs in {} (console.log, qemu.log); remove with: rm -rf {}",
                dir.display(),
                dir.display()
            ),
            undo::remove_dir(dir.clone()),
        );
        // If builder dies without unwinding (SIGKILL), QEMU dies by its parent-death signal
        // and this watcher removes the folder.
        let watcher = process::spawn_dir_watcher(&dir).map_err(VmError::Spawn)?;
        let (wpid, wexit) = (watcher.pid(), watcher.exit_watch());
        undo.push(format!("stop the folder watcher pid {wpid}"), move || {
            process::kill_group(wpid, &wexit)
        });
        let mut paths = VmPaths::new(dir);
        if options.boot_in_place {
            paths.disk = options.image.clone();
        }
        if let Some(logs) = &options.log_dir {
            fs_err::create_dir_all(logs).map_err(VmError::WorkDir)?;
            paths.console_log = logs.join("console.log");
            paths.qemu_log = logs.join("qemu.log");
            paths.qmp_log = logs.join("qmp.log");
        }
        if paths.qga_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::SocketPathTooLong {
                dir: paths.dir.display().to_string(),
            });
        }
        if !options.boot_in_place {
            img::create_overlay(&options.image, base_format, &paths.disk, options.disk_size)
                .await
                .map_err(VmError::Overlay)?;
        }

        let mut ports = Vec::new();
        let seed = match &options.channel {
            // The agent is the appliance's init: no seed, no cloud-init.
            GuestChannel::Agent { .. } if appliance.is_some() => {
                ports.push(SerialPort {
                    name: seed::AGENT_PORT.into(),
                    socket: paths.agent_socket.clone(),
                });
                None
            }
            GuestChannel::Agent { user_data } => {
                seed::write_seed_scoped(
                    &paths.seed,
                    &seed::SeedContent {
                        instance_id: options
                            .instance_id
                            .clone()
                            .unwrap_or_else(|| format!("builder-{}", uuid::Uuid::new_v4())),
                        hostname: "builder".into(),
                        agent: Some(crate::agent::AGENT_BINARY.to_vec()),
                        user_data: user_data.clone(),
                        network_disabled: options.network == Network::None,
                    },
                    options.cloud_init,
                )
                .map_err(VmError::Seed)?;
                ports.push(SerialPort {
                    name: seed::AGENT_PORT.into(),
                    socket: paths.agent_socket.clone(),
                });
                Some(paths.seed.clone())
            }
            GuestChannel::Qga => {
                ports.push(SerialPort {
                    name: seed::QGA_PORT.into(),
                    socket: paths.qga_socket.clone(),
                });
                None
            }
        };

        let firmware = match uefi {
            None => FirmwareFiles::Bios,
            Some(u) => {
                // A private copy: the VM writes its boot entries there.
                fs_err::copy(&u.vars_template, &paths.vars).map_err(VmError::WorkDir)?;
                FirmwareFiles::Uefi {
                    code: u.code,
                    code_format: u.code_format,
                    vars: paths.vars.clone(),
                    vars_format: u.vars_format,
                }
            }
        };

        let spec = VmSpec {
            name: name.clone(),
            accel: accel.accel,
            cpus: options.cpus,
            memory_mib: options.memory_mib,
            firmware,
            direct_kernel: appliance.as_ref().map(|a| DirectKernel {
                kernel: a.kernel.clone(),
                initrd: a.initrd.clone(),
                append: appliance::cmdline(options.network, "builder"),
            }),
            disk: paths.disk.clone(),
            disk_format: if options.boot_in_place {
                base_format
            } else {
                DiskFormat::Qcow2
            },
            seed,
            ports,
            network: options.network,
            qmp_socket: paths.qmp_socket.clone(),
            console_log: paths.console_log.clone(),
            pidfile: paths.pidfile.clone(),
        };
        fs_err::write(
            paths.dir.join("qemu.cmdline"),
            shell_words(&qemu, &argv::qemu_argv(&spec)),
        )
        .map_err(VmError::WorkDir)?;
        let child = process::spawn(&qemu, &argv::qemu_argv(&spec), &paths.qemu_log)
            .map_err(VmError::Spawn)?;
        let (pid, exit) = (child.pid(), child.exit_watch());
        undo.push(format!("stop QEMU pid {pid}"), move || {
            process::kill_group(pid, &exit)
        });
        progress(&format!("booting ({}, pid {pid})…", accel.accel));

        let qmp = connect_qmp(&paths, &child).await?;
        let qmp = Arc::new(qmp);
        let (fault_tx, fault) = watch::channel(None);
        let monitor = tokio::spawn(monitor(
            qmp.clone(),
            child.exit_watch(),
            fault_tx,
            paths.console_log.clone(),
            0,
        ));

        Ok(RunningVm {
            name,
            paths,
            accel,
            channel: options.channel,
            appliance,
            qmp,
            child,
            fault,
            monitor,
            started: Instant::now(),
            undo,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn accel(&self) -> &AccelDecision {
        &self.accel
    }

    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// The appliance this VM boots (`None`: the guest's own boot).
    pub fn appliance(&self) -> Option<&appliance::Appliance> {
        self.appliance.as_ref()
    }

    pub fn qmp(&self) -> &Arc<Qmp> {
        &self.qmp
    }

    /// Time since QEMU started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// "vm builder-vm-ab12cd (pid 4242)", for messages.
    pub fn describe(&self) -> String {
        format!("vm {} (pid {})", self.name, self.child.pid())
    }

    /// The socket of the guest channel (our agent's or qemu-guest-agent's port).
    pub fn channel_socket(&self) -> &Path {
        match self.channel {
            GuestChannel::Agent { .. } => &self.paths.agent_socket,
            GuestChannel::Qga => &self.paths.qga_socket,
        }
    }

    /// Something that opens a fresh connection to the guest channel, any number of times
    /// (the agent target reconnects after a reboot).
    pub fn channel_connector(&self) -> ChannelConnector {
        ChannelConnector {
            socket: self.channel_socket().to_path_buf(),
        }
    }

    /// The last lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        process::tail(&self.paths.console_log, lines)
    }

    /// The last lines of the serial console, or a note that it stayed empty.
    fn console_tail_or_note(&self) -> String {
        let tail = self.console_tail(CONSOLE_TAIL_LINES);
        if tail.trim().is_empty() {
            "(the serial console printed nothing: is the image bootable, with console=ttyS0?)"
                .into()
        } else {
            tail
        }
    }

    /// The error for the fault that ended the VM, if one did.
    fn fault_error(&self) -> Option<VmError> {
        let fault = self.fault.borrow().clone()?;
        Some(self.error_for(fault))
    }

    /// In an appliance boot, the agent as init's own account of why it gave up (its
    /// `builder-appliance: error:` lines on the console), which explains a power-off, an
    /// exit, a panic or a timeout better than they do.
    fn appliance_failure(&self) -> Option<VmError> {
        self.appliance.as_ref()?;
        let console = process::tail(&self.paths.console_log, 4 * CONSOLE_TAIL_LINES);
        let errors = appliance::console_errors(&console);
        (!errors.is_empty()).then(|| VmError::Appliance {
            reason: errors.join("; "),
        })
    }

    fn error_for(&self, fault: Fault) -> VmError {
        if let Some(e) = self.appliance_failure() {
            return e;
        }
        match fault {
            Fault::Exited(exit) => VmError::QemuExited {
                exit,
                stderr_tail: process::tail(&self.paths.qemu_log, 10),
            },
            Fault::QmpClosed => VmError::QmpClosed,
            // A panic's own line comes before its stack trace: show more.
            Fault::Panicked => VmError::GuestPanicked {
                console_tail: self.console_tail(2 * CONSOLE_TAIL_LINES),
            },
            Fault::PoweredOff => VmError::GuestPoweredOff {
                console_tail: self.console_tail(CONSOLE_TAIL_LINES),
            },
        }
    }

    /// Reset a guest whose kernel panicked while booting (the machine's reset button) and
    /// watch it afresh. For early-boot panics that a retry cures, such as the timer check that
    /// TCG on an overloaded host fails.
    pub async fn reset_after_panic(&mut self) -> Result<(), VmError> {
        self.monitor.abort();
        let console_offset = fs_err::metadata(&self.paths.console_log)
            .map(|m| m.len())
            .unwrap_or(0);
        self.qmp
            .execute_within(&qmp::SystemReset {}, Duration::from_secs(10))
            .await
            .map_err(VmError::Qmp)?;
        // A pvpanic panic paused the VM: let it run again.
        let status = self
            .qmp
            .execute_within(&qmp::QueryStatus {}, Duration::from_secs(10))
            .await
            .map_err(VmError::Qmp)?;
        if !status.running {
            self.qmp
                .execute_within(&qmp::Cont {}, Duration::from_secs(10))
                .await
                .map_err(VmError::Qmp)?;
        }
        let (fault_tx, fault) = watch::channel(None);
        self.fault = fault;
        self.monitor = tokio::spawn(monitor(
            self.qmp.clone(),
            self.child.exit_watch(),
            fault_tx,
            self.paths.console_log.clone(),
            console_offset,
        ));
        Ok(())
    }

    /// Whether the VM has failed (QEMU exited, QMP closed, a panic, a power-off): then there is
    /// no point in a graceful shutdown.
    pub fn has_failed(&self) -> bool {
        self.fault.borrow().is_some()
    }

    /// Resolves (with the error) when the VM fails: QEMU exits or crashes, the QMP connection
    /// closes, the guest panics or powers itself off.
    pub async fn failed(&self) -> VmError {
        let mut fault = self.fault.clone();
        let fault = match fault.wait_for(Option::is_some).await {
            Ok(f) => f.clone(),
            Err(_) => None,
        };
        self.error_for(fault.unwrap_or(Fault::QmpClosed))
    }

    /// After talking to the guest failed: the VM's own failure, if it has one, explains it
    /// better ("QEMU was killed" rather than "connection reset"). Waits up to `within` for the
    /// watcher to notice, since the channel often breaks a moment before QEMU's exit is seen.
    pub async fn explain(&self, within: Duration) -> Option<VmError> {
        tokio::time::timeout(within, self.failed()).await.ok()
    }

    /// Run `work` while watching the VM: if the VM fails first, `work` is dropped (which
    /// cancels it) and the VM's error is returned.
    pub async fn guard<T>(&self, work: impl Future<Output = T>) -> Result<T, VmError> {
        if let Some(e) = self.fault_error() {
            return Err(e);
        }
        tokio::select! {
            biased;
            e = self.failed() => Err(e),
            out = work => Ok(out),
        }
    }

    /// [`RunningVm::guard`] with a deadline counted from QEMU's start: a guest that does not
    /// get `what` done in time is a [`VmError::BootTimeout`] carrying the console's last lines.
    pub async fn boot_phase<T>(
        &self,
        what: &str,
        timeout: Duration,
        work: impl Future<Output = T>,
    ) -> Result<T, VmError> {
        let left = timeout.saturating_sub(self.started.elapsed());
        match tokio::time::timeout(left, self.guard(work)).await {
            Ok(result) => result,
            Err(_) => Err(self
                .appliance_failure()
                .unwrap_or_else(|| VmError::BootTimeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    console_tail: self.console_tail_or_note(),
                    appliance: self.appliance.is_some(),
                })),
        }
    }

    /// Wait until the guest opens its end of the channel port (QMP `VSERPORT_CHANGE`), within
    /// `timeout` of boot. Connect to the channel first: a guest that opens an unconnected
    /// port reads end-of-file.
    pub async fn wait_channel_open(&self, timeout: Duration) -> Result<Duration, VmError> {
        let mut events = self.qmp.events();
        let what = match self.channel {
            GuestChannel::Agent { .. } => "the agent connecting",
            GuestChannel::Qga => "qemu-guest-agent connecting",
        };
        self.boot_phase(what, timeout, async {
            loop {
                match events.recv().await {
                    Ok(ev) => {
                        if let EventKind::VserportChange { open: true, .. } = ev.kind() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    // The sender lives in the QMP reader; closed means QMP is gone, which the
                    // guard reports.
                    Err(_) => std::future::pending::<()>().await,
                }
            }
        })
        .await?;
        Ok(self.started.elapsed())
    }

    /// Stop the VM and release everything. The ladder: if the guest is already stopping (it
    /// was told to power off through its agent: `guest_stopping`), wait for that; otherwise
    /// press the ACPI power button (not in the appliance, where nothing handles it); wait up
    /// to `grace` for QEMU to exit; then QMP `quit`;
    /// then SIGKILL to its process group. Then the undo list unwinds with `outcome`.
    pub async fn shut_down(
        mut self,
        outcome: Outcome,
        guest_stopping: bool,
        grace: Duration,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> ShutdownReport {
        let t0 = Instant::now();
        // From here on, the VM ending is the point, not a fault.
        self.monitor.abort();
        let rung = 'ladder: {
            if self.child.exit().is_some() {
                break 'ladder StopRung::AlreadyStopped;
            }
            // A panicked (paused) guest will not react to the power button.
            let broken = self.has_failed();
            // Nothing in the appliance handles the power button (no systemd, no acpid): its
            // init powers off when its agent is told to, and only then.
            let acpi = !guest_stopping && !broken && self.appliance.is_none();
            if acpi {
                progress("powering off (ACPI)…");
                if let Err(e) = self
                    .qmp
                    .execute_within(&qmp::SystemPowerdown {}, Duration::from_secs(5))
                    .await
                {
                    progress(&format!("ACPI power button failed: {e}"));
                }
            } else if !guest_stopping && !broken {
                progress("the appliance powers off only through its agent; stopping QEMU");
            }
            let waiting = !broken && (guest_stopping || acpi);
            if waiting && self.child.wait_timeout(grace).await.is_some() {
                break 'ladder if guest_stopping {
                    StopRung::AgentPoweroff
                } else {
                    StopRung::Powerdown
                };
            }
            if waiting {
                progress(&format!(
                    "the guest did not power off within {} s; stopping QEMU",
                    grace.as_secs()
                ));
            }
            let _ = self
                .qmp
                .execute_within(&qmp::Quit {}, Duration::from_secs(5))
                .await;
            if self
                .child
                .wait_timeout(Duration::from_secs(5))
                .await
                .is_some()
            {
                break 'ladder StopRung::Quit;
            }
            StopRung::Killed
        };
        // The undo list kills whatever is left of the process group, then removes the folder.
        let unwind = self.undo.unwind(outcome);
        ShutdownReport {
            rung,
            took: t0.elapsed(),
            unwind,
        }
    }

    /// Kill the VM at once and release everything (what `Drop` does, with the report
    /// returned instead of printed).
    pub fn kill(mut self, outcome: Outcome) -> UnwindReport {
        self.monitor.abort();
        self.undo.unwind(outcome)
    }
}

/// Opens connections to a VM's guest channel socket.
#[derive(Debug, Clone)]
pub struct ChannelConnector {
    socket: PathBuf,
}

impl ChannelConnector {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn connect(&self) -> std::io::Result<tokio::net::UnixStream> {
        tokio::net::UnixStream::connect(&self.socket).await
    }
}

#[async_trait::async_trait]
impl crate::machine::agent::Connector for ChannelConnector {
    async fn connect(
        &self,
    ) -> Result<Box<dyn crate::machine::agent::AgentStream>, crate::machine::MachineError> {
        let stream = ChannelConnector::connect(self).await.map_err(|e| {
            crate::machine::MachineError::io(
                format!(
                    "could not connect to the guest channel {}",
                    self.socket.display()
                ),
                e,
            )
        })?;
        Ok(Box::new(stream))
    }
}

/// Connect to QMP as soon as QEMU has created its socket, or report why QEMU died.
async fn connect_qmp(paths: &VmPaths, child: &process::Child) -> Result<Qmp, VmError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = child.exit() {
            return Err(VmError::QemuExited {
                exit,
                stderr_tail: process::tail(&paths.qemu_log, 10),
            });
        }
        if paths.qmp_socket.exists() {
            let log = fs_err::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&paths.qmp_log)
                .ok()
                .map(fs_err::File::into_file);
            match Qmp::connect(&paths.qmp_socket, log).await {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() > deadline => return Err(VmError::Qmp(e)),
                Err(_) => {}
            }
        } else if Instant::now() > deadline {
            return Err(VmError::Qmp(qmp::QmpError::Greeting(
                "QEMU did not create its QMP socket within 30 s".into(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Watches one VM for the things that end it: QEMU's exit, QMP closing, a guest panic, a guest
/// power-off. Records the first one.
///
/// A kernel that panics before its pvpanic driver is loaded (e.g. "IO-APIC + timer doesn't
/// work!", which TCG on an overloaded host triggers) sends no QMP event, so the console log is
/// scanned too, from `console_offset` on.
async fn monitor(
    qmp: Arc<Qmp>,
    mut exit: watch::Receiver<Option<process::Exit>>,
    fault: watch::Sender<Option<Fault>>,
    console: PathBuf,
    mut console_offset: u64,
) {
    let mut events = qmp.events();
    let exit_after_close = exit.clone();
    let mut scan = tokio::time::interval(Duration::from_millis(500));
    let found = loop {
        tokio::select! {
            _ = scan.tick() => {
                if console_shows_panic(&console, &mut console_offset) {
                    break Fault::Panicked;
                }
            }
            e = async { exit.wait_for(Option::is_some).await.ok().and_then(|e| *e) } => {
                break Fault::Exited(e.unwrap_or(process::Exit::Unknown));
            }
            () = qmp.closed() => {
                // QEMU usually closes QMP as it exits: give the exit status a moment to arrive.
                let mut exit = exit_after_close.clone();
                let waited = tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|e| *e));
                break match waited {
                    Some(e) => Fault::Exited(e),
                    None => Fault::QmpClosed,
                };
            }
            ev = events.recv() => match ev {
                Ok(ev) => match ev.kind() {
                    EventKind::GuestPanicked { .. } => break Fault::Panicked,
                    EventKind::Shutdown { guest: true, .. } => break Fault::PoweredOff,
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => std::future::pending::<()>().await,
            },
        }
    };
    let _ = fault.send(Some(found));
}

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";

/// Whether the console log has a kernel panic line after `offset`; moves `offset` past what
/// was read (keeping a tail so a line split across reads is still seen).
fn console_shows_panic(path: &Path, offset: &mut u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs_err::File::open(path) else {
        return false;
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    if f.take(4 << 20).read_to_end(&mut buf).is_err() || buf.is_empty() {
        return false;
    }
    let found = buf.windows(PANIC_MARK.len()).any(|w| w == PANIC_MARK);
    let keep = PANIC_MARK.len() as u64;
    *offset += (buf.len() as u64).saturating_sub(keep);
    found
}

/// The command line as a shell would read it, kept in the VM folder for debugging.
fn shell_words(program: &Path, args: &[String]) -> String {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    let mut out = quote(&program.to_string_lossy());
    for a in args {
        out.push(' ');
        out.push_str(&quote(a));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_scan_finds_a_panic_once_and_across_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("console.log");
        fs_err::write(&log, b"[    0.0] booting\r\n[    0.1] Kernel pan").expect("write");
        let mut offset = 0;
        assert!(!console_shows_panic(&log, &mut offset));
        // The rest of the line arrives in the next read: still found.
        let mut f = fs_err::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open");
        std::io::Write::write_all(
            &mut f,
            b"ic - not syncing: IO-APIC + timer doesn't work!\r\n",
        )
        .expect("append");
        assert!(console_shows_panic(&log, &mut offset));
        // After a reset the scan starts past the old panic.
        let mut offset = fs_err::metadata(&log).expect("stat").len();
        std::io::Write::write_all(&mut f, b"[    0.0] booting again\r\n").expect("append");
        assert!(!console_shows_panic(&log, &mut offset));
        assert!(!console_shows_panic(&dir.path().join("missing"), &mut 0));
    }

    #[test]
    fn error_sections_indent_and_vanish_when_empty() {
        assert_eq!(section("console", "  \n"), "");
        assert_eq!(section("console", "a\nb"), "; console:\n    a\n    b");
        let e = VmError::BootTimeout {
            what: "the agent to say hello".into(),
            secs: 10,
            console_tail: "GRUB".into(),
            appliance: false,
        };
        assert_eq!(
            e.to_string(),
            "timed out after 10 s of boot waiting for the agent to say hello; last lines of the serial console:\n    GRUB"
        );
        assert_eq!(e.class(), ErrorClass::Failed);
    }
}
