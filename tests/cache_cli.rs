//! `builder cache list|prune` and `builder images rm --prune-cache` run as a process against
//! a store made in a temp folder (`BUILDER_STORE`), its layers real qcow2 files (qemu-img,
//! qemu-io) inserted through `LayerCache::insert`: data on stdout, messages on stderr, exit
//! codes, the store's `config.yml`. No VM.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use builder::store::Store;
use builder::store::layers::{Inserted, LayerCache, LayerParent, LayerRecord, Origin};
use builder::vm::DiskFormat;

#[path = "support/qcow2.rs"]
mod qcow2;
use qcow2::image;

/// Keys that differ in their first 12 digits, as text output shows them.
fn key(n: u32) -> String {
    format!("{n:02x}{}", "e".repeat(62))
}

/// A store with a parent image in `cache/base/`, and a build's layers in `work/`:
/// base ← one ← two, and three (another first layer, with more data).
struct Setup {
    dir: tempfile::TempDir,
    store: Store,
    base: PathBuf,
    runtime: tokio::runtime::Runtime,
    /// One test at a time (dropped last, after the store and its locks): a layer lock this
    /// process holds is inherited by every child another test spawns until that child execs
    /// (the descriptor is close-on-exec, not close-on-fork), and a `builder cache prune`
    /// started meanwhile sees the layer in use. Under load that window was wide enough to
    /// fail a test now and then (1 run in 60 at load 7).
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Setup {
    fn new() -> Setup {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path().join("store")).expect("store");
        let base = store.base_dir().join(format!("{}.qcow2", "b".repeat(64)));
        image(&base, None, "0x11", "0", "64k");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Setup {
            dir,
            store,
            base,
            runtime,
            _serial: serial,
        }
    }

    fn cache(&self) -> LayerCache {
        self.store.layers().expect("layer cache")
    }

    fn work(&self, name: &str) -> PathBuf {
        let work = self.dir.path().join("work");
        fs_err::create_dir_all(&work).expect("work");
        work.join(name)
    }

    fn insert(&self, n: u32, parent: LayerParent<'_>, file: &Path, component: &str) -> Inserted {
        let origin = Origin {
            component,
            build: "web/1.0.0/1",
            ..Origin::default()
        };
        self.runtime
            .block_on(self.cache().insert(&key(n), parent, file, origin))
            .expect("insert")
    }

    /// key 1 (`one`) ← key 2 (`two`), and key 3 (`three`) on the parent image; returns their
    /// records.
    fn insert_layers(&self) -> Vec<LayerRecord> {
        let (l1, l2, l3) = (
            self.work("l1.qcow2"),
            self.work("l2.qcow2"),
            self.work("l3.qcow2"),
        );
        image(&l1, Some(&self.base), "0x5a", "64k", "64k");
        image(&l2, Some(&l1), "0x66", "128k", "64k");
        image(&l3, Some(&self.base), "0x77", "1M", "1M");
        let base = LayerParent::Base {
            path: &self.base,
            format: DiskFormat::Qcow2,
        };
        let one = self.insert(1, base, &l1, "one");
        let sha1 = one.sha256.clone();
        let key1 = key(1);
        self.insert(
            2,
            LayerParent::Layer {
                key: &key1,
                sha256: &sha1,
            },
            &l2,
            "two",
        );
        self.insert(3, base, &l3, "three");
        [1, 2, 3].map(|n| self.record(n)).into()
    }

    fn record_path(&self, n: u32) -> PathBuf {
        self.cache().dir().join(format!("{}.json", key(n)))
    }

    fn record(&self, n: u32) -> LayerRecord {
        let text = fs_err::read_to_string(self.record_path(n)).expect("record");
        serde_json::from_str(&text).expect("a record")
    }

    fn cached(&self, n: u32) -> bool {
        self.cache().path(&key(n)).is_file()
    }

    /// Pretend layer `n` was last used `days` ago.
    fn age(&self, n: u32, days: i64) {
        let mut record = self.record(n);
        record.last_used = chrono::Utc::now() - chrono::Duration::days(days);
        builder::store::write_json(&self.record_path(n), &record).expect("write record");
    }

    fn config(&self, text: &str) {
        fs_err::write(self.store.config_path(), text).expect("config.yml");
    }

    fn builder(&self, args: &[&str]) -> Output {
        let out = Command::cargo_bin("builder")
            .expect("the builder binary")
            .env("BUILDER_STORE", self.store.root())
            .env("NO_COLOR", "1")
            .args(args)
            .output()
            .expect("builder runs");
        Output {
            code: out.status.code(),
            stdout: String::from_utf8(out.stdout).expect("utf-8"),
            stderr: String::from_utf8(out.stderr).expect("utf-8"),
        }
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.builder(args);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
    }

    /// stderr with the store's path as `[STORE]`, for snapshots.
    fn masked(&self, text: &str) -> String {
        text.replace(&self.store.root().display().to_string(), "[STORE]")
    }
}

