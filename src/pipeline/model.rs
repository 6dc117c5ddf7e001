//! The validated pipeline. A value of these types is always valid and has every default
//! filled in; the doc comment of each field is the user reference for its key (camelCase in
//! files) and states the default. `parse` builds these from a file; `lifecycle` and `notify`
//! read [`Lifecycle`] and [`Notifications`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::history::ExecStatus;
use super::schedule::CronExpr;
use crate::recipe::{Distribution, Located, SharedCache};

/// One pipeline: a recipe built unattended (Image Builder's image pipeline).
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// `name` (required): letters, digits, `-` and `_`; the key of its history.
    pub name: String,
    /// `description`: free text. Default: none.
    pub description: Option<String>,
    /// `recipe` (required): the recipe file, relative to the pipeline file's directory.
    pub recipe: Located<PathBuf>,
    /// `infrastructure`: settings that replace the recipe's, same keys and rules as the
    /// recipe's `infrastructure` (`cpus`, `memory`, `accelerator`, …); keys not written keep
    /// the recipe's value. Default: the recipe's.
    pub infrastructure: Override,
    /// `distribution`: a list of targets written as in a recipe (`- directory: {path: …}`,
    /// `- oci: …`, `- ami: …`, …) that replaces the recipe's whole list; `[]` distributes
    /// nowhere. Relative paths are relative to the pipeline file. Default (or empty): the
    /// recipe's.
    pub distribution: Option<Vec<Located<Distribution>>>,
    /// `cache`: `from` and `to`, written as in a recipe, replacing the recipe's whole
    /// `cache`. Default (or empty): the recipe's.
    pub cache: Option<SharedCache>,
    /// `tests`: `enabled` and `timeoutSeconds` replace the recipe's. Default: the recipe's.
    pub tests: Override,
    /// `schedule`: when the pipeline runs by itself. Default: none (only `builder pipeline run`).
    pub schedule: Option<Schedule>,
    /// `lifecycle`: which of this pipeline's images are kept. Default: all are kept.
    pub lifecycle: Option<Lifecycle>,
    /// `notifications`: hooks called on status changes. Default: none.
    pub notifications: Notifications,
    /// `status`: `enabled` or `disabled` (Image Builder's `ENABLED`/`DISABLED` too). A disabled
    /// pipeline is not scheduled; `builder pipeline run` still runs it. Default: `enabled`.
    pub enabled: bool,
    /// Where the pipeline was read from, its text and its sha256.
    pub source: PipelineSource,
}

/// The pipeline file: for messages after validation and for change detection by `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineSource {
    pub path: PathBuf,
    pub text: String,
    pub sha256: String,
}

/// Settings of one recipe section (`infrastructure`, `tests`) that a pipeline replaces: the
/// keys written (those its declaration lets a pipeline set, `recipe::settings`) and their
/// values, validated by the recipe's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Override {
    /// The keys written in the pipeline file, in file order.
    pub keys: Vec<String>,
    /// Where each key is written, in the same order (for problems found with the recipe).
    pub spans: Vec<crate::diagnostic::Span>,
    /// Their values in the serde form of the recipe's section, whose names are the file's keys.
    values: serde_json::Map<String, serde_json::Value>,
}

