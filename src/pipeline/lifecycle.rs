//! Image lifecycle per pipeline (Image Builder's lifecycle policies, DEPRECATE then DELETE):
//! of the images a pipeline produced (from the history), keep the newest N and/or those
//! younger than a duration, deprecate the others, and delete them after a grace period —
//! from the store and, where a distribution target allows it, where they were sent.
//!
//! [`evaluate`] is the policy alone: images, marks and protections in, one [`Decision`] per
//! image out, with the time from a [`Clock`]; no I/O. [`apply`] gathers its inputs from the
//! store and the history, evaluates, then acts and records what it did.
//!
//! An image is never deleted while another stored build uses it as its parent
//! ([`Store::dependents`]) or while a recipe of another pipeline resolves its `parentImage` to
//! it; the decision says which rule kept it. Deprecation is only a mark (shown by
//! `builder images list`); it deletes nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::Clock;
use super::history::{History, HistoryError};
use crate::store::Receipt;
use crate::store::manifest::MANIFEST_FILE;
use crate::store::{ImageRef, Store, StoreError, StoredImage};

/// The file, next to a stored build, where distribution records its receipts.
pub use crate::store::RECEIPTS_FILE;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The policy keeps nothing by any rule: applying it would delete every image.
    #[error(
        "the lifecycle policy needs `keepLast` or `keepYoungerThan`; without either it would \
         delete every image"
    )]
    NoKeepRule,
    #[error("`keepLast` and `retainAtLeast` must be at least 1 (got {0})")]
    ZeroCount(u32),
    #[error("`{field}` must be longer than zero (got {value})")]
    NotPositive { field: &'static str, value: String },
}

/// A pipeline's retention policy (the validated form of the pipeline file's `lifecycle:`).
/// An image is kept if any rule keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Keep the newest N images (Image Builder's COUNT filter). No default.
    pub keep_last: Option<u32>,
    /// Keep images younger than this (Image Builder's AGE filter). No default.
    pub keep_younger_than: Option<TimeDelta>,
    /// Never keep fewer than this many, whatever their age (AGE's `retainAtLeast`).
    /// Default 1: a pipeline always keeps its newest image.
    pub retain_at_least: u32,
    /// How long an image stays deprecated before it is deleted. `None` (the default):
    /// deprecate only, never delete. Zero: delete as soon as a rule lets it go.
    pub delete_after: Option<TimeDelta>,
    /// Also delete the image where distribution sent it, where the target allows it.
    /// Default false.
    pub remote: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            keep_last: None,
            keep_younger_than: None,
            retain_at_least: 1,
            delete_after: None,
            remote: false,
        }
    }
}

impl Policy {
    /// The checks a pipeline file's parser should run (it reports them at file:line:col).
    pub fn validate(&self) -> Result<(), LifecycleError> {
        if self.keep_last.is_none() && self.keep_younger_than.is_none() {
            return Err(LifecycleError::NoKeepRule);
        }
        for n in [self.keep_last.unwrap_or(1), self.retain_at_least] {
            if n == 0 {
                return Err(LifecycleError::ZeroCount(n));
            }
        }
        if let Some(d) = self.keep_younger_than
            && d <= TimeDelta::zero()
        {
            return Err(LifecycleError::NotPositive {
                field: "keepYoungerThan",
                value: human_duration(d),
            });
        }
        if let Some(d) = self.delete_after
            && d < TimeDelta::zero()
        {
            return Err(LifecycleError::NotPositive {
                field: "deleteAfter",
                value: human_duration(d),
            });
        }
        Ok(())
    }
}

impl From<&super::model::Lifecycle> for Policy {
    /// The pipeline file's `lifecycle:` (`keepLast`, `maxAge`, `deprecateFor`, `remote`);
    /// the newest image is always kept.
    fn from(l: &super::model::Lifecycle) -> Policy {
        let delta = |d: std::time::Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        Policy {
            keep_last: l.keep_last,
            keep_younger_than: l.max_age.map(delta),
            retain_at_least: 1,
            delete_after: Some(delta(l.deprecate_for)),
            remote: l.remote,
        }
    }
}

