//! Pipelines: recipes built unattended on a schedule or when a dependency changed, with a
//! history of executions, image lifecycle and notifications (Image Builder's image pipeline).
//!
//! - `model`/`parse`: the pipeline file, validated with every problem at `file:line:col`.
//! - `schedule`: cron (5-field POSIX and AWS `cron(…)`), time zones, next run, catch-up.
//! - `conditions`: "only when a dependency changed": digests of the parent and components.
//! - `history`: executions in SQLite (WAL; many readers while the scheduler writes).
//! - `lifecycle`: keep the last N / younger than a duration; never a parent in use.
//! - `notify`: webhook and command hooks on status changes.
//! - `run`/`scheduler`: one execution now; `builder serve`.

pub mod history;
pub mod lifecycle;
pub mod notify;

use chrono::{DateTime, Utc};

/// Where pipeline code reads the time, so schedules, catch-up and lifecycle ages can be tested
/// with a fake clock. Production code uses [`SystemClock`].
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The real time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Always the same instant (tests, and evaluating a policy "as of" a given time).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

pub mod conditions;
pub mod model;
pub mod parse;
pub mod run;
pub mod schedule;
pub mod scheduler;
