//! Local tier, real qemu-img: a small qcow2 with a backing chain exported to every format,
//! each output checked with the real tools (`qemu-img check`, `qemu-img compare`,
//! `sha256sum -c`, `tar`), and failures that must leave nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use builder::export::{self, ExportError, ExportProgress, ExportRequest};
use builder::recipe::{Compression, Format};
use builder::store::Artifact;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .expect("the command runs (qemu-utils, coreutils, tar installed)");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// base.qcow2 (64 MiB, 1 MiB of 0xab) ← disk.qcow2 (2 MiB of 0xcd at 10 MiB): the source is an
/// overlay, so every export must flatten the chain.
fn make_disk(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let disk = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-c", "write -P 0xab 0 1M"])
        .arg(&base));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&disk));
    run(Command::new("qemu-io")
        .args(["-c", "write -P 0xcd 10M 2M"])
        .arg(&disk));
    disk
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs_err::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Records what the export reported.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl ExportProgress for Recorder {
    fn started(&self, format: Format, file: &str) {
        self.events
            .lock()
            .expect("lock")
            .push(format!("start {format} {file}"));
    }
    fn converting(&self, format: Format, percent: f32) {
        assert!((0.0..=100.0).contains(&percent), "{percent}");
        self.events
            .lock()
            .expect("lock")
            .push(format!("pct {format}"));
    }
    fn finished(&self, a: &Artifact, _took: std::time::Duration) {
        self.events
            .lock()
            .expect("lock")
            .push(format!("done {}", a.format));
    }
}

