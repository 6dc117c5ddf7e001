//! `builder plan` (the real binary) against a store in a temp folder (`BUILDER_STORE`) whose
//! layer cache holds real qcow2 layers (qemu-img, qemu-io) inserted under a first plan's
//! keys, with that plan's recorded inputs: each layer is shown cached, or as running and
//! why. No VM.

use std::path::PathBuf;

use builder::build::plan::{self, Plan};
use builder::build::{cache, reuse};
use builder::store::Store;
use builder::store::layers::{LayerParent, Origin};
use builder::vm::DiskFormat;
use serde_json::Value;

#[path = "support/qcow2.rs"]
mod qcow2;
use qcow2::image;

const HELLO: &str = "name: hello\nschemaVersion: 1.0\nparameters:\n  - greeting:\n      type: string\nphases:\n  - name: build\n    steps:\n      - name: say\n        action: ExecuteBash\n        inputs:\n          commands: ['echo {{ greeting }}']\n";
const CALLER: &str = "name: caller\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: common\n        action: ExecuteDocument\n        inputs:\n          document: lib/common.yml\n";
const COMMON: &str = "schemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: say\n        action: ExecuteBash\n        inputs:\n          commands: [echo common]\n";
const LAST: &str = "name: last\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: say\n        action: ExecuteBash\n        inputs:\n          commands: [echo last]\n";

