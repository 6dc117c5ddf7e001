//! `builder component run`: run component documents on a target (this machine by default),
//! like `awstoe run`. Progress goes to stderr (each step as it starts and ends, its output live);
//! stdout carries data: the AWSTOE summary JSON, or with `--json` one event per line.

use std::io::Write;
use std::path::PathBuf;

use anstream::eprintln;
use anstyle::{AnsiColor, Style};
use clap::Args;
use tokio_util::sync::CancellationToken;

use super::super::{CliResult, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, Failure};
use crate::cli::vm::TargetSpec;
use builder::component::executor::{self, Event, Observer, RunError, RunOptions, RunRequest};
use builder::component::parse;
use builder::component::report::Status;
use builder::machine::host::HostMachine;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Documents to run, in this order: comma-separated and/or repeated.
    #[arg(
        short = 'd',
        long,
        value_delimiter = ',',
        required = true,
        value_name = "DOCUMENT"
    )]
    documents: Vec<PathBuf>,
    /// Run only these phases (comma-separated). Phases still run in document order.
    #[arg(short = 'p', long, value_delimiter = ',', value_name = "PHASE")]
    phases: Vec<String>,
    /// Parameter values as name=value,name=value (repeatable). A piece without `=` continues
    /// the previous value, so `list=a,b,c` keeps its commas.
    #[arg(long, value_name = "NAME=VALUE,...")]
    parameters: Vec<String>,
    /// Parent folder of the run's `TOE_<date>_<time>_UTC-0_<id>` log folder [default: the
    /// current directory].
    #[arg(short = 'l', long, value_name = "DIR")]
    log_directory: Option<PathBuf>,
    /// Names the run and its log folder [default: a new UUID].
    #[arg(short = 'i', long, value_name = "ID")]
    execution_id: Option<String>,
    /// Where steps run and relative paths point (exported to scripts as `WORKING_DIRECTORY`)
    /// [default: a temporary folder removed after the run].
    #[arg(long, value_name = "DIR")]
    working_directory: Option<PathBuf>,
    /// S3-compatible endpoint for S3Download/S3Upload, e.g. http://127.0.0.1:9000.
    /// Credentials and region come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
    #[arg(long, env = "BUILDER_S3_ENDPOINT", value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Where the steps run: `local` (this machine), `vm:IMAGE` (a throwaway VM booted from
    /// IMAGE with builder's agent) or `qga:IMAGE` (a throwaway VM driven through the
    /// qemu-guest-agent the image carries).
    #[arg(long, default_value = "local", value_name = "TARGET")]
    target: crate::cli::vm::TargetSpec,
    /// How to boot the VM of a `vm:` or `qga:` target.
    #[command(flatten, next_help_heading = "VM target")]
    vm: crate::cli::vm::VmArgs,
    /// Print one JSON event per line on stdout (step started, output, finished; the summary
    /// last) instead of the summary alone.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: RunArgs) -> CliResult {
    if let Some(id) = &args.execution_id
        && (id.is_empty() || id.contains('/') || id == "." || id == "..")
    {
        return Err(Failure::input(anyhow::anyhow!(
            "`--execution-id {id}` cannot name a folder; use letters, digits and `-`"
        )));
    }
    let parameters = executor::parse_parameter_overrides(&args.parameters)
        .map_err(|e| Failure::input(anyhow::anyhow!("--parameters: {e}")))?;
    let s3 = match &args.s3_endpoint {
        Some(endpoint) if !endpoint.is_empty() => Some(
            executor::s3_client(endpoint)
                .map_err(|e| Failure::input(anyhow::anyhow!("--s3-endpoint: {e}")))?,
        ),
        _ => None,
    };

    // Every document is read and validated before anything runs; warnings are shown and do
    // not stop the run.
    let mut documents = Vec::new();
    let mut invalid = false;
    for path in &args.documents {
        match parse::load_checked(path) {
            Ok(checked) => {
                anstream::eprint!("{}", checked.diagnostics.render(true));
                match checked.document {
                    Some(document) => documents.push(document),
                    None => invalid = true,
                }
            }
            Err(e) => {
                invalid = true;
                super::super::report(&Failure::input(e));
            }
        }
    }
    if invalid {
        eprintln!("nothing was run");
        return Err(Failure::already_printed(EXIT_INPUT));
    }

    let log_directory = match args.log_directory {
        Some(dir) => dir,
        None => std::env::current_dir().map_err(|e| {
            Failure::host(anyhow::Error::new(e).context("could not read the current directory"))
        })?,
    };
    let options = RunOptions {
        execution_id: args.execution_id,
        log_directory: Some(log_directory),
        working_directory: args.working_directory,
        s3,
        ..RunOptions::default()
    };
    let request = RunRequest {
        documents,
        phases: (!args.phases.is_empty()).then_some(args.phases),
        parameters,
    };

    let observer: Box<dyn Observer> = if args.json {
        Box::new(JsonLines)
    } else {
        Box::new(Terminal)
    };
    let in_appliance = matches!(args.target, TargetSpec::Vm(_))
        && args.vm.boot == builder::recipe::Boot::Appliance;
    let outcome = match args.target {
        TargetSpec::Local => {
            let cancel = CancellationToken::new();
            let signals = tokio::spawn(cancel_on_signal(cancel.clone()));
            let target = HostMachine::new();
            // Steps run inside the working directory and also name paths under it: a relative
            // one would be counted twice.
            let mut options = options;
            if let Some(dir) = options.working_directory.take() {
                options.working_directory = Some(std::path::absolute(&dir).map_err(|e| {
                    Failure::input(
                        anyhow::Error::new(e)
                            .context(format!("--working-directory {}", dir.display())),
                    )
                })?);
            }
            let result = executor::run(&target, request, options, observer.as_ref(), cancel).await;
            signals.abort();
            match result {
                Ok(outcome) => outcome,
                Err(e @ (RunError::Parameters(_) | RunError::WindowsOnly(_))) => {
                    return Err(Failure::input(e));
                }
                Err(e) => return Err(Failure::host(e)),
            }
        }
        // Boot, wait for the agent and cloud-init, run, shut down; signals handled there.
        TargetSpec::Vm(image) => {
            crate::cli::vm::run_components(
                &args.vm,
                image,
                false,
                request,
                options,
                observer.as_ref(),
            )
            .await?
        }
        TargetSpec::Qga(image) => {
            crate::cli::vm::run_components(
                &args.vm,
                image,
                true,
                request,
                options,
                observer.as_ref(),
            )
            .await?
        }
    };
    // Notes were shown as they came (Event::Note); outcome.notes repeats them for library users.
    if !args.json {
        let json = serde_json::to_string_pretty(&outcome.summary)
            .map_err(|e| Failure::failed(anyhow::Error::new(e)))?;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{json}");
    }
    let logs = outcome
        .log_dir
        .as_ref()
        .map(|d| format!("; logs: {}", d.display()))
        .unwrap_or_default();
    match outcome.summary.status {
        Status::Success | Status::SuccessWithIgnoredFailure | Status::Skipped => Ok(0),
        Status::Cancelled => {
            let mut failure = Failure::new(
                EXIT_INTERRUPTED,
                anyhow::anyhow!("the run was interrupted{logs}"),
            );
            if let Some(hint) = outcome.hint {
                failure = failure.with_hint(hint);
            }
            Err(failure)
        }
        _ => {
            let mut failure = Failure::new(EXIT_FAILED, run_failure(&outcome, &logs));
            if let Some(hint) = outcome.hint.clone() {
                failure = failure.with_hint(hint);
            } else if in_appliance && wanted_a_service_manager(&outcome) {
                failure = failure.with_hint(
                    "the VM is the appliance (`--boot appliance`), where no service manager runs: `systemctl enable` works there, but starting, stopping or asking services (`systemctl start`, D-Bus) does not; use `--boot full`",
                );
            }
            Err(failure)
        }
    }
}

