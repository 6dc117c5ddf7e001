//! The undo list: every resource a stage creates (a process, a file, a folder, a socket) is
//! registered here right after it exists, with a label a person can read. The list unwinds
//! in reverse on success, error, timeout, Ctrl-C and SIGTERM (dropping the owner of the list
//! unwinds it, so a cancelled future cleans up too). A failed undo is a warning that names
//! what was left; it never replaces the error that caused the unwinding.
//!
//! Nothing here prints: [`UndoList::unwind`] returns its [`UnwindReport`], and a list unwound
//! by `Drop` adds its report to the [`Leftovers`] it was made with, which its owner's owner
//! (a build, a `builder vm` command) reads and reports. Depends on nothing else in the crate.

use std::sync::{Arc, Mutex};

/// Why an undo action failed: any error, its causes kept.
pub type UndoError = Box<dyn std::error::Error + Send + Sync>;

/// Why the list unwinds: with `keep_on_failure`, resources marked keepable survive a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

type Action = Box<dyn FnOnce() -> Result<(), UndoError> + Send>;

struct Entry {
    label: String,
    /// `Some(note)`: kept after a failure when keep-on-failure is on; the note says where it
    /// is and how to remove it.
    keep_note: Option<String>,
    action: Action,
}

/// An undo that failed: what it was to do, and why it could not (a resource that may be left
/// behind).
#[derive(Debug, Clone)]
pub struct UndoFailure {
    /// What the undo was to do: "stop QEMU pid 4242".
    pub label: String,
    /// Why it could not (shared, so a report can be cloned).
    pub cause: Arc<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for UndoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "could not {}", self.label)
    }
}

impl std::error::Error for UndoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

impl UndoFailure {
    /// The warning a person reads: "could not <label>: <cause>: <its cause>…".
    pub fn warning(&self) -> String {
        let mut text = self.to_string();
        let mut cause: Option<&dyn std::error::Error> = Some(&*self.cause);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        text
    }
}

/// What unwinding did not do: undos that failed, and resources kept on purpose.
#[derive(Debug, Default, Clone)]
pub struct UnwindReport {
    /// Undos that failed: resources that may be left behind.
    pub failed: Vec<UndoFailure>,
    /// Notes on resources kept because of keep-on-failure, with how to remove them.
    pub kept: Vec<String>,
}

impl UnwindReport {
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty() && self.kept.is_empty()
    }

    /// Each failed undo as a warning ([`UndoFailure::warning`]).
    pub fn warnings(&self) -> Vec<String> {
        self.failed.iter().map(UndoFailure::warning).collect()
    }

    /// Add `other`'s failures and notes after this report's.
    pub fn append(&mut self, mut other: UnwindReport) {
        self.failed.append(&mut other.failed);
        self.kept.append(&mut other.kept);
    }
}

/// Where the reports of lists unwound by `Drop` go (an owner that failed or was cancelled has
/// nobody to return them to). Clones share one report; whoever made it takes it and tells
/// the user.
#[derive(Debug, Clone, Default)]
pub struct Leftovers(Arc<Mutex<UnwindReport>>);

impl Leftovers {
    pub fn add(&self, report: UnwindReport) {
        match self.0.lock() {
            Ok(mut r) => r.append(report),
            Err(poisoned) => poisoned.into_inner().append(report),
        }
    }

    /// Everything added so far; empties it.
    pub fn take(&self) -> UnwindReport {
        match self.0.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

/// A stack of undo actions. Unwinds in reverse order of registration.
#[derive(Default)]
pub struct UndoList {
    entries: Vec<Entry>,
    keep_on_failure: bool,
    leftovers: Leftovers,
}

impl std::fmt::Debug for UndoList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UndoList")
            .field("labels", &self.labels())
            .field("keep_on_failure", &self.keep_on_failure)
            .finish()
    }
}

impl UndoList {
    /// An empty list. If it is dropped before it is unwound, it unwinds as a failure and adds
    /// its report to `leftovers`.
    pub fn new(keep_on_failure: bool, leftovers: Leftovers) -> Self {
        Self {
            entries: Vec::new(),
            keep_on_failure,
            leftovers,
        }
    }

    /// Register how to undo a resource just created. `label` reads as an action:
    /// "stop QEMU pid 4242", "remove folder /tmp/builder-vm-x".
    pub fn push<E: Into<UndoError>>(
        &mut self,
        label: impl Into<String>,
        action: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) {
        self.entry(label.into(), None, action);
    }

    /// Like [`UndoList::push`], for a resource that keep-on-failure keeps after a failure.
    /// `keep_note` tells the user what was kept and how to remove it.
    pub fn push_keepable<E: Into<UndoError>>(
        &mut self,
        label: impl Into<String>,
        keep_note: impl Into<String>,
        action: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) {
        self.entry(label.into(), Some(keep_note.into()), action);
    }

    fn entry<E: Into<UndoError>>(
        &mut self,
        label: String,
        keep_note: Option<String>,
        action: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) {
        self.entries.push(Entry {
            label,
            keep_note,
            action: Box::new(move || action().map_err(Into::into)),
        });
    }

