//! `builder images list|show|rm` run as a process against a store made in a temp folder
//! (`BUILDER_STORE`): data on stdout, messages on stderr, exit codes.

use assert_cmd::Command;
use builder::export::manifest::{Manifest, ParentInput};
use builder::export::{Artifact, Format};
use builder::store::{Store, Version};
use predicates::prelude::*;

fn store_build(store: &Store, name: &str, version: &str, parent: Option<ParentInput>) -> String {
    let slot = store
        .allocate_build(name, &version.parse::<Version>().expect("version"))
        .expect("allocate");
    let file = format!("{name}.qcow2");
    // Distinct content per build: the parent link also matches by digest.
    let mut content = format!("disk of {}", slot.id()).into_bytes();
    content.resize(3000, 7);
    std::fs::write(slot.dir().join(&file), content).expect("output");
    std::fs::write(slot.logs_dir().join("console.log"), "login:").expect("log");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.inputs.parent = parent;
    m.outputs.push(Artifact {
        file: file.clone(),
        format: Format::Qcow2,
        size: 3000,
        virtual_size: 1 << 30,
        sha256: builder::export::sha256_file(&slot.dir().join(&file)).expect("hash"),
    });
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit").reference()
}

fn builder(store: &std::path::Path) -> Command {
    let mut cmd = Command::cargo_bin("builder").expect("the builder binary");
    cmd.env("BUILDER_STORE", store).env("NO_COLOR", "1");
    cmd
}

#[test]
fn list_show_and_rm_against_a_real_store() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let base = store_build(&store, "base", "1.0.0", None);
    store_build(&store, "web", "1.2.0", None);
    store_build(&store, "web", "1.2.0", None);
    let base_sha = store
        .resolve_image(&base)
        .expect("base")
        .disk
        .expect("disk")
        .sha256;
    store_build(
        &store,
        "app",
        "0.1.0",
        Some(ParentInput {
            source: "base/1.x.x".into(),
            sha256: base_sha,
            store_image: Some(base.clone()),
        }),
    );
    let failed = store
        .allocate_build("web", &"1.3.0".parse().expect("v"))
        .expect("slot");
    std::fs::write(failed.logs_dir().join("console.log"), "panic").expect("log");
    failed.abandon("component `nginx` failed").expect("abandon");

    // The table on stdout, sorted, with the failed build and its status.
    let out = builder(tmp.path())
        .args(["images", "list"])
        .assert()
        .success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{stdout}");
    assert!(lines[0].contains("VERSION  BUILD  CREATED"), "{stdout}");
    let names: Vec<String> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join("/"))
        .collect();
    assert_eq!(
        names,
        [
            "app/0.1.0/1",
            "base/1.0.0/1",
            "web/1.2.0/1",
            "web/1.2.0/2",
            "web/1.3.0/1"
        ]
    );
    assert!(lines[5].contains("failed"), "{stdout}");
    assert!(
        lines[1].contains("success") && lines[1].contains("qcow2") && lines[1].contains("2.9 KiB")
    );

    let out = builder(tmp.path())
        .args(["images", "list", "--json"])
        .assert()
        .success();
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(5));
    assert_eq!(json[3]["reference"], "web/1.2.0/2");
    assert_eq!(json[3]["size"], 3000);

    // show: a partial reference shows the newest build; outputs with their sha256.
    let out = builder(tmp.path())
        .args(["images", "show", "web/1.x.x"])
        .assert()
        .success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).expect("utf-8");
    assert!(stdout.starts_with("web/1.2.0/2\n"), "{stdout}");
    let img = store.resolve_image("web/1.2.0/2").expect("web");
    assert!(stdout.contains(&img.disk.expect("disk").sha256), "{stdout}");
    assert!(stdout.contains(&format!("logs:       {}", img.dir.join("logs").display())));
    // --verify recomputes the digests; a changed output fails with exit 1.
    builder(tmp.path())
        .args(["images", "show", "web/1.2.0/1", "--verify"])
        .assert()
        .success()
        .stderr(predicate::str::contains("verified: 1 output(s)"));
    let web1 = store.resolve_image("web/1.2.0/1").expect("web 1");
    std::fs::write(&web1.disk.as_ref().expect("disk").path, "tampered").expect("tamper");
    builder(tmp.path())
        .args(["images", "show", "web/1.2.0/1", "--verify"])
        .assert()
        .code(1)
        .stdout("")
        .stderr(predicate::str::contains("web.qcow2 has sha256"));
    let out = builder(tmp.path())
        .args(["images", "show", "app", "--json"])
        .assert()
        .success();
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("json");
    assert_eq!(json["manifest"]["inputs"]["parent"]["storeImage"], base);
    // A failed build's number shows where its logs are.
    builder(tmp.path())
        .args(["images", "show", "web/1.3.0/1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("component `nginx` failed"))
        .stdout(predicate::str::contains("logs:"));

    // Nothing matches: exit 2, a hint with the close name, nothing on stdout.
    builder(tmp.path())
        .args(["images", "show", "wbe"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains("no stored image matches `wbe`"))
        .stderr(predicate::str::contains(
            "hint: stored images with a close name: web",
        ));
    builder(tmp.path())
        .args(["images", "show", "web/1.x.2"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("after an `x`"));

    // rm: several matches need --all; a parent in use needs --force.
    builder(tmp.path())
        .args(["images", "rm", "web/1.2.0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "matches 2 builds: web/1.2.0/1, web/1.2.0/2",
        ))
        .stderr(predicate::str::contains("--all"));
    builder(tmp.path())
        .args(["images", "rm", "base"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("is the parent of app/0.1.0/1"))
        .stderr(predicate::str::contains("--force"));
    assert!(
        store.resolve_image("base").is_ok(),
        "refused means untouched"
    );
    builder(tmp.path())
        .args(["images", "rm", "web/1.2.0", "--all"])
        .assert()
        .success()
        .stdout("")
        .stderr(predicate::str::contains("removed web/1.2.0/1"))
        .stderr(predicate::str::contains("removed web/1.2.0/2"));
    builder(tmp.path())
        .args(["images", "rm", "base", "--force"])
        .assert()
        .success();
    builder(tmp.path())
        .args(["images", "rm", "web/1.3.0/1"])
        .assert()
        .success()
        .stderr(predicate::str::contains("failed build web/1.3.0/1"));
    let out = builder(tmp.path())
        .args(["images", "list", "--json"])
        .assert()
        .success();
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["reference"], "app/0.1.0/1");
    assert_eq!(
        std::fs::read_dir(tmp.path().join("trash"))
            .expect("trash")
            .count(),
        0
    );
    builder(tmp.path())
        .args(["images", "rm", "base"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no stored image matches `base`"))
        // Its folder stays (for the build counter) but nothing named base is left to suggest.
        .stderr(predicate::str::contains("close name").not());
}
