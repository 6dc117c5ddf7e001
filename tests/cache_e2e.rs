//! VM tier: the layer cache (issue #12) end to end, with real QEMU (TCG here) booting the
//! fixture base image. Run with:
//!
//! ```text
//! BUILDER_VM_TESTS=1 BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) \
//!     cargo test --locked --test cache_e2e -- --nocapture
//! ```
//!
//! Without `BUILDER_VM_TESTS=1` the test is ignored (tests/support/vm_tier.rs); with it, a
//! missing image fails.
//!
//! One test, one store, one sequence of builds of `tests/cache/recipe.yml` (three small
//! components, each writing `/opt/cache-test/<n>` from its parameter), each step building on
//! what the previous ones left in the cache. Boots are what costs: the test's copy of the
//! recipe boots the appliance (`infrastructure.boot: appliance`, seconds under TCG), so (a) to
//! (j) cost seven appliance boots (one in a second store, step (j); two of them at once) and
//! no full boot. The full boot (35-120 s each under TCG) has its own layer keys and a resume of
//! its own (cloud-init kept from running on a cached layer, then re-armed for the image), so
//! (k) builds the recipe with `--boot full` twice: three full boots in all, with the test
//! stage, which always boots full. The test stage is off except in (k). Measured here with the
//! two cores shared (load 6-10): (a) 26 s, (b) 31 s, (c) 18 s, (d) 34 s, the comparison 52 s,
//! (e, g) 47 s, (f) 29 s, (j) 19 s and 30 s, (k) 86 s and 170 s with its test VM: 547 s in all
//! (953 s at load 5-13 when every build booted full: eight full boots).
//!
//! - (a) from scratch: every layer runs; the manifest's layers say none was reused, and that
//!   the build VM was the appliance.
//! - (b) the last component's document edited: the boot layer and the first two components
//!   are cached, only the last runs, in an appliance booted on the cached layers.
//! - (c) nothing changed: every layer is cached, no build VM boots (no `stageStarted` of the
//!   boot, no QEMU process while it runs, no build VM console log), and the build still gets
//!   its own build number and exports.
//! - (d) `--no-cache`: everything runs.
//! - the image (c) made from cached layers has the same files as (d)'s, made from scratch:
//!   both exported disks are read from the host (debugfs), every file's type, mode, owner,
//!   size and sha256 compared, except the few a boot writes (see [`PER_BOOT`]).
//! - (e, g) the first component edited, in two builds at once on the same store, one of them
//!   with its last component changed too: both run every component, both build the same new
//!   layers at the same time (one insert wins), both succeed, and afterwards every cached
//!   layer's file matches its record (size, sha256) and its parent is cached.
//! - (f) a cached layer corrupted (bytes flipped in the middle, size kept): the next build
//!   reports it discarded and rebuilds from it; the cache then holds a sound layer again.
//! - (j) this store pushes its chain to a registry (`--cache-to`, no VM boots); a second
//!   store with an empty cache builds the recipe with its last component changed from that
//!   registry (`--cache-from`): the first layers are pulled, only the last component runs.
//! - (k) the full boot: `--boot full` from scratch reuses none of the appliance's layers
//!   (every layer runs); then, with the last component changed and the test stage on, a full
//!   build resumes on the cached boot layer and the first two components: only the last runs,
//!   and the test stage passes (each component's test phase reads its file in the test VM,
//!   which boots the result with cloud-init, as a user will).
//! - (h) `builder cache prune --all` empties the cache.
//!
//! The [`NoLeftovers`] guard (tests/support/leftovers.rs) checks at the end that no process,
//! work folder or VM folder is left.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/vm_tier.rs"]
mod vm_tier;

#[path = "support/leftovers.rs"]
mod leftovers;

#[path = "support/registry.rs"]
#[allow(dead_code)] // shared with tests/distribute_oci.rs, which uses all of it
mod registry;
use leftovers::NoLeftovers;

/// The chain's layers, bottom to top, as `layerCache` events and the manifest name them.
const LAYERS: [&str; 5] = [
    "boot",
    "cache-first",
    "cache-second",
    "cache-third",
    "generalize",
];
const NAME: &str = "e2e-cache/1.0.0";