impl Override {
    /// The keys written and their values, from the section as read (every key with a value).
    pub fn new(keys: Vec<Located<String>>, section: serde_json::Value) -> Override {
        let mut values = match section {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        let (keys, spans): (Vec<String>, Vec<_>) =
            keys.into_iter().map(|k| (k.value, k.span)).unzip();
        values.retain(|k, _| keys.contains(k));
        Override {
            keys,
            spans,
            values,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `base` (the recipe's section, or the plan's) with every key written replaced: both
    /// name their fields as the file does.
    #[expect(
        clippy::expect_used,
        reason = "`base` is a section of a plan, and plan::plan refuses a plan that does not serialize (PlanError::NotUtf8); each value kept was serialized from a field of the same type and name (the recipe's reader), so the merged object reads back as the section"
    )]
    pub fn apply<T: Serialize + serde::de::DeserializeOwned>(&self, base: &T) -> T {
        let mut value = serde_json::to_value(base).expect("a section serializes to JSON");
        if let Some(map) = value.as_object_mut() {
            map.extend(self.values.clone());
        }
        serde_json::from_value(value).expect("the values were read as this section's")
    }
}

/// When a pipeline runs by itself (Image Builder's `schedule`).
#[derive(Debug, Clone)]
pub struct Schedule {
    /// `expression` (required): 5-field cron (`minute hour day-of-month month day-of-week`,
    /// e.g. `0 3 * * 1`) or Image Builder's `cron(min hour dom month dow year)` (e.g.
    /// `cron(0 3 ? * MON *)`). `L`, `W`, `#` and `?` work as in Image Builder.
    pub expression: Located<CronExpr>,
    /// `timezone`: an IANA zone (`Europe/Paris`); the expression is read in it, daylight
    /// saving included. Default: `UTC`.
    pub timezone: chrono_tz::Tz,
    /// `startCondition`: `always` builds at every match; `dependencyChanged` builds only when
    /// an input changed since the last successful execution (the parent image, a component
    /// document, a parameter value, the recipe). Image Builder's
    /// `EXPRESSION_MATCH_ONLY` / `EXPRESSION_MATCH_AND_DEPENDENCY_UPDATES_AVAILABLE` are
    /// accepted too. Default: `dependencyChanged` (as Image Builder).
    pub start_condition: StartCondition,
    /// `packageUpdates`: also build when nothing else changed but the repositories of the
    /// last image (its manifest's package sources) offer newer versions of its installed
    /// packages. Checked on the host, no VM: the repositories' signed indices are fetched and
    /// verified with the keys the image trusts (`builder images outdated` shows the same).
    /// Default: `false`.
    pub package_updates: bool,
    /// `onCheckFailure`: what to do when `packageUpdates` could not be checked (a repository
    /// unreachable, a bad signature, an image without recorded sources): `skip` skips this
    /// run and notifies (whatever `notifications.on` says), `build` builds anyway. The reason
    /// (`could not check updates: …`) is in the history either way. Default: `skip`.
    pub on_check_failure: OnCheckFailure,
}

/// `schedule.onCheckFailure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnCheckFailure {
    #[default]
    Skip,
    Build,
}

impl OnCheckFailure {
    pub const NAMES: &'static [&'static str] = &["skip", "build"];

    pub fn name(self) -> &'static str {
        match self {
            OnCheckFailure::Skip => "skip",
            OnCheckFailure::Build => "build",
        }
    }

    pub fn from_name(text: &str) -> Option<OnCheckFailure> {
        match text {
            "skip" => Some(OnCheckFailure::Skip),
            "build" => Some(OnCheckFailure::Build),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StartCondition {
    Always,
    DependencyChanged,
}

impl StartCondition {
    pub const NAMES: &'static [&'static str] = &["always", "dependencyChanged"];

    pub fn name(self) -> &'static str {
        match self {
            StartCondition::Always => "always",
            StartCondition::DependencyChanged => "dependencyChanged",
        }
    }

    /// Our names and Image Builder's.
    pub fn from_name(text: &str) -> Option<StartCondition> {
        match text {
            "always" | "EXPRESSION_MATCH_ONLY" => Some(StartCondition::Always),
            "dependencyChanged" | "EXPRESSION_MATCH_AND_DEPENDENCY_UPDATES_AVAILABLE" => {
                Some(StartCondition::DependencyChanged)
            }
            _ => None,
        }
    }
}

/// Which images of a pipeline are kept (Image Builder's lifecycle policy, per pipeline).
/// An image is retained while it is among the newest `keepLast` or younger than `maxAge`;
/// at least one of the two is given. An image that another stored image uses as its parent
/// is never deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// `keepLast`: the newest N available images are retained (1 to 1000). Default: none.
    pub keep_last: Option<u32>,
    /// `maxAge`: images younger than this are retained (`30d`, `12h`, `2w`). Default: none.
    pub max_age: Option<Duration>,
    /// `deprecateFor`: an image outside retention is first marked deprecated and deleted
    /// this long after; `0s` deletes it at once. Default: `0s`.
    pub deprecate_for: Duration,
    /// `remote`: also remove the image where its distribution target supports removal.
    /// Default: `false`.
    pub remote: bool,
}

/// Hooks called when an execution reaches a status in `on` (Image Builder's SNS topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifications {
    /// `on`: the statuses that notify. Default: `[available, failed, cancelled]`.
    pub on: Vec<ExecStatus>,
    /// `webhook`: an HTTP POST with a JSON body, retried. Default: none.
    pub webhook: Option<Webhook>,
    /// `command`: a program and its arguments (no shell); the JSON body arrives on stdin.
    /// Default: none.
    pub command: Option<Vec<String>>,
}

impl Default for Notifications {
    fn default() -> Notifications {
        Notifications {
            on: DEFAULT_NOTIFY_ON.to_vec(),
            webhook: None,
            command: None,
        }
    }
}

pub const DEFAULT_NOTIFY_ON: &[ExecStatus] = &[
    ExecStatus::Available,
    ExecStatus::Failed,
    ExecStatus::Cancelled,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// `url` (required): `http://` or `https://`.
    pub url: String,
    /// `headers`: extra request headers (`Authorization: Bearer …`). Default: none.
    pub headers: BTreeMap<String, String>,
}
