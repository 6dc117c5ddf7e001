//! `builder build recipe.yml`: validate, plan, then run the build's stages (see
//! `builder::build`). Progress and messages go to stderr; stdout carries data: the paths of
//! the outputs, one per line, or with `--json` one event per line (stage, step, output,
//! result) for CI.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anstream::eprintln;
use anstyle::{AnsiColor, Style};
use clap::{Args, ValueEnum};

use super::component::run::Terminal;
use super::{CliResult, EXIT_FAILED, EXIT_HOST, EXIT_INPUT, Failure, env, parse_accel, parse_boot};
use builder::build::plan;
use builder::build::{
    self as build, BuildError, BuildEvent, BuildObserver, BuildOptions, ComponentFailure,
    FailureShell,
};
use builder::component::executor::{Event, Observer};
use builder::digest::Hashed;
use builder::recipe::{Accelerator, Boot, OciReference};
use builder::vm::ErrorClass;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe (YAML). It is validated with every file it names before anything starts.
    #[arg(value_name = "RECIPE")]
    recipe: PathBuf,
    /// When the build fails, keep the build's disk chain and logs (and the test VM's disk)
    /// and print where they are and how to remove them. Same as `--on-error keep`.
    #[arg(long)]
    keep_on_failure: bool,
    /// What to do when a stage fails: `abort` removes everything but the logs, `keep` keeps
    /// the disk too, `shell` (when a component step fails) opens a shell in the still-running
    /// build VM, then fails the build as `abort` does (or `keep` with `--keep-on-failure`)
    /// once you exit it. `shell` needs a terminal on stdin.
    #[arg(long, value_enum, default_value_t = OnError::Abort)]
    on_error: OnError,
    /// Print one JSON object per line on stdout: build and stage events, step events and
    /// output, the result last.
    #[arg(long)]
    json: bool,
    /// The store folder [default: $BUILDER_STORE, else $XDG_DATA_HOME/builder, else
    /// ~/.local/share/builder].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Override the recipe's accelerator: `auto`, `kvm` or `tcg`.
    #[arg(long, value_parser = parse_accel)]
    accel: Option<Accelerator>,
    /// Override the recipe's `infrastructure.boot`: `full` or `appliance` (the build VM's; the
    /// test stage always boots full). Part of the layer keys, as the recipe's setting is.
    #[arg(long, value_parser = parse_boot)]
    boot: Option<Boot>,
    /// Accept a `parentImage: oci://host/repo:tag` without `@sha256:…`: ask the registry what
    /// the tag points to now and pin that manifest digest for this build (printed, and kept in
    /// the plan and the manifest). Without it such a parent is refused.
    #[arg(long)]
    resolve_tags: bool,
    /// Take no layer from the layer cache: every component runs, and each new layer replaces
    /// the cached one of its key (the cache is refreshed). See "The layer cache" in the README.
    #[arg(long)]
    no_cache: bool,
    /// A shared layer cache (`oci://registry[:port]/repository`) to pull the layers the local
    /// cache lacks from, before the build VM boots; repeat it to try several in order.
    /// Replaces the recipe's `cache.from`.
    #[arg(long, value_name = "REF", value_parser = parse_cache_repository)]
    cache_from: Vec<OciReference>,
    /// A shared layer cache (`oci://registry[:port]/repository`) to push the build's layers
    /// to once the image is stored. Replaces the recipe's `cache.to`.
    #[arg(long, value_name = "REF", value_parser = parse_cache_repository)]
    cache_to: Option<OciReference>,
}

