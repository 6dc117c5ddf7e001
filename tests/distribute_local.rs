//! Local tier: the local distribution targets on stored builds in a real store folder (no
//! VM): a directory copy (files and sums verified, nothing left behind when it fails), a
//! Vagrant box that Debian's `vagrant box add` accepts (scripts/install-deps installs vagrant;
//! without it the Vagrant tests fail and say so), an OVA converted when the build did not
//! export one, the `builder distribute` command line (its mistakes and its receipts in
//! `images show --json`), recipe `distribution:` entries resolved into targets, and
//! `images rm --prune-cache`. One test sends through the dispatcher to the OCI targets on a
//! real registry (Debian's `docker-registry` on loopback, tests/support/registry.rs).

#[path = "support/registry.rs"]
#[allow(dead_code)] // shared with tests/distribute_oci.rs, which uses all of it
mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use builder::distribute::destination::{self, CliOptions, Destination};
use builder::distribute::directory::DirectoryError;
use builder::distribute::{DistributeError, NoProgress};
use builder::recipe::Format;
use builder::recipe::Version;
use builder::store::manifest::{Artifact, Manifest, ParentInput};
use builder::store::{Store, StoredImage};

/// A real (empty, 64 MiB) qcow2 made with qemu-img.
fn qcow2(path: &Path) {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .status()
        .expect("qemu-img runs (scripts/install-deps installs qemu-utils)");
    assert!(status.success(), "qemu-img create failed");
}

/// Store one build of `name` 1.0.0 whose output is a real qcow2.
fn store_build(store: &Store, name: &str, parent: Option<ParentInput>) -> StoredImage {
    let slot = store
        .allocate_build(name, &Version::new(1, 0, 0))
        .expect("allocate");
    let file = format!("{name}-1.0.0-{}.qcow2", slot.id().build);
    let path = slot.dir().join(&file);
    qcow2(&path);
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.inputs.parent = parent;
    m.host.cpus = 2;
    m.host.memory_mib = 1024;
    m.host.firmware = "bios".into();
    m.outputs.push(Artifact {
        file: file.clone(),
        format: Format::Qcow2,
        size: fs_err::metadata(&path).expect("size").len(),
        virtual_size: 64 << 20,
        sha256: builder::digest::sha256_file(&path, None)
            .expect("hash")
            .hex(),
    });
    fs_err::write(
        slot.dir().join("SHA256SUMS"),
        format!("{}  {file}\n", m.outputs[0].sha256),
    )
    .expect("sums");
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs_err::read_dir(dir)
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn dir_target(path: &Path, overwrite: bool, formats: Vec<Format>) -> Destination {
    Destination::parse(
        &format!("dir:{}", path.display()),
        &CliOptions {
            overwrite,
            formats,
            ..CliOptions::default()
        },
    )
    .expect("a dir target")
}

#[tokio::test]
async fn a_directory_copy_is_complete_verified_and_never_half_there() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let image = store_build(&store, "web", None);
    let out = tmp.path().join("out");

    let receipt = destination::distribute(&image, &dir_target(&out, false, vec![]), &NoProgress)
        .await
        .expect("distributed");
    assert_eq!(receipt.kind, "directory");
    let folder = out.join("web-1.0.0-1");
    assert_eq!(receipt.location, folder.display().to_string());
    assert_eq!(names(&out), ["web-1.0.0-1"], "only the final folder");
    assert_eq!(
        names(&folder),
        ["SHA256SUMS", "manifest.json", "web-1.0.0-1.qcow2"]
    );
    builder::export::verify_sums(&folder).expect("the copy matches its SHA256SUMS");
    let disk = &image.manifest.outputs[0];
    assert_eq!(receipt.digests.get(&disk.file), Some(&disk.sha256));
    let copied: Manifest =
        serde_json::from_slice(&fs_err::read(folder.join("manifest.json")).expect("read"))
            .expect("manifest");
    assert_eq!(copied.image, image.manifest.image);

    // A second copy under the same name is refused before anything is written...
    let e = destination::distribute(&image, &dir_target(&out, false, vec![]), &NoProgress)
        .await
        .expect_err("exists");
    assert!(
        matches!(e, DistributeError::Directory(DirectoryError::Exists { .. })),
        "{e}"
    );
    // ...and replaces the folder when asked.
    fs_err::write(folder.join("stale"), "x").expect("write");
    destination::distribute(&image, &dir_target(&out, true, vec![]), &NoProgress)
        .await
        .expect("overwritten");
    assert!(!folder.join("stale").exists(), "the old folder is gone");
    assert_eq!(names(&out), ["web-1.0.0-1"], "nothing moved aside is left");

    // A stored output that no longer matches its manifest: the copy fails its check and
    // leaves nothing in the destination.
    let other = tmp.path().join("other");
    fs_err::create_dir(&other).expect("mkdir");
    let stored = disk.path(&image.dir);
    let mut bytes = fs_err::read(&stored).expect("read");
    bytes.push(0);
    fs_err::write(&stored, bytes).expect("corrupt");
    let e = destination::distribute(&image, &dir_target(&other, false, vec![]), &NoProgress)
        .await
        .expect_err("corrupt");
    assert!(
        matches!(
            e,
            DistributeError::Directory(DirectoryError::Corrupt { .. })
        ),
        "{e}"
    );
    assert!(names(&other).is_empty(), "left behind: {:?}", names(&other));
}

