//! Helpers shared by the benchmark examples, each of which includes this file with
//! `#[path = "support/bench.rs"] mod bench;` (a folder without `main.rs` is not an example).

// Each example that includes this uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use builder::machine::{FileInfo, FileSource, Machine, MachineError, PutOptions};

/// MiB per second for `bytes` moved in `d`.
pub fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

/// `n` bytes no compressor can shrink (xorshift64 from a fixed seed: the same every run).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// `/proc/loadavg`'s first three figures (1, 5 and 15 minutes), `?` when unreadable.
pub fn loadavg() -> String {
    fs_err::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Runs a helper command (qemu-img, mkfs…); panics with its stderr when it fails.
pub fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One timed transfer each way: `src` put to `remote`, then `remote` got back to `back`.
pub struct RoundTrip {
    pub put: FileInfo,
    pub put_time: Duration,
    pub get: FileInfo,
    pub get_time: Duration,
}

impl RoundTrip {
    pub async fn run(
        machine: &dyn Machine,
        src: &Path,
        remote: &Path,
        back: &Path,
    ) -> Result<RoundTrip, MachineError> {
        let t0 = Instant::now();
        let put = machine
            .put_file(
                remote,
                FileSource::Path(src.to_path_buf()),
                &PutOptions::default(),
            )
            .await?;
        let put_time = t0.elapsed();
        let t0 = Instant::now();
        let get = machine.get_file(remote, back).await?;
        Ok(RoundTrip {
            put,
            put_time,
            get,
            get_time: t0.elapsed(),
        })
    }

    /// Put and get speed, MiB/s.
    pub fn speeds(&self) -> (f64, f64) {
        (
            mib_s(self.put.size, self.put_time),
            mib_s(self.get.size, self.get_time),
        )
    }
}
