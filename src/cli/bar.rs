//! The one progress bar drawn on a terminal (indicatif): transfers with bytes and ETA, a
//! converting percentage, a spinner with elapsed time when there is no total. Callers draw it
//! only when stderr is a terminal; what they print on other streams stays line by line.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use anstyle::Style;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What the numbers of a bar count (what a transfer event says it counts).
pub(super) use builder::distribute::Unit;

/// At most one bar at a time, named by what it shows; a new name ends the previous bar.
#[derive(Default)]
pub(super) struct Bar {
    current: Mutex<Option<(String, ProgressBar)>>,
}

impl Bar {
    /// Draw (or advance) the bar for `what`, prefixed by `prefix` (already styled).
    pub(super) fn show(
        &self,
        what: &str,
        prefix: String,
        unit: Unit,
        done: u64,
        total: Option<u64>,
    ) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if current.as_ref().is_none_or(|(w, _)| w != what) {
            if let Some((_, old)) = current.take() {
                old.finish();
            }
            *current = Some((what.to_string(), new_bar(what, unit, total)));
        }
        if let Some((_, bar)) = current.as_ref() {
            bar.set_prefix(prefix);
            if let Some(t) = total.filter(|t| *t > 0) {
                bar.set_length(t);
            }
            bar.set_position(done);
        }
    }

    /// End the bar, if one is drawn, leaving its last state on its own line.
    pub(super) fn end(&self) -> bool {
        match self.current.lock().ok().and_then(|mut c| c.take()) {
            Some((_, bar)) => {
                bar.finish();
                true
            }
            None => false,
        }
    }
}

fn new_bar(what: &str, unit: Unit, total: Option<u64>) -> ProgressBar {
    let template = match (unit, total.filter(|t| *t > 0)) {
        (Unit::Percent, _) => "{prefix} {msg}: converting {bar:30} {percent:>3}%",
        (Unit::Bytes, Some(_)) => {
            "{prefix} {msg}: {bar:30} {bytes} of {total_bytes} ({percent:>3}%), {eta} left"
        }
        (Unit::Bytes, None) => "{prefix} {spinner} {msg}: {bytes} ({elapsed})",
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("█▉▊▋▌▍▎▏ ");
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr())
        .with_style(style)
        .with_message(what.to_string());
    if total.is_none_or(|t| t == 0) {
        bar.enable_steady_tick(Duration::from_millis(120));
    }
    bar
}

/// `style`, or no style when colour is off for stderr (NO_COLOR, not a terminal): indicatif
/// writes to the terminal itself, so anstream cannot strip what it draws.
pub(super) fn styled(style: Style) -> Style {
    if anstream::AutoStream::choice(&std::io::stderr()) == anstream::ColorChoice::Never {
        Style::new()
    } else {
        style
    }
}

/// `hashing <file>` while a plan hashes its inputs, on a terminal.
pub(super) struct Hashing {
    bar: Option<Bar>,
}

impl Hashing {
    /// A bar when stderr is a terminal and `wanted` (not under `--json`).
    pub(super) fn new(wanted: bool) -> Self {
        Self {
            bar: (wanted && std::io::stderr().is_terminal()).then(Bar::default),
        }
    }

    pub(super) fn show(&self, p: &builder::digest::Hashed<'_>) {
        if let Some(bar) = &self.bar {
            let what = p.path.display().to_string();
            bar.show(&what, "hashing".into(), Unit::Bytes, p.done, Some(p.total));
        }
    }

    pub(super) fn end(&self) {
        if let Some(bar) = &self.bar {
            bar.end();
        }
    }
}
