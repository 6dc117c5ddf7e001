//! The pipeline history: every execution of every pipeline (why it ran or was skipped, each
//! status it went through, the image it made, where its manifest and logs are), the next
//! scheduled run of each pipeline, and the lifecycle marks of the images pipelines produced.
//!
//! One SQLite file (`<store>/pipelines.sqlite`) in WAL mode with a busy timeout, so the
//! scheduler writes while `builder pipeline status` and other builder processes read, and two
//! writers wait for each other instead of failing. Writes take the write lock up front
//! (`BEGIN IMMEDIATE`): a read that later upgrades to a write can fail with "database is
//! locked" no matter the timeout. A scheduled run is unique per `(pipeline, due)` (a
//! constraint, not a check in code), so a restarted scheduler never runs the same slot twice.
//!
//! It records; it never builds, schedules or deletes anything.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::{Clock, SystemClock};
use crate::store::Store;

/// The history's file name in the store folder.
pub const HISTORY_FILE: &str = "pipelines.sqlite";

/// How long a writer waits for another process's write to finish before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Run `op` again while SQLite answers "database is locked" without waiting, within
/// [`BUSY_TIMEOUT`]. The busy timeout covers waiting for a lock, but not the case where
/// waiting could deadlock: switching a new file to WAL needs an exclusive lock while every
/// other connection opening it at the same moment holds a shared one, so SQLite fails all
/// but one at once (SQLITE_BUSY) instead of calling the busy handler. Eight schedulers opening
/// a new history together hit it (tests/pipeline_history.rs).
fn busy_retry<T>(mut op: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        match op() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// Each entry brings the schema from the previous version to the next; the file records how
/// many were applied. Append only: never edit a shipped migration.
const MIGRATIONS: &[&str] = &[
    // 1: executions, their transitions, next runs, image lifecycle marks.
    "CREATE TABLE executions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        pipeline TEXT NOT NULL,
        trigger TEXT NOT NULL CHECK (trigger IN ('manual', 'schedule')),
        due TEXT,
        reason TEXT NOT NULL,
        status TEXT NOT NULL,
        created TEXT NOT NULL,
        started TEXT,
        finished TEXT,
        image TEXT,
        build_id TEXT,
        manifest TEXT,
        logs TEXT,
        error TEXT,
        inputs TEXT,
        runner_pid INTEGER,
        runner_host TEXT,
        runner_start INTEGER,
        -- NULLs are distinct in SQLite: manual runs (due NULL) never collide.
        UNIQUE (pipeline, due)
    );
    CREATE INDEX executions_by_pipeline ON executions (pipeline, id);
    CREATE TABLE transitions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        execution INTEGER NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        at TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX transitions_by_execution ON transitions (execution, seq);
    CREATE TABLE pipelines (
        name TEXT PRIMARY KEY,
        next_run TEXT
    );
    CREATE TABLE image_marks (
        image TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        deprecated_at TEXT,
        deleted_at TEXT,
        detail TEXT
    );",
];

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The folder for the history file could not be created; the io error names it.
    #[error("could not create the pipeline history's folder")]
    Folder(#[source] std::io::Error),
    /// SQLite could not open or set up the file.
    #[error("could not open the pipeline history {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// WAL needs shared memory between processes, which some network file systems lack.
    #[error(
        "the pipeline history {path} cannot use WAL mode (SQLite kept `{mode}`); put the \
         store on a local file system"
    )]
    NoWal { path: PathBuf, mode: String },
    /// A newer builder migrated the file past what this one understands.
    #[error(
        "the pipeline history {path} has schema version {found}, but this builder knows \
         versions up to {known}; use a newer builder"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    /// A query failed (disk full, file removed, a lock held past the busy timeout).
    #[error("could not {what} in the pipeline history {path}")]
    Sql {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("there is no execution {0} in the pipeline history")]
    NoExecution(ExecutionId),
    #[error("execution {id} already finished as `{status}`; it cannot become `{wanted}`")]
    Finished {
        id: ExecutionId,
        status: ExecStatus,
        wanted: ExecStatus,
    },
    #[error("`{0}` does not finish an execution (use available, failed, cancelled or skipped)")]
    NotTerminal(ExecStatus),
    #[error("the pipeline history holds `{value}` in {column}, which this builder cannot read")]
    Corrupt { column: &'static str, value: String },
}

