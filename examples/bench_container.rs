//! Benchmark: builder's container recipe against a plain `buildah build` of the equivalent
//! Containerfile (issue #14's goal: builder's overhead at most 1.2x). Asserts nothing.
//!
//! ```text
//! BUILDER_TEST_CONTAINER=$(fixtures/base-container.sh) cargo run --release --example bench_container [-- RUNS [SCALE]]
//! ```
//!
//! The same work both ways, from the same parent (the fixture's Debian 12 OCI archive), each run
//! cold (a fresh buildah storage and a fresh store, so both import the parent):
//!
//! - **buildah**: `buildah build --isolation chroot` of a Containerfile whose three `RUN` lines
//!   are the three components' commands, then `buildah push` of the image to an OCI image
//!   layout (what builder keeps in its store).
//! - **builder**: `builder build` of a container recipe with three components, each one
//!   `ExecuteBash` step with the same commands, test stage off, no distribution: it validates
//!   and pins the recipe, renders the template, runs `buildah build` with the agent in each
//!   `RUN`, stores the OCI layout with its manifest and package list.
//!
//! The work: each component writes `seq` output compressed with `gzip -9` into
//! `/opt/bench/<name>.gz` (CPU-bound, a few MB). RUNS (default 3) runs of each, interleaved;
//! SCALE (default 1) multiplies the lines. Prints every run, the medians, their ratio against
//! the goal, and the load average at the start and the end.
//!
//! It builds `builder` itself first (`cargo build --release --bin builder`) and works in a
//! temporary folder that it removes at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[path = "support/bench.rs"]
mod bench;
use bench::loadavg;

/// The three components: name and millions of lines at SCALE 1.
const COMPONENTS: [(&str, f64); 3] = [
    ("bench-first", 1.0),
    ("bench-second", 1.0),
    ("bench-third", 0.25),
];
const GOAL: f64 = 1.2;

const COMPONENT: &str = r#"name: NAME
description: CPU-bound work for the container benchmark.
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Work
        action: ExecuteBash
        inputs:
          commands:
            - COMMAND
"#;

