//! `builder vm exec|shell`: throwaway VMs from a disk image, driven through the agent.
//! [`run_in_vm`] is the shared path (boot, wait until ready, work, shut down, clean up, and
//! the same on Ctrl-C/SIGTERM) that `component run --target vm:IMAGE` uses too.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anstream::eprintln;
use anstyle::Style;
use clap::{Args, Subcommand};

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use super::{CliResult, EXIT_FAILED, Failure, parse_accel, parse_boot};
use builder::component::executor::{self, Observer, RunError, RunOptions, RunOutcome, RunRequest};
use builder::component::report::Status;
use builder::machine::agent::InteractiveEvent;
use builder::machine::{ExecRequest, ExitStatus, OutputSink, OutputStream};
use builder::recipe::{Accelerator, Boot, Firmware, Network};
use builder::undo::Outcome;
use builder::vm::session::{Session, SessionOptions};
use builder::vm::{ErrorClass, GuestChannel, VmError, VmOptions};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a throwaway VM from an image, run one command in it through the agent, print its
    /// output as it comes, shut the VM down and exit with the command's status. The image is
    /// never modified (the VM writes to a temporary overlay).
    Exec(ExecArgs),
    /// Boot a throwaway VM from an image and open an interactive shell in it through the
    /// agent (no SSH, no network needed).
    Shell(ShellArgs),
}

/// How to boot the VM; shared by `vm exec`, `vm shell` and `component run --target vm:`.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Accelerator: `auto` uses KVM only when a probe shows it works, else TCG.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub accel: Accelerator,
    /// Guest memory, e.g. `1G`, `1536M` (MiB without a unit).
    #[arg(long, default_value = "1G", value_parser = parse_mib)]
    pub memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// Guest network: `none` (no network card) or `user` (outbound NAT only, no port open
    /// on the host).
    #[arg(long, default_value = "none", value_parser = parse_network)]
    pub network: Network,
    /// Platform firmware: `bios` or `uefi` (OVMF, from QEMU's firmware descriptors).
    #[arg(long, default_value = "bios", value_parser = parse_firmware)]
    pub firmware: Firmware,
    /// How the VM starts: `full` (the image's own boot: firmware, its kernel, systemd,
    /// cloud-init) or `appliance` (the host's kernel with builder's agent as init, commands in
    /// a chroot of the image's root file system: seconds instead of a whole boot under TCG,
    /// but no service manager runs and `--user-data` is refused). See "Boot modes" in the
    /// README.
    #[arg(long, default_value = "full", value_parser = parse_boot)]
    pub boot: Boot,
    /// Grow the VM's disk to this size, e.g. `10G` (the image itself is never changed).
    #[arg(long, value_parser = parse_bytes)]
    pub disk_size: Option<u64>,
    /// Seconds from QEMU's start until the agent answers and cloud-init is done.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub boot_timeout: u64,
    /// On failure, keep the VM's disk and logs and print where they are.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Do not wait for cloud-init to finish before running (the agent is up earlier).
    #[arg(long)]
    pub no_cloud_init_wait: bool,
    /// Your own cloud-init user data (`#cloud-config` or a `#!` script), combined with
    /// builder's. Never put secrets here.
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The base image (qcow2 or raw) to boot.
    #[arg(long, value_name = "IMAGE")]
    image: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// The base image (qcow2 or raw) to boot.
    #[arg(long, value_name = "IMAGE")]
    image: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
}

fn parse_firmware(s: &str) -> Result<Firmware, String> {
    Firmware::parse_named("firmware", s)
}

fn parse_network(s: &str) -> Result<Network, String> {
    Network::parse_named("network", s)
}

