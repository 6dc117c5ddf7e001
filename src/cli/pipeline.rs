//! `builder pipeline validate|run` and `builder serve`: pipelines checked, run once now, or
//! run on their schedules by a long-running scheduler (see `builder::pipeline`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anstream::eprintln;
use anstyle::{AnsiColor, Style};
use clap::{Args, Subcommand, ValueEnum};

use super::{CliResult, EXIT_FAILED, EXIT_HOST, EXIT_INPUT, Failure, env, parse_accel, worst_of};
use builder::build::{BuildObserver, BuildOptions};
use builder::pipeline::history::{ExecStatus, History, Trigger};
use builder::pipeline::parse::{self, ParseError};
use builder::pipeline::run::{self, RunOptions};
use builder::pipeline::scheduler::{self, Control, OnStop};
use builder::pipeline::{Clock, SystemClock};
use builder::recipe::Accelerator;
use builder::store::Store;

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Check pipeline files and the recipes they name without starting anything: every
    /// problem at its file:line:col with a hint; an impossible schedule is explained.
    Validate(ValidateArgs),
    /// Run one execution of a pipeline now: evaluate its start condition, build, record it in
    /// the pipeline history, notify, apply its lifecycle.
    Run(RunArgs),
    /// The last executions of each pipeline (status, when, image, why it ran or was skipped)
    /// and its next scheduled run, from the pipeline history.
    Status(super::pipeline_status::StatusArgs),
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline files (YAML).
    #[arg(value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file (YAML).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Build even when the start condition (`dependencyChanged`) says nothing changed.
    #[arg(long)]
    force: bool,
    /// Print the build's events as JSON lines on stdout, and the execution's report last.
    #[arg(long)]
    json: bool,
    /// The store folder [default: $BUILDER_STORE, else $XDG_DATA_HOME/builder, else
    /// ~/.local/share/builder]. The history is `<store>/pipelines.sqlite`.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Override the accelerator: `auto`, `kvm` or `tcg`.
    #[arg(long, value_parser = parse_accel)]
    accel: Option<Accelerator>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The folder of pipeline files (`*.yml`, `*.yaml`); read again at every tick and on
    /// SIGHUP, so edits take effect without a restart.
    #[arg(long, value_name = "DIR")]
    pipelines: PathBuf,
    /// How many builds may run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// What SIGTERM/SIGINT does to running builds: `cancel` stops them cleanly (VM stopped,
    /// files removed, logs kept), `finish` lets them finish first.
    #[arg(long, value_enum, default_value_t = StopMode::Cancel)]
    on_stop: StopMode,
    /// The store folder (as for `builder build`).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Override every pipeline's accelerator: `auto`, `kvm` or `tcg`.
    #[arg(long, value_parser = parse_accel)]
    accel: Option<Accelerator>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StopMode {
    Cancel,
    Finish,
}

pub async fn main(command: PipelineCommand) -> CliResult {
    match command {
        PipelineCommand::Validate(args) => validate(args),
        PipelineCommand::Run(args) => run_once(args).await,
        PipelineCommand::Status(args) => super::pipeline_status::status(args),
    }
}

fn open_store(dir: &Option<PathBuf>) -> Result<Store, Failure> {
    super::open_store(dir.as_deref()).map(|(store, _)| store)
}

fn open_history(store: &Store) -> Result<History, Failure> {
    History::open(&History::default_path(store)).map_err(|e| {
        Failure::host(anyhow::Error::new(e).context("could not open the pipeline history"))
    })
}

fn parse_failure(error: ParseError) -> Failure {
    match error {
        ParseError::Invalid(files) => {
            super::recipe::show(&files);
            Failure::already_printed(EXIT_INPUT)
        }
        e @ ParseError::Unreadable(_) => Failure::input(e),
        ParseError::Recipe(e) => super::recipe::failure(e),
    }
}

fn validate(args: ValidateArgs) -> CliResult {
    let mut worst = 0;
    for file in &args.files {
        match parse::validate(file, SystemClock.now(), &env) {
            Ok(v) => {
                super::recipe::show(&v.warnings);
                let p = &v.pipeline;
                let schedule = match &p.schedule {
                    Some(s) => format!(
                        "{} \"{}\" in {}, start condition `{}`",
                        s.expression.value.written.trim(),
                        s.expression.value.describe(),
                        s.timezone.name(),
                        s.start_condition.name()
                    ),
                    None => "no schedule (runs only with `builder pipeline run`)".into(),
                };
                let mut overrides = String::new();
                if !p.infrastructure.is_empty() {
                    let keys = p.infrastructure.keys.join(", ");
                    overrides.push_str(&format!("; infrastructure {keys} replaced"));
                }
                if let Some(targets) = &p.distribution {
                    let kinds: Vec<&str> = targets.iter().map(|t| t.value.kind()).collect();
                    overrides.push_str(&match kinds.as_slice() {
                        [] => "; distribution replaced: none".to_string(),
                        kinds => format!("; distribution replaced: {}", kinds.join(", ")),
                    });
                }
                eprintln!(
                    "ok: {} ({}: recipe {} {}; {schedule}{overrides}{})",
                    file.display(),
                    p.name,
                    v.recipe.recipe.name,
                    v.recipe.recipe.version,
                    if p.enabled { "" } else { "; disabled" }
                );
            }
            Err(e) => {
                let failure = parse_failure(e);
                super::report(&failure);
                worst = worst.max(failure.code);
            }
        }
    }
    worst_of(worst)
}