/// One `builder build` that ran.
struct Run {
    args: Vec<String>,
    code: Option<i32>,
    /// Its `--json` events.
    events: Vec<Value>,
    stderr: String,
    took: Duration,
}

impl Run {
    fn events(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }

    /// `(layer, status)` of each `layerCache` event, in order.
    fn layer_statuses(&self) -> Vec<(String, String)> {
        self.events("layerCache")
            .iter()
            .map(|e| (text(&e["layer"]), text(&e["status"])))
            .collect()
    }

    /// The `layerCache` event of `layer`.
    fn layer(&self, layer: &str) -> &Value {
        self.events
            .iter()
            .find(|e| e["event"] == "layerCache" && e["layer"] == layer)
            .unwrap_or_else(|| panic!("no layerCache event for {layer}"))
    }

    /// The statuses of `stageFinished` for `stage` (with `detail`, for a component).
    fn finished(&self, stage: &str, detail: Option<&str>) -> Vec<String> {
        self.events("stageFinished")
            .iter()
            .filter(|e| e["stage"] == stage && detail.is_none_or(|d| e["detail"] == d))
            .map(|e| text(&e["status"]))
            .collect()
    }

    /// How many `stageStarted` for `stage` (with `detail`, for a component).
    fn started(&self, stage: &str, detail: Option<&str>) -> usize {
        self.events("stageStarted")
            .iter()
            .filter(|e| e["stage"] == stage && detail.is_none_or(|d| e["detail"] == d))
            .count()
    }

    /// `name/x.y.z/n` of the stored build.
    fn image(&self) -> String {
        let finished = self.events("buildFinished");
        assert_eq!(finished.len(), 1, "one buildFinished");
        assert_eq!(finished[0]["status"], "success", "{}", finished[0]);
        text(&finished[0]["image"])
    }

    /// The stored build's folder and its manifest.
    fn stored(&self) -> (PathBuf, Value) {
        let finished = self.events("buildFinished");
        let dir = PathBuf::from(text(&finished[0]["directory"]));
        let manifest = serde_json::from_slice(
            &fs_err::read(dir.join("manifest.json")).expect("the build's manifest"),
        )
        .expect("manifest JSON");
        (dir, manifest)
    }

    /// The stored build's exported qcow2.
    fn qcow2(&self) -> PathBuf {
        let (dir, manifest) = self.stored();
        let file = dir.join(text(&manifest["outputs"][0]["file"]));
        assert!(file.is_file(), "{}", file.display());
        file
    }

    /// Asserts the run succeeded and each layer of the chain was `cached` or `run` as
    /// `statuses` says, in chain order.
    fn assert_layers(&self, statuses: [&str; 5]) {
        assert_eq!(
            self.code,
            Some(0),
            "builder {} failed:\n{}",
            self.args.join(" "),
            self.stderr
        );
        let expected: Vec<(String, String)> = LAYERS
            .iter()
            .zip(statuses)
            .map(|(l, s)| (l.to_string(), s.to_string()))
            .collect();
        assert_eq!(self.layer_statuses(), expected, "layerCache events");
        for (layer, status) in LAYERS.iter().zip(statuses) {
            let e = self.layer(layer);
            assert_eq!(
                e["key"].as_str().map(str::len),
                Some(64),
                "a layer key: {e}"
            );
            if status == "cached" {
                assert_eq!(e["from"], "local", "{e}");
                assert!(
                    text(&e["build"]).starts_with(NAME),
                    "which build made it: {e}"
                );
            } else {
                assert!(!text(&e["reason"]).is_empty(), "why it runs: {e}");
            }
        }
        // A component that ran has its stage started and finished; a cached one only a
        // `cached` stageFinished.
        for (layer, status) in LAYERS[1..4].iter().zip(&statuses[1..4]) {
            let finished = self.finished("component", Some(layer));
            if *status == "cached" {
                assert_eq!(self.started("component", Some(layer)), 0, "{layer}");
                assert_eq!(finished, ["cached"], "{layer}");
            } else {
                assert_eq!(self.started("component", Some(layer)), 1, "{layer}");
                assert_eq!(finished, ["success"], "{layer}");
            }
        }
    }