/// The id of one execution (a number, handed out once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(pub i64);

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why an execution exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Trigger {
    /// `builder pipeline run`, or anything else a person started.
    Manual,
    /// The schedule's slot at `due` (unique per pipeline).
    Schedule { due: DateTime<Utc> },
}

impl Trigger {
    pub fn due(&self) -> Option<DateTime<Utc>> {
        match self {
            Trigger::Manual => None,
            Trigger::Schedule { due } => Some(*due),
        }
    }
}

/// The status of an execution (Image Builder's image states, without those only lifecycle
/// reaches: deprecation is an image mark here, see [`ImageMark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecStatus {
    Pending,
    Building,
    Testing,
    Distributing,
    Available,
    Failed,
    Cancelled,
    Skipped,
}

impl ExecStatus {
    pub const ALL: [ExecStatus; 8] = [
        ExecStatus::Pending,
        ExecStatus::Building,
        ExecStatus::Testing,
        ExecStatus::Distributing,
        ExecStatus::Available,
        ExecStatus::Failed,
        ExecStatus::Cancelled,
        ExecStatus::Skipped,
    ];

    /// Nothing follows this status.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ExecStatus::Available
                | ExecStatus::Failed
                | ExecStatus::Cancelled
                | ExecStatus::Skipped
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Pending => "pending",
            ExecStatus::Building => "building",
            ExecStatus::Testing => "testing",
            ExecStatus::Distributing => "distributing",
            ExecStatus::Available => "available",
            ExecStatus::Failed => "failed",
            ExecStatus::Cancelled => "cancelled",
            ExecStatus::Skipped => "skipped",
        }
    }
}

impl fmt::Display for ExecStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status is not one of the names above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not an execution status (pending, building, testing, distributing, available, failed, cancelled, skipped)"
)]
pub struct UnknownStatus(pub String);

impl FromStr for ExecStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExecStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// The process running an execution (its pid, host and start time); one home with the
/// store's build locks, which tell abandoned builds from live ones the same way.
pub use crate::store::Runner;

/// One status an execution went through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub status: ExecStatus,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One execution of a pipeline, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    pub id: ExecutionId,
    pub pipeline: String,
    pub trigger: Trigger,
    /// Why it ran (or why it was skipped).
    pub reason: String,
    pub status: ExecStatus,
    pub created: DateTime<Utc>,
    /// When it left `pending`.
    pub started: Option<DateTime<Utc>>,
    /// When it reached a terminal status.
    pub finished: Option<DateTime<Utc>>,
    /// `name/x.y.z/n` of the image it made (or is making, once the store handed it out).
    pub image: Option<String>,
    /// The store's build id (its `staging/<build-id>` folder while it builds), once known.
    pub build_id: Option<String>,
    pub manifest: Option<PathBuf>,
    pub logs: Option<PathBuf>,
    pub error: Option<String>,
    /// Digests of the inputs it was built from (what the dependency check compares).
    pub inputs: Option<serde_json::Value>,
    pub runner: Option<Runner>,
    /// Every status it went through, oldest first (the first is `pending` or `skipped`).
    pub transitions: Vec<Transition>,
}

impl Execution {
    /// The scheduled slot it ran for; `None` when started by hand.
    pub fn due(&self) -> Option<DateTime<Utc>> {
        self.trigger.due()
    }
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Must be terminal; `None` is read as `failed` if `error` is set, else `available`.
    pub status: Option<ExecStatus>,
    pub image: Option<String>,
    pub manifest: Option<PathBuf>,
    pub logs: Option<PathBuf>,
    pub error: Option<String>,
    pub inputs: Option<serde_json::Value>,
}

impl Outcome {
    /// A build that produced `image`.
    pub fn available(image: impl Into<String>) -> Outcome {
        Outcome {
            status: Some(ExecStatus::Available),
            image: Some(image.into()),
            ..Outcome::default()
        }
    }

    /// A build that failed with `error`.
    pub fn failed(error: impl Into<String>) -> Outcome {
        Outcome {
            status: Some(ExecStatus::Failed),
            error: Some(error.into()),
            ..Outcome::default()
        }
    }

