//! Benchmark: what the layer cache (issue #12) saves. One recipe of three components whose
//! build phases do real guest work, built three times in one store under TCG, test stage off:
//! from scratch, after changing the last component, and with nothing changed. Prints each
//! build's wall time, where it went (stage by stage), the two ratios to the full build against
//! the issue's goals, and the load average at the start and the end. Asserts nothing.
//!
//! ```text
//! BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) cargo run --release --example bench_cache [-- SCALE]
//! ```
//!
//! It builds `builder` itself first (`cargo build --release --bin builder`: an example does
//! not get the binary built), then works in a temporary folder (recipe, store, VM folders)
//! that it removes at the end.
//!
//! The work: each component writes text with `seq` and compresses it with `gzip -9` into
//! `/opt/bench/<name>.gz` (CPU-bound, a few MB each, so the layers stay small and the time
//! is the guest's). Measured here under TCG (2 vCPUs, the Debian 12 fixture) with the two
//! cores shared (load average 7-10): 14 million lines took 165-189 s, 3.5 million 44-58 s
//! (about 12 s per million); an idle host runs TCG about three times faster. So 5, 5 and 1.25
//! million lines aim at about 20 s, 20 s and 5 s of guest time on an idle host (about 60 s,
//! 60 s and 15 s on a busy one); SCALE (default 1) multiplies them. The component stages'
//! durations are printed, so the real figures are in the output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/bench.rs"]
mod bench;
use bench::loadavg;

/// The three components: name and millions of lines at SCALE 1.
const COMPONENTS: [(&str, f64); 3] = [
    ("bench-first", 5.0),
    ("bench-second", 5.0),
    ("bench-third", 1.25),
];
/// Goals of the issue, under TCG.
const GOAL_LAST: f64 = 0.5;
const GOAL_NOTHING: f64 = 0.15;

fn main() {
    let scale: f64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1.0,
        Some(Ok(s)) if s > 0.0 => s,
        Some(_) => {
            eprintln!("bench_cache: SCALE must be a positive number (default 1)");
            std::process::exit(2);
        }
    };
    let Some(image) = std::env::var_os("BUILDER_TEST_IMAGE").map(PathBuf::from) else {
        eprintln!(
            "bench_cache: set BUILDER_TEST_IMAGE to the fixture base image (fixtures/base-image.sh prints it)"
        );
        std::process::exit(2);
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--release", "--locked", "--bin", "builder"])
        .current_dir(&root)
        .status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("bench_cache: could not build builder (cargo build --release --bin builder)");
        std::process::exit(2);
    }
    let builder = root.join("target/release/builder");

    let work = tempfile::Builder::new()
        .prefix("bench-cache-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let dir = work.path();
    fs_err::create_dir(dir.join("run")).expect("mkdir run");
    for (name, _) in COMPONENTS {
        fs_err::write(
            dir.join(format!("{name}.yml")),
            COMPONENT.replace("NAME", name),
        )
        .expect("component");
    }
    let write_recipe = |salt: &str| {
        let mut text = format!(
            "name: bench-cache\nversion: 1.0.0\nparentImage: {}\ncomponents:\n",
            image.display()
        );
        for (i, (name, millions)) in COMPONENTS.iter().enumerate() {
            let lines = (millions * scale * 1e6).round() as u64;
            // Only the last component's salt changes between the builds.
            let salt = if i == COMPONENTS.len() - 1 { salt } else { "0" };
            text.push_str(&format!(
                "  - path: {name}.yml\n    parameters:\n      Lines: \"{lines}\"\n      Salt: \"{salt}\"\n"
            ));
        }
        text.push_str(
            "infrastructure:\n  cpus: 2\n  memory: 1GiB\n  network: none\ntests:\n  enabled: false\noutputs:\n  formats: [qcow2]\n",
        );
        fs_err::write(dir.join("recipe.yml"), text).expect("recipe");
    };

    let load_start = loadavg();
    eprintln!(
        "bench_cache: load average {load_start}; working in {}",
        dir.display()
    );
    write_recipe("0");
    let full = run(&builder, dir, "full build");
    write_recipe("1");
    let last = run(&builder, dir, "last component changed");
    let nothing = run(&builder, dir, "nothing changed");
    let load_end = loadavg();

    println!(
        "layer cache, TCG, three components ({} M, {} M, {} M lines of seq | gzip -9), test stage off",
        COMPONENTS[0].1 * scale,
        COMPONENTS[1].1 * scale,
        COMPONENTS[2].1 * scale
    );
    println!("  load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end");
    for r in [&full, &last, &nothing] {
        println!(
            "  {:<24} {:>7.1} s   {}",
            r.what,
            r.wall.as_secs_f64(),
            r.layers
        );
        println!("  {:<24}           {}", "", r.stages);
    }
    let (Some(f), Some(l), Some(n)) = (full.ok(), last.ok(), nothing.ok()) else {
        println!("  (a build failed: no ratios)");
        return;
    };
    for (what, t, goal) in [
        ("last component changed", l, GOAL_LAST),
        ("nothing changed", n, GOAL_NOTHING),
    ] {
        let ratio = t / f;
        println!(
            "  {what} / full build = {ratio:.2} (goal <= {goal}: {})",
            if ratio <= goal { "met" } else { "not met" }
        );
    }
}

