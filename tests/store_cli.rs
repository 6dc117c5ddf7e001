//! `builder images list|show|rm` run as a process against a store made in a temp folder
//! (`BUILDER_STORE`): data on stdout, messages on stderr, exit codes.

use assert_cmd::Command;
use builder::recipe::Format;
use builder::recipe::Version;
use builder::store::Store;
use builder::store::manifest::{Artifact, Manifest, ParentInput};
use predicates::prelude::*;

fn store_build(store: &Store, name: &str, version: &str, parent: Option<ParentInput>) -> String {
    let slot = store
        .allocate_build(name, &version.parse::<Version>().expect("version"))
        .expect("allocate");
    let file = format!("{name}.qcow2");
    // Distinct content per build: the parent link also matches by digest.
    let mut content = format!("disk of {}", slot.id()).into_bytes();
    content.resize(3000, 7);
    fs_err::write(slot.dir().join(&file), content).expect("output");
    fs_err::write(slot.logs_dir().join("console.log"), "login:").expect("log");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.inputs.parent = parent;
    m.outputs.push(Artifact {
        file: file.clone(),
        format: Format::Qcow2,
        size: 3000,
        virtual_size: 1 << 30,
        sha256: builder::digest::sha256_file(&slot.dir().join(&file), None)
            .expect("hash")
            .hex(),
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
            disk_sha256: None,
        }),
    );
    let failed = store
        .allocate_build("web", &"1.3.0".parse().expect("v"))
        .expect("slot");
    fs_err::write(failed.logs_dir().join("console.log"), "panic").expect("log");
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
    fs_err::write(&web1.disk.as_ref().expect("disk").path, "tampered").expect("tamper");
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
        fs_err::read_dir(tmp.path().join("trash"))
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

