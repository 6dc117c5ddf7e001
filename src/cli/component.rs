//! `builder component validate|run`.

use std::io::Write as _;
use std::path::PathBuf;

use anstream::{eprint, eprintln};
use clap::{Args, Subcommand};
use serde::Serialize;

pub(crate) mod run;

use super::{CliResult, EXIT_INPUT, Failure};
use builder::component::parse;
use builder::diagnostic::Severity;

#[derive(Debug, Subcommand)]
pub enum ComponentCommand {
    /// Check component documents without running anything: every problem of every document,
    /// each at its file:line:col with a hint.
    Validate(ValidateArgs),
    /// Run component documents on this machine, like `awstoe run`: phases in document order,
    /// logs in a `TOE_*` folder, the summary JSON on stdout.
    Run(Box<run::RunArgs>),
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Component documents (YAML) to validate.
    #[arg(required = true, value_name = "DOCUMENT")]
    documents: Vec<PathBuf>,
    /// Print the results as a JSON array on stdout (path, valid, problems) instead of messages.
    #[arg(long)]
    json: bool,
}

pub async fn main(command: ComponentCommand) -> CliResult {
    match command {
        ComponentCommand::Validate(args) => validate(args),
        ComponentCommand::Run(args) => run::run(*args).await,
    }
}

#[derive(Serialize)]
struct JsonResult {
    path: PathBuf,
    valid: bool,
    problems: Vec<JsonProblem>,
}

#[derive(Serialize)]
struct JsonProblem {
    /// 1-based; absent when the file could not be read.
    line: Option<usize>,
    col: Option<usize>,
    severity: Severity,
    message: String,
    hint: Option<String>,
}

fn validate(args: ValidateArgs) -> CliResult {
    let mut all_valid = true;
    let mut results = Vec::new();
    for path in &args.documents {
        let text = match fs_err::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                all_valid = false;
                if args.json {
                    results.push(JsonResult {
                        path: path.clone(),
                        valid: false,
                        problems: vec![JsonProblem {
                            line: None,
                            col: None,
                            severity: Severity::Error,
                            message: format!("could not read the file: {e}"),
                            hint: None,
                        }],
                    });
                } else {
                    super::report(&Failure::input(
                        anyhow::Error::new(e).context("could not read the component document"),
                    ));
                }
                continue;
            }
        };
        let checked = parse::check(path, &text);
        let valid = checked.document.is_some();
        all_valid &= valid;
        if args.json {
            results.push(JsonResult {
                path: path.clone(),
                valid,
                problems: checked
                    .diagnostics
                    .problems()
                    .iter()
                    .map(|p| JsonProblem {
                        line: Some(p.span.line),
                        col: Some(p.span.col),
                        severity: p.severity,
                        message: p.message.clone(),
                        hint: p.hint.clone(),
                    })
                    .collect(),
            });
            continue;
        }
        // Rendered with colour; anstream strips it when stderr is not a terminal or NO_COLOR
        // is set.
        eprint!("{}", checked.diagnostics.render(true));
        if let Some(document) = &checked.document {
            let steps: usize = document.phases.iter().map(|p| p.steps.len()).sum();
            eprintln!(
                "ok: {} ({} phase{}, {steps} step{})",
                path.display(),
                document.phases.len(),
                if document.phases.len() == 1 { "" } else { "s" },
                if steps == 1 { "" } else { "s" },
            );
        }
    }
    if args.json {
        let json = serde_json::to_string_pretty(&results)
            .map_err(|e| Failure::failed(anyhow::Error::new(e).context("could not write JSON")))?;
        // A closed pipe (`| head`) is not an error worth a panic: the reader has what it wants.
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, "{json}").and_then(|()| stdout.flush())
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(Failure::failed(
                anyhow::Error::new(e).context("could not write to stdout"),
            ));
        }
    }
    if all_valid {
        Ok(0)
    } else {
        Err(Failure::already_printed(EXIT_INPUT))
    }
}