#[tokio::test]
async fn every_format_is_exported_checked_and_hashed() {
    let work = tempfile::tempdir().expect("temp dir");
    let disk = make_disk(work.path());
    let out = work.path().join("out");
    fs_err::create_dir(&out).expect("mkdir");

    // Asked in a scrambled order: qcow2 still comes first.
    let formats = [
        Format::Ova,
        Format::Vhd,
        Format::Vhdx,
        Format::Vmdk,
        Format::Raw,
        Format::Qcow2,
    ];
    let mut req = ExportRequest::new(&disk, &out, "web-1.2.0-3", &formats);
    req.machine.cpus = 3;
    req.machine.memory_mib = 1536;
    let progress = Recorder::default();
    let report = export::export(&req, &progress).await.expect("export");

    assert_eq!(
        report.compression,
        Compression::Zstd,
        "qemu-img 7.2 writes zstd"
    );
    let order: Vec<Format> = report.artifacts.iter().map(|a| a.format).collect();
    assert_eq!(order, Format::ALL.to_vec());
    let events = progress.events.lock().expect("lock").clone();
    assert_eq!(
        events.first().map(String::as_str),
        Some("start qcow2 web-1.2.0-3.qcow2")
    );
    assert!(
        events.iter().any(|e| e == "pct qcow2"),
        "no qcow2 progress: {events:?}"
    );
    assert!(events.iter().any(|e| e == "pct vmdk"), "no vmdk progress");

    // Exactly the outputs and SHA256SUMS: no temporary file left.
    assert_eq!(
        names(&out),
        [
            "SHA256SUMS",
            "web-1.2.0-3.ova",
            "web-1.2.0-3.qcow2",
            "web-1.2.0-3.raw",
            "web-1.2.0-3.vhd",
            "web-1.2.0-3.vhdx",
            "web-1.2.0-3.vmdk",
        ]
    );

    for a in &report.artifacts {
        let path = a.path(&out);
        assert_eq!(a.virtual_size, 64 << 20, "{}", a.file);
        assert_eq!(a.size, fs_err::metadata(&path).expect("stat").len());
        // The digest is recomputed by an independent tool.
        let line = run(Command::new("sha256sum").arg(&path));
        assert_eq!(
            line.split_whitespace().next(),
            Some(a.sha256.as_str()),
            "{}",
            a.file
        );
        // The data equals the source's (the chain flattened), compared by qemu-img itself.
        let qemu_format = match a.format {
            Format::Vhd => "vpc",
            Format::Ova => continue,
            f => f.name(),
        };
        if matches!(a.format, Format::Qcow2 | Format::Vmdk | Format::Vhdx) {
            run(Command::new("qemu-img")
                .args(["check", "-q", "-f", qemu_format])
                .arg(&path));
        }
        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", qemu_format])
            .arg(&disk)
            .arg(&path));
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", qemu_format])
            .arg(&path));
        assert!(
            !info.contains("backing-filename"),
            "{} has a backing file",
            a.file
        );
    }
    let qcow2_info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(out.join("web-1.2.0-3.qcow2")));
    assert!(
        qcow2_info.contains(r#""compression-type": "zstd""#),
        "{qcow2_info}"
    );

    // SHA256SUMS is what `sha256sum -c` accepts.
    let checked = run(Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&out));
    assert_eq!(checked.matches(": OK").count(), 6, "{checked}");
    export::verify_sums(&out).expect("our own reader agrees");

    // The OVA: .ovf, .mf, .vmdk in that order, USTAR, and the .mf digests are right.
    let listing = run(Command::new("tar")
        .arg("-tvf")
        .arg(out.join("web-1.2.0-3.ova")));
    let members: Vec<&str> = listing
        .lines()
        .map(|l| l.split_whitespace().last().expect("a name"))
        .collect();
    assert_eq!(
        members,
        ["web-1.2.0-3.ovf", "web-1.2.0-3.mf", "web-1.2.0-3.vmdk"]
    );
    let magic = fs_err::read(out.join("web-1.2.0-3.ova")).expect("read ova");
    assert_eq!(&magic[257..263], b"ustar\0", "first header is POSIX ustar");
    let unpacked = work.path().join("unpacked");
    fs_err::create_dir(&unpacked).expect("mkdir");
    run(Command::new("tar")
        .arg("-xf")
        .arg(out.join("web-1.2.0-3.ova"))
        .arg("-C")
        .arg(&unpacked));
    let mf = fs_err::read_to_string(unpacked.join("web-1.2.0-3.mf")).expect("mf");
    assert_eq!(mf.lines().count(), 2, "{mf}");
    for line in mf.lines() {
        let (lhs, digest) = line.split_once(")= ").expect("SHA256(name)= hex");
        let name = lhs.strip_prefix("SHA256(").expect("SHA256(");
        let actual = run(Command::new("sha256sum").arg(unpacked.join(name)));
        assert_eq!(actual.split_whitespace().next(), Some(digest), "{name}");
    }
    // The vmdk inside is the exported vmdk, and the descriptor describes it.
    let inner = fs_err::read(unpacked.join("web-1.2.0-3.vmdk")).expect("inner vmdk");
    assert_eq!(
        inner,
        fs_err::read(out.join("web-1.2.0-3.vmdk")).expect("vmdk")
    );
    let ovf = fs_err::read_to_string(unpacked.join("web-1.2.0-3.ovf")).expect("ovf");
    assert!(ovf.contains(&format!(r#"ovf:size="{}""#, inner.len())));
    assert!(ovf.contains(&format!(r#"ovf:capacity="{}""#, 64u64 << 20)));
    assert!(ovf.contains("<rasd:VirtualQuantity>3</rasd:VirtualQuantity>"));
    assert!(ovf.contains("<rasd:VirtualQuantity>1536</rasd:VirtualQuantity>"));
    // Well-formed XML, checked by a real parser.
    let parsed = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])",
        ])
        .arg(unpacked.join("web-1.2.0-3.ovf"))
        .status()
        .expect("python3 runs");
    assert!(
        parsed.success(),
        "the OVF descriptor is not well-formed XML"
    );

    // A second export into the same folder refuses to clobber.
    let e = export::export(&req, &export::NoProgress)
        .await
        .expect_err("exists");
    assert!(matches!(e, ExportError::Exists { .. }), "{e}");
}

#[tokio::test]
async fn ova_alone_and_zlib_and_uncompressed() {
    let work = tempfile::tempdir().expect("temp dir");
    let disk = make_disk(work.path());
    let out = work.path().join("out");
    fs_err::create_dir(&out).expect("mkdir");
    let mut req = ExportRequest::new(&disk, &out, "img", &[Format::Ova]);
    req.machine.firmware = builder::recipe::Firmware::Uefi;
    export::export(&req, &export::NoProgress)
        .await
        .expect("ova alone");
    // The vmdk converted for the OVA was temporary.
    assert_eq!(names(&out), ["SHA256SUMS", "img.ova"]);

    for (compression, expected) in [(Compression::Zlib, "zlib"), (Compression::None, "zlib")] {
        let out = work.path().join(format!("out-{compression}"));
        fs_err::create_dir(&out).expect("mkdir");
        let mut req = ExportRequest::new(&disk, &out, "img", &[Format::Qcow2]);
        req.compression = Some(compression);
        let report = export::export(&req, &export::NoProgress)
            .await
            .expect("qcow2");
        assert_eq!(report.compression, compression);
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(out.join("img.qcow2")));
        assert!(
            info.contains(&format!(r#""compression-type": "{expected}""#)),
            "{info}"
        );
        run(Command::new("qemu-img")
            .args(["compare", "-q"])
            .arg(&disk)
            .arg(out.join("img.qcow2")));
    }
}

#[tokio::test]
async fn a_bogus_source_fails_and_leaves_nothing() {
    let work = tempfile::tempdir().expect("temp dir");
    let out = work.path().join("out");
    fs_err::create_dir(&out).expect("mkdir");
    let bogus = work.path().join("bogus.qcow2");
    fs_err::write(&bogus, b"QFI\xfb this is not a qcow2 image").expect("write");
    let req = ExportRequest::new(&bogus, &out, "x", &[Format::Qcow2, Format::Raw]);
    let e = export::export(&req, &export::NoProgress)
        .await
        .expect_err("bogus");
    assert!(e.to_string().contains("bogus.qcow2"), "{e}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));

    let missing = ExportRequest::new(work.path().join("nope.qcow2"), &out, "x", &[Format::Raw]);
    let e = export::export(&missing, &export::NoProgress)
        .await
        .expect_err("missing");
    assert!(matches!(e, ExportError::Source { .. }), "{e}");
    assert!(names(&out).is_empty());
}

/// Breaks the source when a given format starts: the conversions before it succeeded, that
/// one fails. The finished outputs must be removed as well (all or nothing).
struct BreakSourceAt {
    format: Format,
    source: PathBuf,
    /// Remove the file (qemu-img cannot open it), or overwrite it with junk (qemu-img reads
    /// it as a 21-byte raw image: the conversion "succeeds" and verification must catch it).
    remove: bool,
}

impl ExportProgress for BreakSourceAt {
    fn started(&self, format: Format, _file: &str) {
        if format == self.format {
            if self.remove {
                fs_err::remove_file(&self.source).expect("remove source");
            } else {
                fs_err::write(&self.source, b"not an image any more").expect("overwrite");
            }
        }
    }
}

#[tokio::test]
async fn a_failure_midway_removes_finished_and_partial_outputs() {
    for remove in [true, false] {
        let work = tempfile::tempdir().expect("temp dir");
        let disk = make_disk(work.path());
        let out = work.path().join("out");
        fs_err::create_dir(&out).expect("mkdir");
        let req = ExportRequest::new(
            &disk,
            &out,
            "x",
            &[Format::Qcow2, Format::Raw, Format::Vmdk],
        );
        let breaker = BreakSourceAt {
            format: Format::Vmdk,
            source: disk.clone(),
            remove,
        };
        let e = export::export(&req, &breaker)
            .await
            .expect_err("source broken midway");
        if remove {
            assert!(
                matches!(
                    e,
                    ExportError::Convert {
                        format: Format::Vmdk,
                        ..
                    }
                ),
                "{e}"
            );
        } else {
            assert!(
                matches!(
                    e,
                    ExportError::Verify {
                        format: Format::Vmdk,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("virtual size"), "{e}");
        }
        assert!(names(&out).is_empty(), "left behind: {:?}", names(&out));
    }
}

/// Cancels the export (drops its future) once the raw conversion has reported progress.
#[tokio::test]
async fn a_cancelled_export_leaves_nothing() {
    let work = tempfile::tempdir().expect("temp dir");
    let disk = make_disk(work.path());
    let out = work.path().join("out");
    fs_err::create_dir(&out).expect("mkdir");
    let req = ExportRequest::new(&disk, &out, "x", &[Format::Qcow2, Format::Raw]);

    struct Notify(Mutex<Option<tokio::sync::oneshot::Sender<()>>>);
    impl ExportProgress for Notify {
        fn converting(&self, format: Format, _percent: f32) {
            if format == Format::Raw
                && let Some(tx) = self.0.lock().expect("lock").take()
            {
                let _ = tx.send(());
            }
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let notify = Notify(Mutex::new(Some(tx)));
    tokio::select! {
        biased;
        _ = rx => {}
        r = export::export(&req, &notify) => panic!("the export finished before it was cancelled: {r:?}"),
    }
    // The export's future is dropped: qemu-img was killed, and the finished qcow2 and the
    // partial raw (which qemu-img had open: it had reported progress) were removed.
    assert!(names(&out).is_empty(), "left behind: {:?}", names(&out));
}

/// The way a build uses export and the store together: export into the build's slot, record
/// the outputs in the manifest, commit; the stored image resolves to a disk whose digest is
/// the file's, and `sha256sum -c` passes in its final folder.
#[tokio::test]
async fn an_export_committed_to_the_store_resolves_as_a_parent() {
    use builder::store::Store;
    use builder::store::manifest::{ImageId, Manifest};

    let work = tempfile::tempdir().expect("temp dir");
    let disk = make_disk(work.path());
    let store = Store::open(work.path().join("store")).expect("store");
    let slot = store
        .allocate_build("web", &"1.2.0".parse().expect("version"))
        .expect("slot");
    let stem = format!("web-1.2.0-{}", slot.id().build);
    let req = ExportRequest::new(&disk, slot.dir(), &stem, &[Format::Qcow2, Format::Vmdk]);
    let report = export::export(&req, &export::NoProgress)
        .await
        .expect("export");
    let mut manifest = Manifest::new(
        ImageId {
            name: "web".into(),
            version: "1.2.0".into(),
            build: slot.id().build,
        },
        slot.build_id(),
    );
    manifest.outputs = report.artifacts.clone();
    manifest.write(slot.dir()).expect("manifest");
    let stored = slot.commit().expect("commit");

    let parent = store.resolve_image("web/1.x.x").expect("resolve");
    assert_eq!(parent.reference(), stored.reference());
    let d = parent.disk.expect("disk");
    assert_eq!(d.path, stored.dir.join("web-1.2.0-1.qcow2"));
    assert_eq!(
        d.sha256,
        builder::digest::sha256_file(&d.path, None)
            .expect("hash")
            .hex()
    );
    run(Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&stored.dir));
    run(Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(&disk)
        .arg(&d.path));
}