fn parse_cache_repository(s: &str) -> Result<OciReference, String> {
    OciReference::parse_repository(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnError {
    Abort,
    Keep,
    Shell,
}

pub async fn main(args: BuildArgs) -> CliResult {
    // Refused before anything starts: a shell without a terminal would hang or read EOF, and
    // the JSON lines on stdout would mix with the shell's output.
    if args.on_error == OnError::Shell {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::input(anyhow::anyhow!(
                "`--on-error shell` needs a terminal on stdin to open a shell in the build VM"
            ))
            .with_hint("use `--on-error keep` in scripts and CI; open the kept disk later with `builder vm shell --image <file>`"));
        }
        if args.json {
            return Err(Failure::input(anyhow::anyhow!(
                "`--on-error shell` cannot be combined with `--json` (stdout carries the events)"
            )));
        }
    }
    let (store, abandoned) = super::open_store(args.store.as_deref())?;
    if args.json {
        // What opening the store cleaned up, before the build's own events.
        for a in &abandoned {
            JsonLines::line(serde_json::to_string(&AbandonedEvent {
                event: "abandonedBuildCleaned",
                abandoned: a,
            }));
        }
    }

    // 1. Validate (every problem of every file, nothing started), then pin the inputs.
    let validated = plan::validate(&args.recipe, &env).map_err(super::recipe::failure)?;
    super::recipe::show(&validated.warnings);
    let hashing = super::bar::Hashing::new(!args.json);
    let mut progress = |p: Hashed<'_>| hashing.show(&p);
    let planned = if args.resolve_tags {
        plan::plan(validated, &plan::ResolveTags(&store), &env, &mut progress)
    } else {
        plan::plan(validated, &store, &env, &mut progress)
    };
    hashing.end();
    let mut plan = planned.map_err(super::recipe::failure)?;
    super::recipe::show_resolved_tag(&plan);
    if let Some(boot) = args.boot
        && boot != plan.infrastructure.boot
    {
        // As a pipeline's setting would: the boot layer, and so every layer, changes key.
        plan.infrastructure.boot = boot;
        plan.set_layer_keys();
    }
    // Where layers are shared is in no key: the flags replace the recipe's after planning.
    if !args.cache_from.is_empty() {
        plan.shared_cache.from = args.cache_from.clone();
    }
    if let Some(to) = &args.cache_to {
        plan.shared_cache.to = Some(to.clone());
    }

    let on_failure: Option<std::sync::Arc<dyn FailureShell>> = (args.on_error == OnError::Shell)
        .then(|| {
            std::sync::Arc::new(Shell {
                keep: args.keep_on_failure,
            }) as _
        });
    let options = BuildOptions {
        keep_on_failure: args.keep_on_failure || args.on_error == OnError::Keep,
        accel: args.accel,
        qemu: None,
        no_cache: args.no_cache,
        on_failure,
        leftovers: Default::default(),
    };
    let observer: Box<dyn BuildObserver> = if args.json {
        Box::new(JsonLines)
    } else {
        Box::new(Progress::new())
    };

    let started = Instant::now();
    let result = tokio::select! {
        // Boxed: the build's future is deep (VM and container stages) for rustc's layout
        // query of this one.
        r = Box::pin(build::build(&plan, &store, &options, observer.as_ref())) => r,
        sig = super::vm::interrupted() => {
            // Dropping the build future ran every undo (VM stopped, files removed) and moved
            // the logs to the store's failed/ area.
            super::print_unwind(&options.leftovers.take());
            eprintln!("{sig}: the build was stopped; its VM and files were removed (logs kept in {}/failed/)", store.root().display());
            return Err(Failure::interrupted());
        }
    };
    match result {
        Ok(built) => {
            for w in &built.warnings {
                eprintln!("warning: {w}");
            }
            let green = Style::new().bold().fg_color(Some(AnsiColor::Green.into()));
            eprintln!(
                "{green}built{green:#} {} in {:.0} s",
                built.image.reference(),
                started.elapsed().as_secs_f64()
            );
            eprintln!("  folder  {}", built.image.dir.display());
            for o in built.outputs.iter().chain(&built.copies) {
                eprintln!("  output  {}", o.display());
            }
            for r in &built.receipts {
                eprintln!("  sent    {} {}", r.kind, r.location);
            }
            if !args.json {
                let mut out = std::io::stdout().lock();
                for o in &built.outputs {
                    let _ = writeln!(out, "{}", o.display());
                }
            }
            // The build's layers are no longer in use: the cache goes back under its cap.
            super::cache::prune_after_build(&store);
            if built.distribution_failures.is_empty() {
                return Ok(0);
            }
            // The image built fine and is stored; a target did not get it.
            let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
            for (target, error) in &built.distribution_failures {
                eprintln!(
                    "{red}error{red:#}: distributing {} to {target} failed",
                    built.image.reference()
                );
                eprintln!("  Caused by: {}", indent(error));
            }
            eprintln!(
                "{}hint{}: the image is stored; retry with `builder distribute {} --to …`",
                note(),
                note().render_reset(),
                built.image.reference()
            );
            Err(Failure::already_printed(EXIT_FAILED))
        }
        Err(failed) => {
            print_failure(&failed, options.keep_on_failure);
            let code = match failed.class() {
                ErrorClass::Input => EXIT_INPUT,
                ErrorClass::Host => EXIT_HOST,
                ErrorClass::Failed => EXIT_FAILED,
            };
            Err(Failure::already_printed(code))
        }
    }
}

fn note() -> Style {
    Style::new().bold().fg_color(Some(AnsiColor::Cyan.into()))
}

