//! Local tier: image versions in a real store folder: build numbers under concurrency,
//! commit/abandon, resolution of `name/1.x.x`, removal guarded by parent links.

use std::collections::BTreeSet;
use std::path::Path;

use builder::recipe::Format;
use builder::recipe::Version;
use builder::store::manifest::{Artifact, ImageId, Manifest, ParentInput, Status};
use builder::store::{BuildSlot, ImageRef, Store, StoreError};

fn v(s: &str) -> Version {
    s.parse().expect("version")
}

/// Store one successful build with a (fake, small) qcow2 output recorded in its manifest.
fn store_build(store: &Store, name: &str, version: &str, parent: Option<ParentInput>) -> String {
    let slot = store.allocate_build(name, &v(version)).expect("allocate");
    finish(slot, parent)
}

fn finish(slot: BuildSlot, parent: Option<ParentInput>) -> String {
    let file = format!("{}.qcow2", slot.id().name);
    let content = format!("disk of {}", slot.id());
    fs_err::write(slot.dir().join(&file), &content).expect("output");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.inputs.parent = parent;
    m.outputs.push(Artifact {
        file,
        format: Format::Qcow2,
        size: content.len() as u64,
        virtual_size: 1 << 20,
        sha256: builder::digest::sha256_file(
            &slot.dir().join(format!("{}.qcow2", slot.id().name)),
            None,
        )
        .expect("hash")
        .hex(),
    });
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit").reference()
}

fn entries(dir: &Path) -> usize {
    fs_err::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn concurrent_builds_never_share_a_number() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().to_path_buf();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let root = root.clone();
            std::thread::spawn(move || {
                // Each thread opens the store on its own, like separate builder processes.
                let store = Store::open(&root).expect("open");
                (0..5)
                    .map(|_| {
                        let slot = store.allocate_build("web", &v("1.0.0")).expect("allocate");
                        let n = slot.id().build;
                        slot.abandon("test").expect("abandon");
                        n
                    })
                    .collect::<Vec<u32>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().expect("thread"));
    }
    let unique: BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "a number was handed out twice: {all:?}"
    );
    assert_eq!(unique, (1..=30).collect());
    // Every abandoned build left its logs in failed/, and nothing in staging/.
    assert_eq!(entries(&root.join("failed")), 30);
    assert_eq!(entries(&root.join("staging")), 0);
}

#[test]
fn references_resolve_to_the_highest_version_and_newest_build() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("open");
    for version in ["1.0.0", "1.2.0", "1.10.0", "1.10.0", "2.0.0"] {
        store_build(&store, "web", version, None);
    }
    store_build(&store, "base", "0.1.0", None);
    let resolve = |r: &str| {
        store
            .resolve(&r.parse::<ImageRef>().expect("ref"))
            .map(|i| i.reference())
    };

    // 1.10.0 beats 1.2.0 (numeric, not text), and build 2 beats build 1.
    assert_eq!(resolve("web/1.x.x").expect("found"), "web/1.10.0/2");
    assert_eq!(resolve("web").expect("found"), "web/2.0.0/1");
    assert_eq!(resolve("web/1.2.x").expect("found"), "web/1.2.0/1");
    assert_eq!(resolve("web/1.10.0/1").expect("found"), "web/1.10.0/1");
    let matching = store
        .matching(&"web/1.x.x".parse().expect("ref"))
        .expect("list");
    assert_eq!(matching.len(), 4);

    let e = resolve("web/3.x.x").expect_err("none");
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    match store.resolve(&"wbe".parse().expect("ref")) {
        Err(StoreError::NotFound { close, .. }) => assert_eq!(close, vec!["web".to_string()]),
        other => panic!("expected not found, got {other:?}"),
    }

    // What a recipe's parentImage gets: the qcow2 and its digest from the manifest.
    let parent = store.resolve_image("web/1.x.x").expect("parent");
    let disk = parent.disk.expect("a disk");
    assert_eq!(disk.path, tmp.path().join("images/web/1.10.0/2/web.qcow2"));
    assert_eq!(
        disk.sha256,
        builder::digest::sha256_file(&disk.path, None)
            .expect("hash")
            .hex()
    );
    // A disk file removed by hand: the image cannot be a parent any more.
    fs_err::remove_file(tmp.path().join("images/base/0.1.0/1/base.qcow2")).expect("rm");
    let e = store.resolve_image("base").expect_err("gone");
    assert!(matches!(e, StoreError::NoDisk { .. }), "{e}");
    let e = store.resolve_image("web/1.x.2").expect_err("bad ref");
    assert!(matches!(e, StoreError::BadReference { .. }), "{e}");
}