    /// A build stopped on request (SIGTERM, Ctrl-C).
    pub fn cancelled(why: impl Into<String>) -> Outcome {
        Outcome {
            status: Some(ExecStatus::Cancelled),
            error: Some(why.into()),
            ..Outcome::default()
        }
    }

    fn final_status(&self) -> ExecStatus {
        self.status.unwrap_or(if self.error.is_some() {
            ExecStatus::Failed
        } else {
            ExecStatus::Available
        })
    }
}

/// An image a pipeline produced (an `available` execution with an image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProducedImage {
    /// `name/x.y.z/n`.
    pub image: String,
    pub execution: ExecutionId,
    /// When the execution finished (the image's age for lifecycle rules).
    pub finished: DateTime<Utc>,
}

/// What lifecycle did to an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMark {
    pub image: String,
    pub pipeline: String,
    pub deprecated_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// What happened, in words (remote deletions, why a deletion did not happen).
    pub detail: Option<String>,
}

/// The pipeline history (one SQLite file). Cheap to share: `Send + Sync`; calls from many
/// threads take turns on one connection, many processes take turns on the file.
pub struct History {
    conn: Mutex<Connection>,
    path: PathBuf,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("path", &self.path).finish()
    }
}

impl History {
    /// `<store>/pipelines.sqlite`.
    pub fn default_path(store: &Store) -> PathBuf {
        store.root().join(HISTORY_FILE)
    }