/// `--on-error shell`: say what failed, then a shell in the build VM until the user exits it.
#[derive(Debug)]
struct Shell {
    keep: bool,
}

#[async_trait::async_trait]
impl FailureShell for Shell {
    async fn open(
        &self,
        failure: &ComponentFailure,
        vm: &str,
        agent: std::sync::Arc<builder::machine::agent::AgentMachine>,
    ) {
        let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
        let cyan = note();
        eprintln!("{red}error{red:#}: {}", failure.heading());
        print_step_failure(failure);
        let then = if self.keep {
            "the build then fails and keeps its disk and logs (--keep-on-failure)"
        } else {
            "the build then fails and removes its VM and disk (logs are kept)"
        };
        eprintln!(
            "{cyan}note{cyan:#}: opening a shell in {vm} (as root, in the state the step left); exit it when done: {then}"
        );
        let _ = std::io::stderr().flush();
        // The shell prints to stderr, the terminal the messages go to: stdout carries only
        // the output paths (`builder build … > paths` must not capture the session).
        if let Err(e) =
            super::vm::interactive_shell(&agent, true, "shell ready", &super::vm::AllToStderr).await
        {
            eprintln!("warning: the shell ended: {:#}", e.error);
        }
        eprintln!("{cyan}note{cyan:#}: shell closed; failing the build");
    }
}

/// The failed step's cause, last lines of output, log and reports.
fn print_step_failure(f: &ComponentFailure) {
    let dim = Style::new().dimmed();
    eprintln!("  Caused by: {}", indent(&f.cause));
    if !f.last_lines.is_empty() {
        eprintln!("  last lines of output:");
        for l in &f.last_lines {
            eprintln!("    {dim}│{dim:#} {l}");
        }
    }
    if let Some(log) = &f.log {
        eprintln!("  full log: {}", log.display());
    }
    if let Some(run) = &f.run_log {
        eprintln!(
            "  step reports: {}",
            run.join("detailedoutput.json").display()
        );
    }
}

/// The STYLE.md error: heading, causes, the failed step's last lines and log, where the
/// build's logs are, what was kept, a hint.
fn print_failure(failed: &build::Failed, keep: bool) {
    let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
    let cyan = note();
    eprintln!("{red}error{red:#}: {}", failed.error);
    for s in builder::diagnostic::causes(&failed.error) {
        eprintln!("  Caused by: {}", indent(&s.to_string()));
    }
    if let BuildError::Component(f) = &failed.error {
        print_step_failure(f);
    }
    if let Some(image) = &failed.image {
        eprintln!("  build: {image}");
    }
    if let Some(logs) = &failed.logs {
        eprintln!("  logs: {}", logs.display());
    }
    for w in failed.unwind.warnings() {
        eprintln!("warning: {w}");
    }
    for k in &failed.unwind.kept {
        eprintln!("{cyan}note{cyan:#}: {k}");
    }
    // With `--keep-on-failure` the usual hint (to rerun with it) is not needed; the
    // appliance's is.
    let hint = failed.error.hint().filter(|_| {
        !keep
            || !matches!(
                &failed.error,
                BuildError::Component(f) if !f.no_service_manager
            ) && !matches!(
                failed.error,
                BuildError::Generalize(_) | BuildError::DiskNotGrown { .. }
            )
    });
    if let Some(h) = hint {
        eprintln!("{cyan}hint{cyan:#}: {h}");
    }
    let _ = std::io::stderr().flush();
}

fn indent(text: &str) -> String {
    text.replace('\n', "\n    ")
}

/// Stages with elapsed time, progress lines, bars, and the executor's step lines, on stderr.
pub(super) struct Progress {
    start: Instant,
    steps: Terminal,
    tty: bool,
    /// The transfer a bar is being drawn for (on a terminal).
    bar: super::bar::Bar,
}

impl Progress {
    pub(super) fn new() -> Self {
        Self {
            start: Instant::now(),
            steps: Terminal,
            tty: std::io::stderr().is_terminal(),
            bar: super::bar::Bar::default(),
        }
    }

    fn clock(&self) -> String {
        let s = self.start.elapsed().as_secs();
        format!("{:>2}:{:02}", s / 60, s % 60)
    }

    fn end_bar(&self) {
        self.bar.end();
    }
}

impl Observer for Progress {
    fn event(&self, event: &Event<'_>) {
        self.end_bar();
        self.steps.event(event);
    }
}

