//! Pipeline files → the typed [`Pipeline`], every problem at `file:line:col` (never stop at
//! the first). [`check`] is pure (it reads its arguments only); [`validate`] also reads the
//! recipe the pipeline names and every file the recipe names, as `builder validate` does.
//!
//! A pipeline file, with every key:
//!
//! ```yaml
//! name: weekly-web
//! description: Debian 12 web image, rebuilt every Monday with the latest patches
//! recipe: ../debian-12-web/recipe.yml          # relative to this file
//! infrastructure: {cpus: 4, memory: 4GiB}      # replaces these keys of the recipe's
//! distribution:                               # replaces the recipe's list (same entries)
//!   - directory: {path: ../../out/weekly/}    # relative to this file
//! cache: {from: oci://registry.lab:5000/cache/web, to: oci://registry.lab:5000/cache/web}
//! tests: {enabled: true, timeoutSeconds: 1800}
//! schedule:
//!   expression: "0 3 * * 1"                    # or Image Builder's "cron(0 3 ? * MON *)"
//!   timezone: Europe/Paris                     # default UTC
//!   startCondition: dependencyChanged          # or always
//! lifecycle: {keepLast: 4, maxAge: 30d, deprecateFor: 7d}
//! notifications:
//!   on: [available, failed]
//!   webhook: {url: "https://hooks.example/builder", headers: {Authorization: Bearer x}}
//!   command: [/usr/local/bin/notify-team]
//! status: enabled
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::model::{
    DEFAULT_NOTIFY_ON, ExecStatus, Lifecycle, Notifications, OnCheckFailure, Override, Pipeline,
    PipelineSource, Schedule, StartCondition, Webhook,
};
use super::schedule::{CronExpr, close_zone, parse_zone};
use crate::build::plan;
use crate::diagnostic::{Diagnostics, Problem, Span, close_file_hint};
use crate::recipe::settings::{Scope, pipeline_keys, scope_of};
use crate::recipe::{DirectoryFormats, Distribution, Located, Recipe};
use crate::yaml::Node;

/// The noun used in diagnostics headings.
pub const NOUN: &str = "pipeline";
/// What an invalid pipeline means for every command that reads one.
pub const CONSEQUENCE: &str = "nothing was started";

pub const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "recipe",
    "infrastructure",
    "distribution",
    "cache",
    "tests",
    "schedule",
    "lifecycle",
    "notifications",
    "status",
];
const SCHEDULE_KEYS: &[&str] = &[
    "expression",
    "timezone",
    "startCondition",
    "packageUpdates",
    "onCheckFailure",
];
const LIFECYCLE_KEYS: &[&str] = &["keepLast", "maxAge", "deprecateFor", "remote"];
const NOTIFICATION_KEYS: &[&str] = &["on", "webhook", "command"];
const WEBHOOK_KEYS: &[&str] = &["url", "headers"];