#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn keys(layers: &serde_json::Value) -> Vec<String> {
    layers
        .as_array()
        .expect("an array")
        .iter()
        .map(|l| l["key"].as_str().expect("key").to_string())
        .collect()
}

#[test]
fn list_shows_every_layer_as_a_table_and_as_json() {
    let t = Setup::new();
    let empty = t.builder(&["cache", "list"]);
    assert_eq!(empty.code, Some(0), "{}", empty.stderr);
    assert_eq!(empty.stdout, "");
    assert!(
        empty.stderr.contains("no cached layers in"),
        "{}",
        empty.stderr
    );
    assert!(empty.stderr.contains("cap 20GiB"), "{}", empty.stderr);

    let records = t.insert_layers();
    t.age(1, 3);
    t.age(2, 2);
    t.age(3, 1);
    let out = t.builder(&["cache", "list"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", out.stdout);
    assert!(
        lines[0].starts_with("KEY           COMPONENT  SIZE"),
        "{}",
        out.stdout
    );
    assert!(
        lines[0].ends_with("LAST-USED         BUILD        PARENT"),
        "{}",
        out.stdout
    );
    // Most recently used first; short keys; a first layer has no parent key.
    let words: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(words[0][0], &key(3)[..12]);
    assert_eq!(words[0][1], "three");
    assert_eq!(words[0].last(), Some(&"-"));
    assert_eq!(words[1][0], &key(2)[..12]);
    assert_eq!(words[1][1], "two");
    assert_eq!(words[1].last(), Some(&&key(1)[..12]));
    assert!(lines[2].contains("web/1.0.0/1"), "{}", lines[2]);
    assert_eq!(words[2][1], "one");
    let total: u64 = records.iter().map(|r| r.size).sum();
    assert!(
        out.stderr.contains(&format!(
            "3 layers, {}; cap 20GiB",
            builder::store::human_size(total)
        )),
        "{}",
        out.stderr
    );

    let json = t.json(&["cache", "list", "--json"]);
    assert_eq!(keys(&json["layers"]), [key(3), key(2), key(1)]);
    assert_eq!(json["count"], 3);
    assert_eq!(json["bytes"], total);
    assert_eq!(json["maxSize"], 20u64 << 30);
    let two = &json["layers"][1];
    assert_eq!(two["component"], "two");
    assert_eq!(two["parent"], key(1));
    assert_eq!(two["build"], "web/1.0.0/1");
    assert_eq!(two["size"], records[1].size);
    assert_eq!(two["sha256"], records[1].sha256.as_str());
    assert!(two["created"].is_string() && two["lastUsed"].is_string());
    assert!(json["layers"][2]["parent"].is_null());

    // An unlimited cap.
    t.config("layerCache:\n  maxSize: unlimited\n");
    assert!(t.json(&["cache", "list", "--json"])["maxSize"].is_null());
    let out = t.builder(&["cache", "list"]);
    assert!(out.stderr.contains("no cap (unlimited)"), "{}", out.stderr);
}

#[test]
fn prune_by_age_by_size_and_all_least_recently_used_first() {
    let t = Setup::new();
    let records = t.insert_layers();
    // Old: key 1 and key 2 (20 and 15 days); key 3 used yesterday.
    t.age(1, 20);
    t.age(2, 15);
    t.age(3, 1);
    let json = t.json(&["cache", "prune", "--older-than", "10d", "--json"]);
    // A child goes before its parent.
    assert_eq!(keys(&json["removed"]), [key(2), key(1)]);
    assert_eq!(json["freedBytes"], records[0].size + records[1].size);
    assert!(json["maxSize"].is_null());
    assert!(!t.cached(1) && !t.cached(2) && t.cached(3));
    // Nothing is older than two days now.
    let out = t.builder(&["cache", "prune", "--older-than", "2d"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        !out.stderr.contains("removed cached layer"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("freed 0 B; the cache holds 1 layer"),
        "{}",
        out.stderr
    );
    assert!(t.cached(3));

    // By size: the least recently used until the rest fits.
    let records = t.insert_layers();
    t.age(1, 3);
    t.age(2, 2);
    t.age(3, 1);
    let fits = (records[0].size + records[2].size).to_string();
    let out = t.builder(&["cache", "prune", "--max-size", &fits]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // key 1 is older, but key 2 is built on it: key 2 is the least recently used leaf.
    assert!(
        out.stderr
            .contains(&format!("removed cached layer {} (two, ", &key(2)[..12])),
        "{}",
        out.stderr
    );
    assert!(t.cached(1) && !t.cached(2) && t.cached(3));
    let json = t.json(&["cache", "prune", "--max-size", "1KiB", "--json"]);
    assert_eq!(keys(&json["removed"]), [key(1), key(3)]);
    assert_eq!(json["maxSize"], 1024);
    assert_eq!(t.json(&["cache", "list", "--json"])["count"], 0);

    // Everything.
    t.insert_layers();
    let json = t.json(&["cache", "prune", "--all", "--json"]);
    assert_eq!(json["removed"].as_array().map(Vec::len), Some(3));
    assert!(!t.cached(1) && !t.cached(2) && !t.cached(3));
}

#[test]
fn a_layer_a_running_build_holds_survives_with_the_layers_below_it() {
    let t = Setup::new();
    t.insert_layers();
    // A build that looked key 1 ← key 2 up holds both until its VM is gone.
    let held = t
        .runtime
        .block_on(t.cache().lookup(&t.base, &[key(1), key(2)]))
        .expect("lookup");
    assert_eq!(held.layers.len(), 2);
    let out = t.builder(&["cache", "prune", "--all"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "kept cached layer {} and the layers below it: a running build uses it",
            &key(2)[..12]
        )),
        "{}",
        out.stderr
    );
    assert!(t.cached(1) && t.cached(2) && !t.cached(3));
    let json = t.json(&["cache", "prune", "--all", "--json"]);
    assert!(json["removed"].as_array().is_some_and(Vec::is_empty));
    assert_eq!(json["inUse"].as_array().map(Vec::len), Some(2));
    drop(held);
    let json = t.json(&["cache", "prune", "--all", "--json"]);
    assert_eq!(keys(&json["removed"]), [key(2), key(1)]);
}

#[test]
fn the_cap_of_config_yml_is_what_prune_and_images_rm_prune_to() {
    let t = Setup::new();
    let records = t.insert_layers();
    t.age(1, 3);
    t.age(2, 2);
    t.age(3, 1);
    // Room for key 3 alone.
    t.config(&format!("layerCache:\n  maxSize: {}\n", records[2].size));
    // A leftover of an insert that died goes whatever the options.
    let dead = t.cache().dir().join(".tmp-dead.qcow2");
    fs_err::write(&dead, b"half a copy").expect("write");
    let json = t.json(&["cache", "prune", "--json"]);
    assert_eq!(keys(&json["removed"]), [key(2), key(1)]);
    assert_eq!(json["maxSize"], records[2].size);
    assert_eq!(json["leftovers"][0], dead.display().to_string());
    assert!(!dead.exists() && t.cached(3));

    // The default cap (20 GiB) keeps everything.
    fs_err::remove_file(t.store.config_path()).expect("rm config");
    t.insert_layers();
    let json = t.json(&["cache", "prune", "--json"]);
    assert!(json["removed"].as_array().is_some_and(Vec::is_empty));
    assert_eq!(json["maxSize"], 20u64 << 30);

    // `images rm --prune-cache` prunes the layers to the cap, then the parent cache, which
    // keeps the parent image as long as a cached layer is built on it.
    let failed = t
        .store
        .allocate_build("web", &"1.3.0".parse().expect("version"))
        .expect("slot");
    failed.abandon("component `nginx` failed").expect("abandon");
    t.config("layerCache: {maxSize: 0}\n");
    let out = t.builder(&["images", "rm", "web/1.3.0/1", "--prune-cache"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for n in [1, 2, 3] {
        assert!(!t.cached(n), "layer {n} is still cached");
    }
    assert_eq!(
        out.stderr.matches("removed cached layer ").count(),
        3,
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("removed cached parent {}", t.base.display())),
        "{}",
        out.stderr
    );
    assert!(!t.base.exists());
}

#[test]
fn a_bad_config_yml_is_reported_at_its_line_and_prunes_nothing() {
    let t = Setup::new();
    t.insert_layers();
    t.config("layerCache:\n  maxSize: 20GB\n  keepFor: 30d\n");
    let out = t.builder(&["cache", "prune"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert_eq!(out.stdout, "");
    insta::assert_snapshot!("bad-config-value", t.masked(&out.stderr));
    assert!(t.cached(1) && t.cached(2) && t.cached(3));

    // `images rm --prune-cache` says the same; the listing warns and goes on.
    let out = t.builder(&["cache", "list", "--json"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("config.yml:2:12"), "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(json["count"], 3);
    assert!(json.get("maxSize").is_none(), "{json}");

    t.config("layerCache: {maxSize: unlimted}\n");
    let out = t.builder(&["cache", "prune"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("did you mean `unlimited`?"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_options_name_the_option_what_is_wrong_and_an_example() {
    let t = Setup::new();
    let out = t.builder(&["cache", "prune", "--max-size", "20GB"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    insta::assert_snapshot!("bad-max-size", out.stderr);
    let out = t.builder(&["cache", "prune", "--older-than", "3 days"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("'--older-than <DURATION>'")
            && out.stderr.contains("`3 days` is not a duration")
            && out.stderr.contains("`--older-than 30d`"),
        "{}",
        out.stderr
    );
}