/// Kills the child on drop (SIGKILL), so a failed assertion leaves no builder running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two real `builder build` processes on one store, both stuck fetching their parent from a
/// server that accepts and never answers (the second waits for the first's download lock;
/// no VM needed). While both run, nothing is taken for
/// abandoned and `--prune-cache` keeps the cache. One is killed with SIGKILL: the next
/// command cleans it up, says so on stderr and in `--json`, keeps its logs under `failed/`
/// with the reason, and leaves the live one alone; once that one is killed too, pruning runs.
#[test]
fn a_killed_build_is_cleaned_up_by_the_next_command_and_a_live_one_is_not() {
    use std::io::Read as _;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let tmp = tempfile::tempdir().expect("temp dir");
    let store_dir = tmp.path().join("store");
    // Accepts connections and keeps them open, silent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let (tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    fs_err::write(
        tmp.path().join("c.yml"),
        "name: noop\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Noop\n        action: ExecuteBash\n        inputs:\n          commands: [\"true\"]\n",
    )
    .expect("component");
    fs_err::write(
        tmp.path().join("recipe.yml"),
        format!(
            "name: stuck\nversion: 1.0.0\nparentImage: {{url: 'http://127.0.0.1:{port}/base.qcow2', sha256: {}}}\ncomponents: [{{path: c.yml}}]\ntests: {{enabled: false}}\noutputs: {{formats: [qcow2]}}\n",
            "a".repeat(64)
        ),
    )
    .expect("recipe");
    let start = || {
        KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
                .args(["build", "recipe.yml"])
                .current_dir(tmp.path())
                .env("BUILDER_STORE", &store_dir)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("builder starts"),
        )
    };
    let mut first = start();
    accepted
        .recv_timeout(Duration::from_secs(60))
        .expect("the first build fetches");
    let second = start();
    let staging = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = fs_err::read_dir(store_dir.join(dir))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // The second build is under way once its record is written.
    let deadline = Instant::now() + Duration::from_secs(60);
    let both = loop {
        let both = staging("staging");
        let recorded = both
            .iter()
            .filter(|id| {
                store_dir
                    .join("staging")
                    .join(id)
                    .join("build.json")
                    .is_file()
            })
            .count();
        if recorded == 2 {
            break both;
        }
        assert!(Instant::now() < deadline, "no second build: {both:?}");
        std::thread::sleep(Duration::from_millis(50));
    };

    // Both run: nothing is cleaned, nothing pruned.
    let out = builder(&store_dir)
        .args(["images", "list", "--json"])
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(!stderr.contains("abandoned"), "{stderr}");
    assert_eq!(staging("staging"), both);

    // SIGKILL: no unwinding, no Drop.
    first.0.kill().expect("SIGKILL");
    first.0.wait().expect("reap");
    let mut first_stderr = String::new();
    first
        .0
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut first_stderr)
        .expect("stderr");
    let killed_id = both
        .iter()
        .find(|id| first_stderr.contains(id.as_str()))
        .unwrap_or_else(|| panic!("which build was the first? {first_stderr}"))
        .clone();
    let live_id = both
        .iter()
        .find(|id| **id != killed_id)
        .expect("other")
        .clone();
    let reference = |id: &str| -> String {
        let record: serde_json::Value = serde_json::from_slice(
            &fs_err::read(store_dir.join("staging").join(id).join("build.json"))
                .or_else(|_| fs_err::read(store_dir.join("failed").join(id).join("build.json")))
                .expect("build.json"),
        )
        .expect("json");
        format!("stuck/1.0.0/{}", record["build"])
    };
    let killed_ref = reference(&killed_id);

    let out = builder(&store_dir)
        .args(["images", "list", "--json"])
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!(
            "note: cleaned up the abandoned build {killed_ref} (build id {killed_id})"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.0.id())),
        "{stderr}"
    );
    assert_eq!(
        staging("staging"),
        std::slice::from_ref(&live_id),
        "the live build stays"
    );
    assert_eq!(staging("failed"), std::slice::from_ref(&killed_id));
    let rows: serde_json::Value =
        serde_json::from_slice(&out.get_output().stdout).expect("JSON rows");
    let row = rows
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["reference"] == killed_ref.as_str())
        .unwrap_or_else(|| panic!("no row for {killed_ref}: {rows:#}"));
    assert_eq!(row["status"], "failed");
    assert!(
        row["failure"]
            .as_str()
            .is_some_and(|f| f.starts_with("abandoned: ")),
        "{row:#}"
    );
    assert_eq!(row["cleaned"]["buildId"], killed_id.as_str(), "{row:#}");
    assert_eq!(row["cleaned"]["runner"]["pid"], first.0.id(), "{row:#}");
    let log = store_dir
        .join("failed")
        .join(&killed_id)
        .join("logs/build.log");
    assert!(log.is_file(), "{} kept", log.display());
    // Said once: the next command finds nothing to clean.
    let out = builder(&store_dir)
        .args(["images", "list"])
        .assert()
        .success();
    assert!(!String::from_utf8_lossy(&out.get_output().stderr).contains("abandoned"));

    // The live build still keeps the cache as it is.
    let out = builder(&store_dir)
        .args(["images", "rm", &killed_ref, "--prune-cache"])
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!("a build is in progress ({live_id})")),
        "{stderr}"
    );

    // Now the second one downloads (the first's lock on the download went with it).
    accepted
        .recv_timeout(Duration::from_secs(60))
        .expect("the second build fetches");
    drop(second);
    let part = store_dir
        .join("cache/base")
        .join(format!("{}.part", "a".repeat(64)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !part.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let live_ref = reference(&live_id);
    let out = builder(&store_dir)
        .args(["images", "rm", &live_ref, "--prune-cache"])
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains(&format!("cleaned up the abandoned build {live_ref}")),
        "{stderr}"
    );
    assert!(!stderr.contains("in progress"), "{stderr}");
    assert!(
        stderr.contains(&format!("removed partial download {}", part.display())),
        "{stderr}"
    );
    assert!(staging("staging").is_empty());
    assert!(staging("failed").is_empty());
    assert!(staging("cache/base").is_empty());
}