fn command(name: &str, lines: u64) -> String {
    format!("mkdir -p /opt/bench && seq {lines} | gzip -9 > /opt/bench/{name}.gz")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = match args.next().map(|a| a.parse()) {
        None => 3,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => usage("RUNS must be a positive whole number (default 3)"),
    };
    let scale: f64 = match args.next().map(|a| a.parse()) {
        None => 1.0,
        Some(Ok(s)) if s > 0.0 => s,
        Some(_) => usage("SCALE must be a positive number (default 1)"),
    };
    let Some(parent) = std::env::var_os("BUILDER_TEST_CONTAINER").map(PathBuf::from) else {
        usage(
            "set BUILDER_TEST_CONTAINER to the fixture base container (fixtures/base-container.sh prints it)",
        )
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--release", "--locked", "--bin", "builder"])
        .current_dir(&root)
        .status();
    if !built.is_ok_and(|s| s.success()) {
        usage("could not build builder (cargo build --release --bin builder)");
    }
    let builder = root.join("target/release/builder");

    let work = tempfile::Builder::new()
        .prefix("bench-container-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let dir = work.path();
    let parent = fs_err::canonicalize(&parent).expect("the parent archive exists");

    // The same commands, as a Containerfile and as components of a recipe.
    let mut containerfile = format!("FROM oci-archive:{}\n", parent.display());
    let mut recipe = format!(
        "name: bench-container\nversion: 1.0.0\ncontainerType: docker\nparentImage: {}\ncomponents:\n",
        parent.display()
    );
    for (name, millions) in COMPONENTS {
        let lines = (millions * scale * 1e6).round() as u64;
        let cmd = command(name, lines);
        containerfile.push_str(&format!("RUN {cmd}\n"));
        fs_err::write(
            dir.join(format!("{name}.yml")),
            COMPONENT
                .replace("NAME", name)
                .replace("COMMAND", &format!("\"{cmd}\"")),
        )
        .expect("component");
        recipe.push_str(&format!("  - path: {name}.yml\n"));
    }
    recipe.push_str("tests:\n  enabled: false\n");
    fs_err::write(dir.join("Containerfile"), &containerfile).expect("Containerfile");
    fs_err::write(dir.join("recipe.yml"), &recipe).expect("recipe");

    let load_start = loadavg();
    eprintln!(
        "bench_container: load average {load_start}; working in {}",
        dir.display()
    );
    let mut plain = Vec::new();
    let mut ours = Vec::new();
    for run in 1..=runs {
        let t = buildah_run(dir, run);
        eprintln!("  run {run}: buildah build + push {t:.1} s");
        plain.push(t);
        let t = builder_run(&builder, dir, run);
        eprintln!("  run {run}: builder build        {t:.1} s");
        ours.push(t);
    }
    let load_end = loadavg();

    println!(
        "container build, three components ({} M, {} M, {} M lines of seq | gzip -9), cold storage each run, {runs} runs each, interleaved",
        COMPONENTS[0].1 * scale,
        COMPONENTS[1].1 * scale,
        COMPONENTS[2].1 * scale
    );
    println!("  load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end");
    let show = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (p, o) = (median(&plain), median(&ours));
    println!(
        "  buildah build + push to an OCI layout: median {p:>6.1} s   (runs: {})",
        show(&plain)
    );
    println!(
        "  builder build (container recipe):      median {o:>6.1} s   (runs: {})",
        show(&ours)
    );
    let ratio = o / p;
    println!(
        "  builder / buildah: {ratio:.2}x (goal ≤ {GOAL}x): {}",
        if ratio <= GOAL { "met" } else { "NOT met" }
    );
}

/// One cold `buildah build` and `buildah push` in a storage of its own; seconds.
fn buildah_run(dir: &Path, run: usize) -> f64 {
    let storage = dir.join(format!("buildah-{run}"));
    let layout = dir.join(format!("layout-{run}"));
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(args);
        cmd
    };
    let t = Instant::now();
    bench::sh(
        buildah(&[
            "build",
            "--quiet",
            "--isolation",
            "chroot",
            "-t",
            "localhost/bench-container:1",
            "-f",
            &dir.join("Containerfile").to_string_lossy(),
            &dir.to_string_lossy(),
        ])
        .stdout(std::process::Stdio::null()),
    );
    bench::sh(
        buildah(&[
            "push",
            "--quiet",
            "localhost/bench-container:1",
            &format!("oci:{}:1", layout.display()),
        ])
        .stdout(std::process::Stdio::null()),
    );
    let secs = t.elapsed().as_secs_f64();
    drop_storage(&storage.join("root"), &storage.join("run"));
    let _ = fs_err::remove_dir_all(&layout);
    secs
}

/// One cold `builder build` of the recipe in a store of its own; seconds.
fn builder_run(builder: &Path, dir: &Path, run: usize) -> f64 {
    let store = dir.join(format!("store-{run}"));
    let t = Instant::now();
    bench::sh(
        Command::new(builder)
            .args(["build", "recipe.yml", "--json"])
            .current_dir(dir)
            .env("BUILDER_STORE", &store)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null()),
    );
    let secs = t.elapsed().as_secs_f64();
    // builder's private buildah storage (see `Store::containers_dir`).
    let containers = store.join("containers");
    drop_storage(&containers.join("storage"), &containers.join("run"));
    let _ = fs_err::remove_dir_all(&store);
    secs
}

/// Removes a buildah storage: its images first (which unmounts their overlays), then the folder.
fn drop_storage(root: &Path, runroot: &Path) {
    let _ = Command::new("buildah")
        .arg("--root")
        .arg(root)
        .arg("--runroot")
        .arg(runroot)
        .args(["rmi", "--all", "--force"])
        .output();
    let _ = Command::new("umount")
        .arg("--recursive")
        .arg("--quiet")
        .arg(root.join("overlay"))
        .output();
    for dir in [root, runroot] {
        let _ = fs_err::remove_dir_all(dir);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn usage(msg: &str) -> ! {
    eprintln!("bench_container: {msg}");
    std::process::exit(2);
}
