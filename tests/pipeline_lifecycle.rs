//! Local tier: lifecycle against a real store folder with real stored builds and a real
//! history, with a fake clock moved by the test: images deprecated, then deleted after the
//! grace period; parents in use and images other pipelines build on are kept, and the report
//! says why; images the pipeline did not make are never touched; remote copies are deleted
//! where that is possible and reported where it is not.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use builder::pipeline::Clock;
use builder::pipeline::history::{ExecStatus, History, Outcome, Trigger};
use builder::pipeline::lifecycle::{self, Decision, Policy, RemoteOutcome};
use builder::recipe::Format;
use builder::recipe::Version;
use builder::store::Receipt;
use builder::store::Store;
use builder::store::manifest::{Artifact, Manifest, ParentInput};
use chrono::{DateTime, TimeDelta, Utc};

/// A clock the test moves by hand.
struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    fn set_day(&self, day: i64) {
        *self.0.lock().expect("clock") = start() + TimeDelta::days(day);
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock")
    }
}

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .expect("time")
        .with_timezone(&Utc)
}

/// Store one build (a small fake qcow2 recorded in its manifest), optionally made from
/// `parent`; returns `name/x.y.z/n`.
fn store_build(store: &Store, name: &str, version: &str, parent: Option<&str>) -> String {
    let version: Version = version.parse().expect("version");
    let slot = store.allocate_build(name, &version).expect("allocate");
    let file = format!("{name}.qcow2");
    let content = format!("disk of {}", slot.id());
    fs_err::write(slot.dir().join(&file), &content).expect("output");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    if let Some(p) = parent {
        let parent_img = store.resolve(&p.parse().expect("ref")).expect("parent");
        m.inputs.parent = Some(ParentInput {
            source: p.to_string(),
            sha256: parent_img.disk.expect("disk").sha256,
            store_image: Some(p.to_string()),
            disk_sha256: None,
        });
    }
    m.outputs.push(Artifact {
        file: file.clone(),
        format: Format::Qcow2,
        size: content.len() as u64,
        virtual_size: 1 << 20,
        sha256: builder::digest::sha256_file(&slot.dir().join(&file), None)
            .expect("hash")
            .hex(),
    });
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit").reference()
}

/// The pipeline `web` builds an image on `day` (recorded in the history as it would be).
fn pipeline_builds(
    store: &Store,
    history: &History,
    clock: &TestClock,
    day: i64,
    version: &str,
) -> String {
    clock.set_day(day);
    let id = history
        .begin("web", Trigger::Manual, "test")
        .expect("begin")
        .expect("new");
    history
        .set_status(id, ExecStatus::Building, None)
        .expect("building");
    let image = store_build(store, "web", version, None);
    history
        .finish(id, &Outcome::available(image.clone()))
        .expect("finish");
    image
}

fn stored(store: &Store) -> Vec<String> {
    store
        .list()
        .expect("list")
        .images
        .iter()
        .map(|i| i.reference())
        .collect()
}