#[tokio::test]
async fn a_format_the_build_did_not_export_is_converted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let image = store_build(&store, "web", None);
    let out = tmp.path().join("out");
    let t = dir_target(&out, false, vec![Format::Qcow2, Format::Ova]);
    let receipt = destination::distribute(&image, &t, &NoProgress)
        .await
        .expect("distributed");
    let folder = out.join("web-1.0.0-1");
    assert_eq!(
        names(&folder),
        [
            "SHA256SUMS",
            "manifest.json",
            "web-1.0.0-1.ova",
            "web-1.0.0-1.qcow2"
        ]
    );
    builder::export::verify_sums(&folder).expect("sums match");
    assert!(receipt.digests.contains_key("web-1.0.0-1.ova"));
    // The OVA is a tar whose first member is the OVF descriptor.
    let ova = fs_err::read(folder.join("web-1.0.0-1.ova")).expect("read");
    assert_eq!(&ova[..15], b"web-1.0.0-1.ovf");
}

/// `vagrant` with a private VAGRANT_HOME; fails the test when vagrant is not installed.
fn vagrant(home: &Path, args: &[&str]) -> Output {
    match Command::new("vagrant")
        .args(args)
        .env("VAGRANT_HOME", home)
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("NO_COLOR", "1")
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            panic!("this test needs Debian's `vagrant` (scripts/install-deps installs it): {e}")
        }
    }
}

#[tokio::test]
async fn a_vagrant_box_is_accepted_by_vagrant_box_add() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let image = store_build(&store, "web", None);
    let box_path = tmp.path().join("out/web.box");
    let t = Destination::parse(
        &format!("vagrant:{}", box_path.display()),
        &CliOptions::default(),
    )
    .expect("target");
    let receipt = destination::distribute(&image, &t, &NoProgress)
        .await
        .expect("box");
    assert_eq!(receipt.kind, "vagrant");
    assert_eq!(
        receipt.digests.get("box"),
        Some(
            &builder::digest::sha256_file(&box_path, None)
                .expect("hash")
                .hex()
        )
    );
    assert_eq!(names(&tmp.path().join("out")), ["web.box", "web.json"]);

    // What is inside: metadata.json, Vagrantfile, box.img = the stored qcow2.
    let list = Command::new("tar")
        .arg("tzf")
        .arg(&box_path)
        .output()
        .expect("tar runs");
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "metadata.json\nVagrantfile\nbox.img\n"
    );
    let unpacked = tmp.path().join("unpacked");
    fs_err::create_dir(&unpacked).expect("mkdir");
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&box_path)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .expect("tar runs");
    assert!(status.success());
    let metadata: serde_json::Value =
        serde_json::from_slice(&fs_err::read(unpacked.join("metadata.json")).expect("read"))
            .expect("json");
    assert_eq!(
        metadata,
        serde_json::json!({"provider": "libvirt", "format": "qcow2", "virtual_size": 1})
    );
    assert_eq!(
        builder::digest::sha256_file(&unpacked.join("box.img"), None)
            .expect("hash")
            .hex(),
        image.manifest.outputs[0].sha256
    );

    // Debian's vagrant accepts the box file, and the catalog metadata next to it.
    let home = tmp.path().join("vagrant-home");
    let added = vagrant(
        &home,
        &[
            "box",
            "add",
            "--name",
            "builder-test",
            &box_path.display().to_string(),
        ],
    );
    assert!(
        added.status.success(),
        "vagrant box add failed:\n{}{}",
        String::from_utf8_lossy(&added.stdout),
        String::from_utf8_lossy(&added.stderr)
    );
    let catalog = tmp.path().join("out/web.json");
    let added = vagrant(&home, &["box", "add", &catalog.display().to_string()]);
    assert!(
        added.status.success(),
        "vagrant box add (catalog) failed:\n{}{}",
        String::from_utf8_lossy(&added.stdout),
        String::from_utf8_lossy(&added.stderr)
    );
    let listed = vagrant(&home, &["box", "list"]);
    // `vagrant box list` pads the names into a column.
    let lines: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(lines, ["builder-test (libvirt, 0)", "web (libvirt, 1.0.0)"]);
}

