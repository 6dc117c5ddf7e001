//! `scripts/install-deps` installs every program a test, a benchmark or a fixture script
//! starts. A fresh machine (CI's) has only what that script installs, so a test that starts
//! a program the script does not know fails there, or worse, hides behind one that does.
//!
//! This reads the sources for the programs they start (Rust's `Command::new("…")`,
//! `find_program("…")`, `which("…")`, `tool("…")` and absolute `/usr/bin`, `/usr/sbin` paths;
//! the fixtures' Python `run([…])`/`argv = […]` lists and build-base-image.sh's `need` table)
//! and checks each against `scripts/install-deps --list-tools`, or against the few programs
//! of Debian's Essential packages (always installed; checked with dpkg here). It fails,
//! naming the file and the program, when one is in neither. `scripts/test` then runs
//! `scripts/install-deps --check` after installing, which fails if a listed tool is still
//! missing (a wrong package for a program).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Programs from Debian's Essential packages (on every Debian system; dpkg refuses to remove
/// them), with their package. The test checks with dpkg that each package is Essential.
const ESSENTIAL: &[(&str, &str)] = &[
    ("sh", "dash"),
    ("bash", "bash"),
    ("cp", "coreutils"),
    ("id", "coreutils"),
    ("sha256sum", "coreutils"),
    ("tar", "tar"),
    ("dpkg-query", "dpkg"),
    ("dpkg-deb", "dpkg"),
    ("setsid", "util-linux"),
    ("stty", "coreutils"),
    ("true", "coreutils"),
];

/// Programs a test looks for without needing them: it checks either outcome.
const OPTIONAL: &[(&str, &str)] = &[(
    "cloud-init",
    "tests/agent_protocol.rs checks the agent's readiness with and without cloud-init on the host",
)];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs_err::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

/// Program → the files that start it.
fn programs_started() -> BTreeMap<String, BTreeSet<String>> {
    let rust = regex::Regex::new(
        r#"(?:Command::new|find_program|which|tool)\(\s*"([A-Za-z0-9._+-]+)"\s*\)|"/usr/s?bin/([A-Za-z0-9._+-]+)""#,
    )
    .expect("regex");
    let python = regex::Regex::new(r#"(?:run\(|argv = )\[\s*"([A-Za-z0-9._+-]+)""#).expect("regex");
    let need_table = regex::Regex::new(r"\[([A-Za-z0-9._+-]+)\]=").expect("regex");

    let root = root();
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |program: &str, file: &Path| {
        let rel = file.strip_prefix(&root).unwrap_or(file);
        found
            .entry(program.to_string())
            .or_default()
            .insert(rel.display().to_string());
    };

    let mut rs = Vec::new();
    for dir in ["src", "tests", "examples", "agent/src"] {
        files(&root.join(dir), "rs", &mut rs);
    }
    for file in &rs {
        let text = fs_err::read_to_string(file).expect("read source");
        for c in rust.captures_iter(&text) {
            let program = c.get(1).or_else(|| c.get(2)).expect("a group").as_str();
            add(program, file);
        }
    }
    let mut py = Vec::new();
    files(&root.join("fixtures"), "py", &mut py);
    for file in &py {
        let text = fs_err::read_to_string(file).expect("read source");
        for c in python.captures_iter(&text) {
            add(&c[1], file);
        }
    }
    // build-base-image.sh checks its host tools in one table: `[program]=package`.
    let script = root.join("fixtures/build-base-image.sh");
    let text = fs_err::read_to_string(&script).expect("read build-base-image.sh");
    let table = text
        .split_once("local -A need=(")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(table, _)| table)
        .expect("build-base-image.sh has its `local -A need=(…)` table");
    for c in need_table.captures_iter(table) {
        add(&c[1], &script);
    }
    found
}

/// `scripts/install-deps --list-tools`: program (or a file's name) → its tier.
fn listed_tools() -> BTreeMap<String, String> {
    let out = Command::new(root().join("scripts/install-deps"))
        .arg("--list-tools")
        .output()
        .expect("run scripts/install-deps --list-tools");
    assert!(
        out.status.success(),
        "scripts/install-deps --list-tools: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut tools = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [tier, what, source, who] = fields[..] else {
            panic!("scripts/install-deps --list-tools: not 4 tab-separated fields: {line:?}");
        };
        assert!(
            ["build", "test", "bench"].contains(&tier),
            "unknown tier in {line:?}"
        );
        assert!(
            !source.is_empty() && !who.is_empty(),
            "empty field in {line:?}"
        );
        let name = what.rsplit('/').next().unwrap_or(what);
        tools.insert(name.to_string(), tier.to_string());
    }
    tools
}

#[test]
fn every_program_a_test_starts_is_installed_by_install_deps() {
    let started = programs_started();
    let listed = listed_tools();
    // The scan finds what it must (so a broken regex cannot make this pass).
    for known in [
        "qemu-img",
        "qemu-ga",
        "docker-registry",
        "vagrant",
        "mmdebstrap",
        "mcopy",
    ] {
        assert!(
            started.contains_key(known),
            "the scan did not find `{known}`: {started:?}"
        );
    }
    let mut unlisted = Vec::new();
    for (program, where_) in &started {
        if listed.contains_key(program)
            || ESSENTIAL.iter().any(|(p, _)| p == program)
            || OPTIONAL.iter().any(|(p, _)| p == program)
        {
            continue;
        }
        unlisted.push(format!(
            "`{program}` (started by {})",
            where_.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    assert!(
        unlisted.is_empty(),
        "scripts/install-deps does not install these programs, which the sources start: \
         add each to its `tools` table (tier, program, Debian package, who needs it):\n  {}",
        unlisted.join("\n  ")
    );
}

#[test]
fn the_essential_programs_come_from_essential_packages() {
    for (program, package) in ESSENTIAL {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Essential}", package])
            .output()
            .expect("dpkg-query runs (builder's tests run on Debian)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "yes",
            "`{program}` is listed as essential, but its package {package} is not Essential: \
             add it to scripts/install-deps instead"
        );
    }
}

/// `--check` lists every tool of the tier it is asked about, and `--for build` is a strict
/// part of the test tier (what `scripts/demo` installs).
#[test]
fn check_lists_every_tool_of_its_tier() {
    let listed = listed_tools();
    for (tier, expected) in [
        ("build", listed.values().filter(|t| *t == "build").count()),
        ("test", listed.values().filter(|t| *t != "bench").count()),
    ] {
        let out = Command::new(root().join("scripts/install-deps"))
            .args(["--check", "--for", tier])
            .output()
            .expect("run scripts/install-deps --check");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("ok ") || l.starts_with("missing ")),
            "{text}"
        );
        assert_eq!(lines.len(), expected, "--for {tier}:\n{text}");
        let missing = lines.iter().any(|l| l.starts_with("missing "));
        assert_eq!(out.status.success(), !missing, "--for {tier}:\n{text}");
    }
    assert!(
        listed.get("vagrant").map(String::as_str) == Some("test")
            && listed.get("docker-registry").map(String::as_str) == Some("test")
            && listed.get("s3s-fs").map(String::as_str) == Some("test"),
        "the demo does not install the test-only tools: {listed:?}"
    );
}
