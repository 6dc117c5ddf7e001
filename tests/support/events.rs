//! `builder build --json`'s events as the VM-tier tests read them: the lines parsed, one
//! kind picked out, a step's output and status, and the stages' times printed (what a boot
//! costs CI). Shared by tests/build_e2e.rs and tests/appliance_e2e.rs.

// Each file that includes this uses part of it.
#![allow(dead_code)]

pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn events<'a>(all: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    all.iter().filter(|e| e["event"] == name).collect()
}

/// Each stage's duration and the boot's progress messages, on stderr (what a boot costs CI).
pub fn print_stage_times(all: &[serde_json::Value]) {
    for e in all {
        if e["event"] == "stageFinished" {
            eprintln!(
                "stage {} {}: {:.1} s",
                e["stage"].as_str().unwrap_or("?"),
                e["status"].as_str().unwrap_or("?"),
                e["durationMs"].as_f64().unwrap_or(0.0) / 1000.0
            );
        } else if e["event"] == "progress" && matches!(e["stage"].as_str(), Some("boot" | "test")) {
            eprintln!(
                "  {}: {}",
                e["stage"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("?")
            );
        }
    }
}

/// The output lines of the step named `step` in `phase`.
pub fn step_output<'a>(all: &'a [serde_json::Value], phase: &str, step: &str) -> Vec<&'a str> {
    events(all, "stepOutput")
        .iter()
        .filter(|e| e["phase"] == phase && e["step"] == step)
        .filter_map(|e| e["line"].as_str())
        .collect()
}

/// Whether the step named `step` in `phase` finished with `success`.
pub fn step_succeeded(all: &[serde_json::Value], phase: &str, step: &str) -> bool {
    events(all, "stepFinished")
        .iter()
        .any(|e| e["phase"] == phase && e["step"] == step && e["status"] == "success")
}
