//! Export figures: one disk exported to every format by `builder::export`, each format's wall
//! time next to a bare `qemu-img convert` of the same format (the floor: what checking and
//! hashing add is the difference).
//!
//! ```text
//! cargo run --release --example export_bench -- [SIZE_MIB] [DATA_MIB]
//! ```
//!
//! The disk is a qcow2 of SIZE_MIB (default 1024) holding DATA_MIB (default 256) of data:
//! half random (incompressible), half text-like (compressible), as a root filesystem is.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use builder::export::{self, ExportRequest};
use builder::recipe::Format;

#[path = "support/bench.rs"]
mod bench;
use bench::{random_bytes, sh};

fn make_disk(dir: &Path, size_mib: u64, data_mib: u64) -> std::path::PathBuf {
    let raw = dir.join("data.raw");
    let mut bytes = Vec::with_capacity((data_mib << 20) as usize);
    // Half incompressible for zstd and zlib.
    bytes.extend_from_slice(&random_bytes(((data_mib << 20) / 2) as usize));
    let text =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; /usr/lib/x86_64-linux-gnu\n";
    while (bytes.len() as u64) < data_mib << 20 {
        bytes.extend_from_slice(text);
    }
    fs_err::write(&raw, &bytes).expect("write data");
    // The rest of the disk is a hole, as unused space in a filesystem image is.
    fs_err::OpenOptions::new()
        .write(true)
        .open(&raw)
        .and_then(|f| f.set_len(size_mib << 20))
        .expect("grow the raw file");
    let disk = dir.join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk));
    fs_err::remove_file(&raw).expect("remove data");
    disk
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let data_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let work = tempfile::tempdir().expect("temp dir");
    let disk = make_disk(work.path(), size_mib, data_mib.min(size_mib));
    println!("disk: {size_mib} MiB virtual, {data_mib} MiB of data");

    let out = work.path().join("out");
    fs_err::create_dir(&out).expect("mkdir");
    let t0 = Instant::now();
    let req = ExportRequest::new(&disk, &out, "bench", Format::ALL);
    let report = export::export(&req, &export::NoProgress)
        .await
        .expect("export");
    let total = t0.elapsed();

    println!(
        "{:<6} {:>10} {:>12} {:>12}  (export = convert + check + sha256 + rename)",
        "format", "size MiB", "export s", "bare conv s"
    );
    for (a, (_, took)) in report.artifacts.iter().zip(&report.durations) {
        let bare = work.path().join(format!("bare.{}", a.format));
        let args: &[&str] = match a.format {
            Format::Qcow2 => &["-c", "-W", "-O", "qcow2", "-o", "compression_type=zstd"],
            Format::Raw => &["-W", "-O", "raw"],
            Format::Vmdk | Format::Ova => &["-O", "vmdk", "-o", "subformat=streamOptimized"],
            Format::Vhdx => &["-O", "vhdx"],
            Format::Vhd => &["-W", "-O", "vpc", "-o", "subformat=fixed,force_size=on"],
        };
        let t = Instant::now();
        sh(Command::new("qemu-img")
            .arg("convert")
            .args(args)
            .arg(&disk)
            .arg(&bare));
        let bare_secs = t.elapsed().as_secs_f64();
        let _ = fs_err::remove_file(&bare);
        println!(
            "{:<6} {:>10.1} {:>12.2} {:>12.2}",
            a.format.to_string(),
            a.size as f64 / (1 << 20) as f64,
            took.as_secs_f64(),
            bare_secs
        );
    }
    println!(
        "all formats: {:.2} s (qcow2 {})",
        total.as_secs_f64(),
        report.compression
    );
}
