//! `builder pipeline status [NAME]`: the last executions of each pipeline (status, when, the
//! image, why it ran or was skipped) and its next scheduled run, from the pipeline history.
//! Reads only: it never creates a history or a store.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anstream::eprintln;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use super::{CliResult, Failure};
use builder::pipeline::history::{ExecStatus, Execution, History, ImageMark, Trigger};
use builder::pipeline::lifecycle::human_duration;
use builder::store::Store;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The pipeline's `name`; every pipeline in the history when omitted.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Print JSON on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// How many of the latest executions to show per pipeline.
    #[arg(long, default_value_t = 10, value_name = "N")]
    limit: usize,
    /// The store folder [default: $BUILDER_STORE, else $XDG_DATA_HOME/builder, else
    /// ~/.local/share/builder]. The history is `<store>/pipelines.sqlite`.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

/// One pipeline in `--json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PipelineStatus {
    pipeline: String,
    /// When the scheduler will run it next (null: not scheduled, or no scheduler ran it).
    next_run: Option<DateTime<Utc>>,
    /// Newest first.
    executions: Vec<Execution>,
    /// Lifecycle marks of its images (deprecated, deleted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<ImageMark>,
}

pub fn status(args: StatusArgs) -> CliResult {
    let root = match &args.store {
        Some(dir) => dir.clone(),
        None => Store::default_root().map_err(|e| {
            Failure::host(anyhow::Error::new(e).context("could not find the store")).with_hint(
                format!("set {} to the store folder", builder::store::STORE_ENV),
            )
        })?,
    };
    let path = root.join(builder::pipeline::history::HISTORY_FILE);
    let history = History::open_existing(&path).map_err(|e| {
        Failure::host(anyhow::Error::new(e).context("could not read the pipeline history"))
    })?;
    let Some(history) = history else {
        if let Some(name) = &args.name {
            return Err(Failure::input(anyhow::anyhow!(
                "pipeline `{name}` has never run: there is no pipeline history in {}",
                root.display()
            ))
            .with_hint(
                "`builder pipeline run FILE` runs one now; `builder serve` runs them on schedule",
            ));
        }
        if args.json {
            let _ = writeln!(std::io::stdout().lock(), "[]");
        } else {
            eprintln!("no pipeline has run yet (no history in {})", root.display());
        }
        return Ok(0);
    };
    let known = history.pipelines().map_err(history_failure)?;
    let names = match &args.name {
        Some(name) if known.contains(name) => vec![name.clone()],
        Some(name) => {
            let failure = Failure::input(anyhow::anyhow!(
                "pipeline `{name}` is not in the history {}",
                path.display()
            ));
            let close: Vec<&String> = known
                .iter()
                .filter(|k| strsim::normalized_damerau_levenshtein(k, name) >= 0.6)
                .collect();
            let hint = if let Some(best) = close.first() {
                format!("did you mean `{best}`?")
            } else if known.is_empty() {
                "no pipeline has run yet".to_string()
            } else {
                format!("pipelines with a history: {}", join(&known))
            };
            return Err(failure.with_hint(hint));
        }
        None => known,
    };
    let mut all = Vec::new();
    for name in names {
        let marks = history.marks(Some(&name)).map_err(history_failure)?;
        all.push(PipelineStatus {
            next_run: history.next_run(&name).map_err(history_failure)?,
            executions: history
                .executions(Some(&name), args.limit)
                .map_err(history_failure)?,
            images: marks,
            pipeline: name,
        });
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        super::print_json(&all);
        return Ok(0);
    }
    if all.is_empty() {
        eprintln!("no pipeline has run yet ({})", path.display());
        return Ok(0);
    }
    let now = Utc::now();
    for (i, p) in all.iter().enumerate() {
        if i > 0 {
            let _ = writeln!(out);
        }
        let _ = write!(out, "{}", render(p, now));
    }
    Ok(0)
}

fn history_failure(e: builder::pipeline::history::HistoryError) -> Failure {
    Failure::host(anyhow::Error::new(e).context("could not read the pipeline history"))
}