/// One image the policy looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// `name/x.y.z/n`.
    pub image: String,
    /// When the pipeline made it available (its age counts from here).
    pub created: DateTime<Utc>,
    /// When lifecycle deprecated it, if it did.
    pub deprecated_at: Option<DateTime<Utc>>,
    /// Why it must not be deleted, if anything says so.
    pub protections: Vec<Protection>,
}

/// A rule that keeps an image from being deleted whatever the policy says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "camelCase")]
pub enum Protection {
    /// Other stored builds were made from it.
    ParentOf { images: Vec<String> },
    /// Another pipeline's recipe names `reference` as its parent, which resolves to it today.
    ReferencedBy { reference: String },
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protection::ParentOf { images } => {
                write!(f, "it is the parent of {}", images.join(", "))
            }
            Protection::ReferencedBy { reference } => write!(
                f,
                "another pipeline's recipe builds on `{reference}`, which is this image"
            ),
        }
    }
}

/// Why the policy keeps an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "camelCase")]
pub enum KeepRule {
    /// Among the newest `keep_last` (it is number `rank`, 1 = newest).
    KeepLast { rank: usize, keep_last: u32 },
    /// Younger than `keepYoungerThan`.
    YoungerThan {
        age_seconds: i64,
        limit_seconds: i64,
    },
    /// One of the newest `retain_at_least`, which are kept whatever their age.
    RetainAtLeast { rank: usize, retain_at_least: u32 },
}

impl fmt::Display for KeepRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepRule::KeepLast { rank, keep_last } => {
                write!(f, "number {rank} of the newest {keep_last} (keepLast)")
            }
            KeepRule::YoungerThan {
                age_seconds,
                limit_seconds,
            } => write!(
                f,
                "{} old, younger than {} (keepYoungerThan)",
                human_duration(TimeDelta::seconds(*age_seconds)),
                human_duration(TimeDelta::seconds(*limit_seconds))
            ),
            KeepRule::RetainAtLeast {
                rank,
                retain_at_least,
            } => write!(
                f,
                "number {rank} of the {retain_at_least} always kept (retainAtLeast)"
            ),
        }
    }
}

/// What the policy decides for one image, as of now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Decision {
    /// A rule keeps it. `undeprecate`: it was deprecated under an older policy and is kept now.
    Keep { rule: KeepRule, undeprecate: bool },
    /// No rule keeps it: deprecate it now. `delete_at`: when the grace period ends.
    Deprecate { delete_at: Option<DateTime<Utc>> },
    /// Deprecated before; its grace period is not over (`None`: the policy never deletes).
    StayDeprecated { delete_at: Option<DateTime<Utc>> },
    /// Deprecated and its grace period is over (or zero): delete it.
    Delete,
    /// It would be deleted, but a protection keeps it (deprecated, if it was not yet).
    Protected { protections: Vec<Protection> },
}

/// One image and its decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub image: String,
    pub created: DateTime<Utc>,
    pub decision: Decision,
}

/// Decide, for each candidate, what `policy` does with it at `clock`'s time. Pure: no I/O.
/// The result is newest first.
pub fn evaluate(policy: &Policy, candidates: &[Candidate], clock: &dyn Clock) -> Vec<Verdict> {
    let now = clock.now();
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    // Newest first; equal times fall back to the reference so the order is stable.
    sorted.sort_by(|a, b| b.created.cmp(&a.created).then(b.image.cmp(&a.image)));
    sorted
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let rank = i + 1;
            let age = now - c.created;
            let keep = if let Some(n) = policy.keep_last.filter(|n| rank <= *n as usize) {
                Some(KeepRule::KeepLast { rank, keep_last: n })
            } else if let Some(limit) = policy.keep_younger_than.filter(|l| age < *l) {
                Some(KeepRule::YoungerThan {
                    age_seconds: age.num_seconds(),
                    limit_seconds: limit.num_seconds(),
                })
            } else if rank <= policy.retain_at_least as usize {
                Some(KeepRule::RetainAtLeast {
                    rank,
                    retain_at_least: policy.retain_at_least,
                })
            } else if policy.keep_last.is_none() && policy.keep_younger_than.is_none() {
                // An unvalidated policy with no keep rule keeps everything rather than
                // deleting everything.
                Some(KeepRule::RetainAtLeast {
                    rank,
                    retain_at_least: u32::MAX,
                })
            } else {
                None
            };
            let decision = match keep {
                Some(rule) => Decision::Keep {
                    rule,
                    undeprecate: c.deprecated_at.is_some(),
                },
                None => {
                    let deprecated = c.deprecated_at.unwrap_or(now);
                    let delete_at = policy.delete_after.map(|g| deprecated + g);
                    let due = delete_at.is_some_and(|t| t <= now);
                    if due && !c.protections.is_empty() {
                        Decision::Protected {
                            protections: c.protections.clone(),
                        }
                    } else if due {
                        Decision::Delete
                    } else if c.deprecated_at.is_none() {
                        Decision::Deprecate { delete_at }
                    } else {
                        Decision::StayDeprecated { delete_at }
                    }
                }
            };
            Verdict {
                image: c.image.clone(),
                created: c.created,
                decision,
            }
        })
        .collect()
}