/// Image Builder's spelling of a setting → how to write it here.
const IMAGE_BUILDER_KEYS: crate::yaml::reader::ImageBuilderKeys = &[
    (
        "imageRecipeArn",
        "name the recipe file with `recipe: path/to/recipe.yml`",
    ),
    (
        "containerRecipeArn",
        "name the recipe file with `recipe: path/to/recipe.yml`",
    ),
    (
        "infrastructureConfigurationArn",
        "write the settings under `infrastructure:` (`cpus`, `memory`, …)",
    ),
    (
        "distributionConfigurationArn",
        "write the targets under `distribution:` (`- directory: {path: …}`, …)",
    ),
    ("imageTestsConfiguration", "use `tests: {enabled: true}`"),
    ("imageTestsEnabled", "write `enabled: true`"),
    ("timeoutMinutes", "write `timeoutSeconds`"),
    ("scheduleExpression", "write `expression:`"),
    ("pipelineExecutionStartCondition", "write `startCondition:`"),
    (
        "autoDisablePolicy",
        "not supported; a failing pipeline keeps its schedule",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The pipeline file cannot be read; the io error names it.
    #[error("could not read the pipeline")]
    Unreadable(#[source] std::io::Error),
    /// The pipeline (or its recipe, or a file the recipe names) is not valid: the diagnostics
    /// of each file with problems, the pipeline's first.
    #[error("{}", crate::recipe::render(.0))]
    Invalid(Vec<Diagnostics>),
    /// Reading the recipe's inputs failed (a host problem).
    #[error("could not read the recipe of the pipeline")]
    Recipe(#[source] plan::PlanError),
}

/// The outcome of reading a pipeline file: the pipeline when it has no error, and its
/// diagnostics (warnings included).
#[derive(Debug)]
pub struct Checked {
    pub pipeline: Option<Pipeline>,
    pub diagnostics: Diagnostics,
}

/// A pipeline and its recipe, read and checked together.
#[derive(Debug, Clone)]
pub struct Validated {
    pub pipeline: Pipeline,
    pub recipe: plan::Validated,
    /// Warnings of files that are valid.
    pub warnings: Vec<Diagnostics>,
}

/// Validate `text` as the pipeline file at `path`. `now` is when a schedule must still
/// match a time (an expression for a year in the past never does).
pub fn check(path: &Path, text: &str, now: DateTime<Utc>) -> Checked {
    let mut diagnostics = Diagnostics::new(path, text, NOUN).with_consequence(CONSEQUENCE);
    let (root, problems) = crate::yaml::parse(text);
    let yaml_failed = root.is_none() && !problems.is_empty();
    diagnostics.extend(problems);
    let mut cx = PipelineReader {
        walk: crate::yaml::reader::Reader::new(text, IMAGE_BUILDER_KEYS),
        now,
    };
    let pipeline = match &root {
        Some(root) => pipeline(&mut cx, root, path, text),
        None => {
            if !yaml_failed {
                cx.problems.push(
                    Problem::error(
                        Span::from_offsets(text, 0, 0),
                        "the file holds no YAML document",
                    )
                    .with_hint("a pipeline needs at least `name` and `recipe`"),
                );
            }
            None
        }
    };
    diagnostics.extend(cx.walk.problems);
    diagnostics.sort();
    let pipeline = pipeline.filter(|_| !diagnostics.has_errors());
    Checked {
        pipeline,
        diagnostics,
    }
}

/// Read the pipeline file at `path` (only it).
pub fn load(path: &Path, now: DateTime<Utc>) -> Result<Pipeline, ParseError> {
    let text = fs_err::read_to_string(path).map_err(ParseError::Unreadable)?;
    let checked = check(path, &text, now);
    checked
        .pipeline
        .ok_or_else(|| ParseError::Invalid(vec![checked.diagnostics]))
}

/// Read the pipeline at `path` and validate the recipe it names with every file the recipe
/// names. Every problem of every file is collected, the pipeline's first.
pub fn validate(
    path: &Path,
    now: DateTime<Utc>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Validated, ParseError> {
    let text = fs_err::read_to_string(path).map_err(ParseError::Unreadable)?;
    let Checked {
        pipeline,
        mut diagnostics,
    } = check(path, &text, now);
    let Some(pipeline) = pipeline else {
        return Err(ParseError::Invalid(vec![diagnostics]));
    };
    let recipe_path = &pipeline.recipe.value;
    if !recipe_path.is_file() {
        let hint = close_file_hint(recipe_path)
            .unwrap_or_else(|| "the path is relative to the pipeline file's directory".into());
        diagnostics.push(
            Problem::error(
                pipeline.recipe.span,
                format!(
                    "recipe `{}` cannot be read: no such file",
                    recipe_path.display()
                ),
            )
            .with_hint(hint),
        );
        return Err(ParseError::Invalid(vec![diagnostics]));
    }
    match plan::validate(recipe_path, env) {
        Ok(recipe) => {
            let kind_problems = for_the_recipe_kind(&pipeline, &recipe.recipe);
            if !kind_problems.is_empty() {
                diagnostics.extend(kind_problems);
                return Err(ParseError::Invalid(vec![diagnostics]));
            }
            let mut warnings = Vec::new();
            if !diagnostics.is_empty() {
                warnings.push(diagnostics);
            }
            warnings.extend(recipe.warnings.iter().cloned());
            Ok(Validated {
                pipeline,
                recipe,
                warnings,
            })
        }
        Err(plan::PlanError::Invalid(files)) => {
            let mut all = Vec::new();
            if !diagnostics.is_empty() {
                all.push(diagnostics);
            }
            all.extend(files);
            Err(ParseError::Invalid(all))
        }
        Err(e) => Err(ParseError::Recipe(e)),
    }
}

/// The shared walker context (with the pipeline's table of Image Builder spellings) and the
/// time a schedule must still match.
struct PipelineReader<'s> {
    walk: crate::yaml::reader::Reader<'s>,
    now: DateTime<Utc>,
}

impl<'s> std::ops::Deref for PipelineReader<'s> {
    type Target = crate::yaml::reader::Reader<'s>;
    fn deref(&self) -> &Self::Target {
        &self.walk
    }
}

impl std::ops::DerefMut for PipelineReader<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.walk
    }
}

impl PipelineReader<'_> {
    fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
        let text = self.string(node, what)?;
        match parse_duration(&text) {
            Some(d) => Some(d),
            None => {
                self.error(
                    node.span,
                    format!("{what} `{text}` is not a duration"),
                    Some(DURATION_HINT.into()),
                );
                None
            }
        }
    }
}