#[test]
fn a_parent_cannot_be_removed_while_a_child_uses_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("open");
    let base = store_build(&store, "base", "1.0.0", None);
    let base_img = store.resolve(&base.parse().expect("ref")).expect("base");
    let digest = base_img.disk.as_ref().expect("disk").sha256.clone();
    // One child names it by reference, another only by digest (a parent given as a path).
    store_build(
        &store,
        "web",
        "1.0.0",
        Some(ParentInput {
            source: "base/1.x.x".into(),
            sha256: digest.clone(),
            store_image: Some(base.clone()),
            disk_sha256: None,
        }),
    );
    store_build(
        &store,
        "db",
        "1.0.0",
        Some(ParentInput {
            source: "/somewhere/base.qcow2".into(),
            sha256: digest,
            store_image: None,
            disk_sha256: None,
        }),
    );
    let e = store
        .remove(std::slice::from_ref(&base_img), false)
        .expect_err("in use");
    match &e {
        StoreError::InUse { dependents, .. } => {
            assert_eq!(
                dependents,
                &vec!["db/1.0.0/1".to_string(), "web/1.0.0/1".to_string()]
            )
        }
        other => panic!("{other}"),
    }
    assert!(base_img.dir.is_dir(), "nothing was removed");

    // Removing the parent together with its children is fine.
    let mut all = store.matching(&"web".parse().expect("ref")).expect("web");
    all.extend(store.matching(&"db".parse().expect("ref")).expect("db"));
    all.push(base_img.clone());
    store.remove(&all, false).expect("remove all");
    assert!(store.list().expect("list").images.is_empty());
    assert_eq!(
        entries(&tmp.path().join("trash")),
        0,
        "the trash is emptied"
    );

    // Forced removal ignores the link.
    let base = store_build(&store, "base", "1.0.0", None);
    let base_img = store.resolve(&base.parse().expect("ref")).expect("base");
    store_build(
        &store,
        "web",
        "1.0.0",
        Some(ParentInput {
            source: "base".into(),
            sha256: "00".repeat(32),
            store_image: Some(base.clone()),
            disk_sha256: None,
        }),
    );
    store
        .remove(std::slice::from_ref(&base_img), true)
        .expect("forced");
    assert_eq!(base, "base/1.0.0/2", "numbers are not reused after removal");
}

#[test]
fn a_dropped_slot_keeps_its_logs_and_leaves_no_half_build() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("open");
    let slot = store.allocate_build("web", &v("1.0.0")).expect("allocate");
    fs_err::write(slot.logs_dir().join("serial.log"), "boot…").expect("log");
    fs_err::write(slot.dir().join("web.qcow2"), "half a disk").expect("output");
    let mut m = Manifest::new(
        ImageId {
            name: "web".into(),
            version: "1.0.0".into(),
            build: 1,
        },
        slot.build_id(),
    );
    m.status = Status::Failed;
    m.write(slot.dir()).expect("manifest");
    let final_dir = slot.final_dir();
    drop(slot); // an error or Ctrl-C in the build

    assert!(!final_dir.exists());
    let listing = store.list().expect("list");
    assert!(listing.images.is_empty());
    assert_eq!(listing.failed.len(), 1);
    let failed = &listing.failed[0];
    assert_eq!(failed.reference(), "web/1.0.0/1");
    assert_eq!(
        failed.record.failure.as_deref(),
        Some("the build was interrupted")
    );
    assert!(failed.logs_dir().join("serial.log").is_file());
    assert!(failed.dir.join("manifest.json").is_file());
    assert!(
        !failed.dir.join("web.qcow2").exists(),
        "outputs of a failed build are dropped"
    );
    assert_eq!(entries(&tmp.path().join("staging")), 0);
    let found = store
        .failed_build(&"web/1.0.0/1".parse().expect("ref"))
        .expect("lookup");
    assert!(found.is_some());
}