/// The failed step's output says it wanted a running systemd or D-Bus (see
/// `builder::build::wants_a_service_manager`).
fn wanted_a_service_manager(outcome: &executor::RunOutcome) -> bool {
    outcome.report.failed_step().is_some_and(|failed| {
        let step = failed.step;
        let texts = step.output_tail.iter().map(String::as_str);
        builder::build::wants_a_service_manager(texts.chain([step.failure_message.as_str()]))
    })
}

/// "component `x` failed in phase `build`, step `y` (attempt 3 of 3)", caused by the step's
/// failure, with its last lines of output and where the full log is.
fn run_failure(outcome: &executor::RunOutcome, logs: &str) -> anyhow::Error {
    let Some(failed) = outcome.report.failed_step() else {
        return anyhow::anyhow!("the run failed: {}{logs}", outcome.summary.failure_message);
    };
    let step = failed.step;
    let mut cause = step.failure_message.clone();
    if !step.output_tail.is_empty() {
        cause.push_str("\n  last lines of output:");
        for line in &step.output_tail {
            cause.push_str("\n    ");
            cause.push_str(line);
        }
    }
    if let Some(dir) = &outcome.log_dir {
        cause.push_str(&format!(
            "\n  full log: {}",
            dir.join("console.log").display()
        ));
    }
    let verb = if step.status == Status::TimedOut {
        "timed out"
    } else {
        "failed"
    };
    anyhow::anyhow!(cause).context(format!(
        "component `{}` {verb} in phase `{}`, step `{}` (attempt {} of {})",
        failed.document.name, failed.phase.name, step.name, step.attempts, step.max_attempts
    ))
}