async fn run_once(args: RunArgs) -> CliResult {
    let store = open_store(&args.store)?;
    // Invalid input stops here, before anything is recorded.
    let validated = parse::validate(&args.file, SystemClock.now(), &env).map_err(parse_failure)?;
    super::recipe::show(&validated.warnings);
    let history = open_history(&store)?;
    let name = validated.pipeline.name.clone();
    let trigger = Trigger::Manual;
    let id = history
        .begin(&name, trigger, &run::trigger_reason(&trigger, 0))
        .map_err(|e| {
            Failure::host(anyhow::Error::new(e).context("could not record the execution"))
        })?
        .ok_or_else(|| Failure::host(anyhow::anyhow!("the history refused a manual execution")))?;
    eprintln!("{name}: execution {id}");
    // The lifecycle never deletes what the pipelines next to this one build on.
    let folder = args
        .file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let quiet: scheduler::Log = Arc::new(|_: &str| {});
    let neighbours =
        scheduler::load_folder(folder, SystemClock.now(), &mut Default::default(), &quiet)
            .unwrap_or_default();
    let options = RunOptions {
        force: args.force,
        build: BuildOptions {
            accel: args.accel,
            ..BuildOptions::default()
        },
        protected_refs: scheduler::protected_refs(&neighbours),
    };
    let observer: Box<dyn BuildObserver> = if args.json {
        Box::new(super::build::JsonLines)
    } else {
        Box::new(super::build::Progress::new())
    };
    let result = tokio::select! {
        r = run::execute(validated, id, &store, &history, &options, observer.as_ref()) => r,
        sig = super::vm::interrupted() => {
            // Dropping the execution's future unwound its build (VM stopped, files removed).
            super::print_unwind(&options.build.leftovers.take());
            let _ = run::cancelled(&history, id, &format!("interrupted ({sig})"));
            eprintln!("{sig}: execution {id} was cancelled; its build was stopped and removed");
            return Err(Failure::interrupted());
        }
    };
    let report = result.map_err(|e| Failure::host(anyhow::Error::new(e)))?;
    if args.json {
        let mut out = std::io::stdout().lock();
        if let Ok(line) =
            serde_json::to_string(&serde_json::json!({"event": "execution", "report": report}))
        {
            let _ = writeln!(out, "{line}");
        }
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for l in &report.lifecycle {
        eprintln!("lifecycle: {l}");
    }
    if let Some(pruned) = &report.layer_cache {
        eprintln!("{pruned}");
    }
    let green = Style::new().bold().fg_color(Some(AnsiColor::Green.into()));
    let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
    match report.status {
        ExecStatus::Available => {
            eprintln!(
                "{green}available{green:#} {} (execution {id}): {}",
                report.image.as_deref().unwrap_or("?"),
                report.reason
            );
            Ok(0)
        }
        ExecStatus::Skipped => {
            eprintln!("skipped (execution {id}): {}", report.reason);
            eprintln!("hint: `--force` builds anyway");
            Ok(0)
        }
        _ => {
            eprintln!(
                "{red}error{red:#}: execution {id} of `{name}` {}: {}",
                report.status,
                report.error.as_deref().unwrap_or("")
            );
            if let Some(logs) = &report.logs {
                eprintln!("  logs: {}", logs.display());
            }
            Err(Failure::already_printed(EXIT_FAILED))
        }
    }
}

/// `builder serve`.
pub async fn serve(args: ServeArgs) -> CliResult {
    if !args.pipelines.is_dir() {
        return Err(Failure::input(anyhow::anyhow!(
            "`{}` is not a folder",
            args.pipelines.display()
        ))
        .with_hint(
            "give the folder that holds the pipeline files: `--pipelines images/pipelines`",
        ));
    }
    let store = open_store(&args.store)?;
    let history = Arc::new(open_history(&store)?);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let signals = tokio::spawn(forward_signals(tx));
    let log: scheduler::Log = Arc::new(|line: &str| {
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{now} {line}");
    });
    let options = scheduler::Options {
        dir: args.pipelines.clone(),
        concurrency: usize::from(args.concurrency),
        on_stop: match args.on_stop {
            StopMode::Cancel => OnStop::Cancel,
            StopMode::Finish => OnStop::Finish,
        },
        run: RunOptions {
            force: false,
            build: BuildOptions {
                accel: args.accel,
                ..BuildOptions::default()
            },
            // Filled at each tick from the folder's pipelines.
            protected_refs: Vec::new(),
        },
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let local = tokio::task::LocalSet::new();
    let result = local
        .run_until(scheduler::serve(store, history, clock, options, rx, log))
        .await;
    signals.abort();
    match result {
        Ok(()) => Ok(0),
        Err(e @ scheduler::SchedulerError::Folder(_)) => Err(Failure::input(e)),
        Err(e) => Err(Failure::new(EXIT_HOST, e)),
    }
}

/// SIGTERM/SIGINT stop the scheduler; SIGHUP reloads the pipelines folder.
async fn forward_signals(tx: tokio::sync::mpsc::UnboundedSender<Control>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(Control::Stop("SIGINT".into()));
        return;
    };
    loop {
        let message = tokio::select! {
            _ = term.recv() => Control::Stop("SIGTERM".into()),
            _ = int.recv() => Control::Stop("SIGINT".into()),
            _ = hup.recv() => Control::Reload,
        };
        if tx.send(message).is_err() {
            return;
        }
    }
}
