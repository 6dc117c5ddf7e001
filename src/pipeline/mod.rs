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
