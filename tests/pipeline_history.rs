//! Local tier: the pipeline history in a real SQLite file, used by several connections and by
//! real child processes at once (the scheduler writing while other builder processes read),
//! the one-execution-per-scheduled-slot rule, runs left by a killed process, migrations.
//!
//! The child processes are this test binary run again on the ignored test `child_process`
//! (a real second process with its own SQLite connection, no extra binary to build).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};

use builder::pipeline::history::{
    ExecStatus, ExecutionId, History, HistoryError, Outcome, Trigger,
};
use chrono::{DateTime, Utc};

const CHILD_ENV: &str = "BUILDER_TEST_HISTORY_CHILD";

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("test time")
        .with_timezone(&Utc)
}

/// A child process that is killed and reaped when the test ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run this test binary again as a child doing `task` (see `child_process`).
fn spawn_child(task: &str, history: &Path) -> ChildGuard {
    let exe = std::env::current_exe().expect("test binary path");
    let child = Command::new(exe)
        .args([
            "child_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{task}\n{}", history.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child test process");
    ChildGuard(child)
}

/// What a child process does, chosen by the parent test through `CHILD_ENV`:
/// - `write N`: record N executions of pipeline `child`, each through every status, then exit.
/// - `hold`: begin one execution, set it building, print `execution-id=<n>`, then wait to be
///   killed.
#[test]
#[ignore = "run as a child process by the other tests of this file"]
fn child_process() {
    let spec = std::env::var(CHILD_ENV).expect("run by a parent test that sets the task");
    let (task, path) = spec.split_once('\n').expect("task and path");
    let history = History::open(Path::new(path)).expect("child opens the history");
    if let Some(n) = task.strip_prefix("write ") {
        let n: u32 = n.parse().expect("count");
        for i in 0..n {
            let id = history
                .begin("child", Trigger::Manual, &format!("child run {i}"))
                .expect("begin")
                .expect("manual runs never collide");
            for status in [
                ExecStatus::Building,
                ExecStatus::Testing,
                ExecStatus::Distributing,
            ] {
                history.set_status(id, status, None).expect("status");
            }
            history
                .finish(id, &Outcome::available(format!("child/1.0.0/{}", i + 1)))
                .expect("finish");
        }
        println!("done");
    } else if task == "hold" {
        let id = history
            .begin("held", Trigger::Manual, "to be killed")
            .expect("begin")
            .expect("new");
        history
            .set_status(id, ExecStatus::Building, Some("building, then killed"))
            .expect("building");
        // libtest prints `test child_process ... ` without a newline first: the marker is
        // found anywhere in a line.
        println!("execution-id={id}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    } else {
        panic!("unknown child task {task:?}");
    }
}

/// What follows `marker` in the first line the child prints that holds it.
fn read_after_marker(child: &mut ChildGuard, marker: &str) -> String {
    let stdout = child.0.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("the child printed what it was asked to")
            .expect("read child stdout");
        if let Some((_, rest)) = line.split_once(marker) {
            return rest.trim().to_string();
        }
    }
}

fn history_path(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("store").join("pipelines.sqlite")
}

#[test]
fn a_child_process_writes_while_this_one_reads_and_writes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = history_path(&tmp);
    let history = History::open(&path).expect("open");
    const N: usize = 40;
    let mut child = spawn_child(&format!("write {N}"), &path);

    // While the child writes, read its executions and write our own. Every read must see
    // whole transactions: an `available` execution always has its image and its last
    // transition, and the count never goes down.
    let mut seen = 0;
    let mut mine = 0;
    while child.0.try_wait().expect("child status").is_none() {
        let runs = history.executions(Some("child"), 1000).expect("read");
        assert!(runs.len() >= seen, "{} after {seen}", runs.len());
        seen = runs.len();
        for e in &runs {
            if e.status == ExecStatus::Available {
                assert!(e.image.is_some(), "{e:?}");
                assert_eq!(
                    e.transitions.last().map(|t| t.status),
                    Some(ExecStatus::Available)
                );
            }
        }
        let id = history
            .begin("parent", Trigger::Manual, "parent run")
            .expect("begin while the child writes")
            .expect("new");
        history
            .finish(id, &Outcome::failed("nothing to build"))
            .expect("finish while the child writes");
        mine += 1;
    }
    let status = child.0.wait().expect("child exit");
    assert!(status.success(), "the child failed: {status}");

    let runs = history.executions(Some("child"), 1000).expect("read");
    assert_eq!(runs.len(), N);
    assert!(runs.iter().all(|e| e.status == ExecStatus::Available));
    // Newest first, and each went through every status in order.
    assert_eq!(
        runs[0].image.as_deref(),
        Some(format!("child/1.0.0/{N}").as_str())
    );
    let statuses: Vec<ExecStatus> = runs[0].transitions.iter().map(|t| t.status).collect();
    assert_eq!(
        statuses,
        [
            ExecStatus::Pending,
            ExecStatus::Building,
            ExecStatus::Testing,
            ExecStatus::Distributing,
            ExecStatus::Available
        ]
    );
    assert_eq!(
        history
            // As many as this loop wrote, however long the child took (one more: none extra).
            .executions(Some("parent"), mine + 1)
            .expect("read")
            .len(),
        mine
    );
    assert!(history.unfinished().expect("unfinished").is_empty());
    assert_eq!(
        history.pipelines().expect("pipelines"),
        ["child".to_string(), "parent".to_string()]
    );
}

#[test]
fn a_scheduled_slot_is_taken_once_whoever_races_for_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = history_path(&tmp);
    let due = at("2026-11-23T03:00:00Z");
    // Eight connections (as eight scheduler processes would have) create the history, migrate
    // it and start the same slot, all at once.
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let history = History::open(&path);
                // Past the second barrier before any panic: a thread that failed to open must
                // fail the test, not leave the other seven waiting for it forever.
                barrier.wait();
                let history = history.expect("open");
                history
                    .begin("weekly", Trigger::Schedule { due }, "schedule")
                    .expect("begin")
            })
        })
        .collect();
    let won: Vec<ExecutionId> = threads
        .into_iter()
        .filter_map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(won.len(), 1, "{won:?}");

    let history = History::open(&path).expect("open");
    // A restart asks again: still taken. A skip of a taken slot changes nothing.
    assert_eq!(
        history
            .begin("weekly", Trigger::Schedule { due }, "again")
            .expect("begin"),
        None
    );
    history
        .skip("weekly", Trigger::Schedule { due }, "nothing changed")
        .expect("skip");
    let runs = history.executions(Some("weekly"), 10).expect("read");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, ExecStatus::Pending);
    assert_eq!(runs[0].due(), Some(due));

    // Another slot, another pipeline's same slot, and manual runs are all free.
    let next = at("2026-11-30T03:00:00Z");
    history
        .skip("weekly", Trigger::Schedule { due: next }, "nothing changed")
        .expect("skip");
    assert_eq!(
        history
            .begin("weekly", Trigger::Schedule { due: next }, "later")
            .expect("begin"),
        None,
        "a skipped slot is taken too"
    );
    assert!(
        history
            .begin("daily", Trigger::Schedule { due }, "schedule")
            .expect("begin")
            .is_some()
    );
    for _ in 0..2 {
        assert!(
            history
                .begin("weekly", Trigger::Manual, "by hand")
                .expect("begin")
                .is_some()
        );
    }
    let skipped = &history.executions(Some("weekly"), 10).expect("read")[2];
    assert_eq!(skipped.status, ExecStatus::Skipped);
    assert_eq!(skipped.reason, "nothing changed");
    assert!(skipped.finished.is_some());
}