/// The recipe: hello (a parameter), caller (runs lib/common.yml), last.
fn recipe(greeting: &str, caller_extra: &str) -> String {
    format!(
        "name: web\nversion: 1.0.0\nparentImage: base.qcow2\ncomponents:\n  - path: hello.yml\n    parameters: {{greeting: {greeting}}}\n  - path: caller.yml\n{caller_extra}  - path: last.yml\ntests: {{enabled: false}}\n"
    )
}

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let site = Site { dir };
        image(&site.path("base.qcow2"), None, "0x11", "0", "64k");
        fs_err::create_dir(site.path("lib")).expect("lib");
        site.write("hello.yml", HELLO);
        site.write("caller.yml", CALLER);
        site.write("lib/common.yml", COMMON);
        site.write("last.yml", LAST);
        site.write("recipe.yml", &recipe("hi", ""));
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        fs_err::write(self.path(name), text).expect("write");
    }

    fn store_root(&self) -> PathBuf {
        self.path("store")
    }

    /// `builder plan <args> recipe.yml`: exit code, stdout, stderr.
    fn plan(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
            .arg("plan")
            .args(args)
            .arg("recipe.yml")
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env("BUILDER_STORE", self.store_root())
            .output()
            .expect("builder plan runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `builder plan --json <args>`'s `layers`: (layer, status, reason or build, changes).
    fn layers(&self, args: &[&str]) -> Vec<(String, String, String, Vec<String>)> {
        let mut all = vec!["--json"];
        all.extend(args);
        let (code, stdout, stderr) = self.plan(&all);
        assert_eq!(code, Some(0), "{stderr}");
        let json: Value = serde_json::from_str(&stdout).expect("JSON");
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        json["layers"]
            .as_array()
            .unwrap_or_else(|| panic!("no layers in {stdout}\n{stderr}"))
            .iter()
            .map(|l| {
                let why = if l["status"] == "cached" {
                    text(&l["build"])
                } else {
                    text(&l["reason"])
                };
                let changes = l["changes"]
                    .as_array()
                    .map(|c| c.iter().map(text).collect())
                    .unwrap_or_default();
                (text(&l["layer"]), text(&l["status"]), why, changes)
            })
            .collect()
    }

    fn make_plan(&self) -> Plan {
        let store = Store::open(self.store_root()).expect("store");
        plan::make(&self.path("recipe.yml"), &store, &mut |_| {})
            .expect("plan")
            .0
    }

    /// Cache every layer of the current recipe's chain not cached yet as build `build` made
    /// it: a small qcow2 per layer, each on the one before, inserted with the layer's inputs.
    fn cache_every_layer(&self, build: &str) {
        self.cache_layers(build, None);
    }

    /// [`Site::cache_every_layer`], the layers recorded as pulled from `source`.
    fn cache_layers(&self, build: &str, source: Option<&str>) {
        let plan = self.make_plan();
        let store = Store::open(self.store_root()).expect("store");
        let cache = store.layers().expect("layer cache");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let base = self.path("base.qcow2");
        let work = self.path(&format!("work-{}", build.replace('/', "-")));
        fs_err::create_dir_all(&work).expect("work");
        let mut below: (PathBuf, Option<(String, String)>) = (base.clone(), None);
        let chain = cache::chain(&plan);
        for (i, layer) in chain.iter().enumerate() {
            let inputs = reuse::inputs(&plan, &chain, i);
            let file = work.join(format!("{i}.qcow2"));
            image(
                &file,
                Some(&below.0),
                "0x5a",
                &format!("{}k", 64 * (i + 1)),
                "4k",
            );
            let parent = match &below.1 {
                None => LayerParent::Base {
                    path: &base,
                    format: DiskFormat::Qcow2,
                },
                Some((key, sha256)) => LayerParent::Layer { key, sha256 },
            };
            let origin = Origin {
                component: &layer.name,
                build,
                inputs: Some(&inputs),
                source,
                ..Origin::default()
            };
            let inserted = runtime
                .block_on(cache.insert(&layer.key, parent, &file, origin))
                .expect("insert");
            // A layer cached already (by an earlier build of the same key) is the one the
            // next is written on.
            let cached = &inserted.layer;
            below = (
                cached.path.clone(),
                Some((layer.key.clone(), cached.record.sha256.clone())),
            );
        }
    }
}

fn names(layers: &[(String, String, String, Vec<String>)]) -> Vec<&str> {
    layers.iter().map(|l| l.0.as_str()).collect()
}

fn statuses(layers: &[(String, String, String, Vec<String>)]) -> Vec<(&str, &str)> {
    layers
        .iter()
        .map(|l| (l.1.as_str(), l.2.as_str()))
        .collect()
}

#[test]
fn nothing_cached_every_layer_runs_and_no_store_is_created() {
    let site = Site::new();
    let layers = site.layers(&[]);
    assert_eq!(
        names(&layers),
        ["boot", "hello", "caller", "last", "generalize"]
    );
    assert_eq!(
        statuses(&layers),
        [
            ("run", "nothing cached for this chain yet"),
            ("run", "an earlier layer runs (boot)"),
            ("run", "an earlier layer runs (boot)"),
            ("run", "an earlier layer runs (boot)"),
            ("run", "an earlier layer runs (boot)"),
        ]
    );
    assert!(
        !site.store_root().exists(),
        "builder plan created the store"
    );

    let (code, text, stderr) = site.plan(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    let plan = site.make_plan();
    let short: String = plan.root_layer_key().chars().take(12).collect();
    assert!(
        text.contains(&format!(
            "will run  layer {short}: nothing cached for this chain yet"
        )),
        "{text}"
    );
}

#[test]
fn a_cached_chain_is_shown_cached_layer_by_layer() {
    let site = Site::new();
    site.cache_every_layer("web/1.0.0/1");
    let layers = site.layers(&[]);
    assert!(
        layers
            .iter()
            .all(|l| l.1 == "cached" && l.2 == "web/1.0.0/1"),
        "{layers:?}"
    );
    let before = fs_err::read_dir(site.store_root().join("cache/layers"))
        .expect("cache")
        .map(|e| {
            let path = e.expect("entry").path();
            (path.clone(), fs_err::read(path).expect("read"))
        })
        .collect::<Vec<_>>();

    let (code, text, stderr) = site.plan(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    let plan = site.make_plan();
    let key = plan.components[1].layer_key.clone().expect("key");
    let line = text
        .lines()
        .find(|l| l.contains(&format!("layer {}", &key[..12])))
        .unwrap_or_else(|| panic!("no line for caller's layer in:\n{text}"));
    assert!(
        line.trim_start().starts_with("cached    layer")
            && line.contains("made by web/1.0.0/1, last used 20"),
        "{line}"
    );
    // Planning changed nothing in the cache (no last use written, nothing removed).
    for (path, bytes) in before {
        assert_eq!(
            fs_err::read(&path).expect("read"),
            bytes,
            "{}",
            path.display()
        );
    }

    // A layer pulled from a registry says which.
    let site = Site::new();
    site.cache_layers("web/1.0.0/7", Some("oci://registry.test/cache/web"));
    let (code, stdout, stderr) = site.plan(&["--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        json["layers"][1]["pulledFrom"], "oci://registry.test/cache/web",
        "{stdout}"
    );
    let (_, text, _) = site.plan(&[]);
    assert!(
        text.contains("made by web/1.0.0/7, last used ")
            && text.contains(", pulled from oci://registry.test/cache/web"),
        "{text}"
    );

    // --no-cache: everything runs, for that reason.
    let layers = site.layers(&["--no-cache"]);
    assert!(
        layers.iter().all(|l| l.1 == "run" && l.2 == "--no-cache"),
        "{layers:?}"
    );
}

#[test]
fn a_changed_parameter_is_named_and_everything_after_it_runs() {
    let site = Site::new();
    site.cache_every_layer("web/1.0.0/1");
    site.write("recipe.yml", &recipe("bye", ""));
    let layers = site.layers(&[]);
    assert_eq!(
        statuses(&layers),
        [
            ("cached", "web/1.0.0/1"),
            (
                "run",
                "parameter greeting changed from \"hi\" to \"bye\" (since web/1.0.0/1)"
            ),
            ("run", "an earlier layer runs (hello)"),
            ("run", "an earlier layer runs (hello)"),
            ("run", "an earlier layer runs (hello)"),
        ]
    );
    assert_eq!(
        layers[1].3,
        ["parameter greeting changed from \"hi\" to \"bye\""]
    );
    let (_, text, _) = site.plan(&[]);
    assert!(
        text.contains("changed since the layer web/1.0.0/1 made here:")
            && text.contains("parameter greeting changed from \"hi\" to \"bye\""),
        "{text}"
    );

    // Both versions cached: each plan finds its own chain.
    site.cache_every_layer("web/1.0.0/2");
    let made_by: Vec<String> = site.layers(&[]).into_iter().map(|l| l.2).collect();
    assert_eq!(
        made_by,
        [
            "web/1.0.0/1",
            "web/1.0.0/2",
            "web/1.0.0/2",
            "web/1.0.0/2",
            "web/1.0.0/2"
        ]
    );
    site.write("recipe.yml", &recipe("hi", ""));
    assert!(site.layers(&[]).iter().all(|l| l.2 == "web/1.0.0/1"));
}

#[test]
fn a_document_reached_through_execute_document_that_changed_is_named() {
    let site = Site::new();
    site.cache_every_layer("web/1.0.0/1");
    site.write("lib/common.yml", &format!("{COMMON}# edited\n"));
    let layers = site.layers(&[]);
    assert_eq!(
        statuses(&layers)[..2],
        [("cached", "web/1.0.0/1"), ("cached", "web/1.0.0/1")]
    );
    assert_eq!(layers[2].1, "run");
    assert_eq!(layers[2].3.len(), 1, "{layers:?}");
    assert!(
        layers[2].3[0].starts_with("document lib/common.yml (run through ExecuteDocument) changed"),
        "{layers:?}"
    );
    assert_eq!(
        statuses(&layers)[3..],
        [
            ("run", "an earlier layer runs (caller)"),
            ("run", "an earlier layer runs (caller)")
        ]
    );
}

#[test]
fn another_parent_image_is_named_for_the_boot_layer() {
    let site = Site::new();
    site.cache_every_layer("web/1.0.0/1");
    let before = site.make_plan().parent.sha256().to_string();
    image(&site.path("base.qcow2"), None, "0x22", "0", "64k");
    let after = site.make_plan().parent.sha256().to_string();
    let layers = site.layers(&[]);
    assert_eq!(
        statuses(&layers)[0],
        (
            "run",
            format!(
                "parent changed from \"{}\" to \"{}\" (since web/1.0.0/1)",
                &before[..12],
                &after[..12]
            )
            .as_str()
        )
    );
    assert_eq!(layers[1].2, "an earlier layer runs (boot)");
}

#[test]
fn cache_false_runs_its_component_and_every_later_one() {
    let site = Site::new();
    site.cache_every_layer("web/1.0.0/1");
    site.write("recipe.yml", &recipe("hi", "    cache: false\n"));
    let layers = site.layers(&[]);
    assert_eq!(
        statuses(&layers),
        [
            ("cached", "web/1.0.0/1"),
            ("cached", "web/1.0.0/1"),
            ("run", "its recipe entry says `cache: false`"),
            ("run", "an earlier layer runs (caller)"),
            ("run", "an earlier layer runs (caller)"),
        ]
    );
}

#[test]
fn a_damaged_layer_is_reported_and_left_for_the_build() {
    let site = Site::new();
    site.cache_every_layer("web/1.0.0/1");
    let plan = site.make_plan();
    let key = plan.components[0].layer_key.clone().expect("key");
    let file = site
        .store_root()
        .join("cache/layers")
        .join(format!("{key}.qcow2"));
    let size = fs_err::metadata(&file).expect("layer").len();
    fs_err::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(size - 1)
        .expect("truncate");
    let layers = site.layers(&[]);
    assert_eq!(layers[1].1, "run");
    assert!(
        layers[1]
            .2
            .starts_with("the cached layer is damaged: its file has"),
        "{layers:?}"
    );
    assert_eq!(layers[2].2, "an earlier layer runs (hello)");
    assert!(file.is_file(), "plan removed a layer");
}