fn builder(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(args)
        .env("BUILDER_STORE", store)
        .env("NO_COLOR", "1")
        .output()
        .expect("builder runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_command_line_names_its_mistakes_and_records_receipts() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("store");
    let store = Store::open(&root).expect("store");
    store_build(&store, "web", None);
    let out = tmp.path().join("out");
    let dir = format!("dir:{}", out.display());

    // Mistakes in --to are input errors (exit 2) with a hint, and nothing is written.
    for (to, expect, hint) in [
        (
            "ocj://127.0.0.1:5000/a:b",
            "is not a distribution target",
            "did you mean `oci://…`?",
        ),
        (
            "vagrnt:./x.box",
            "is not a distribution target",
            "did you mean `vagrant:…`?",
        ),
        ("oci://web:1.0.0", "registry", "targets are"),
        ("ami", "needs `--bucket`", ""),
    ] {
        let o = builder(&root, &["distribute", "web", "--to", &dir, "--to", to]);
        assert_eq!(o.status.code(), Some(2), "{to}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(expect), "{to}: {e}");
        assert!(e.contains(hint), "{to}: {e}");
        assert!(!out.exists(), "{to}: something was written");
    }
    let o = builder(&root, &["distribute", "wbe", "--to", &dir]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did you mean") || stderr(&o).contains("close name: web"),
        "{}",
        stderr(&o)
    );

    // A real run: the receipt as a JSON event, and in the store.
    let o = builder(
        &root,
        &[
            "distribute",
            "web/1.0.0/1",
            "--to",
            &dir,
            "--to",
            "store",
            "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let receipts: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "receipt")
        .map(|e| &e["receipt"])
        .collect();
    assert_eq!(receipts.len(), 2, "{events:?}");
    assert_eq!(receipts[0]["kind"], "directory");
    assert_eq!(receipts[1]["kind"], "store");
    assert_eq!(receipts[1]["location"], "web/1.0.0/1");

    let o = builder(&root, &["images", "show", "web", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let recorded = shown["receipts"].as_array().expect("receipts");
    assert_eq!(recorded.len(), 2);
    assert_eq!(
        recorded[0]["location"],
        out.join("web-1.0.0-1").display().to_string()
    );
    let o = builder(&root, &["images", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(listed[0]["sent"].as_array().map(Vec::len), Some(2));

    // The same folder again: refused in the check before anything is sent, exit 2.
    let o = builder(&root, &["distribute", "web", "--to", "store", "--to", &dir]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing was sent"), "{}", stderr(&o));
    let o = builder(&root, &["images", "show", "web", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        shown["receipts"].as_array().map(Vec::len),
        Some(2),
        "no new receipt"
    );
}

#[test]
fn recipe_targets_resolve_paths_against_the_recipe() {
    let text = "name: web\nversion: 1.2.0\nparentImage: base.qcow2\ncomponents:\n  - path: c.yml\ndistribution:\n  - directory: {path: out/, name: \"web-{{imagebuilder:buildVersion}}\", formats: [qcow2, ova], overwrite: true}\n  - vagrant: {path: boxes/}\n  - oci: {reference: \"127.0.0.1:5000/images/web:{{imagebuilder:version}}\", plainHttp: true}\n  - containerDisk: {reference: \"127.0.0.1:5000/vms/web\"}\n  - ami:\n      region: eu-west-1\n      bucket: my-imports\n      name: \"web {{imagebuilder:buildDate}}\"\n      amiTags: {team: web}\n      regions: [us-east-1]\n      launchPermission: {userIds: [\"012345678901\"], userGroups: [all]}\n      bootMode: uefi\n      importMethod: image\n      endpoint: {s3: \"http://127.0.0.1:9000\", ec2: \"http://127.0.0.1:9001\"}\n";
    let recipe_path = Path::new("/srv/recipes/web/recipe.yml");
    let checked = builder::recipe::check(recipe_path, text, &mut |n| {
        (PathBuf::from(n), Err(std::io::ErrorKind::NotFound.into()))
    });
    let recipe = checked.recipe.expect("a valid recipe");
    let targets: Vec<Destination> = recipe
        .distribution
        .iter()
        .map(|d| Destination::from_recipe(&d.value, recipe_path))
        .collect();
    assert_eq!(
        targets[0],
        Destination::Directory {
            path: PathBuf::from("/srv/recipes/web/out/"),
            name: "web-{{imagebuilder:buildVersion}}".into(),
            formats: vec![Format::Qcow2, Format::Ova],
            archives: Vec::new(),
            overwrite: true,
        }
    );
    assert!(
        matches!(&targets[1], Destination::Vagrant { folder: true, path, .. } if path == Path::new("/srv/recipes/web/boxes/"))
    );
    assert!(matches!(
        &targets[2],
        Destination::Oci {
            plain_http: true,
            ..
        }
    ));
    assert!(matches!(
        &targets[3],
        Destination::ContainerDisk {
            plain_http: false,
            ..
        }
    ));
    let Destination::Ami(ami) = &targets[4] else {
        panic!("an AMI target: {:?}", targets[4]);
    };
    assert_eq!(ami.bucket, "my-imports");
    assert_eq!(ami.launch_permission_user_ids, ["012345678901"]);
    assert_eq!(ami.import_method.as_deref(), Some("image"));
    assert_eq!(ami.ec2_endpoint.as_deref(), Some("http://127.0.0.1:9001"));

    // Tags render per build; a reference without a tag gets the default one.
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let image = store_build(&store, "web", None);
    assert_eq!(
        destination::render_reference("127.0.0.1:5000/images/web:{{imagebuilder:version}}", &image),
        "127.0.0.1:5000/images/web:1.0.0"
    );
    assert_eq!(
        destination::render_reference("127.0.0.1:5000/vms/web", &image),
        "127.0.0.1:5000/vms/web:1.0.0-1"
    );
}

#[test]
fn rm_prune_cache_removes_only_parents_nothing_stored_needs() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("store");
    let store = Store::open(&root).expect("store");
    let used = "a".repeat(64);
    let unused = "b".repeat(64);
    for sha in [&used, &unused] {
        fs_err::write(root.join(format!("cache/base/{sha}.qcow2")), "disk").expect("cache");
    }
    let parent = |sha: &str| ParentInput {
        source: "base.qcow2".into(),
        sha256: sha.to_string(),
        store_image: None,
        disk_sha256: None,
    };
    store_build(&store, "keep", Some(parent(&used)));
    store_build(&store, "gone", Some(parent(&unused)));
    // While a build is in progress nothing is pruned: its disk chain may use any cached base.
    let slot = store
        .allocate_build("busy", &Version::new(1, 0, 0))
        .expect("allocate");
    let report = store.prune_cache().expect("prune");
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.builds_in_progress, [slot.build_id().to_string()]);
    slot.abandon("test").expect("abandon");

    let o = builder(&root, &["images", "rm", "gone", "--prune-cache"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        names(&root.join("cache/base")),
        [format!("{used}.qcow2")],
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_command_line_pushes_to_both_oci_shapes_with_rendered_tags() {
    let registry = registry::TestRegistry::start();
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("store");
    let store = Store::open(&root).expect("store");
    store_build(&store, "web", None);
    // No credentials of this machine: an empty docker config.
    let docker = tmp.path().join("docker");
    fs_err::create_dir(&docker).expect("mkdir");
    fs_err::write(docker.join("config.json"), "{}").expect("config");
    let host = registry.host();
    let o = Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["distribute", "web", "--json", "--plain-http", "127.0.0.1"])
        .args(["--to", &format!("oci://{host}/images/web")])
        .args([
            "--to",
            &format!("containerdisk://{host}/vms/web:v{{{{imagebuilder:version}}}}"),
        ])
        .env("BUILDER_STORE", &root)
        .env("DOCKER_CONFIG", &docker)
        .env_remove("REGISTRY_AUTH_FILE")
        .env("NO_COLOR", "1")
        .output()
        .expect("builder runs");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let receipts: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|e| e["event"] == "receipt")
        .map(|e| e["receipt"].clone())
        .collect();
    assert_eq!(receipts.len(), 2, "{}", stderr(&o));
    assert_eq!(receipts[0]["kind"], "oci");
    let artifact = receipts[0]["location"].as_str().expect("location");
    // The default tag is `<version>-<build>`; the location pins the manifest digest.
    assert!(
        artifact.starts_with(&format!("oci://{host}/images/web:1.0.0-1@sha256:")),
        "{artifact}"
    );
    assert_eq!(receipts[1]["kind"], "containerdisk");
    let disk = receipts[1]["location"].as_str().expect("location");
    assert!(
        disk.starts_with(&format!("containerdisk://{host}/vms/web:v1.0.0@sha256:")),
        "{disk}"
    );
    let o = builder(&root, &["images", "show", "web", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(shown["receipts"].as_array().map(Vec::len), Some(2));
}
