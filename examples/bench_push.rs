//! Push throughput to a local OCI registry next to `qemu-img convert -O qcow2` of the same
//! file (the read/write baseline: what a local copy of the disk costs on this machine).
//!
//! ```text
//! cargo run --release --example bench_push -- [DATA_MIB]      # default 1024
//! BENCH_DISK=/path/to/disk.qcow2 cargo run --release --example bench_push
//! ```
//!
//! Starts Debian's `docker-registry` on loopback (as tests/distribute_oci.rs does; install it
//! with scripts/install-deps), builds a stored image around a qcow2 holding DATA_MIB of data
//! (or BENCH_DISK), and prints MiB/s of: the baseline, an artifact push, a containerDisk push
//! (streamed tar layer), and a second artifact push (every blob already there), plus the
//! ratio push / baseline (goal ≥ 0.5). The registry writes to a temp dir on the same disk.

// The tests' registry guard: the bench uses a part of it.
#[allow(dead_code)]
#[path = "../tests/support/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use builder::distribute::NoProgress;
use builder::distribute::oci::{self, OciOptions, OciShape};
use builder::recipe::Format;
use builder::recipe::OciReference;
use builder::recipe::Version;
use builder::store::manifest::{Artifact, Manifest};
use builder::store::{Store, StoredImage};

#[path = "support/bench.rs"]
mod bench;
use bench::{mib_s, sh};

/// A qcow2 with `mib` MiB of data, in 64 MiB runs of different byte patterns.
fn make_disk(path: &Path, mib: u64) {
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(format!("{}M", mib + 64)));
    let mut cmds = Vec::new();
    let mut at = 0;
    while at < mib {
        let n = (mib - at).min(64);
        cmds.push("-c".to_string());
        cmds.push(format!("write -q -P {} {at}M {n}M", 1 + (at / 64) % 250));
        at += n;
    }
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(&cmds)
        .arg(path));
}

fn stored_image(store_dir: &Path, disk: Option<PathBuf>, mib: u64) -> StoredImage {
    let store = Store::open(store_dir).expect("store");
    let slot = store
        .allocate_build("bench", &"1.0.0".parse::<Version>().expect("version"))
        .expect("allocate");
    let file = "bench-1.0.0-1.qcow2".to_string();
    let path = slot.dir().join(&file);
    match disk {
        Some(src) => {
            fs_err::copy(&src, &path).expect("copy BENCH_DISK");
        }
        None => make_disk(&path, mib),
    }
    let sha256 = builder::digest::sha256_file(&path, None)
        .expect("hash")
        .hex();
    fs_err::write(slot.dir().join("SHA256SUMS"), format!("{sha256}  {file}\n")).expect("sums");
    let mut m = Manifest::new(slot.id().clone(), slot.build_id());
    m.outputs.push(Artifact {
        file,
        format: Format::Qcow2,
        size: fs_err::metadata(&path).expect("size").len(),
        virtual_size: 0,
        sha256,
    });
    m.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit")
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("DATA_MIB is a number"))
        .unwrap_or(1024);
    let given = std::env::var_os("BENCH_DISK").map(PathBuf::from);
    let tmp = tempfile::tempdir().expect("temp dir");
    eprintln!("preparing the disk ...");
    let image = stored_image(&tmp.path().join("store"), given, mib);
    let disk = image.disk.clone().expect("disk");
    let size = fs_err::metadata(&disk.path).expect("size").len();

    // Baseline: read the disk and write a copy (best of two; the page cache is warm after
    // the hash above, as it is for the pushes).
    let out = tmp.path().join("convert.qcow2");
    let mut baseline = Duration::MAX;
    for _ in 0..2 {
        let _ = fs_err::remove_file(&out);
        let t = Instant::now();
        sh(Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&disk.path)
            .arg(&out));
        baseline = baseline.min(t.elapsed());
    }
    let _ = fs_err::remove_file(&out);

    let registry = registry::TestRegistry::start();
    let options = OciOptions {
        plain_http: vec![registry.host()],
        ..OciOptions::default()
    };
    let reference = |path: &str| -> OciReference {
        format!("{}/{path}", registry.host())
            .parse()
            .expect("reference")
    };
    let time = |shape, path: &'static str| {
        let image = &image;
        let options = &options;
        let dest = reference(path);
        async move {
            let t = Instant::now();
            oci::push(image, &dest, shape, options, &NoProgress)
                .await
                .expect("push");
            t.elapsed()
        }
    };
    // The registry's own ceiling: the file in one PUT (digest known, nothing hashed or
    // checked on this side), streamed by reqwest from the file.
    let raw = {
        let client = reqwest::Client::new();
        let t = Instant::now();
        let url = registry::start_upload(&client, &registry.host(), "bench/raw").await;
        let file = fs_err::tokio::File::open(&disk.path)
            .await
            .expect("open disk")
            .into_parts()
            .0;
        let response = client
            .put(format!("{url}&digest=sha256:{}", disk.sha256))
            .header("content-type", "application/octet-stream")
            .header("content-length", size)
            .body(reqwest::Body::from(file))
            .send()
            .await
            .expect("PUT");
        assert_eq!(response.status().as_u16(), 201, "monolithic PUT");
        t.elapsed()
    };
    let artifact = time(OciShape::Artifact, "bench/disk:1").await;
    let container = time(OciShape::ContainerDisk, "bench/vm:1").await;
    let again = time(OciShape::Artifact, "bench/disk:2").await;

    println!(
        "disk: {:.0} MiB qcow2 ({} MiB of data); chunk {} MiB; {} profile",
        size as f64 / (1 << 20) as f64,
        mib,
        options.chunk_size >> 20,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let base = mib_s(size, baseline);
    println!(
        "qemu-img convert -O qcow2   {:>8.1} MiB/s  ({:.2} s)",
        base,
        baseline.as_secs_f64()
    );
    for (name, t) in [
        ("registry alone (one PUT)", raw),
        ("push artifact", artifact),
        ("push containerDisk", container),
    ] {
        let rate = mib_s(size, t);
        println!(
            "{name:<27} {rate:>8.1} MiB/s  ({:.2} s)  ratio {:.2}",
            t.as_secs_f64(),
            rate / base
        );
    }
    println!(
        "push artifact again         {:>8.2} s (every blob already there: HEAD checks only)",
        again.as_secs_f64()
    );
}
