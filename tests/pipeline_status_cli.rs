//! Local tier: `builder pipeline status` and `builder images list --pipeline` read a real
//! history and store (written through the library as a scheduler would) and print tables and
//! JSON; they never create a history.

use assert_cmd::Command;
use builder::pipeline::history::{ExecStatus, History, Outcome, Trigger};
use builder::recipe::Format;
use builder::recipe::Version;
use builder::store::Store;
use builder::store::manifest::{Artifact, Manifest};
use chrono::{DateTime, TimeDelta, Utc};

fn store_build(store: &Store, name: &str, version: &str) -> String {
    let version: Version = version.parse().expect("version");
    let slot = store.allocate_build(name, &version).expect("allocate");
    let file = format!("{name}.qcow2");
    fs_err::write(slot.dir().join(&file), "disk").expect("output");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.outputs.push(Artifact {
        file: file.clone(),
        format: Format::Qcow2,
        size: 4,
        virtual_size: 1 << 20,
        sha256: builder::digest::sha256_file(&slot.dir().join(&file), None)
            .expect("hash")
            .hex(),
    });
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit").reference()
}

fn builder(store: &std::path::Path) -> Command {
    let mut cmd = Command::cargo_bin("builder").expect("builder binary");
    cmd.env("BUILDER_STORE", store).env("NO_COLOR", "1");
    cmd
}

#[test]
fn status_shows_runs_skips_and_the_next_run() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("store");

    // Nothing has run: no history is created by asking.
    let out = builder(&root)
        .args(["pipeline", "status", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(!root.join("pipelines.sqlite").exists());
    let out = builder(&root)
        .args(["pipeline", "status", "weekly-web"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let store = Store::open(&root).expect("store");
    let history = History::open(&History::default_path(&store)).expect("history");
    let due = DateTime::parse_from_rfc3339("2026-11-16T03:00:00Z")
        .expect("time")
        .with_timezone(&Utc);
    let built = store_build(&store, "web", "1.0.0");
    let id = history
        .begin(
            "weekly-web",
            Trigger::Schedule { due },
            "the parent image changed",
        )
        .expect("begin")
        .expect("new");
    history
        .set_status(id, ExecStatus::Building, None)
        .expect("building");
    history
        .finish(id, &Outcome::available(built.clone()))
        .expect("finish");
    history
        .skip(
            "weekly-web",
            Trigger::Schedule {
                due: due + TimeDelta::days(7),
            },
            "nothing changed since execution 1",
        )
        .expect("skip");
    let next = Utc::now() + TimeDelta::days(3);
    history.set_next_run("weekly-web", next).expect("next run");
    // Another pipeline's build, and one built by hand.
    let other = store_build(&store, "db", "1.0.0");
    let oid = history
        .begin("nightly-db", Trigger::Manual, "by hand")
        .expect("begin")
        .expect("new");
    history
        .finish(oid, &Outcome::available(other.clone()))
        .expect("finish");
    let by_hand = store_build(&store, "web", "1.0.0");
    history
        .mark_deprecated("weekly-web", &built, Utc::now())
        .expect("deprecate");

    let out = builder(&root)
        .args(["pipeline", "status", "weekly-web"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("weekly-web: next run ") && lines[0].contains("(in 2d 23h)"),
        "{text}"
    );
    assert!(
        lines[1]
            .split_whitespace()
            .eq(["ID", "STATUS", "TRIGGER", "CREATED", "TOOK", "IMAGE", "WHY"])
    );
    assert!(
        lines[2].contains("skipped") && lines[2].contains("nothing changed since execution 1"),
        "{text}"
    );
    assert!(
        lines[3].contains("available")
            && lines[3].contains(&format!("{built} (deprecated)"))
            && lines[3].contains("schedule 2026-11-16 03:00")
            && lines[3].contains("the parent image changed"),
        "{text}"
    );
    assert_eq!(lines.len(), 4, "{text}");

    let out = builder(&root)
        .args(["pipeline", "status", "--json", "--limit", "1"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let names: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["pipeline"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["nightly-db", "weekly-web"]);
    let web = &json[1];
    assert_eq!(web["executions"].as_array().expect("runs").len(), 1);
    assert_eq!(web["executions"][0]["status"], "skipped");
    assert_eq!(web["executions"][0]["trigger"]["kind"], "schedule");
    assert!(web["nextRun"].is_string());
    assert!(json[0]["nextRun"].is_null());

    // A misspelt name: exit 2 with a suggestion.
    let out = builder(&root)
        .args(["pipeline", "status", "weekly-wbe"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did you mean `weekly-web`?"), "{err}");

    // images list --pipeline: only that pipeline's builds; deprecation shown.
    let out = builder(&root)
        .args(["images", "list", "--pipeline", "weekly-web", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let refs: Vec<&str> = rows
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["reference"].as_str().expect("ref"))
        .collect();
    assert_eq!(refs, [built.as_str()]);
    assert_eq!(rows[0]["status"], "deprecated");
    // Without the filter every build is listed, the deprecated one marked.
    let out = builder(&root)
        .args(["images", "list", "--json"])
        .output()
        .expect("run");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let all: Vec<(&str, &str)> = rows
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["reference"].as_str().expect("ref"),
                r["status"].as_str().expect("status"),
            )
        })
        .collect();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.contains(&(built.as_str(), "deprecated")));
    assert!(all.iter().any(|(r, s)| *r == by_hand && *s != "deprecated"));
    let out = builder(&root)
        .args(["images", "list", "--pipeline", "nope"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("weekly-web"));
}
