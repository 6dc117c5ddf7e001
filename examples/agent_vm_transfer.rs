//! Prints agent figures inside a real VM (TCG here): put/get MiB/s of a file through the
//! agent, exec round trip, and for scale the guest's own `sha256sum` and `dd` speed.
//!
//!     cargo run --release --example agent_vm_transfer -- IMAGE [MiB]
//!
//! A benchmark, not a test: it asserts nothing about time.

use std::time::Instant;

use builder::machine::{Capture, ExecRequest, Machine};
use builder::undo::Outcome;
use builder::vm::VmOptions;
use builder::vm::session::{Session, SessionOptions};

#[path = "support/bench.rs"]
mod bench;
use bench::{RoundTrip, mib_s, random_bytes};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let image = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: agent_vm_transfer IMAGE [MiB]"))?;
    let mib: u64 = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100);
    let progress = |m: &str| eprintln!("vm: {m}");
    let mut vm = VmOptions::new(&image);
    // LOG_DIR keeps the serial console and QEMU logs (e.g. to see how long shutdown takes).
    vm.log_dir = std::env::var_os("LOG_DIR").map(Into::into);
    let mut options = SessionOptions::new(vm);
    // Measured after cloud-init finished, so it does not compete for the guest's CPUs.
    options.wait_cloud_init = true;
    let session = Session::open(options, &progress).await?;
    let agent = session
        .agent()
        .ok_or_else(|| anyhow::anyhow!("no agent"))?
        .clone();
    let result = async {
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("src.bin");
        let size = mib * 1024 * 1024;
        fs_err::write(&src, random_bytes(size as usize))?;
        let back = dir.path().join("back.bin");
        let remote = std::path::Path::new("/root/transfer.bin");
        let rounds = if std::env::var_os("SKIP_TRANSFER").is_some() {
            0
        } else {
            2
        };
        for round in 1..=rounds {
            let trip = RoundTrip::run(agent.as_ref(), &src, remote, &back).await?;
            anyhow::ensure!(trip.put.sha256 == trip.get.sha256, "digests differ");
            let (put, get) = trip.speeds();
            println!("round {round}: put {put:6.1} MiB/s   get {get:6.1} MiB/s   ({mib} MiB)");
        }
        for (what, script) in [
            ("guest sha256sum", "sha256sum /root/transfer.bin >/dev/null"),
            (
                "guest dd read",
                "dd if=/root/transfer.bin of=/dev/null bs=1M 2>/dev/null",
            ),
        ] {
            let t0 = Instant::now();
            agent
                .exec(&ExecRequest::bash(script), &Capture::default())
                .await?;
            println!("{what}: {:6.1} MiB/s", mib_s(size, t0.elapsed()));
        }
        let n = 20;
        let t0 = Instant::now();
        for _ in 0..n {
            agent
                .exec(&ExecRequest::argv(["true"]), &Capture::default())
                .await?;
        }
        println!(
            "exec `true` round trip: {:.1} ms",
            t0.elapsed().as_secs_f64() * 1000.0 / n as f64
        );
        let cap = Capture::default();
        agent
            .exec(
                &ExecRequest::bash(
                    "s=$(date +%s%N); for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done; \
                     echo $(( ($(date +%s%N) - s) / 10000000 ))",
                ),
                &cap,
            )
            .await?;
        println!(
            "guest fork+exec of /bin/true from bash: {} ms",
            String::from_utf8_lossy(&cap.stdout()).trim()
        );
        let t0 = Instant::now();
        for _ in 0..n {
            agent.stat(std::path::Path::new("/")).await?;
        }
        println!(
            "stat round trip: {:.1} ms",
            t0.elapsed().as_secs_f64() * 1000.0 / n as f64
        );
        if std::env::var_os("SKIP_REBOOT").is_none() {
            let before = agent.info().await?.boot_id;
            let t0 = Instant::now();
            agent.reboot().await?;
            let after = agent.info().await?.boot_id;
            anyhow::ensure!(before != after, "boot id did not change");
            let cap = Capture::default();
            agent
                .exec(&ExecRequest::argv(["cat", "/proc/uptime"]), &cap)
                .await?;
            println!(
                "reboot: back after {:.1} s, boot id {} -> {}, guest uptime {}",
                t0.elapsed().as_secs_f64(),
                &before[..8],
                &after[..8],
                String::from_utf8_lossy(&cap.stdout()).trim()
            );
        }
        anyhow::Ok(())
    }
    .await;
    drop(agent);
    session.close(Outcome::Success, &progress).await;
    result
}