/// A component document (NAME replaced by its name) that writes `/opt/bench/NAME.gz`:
/// `Lines` lines of text from `seq`, each prefixed by `Salt`, compressed with `gzip -9`.
const COMPONENT: &str = r#"name: NAME
schemaVersion: 1.0
parameters:
  - Lines:
      type: string
  - Salt:
      type: string
phases:
  - name: build
    steps:
      - name: Work
        action: ExecuteBash
        inputs:
          commands:
            - mkdir -p /opt/bench
            - "seq -f '{{ Salt }} %.0f' 1 {{ Lines }} | gzip -9 > /opt/bench/NAME.gz"
            - ls -l /opt/bench/NAME.gz
"#;

/// One build's figures.
struct BuildRun {
    what: &'static str,
    wall: Duration,
    success: bool,
    /// Which layers were cached and which ran.
    layers: String,
    /// Each stage's duration, in order.
    stages: String,
}

impl BuildRun {
    fn ok(&self) -> Option<f64> {
        self.success.then_some(self.wall.as_secs_f64())
    }
}

/// `builder build recipe.yml --json --accel tcg` in `dir`'s store, timed.
fn run(builder: &Path, dir: &Path, what: &'static str) -> BuildRun {
    let t0 = Instant::now();
    let mut child = Command::new(builder)
        .args(["build", "recipe.yml", "--json", "--accel", "tcg", "--store"])
        .arg(dir.join("store"))
        .current_dir(dir)
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("builder runs");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut events = String::new();
    let _ = child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut events);
    let status = child.wait().expect("wait for builder");
    let wall = t0.elapsed();
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        eprintln!("bench_cache: {what}: builder failed ({status}):\n{errors}");
    }
    let (mut cached, mut ran, mut stages) = (Vec::new(), Vec::new(), Vec::new());
    for line in events.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
        match e["event"].as_str() {
            Some("layerCache") if e["status"] == "cached" => cached.push(field("layer")),
            Some("layerCache") => ran.push(field("layer")),
            Some("stageFinished") => {
                let ms = e["durationMs"].as_f64().unwrap_or(0.0);
                let name = match field("detail") {
                    d if d.is_empty() => field("stage"),
                    d => format!("{} {d}", field("stage")),
                };
                if field("status") == "success" {
                    stages.push(format!("{name} {:.1}", ms / 1000.0));
                } else {
                    stages.push(format!("{name} {}", field("status")));
                }
            }
            _ => {}
        }
    }
    let r = BuildRun {
        what,
        wall,
        success: status.success(),
        layers: format!("cached: {}; ran: {}", list(&cached), list(&ran)),
        stages: format!("stages (s): {}", stages.join(", ")),
    };
    eprintln!(
        "bench_cache: {what}: {:.1} s; {}\n  {}",
        wall.as_secs_f64(),
        r.layers,
        r.stages
    );
    r
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}