#[test]
fn runs_left_by_a_killed_process_are_told_from_live_ones() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = history_path(&tmp);
    let history = History::open(&path).expect("open");
    let live = history
        .begin("live", Trigger::Manual, "this process")
        .expect("begin")
        .expect("new");

    let mut child = spawn_child("hold", &path);
    let held: i64 = read_after_marker(&mut child, "execution-id=")
        .parse()
        .expect("execution id");
    let pid = child.0.id();
    let unfinished = history.unfinished().expect("unfinished");
    let held_run = unfinished
        .iter()
        .find(|e| e.id == ExecutionId(held))
        .expect("the child's run");
    assert_eq!(held_run.status, ExecStatus::Building);
    let runner = held_run.runner.clone().expect("runner recorded");
    assert_eq!(runner.pid, pid);
    assert_eq!(runner.is_alive(), Some(true), "the child still runs");

    // SIGKILL: the child cannot record anything more.
    child.0.kill().expect("kill");
    child.0.wait().expect("reap");
    let unfinished = history.unfinished().expect("unfinished");
    assert_eq!(
        unfinished.iter().map(|e| e.id).collect::<Vec<_>>(),
        [live, ExecutionId(held)]
    );
    let dead: Vec<&builder::pipeline::history::Execution> = unfinished
        .iter()
        .filter(|e| e.runner.as_ref().and_then(|r| r.is_alive()) == Some(false))
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, ExecutionId(held));

    // A restarted scheduler adopts it and closes it.
    history.adopt(ExecutionId(held)).expect("adopt");
    history
        .finish(
            ExecutionId(held),
            &Outcome::cancelled("the scheduler running it was killed"),
        )
        .expect("cancel");
    let e = history.execution(ExecutionId(held)).expect("read");
    assert_eq!(e.status, ExecStatus::Cancelled);
    assert_eq!(e.runner.map(|r| r.pid), Some(std::process::id()));
    assert_eq!(
        history
            .unfinished()
            .expect("unfinished")
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>(),
        [live]
    );
}