fn decisions(report: &lifecycle::Report) -> BTreeMap<String, String> {
    report
        .actions
        .iter()
        .map(|a| {
            let kind = match a.verdict.decision {
                Decision::Keep { .. } => "keep",
                Decision::Deprecate { .. } => "deprecate",
                Decision::StayDeprecated { .. } => "deprecated",
                Decision::Delete => "delete",
                Decision::Protected { .. } => "protected",
            };
            (a.verdict.image.clone(), kind.to_string())
        })
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn old_images_are_deprecated_then_deleted_but_parents_in_use_stay() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path()).expect("store");
    let clock = Arc::new(TestClock(Mutex::new(start())));
    let history = History::open(&History::default_path(&store))
        .expect("history")
        .with_clock(clock.clone());

    let old = pipeline_builds(&store, &history, &clock, 0, "0.9.0");
    let a = pipeline_builds(&store, &history, &clock, 10, "1.0.0");
    let b = pipeline_builds(&store, &history, &clock, 20, "1.0.0");
    let c = pipeline_builds(&store, &history, &clock, 30, "1.0.0");
    let d = pipeline_builds(&store, &history, &clock, 31, "1.0.0");
    // Another recipe's build made from `a`; an image of `web` built by hand (not by the
    // pipeline); a failed execution (no image).
    let child = store_build(&store, "db", "1.0.0", Some(&a));
    let by_hand = store_build(&store, "web", "1.0.0", None);
    let failed = history
        .begin("web", Trigger::Manual, "test")
        .expect("begin")
        .expect("new");
    history
        .finish(failed, &Outcome::failed("boom"))
        .expect("fail");

    let policy = Policy {
        keep_last: Some(2),
        delete_after: Some(TimeDelta::days(7)),
        ..Policy::default()
    };
    // Another pipeline's recipe builds on `web/0.x.x`, which is `old`.
    let protected = vec!["web/0.x.x".to_string(), "/path/to/base.qcow2".to_string()];

    // Day 32: the two newest are kept; the rest deprecated, nothing deleted yet.
    clock.set_day(32);
    let report =
        lifecycle::apply(&store, &history, "web", &policy, &*clock, &protected).expect("apply");
    assert_eq!(
        decisions(&report),
        map(&[
            (&d, "keep"),
            (&c, "keep"),
            (&b, "deprecate"),
            (&a, "deprecate"),
            (&old, "deprecate"),
        ])
    );
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let marks = history.marks(Some("web")).expect("marks");
    assert_eq!(marks.len(), 3);
    assert!(marks.iter().all(|m| m.deprecated_at == Some(clock.now())));
    assert_eq!(stored(&store).len(), 7, "deprecation deletes nothing");
    let text = report.to_string();
    assert!(
        text.contains(&format!("{d}: kept: number 1 of the newest 2 (keepLast)")),
        "{text}"
    );

    // Day 38: inside the grace period.
    clock.set_day(38);
    let report =
        lifecycle::apply(&store, &history, "web", &policy, &*clock, &protected).expect("apply");
    assert_eq!(decisions(&report)[&b], "deprecated");
    assert_eq!(stored(&store).len(), 7);

    // Day 40: the grace period is over. `b` goes; `a` is the parent of `child`, `old` is what
    // another pipeline builds on: both stay, and the report says which rule kept them.
    clock.set_day(40);
    let report =
        lifecycle::apply(&store, &history, "web", &policy, &*clock, &protected).expect("apply");
    assert_eq!(
        decisions(&report),
        map(&[
            (&d, "keep"),
            (&c, "keep"),
            (&b, "delete"),
            (&a, "protected"),
            (&old, "protected"),
        ])
    );
    assert_eq!(report.deleted(), [b.as_str()]);
    let text = report.to_string();
    assert!(
        text.contains(&format!(
            "{a}: kept although due for deletion: it is the parent of {child}"
        )),
        "{text}"
    );
    assert!(text.contains("builds on `web/0.x.x`"), "{text}");
    let now_stored = stored(&store);
    assert!(!now_stored.contains(&b), "{now_stored:?}");
    for kept in [&old, &a, &c, &d, &child, &by_hand] {
        assert!(now_stored.contains(kept), "{kept} missing: {now_stored:?}");
    }
    let deleted = history.marks(Some("web")).expect("marks");
    assert!(
        deleted
            .iter()
            .any(|m| m.image == b && m.deleted_at == Some(clock.now()))
    );
    // Nothing left in the store's trash.
    assert_eq!(
        fs_err::read_dir(tmp.path().join("trash"))
            .expect("trash")
            .count(),
        0
    );

    // The child is removed and the other pipeline no longer builds on `old`: both go.
    let child_img = store.resolve(&child.parse().expect("ref")).expect("child");
    store.remove(&[child_img], false).expect("rm child");
    clock.set_day(41);
    let report = lifecycle::apply(&store, &history, "web", &policy, &*clock, &[]).expect("apply");
    let mut gone = report.deleted();
    gone.sort();
    let mut expected = vec![old.as_str(), a.as_str()];
    expected.sort();
    assert_eq!(gone, expected);
    let mut left = stored(&store);
    left.sort();
    let mut expected = vec![c.clone(), d.clone(), by_hand.clone()];
    expected.sort();
    assert_eq!(
        left, expected,
        "only the kept images and the one built by hand"
    );

    // Again: nothing more to do, and an image removed by hand is reported as gone.
    let c_img = store.resolve(&c.parse().expect("ref")).expect("c");
    store.remove(&[c_img], false).expect("rm c");
    let report = lifecycle::apply(&store, &history, "web", &policy, &*clock, &[]).expect("apply");
    assert_eq!(decisions(&report), map(&[(&d, "keep")]));
    assert_eq!(report.gone, vec![c.clone()]);
}