/// What deleting an image where distribution sent it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteNote {
    /// The receipt's target kind (`oci`, `ami`, `directory`, …).
    pub kind: String,
    pub location: String,
    pub outcome: RemoteOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "camelCase")]
pub enum RemoteOutcome {
    Deleted,
    /// The target gives no way to delete (or builder does not implement it): left in place.
    NotSupported(String),
    /// Tried and failed: left in place.
    Failed(String),
    /// Nothing remote to delete (the local store itself).
    Local,
}

impl fmt::Display for RemoteNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            RemoteOutcome::Deleted => write!(f, "deleted {} {}", self.kind, self.location),
            RemoteOutcome::NotSupported(why) => write!(
                f,
                "remote deletion not supported for {} ({}): {why}; left in place",
                self.kind, self.location
            ),
            RemoteOutcome::Failed(why) => write!(
                f,
                "could not delete {} {}: {why}; left in place",
                self.kind, self.location
            ),
            RemoteOutcome::Local => {
                write!(f, "{} {}: removed with the store", self.kind, self.location)
            }
        }
    }
}

/// One image and what [`apply`] did to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Action {
    pub verdict: Verdict,
    /// What was done, in words: `deprecated`, `deleted`, `kept: …`, failures.
    pub done: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteNote>,
}

/// What [`apply`] did for one pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub pipeline: String,
    /// Newest first.
    pub actions: Vec<Action>,
    /// Images the history lists that are no longer in the store (removed by hand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gone: Vec<String>,
    /// Problems that did not stop the run (a reference that did not resolve, a failed
    /// removal), in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Report {
    /// The images deleted from the store in this run.
    pub fn deleted(&self) -> Vec<&str> {
        self.actions
            .iter()
            .filter(|a| a.verdict.decision == Decision::Delete && a.done.starts_with("deleted"))
            .map(|a| a.verdict.image.as_str())
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.actions {
            writeln!(f, "{}: {}", a.verdict.image, a.done)?;
            for r in &a.remote {
                writeln!(f, "  {r}")?;
            }
        }
        for g in &self.gone {
            writeln!(f, "{g}: already gone from the store")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// Apply `policy` to the images `pipeline` produced: read them from `history`, find them in
/// `store`, protect parents in use and the images `protected_refs` (the `parentImage` of
/// other pipelines' recipes, e.g. `base/1.x.x`) resolve to, evaluate, then deprecate (a mark
/// in the history), delete (remote copies first when `policy.remote`, then the store
/// folder) and record each deletion. A failure to delete one image is a warning in the report;
/// the others still go.
pub fn apply(
    store: &Store,
    history: &History,
    pipeline: &str,
    policy: &Policy,
    clock: &dyn Clock,
    protected_refs: &[String],
) -> Result<Report, LifecycleError> {
    let mut report = Report {
        pipeline: pipeline.to_string(),
        ..Report::default()
    };
    let produced = history.produced_images(pipeline)?;
    let marks: BTreeMap<String, _> = history
        .marks(Some(pipeline))?
        .into_iter()
        .map(|m| (m.image.clone(), m))
        .collect();
    let listing = store.list()?;
    let stored: BTreeMap<String, &StoredImage> =
        listing.images.iter().map(|i| (i.reference(), i)).collect();

    // What the other pipelines' recipes build on today.
    let mut referenced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for reference in protected_refs {
        // A path or URL parent is not a stored build: it protects nothing here.
        let Ok(r) = reference.parse::<ImageRef>() else {
            continue;
        };
        match store.resolve(&r) {
            Ok(image) => referenced
                .entry(image.reference())
                .or_default()
                .push(reference.clone()),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => report
                .warnings
                .push(format!("could not resolve `{reference}`: {e}")),
        }
    }

    let mut candidates = Vec::new();
    for p in &produced {
        let mark = marks.get(&p.image);
        if mark.is_some_and(|m| m.deleted_at.is_some()) {
            continue;
        }
        let Some(image) = stored.get(&p.image) else {
            report.gone.push(p.image.clone());
            continue;
        };
        let mut protections = Vec::new();
        let dependents = store.dependents(image)?;
        if !dependents.is_empty() {
            protections.push(Protection::ParentOf {
                images: dependents.iter().map(StoredImage::reference).collect(),
            });
        }
        for reference in referenced.get(&p.image).into_iter().flatten() {
            protections.push(Protection::ReferencedBy {
                reference: reference.clone(),
            });
        }
        candidates.push(Candidate {
            image: p.image.clone(),
            created: p.finished,
            deprecated_at: mark.and_then(|m| m.deprecated_at),
            protections,
        });
    }

    let now = clock.now();
    for verdict in evaluate(policy, &candidates, clock) {
        let mut remote = Vec::new();
        let done = match &verdict.decision {
            Decision::Keep { rule, undeprecate } => {
                if *undeprecate {
                    history.clear_deprecation(&verdict.image)?;
                    format!("kept, no longer deprecated: {rule}")
                } else {
                    format!("kept: {rule}")
                }
            }
            Decision::Deprecate { delete_at } => {
                history.mark_deprecated(pipeline, &verdict.image, now)?;
                match delete_at {
                    Some(t) => format!(
                        "deprecated; to be deleted after {}",
                        t.format("%Y-%m-%d %H:%M UTC")
                    ),
                    None => "deprecated (the policy never deletes)".to_string(),
                }
            }
            Decision::StayDeprecated { delete_at } => match delete_at {
                Some(t) => format!(
                    "deprecated; to be deleted after {}",
                    t.format("%Y-%m-%d %H:%M UTC")
                ),
                None => "deprecated (the policy never deletes)".to_string(),
            },
            Decision::Protected { protections } => {
                history.mark_deprecated(pipeline, &verdict.image, now)?;
                let why: Vec<String> = protections.iter().map(ToString::to_string).collect();
                let text = format!("kept although due for deletion: {}", why.join("; "));
                history.note_image(pipeline, &verdict.image, &text)?;
                text
            }
            // Every candidate was found in the store above; were one not, there is nothing to
            // delete.
            Decision::Delete => match stored.get(&verdict.image) {
                None => "already gone from the store".to_string(),
                Some(image) => {
                    if policy.remote {
                        remote = delete_remote(image);
                    }
                    match store.remove(std::slice::from_ref(*image), false) {
                        Ok(()) => {
                            let detail: Vec<String> =
                                remote.iter().map(ToString::to_string).collect();
                            let detail = (!detail.is_empty()).then(|| detail.join("; "));
                            history.mark_deleted(
                                pipeline,
                                &verdict.image,
                                now,
                                detail.as_deref(),
                            )?;
                            "deleted from the store".to_string()
                        }
                        // A child stored since we looked, or a disk problem: keep going.
                        Err(e) => {
                            history.mark_deprecated(pipeline, &verdict.image, now)?;
                            report
                                .warnings
                                .push(format!("could not delete {}: {e}", verdict.image));
                            format!("not deleted: {e}")
                        }
                    }
                }
            },
        };
        report.actions.push(Action {
            verdict,
            done,
            remote,
        });
    }
    Ok(report)
}

/// [`apply`] with the pipeline's own `lifecycle:` settings; an empty report when it has none
/// (every image is kept).
pub fn apply_pipeline(
    store: &Store,
    history: &History,
    pipeline: &super::model::Pipeline,
    clock: &dyn Clock,
    protected_refs: &[String],
) -> Result<Report, LifecycleError> {
    match &pipeline.lifecycle {
        Some(l) => apply(
            store,
            history,
            &pipeline.name,
            &Policy::from(l),
            clock,
            protected_refs,
        ),
        None => Ok(Report {
            pipeline: pipeline.name.clone(),
            ..Report::default()
        }),
    }
}

/// Delete the copies distribution made of `image`, where the target allows it, as recorded in
/// the build's receipts. Never fails: each receipt gets a note.
pub fn delete_remote(image: &StoredImage) -> Vec<RemoteNote> {
    let path = image.dir.join(RECEIPTS_FILE);
    let receipts: Vec<Receipt> = match fs_err::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                return vec![RemoteNote {
                    kind: "receipts".into(),
                    location: path.display().to_string(),
                    outcome: RemoteOutcome::Failed(format!("unreadable: {e}")),
                }];
            }
        },
        // Never distributed: nothing remote.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            return vec![RemoteNote {
                kind: "receipts".into(),
                location: path.display().to_string(),
                outcome: RemoteOutcome::Failed(e.to_string()),
            }];
        }
    };
    receipts
        .into_iter()
        .map(|r| {
            let outcome = match r.kind.as_str() {
                "store" => RemoteOutcome::Local,
                "directory" => delete_directory_copy(image, Path::new(&r.location)),
                "oci" | "containerdisk" => RemoteOutcome::NotSupported(
                    "builder does not delete registry manifests; delete the tag with the \
                     registry's tools"
                        .into(),
                ),
                "ami" => RemoteOutcome::NotSupported(
                    "builder does not deregister AMIs; deregister it and delete its snapshot in \
                     EC2"
                    .into(),
                ),
                "vagrant" => RemoteOutcome::NotSupported(
                    "a box file may be added to Vagrant already; remove it with `vagrant box \
                     remove`"
                        .into(),
                ),
                other => RemoteOutcome::NotSupported(format!("unknown target kind `{other}`")),
            };
            RemoteNote {
                kind: r.kind,
                location: r.location,
                outcome,
            }
        })
        .collect()
}

