//! The undo list: every resource a stage creates (a process, a file, a folder, a socket) is
//! registered here right after it exists, with a label a person can read. The list unwinds
//! in reverse on success, error, timeout, Ctrl-C and SIGTERM (dropping the owner of the list
//! unwinds it, so a cancelled future cleans up too). A failed undo is a warning that names
//! what was left; it never replaces the error that caused the unwinding.

/// Why the list unwinds: with `keep_on_failure`, resources marked keepable survive a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

type Action = Box<dyn FnOnce() -> Result<(), String> + Send>;

struct Entry {
    label: String,
    /// `Some(note)`: kept after a failure when keep-on-failure is on; the note says where it
    /// is and how to remove it.
    keep_note: Option<String>,
    action: Action,
}

/// What unwinding did not do: undos that failed, and resources kept on purpose.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnwindReport {
    /// "could not <label>: <why>": resources that may be left behind.
    pub failed: Vec<String>,
    /// Notes on resources kept because of keep-on-failure, with how to remove them.
    pub kept: Vec<String>,
}

impl UnwindReport {
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty() && self.kept.is_empty()
    }

    /// Print the report to stderr as `warning:` / `note:` lines.
    pub fn print(&self) {
        for f in &self.failed {
            eprintln!("warning: {f}");
        }
        for k in &self.kept {
            eprintln!("note: {k}");
        }
    }
}

/// A stack of undo actions. Unwinds in reverse order of registration.
#[derive(Default)]
pub struct UndoList {
    entries: Vec<Entry>,
    keep_on_failure: bool,
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
    pub fn new(keep_on_failure: bool) -> Self {
        Self {
            entries: Vec::new(),
            keep_on_failure,
        }
    }

    /// Register how to undo a resource just created. `label` reads as an action:
    /// "stop QEMU pid 4242", "remove folder /tmp/builder-vm-x".
    pub fn push(
        &mut self,
        label: impl Into<String>,
        action: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) {
        self.entries.push(Entry {
            label: label.into(),
            keep_note: None,
            action: Box::new(action),
        });
    }

    /// Like [`UndoList::push`], for a resource that keep-on-failure keeps after a failure.
    /// `keep_note` tells the user what was kept and how to remove it.
    pub fn push_keepable(
        &mut self,
        label: impl Into<String>,
        keep_note: impl Into<String>,
        action: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) {
        self.entries.push(Entry {
            label: label.into(),
            keep_note: Some(keep_note.into()),
            action: Box::new(action),
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
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(action)) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => report.failed.push(format!("could not {label}: {why}")),
                Err(_) => report
                    .failed
                    .push(format!("could not {label}: it panicked")),
            }
        }
        report
    }
}

impl Drop for UndoList {
    /// An owner that did not unwind explicitly failed or was cancelled: unwind as a failure and
    /// say what was left, since there is nobody to return the report to.
    fn drop(&mut self) {
        if !self.entries.is_empty() {
            self.unwind(Outcome::Failure).print();
        }
    }
}

/// An undo action that removes a folder and everything in it (already gone is fine).
pub fn remove_dir(path: std::path::PathBuf) -> impl FnOnce() -> Result<(), String> + Send {
    move || match std::fs::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{e} (left: {})", path.display())),
    }
}

/// An undo action that removes one file (already gone is fine).
pub fn remove_file(path: std::path::PathBuf) -> impl FnOnce() -> Result<(), String> + Send {
    move || match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{e} (left: {})", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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
        let mut undo = UndoList::new(false);
        undo.push("first", make("first"));
        undo.push("break", || Err("disk on fire".into()));
        undo.push("panic", || panic!("boom"));
        undo.push("last", make("last"));
        let report = undo.unwind(Outcome::Success);
        assert_eq!(*log.lock().expect("not poisoned"), vec!["last", "first"]);
        assert_eq!(
            report.failed,
            vec![
                "could not panic: it panicked".to_string(),
                "could not break: disk on fire".to_string()
            ]
        );
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
            let mut undo = UndoList::new(keep);
            undo.push_keepable("remove dir", "kept dir: rm -rf it", make("dir"));
            undo.push("stop process", make("process"));
            let report = undo.unwind(outcome);
            assert_eq!(*log.lock().expect("not poisoned"), expect_ran);
            assert_eq!(report.kept.len(), expect_kept);
        }
    }

    #[test]
    fn drop_unwinds_what_was_not_unwound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sub = dir.path().join("vm");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(sub.join("disk"), b"x").expect("write");
        {
            let mut undo = UndoList::new(false);
            undo.push(
                format!("remove folder {}", sub.display()),
                remove_dir(sub.clone()),
            );
        }
        assert!(!sub.exists());
    }
}