#[test]
fn remote_copies_are_deleted_where_possible_and_reported_where_not() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let clock = Arc::new(TestClock(Mutex::new(start())));
    let history = History::open(&History::default_path(&store))
        .expect("history")
        .with_clock(clock.clone());
    let old = pipeline_builds(&store, &history, &clock, 0, "1.0.0");
    let new = pipeline_builds(&store, &history, &clock, 1, "1.0.0");
    let old_img = store.resolve(&old.parse().expect("ref")).expect("old");
    let new_img = store.resolve(&new.parse().expect("ref")).expect("new");

    // Where distribution sent `old`: a directory copy (its manifest names `old`), a directory
    // someone reused for another build, an OCI registry, the store itself.
    let copy = tmp.path().join("exports/web-1");
    let reused = tmp.path().join("exports/web-reused");
    for (dir, image) in [(&copy, &old_img), (&reused, &new_img)] {
        fs_err::create_dir_all(dir).expect("mkdir");
        fs_err::copy(image.dir.join("manifest.json"), dir.join("manifest.json")).expect("copy");
        fs_err::write(dir.join("web.qcow2"), "disk").expect("disk");
    }
    let receipt = |kind: &str, location: String| Receipt {
        kind: kind.into(),
        location,
        digests: BTreeMap::new(),
        ids: BTreeMap::new(),
        finished: start(),
        seconds: 1.0,
    };
    let receipts = vec![
        receipt("directory", copy.display().to_string()),
        receipt("directory", reused.display().to_string()),
        receipt("oci", "oci://registry.local/web:1.0.0@sha256:ab".into()),
        receipt("store", old.clone()),
    ];
    fs_err::write(
        old_img.dir.join(lifecycle::RECEIPTS_FILE),
        serde_json::to_vec(&receipts).expect("json"),
    )
    .expect("receipts");

    let policy = Policy {
        keep_last: Some(1),
        delete_after: Some(TimeDelta::zero()),
        remote: true,
        ..Policy::default()
    };
    clock.set_day(2);
    let report = lifecycle::apply(&store, &history, "web", &policy, &*clock, &[]).expect("apply");
    assert_eq!(report.deleted(), [old.as_str()]);
    let action = report
        .actions
        .iter()
        .find(|a| a.verdict.image == old)
        .expect("old's action");
    let outcomes: Vec<&RemoteOutcome> = action.remote.iter().map(|r| &r.outcome).collect();
    assert_eq!(outcomes[0], &RemoteOutcome::Deleted);
    assert!(
        matches!(outcomes[1], RemoteOutcome::Failed(why) if why.contains("not this build")),
        "{outcomes:?}"
    );
    assert!(matches!(outcomes[2], RemoteOutcome::NotSupported(_)));
    assert_eq!(outcomes[3], &RemoteOutcome::Local);
    assert!(
        !copy.exists(),
        "the directory copy of the deleted build is gone"
    );
    assert!(
        reused.join("web.qcow2").exists(),
        "a reused folder is left alone"
    );
    let text = report.to_string();
    assert!(
        text.contains("remote deletion not supported for oci (oci://registry.local/web:1.0.0"),
        "{text}"
    );
    // The history keeps what happened remotely with the deletion.
    let mark = history
        .marks(Some("web"))
        .expect("marks")
        .into_iter()
        .find(|m| m.image == old)
        .expect("mark");
    assert!(
        mark.detail
            .as_deref()
            .is_some_and(|d| d.contains("not supported for oci")),
        "{mark:?}"
    );
}