/// Ctrl-C and SIGTERM cancel the run; the executor stops the running command and still writes
/// the logs.
async fn cancel_on_signal(cancel: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    next_signal(&mut term).await;
    eprintln!("interrupted: stopping the running step and writing the logs (again to quit now)");
    cancel.cancel();
    // Stopping normally takes a moment; a second signal means "now", logs or not.
    next_signal(&mut term).await;
    eprintln!("interrupted again: quitting without waiting");
    std::process::exit(i32::from(EXIT_INTERRUPTED));
}

/// The next Ctrl-C or SIGTERM.
async fn next_signal(term: &mut Option<tokio::signal::unix::Signal>) {
    let terminated = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
}

fn style_note() -> Style {
    Style::new().bold().fg_color(Some(AnsiColor::Cyan.into()))
}

/// Steps as they start and end, their output live, on stderr.
pub(crate) struct Terminal;

impl Observer for Terminal {
    fn event(&self, event: &Event<'_>) {
        let dim = Style::new().dimmed();
        let bold = Style::new().bold();
        let green = Style::new().fg_color(Some(AnsiColor::Green.into()));
        let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
        let yellow = Style::new().fg_color(Some(AnsiColor::Yellow.into()));
        let pad = |depth: usize| "    ".repeat(depth);
        match event {
            Event::RunStarted {
                execution_id,
                log_directory,
                target,
            } => {
                eprintln!("{dim}run {execution_id} on {target}{dim:#}");
                if let Some(dir) = log_directory {
                    eprintln!("{dim}logs: {}{dim:#}", dir.display());
                }
            }
            Event::Note { message } => {
                eprintln!(
                    "{}note{}: {message}",
                    style_note(),
                    style_note().render_reset()
                );
            }
            Event::DocumentStarted {
                document,
                path,
                depth,
            } => eprintln!(
                "{}{bold}{document}{bold:#} {dim}({}){dim:#}",
                pad(*depth),
                path.display()
            ),
            Event::PhaseStarted { phase, depth, .. } => {
                eprintln!("{}  {bold}phase {phase}{bold:#}", pad(*depth))
            }
            Event::StepStarted {
                step,
                action,
                attempt,
                max_attempts,
                depth,
                ..
            } => {
                let retry = if *attempt > 1 {
                    format!(" attempt {attempt} of {max_attempts}")
                } else {
                    String::new()
                };
                eprintln!("{}    ▶ {step} {dim}{action}{retry}{dim:#}", pad(*depth));
            }
            Event::StepOutput {
                stream,
                line,
                depth,
                ..
            } => {
                if *stream == "stderr" {
                    eprintln!("{}    {dim}│{dim:#} {yellow}{line}{yellow:#}", pad(*depth));
                } else {
                    eprintln!("{}    {dim}│{dim:#} {line}", pad(*depth));
                }
            }
            Event::StepFinished {
                step,
                status,
                duration_ms,
                failure_message,
                depth,
                ..
            } => {
                let seconds = *duration_ms as f64 / 1000.0;
                let (mark, style) = match status {
                    Status::Success => ("✓", green),
                    Status::Skipped => ("↷", dim),
                    Status::IgnoredFailure | Status::SuccessWithIgnoredFailure => ("!", yellow),
                    Status::Cancelled => ("■", yellow),
                    Status::Failed | Status::TimedOut => ("✗", red),
                };
                let message = if failure_message.is_empty() {
                    String::new()
                } else {
                    format!(": {failure_message}")
                };
                eprintln!(
                    "{}    {style}{mark} {step} {status}{style:#} {dim}{seconds:.2}s{dim:#}{message}",
                    pad(*depth)
                );
            }
            Event::DocumentFinished { .. } | Event::Summary { .. } => {}
        }
    }
}

/// One JSON object per line on stdout, for CI.
struct JsonLines;

impl Observer for JsonLines {
    fn event(&self, event: &Event<'_>) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}