/// A `directory` copy is a folder holding the outputs and a copy of the manifest: delete it
/// only if that manifest still names this build (never a folder someone reused).
fn delete_directory_copy(image: &StoredImage, dir: &Path) -> RemoteOutcome {
    let manifest = dir.join(MANIFEST_FILE);
    match crate::store::Manifest::read(&manifest) {
        Ok(m) if m.image.to_string() == image.reference() => {}
        Ok(m) => {
            return RemoteOutcome::Failed(format!(
                "its manifest names {}, not this build",
                m.image
            ));
        }
        Err(_) if !dir.exists() => return RemoteOutcome::Deleted,
        Err(e) => return RemoteOutcome::Failed(format!("no readable manifest there: {e}")),
    }
    // Rename first so a reader never sees half a folder, then delete.
    let trash: PathBuf = dir.with_file_name(format!(
        ".{}.deleting-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    match fs_err::rename(dir, &trash).and_then(|()| fs_err::remove_dir_all(&trash)) {
        Ok(()) => RemoteOutcome::Deleted,
        Err(e) => RemoteOutcome::Failed(e.to_string()),
    }
}

/// `3d 4h`, `45m`, `10s`: durations as people read them.
pub fn human_duration(d: TimeDelta) -> String {
    let secs = d.num_seconds();
    let (sign, secs) = if secs < 0 { ("-", -secs) } else { ("", secs) };
    let (days, hours, mins) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    let text = match (days, hours, mins) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d {h}h"),
    };
    format!("{sign}{text}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::FixedClock;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("test time")
    }

    const NOW: &str = "2026-11-21T12:00:00Z";

    /// Images made `days` days before NOW, named `web/1.0.0/<n>` in order of age (1 oldest).
    fn images(days_old: &[i64]) -> Vec<Candidate> {
        days_old
            .iter()
            .enumerate()
            .map(|(i, d)| Candidate {
                image: format!("web/1.0.0/{}", i + 1),
                created: t(NOW) - TimeDelta::days(*d),
                deprecated_at: None,
                protections: Vec::new(),
            })
            .collect()
    }

    fn actions(verdicts: &[Verdict]) -> Vec<(String, &'static str)> {
        verdicts
            .iter()
            .map(|v| {
                let a = match v.decision {
                    Decision::Keep { .. } => "keep",
                    Decision::Deprecate { .. } => "deprecate",
                    Decision::StayDeprecated { .. } => "deprecated",
                    Decision::Delete => "delete",
                    Decision::Protected { .. } => "protected",
                };
                (v.image.clone(), a)
            })
            .collect()
    }

    fn pairs(list: &[(&str, &'static str)]) -> Vec<(String, &'static str)> {
        list.iter().map(|(i, a)| (i.to_string(), *a)).collect()
    }

    #[test]
    fn keep_last_counts_from_the_newest() {
        let policy = Policy {
            keep_last: Some(2),
            delete_after: Some(TimeDelta::days(7)),
            ..Policy::default()
        };
        let v = evaluate(&policy, &images(&[30, 20, 10, 1]), &FixedClock(t(NOW)));
        assert_eq!(
            actions(&v),
            pairs(&[
                ("web/1.0.0/4", "keep"),
                ("web/1.0.0/3", "keep"),
                ("web/1.0.0/2", "deprecate"),
                ("web/1.0.0/1", "deprecate"),
            ])
        );
        assert_eq!(
            v[2].decision,
            Decision::Deprecate {
                delete_at: Some(t(NOW) + TimeDelta::days(7))
            }
        );
        assert_eq!(
            v[0].decision,
            Decision::Keep {
                rule: KeepRule::KeepLast {
                    rank: 1,
                    keep_last: 2
                },
                undeprecate: false
            }
        );
    }

    #[test]
    fn ages_keep_the_young_and_retain_at_least_keeps_the_newest_old_ones() {
        let policy = Policy {
            keep_younger_than: Some(TimeDelta::days(14)),
            retain_at_least: 2,
            delete_after: Some(TimeDelta::zero()),
            ..Policy::default()
        };
        // Only one image is young: retainAtLeast keeps the next newest too.
        let v = evaluate(&policy, &images(&[40, 30, 20, 3]), &FixedClock(t(NOW)));
        assert_eq!(
            actions(&v),
            pairs(&[
                ("web/1.0.0/4", "keep"),
                ("web/1.0.0/3", "keep"),
                ("web/1.0.0/2", "delete"),
                ("web/1.0.0/1", "delete"),
            ])
        );
        assert!(matches!(
            v[1].decision,
            Decision::Keep {
                rule: KeepRule::RetainAtLeast { rank: 2, .. },
                ..
            }
        ));
        // All old: still the newest two stay.
        let v = evaluate(&policy, &images(&[40, 30, 20]), &FixedClock(t(NOW)));
        assert_eq!(
            actions(&v),
            pairs(&[
                ("web/1.0.0/3", "keep"),
                ("web/1.0.0/2", "keep"),
                ("web/1.0.0/1", "delete"),
            ])
        );
        // An image exactly at the limit is not younger than it.
        let policy = Policy {
            keep_younger_than: Some(TimeDelta::days(20)),
            retain_at_least: 1,
            ..policy
        };
        let v = evaluate(&policy, &images(&[20, 19]), &FixedClock(t(NOW)));
        assert_eq!(
            actions(&v),
            pairs(&[("web/1.0.0/2", "keep"), ("web/1.0.0/1", "delete")])
        );
    }

    #[test]
    fn either_rule_keeps_an_image() {
        let policy = Policy {
            keep_last: Some(1),
            keep_younger_than: Some(TimeDelta::days(7)),
            ..Policy::default()
        };
        let v = evaluate(&policy, &images(&[30, 5, 2]), &FixedClock(t(NOW)));
        assert_eq!(
            actions(&v),
            pairs(&[
                ("web/1.0.0/3", "keep"),
                ("web/1.0.0/2", "keep"),
                ("web/1.0.0/1", "deprecate"),
            ])
        );
        assert!(matches!(
            v[1].decision,
            Decision::Keep {
                rule: KeepRule::YoungerThan { .. },
                ..
            }
        ));
    }

    #[test]
    fn deletion_waits_for_the_grace_period_as_the_clock_moves() {
        let policy = Policy {
            keep_last: Some(1),
            delete_after: Some(TimeDelta::days(7)),
            ..Policy::default()
        };
        let mut imgs = images(&[30, 1]);
        let deprecated = t(NOW);
        imgs[0].deprecated_at = Some(deprecated);
        let at = |days: i64| FixedClock(t(NOW) + TimeDelta::days(days));
        let v = evaluate(&policy, &imgs, &at(6));
        assert_eq!(
            v[1].decision,
            Decision::StayDeprecated {
                delete_at: Some(deprecated + TimeDelta::days(7))
            }
        );
        let v = evaluate(&policy, &imgs, &at(7));
        assert_eq!(v[1].decision, Decision::Delete);
        // Deprecate only: never deleted.
        let never = Policy {
            delete_after: None,
            ..policy
        };
        let v = evaluate(&never, &imgs, &at(1000));
        assert_eq!(v[1].decision, Decision::StayDeprecated { delete_at: None });
        // Kept again under a looser policy: the deprecation is lifted.
        let looser = Policy {
            keep_last: Some(5),
            ..never
        };
        let v = evaluate(&looser, &imgs, &at(1));
        assert!(matches!(
            v[1].decision,
            Decision::Keep {
                undeprecate: true,
                ..
            }
        ));
    }

    #[test]
    fn a_protected_image_is_deprecated_but_never_deleted() {
        let policy = Policy {
            keep_last: Some(1),
            delete_after: Some(TimeDelta::zero()),
            ..Policy::default()
        };
        let mut imgs = images(&[30, 20, 1]);
        imgs[0].protections.push(Protection::ParentOf {
            images: vec!["db/1.0.0/1".into()],
        });
        imgs[1].protections.push(Protection::ReferencedBy {
            reference: "web/1.x.x".into(),
        });
        let v = evaluate(&policy, &imgs, &FixedClock(t(NOW)));
        assert_eq!(
            actions(&v),
            pairs(&[
                ("web/1.0.0/3", "keep"),
                ("web/1.0.0/2", "protected"),
                ("web/1.0.0/1", "protected"),
            ])
        );
        match &v[2].decision {
            Decision::Protected { protections } => {
                assert_eq!(protections[0].to_string(), "it is the parent of db/1.0.0/1")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_policy_without_a_keep_rule_is_refused_and_keeps_everything() {
        let policy = Policy::default();
        assert!(matches!(policy.validate(), Err(LifecycleError::NoKeepRule)));
        let v = evaluate(&policy, &images(&[300, 200, 100]), &FixedClock(t(NOW)));
        assert!(actions(&v).iter().all(|(_, a)| *a == "keep"), "{v:?}");
        assert!(
            Policy {
                keep_last: Some(0),
                ..Policy::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Policy {
                keep_last: Some(3),
                ..Policy::default()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn the_pipeline_files_settings_become_a_policy() {
        let l = crate::pipeline::model::Lifecycle {
            keep_last: Some(4),
            max_age: Some(std::time::Duration::from_secs(30 * 86_400)),
            deprecate_for: std::time::Duration::from_secs(7 * 86_400),
            remote: true,
        };
        let p = Policy::from(&l);
        assert_eq!(
            p,
            Policy {
                keep_last: Some(4),
                keep_younger_than: Some(TimeDelta::days(30)),
                retain_at_least: 1,
                delete_after: Some(TimeDelta::days(7)),
                remote: true,
            }
        );
        assert!(p.validate().is_ok());
        // `deprecateFor: 0s` deletes as soon as no rule keeps an image.
        let at_once = Policy::from(&crate::pipeline::model::Lifecycle {
            keep_last: Some(1),
            max_age: None,
            deprecate_for: std::time::Duration::ZERO,
            remote: false,
        });
        let v = evaluate(&at_once, &images(&[3, 2, 1]), &FixedClock(t(NOW)));
        assert_eq!(
            actions(&v),
            pairs(&[
                ("web/1.0.0/3", "keep"),
                ("web/1.0.0/2", "delete"),
                ("web/1.0.0/1", "delete"),
            ])
        );
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human_duration(TimeDelta::days(3)), "3d");
        assert_eq!(human_duration(TimeDelta::hours(27)), "1d 3h");
        assert_eq!(human_duration(TimeDelta::minutes(90)), "1h 30m");
        assert_eq!(human_duration(TimeDelta::seconds(5)), "5s");
    }
}
