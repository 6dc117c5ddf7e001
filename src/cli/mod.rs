//! Shared plumbing for commands: failures with an exit-code class, and how they are printed
//! (`error:`, `Caused by:` lines, `hint:`). stdout carries data; messages go to stderr.

mod bar;
pub mod build;
pub mod cache;
pub mod component;
pub mod distribute;
pub mod images;
pub mod pipeline;
pub mod pipeline_status;
pub mod recipe;
pub mod vm;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anstream::eprintln;
use anstyle::{AnsiColor, Style};
use builder::recipe::Accelerator;
use builder::store::{Abandoned, Store, StoreError};

/// Exit codes (STYLE.md): 0 ok, 1 build or test failed, 2 invalid input, 3 host problem,
/// 130 interrupted.
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INPUT: u8 = 2;
pub const EXIT_HOST: u8 = 3;
pub const EXIT_INTERRUPTED: u8 = 130;

/// A command that did not succeed: what happened, its class, and what the user can do.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
    pub hint: Option<String>,
    /// Already printed in full (e.g. rendered diagnostics): print nothing more.
    pub printed: bool,
}

impl Failure {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
            hint: None,
            printed: false,
        }
    }
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        Self::new(EXIT_FAILED, error)
    }
    pub fn input(error: impl Into<anyhow::Error>) -> Self {
        Self::new(EXIT_INPUT, error)
    }
    pub fn host(error: impl Into<anyhow::Error>) -> Self {
        Self::new(EXIT_HOST, error)
    }
    pub fn interrupted() -> Self {
        Self::new(EXIT_INTERRUPTED, anyhow::anyhow!("interrupted"))
    }
    /// The message was already shown to the user; exit with `code` quietly.
    pub fn already_printed(code: u8) -> Self {
        Self {
            code,
            error: anyhow::anyhow!("see above"),
            hint: None,
            printed: true,
        }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

pub type CliResult = Result<u8, Failure>;

/// The end of a command that went through several inputs and reported each failure as it came:
/// success, or the worst exit code (2 invalid, 3 host problem) without another message.
pub fn worst_of(worst: u8) -> CliResult {
    if worst == 0 {
        Ok(0)
    } else {
        Err(Failure::already_printed(worst))
    }
}

/// `value` as pretty JSON on stdout: the `--json` output of listings.
pub fn print_json(value: &impl serde::Serialize) {
    #[expect(
        clippy::expect_used,
        reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
    )]
    let text = serde_json::to_string_pretty(value).expect("plain data serializes");
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// The text output of listings: `header` then `rows`, each line after `indent`, every column
/// but the last padded to its widest cell, two spaces apart; one line each, trailing spaces
/// trimmed.
pub fn table<const N: usize>(indent: &str, header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::from(indent);
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut text = line(&header);
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        text.push_str(&line(&cells));
    }
    text
}

/// `--accel`: `auto`, `kvm` or `tcg`.
pub fn parse_accel(s: &str) -> Result<Accelerator, String> {
    Accelerator::parse_named("accelerator", s)
}

/// `--boot`: `full` or `appliance`.
pub fn parse_boot(s: &str) -> Result<builder::recipe::Boot, String> {
    builder::recipe::Boot::parse_named("boot mode", s)
}

/// The environment that `${VAR}` in recipes and pipelines reads.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Open the store (`dir`, else the default) as every command that uses it does: create its
/// folders if needed, then clean up abandoned builds (a `builder build` killed with SIGKILL,
/// a crash) and say on stderr what was cleaned. Commands with `--json` also put the returned
/// list in their output. A failed clean-up is a warning: the command goes on.
pub fn open_store(dir: Option<&Path>) -> Result<(Store, Vec<Abandoned>), Failure> {
    let store = match dir {
        Some(dir) => Store::open(dir),
        None => Store::open_default(),
    }
    .map_err(|e| {
        let hint = matches!(e, StoreError::NoHome).then(|| {
            format!(
                "set {} to the folder the store should live in",
                builder::store::STORE_ENV
            )
        });
        let failure = Failure::host(anyhow::Error::new(e).context("could not open the store"));
        match hint {
            Some(h) => failure.with_hint(h),
            None => failure,
        }
    })?;
    let abandoned = recover_abandoned(&store);
    Ok((store, abandoned))
}

/// [`Store::recover_abandoned`], reported on stderr.
pub fn recover_abandoned(store: &Store) -> Vec<Abandoned> {
    match store.recover_abandoned() {
        Ok(list) => {
            for a in &list {
                eprintln!("note: {a}");
            }
            list
        }
        Err(e) => {
            eprintln!(
                "warning: could not check {} for abandoned builds: {e}",
                store.root().display()
            );
            Vec::new()
        }
    }
}

/// A cleanup report that was not part of a command's result (a VM closed, or dropped by
/// Ctrl-C): `warning:` for what may be left, `note:` for what keep-on-failure kept.
pub fn print_unwind(report: &builder::undo::UnwindReport) {
    for w in report.warnings() {
        eprintln!("warning: {w}");
    }
    for k in &report.kept {
        eprintln!("note: {k}");
    }
}

/// Print a failure the way every command does, and turn it into the process exit code.
pub fn report(failure: &Failure) -> ExitCode {
    if !failure.printed {
        let red = Style::new().bold().fg_color(Some(AnsiColor::Red.into()));
        let cyan = Style::new().bold().fg_color(Some(AnsiColor::Cyan.into()));
        eprintln!("{red}error{red:#}: {}", failure.error);
        for cause in failure.error.chain().skip(1) {
            eprintln!("  Caused by: {cause}");
        }
        if let Some(hint) = &failure.hint {
            eprintln!("{cyan}hint{cyan:#}: {hint}");
        }
    }
    let _ = std::io::stderr().flush();
    ExitCode::from(failure.code)
}