    /// Open the history at `path`, creating it (and its folder) or migrating it to the current
    /// schema as needed.
    pub fn open(path: &Path) -> Result<History, HistoryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs_err::create_dir_all(dir).map_err(HistoryError::Folder)?;
        }
        let open_err = |source| HistoryError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // WAL: readers never block the writer nor the other way round. The mode is stored in
        // the file, so this only changes something the first time.
        let mode: String =
            busy_retry(|| conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)))
                .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(HistoryError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;")
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        Ok(History {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            clock: Arc::new(SystemClock),
        })
    }

    /// The history at `path` if the file exists; `None` (nothing created) otherwise. For
    /// readers such as `builder images list` that should not create a history.
    pub fn open_existing(path: &Path) -> Result<Option<History>, HistoryError> {
        if path.exists() {
            History::open(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Read the time for every timestamp from `clock` (tests with a fake clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> History {
        self.clock = clock;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (every write is a
        // transaction), so a poisoned lock is still usable.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> HistoryError + '_ {
        move |source| HistoryError::Sql {
            what,
            path: self.path.clone(),
            source,
        }
    }

    /// Start recording an execution (status `pending`, run by this process). `None` if a
    /// scheduled execution for that `(pipeline, due)` already exists: that slot was taken,
    /// by this scheduler before a restart or by another one.
    pub fn begin(
        &self,
        pipeline: &str,
        trigger: Trigger,
        reason: &str,
    ) -> Result<Option<ExecutionId>, HistoryError> {
        self.insert(pipeline, trigger, reason, ExecStatus::Pending)
    }

    /// Record that an execution was not run (the start condition did not hold), with why.
    /// For a scheduled slot this takes the slot: a restart does not evaluate it again. A slot
    /// already recorded is left as it is.
    pub fn skip(&self, pipeline: &str, trigger: Trigger, reason: &str) -> Result<(), HistoryError> {
        self.insert(pipeline, trigger, reason, ExecStatus::Skipped)
            .map(|_| ())
    }

    fn insert(
        &self,
        pipeline: &str,
        trigger: Trigger,
        reason: &str,
        status: ExecStatus,
    ) -> Result<Option<ExecutionId>, HistoryError> {
        let now = ts(self.clock.now());
        let runner = Runner::current();
        let (kind, due) = match trigger {
            Trigger::Manual => ("manual", None),
            Trigger::Schedule { due } => ("schedule", Some(ts(due))),
        };
        let finished = status.is_terminal().then(|| now.clone());
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("start a transaction"))?;
        let inserted = tx
            .execute(
                "INSERT INTO executions (pipeline, trigger, due, reason, status, created, finished,
                     runner_pid, runner_host, runner_start)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (pipeline, due) DO NOTHING",
                params![
                    pipeline,
                    kind,
                    due,
                    reason,
                    status.as_str(),
                    now,
                    finished,
                    runner.pid,
                    runner.host,
                    runner.start_ticks.map(|t| t as i64),
                ],
            )
            .map_err(self.sql("record an execution"))?;
        if inserted == 0 {
            return Ok(None);
        }
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO transitions (execution, status, at) VALUES (?1, ?2, ?3)",
            params![id, status.as_str(), now],
        )
        .map_err(self.sql("record a status change"))?;
        tx.commit().map_err(self.sql("commit an execution"))?;
        Ok(Some(ExecutionId(id)))
    }

    /// Move an execution to `status` (recorded with its time and `detail`). Setting a terminal
    /// status also sets its finish time; use [`History::finish`] to record the image as well.
    pub fn set_status(
        &self,
        id: ExecutionId,
        status: ExecStatus,
        detail: Option<&str>,
    ) -> Result<(), HistoryError> {
        let now = ts(self.clock.now());
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("start a transaction"))?;
        check_open(&tx, id, status, &self.path)?;
        let started = (status != ExecStatus::Pending).then(|| now.clone());
        let finished = status.is_terminal().then(|| now.clone());
        tx.execute(
            "UPDATE executions SET status = ?2, started = COALESCE(started, ?3),
                 finished = COALESCE(?4, finished)
             WHERE id = ?1",
            params![id.0, status.as_str(), started, finished],
        )
        .map_err(self.sql("change an execution's status"))?;
        tx.execute(
            "INSERT INTO transitions (execution, status, at, detail) VALUES (?1, ?2, ?3, ?4)",
            params![id.0, status.as_str(), now, detail],
        )
        .map_err(self.sql("record a status change"))?;
        tx.commit().map_err(self.sql("commit a status change"))
    }

    /// Record how an execution ended: its terminal status, image, manifest and logs, error and
    /// the digests of its inputs. An `image` of `None` keeps the one [`History::set_build`]
    /// recorded.
    pub fn finish(&self, id: ExecutionId, outcome: &Outcome) -> Result<(), HistoryError> {
        let status = outcome.final_status();
        if !status.is_terminal() {
            return Err(HistoryError::NotTerminal(status));
        }
        let now = ts(self.clock.now());
        let path_text = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        let inputs = outcome.inputs.as_ref().map(|v| v.to_string());
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("start a transaction"))?;
        check_open(&tx, id, status, &self.path)?;
        tx.execute(
            "UPDATE executions SET status = ?2, started = COALESCE(started, ?3), finished = ?3,
                 image = COALESCE(?4, image), manifest = ?5, logs = ?6, error = ?7, inputs = ?8
             WHERE id = ?1",
            params![
                id.0,
                status.as_str(),
                now,
                outcome.image,
                path_text(&outcome.manifest),
                path_text(&outcome.logs),
                outcome.error,
                inputs,
            ],
        )
        .map_err(self.sql("finish an execution"))?;
        tx.execute(
            "INSERT INTO transitions (execution, status, at, detail) VALUES (?1, ?2, ?3, ?4)",
            params![id.0, status.as_str(), now, outcome.error],
        )
        .map_err(self.sql("record a status change"))?;
        tx.commit().map_err(self.sql("commit an execution's end"))
    }

    /// Record the image and store build id an execution's build was given, as soon as the
    /// store hands them out (so a restarted scheduler can clean up after a killed build).
    pub fn set_build(
        &self,
        id: ExecutionId,
        image: &str,
        build_id: &str,
    ) -> Result<(), HistoryError> {
        let changed = self
            .conn()
            .execute(
                "UPDATE executions SET image = ?2, build_id = ?3 WHERE id = ?1",
                params![id.0, image, build_id],
            )
            .map_err(self.sql("record an execution's build"))?;
        if changed == 0 {
            return Err(HistoryError::NoExecution(id));
        }
        Ok(())
    }

    /// Record this process as the runner of an unfinished execution (a restarted scheduler
    /// taking over, or cancelling, what a dead one left).
    pub fn adopt(&self, id: ExecutionId) -> Result<(), HistoryError> {
        let runner = Runner::current();
        let changed = self
            .conn()
            .execute(
                "UPDATE executions SET runner_pid = ?2, runner_host = ?3, runner_start = ?4
                 WHERE id = ?1",
                params![
                    id.0,
                    runner.pid,
                    runner.host,
                    runner.start_ticks.map(|t| t as i64)
                ],
            )
            .map_err(self.sql("record an execution's runner"))?;
        if changed == 0 {
            return Err(HistoryError::NoExecution(id));
        }
        Ok(())
    }

    /// One execution.
    pub fn execution(&self, id: ExecutionId) -> Result<Execution, HistoryError> {
        let conn = self.conn();
        let mut found = self.query(
            &conn,
            &format!("{SELECT_EXECUTION} WHERE id = ?1"),
            params![id.0],
        )?;
        found.pop().ok_or(HistoryError::NoExecution(id))
    }

    /// The newest `limit` executions, of one pipeline or of all, newest first.
    pub fn executions(
        &self,
        pipeline: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Execution>, HistoryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.conn();
        match pipeline {
            Some(p) => self.query(
                &conn,
                &format!("{SELECT_EXECUTION} WHERE pipeline = ?1 ORDER BY id DESC LIMIT ?2"),
                params![p, limit],
            ),
            None => self.query(
                &conn,
                &format!("{SELECT_EXECUTION} ORDER BY id DESC LIMIT ?1"),
                params![limit],
            ),
        }
    }

    /// The newest execution of `pipeline` that made an image, with the digests of its inputs.
    pub fn last_success(&self, pipeline: &str) -> Result<Option<Execution>, HistoryError> {
        let conn = self.conn();
        let mut found = self.query(
            &conn,
            &format!(
                "{SELECT_EXECUTION} WHERE pipeline = ?1 AND status = 'available'
                 ORDER BY id DESC LIMIT 1"
            ),
            params![pipeline],
        )?;
        Ok(found.pop())
    }

    /// Executions not in a terminal status, oldest first: runs in progress, or left by a
    /// scheduler that was killed (tell them apart with [`Runner::is_alive`]).
    pub fn unfinished(&self) -> Result<Vec<Execution>, HistoryError> {
        let conn = self.conn();
        self.query(
            &conn,
            &format!(
                "{SELECT_EXECUTION} WHERE status IN ('pending', 'building', 'testing', 'distributing')
                 ORDER BY id"
            ),
            [],
        )
    }

    /// When the scheduler will next run `pipeline`, as last persisted.
    pub fn next_run(&self, pipeline: &str) -> Result<Option<DateTime<Utc>>, HistoryError> {
        let text: Option<Option<String>> = self
            .conn()
            .query_row(
                "SELECT next_run FROM pipelines WHERE name = ?1",
                params![pipeline],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("read the next run"))?;
        text.flatten()
            .map(|t| parse_ts("pipelines.next_run", &t))
            .transpose()
    }

    /// Persist when the scheduler will next run `pipeline`.
    pub fn set_next_run(&self, pipeline: &str, at: DateTime<Utc>) -> Result<(), HistoryError> {
        self.conn()
            .execute(
                "INSERT INTO pipelines (name, next_run) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET next_run = excluded.next_run",
                params![pipeline, ts(at)],
            )
            .map_err(self.sql("record the next run"))?;
        Ok(())
    }

    /// Forget the next run of `pipeline` (it has no schedule any more).
    pub fn clear_next_run(&self, pipeline: &str) -> Result<(), HistoryError> {
        self.conn()
            .execute(
                "UPDATE pipelines SET next_run = NULL WHERE name = ?1",
                params![pipeline],
            )
            .map_err(self.sql("clear the next run"))?;
        Ok(())
    }

    /// Every pipeline the history knows (with an execution or a next run), sorted.
    pub fn pipelines(&self) -> Result<Vec<String>, HistoryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT pipeline FROM executions UNION SELECT name FROM pipelines ORDER BY 1")
            .map_err(self.sql("list pipelines"))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.sql("list pipelines"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("list pipelines"))?;
        Ok(names)
    }

    /// The images `pipeline` produced, oldest first.
    pub fn produced_images(&self, pipeline: &str) -> Result<Vec<ProducedImage>, HistoryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT image, id, finished FROM executions
                 WHERE pipeline = ?1 AND status = 'available' AND image IS NOT NULL
                 ORDER BY finished, id",
            )
            .map_err(self.sql("list a pipeline's images"))?;
        let rows = stmt
            .query_map(params![pipeline], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .map_err(self.sql("list a pipeline's images"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("list a pipeline's images"))?;
        rows.into_iter()
            .map(|(image, id, finished)| {
                let finished = finished.ok_or_else(|| HistoryError::Corrupt {
                    column: "executions.finished",
                    value: "NULL".into(),
                })?;
                Ok(ProducedImage {
                    image,
                    execution: ExecutionId(id),
                    finished: parse_ts("executions.finished", &finished)?,
                })
            })
            .collect()
    }

    /// Record that lifecycle deprecated `image` (of `pipeline`) at `at`. An image deprecated
    /// before keeps its first deprecation time.
    pub fn mark_deprecated(
        &self,
        pipeline: &str,
        image: &str,
        at: DateTime<Utc>,
    ) -> Result<(), HistoryError> {
        self.conn()
            .execute(
                "INSERT INTO image_marks (image, pipeline, deprecated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (image) DO UPDATE SET
                     deprecated_at = COALESCE(image_marks.deprecated_at, excluded.deprecated_at)",
                params![image, pipeline, ts(at)],
            )
            .map_err(self.sql("mark an image deprecated"))?;
        Ok(())
    }

    /// Record that lifecycle deleted `image` at `at`, with what happened (remote deletions).
    pub fn mark_deleted(
        &self,
        pipeline: &str,
        image: &str,
        at: DateTime<Utc>,
        detail: Option<&str>,
    ) -> Result<(), HistoryError> {
        self.conn()
            .execute(
                "INSERT INTO image_marks (image, pipeline, deprecated_at, deleted_at, detail)
                     VALUES (?1, ?2, ?3, ?3, ?4)
                 ON CONFLICT (image) DO UPDATE SET deleted_at = excluded.deleted_at,
                     detail = excluded.detail",
                params![image, pipeline, ts(at), detail],
            )
            .map_err(self.sql("mark an image deleted"))?;
        Ok(())
    }

    /// Lift a deprecation (a looser policy keeps the image again).
    pub fn clear_deprecation(&self, image: &str) -> Result<(), HistoryError> {
        self.conn()
            .execute(
                "UPDATE image_marks SET deprecated_at = NULL WHERE image = ?1 AND deleted_at IS NULL",
                params![image],
            )
            .map_err(self.sql("lift a deprecation"))?;
        Ok(())
    }

    /// Record a note about `image` without changing its marks (e.g. why it was kept).
    pub fn note_image(
        &self,
        pipeline: &str,
        image: &str,
        detail: &str,
    ) -> Result<(), HistoryError> {
        self.conn()
            .execute(
                "INSERT INTO image_marks (image, pipeline, detail) VALUES (?1, ?2, ?3)
                 ON CONFLICT (image) DO UPDATE SET detail = excluded.detail",
                params![image, pipeline, detail],
            )
            .map_err(self.sql("record a note on an image"))?;
        Ok(())
    }

    /// Lifecycle marks, of one pipeline's images or of all.
    pub fn marks(&self, pipeline: Option<&str>) -> Result<Vec<ImageMark>, HistoryError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT image, pipeline, deprecated_at, deleted_at, detail FROM image_marks
                 WHERE ?1 IS NULL OR pipeline = ?1 ORDER BY image",
            )
            .map_err(self.sql("read image marks"))?;
        let rows = stmt
            .query_map(params![pipeline], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .map_err(self.sql("read image marks"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("read image marks"))?;
        rows.into_iter()
            .map(|(image, pipeline, deprecated, deleted, detail)| {
                Ok(ImageMark {
                    image,
                    pipeline,
                    deprecated_at: parse_opt("image_marks.deprecated_at", deprecated)?,
                    deleted_at: parse_opt("image_marks.deleted_at", deleted)?,
                    detail,
                })
            })
            .collect()
    }

    fn query(
        &self,
        conn: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Execution>, HistoryError> {
        let mut stmt = conn.prepare(sql).map_err(self.sql("read executions"))?;
        let rows = stmt
            .query_map(params, RawExecution::from_row)
            .map_err(self.sql("read executions"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("read executions"))?;
        let mut stmt = conn
            .prepare("SELECT status, at, detail FROM transitions WHERE execution = ?1 ORDER BY seq")
            .map_err(self.sql("read status changes"))?;
        rows.into_iter()
            .map(|raw| {
                let transitions = stmt
                    .query_map(params![raw.id], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<String>>(2)?,
                        ))
                    })
                    .map_err(self.sql("read status changes"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(self.sql("read status changes"))?
                    .into_iter()
                    .map(|(status, at, detail)| {
                        Ok(Transition {
                            status: parse_status("transitions.status", &status)?,
                            at: parse_ts("transitions.at", &at)?,
                            detail,
                        })
                    })
                    .collect::<Result<Vec<_>, HistoryError>>()?;
                raw.into_execution(transitions)
            })
            .collect()
    }
}

const SELECT_EXECUTION: &str = "SELECT id, pipeline, trigger, due, reason, status, created, \
     started, finished, image, manifest, logs, error, inputs, runner_pid, runner_host, \
     runner_start, build_id FROM executions";

/// A row of `executions` as SQLite returns it, before its text is parsed.
struct RawExecution {
    id: i64,
    pipeline: String,
    trigger: String,
    due: Option<String>,
    reason: String,
    status: String,
    created: String,
    started: Option<String>,
    finished: Option<String>,
    image: Option<String>,
    manifest: Option<String>,
    logs: Option<String>,
    error: Option<String>,
    inputs: Option<String>,
    runner_pid: Option<i64>,
    runner_host: Option<String>,
    runner_start: Option<i64>,
    build_id: Option<String>,
}

impl RawExecution {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawExecution> {
        Ok(RawExecution {
            id: r.get(0)?,
            pipeline: r.get(1)?,
            trigger: r.get(2)?,
            due: r.get(3)?,
            reason: r.get(4)?,
            status: r.get(5)?,
            created: r.get(6)?,
            started: r.get(7)?,
            finished: r.get(8)?,
            image: r.get(9)?,
            manifest: r.get(10)?,
            logs: r.get(11)?,
            error: r.get(12)?,
            inputs: r.get(13)?,
            runner_pid: r.get(14)?,
            runner_host: r.get(15)?,
            runner_start: r.get(16)?,
            build_id: r.get(17)?,
        })
    }

    fn into_execution(self, transitions: Vec<Transition>) -> Result<Execution, HistoryError> {
        let trigger = match (self.trigger.as_str(), self.due) {
            ("manual", _) => Trigger::Manual,
            ("schedule", Some(due)) => Trigger::Schedule {
                due: parse_ts("executions.due", &due)?,
            },
            (other, _) => {
                return Err(HistoryError::Corrupt {
                    column: "executions.trigger",
                    value: other.to_string(),
                });
            }
        };
        let inputs = self
            .inputs
            .map(|t| {
                serde_json::from_str(&t).map_err(|_| HistoryError::Corrupt {
                    column: "executions.inputs",
                    value: t,
                })
            })
            .transpose()?;
        let runner = match (self.runner_pid, self.runner_host) {
            (Some(pid), Some(host)) => Some(Runner {
                pid: u32::try_from(pid).map_err(|_| HistoryError::Corrupt {
                    column: "executions.runner_pid",
                    value: pid.to_string(),
                })?,
                host,
                start_ticks: self.runner_start.and_then(|t| u64::try_from(t).ok()),
            }),
            _ => None,
        };
        Ok(Execution {
            id: ExecutionId(self.id),
            pipeline: self.pipeline,
            trigger,
            reason: self.reason,
            status: parse_status("executions.status", &self.status)?,
            created: parse_ts("executions.created", &self.created)?,
            started: parse_opt("executions.started", self.started)?,
            finished: parse_opt("executions.finished", self.finished)?,
            image: self.image,
            build_id: self.build_id,
            manifest: self.manifest.map(PathBuf::from),
            logs: self.logs.map(PathBuf::from),
            error: self.error,
            inputs,
            runner,
            transitions,
        })
    }
}

/// Refuse to change an execution that does not exist or already ended.
fn check_open(
    conn: &Connection,
    id: ExecutionId,
    wanted: ExecStatus,
    path: &Path,
) -> Result<(), HistoryError> {
    let status: Option<String> = conn
        .query_row(
            "SELECT status FROM executions WHERE id = ?1",
            params![id.0],
            |r| r.get(0),
        )
        .optional()
        .map_err(|source| HistoryError::Sql {
            what: "read an execution's status",
            path: path.to_path_buf(),
            source,
        })?;
    let status = parse_status(
        "executions.status",
        &status.ok_or(HistoryError::NoExecution(id))?,
    )?;
    if status.is_terminal() {
        return Err(HistoryError::Finished { id, status, wanted });
    }
    Ok(())
}

/// Timestamps are stored as fixed-width RFC 3339 text in UTC (microseconds, `Z`), so they
/// sort as text and read well in the `sqlite3` shell.
fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_ts(column: &'static str, text: &str) -> Result<DateTime<Utc>, HistoryError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| HistoryError::Corrupt {
            column,
            value: text.to_string(),
        })
}