#[test]
fn next_runs_persist_across_connections() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = history_path(&tmp);
    let a = History::open(&path).expect("open");
    assert_eq!(a.next_run("weekly").expect("read"), None);
    a.set_next_run("weekly", at("2026-11-23T03:00:00Z"))
        .expect("set");
    a.set_next_run("weekly", at("2026-11-30T03:00:00Z"))
        .expect("move");
    drop(a);
    let b = History::open(&path).expect("reopen");
    assert_eq!(
        b.next_run("weekly").expect("read"),
        Some(at("2026-11-30T03:00:00Z"))
    );
    assert_eq!(b.pipelines().expect("list"), ["weekly".to_string()]);
    b.clear_next_run("weekly").expect("clear");
    assert_eq!(b.next_run("weekly").expect("read"), None);
}

#[test]
fn an_empty_file_is_migrated_and_a_newer_or_foreign_file_is_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // An empty file (touched by someone, or a crash right after creation) becomes a history.
    let empty = tmp.path().join("empty.sqlite");
    fs_err::write(&empty, b"").expect("touch");
    let h = History::open(&empty).expect("migrate an empty file");
    assert!(h.executions(None, 10).expect("read").is_empty());
    drop(h);
    let conn = rusqlite_version(&empty);
    assert_eq!(conn, builder::pipeline::history::schema_version());
    // Opening again migrates nothing and keeps what is there.
    let h = History::open(&empty).expect("reopen");
    h.begin("p", Trigger::Manual, "r").expect("begin");
    drop(h);
    assert_eq!(
        History::open(&empty)
            .expect("reopen")
            .executions(None, 10)
            .expect("read")
            .len(),
        1
    );

    // A file from a newer builder.
    set_version(&empty, 99);
    let e = History::open(&empty).expect_err("too new");
    assert!(matches!(e, HistoryError::TooNew { found: 99, .. }), "{e}");
    assert!(e.to_string().contains("use a newer builder"), "{e}");

    // Not a database at all: an error naming the file, not a panic.
    let junk = tmp.path().join("junk.sqlite");
    fs_err::write(&junk, vec![b'x'; 4096]).expect("write junk");
    let e = History::open(&junk).expect_err("junk");
    assert!(e.to_string().contains("junk.sqlite"), "{e}");
}

/// The schema version recorded in the file, read with plain SQL (not through History).
fn rusqlite_version(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .expect("version row")
}

fn set_version(path: &Path, version: i64) {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.execute("UPDATE schema_version SET version = ?1", [version])
        .expect("update");
}

#[test]
fn readers_open_and_read_while_a_writer_holds_the_write_lock() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = history_path(&tmp);
    let history = History::open(&path).expect("create");
    history
        .begin("weekly", Trigger::Manual, "by hand")
        .expect("begin");
    drop(history);

    // Another process (here: a plain connection) is in the middle of a write.
    let mut writer = rusqlite::Connection::open(&path).expect("writer");
    let tx = writer
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("take the write lock");
    tx.execute(
        "INSERT INTO pipelines (name, next_run) VALUES ('nightly', NULL)",
        [],
    )
    .expect("write");

    // `builder pipeline status` / `images list` open and read meanwhile: no write lock is
    // needed for that, so they neither wait nor fail, and see only committed data.
    let reader = History::open(&path).expect("open while another process writes");
    assert_eq!(reader.executions(None, 10).expect("read").len(), 1);
    assert_eq!(reader.pipelines().expect("read"), ["weekly".to_string()]);
    tx.commit().expect("commit");
    assert_eq!(
        reader.pipelines().expect("read"),
        ["nightly".to_string(), "weekly".to_string()]
    );
}