/// `10G`, `512M`, `1536K`, `1T` or a plain number of bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| t.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write it like `10G` or `512M`"))?;
    let mult: u64 = match unit
        .trim_end_matches(['i', 'B', 'b'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("unknown unit in `{s}`; use K, M, G or T")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{s}` is out of range"))
}

/// Memory in MiB: a plain number is MiB.
fn parse_mib(s: &str) -> Result<u64, String> {
    if s.trim().chars().all(|c| c.is_ascii_digit()) {
        let mib: u64 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a size"))?;
        if mib < 128 {
            return Err(format!(
                "{mib} MiB is too little memory for a VM (at least 128M)"
            ));
        }
        return Ok(mib);
    }
    let bytes = parse_bytes(s)?;
    let mib = bytes >> 20;
    if mib < 128 {
        return Err(format!(
            "`{s}` is too little memory for a VM (at least 128M)"
        ));
    }
    Ok(mib)
}

impl VmArgs {
    /// Session options for booting `image` with our agent.
    pub fn session_options(&self, image: PathBuf) -> Result<SessionOptions, Failure> {
        if self.boot == Boot::Appliance && self.user_data.is_some() {
            return Err(Failure::input(anyhow::anyhow!(
                "`--user-data` cannot be used with `--boot appliance`: cloud-init does not run in the appliance"
            ))
            .with_hint("use `--boot full`, or run what the user data does as commands"));
        }
        let user_data = match &self.user_data {
            None => None,
            Some(p) => Some(fs_err::read_to_string(p).map_err(|e| {
                Failure::input(anyhow::Error::new(e).context("could not read the user data"))
            })?),
        };
        let mut vm = VmOptions::new(image);
        vm.accel = self.accel;
        vm.cpus = self.cpus;
        vm.memory_mib = self.memory;
        vm.network = self.network;
        vm.firmware = self.firmware;
        vm.boot = self.boot;
        vm.disk_size = self.disk_size;
        vm.keep_on_failure = self.keep_on_failure;
        vm.channel = GuestChannel::Agent { user_data };
        let mut options = SessionOptions::new(vm);
        options.boot_timeout = Duration::from_secs(self.boot_timeout);
        options.wait_cloud_init = !self.no_cloud_init_wait;
        Ok(options)
    }
}

/// One progress line on stderr.
pub fn progress(message: &str) {
    let dim = Style::new().dimmed();
    eprintln!("{dim}vm:{dim:#} {message}");
}

fn progress_fn() -> &'static (dyn Fn(&str) + Send + Sync) {
    &progress
}

/// A VM error as a CLI failure with the right exit code and hint.
pub fn vm_failure(e: VmError) -> Failure {
    let code = match e.class() {
        ErrorClass::Input => super::EXIT_INPUT,
        ErrorClass::Host => super::EXIT_HOST,
        ErrorClass::Failed => EXIT_FAILED,
    };
    let hint = e.hint();
    let mut f = Failure::new(code, e);
    if let Some(h) = hint {
        f = f.with_hint(h);
    }
    f
}

/// Resolves when the user interrupts builder (Ctrl-C, SIGTERM, SIGHUP), with the signal name.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Boot a VM for `options`, wait until it is ready, run `work` on it while watching the VM,
/// shut it down and release everything. `success` says whether `work`'s result counts as a
/// success (for keep-on-failure).
///
/// Ctrl-C/SIGTERM/SIGHUP while booting drops everything at once (the VM's undo list kills QEMU
/// and removes its files). While `work` runs and a `cancel` token is given, the first signal
/// cancels the token so `work` can stop gracefully (the executor writes its logs), then the VM
/// is killed; a second signal drops everything at once. Either way the result is the
/// "interrupted" failure (exit 130).
pub async fn run_in_vm<T, F, Fut>(
    options: SessionOptions,
    success: impl Fn(&T) -> bool,
    cancel: Option<CancellationToken>,
    work: F,
) -> Result<T, Failure>
where
    F: FnOnce(Arc<Session>) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let keep = options.vm.keep_on_failure;
    // What the VM's undo list leaves when it is dropped (a failed boot, Ctrl-C).
    let leftovers = options.vm.leftovers.clone();
    let working = AtomicBool::new(false);
    let whole = async {
        let session = match Session::open(options, progress_fn()).await {
            Ok(session) => session,
            Err(e) => {
                super::print_unwind(&leftovers.take());
                return Err(vm_failure(e));
            }
        };
        // Shared by `work` and this function on one task only (never sent to another
        // thread), so it need not be `Sync`: the VM's undo actions are only `Send`.
        #[allow(clippy::arc_with_non_send_sync)]
        let session = Arc::new(session);
        working.store(true, Ordering::SeqCst);
        let result = match session.guard(work(session.clone())).await {
            // A broken channel is often QEMU dying a moment earlier: say that instead.
            Ok(Err(failure)) => match session.vm().explain(Duration::from_secs(1)).await {
                Some(e) => Err(vm_failure(e)),
                None => Err(failure),
            },
            Ok(r) => r,
            Err(e) => Err(vm_failure(e)),
        };
        let outcome = match &result {
            Ok(v) if success(v) => Outcome::Success,
            _ => Outcome::Failure,
        };
        let interrupted = cancel.as_ref().is_some_and(CancellationToken::is_cancelled);
        // A crashed, panicked or stopped VM will not power off: no ladder, just release it.
        let broken = session.vm().has_failed();
        // `work` is done and dropped its handles: we hold the only one.
        let mut report = match Arc::try_unwrap(session) {
            Ok(session) if interrupted || broken => session.kill(outcome),
            Ok(session) => session.close(outcome, progress_fn()).await.unwind,
            Err(shared) => {
                drop(shared);
                Default::default()
            }
        };
        report.append(leftovers.take());
        super::print_unwind(&report);
        if interrupted {
            return Err(Failure::interrupted());
        }
        result
    };
    // Boxed so that `drop(whole)` below really drops the VM before we say so.
    let mut whole = Box::pin(whole);
    let sig = tokio::select! {
        r = &mut whole => return r,
        sig = interrupted() => sig,
    };
    if let Some(token) = cancel.as_ref().filter(|_| working.load(Ordering::SeqCst)) {
        eprintln!("{sig}: stopping the running step (again to stop at once)");
        token.cancel();
        tokio::select! {
            r = &mut whole => return r.and(Err(Failure::interrupted())),
            sig = interrupted() => eprintln!("{sig}: stopping at once"),
        }
    }
    // Dropping `whole` drops the VM: its undo list kills QEMU and removes its files.
    drop(whole);
    super::print_unwind(&leftovers.take());
    eprintln!(
        "{sig}: stopped the VM and removed its files{}",
        if keep {
            " (kept what --keep-on-failure keeps)"
        } else {
            ""
        }
    );
    Err(Failure::interrupted())
}

/// Where `component run --target` runs steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    Local,
    /// `vm:IMAGE`: a throwaway VM with builder's agent.
    Vm(PathBuf),
    /// `qga:IMAGE`: a throwaway VM driven through qemu-guest-agent (no cloud-init needed).
    Qga(PathBuf),
}

impl std::str::FromStr for TargetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let image = |rest: &str| {
            if rest.is_empty() {
                Err(format!(
                    "`{s}` names no image; write it like `vm:base.qcow2`"
                ))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        if s == "local" {
            Ok(TargetSpec::Local)
        } else if let Some(rest) = s.strip_prefix("vm:") {
            image(rest).map(TargetSpec::Vm)
        } else if let Some(rest) = s.strip_prefix("qga:") {
            image(rest).map(TargetSpec::Qga)
        } else {
            Err(format!(
                "unknown target `{s}`; expected `local`, `vm:IMAGE` or `qga:IMAGE`"
            ))
        }
    }
}

/// Run the component executor in a throwaway VM booted from `image`, through our agent
/// (`qga: false`) or qemu-guest-agent (`qga: true`). The steps' working directory defaults to a
/// fresh folder in the guest.
pub async fn run_components(
    vm_args: &VmArgs,
    image: PathBuf,
    qga: bool,
    request: RunRequest,
    mut run_options: RunOptions,
    observer: &dyn Observer,
) -> Result<RunOutcome, Failure> {
    let mut options = vm_args.session_options(image)?;
    if qga && vm_args.boot == Boot::Appliance {
        return Err(Failure::input(anyhow::anyhow!(
            "a `qga:` target cannot boot the appliance: the appliance runs builder's agent, not the image's qemu-guest-agent"
        ))
        .with_hint("use `--target vm:IMAGE --boot appliance`, or `--boot full` with `qga:`"));
    }
    if qga {
        options.vm.channel = GuestChannel::Qga;
        options.wait_cloud_init = false;
    }
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    run_in_vm(
        options,
        |o: &RunOutcome| {
            matches!(
                o.summary.status,
                Status::Success | Status::SuccessWithIgnoredFailure | Status::Skipped
            )
        },
        Some(cancel),
        |session| async move {
            let target = session.target();
            if run_options.working_directory.is_none() {
                let dir = PathBuf::from(GUEST_WORK_DIR);
                let made = target
                    .exec(
                        &ExecRequest::argv(["mkdir", "-p", GUEST_WORK_DIR]),
                        &builder::machine::Discard,
                    )
                    .await;
                if !matches!(made, Ok(o) if o.status.success()) {
                    return Err(Failure::failed(anyhow::anyhow!(
                        "could not create the working directory {GUEST_WORK_DIR} in the VM"
                    )));
                }
                run_options.working_directory = Some(dir);
            }
            executor::run(target.as_ref(), request, run_options, observer, token)
                .await
                .map_err(|e| match e {
                    e @ (RunError::Parameters(_) | RunError::WindowsOnly(_)) => Failure::input(e),
                    e => Failure::host(e),
                })
        },
    )
    .await
}

/// Steps' working directory in a VM target (the VM is thrown away afterwards).
const GUEST_WORK_DIR: &str = "/var/tmp/builder-work";

pub async fn main(command: VmCommand) -> CliResult {
    match command {
        VmCommand::Exec(args) => exec(args).await,
        VmCommand::Shell(args) => shell(args).await,
    }
}

/// Passes a command's output straight to our stdout/stderr as it comes.
struct Passthrough;

impl OutputSink for Passthrough {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        match stream {
            OutputStream::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(data);
                let _ = out.flush();
            }
            OutputStream::Stderr => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(data);
                let _ = err.flush();
            }
        }
    }
}

/// Everything the guest prints goes to stderr: for `builder build --on-error shell`, whose
/// stdout carries only data (the output paths) and may be a file or a pipe.
pub(super) struct AllToStderr;

impl OutputSink for AllToStderr {
    fn output(&self, _: OutputStream, data: &[u8]) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(data);
        let _ = err.flush();
    }
}

fn exit_code(status: ExitStatus, timeout: Option<u64>) -> CliResult {
    match status {
        ExitStatus::Exited(c) => Ok(u8::try_from(c & 0xff).unwrap_or(EXIT_FAILED)),
        ExitStatus::Signaled(s) => {
            eprintln!("the command was killed by signal {s}");
            Ok(u8::try_from((128 + s) & 0xff).unwrap_or(EXIT_FAILED))
        }
        ExitStatus::TimedOut => Err(Failure::failed(anyhow::anyhow!(
            "the command timed out after {} s and was killed",
            timeout.unwrap_or_default()
        ))),
    }
}

async fn exec(args: ExecArgs) -> CliResult {
    let options = args.vm.session_options(args.image.clone())?;
    let request =
        ExecRequest::argv(args.command.clone()).with_timeout(args.timeout.map(Duration::from_secs));
    let status = run_in_vm(
        options,
        |s: &ExitStatus| s.success(),
        None,
        |session| async move {
            let target = session.target();
            target
                .exec(&request, &Passthrough)
                .await
                .map(|o| o.status)
                .map_err(|e| {
                    Failure::failed(anyhow::Error::new(e).context(format!(
                        "could not run `{}` in the VM",
                        request_words(&request)
                    )))
                })
        },
    )
    .await?;
    exit_code(status, args.timeout)
}

fn request_words(request: &ExecRequest) -> String {
    match &request.program {
        builder::machine::Program::Argv(a) => a.join(" "),
        builder::machine::Program::Script { interpreter, .. } => format!("{interpreter} script"),
    }
}

/// Puts the local terminal in raw mode while it lives, and restores it.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enable() -> Option<RawTerminal> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

fn window_size() -> Option<(u16, u16)> {
    terminal_size::terminal_size_of(std::io::stdin())
        .map(|(terminal_size::Width(w), terminal_size::Height(h))| (h, w))
}

async fn shell(args: ShellArgs) -> CliResult {
    use std::io::IsTerminal;
    let options = args.vm.session_options(args.image.clone())?;
    let tty = std::io::stdin().is_terminal();
    let status = run_in_vm(
        options,
        |_: &ExitStatus| true,
        None,
        |session| async move {
            let Some(agent) = session.agent() else {
                return Err(Failure::failed(anyhow::anyhow!(
                    "an interactive shell needs builder's agent in the guest"
                )));
            };
            interactive_shell(
                agent,
                tty,
                "shell ready (exit it to stop the VM)",
                &Passthrough,
            )
            .await
        },
    )
    .await?;
    exit_code(status, None)
}

/// A login shell in the guest through its agent, wired to this terminal (raw mode and window
/// size when `tty`), until it exits; what it prints goes to `output`. `ready` is printed once
/// it runs. Also what `builder build --on-error shell` opens.
pub async fn interactive_shell(
    agent: &builder::machine::agent::AgentMachine,
    tty: bool,
    ready: &str,
    output: &dyn OutputSink,
) -> Result<ExitStatus, Failure> {
    let mut request = ExecRequest::bash(
        "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi",
    );
    if let Ok(term) = std::env::var("TERM") {
        request.env.push(("TERM".into(), term));
    }
    request.cwd = Some("/root".into());
    let pty = if tty {
        window_size().or(Some((24, 80)))
    } else {
        None
    };
    let mut shell = agent.start_interactive(&request, pty).await.map_err(|e| {
        Failure::failed(anyhow::Error::new(e).context("could not start a shell in the VM"))
    })?;
    progress(ready);
    let raw = if tty { RawTerminal::enable() } else { None };
    // A plain thread reads stdin: a blocked read must not hold up the runtime's
    // shutdown after the shell ends (tokio's stdin would).
    let (tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        loop {
            match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut stdin_open = true;
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let status = loop {
        tokio::select! {
            ev = shell.next() => match ev {
                Ok(InteractiveEvent::Output(stream, data)) => output.output(stream, &data),
                Ok(InteractiveEvent::Exited(status)) => break Ok(status),
                Err(e) => break Err(Failure::failed(anyhow::Error::new(e).context("the shell connection failed"))),
            },
            data = stdin_rx.recv(), if stdin_open => match data {
                None => {
                    stdin_open = false;
                    let _ = shell.write_stdin(&[]);
                }
                Some(data) => {
                    if let Err(e) = shell.write_stdin(&data) {
                        break Err(Failure::failed(anyhow::Error::new(e).context("the shell connection failed")));
                    }
                }
            },
            _ = async { match winch.as_mut() { Some(w) => { w.recv().await; } None => std::future::pending::<()>().await } } => {
                if let Some((rows, cols)) = window_size() {
                    let _ = shell.resize(rows, cols);
                }
            }
        }
    };
    drop(raw);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("10G"), Ok(10 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("ten").expect_err("bad").contains("`ten`"));
        assert!(parse_bytes("5Q").expect_err("bad").contains("unit"));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("1536"), Ok(1536));
        assert!(parse_mib("64M").is_err());
    }

    fn vm_args(extra: &[&str]) -> VmArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            vm: VmArgs,
        }
        let argv = std::iter::once("x").chain(extra.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv)
            .expect("valid")
            .vm
    }

    /// `--boot` reaches the VM (default full); the appliance refuses user data.
    #[test]
    fn boot_modes() {
        let image = PathBuf::from("/img.qcow2");
        let full = vm_args(&[]).session_options(image.clone()).expect("ok");
        assert_eq!(full.vm.boot, Boot::Full);
        let appliance = vm_args(&["--boot", "appliance"])
            .session_options(image.clone())
            .expect("ok");
        assert_eq!(appliance.vm.boot, Boot::Appliance);
        let refused = vm_args(&["--boot", "appliance", "--user-data", "/u"])
            .session_options(image)
            .expect_err("refused");
        assert_eq!(refused.code, crate::cli::EXIT_INPUT);
        assert!(parse_boot("appliances").is_err());
    }
}