fn join(names: &[String]) -> String {
    names.join(", ")
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

/// One pipeline as text: a heading with the next run, then a table of executions.
fn render(p: &PipelineStatus, now: DateTime<Utc>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let next = match p.next_run {
        Some(t) if t >= now => format!("next run {} UTC (in {})", when(t), human_duration(t - now)),
        Some(t) => format!(
            "next run {} UTC (due {} ago; runs when `builder serve` is running)",
            when(t),
            human_duration(now - t)
        ),
        None => "no scheduled run".to_string(),
    };
    let _ = writeln!(s, "{}: {next}", p.pipeline);
    if p.executions.is_empty() {
        let _ = writeln!(s, "  no executions yet");
        return s;
    }
    let marks: BTreeMap<&str, &ImageMark> =
        p.images.iter().map(|m| (m.image.as_str(), m)).collect();
    let header = ["ID", "STATUS", "TRIGGER", "CREATED", "TOOK", "IMAGE", "WHY"];
    let rows: Vec<[String; 7]> = p
        .executions
        .iter()
        .map(|e| {
            let status = match (&e.status, e.runner.as_ref().and_then(|r| r.is_alive())) {
                (s, Some(false)) if !s.is_terminal() => format!("{s} (runner gone)"),
                (s, _) => s.to_string(),
            };
            let trigger = match e.trigger {
                Trigger::Manual => "manual".to_string(),
                Trigger::Schedule { due } => format!("schedule {}", when(due)),
            };
            let took = match (e.started, e.finished) {
                (Some(a), Some(b)) => human_duration(b - a),
                (Some(a), None) => format!("{} so far", human_duration(now - a)),
                _ => "-".to_string(),
            };
            let image = match &e.image {
                Some(img) => match marks.get(img.as_str()) {
                    Some(m) if m.deleted_at.is_some() => format!("{img} (deleted)"),
                    Some(m) if m.deprecated_at.is_some() => format!("{img} (deprecated)"),
                    _ => img.clone(),
                },
                None => "-".to_string(),
            };
            let why = match (&e.status, &e.error) {
                (ExecStatus::Failed | ExecStatus::Cancelled, Some(err)) => {
                    format!("{}: {}", e.reason, one_line(err))
                }
                // A run that began and then found nothing to build records why it skipped as
                // its error; that is the interesting part.
                (ExecStatus::Skipped, Some(why)) => one_line(why),
                _ => one_line(&e.reason),
            };
            [
                e.id.to_string(),
                status,
                trigger,
                when(e.created),
                took,
                image,
                why,
            ]
        })
        .collect();
    s.push_str(&super::table("  ", header, &rows));
    s
}

/// The first line of a message, for a table cell.
fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    if text.lines().nth(1).is_some() {
        format!("{first} …")
    } else {
        first.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use builder::pipeline::history::{ExecutionId, Transition};

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("test time")
    }

    fn execution(id: i64, status: ExecStatus, reason: &str) -> Execution {
        Execution {
            id: ExecutionId(id),
            pipeline: "weekly".into(),
            trigger: Trigger::Schedule {
                due: t("2026-11-16T03:00:00Z"),
            },
            reason: reason.into(),
            status,
            created: t("2026-11-16T03:00:01Z"),
            started: Some(t("2026-11-16T03:00:02Z")),
            finished: Some(t("2026-11-16T03:14:05Z")),
            image: None,
            build_id: None,
            manifest: None,
            logs: None,
            error: None,
            inputs: None,
            runner: None,
            transitions: vec![Transition {
                status,
                at: t("2026-11-16T03:14:05Z"),
                detail: None,
            }],
        }
    }

    #[test]
    fn a_pipeline_reads_as_a_table_with_its_next_run() {
        let mut built = execution(2, ExecStatus::Available, "the parent image changed");
        built.image = Some("web/1.0.0/3".into());
        let mut failed = execution(1, ExecStatus::Failed, "first run");
        failed.error = Some("component `x` failed\nmore".into());
        let mut skipped = execution(3, ExecStatus::Skipped, "the schedule is due");
        skipped.error = Some("nothing changed since execution 2".into());
        let p = PipelineStatus {
            pipeline: "weekly".into(),
            next_run: Some(t("2026-11-23T03:00:00Z")),
            executions: vec![skipped, built, failed],
            images: vec![ImageMark {
                image: "web/1.0.0/3".into(),
                pipeline: "weekly".into(),
                deprecated_at: Some(t("2026-11-20T00:00:00Z")),
                deleted_at: None,
                detail: None,
            }],
        };
        let text = render(&p, t("2026-11-21T13:00:00Z"));
        let expected = "\
weekly: next run 2026-11-23 03:00 UTC (in 1d 14h)
  ID  STATUS     TRIGGER                    CREATED           TOOK  IMAGE                     WHY
  3   skipped    schedule 2026-11-16 03:00  2026-11-16 03:00  14m   -                         nothing changed since execution 2
  2   available  schedule 2026-11-16 03:00  2026-11-16 03:00  14m   web/1.0.0/3 (deprecated)  the parent image changed
  1   failed     schedule 2026-11-16 03:00  2026-11-16 03:00  14m   -                         first run: component `x` failed …
";
        assert_eq!(text, expected);
    }
}