impl BuildObserver for Progress {
    fn build_event(&self, event: &BuildEvent<'_>) {
        let bold = Style::new().bold();
        let dim = Style::new().dimmed();
        let green = Style::new().fg_color(Some(AnsiColor::Green.into()));
        let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
        if !matches!(event, BuildEvent::Transfer { .. }) {
            self.end_bar();
        }
        match event {
            BuildEvent::BuildStarted {
                image,
                plan_digest,
                logs,
                ..
            } => {
                eprintln!(
                    "{bold}building {image}{bold:#} {dim}(plan {}){dim:#}",
                    &plan_digest[..12.min(plan_digest.len())]
                );
                eprintln!("{dim}logs: {}{dim:#}", logs.display());
            }
            BuildEvent::StageStarted { stage, detail } => {
                let detail = detail.map(|d| format!(" {d}")).unwrap_or_default();
                eprintln!(
                    "{dim}[{}]{dim:#} {bold}▶ {stage}{detail}{bold:#}",
                    self.clock()
                );
            }
            BuildEvent::StageFinished {
                stage,
                detail,
                status,
                duration_ms,
            } => {
                let detail = detail.map(|d| format!(" {d}")).unwrap_or_default();
                let (mark, style) = match *status {
                    "success" => ("✓", green),
                    "skipped" => ("↷", dim),
                    "cached" => ("↺", dim),
                    _ => ("✗", red),
                };
                eprintln!(
                    "{dim}[{}]{dim:#} {style}{mark} {stage}{detail} {status}{style:#} {dim}{:.1} s{dim:#}",
                    self.clock(),
                    *duration_ms as f64 / 1000.0
                );
            }
            BuildEvent::Progress { stage, message } => {
                eprintln!("{dim}[{}]   {stage}:{dim:#} {message}", self.clock());
            }
            BuildEvent::Transfer {
                stage,
                what,
                done,
                total,
                unit,
            } => {
                if self.tty {
                    let dim = super::bar::styled(dim);
                    let prefix = format!("{dim}[{}]   {stage}:{dim:#}", self.clock());
                    self.bar.show(what, prefix, *unit, *done, *total);
                    return;
                }
                let text = match total {
                    _ if *unit == super::bar::Unit::Percent => {
                        format!("{what}: converting {done:>3}%")
                    }
                    Some(t) if *t > 0 => format!(
                        "{what}: {} of {} ({:>3}%)",
                        builder::recipe::ByteSize::b(*done),
                        builder::recipe::ByteSize::b(*t),
                        done * 100 / t
                    ),
                    _ => format!("{what}: {}", builder::recipe::ByteSize::b(*done)),
                };
                if total.is_some_and(|t| *done == t || (t == 100 && done % 25 == 0)) {
                    eprintln!("{dim}[{}]   {stage}:{dim:#} {text}", self.clock());
                }
            }
            BuildEvent::LayerCommitted { layer, key, file } => {
                let key = key
                    .map(|k| format!(", key {}", &k[..16.min(k.len())]))
                    .unwrap_or_default();
                eprintln!(
                    "{dim}[{}]   layer:{dim:#} {layer} committed to {}{dim}{key}{dim:#}",
                    self.clock(),
                    file.display()
                );
            }
            BuildEvent::LayerCache {
                layer,
                key,
                status,
                from,
                build,
                reason,
            } => {
                let short = &key[..12.min(key.len())];
                let why = match (*status, reason, build, from) {
                    ("cached", _, Some(b), Some(f)) if *f != "local" => {
                        format!(" (made by {b}, from {f})")
                    }
                    ("cached", _, Some(b), _) => format!(" (made by {b})"),
                    (_, Some(r), _, _) => format!(" ({r})"),
                    _ => String::new(),
                };
                let style = if *status == "cached" { green } else { bold };
                eprintln!(
                    "{dim}[{}]   cache:{dim:#} {layer}  {style}{status}{style:#}  {dim}layer {short}{why}{dim:#}",
                    self.clock()
                );
            }
            BuildEvent::BuildFinished { .. } => {}
        }
    }
}

/// One JSON object per line on stdout.
pub(super) struct JsonLines;

/// `--json`: an abandoned build that opening the store cleaned up.
#[derive(serde::Serialize)]
struct AbandonedEvent<'a> {
    event: &'static str,
    #[serde(flatten)]
    abandoned: &'a builder::store::Abandoned,
}

impl JsonLines {
    fn line(json: serde_json::Result<String>) {
        if let Ok(line) = json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

impl Observer for JsonLines {
    fn event(&self, event: &Event<'_>) {
        Self::line(serde_json::to_string(event));
    }
}

impl BuildObserver for JsonLines {
    fn build_event(&self, event: &BuildEvent<'_>) {
        Self::line(serde_json::to_string(event));
    }
}