/// How to write a duration, for the messages about one that is not.
pub const DURATION_HINT: &str = "write a number and a unit: `30d`, `12h`, `2w`, `90m` or `0s`";

/// `30d`, `12h`, `2w`, `90m`, `45s`.
/// What the pipeline sets that its recipe's kind cannot take: machine-only `infrastructure`
/// keys (see `recipe::settings::Scope`) and distribution targets or formats of the other kind.
/// The pipeline's reader cannot know (it reads the pipeline before its recipe).
fn for_the_recipe_kind(pipeline: &Pipeline, recipe: &Recipe) -> Vec<Problem> {
    let mut problems = Vec::new();
    let recipe_name = pipeline.recipe.value.display();
    if recipe.is_container() {
        for (key, span) in pipeline
            .infrastructure
            .keys
            .iter()
            .zip(&pipeline.infrastructure.spans)
        {
            if let Scope::Machine(hint) = scope_of(&format!("infrastructure.{key}")) {
                problems.push(
                    Problem::error(
                        *span,
                        format!(
                            "`infrastructure.{key}` is a machine recipe's setting, and `{recipe_name}` is a container recipe"
                        ),
                    )
                    .with_hint(format!("remove it from the pipeline; {hint}")),
                );
            }
        }
    }
    for target in pipeline.distribution.iter().flatten() {
        let wrong = match (&target.value, recipe.is_container()) {
            (
                Distribution::Vagrant(_) | Distribution::Ami(_) | Distribution::ContainerDisk(_),
                true,
            ) => Some(format!(
                "a `{}` target takes a machine image, and `{recipe_name}` is a container recipe",
                target.value.kind()
            )),
            (Distribution::Directory(d), true) if !d.formats.disk().is_empty() => Some(format!(
                "disk formats in a `directory` target, and `{recipe_name}` is a container recipe (it writes `docker-archive` or `oci-archive` files)"
            )),
            (Distribution::Directory(d), false)
                if matches!(d.formats, DirectoryFormats::Container(_)) =>
            {
                Some(format!(
                    "archive formats in a `directory` target, and `{recipe_name}` is a machine recipe (it writes disk formats)"
                ))
            }
            _ => None,
        };
        if let Some(message) = wrong {
            problems.push(Problem::error(target.span, message).with_hint(
                "a pipeline's distribution replaces its recipe's: write the targets that recipe's kind takes".to_string(),
            ));
        }
    }
    problems
}

pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let secs = match unit.trim() {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

fn pipeline(cx: &mut PipelineReader<'_>, root: &Node, path: &Path, text: &str) -> Option<Pipeline> {
    let entries = cx.mapping(root, "a pipeline", TOP_KEYS)?;
    let get = |key: &str| entries.iter().find(|(k, _)| k.as_str() == Some(key));
    let start = Span::from_offsets(cx.source, root.span.start, root.span.start);

    let name = match get("name") {
        None => {
            cx.error(
                start,
                "missing `name`",
                Some("add `name: weekly-web` at the top level".into()),
            );
            None
        }
        Some((_, v)) => name(cx, v),
    };
    let description = get("description").and_then(|(_, v)| {
        if v.is_null() {
            None
        } else {
            cx.string(v, "`description`")
        }
    });
    let recipe = match get("recipe") {
        None => {
            cx.error(
                start,
                "missing `recipe`",
                Some("add `recipe: path/to/recipe.yml` (relative to this file)".into()),
            );
            None
        }
        Some((_, v)) => cx
            .string(v, "`recipe`")
            .map(|r| Located::new(crate::recipe::resolve_relative(path, &r), v.span)),
    };
    let infrastructure = match get("infrastructure") {
        None => Some(Override::default()),
        Some((_, v)) => section(cx, v, "infrastructure"),
    };
    // The recipe's `distribution` rules; an empty value keeps the recipe's list.
    let distribution = match get("distribution") {
        None => Some(None),
        Some((_, v)) if v.is_null() => Some(None),
        Some((_, v)) => crate::recipe::read_distribution(cx, v).map(Some),
    };
    // The recipe's `cache` rules; an empty value keeps the recipe's.
    let cache = match get("cache") {
        None => Some(None),
        Some((_, v)) if v.is_null() => Some(None),
        Some((_, v)) => crate::recipe::read_shared_cache(cx, v).map(Some),
    };
    let tests = match get("tests") {
        None => Some(Override::default()),
        Some((_, v)) => section(cx, v, "tests"),
    };
    let schedule = match get("schedule") {
        None => Some(None),
        Some((_, v)) if v.is_null() => Some(None),
        Some((_, v)) => schedule(cx, v).map(Some),
    };
    let lifecycle = match get("lifecycle") {
        None => Some(None),
        Some((_, v)) if v.is_null() => Some(None),
        Some((key, v)) => lifecycle(cx, key, v).map(Some),
    };
    let notifications = match get("notifications") {
        None => Some(Notifications::default()),
        Some((_, v)) if v.is_null() => Some(Notifications::default()),
        Some((_, v)) => notifications(cx, v),
    };
    let enabled = match get("status") {
        None => Some(true),
        Some((_, v)) => cx.word(v, "status", &["enabled", "disabled"], |s| match s {
            "enabled" | "ENABLED" => Some(true),
            "disabled" | "DISABLED" => Some(false),
            _ => None,
        }),
    };
    Some(Pipeline {
        name: name?,
        description,
        recipe: recipe?,
        infrastructure: infrastructure?,
        distribution: distribution?,
        cache: cache?,
        tests: tests?,
        schedule: schedule?,
        lifecycle: lifecycle?,
        notifications: notifications?,
        enabled: enabled?,
        source: PipelineSource {
            path: path.to_path_buf(),
            text: text.to_string(),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
        },
    })
}

fn name(cx: &mut PipelineReader<'_>, node: &Node) -> Option<String> {
    let text = cx.string(node, "`name`")?;
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if !text.chars().all(ok) {
        let fixed: String = text.chars().map(|c| if ok(c) { c } else { '-' }).collect();
        cx.error(
            node.span,
            format!("name `{text}` holds characters other than letters, digits, `-` and `_`"),
            Some(format!("write `{fixed}`")),
        );
        return None;
    }
    if text.len() > 128 || text.starts_with(['-', '_']) {
        cx.error(
            node.span,
            format!(
                "name `{text}` must start with a letter or digit and have at most 128 characters"
            ),
            None,
        );
        return None;
    }
    Some(text)
}

/// The settings of the recipe's `section` that the pipeline replaces, by the recipe's rules
/// (so the messages are the same); only the keys written replace the recipe's.
fn section(cx: &mut PipelineReader<'_>, node: &Node, section: &str) -> Option<Override> {
    if node.is_null() {
        return Some(Override::default());
    }
    // A recipe's `infrastructure` may name a file; a pipeline's may not.
    if node.as_str().is_some() && section == "infrastructure" {
        cx.error(
            node.span,
            "`infrastructure` in a pipeline must be a mapping",
            Some(
                "write the settings that replace the recipe's: `infrastructure: {cpus: 4}`".into(),
            ),
        );
        return None;
    }
    let values = crate::recipe::section_override(cx, node, section)?;
    let allowed = pipeline_keys(section);
    let keys = node
        .as_mapping()
        .unwrap_or_default()
        .iter()
        .filter_map(|(k, _)| Some((k.as_str()?, k.span)))
        .filter(|(k, _)| allowed.contains(k))
        .map(|(k, span)| Located::new(k.to_string(), span))
        .collect();
    Some(Override::new(keys, values))
}

fn schedule(cx: &mut PipelineReader<'_>, node: &Node) -> Option<Schedule> {
    if let Some(text) = node.as_str().filter(|_| !node.is_null()) {
        cx.error(
            node.span,
            "`schedule` must be a mapping",
            Some(format!("write `schedule: {{expression: \"{text}\"}}`")),
        );
        return None;
    }
    let entries = cx.mapping(node, "`schedule`", SCHEDULE_KEYS)?;
    let before = cx.problems.len();
    let get = |key: &str| entries.iter().find(|(k, _)| k.as_str() == Some(key));
    let timezone = match get("timezone") {
        None => Some(chrono_tz::Tz::UTC),
        Some((_, v)) => {
            let text = cx.string(v, "`timezone`")?;
            match parse_zone(&text) {
                Some(zone) => Some(zone),
                None => {
                    let hint = close_zone(&text)
                        .map(|z| format!("did you mean `{z}`?"))
                        .unwrap_or_else(|| {
                            "use an IANA zone name such as `UTC`, `Europe/Paris` or `America/New_York`"
                                .into()
                        });
                    cx.error(v.span, format!("unknown time zone `{text}`"), Some(hint));
                    None
                }
            }
        }
    };
    let expression = match get("expression") {
        None => {
            cx.error(
                node.span,
                "`schedule` has no `expression`",
                Some("add `expression: \"0 3 * * 1\"` (Mondays at 03:00)".into()),
            );
            None
        }
        Some((_, v)) => {
            cx.string(v, "`expression`")
                .and_then(|text| match CronExpr::parse(&text) {
                    Ok(expr) => {
                        if let Some(zone) = timezone
                            && let Some(why) = expr.never_matches(cx.now, zone)
                        {
                            cx.error(
                            v.span,
                            why,
                            Some(
                                "check the day of month against the month (and the year, if given)"
                                    .into(),
                            ),
                        );
                            return None;
                        }
                        Some(Located::new(expr, v.span))
                    }
                    Err(problem) => {
                        let span = match problem.part {
                            Some((s, e)) => inner_span(cx.source, v, &text, s, e),
                            None => v.span,
                        };
                        cx.error(span, problem.message, problem.hint);
                        None
                    }
                })
        }
    };
    let start_condition = match get("startCondition") {
        None => Some(StartCondition::DependencyChanged),
        Some((_, v)) => cx.word(
            v,
            "start condition",
            StartCondition::NAMES,
            StartCondition::from_name,
        ),
    };
    let package_updates = match get("packageUpdates") {
        None => Some(false),
        Some((_, v)) => cx.boolean(v, "`packageUpdates`"),
    };
    let on_check_failure = match get("onCheckFailure") {
        None => Some(OnCheckFailure::Skip),
        Some((key, v)) => {
            let word = cx.word(
                v,
                "check failure action",
                OnCheckFailure::NAMES,
                OnCheckFailure::from_name,
            );
            if package_updates == Some(false) {
                cx.warning(
                    key.span,
                    "`onCheckFailure` has no effect without `packageUpdates: true`",
                    Some("set `packageUpdates: true`, or remove `onCheckFailure`".into()),
                );
            }
            word
        }
    };
    if cx
        .problems
        .iter()
        .skip(before)
        .any(|p| p.severity == crate::diagnostic::Severity::Error)
    {
        return None;
    }
    Some(Schedule {
        expression: expression?,
        timezone: timezone?,
        start_condition: start_condition?,
        package_updates: package_updates?,
        on_check_failure: on_check_failure?,
    })
}

/// The span of `value[start..end]` inside the scalar `node`, or the whole scalar.
fn inner_span(source: &str, node: &Node, value: &str, start: usize, end: usize) -> Span {
    let raw = &source[node.span.start..node.span.end.min(source.len())];
    let part = &value[start..end.min(value.len())];
    match raw.find(part) {
        Some(i) if !part.is_empty() => Span::from_offsets(
            source,
            node.span.start + i,
            node.span.start + i + part.len(),
        ),
        _ => node.span,
    }
}

fn lifecycle(cx: &mut PipelineReader<'_>, key: &Node, node: &Node) -> Option<Lifecycle> {
    let entries = cx.mapping(node, "`lifecycle`", LIFECYCLE_KEYS)?;
    let before = cx.problems.len();
    let mut out = Lifecycle {
        keep_last: None,
        max_age: None,
        deprecate_for: Duration::ZERO,
        remote: false,
    };
    for (k, value) in entries {
        match k.as_str().unwrap_or_default() {
            "keepLast" => out.keep_last = cx.number(value, "keepLast", 1, 1000).map(|n| n as u32),
            "maxAge" => {
                out.max_age = cx.duration(value, "`maxAge`");
                if out.max_age == Some(Duration::ZERO) {
                    cx.error(
                        value.span,
                        "`maxAge` is zero: every image would be removed",
                        Some("write a positive duration such as `30d`".into()),
                    );
                }
            }
            "deprecateFor" => {
                if let Some(d) = cx.duration(value, "`deprecateFor`") {
                    out.deprecate_for = d;
                }
            }
            "remote" => {
                if let Some(b) = cx.boolean(value, "`remote`") {
                    out.remote = b;
                }
            }
            _ => {}
        }
    }
    if cx.problems.len() != before {
        return None;
    }
    if out.keep_last.is_none() && out.max_age.is_none() {
        cx.error(
            key.span,
            "`lifecycle` says neither how many images to keep nor for how long",
            Some("add `keepLast: 5` and/or `maxAge: 30d`".into()),
        );
        return None;
    }
    Some(out)
}

fn notifications(cx: &mut PipelineReader<'_>, node: &Node) -> Option<Notifications> {
    let entries = cx.mapping(node, "`notifications`", NOTIFICATION_KEYS)?;
    let before = cx.problems.len();
    let mut out = Notifications {
        on: DEFAULT_NOTIFY_ON.to_vec(),
        webhook: None,
        command: None,
    };
    let names: Vec<&str> = ExecStatus::ALL.iter().map(|s| s.as_str()).collect();
    for (key, value) in entries {
        match key.as_str().unwrap_or_default() {
            "on" => {
                let Some(items) = value.as_sequence() else {
                    cx.not_a(value, "`on`", "a list of statuses");
                    continue;
                };
                let mut on = Vec::new();
                for item in items {
                    let status = cx.word(item, "status", &names, |s| {
                        ExecStatus::ALL
                            .into_iter()
                            .find(|st| st.as_str().eq_ignore_ascii_case(s))
                    });
                    if let Some(s) = status
                        && !on.contains(&s)
                    {
                        on.push(s);
                    }
                }
                out.on = on;
            }
            "webhook" => out.webhook = webhook(cx, value),
            "command" => {
                let Some(items) = value.as_sequence() else {
                    let hint = value
                        .as_str()
                        .map(|s| {
                            let words: Vec<String> =
                                s.split_whitespace().map(|w| format!("\"{w}\"")).collect();
                            format!("write the program and its arguments as a list: `command: [{}]` (no shell)", words.join(", "))
                        });
                    cx.error(
                        value.span,
                        format!("`command` must be a list, found {}", value.describe()),
                        hint,
                    );
                    continue;
                };
                let mut argv = Vec::new();
                for item in items {
                    if let Some(s) = cx.string(item, "an argument of `command`") {
                        argv.push(s);
                    }
                }
                if items.is_empty() {
                    cx.error(
                        value.span,
                        "`command` is empty",
                        Some("name a program: `command: [/usr/local/bin/notify]`".into()),
                    );
                }
                out.command = Some(argv);
            }
            _ => {}
        }
    }
    (cx.problems.len() == before).then_some(out)
}

fn webhook(cx: &mut PipelineReader<'_>, node: &Node) -> Option<Webhook> {
    if let Some(url) = node.as_str().filter(|_| !node.is_null()) {
        cx.error(
            node.span,
            "`webhook` must be a mapping",
            Some(format!("write `webhook: {{url: \"{url}\"}}`")),
        );
        return None;
    }
    let entries = cx.mapping(node, "`webhook`", WEBHOOK_KEYS)?;
    let get = |key: &str| entries.iter().find(|(k, _)| k.as_str() == Some(key));
    let url = match get("url") {
        None => {
            cx.error(
                node.span,
                "`webhook` has no `url`",
                Some("add `url: https://…`".into()),
            );
            None
        }
        Some((_, v)) => cx.string(v, "`url`").and_then(|url| {
            if url.starts_with("http://") || url.starts_with("https://") {
                Some(url)
            } else {
                cx.error(
                    v.span,
                    format!("webhook URL `{url}` is not an http(s) URL"),
                    Some("write `https://host/path` (or `http://` on a trusted network)".into()),
                );
                None
            }
        }),
    };
    let mut headers = BTreeMap::new();
    if let Some((_, v)) = get("headers")
        && !v.is_null()
    {
        match v.as_mapping() {
            Some(entries) => {
                for (k, value) in entries {
                    let name = cx.string(k, "a header name");
                    let text = cx.string(value, "a header value");
                    if let (Some(name), Some(text)) = (name, text) {
                        if !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        {
                            cx.error(
                                k.span,
                                format!("`{name}` is not a valid header name"),
                                Some("header names hold letters, digits, `-` and `_`".into()),
                            );
                            continue;
                        }
                        headers.insert(name, text);
                    }
                }
            }
            None => cx.not_a(v, "`headers`", "a mapping of header names to values"),
        }
    }
    Some(Webhook { url: url?, headers })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use crate::recipe::{Accelerator, ByteSize, Infrastructure};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap()
    }

    fn checked(text: &str) -> Checked {
        check(Path::new("p/weekly.yml"), text, now())
    }

    /// (line, col, message, hint) of every problem.
    fn problems(text: &str) -> Vec<(usize, usize, String, Option<String>)> {
        checked(text)
            .diagnostics
            .problems()
            .iter()
            .map(|p| (p.span.line, p.span.col, p.message.clone(), p.hint.clone()))
            .collect()
    }

    const MINIMAL: &str = "name: weekly\nrecipe: ../r/recipe.yml\n";

    #[test]
    fn minimal_pipeline_gets_every_default() {
        let p = checked(MINIMAL).pipeline.unwrap();
        assert_eq!(p.name, "weekly");
        assert_eq!(p.recipe.value, Path::new("p/../r/recipe.yml"));
        assert!(p.schedule.is_none());
        assert!(p.enabled);
        assert!(p.infrastructure.is_empty());
        assert_eq!(p.notifications, Notifications::default());
        assert!(p.lifecycle.is_none());
    }

    #[test]
    fn every_key_at_once() {
        let text = "name: weekly-web\ndescription: d\nrecipe: r.yml\ninfrastructure: {cpus: 4, memory: 4GiB, accelerator: tcg}\ntests: {enabled: false, timeoutSeconds: 600}\nschedule:\n  expression: cron(0 3 ? * MON *)\n  timezone: Europe/Paris\n  startCondition: EXPRESSION_MATCH_ONLY\nlifecycle: {keepLast: 4, maxAge: 30d, deprecateFor: 7d, remote: true}\nnotifications:\n  on: [available, FAILED]\n  webhook: {url: 'http://127.0.0.1:9/x', headers: {Authorization: Bearer t}}\n  command: [/bin/true, x]\nstatus: DISABLED\n";
        let c = checked(text);
        assert!(c.diagnostics.is_empty(), "{}", c.diagnostics);
        let p = c.pipeline.unwrap();
        assert_eq!(p.infrastructure.keys, ["cpus", "memory", "accelerator"]);
        let applied = p.infrastructure.apply(&Infrastructure::default());
        assert_eq!(applied.cpus, 4);
        assert_eq!(applied.memory, ByteSize::gib(4));
        assert_eq!(applied.accelerator, Accelerator::Tcg);
        assert_eq!(applied.firmware, Infrastructure::default().firmware);
        let tests = serde_json::json!({"enabled": true, "timeoutSeconds": 3600, "components": []});
        assert_eq!(
            p.tests.apply(&tests),
            serde_json::json!({"enabled": false, "timeoutSeconds": 600, "components": []})
        );
        let s = p.schedule.unwrap();
        assert_eq!(s.start_condition, StartCondition::Always);
        assert_eq!(s.timezone, chrono_tz::Europe::Paris);
        let l = p.lifecycle.unwrap();
        assert_eq!(l.keep_last, Some(4));
        assert_eq!(l.max_age, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(l.deprecate_for, Duration::from_secs(7 * 86400));
        assert_eq!(
            p.notifications.on,
            [ExecStatus::Available, ExecStatus::Failed]
        );
        assert_eq!(p.notifications.command.unwrap(), ["/bin/true", "x"]);
        assert_eq!(
            p.notifications.webhook.unwrap().headers["Authorization"],
            "Bearer t"
        );
        assert!(!p.enabled);
    }

    #[test]
    fn distribution_replaces_the_recipes_and_obeys_its_rules() {
        let text = format!("{MINIMAL}distribution:\n  - directory: {{path: out/}}\n");
        let p = checked(&text).pipeline.unwrap();
        let targets = p.distribution.unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].value.kind(), "directory");
        // Empty: the recipe's list stays; `[]`: nowhere.
        let p = checked(&format!("{MINIMAL}distribution:\n"))
            .pipeline
            .unwrap();
        assert!(p.distribution.is_none());
        let p = checked(&format!("{MINIMAL}distribution: []\n"))
            .pipeline
            .unwrap();
        assert_eq!(p.distribution.unwrap().len(), 0);
        // The recipe's messages.
        let p = problems(&format!(
            "{MINIMAL}distribution: {{directory: {{path: x}}}}\n"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].2, "`distribution` must be a list, found a mapping");
        assert_eq!(
            p[0].3.as_deref(),
            Some("write a list: `distribution:` then `- directory: {path: …}`")
        );
    }

    #[test]
    fn infrastructure_override_keeps_only_the_keys_written() {
        let text = format!("{MINIMAL}infrastructure: {{memory: 3GiB, keepOnFailure: true}}\n");
        let p = checked(&text).pipeline.unwrap();
        assert_eq!(p.infrastructure.keys, ["memory", "keepOnFailure"]);
        let recipe = Infrastructure {
            cpus: 6,
            ..Infrastructure::default()
        };
        let applied = p.infrastructure.apply(&recipe);
        assert_eq!(applied.cpus, 6);
        assert_eq!(applied.memory, ByteSize::gib(3));
        assert!(applied.keep_on_failure);
        let p = problems(&format!("{MINIMAL}infrastructure: {{memory: 1000}}\n"));
        assert!(p[0].2.ends_with("is below the minimum (256MiB)"), "{p:?}");
    }

    #[test]
    fn impossible_cron_is_explained_at_its_place() {
        let text = format!("{MINIMAL}schedule:\n  expression: 0 0 31 2 *\n");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].0, p[0].1), (4, 15));
        assert!(p[0].2.contains("never matches"), "{p:?}");
        assert!(p[0].2.contains("February"), "{p:?}");
    }

    #[test]
    fn bad_time_zone_gets_did_you_mean() {
        let text =
            format!("{MINIMAL}schedule:\n  expression: 0 3 * * *\n  timezone: Europe/Pariss\n");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].0, p[0].1), (5, 13));
        assert_eq!(p[0].2, "unknown time zone `Europe/Pariss`");
        assert_eq!(p[0].3.as_deref(), Some("did you mean `Europe/Paris`?"));
    }

    #[test]
    fn every_problem_at_once() {
        let text = "nme: x\nrecipe: r.yml\ninfrastructure: {cpus: 0, memry: 1G}\nschedule: {expression: '0 3 * *', startCondition: sometimes}\nlifecycle: {}\nnotifications: {on: [done], command: notify me, webhook: {url: ftp://x}}\nstatus: on\n";
        let messages: Vec<String> = problems(text).into_iter().map(|p| p.2).collect();
        assert_eq!(
            messages,
            [
                "unknown key `nme` in a pipeline",
                "missing `name`",
                "cpus (0) is below the minimum (1)",
                "unknown key `memry` in `infrastructure`",
                "`0 3 * *` has 4 fields; a cron expression has 5 (minute hour day-of-month month day-of-week)",
                "unknown start condition `sometimes`; expected `always` or `dependencyChanged`",
                "`lifecycle` says neither how many images to keep nor for how long",
                "unknown status `done`; expected `pending`, `building`, `testing`, `distributing`, `available`, `failed`, `cancelled` or `skipped`",
                "`command` must be a list, found a string",
                "webhook URL `ftp://x` is not an http(s) URL",
                "unknown status `on`; expected `enabled` or `disabled`",
            ],
        );
    }

    #[test]
    fn image_builder_keys_get_a_translation() {
        let text = format!("{MINIMAL}schedule:\n  scheduleExpression: cron(0 3 ? * MON *)\n");
        let p = problems(&text);
        assert!(
            p.iter().any(|p| p.3.as_deref()
                == Some("`scheduleExpression` is Image Builder's; here, write `expression:`")),
            "{p:?}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Some(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("2w"), Some(Duration::from_secs(14 * 86400)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("d"), None);
        assert_eq!(parse_duration("3y"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
    }

    proptest::proptest! {
        /// Any edit of a valid pipeline gives a pipeline or problems, never a panic.
        #[test]
        fn edited_pipelines_never_panic(at in 0usize..600, len in 0usize..8, insert in ".{0,6}") {
            let text = "name: weekly-web\nrecipe: r.yml\ninfrastructure: {cpus: 4}\nschedule:\n  expression: cron(0 3 ? * MON *)\n  timezone: Europe/Paris\nlifecycle: {keepLast: 4}\nnotifications: {webhook: {url: 'http://x'}, command: [a]}\n";
            let c = checked(&crate::yaml::edited(text, at, len, &insert));
            proptest::prop_assert!(c.pipeline.is_some() || c.diagnostics.has_errors());
        }
    }
}
