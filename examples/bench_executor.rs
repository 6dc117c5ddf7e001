//! Executor overhead per no-op step: a 500-step document of `ExecuteBash: true` run by the
//! executor on this machine (logs written, terminal output off), against 500 sequential
//! `bash -c true` spawns. Prints both totals, the per-step overhead and the ratio (goal: ≤ 1.5).
//! The two are measured alternately for several rounds and the best and median rounds are
//! shown, so a busy machine (other builds on the same cores) skews both sides alike.
//!
//!     cargo run --release --example bench_executor [-- STEPS [ROUNDS]]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use builder::component::executor::{self, RunOptions, RunRequest, Silent};
use builder::component::parse;
use builder::machine::host::HostMachine;
use tokio_util::sync::CancellationToken;

fn document(steps: usize) -> String {
    let mut text = String::from(
        "name: bench\ndescription: no-op steps\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n",
    );
    for i in 0..steps {
        let _ = write!(
            text,
            "      - name: Step{i}\n        action: ExecuteBash\n        inputs:\n          commands:\n            - \"true\"\n"
        );
    }
    text
}

fn bare(steps: usize) -> Duration {
    let started = Instant::now();
    for _ in 0..steps {
        let status = std::process::Command::new("bash")
            .args(["-c", "true"])
            .status()
            .expect("bash runs");
        assert!(status.success());
    }
    started.elapsed()
}

async fn executor(steps: usize) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.yml");
    let text = document(steps);
    fs_err::write(&path, &text).expect("write document");
    let document = parse::parse_str(&path, &text).expect("the generated document is valid");
    let target = HostMachine::new();
    let options = RunOptions {
        log_directory: Some(dir.path().join("logs")),
        working_directory: Some(dir.path().to_path_buf()),
        ..RunOptions::default()
    };
    let request = RunRequest {
        documents: vec![document],
        ..RunRequest::default()
    };
    let started = Instant::now();
    let outcome = executor::run(&target, request, options, &Silent, CancellationToken::new())
        .await
        .expect("the run starts");
    let elapsed = started.elapsed();
    assert_eq!(outcome.summary.executed_step_count as usize, steps);
    assert_eq!(outcome.summary.failed_step_count, 0);
    elapsed
}

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Warm up the page cache and bash itself so neither side pays for the first start.
    let _ = bare(20);
    let _ = runtime.block_on(executor(20));

    let mut bare_runs = Vec::new();
    let mut exec_runs = Vec::new();
    for _ in 0..rounds {
        bare_runs.push(bare(steps));
        exec_runs.push(runtime.block_on(executor(steps)));
    }
    bare_runs.sort();
    exec_runs.sort();
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / steps as f64;
    println!("steps: {steps}, rounds: {rounds} (alternating)");
    for (label, pick) in [("best", 0), ("median", rounds / 2)] {
        let (b, e) = (bare_runs[pick], exec_runs[pick]);
        println!("{label}:");
        println!(
            "  bash -c true, sequential:   {:>8.1} ms total, {:.3} ms/step",
            b.as_secs_f64() * 1000.0,
            per(b)
        );
        println!(
            "  executor, ExecuteBash true: {:>8.1} ms total, {:.3} ms/step",
            e.as_secs_f64() * 1000.0,
            per(e)
        );
        println!("  overhead per step:          {:>8.3} ms", per(e) - per(b));
        println!(
            "  ratio executor / bare:      {:>8.2}x (goal <= 1.50x)",
            e.as_secs_f64() / b.as_secs_f64()
        );
    }
}