fn parse_opt(
    column: &'static str,
    text: Option<String>,
) -> Result<Option<DateTime<Utc>>, HistoryError> {
    text.map(|t| parse_ts(column, &t)).transpose()
}

fn parse_status(column: &'static str, text: &str) -> Result<ExecStatus, HistoryError> {
    text.parse().map_err(|_| HistoryError::Corrupt {
        column,
        value: text.to_string(),
    })
}

/// Bring the schema up to date, in one write transaction (two processes opening a new file at
/// once: the second waits, then finds nothing to do).
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), HistoryError> {
    let err = |source| HistoryError::Open {
        path: path.to_path_buf(),
        source,
    };
    let known = MIGRATIONS.len() as i64;
    // The common case, a current schema, needs no write lock: a reader such as `builder
    // images list` must not wait for the scheduler's write. (No table yet reads as None.)
    let current: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .ok()
        .flatten();
    if current == Some(known) {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(err)?;
    let found: Option<i64> = tx
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .map_err(err)?;
    let found = found.unwrap_or(0);
    if found > known {
        return Err(HistoryError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    for sql in MIGRATIONS.iter().skip(found as usize) {
        tx.execute_batch(sql).map_err(err)?;
    }
    if found < known {
        tx.execute("DELETE FROM schema_version", []).map_err(err)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![known],
        )
        .map_err(err)?;
    }
    tx.commit().map_err(err)
}

/// The schema version this builder writes.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::FixedClock;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("test time")
    }

    #[test]
    fn statuses_round_trip_as_text() {
        for s in ExecStatus::ALL {
            assert_eq!(s.as_str().parse::<ExecStatus>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).expect("json"),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("done".parse::<ExecStatus>().is_err());
    }

    #[test]
    fn an_execution_goes_through_its_statuses() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let h = History::open(&tmp.path().join("h.sqlite"))
            .expect("open")
            .with_clock(Arc::new(FixedClock(at("2026-11-21T10:00:00Z"))));
        let id = h
            .begin("web", Trigger::Manual, "started by hand")
            .expect("begin")
            .expect("new");
        h.set_status(id, ExecStatus::Building, Some("booting"))
            .expect("building");
        h.finish(
            id,
            &Outcome {
                inputs: Some(serde_json::json!({"parent": "sha256:ab"})),
                ..Outcome::available("web/1.0.0/1")
            },
        )
        .expect("finish");
        let e = h.execution(id).expect("read");
        assert_eq!(e.status, ExecStatus::Available);
        assert_eq!(e.image.as_deref(), Some("web/1.0.0/1"));
        assert_eq!(e.started, Some(at("2026-11-21T10:00:00Z")));
        assert_eq!(e.finished, Some(at("2026-11-21T10:00:00Z")));
        let statuses: Vec<ExecStatus> = e.transitions.iter().map(|t| t.status).collect();
        assert_eq!(
            statuses,
            [
                ExecStatus::Pending,
                ExecStatus::Building,
                ExecStatus::Available
            ]
        );
        assert_eq!(e.transitions[1].detail.as_deref(), Some("booting"));
        assert_eq!(e.runner.as_ref().map(|r| r.pid), Some(std::process::id()));
        assert_eq!(e.runner.as_ref().and_then(Runner::is_alive), Some(true));
        // Finished is final.
        let err = h
            .set_status(id, ExecStatus::Testing, None)
            .expect_err("finished");
        assert!(matches!(err, HistoryError::Finished { .. }), "{err}");
        assert!(matches!(
            h.finish(
                id,
                &Outcome {
                    status: Some(ExecStatus::Testing),
                    ..Outcome::default()
                }
            ),
            Err(HistoryError::NotTerminal(ExecStatus::Testing))
        ));
        let last = h.last_success("web").expect("query").expect("one");
        assert_eq!(
            last.inputs,
            Some(serde_json::json!({"parent": "sha256:ab"}))
        );
    }
}