    /// The key of `layer` in this build's chain.
    fn key(&self, layer: &str) -> String {
        text(&self.layer(layer)["key"])
    }

    /// Each stage's duration and the cache's decisions, on stderr (what a step costs).
    fn print(&self, step: &str) {
        eprintln!(
            "== ({step}) builder {}: exit {:?} in {:.1} s",
            self.args.join(" "),
            self.code,
            self.took.as_secs_f64()
        );
        for e in &self.events {
            if e["event"] == "layerCache" {
                eprintln!(
                    "   layer {:<13} {:<6} {} {}",
                    text(&e["layer"]),
                    text(&e["status"]),
                    text(&e["build"]),
                    text(&e["reason"])
                );
            } else if e["event"] == "stageFinished" {
                eprintln!(
                    "   stage {} {} {}: {:.1} s",
                    text(&e["stage"]),
                    text(&e["detail"]),
                    text(&e["status"]),
                    e["durationMs"].as_f64().unwrap_or(0.0) / 1000.0
                );
            }
        }
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Runs `builder build RECIPE --json --accel tcg EXTRA` for each `(recipe, extra)` at once,
/// in the guard's store, until all exit. Returns each run, and the command line of every QEMU
/// (`qemu-system-…`, found by command line: QEMU renames itself) seen while they ran.
fn builds(
    guard: &NoLeftovers,
    image: &Path,
    builds: &[(&Path, &[&str])],
) -> (Vec<Run>, BTreeSet<String>) {
    let started = Instant::now();
    let mut children = Vec::new();
    for (recipe, extra) in builds {
        let mut args = vec![
            "build".to_string(),
            recipe.to_string_lossy().into_owned(),
            "--json".into(),
            "--accel".into(),
            "tcg".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = guard
            .builder_command(&argv)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BUILDER_TEST_IMAGE", image)
            .env(
                "BUILDER_APPLIANCE_CACHE",
                guard.root().join("appliance-cache"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("builder runs");
        let drain = |mut from: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = from.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
        let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
        children.push((args, child, stdout, stderr, None));
    }
    let root = guard.root().to_string_lossy().into_owned();
    let mut qemus = BTreeSet::new();
    while children.iter().any(|c| c.4.is_none()) {
        for p in builder::store::runner::processes_mentioning(&root) {
            if p.command_line.split_whitespace().next().is_some_and(|exe| {
                exe.rsplit('/')
                    .next()
                    .unwrap_or(exe)
                    .starts_with("qemu-system")
            }) {
                qemus.insert(p.command_line);
            }
        }
        for (_, child, _, _, done) in &mut children {
            if done.is_none()
                && let Some(status) = child.try_wait().expect("wait for builder")
            {
                *done = Some((status.code(), started.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let runs = children
        .into_iter()
        .map(|(args, _, stdout, stderr, done)| {
            let (code, took) = done.expect("exited");
            let stdout = stdout.join().expect("stdout reader");
            let stderr =
                String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned();
            eprintln!("$ builder {}\n{stderr}--- exit {code:?}", args.join(" "));
            let events = String::from_utf8_lossy(&stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
            Run {
                args,
                code,
                events,
                stderr,
                took,
            }
        })
        .collect();
    (runs, qemus)
}

/// One build; see [`builds`].
fn build(
    guard: &NoLeftovers,
    image: &Path,
    recipe: &Path,
    extra: &[&str],
) -> (Run, BTreeSet<String>) {
    let (mut runs, qemus) = builds(guard, image, &[(recipe, extra)]);
    (runs.remove(0), qemus)
}

/// `tests/cache/` copied into `dir/recipe/`, its build VM the appliance (`boot: appliance`);
/// returns the copy's folder.
fn copy_recipe(dir: &Path) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cache");
    let to = dir.join("recipe");
    fs_err::create_dir(&to).expect("mkdir recipe");
    for e in fs_err::read_dir(&from).expect("tests/cache") {
        let e = e.expect("entry");
        fs_err::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
    edit(
        &to.join("recipe.yml"),
        "  network: none\n",
        "  network: none\n  boot: appliance\n",
        None,
    );
    to
}

/// Replaces `from` by `to` in `file` (which must contain it), or writes a copy of it as `into`.
fn edit(file: &Path, from: &str, to: &str, into: Option<&Path>) {
    let text = fs_err::read_to_string(file).expect("read");
    assert!(text.contains(from), "no `{from}` in {}", file.display());
    fs_err::write(into.unwrap_or(file), text.replacen(from, to, 1)).expect("write");
}

/// Every layer in `<store>/cache/layers/`: its record names a file of the recorded size and
/// sha256, its parent is cached, and nothing else is there (no insert left half done).
/// Returns the keys.
fn assert_cache_consistent(store: &Path) -> BTreeSet<String> {
    use builder::store::layers::LayerRecord;
    let dir = store.join("cache").join("layers");
    let mut records = BTreeMap::new();
    let mut files = BTreeSet::new();
    for e in fs_err::read_dir(&dir).expect("cache/layers") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        if let Some(key) = name.strip_suffix(".json") {
            let record: LayerRecord =
                serde_json::from_slice(&fs_err::read(dir.join(&name)).expect("record"))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(record.key, key, "{name}");
            records.insert(key.to_string(), record);
        } else if let Some(key) = name.strip_suffix(".qcow2") {
            files.insert(key.to_string());
        } else {
            panic!("left in the cache: {name}");
        }
    }
    assert_eq!(
        records.keys().cloned().collect::<BTreeSet<_>>(),
        files,
        "each layer file has its record and each record its file"
    );
    for (key, record) in &records {
        let file = dir.join(format!("{key}.qcow2"));
        let digest = builder::digest::sha256_file(&file, None).expect("hash the layer");
        assert_eq!(digest.size, record.size, "{}", file.display());
        assert_eq!(digest.hex(), record.sha256, "{}", file.display());
        if let Some(parent) = &record.parent {
            assert!(
                records.contains_key(parent),
                "{key}'s parent {parent} is cached"
            );
        }
        let check = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&file)
            .output()
            .expect("qemu-img runs");
        assert!(
            check.status.success(),
            "qemu-img check {}: {}",
            file.display(),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    files
}

/// Paths (and folders, ending in `/`) that differ between two builds of the same recipe
/// without any cache (seen comparing two such builds): what the build VM's boots write with
/// the time or a per-boot identity. Everything else, /etc and /usr included, must be equal
/// byte for byte. (Seen in full boots; the appliance, which the comparison builds boot, runs
/// neither systemd nor cloud-init and writes none of them.)
const PER_BOOT: &[(&str, &str)] = &[
    (
        "/var/log/",
        "the journal (in a folder named by the boot's machine id) and wtmp",
    ),
    (
        "/var/lib/systemd/random-seed",
        "the random seed systemd saves at shutdown",
    ),
    (
        "/etc/sudoers.d/90-cloud-init-users",
        "cloud-init writes the time of the first boot in its header",
    ),
];

fn per_boot(path: &str) -> bool {
    PER_BOOT.iter().any(|(p, _)| {
        if p.ends_with('/') {
            path.starts_with(p) || format!("{path}/") == *p
        } else {
            path == *p
        }
    })
}

/// The guest's root file system in the qcow2 `disk`, read from the host without mounting it:
/// converted to raw in `scratch`, its largest partition found (sfdisk), copied out with
/// debugfs (e2fsprogs, which scripts/install-deps installs for the fixtures); then each
/// path's type, mode, owner and size, and its sha256 or link target. Removes what it wrote.
fn guest_tree(disk: &Path, scratch: &Path) -> BTreeMap<String, String> {
    let raw = scratch.join("disk.raw");
    let root = scratch.join("root");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("command runs");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(disk)
        .arg(&raw));
    let table: Value = serde_json::from_slice(&run(Command::new("sfdisk").arg("--json").arg(&raw)))
        .expect("sfdisk JSON");
    let sector = table["partitiontable"]["sectorsize"]
        .as_u64()
        .unwrap_or(512);
    let largest = table["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .max_by_key(|p| p["size"].as_u64())
        .expect("a partition");
    let offset = largest["start"].as_u64().expect("start") * sector;
    fs_err::create_dir(&root).expect("mkdir");
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", root.display()))
        .arg(format!("{}?offset={offset}", raw.display())));
    assert!(
        root.join("etc").is_dir(),
        "debugfs copied the root file system"
    );
    let mut tree = BTreeMap::new();
    walk(&root, &root, &mut tree);
    fs_err::remove_file(&raw).expect("rm raw");
    fs_err::remove_dir_all(&root).expect("rm root");
    tree
}

fn walk(root: &Path, dir: &Path, tree: &mut BTreeMap<String, String>) {
    for e in fs_err::read_dir(dir).expect("read_dir") {
        let path = e.expect("entry").path();
        let meta = fs_err::symlink_metadata(&path).expect("stat");
        let name = format!("/{}", path.strip_prefix(root).expect("inside").display());
        let owner = format!("{:o} {}:{}", meta.mode(), meta.uid(), meta.gid());
        let what = if meta.is_dir() {
            walk(root, &path, tree);
            format!("dir {owner}")
        } else if meta.is_symlink() {
            let target = fs_err::read_link(&path).expect("readlink");
            format!("link -> {}", target.display())
        } else {
            let digest = builder::digest::sha256_file(&path, None).expect("hash");
            format!("file {owner} {} {}", digest.size, digest.hex())
        };
        tree.insert(name, what);
    }
}

/// Asserts the two images' files are the same, but for [`PER_BOOT`]; lists what differs.
fn assert_same_files(cached: &BTreeMap<String, String>, fresh: &BTreeMap<String, String>) {
    let paths: BTreeSet<&String> = cached.keys().chain(fresh.keys()).collect();
    let mut differ = Vec::new();
    let mut skipped = 0;
    for path in paths {
        let (a, b) = (cached.get(path), fresh.get(path));
        if a == b {
            continue;
        }
        if per_boot(path) {
            skipped += 1;
            continue;
        }
        differ.push(format!("{path}: {a:?} (cached) vs {b:?} (from scratch)"));
    }
    eprintln!(
        "   {} paths compared, {skipped} written per boot differ (not compared)",
        cached.len()
    );
    assert!(
        differ.is_empty(),
        "the image from cached layers differs from the one from scratch:\n  {}",
        differ.join("\n  ")
    );
    for (n, content) in [("first", "first"), ("second", "second"), ("third", "third")] {
        let entry = cached
            .get(&format!("/opt/cache-test/{n}"))
            .unwrap_or_else(|| panic!("no /opt/cache-test/{n}"));
        assert!(
            entry.starts_with(&format!("file 100640 0:0 {} ", content.len()))
                || entry.starts_with(&format!("file 100644 0:0 {} ", content.len())),
            "/opt/cache-test/{n}: {entry}"
        );
    }
}

/// `run` resumed on the boot layer and the first two components of `below`'s chain (made by
/// the build `made_by`): they are cached and the same, the last component is not, and one
/// build VM booted on them; the manifest says which layers were reused and from which build.
fn assert_resumed(run: &Run, below: &Run, made_by: &str) {
    for layer in &LAYERS[..3] {
        assert_eq!(run.layer(layer)["build"], made_by, "{layer}");
        assert_eq!(run.key(layer), below.key(layer), "{layer}");
    }
    assert_ne!(run.key("cache-third"), below.key("cache-third"));
    assert_eq!(
        run.started("boot", None),
        1,
        "the build VM boots on the cached layers"
    );
    let (_, manifest) = run.stored();
    for l in manifest["layers"].as_array().expect("layers") {
        let reused =
            ["boot", "cache-first", "cache-second"].contains(&text(&l["component"]).as_str());
        assert_eq!(l["from"] == "local", reused, "{l}");
        assert_eq!(l["build"] == made_by, reused, "{l}");
    }
}

/// Flips 16 bytes in the middle of `file`, keeping its size.
fn corrupt(file: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open the layer");
    let size = f.metadata().expect("stat").len();
    let mut bytes = [0u8; 16];
    f.seek(SeekFrom::Start(size / 2)).expect("seek");
    f.read_exact(&mut bytes).expect("read");
    for b in &mut bytes {
        *b ^= 0xff;
    }
    f.seek(SeekFrom::Start(size / 2)).expect("seek");
    f.write_all(&bytes).expect("write");
    assert_eq!(f.metadata().expect("stat").len(), size);
}

#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
#[allow(unsafe_code)] // `set_var`: unsafe since edition 2024
fn layer_cache_reuses_verifies_and_shares_layers() {
    let image = vm_tier::test_image();
    // The registry of step (j), spoken to over plain HTTP by the builds this test starts.
    let registry = registry::TestRegistry::start();
    // SAFETY: this binary's one test sets it before it starts any thread or process; the
    // builds inherit it.
    unsafe { std::env::set_var("BUILDER_INSECURE_REGISTRIES", registry.host()) };
    let guard = NoLeftovers::new();
    let store = guard.store();
    let dir = copy_recipe(guard.root());
    let recipe = dir.join("recipe.yml");
    let (mut appliance_boots, mut full_boots) = (0, 0);

    // (a) From scratch: every layer runs, and the manifest says none was reused.
    let (a, _) = build(&guard, &image, &recipe, &[]);
    a.print("a");
    a.assert_layers(["run"; 5]);
    assert_eq!(a.image(), format!("{NAME}/1"));
    assert_eq!(a.started("boot", None), 1);
    appliance_boots += 1;
    let (_, manifest) = a.stored();
    assert_eq!(
        manifest["host"]["boot"], "appliance",
        "{}",
        manifest["host"]
    );
    let layers = manifest["layers"].as_array().expect("manifest layers");
    let names: Vec<String> = layers.iter().map(|l| text(&l["component"])).collect();
    assert_eq!(names, LAYERS, "the manifest's layers");
    for l in layers {
        assert!(l.get("from").is_none() && l.get("build").is_none(), "{l}");
        assert_eq!(l["key"].as_str().map(str::len), Some(64), "{l}");
    }

    // (b) The last component's document edited: only the last runs, in an appliance booted
    // on the cached layers.
    edit(
        &dir.join("cache-third.yml"),
        "permissions: 0644",
        "permissions: 0640",
        None,
    );
    let (b, _) = build(&guard, &image, &recipe, &[]);
    b.print("b");
    b.assert_layers(["cached", "cached", "cached", "run", "run"]);
    appliance_boots += 1;
    assert_resumed(&b, &a, &format!("{NAME}/1"));

    // (c) Nothing changed: every layer is cached, no VM boots at all, and the build is a
    // build of its own, exported.
    let (c, qemus) = build(&guard, &image, &recipe, &[]);
    c.print("c");
    c.assert_layers(["cached"; 5]);
    for (layer, made_by) in LAYERS.iter().zip([1, 1, 1, 2, 2]) {
        assert_eq!(
            c.layer(layer)["build"],
            format!("{NAME}/{made_by}"),
            "{layer}"
        );
    }
    assert_eq!(c.image(), format!("{NAME}/3"), "a build number of its own");
    assert!(qemus.is_empty(), "no VM may boot: {qemus:?}");
    for stage in ["boot", "generalize", "shutdown"] {
        assert_eq!(c.started(stage, None), 0, "{stage} started");
        assert_eq!(c.finished(stage, None), ["cached"], "{stage}");
    }
    assert_eq!(c.finished("export", None), ["success"]);
    let (c_dir, manifest) = c.stored();
    assert!(
        !c_dir.join("logs/build-vm/console.log").exists(),
        "no build VM console"
    );
    for l in manifest["layers"].as_array().expect("layers") {
        assert_eq!(l["from"], "local", "{l}");
    }
    // What the generalize layer's record kept: the image can still be checked for package
    // updates without its generalize stage running.
    assert!(
        manifest["packages"]["packages"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "packages"
    );
    assert_eq!(
        manifest["packageSources"]["manager"], "apt",
        "package sources"
    );
    let c_disk = c.qcow2();

    // (d) --no-cache: everything runs.
    let (d, _) = build(&guard, &image, &recipe, &["--no-cache"]);
    d.print("d");
    assert_eq!(d.code, Some(0), "{}", d.stderr);
    assert!(
        d.layer_statuses().iter().all(|(_, s)| s == "run"),
        "--no-cache reuses nothing: {:?}",
        d.layer_statuses()
    );
    for layer in &LAYERS[1..4] {
        assert_eq!(d.started("component", Some(layer)), 1, "{layer}");
    }
    assert_eq!(d.image(), format!("{NAME}/4"));
    appliance_boots += 1;

    // The image from cached layers (c) has the same files as the one from scratch (d).
    let started = Instant::now();
    let scratch = guard.root().join("compare");
    fs_err::create_dir(&scratch).expect("mkdir");
    let cached = guest_tree(&c_disk, &scratch);
    let fresh = guest_tree(&d.qcow2(), &scratch);
    assert_same_files(&cached, &fresh);
    eprintln!(
        "== (c = d) compared from the host in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // (e, g) The first component edited, in two builds at once on the same store (B with its
    // last component changed too): both run every component, building the same new first and
    // second layers at the same time; both succeed and the cache stays consistent.
    edit(&recipe, "Content: first", "Content: first, edited", None);
    let recipe_b = dir.join("recipe-b.yml");
    edit(
        &recipe,
        "Content: third",
        "Content: third, other",
        Some(&recipe_b),
    );
    let (runs, _) = builds(&guard, &image, &[(&recipe, &[]), (&recipe_b, &[])]);
    appliance_boots += 2;
    for (run, step) in runs.iter().zip(["e", "g"]) {
        run.print(step);
        run.assert_layers(["cached", "run", "run", "run", "run"]);
        assert!(run.image().starts_with(NAME));
    }
    let (e, g) = (&runs[0], &runs[1]);
    assert_eq!(
        e.key("cache-second"),
        g.key("cache-second"),
        "the same chain below the last"
    );
    assert_ne!(e.key("cache-third"), g.key("cache-third"));
    let cached = assert_cache_consistent(&store);
    assert!(
        cached.contains(&e.key("cache-first")),
        "one insert of the first layer won"
    );

    // (f) A cached layer corrupted (bytes flipped, size kept): the next build reports it
    // discarded, rebuilds from it, and the cache holds a sound layer again.
    let key = e.key("cache-first");
    corrupt(&store.join("cache/layers").join(format!("{key}.qcow2")));
    let (f, _) = build(&guard, &image, &recipe, &[]);
    f.print("f");
    f.assert_layers(["cached", "run", "run", "run", "run"]);
    appliance_boots += 1;
    let said = f
        .events
        .iter()
        .map(Value::to_string)
        .chain([f.stderr.clone()])
        .any(|t| t.contains("discarded") && t.contains(&key[..12]));
    assert!(said, "the corrupt layer {key} is reported discarded");
    // Its layerCache event says why it runs: the damage, not only that it is missing.
    let reason = f
        .events("layerCache")
        .iter()
        .find(|e| e["key"] == key.as_str())
        .map(|e| text(&e["reason"]))
        .unwrap_or_default();
    assert!(
        reason.contains("discarded") && reason.contains("corrupt"),
        "{reason}"
    );
    assert!(
        assert_cache_consistent(&store).contains(&key),
        "the layer is cached again, sound"
    );

    // (j) A second store with an empty cache pulls layers through a registry and runs only
    // the changed component. This store pushes `recipe`'s chain (every layer is cached: no VM
    // boots); store B, empty, builds `recipe_b` (its last component differs) with
    // `--cache-from`: the boot layer and the first two components come from the registry,
    // verified; only the last component (and generalize) run, on them: one boot.
    let shared = format!("oci://{}/cache/e2e", registry.host());
    let (pushed, qemus) = build(&guard, &image, &recipe, &["--cache-to", &shared]);
    pushed.print("j, push");
    pushed.assert_layers(["cached"; 5]);
    assert!(qemus.is_empty(), "no VM may boot: {qemus:?}");
    let said = |run: &Run, what: &str| {
        run.events("progress")
            .iter()
            .any(|e| text(&e["message"]).contains(what))
    };
    assert!(
        said(&pushed, "pushed 5 layer(s), 0 already there"),
        "{}",
        pushed.stderr
    );
    let store_b = guard.root().join("store-b");
    let store_b = store_b.to_string_lossy().into_owned();
    let pull = ["--store", &store_b, "--cache-from", &shared];
    let (j, _) = build(&guard, &image, &recipe_b, &pull);
    j.print("j, pull");
    appliance_boots += 1;
    assert_eq!(j.code, Some(0), "{}", j.stderr);
    let statuses = ["cached", "cached", "cached", "run", "run"];
    let expected: Vec<(String, String)> = LAYERS
        .iter()
        .zip(statuses)
        .map(|(l, s)| (l.to_string(), s.to_string()))
        .collect();
    assert_eq!(j.layer_statuses(), expected, "layerCache events");
    for layer in &LAYERS[..3] {
        assert_eq!(j.layer(layer)["from"], shared.as_str(), "{layer}");
        assert_eq!(j.key(layer), g.key(layer), "{layer}");
    }
    assert_eq!(j.key("cache-third"), g.key("cache-third"));
    assert_eq!(j.started("boot", None), 1, "one build VM boot");
    for (layer, runs) in LAYERS[1..4].iter().zip([0, 0, 1]) {
        assert_eq!(j.started("component", Some(layer)), runs, "{layer}");
    }
    let (_, manifest) = j.stored();
    for l in manifest["layers"].as_array().expect("layers") {
        let pulled =
            ["boot", "cache-first", "cache-second"].contains(&text(&l["component"]).as_str());
        assert_eq!(l["from"] == shared.as_str(), pulled, "{l}");
    }
    assert_eq!(
        assert_cache_consistent(Path::new(&store_b)).len(),
        5,
        "three layers pulled, two built"
    );

    // (k) The full boot. Its layers are not the appliance's: from scratch, every layer runs.
    let (k, _) = build(&guard, &image, &recipe, &["--boot", "full"]);
    k.print("k, full");
    k.assert_layers(["run"; 5]);
    full_boots += 1;
    let (_, manifest) = k.stored();
    assert_eq!(manifest["host"]["boot"], "full", "{}", manifest["host"]);
    for layer in LAYERS {
        assert_ne!(k.key(layer), f.key(layer), "{layer}: the appliance's key");
    }
    // The last component changed and the test stage on: a full build VM boots on the cached
    // layers (cloud-init kept from running again on them, then re-armed for the image), only
    // the last component runs, and the test VM boots the result with cloud-init: each
    // component's test phase reads its file.
    edit(&recipe, "Content: third", "Content: third, full", None);
    edit(&recipe, "enabled: false", "enabled: true", None);
    let (resumed, _) = build(&guard, &image, &recipe, &["--boot", "full"]);
    resumed.print("k, full on cached layers");
    resumed.assert_layers(["cached", "cached", "cached", "run", "run"]);
    full_boots += 2;
    assert_resumed(&resumed, &k, &k.image());
    assert_eq!(resumed.finished("test", None), ["success"]);
    let (_, manifest) = resumed.stored();
    assert_eq!(manifest["host"]["boot"], "full", "{}", manifest["host"]);
    let tests: Vec<(String, String)> = manifest["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .map(|t| (text(&t["component"]), text(&t["status"])))
        .collect();
    assert_eq!(
        tests,
        LAYERS[1..4]
            .iter()
            .map(|c| (c.to_string(), "success".to_string()))
            .collect::<Vec<_>>(),
        "each component's test phase read its file"
    );

    // (h) Prune: every layer is unused now, so `--all` empties the cache.
    let pruned = guard
        .builder_command(&["cache", "prune", "--all"])
        .output()
        .expect("builder runs");
    eprintln!(
        "$ builder cache prune --all\n{}{}--- exit {:?}",
        String::from_utf8_lossy(&pruned.stdout),
        String::from_utf8_lossy(&pruned.stderr),
        pruned.status.code()
    );
    assert_eq!(pruned.status.code(), Some(0));
    assert!(
        assert_cache_consistent(&store).is_empty(),
        "prune --all left layers"
    );
    eprintln!("== {appliance_boots} appliance boots, {full_boots} full boots");
}