    /// The labels of what is registered, oldest first.
    pub fn labels(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.label.as_str()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Move every entry of `other` on top of this list (they will be undone first).
    pub fn absorb(&mut self, mut other: UndoList) {
        self.entries.append(&mut other.entries);
    }

    /// Run every undo, newest first. Every undo runs even when one fails or panics.
    pub fn unwind(&mut self, outcome: Outcome) -> UnwindReport {
        let mut report = UnwindReport::default();
        while let Some(entry) = self.entries.pop() {
            if outcome == Outcome::Failure
                && self.keep_on_failure
                && let Some(note) = entry.keep_note
            {
                report.kept.push(note);
                continue;
            }
            let label = entry.label;
            let action = entry.action;
            let source: UndoError =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(action)) {
                    Ok(Ok(())) => continue,
                    Ok(Err(why)) => why,
                    Err(_) => "it panicked".into(),
                };
            report.failed.push(UndoFailure {
                label,
                cause: source.into(),
            });
        }
        report
    }
}

impl Drop for UndoList {
    /// An owner that did not unwind explicitly failed or was cancelled: unwind as a failure and
    /// leave the report in the list's [`Leftovers`].
    fn drop(&mut self) {
        if !self.entries.is_empty() {
            let report = self.unwind(Outcome::Failure);
            self.leftovers.add(report);
        }
    }
}

/// Why a [`remove_dir`] undo failed.
#[derive(Debug, thiserror::Error)]
#[error("{} is left", path.display())]
pub struct RemoveError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// An undo action that removes a folder and everything in it (already gone is fine).
pub fn remove_dir(path: std::path::PathBuf) -> impl FnOnce() -> Result<(), RemoveError> + Send {
    move || match fs_err::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RemoveError { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> (Arc<Mutex<Vec<String>>>, impl Fn(&str) -> Action) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let make = move |name: &str| {
            let l = l.clone();
            let name = name.to_string();
            Box::new(move || {
                l.lock().expect("not poisoned").push(name);
                Ok(())
            }) as Action
        };
        (log, make)
    }

    #[test]
    fn unwinds_in_reverse_and_reports_failures_without_stopping() {
        let (log, make) = recorder();
        let mut undo = UndoList::new(false, Leftovers::default());
        undo.push("first", make("first"));
        undo.push("break", || {
            Err(RemoveError {
                path: "/disk".into(),
                source: std::io::Error::other("disk on fire"),
            })
        });
        undo.push("panic", || -> Result<(), UndoError> { panic!("boom") });
        undo.push("last", make("last"));
        let report = undo.unwind(Outcome::Success);
        assert_eq!(*log.lock().expect("not poisoned"), vec!["last", "first"]);
        assert_eq!(
            report.warnings(),
            [
                "could not panic: it panicked",
                "could not break: /disk is left: disk on fire"
            ]
        );
        // The cause chain is kept, not flattened into the message.
        let cause = std::error::Error::source(&report.failed[1]).expect("a source");
        assert!(cause.downcast_ref::<RemoveError>().is_some(), "{cause:?}");
        assert!(undo.is_empty());
    }

    #[test]
    fn keep_on_failure_keeps_only_keepable_and_only_on_failure() {
        for (keep, outcome, expect_ran, expect_kept) in [
            (true, Outcome::Failure, vec!["process"], 1),
            (true, Outcome::Success, vec!["process", "dir"], 0),
            (false, Outcome::Failure, vec!["process", "dir"], 0),
        ] {
            let (log, make) = recorder();
            let mut undo = UndoList::new(keep, Leftovers::default());
            undo.push_keepable("remove dir", "kept dir: rm -rf it", make("dir"));
            undo.push("stop process", make("process"));
            let report = undo.unwind(outcome);
            assert_eq!(*log.lock().expect("not poisoned"), expect_ran);
            assert_eq!(report.kept.len(), expect_kept);
        }
    }

    #[test]
    fn drop_unwinds_what_was_not_unwound_into_its_leftovers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sub = dir.path().join("vm");
        fs_err::create_dir(&sub).expect("mkdir");
        fs_err::write(sub.join("disk"), b"x").expect("write");
        let leftovers = Leftovers::default();
        {
            let mut undo = UndoList::new(true, leftovers.clone());
            undo.push(
                format!("remove folder {}", sub.display()),
                remove_dir(sub.clone()),
            );
            undo.push_keepable(
                "remove the disk",
                "kept the disk",
                || Ok::<_, UndoError>(()),
            );
            undo.push("stop QEMU pid 1", || Err("no such process"));
        }
        assert!(!sub.exists());
        let report = leftovers.take();
        assert_eq!(
            report.warnings(),
            ["could not stop QEMU pid 1: no such process"]
        );
        assert_eq!(report.kept, ["kept the disk"]);
        assert!(leftovers.take().is_clean(), "take empties it");
    }
}
